"""``num_groups="auto"`` cells of the classification tasks (normalizers' ``bgn-auto``, the
g-transfer study's ``policy`` role, ``--groups auto``): the per-layer G the policy gives them is
stamped in the cell (part of its id), checked again before training, a policy that gives every
layer one G is trained once with that fixed-G cell, and a record made under another policy is
left out of the report when a newer record of the same cell exists."""

from __future__ import annotations

import json

import pytest

import bgnorm
from bgnorm.repro.api import Record
from bgnorm.repro.runner import render_report, same_run_key, supersede_policy_records
from bgnorm.repro.store import cell_id
from bgnorm.repro.tasks.base import get_task
from bgnorm.repro.tasks.classify import (
    check_policy_groups,
    input_shape,
    load_classification_data,
    policy_groups,
    run_classify,
)


class _NoTraining:
    """A cell context whose every use means that training started."""

    def __getattr__(self, name):
        raise AssertionError(f"training started (ctx.{name})")


def _auto_cells(task="normalizers", preset="quick"):
    return [c for c in get_task(task).cells(preset, {"seeds": [0]})
            if c.get("num_groups") == "auto"]


@pytest.mark.parametrize("dataset, size", [("mnist5k", 16), ("mnist5k", None), ("digits", None),
                                           ("digits", 16)])
def test_input_shape_is_the_loaded_datas(dataset, size):
    config = {"dataset": dataset, "image_size": size, "seed": 0, "split_seed": 0,
              "test_fraction": 0.2}
    import torch

    *_, info = load_classification_data(config, torch.device("cpu"), 4)
    assert input_shape(config) == tuple(info["input_shape"])


def test_input_shape_of_fashion_mnist_and_the_streamed_datasets():
    assert input_shape({"dataset": "fashion-mnist", "image_size": None}) == (1, 28, 28)
    assert input_shape({"dataset": "fashion-mnist", "image_size": 16}) == (1, 16, 16)
    assert input_shape({"dataset": "cifar10", "image_size": 64}) == (3, 32, 32)  # as loaded
    assert input_shape({"dataset": "imagefolder", "image_size": 96}) == (3, 96, 96)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; valid datasets: digits"):
        input_shape({"dataset": "svhn"})


def test_normalizers_policy_cells_carry_each_layers_g():
    cells = _auto_cells()
    assert {c["batch_size"] for c in cells} == {64, 16, 4, 2}
    # the quick network's 9 norm layers: 16x16x16, 32x8x8, 64x4x4 (3 each)
    shapes = [(16, (16, 16))] * 3 + [(32, (8, 8))] * 3 + [(64, (4, 4))] * 3
    for c in cells:
        assert c["layer_groups"] == [bgnorm.auto_groups(ch, hw, c["batch_size"])
                                     for ch, hw in shapes], c["batch_size"]
        assert policy_groups(c) == c["layer_groups"]
    by_b = {c["batch_size"]: c["layer_groups"] for c in cells}
    # the paper's G fits every layer here: 256, 64, 2 and 1 in all nine
    assert by_b == {b: [bgnorm.paper_groups(b)] * 9 for b in (64, 16, 4, 2)}


def test_a_policy_that_gives_one_g_is_trained_once_with_the_fixed_g_cell():
    cells = get_task("normalizers").cells("quick", {"seeds": [0]})
    key = {(c["num_groups"], c["batch_size"]): same_run_key(c) for c in cells
           if c["norm"] == "bgn"}
    # the policy gives every layer the paper's G on this network: one run at every b
    for b, g in ((64, 256), (16, 64), (4, 2), (2, 1)):
        assert key[("auto", b)] == key[(g, b)]
    # where it gives the layers different G, it is a run of its own
    deep = get_task("normalizers").cells("quick", {"seeds": [0], "batch_sizes": [64], "set": {
        "model_kwargs": {"width": 8, "blocks_per_stage": [1] * 5,
                         "stage_strides": [1, 2, 2, 2, 2]}}})
    [policy] = [c for c in deep if c.get("num_groups") == "auto"]
    [paper] = [c for c in deep if c["norm"] == "bgn" and c.get("num_groups") == 256]
    assert policy["layer_groups"] == [256] * 12 + [128] * 3
    assert same_run_key(policy) != same_run_key(paper)


@pytest.mark.parametrize("task", ["normalizers", "g-transfer"])
def test_a_cell_listed_by_another_policy_is_refused_before_training(task):
    [cell] = [c for c in _auto_cells(task) if c["batch_size"] == 64][:1]
    stale = {**cell, "layer_groups": [16] * len(cell["layer_groups"])}
    with pytest.raises(ValueError, match=rf"{task}: the policy now gives this cell's layers "
                                         r"G = \[256, 256, 256, 256"):
        run_classify(stale, _NoTraining())
    check_policy_groups(cell)  # the current policy's cell passes
    check_policy_groups({k: v for k, v in cell.items() if k != "layer_groups"})  # unstamped


def test_policy_change_makes_new_cell_ids(monkeypatch):
    before = {cell_id(c) for c in _auto_cells()}
    real = bgnorm.auto_groups
    monkeypatch.setattr(bgnorm, "auto_groups",
                        lambda c, hw, b, **kw: real(c, hw, b, target_values=4096, **kw))
    after = _auto_cells()
    assert [c["layer_groups"] for c in after if c["batch_size"] == 64] != [[256] * 9]
    assert not before & {cell_id(c) for c in after}


def _record(cid, groups, when, acc, seed=0):
    [cell] = [c for c in _auto_cells() if c["batch_size"] == 64]
    config = {k: v for k, v in cell.items() if k != "layer_groups"}
    config["seed"] = seed
    if groups is not None:
        config["layer_groups"] = groups
    curve = [{"epoch": i + 1, "progress": (i + 1) / 4, "metric": acc, "train_loss": 0.2}
             for i in range(4)]
    return Record(cid, config, "ok", {"acc": acc, "n_test": 1000, "num_classes": 10,
                                      "steps": 100, "curve": curve}, 1.0,
                  {"finished_at": when})


def test_newest_record_of_a_policy_cell_supersedes_the_older_ones():
    old = _record("old0", None, "2026-11-29T10:00:00+0000", 90.0)
    mid = _record("mid0", [16] * 9, "2026-11-30T10:00:00+0000", 91.0)
    new = _record("new0", [8] * 9, "2026-12-01T10:00:00+0000", 97.0)
    other_seed = _record("new1", [8] * 9, "2026-11-28T10:00:00+0000", 96.0, seed=1)
    kept, left = supersede_policy_records([new, old, other_seed, mid])
    assert [r.cell_id for r in kept] == ["new0", "new1"]
    assert [r.cell_id for r in left] == ["old0", "mid0"]
    # records of fixed-G cells are never set apart
    fixed = Record("fixed", {**old.config, "num_groups": 8}, "ok", old.result, 1.0, old.meta)
    assert supersede_policy_records([fixed, old]) == ([fixed, old], [])


def test_report_averages_only_the_newest_record_of_a_policy_cell(tmp_path):
    lines = [{"cell_id": r.cell_id, "config": r.config, "status": r.status, "result": r.result,
              "seconds": r.seconds, "meta": r.meta}
             for r in (_record("old0", None, "2026-11-29T10:00:00+0000", 60.0),
                       _record("new0", [8] * 9, "2026-12-01T10:00:00+0000", 97.0))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = render_report(tmp_path)
    assert "1 cells recorded" in text and "Left out: 1 record(s)" in text and "`old0`" in text
    assert "97.00" in text and "60.00" not in text and "78.50" not in text
