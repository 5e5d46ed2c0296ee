"""Fault injection for the sweep runner: what clusters do to sweeps (issue 20).

Every test runs the tiny deterministic ``fault-test`` task of tests/fault_sweep.py, as real
``bgnorm reproduce`` processes where the fault is a process-level one (kill -9, signals,
several runners on one directory, a file-size limit) and in this process otherwise. After each
fault the resumed sweep's records equal an uninterrupted run's, no record is duplicated, no
cell was trained twice to completion (``trained.log``) and no process is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import fault_sweep
import pytest
import torch

import bgnorm.repro.runner as RN
import bgnorm.repro.store as S
from bgnorm.repro.api import CellStopped
from bgnorm.repro.runner import EXIT_DISK_FAULT, EXIT_PREEMPTED, RunOptions, run_sweep
from bgnorm.repro.store import DiskFaultError, read_records

SCRIPT = Path(fault_sweep.__file__)
LINUX = sys.platform.startswith("linux")


@pytest.fixture(autouse=True)
def _threads_and_registry():
    from bgnorm.repro.tasks.base import TASKS

    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)
    TASKS.pop(fault_sweep.NAME, None)  # other test modules list every registered task


def _settings(**kw):
    return {"cells": 4, "steps": 12, **kw}


def _cmd(out, *extra, jobs=1, **settings):
    sets = []
    for k, v in _settings(**settings).items():
        sets += ["--set", f"{k}={json.dumps(v)}"]
    return [sys.executable, str(SCRIPT), "reproduce", "--task", "fault-test", "--preset",
            "smoke", "--out", str(out), "--jobs", str(jobs), "--threads", "1", "--no-progress",
            "--no-report", *sets, *extra]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _spawn(out, log, *extra, **kw):
    return subprocess.Popen(_cmd(out, *extra, **kw), stdout=log, stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)


def _reference(tmp_path, **settings):
    """The records of an uninterrupted in-process run: cell id -> result."""
    fault_sweep.register()
    out = tmp_path / "reference"
    settings = {k: v for k, v in _settings(**settings).items()
                if k not in ("sleep", "hang", "hang_at", "hang_seeds")}
    s = run_sweep(RunOptions(tasks=["fault-test"], preset="smoke", out_dir=out, jobs=1,
                             threads=1, progress=False, overrides={"set": settings}))
    assert s.finished == settings["cells"]
    return {r.cell_id: r.result for r in read_records(out)}


def _results(out):
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
             if line.strip()]
    ids = [r["cell_id"] for r in lines]
    assert len(ids) == len(set(ids)), "a cell was recorded twice"
    return {r["cell_id"]: r["result"] for r in lines}


def _trained(out):
    """Cell id -> how many times it was trained to completion."""
    counts: dict[str, int] = {}
    path = out / "trained.log"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        counts[line.split()[0]] = counts.get(line.split()[0], 0) + 1
    return counts


def _steps(out):
    """(cell id, step) -> how many times that optimizer step was trained (``steps.log``)."""
    counts: dict[tuple[str, int], int] = {}
    path = out / "steps.log"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        cid, _, step, _ = line.split()
        counts[cid, int(step)] = counts.get((cid, int(step)), 0) + 1
    return counts


def _assert_trained_once(out, cells, killed, left):
    """No cell of ``cells`` was trained twice to completion (``trained.log``) around a kill of
    the processes ``killed``: a cell recorded before the kill was completed once; a cell the
    kill left unrecorded (``left``) was completed once after it, and at most once by a killed
    process (which may have finished it without handing its result on: the rerun then
    completes it again, from the final checkpoint when that was written)."""
    by_cell: dict[str, list[bool]] = {cid: [] for cid in cells}
    path = out / "trained.log"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        cid, pid = line.split()
        by_cell[cid].append(int(pid) in killed)
    for cid, by_killed in by_cell.items():
        if cid in left:
            assert by_killed.count(False) == 1 and by_killed.count(True) <= 1, (cid, by_cell)
        else:
            assert len(by_killed) == 1, (cid, by_cell)


def _ran_cells(out):
    """The pids of the processes that trained a step of some cell (``started-*`` files)."""
    return {int(p.name.rsplit("-", 1)[1]) for p in out.glob("started-*")}


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid):
    """Pids of the live (non-zombie) processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def _workers(pid):
    """The worker processes of runner ``pid`` (its children but multiprocessing's resource
    tracker)."""
    kids = []
    for kid in _children(pid):
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            kids.append(kid)
    return kids


def _alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _finish(proc, timeout=60):
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --------------------------------------------------------------------------------------------
# One cell, one runner
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runners, jobs", [
    (2, 1),
    pytest.param(3, 2, marks=pytest.mark.slow),  # and worker pools
])
def test_concurrent_runners_train_each_cell_once(tmp_path, runners, jobs):
    ref = _reference(tmp_path, cells=6)
    out = tmp_path / "shared"
    logs = [open(tmp_path / f"runner{i}.log", "w") for i in range(runners)]
    procs = [_spawn(out, log, jobs=jobs, cells=6, sleep=0.03) for log in logs]
    codes = [_finish(p, 120) for p in procs]
    for log in logs:
        log.close()
    text = "\n".join((tmp_path / f"runner{i}.log").read_text() for i in range(runners))
    assert codes == [0] * runners, text
    assert _results(out) == ref  # every cell recorded once, with the uninterrupted numbers
    trained = _trained(out)
    assert set(trained) == set(ref) and max(trained.values()) == 1, (trained, text)
    # and no step was trained twice: the runners together spent one sweep's compute
    steps = _steps(out)
    assert set(steps) == {(c, k) for c in ref for k in range(12)}, steps
    assert set(steps.values()) == {1}, steps
    assert not list(out.glob("cells/*/lock.json"))  # every lock released


@pytest.mark.slow  # the default suite's test_kill9_then_resume... takes stale locks over too
def test_takeover_after_kill9_resumes_to_the_same_result(tmp_path):
    ref = _reference(tmp_path, cells=2, steps=60)
    out = tmp_path / "cut"
    with open(tmp_path / "a.log", "w") as log:
        proc = _spawn(out, log, "--checkpoint-every", "0.05", cells=2, steps=60, sleep=0.02)
        try:
            _wait_for(lambda: list(out.glob("cells/*/checkpoint.pt")) or proc.poll() is not None,
                      60, "a checkpoint")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert list(out.glob("cells/*/lock.json"))  # the dead runner's lock stays behind
    resumed = subprocess.run(_cmd(out, cells=2, steps=60), capture_output=True, text=True,
                             env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "took over the lock of" in resumed.stderr and "resumed at step" in resumed.stderr
    assert _results(out) == ref
    assert max(_trained(out).values()) == 1


# --------------------------------------------------------------------------------------------
# Graceful preemption
# --------------------------------------------------------------------------------------------


def _started(out, n):
    return len({p.name.split("-")[1] for p in out.glob("started-*")}) >= n


@pytest.mark.parametrize("how", [
    "term-runner",
    pytest.param("int-group", marks=pytest.mark.slow),  # Ctrl-C: the whole process group
])
def test_signal_checkpoints_running_cells_and_exits_75(tmp_path, how):
    ref = _reference(tmp_path, cells=3, steps=80)
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = _spawn(out, log, "--checkpoint-every", "3600", "--grace-seconds", "60", jobs=2,
                      cells=3, steps=80, sleep=0.05)
        try:
            _wait_for(lambda: _started(out, 2) or proc.poll() is not None, 60, "two cells")
            kids = _children(proc.pid)
            t0 = time.monotonic()
            if how == "term-runner":  # what SLURM (--signal=B:TERM) and Kubernetes send
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            code = _finish(proc, 30)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert code == EXIT_PREEMPTED, text
    assert took < 30, took  # the cells stopped at their next step, not at the grace's end
    assert "resume with:" in text and "reproduce --task fault-test" in text, text
    assert "leaked semaphore" not in text and "Traceback" not in text, text
    # the two running cells checkpointed on request (the periodic checkpoint is hours away)
    assert len(list(out.glob("cells/*/checkpoint.pt"))) >= 2
    assert not list(out.glob("cells/*/lock.json"))
    assert not _results(out) if (out / "results.jsonl").exists() else True  # none finished
    if LINUX:
        _wait_for(lambda: not any(_alive(k) for k in kids), 5, "the workers to exit")
    resumed = subprocess.run(_cmd(out, jobs=1, cells=3, steps=80), capture_output=True,
                             text=True, env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("resumed at step") >= 2
    assert _results(out) == ref
    assert max(_trained(out).values()) == 1


@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_second_signal_exits_at_once(tmp_path, jobs):
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        # every cell sleeps 300 s inside its second step: no next step within the grace period
        proc = _spawn(out, log, "--grace-seconds", "120", jobs=jobs, cells=2, hang=300,
                      hang_seeds=[0, 1])
        try:
            _wait_for(lambda: _started(out, jobs) or proc.poll() is not None, 60, "the cells")
            time.sleep(0.3)  # well inside the hanging step
            kids = _children(proc.pid)
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # waiting for the cells (up to --grace-seconds)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            code = _finish(proc, 30)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert code == EXIT_PREEMPTED and took < 10, (took, text)
    assert "at once" in text and "resume with:" in text, text
    assert not list(out.glob("cells/*/lock.json"))
    if LINUX:
        _wait_for(lambda: not any(_alive(k) for k in kids), 5, "the workers to exit")


@pytest.mark.slow
def test_grace_period_end_stops_the_workers(tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = _spawn(out, log, "--grace-seconds", "1", jobs=2, cells=2, hang=300,
                      hang_seeds=[0, 1])
        try:
            _wait_for(lambda: _started(out, 2) or proc.poll() is not None, 60, "two cells")
            time.sleep(0.3)  # well inside the hanging step
            kids = _children(proc.pid)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            code = _finish(proc, 30)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert code == EXIT_PREEMPTED and 0.9 < took < 10, (took, text)
    assert "grace period (1 s) is over" in text, text
    if LINUX:
        _wait_for(lambda: not any(_alive(k) for k in kids), 5, "the workers to exit")


def test_in_process_sweep_stops_at_the_next_step_and_resumes_exactly(tmp_path, capsys):
    """jobs=1 (no workers): a stop request checkpoints the running cell, raises
    SweepPreempted with the resume command; the rerun gives the uninterrupted numbers."""
    ref = _reference(tmp_path, cells=2, steps=30)
    out = tmp_path / "run"
    calls = {"n": 0}
    real = RN.LocalCellContext.checkpoint_due

    def due(self):  # the SIGTERM arrives during the 7th step of the first cell
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    opts = RunOptions(tasks=["fault-test"], preset="smoke", out_dir=out, jobs=1, threads=1,
                      progress=False, overrides={"set": _settings(cells=2, steps=30)},
                      checkpoint_seconds=3600, resume_command="bgnorm reproduce --again")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        RN.LocalCellContext.checkpoint_due = due
        with pytest.raises(RN.SweepPreempted):
            run_sweep(opts)
    finally:
        RN.LocalCellContext.checkpoint_due = real
    assert signal.getsignal(signal.SIGTERM) == previous  # the handlers are restored
    err = capsys.readouterr().err
    assert "resume with:\n  bgnorm reproduce --again" in err
    (ckpt,) = out.glob("cells/*/checkpoint.pt")
    assert RN._read_checkpoint(ckpt)[0]["state"]["step"] == 7
    s = run_sweep(opts)
    assert s.finished == 2
    assert {r.cell_id: r.result for r in read_records(out)} == ref


# --------------------------------------------------------------------------------------------
# No orphans
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="reads the process table from /proc")
def test_workers_exit_when_the_runner_is_killed(tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        # cell 1 sleeps in a step (a busy worker that never reaches a checkpoint check), cell 0
        # finishes (its worker goes idle, blocked on the pool's queue)
        proc = _spawn(out, log, jobs=2, cells=2, steps=4, hang=300, hang_seeds=[1])
        try:
            _wait_for(lambda: (out / "results.jsonl").is_file() and _started(out, 2)
                      or proc.poll() is not None, 60, "one cell recorded, one hanging")
            kids = _children(proc.pid)
            assert len(kids) >= 2, kids
            os.kill(proc.pid, signal.SIGKILL)  # the runner only, as the OOM killer does
            proc.wait(10)
            _wait_for(lambda: not any(_alive(k) for k in kids), 5, "the workers to exit")
        finally:
            for k in _children(proc.pid) + [k for k in locals().get("kids", []) if _alive(k)]:
                os.kill(k, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# kill -9 at random moments
# --------------------------------------------------------------------------------------------

#: The sweep the random kills cut: 4 cells of 30 steps on 2 workers, each step sleeping 30 ms.
KILL = {"cells": 4, "steps": 30}
KILL_SLEEP = 0.03


def _wait_for_kill_moment(rng, out, proc):
    """Wait for a moment of the sweep drawn from ``rng``: after its k-th trained step (k uniform
    over the sweep's steps but the last two, as logged in ``steps.log``) and a fraction of a
    step more. Drawn by progress rather than by seconds, the moments cover the whole sweep
    (cells starting, running, being recorded) whatever the machine's speed."""
    at = rng.randrange(1, KILL["cells"] * KILL["steps"] - 1)
    log = out / "steps.log"

    def reached():
        return log.is_file() and log.read_bytes().count(b"\n") >= at or proc.poll() is not None

    _wait_for(reached, 120, f"step {at} of the sweep")
    time.sleep(rng.uniform(0.0, KILL_SLEEP / 2))


def _seeds():
    """Cell id -> the seed in its label (``fault-test seed=N``)."""
    fault_sweep.register()
    return {cid: cfg["seed"] for cid, cfg in
            RN.plan_cells(["fault-test"], "smoke", {"set": _settings(**KILL)})}


@pytest.mark.skipif(not LINUX, reason="reads the process table from /proc")
@pytest.mark.parametrize("trial", [0, *(pytest.param(t, marks=pytest.mark.slow)
                                        for t in (1, 2, 3, 4))])
def test_kill9_of_a_worker_at_a_random_moment(tmp_path, trial):
    """One worker dies (the OOM killer, kill -9) at a random moment: the cell it ran is reported
    failed, the other cells go on and are recorded, the runner exits 1 with the resume command,
    and the rerun resumes the cell from its checkpoint to the uninterrupted numbers."""
    rng = random.Random(2000 + trial)
    ref = _reference(tmp_path, **KILL)
    seeds = _seeds()
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = _spawn(out, log, "--checkpoint-every", "0.1", jobs=2, sleep=KILL_SLEEP, **KILL)
        try:
            _wait_for_kill_moment(rng, out, proc)
            workers = sorted(_workers(proc.pid))
            assert proc.poll() is None and workers, "the sweep ended before the kill"
            victim = rng.choice(workers)
            os.kill(victim, signal.SIGKILL)
            code = _finish(proc, 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert "Traceback" not in text and "leaked" not in text, text
    everyone = set(workers) | _ran_cells(out)
    _wait_for(lambda: not any(_alive(p) for p in everyone), 5, "every worker to exit")
    left = set(ref) - set(_results(out))
    failed = [line for line in text.splitlines() if line.startswith("FAILED")]
    if code == 1:  # it ran a cell: that one failed, the others were recorded
        (cid,) = left
        assert failed == [f"FAILED fault-test seed={seeds[cid]}"], text
        assert f"worker process (pid {victim})" in text and "SIGKILL" in text, text
        assert "resume with:" in text and "reproduce --task fault-test" in text, text
    else:  # it was idle between two cells
        assert code == 0 and not failed and not left, text
    assert not list(out.glob("cells/*/lock.json"))
    s = run_sweep(_opts(out, **KILL))  # the rerun, in this process (no worker to start)
    assert s.ok and s.finished == len(left)
    assert _results(out) == ref
    _assert_trained_once(out, ref, {victim}, left)


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads the process table from /proc")
@pytest.mark.parametrize("trial", range(4))
def test_kill9_of_the_runner_at_a_random_moment(tmp_path, trial):
    """The runner alone is killed (the OOM killer, kill -9) at a random moment: its workers
    follow it, its locks stay behind, and the same command takes them over and resumes the
    sweep to the uninterrupted numbers; no cell finished before the kill trains again."""
    rng = random.Random(3000 + trial)
    ref = _reference(tmp_path, **KILL)
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = _spawn(out, log, "--checkpoint-every", "0.1", jobs=2, sleep=KILL_SLEEP, **KILL)
        try:
            _wait_for_kill_moment(rng, out, proc)
            workers = _workers(proc.pid)
            assert proc.poll() is None and workers, "the sweep ended before the kill"
            os.kill(proc.pid, signal.SIGKILL)  # the runner only: the workers must follow it
            proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    killed = {proc.pid} | set(workers) | _ran_cells(out)
    _wait_for(lambda: not any(_alive(p) for p in killed), 5, "the workers to exit")
    before = set(_results(out)) if (out / "results.jsonl").exists() else set()
    assert before < set(ref)
    resumed = subprocess.run(_cmd(out, jobs=2, **KILL), capture_output=True, text=True,
                             env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _results(out) == ref
    _assert_trained_once(out, ref, killed, set(ref) - before)
    assert not list(out.glob("cells/*/lock.json"))


# --------------------------------------------------------------------------------------------
# Disk and file faults
# --------------------------------------------------------------------------------------------


def _opts(out, **settings):
    fault_sweep.register()
    return RunOptions(tasks=["fault-test"], preset="smoke", out_dir=out, jobs=1, threads=1,
                      progress=False, overrides={"set": _settings(**settings)})


def test_full_disk_while_recording_keeps_the_finished_records(tmp_path, monkeypatch):
    ref = _reference(tmp_path, cells=3)
    out = tmp_path / "run"
    real_write = os.write
    appends = {"n": 0}

    def write(fd, data):
        if data.rstrip().endswith(b"}") and b'"cell_id"' in data:
            appends["n"] += 1
            if appends["n"] == 2:  # the second record: the disk fills up inside the line
                real_write(fd, data[:10])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(S.os, "write", write)
    with pytest.raises(DiskFaultError) as info:
        run_sweep(_opts(out, cells=3))
    message = str(info.value)
    assert str(out / "results.jsonl") in message and "ENOSPC" in message
    assert "free space" in message and "run the same command again" in message
    monkeypatch.undo()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["cell_id"] in ref  # cut back, intact
    s = run_sweep(_opts(out, cells=3))
    assert s.finished == 2 and _results(out) == ref
    assert max(_trained(out).values()) <= 2  # the cell whose record failed trained again


@pytest.mark.skipif(not LINUX, reason="RLIMIT_FSIZE and SIGXFSZ")
def test_file_size_limit_while_checkpointing_is_one_clear_error(tmp_path):
    import resource

    out = tmp_path / "run"

    def limit():  # checkpoints of width 20000 (160 kB of weights) cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    run = subprocess.run(_cmd(out, "--checkpoint-every", "0", cells=2, width=20000),
                         capture_output=True, text=True, env=_env(), timeout=120,
                         preexec_fn=limit)
    assert run.returncode == EXIT_DISK_FAULT, run.stderr
    assert "cannot write the checkpoint of cell" in run.stderr and "EFBIG" in run.stderr
    assert "ulimit -f" in run.stderr and "Traceback" not in run.stderr
    assert not list(out.glob("cells/*/.checkpoint.pt.*.tmp"))  # the partial file removed
    assert not list(out.glob("cells/*/lock.json"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions and a user that is not root")
def test_read_only_directory_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(DiskFaultError, match="EACCES.*chmod u[+]w"):
            run_sweep(_opts(out, cells=1))
    finally:
        out.chmod(0o700)


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    ctx = RN.LocalCellContext("c", {}, torch.device("cpu"), tmp_path / "c")
    ctx.save_checkpoint({"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RN.os, "fsync", full)
    with pytest.raises(DiskFaultError, match=r"checkpoint of cell c.*ENOSPC"):
        ctx.save_checkpoint({"step": 2})
    monkeypatch.undo()
    assert ctx.load_checkpoint() == {"step": 1}
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "trailer-cut", "empty"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    logs = []
    ctx = RN.LocalCellContext("c", {}, torch.device("cpu"), tmp_path / "c",
                              reporter=lambda kind, cid, msg: logs.append(msg))
    ctx.save_checkpoint({"step": 1, "w": torch.arange(4.0)})
    ctx.save_checkpoint({"step": 2, "w": torch.arange(4.0) * 2})
    path = ctx.checkpoint_path
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "trailer-cut":
        data = data[:-10]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    state = ctx.load_checkpoint()
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert "is damaged" in logs[0] and "resuming from the previous checkpoint" in logs[0]
    assert (tmp_path / "c" / "checkpoint.pt.corrupt").is_file()
    # both damaged: None, so the cell restarts from step 0
    (tmp_path / "c" / "checkpoint.prev.pt").write_bytes(b"\0" * 100)
    assert ctx.load_checkpoint() is None and "restarts from step 0" in logs[-1]


def test_sweep_with_a_damaged_checkpoint_restarts_the_cell(tmp_path, capsys):
    ref = _reference(tmp_path, cells=1, steps=20)
    out = tmp_path / "run"
    opts = _opts(out, cells=1, steps=20)
    (cid, config), = RN.plan_cells(["fault-test"], "smoke", opts.overrides)
    ctx = RN.LocalCellContext(cid, config, torch.device("cpu"), out / "cells" / cid,
                              checkpoint_seconds=3600, stop=lambda: calls.append(1) or
                              len(calls) >= 5)
    calls: list[int] = []
    with pytest.raises(CellStopped):
        fault_sweep.run(config, ctx)  # stopped (and checkpointed) at step 5
    path = ctx.checkpoint_path
    path.write_bytes(path.read_bytes()[:-100])  # a checkpoint torn by the filesystem
    s = run_sweep(opts)
    assert s.finished == 1 and _results(out) == ref
    assert "is damaged" in capsys.readouterr().err
