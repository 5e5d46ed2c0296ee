"""Which engine runs a BGN/GBGN call: every engine threshold, the choice, and the override.

The engines (one module each under :mod:`bgnorm.ops`):

=============  ==============================================================================
"batchnorm"    G = C in BGN: torch's own ``F.batch_norm``, bit for bit (any engine forced)
"bands"        G a multiple of C in BGN: native batch norm on the (N, G, D/G) view
               (:mod:`~bgnorm.ops.bands`)
"channels"     C a multiple of G in BGN: few native calls (:mod:`~bgnorm.ops.channels`)
"units"        every layout, BGN and GBGN: native per-row moments over the units view
               (:mod:`~bgnorm.ops.units`); sub-choices: statistics kernel, columns layout
"general"      every layout: the closed form inductor fuses (:mod:`~bgnorm.ops.general`)
"composed"     torch.func transforms: plain differentiable ops (:mod:`~bgnorm.ops.composed`)
"triton"       the fused kernels (:mod:`~bgnorm.ops.triton_bgn`), where they run the input
=============  ==============================================================================

Eval is one pass (:mod:`~bgnorm.ops.eval`) chosen by :func:`choose_eval_pass`.

The default choice (:func:`choose_engine`) follows measurements: each threshold below says
where its number was measured. Tests and benchmarks select an engine with
:func:`force_engine`, a context manager, instead of setting module globals.

Example:
    >>> x = torch.randn(8, 64, 7, 7)
    >>> choose_engine(x, 16)
    'channels'
    >>> with force_engine("general"):
    ...     choose_engine(x, 16)
    'general'
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from . import triton_bgn
from .plan import UnitsPlan, in_functorch_transform, unit_length

__all__ = [
    "ENGINES", "CUDA_ENGINES", "Thresholds", "choose_engine", "choose_eval_pass",
    "force_engine", "forced_engine", "thresholds", "use_columns", "use_unit_statistics",
    "eval_reduction", "channels_affine_kernel",
]

# --- the measured thresholds -----------------------------------------------------------------

#: "auto" takes the few-calls batch-norm engines ("bands", "channels") for BGN inputs up to
#: this many elements (where per-call overhead dominates) and the units engine above it (fewer,
#: faster passes; torch's batch-norm statistics kernel is slow on large CPU tensors). Measured
#: on CPU with benchmarks/bench_norms.py.
SMALL_NUMEL = 1 << 18

#: Groups shorter than this get their BGN statistics from the native batch-norm statistics
#: kernel on the units view, merged over the units of a group (faster for short rows); longer
#: ones from per-(n, g) native group-norm moments merged over the batch (faster for long
#: rows). Measured on CPU with benchmarks/bench_norms.py; both keep float32 round-off accuracy
#: on inputs like 1e4 + N(0, 1) (tests/test_functional.py::test_large_offset_float32).
SHORT_GROUP = 32

#: BGN inputs whose units are shorter than this many elements, with at least
#: :data:`COLUMNS_MIN_BATCH` examples, use the *columns* layout of the units engine: every
#: element of an example is its own unit (L = 1), so every pass runs over the 2D (N, C*S) view
#: with per-column coefficients (batch-norm statistics and reductions over N, TensorIterator
#: affines), where torch's CPU kernels are fast; on short rows (bands of 32, 2x2 maps) the
#: group-norm and batch-norm kernels pay a per-row cost. Measured with benchmarks/bench_norms.py.
SHORT_UNIT = 48
COLUMNS_MIN_BATCH = 4

#: Eval runs over the columns layout when units are at most this long (and x has spatial
#: axes) and the units view has at least :data:`EVAL_COLUMNS_MIN_ROWS` rows (N * U): torch's
#: batch-norm kernel pays a per-row cost (6x slower on 2x2 maps than on whole channels of the
#: same tensor on the 2-core CPU), while folding and spreading the per-column scale/shift costs
#: about ten small ops. Bands of 32 measured 1.2x BatchNorm either way; 2D inputs take the
#: kernel's fast 2D path. Measured with benchmarks/bench_norms.py.
EVAL_SHORT_UNIT = 16
EVAL_COLUMNS_MIN_ROWS = 1 << 15

#: The channels engine applies gamma/beta with torch's eval-mode batch-norm kernel when maps
#: have at least this many elements (2-3x faster than a broadcast addcmul on CPU at 8x8, 4x4
#: and 3x3 maps), with an addcmul below (the kernel's per-row cost: 2x slower at 2x2).
#: Measured with benchmarks/bench_norms.py.
AFFINE_MIN_SPATIAL = 8

#: Devices whose batch-norm backward reduction the native engines call in eval mode with the
#: statistics as running statistics and no weight (torch's CPU kernel). Elsewhere (CUDA) they
#: pass saved statistics and a weight of ones, which CUDA's kernel needs (found on the H200 by
#: benchmarks/gpu_check.sh). Tests run that form on CPU with
#: ``force_engine(eval_reduction_devices=())`` (tests/test_functional.py).
EVAL_REDUCTION_DEVICES: tuple[str, ...] = ("cpu",)

#: What "auto" trains CUDA tensors with: the first of these engines that runs the input.
#: "triton" (the fused kernels, where ``triton_bgn.supports(input)``: triton importable,
#: float32/16/bfloat16), "native" (the CPU choice: "bands"/"channels" up to
#: :data:`SMALL_NUMEL` elements, else "units"), "general" (the eager composition; runs every
#: input). Set from the measured table of ``bash benchmarks/gpu_check.sh`` (H200, torch 2.11,
#: 2026-11-30, benchmarks/gpu/h200-2026-11-30-run2*): triton had the fastest training pass of
#: the engines on 43 of the 48 ResNet-50 cells and passed every CUDA test; the native engines
#: were faster on 5 cells but still fail 12 gradient checks on CUDA (float32/bfloat16 at one
#: GBGN shape, and 1e4 + N(0, 1) inputs), and general was 2-10x slower than triton.
CUDA_ENGINES: tuple[str, ...] = ("triton", "general")

_NEVER = 1 << 62  # a threshold no size reaches


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The thresholds in force (defaults: the measured module constants above)."""

    small_numel: int = SMALL_NUMEL
    short_group: int = SHORT_GROUP
    short_unit: int = SHORT_UNIT
    columns_min_batch: int = COLUMNS_MIN_BATCH
    eval_short_unit: int = EVAL_SHORT_UNIT
    eval_columns_min_rows: int = EVAL_COLUMNS_MIN_ROWS
    affine_min_spatial: int = AFFINE_MIN_SPATIAL
    eval_reduction_devices: tuple[str, ...] = EVAL_REDUCTION_DEVICES


#: The names :func:`force_engine` takes. "auto" is the measured choice; "batchnorm" the
#: few-calls native engines ("bands" or "channels" in BGN where they apply, else "units");
#: "units" the units engine with the measured sub-choices; "units-bnstats",
#: "units-gnstats" and "units-columns" the units engine with one statistics kernel
#: (batch-norm per unit; group-norm per (n, g)) and no columns layout, or the columns layout
#: wherever it applies, in training and eval; "general"; "triton" (inputs the kernels cannot
#: run take "auto").
ENGINES = ("auto", "batchnorm", "units", "units-bnstats", "units-gnstats", "units-columns",
           "general", "triton")

_NO_COLUMNS = {"short_unit": 0, "columns_min_batch": _NEVER, "eval_short_unit": 0,
               "eval_columns_min_rows": _NEVER}
_VARIANTS: dict[str, dict[str, object]] = {
    "units-bnstats": {"short_group": _NEVER, **_NO_COLUMNS},
    "units-gnstats": {"short_group": 0, **_NO_COLUMNS},
    "units-columns": {"short_group": 0, "short_unit": _NEVER, "columns_min_batch": 1,
                      "eval_short_unit": _NEVER, "eval_columns_min_rows": 0},
}


@dataclasses.dataclass(frozen=True)
class _Setting:
    engine: str
    thresholds: Thresholds


# One process-wide setting, replaced (never mutated) by force_engine and restored on exit: a
# plain module global, which torch.compile reads and guards like any other (a ContextVar it
# cannot trace).
_MEASURED = _Setting("auto", Thresholds())
_setting = _MEASURED
_lock = threading.Lock()


def thresholds() -> Thresholds:
    """The thresholds in force (the measured ones unless :func:`force_engine` changed them)."""
    return _setting.thresholds


def forced_engine() -> str:
    """The engine name in force: "auto" unless :func:`force_engine` set another."""
    return _setting.engine


@contextlib.contextmanager
def force_engine(name: str | None = None, **overrides: object) -> Iterator[None]:
    """Run BGN/GBGN calls in this block on engine ``name`` (one of :data:`ENGINES`), with the
    measured thresholds or ``overrides`` of :class:`Thresholds` fields; ``name=None`` keeps
    the engine in force and overrides only the given thresholds. The previous setting is
    restored on exit, also on an exception; blocks nest.

    The setting is process-wide (every thread sees it; entering and leaving is locked): meant
    for tests and benchmarks, which run one configuration at a time. Under torch.compile the
    choice is read while tracing and guarded, so a compiled function recompiles when the
    setting changes.

    Example:
        >>> x = torch.randn(8, 64, 7, 7)
        >>> with force_engine("units-columns"):
        ...     choose_engine(x, 16), use_columns(8, 64, 49, 16, 1)
        ('units', True)
    """
    global _setting
    if name is not None and name not in ENGINES:
        raise ValueError(f"force_engine: unknown engine {name!r}; choose one of {ENGINES}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Thresholds)}
    if unknown:
        raise TypeError(f"force_engine: unknown thresholds {sorted(unknown)}; the fields of "
                        f"Thresholds are {[f.name for f in dataclasses.fields(Thresholds)]}")
    with _lock:
        previous = _setting
        if name is None:
            engine, base = previous.engine, previous.thresholds
        else:
            engine, base = name.split("-")[0], Thresholds()
        changes = {**_VARIANTS.get(name or "", {}), **overrides}
        _setting = _Setting(engine, dataclasses.replace(base, **changes))  # type: ignore[arg-type]
    try:
        yield
    finally:
        with _lock:
            _setting = previous


# --- the choices --------------------------------------------------------------------------------

def choose_engine(input: Tensor, num_groups: int, examples_per_group: int | None = None) -> str:
    """The engine that trains ``input`` (N, C, \\*) with ``num_groups`` groups, in batch groups
    of ``examples_per_group`` examples (None: BGN, one batch group): one of "batchnorm",
    "bands", "channels", "units", "general", "composed", "triton" (see the module docstring).
    GBGN with e = N chooses as BGN except for G = C.

    ==============  ===========================================================
    BGN with G = C  "batchnorm" (torch's kernel, whatever the engine in force)
    torch.func      "composed" (transforms run plain torch ops only)
    forced          the engine in force (:func:`force_engine`); "triton" only where
                    ``triton_bgn.supports(input)``, else as "auto"
    traced          "general" (torch.compile: inductor fuses its composition)
    CUDA            the first of :data:`CUDA_ENGINES` that runs the input
    CPU and others  BGN up to ``small_numel`` elements: "bands" (G a multiple of C) or
                    "channels" (C a multiple of G); else "units"
    ==============  ===========================================================

    Example:
        >>> choose_engine(torch.randn(8, 64, 7, 7), 128), choose_engine(torch.randn(8, 64), 8, 4)
        ('bands', 'units')
    """
    c = input.shape[1]
    if examples_per_group is None:
        if num_groups == c:
            return "batchnorm"
        batch_groups = 1
    else:
        batch_groups = input.shape[0] // examples_per_group
    engine = _setting.engine
    if engine == "triton" and not triton_bgn.supports(input):
        engine = "auto"
    if in_functorch_transform():
        return "composed"
    if engine == "auto":
        engine = _auto(input, batch_groups)
    if engine == "batchnorm":
        return _few_calls(c, num_groups, batch_groups)
    return engine


def _auto(input: Tensor, batch_groups: int) -> str:
    """"auto" resolved to "general", "triton", "batchnorm" (few calls) or "units"."""
    if torch.compiler.is_compiling():
        return "general"
    if input.device.type == "cuda":
        for name in CUDA_ENGINES:
            if name == "triton" and not triton_bgn.supports(input):
                continue
            if name != "native":
                return name
            break
    if batch_groups == 1 and input.numel() <= _setting.thresholds.small_numel:
        return "batchnorm"
    return "units"


def _few_calls(c: int, num_groups: int, batch_groups: int) -> str:
    """The few-calls native engine for these groups: "bands", "channels", else "units"."""
    if batch_groups == 1:
        if num_groups % c == 0:
            return "bands"
        if c % num_groups == 0:
            return "channels"
    return "units"  # straddling groups, GBGN


def use_columns(n: int, c: int, s: int, g: int, p0: int) -> bool:
    """Whether the units engine trains (N, C, S, G, P0) over the columns layout (L = 1): BGN
    with at least ``columns_min_batch`` examples and units shorter than ``short_unit``."""
    t = _setting.thresholds
    return p0 == 1 and n >= t.columns_min_batch and unit_length(c, s, g) < t.short_unit


def use_unit_statistics(plan: UnitsPlan) -> bool:
    """Whether the units engine takes the statistics of ``plan`` from the batch-norm kernel per
    unit (BGN with groups shorter than ``short_group``, or the columns layout) rather than from
    the group-norm kernel per (n, g)."""
    return plan.p0 == 1 and (plan.lg < _setting.thresholds.short_group or plan.l == 1)


def eval_reduction(device: torch.device) -> bool:
    """Whether the native backward reductions on ``device`` take the eval-mode form (running
    statistics, no weight: ``eval_reduction_devices``) rather than CUDA's saved-statistics
    form."""
    return device.type in _setting.thresholds.eval_reduction_devices


def channels_affine_kernel(spatial: int) -> bool:
    """Whether the channels engine applies gamma/beta with the eval-mode batch-norm kernel
    (maps of at least ``affine_min_spatial`` elements) rather than an addcmul."""
    return spatial >= _setting.thresholds.affine_min_spatial


def choose_eval_pass(x: Tensor, plan: UnitsPlan, param_dtype: torch.dtype) -> str:
    """The eval pass (:mod:`~bgnorm.ops.eval`) for inputs like ``x`` over ``plan``:

    * "columns": many short units (L <= ``eval_short_unit``, at least
      ``eval_columns_min_rows`` rows N * U, spatial axes, float32/float64 on CPU in the
      parameters' dtype, contiguous, BGN, not traced): one addcmul over the 2D (N, D) view.
    * "channels": units are channels (G divides C): torch's batch norm on x as it is.
    * "units": otherwise (bands, straddling groups): the batch-norm pass over the units view.

    Traced (torch.compile, torch.export): never "columns", a choice by batch size that would
    guard a dynamic batch dimension (and fail an export over a range crossing the threshold).

    Example:
        >>> from bgnorm.ops.plan import units_plan
        >>> choose_eval_pass(torch.randn(8, 64, 7, 7), units_plan(8, 64, 49, 16, 1),
        ...                  torch.float32)
        'channels'
    """
    t = _setting.thresholds
    if (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu" and x.dtype == param_dtype and plan.p0 == 1 and x.dim() > 2
        and x.dtype in (torch.float32, torch.float64)  # half: the kernels fold in float32
        and plan.l <= t.eval_short_unit and plan.n * plan.u >= t.eval_columns_min_rows
        and x.is_contiguous()
    ):
        return "columns"
    if plan.l == plan.s:
        return "channels"
    return "units"
