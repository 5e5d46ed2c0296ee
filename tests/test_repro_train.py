"""Tests for bgnorm.repro.train: schedules, batches with exact resume, the training loop."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

import bgnorm.repro.train as T
from bgnorm.repro.models import build_model
from bgnorm.repro.runner import LocalCellContext
from bgnorm.repro.tasks.base import Diverged

pytestmark = pytest.mark.usefixtures("one_thread")


def test_docstring_examples():
    result = doctest.testmod(T, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_scaled_lr_is_the_papers_rule_with_eight_workers():
    for b in (128, 64, 32, 16, 8, 4, 2):
        assert T.scaled_lr(0.1, b, workers=8, reference_batch=256) == pytest.approx(0.1 * b / 32)
    assert T.scaled_lr(0.1, 2, workers=64, reference_batch=32) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        T.scaled_lr(0.1, 0)


def test_step_schedule_decays_three_times_and_warms_up():
    s = T.StepSchedule.from_epochs(1.0, epochs=10, steps_per_epoch=10, warmup_epochs=1)
    assert s.milestones == (30, 60, 90)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert [s(i) for i in (29, 30, 60, 90)] == pytest.approx([1.0, 0.1, 0.01, 0.001])
    e = T.StepSchedule.from_epochs(1.0, epochs=100, steps_per_epoch=2, milestones=(30, 60, 90))
    assert e.milestones == (60, 120, 180)  # values > 1 are epochs


def test_cosine_schedule_warms_up_then_follows_the_half_cosine_to_zero():
    # 10 epochs x 10 steps, 2 warm-up epochs: W = 20, T = 100
    s = T.Schedule.from_epochs(0.4, epochs=10, steps_per_epoch=10, warmup_epochs=2,
                               milestones=(0.3, 0.6), kind="cosine")
    assert (s.kind, s.warmup_steps, s.total_steps) == ("cosine", 20, 100)
    assert [s(i) for i in (0, 9, 19)] == pytest.approx([0.4 / 20, 0.4 * 10 / 20, 0.4])
    for i in (20, 35, 60, 80, 99, 100):
        want = 0.4 * (1 + math.cos(math.pi * (i - 20) / 80)) / 2
        assert s(i) == pytest.approx(want, abs=1e-15)  # milestones are ignored
    assert s(60) == pytest.approx(0.2) and s(100) == pytest.approx(0.0, abs=1e-15)
    assert s(99) > 0
    lrs = [s(i) for i in range(20, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # non-increasing after warm-up
    n = T.Schedule.from_epochs(1.0, epochs=4, steps_per_epoch=5, kind="cosine")
    assert n(0) == pytest.approx(1.0) and n(10) == pytest.approx(0.5)  # no warm-up


def test_schedule_refuses_an_unknown_kind_and_a_warmup_as_long_as_training():
    with pytest.raises(ValueError, match="unknown kind 'linear'.*step, cosine"):
        T.Schedule.from_epochs(1.0, epochs=2, steps_per_epoch=5, kind="linear")
    with pytest.raises(ValueError, match="total_steps \\(10\\) > warmup_steps \\(10\\)"):
        T.Schedule.from_epochs(1.0, epochs=2, steps_per_epoch=5, warmup_epochs=2, kind="cosine")
    assert T.StepSchedule is T.Schedule  # the former name still works


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("aug", [{}, {"crop_padding": 1, "hflip": True}])
def test_in_memory_batches_resume_at_any_batch(aug):
    x, y = _data()
    src = T.InMemoryBatches(x, y, 8, seed=3, **aug)
    full = list(src.batches(2))
    assert len(full) == len(src) == 5
    for start in range(len(src)):
        tail = list(T.InMemoryBatches(x, y, 8, seed=3, **aug).batches(2, start))
        assert len(tail) == len(full) - start
        for (a, b), (c, d) in zip(tail, full[start:]):
            assert torch.equal(a, c) and torch.equal(b, d)
    other = list(src.batches(3))
    assert not torch.equal(other[0][1], full[0][1])  # each epoch has its own order


def test_in_memory_batches_drop_last_and_eval_order():
    x, y = _data(42)
    assert len(T.InMemoryBatches(x, y, 8)) == 5
    ev = T.InMemoryBatches(x, y, 8, shuffle=False, drop_last=False)
    assert len(ev) == 6
    assert torch.equal(torch.cat([b for _, b in ev.batches(0)]), y)
    with pytest.raises(ValueError, match="larger than"):
        T.InMemoryBatches(x, y, 64)


def test_in_memory_batches_cover_every_example_once_per_epoch():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    y = torch.arange(10)
    src = T.InMemoryBatches(x, y, 4, seed=0, drop_last=False)
    assert len(src) == 3
    e1 = [yb for _, yb in src.batches(0)]
    assert [len(b) for b in e1] == [4, 4, 2]
    assert sorted(torch.cat(e1).tolist()) == list(range(10))
    for xb, yb in src.batches(1):
        assert torch.equal(xb[:, 0, 0, 0], yb.float())
    dl = T.InMemoryBatches(x, y, 4, shuffle=False)
    assert len(dl) == 2 and [yb.tolist() for _, yb in dl.batches(0)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_in_memory_batches_augmentation_is_a_flipped_window_of_the_padded_image():
    n = 64
    x = torch.rand(n, 2, 8, 8)
    y = torch.arange(n)
    src = T.InMemoryBatches(x, y, 16, seed=0, crop_padding=2, pad_value=-5.0, hflip=True)
    shifted = flipped = 0
    for xb, yb in src.batches(0):
        assert xb.shape == (16, 2, 8, 8)
        padded = torch.nn.functional.pad(x[yb], (2, 2, 2, 2), value=-5.0)
        for k in range(len(yb)):
            matches = [
                (i, j, f)
                for i in range(5)
                for j in range(5)
                for f in (False, True)
                if torch.equal(
                    xb[k], (padded[k].flip(-1) if f else padded[k])[:, i : i + 8, j : j + 8]
                )
            ]
            assert matches, "each image must be a (flipped) window of its padded original"
            shifted += matches[0][:2] != (2, 2)
            flipped += matches[0][2]
    assert shifted > n // 2 and 10 < flipped < n - 10


def test_loader_batches_resume_order():
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y)
    src = T.LoaderBatches(ds, 8, seed=1)
    full = [b for _, b in src.batches(1)]
    tail = [b for _, b in src.batches(1, start=3)]
    assert len(full) == 5 and len(tail) == 2
    assert all(torch.equal(a, b) for a, b in zip(tail, full[3:]))


def test_evaluate_and_median():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = _data()
    m = T.evaluate(model, T.InMemoryBatches(x, y, 16, shuffle=False, drop_last=False),
                   torch.device("cpu"))
    assert 0 <= m["acc"] <= 100 and m["n"] == 40 and math.isfinite(m["loss"])
    assert T.median([3.0, 1.0, 2.0]) == 2.0 and T.median([1.0, 2.0]) == 1.5
    assert math.isnan(T.median([]))


class _Crash(Exception):
    pass


class _CrashingContext(LocalCellContext):
    """Checkpoints at every step and dies (like kill -9, but catchable) at step ``crash_at``."""

    def __init__(self, workdir, crash_at=None, checkpoint_seconds=0.0):
        super().__init__("cell", {}, torch.device("cpu"), workdir,
                         checkpoint_seconds=checkpoint_seconds)
        self.crash_at = crash_at

    def progress(self, done, total, **metrics):
        self.lrs.append((done, metrics.get("lr")))
        if self.crash_at is not None and done >= self.crash_at:
            raise _Crash

    lrs: list


def _train(workdir, crash_at=None, lr=0.05, epochs=3, seen=None, **recipe):
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, nn.BatchNorm2d, in_channels=1, width=4,
                        blocks_per_stage=(1, 1))
    x, y = _data(48)
    train = T.InMemoryBatches(x[:32], y[:32], 8, seed=0, crop_padding=1)
    test = T.InMemoryBatches(x[32:], y[32:], 16, shuffle=False, drop_last=False)
    rec = T.ClassifyRecipe(epochs=epochs, lr=lr, median_of=2, **recipe)
    ctx = _CrashingContext(workdir, crash_at)
    ctx.lrs = seen if seen is not None else []
    return T.train_classifier(model, train, test, rec, ctx, torch.device("cpu"))


@pytest.mark.parametrize("crash_at", [3, 4, 9])  # mid-epoch, at an epoch's end, later epoch
def test_train_classifier_resumes_bit_for_bit(tmp_path, crash_at):
    ref = _train(tmp_path / "ref")
    with pytest.raises(_Crash):
        _train(tmp_path / "cut", crash_at=crash_at)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = _train(tmp_path / "cut")
    for key in ("acc", "evals", "train_losses", "steps", "curve"):
        assert resumed[key] == ref[key], key
    assert len(ref["evals"]) == 2 and ref["steps"] == 12
    # the learning curve: one test evaluation per epoch, the last two are the evals
    assert [p["epoch"] for p in ref["curve"]] == [1, 2, 3]
    assert [[p["epoch"] - 1, p["metric"], p["test_loss"]] for p in ref["curve"][1:]] == \
        ref["evals"]
    assert [p["train_loss"] for p in ref["curve"]] == ref["train_losses"]
    # A finished cell's checkpoint returns the same result without training again.
    again = _train(tmp_path / "cut")
    assert again["acc"] == ref["acc"]


@pytest.mark.parametrize("version", [1, 2])
def test_train_classifier_discards_an_old_checkpoint(tmp_path, monkeypatch, version):
    ref = _train(tmp_path / "ref")
    old = LocalCellContext("cell", {}, torch.device("cpu"), tmp_path / "old")
    saved = {"version": version, "total": 12, "step": 5}  # 1: before learning curves
    if version == 2:  # train_classifier's own format before it moved onto the shared loop
        model = build_model("small_resnet", 10, nn.BatchNorm2d, in_channels=1, width=4,
                            blocks_per_stage=(1, 1))
        saved.update(model=model.state_dict(), optimizer=T.make_sgd(model, 0.1).state_dict(),
                     rng=torch.get_rng_state(), evals=[], epoch_loss=[1.0, 1.0],
                     train_losses=[2.0], seconds=1.0, curve=[])
    old.save_checkpoint(saved)
    logs = []
    monkeypatch.setattr(_CrashingContext, "log", lambda self, m: logs.append(m), raising=False)
    resumed = _train(tmp_path / "old")
    assert any("discarding the checkpoint" in m and "restarts from step 0" in m for m in logs)
    assert resumed["curve"] == ref["curve"] and resumed["acc"] == ref["acc"]


def test_train_classifier_follows_the_recipes_cosine_schedule(tmp_path):
    seen = []  # (steps done, lr of the step just taken), 4 steps per epoch, 3 epochs
    result = _train(tmp_path, lr=0.05, seen=seen, schedule="cosine", warmup_epochs=1)
    assert result["recipe"]["schedule"] == "cosine"
    want = [0.05 * (s + 1) / 4 if s < 4 else 0.05 * (1 + math.cos(math.pi * (s - 4) / 8)) / 2
            for s in range(12)]
    assert [d for d, _ in seen] == list(range(1, 13))
    assert [lr for _, lr in seen] == pytest.approx(want, abs=1e-12)


class _NoisyDigits(torch.utils.data.Dataset):
    """A dataset whose transform draws from torch's global RNG (as torchvision's do in the
    loader's process): the training loop's RNG consumption order shows in every batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]


def _reference_classifier(model, train, test, recipe):
    """What train_classifier computes, written as a plain loop (one process, CPU): per epoch,
    one ``for`` over ``train.batches(epoch)``, the schedule's lr set before each SGD step on
    the mean cross-entropy, the epoch's mean loss added left to right, then one evaluation.
    Returns the per-epoch points and the lr of every step."""
    spe = len(train)
    schedule = T.Schedule.from_epochs(recipe.lr, recipe.epochs, spe, recipe.milestones,
                                      recipe.gamma, recipe.warmup_epochs, recipe.schedule)
    opt = T.make_sgd(model, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.nesterov)
    step, points, lrs = 0, [], []
    model.train()
    for epoch in range(recipe.epochs):
        loss_sum, n = 0.0, 0
        for xb, yb in train.batches(epoch):
            lrs.append(schedule(step))
            T.set_lr(opt, lrs[-1])
            loss = nn.functional.cross_entropy(model(T.standard_layout(xb)).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach())
            n += 1
        m = T.evaluate(model, test, torch.device("cpu"))
        points.append({"step": step, "epoch": epoch + 1, "progress": (epoch + 1) / recipe.epochs,
                       "train_loss": loss_sum / n, "metric": m["acc"], "test_loss": m["loss"]})
    return points, lrs


def _pinned_cell(loader):
    x, y = _data(56)
    if loader:  # global-RNG transforms and dropout: pins the order the RNG is drawn in
        train = T.LoaderBatches(_NoisyDigits(x[:40], y[:40]), 8, seed=1)
        test = T.LoaderBatches(_NoisyDigits(x[40:], y[40:]), 16, shuffle=False,
                               drop_last=False)
    else:
        train = T.InMemoryBatches(x[:40], y[:40], 8, seed=0, crop_padding=1, hflip=True)
        test = T.InMemoryBatches(x[40:], y[40:], 16, shuffle=False, drop_last=False)
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, nn.BatchNorm2d, in_channels=1, width=4,
                        blocks_per_stage=(1, 1))
    if loader:
        model = nn.Sequential(nn.Dropout(0.2), model)
    return model, train, test


@pytest.mark.parametrize("loader", [False, True])
@pytest.mark.parametrize("check_every", [1, 3])
def test_train_classifier_computes_exactly_the_reference_loop(tmp_path, loader, check_every):
    # The stored results of the classification tasks stay valid across refactors of the loop:
    # the same losses, learning rates, evaluations and accuracies, bit for bit.
    recipe = T.ClassifyRecipe(epochs=4, lr=0.05, median_of=2, schedule="cosine",
                              warmup_epochs=1, check_every=check_every)
    ref_model, train, test = _pinned_cell(loader)
    torch.manual_seed(7)  # the global RNG as the cell leaves it for the loop
    want, want_lrs = _reference_classifier(ref_model, train, test, recipe)
    model, train, test = _pinned_cell(loader)
    torch.manual_seed(7)
    ctx = _CrashingContext(tmp_path, checkpoint_seconds=1e9)  # no checkpoint forces a check
    ctx.lrs = []
    got = T.train_classifier(model, train, test, recipe, ctx, torch.device("cpu"))
    assert [{k: p[k] for k in want[0]} for p in got["curve"]] == want
    assert all(p["stage"] == "train" for p in got["curve"])
    assert got["train_losses"] == [p["train_loss"] for p in want]
    assert got["evals"] == [[p["epoch"] - 1, p["metric"], p["test_loss"]] for p in want[2:]]
    assert got["acc"] == T.median([p["metric"] for p in want[2:]])
    assert got["final_acc"] == want[-1]["metric"] and got["steps"] == 20
    # progress reports the lr of every step (deferred checks: of every check_every-th step
    # since the last check and of each epoch's last step)
    reported = dict(ctx.lrs)
    assert sorted(reported) == sorted(
        {5 * e + k for e in range(4) for k in (*range(check_every, 5, check_every), 5)})
    assert all(reported[s] == want_lrs[s - 1] for s in reported)
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_train_classifier_raises_diverged(tmp_path):
    with pytest.raises(Diverged) as info:
        _train(tmp_path, lr=1e12, epochs=2)
    assert "non-finite" in str(info.value)
    assert "step" in info.value.partial


def test_check_finite_and_devices():
    T.check_finite(1.0, "x")
    with pytest.raises(Diverged):
        T.check_finite(float("nan"), "x")
    assert T.resolve_device("cpu").type == "cpu"
    assert T.resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            T.resolve_device("cuda")
    with T.autocast(torch.device("cpu"), "none"):
        pass
    with pytest.raises(ValueError, match="amp"):
        T.autocast(torch.device("cpu"), "fp8")


def test_batch_cursor_gives_each_steps_batch_in_order_and_after_a_jump():
    # The tasks' step_batch read batch `step` as next(source.batches(epoch, index)), drawing
    # the epoch's order again for each step; the cursor must give exactly those batches.
    x, y = _data(44)
    src = T.InMemoryBatches(x, y, 8, seed=5, crop_padding=1, hflip=True)  # 5 per epoch
    cursor = T.BatchCursor(src)
    for step in [*range(12), 3, 4, 17, 18, 19, 20, 0]:  # in order, back, forward, across epochs
        want = next(src.batches(*divmod(step, len(src))))
        got = cursor.batch(step)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
    cursor.close()
    cursor.close()  # idempotent
