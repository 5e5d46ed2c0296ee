r"""BGN and GBGN training passes as fused Triton kernels, registered as ``torch.library`` ops.

The default on CUDA (:data:`bgnorm.ops.dispatch.CUDA_ENGINES`), and on CPU with
``bgnorm.ops.dispatch.force_engine("triton")``: BGN/GBGN training calls come here when
:func:`supports` accepts the input (float32/float16/bfloat16 on CUDA, or on CPU when the
kernels run under Triton's interpreter, ``TRITON_INTERPRET=1`` set before this engine's first
use); anything else (float64, a CPU without the interpreter, torch.func transforms) takes the
other engines. Eval uses the native eval pass.

Passes (see :mod:`bgnorm.ops.triton_kernels` for the tiling):

forward
  1. per-(example, segment, unit) mean and M2 of x (float32, Chan merges in registers);
  2. one program per statistic (P0, G) merges them: mean, biased var, rstd;
  3. y = (x - mean_q) * rstd_q * gamma_c + beta_c, in x's dtype and memory format.
backward
  1. per-(example, segment, unit) sum(dy) and sum(dy * (x - mean_q));
  2. one launch of both merges: per channel dbeta_c = sum(dy), dgamma_c = sum(rstd_q *
     sum(dy (x - mean_q))); per statistic m1_q = mean_q(gamma_c dy), m2_q = mean_q(gamma_c
     dy xhat);
  3. dx = rstd_q * (gamma_c dy - m1_q - xhat m2_q).

Host work per call is kept small (the first GPU run measured ~1.4 ms of host time per
forward+backward against 0.1-0.3 ms of kernels): eager calls go through an autograd.Function
that calls the kernels directly (the custom-op dispatch cost ~300 us per call there), tiles
and grids are cached per shape, each pass makes one workspace allocation, and unused
statistics gradients are not zero-filled.

Full-size traffic: forward reads x twice and writes y, backward reads (x, dy) twice and writes
dx. Inputs are NCHW-contiguous or channels-last (4D ``channels_last``, 5D
``channels_last_3d``); other strides are made contiguous first. ``torch.ops.bgnorm.bgn_triton_fwd``
and ``bgn_triton_bwd`` have fake implementations, so torch.compile(fullgraph=True) and
torch.export see one op each (traced and fake calls take the ops); running statistics are
updated by the caller from the returned batch statistics
(:func:`bgnorm.ops.plan.update_running`).

Example:
    >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: Triton's interpreter
    '1'
    >>> x = torch.randn(4, 8, 3, 3)
    >>> y, mean, var = triton_grouped_norm(x, 4, 1, None, None, 1e-5)
    >>> y.shape, mean.shape
    (torch.Size([4, 8, 3, 3]), torch.Size([4]))
"""

import contextlib
import functools
import importlib.util
import math
from typing import Optional

import torch
from torch import Tensor

from .composed import differentiable_grads
from .plan import is_fake, unit_length, update_running

__all__ = ["supports", "triton_grouped_norm", "available", "reads_layout"]

#: Elements per tile of every pass (a power of two).
TILE = 2048
#: Programs the reductions aim for (each unit's elements are split into segments until the
#: grid has about this many; an H200 has 132 SMs).
TARGET_PROGRAMS = 1024
#: Partials a merge program reads per step (a power of two).
MERGE_BLOCK = 512
#: Widest channel block of a channels-last tile (a power of two).
CL_CHANNELS = 64
NUM_WARPS = 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_AVAILABLE = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether triton can be imported (checked once, without importing it)."""
    return _AVAILABLE


@functools.cache
def _kernels():
    from . import triton_kernels
    return triton_kernels


#: {"on": whether the kernels run under Triton's interpreter}, filled by the first check (a
#: plain dict that torch.compile reads as a constant).
_INTERPRETER: dict[str, bool] = {}


def _interpreted() -> bool:
    """Whether the kernels were defined under Triton's interpreter (TRITON_INTERPRET=1 is read
    when a kernel is defined, i.e. when this engine's kernel module is first imported)."""
    if "on" not in _INTERPRETER:
        kind = type(_kernels().normalize_kernel).__name__
        _INTERPRETER["on"] = kind == "InterpretedFunction"
    return _INTERPRETER["on"]


def supports(x: Tensor) -> bool:
    """Whether the Triton engine runs ``x``: float32/float16/bfloat16 with at least 2 dims, on
    CUDA, or on CPU with the kernels under Triton's interpreter (whose first check imports the
    kernels: do it eagerly before torch.compile traces a CPU call)."""
    if x.dtype not in _DTYPES or x.dim() < 2 or not _AVAILABLE:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _interpreted()


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out (N, *spatial, C) and not NCHW-contiguous."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def reads_layout(x: Tensor) -> bool:
    """Whether the kernels read ``x`` as it is (NCHW-contiguous or dense channels-last), with
    no copy; y and dx then have its layout."""
    return x.is_contiguous() or _channels_last(x)


def _memory_format(x: Tensor) -> torch.memory_format:
    if not _channels_last(x):
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


class _Geometry:
    """Tiles and grids of one (shape, G, P0, layout): see :mod:`bgnorm.ops.triton_kernels`."""

    def __init__(self, shape: torch.Size, g: int, p0: int, channels_last: bool) -> None:
        n, c = int(shape[0]), int(shape[1])
        s = math.prod(int(v) for v in shape[2:])
        self.n, self.c, self.s, self.d, self.g, self.p0 = n, c, s, c * s, g, p0
        self.e = n // p0
        self.lu = unit_length(c, s, g)
        self.ns = s // self.lu
        self.u = self.d // self.lu
        self.upg = self.d // g // self.lu
        self.count = self.e * (self.d // g)
        self.channels_last = channels_last
        lu2 = max(2, _next_pow2(self.lu))
        if channels_last:  # columns: consecutive channels; rows: positions of the unit
            self.bu = max(2, min(_next_pow2(c), CL_CHANNELS, TILE // 2))
            self.bj = max(2, min(TILE // self.bu, lu2))
            self.cb = -(-c // self.bu)
            self.nb = self.ns * self.cb
        else:  # columns: consecutive units; rows: elements of the unit
            self.bj = max(2, min(lu2, TILE // 2))
            self.bu = max(2, min(TILE // self.bj, _next_pow2(self.u)))
            self.cb = 1
            self.nb = -(-self.u // self.bu)
        self.jb = -(-self.lu // self.bj)  # row blocks per unit
        split = min(self.jb, max(1, -(-TARGET_PROGRAMS // (n * self.nb))))
        self.n_iter = -(-self.jb // split)
        self.split = -(-self.jb // self.n_iter)
        self.seg = self.n_iter * self.bj

    def unit_args(self) -> tuple[int, ...]:
        return (self.c, self.d, self.lu, self.ns, self.u, self.cb, self.nb)


@functools.lru_cache(maxsize=512)
def _cached_geometry(shape: tuple[int, ...], g: int, p0: int, channels_last: bool,
                     tiling: tuple[int, int, int]) -> _Geometry:
    return _Geometry(torch.Size(shape), g, p0, channels_last)


def _geometry(x: Tensor, g: int, p0: int) -> _Geometry:
    """The :class:`_Geometry` of ``x``'s shape and layout, cached per (shape, G, P0, layout,
    tiling constants): no Python arithmetic per call on a training step's repeated shapes."""
    return _cached_geometry(tuple(x.shape), g, p0, _channels_last(x),
                            (TILE, TARGET_PROGRAMS, CL_CHANNELS))


def _check_sizes(x: Tensor, g: int, p0: int) -> None:
    torch._check(x.dim() >= 2, lambda: "bgn_triton: expected an (N, C, *) input")
    d = math.prod(x.shape[1:])
    torch._check(d % g == 0, lambda: f"bgn_triton: {g} groups do not divide D = {d}")
    torch._check(x.shape[0] % p0 == 0,
                 lambda: f"bgn_triton: {p0} batch groups do not divide N = {x.shape[0]}")
    torch._check(d < 2**31, lambda: "bgn_triton: D = C * prod(spatial) must be below 2^31")


_NO_CONTEXT = contextlib.nullcontext()


def _launch_device(x: Tensor):
    """Triton launches on the current CUDA device: make it x's for the launches when it is
    not (no device switch, a few microseconds each way, on the common single-device path)."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _NO_CONTEXT


#: Compiled kernels launched directly, without JITFunction.run's per-call argument binding:
#: 27-31 us per launch through the JIT against 12-15 us through the compiled kernel's own
#: launcher on the first GPU run's machine (triton 3.6, measured there, outputs equal). Keyed
#: by everything Triton specializes a compiled kernel on and more (every int's value, every
#: tensor's dtype and 16-byte alignment, the constexprs and num_warps), so a hit is the
#: kernel the JIT picked for the same key. On any error the JIT launches take over.
_COMPILED: dict[tuple, object] = {}
_DIRECT = {"on": True}


def _launch(kernel, grid: int, args: tuple, meta: dict) -> None:
    """``kernel[(grid,)](*args, **meta)``: on CUDA through the cached compiled kernel after
    the first launch of a key (the kernels are pure functions of their inputs: a launch
    retried after an error writes the same outputs)."""
    if not _DIRECT["on"] or args[0].device.type != "cuda":
        kernel[(grid,)](*args, **meta)
        return
    key = (kernel, *meta.items(), *[(a.dtype, a.data_ptr() % 16) if isinstance(a, Tensor)
                                    else a for a in args])
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[(grid,)](*args, **meta)
        if len(_COMPILED) >= 4096:  # bounded: a model has a few dozen shapes
            _COMPILED.clear()
        _COMPILED[key] = compiled
        return
    try:
        constexprs = [meta[name] for name in kernel.arg_names[len(args):]]
        compiled[(grid, 1, 1)](*args, *constexprs)
    except Exception:
        _DIRECT["on"] = False
        kernel[(grid,)](*args, **meta)


def _aligned(n: int) -> int:
    """``n`` rounded up to 4 float32 (16 bytes): workspace slices stay 16-byte aligned, the
    alignment Triton specializes pointers on (one compiled variant per kernel)."""
    return -(-n // 4) * 4


def _workspace(device: torch.device, sizes: tuple[int, ...]) -> list[Tensor]:
    """float32 buffers of ``sizes`` as 16-byte-aligned slices of one allocation (one
    caching-allocator call instead of one per buffer)."""
    splits: list[int] = []
    for n in sizes:
        splits += [n, _aligned(n) - n]
    ws = torch.empty(sum(splits), dtype=torch.float32, device=device)
    return list(ws.split_with_sizes(splits)[::2])


def _fwd_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, batch_groups: int,
    eps: float, fresh: bool, running: tuple[Tensor, Tensor, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward's three launches: (y, mean, biased var, rstd). ``fresh``: the statistics
    are separate tensors (a custom op's outputs may not alias each other); otherwise they are
    slices of the partials' workspace (one allocation besides y). ``running``
    (running_mean, running_var, momentum), BGN only: updated in place by the merge kernel."""
    geo = _geometry(x, num_groups, batch_groups)
    k = _kernels()
    parts = geo.n * geo.split * geo.u
    q = geo.p0 * geo.g
    y = torch.empty_like(x)
    if fresh:
        pmean, pm2 = _workspace(x.device, (parts, parts))
        mean, var, rstd = (torch.empty(q, dtype=torch.float32, device=x.device)
                           for _ in range(3))
    else:
        pmean, pm2, mean, var, rstd = _workspace(x.device, (parts, parts, q, q, q))
    with _launch_device(x):
        _launch(k.stats_partials_kernel, geo.n * geo.split * geo.nb,
                (x, pmean, pm2, *geo.unit_args(), geo.split, geo.seg, geo.n_iter),
                dict(CHANNELS_LAST=geo.channels_last, BJ=geo.bj, BU=geo.bu, num_warps=NUM_WARPS))
        rm, rv, momentum = (mean, mean, 0.0) if running is None else running
        _launch(k.stats_merge_kernel, q,
                (pmean, pm2, mean, var, rstd, rm, rv, geo.g, geo.u, geo.upg, geo.e, geo.split,
                 geo.seg, geo.lu, 1.0 / geo.count, float(eps), float(momentum),
                 geo.count / max(geo.count - 1, 1)),
                dict(BK=MERGE_BLOCK, HAS_RUNNING=running is not None, num_warps=NUM_WARPS))
        _launch(k.normalize_kernel, geo.n * geo.jb * geo.nb,
                (x, y, mean, rstd, mean if weight is None else weight,
                 mean if bias is None else bias, *geo.unit_args(), geo.jb, geo.g, geo.upg, geo.e),
                dict(CHANNELS_LAST=geo.channels_last, HAS_W=weight is not None,
                     HAS_B=bias is not None, BJ=geo.bj, BU=geo.bu, num_warps=NUM_WARPS))
    return y, mean, var, rstd


@torch.library.custom_op("bgnorm::bgn_triton_fwd", mutates_args=())
def bgn_triton_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
    batch_groups: int, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BGN/GBGN training forward: (y, mean, biased var, rstd), statistics (P0*G,) float32.
    ``x`` must be NCHW-contiguous or channels-last (4D/5D); y has its dtype and layout."""
    _check_sizes(x, num_groups, batch_groups)
    return _fwd_impl(x, weight, bias, num_groups, batch_groups, eps, fresh=True)


@bgn_triton_fwd.register_fake
def _(x, weight, bias, num_groups, batch_groups, eps):
    _check_sizes(x, num_groups, batch_groups)
    q = batch_groups * num_groups
    stat = x.new_empty((q,), dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat)


def _bwd_impl(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, num_groups: int,
    batch_groups: int, need_dx: bool, fresh: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The backward's three launches (two without dx): (dx or None, dweight, dbias), the
    latter (C,) float32 (``fresh``: separate tensors, else two rows of one)."""
    dy = dy.contiguous(memory_format=_memory_format(x))
    geo = _geometry(x, num_groups, batch_groups)
    k = _kernels()
    c, q = geo.c, geo.p0 * geo.g
    parts = geo.n * geo.split * geo.u
    ps1, ps2, m1, m2 = _workspace(x.device, (parts, parts, q, q))
    if fresh:
        dw, db = (torch.empty(c, dtype=torch.float32, device=x.device) for _ in range(2))
    else:
        dw, db = torch.empty((2, c), dtype=torch.float32, device=x.device).unbind(0)
    w = mean if weight is None else weight
    dx = None
    with _launch_device(x):
        _launch(k.backward_partials_kernel, geo.n * geo.split * geo.nb,
                (dy, x, mean, ps1, ps2, *geo.unit_args(), geo.split, geo.seg, geo.n_iter, geo.g,
                 geo.upg, geo.e),
                dict(CHANNELS_LAST=geo.channels_last, BJ=geo.bj, BU=geo.bu, num_warps=NUM_WARPS))
        _launch(k.backward_merge_kernel, c + (q if need_dx else 0),
                (ps1, ps2, rstd, w, dw, db, m1, m2, geo.n, geo.u, geo.ns, geo.split, geo.g,
                 geo.upg, geo.e, c, 1.0 / geo.count),
                dict(HAS_W=weight is not None, BK=MERGE_BLOCK, num_warps=NUM_WARPS))
        if need_dx:
            dx = torch.empty_like(x)
            _launch(k.backward_dx_kernel, geo.n * geo.jb * geo.nb,
                    (dy, x, dx, mean, rstd, w, m1, m2, *geo.unit_args(), geo.jb, geo.g, geo.upg,
                     geo.e),
                    dict(CHANNELS_LAST=geo.channels_last, HAS_W=weight is not None, BJ=geo.bj,
                         BU=geo.bu, num_warps=NUM_WARPS))
    return dx, dw, db


@torch.library.custom_op("bgnorm::bgn_triton_bwd", mutates_args=())
def bgn_triton_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    num_groups: int, batch_groups: int, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """BGN/GBGN backward: (dx or an empty tensor, dweight, dbias), the latter (C,) float32."""
    dx, dw, db = _bwd_impl(dy, x, weight, mean, rstd, num_groups, batch_groups, need_dx, True)
    return (x.new_empty((0,)) if dx is None else dx), dw, db


@bgn_triton_bwd.register_fake
def _(dy, x, weight, mean, rstd, num_groups, batch_groups, need_dx):
    c = x.shape[1]
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, num_groups, batch_groups, eps = inputs
    _, mean, var, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.batch_groups, ctx.eps = num_groups, batch_groups, eps
    ctx.mark_non_differentiable(mean, var, rstd)


def _grads(ctx, dy: Tensor | None, eager: bool):
    """(dx, dweight, dbias, None, None, None) for either autograd registration: the custom
    op's (``eager`` False: the backward op, which torch.compile sees) or :class:`_Eager`'s
    (the kernels called directly)."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    g, p0 = ctx.num_groups, ctx.batch_groups
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    none = (None, None, None)
    if dy is None:  # y did not reach the loss (eager: gradients are not materialized)
        return None, None, None, *none
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        view = (p0, n // p0, g, x3.shape[1] * x3.shape[2] // g)
        dx, dw, db = differentiable_grads(x3, weight, bias, view, ctx.eps, dy)
        return (None if dx is None else dx.view(x.shape)), dw, db, *none
    if eager:
        dx, dw, db = _bwd_impl(dy, x, weight, mean, rstd, g, p0, need_x, False)
    else:
        dx, dw, db = torch.ops.bgnorm.bgn_triton_bwd(dy, x, weight, mean, rstd, g, p0, need_x)
    return (
        dx if need_x else None,
        (dw if dw.dtype == weight.dtype else dw.to(weight.dtype)) if need_w else None,
        (db if db.dtype == bias.dtype else db.to(bias.dtype)) if need_b else None,
        *none,
    )


def _backward(ctx, dy, _dmean, _dvar, _drstd):
    return _grads(ctx, dy, eager=False)


bgn_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same forward and backward as the custom ops, with the kernels called directly: in
    eager mode the custom-op dispatch (its Python wrapper, argument checks and output
    aliasing check, and zero-filled gradients for the unused statistics outputs) cost about
    300 us per call on the first GPU run's machine, several times the kernels' own time on
    ResNet-50 shapes. torch.compile and fake tensors take the custom ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, batch_groups, eps, running):  # type: ignore[override]
        y, mean, var, rstd = _fwd_impl(x, weight, bias, num_groups, batch_groups, eps, False,
                                       running)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.batch_groups, ctx.eps = num_groups, batch_groups, eps
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):  # type: ignore[override]
        return *_grads(ctx, dy, eager=True), None


def _fused_running(x: Tensor, batch_groups: int, running) -> bool:
    """Whether the merge kernel can update ``running`` (running_mean, running_var, momentum)
    itself: BGN (one batch group), buffers contiguous float32/16/bfloat16 on x's device."""
    if running is None or batch_groups != 1:
        return False
    return all(t.device == x.device and t.dtype in _DTYPES and t.is_contiguous()
               for t in running[:2])


def triton_grouped_norm(
    input: Tensor, num_groups: int, batch_groups: int, weight: Tensor | None,
    bias: Tensor | None, eps: float,
    running: tuple[Tensor, Tensor, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """BGN (``batch_groups`` = 1) or GBGN training forward of ``input`` (N, C, \\*) on the
    Triton kernels: returns ``(y, mean, var)``, y in the input's dtype and memory format, the
    biased statistics of shape (P0 * G,) in float32. Inputs neither NCHW-contiguous nor
    channels-last are made contiguous first. Differentiable (one custom op each way).
    ``running`` = (running_mean, running_var, momentum): updated in place like torch's batch
    norm (:func:`~bgnorm.ops.plan.update_running`; in eager BGN calls by the merge kernel)."""
    if input.is_contiguous() or _channels_last(input):
        x = input
    else:
        x = input.contiguous()
    if torch.compiler.is_compiling() or x.device.type == "meta" or is_fake(x):
        y, mean, var, _ = torch.ops.bgnorm.bgn_triton_fwd(x, weight, bias, num_groups,
                                                          batch_groups, float(eps))
        fused = False
    else:
        _check_sizes(x, num_groups, batch_groups)
        fused = _fused_running(x, batch_groups, running)
        y, mean, var = _Eager.apply(x, weight, bias, num_groups, batch_groups, float(eps),
                                    running if fused else None)
        if fused:  # written through their pointers: tell autograd, as an in-place op would
            for t in running[:2]:
                if not t.is_inference():
                    torch.autograd.graph.increment_version(t)
    if running is not None and not fused:
        n = x.shape[0]
        count = (n // batch_groups) * (x.numel() // n // num_groups)
        with torch.no_grad():
            update_running(running[0], running[1], mean, var, batch_groups, count, running[2])
    return y, mean, var
