"""The convergence check as a command: ``--length-factor k`` trains every cell of any task k
times longer (nothing else changed), and ``bgnorm compare RUN LONGER`` matches every cell with
its longer self and says whether it is within the tolerance (issue 14: every quick cell within
1.5 points of 3x its training)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bgnorm.cli import main
from bgnorm.repro.api import Record, Task
from bgnorm.repro.presets import CLASSIFY_PRESETS
from bgnorm.repro.runner import plan_cells, scale_lengths
from bgnorm.repro.tasks.adversarial import ADV_PRESETS
from bgnorm.repro.tasks.base import TASKS, register_task
from bgnorm.repro.tasks.domain import DOMAIN_PRESETS
from bgnorm.repro.tasks.fewshot import FEWSHOT_PRESETS
from bgnorm.repro.tasks.nas import NAS_PRESETS


def _x3(presets, *keys):
    """``--set`` of the quick preset's ``keys`` times 3, spelled out as the docs' 3x runs."""
    return {"set": {k: 3 * presets["quick"][k] for k in keys}}


#: Per task: the preset's lengths times 3, spelled out.
_EXPLICIT_3X = {
    "batch-size": lambda: {"epochs": 3 * CLASSIFY_PRESETS["quick"]["epochs"]},
    "adversarial": lambda: _x3(ADV_PRESETS, "steps", "lr_warmup_steps"),
    "few-shot": lambda: _x3(FEWSHOT_PRESETS, "steps"),
    "domain-adaptation": lambda: _x3(DOMAIN_PRESETS, "warmup_steps", "loop_steps",
                                     "lr_warmup_steps"),
    "nas": lambda: _x3(NAS_PRESETS, "search_steps", "eval_steps"),
    "normalizers": lambda: {"epochs": 3 * CLASSIFY_PRESETS["quick"]["epochs"]},
}


@pytest.mark.parametrize("task", sorted(_EXPLICIT_3X))
def test_length_factor_is_every_length_times_k_and_nothing_else(task):
    base = {"seeds": [0]}
    scaled = plan_cells([task], "quick", {**base, "length_factor": 3})
    explicit = plan_cells([task], "quick", {**base, **_EXPLICIT_3X[task]()})
    assert [cid for cid, _ in scaled] == [cid for cid, _ in explicit]
    plain = plan_cells([task], "quick", base)
    assert not {cid for cid, _ in plain} & {cid for cid, _ in scaled}
    assert plan_cells([task], "quick", {**base, "length_factor": 1}) == plain


def test_length_factor_on_the_mechanism_scales_its_epochs_and_keeps_warmup_epochs():
    plain = dict(plan_cells(["mechanism"], "quick", {}))
    scaled = plan_cells(["mechanism"], "quick", {"length_factor": 3})
    for _, config in scaled:
        assert config["epochs"] == 45 and config["warmup_epochs"] == 1
    assert len(plain) == len(scaled)


def test_scale_lengths_leaves_other_keys_and_non_integers_alone():
    config = {"task": "t", "steps": 10, "lr": 0.1, "warmup_epochs": 1, "epochs": None,
              "eval_steps": True, "runtime": {"steps": 3}}
    assert scale_lengths(config, 2) == {**config, "steps": 20}


def test_length_factor_refuses_a_task_whose_cells_state_no_length():
    name = "no-length-test"
    register_task(Task(name=name, presets=("smoke",), run=lambda c, ctx: {},
                       report=lambda recs, out: "",
                       cells=lambda preset, over: [{"task": name, "seed": 0, "width": 4}]))
    try:
        with pytest.raises(ValueError, match="the no-length-test task's cells state no "
                                             "training length"):
            plan_cells([name], "smoke", {"length_factor": 2})
        assert len(plan_cells([name], "smoke", {})) == 1
    finally:
        TASKS.pop(name, None)


def test_cli_validates_the_factor(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["reproduce", "--task", "nas", "--length-factor", "0", "--out", str(tmp_path),
              "--list"])
    assert "--length-factor" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# bgnorm compare
# --------------------------------------------------------------------------------------------


def _store(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (norm, seed, length, acc, status, curve) in enumerate(rows):
        config = {"task": "adversarial", "norm": norm, "seed": seed, "steps": length,
                  "lr_warmup_steps": length // 10, "batch_size": 64}
        result = {"acc": acc, "n_test": 300, "num_classes": 10, "steps": length}
        if curve is not None:
            result["curve"] = [{"progress": (k + 1) / len(curve), "metric": m, "train_loss": l}
                               for k, (m, l) in enumerate(curve)]
        lines.append(json.dumps({"cell_id": f"{norm}-{seed}-{length}-{i}", "config": config,
                                 "status": status, "result": result, "seconds": 1.0,
                                 "meta": {}}))
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return path


_FLAT = [(90.0, 0.5), (95.0, 0.2), (96.0, 0.1), (96.0, 0.1)]
_CHANCE = [(10.0, 2.303), (10.0, 2.303), (10.0, 2.303), (10.0, 2.303)]


def test_compare_table_verdicts_and_exit_status(tmp_path, capsys):
    run = _store(tmp_path / "q", [("bn", 0, 120, 96.0, "ok", _FLAT),
                                  ("ln", 0, 120, 84.0, "ok", _FLAT),
                                  ("in", 0, 120, 10.0, "ok", _CHANCE),
                                  ("gn", 0, 120, 93.0, "ok", _FLAT)])
    longer = _store(tmp_path / "x3", [("bn", 0, 360, 97.0, "ok", _FLAT),
                                      ("ln", 0, 360, 96.7, "ok", _FLAT),
                                      ("in", 0, 360, 10.0, "ok", _CHANCE),
                                      ("gn", 0, 360, 0.0, "diverged", None)])
    assert main(["compare", str(run), str(longer)]) == 1
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines()
            if line.startswith("| adversarial")}
    assert "-1.00" in rows["BN"] and "within" in rows["BN"]
    assert "-12.70" in rows["LN"] and "**below**" in rows["LN"]
    assert "the same (did not train)" in rows["IN"]
    assert "diverged" in rows["GN"] and "**differs**" in rows["GN"]
    assert ("2 of 4 cells within 1.5 points of the same cell trained longer (3x); worst: LN, "
            "seed 0: -12.70 points.") in out
    # a looser tolerance; only some tasks; every cell within: exit 0
    assert main(["compare", str(run), str(longer), "--tolerance", "13"]) == 1  # GN still differs
    done = _store(tmp_path / "x3b", [("bn", 0, 360, 97.0, "ok", _FLAT),
                                     ("ln", 0, 360, 85.0, "ok", _FLAT),
                                     ("in", 0, 360, 10.0, "ok", _CHANCE),
                                     ("gn", 0, 360, 93.5, "ok", _FLAT)])
    capsys.readouterr()
    assert main(["compare", str(run), str(done)]) == 0
    assert "4 of 4 cells within 1.5" in capsys.readouterr().out
    assert main(["compare", str(run), str(done), "--task", "nas"]) == 1  # nothing compared


def test_compare_names_cells_without_a_longer_run(tmp_path, capsys):
    run = _store(tmp_path / "q", [("bn", 0, 120, 96.0, "ok", _FLAT),
                                  ("bn", 1, 120, 95.0, "ok", _FLAT)])
    longer = _store(tmp_path / "x3", [("bn", 0, 360, 96.5, "ok", _FLAT)])
    assert main(["compare", str(run), str(longer)]) == 1
    out = capsys.readouterr().out
    assert "not run" in out and "1 cell(s) have no longer run" in out
    assert main(["compare", str(run), str(tmp_path / "nothing")]) == 2
    assert "no results*.jsonl store" in capsys.readouterr().err


def test_cli_output_into_a_closed_pipe_is_quiet(tmp_path):
    # `bgnorm reproduce --list | head -1`: the reader goes away; no traceback
    script = ("import sys; from bgnorm.cli import main; "
              "sys.exit(main(['reproduce', '--task', 'g-transfer', '--preset', 'full', "
              f"'--out', {str(tmp_path)!r}, '--list']))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child, still importing, writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141, err
    assert "Traceback" not in err


def test_compare_states_the_noise_of_each_difference(tmp_path, capsys):
    # 300 test images: one measurement near 97% is about ±1.9 points, a difference ±2.7
    run = _store(tmp_path / "q", [("gn", 0, 120, 97.33, "ok", _FLAT),
                                  ("ln", 0, 120, 84.0, "ok", _FLAT)])
    longer = _store(tmp_path / "x3", [("gn", 0, 360, 99.0, "ok", _FLAT),
                                      ("ln", 0, 360, 96.7, "ok", _FLAT)])
    assert main(["compare", str(run), str(longer)]) == 1  # still below 1.5: the rule is kept
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines()
            if line.startswith("| adversarial")}
    assert "**below** (within the noise)" in rows["GN"] and "±2." in rows["GN"]
    assert "**below**" in rows["LN"] and "noise)" not in rows["LN"]  # 12.7: far outside
    assert "1 of the cells below are within the noise of the difference" in out


def test_compare_over_seeds_judges_the_paired_mean(tmp_path, capsys):
    # BN swings by ±6 points between seeds and lengths, but its mean over 4 seeds moves little;
    # LN is 3 points lower at every seed (a tight, real shortfall); PN is lower by 2 on average
    # with a spread that reaches 0; IN did not train at seed 3 in the longer run: that seed
    # drops out of both of its means.
    def seeds(length, accs, curves=None):  # store rows: seed i of each norm gets accs[i]
        return [(norm, seed, length, acc, "ok", (curves or {}).get((norm, seed), _FLAT))
                for norm, values in accs.items() for seed, acc in enumerate(values)]

    run = _store(tmp_path / "q", seeds(120, {
        "bn": [70.0, 82.0, 76.0, 74.0], "ln": [90.0, 91.0, 92.0, 93.0], "pn": [80.0, 84.0],
        "in": [80.0, 81.0, 82.0, 83.0]}))
    longer = _store(tmp_path / "x3", seeds(360, {
        "bn": [76.0, 76.0, 70.0, 81.0], "ln": [93.0, 94.0, 95.0, 96.0], "pn": [81.0, 87.0],
        "in": [80.0, 81.0, 82.0, 10.0]}, curves={("in", 3): _CHANCE}))
    # per seed, BN is 6 points below at seed 0 and 7 at seed 3
    assert main(["compare", str(run), str(longer)]) == 1
    assert "**below**" in capsys.readouterr().out
    assert main(["compare", str(run), str(longer), "--over-seeds"]) == 1  # LN is below
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines()
            if line.startswith("| adversarial")}
    # BN: 75.50 (sd 5, t(3) = 3.182: ±7.96) and 75.75 (sd 4.5: ±7.16); differences -6, +6,
    # +6, -7: mean -0.25, sd 7.228: ±11.50
    cells = [c.strip() for c in rows["BN"].split("|")[3:-1]]
    assert cells == ["4", "75.50 ± 7.96", "75.75 ± 7.16", "-0.25 ± 11.50", "within"]
    # LN: -3 at every seed, sd 0: below, and not within the noise
    assert [c.strip() for c in rows["LN"].split("|")[3:-1]][3:] == ["-3.00 ± 0.00", "**below**"]
    # PN: -1, -3: mean -2, sd 1.414, t(1) = 12.706: ±12.71 reaches 0
    assert "-2.00 ± 12.71" in rows["PN"] and "**below** (within the noise)" in rows["PN"]
    # IN: seeds 0-2 only (seed 3 did not train in the longer run)
    assert [c.strip() for c in rows["IN"].split("|")[3:-1]] == [
        "3", "81.00 ± 2.48", "81.00 ± 2.48", "+0.00 ± 0.00", "within"]
    assert ("2 of 4 cells within 1.5 points of the same cell trained longer (3x), over the "
            "seeds; worst: LN: -3.00 points; 1 of the cells below are within the noise") in out
    # a cell without a longer run is named, and fails the check
    only_bn = _store(tmp_path / "x3c", [("bn", s, 360, 75.0, "ok", _FLAT) for s in range(4)])
    assert main(["compare", str(run), str(only_bn), "--over-seeds"]) == 1
    assert "3 cell(s) have no longer run" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# bgnorm report --longer: the longer run decides a cell's convergence flag
# --------------------------------------------------------------------------------------------

_RISING = [(80.0, 1.0), (85.0, 0.6), (88.0, 0.4), (92.0, 0.3)]


def test_convergence_takes_the_longer_runs_verdict(tmp_path):
    from bgnorm.repro.report import CONVERGED, DID_NOT_FIT, STILL_IMPROVING, convergence
    from bgnorm.repro.store import read_records

    def one(tmp, rows):
        return read_records(_store(tmp, rows))

    tmp = tmp_path
    [rising] = one(tmp / "a", [("bn", 0, 120, 92.0, "ok", _RISING)])
    assert convergence(rising)[0] == STILL_IMPROVING  # the curve's proxy: +4 over the last quarter
    [settled] = one(tmp / "b", [("bn", 0, 360, 93.0, "ok", _FLAT)])
    [better] = one(tmp / "c", [("bn", 0, 360, 95.0, "ok", _FLAT)])
    [lost] = one(tmp / "d", [("bn", 0, 360, 0.0, "diverged", None)])
    rising.longer = settled
    assert convergence(rising) == (CONVERGED, "the same cell trained 3x longer: 93.00 (+1.00 pp, "
                                              "within 1.5)")
    rising.longer = better
    assert convergence(rising) == (STILL_IMPROVING, "the same cell trained 3x longer reached "
                                                    "95.00 (+3.00 pp, more than 1.5)")
    rising.longer = lost  # a diverged longer run says nothing: the curve decides
    assert convergence(rising)[0] == STILL_IMPROVING
    # a record without a curve is judged by its longer run
    [bare] = one(tmp / "e", [("bn", 0, 120, 92.0, "ok", None)])
    bare.longer = settled
    assert convergence(bare)[0] == CONVERGED
    # did not fit stays a result whatever the longer run did
    [unfit] = one(tmp / "f", [("bn", 0, 120, 30.0, "ok", [(30.0, 2.0)] * 4)])
    unfit.result["loss"] = "cross-entropy"
    unfit.longer = better
    assert convergence(unfit)[0] == DID_NOT_FIT


def _task_store(path, task, rows):
    """A store of ``task``'s smoke cells (real configs): rows of (cell index, length factor,
    acc, curve)."""
    from bgnorm.repro.store import ResultStore, cell_id, store_path
    from bgnorm.repro.tasks.base import get_task

    cells = get_task(task).cells("smoke", {})
    store = ResultStore(store_path(path))
    for i, factor, acc, curve in rows:
        config = scale_lengths(cells[i], factor) if factor != 1 else dict(cells[i])
        result = {"acc": acc, "n_test": 300, "num_classes": 10, "steps": 10 * factor,
                  "clean_acc": acc,
                  "curve": [{"progress": (k + 1) / len(curve), "metric": m, "train_loss": l,
                             "step": (k + 1) * factor, "epoch": k + 1, "stage": "train"}
                            for k, (m, l) in enumerate(curve)]}
        store.append(Record(cell_id(config), config, "ok", result, 1.0))
    return path


def test_report_longer_flags_cells_from_the_longer_run(tmp_path, capsys):
    run = _task_store(tmp_path / "q", "batch-size", [(0, 1, 92.0, _RISING),
                                                      (1, 1, 90.0, _RISING),
                                                      (2, 1, 91.0, _FLAT)])
    longer = _task_store(tmp_path / "x3", "batch-size", [(0, 3, 92.5, _FLAT),
                                                          (1, 3, 96.0, _FLAT)])
    assert main(["report", str(run), "--quiet"]) == 0
    assert "1 converged, 2 still improving" in (run / "report.md").read_text()
    assert main(["report", str(run), "--quiet", "--longer", str(longer)]) == 0
    text = (run / "report.md").read_text()
    assert ("Convergence of 2 of them checked against the same cells trained longer in "
            f"`{longer}`") in text
    assert "2 converged, 1 still improving" in text
    assert "the same cell trained 3x longer: 92.50 (+0.50 pp, within 1.5)" in text
    assert "the same cell trained 3x longer reached 96.00 (+6.00 pp, more than 1.5)" in text
    assert "92.50" not in text.split("### Convergence")[0]  # the tables keep this run's numbers
    # a longer run that is in fact shorter is no evidence
    shorter = _task_store(tmp_path / "x03", "batch-size", [(2, 1, 91.0, _FLAT)])
    from bgnorm.repro.report import attach_longer
    from bgnorm.repro.store import read_records
    assert all(r.longer is None for r in attach_longer(read_records(longer),
                                                       read_records(shorter)))
    capsys.readouterr()
    assert main(["report", str(run), "--longer", str(tmp_path / "none")]) == 2
    assert f"no results*.jsonl store in {tmp_path / 'none'}" in capsys.readouterr().err
