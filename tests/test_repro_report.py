"""Tests for the report: helpers, the paper-format tables, plots and claim checks."""

from __future__ import annotations

import doctest
import math

import pytest

import bgnorm.repro.report as R
from bgnorm.repro.api import Record
from bgnorm.repro.report import Summary, fmt_summary, markdown_table, summarize
from bgnorm.repro.runner import render_report
from bgnorm.repro.store import ResultStore, cell_id, store_path
from bgnorm.repro.tasks.classify import (
    cells_batch_size,
    cells_g_sweep,
    cells_groups,
    report_batch_size,
    report_g_sweep,
    report_groups,
)

N_TEST = 10_000  # many test images: a 1 pp gap is well outside the noise (±0.3 pp)


def test_docstring_examples():
    result = doctest.testmod(R, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_markdown_table_alignment_and_errors():
    text = markdown_table(["a", "bb"], [["x", "1"], ["yyyy", "22"]], align="lc")
    lines = text.splitlines()
    assert lines[0].startswith("| a    | ") and lines[1] == "| :--- | :-: |"
    assert lines[3].startswith("| yyyy | ") and lines[3].replace(" ", "") == "|yyyy|22|"
    with pytest.raises(ValueError):
        markdown_table(["a"], [["1", "2"]])


def test_summaries_and_cell_format():
    recs = [Record("a", {"k": 1}, "ok", {"acc": 90.0}, 1), Record("b", {"k": 1}, "ok",
                                                                   {"acc": 92.0}, 1),
            Record("c", {"k": 2}, "diverged", {}, 1), Record("d", {"k": 3}, "ok",
                                                             {"acc": float("nan")}, 1)]
    s = summarize(recs, lambda r: r.config["k"])
    assert s[1].mean == 91.0 and s[1].n == 2
    # mean ± the 95% t-interval over seeds: t(1) * sd / sqrt(2) = 12.706 * 1.414 / 1.414
    assert fmt_summary(s[1]) == "91.00 ± 12.71"
    assert fmt_summary(s[2]) == "-"
    assert fmt_summary(s[3]) == "n/t"  # finished with a NaN accuracy: did not train, not diverged
    assert s[3].untrained == ("seed ?: acc is nan, not a finite number",)
    assert fmt_summary(None) == "?"
    assert fmt_summary(Summary((90.0,), diverged=1)) == "90.00 †(1 -)"
    multi = summarize(recs[:1], lambda r: [("x", 1), ("x", 2)])
    assert set(multi) == {("x", 1), ("x", 2)}


def test_summarize_judges_each_record_once(monkeypatch):
    """summarize asks training_problem once per record (convergence asks it, and summarize
    reads the reason from there), and its summaries are those of the two questions asked
    separately."""
    cfg = {"norm": "bn", "batch_size": 2}
    recs = [Record("a", {**cfg, "seed": 0}, "ok", {"acc": 90.0, "n_test": 100, "steps": 5}, 1),
            Record("b", {**cfg, "seed": 1}, "ok", {"acc": 9.0, "steps": 0}, 1),
            Record("c", {**cfg, "seed": 2}, "diverged", {}, 1),
            Record("d", {**cfg, "seed": 3}, "ok", {"acc": float("inf"), "steps": 3}, 1),
            _curved({**cfg, "seed": 4}, [60, 70, 80, 90], [1.0, 0.8, 0.6, 0.4]),
            _curved({**cfg, "seed": 5}, [26.6, 21.5, 17.8, 28.6, 21.2, 29.5],
                    [2.28, 2.22, 2.29, 2.07, 2.24, 2.09], num_classes=10,
                    loss="cross-entropy")]
    calls = []
    ask = R.training_problem
    monkeypatch.setattr(R, "training_problem", lambda r, m="acc": (calls.append(r.cell_id),
                                                                   ask(r, m))[1])
    got = R.summarize(recs, lambda r: "bn")["bn"]
    ok = [r for r in recs if r.status == "ok"]
    assert sorted(calls) == sorted(r.cell_id for r in ok)  # once each (a diverged one: never)
    trained = [r for r in ok if ask(r) is None]
    assert got.values == tuple(float(r.result["acc"]) for r in trained)
    assert got.diverged == 1
    assert got.untrained == tuple(f"seed {r.config['seed']}: {ask(r)}" for r in ok
                                  if ask(r) is not None)
    assert [w.split(":")[0] for w in got.unconverged] == ["seed 4"]
    assert [w.split(":")[0] for w in got.unfit] == ["seed 5"]


def test_difference_tolerance():
    assert R.difference_tolerance(98.0, 1000) == pytest.approx(1.227, abs=1e-3)
    assert R.difference_tolerance(100.0, 1000) > 0  # never zero noise
    assert R.difference_tolerance(50.0, 0) == float("inf")


def test_line_plot_writes_png(tmp_path):
    path = R.line_plot(tmp_path / "p.png", {"BN": [(2, 90.0), (32, 95.0)], "GN": [(2, None),
                                                                               (32, 94.0)]},
                       xlabel="batch", ylabel="acc", descending_x=True)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _records(configs, acc_fn, n_test=N_TEST):
    out = []
    for cfg in configs:
        acc = acc_fn(cfg)
        status = "diverged" if acc is None else "ok"
        result = {"acc": acc, "n_test": n_test, "layers": [[16, [8, 8], cfg.get("num_groups")]],
                  "groups_adjusted": 0} if acc is not None else {"error": "non-finite loss"}
        out.append(Record(cell_id(cfg), cfg, status, result, 1.0))
    return out


def _paper_like(cfg):
    """Accuracies shaped like the BGN paper's Table 2."""
    norm = cfg["norm"]
    b = min(cfg.get("covers_batch_sizes") or [cfg["batch_size"]])
    if norm == "bn":
        return 76.0 if b >= 8 else 66.0
    if norm == "bgn":
        return 77.0
    if norm == "pn":
        return None  # diverged
    return 74.0


#: The paper's seven batch sizes (at 128 examples per step), one seed: the reports' layouts.
PAPER_GRID = {"batch_sizes": [128, 64, 32, 16, 8, 4, 2], "seeds": [0],
              "set": {"total_batch": 128}}


def test_batch_size_report_paper_layout_and_claims_held(tmp_path):
    configs = cells_batch_size("quick", PAPER_GRID)
    text = report_batch_size(_records(configs, _paper_like), tmp_path)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| norm"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "norm", "128", "64", "32", "16", "8", "4", "2"]
    bn = next(line for line in lines if line.startswith("| BN "))
    assert "76.00" in bn and "66.00" in bn
    pn = next(line for line in lines if line.startswith("| PN "))
    assert pn.count(" - ") == 7  # diverged, shown as "-" like the paper
    for row in ("*virtual workers W*", "*examples / step*", "*learning rate*", "*BGN's G*"):
        assert row in text
    g_row = next(line for line in lines if line.startswith("| *BGN's G*"))
    assert [c.strip() for c in g_row.strip("|").split("|")][1:] == [
        "512", "256", "128", "64", "16", "2", "1"]
    assert "✅ **BN degrades at small batch sizes** — *held*" in text
    assert "✅ **BGN is stable across batch sizes** — *held*" in text
    assert "✅ **BGN beats the other norms at every batch size** — *held*" in text
    assert (tmp_path / "batch-size.png").is_file()


def test_batch_size_claims_not_hardcoded(tmp_path):
    configs = cells_batch_size("quick", PAPER_GRID)

    def flat_bn_bad_bgn(cfg):
        b = min(cfg.get("covers_batch_sizes") or [cfg["batch_size"]])
        if cfg["norm"] == "bgn":
            return 70.0 if b <= 4 else 75.0
        return 76.0

    text = report_batch_size(_records(configs, flat_bn_bad_bgn), tmp_path)
    assert "❌ **BN degrades at small batch sizes** — *did not hold*" in text
    assert "❌ **BGN is stable across batch sizes** — *did not hold*" in text
    assert "❌ **BGN beats the other norms at every batch size** — *did not hold*" in text
    only_bn = [c for c in configs if c["norm"] == "bn"]
    partial = report_batch_size(_records(only_bn[:3], flat_bn_bad_bgn), tmp_path)
    assert "not tested" in partial  # claims that need missing cells are not judged
    some_bgn = only_bn + [c for c in configs if c["norm"] == "bgn"][:2]
    gaps = report_batch_size(_records(some_bgn, flat_bn_bad_bgn), tmp_path)
    bgn_row = next(line for line in gaps.splitlines() if line.startswith("| BGN "))
    assert bgn_row.count("?") == 5  # cells not run yet (e.g. another shard)


def test_g_sweep_report_and_claim(tmp_path):
    configs = cells_g_sweep("quick", {**PAPER_GRID, "groups": [512, 128, 32, 8, 2, 1]})
    assert {c["batch_size"] for c in configs} == {128, 2} and len(configs) == 12

    def shaped(cfg):  # large G best at large batch, small G at small batch
        g, b = cfg["num_groups"], cfg["batch_size"]
        return 80.0 - abs((9 if b == 128 else 1) - g.bit_length()) * 0.8

    text = report_g_sweep(_records(configs, shaped), tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("| batch size"))
    assert "512" in header and header.rstrip(" |").endswith("1")
    assert "**80.00**" in text  # the paper's G (512 at 128) is marked
    assert "✅ **Large G is best at large batch sizes, small G at small batch sizes** — *held*" \
        in text
    reversed_text = report_g_sweep(
        _records(configs, lambda c: shaped({**c, "batch_size": 2 if c["batch_size"] == 128
                                            else 128})), tmp_path)
    assert "*did not hold*" in reversed_text
    assert (tmp_path / "g-sweep.png").is_file()


def test_groups_report_gn_paper_layout(tmp_path):
    configs = cells_groups("quick", PAPER_GRID)

    def shaped(cfg):
        if cfg["norm"] == "none":
            return 60.0
        if cfg["norm"] == "bn":
            return 76.0
        g = cfg.get("gn_groups")
        k = cfg.get("gn_channels_per_group")
        return 74.0 if (g == 1 or k == 1) else 75.5

    text = report_groups(_records(configs, shaped), tmp_path)
    assert "| # groups (G)" in text and "1 (=LN)" in text and "1 (=IN)" in text
    assert "top-1 error (%)" in text and "Δ to best" in text
    assert "✅ **Intermediate group counts beat both extremes, LN and IN** — *held*" in text
    assert "✅ **Normalization helps" in text
    assert (tmp_path / "groups.png").is_file()


def test_render_report_merges_shards(tmp_path):
    configs = cells_batch_size("smoke", {})
    recs = _records(configs, _paper_like)
    for i, rec in enumerate(recs):
        ResultStore(store_path(tmp_path, (i % 2 + 1, 2))).append(rec)
    text = render_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    assert f"{len(recs)} cells recorded" in text
    assert "## Accuracy vs batch size" in text
    assert "?" not in text.split("### Claims")[0].split("| BN")[1].splitlines()[0]


def _untrained(cfg, which):
    """A record of ``cfg`` that finished without training (0 steps, NaN accuracy)."""
    return Record(cell_id(cfg), cfg, "ok", {"acc": float("nan"), "steps": 0, "n_test": N_TEST,
                                            "layers": [], "groups_adjusted": 0}, 0.1)


def _claim(text, name):
    return next(line for line in text.splitlines() if f"**{name}" in line)


def test_training_problem_finds_cells_that_did_not_train():
    cfg = {"seed": 1}

    def rec(status="ok", **result):
        return Record("x", cfg, status, {"n_test": 1000, **result}, 1.0)

    assert R.training_problem(rec(acc=90.0, steps=10)) is None
    assert "no training steps" in R.training_problem(rec(acc=10.0, steps=0))
    assert "not a finite number" in R.training_problem(rec(acc=float("nan"), steps=10))
    assert "not a finite number" in R.training_problem(rec(steps=10))  # no metric at all
    assert R.training_problem(rec("diverged", error="non-finite loss")) is None  # a result
    # At chance (10 classes) with a loss that never left ln(10) = 2.303: did not train.
    flat = rec(acc=10.5, steps=100, num_classes=10, train_losses=[2.31, 2.305, 2.304])
    assert "at chance" in R.training_problem(flat)
    # The same accuracy with a falling loss is a result (e.g. a norm that overfits).
    assert R.training_problem(rec(acc=10.5, steps=100, num_classes=10,
                                  train_losses=[2.31, 1.2, 0.4])) is None
    # A flat loss above chance accuracy is a result too.
    assert R.training_problem(rec(acc=40.0, steps=100, num_classes=10,
                                  train_losses=[2.31, 2.30])) is None


def test_claims_are_never_judged_on_cells_that_did_not_train(tmp_path):
    # BN at batch 2 finished without a training step (e.g. --epochs 0): before, its NaN
    # accuracy counted as a divergence and "BN degrades at small batch" was judged "held".
    configs = cells_batch_size("smoke", {})
    recs = [_untrained(c, "bn2") if c["norm"] == "bn" and c["batch_size"] == 2 else r
            for c, r in zip(configs, _records(configs, _paper_like))]
    text = report_batch_size(recs, tmp_path)
    bn_claim = _claim(text, "BN degrades")
    assert "*not judged*" in bn_claim and "diverged" not in bn_claim
    assert "BN at batch 2 (seed 0: no training steps (steps = 0))" in bn_claim
    assert "*not judged*" in _claim(text, "BGN beats")  # needs every norm's cells
    assert "*held*" in _claim(text, "BGN is stable")  # BGN's own cells all trained
    bn_row = next(line for line in text.splitlines() if line.startswith("| BN "))
    assert bn_row.rstrip(" |").endswith("n/t") and "did not train" in text

    # Every cell untrained (0 epochs): no claim of any task is judged.
    nothing = [_untrained(c, "all") for c in configs]
    text = report_batch_size(nothing, tmp_path)
    assert text.count("*not judged*") == 3 and "*held*" not in text
    g_configs = cells_g_sweep("smoke", {})
    text = report_g_sweep([_untrained(c, "all") for c in g_configs], tmp_path)
    assert "*not judged*" in text and "*held*" not in text and "did not hold" not in text
    groups = cells_groups("smoke", {})
    text = report_groups([_untrained(c, "all") for c in groups], tmp_path)
    assert text.count("*not judged*") == 2 and "diverged" not in text.split("### Claims")[1]


def test_adversarial_claim_not_judged_on_untrained_cells(tmp_path):
    from bgnorm.repro.tasks.adversarial import cells_adversarial, report_adversarial

    configs = cells_adversarial("smoke", {})
    untrained = [Record(cell_id(c), c, "ok", {"clean_acc": 11.0, "robust_acc": 9.0 + i,
                                              "acc": 9.0 + i, "n_test": 64, "steps": 0}, 0.1)
                 for i, c in enumerate(configs)]
    text = report_adversarial(untrained, tmp_path)
    assert "*not judged*" in text and "no training steps" in text
    assert "n/t" in text and "held" not in text


# --------------------------------------------------------------------------------------------
# Learning curves: convergence flags, claim gating, plots
# --------------------------------------------------------------------------------------------


def _curved(cfg, accs, losses, n_test=N_TEST, **result):
    """A record whose learning curve has ``accs``/``losses`` at evenly spaced points."""
    curve = [{"stage": "train", "step": 10 * (i + 1), "epoch": i + 1,
              "progress": (i + 1) / len(accs), "metric": a, "train_loss": l}
             for i, (a, l) in enumerate(zip(accs, losses, strict=True))]
    return Record(cell_id(cfg), cfg, "ok", {"acc": accs[-1], "n_test": n_test, "steps": 10
                                            * len(accs), "curve": curve, **result}, 1.0)


def test_convergence_flags_each_case():
    cfg = {"seed": 0, "norm": "bn", "batch_size": 32}
    # flat metric (within ±0.4 pp noise at 10,000 images) and loss: converged
    flag, why = R.convergence(_curved(cfg, [80, 90, 95.0, 95.2], [1.0, 0.5, 0.30, 0.29]))
    assert flag == R.CONVERGED and "noise" in why
    # the metric rose 2 pp over the last quarter, more than its noise
    flag, why = R.convergence(_curved(cfg, [80, 90, 93.0, 95.0], [1.0, 0.5, 0.30, 0.29]))
    assert flag == R.STILL_IMPROVING and "metric rose +2.00 pp" in why
    # the same rise on 100 test images is within the noise (±4.3 pp): converged
    assert R.convergence(_curved(cfg, [80, 90, 93.0, 95.0], [1.0, 0.5, 0.30, 0.29],
                                 n_test=100))[0] == R.CONVERGED
    # flat metric but the last quarter holds 11% of the loss's whole fall (0.09 of 0.79)
    flag, why = R.convergence(_curved(cfg, [80, 90, 95.0, 95.0], [1.0, 0.5, 0.30, 0.21]))
    assert flag == R.STILL_IMPROVING and "11% of its whole fall (1.000 -> 0.210)" in why
    # a small loss annealing at the end (0.025 -> 0.016: a 36% relative fall) is 2% of the
    # fall from 0.5: flattened
    flag, why = R.convergence(_curved(cfg, [96, 97.0, 97.1, 97.2], [0.5, 0.1, 0.025, 0.016]))
    assert flag == R.CONVERGED and "2% of its whole fall" in why
    # at chance (10 classes) with a flat loss, read from the curve
    flag, why = R.convergence(_curved(cfg, [10.1, 9.9, 10.0, 10.0], [2.31, 2.31, 2.305, 2.304],
                                      num_classes=10))
    assert flag == R.DID_NOT_TRAIN and "at chance" in why
    # an episodic metric's noise is its 95% interval over episodes (``ci``)
    rec = _curved(cfg, [50, 60, 61.0, 63.0], [1.0, 0.5, 0.30, 0.29], n_test=None)
    for p in rec.result["curve"]:
        p["ci"] = 2.5
    assert R.convergence(rec)[0] == R.CONVERGED
    for p in rec.result["curve"]:
        p["ci"] = 1.5
    assert R.convergence(rec)[0] == R.STILL_IMPROVING
    # a record from before learning curves were stored, or a diverged one: not measured
    old = Record("o", cfg, "ok", {"acc": 91.0, "n_test": N_TEST, "steps": 30}, 1.0)
    assert R.convergence(old) == (R.NOT_MEASURED, "no learning curve in the record")
    assert R.convergence(Record("d", cfg, "diverged", {}, 1.0))[0] == R.NOT_MEASURED


def test_convergence_judges_the_fit_loss_where_the_training_loss_adds_terms():
    # CAN: the training loss is cross-entropy + CDD, and the CDD keeps falling (0.9 -> 0.6
    # over the last quarter, 27% of its whole fall) after the accuracy and the cross-entropy
    # have settled
    cfg = {"seed": 0, "norm": "bn", "method": "can"}
    rec = _curved(cfg, [80, 90, 95.0, 95.2], [2.0, 1.2, 0.9, 0.6], num_classes=10)
    assert R.convergence(rec)[0] == R.STILL_IMPROVING
    for p, fit in zip(rec.result["curve"], [1.0, 0.3, 0.12, 0.11], strict=True):
        p["fit_loss"] = fit
    flag, why = R.convergence(rec)
    assert flag == R.CONVERGED and "training cross-entropy (fit_loss) 0.120 -> 0.110" in why
    # the cross-entropy still falling is still improving, said so
    rec.result["curve"][-1]["fit_loss"] = 0.02
    flag, why = R.convergence(rec)
    assert flag == R.STILL_IMPROVING and "training cross-entropy (fit_loss) fell" in why
    # a cross-entropy above half a uniform guess's did not fit, though the record's training
    # loss is not a plain cross-entropy (no result["loss"])
    for p, fit in zip(rec.result["curve"], [2.3, 2.0, 1.9, 1.9], strict=True):
        p["fit_loss"] = fit
    flag, why = R.convergence(rec)
    assert flag == R.DID_NOT_FIT and "training cross-entropy ended at 1.900" in why
    # a curve with fit_loss on some points only (e.g. resumed from an older record) is judged
    # on the training loss
    del rec.result["curve"][0]["fit_loss"]
    assert R.convergence(rec)[0] == R.STILL_IMPROVING


def test_only_the_last_stage_of_a_curve_is_judged():
    cfg = {"seed": 0, "norm": "bn", "batch_size": 16}
    rec = _curved(cfg, [80, 90, 95.0, 95.2], [1.0, 0.5, 0.30, 0.29])
    search = [{"stage": "search", "step": i, "progress": i / 4, "metric": 10.0 * i,
               "train_loss": 3.0 / i} for i in range(1, 5)]
    rec.result["curve"] = search + rec.result["curve"]
    assert R.convergence(rec)[0] == R.CONVERGED


def test_claims_are_judged_on_converged_cells_only(tmp_path):
    configs = cells_batch_size("smoke", {})

    recs = _records(configs, _paper_like)
    for r in recs:
        if r.status != "ok":
            continue
        acc = r.result["acc"]
        if r.config["norm"] == "bgn" and r.config["batch_size"] == 2:  # still rising
            r.result.update(_curved(r.config, [acc - 9, acc - 6, acc - 3, acc],
                                    [1.0, 0.8, 0.6, 0.5]).result)
        else:
            r.result.update(_curved(r.config, [acc - 9, acc - 1, acc - 0.05, acc],
                                    [1.0, 0.5, 0.3, 0.3]).result)
    text = report_batch_size(recs, tmp_path)
    claim = _claim(text, "BGN is stable")
    assert "*not judged*" in claim and "Cells still improving" in claim
    assert "BGN at batch 2 (seed 0: the metric rose +3.00 pp" in claim
    assert "*held*" in _claim(text, "BN degrades")  # BN's cells all converged
    bgn_row = next(line for line in text.splitlines() if line.startswith("| BGN"))
    assert "‡" in bgn_row


def test_fmt_summary_marks_a_cell_still_improving():
    s = Summary((90.0,), unconverged=("seed 0: the training loss fell 30%",))
    assert fmt_summary(s) == "90.00 ‡"
    assert R.not_judged("c", {"BN": s}).verdict == R.NOT_JUDGED
    assert R.not_judged("c", {"BN": Summary((90.0,))}) is None


def test_curves_section_draws_one_png_and_states_the_criterion(tmp_path):
    recs = [_curved({"seed": 0, "norm": n, "batch_size": b, "task": "t"},
                    [50, 70, 80, 80.1], [1.0, 0.5, 0.3, 0.3])
            for n in ("bn", "gn") for b in (2, 32)]
    recs.append(Record("old", {"seed": 0, "norm": "ln", "batch_size": 2}, "ok",
                       {"acc": 70.0, "n_test": N_TEST, "steps": 3}, 1.0))  # old format
    text = R.curves_section("t", recs, tmp_path)
    png = tmp_path / "curves_t.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![learning curves of t](curves_t.png)" in text
    assert R.CONVERGENCE_CRITERION in text
    assert "4 converged, 1 not measured" in text and "no learning curve in the record" in text


def test_t_interval_and_paired_differences_over_seeds():
    assert R.t_quantile(2) == 4.303 and abs(R.t_quantile(30) - 2.042) < 1e-9
    assert abs(R.t_quantile(31) - 2.0395) < 0.001 and abs(R.t_quantile(60) - 2.0003) < 0.001
    assert abs(R.t_quantile(10**6) - 1.96) < 1e-3
    s = Summary((90.0, 91.0, 92.0))
    assert s.half_width == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert fmt_summary(s) == "91.00 ± 2.48"

    def rec(norm, seed, acc, status="ok"):
        return Record(f"{norm}{seed}", {"norm": norm, "seed": seed}, status, {"acc": acc}, 1.0)

    # seeds differ a lot (data order), the norms by a steady 1 pp: pairing sees it clearly
    a = [rec("bgn", s, 80.0 + 5 * s + 1.0) for s in range(4)]
    b = [rec("bn", s, 80.0 + 5 * s) for s in range(4)]
    d = R.paired_difference(a, b)
    assert (d.mean, d.half_width, d.n) == (1.0, 0.0, 4)
    unpaired = Summary(tuple(r.result["acc"] for r in a)).half_width
    assert unpaired > 5  # the unpaired intervals overlap entirely
    # only the seeds both cells ran, without diverged runs
    b[3] = rec("bn", 3, float("nan"), status="diverged")
    assert R.paired_difference(a, b).n == 3
    assert R.paired_difference(a, [rec("bn", 9, 1.0)]) is None
    assert str(R.paired_difference(a[:1], b[:1])) == "+1.00 pp (one seed)"


def test_claims_noise_is_paired_over_seeds():
    """A seed effect shared by every cell cancels in paired differences: two cells 1 pp apart
    at both seeds, with seeds 5 pp apart, have no training noise left (the unpaired
    seed-to-seed spread would have made the tolerance about 7 pp)."""
    a = R.Summary((90.0, 95.0), seeds=(0, 1))
    b = R.Summary((89.0, 94.0), seeds=(0, 1))
    assert a.minus(b) == 1.0
    assert R.seed_residual([a, b]) == (0.0, 1, 2)
    tol, text = R.noise_level([a, b], 10_000)
    assert tol == R.difference_tolerance(92.5, 10_000)  # at the best mean
    assert "paired over 2 seeds" in text and "t(1)" in text
    # independent noise does not cancel: cells that swap order between seeds
    c = R.Summary((95.0, 89.0), seeds=(0, 1))
    sigma, df, n = R.seed_residual([b, c])
    assert (df, n) == (1, 2) and sigma == pytest.approx(5.5)
    tol, _ = R.noise_level([b, c], 10_000)
    assert tol == pytest.approx(R.t_quantile(1) * sigma * math.sqrt(2 / 2))
    # summarize keeps each value's seed, so claims can pair them
    cfg = {"norm": "bn", "batch_size": 2}
    recs = [Record(f"r{s}", {**cfg, "seed": s}, "ok", {"acc": v, "n_test": 100, "steps": 5},
                   1.0) for s, v in ((1, 80.0), (0, 70.0))]
    summary = R.summarize(recs, lambda r: "bn")["bn"]
    assert summary.by_seed() == {1: 80.0, 0: 70.0}


def test_training_noise_comes_from_the_converged_cells():
    """A collapsed cell (10 and 35% over two seeds) or one still improving spreads by another
    regime than the settled cells' run-to-run noise; pooled, it inflated the tolerance of every
    claim (the mechanism study: sigma 4.3 pp instead of 0.4)."""
    settled = [R.Summary((97.0 + d, 97.4 + d), seeds=(0, 1)) for d in (0.0, 0.3, -0.2)]
    settled.append(R.Summary((96.9, 97.1), seeds=(0, 1)))
    sigma, df, _ = R.seed_residual(settled)
    tol, text = R.noise_level(settled, 100_000)
    collapsed = R.Summary((10.0, 35.0), seeds=(0, 1), unfit=("seed 0: ...", "seed 1: ..."))
    moving = R.Summary((73.4, 96.1), seeds=(0, 1), unconverged=("seed 0: ...",))
    assert R.seed_residual([*settled, collapsed])[0] > 10 * sigma
    tol2, text2 = R.noise_level([*settled, collapsed, moving], 100_000)
    assert tol2 == pytest.approx(tol) and text2 != text
    assert "from the converged cells: 2 cell(s) still improving or that did not fit are left " \
           "out" in text2
    # with no settled cell of two seeds, every cell counts (and nothing is said left out)
    one_seed = R.Summary((97.0,), seeds=(0,))
    tol3, text3 = R.noise_level([one_seed, moving], 100_000)
    assert tol3 == pytest.approx(R.t_quantile(1) * R.seed_residual([moving])[0])
    assert "left out" not in text3


def test_a_cell_that_did_not_fit_is_a_result_not_a_run_cut_short():
    """The mechanism study's BN at 2 values per statistic: its test accuracy jumps between
    evaluations and its cross-entropy stays near a uniform guess's (2.09 of 2.30 after 45
    epochs). It is flagged *did not fit*, judged (its number stands, marked), not *still
    improving* (which would leave every claim about it unjudged forever)."""
    cfg = {"seed": 0, "norm": "bn", "batch_size": 2}
    accs, losses = [26.6, 21.5, 17.8, 28.6, 21.2, 29.5], [2.28, 2.22, 2.29, 2.07, 2.24, 2.09]
    rec = _curved(cfg, accs, losses, num_classes=10, loss="cross-entropy")
    flag, why = R.convergence(rec)
    assert flag == R.DID_NOT_FIT and "ended at 2.090, above 0.5 ln 10 = 1.151" in why
    s = R.summarize([rec], lambda r: "bn")["bn"]
    assert s.unfit and not s.unconverged and R.fmt_summary(s) == "29.50 §"
    assert R.not_judged("BN fails", {"BN at b=2": s}) is None
    # a loss that is not the labels' cross-entropy (PGD's, CAN's) is never judged this way
    other = _curved(cfg, accs, losses, num_classes=10)
    assert R.convergence(other)[0] == R.STILL_IMPROVING
    # a cell that fits is judged as before
    fits = _curved(cfg, [96, 97.0, 97.1, 97.2], [0.5, 0.1, 0.025, 0.016], num_classes=10,
                   loss="cross-entropy")
    assert R.convergence(fits)[0] == R.CONVERGED


def test_groups_claims_pair_over_seeds_and_respect_convergence(tmp_path):
    """The GN group study's claims used to drop each seed's identity and its convergence
    flag: with 3 seeds they said "one seed", and a cell still improving was judged."""
    configs = cells_groups("quick", {**PAPER_GRID, "seeds": [0, 1, 2]})

    def shaped(cfg):
        if cfg["norm"] == "none":
            return 60.0 + cfg["seed"]
        if cfg["norm"] == "bn":
            return 76.0 + cfg["seed"]
        g, k = cfg.get("gn_groups"), cfg.get("gn_channels_per_group")
        return (74.0 if (g == 1 or k == 1) else 75.5) + cfg["seed"] + 0.1 * (g or k or 0) % 3

    recs = _records(configs, shaped)
    for r in recs:
        acc = r.result["acc"]
        r.result.update(_curved(r.config, [acc - 9, acc - 1, acc - 0.05, acc],
                                [1.0, 0.5, 0.3, 0.3]).result)
    text = report_groups(recs, tmp_path)
    claim = _claim(text, "Intermediate group counts")
    assert "paired over 3 seeds" in claim and "one seed" not in claim
    for r in recs:  # GN with G=8, seed 1: still rising at the end
        if r.config.get("gn_groups") == 8 and r.config["seed"] == 1:
            acc = r.result["acc"]
            r.result.update(_curved(r.config, [acc - 9, acc - 6, acc - 3, acc],
                                    [1.0, 0.8, 0.6, 0.5]).result)
    text = report_groups(recs, tmp_path)
    claim = _claim(text, "Intermediate group counts")
    assert "*not judged*" in claim and "GN with G=8 (seed 1" in claim


def test_seed_residual_is_not_cut_by_one_cell_that_lost_a_seed():
    """Fifteen cells with seeds 0, 1, 2 and one whose seed 0 diverged: the residual comes from
    the 3 seeds (df 28), not from the 2 seeds all sixteen share (df 15)."""
    full = [R.Summary((90.0 + i, 91.0 + i, 89.5 + i + 0.1 * (i % 3)), seeds=(0, 1, 2))
            for i in range(15)]
    short = R.Summary((91.0, 89.0), seeds=(1, 2), diverged=1)
    sigma, df, n = R.seed_residual(full + [short])
    assert (df, n) == (28, 3)
    assert R.seed_residual([full[0], short]) == R.seed_residual([short, full[0]])


def test_groups_claims_do_not_count_an_extreme_as_intermediate(tmp_path):
    """On a network of 16-64 channels GN with G = 64 is capped to one channel per group in
    every layer: it is IN, and must not be "the best intermediate group count"."""
    configs = cells_groups("quick", {**PAPER_GRID, "gn_groups": [64, 8, 1],
                                     "gn_channels_per_group": [64, 1]})

    def layers_of(cfg):
        chans = [16, 32, 64]
        g, k = cfg.get("gn_groups"), cfg.get("gn_channels_per_group")
        return [[c, [8, 8], (min(g, c) if g else max(1, c // k))] for c in chans]

    def shaped(cfg):
        if cfg["norm"] != "gn":
            return 90.0
        g, k = cfg.get("gn_groups"), cfg.get("gn_channels_per_group")
        return 98.0 if (g == 64 or k == 1) else 97.5 if g == 8 else 97.0

    recs = _records(configs, shaped)
    for r in recs:
        if r.config["norm"] == "gn":
            r.result["layers"] = layers_of(r.config)
    text = report_groups(recs, tmp_path)
    assert "G = 64 is IN" in text and "channels per group = 64 is LN" in text
    claim = _claim(text, "Intermediate group counts")
    assert "best intermediate GN (G=8)" in claim and "*did not hold*" in claim
