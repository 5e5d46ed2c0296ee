"""The ``mechanism`` task: a ResNet ending at a chosen spatial size, its cells and presets, the
values per statistic of every norm layer, and the report (BN's threshold, claims) on synthetic
records."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

import bgnorm.repro.tasks.mechanism as M
from bgnorm.cli import main
from bgnorm.repro.api import Record
from bgnorm.repro.models import build_model, small_resnet, strides_to_final_size
from bgnorm.repro.norms import probe_norm_inputs
from bgnorm.repro.report import Summary

N_TEST = 10_000  # many test images: a 1 pp gap is well outside the noise (±0.3 pp)


def test_docstring_examples():
    for module in (M, __import__("bgnorm.repro.models", fromlist=["x"])):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS
                                 | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------------------------
# The model: the same stages, ending at 4x4, 2x2 or 1x1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, final, strides", [
    (16, 4, [1, 2, 2, 1, 1]), (16, 2, [1, 2, 2, 2, 1]), (16, 1, [1, 2, 2, 2, 2]),
    (28, 2, [1, 2, 2, 2, 2]),  # 28 -> 14 -> 7 -> 4 -> 2
    (8, 8, [1, 1, 1, 1, 1]),
])
def test_strides_end_the_last_stage_at_the_final_size(image_size, final, strides):
    assert strides_to_final_size(image_size, 5, final) == strides

    def build(norm_layer):
        return small_resnet(10, norm_layer, in_channels=1, width=8, blocks_per_stage=[1] * 5,
                            stage_strides=strides)

    probed = probe_norm_inputs(build, (1, image_size, image_size))
    assert probed[-1] == (128, (final, final))
    assert build(torch.nn.BatchNorm2d)(torch.randn(2, 1, image_size, image_size)).shape == (2, 10)


def test_final_size_and_stride_errors_name_the_fix():
    with pytest.raises(ValueError, match="cannot end at 3x3: it reaches 16, 8, 4, 2"):
        strides_to_final_size(16, 4, 3)
    with pytest.raises(ValueError, match="cannot end at 1x1: it reaches 16, 8, 4 "):
        strides_to_final_size(16, 3, 1)
    with pytest.raises(ValueError, match="stage_strides must give 1 or 2 for each of the 3"):
        small_resnet(10, stage_strides=[1, 2])
    with pytest.raises(ValueError, match="stage_strides must give 1 or 2"):
        small_resnet(10, stage_strides=[1, 3, 2])
    with pytest.raises(ValueError, match="max_width=4 must be >= width=8"):
        small_resnet(10, width=8, max_width=4)
    # the default strides are unchanged: 1, then 2 for every later stage
    model = build_model("small_resnet", 10, in_channels=1, width=8, blocks_per_stage=[1, 1, 1])
    assert [stage[0].conv1.stride for stage in model.layers] == [(1, 1), (2, 2), (2, 2)]
    capped = small_resnet(10, width=8, blocks_per_stage=[1] * 5, max_width=32)
    assert [stage[0].conv2.out_channels for stage in capped.layers] == [8, 16, 32, 32, 32]


# --------------------------------------------------------------------------------------------
# Cells, presets and the listing through the CLI
# --------------------------------------------------------------------------------------------


def _listed(capsys, tmp_path, preset, *extra):
    assert main(["reproduce", "--task", "mechanism", "--preset", preset, "--out",
                 str(tmp_path), "--list", *extra]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_cli_lists_the_presets_cells(capsys, tmp_path):
    lines, err = _listed(capsys, tmp_path, "smoke")
    # 2 final sizes x (bn, bgn, bgn-g4 at b = 8 and 2, gn once: same 32 examples per step)
    assert "14 cells" in err and len(lines) == 14
    assert sum("last 1x1" in line for line in lines) == 7
    lines, err = _listed(capsys, tmp_path, "quick")
    assert "6 cells" in err
    for headline in ("mechanism bn b=2 W=8 last 1x1", "mechanism bn b=32 W=8 last 1x1",
                     "mechanism gn b=16 G=32 last 1x1", "mechanism bgn b=2 W=8 G=1 last 1x1"):
        assert any(headline in line for line in lines), headline
    _, err = _listed(capsys, tmp_path, "full")
    # 3 seeds x 3 final sizes x 5 norms (BN, GN, BGN with the paper's, the policy's and a
    # fixed G) x 4 batch sizes
    assert "180 cells" in err
    _, err = _listed(capsys, tmp_path, "quick", "--norms", "bn", "--batch-sizes", "4",
                     "--seeds", "0,1")
    assert "2 cells" in err


def test_cells_follow_the_papers_protocol():
    cells = M.cells_mechanism("quick", {})
    by = {(c["variant"], c.get("covers_batch_sizes", [c["batch_size"]])[0]): c for c in cells}
    bn2, bn32 = by[("bn", 2)], by[("bn", 32)]
    assert (bn2["batch_size"], bn2["workers"], bn32["workers"]) == (2, 8, 8)
    # 0.1 * b / 32 on 8 workers
    assert bn2["lr"] == pytest.approx(0.1 * 2 / 32) and bn32["lr"] == pytest.approx(0.1)
    assert by[("bgn", 2)]["num_groups"] == 1 and by[("bgn", 32)]["num_groups"] == 128
    gn = by[("gn", 2)]  # per-example statistics: one worker, the same 16 examples per step
    assert (gn["batch_size"], gn["workers"], gn["gn_groups"]) == (16, 1, 32)
    assert gn["lr"] == pytest.approx(bn2["lr"])
    for c in cells:
        assert c["final_size"] == 1 and c["model_kwargs"]["stage_strides"] == [1, 2, 2, 2, 2]
        assert (c["schedule"], c["warmup_epochs"], c["epochs"]) == ("cosine", 1, 15)
    # min_steps raises the epochs where 8 x b examples leave few steps an epoch (4000 digits)
    full = {(c["variant"], c["batch_size"], c["final_size"], c["seed"]): c
            for c in M.cells_mechanism("full", {})}
    assert full[("bn", 128, 4, 0)]["epochs"] == 75  # 3 steps an epoch: 225 steps
    assert full[("bn", 2, 4, 0)]["epochs"] == 15
    assert [full[("bn", 2, f, 0)]["model_kwargs"]["stage_strides"] for f in (4, 2, 1)] == [
        [1, 2, 2, 1, 1], [1, 2, 2, 2, 1], [1, 2, 2, 2, 2]]


def test_norm_variants_are_named_and_extensible(monkeypatch):
    assert M.variant_keys("bgn-g64", 2) == {"norm": "bgn", "num_groups": 64}
    assert M.variant_keys("gn", 128) == {"norm": "gn", "gn_groups": 32}
    assert M.variant_keys("bgn-auto", 2) == {"norm": "bgn", "num_groups": "auto"}
    for bad in ("bgn-policy", "bgn-g0", "bgn-g", "ln"):
        with pytest.raises(ValueError, match="valid norms: bn, gn, bgn, bgn-auto and bgn-g<G>"):
            M.variant_keys(bad, 2)
    # a new variant (e.g. another G rule) is one entry of NORM_VARIANTS
    monkeypatch.setitem(M.NORM_VARIANTS, "bgn-4b", lambda b: {"norm": "bgn",
                                                              "num_groups": 4 * b})
    cells = M.cells_mechanism("quick", {"set": {"norms": ["bn", "bgn-4b"]}})
    rule = [c for c in cells if c["variant"] == "bgn-4b"]
    assert sorted(c["num_groups"] for c in rule) == [8, 128]


# --------------------------------------------------------------------------------------------
# Values per statistic on known shapes
# --------------------------------------------------------------------------------------------

#: The quick preset's network on 16x16 digits ending at 1x1: (channels, H*W) of its 15 norm
#: layers (stem; stage 1 without a shortcut; then conv1, conv2 and shortcut norms per stage).
_QUICK_LAYERS = ([(8, 256)] * 3 + [(16, 64)] * 3 + [(32, 16)] * 3 + [(64, 4)] * 3
                 + [(128, 1)] * 3)


@pytest.mark.parametrize("variant, b, per_layer", [
    ("bn", 2, lambda c, s: 2 * s),                        # b * H * W
    ("bn", 32, lambda c, s: 32 * s),
    ("bgn", 2, lambda c, s: 2 * c * s),                   # paper's G = 1: b * C * H * W
    ("bgn-g64", 2, lambda c, s: 2 * c * s // 64),         # G = 64 divides every D here
    ("gn", 2, lambda c, s: c // min(c, 32) * s),          # 32 groups, capped at C
])
def test_values_per_statistic_of_every_layer(variant, b, per_layer):
    [cell] = [c for c in M.cells_mechanism("quick", {"set": {"norms": [variant],
                                                             "batch_sizes": [b]}})]
    layers = M.layer_values(cell, (1, 16, 16))
    assert [(l["channels"], l["spatial"][0] * l["spatial"][1]) for l in layers] == _QUICK_LAYERS
    assert [l["values"] for l in layers] == [per_layer(c, s) for c, s in _QUICK_LAYERS]


def test_values_for_the_networks_ending_at_4x4_and_2x2():
    cells = M.cells_mechanism("full", {"set": {"norms": ["bn"], "batch_sizes": [2],
                                               "seeds": [0]}})
    smallest = {c["final_size"]: min(l["values"] for l in M.layer_values(c, (1, 16, 16)))
                for c in cells}
    assert smallest == {4: 32, 2: 8, 1: 2}  # b * H * W of the last stage


# --------------------------------------------------------------------------------------------
# The report on synthetic records
# --------------------------------------------------------------------------------------------


def _record(variant, final, b, acc, seed=0, values=None, rising=False, norm=None):
    norm = norm or M.variant_keys(variant, b)["norm"]
    config = {"task": "mechanism", "seed": seed, "variant": variant, "norm": norm,
              "final_size": final, "batch_size": b, "workers": 8, "epochs": 15,
              "dataset": "mnist5k", "image_size": 16, "model": "small_resnet",
              "model_kwargs": {"width": 8, "blocks_per_stage": [1] * 5},
              "base_lr": 0.1, "lr_reference_batch": 256, "momentum": 0.9,
              "weight_decay": 1e-4, "warmup_epochs": 1, "median_of": 3,
              **{k: v for k, v in M.variant_keys(variant, b).items() if k != "norm"}}
    accs = [acc - 30, acc - 8, acc, acc] if rising else [acc - 1, acc, acc, acc]
    losses = [1.0, 0.6, 0.4, 0.3] if rising else [0.5, 0.2, 0.2, 0.2]
    if acc < 30 and not rising:  # a failing BN: trains a little, its test accuracy stays low
        accs, losses = [acc, acc, acc, acc], [2.0, 1.9, 1.9, 1.9]
    curve = [{"epoch": i + 1, "progress": (i + 1) / 4, "metric": a, "train_loss": l}
             for i, (a, l) in enumerate(zip(accs, losses, strict=True))]
    values = values if values is not None else {1: 2, 2: 8, 4: 32}[final] * b // 2
    result = {"acc": acc, "n_test": N_TEST, "num_classes": 10, "steps": 100, "curve": curve,
              "values_per_statistic": [values, values * 4], "values_smallest": values,
              "values_median": values * 2.5}
    return Record(f"{variant}-{final}-{b}-{seed}", config, "ok", result, 1.0)


def _headline(bn_b2_rising=False):
    return [
        _record("bn", 1, 2, 26.3, rising=bn_b2_rising), _record("bn", 1, 32, 98.2),
        _record("bn", 2, 2, 98.1), _record("bn", 4, 2, 98.0),
        _record("gn", 1, 2, 98.3, values=4), _record("bgn", 1, 2, 98.1, values=256),
        _record("bgn-g64", 1, 2, 40.0, values=4),
    ]


def test_report_states_the_threshold_and_the_claims(tmp_path):
    text = M.report_mechanism(_headline(), tmp_path)
    assert (tmp_path / "mechanism.png").read_bytes()[:4] == b"\x89PNG"
    assert "![accuracy vs values per statistic](mechanism.png)" in text
    assert "not a reproduction of the paper's ImageNet numbers" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| BN ")]
    # norm, G, last stage, b, values (smallest, median), accuracy, convergence
    assert ["BN", "", "1x1", "2", "2", "5", "26.30", "converged"] in rows
    assert "BGN (G=64)" in text and "GN (32 groups)" in text
    assert ("✅ **BN fails where its statistics see few values** — *held*. BN failed (more "
            "than the noise below its best, 98.20) with 2 values per statistic or fewer and "
            "held from 8: the threshold lies between 2 and 8 values") in text
    assert "✅ **GN and BGN with the paper's G hold where BN fails** — *held*" in text
    assert "GN (32 groups) at 1x1, b=2: 98.30 vs BN 26.30" in text
    assert "*not tested*. The largest per-worker batch run is 32" in text
    # the convergence section is the runner's, once per task (it was here twice)
    assert "### Convergence" not in text


def test_report_judges_the_policy_where_bn_fails_when_it_ran(tmp_path):
    assert "policy's G holds" not in M.report_mechanism(_headline(), tmp_path)
    text = M.report_mechanism(_headline() + [_record("bgn-auto", 1, 2, 97.9, values=512)],
                              tmp_path)
    assert ("✅ **BGN with the per-layer policy's G holds where BN fails** — *held*. BGN "
            "(policy's G) at 1x1, b=2: 97.90 vs BN 26.30") in text
    # a policy cell that collapsed with BN is reported as such
    text = M.report_mechanism(_headline() + [_record("bgn-auto", 1, 2, 25.0, values=2)],
                              tmp_path)
    assert "policy's G holds where BN fails** — *did not hold*" in text


def test_report_judges_whether_the_failure_follows_the_values_per_statistic(tmp_path):
    name = "**The failure follows the values per statistic, not the norm"
    # bgn-g64's 4 values lie between BN's failing 2 and holding 8: no BGN cell to judge
    assert f"{name} (BGN fails where its statistics see as few values as BN's failing ones)** " \
           "— *not tested*. No BGN cell has 2 values per statistic or fewer" in \
           M.report_mechanism(_headline(), tmp_path)
    # G = 512 at b = 2 sees 2 values (fails, as BN there); at b = 32, 32 values (holds)
    recs = _headline() + [_record("bgn-g512", 4, 2, 10.0, values=2),
                          _record("bgn-g512", 1, 32, 97.9, values=32)]
    text = M.report_mechanism(recs, tmp_path)
    assert f"✅ {name}" in text
    assert ("*held*. Every BGN cell with 2 values per statistic or fewer failed and every one "
            "with 8 to 32 held, as BN did (its best 98.20): BGN (G=512) at 4x4, b=2: 2 values, "
            "10.00; BGN (G=512) at 1x1, b=32: 32 values, 97.90") in text
    # a BGN cell below the threshold that held is named
    recs[-2] = _record("bgn-g512", 4, 2, 98.0, values=2)
    text = M.report_mechanism(recs, tmp_path)
    assert ("*did not hold*. Against BN's threshold (fail at 2 values or fewer, hold from 8): "
            "BGN (G=512) at 4x4, b=2: 2 values, 98.00 went the other way") in text
    # no fixed-G BGN ran (the quick preset): no such claim
    assert name not in M.report_mechanism(_headline()[:-1], tmp_path)


def test_report_judges_no_claim_on_a_cell_still_improving(tmp_path):
    text = M.report_mechanism(_headline(bn_b2_rising=True), tmp_path)
    assert "**BN fails where its statistics see few values** — *not judged*" in text
    assert "BN at 1x1, b=2 (seed 0: the training loss fell 0.400 -> 0.300" in text
    assert "hold where BN fails** — *not judged*" in text
    assert "threshold lies" not in text


def test_report_when_bn_holds_everywhere_and_at_large_batch(tmp_path):
    recs = [_record("bn", 4, 2, 98.2), _record("bn", 4, 128, 98.4),
            _record("bgn-g512", 4, 128, 98.3, values=512), _record("bgn", 4, 128, 98.2)]
    text = M.report_mechanism(recs, tmp_path)
    assert ("**BN fails where its statistics see few values** — *did not hold*. BN stayed "
            "within the noise of its best (98.40) down to 32 values per statistic") in text
    assert "hold where BN fails** — *not tested*. BN failed in no cell." in text
    assert ("**At the largest batch, BGN with a large G beats BN (too many values confuse BN)"
            "** — *inconclusive*. 4x4: BGN (G=512) (the best BGN) 98.30 (512 values) vs BN 98.40 "
            "(2048 values)") in text
    assert M.report_mechanism([], tmp_path).endswith("No results yet.\n")


def test_bn_threshold_kinds():
    def pts(*pairs):
        return [(v, Summary((a,))) for v, a in pairs]

    assert M.bn_threshold(pts((2, 26.0), (8, 98.1), (32, 98.2)), 1.0) == ("threshold", 2, 8, 98.2)
    assert M.bn_threshold(pts((2, 97.9), (8, 98.1)), 1.0) == ("none failed", None, 2, 98.1)
    assert M.bn_threshold(pts((2, 26.0), (8, 98.1), (16, 60.0)), 1.0)[0] == "interleaved"
    # two cells with the same values are two points, not seeds of one
    assert M.bn_threshold(pts((8, 60.0), (8, 98.0), (32, 98.1)), 1.0)[0] == "interleaved"
    diverged = [(2, Summary((), diverged=1)), (8, Summary((98.0,)))]
    assert M.bn_threshold(diverged, 1.0) == ("threshold", 2, 8, 98.0)
    assert M.bn_threshold([(2, Summary((), diverged=1))], 1.0)[0] == "no data"


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, capsys):
    # about 25 s of CPU (14 cells of 88 steps); slow on a loaded machine
    out = tmp_path / "smoke"
    assert main(["reproduce", "--task", "mechanism", "--preset", "smoke", "--out", str(out),
                 "--jobs", "1", "--threads", "1"]) == 0
    report = (out / "report.md").read_text()
    assert "## The mechanism: accuracy against the values per statistic" in report
    assert (out / "mechanism.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 14
    for r in records:
        expected = [l["values"] for l in M.layer_values(r["config"], (1, 8, 8))]
        assert r["result"]["values_per_statistic"] == expected
        assert r["result"]["values_smallest"] == min(expected)


def test_policy_variant_carries_each_layers_g_and_is_checked_before_training():
    from bgnorm.repro.runner import plan_cells
    from bgnorm.repro.tasks.classify import policy_groups, run_classify

    cells = [c for _, c in plan_cells(["mechanism"], "quick",
                                      {"set": {"norms": ["bgn-auto"]}})]
    assert {c["batch_size"] for c in cells} == {32, 2}
    for c in cells:
        assert c["num_groups"] == "auto" and c["variant"] == "bgn-auto"
        assert c["layer_groups"] == policy_groups(c) and len(c["layer_groups"]) == 15
    stale = {**cells[0], "layer_groups": [4] * 15}
    with pytest.raises(ValueError, match="mechanism: the policy now gives this cell's layers"):
        run_classify(stale, None)
