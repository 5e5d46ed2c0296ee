"""Tests for bgnorm.repro.store: cell ids, atomic appends, torn lines, shard merging."""

from __future__ import annotations

import doctest
import json
import math
import multiprocessing as mp
import subprocess
import sys

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
