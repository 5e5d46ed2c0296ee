"""Tests for bgnorm.repro.loop: the one step loop under every task."""

from __future__ import annotations

import doctest

import pytest
import torch

import bgnorm.repro.loop as L
from bgnorm.repro.api import Diverged
from bgnorm.repro.loop import StepLoop, curve_steps


class _Ctx:
    """A CellContext in memory that checkpoints after every step and can stop the run."""

    def __init__(self, saved=None, stop_after=None):
        self.cell_id, self.config, self.device, self.workdir = "x", {}, torch.device("cpu"), "."
        self.saved, self.stop_after, self.steps, self.logs = saved, stop_after, 0, []

    def save_checkpoint(self, state):
        # through bytes, as the runner's context does (weights_only on load)
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        self.saved = buf.getvalue()

    def load_checkpoint(self):
        import io

        return None if self.saved is None else torch.load(io.BytesIO(self.saved),
                                                          weights_only=True)

    def checkpoint_due(self):
        return True

    def progress(self, done, total, **metrics):
        self.steps += 1
        if self.stop_after is not None and self.steps >= self.stop_after:
            raise KeyboardInterrupt

    def log(self, message):
        self.logs.append(message)


def _train(ctx, total=6, lr=0.1, nan_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x = torch.randn(16, 3, dtype=torch.float32)

    def update(step):
        noise = torch.randn(16, 1)  # draws from torch's RNG: the checkpoint must restore it
        loss = ((model(x) - noise) ** 2).mean()
        if step == nan_at:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": float(loss)}

    def evaluate():
        with torch.no_grad():
            return {"metric": float(model(x).abs().mean()), "extra": 1}

    loop = StepLoop(ctx, total, steps_per_epoch=2)
    last = loop.run({"model": model, "opt": opt}, update, evaluate=evaluate, eval_at=[2, 4])
    return loop, last, model


def test_docstring_examples():
    result = doctest.testmod(L, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_curve_steps_end_at_stop():
    assert curve_steps(0, 8) == list(range(1, 9))
    assert curve_steps(0, 80)[-1] == 80 and len(curve_steps(0, 80)) == L.CURVE_POINTS
    assert curve_steps(5, 5) == []


def test_curve_points_hold_step_epoch_train_loss_metric():
    loop, last, _ = _train(_Ctx())
    assert [p["step"] for p in loop.curve] == [2, 4, 6]  # eval_at plus the stage's end
    assert [p["epoch"] for p in loop.curve] == [1.0, 2.0, 3.0]
    for p, (a, b) in zip(loop.curve, [(0, 2), (2, 4), (4, 6)], strict=True):
        assert p["train_loss"] == pytest.approx(sum(loop.losses[a:b]) / 2)
        assert p["extra"] == 1.0 and p["stage"] == "train"
    assert last["metric"] == loop.curve[-1]["metric"]


def test_resume_repeats_the_uninterrupted_run_bit_for_bit():
    ref_loop, ref_last, ref_model = _train(_Ctx())
    ctx = _Ctx(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        _train(ctx)
    ctx.stop_after, ctx.steps = None, 0
    loop, last, model = _train(ctx)
    assert any(m.startswith("resumed at step 2/6") for m in ctx.logs)
    assert loop.losses == ref_loop.losses
    assert loop.curve == ref_loop.curve
    assert torch.equal(model.weight, ref_model.weight)
    # Resumed after the end: nothing is trained again, the final evaluation is repeated.
    ctx.steps = 0
    again, last2, _ = _train(ctx)
    assert ctx.steps == 0 and again.curve == ref_loop.curve and last2 == ref_last


def test_nonfinite_loss_raises_diverged_with_the_partial_curve():
    with pytest.raises(Diverged, match="non-finite training loss at step 4") as e:
        _train(_Ctx(), nan_at=3)
    assert e.value.partial["step"] == 3
    assert [p["step"] for p in e.value.partial["curve"]] == [2]


def test_an_old_checkpoint_is_discarded_and_the_cell_restarts():
    ref_loop, _, ref_model = _train(_Ctx())
    old = _Ctx()
    # the format the tasks wrote before the shared loop (version 1, no "format" tag)
    old.save_checkpoint({"version": 1, "total": 6, "modules": {}, "rng": torch.get_rng_state(),
                         "state": {"step": 4, "losses": []}})
    loop, _, model = _train(old)
    assert any("discarding the checkpoint" in m and "restarts from step 0" in m
               for m in old.logs)
    assert loop.losses == ref_loop.losses and torch.equal(model.weight, ref_model.weight)


def test_a_stage_restores_its_modules_only_from_its_own_checkpoint():
    ctx = _Ctx()
    a = torch.nn.Linear(2, 2)
    loop = StepLoop(ctx, 4)
    loop.run({"a": a}, lambda s: {"loss": 1.0}, stop=2, stage="first")
    b = torch.nn.Linear(2, 2)
    before = b.weight.detach().clone()
    loop2 = StepLoop(ctx, 4)
    assert loop2.step == 2 and loop2.resumed_stage("first") and not loop2.resumed_stage("second")
    loop2.run({"a": a}, lambda s: {"loss": 1.0}, stop=2, stage="first")  # already done
    loop2.run({"b": b}, lambda s: {"loss": 1.0}, start=2, stage="second")
    assert torch.equal(b.weight, before) and loop2.step == 4


class _Recorder(_Ctx):
    """Records progress and checkpoint writes; ``due_at``: the steps a checkpoint is due."""

    def __init__(self, due_at=()):
        super().__init__()
        self.due_at, self.progressed, self.writes, self.done = set(due_at), [], [], 0

    def progress(self, done, total, **metrics):
        self.done = done
        self.progressed.append((done, metrics))

    def checkpoint_due(self):
        return self.done + 1 in self.due_at  # asked after step done + 1, before its progress

    def save_checkpoint(self, state):
        self.writes.append(state["state"]["step"])
        super().save_checkpoint(state)


def test_schedule_sets_every_optimizers_lr_before_each_step_and_reports_it():
    ctx = _Recorder()
    w = torch.nn.Parameter(torch.zeros(1))
    opts = {"a": torch.optim.SGD([w], lr=1.0), "b": torch.optim.SGD([w], lr=1.0)}
    seen = []

    def update(step):
        seen.append((opts["a"].param_groups[0]["lr"], opts["b"].param_groups[0]["lr"]))
        return {"loss": 1.0}

    StepLoop(ctx, 4).run(opts, update, schedule=lambda s: 0.5 ** s)
    assert seen == [(1.0, 1.0), (0.5, 0.5), (0.25, 0.25), (0.125, 0.125)]
    assert [m["lr"] for _, m in ctx.progressed] == [1.0, 0.5, 0.25, 0.125]


def test_deferred_checks_read_tensor_losses_in_chunks_and_at_every_evaluation():
    ctx = _Recorder(due_at={7})
    losses = [torch.tensor(float(s + 1)) for s in range(8)]
    loop = StepLoop(ctx, 8, check_every=3)
    loop.run({}, lambda s: {"loss": losses[s]}, evaluate=lambda: {"metric": 0.0},
             eval_at=[4])
    # every 3 steps since the last check, at the evaluation (4), when a checkpoint is due (7)
    # and at the end
    assert [d for d, _ in ctx.progressed] == [3, 4, 7, 8]
    assert [m["loss"] for _, m in ctx.progressed] == [2.0, 4.0, 6.0, 8.0]  # chunk means
    assert loop.losses == [float(s + 1) for s in range(8)]
    assert [p["train_loss"] for p in loop.curve] == [2.5, 6.5]
    assert ctx.writes == [8]  # the checkpoint due at 7 is taken at the stage's end
    bad = [torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(1.0)]
    with pytest.raises(Diverged, match="non-finite training loss at step 2 ") as e:
        StepLoop(_Recorder(), 3, check_every=3).run({}, lambda s: {"loss": bad[s]})
    assert e.value.partial["step"] == 1  # the steps before the non-finite one


def test_distributed_rank_syncs_before_evaluations_and_checkpoints_and_only_rank_0_writes():
    from bgnorm.repro.dist import DistEnv

    events = []
    for rank in (0, 1):
        ctx = _Recorder(due_at={2})
        loop = StepLoop(ctx, 4, env=DistEnv(rank=rank, world_size=2))

        def update(step):
            events.append(("step", step))
            return {"loss": torch.tensor(3.0)}

        loop.run({}, update, evaluate=lambda: events.append(("eval",)) or {"metric": 1.0},
                 eval_at=[3], sync=lambda: events.append(("sync",)))
        # no process group here: the sum over the ranks is this rank's share, 3.0 / 2
        assert loop.losses == [1.5] * 4
        assert ctx.writes == ([2, 4] if rank == 0 else [])
        # rank 0 decides the checkpoint after step 2 (the all-reduce carries it to the others;
        # without a process group rank 1 does not hear of it)
        checkpoint = [("sync",)] if rank == 0 else []
        assert events == [("step", 0), ("step", 1), *checkpoint, ("step", 2), ("sync",),
                          ("eval",), ("step", 3), ("sync",), ("eval",), ("sync",)]
        events.clear()
