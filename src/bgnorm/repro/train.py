"""Training utilities shared by the reproduction tasks.

Everything a task needs to train and evaluate a model reproducibly, resumably and on any
device, independent of what it trains:

* devices and precision: :func:`resolve_device`, :func:`autocast`, :func:`seed_everything`;
* the papers' optimisation rules: :func:`scaled_lr` (linear scaling),
  :class:`Schedule` (step decay or cosine, optional warm-up), :func:`make_sgd`, :func:`set_lr`;
* batches with exact mid-epoch resume: :class:`InMemoryBatches` (tensors, e.g. the bundled
  digits) and :class:`LoaderBatches` (a ``Dataset``, e.g. users' ImageNet/CIFAR-10): batch ``i`` of
  epoch ``e`` depends only on ``(seed, e, i)``, so a resumed run sees exactly the batches an
  uninterrupted one would;
* :func:`evaluate` (top-1 accuracy and loss), :func:`check_finite` (raises
  :class:`~bgnorm.repro.api.Diverged`), :func:`median`;
* :func:`train_classifier`: the supervised loop of the classification tasks, checkpointing
  through a :class:`~bgnorm.repro.api.CellContext` and resuming from it bit for bit on CPU.

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
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import dist as _dist
from .api import CellContext, Diverged
from .data import random_crop_batch, seed_worker

__all__ = [
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


@dataclass
class _TrainState:
    step: int = 0
    evals: list[list[float]] = field(default_factory=list)  # [epoch, acc, loss]
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [sum, count]
    train_losses: list[float] = field(default_factory=list)  # mean loss per finished epoch
    seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)  # one point per epoch


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
    """Train ``model`` with cross-entropy and SGD; checkpoint through ``ctx``; resume from it.

    The model must already be on ``device``. Each step takes one batch of ``train`` (the whole
    batch of all virtual workers: the loss is its mean, so the gradient is averaged over every
    example), sets the learning rate of :class:`Schedule` and steps SGD. After each epoch of
    :meth:`ClassifyRecipe.eval_epochs` the model is evaluated on ``test``.

    Checkpoints (model, optimizer, step, evaluations, RNG) are saved when
    ``ctx.checkpoint_due()`` and at the end; a run restarted from one reproduces the
    uninterrupted run exactly on CPU.

    Returns a JSON-serializable dict: ``acc`` (median of the last ``median_of`` evaluations, %),
    ``final_acc``, ``evals`` (``[epoch, acc, loss]``), ``train_loss`` (mean of the last epoch),
    ``train_losses``, ``steps``, ``steps_per_epoch``, ``examples_per_step``, ``lr``, ``recipe``.

    Distributed (``env``, by default :func:`bgnorm.repro.dist.active`): the model is wrapped in
    DDP (after converting BN/BGN to their synchronized versions when ``sync_norm``); each rank
    trains on its contiguous slice of every global batch with the loss
    ``sum over the slice * world_size / global batch``, so DDP's averaged gradient equals the
    single-process gradient; the reported losses are all-reduced; running statistics are
    averaged over the ranks before every evaluation and checkpoint; every rank evaluates the
    whole test set; only rank 0 saves checkpoints (the others wait at a barrier) and checkpoint
    times are rank 0's decision, so every rank resumes from the same step.

    Raises:
        Diverged: the training loss became NaN or infinite.
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
    state = _TrainState()

    saved = ctx.load_checkpoint()
    if saved is not None and (saved.get("version") != CHECKPOINT_VERSION
                              or saved.get("total") != total):
        ctx.log(f"discarding the checkpoint in {ctx.workdir}: written by another version of the "
                "suite or for another number of steps; the cell restarts from step 0")
        saved = None
    if saved is not None:
        module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        state = _TrainState(
            step=int(saved["step"]),
            evals=[list(e) for e in saved["evals"]],
            epoch_loss=list(saved["epoch_loss"]),
            train_losses=list(saved["train_losses"]),
            seconds=float(saved["seconds"]),
            curve=[dict(p) for p in saved["curve"]],
        )
        ctx.log(f"resumed at step {state.step}/{total}")

    def save() -> None:
        if distributed:
            _dist.average_buffers(net)
            if not env.is_main:
                _dist.barrier("the checkpoint barrier")
                return
        ctx.save_checkpoint({
            "version": CHECKPOINT_VERSION,
            "total": total,
            "model": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "step": state.step,
            "evals": state.evals,
            "epoch_loss": state.epoch_loss,
            "train_losses": state.train_losses,
            "seconds": state.seconds + (time.perf_counter() - t0),
            "curve": state.curve,
        })
        if distributed:
            _dist.barrier("the checkpoint barrier")

    def partial() -> dict[str, Any]:
        return {"step": state.step, "evals": state.evals, "train_losses": state.train_losses,
                "curve": state.curve}

    def finish_epoch(epoch: int) -> None:
        s, c = state.epoch_loss
        state.train_losses.append(s / c if c else float("nan"))
        state.epoch_loss = [0.0, 0.0]
        if any(p["epoch"] == epoch + 1 for p in state.curve):
            return
        # Every epoch is evaluated for the learning curve; the reported accuracy stays the
        # median over eval_epochs (evaluation changes no weights, buffers or RNG state).
        if distributed:
            _dist.average_buffers(net)
        m = evaluate(module, test, device, amp)
        if epoch in eval_epochs:
            check_finite(m["loss"], f"test loss after epoch {epoch + 1}", partial())
            state.evals.append([epoch, m["acc"], m["loss"]])
        state.curve.append({"epoch": epoch + 1, "step": (epoch + 1) * spe,
                            "progress": (epoch + 1) / recipe.epochs,
                            "train_loss": state.train_losses[-1], "metric": m["acc"],
                            "test_loss": m["loss"]})

    t0 = time.perf_counter()
    net.train()
    # A checkpoint taken right after an epoch's last step but before its end-of-epoch work.
    if state.step and state.step % spe == 0 and len(state.train_losses) < state.step // spe:
        finish_epoch(state.step // spe - 1)
    pending = torch.zeros((), dtype=torch.float64, device=device)
    pending_n = 0
    last_loss = float("nan")
    while state.step < total:
        epoch, start = divmod(state.step, spe)
        for xb, yb in train.batches(epoch, start):
            set_lr(optimizer, schedule(state.step))
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
            state.step += 1
            # Distributed: this rank's share of the global batch's mean loss (summed below).
            pending += loss.detach().double() / (env.world_size if distributed else 1)
            pending_n += 1
            at_end = state.step % spe == 0
            if distributed:
                check = pending_n >= recipe.check_every or at_end
                due = False
                if check:  # the same steps on every rank: one all-reduce of (loss, due)
                    flags = torch.stack([
                        pending.detach().to(torch.float64),
                        torch.tensor(float(env.is_main and ctx.checkpoint_due()),
                                     dtype=torch.float64, device=pending.device),
                    ])
                    _dist.all_reduce_sum(flags, f"the loss all-reduce at step {state.step}")
                    pending.copy_(flags[0])
                    due = bool(flags[1] > 0)
            else:
                due = ctx.checkpoint_due()
                check = pending_n >= recipe.check_every or at_end or due
            if check:
                loss_sum = float(pending)
                check_finite(loss_sum, f"training loss at step {state.step}", partial())
                state.epoch_loss[0] += loss_sum
                state.epoch_loss[1] += pending_n
                last_loss = loss_sum / pending_n
                pending.zero_()
                pending_n = 0
                ctx.progress(state.step, total, loss=last_loss, lr=schedule(state.step - 1))
                if at_end:
                    finish_epoch(epoch)
                if due:
                    save()
    save()  # final state: a rerun after a crash before the record is written returns at once
    accs = [e[1] for e in state.evals if int(e[0]) >= recipe.epochs - recipe.median_of]
    elapsed = state.seconds + (time.perf_counter() - t0)
    return {
        "acc": median(accs),
        "final_acc": state.evals[-1][1] if state.evals else float("nan"),
        "evals": state.evals,
        "train_loss": state.train_losses[-1] if state.train_losses else float("nan"),
        "train_losses": state.train_losses,
        "steps": total,
        "steps_per_epoch": spe,
        "examples_per_step": getattr(train, "batch_size", None),
        "lr": recipe.lr,
        "train_seconds": elapsed,
        "recipe": asdict(recipe),
        "curve": state.curve,
    }
