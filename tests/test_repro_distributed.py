"""Distributed training of the reproduction suite: 2 CPU processes over gloo."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bgnorm
from bgnorm.repro import dist as D

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int, rank: int = 0) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}


def _launch(target, args: tuple, timeout: float = 60.0) -> list[int | None]:
    """Run ``target(rank, port, *args)`` in WORLD spawned processes; their exit codes."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


# --------------------------------------------------------------------------------------------
# Unit pieces
# --------------------------------------------------------------------------------------------


def test_shard_bounds_cover_the_batch():
    for n in (0, 1, 7, 8, 64):
        for world in (1, 2, 3, 8):
            spans = [D.shard_bounds(n, D.DistEnv(r, world)) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_local_workers_rule():
    assert D.local_workers(8, D.DistEnv(0, 2)) == 4
    assert D.local_workers(2, D.DistEnv(0, 2)) == 1
    assert D.local_workers(1, D.DistEnv(0, 2)) == 1
    with pytest.raises(ValueError, match="multiple of the world size"):
        D.local_workers(6, D.DistEnv(0, 4))


def test_single_process_is_unchanged():
    x, y = torch.randn(4, 3), torch.arange(4)
    assert D.shard_batch(x, y, None)[0] is x
    model = nn.Linear(3, 2)
    assert D.wrap_model(model, None, sync_norm=True) is model
    assert D.active() is None


# --------------------------------------------------------------------------------------------
# --sync-norm: one step on 2 ranks = one step of one process on the full batch
# --------------------------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), bgnorm.BatchGroupNorm2d(8, num_groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 1, 6, 6, generator=g), torch.randint(0, 3, (10,), generator=g)


def _step(model: nn.Module, x, y, scale: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * scale
    opt.zero_grad()
    loss.backward()
    opt.step()


def _sync_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(_env(port, rank))
    torch.set_num_threads(1)
    env, _ = D.init_distributed("cpu", timeout_s=30, sync_norm=True)
    try:
        model = D.wrap_model(_net(), env, sync_norm=True)
        kinds = sorted({type(m).__name__ for m in model.modules()})
        x, y = _batch()
        xs, ys = D.shard_batch(x, y, env)  # uneven: 5 + 5 here; the loss rule covers any split
        _step(model, xs, ys, env.world_size / len(x))
        if env.is_main:
            torch.save({"state": D.unwrap(model).state_dict(), "kinds": kinds}, out)
    finally:
        D.shutdown()


def test_sync_norm_matches_single_process(tmp_path: Path):
    out = str(tmp_path / "rank0.pt")
    assert _launch(_sync_worker, (out,)) == [0, 0]
    got = torch.load(out, weights_only=True)
    assert "SyncBatchGroupNorm" in got["kinds"] and "BatchNorm2d" not in got["kinds"]
    ref = _net()
    x, y = _batch()
    _step(ref, x, y, 1.0 / len(x))
    # BN became a SyncBatchGroupNorm with G = C (CPU), which adds its layout's extra state.
    want = {k: v for k, v in ref.state_dict().items() if not k.endswith("_extra_state")}
    assert {k for k in got["state"] if not k.endswith("_extra_state")} == set(want)
    for k, v in want.items():  # running statistics, parameters after one SGD step
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------
# Failure: a rank dies, the other raises within the timeout
# --------------------------------------------------------------------------------------------


def _dying_worker(rank: int, port: int, out: str, timeout_s: float) -> None:
    os.environ.update(_env(port, rank))
    torch.set_num_threads(1)
    D.init_distributed("cpu", timeout_s=timeout_s)
    D.barrier()
    if rank == 1:
        os._exit(7)  # abrupt: no destroy_process_group, no goodbye
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        for _ in range(100):
            D.all_reduce_sum(torch.ones(3), "the test's all-reduce")
        result = {"error": None}
    except RuntimeError as exc:
        result = {"error": str(exc)}
    result["seconds"] = time.monotonic() - t0
    Path(out).write_text(json.dumps(result))
    os._exit(1)  # the process group is broken; skip its teardown


def test_dead_rank_gives_clear_error_within_timeout(tmp_path: Path):
    out = tmp_path / "rank0.json"
    codes = _launch(_dying_worker, (str(out), 5.0), timeout=60)
    assert codes == [1, 7]
    result = json.loads(out.read_text())
    assert result["error"] is not None
    assert "another rank probably died" in result["error"]
    assert result["seconds"] < 5.0 + 10.0


# --------------------------------------------------------------------------------------------
# The CLI under torchrun
# --------------------------------------------------------------------------------------------


def _cli(out: Path, *extra: str, nproc: int | None = WORLD) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(_free_port())]
    cmd += ["-m", "bgnorm.cli", "reproduce", "--task", "batch-size",
            "--preset", "smoke", "--norms", "bgn", "--batch-sizes", "8", "--seeds", "0",
            "--out", str(out), "--no-progress", "--no-report", *extra]
    if not nproc:
        cmd += ["--jobs", "1", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _records(out: Path) -> list[dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_torchrun_cell_matches_single_process(tmp_path: Path):
    out = tmp_path / "ddp"
    proc = _cli(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(out)
    assert len(recs) == 1 and recs[0]["status"] == "ok"  # exactly one record, written once
    assert recs[0]["result"]["distributed"] == {
        "world_size": 2, "workers_per_rank": 4, "sync_norm": False, "examples_per_rank": 32}
    assert recs[0]["meta"]["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["cells", "results.jsonl"]
    assert proc.stderr.count("1 finished") == 1  # only rank 0 reports

    again = _cli(out)  # resuming: nothing left to do, nothing written
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_records(out)) == 1

    # W = 8 virtual workers split 4 + 4: the single-process run's statistics, hence its result.
    single = tmp_path / "single"
    ref = _cli(single, nproc=None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = recs[0]["result"], _records(single)[0]["result"]
    assert [e[1] for e in a["evals"]] == pytest.approx([e[1] for e in b["evals"]], abs=0.3)
    assert a["train_losses"] == pytest.approx(b["train_losses"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_sync_norm_one_worker_cell(tmp_path: Path):
    # W = 1 (total_batch = b): with --sync-norm the statistics span the whole batch as on one
    # process; the result matches the single-process run.
    out = tmp_path / "ddp"
    proc = _cli(out, "--sync-norm", "--set", "total_batch=8", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = _records(out)[0]
    assert rec["result"]["distributed"]["sync_norm"] is True
    single = tmp_path / "single"
    ref = _cli(single, "--set", "total_batch=8", "--epochs", "1", nproc=None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert rec["result"]["train_losses"] == pytest.approx(
        _records(single)[0]["result"]["train_losses"], rel=1e-3)


def test_dist_is_not_left_initialized():
    assert not dist.is_initialized()
