"""SyncBatchGroupNorm: multi-process exactness against single-process BGN, failure behaviour.

Real gloo process groups on this machine (worker processes from a fork server, a FileStore in
tmp_path, so no ports). One launch per world size runs the whole case table and saves every
rank's results; the tests below compare them with single-process BGN on the concatenated batch,
in the parent process.
"""

from __future__ import annotations

import copy
import datetime
import doctest
import math
import multiprocessing
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bgnorm.distributed
from bgnorm import (
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    GeneralBatchGroupNorm2d,
    SyncBatchGroupNorm,
)

F64 = torch.float64

# name: (features (C, *spatial), G, per-rank batch sizes by world size, layer kwargs, steps, dtype)
CASES: dict[str, tuple[tuple[int, ...], int, dict[int, tuple[int, ...]], dict, int, Any]] = {
    "whole-channels-2d": ((8, 3, 4), 4, {2: (3, 0), 3: (2, 0, 3)}, {}, 2, F64),
    "g-equals-c-2d": ((6, 2, 3), 6, {2: (0, 4), 3: (1, 3, 0)}, {}, 2, F64),
    "bands-2d": ((4, 4, 6), 8, {2: (2, 5), 3: (0, 2, 1)}, {}, 2, F64),
    "straddling-2d": ((6, 2, 2), 4, {2: (3, 0), 3: (2, 3, 0)}, {}, 2, F64),
    "input-2d": ((12,), 3, {2: (0, 5), 3: (3, 0, 4)}, {}, 2, F64),
    "straddling-1d": ((6, 5), 5, {2: (4, 1), 3: (0, 1, 2)}, {}, 2, F64),
    "bands-3d": ((4, 2, 3, 3), 8, {2: (2, 0), 3: (1, 0, 2)}, {}, 2, F64),
    "input-6d": ((3, 2, 2, 1, 2), 6, {2: (2, 3), 3: (2, 0, 2)}, {}, 2, F64),
    "momentum-none": ((8, 3, 3), 2, {2: (3, 0), 3: (0, 2, 3)}, {"momentum": None}, 3, F64),
    "no-affine": ((6, 4), 3, {2: (0, 3), 3: (2, 2, 0)}, {"affine": False}, 2, F64),
    "no-running-stats": ((6, 3, 3), 3, {2: (2, 3), 3: (3, 0, 2)},
                         {"track_running_stats": False}, 2, F64),
    "large-offset-float32": ((8, 5, 5), 4, {2: (6, 2), 3: (3, 0, 5)}, {}, 2, torch.float32),
    "bfloat16": ((8, 4, 4), 4, {2: (3, 2), 3: (2, 0, 3)}, {}, 2, torch.bfloat16),
}
OFFSET = 1e4  # added to the large-offset case's inputs: E[x^2] - E[x]^2 would lose everything
REF_CLS = {2: BatchGroupNorm1d, 3: BatchGroupNorm1d, 4: BatchGroupNorm2d, 5: BatchGroupNorm3d}
# Per-rank spatial sizes differ: rank r holds (N_r, 4, 2 + r, 3), groups of two whole channels.
SPATIAL_BATCHES = {2: (3, 2), 3: (2, 0, 3)}
DDP_BATCHES = {2: (0, 5), 3: (3, 0, 2)}


# -- data, shared by the workers and the parent -------------------------------------------------
def _gen(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seed) % (2**31))


def _case_seed(name: str) -> int:
    return list(CASES).index(name)


def _data(name: str, world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (x, dy) of a case at a step (step -1: the eval batch)."""
    feat, _, batches, _, _, dtype = CASES[name]
    g = _gen(_case_seed(name), world, step)
    shape = (sum(batches[world]), *feat)
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5 + step
    if name.startswith("large-offset"):
        x = torch.randn(shape, generator=g, dtype=F64) + OFFSET
    dy = torch.randn(shape, generator=g, dtype=F64)
    return x.to(dtype), dy.to(dtype)


def _make(cls: Callable[..., nn.Module], name: str) -> nn.Module:
    feat, groups, _, kwargs, _, dtype = CASES[name]
    m = cls(feat[0], num_groups=groups, dtype=dtype, **kwargs)
    if m.affine:
        g = _gen(_case_seed(name), 99)
        with torch.no_grad():
            m.weight.copy_(1 + 0.5 * torch.randn(feat[0], generator=g, dtype=F64))
            m.bias.copy_(0.5 * torch.randn(feat[0], generator=g, dtype=F64))
    return m


def _split(t: torch.Tensor, batches: tuple[int, ...]) -> list[torch.Tensor]:
    return list(torch.split(t, list(batches)))


def _small_model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BatchGroupNorm2d(8, num_groups=4),  # whole channels
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        BatchGroupNorm2d(6, num_groups=4),  # 4x4 spatial: groups of 24 straddle 16-value channels
        nn.Flatten(),
        nn.Sequential(nn.Linear(96, 10), BatchGroupNorm1d(10, num_groups=5), nn.Linear(10, 3)),
    ).double()


def _ddp_data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(1234, world)
    n = sum(DDP_BATCHES[world])
    return (torch.randn(n, 3, 4, 4, generator=g, dtype=F64),
            torch.randn(n, 3, generator=g, dtype=F64))


def _spatial_input(world: int, rank: int) -> torch.Tensor:
    g = _gen(555, world, rank)
    return torch.randn(SPATIAL_BATCHES[world][rank], 4, 2 + rank, 3, generator=g, dtype=F64) + 1


# -- process launcher ---------------------------------------------------------------------------
def _entry(rank: int, world: int, tmp: str, target: Callable, timeout_s: float) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = target(rank, world, Path(tmp))
        torch.save(result, f"{tmp}/result{rank}.pt")
    except BaseException:
        Path(f"{tmp}/error{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _mp_context() -> Any:
    """A fork server that has imported torch once: later launches start in ~0.1 s, not seconds.

    Each spawned child would import torch itself (seconds on two cores); children forked from
    the server (which has run no torch ops, so no thread pools) share its imports.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "bgnorm", "pytest"])
    return ctx


def _launch(
    target: Callable, world: int, tmp: Path, timeout_s: float = 60.0, deadline_s: float = 150.0,
    may_die: tuple[int, ...] = (),
) -> list[Any]:
    """Run ``target(rank, world, tmp)`` on ``world`` gloo ranks; the per-rank return values.

    Ranks in ``may_die`` may exit without a result (None). Processes still alive after
    ``deadline_s`` are killed and the test fails, so a hang never blocks the suite.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = _mp_context()
    procs = [ctx.Process(target=_entry, args=(r, world, str(tmp), target, timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {r: (tmp / f"error{r}.txt").read_text() for r in range(world)
              if (tmp / f"error{r}.txt").exists()}
    if hung or errors:
        pytest.fail(f"ranks {hung} hung; errors: " + "\n".join(
            f"rank {r}:\n{e}" for r, e in errors.items()))
    results = []
    for r in range(world):
        path = tmp / f"result{r}.pt"
        if not path.exists() and r not in may_die:
            pytest.fail(f"rank {r} exited with code {procs[r].exitcode} and no result")
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    return results


# -- the worker of the main launch ----------------------------------------------------------------
def _run_case(name: str, rank: int, world: int, calls: list[int]) -> dict[str, Any]:
    feat, groups, batches, kwargs, steps, dtype = CASES[name]
    lo = sum(batches[world][:rank])
    hi = lo + batches[world][rank]
    m = _make(SyncBatchGroupNorm, name)
    rec: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": [], "fwd": [], "bwd": []}
    for step in range(steps):
        x, dy = _data(name, world, step)
        xl = x[lo:hi].clone().requires_grad_()
        calls.clear()
        y = m(xl)
        rec["fwd"].append(list(calls))
        calls.clear()
        y.backward(dy[lo:hi])
        rec["bwd"].append(list(calls))
        rec["y"].append(y.detach())
        rec["dx"].append(xl.grad)
        rec["dw"].append(None if m.weight is None else m.weight.grad.clone())
        rec["db"].append(None if m.bias is None else m.bias.grad.clone())
        m.zero_grad(set_to_none=True)
    rec["state"] = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    m.eval()
    calls.clear()
    try:
        rec["eval"] = m(_data(name, world, -1)[0][lo:hi])
    except ValueError as err:  # local batch statistics of an empty rank (no running stats)
        rec["eval"] = str(err)
    rec["eval_calls"] = list(calls)
    return rec


def _expect_error(fn: Callable[[], Any], exc: type[Exception]) -> str:
    try:
        fn()
    except exc as err:
        return str(err)
    return "no error"


def _error_checks(rank: int, world: int) -> dict[str, str]:
    out = {}
    # Every rank empty, and one value per group in the whole batch: all ranks raise together.
    m = SyncBatchGroupNorm(4, num_groups=2, dtype=F64)
    out["all-empty"] = _expect_error(lambda: m(torch.randn(0, 4, 2, 2, dtype=F64)), ValueError)
    m = SyncBatchGroupNorm(4, num_groups=16, dtype=F64)
    x = torch.randn(1 if rank == 0 else 0, 4, 2, 2, dtype=F64)
    out["one-value"] = _expect_error(lambda: m(x), ValueError)
    out["integer-input"] = _expect_error(lambda: m(torch.ones(2, 4, 4, dtype=torch.long)),
                                         TypeError)
    # Double backward raises on every rank, before any collective.
    m = SyncBatchGroupNorm(4, num_groups=2, dtype=F64)
    x = torch.randn(2 + rank, 4, 3, dtype=F64, requires_grad=True)
    y = m(x)
    out["double-backward"] = _expect_error(
        lambda: torch.autograd.grad((y * y).sum(), x, create_graph=True), RuntimeError)
    return out


def _ddp_check(rank: int, world: int) -> dict[str, Any]:
    model = _small_model()
    init = copy.deepcopy(model.state_dict())
    model = SyncBatchGroupNorm.convert_sync_batchgroupnorm(model)
    ddp = DistributedDataParallel(model)
    x, dout = _ddp_data(world)
    lo = sum(DDP_BATCHES[world][:rank])
    hi = lo + DDP_BATCHES[world][rank]
    out = ddp(x[lo:hi])
    (out * dout[lo:hi]).sum().backward()
    return {
        "init": init,
        "out": out.detach(),
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()
                  if isinstance(v, torch.Tensor)},
        "types": sorted({type(m).__name__ for m in model.modules()}),
    }


def _spatial_check(rank: int, world: int) -> dict[str, torch.Tensor]:
    m = SyncBatchGroupNorm(4, num_groups=2, dtype=F64)
    y = m(_spatial_input(world, rank))
    return {"y": y.detach(), "running_mean": m.running_mean, "running_var": m.running_var}


def _subgroup_input(rank: int) -> torch.Tensor:
    return torch.randn(2 + rank, 6, 4, generator=_gen(777, rank), dtype=F64)


SUBGROUP = {2: [1], 3: [0, 2]}


def _subgroup_check(rank: int, world: int) -> dict[str, torch.Tensor] | None:
    """Only the members of ``process_group`` synchronize (a group of one: no communication)."""
    group = dist.new_group(SUBGROUP[world])  # every rank must call new_group
    if rank not in SUBGROUP[world]:
        return None
    m = SyncBatchGroupNorm(6, num_groups=4, process_group=group, dtype=F64)
    x = _subgroup_input(rank).requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y) + x.detach())
    return {"y": y.detach(), "dx": x.grad, "running_var": m.running_var}


def _main_worker(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    calls: list[int] = []
    real = dist.all_reduce

    def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # this spawned process only
    results: dict[str, Any] = {name: _run_case(name, rank, world, calls) for name in CASES}
    results["__errors__"] = _error_checks(rank, world)
    dist.all_reduce = real
    results["__spatial__"] = _spatial_check(rank, world)
    results["__ddp__"] = _ddp_check(rank, world)  # the group is still in step after errors
    results["__subgroup__"] = _subgroup_check(rank, world)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request, tmp_path_factory) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, _launch(_main_worker, world, tmp_path_factory.mktemp(f"world{world}"))


# -- the single-process reference -----------------------------------------------------------------
def _reference(name: str, world: int) -> dict[str, Any]:
    feat, _, batches, kwargs, steps, dtype = CASES[name]
    # Inputs above 5D: BGN of the (N, C, prod(spatial)) view is the same thing.
    flat = 1 + len(feat) not in REF_CLS
    ref = _make(REF_CLS.get(1 + len(feat), BatchGroupNorm1d), name)
    rec: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": []}
    for step in range(steps):
        x, dy = _data(name, world, step)
        shape = x.shape
        if flat:
            x, dy = x.flatten(2), dy.flatten(2)
        x.requires_grad_()
        y = ref(x)
        y.backward(dy)
        rec["y"].append(y.detach().reshape(shape))
        rec["dx"].append(x.grad.reshape(shape))
        rec["dw"].append(None if ref.weight is None else ref.weight.grad.clone())
        rec["db"].append(None if ref.bias is None else ref.bias.grad.clone())
        ref.zero_grad(set_to_none=True)
    rec["state"] = {k: v for k, v in ref.state_dict().items() if isinstance(v, torch.Tensor)}
    ref.eval()
    xe = _data(name, world, -1)[0]
    xe = xe.flatten(2) if flat else xe
    if ref.track_running_stats:
        rec["eval"] = _split(ref(xe).reshape(-1, *feat), batches[world])
    else:  # eval without running statistics: every rank normalizes its own batch, locally
        rec["eval"] = []
        for part in _split(xe, batches[world]):
            try:
                rec["eval"].append(ref(part).reshape(-1, *feat))
            except ValueError as err:
                rec["eval"].append(str(err))
    return rec


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if expected.dtype == torch.bfloat16:
        torch.testing.assert_close(actual, expected, atol=0.05, rtol=0.02,
                                   msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")


EXACT_CASES = [n for n in CASES if not n.startswith("large-offset")]


@pytest.mark.parametrize("name", EXACT_CASES)
def test_matches_single_process_bgn_on_concatenated_batch(world_results, name):
    world, results = world_results
    got = [r[name] for r in results]
    ref = _reference(name, world)
    for step in range(CASES[name][4]):
        _close(torch.cat([g["y"][step] for g in got]), ref["y"][step], f"output, step {step}")
        _close(torch.cat([g["dx"][step] for g in got]), ref["dx"][step], f"dx, step {step}")
        for key in ("dw", "db"):
            if ref[key][step] is None:
                assert all(g[key][step] is None for g in got)
            else:
                _close(sum(g[key][step] for g in got), ref[key][step], f"{key}, step {step}")
        for g in got:
            assert g["y"][step].dtype == CASES[name][5]
    for key, value in ref["state"].items():
        for rank, g in enumerate(got):
            _close(g["state"][key], value, f"{key} on rank {rank}")
            assert torch.equal(g["state"][key], got[0]["state"][key]), f"{key} differs by rank"
    assert set(got[0]["state"]) == set(ref["state"])
    for rank, g in enumerate(got):
        if isinstance(ref["eval"][rank], str):
            assert g["eval"] == ref["eval"][rank]
        else:
            _close(g["eval"], ref["eval"][rank], f"eval output on rank {rank}")


@pytest.mark.parametrize("name", list(CASES))
def test_communication_is_2g_plus_1_forward_2g_backward_none_in_eval(world_results, name):
    world, results = world_results
    g = CASES[name][1]
    for r in results:
        assert r[name]["fwd"] == [[g + 1, g]] * CASES[name][4]
        assert r[name]["bwd"] == [[2 * g]] * CASES[name][4]
        assert r[name]["eval_calls"] == []


def test_large_offset_float32_is_stable(world_results):
    """Two-pass variance: float32 inputs 1e4 + N(0, 1) keep the single-process accuracy."""
    world, results = world_results
    name = "large-offset-float32"
    feat, groups, batches, _, steps, _ = CASES[name]
    local32 = _make(BatchGroupNorm2d, name)
    ref64 = _make(BatchGroupNorm2d, name).double()
    for step in range(steps):
        x, dy = _data(name, world, step)
        y32 = local32(x).detach()
        x64 = x.double().requires_grad_()
        y64 = ref64(x64)
        y64.backward(dy.double())
        got_y = torch.cat([r[name]["y"][step] for r in results])
        got_dx = torch.cat([r[name]["dx"][step] for r in results])
        err_sync = (got_y.double() - y64).abs().max().item()
        err_local = (y32.double() - y64).abs().max().item()
        print(f"large offset, step {step}: sync {err_sync:.2e}, local {err_local:.2e}")
        assert err_sync <= 2 * err_local + 1e-4, (err_sync, err_local)
        dx_err = (got_dx.double() - x64.grad).abs().max() / x64.grad.abs().max()
        assert dx_err < 1e-3, dx_err
        # What a one-collective E[x^2] - E[x]^2 in float32 would have produced instead:
        xv = x.reshape(x.shape[0], groups, -1)
        naive = (xv * xv).mean(dim=(0, 2)) - xv.mean(dim=(0, 2)) ** 2
        true_var = x.double().reshape(x.shape[0], groups, -1).var(dim=(0, 2), correction=0)
        assert (naive.double() - true_var).abs().max() > 0.05
    state = results[0][name]["state"]
    assert (state["running_var"].double() - ref64.running_var).abs().max() < 1e-3
    assert (state["running_mean"].double() - ref64.running_mean).abs().max() < 1e-2


def test_running_statistics_identical_on_every_rank(world_results):
    _, results = world_results
    for name in CASES:
        for key, value in results[0][name]["state"].items():
            for r in results[1:]:
                assert torch.equal(r[name]["state"][key], value), (name, key)


def test_error_cases_raise_on_every_rank_without_hanging(world_results):
    _, results = world_results
    for r in results:
        errors = r["__errors__"]
        assert "expected more than 1 value per group when training" in errors["all-empty"]
        assert "0 value(s) per group over the whole process group" in errors["all-empty"]
        assert "1 value(s) per group" in errors["one-value"]
        assert "does not support double backward" in errors["double-backward"]
        assert "expected a floating-point input" in errors["integer-input"]


def test_ranks_with_different_spatial_sizes_whole_channel_groups(world_results):
    """Counts are per value: ranks may hold (N_r, C, H_r, W) inputs when groups are channels."""
    world, results = world_results
    xs = [_spatial_input(world, r) for r in range(world)]
    flat = torch.cat([x.transpose(0, 1).reshape(2, -1) for x in xs if len(x)], dim=1)  # (G, values)
    mean, var = flat.mean(dim=1), flat.var(dim=1, correction=0)
    for x, r in zip(xs, results):
        xv = x.reshape(x.shape[0], 2, math.prod(x.shape[1:]) // 2)
        y = ((xv - mean.view(1, 2, 1)) / torch.sqrt(var.view(1, 2, 1) + 1e-5)).reshape(x.shape)
        torch.testing.assert_close(r["__spatial__"]["y"], y)
        torch.testing.assert_close(r["__spatial__"]["running_mean"], 0.1 * mean)
        n = flat.shape[1]
        torch.testing.assert_close(r["__spatial__"]["running_var"], 0.9 + 0.1 * var * n / (n - 1))


def test_converted_model_under_ddp_matches_single_process(world_results):
    """convert_sync_batchgroupnorm + DDP on uneven batches with an empty rank."""
    world, results = world_results
    model = _small_model()
    model.load_state_dict(results[0]["__ddp__"]["init"])
    x, dout = _ddp_data(world)
    out = model(x)
    (out * dout).sum().backward()
    for r in results:
        assert r["__ddp__"]["types"].count("SyncBatchGroupNorm") == 1
        assert "BatchGroupNorm2d" not in r["__ddp__"]["types"]
        for k, p in model.named_parameters():  # DDP averages the local gradients
            torch.testing.assert_close(r["__ddp__"]["grads"][k] * world, p.grad, msg=k)
        for k, v in model.state_dict().items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(r["__ddp__"]["state"][k], v, msg=k)
    torch.testing.assert_close(torch.cat([r["__ddp__"]["out"] for r in results]), out.detach())


def test_process_group_argument_limits_synchronization(world_results):
    world, results = world_results
    members = SUBGROUP[world]
    assert all(r["__subgroup__"] is None for i, r in enumerate(results) if i not in members)
    x = torch.cat([_subgroup_input(r) for r in members]).requires_grad_()
    ref = BatchGroupNorm1d(6, num_groups=4, dtype=F64)
    y = ref(x)
    y.backward(torch.ones_like(y) + x.detach())
    got = [results[r]["__subgroup__"] for r in members]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach())
    torch.testing.assert_close(torch.cat([g["dx"] for g in got]), x.grad)
    for g in got:
        torch.testing.assert_close(g["running_var"], ref.running_var)


# -- failure behaviour --------------------------------------------------------------------------
FAIL_TIMEOUT_S = 3.0


def _failure_worker(rank: int, world: int, tmp: Path, mode: str) -> dict[str, Any]:
    m = SyncBatchGroupNorm(4, num_groups=2)
    m(torch.randn(3, 4, 5))  # a healthy step first
    if rank == 1:
        if mode == "crash":
            os._exit(3)  # dies mid-training, without cleaning up
        deadline = time.monotonic() + 30  # stall: alive, but never joins the next collective
        while not (tmp / "survivor-done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {}
    start = time.monotonic()
    try:
        m(torch.randn(3, 4, 5))
        outcome = "no error"
    except RuntimeError as err:
        outcome = str(err)
    (tmp / "survivor-done").touch()
    return {"elapsed": time.monotonic() - start, "error": outcome}


def _crash_worker(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    return _failure_worker(rank, world, tmp, "crash")


def _stall_worker(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    return _failure_worker(rank, world, tmp, "stall")


@pytest.mark.parametrize("worker", [_crash_worker, _stall_worker], ids=["crash", "stall"])
def test_dead_or_stalled_rank_gives_clear_error_within_timeout(worker, tmp_path):
    results = _launch(worker, 2, tmp_path, timeout_s=FAIL_TIMEOUT_S, deadline_s=60, may_die=(1,))
    survivor = results[0]
    print(f"survivor raised after {survivor['elapsed']:.2f} s")
    # the error names the layer (its short repr): SyncBatchGroupNorm(4, num_groups=2)
    assert "SyncBatchGroupNorm(4, num_groups=2): the all-reduce of" in survivor["error"], \
        survivor["error"]
    assert "init_process_group(timeout=...)" in survivor["error"]
    assert survivor["elapsed"] < FAIL_TIMEOUT_S + 10, survivor["elapsed"]


# -- single process: no communication, conversion, checks ----------------------------------------
@pytest.fixture
def no_collectives(monkeypatch):
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("SyncBatchGroupNorm communicated")

    monkeypatch.setattr(dist, "all_reduce", fail)


def _train_eval_pair(sync: nn.Module, plain: nn.Module, shape: tuple[int, ...]) -> None:
    for step in range(3):
        x = torch.randn(shape, dtype=F64) + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = sync(x1), plain(x2)
        assert torch.equal(y1, y2)
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        assert torch.equal(x1.grad, x2.grad)
        assert torch.equal(sync.weight.grad, plain.weight.grad)
    assert all(torch.equal(a, b) for a, b in zip(sync.buffers(), plain.buffers()))
    sync.eval()
    plain.eval()
    x = torch.randn(shape, dtype=F64)
    assert torch.equal(sync(x), plain(x))


LOCAL_CASES = [(BatchGroupNorm2d, 8, 4, (3, 8, 4, 4)), (BatchGroupNorm2d, 4, 8, (2, 4, 2, 4)),
               (BatchGroupNorm1d, 6, 4, (3, 6, 2)), (BatchGroupNorm3d, 4, 3, (2, 4, 3, 1, 2))]


@pytest.mark.parametrize("cls,c,g,shape", LOCAL_CASES)
def test_without_process_group_is_plain_bgn(cls, c, g, shape, no_collectives):
    assert not dist.is_initialized()
    sync = SyncBatchGroupNorm(c, num_groups=g, momentum=None, dtype=F64)
    _train_eval_pair(sync, cls(c, num_groups=g, momentum=None, dtype=F64), shape)


def test_world_size_one_never_communicates(tmp_path, no_collectives):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for cls, c, g, shape in LOCAL_CASES:
            sync = SyncBatchGroupNorm(c, num_groups=g, dtype=F64)
            _train_eval_pair(sync, cls(c, num_groups=g, dtype=F64), shape)
    finally:
        dist.destroy_process_group()


def test_state_dict_and_repr_match_batchgroupnorm():
    plain = BatchGroupNorm2d(6, num_groups=4, momentum=None)
    plain(torch.randn(3, 6, 4, 4))  # straddling groups: records the layout
    sync = SyncBatchGroupNorm(6, num_groups=4, momentum=None)
    sync.load_state_dict(plain.state_dict())
    assert sync.layout_shape == (4, 4)
    assert sync.extra_repr() == plain.extra_repr()
    assert repr(sync).startswith("SyncBatchGroupNorm(6, num_groups=4")
    back = BatchGroupNorm2d(6, num_groups=4, momentum=None)
    back.load_state_dict(sync.state_dict())
    for a, b in zip(plain.state_dict().values(), back.state_dict().values()):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    with pytest.raises(ValueError, match="spatial size"):
        sync(torch.randn(3, 6, 2, 8))


@pytest.mark.parametrize("shape,exc,match", [
    ((4,), ValueError, r"expected at least 2D input \(got 1D input\)"),
    ((2, 5, 4), ValueError, "expected input with 6 channels"),
    ((1, 6), ValueError, "more than 1 value per group"),
])
def test_input_checks(shape, exc, match):
    with pytest.raises(exc, match=match):
        SyncBatchGroupNorm(6, num_groups=6)(torch.randn(shape))
    with pytest.raises(TypeError, match="floating-point"):
        SyncBatchGroupNorm(6, num_groups=6)(torch.ones(2, 6, dtype=torch.long))


@pytest.mark.parametrize("dims", [2, 3, 4, 5, 6])
def test_accepts_any_input_with_two_or_more_dims(dims):
    x = torch.randn((3, 4) + (2,) * (dims - 2))
    assert SyncBatchGroupNorm(4, num_groups=2)(x).shape == x.shape


def test_convert_sync_batchgroupnorm_keeps_parameters_buffers_and_modes():
    straddle = BatchGroupNorm2d(6, num_groups=4)
    straddle(torch.randn(2, 6, 2, 2))
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1),
        straddle,
        nn.Sequential(BatchGroupNorm1d(6, num_groups=3, affine=False, momentum=None),
                      BatchGroupNorm3d(4, num_groups=2, track_running_stats=False)),
        GeneralBatchGroupNorm2d(6, num_groups=3, examples_per_group=2),
        nn.BatchNorm2d(6),
    )
    model[2][0].eval()
    model[1].weight.requires_grad_(False)
    olds = [model[1], model[2][0], model[2][1]]
    tensors = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in olds]
    before = model.state_dict()
    out = SyncBatchGroupNorm.convert_sync_batchgroupnorm(model, process_group="pg")
    assert out is model
    news = [model[1], model[2][0], model[2][1]]
    for old, new, ts in zip(olds, news, tensors):
        assert type(new) is SyncBatchGroupNorm
        assert new.extra_repr() == old.extra_repr()
        assert new.training == old.training
        assert new.layout_shape == old.layout_shape
        assert new.process_group == "pg"
        assert dict(new.named_parameters()) | dict(new.named_buffers()) == ts  # same objects
        assert new.running_mean is old.running_mean
    assert model[1].weight.requires_grad is False
    assert type(model[3]) is GeneralBatchGroupNorm2d and type(model[4]) is nn.BatchNorm2d
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v
               for k, v in before.items())
    # A BGN root becomes a new layer; a model without BGN is returned untouched.
    root = BatchGroupNorm2d(4, num_groups=2)
    new_root = SyncBatchGroupNorm.convert_sync_batchgroupnorm(root)
    assert type(new_root) is SyncBatchGroupNorm and new_root.weight is root.weight
    plain = nn.Sequential(nn.Linear(2, 2))
    assert SyncBatchGroupNorm.convert_sync_batchgroupnorm(plain) is plain
    # Already synchronized layers are left alone.
    assert SyncBatchGroupNorm.convert_sync_batchgroupnorm(new_root) is new_root


def test_converted_model_single_process_equals_original():
    model = _small_model()
    x = torch.randn(4, 3, 4, 4, dtype=F64)
    sync = SyncBatchGroupNorm.convert_sync_batchgroupnorm(copy.deepcopy(model))
    assert torch.equal(sync(x), model(x))
    sync.eval()
    model.eval()
    assert torch.equal(sync(x), model(x))


def test_docstring_examples():
    result = doctest.testmod(bgnorm.distributed, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_exported():
    import bgnorm

    assert bgnorm.SyncBatchGroupNorm is SyncBatchGroupNorm
    assert "SyncBatchGroupNorm" in bgnorm.__all__


def test_single_rank_group_output_allows_in_place_ops():
    """The synchronized path's output is not a view made inside its autograd Function."""
    import bgnorm.distributed as D

    x3 = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.ones(6, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        y = D._SyncBatchGroupNormFunction.apply(
            x3, w, b, None, None, 3, 1e-5, 0.1, dist.group.WORLD
        ).view(4, 6, 5)
        torch.relu_(y).sum().backward()
        assert torch.isfinite(x3.grad).all()
    finally:
        dist.destroy_process_group()
