"""End-to-end checks of the tasks of the BGN paper's Tables 3-7 (smoke presets)."""

from __future__ import annotations

import json

import pytest

from bgnorm.repro.runner import RunOptions, render_report, run_sweep
from bgnorm.repro.tasks.base import get_task


def _run(task: str, out, **overrides):
    summary = run_sweep(RunOptions(tasks=[task], preset="smoke", out_dir=out,
                                   overrides={"set": overrides}, jobs=1, progress=False))
    assert summary.ok, summary.failed
    return summary


def _records(out):
    recs = []
    for path in out.glob("results*.jsonl"):
        recs += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return recs


@pytest.mark.parametrize("task,rows", [
    ("adversarial", ["| BN ", "| BGN "]),
    ("few-shot", ["| BN ", "| BGN "]),
    ("domain-adaptation", ["source only (BN)", "CAN + BGN"]),
])
def test_task_smoke_end_to_end(tmp_path, task, rows):
    out = tmp_path / "run"
    _run(task, out, norms=["bgn"] if task != "domain-adaptation" else ["bgn"])
    recs = _records(out)
    assert recs and all(r["status"] == "ok" for r in recs)
    # every record carries its learning curve, ending at the last step
    for r in recs:
        curve = r["result"]["curve"]
        assert curve and curve[-1]["step"] == r["result"]["steps"]
        assert all({"step", "train_loss", "metric", "progress"} <= set(p) for p in curve)
    if task == "domain-adaptation":  # CAN's protocol: tested on every target image
        assert {r["result"]["n_test"] for r in recs} == {1797}
        # CAN's curve also records the labels' cross-entropy, judged by the convergence flag
        for r in recs:
            fits = [p.get("fit_loss") for p in r["result"]["curve"]]
            if r["config"]["method"] == "can":
                assert all(isinstance(v, float) and v > 0 for v in fits), fits
            else:
                assert fits == [None] * len(fits)
    text = render_report(out)
    assert rows[-1] in text
    if task == "domain-adaptation":
        assert "on every target image" in text and "framed on its content" in text
    assert (out / f"curves_{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert f"![learning curves of {task}](curves_{task}.png)" in text
    assert f"### Convergence ({task})" in text and "Criterion:" in text
    assert "What this preset can show" in text


@pytest.mark.slow
def test_nas_smoke_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    _run("nas", out, norms=["bn"])
    recs = _records(out)
    assert {r["config"]["experiment"] for r in recs} == {"search", "darts_v2"}
    text = render_report(out)
    assert "Table 3" in text and "Table 4" in text and "| BN " in text
    # A second sweep resumes: nothing is re-run.
    again = run_sweep(RunOptions(tasks=["nas"], preset="smoke", out_dir=out,
                                 overrides={"set": {"norms": ["bn"]}}, jobs=1, progress=False))
    assert again.skipped == len(recs) and again.finished == 0


class _Ctx:
    """A minimal CellContext that checkpoints after every step."""

    def __init__(self, config, workdir, stop_after=None):
        import torch

        self.cell_id, self.config, self.device, self.workdir = "x", config, torch.device("cpu"), \
            workdir
        self.saved, self.stop_after, self.steps = None, stop_after, 0

    def save_checkpoint(self, state):
        import torch

        torch.save(state, self.workdir / "ckpt.pt")

    def load_checkpoint(self):
        import torch

        p = self.workdir / "ckpt.pt"
        return torch.load(p, weights_only=True) if p.exists() else None

    def checkpoint_due(self):
        return True

    def progress(self, done, total, **metrics):
        self.steps += 1
        if self.stop_after is not None and self.steps >= self.stop_after:
            raise KeyboardInterrupt

    def log(self, message):
        pass


@pytest.mark.parametrize("task", ["few-shot", "domain-adaptation", "adversarial", "nas"])
def test_resume_mid_run_gives_the_same_result(tmp_path, task):
    t = get_task(task)
    config = t.cells("smoke", {"set": {"norms": ["bgn"], "source_only_norms": []}
                               if task == "domain-adaptation" else {"norms": ["bgn"]}})[0]
    ref_dir, res_dir = tmp_path / "a", tmp_path / "b"
    ref_dir.mkdir()
    res_dir.mkdir()
    ref = t.run(dict(config), _Ctx(config, ref_dir))
    with pytest.raises(KeyboardInterrupt):
        t.run(dict(config), _Ctx(config, res_dir, stop_after=3))
    resumed = t.run(dict(config), _Ctx(config, res_dir))
    for key in ("acc", "train_loss"):
        if key in ref:
            assert resumed[key] == pytest.approx(ref[key], abs=1e-9), key
    # the shared loop's learning curve is resumed too
    assert resumed["curve"] == ref["curve"] and ref["curve"][-1]["step"] == ref["steps"]


def test_diverged_cell_shows_a_dash(tmp_path):
    out = tmp_path / "run"
    _run("adversarial", out, norms=["bn"], lr=1e30)
    recs = _records(out)
    text = render_report(out)
    if recs[0]["status"] == "diverged":
        assert "| BN   |                  - |" in text or "| -" in text or " - |" in text
    else:  # Adam's step is bounded by lr: a huge lr need not give a NaN loss on every backend
        pytest.skip("lr=1e30 did not diverge")


@pytest.mark.parametrize("task", ["adversarial", "few-shot", "domain-adaptation", "nas"])
def test_a_task_applies_every_option_it_receives_or_refuses_it(task):
    from bgnorm.repro.presets import OPTIONS, task_overrides
    from bgnorm.repro.runner import plan_cells

    t = get_task(task)
    plain = t.cells("smoke", {})
    assert [c["seed"] for c in t.cells("smoke", {"seeds": [3]})] == [3] * len(plain)
    refused = {"epochs": 3, "model": "resnet18", "amp": "bf16", "batch_sizes": [8],
               "groups": [4], "loader_workers": 2}
    if task == "domain-adaptation":
        refused["dataset"] = "digits"  # its domains name their data sets
    for key, value in refused.items():
        assert key in OPTIONS and key not in t.options
        flag = "--" + key.replace("_", "-")
        with pytest.raises(ValueError, match=f"^{flag} is not applied by the {task} task"):
            t.cells("smoke", {key: value})
    # Several tasks selected: each receives only the options it applies.
    assert task_overrides(t, {**refused, "seeds": [0], "set": {}}) == {"seeds": [0], "set": {}}
    cells = [c for _, c in plan_cells(["batch-size", task], "smoke", {"epochs": 1})]
    assert [c for c in cells if c["task"] == task] == plain
    assert {c["epochs"] for c in cells if c["task"] == "batch-size"} == {1}


# --------------------------------------------------------------------------------------------
# NAS: which norms let the DARTS networks of each preset see their input (a structural check,
# no training: the IN/GN rows at 89.69% error, i.e. chance)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["smoke", "quick"])
def test_nas_networks_see_their_input_with_every_norm_but_in(preset):
    from bgnorm.repro import data as D
    from bgnorm.repro.nas import DARTS_V2, input_blind
    from bgnorm.repro.tasks.common import NORMS
    from bgnorm.repro.tasks.nas import build_eval_network, build_search_network

    t = get_task("nas")
    cells = t.cells(preset, {"set": {"norms": NORMS, "experiments": ["search"]}})
    split = D.bundled_dataset(cells[0]["dataset"], seed=0, size=cells[0]["image_size"])
    shape = (split.in_channels, *split.image_size)
    blind = {}
    for cfg in cells:
        search = build_search_network(cfg, shape, split.num_classes)
        evaluation, _, _ = build_eval_network(cfg, DARTS_V2, shape, split.num_classes)
        blind[cfg["norm"]] = (input_blind(search, shape), input_blind(evaluation, shape))
    # GN's 32 groups on these 4-32 channel layers were one channel a group (IN): the quick
    # preset's GN networks were blind and sat at chance. IN is blind at any size (inherent) in
    # the search network, and in the DARTS_V2 network when its last cell is a normal cell (the
    # smoke network's 3 cells end with a reduction cell, whose max-pools keep the input).
    layers = cells[0]["eval_layers"]
    last_is_normal = layers - 1 not in (layers // 3, 2 * layers // 3)
    assert blind == {n: (n == "in", n == "in" and last_is_normal) for n in NORMS}
    if preset == "quick":
        assert last_is_normal


def test_nas_report_flags_a_blind_norm_instead_of_showing_chance():
    import math

    from bgnorm.repro.api import Record
    from bgnorm.repro.tasks.nas import report_nas

    cfg = get_task("nas").cells("quick", {"set": {"norms": ["bn", "in"],
                                                  "experiments": ["darts_v2"]}})
    curve = [{"step": 75 * k, "progress": k / 2, "metric": 10.306, "train_loss": 2.30,
              "stage": "train"} for k in (1, 2)]
    records = []
    for c in cfg:
        trained = c["norm"] == "bn"
        acc = 97.77 if trained else 10.306  # IN: the majority class of the 359 test digits
        curve = [{**p, "metric": acc, "train_loss": 0.01 if trained else 2.30} for p in curve]
        records.append(Record(c["norm"], c, "ok", {
            "acc": acc, "error": 100.0 - acc, "n_test": 359, "steps": 150, "num_classes": 10,
            "input_blind": [] if trained else ["eval"], "curve": curve}, 1.0))
    text = report_nas(records, None)
    in_row = next(line for line in text.splitlines() if line.startswith("| IN "))
    assert "n/t" in in_row and "89.69" not in in_row and not math.isnan(records[1].result["acc"])
    assert "| BN " in text and "97.77" in text
    assert "*Inherent, not a tuning problem:* with IN the network cannot see its input" in text


def test_lr_schedule_cosine_with_warm_up_and_constant():
    from bgnorm.repro.tasks.common import lr_schedule

    cos = lr_schedule({"lr": 0.01, "schedule": "cosine", "lr_warmup_steps": 4}, 20)
    assert [cos(s) for s in (0, 3)] == pytest.approx([0.0025, 0.01])
    assert cos(12) == pytest.approx(0.005) and cos(20) == pytest.approx(0.0)
    const = lr_schedule({"lr": 0.01}, 20)  # the paper's Adam: constant
    assert {const(s) for s in range(20)} == {0.01}
    with pytest.raises(ValueError, match="unknown schedule 'step'.*--set schedule=cosine"):
        lr_schedule({"lr": 0.01, "schedule": "step"}, 20)


@pytest.mark.parametrize("task", ["adversarial", "domain-adaptation"])
def test_quick_presets_anneal_the_lr_the_same_for_every_norm(task):
    cells = get_task(task).cells("quick", {})
    assert {(c["schedule"], c["lr"], c["lr_warmup_steps"]) for c in cells} == {
        ("cosine", cells[0]["lr"], cells[0]["lr_warmup_steps"])}
    paper = get_task(task).cells("paper", {"data_root": "/nonexistent"})
    assert {c.get("schedule") for c in paper} == {None}  # the paper's own schedule


@pytest.mark.parametrize("task", ["adversarial", "few-shot", "domain-adaptation", "nas"])
def test_quick_presets_run_every_norm_on_the_same_seeds(task):
    # paired comparisons over seeds need >= 2 seeds, each run by every cell (same data order)
    cells = get_task(task).cells("quick", {})
    seeds = {c["seed"] for c in cells}
    assert len(seeds) >= 2
    per_cell = {}
    for c in cells:
        key = tuple(sorted((k, repr(v)) for k, v in c.items() if k != "seed"))
        per_cell.setdefault(key, set()).add(c["seed"])
    assert all(s == seeds for s in per_cell.values())


def test_domain_adaptation_on_image_folders_tests_every_target_image(tmp_path):
    """The paper preset's path: one class-folder tree per domain under --data-root; the target
    is trained on without labels and tested on all of its images (CAN's protocol)."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    counts = {"amazon": 4, "webcam": 3}  # images per class
    for domain, k in counts.items():
        for c in ("bike", "cup"):
            (tmp_path / domain / c).mkdir(parents=True)
            for i in range(k):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
                    tmp_path / domain / c / f"{i}.png")
    small = {"image_size": 8, "model": "small_resnet",
             "model_kwargs": {"width": 4, "blocks_per_stage": [1, 1]}, "batch_size": 4,
             "warmup_steps": 1, "loops": 1, "loop_steps": 2, "classes_per_batch": 2,
             "per_class": 2, "min_per_class": 1, "filter_threshold": 1.0, "norms": ["bgn"],
             "source_only_norms": [], "seeds": [0], "directions": [["amazon", "webcam"]]}
    task = get_task("domain-adaptation")
    cells = task.cells("paper", {"data_root": str(tmp_path), "set": small})
    assert len(cells) == 1 and cells[0]["transductive"] is True
    config = dict(cells[0], runtime={"data_root": str(tmp_path)})
    result = task.run(config, _Ctx(config, tmp_path))
    assert result["n_test"] == 2 * counts["webcam"] and result["num_classes"] == 2
    held_out = task.cells("paper", {"data_root": str(tmp_path),
                                    "set": {**small, "transductive": False}})[0]
    held_out = dict(held_out, runtime={"data_root": str(tmp_path)})
    with pytest.raises(ValueError, match="'webcam' is an image folder.*transductive=false"):
        task.run(held_out, _Ctx(held_out, tmp_path))


def test_domain_report_states_what_its_seeds_resolve():
    from bgnorm.repro.report import Summary
    from bgnorm.repro.tasks.domain import _spread_note

    # sds 3.266 and 0.816, median 2.041; 4 seeds: t(6) = 2.447, 2.447 * 2.041 * sqrt(1/2)
    cells = {"a": Summary(values=(70.0, 74.0, 78.0, 74.0)),
             "b": Summary(values=(60.0, 61.0, 62.0, 61.0)), "missing": None}
    assert _spread_note(cells) == (
        "*Seeds:* 4 a cell; from seed to seed the cells move by 0.8-3.3 points (standard "
        "deviation, median 2.0), so two cells' means are told apart only when they differ by "
        "more than about 3.5 points (95%, 4 seeds each).")
    assert "one a cell, so the spread from run to run is not measured" in _spread_note(
        {"a": Summary(values=(70.0,))})
