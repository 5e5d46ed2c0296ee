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
    text = render_report(out)
    assert rows[-1] in text
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
