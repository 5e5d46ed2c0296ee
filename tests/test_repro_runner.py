"""Tests for bgnorm.repro.runner: planning, sharding, resuming, kill -9, diverged and failed
cells."""

from __future__ import annotations

import doctest
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bgnorm.repro.runner as RN
from bgnorm.repro.runner import RunOptions, plan_cells, render_report, run_sweep, select_shard
from bgnorm.repro.store import read_records
from bgnorm.repro.tasks.base import TASKS, Diverged, Task

# A tiny sweep: 2 batch-dependent norms x 2 batch sizes + 1 per-example norm (one run).
SMALL = {"norms": ["bn", "bgn", "gn"], "batch_sizes": [8, 2], "set": {"epochs": 1,
                                                                      "median_of": 1}}


@pytest.fixture(autouse=True)
def _threads():
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def test_docstring_examples():
    result = doctest.testmod(RN, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_handing_out_cells_reads_the_store_once_not_once_per_claim(tmp_path, monkeypatch):
    """_Cells re-checks the store after each claim (a cell recorded by another runner between
    the check and the lock): only what was appended since is read, not the whole store."""
    import bgnorm.repro.store as S
    from bgnorm.repro.api import Record

    store = S.ResultStore(S.store_path(tmp_path))
    for i in range(60):  # recorded earlier (by this or another runner)
        store.append(Record(f"old{i}", {"task": "t"}, "ok", {}, 0.1))
    parsed = []  # bytes parsed while handing out cells (appends parse the store too)
    parse, counting = S._parse_lines, [False]
    monkeypatch.setattr(S, "_parse_lines", lambda data: (
        parsed.append(len(data) if counting[0] else 0), parse(data))[1])
    order = [f"new{i}" for i in range(40)] + ["old3", "old7"]
    cells = RN._Cells(order, tmp_path, {c: c for c in order}, 60.0, True, lambda line: None,
                      RN.RunSummary())
    got = []

    def next_cell():
        counting[0] = True
        try:
            return cells.next()
        finally:
            counting[0] = False

    while (cid := next_cell()) is not None:
        got.append(cid)
        if cid == "new5":  # another runner records new9 while this one holds new5
            store.append(Record("new9", {"task": "t"}, "ok", {}, 0.1))
        store.append(Record(cid, {"task": "t"}, "ok", {}, 0.1))
        cells.done(cid)
    assert got == [f"new{i}" for i in range(40) if i != 9]
    assert cells.summary.recorded_elsewhere == 3  # new9, old3, old7
    size = S.store_path(tmp_path).stat().st_size
    assert sum(parsed) <= size, (sum(parsed), size)  # every byte parsed at most once


def test_plan_cells_and_shards():
    cells = plan_cells(["batch-size"], "smoke", SMALL)
    assert len(cells) == 5  # bn x2, bgn x2, gn once for both batch sizes (64 examples/step)
    gn = [c for _, c in cells if c["norm"] == "gn"]
    assert gn[0]["covers_batch_sizes"] == [8, 2] and gn[0]["workers"] == 1
    bn2 = next(c for _, c in cells if c["norm"] == "bn" and c["batch_size"] == 2)
    assert bn2["workers"] == 32 and bn2["lr"] == pytest.approx(0.2)
    shards = [select_shard(cells, (i, 3)) for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(cells)
    with pytest.raises(ValueError):
        select_shard(cells, (4, 3))
    with pytest.raises(ValueError, match="no preset"):
        plan_cells(["batch-size"], "huge", {})


def _run(out, **kw):
    opts = RunOptions(tasks=["batch-size"], preset="smoke", out_dir=out,
                      overrides=kw.pop("overrides", SMALL), jobs=1, threads=1, progress=False,
                      **kw)
    return run_sweep(opts)


def _table(text):
    """The accuracy table of a batch-size report."""
    return text.split("## Accuracy vs batch size")[1].split("*Protocol")[0]


def test_in_process_run_skip_and_shards_merge(tmp_path):
    full = _run(tmp_path / "full")
    assert (full.finished, full.skipped, full.failed) == (5, 0, [])
    recs = read_records(tmp_path / "full")
    assert len(recs) == 5 and all(r.status == "ok" for r in recs)
    rec = recs[0]
    for key in ("task", "seed", "norm", "batch_size", "workers", "lr", "epochs", "model",
                "dataset", "momentum", "weight_decay", "milestones"):
        assert key in rec.config  # every cell's full config is saved with its result
    assert {"acc", "evals", "n_test", "layers", "curve"} <= set(rec.result)
    assert "torch" in rec.meta and rec.seconds > 0
    assert not (tmp_path / "full" / "cells").exists() or not any(
        (tmp_path / "full" / "cells").iterdir())  # checkpoints of recorded cells are removed
    again = _run(tmp_path / "full")
    assert (again.finished, again.skipped) == (0, 5)
    assert len((tmp_path / "full" / "results.jsonl").read_text().splitlines()) == 5

    for i in (1, 2):
        s = _run(tmp_path / "sharded", shard=(i, 2))
        assert s.planned in (2, 3)
    assert sorted(p.name for p in (tmp_path / "sharded").glob("results*.jsonl")) == [
        "results-shard-1-of-2.jsonl", "results-shard-2-of-2.jsonl"]
    assert _table(render_report(tmp_path / "sharded")) == _table(render_report(tmp_path / "full"))
    assert (tmp_path / "full" / "curves_batch-size.png").is_file()


def _fake_run(config, ctx):
    if config["mode"] == "diverge":
        raise Diverged("non-finite training loss at step 3", {"step": 3})
    if config["mode"] == "fail":
        raise ValueError("boom")
    return {"acc": 50.0}


def _fake_cells(preset, overrides):
    return [{"task": "fake-test", "seed": 0, "mode": m} for m in ("ok", "diverge", "fail")]


def test_diverged_and_failed_cells(tmp_path):
    TASKS["fake-test"] = Task("fake-test", ("smoke",), _fake_cells, _fake_run,
                              lambda recs, out: "")
    try:
        s = run_sweep(RunOptions(tasks=["fake-test"], preset="smoke", out_dir=tmp_path, jobs=1,
                                 threads=1, progress=False))
    finally:
        del TASKS["fake-test"]
    assert (s.finished, s.diverged, len(s.failed)) == (1, 1, 1)
    assert "ValueError: boom" in s.failed[0][1]
    by_mode = {r.config["mode"]: r for r in read_records(tmp_path)}
    assert set(by_mode) == {"ok", "diverge"}  # a failed cell is not recorded: it reruns
    assert by_mode["diverge"].status == "diverged"
    assert by_mode["diverge"].result == {"error": "non-finite training loss at step 3",
                                         "step": 3}


def test_real_divergence_is_recorded(tmp_path):
    s = _run(tmp_path, overrides={"norms": ["none"], "batch_sizes": [8],
                                  "set": {"epochs": 1, "median_of": 1, "base_lr": 1e12}})
    assert s.diverged == 1
    (rec,) = read_records(tmp_path)
    assert rec.status == "diverged" and "non-finite" in rec.result["error"]
    row = next(line for line in render_report(tmp_path).splitlines()
               if line.startswith("| none"))
    assert row.replace(" ", "") == "|none|-|"


KILL_SWEEP = {"norms": ["bn", "bgn", "gn"], "batch_sizes": [8, 2], "epochs": 3}


def _cli(out, *extra):
    return [sys.executable, "-m", "bgnorm.cli", "reproduce", "--task", "batch-size", "--preset",
            "smoke", "--out", str(out), "--norms", "bn,bgn,gn", "--batch-sizes", "8,2",
            "--epochs", "3", "--jobs", "2", "--threads", "1", "--no-progress", *extra]


def _recorded_ids(store: Path) -> set[str]:
    """Cell ids with a complete record line in ``store`` (a line being written is skipped)."""
    ids = set()
    if store.is_file():
        for line in store.read_text().splitlines():
            try:
                ids.add(json.loads(line)["cell_id"])
            except (ValueError, KeyError):
                pass
    return ids


def test_kill9_then_resume_gives_the_uninterrupted_table(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = _run(tmp_path / "ref", overrides=KILL_SWEEP)  # uninterrupted, in this process
    assert ref.finished == 5

    out = tmp_path / "cut"
    log = open(tmp_path / "cut.log", "w")
    proc = subprocess.Popen(_cli(out, "--checkpoint-every", "0.05"), stdout=log, stderr=log,
                            env=env, start_new_session=True)
    killed_with_checkpoint = False
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            done = _recorded_ids(out / "results.jsonl")
            # a checkpoint of a cell still running (a finished cell's directory is removed just
            # after its record is written: its checkpoint does not count)
            running = [p for p in out.glob("cells/*/checkpoint.pt") if p.parent.name not in done]
            if done and running:
                os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers, mid-cell
                killed_with_checkpoint = True
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed_with_checkpoint:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()
    assert killed_with_checkpoint, "the sweep finished before it could be killed"
    n_before = len([line for line in (out / "results.jsonl").read_text().splitlines() if line])
    assert 1 <= n_before < 5

    resumed = subprocess.run(_cli(out), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "already recorded" in resumed.stderr and "resumed at step" in resumed.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
             if line.strip()]
    ids = [r["cell_id"] for r in lines]
    assert len(ids) == len(set(ids)) == 5  # no duplicate, nothing lost
    ref_acc = {r.cell_id: r.result["acc"] for r in read_records(tmp_path / "ref")}
    cut_acc = {r.cell_id: r.result["acc"] for r in read_records(out)}
    assert cut_acc == ref_acc  # the same numbers as the uninterrupted run
    # and the same learning curves (resumed from the checkpoint with the model)
    assert {r.cell_id: r.result["curve"] for r in read_records(out)} == \
        {r.cell_id: r.result["curve"] for r in read_records(tmp_path / "ref")}
    assert _table(render_report(out)) == _table(render_report(tmp_path / "ref"))


def test_local_context_checkpoint_is_atomic(tmp_path):
    ctx = RN.LocalCellContext("c", {}, torch.device("cpu"), tmp_path / "c",
                              checkpoint_seconds=3600)
    assert not ctx.checkpoint_due()
    ctx.save_checkpoint({"w": torch.arange(3), "nested": {"k": [1, 2.5, "s"]}})
    assert [p.name for p in Path(tmp_path / "c").iterdir()] == ["checkpoint.pt"]
    state = ctx.load_checkpoint()
    assert torch.equal(state["w"], torch.arange(3)) and state["nested"]["k"] == [1, 2.5, "s"]
    events = []
    ctx2 = RN.LocalCellContext("c", {}, torch.device("cpu"), tmp_path / "c",
                               checkpoint_seconds=0, reporter=lambda *a: events.append(a))
    assert ctx2.checkpoint_due()
    ctx2.progress(1, 10, loss=1.0)
    ctx2.progress(2, 10, loss=1.0)  # throttled
    ctx2.progress(10, 10, loss=0.5)  # the last step always goes
    ctx2.log("hello")
    assert [e[0] for e in events] == ["progress", "progress", "log"]


_RUNS: list[dict] = []


def _counting_run(config, ctx):
    _RUNS.append(dict(config))
    if config["x"] == 3:
        raise Diverged("non-finite training loss at step 1", {"step": 1})
    return {"acc": 10.0 * config["x"] + config["seed"]}


def test_cells_that_are_one_training_run_are_trained_once(tmp_path):
    """Two tasks whose cells overlap in what they compute (``Task.computation``): every cell is
    recorded, each computation is trained once, in this sweep and in a later one."""
    def cells(task, xs):
        return lambda preset, overrides: [{"task": task, "seed": s, "x": x, "tag": task}
                                          for s in (0, 1) for x in xs]

    def computation(config):
        return {k: v for k, v in config.items() if k not in ("task", "tag")}

    TASKS["fake-a"] = Task("fake-a", ("smoke",), cells("fake-a", [1, 2, 3]), _counting_run,
                           lambda recs, out: "", computation=computation)
    TASKS["fake-b"] = Task("fake-b", ("smoke",), cells("fake-b", [2, 3, 4]), _counting_run,
                           lambda recs, out: "", computation=computation)
    TASKS["fake-c"] = Task("fake-c", ("smoke",), cells("fake-c", [4, 5]), _counting_run,
                           lambda recs, out: "", computation=computation)
    _RUNS.clear()
    try:
        s = run_sweep(RunOptions(tasks=["fake-a", "fake-b"], preset="smoke", out_dir=tmp_path,
                                 jobs=1, threads=1, progress=False))
        assert sorted((r["x"], r["seed"]) for r in _RUNS) == [
            (x, s) for x in (1, 2, 3, 4) for s in (0, 1)]  # 2 and 3 once each, not twice
        assert (s.planned, s.finished, s.diverged, s.shared) == (12, 8, 4, 4)
        recs = {(r.config["task"], r.config["x"], r.config["seed"]): r
                for r in read_records(tmp_path)}
        assert len(recs) == 12
        for x, seed in ((2, 0), (2, 1), (3, 0), (3, 1)):
            a, b = recs[("fake-a", x, seed)], recs[("fake-b", x, seed)]
            assert a.status == b.status and a.config["tag"] == "fake-a"
            assert b.result == {**a.result, "same_run_as": a.cell_id}
        # a later sweep records fake-c's x = 4 from fake-b's record, trains only x = 5
        _RUNS.clear()
        s = run_sweep(RunOptions(tasks=["fake-c"], preset="smoke", out_dir=tmp_path,
                                 jobs=1, threads=1, progress=False))
        assert sorted((r["x"], r["seed"]) for r in _RUNS) == [(5, 0), (5, 1)]
        assert (s.finished, s.shared) == (4, 2)
        c4 = next(r for r in read_records(tmp_path) if r.config == {
            "task": "fake-c", "seed": 1, "x": 4, "tag": "fake-c"})
        b4 = recs[("fake-b", 4, 1)]
        assert c4.result == {"acc": 41.0, "same_run_as": b4.cell_id}
        # the copy keeps the training's provenance and time (trained_at), with its own
        # finished_at: the time it was recorded, so newer policy records supersede older ones
        assert c4.meta["trained_at"] == b4.meta["finished_at"] <= c4.meta["finished_at"]
        assert c4.meta["host"] == b4.meta["host"]
    finally:
        for name in ("fake-a", "fake-b", "fake-c"):
            del TASKS[name]


def test_same_run_key_loads_the_tasks_it_needs():
    """In a fresh interpreter (no task registered yet) a record's key is its task's, not the
    fallback's (the fallback would keep ``covers_batch_sizes`` and never match)."""
    code = ("from bgnorm.repro.runner import same_run_key\n"
            "a = {'task': 'batch-size', 'norm': 'gbgn', 'gbgn_examples': 2, 'batch_size': 2}\n"
            "b = {'task': 'g-sweep', 'norm': 'bgn', 'batch_size': 2}\n"
            "assert same_run_key(a) == same_run_key(b)\n"
            "assert same_run_key({'task': 'gone'}) == same_run_key({'task': 'other'})\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={
        **os.environ, "PYTHONPATH": str(Path(RN.__file__).parents[2])})


def test_classification_cells_that_are_one_run():
    """The G sweep at the paper's G, GBGN with e = b, and the groups study's BN are cells of
    the batch-size table under other names."""
    keys = {}
    for _, cfg in plan_cells(["batch-size", "g-sweep", "groups"], "quick", {}):
        keys.setdefault(RN.same_run_key(cfg), []).append(cfg)
    shared = [sorted((c["task"], c["norm"], c["batch_size"]) for c in group)
              for group in keys.values() if len(group) > 1]
    assert [("batch-size", "bgn", 2), ("batch-size", "gbgn", 2), ("g-sweep", "bgn", 2)] in shared
    assert [("batch-size", "bgn", 64), ("g-sweep", "bgn", 64)] in shared
    assert all(len({c["seed"] for c in group}) == 1 for group in keys.values())
