"""The ``g-transfer`` task: its cells (axes, ids, one run where roles coincide), the policy's
per-layer G, and the report and claims on synthetic records; the smoke preset end to end."""

from __future__ import annotations

import doctest
import json

import pytest

import bgnorm
import bgnorm.repro.tasks.transfer as T
from bgnorm.cli import main
from bgnorm.repro.api import Record
from bgnorm.repro.runner import same_run_key
from bgnorm.repro.store import cell_id
from bgnorm.repro.tasks.classify import cells_g_sweep, run_classify

N_TEST = 10_000  # many test images: a 1 pp gap is outside the test-set noise (±0.3 pp)

#: (C, (H, W)) of the 9 norm layers of the quick preset's 3-stage network at 16 and 28 px (stem,
#: stage 1's two, then conv1, conv2 and the shortcut's norm of stages 2 and 3).
_SHAPES = {16: [(16, (16, 16))] * 3 + [(32, (8, 8))] * 3 + [(64, (4, 4))] * 3,
           28: [(16, (28, 28))] * 3 + [(32, (14, 14))] * 3 + [(64, (7, 7))] * 3}


def test_docstring_examples():
    result = doctest.testmod(T, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def _listed(capsys, tmp_path, preset, *extra):
    assert main(["reproduce", "--task", "g-transfer", "--preset", preset, "--out",
                 str(tmp_path), "--list", *extra]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_cli_lists_the_presets_cells(capsys, tmp_path):
    # seeds x networks x batch sizes x (swept G + policy + paper)
    lines, err = _listed(capsys, tmp_path, "smoke")
    assert "20 cells" in err and len(lines) == 20
    lines, err = _listed(capsys, tmp_path, "quick")
    assert "56 cells" in err  # 2 x 2 x 2 x (5 + 2)
    for cell in ("g-transfer 16px-w16 bgn (policy) b=64 G=auto seed=0",
                 "g-transfer 28px-w16 bgn (paper) b=2 W=32 G=1 seed=1",
                 "g-transfer 28px-w16 bgn (sweep) b=64 G=256 seed=0"):
        assert any(line.endswith(cell) for line in lines), cell
    _, err = _listed(capsys, tmp_path, "full")
    assert "297 cells" in err  # 3 x 3 x 3 x (9 + 2)
    _, err = _listed(capsys, tmp_path, "quick", "--groups", "8,1", "--batch-sizes", "2",
                     "--seeds", "0")
    assert "8 cells" in err  # 2 networks x (2 + 2)
    assert main(["reproduce", "--task", "g-transfer", "--preset", "quick", "--out",
                 str(tmp_path), "--list", "--norms", "bn"]) == 2
    assert "--norms is not used by the g-transfer task" in capsys.readouterr().err


def test_cells_have_the_axes_and_the_classification_protocol():
    cells = T.cells_transfer("quick", {})
    assert {c["role"] for c in cells} == set(T.ROLES)
    assert {c["network"] for c in cells} == {"16px-w16", "28px-w16"}
    assert {c["image_size"] for c in cells} == {16, 28}
    by = {(c["network"], c["batch_size"], c["role"], c["num_groups"], c["seed"]): c
          for c in cells}
    assert len(by) == len(cells)
    for net in ("16px-w16", "28px-w16"):
        assert sorted(g for (n, b, r, g, s) in by if (n, b, r, s) == (net, 2, "sweep", 0)) == [
            1, 4, 16, 64, 256]
        # the paper's G for the batch; the policy's G from each layer
        assert by[(net, 64, "paper", 256, 0)] and by[(net, 2, "paper", 1, 0)]
        # the classification tasks' split: 64 examples a step, lr 0.1 per 32
        small, large = by[(net, 2, "sweep", 4, 0)], by[(net, 64, "sweep", 4, 0)]
        assert (small["workers"], large["workers"]) == (32, 1)
        assert small["lr"] == pytest.approx(0.2) and large["lr"] == pytest.approx(0.2)
        assert small["model_kwargs"] == {"width": 16, "blocks_per_stage": [1, 1, 1]}
    # the same cells, the same ids, every time
    assert [cell_id(c) for c in cells] == [cell_id(c) for c in T.cells_transfer("quick", {})]


@pytest.mark.parametrize("size, b", [(16, 64), (28, 64), (16, 2), (28, 2)])
def test_policy_cells_carry_each_layers_g(size, b):
    [cell] = [c for c in T.cells_transfer("quick", {"seeds": [0]})
              if c["role"] == "policy" and c["image_size"] == size and c["batch_size"] == b]
    assert cell["num_groups"] == "auto"
    assert cell["layer_groups"] == [bgnorm.auto_groups(c, hw, b) for c, hw in _SHAPES[size]]
    if b == 2 or size == 16:  # the paper's G is a whole group in every layer
        assert cell["layer_groups"] == [bgnorm.paper_groups(b)] * 9 == ([256] * 9 if b == 64
                                                                       else [1] * 9)
    else:  # 28 px: 256 is no whole group of 32x14x14 or 64x7x7: the nearest, 7 bands each
        assert cell["layer_groups"] == [256] * 3 + [224] * 3 + [448] * 3


def test_cells_that_coincide_are_one_run():
    cells = T.cells_transfer("quick", {"seeds": [0]})
    keys = {(c["network"], c["batch_size"], c["role"], c["num_groups"]): same_run_key(c)
            for c in cells}
    for net in ("16px-w16", "28px-w16"):
        # the paper's G is a swept G at both batch sizes: one run
        assert keys[(net, 64, "paper", 256)] == keys[(net, 64, "sweep", 256)]
        assert keys[(net, 2, "paper", 1)] == keys[(net, 2, "sweep", 1)]
        # the policy gives every layer G = 1 at b = 2: the swept G = 1's run
        assert keys[(net, 2, "policy", "auto")] == keys[(net, 2, "sweep", 1)]
        sweep = {v for (n, b, r, _), v in keys.items() if (n, b, r) == (net, 64, "sweep")}
        assert len(sweep) == 5
    # b = 64: the paper's G in every layer at 16 px (the swept G = 256's run); at 28 px the
    # whole groups nearest to it (224 and 448 bands), a run of its own
    assert keys[("16px-w16", 64, "policy", "auto")] == keys[("16px-w16", 64, "sweep", 256)]
    assert keys[("28px-w16", 64, "policy", "auto")] not in {
        v for (n, b, r, _), v in keys.items() if (n, b, r) == ("28px-w16", 64, "sweep")}
    assert len(set(keys.values())) == 5 + 5 + 5 + 6  # 21 runs of 28 cells
    # a swept cell of the 16 px network is the g-sweep task's cell (same G, batch, seed)
    g_sweep = {(c["batch_size"], c["num_groups"], c["seed"]): same_run_key(c)
               for c in cells_g_sweep("quick", {})}
    for g in (256, 64, 1):
        for b in (64, 2):
            assert keys[("16px-w16", b, "sweep", g)] == g_sweep[(b, g, 0)]


def test_networks_are_checked():
    with pytest.raises(ValueError, match="the names must differ"):
        T.cells_transfer("smoke", {"set": {"networks": [T.NET_16PX, T.NET_16PX]}})
    with pytest.raises(ValueError, match="unknown model 'resnet7'; valid models:"):
        T.cells_transfer("smoke", {"set": {"networks": [{"name": "a", "model": "resnet7"}]}})
    with pytest.raises(ValueError, match="each network is an object with keys name, model"):
        T.cells_transfer("smoke", {"set": {"networks": [{"name": "a", "model": "small_resnet",
                                                         "width": 8}]}})
    with pytest.raises(ValueError, match="unknown preset 'paper'; valid presets: smoke, "):
        T.cells_transfer("paper", {})


def test_a_policy_cell_from_another_policy_is_refused_before_training():
    [cell] = [c for c in T.cells_transfer("quick", {"seeds": [0]}) if c["role"] == "policy"
              and c["image_size"] == 16 and c["batch_size"] == 64]
    stale = {**cell, "layer_groups": [16] * 9}

    class _NoTraining:  # any use of the context would mean training started
        def __getattr__(self, name):
            raise AssertionError(f"training started (ctx.{name})")

    with pytest.raises(ValueError, match=r"the policy now gives this cell's layers G = \[256, "):
        run_classify(stale, _NoTraining())


# --------------------------------------------------------------------------------------------
# The report on synthetic records
# --------------------------------------------------------------------------------------------


def _record(net, b, role, g, acc, seed=0, rising=False, layers=None):
    size = {"16px-w16": 16, "28px-w16": 28}[net]
    if layers is None:
        layers = [g] * 9
    config = {"task": "g-transfer", "network": net, "role": role, "seed": seed, "norm": "bgn",
              "num_groups": g, "batch_size": b, "workers": 64 // b, "lr": 0.2, "epochs": 12,
              "dataset": "mnist5k", "image_size": size, "model": "small_resnet",
              "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]}, "base_lr": 0.1,
              "lr_reference_batch": 32, "momentum": 0.9, "weight_decay": 1e-4,
              "warmup_epochs": 1, "schedule": "cosine", "median_of": 3}
    if role == "policy":
        config["layer_groups"] = layers
    accs = [acc - 30, acc - 8, acc, acc] if rising else [acc - 1, acc, acc, acc]
    losses = [1.0, 0.6, 0.4, 0.3] if rising else [0.5, 0.2, 0.2, 0.2]
    curve = [{"epoch": i + 1, "progress": (i + 1) / 4, "metric": a, "train_loss": l}
             for i, (a, l) in enumerate(zip(accs, losses, strict=True))]
    result = {"acc": acc, "n_test": N_TEST, "num_classes": 10, "steps": 100, "curve": curve,
              "layers": [[c, list(hw), lg] for (c, hw), lg in zip(_SHAPES[size], layers,
                                                                 strict=True)]}
    return Record(f"{net}-{b}-{role}-{g}-{seed}", config, "ok", result, 1.0)


_POLICY_64 = [8] * 3 + [4] * 3 + [2] * 3


def _group(net, b, sweep, policy, paper_g, seeds=(0, 1), rising=()):
    """Records of one network x batch: ``sweep`` {G: acc}, the policy's acc (layers
    ``_POLICY_64`` at b = 64, G = 1 at b = 2), the paper's G (a swept G: the same values)."""
    recs = []
    for s, seed in enumerate(seeds):
        wobble = 0.1 * s  # seed 1 a little better everywhere: removed by the pairing
        for g, a in sweep.items():
            recs.append(_record(net, b, "sweep", g, a + wobble, seed, rising=g in rising))
        layers = _POLICY_64 if b == 64 else [1] * 9
        recs.append(_record(net, b, "policy", "auto", policy + wobble, seed, layers=layers))
        recs.append(_record(net, b, "paper", paper_g, sweep[paper_g] + wobble, seed))
    return recs


def _rows(text, first):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first}")]


def test_report_tables_and_claims_held_and_not(tmp_path):
    sweep = {256: 96.0, 64: 97.5, 16: 98.0, 4: 98.1, 1: 97.9}
    recs = (_group("16px-w16", 64, sweep, policy=98.05, paper_g=256)
            + _group("28px-w16", 64, sweep, policy=95.0, paper_g=256))
    text = T.report_transfer(recs, tmp_path)
    assert (tmp_path / "g-transfer.png").read_bytes()[:4] == b"\x89PNG"
    assert "![accuracy vs G, the policy's and the paper's choice](g-transfer.png)" in text
    assert "### 16px-w16, b = 64 per worker" in text
    # cell, G per layer, values per statistic, accuracy, minus the best, note
    policy = _rows(text, "policy (auto)")[0]
    assert policy[:4] == ["policy (auto)", "2..8", "32768", "98.10 ± 0.64"]
    assert policy[4].startswith("-0.05 ± 0.00 pp (paired over 2 seeds)")
    g4 = _rows(text, "G = 4 ")[0]
    assert g4[1:4] == ["4", "16384..65536", "98.15 ± 0.64"] and g4[5] == "best swept G"
    paper = _rows(text, "paper's G = 256")[0]
    assert paper[5] == "the same run as G = 256"
    assert ("*The policy's G by layer shape* (C x H x W: G, values per statistic): 16x16x16: "
            "G = 8 (32768 values); 32x8x8: G = 4 (32768 values); 64x4x4: G = 2 (32768 values)"
            ) in text
    summary = _rows(text, "16px-w16 ")[0]
    assert summary == ["16px-w16", "1024..4096", "64", "4 (98.15 ± 0.64)", "2..8",
                       "98.10 ± 0.64 (-0.05)", "held", "256", "96.05 ± 0.64 (-2.10)",
                       "did not hold"]
    assert _rows(text, "28px-w16 ")[0][6] == "did not hold"
    assert ("✅ **The policy's G is within noise of the best swept G (16px-w16, b=64)** — "
            "*held*. The policy: 98.10 ± 0.64; the best swept G = 4: 98.15 ± 0.64; the policy "
            "minus the best: -0.05 ± 0.00 pp (paired over 2 seeds), 0.05 pp below it, within "
            "the noise; noise level ±") in text
    assert ("❌ **The policy's G is within noise of the best swept G (28px-w16, b=64)** — "
            "*did not hold*. The policy: 95.05 ± 0.64; the best swept G = 4: 98.15 ± 0.64; the "
            "policy minus the best: -3.10 ± 0.00 pp (paired over 2 seeds), 3.10 pp below it, "
            "more than the noise") in text
    assert ("❌ **The paper's G = 256 is within noise of the best swept G (16px-w16, b=64)** — "
            "*did not hold*.") in text
    assert ("The policy's G against the best swept G, of 2 network x batch pair(s): did not "
            "hold on 1 (28px-w16, b=64); held on 1 (16px-w16, b=64).") in text
    assert "mean ± 95% interval over 2 seed(s) (0, 1)" in text
    assert T.report_transfer([], tmp_path).endswith("No results yet.\n")


def test_report_when_the_paper_and_the_policy_are_the_best_run(tmp_path):
    sweep = {16: 97.0, 4: 97.5, 1: 98.0}
    text = T.report_transfer(_group("16px-w16", 2, sweep, policy=98.0, paper_g=1), tmp_path)
    policy = _rows(text, "policy (auto)")[0]
    assert policy[1] == "1" and policy[5] == "the same run as G = 1"
    assert ("✅ **The paper's G = 1 is within noise of the best swept G (16px-w16, b=2)** — "
            "*held*. The paper's G = 1: 98.05 ± 0.64; the best swept G = 1: 98.05 ± 0.64; the "
            "paper's G = 1 is the best swept G (the same run)") in text
    assert "**The policy's G is within noise of the best swept G (16px-w16, b=2)** — *held*" \
        in text


def test_report_judges_no_claim_on_a_cell_still_improving(tmp_path):
    sweep = {256: 96.0, 16: 98.0, 1: 97.9}
    recs = _group("16px-w16", 64, sweep, policy=90.0, paper_g=256, rising=(256,))
    text = T.report_transfer(recs, tmp_path)
    assert ("⚠️ **The policy's G is within noise of the best swept G (16px-w16, b=64)** — "
            "*not judged*. Cells still improving: 16px-w16, b=64, G = 256 (seed 0: ") in text
    assert "paper's G = 256 is within noise of the best swept G (16px-w16, b=64)** — *not " \
           "judged*" in text
    assert "*held*" not in text and "*did not hold*" not in text
    # the table still shows the numbers, marked
    assert _rows(text, "G = 256")[0][3].endswith("‡")


def test_report_with_one_seed_and_a_missing_policy(tmp_path):
    sweep = {16: 98.0, 1: 97.0}
    recs = [r for r in _group("16px-w16", 64, sweep, policy=97.9, paper_g=16, seeds=(0,))
            if r.config["role"] != "policy"]
    text = T.report_transfer(recs, tmp_path)
    assert ("**The policy's G is within noise of the best swept G (16px-w16, b=64)** — *not "
            "tested*. The policy was not run for 16px-w16, b=64 (yet).") in text
    assert "one seed, so run-to-run training noise is not included" in text


def test_layer_summary_matches_values_per_statistic():
    rec = _record("28px-w16", 2, "policy", "auto", 97.0, layers=[1] * 9)
    for (c, hw, g, v), (c0, hw0) in zip(T.layer_summary(rec), _SHAPES[28], strict=True):
        layer = bgnorm.GeneralBatchGroupNorm2d(c, g, 2)
        assert (c, hw) == (c0, hw0)
        assert v == bgnorm.values_per_statistic(layer, (64, c, *hw))


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, capsys):
    # about 12 CPU-seconds: 20 cells, 12 training runs (the paper's G is swept; the policy
    # gives G = 1 to every layer of these tiny networks)
    out = tmp_path / "smoke"
    assert main(["reproduce", "--task", "g-transfer", "--preset", "smoke", "--out", str(out),
                 "--jobs", "1", "--threads", "1"]) == 0
    assert "(8 of them recorded from the same run as another cell)" in capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "## Does the per-layer G policy transfer?" in report
    assert "### Policy and paper against the best swept G" in report
    assert "### Convergence (g-transfer)" in report
    assert (out / "g-transfer.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 20
    copies = [r for r in records if r["result"].get("same_run_as")]
    assert len(copies) == 8
    assert {r["config"]["role"] for r in copies} == {"policy", "paper"}
    for r in records:
        if r["config"]["role"] == "policy":
            assert [layer[2] for layer in r["result"]["layers"]] == r["config"]["layer_groups"]
