"""One step loop under every task: resume, finite-loss check, progress, checkpoint, evaluation
schedule, learning curve, learning-rate schedule and the collectives of a distributed run.

A task gives only its *update* (one optimizer step: ``update(step) -> {"loss": ..., ...}``)
and its *evaluation* (``evaluate() -> {"metric": ..., ...}``, the task's test metric and any
other numbers), as DomainBed's algorithms give ``update(minibatches)`` and the harness
evaluates them. :class:`StepLoop` does the rest, the same way for every task (the
classification trainer :func:`bgnorm.repro.train.train_classifier` included):

* **resume**: the cell's checkpoint (through :class:`~bgnorm.repro.api.CellContext`) holds the
  models' and optimizers' state dicts, torch's CPU RNG and the loop state (step, losses,
  learning curve, the task's own resumable values in :attr:`StepLoop.task`); a resumed run
  repeats an uninterrupted one bit for bit on CPU. A checkpoint of another format (an older
  version of the suite, e.g. the classification trainer's own format before it moved onto this
  loop) or for another number of steps is discarded with a log line and the cell restarts from
  step 0;
* **learning rate**: ``schedule(step)`` (optional) is set on every optimizer of the stage
  before each step and reported with the progress as ``lr``;
* **finite check**: a NaN/inf loss raises :class:`~bgnorm.repro.api.Diverged` with the partial
  learning curve. With ``check_every > 1`` (GPU: each check synchronizes with the device) the
  losses stay on the device and are checked together every ``check_every`` steps, at every
  evaluation and at the end of the stage;
* **progress** after every check and a **time-based checkpoint** when
  ``ctx.checkpoint_due()``, plus one at the end of every stage;
* **evaluation schedule and learning curve**: after the steps of ``eval_at`` (by default
  :data:`CURVE_POINTS` evenly spaced steps, the last one included) the loop calls
  ``evaluate()`` and appends ``{"stage", "step", "epoch", "progress", "train_loss", "metric",
  ...}`` to :attr:`StepLoop.curve` (``train_loss``: the mean training loss since the previous
  point; ``progress``: the fraction of the stage done);
* **distributed** (``env``, a :class:`~bgnorm.repro.dist.DistEnv`): each rank's ``loss`` is its
  share of the global batch's mean loss; the loop sums the shares over the ranks (one
  all-reduce per check, which also carries rank 0's checkpoint decision, so every rank checks,
  evaluates and checkpoints at the same steps); ``sync()`` (e.g. averaging the running
  statistics over the ranks) runs before every evaluation and checkpoint; only rank 0 writes
  the checkpoint, the others wait at a barrier.

The decisions taken after a step (check the losses? checkpoint?) are made in one place,
:meth:`StepLoop._after_step`, the place for any further per-step request of the context.

A task with several stages (NAS: search, then train the found network) calls :meth:`run`
once per stage with its own modules; the checkpoint names its stage, and a stage's modules are
restored only from a checkpoint of that stage.

Example:
    >>> import tempfile
    >>> import torch
    >>> from bgnorm.repro.runner import LocalCellContext
    >>> ctx = LocalCellContext("c", {}, torch.device("cpu"), tempfile.mkdtemp())
    >>> w = torch.nn.Parameter(torch.tensor([3.0]))
    >>> opt = torch.optim.SGD([w], lr=0.25)
    >>> def update(step):
    ...     loss = (w ** 2).sum()
    ...     opt.zero_grad(); loss.backward(); opt.step()
    ...     return {"loss": float(loss.detach())}
    >>> loop = StepLoop(ctx, total=4)
    >>> _ = loop.run({"opt": opt}, update, evaluate=lambda: {"metric": float(w.detach())})
    >>> [(p["step"], p["train_loss"], p["metric"]) for p in loop.curve]
    [(1, 9.0, 1.5), (2, 2.25, 0.75), (3, 0.5625, 0.375), (4, 0.140625, 0.1875)]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from . import dist as _dist
from .api import CellContext, Diverged

__all__ = ["CURVE_POINTS", "LOOP_FORMAT", "LOOP_VERSION", "StepLoop", "curve_steps"]

#: Tag and version of the checkpoints :class:`StepLoop` writes.
LOOP_FORMAT = "bgnorm.repro.loop"
LOOP_VERSION = 2
#: Evaluations per stage when a task does not give its own schedule.
CURVE_POINTS = 8


def curve_steps(start: int, stop: int, points: int = CURVE_POINTS) -> list[int]:
    """``points`` evenly spaced steps in ``(start, stop]``, ``stop`` included (fewer when the
    stage has fewer steps).

    Example:
        >>> curve_steps(0, 100, 4), curve_steps(10, 13, 8)
        ([25, 50, 75, 100], [11, 12, 13])
    """
    n = stop - start
    if n <= 0:
        return []
    return sorted({start + math.ceil(n * i / points) for i in range(1, points + 1)})


def _number(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _mean(values: Sequence[float]) -> float:
    # Added left to right (Python 3.12's sum() compensates, which would change the curves).
    total = 0.0
    for v in values:
        total += v
    return total / len(values) if values else float("nan")


class StepLoop:
    """The resumable step loop of one cell (see the module docstring).

    Args:
        ctx: the cell's context (checkpoints, progress, log).
        total: the cell's steps over all stages (progress and checkpoint checks use it).
        steps_per_epoch: batches per epoch of the training data, for the curve's ``epoch``
            (``step / steps_per_epoch``); None: no ``epoch`` in the curve.
        check_every: check the losses for NaN/inf (and report progress) every this many steps;
            1 on CPU is free, on GPU each check synchronizes with the device.
        env: the distributed run this process is a rank of (None: one process).
    """

    def __init__(self, ctx: CellContext, total: int, steps_per_epoch: int | None = None, *,
                 check_every: int = 1, env: _dist.DistEnv | None = None) -> None:
        if check_every < 1:
            raise ValueError(f"StepLoop: check_every must be >= 1, got {check_every}")
        self.ctx = ctx
        self.total = int(total)
        self.steps_per_epoch = steps_per_epoch
        self.check_every = int(check_every)
        self.env = env
        self.state: dict[str, Any] = {"step": 0, "seconds": 0.0, "losses": [], "curve": [],
                                      "task": {}}
        self._saved: dict[str, Any] | None = None
        self._last: dict[str, Any] | None = None
        self._last_step = -1
        self._stage_start, self._stage_stop = 0, self.total
        # Losses of the steps taken but not checked yet (device tensors or floats).
        self._pending: list[Any] = []
        saved = ctx.load_checkpoint()
        if saved is not None:
            if (saved.get("format") != LOOP_FORMAT or saved.get("version") != LOOP_VERSION
                    or saved.get("total") != self.total):
                ctx.log(f"discarding the checkpoint in {ctx.workdir}: written by another "
                        "version of the suite or for another number of steps; the cell "
                        "restarts from step 0")
            else:
                self._saved = saved
                self.state = dict(saved["state"])
                ctx.log(f"resumed at step {self.step}/{self.total}")
        self._t0 = time.perf_counter()
        self._seconds0 = float(self.state["seconds"])

    @property
    def step(self) -> int:
        """Optimizer steps done so far (over all stages)."""
        return int(self.state["step"])

    @property
    def task(self) -> dict[str, Any]:
        """The task's own resumable values (tensors, numbers, strings, lists, dicts)."""
        return self.state["task"]

    @property
    def losses(self) -> list[float]:
        """The training loss of every step checked so far."""
        return self.state["losses"]

    @property
    def curve(self) -> list[dict[str, Any]]:
        """The learning curve: one point per evaluation."""
        return self.state["curve"]

    @property
    def seconds(self) -> float:
        """Training seconds over all sessions of this cell (evaluations included)."""
        return self._seconds0 + time.perf_counter() - self._t0

    def resumed_stage(self, stage: str) -> bool:
        """True when the checkpoint this loop resumed from was written during ``stage``."""
        return self._saved is not None and self._saved.get("stage") == stage

    def tail_loss(self, n: int = 10) -> float:
        """Mean training loss of the last ``n`` steps (NaN before the first step)."""
        return _mean(self.losses[-n:])

    def segment_loss(self, stage: str) -> float:
        """Mean training loss of the steps since the last curve point of ``stage`` (or since
        the stage's start): the ``train_loss`` of its next point."""
        since = [p["step"] for p in self.curve if p.get("stage") == stage]
        first = since[-1] if since else self._stage_start
        return _mean(self.losses[first:self.step])

    def _partial(self) -> dict[str, Any]:
        return {"step": self.step, "curve": list(self.curve)}

    def save(self, modules: Mapping[str, Any], stage: str,
             sync: Callable[[], None] | None = None) -> None:
        """Checkpoint ``modules`` (objects with ``state_dict``), torch's RNG and the loop state
        (distributed: after ``sync()``, written by rank 0 only, every rank waits for it)."""
        if sync is not None:
            sync()
        if self.env is not None and not self.env.is_main:
            _dist.barrier("the checkpoint barrier")
            return
        self.state["seconds"] = self.seconds
        self.ctx.save_checkpoint({
            "format": LOOP_FORMAT, "version": LOOP_VERSION, "total": self.total,
            "stage": stage, "modules": {k: v.state_dict() for k, v in modules.items()},
            "rng": torch.get_rng_state(), "state": self.state,
        })
        if self.env is not None:
            _dist.barrier("the checkpoint barrier")

    def evaluate(self, evaluate: Callable[[], Mapping[str, Any]], stage: str,
                 sync: Callable[[], None] | None = None) -> dict[str, Any]:
        """Evaluate now (after ``sync()``) and append a point to the learning curve; returns
        the evaluation."""
        if sync is not None:
            sync()
        m = dict(evaluate())
        if "metric" not in m:
            raise KeyError("a task's evaluate() must return a dict with a 'metric' entry")
        metric = _number(m["metric"])
        if not math.isfinite(metric):
            raise Diverged(f"non-finite test metric at step {self.step} ({metric})",
                           self._partial())
        point: dict[str, Any] = {"stage": stage, "step": self.step}
        if self.steps_per_epoch:
            point["epoch"] = (self.step - self._stage_start) / self.steps_per_epoch
        span = self._stage_stop - self._stage_start
        point["progress"] = (self.step - self._stage_start) / span if span > 0 else 1.0
        point["train_loss"] = self.segment_loss(stage)
        point["metric"] = metric
        for k, v in m.items():
            if k != "metric" and isinstance(v, (int, float)) and not isinstance(v, bool):
                point[k] = float(v)
        self.curve.append(point)
        self._last, self._last_step = m, self.step
        return m

    def _pending_losses(self, due: bool) -> tuple[list[float], bool]:
        """The pending steps' losses (summed over the ranks when distributed) and the
        checkpoint decision (rank 0's, when distributed); empties the pending list."""
        pending, self._pending = self._pending, []
        if self.env is None:
            if all(not isinstance(v, torch.Tensor) for v in pending):
                return [float(v) for v in pending], due
            return torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(())
                                for v in pending]).tolist(), due
        device = next((v.device for v in pending if isinstance(v, torch.Tensor)),
                      torch.device("cpu"))
        flags = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(device)
                             for v in pending]
                            + [torch.tensor(float(due), dtype=torch.float64, device=device)])
        _dist.all_reduce_sum(flags, f"the loss all-reduce at step {self.step}")
        values = flags.tolist()
        return values[:-1], values[-1] > 0

    def _after_step(self, boundary: bool) -> tuple[list[float] | None, bool]:
        """After a step: the losses to check now (None: not yet) and whether to checkpoint.

        One process: the losses are checked every ``check_every`` steps, at a ``boundary``
        (an evaluation or the stage's end) and whenever a checkpoint is due. Distributed: every
        ``check_every`` steps and at a boundary, the same steps on every rank; one all-reduce
        then sums the ranks' losses and carries rank 0's ``checkpoint_due()``.
        """
        ready = len(self._pending) >= self.check_every or boundary
        if self.env is None:
            due = self.ctx.checkpoint_due()
            if not (ready or due):
                return None, False
            return self._pending_losses(due)
        if not ready:
            return None, False
        return self._pending_losses(self.env.is_main and self.ctx.checkpoint_due())

    def run(
        self,
        modules: Mapping[str, Any],
        update: Callable[[int], Mapping[str, Any]],
        *,
        stop: int | None = None,
        stage: str = "train",
        start: int = 0,
        evaluate: Callable[[], Mapping[str, Any]] | None = None,
        eval_at: Iterable[int] | None = None,
        what: str = "training loss",
        schedule: Callable[[int], float] | None = None,
        sync: Callable[[], None] | None = None,
    ) -> dict[str, Any] | None:
        """Run steps ``start .. stop - 1`` of ``stage`` (resuming inside it); returns the
        evaluation after the stage's last step (run now if this session did not run it), or
        None without ``evaluate``.

        Args:
            modules: what the checkpoint holds for this stage (model, optimizers...); restored
                from a checkpoint of the same stage before the first step.
            update: ``update(step) -> {"loss": float or tensor, other progress metrics}``:
                one optimizer step (the loop counts it after ``update`` returns). A tensor
                loss is read only when the losses are checked (see ``check_every``);
                distributed, it is this rank's share of the global batch's mean loss.
            stop: the stage's end (default: ``total``); ``start``: its first step (the curve's
                ``epoch`` counts from there).
            evaluate: ``evaluate() -> {"metric": the task's test metric, ...}``.
            eval_at: steps after which to evaluate (default: :func:`curve_steps`).
            what: the loss's name in the divergence message.
            schedule: ``schedule(step) -> learning rate`` of the step (``step`` counts over all
                stages, from 0), set on every ``torch.optim.Optimizer`` of ``modules`` before
                the step.
            sync: called before every evaluation and checkpoint (distributed: average the
                running statistics over the ranks).

        Raises:
            Diverged: a non-finite loss or test metric; its ``partial`` holds ``step`` (the
                steps before the one with the non-finite loss) and ``curve``.
        """
        stop = self.total if stop is None else int(stop)
        self._stage_start, self._stage_stop = int(start), stop
        if self.resumed_stage(stage):
            for name, obj in modules.items():
                obj.load_state_dict(self._saved["modules"][name])
            torch.set_rng_state(self._saved["rng"])
        optimizers = [o for o in modules.values() if isinstance(o, torch.optim.Optimizer)]
        evals = set(curve_steps(start, stop) if eval_at is None else eval_at)
        if evaluate is not None:
            evals.add(stop)
        ran = False
        while self.step < stop:
            lr = None
            if schedule is not None:
                lr = schedule(self.step)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = lr
            m = update(self.step)
            self.state["step"] += 1
            loss = m["loss"]
            if isinstance(loss, torch.Tensor):
                loss = loss.detach().double()
            if self.env is not None:
                loss = loss / self.env.world_size
            self._pending.append(loss)
            ran = True
            values, due = self._after_step(self.step in evals or self.step == stop)
            if values is not None:
                first = self.step - len(values) + 1
                for i, value in enumerate(values):
                    if not math.isfinite(value):
                        raise Diverged(f"non-finite {what} at step {first + i} ({value})",
                                       {**self._partial(), "step": first + i - 1})
                self.losses.extend(values)
                metrics = {k: _number(v) for k, v in m.items() if k != "loss"}
                if lr is not None:
                    metrics["lr"] = lr
                self.ctx.progress(self.step, self.total, **metrics, loss=_mean(values))
            if evaluate is not None and self.step in evals:
                self.evaluate(evaluate, stage, sync)
            if due and self.step < stop:
                self.save(modules, stage, sync)
        if ran:
            self.save(modules, stage, sync)
        if evaluate is None:
            return None
        if self._last_step == stop and self._last is not None:
            return self._last
        # Resumed after the stage's end: the curve already has its point, evaluate again.
        if sync is not None:
            sync()
        m = dict(evaluate())
        self._last, self._last_step = m, stop
        return m
