"""The ``normalizers`` task: its cells (methods x per-worker batch x seed, per-example methods
shared across batch sizes, ids), the report and its per-batch-size claims on synthetic records,
and the smoke preset end to end through the CLI."""

from __future__ import annotations

import doctest
import json

import pytest

import bgnorm.repro.tasks.normalizers as N
from bgnorm.cli import main
from bgnorm.repro.api import Record
from bgnorm.repro.report import Summary
from bgnorm.repro.runner import same_run_key
from bgnorm.repro.store import cell_id
from bgnorm.repro.tasks.base import get_task

N_TEST = 10_000  # many test images: the binomial noise of a difference is about ±0.3 pp


def test_docstring_examples():
    result = doctest.testmod(N, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def test_quick_cells_cover_every_method_batch_and_seed():
    cells = get_task("normalizers").cells("quick", {})
    sizes, seeds = [64, 16, 4, 2], [0, 1, 2]
    per_example = {"gn", "gn-ws", "frn", "evonorm-s0"}
    assert len(cells) == len(seeds) * (5 * len(sizes) + len(per_example))
    covered = {}
    for c in cells:
        for b in c.get("covers_batch_sizes") or [c["batch_size"]]:
            covered.setdefault((N.method_of(c), b), set()).add(c["seed"])
    assert set(covered) == {(m, b) for m in N.METHODS for b in sizes}
    assert all(s == set(seeds) for s in covered.values())  # every method on the same seeds
    for c in cells:
        method = N.method_of(c)
        assert c["epochs"] == 12 and c["lr"] == 0.2  # the quick preset's protocol
        if method in per_example:  # one run of 64 examples per step stands for every b
            assert (c["batch_size"], c["workers"], c["covers_batch_sizes"]) == (64, 1, sizes)
        else:  # W = 64 / b virtual workers of b examples
            assert c["batch_size"] * c["workers"] == 64 and "covers_batch_sizes" not in c
    keys = {N.method_of(c): c for c in cells if c["seed"] == 0 and c["batch_size"] in (2, 64)
            and c["workers"] in (32, 1)}
    assert keys["bgn-auto"]["num_groups"] == "auto"
    assert keys["gn-ws"]["weight_standardization"] is True
    assert "weight_standardization" not in keys["gn"]


def test_cell_ids_are_stable_and_shared_with_the_batch_size_task():
    cells = get_task("normalizers").cells("quick", {})
    ids = {(N.method_of(c), c["batch_size"], c["seed"]): cell_id(c) for c in cells}
    # recorded runs keep their ids: a change of these breaks every store of the task
    # (bgn-auto's changed once, on purpose, when its policy's per-layer G became part of the
    # cell; the report leaves the records of the unstamped cells out once newer ones exist)
    assert ids[("bgn-auto", 2, 0)] == "44d260892af51288"
    assert ids[("gn-ws", 64, 0)] == "4a7d36ae35db08d8"
    assert ids[("frn", 64, 0)] == "78add5b475671914"
    # BN, BGN with the paper's G and GN are the batch-size task's cells: trained once
    batch_size = {same_run_key(c) for c in get_task("batch-size").cells("quick", {})}
    shared = {N.method_of(c) for c in cells if same_run_key(c) in batch_size}
    # (and BGN with the policy's G at b = 2, G = 1 in every layer, is BGN with the paper's G)
    assert shared == {"bn", "bgn", "gn", "bgn-auto"}
    normalizers = {(N.method_of(c), c["batch_size"], c["seed"]): same_run_key(c) for c in cells}
    assert normalizers[("bgn-auto", 2, 0)] == normalizers[("bgn", 2, 0)]


def test_methods_subset_and_unknown_method():
    task = get_task("normalizers")
    cells = task.cells("smoke", {"set": {"methods": ["frn", "bn"]}, "seeds": [3]})
    assert sorted({N.method_of(c) for c in cells}) == ["bn", "frn"]
    assert {c["seed"] for c in cells} == {3}
    with pytest.raises(ValueError, match="unknown method.*'bgn-g8'.*valid methods: bgn-auto"):
        task.cells("smoke", {"set": {"methods": ["bgn-g8"]}})
    with pytest.raises(ValueError, match="unknown preset 'paper' for the normalizers task"):
        task.cells("paper", {})


# --------------------------------------------------------------------------------------------
# The report on synthetic records
# --------------------------------------------------------------------------------------------


def _record(method, b, acc, seed=0, rising=False, status="ok"):
    norm, extra = N.METHODS[method]
    config = {"task": "normalizers", "seed": seed, "norm": norm, "batch_size": b,
              "workers": 64 // b, "dataset": "mnist5k", "image_size": 16,
              "model": "small_resnet", "model_kwargs": {"width": 16}, "epochs": 12,
              "momentum": 0.9, "weight_decay": 1e-4, "base_lr": 0.1, "lr": 0.2,
              "lr_reference_batch": 32, "milestones": [0.3, 0.6, 0.9], "schedule": "cosine",
              "warmup_epochs": 1, "median_of": 3, **extra}
    if norm == "bgn" and "num_groups" not in extra:
        config["num_groups"] = 1
    accs = [acc - 30, acc - 8, acc, acc] if rising else [acc - 1, acc, acc, acc]
    losses = [1.0, 0.6, 0.4, 0.3] if rising else [0.5, 0.2, 0.2, 0.2]
    curve = [{"epoch": i + 1, "progress": (i + 1) / 4, "metric": a, "train_loss": l}
             for i, (a, l) in enumerate(zip(accs, losses, strict=True))]
    result = {"acc": acc, "n_test": N_TEST, "num_classes": 10, "steps": 100, "curve": curve,
              "layers": [[16, [16, 16], 4], [64, [4, 4], 1]], "groups_adjusted": 0}
    return Record(f"{method}-{b}-{seed}", config, status, result if status == "ok" else {}, 1.0)


def _table(text):
    return {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
        if line.startswith("| ")) if cells}


def test_report_table_plot_and_best_within_noise(tmp_path):
    recs = []
    for seed, shift in ((0, 0.0), (1, 0.4)):  # seed 1 is better for every method: paired out
        recs += [_record("bn", 2, 80.0 + shift, seed), _record("bn", 16, 97.0 + shift, seed),
                 _record("gn", 2, 97.5 + shift, seed), _record("gn", 16, 97.5 + shift, seed),
                 _record("frn", 2, 97.4 + shift, seed), _record("frn", 16, 96.0 + shift, seed),
                 _record("bgn-auto", 2, 96.0 + shift, seed),
                 _record("bgn-auto", 16, 97.45 + shift, seed)]
    recs.append(_record("evonorm-b0", 2, 0.0, 0, status="diverged"))
    text = N.report_normalizers(recs, tmp_path)
    assert (tmp_path / "normalizers.png").read_bytes()[:4] == b"\x89PNG"
    assert "![accuracy vs per-worker batch by normalizer](normalizers.png)" in text
    table = _table(text)
    assert table["method \\ examples per worker"] == ["16", "2"]
    assert table["BN"] == ["97.20 ± 2.54", "80.20 ± 2.54"]
    assert table["EvoNorm-B0"] == ["?", "-"]
    assert table["*BGN's G (paper)*"] == ["64", "1"]
    assert table["*BGN's G (policy, per layer)*"] == ["1,4", "1,4"]
    assert ("❔ **One method is best at 2 examples per worker** — *inconclusive*. 2 methods are "
            "not distinguishable from the best. Best within noise at batch 2: GN 97.70 (+0.00), "
            "FRN+TLU 97.60 (-0.10); below: BGN (policy's G) 96.20 (-1.50), BN 80.20 (-17.50); "
            "diverged: EvoNorm-B0") in text
    assert ("**One method is best at 16 examples per worker** — *inconclusive*. 2 methods are "
            "not distinguishable from the best. Best within noise at batch 16: GN 97.70 "
            "(+0.00), BGN (policy's G) 97.65 (-0.05); below: BN 97.20 (-0.50), FRN+TLU 96.20 "
            "(-1.50); not run: EvoNorm-B0") in text
    assert ("❌ **BGN with the policy's G is within noise of the best at every batch size** — "
            "*did not hold*. batch 16: 97.65 vs the best (GN) 97.70; batch 2: 96.20 vs the best "
            "(GN) 97.70; outside the noise at 2") in text
    assert N.report_normalizers([], tmp_path).endswith("No results yet.\n")


def test_report_does_not_judge_a_batch_size_with_a_cell_still_improving(tmp_path):
    recs = [_record("bn", 2, 80.0), _record("gn", 2, 97.5, rising=True),
            _record("bn", 16, 97.0), _record("gn", 16, 97.5), _record("bgn-auto", 16, 97.4)]
    text = N.report_normalizers(recs, tmp_path)
    assert "**One method is best at 2 examples per worker** — *not judged*" in text
    assert "GN at batch 2 (seed 0: the training loss fell 0.400 -> 0.300" in text
    assert "97.50 ‡" in _table(text)["GN"][1]
    assert "**One method is best at 16 examples per worker** — *inconclusive*" in text
    assert ("**BGN with the policy's G is within noise of the best at every batch size** — "
            "*not judged*. Batch size(s) 2 have cells") in text


def test_best_within_noise_pairs_over_seeds():
    # unpaired, a and b overlap; paired, a is 1.0 above b on every seed
    a = Summary((90.0, 95.0, 99.0), seeds=(0, 1, 2))
    b = Summary((89.0, 94.0, 98.0), seeds=(0, 1, 2))
    assert N.best_within_noise({"a": a, "b": b}, tol=0.5) == ("a", ["a"], ["b"], [])
    assert N.best_within_noise({"a": a, "b": b}, tol=1.0) == ("a", ["a", "b"], [], [])
    assert N.best_within_noise({"x": Summary((), diverged=1)}, tol=1.0) is None


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    assert main(["reproduce", "--task", "normalizers", "--preset", "smoke", "--out", str(out),
                 "--jobs", "1", "--threads", "1"]) == 0
    report = (out / "report.md").read_text()
    assert "## Which normalizer at which per-worker batch (digits)" in report
    assert "### Best within noise, per batch size" in report
    assert (out / "normalizers.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 14  # 5 batch-dependent methods x 2 batch sizes + 4 per-example
    assert {N.method_of(r["config"]) for r in records} == set(N.METHODS)


def test_adjusted_groups_note_names_the_default_groups_it_capped():
    from bgnorm.repro.tasks.classify import _adjusted_note

    cells = get_task("normalizers").cells("quick", {"seeds": [0]})
    evo = next(c for c in cells if N.method_of(c) == "evonorm-s0")
    auto = next(c for c in cells if N.method_of(c) == "bgn-auto")
    # EvoNorm-S0's default 32 groups on the 16-channel stage: 16 groups there
    layers = [[16, [16, 16], 16]] * 3 + [[32, [8, 8], 32]] * 3 + [[64, [4, 4], 32]] * 3
    note = _adjusted_note([
        Record("e", evo, "ok", {"acc": 97.0, "groups_adjusted": 3, "layers": layers}, 1.0),
        Record("a", auto, "ok", {"acc": 97.0, "groups_adjusted": 0, "layers": layers}, 1.0)])
    assert "EvoNorm-S0 G=32 -> 16" in note and "None" not in note
