"""Tests for bgnorm.repro.store: cell ids, atomic appends, torn lines, shard merging."""

from __future__ import annotations

import doctest
import errno
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bgnorm.repro.store as S
from bgnorm.repro.api import Record
from bgnorm.repro.store import ResultStore, cell_id, read_records, store_files, store_path


def _rec(cid="a", task="batch-size", acc=1.0, status="ok"):
    return Record(cid, {"task": task, "seed": 0}, status, {"acc": acc}, 1.5, {"host": "h"})


def test_docstring_examples():
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_cell_id_is_canonical_and_ignores_runtime():
    a = {"task": "t", "seed": 0, "milestones": (0.3, 0.6), "x": {"b": 1, "a": 2}}
    b = {"x": {"a": 2, "b": 1}, "milestones": [0.3, 0.6], "seed": 0, "task": "t"}
    assert cell_id(a) == cell_id(b)
    assert len(cell_id(a)) == 16
    assert cell_id({**a, "runtime": {"data_root": "/x"}}) == cell_id(a)
    assert cell_id({**a, "seed": 1}) != cell_id(a)


def test_jsonable_strict_json():
    assert S.jsonable({"a": (1, float("nan")), "b": float("inf")}) == {"a": [1, None], "b": None}
    assert json.loads(S.canonical_json({"v": math.nan})) == {"v": None}


def test_append_read_dedup(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    assert store.records() == []
    assert store.append(_rec("a", acc=1.0))
    assert store.append(_rec("b", acc=2.0, status="diverged"))
    assert not store.append(_rec("a", acc=9.0))  # never a second record for a cell
    recs = store.records()
    assert [(r.cell_id, r.status, r.result["acc"]) for r in recs] == [
        ("a", "ok", 1.0), ("b", "diverged", 2.0)]
    assert recs[0].config == {"task": "batch-size", "seed": 0} and recs[0].seconds == 1.5
    assert store.finished_ids() == {"a", "b"}
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["schema"] == S.SCHEMA_VERSION


def test_torn_last_line_is_ignored_and_terminated(tmp_path):
    path = tmp_path / "results.jsonl"
    store = ResultStore(path)
    store.append(_rec("a"))
    full = S.canonical_json({"cell_id": "b", "config": {"task": "t"}, "status": "ok"})
    with open(path, "ab") as fh:  # a writer killed in the middle of its line
        fh.write(full[: len(full) // 2].encode())
    assert [r.cell_id for r in store.records()] == ["a"] and store.bad_lines == 1
    assert store.append(_rec("b"))
    assert [r.cell_id for r in store.records()] == ["a", "b"]
    assert path.read_text().count("\n") == 3  # the torn fragment got its own line


def test_foreign_lines_are_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('not json\n{"cell_id": "x"}\n[1, 2]\n\n')
    assert ResultStore(path).records() == []


def test_shard_paths_and_merge(tmp_path):
    assert store_path(tmp_path).name == "results.jsonl"
    assert store_path(tmp_path, (1, 1)).name == "results.jsonl"
    assert store_path(tmp_path, (2, 4)).name == "results-shard-2-of-4.jsonl"
    ResultStore(store_path(tmp_path, (1, 2))).append(_rec("a", task="g-sweep"))
    ResultStore(store_path(tmp_path, (2, 2))).append(_rec("b"))
    ResultStore(store_path(tmp_path, (2, 2))).append(_rec("c"))
    ResultStore(store_path(tmp_path)).append(_rec("b", acc=5.0))  # duplicate across files
    (tmp_path / "notes.jsonl").write_text("ignored\n")
    assert [p.name for p in store_files(tmp_path)] == [
        "results-shard-1-of-2.jsonl", "results-shard-2-of-2.jsonl", "results.jsonl"]
    recs = read_records(tmp_path)
    assert sorted(r.cell_id for r in recs) == ["a", "b", "c"]
    assert [r.cell_id for r in read_records(tmp_path, task="g-sweep")] == ["a"]
    assert read_records(tmp_path / "missing") == []


def _line(cid):
    return (S.canonical_json(S._record_to_json(_rec(cid))) + "\n").encode()


def test_recorded_ids_read_only_what_was_appended(tmp_path):
    path = store_path(tmp_path)
    store = ResultStore(path)
    for cid in "abc":
        store.append(_rec(cid))
    ids = S.RecordedIds(tmp_path)
    ids.refresh()
    assert [c for c in "abcd" if c in ids] == list("abc") and len(ids) == 3
    assert ids.bytes_read == path.stat().st_size
    before = ids.bytes_read
    store.append(_rec("d"))
    ids.refresh()
    assert "d" in ids and ids.bytes_read - before == len(_line("d"))  # the new line only
    ids.refresh()
    assert ids.bytes_read - before == len(_line("d"))  # nothing new: nothing read


def test_recorded_ids_torn_lines_shrinking_replaced_and_new_files(tmp_path):
    path = store_path(tmp_path)
    store = ResultStore(path)
    store.append(_rec("a"))
    ids = S.RecordedIds(tmp_path)

    def check():
        ids.refresh()
        assert len(ids) == len({r.cell_id for r in read_records(tmp_path)})
        assert all(r.cell_id in ids for r in read_records(tmp_path))

    line_b = _line("b")
    with open(path, "ab") as fh:  # a writer killed in the middle of its line
        fh.write(line_b[:-10])
    check()
    assert "b" not in ids
    with open(path, "ab") as fh:  # a complete record without its newline yet: not counted
        fh.write(line_b[-10:-1])
    ids.refresh()
    assert "b" not in ids
    with open(path, "ab") as fh:
        fh.write(b"\n")
    check()
    assert "b" in ids
    with open(path, "ab") as fh:  # torn again, then the next append terminates it
        fh.write(_line("x")[:20])
    check()
    store.append(_rec("c"))
    check()
    assert "c" in ids and "x" not in ids
    # a failed append cut back (the file shrank): read again, the lost record forgotten
    data = path.read_bytes()
    os.truncate(path, len(data) - len(_line("c")))
    check()
    assert "c" not in ids and "b" in ids
    # the file replaced by another with as many bytes or more (another inode)
    tmp = tmp_path / "new.tmp"
    tmp.write_bytes(_line("p") + _line("q") + _line("r") + _line("s"))
    os.replace(tmp, path)
    check()
    assert [c for c in "abpqrs" if c in ids] == list("pqrs")
    # rewritten in place, same inode and larger, not ending a line where the last look stopped
    with open(path, "r+b") as fh:
        fh.write(b" " + _line("t") + _line("u") + _line("v") + _line("w") + _line("y"))
    check()
    assert "t" in ids and "p" not in ids
    # a new shard file, then a removed one
    ResultStore(store_path(tmp_path, (2, 3))).append(_rec("z"))
    check()
    assert "z" in ids
    path.unlink()
    check()
    assert [c for c in "tz" if c in ids] == ["z"] and len(ids) == 1


def _append_many(path, start):
    store = ResultStore(path)
    for i in range(start, start + 40):
        store.append(_rec(f"c{i % 50}"))


def test_concurrent_appends_never_duplicate(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, s)) for s in (0, 10, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    ids = [json.loads(line)["cell_id"] for line in lines]
    assert len(ids) == len(set(ids)) == 50


def test_run_meta_has_provenance():
    meta = S.run_meta(device="cpu")
    assert meta["device"] == "cpu" and "torch" in meta and "host" in meta


def test_store_and_report_do_not_import_the_tasks():
    """The contract sits at the bottom (bgnorm.repro.api): the store and the report import
    it, never the tasks above them."""
    code = ("import sys, bgnorm.repro.store, bgnorm.repro.report; "
            "print(sorted(m for m in sys.modules if m.startswith('bgnorm.repro.tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# --------------------------------------------------------------------------------------------
# Cell locks
# --------------------------------------------------------------------------------------------


def _write_lock(folder, **info):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"host": "elsewhere", "pid": 1, "token": "t", "started": 0.0, "expires": 0.0}
    (folder / S.LOCK_NAME).write_text(json.dumps({**base, **info}))


def test_lock_claim_holder_and_release(tmp_path):
    mine, other = S.CellLock(tmp_path / "c", 60), S.CellLock(tmp_path / "c", 60)
    assert mine.acquire() and mine.took_over is None
    info = json.loads((tmp_path / "c" / S.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["token"] == mine.token
    assert info["expires"] - info["started"] == pytest.approx(60, abs=1)
    assert not other.acquire() and other.holder["token"] == mine.token
    assert "pid" in S.describe_holder(other.holder)
    assert not other.renew()  # not its lock
    mine.release()
    assert not (tmp_path / "c" / S.LOCK_NAME).exists()
    assert other.acquire()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [S.LOCK_NAME]  # no temp files


def test_lock_renew_extends_the_lease_until_taken_over(tmp_path):
    lock = S.CellLock(tmp_path / "c", 30)
    assert lock.acquire()
    first = json.loads(lock.path.read_text())
    time.sleep(0.01)
    assert lock.renew()
    renewed = json.loads(lock.path.read_text())
    assert renewed["expires"] > first["expires"] and renewed["started"] == first["started"]
    _write_lock(tmp_path / "c", token="someone else")  # taken over meanwhile
    assert not lock.renew() and not lock.owned()
    lock.release()  # not ours any more: left alone
    assert json.loads(lock.path.read_text())["token"] == "someone else"


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path / "c", host=S._HOST, pid=dead.pid, expires=time.time() + 3600)
    lock = S.CellLock(tmp_path / "c", 60)
    assert lock.acquire() and lock.took_over["pid"] == dead.pid
    assert json.loads(lock.path.read_text())["token"] == lock.token


def test_lock_of_a_live_pid_on_this_host_is_held_even_past_its_lease(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(tmp_path / "c", host=S._HOST, pid=live.pid,
                    pid_start=S._process_start(live.pid), expires=time.time() - 10)
        lock = S.CellLock(tmp_path / "c", 60)
        assert not lock.acquire() and lock.holder["pid"] == live.pid
    finally:
        live.kill()
        live.wait()
    assert lock.acquire()  # now its pid is gone


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    if S._process_start(os.getppid()) is None:
        pytest.skip("no /proc/<pid>/stat here")
    # a live pid, but a process started at another time: the holder is gone, its pid reused
    _write_lock(tmp_path / "c", host=S._HOST, pid=os.getppid(), pid_start="1",
                expires=time.time() + 3600)
    assert S.CellLock(tmp_path / "c", 60).acquire()


def test_lock_of_another_host_is_taken_over_when_its_lease_expired(tmp_path):
    _write_lock(tmp_path / "a", expires=time.time() + 3600)
    _write_lock(tmp_path / "b", expires=time.time() - 1)
    held, expired = S.CellLock(tmp_path / "a", 60), S.CellLock(tmp_path / "b", 60)
    assert not held.acquire() and held.holder["host"] == "elsewhere"
    assert expired.acquire() and expired.took_over["host"] == "elsewhere"


def test_lock_left_by_an_earlier_sweep_of_this_process_is_stale(tmp_path):
    _write_lock(tmp_path / "c", host=S._HOST, pid=os.getpid(),
                pid_start=S._process_start(os.getpid()), expires=time.time() + 3600,
                token="from an earlier run_sweep that was interrupted")
    assert S.CellLock(tmp_path / "c", 60).acquire()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / S.LOCK_NAME).write_bytes(b'{"host": "x", "pi')  # damaged
    assert S.CellLock(tmp_path / "d", 60).acquire()


def _race(folder, start, out):
    time.sleep(max(0.0, start - time.time() - 0.01))
    while time.time() < start:  # the last 10 ms: all three start together
        pass
    wins = []
    for i in range(12):  # even cells: fresh; odd cells: a stale lock to take over
        lock = S.CellLock(Path(folder) / str(i), 60)
        if lock.acquire():
            wins.append(i)
    Path(out).write_text(json.dumps(wins))


@pytest.mark.parametrize("links", [True, False])
def test_lock_folder_removed_between_mkdir_and_claim(tmp_path, monkeypatch, links):
    """A runner that records a cell removes its folder; another runner claiming that cell
    right then must not crash (seen in CI with three runners): it makes the folder again."""
    import shutil

    if not links:  # the O_EXCL path of filesystems without hard links
        def no_link(src, dst):
            raise OSError(errno.EPERM, "no hard links here")
        monkeypatch.setattr(S.os, "link", no_link)
    lock = S.CellLock(tmp_path / "c", 60)
    real, calls = S.CellLock._write_tmp, []

    def removed_first(self):
        tmp = real(self)
        calls.append(tmp)
        if len(calls) == 1:
            shutil.rmtree(self.folder)  # the other runner's cleanup, after our mkdir
        return tmp

    monkeypatch.setattr(S.CellLock, "_write_tmp", removed_first)
    assert lock.acquire() and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [S.LOCK_NAME]


def test_concurrent_claims_have_exactly_one_winner(tmp_path):
    for i in range(1, 12, 2):
        _write_lock(tmp_path / "cells" / str(i), expires=time.time() - 5)
    ctx = mp.get_context("spawn")
    start = time.time() + 4.0  # after the three interpreters started
    procs = [ctx.Process(target=_race, args=(tmp_path / "cells", start, tmp_path / f"w{k}"))
             for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    wins = [json.loads((tmp_path / f"w{k}").read_text()) for k in range(3)]
    assert sorted(sum(wins, [])) == list(range(12)), wins  # every cell won once, by one
    for i in range(12):
        assert sorted(p.name for p in (tmp_path / "cells" / str(i)).iterdir()) == [S.LOCK_NAME]


def test_store_write_errors_name_the_file_and_the_fix(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results.jsonl")
    store.append(_rec("a"))

    def full(fd, data):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(S.os, "write", full)
    with pytest.raises(S.DiskFaultError) as info:
        store.append(_rec("b"))
    assert isinstance(info.value, OSError) and info.value.errno == errno.EDQUOT
    assert str(tmp_path / "results.jsonl") in str(info.value) and "quota" in str(info.value)
    monkeypatch.undo()
    assert [r.cell_id for r in store.records()] == ["a"] and store.bad_lines == 0
