"""Training utilities shared by the reproduction tasks.

Everything a task needs to train and evaluate a model reproducibly, resumably and on any
device, independent of what it trains:

* devices and precision: :func:`resolve_device`, :func:`autocast`, :func:`seed_everything`;
* the papers' optimisation rules: :func:`scaled_lr` (linear scaling),
  :class:`Schedule` (step decay or cosine, optional warm-up), :func:`make_sgd`, :func:`set_lr`;
* batches with exact mid-epoch resume: :class:`InMemoryBatches` (tensors, e.g. the bundled
  digits) and :class:`LoaderBatches` (a ``Dataset``, e.g. users' ImageNet/CIFAR-10): batch ``i`` of
  epoch ``e`` depends only on ``(seed, e, i)``, so a resumed run sees exactly the batches an
  uninterrupted one would; :class:`BatchCursor` reads batch ``step`` of an endless sequence
  of epochs, iterating each epoch once as a ``for`` loop does;
* :func:`evaluate` (top-1 accuracy and loss), :func:`check_finite` (raises
  :class:`~bgnorm.repro.api.Diverged`), :func:`median`;
* :func:`train_classifier`: the supervised training of the classification tasks, its step and
  evaluation run by the shared step loop (:class:`~bgnorm.repro.loop.StepLoop`), which
  checkpoints through a :class:`~bgnorm.repro.api.CellContext` and resumes from it bit for bit
  on CPU.

Distributed training (torchrun/DDP, :mod:`bgnorm.repro.dist`): given a
:class:`~bgnorm.repro.dist.DistEnv`, :func:`train_classifier` wraps the model in DDP (optionally
with synchronized norms), every rank draws the same global batch (``InMemoryBatches`` and
``LoaderBatches`` produce it deterministically from the seed) and keeps its own contiguous slice,
the loss is scaled so that DDP's averaged gradient is the single-process gradient of the global
batch, and only rank 0 calls ``ctx.save_checkpoint`` (every rank loads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import dist as _dist
from .api import CellContext, Diverged
from .data import random_crop_batch, seed_worker
from .loop import StepLoop

__all__ = [
    "BatchCursor",
    "BatchSource",
    "ClassifyRecipe",
    "InMemoryBatches",
    "LoaderBatches",
    "SCHEDULES",
    "Schedule",
    "StepSchedule",
    "autocast",
    "check_finite",
    "derive_seed",
    "evaluate",
    "make_sgd",
    "median",
    "resolve_device",
    "scaled_lr",
    "seed_everything",
    "set_lr",
    "standard_layout",
    "train_classifier",
]

CHECKPOINT_VERSION = 2  # 2: the learning curve (one test evaluation per epoch)


# --------------------------------------------------------------------------------------------
# Devices, precision, seeds
# --------------------------------------------------------------------------------------------


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"`` (cuda if available) to a device.

    Raises a ``RuntimeError`` naming the fix when the device is unknown to torch or not
    available here (no CUDA, a CUDA index beyond the devices present, no MPS).
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "cpu").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RuntimeError(f"--device {name}: not a device name torch knows; use cpu, cuda, "
                           "cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {name}: CUDA is not available in this torch build/machine "
            f"(torch {torch.__version__}); use --device cpu"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise RuntimeError(f"--device {name}: this machine has {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"--device {name}: MPS is not available on this machine; use "
                           "--device cpu")
    return device


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """A mixed-precision context: ``amp="bf16"`` autocasts to bfloat16, ``None``/``"none"`` is
    full precision.

    bgnorm's layers compute their statistics in float32 under bf16 autocast; no grad scaler is
    needed for bfloat16.
    """
    if amp in (None, "", "none", "fp32"):
        return contextlib.nullcontext()
    if amp in ("bf16", "bfloat16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown amp mode {amp!r}; valid: none, bf16")


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and Python versions).

    Example:
        >>> derive_seed(0, "epoch", 3) == derive_seed(0, "epoch", 3) != derive_seed(0, "epoch", 4)
        True
    """
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------
# Optimisation rules
# --------------------------------------------------------------------------------------------


def scaled_lr(
    base_lr: float, batch_size: int, workers: int = 1, reference_batch: int = 256
) -> float:
    """The linear scaling rule: ``base_lr * workers * batch_size / reference_batch``.

    The learning rate is proportional to the examples per optimizer step (Goyal et al. 2017),
    with the gradient averaged over all of them (as DDP averages its workers' gradients). The
    papers train on 8 workers with 0.1 at 32 examples per worker: ``reference_batch = 8 * 32``,
    so with ``workers=8`` this is exactly their ``0.1 * batch_size / 32``.

    Example:
        >>> scaled_lr(0.1, 32, workers=8), scaled_lr(0.1, 2, workers=8), scaled_lr(0.1, 128, 8)
        (0.1, 0.00625, 0.4)
    """
    if batch_size < 1 or workers < 1 or reference_batch < 1:
        raise ValueError("batch_size, workers and reference_batch must be >= 1")
    return base_lr * workers * batch_size / reference_batch


#: The learning-rate schedules of :class:`Schedule` (the preset key ``schedule``).
SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """The learning rate as a function of the optimizer step: step decay or cosine, both with
    optional linear warm-up.

    With ``W = warmup_steps`` and ``T = total_steps``:

    * ``kind="step"`` (the BGN and GN papers' schedule):
      ``lr(s) = peak * gamma ** (number of milestones <= s)``;
    * ``kind="cosine"`` (SGDR without restarts, Loshchilov & Hutter 2017):
      ``lr(s) = peak * (1 + cos(pi * (s - W) / (T - W))) / 2`` for ``s >= W``, from ``peak``
      at the end of warm-up to 0 at step ``T`` (the last step, ``T - 1``, still moves);
      ``milestones`` and ``gamma`` are ignored;

    and during warm-up (``s < W``) ``lr(s) = peak * (s + 1) / W`` for both (Goyal et al. 2017).

    Whichever is chosen, every norm of a comparison trains with the same schedule: what the
    suite compares is the norms, not the schedules. The papers use step decay over 100-120
    epochs; the CPU presets use cosine with warm-up, which converges in fewer steps.

    Example:
        >>> s = Schedule.from_epochs(0.4, epochs=100, steps_per_epoch=10)
        >>> s.milestones
        (300, 600, 900)
        >>> [round(s(i), 6) for i in (0, 299, 300, 600, 999)]
        [0.4, 0.4, 0.04, 0.004, 0.0004]
        >>> c = Schedule.from_epochs(0.4, epochs=10, steps_per_epoch=10, warmup_epochs=2,
        ...                          kind="cosine")
        >>> [round(c(i), 6) for i in (0, 19, 20, 60, 100)]
        [0.02, 0.4, 0.4, 0.2, 0.0]
    """

    peak: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    kind: str = "step"
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"Schedule: unknown kind {self.kind!r}; expected one of "
                             f"{', '.join(SCHEDULES)} (the preset key `schedule`)")
        if self.kind == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"Schedule: a cosine schedule needs total_steps ({self.total_steps}) > "
                f"warmup_steps ({self.warmup_steps}); shorten the warm-up (warmup_epochs) or "
                "train longer")

    @classmethod
    def from_epochs(
        cls,
        peak: float,
        epochs: int,
        steps_per_epoch: int,
        milestones: Sequence[float] = (0.3, 0.6, 0.9),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
        kind: str = "step",
    ) -> Schedule:
        """Milestones given as fractions of training (``0.3`` = 30% of the epochs; the papers'
        30/60/90 of 100 epochs); values > 1 are read as epochs. The warm-up is
        ``round(warmup_epochs * steps_per_epoch)`` steps; ``kind`` is ``"step"`` or
        ``"cosine"``."""
        total = epochs * steps_per_epoch
        steps = []
        for m in milestones:
            at = m * total if m <= 1 else m * steps_per_epoch
            steps.append(int(round(at)))
        return cls(peak, tuple(steps), gamma, int(round(warmup_epochs * steps_per_epoch)),
                   kind, total)

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            if step >= self.warmup_steps:
                t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
                return self.peak * (1.0 + math.cos(math.pi * t)) / 2.0
            lr = self.peak
        else:
            lr = self.peak * self.gamma ** sum(step >= m for m in self.milestones)
        if self.warmup_steps and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr


#: The former name of :class:`Schedule` (step decay is its default kind).
StepSchedule = Schedule


def make_sgd(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter (the GN/BGN papers' setting,
    which decays the norms' gamma and beta too)."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
        nesterov=nesterov,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------
# Batches with exact resume
# --------------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """Deterministic epochs of ``(x, y)`` batches that can start at any batch index."""

    def __len__(self) -> int:
        """Batches per epoch."""

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of ``epoch``."""


def standard_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the dense row-major strides of its shape (a copy only when they differ).

    A tensor can be "contiguous" with other strides: size-1 dimensions' strides are ignored, so
    e.g. a one-channel batch cropped through an NHWC view has strides (H*W, 1, W, 1). torch
    2.13's CPU convolution backward corrupts the heap on such inputs in ResNets (seen as
    "corrupted double-linked list" aborts); every batch of the training loop goes through here.
    """
    expected, acc = [], 1
    for size in reversed(x.shape):
        expected.append(acc)
        acc *= size
    if tuple(reversed(expected)) == x.stride():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class InMemoryBatches:
    """Mini-batches over in-memory tensors, each a pure function of ``(seed, epoch, index)``.

    The epoch's order is a permutation drawn from ``(seed, epoch)``; batch ``i``'s augmentation
    (random crop with ``crop_padding`` pixels filled with ``pad_value``, horizontal flip) draws
    from ``(seed, epoch, i)``. ``drop_last`` drops the incomplete last batch (training batches
    must split evenly into virtual workers). Tensors stay on their device.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        crop_padding: int = 0,
        pad_value: float | torch.Tensor = 0.0,
        hflip: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y have different lengths: {len(x)} != {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and len(x) < batch_size:
            raise ValueError(
                f"batch of {batch_size} examples is larger than the {len(x)} training examples; "
                "use a smaller batch size or workers"
            )
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.crop_padding = int(crop_padding)
        self.pad_value = pad_value
        self.hflip = hflip

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(derive_seed(self.seed, "perm", epoch)))
            order = order.to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.crop_padding > 0 or self.hflip:
                g = _generator(derive_seed(self.seed, "aug", epoch, b))
                if self.crop_padding > 0:
                    xb = random_crop_batch(xb, self.crop_padding, g, self.pad_value)
                if self.hflip:
                    flip = (torch.rand(len(xb), generator=g) < 0.5).to(xb.device)
                    xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            yield xb, yb


class _OffsetSampler(Sampler[int]):
    def __init__(self, n: int, seed: int, epoch: int, start: int, shuffle: bool) -> None:
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = _generator(derive_seed(self.seed, "perm", self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.start :])

    def __len__(self) -> int:
        return max(0, self.n - self.start)


class LoaderBatches:
    """Epochs of a ``Dataset`` through a ``DataLoader`` (users' ImageNet / CIFAR-10 copies).

    The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` and can start at any batch,
    so a resumed run sees the same examples in the same order. Random transforms run in the
    loader's workers, seeded from ``(seed, epoch, start)``: a run resumed mid-epoch draws other
    augmentations for the rest of that epoch than an uninterrupted one would.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = _OffsetSampler(
            len(self.dataset), self.seed, epoch, start * self.batch_size, self.shuffle
        )
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=seed_worker if self.num_workers > 0 else None,
            generator=_generator(derive_seed(self.seed, "workers", epoch, start)),
        )
        torch_rng = torch.get_rng_state()
        if self.num_workers == 0:  # in-process transforms draw from the global RNG
            torch.manual_seed(derive_seed(self.seed, "aug", epoch, start))
        try:
            yield from loader
        finally:
            if self.num_workers == 0:
                torch.set_rng_state(torch_rng)


class BatchCursor:
    """Batch ``step`` of an endless sequence of epochs of ``source``, read in order.

    ``batch(step)`` is batch ``step % len(source)`` of epoch ``step // len(source)``. Asked for
    the steps in order (as a training loop asks), the cursor iterates one
    ``source.batches(epoch, start)`` per epoch, exactly as a ``for`` loop over the epoch does
    (the same calls, in the same order, so a source that draws from a global RNG draws the
    same numbers); asked for another step (a resumed run), it starts a new iteration there.
    :meth:`close` ends the current iteration (call it when training stops).

    Example:
        >>> src = InMemoryBatches(torch.arange(6.0).view(6, 1), torch.arange(6), 2, shuffle=False)
        >>> cursor = BatchCursor(src)
        >>> [cursor.batch(s)[1].tolist() for s in (0, 1, 2, 3, 5)]
        [[0, 1], [2, 3], [4, 5], [0, 1], [4, 5]]
        >>> cursor.close()
    """

    def __init__(self, source: BatchSource) -> None:
        self.source = source
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._next: tuple[int, int] | None = None  # (epoch, index) the iterator yields next

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step`` (``(x, y)`` as the source yields it)."""
        at = divmod(int(step), len(self.source))
        if at != self._next:
            self.close()
            self._it = iter(self.source.batches(*at))
        batch = next(self._it)
        self._next = (at[0], at[1] + 1)
        return batch

    def close(self) -> None:
        """End the current epoch's iteration: run to its end when its last batch was read
        (as a ``for`` loop does), else close it."""
        it, self._it, at = self._it, None, self._next
        self._next = None
        if it is None:
            return
        if at is not None and at[1] >= len(self.source):
            for _ in it:  # nothing left to yield: this lets the source finish its epoch
                pass
        elif hasattr(it, "close"):
            it.close()


# --------------------------------------------------------------------------------------------
# Evaluation and divergence
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, source: BatchSource, device: torch.device, amp: str | None = None
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` (in eval mode) over one epoch of
    ``source``; restores the model's previous mode."""
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for xb, yb in source.batches(0):
            xb = standard_layout(xb.to(device, non_blocking=True))
            yb = yb.to(device, non_blocking=True)
            with autocast(device, amp):
                out = model(xb)
            loss_sum += F.cross_entropy(out.float(), yb, reduction="sum").double()
            correct += int((out.argmax(1) == yb).sum())
            total += len(yb)
    finally:
        model.train(was_training)
    return {"acc": 100.0 * correct / max(total, 1), "loss": float(loss_sum) / max(total, 1),
            "n": total}


def check_finite(value: float | torch.Tensor, what: str, partial: Mapping[str, Any] | None = None
                 ) -> None:
    """Raise :class:`Diverged` (recorded as "-" in the tables) if ``value`` is NaN or infinite."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise Diverged(f"non-finite {what} ({v})", partial)


def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count); NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


# --------------------------------------------------------------------------------------------
# The classification loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifyRecipe:
    """How :func:`train_classifier` trains (the papers' ImageNet protocol by default).

    Attributes:
        epochs: training epochs.
        lr: peak learning rate (already scaled, see :func:`scaled_lr`).
        momentum, weight_decay, nesterov: SGD.
        milestones: step-decay points as fractions of training (or epochs if > 1).
        gamma: decay factor at each milestone.
        warmup_epochs: linear warm-up length.
        schedule: ``"step"`` (milestones, gamma) or ``"cosine"`` (see :class:`Schedule`).
        median_of: the reported accuracy is the median of the evaluations after each of the
            last ``median_of`` epochs, as both papers report.
        eval_every: also evaluate every this many epochs before the last ``median_of`` (0: no),
            for learning curves.
        check_every: check the loss for NaN/inf every this many steps (1 on CPU is free; on
            GPU each check synchronizes).
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    schedule: str = "step"
    median_of: int = 5
    eval_every: int = 0
    check_every: int = 1

    def eval_epochs(self) -> list[int]:
        """0-based epochs after which the model is evaluated."""
        last = set(range(max(0, self.epochs - self.median_of), self.epochs))
        if self.eval_every:
            last |= {e for e in range(self.epochs) if (e + 1) % self.eval_every == 0}
        return sorted(last)


def _classify_partial(curve: Sequence[Mapping[str, Any]], steps_per_epoch: int,
                      eval_epochs: Sequence[int]) -> dict[str, Any]:
    """``evals`` (``[epoch, acc, test loss]`` of the epochs in ``eval_epochs``) and
    ``train_losses`` (mean training loss per epoch) from the per-epoch learning curve."""
    evals = [[p["step"] // steps_per_epoch - 1, p["metric"], p["test_loss"]] for p in curve
             if p["step"] // steps_per_epoch - 1 in eval_epochs]
    return {"evals": evals, "train_losses": [p["train_loss"] for p in curve]}


def train_classifier(
    model: nn.Module,
    train: BatchSource,
    test: BatchSource,
    recipe: ClassifyRecipe,
    ctx: CellContext,
    device: torch.device,
    amp: str | None = None,
    env: _dist.DistEnv | None = None,
    sync_norm: bool = False,
) -> dict[str, Any]:
    """Train ``model`` with cross-entropy and SGD on the shared step loop
    (:class:`~bgnorm.repro.loop.StepLoop`); checkpoint through ``ctx``; resume from it.

    The model must already be on ``device``. Each step takes one batch of ``train`` (the whole
    batch of all virtual workers: the loss is its mean, so the gradient is averaged over every
    example), sets the learning rate of :class:`Schedule` and steps SGD. After every epoch the
    model is evaluated on ``test`` (the learning curve); the reported accuracy is the median
    over the epochs of :meth:`ClassifyRecipe.eval_epochs`.

    Checkpoints (the loop's: model, optimizer, step, losses, learning curve, RNG) are saved
    when ``ctx.checkpoint_due()`` and at the end; a run restarted from one reproduces the
    uninterrupted run exactly on CPU. A checkpoint of this function's own format before it
    moved onto the shared loop is discarded with a log line (the cell restarts).

    Returns a JSON-serializable dict: ``acc`` (median of the last ``median_of`` evaluations, %),
    ``final_acc``, ``evals`` (``[epoch, acc, loss]``), ``train_loss`` (mean of the last epoch),
    ``train_losses``, ``steps``, ``steps_per_epoch``, ``examples_per_step``, ``lr``,
    ``train_seconds``, ``recipe`` and ``curve`` (one point per epoch: ``stage``, ``step``,
    ``epoch``, ``progress``, ``train_loss``, ``metric`` = test accuracy, ``test_loss``).

    Distributed (``env``, by default :func:`bgnorm.repro.dist.active`): the model is wrapped in
    DDP (after converting BN/BGN to their synchronized versions when ``sync_norm``); each rank
    trains on its contiguous slice of every global batch with the loss
    ``sum over the slice * world_size / global batch``, so DDP's averaged gradient equals the
    single-process gradient; the reported losses are all-reduced; running statistics are
    averaged over the ranks before every evaluation and checkpoint; every rank evaluates the
    whole test set; only rank 0 saves checkpoints (the others wait at a barrier) and checkpoint
    times are rank 0's decision, so every rank resumes from the same step.

    Raises:
        Diverged: the training loss (or the test loss of an epoch of ``eval_epochs``) became
            NaN or infinite.
    """
    env = env if env is not None else _dist.active()
    distributed = env is not None
    net = _dist.wrap_model(model, env, sync_norm) if distributed else model
    module = _dist.unwrap(net)
    spe = len(train)
    if spe < 1:
        raise ValueError("the training set yields no batch per epoch")
    total = recipe.epochs * spe
    schedule = Schedule.from_epochs(
        recipe.lr, recipe.epochs, spe, recipe.milestones, recipe.gamma, recipe.warmup_epochs,
        recipe.schedule)
    optimizer = make_sgd(module, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.nesterov)
    eval_epochs = recipe.eval_epochs()
    loop = StepLoop(ctx, total, spe, check_every=recipe.check_every, env=env)
    cursor = BatchCursor(train)

    def update(step: int) -> dict[str, Any]:
        xb, yb = cursor.batch(step)
        if distributed:
            n_global = len(yb)
            xb, yb = _dist.shard_batch(xb, yb, env)
        xb = standard_layout(xb.to(device, non_blocking=True))
        yb = yb.to(device, non_blocking=True)
        with autocast(device, amp):
            out = net(xb)
        if distributed:
            # DDP averages the ranks' gradients: sum * R / N gives the global batch's mean.
            loss = F.cross_entropy(out.float(), yb, reduction="sum") * (
                env.world_size / n_global)
        else:
            loss = F.cross_entropy(out.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    def evaluate_epoch() -> dict[str, Any]:
        m = evaluate(module, test, device, amp)
        epoch = loop.step // spe - 1
        if epoch in eval_epochs and not math.isfinite(m["loss"]):
            partial = {"step": loop.step,
                       **_classify_partial(loop.curve, spe, eval_epochs), "curve": loop.curve}
            partial["train_losses"].append(loop.segment_loss("train"))
            raise Diverged(f"non-finite test loss after epoch {epoch + 1} ({m['loss']})",
                           partial)
        return {"metric": m["acc"], "test_loss": m["loss"]}

    net.train()
    try:
        loop.run({"model": module, "optimizer": optimizer}, update, evaluate=evaluate_epoch,
                 eval_at=range(spe, total + 1, spe), schedule=schedule,
                 sync=(lambda: _dist.average_buffers(net)) if distributed else None)
    except Diverged as exc:
        if "evals" not in exc.partial:  # the loop's: a non-finite training loss
            curve = exc.partial.get("curve", [])
            # "step": the steps taken, the one with the non-finite loss included
            exc.partial = {"step": loop.step,
                           **_classify_partial(curve, spe, eval_epochs), "curve": curve}
        raise
    finally:
        cursor.close()
    curve = loop.curve
    done = _classify_partial(curve, spe, eval_epochs)
    accs = [e[1] for e in done["evals"] if int(e[0]) >= recipe.epochs - recipe.median_of]
    return {
        "acc": median(accs),
        "final_acc": done["evals"][-1][1] if done["evals"] else float("nan"),
        "evals": done["evals"],
        "train_loss": done["train_losses"][-1] if done["train_losses"] else float("nan"),
        "train_losses": done["train_losses"],
        "steps": total,
        "steps_per_epoch": spe,
        "examples_per_step": getattr(train, "batch_size", None),
        "lr": recipe.lr,
        "train_seconds": loop.seconds,
        "recipe": asdict(recipe),
        "curve": curve,
        # the training loss is the labels' cross-entropy (the report's "did not fit" reads it)
        "loss": "cross-entropy",
    }
