"""The grouped-moments engine shared by the whole normalization family.

Every norm of the family differs only in which elements share a statistic. A contiguous input of
shape (N, C, *spatial), flattened to (N, C, S), is viewed (without copying) as four axes
``(P0, R0, P1, R1)``; statistics have shape ``(P0, P1)`` and are reduced over ``R0`` and ``R1``:

========  ======================  ===========
norm      view (P0, R0, P1, R1)   stats
========  ======================  ===========
BN        (1, N, C, S)            (C,)
BGN       (1, N, G, D/G)          (G,)
GBGN      (N/e, e, G, D/G)        (N/e, G)
PN        (N, C, S, 1)            (N, S)
========  ======================  ===========

:class:`GroupedNormFunction` computes ``y = (x - mean) * rstd * gamma_c + beta_c`` with a
per-channel affine and a closed-form backward over any reduction set R:

    dx = rstd * (dxh - mean_R(dxh) - xh * mean_R(dxh * xh)),   dxh = dy * gamma_c,

saving only ``x`` and the ``(P0, P1)`` statistics. Statistics are accumulated in float32 for
half-precision inputs (float64 stays float64); the output keeps the input dtype. When the backward
is itself differentiated (``create_graph=True``) it recomputes the forward as a differentiable
composition, so double backward is exact.

:class:`UnitsPlan` holds the shape arithmetic of the units view (runs of elements sharing one
channel and one group) that this engine and the native one (:mod:`bgnorm.ops.native`) share.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

View = tuple[int, int, int, int]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half types, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _channel_view(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).view(1, -1, 1)


def grouped_moments(x4: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of a ``(P0, R0, P1, R1)`` view over axes 1 and 3.

    Returns two tensors of shape ``(P0, 1, P1, 1)`` in :func:`compute_dtype` precision. Two
    stages: torch's numerically stable ``var_mean`` over the contiguous axis 3, then the law of
    total variance over axis 1 (equal counts). Reductions over one contiguous axis are what
    eager kernels and inductor's generated loops do best.
    """
    xs = x4.to(compute_dtype(x4.dtype))
    var_r, mean_r = torch.var_mean(xs, dim=3, correction=0, keepdim=True)
    if x4.shape[1] == 1:
        return mean_r, var_r
    var_m, mean = torch.var_mean(mean_r, dim=1, correction=0, keepdim=True)
    return mean, var_r.mean(dim=1, keepdim=True) + var_m


def grouped_norm_composed(
    x3: Tensor, view: View, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The grouped norm of ``x3`` (N, C, S) over ``view`` (P0, e, G, D/G) as a plain
    composition of differentiable torch ops, with no autograd.Function: what double backward
    differentiates, and what runs under torch.func transforms (grad, vmap, jvp), which cannot
    run the engines' Functions. Returns y (N, C, S) in x's dtype and the (P0, 1, G, 1) mean and
    biased variance in :func:`compute_dtype`.
    """
    cdt = compute_dtype(x3.dtype)
    x4 = x3.reshape(view).to(cdt)
    mean, var = grouped_moments(x4)
    y = ((x4 - mean) * torch.rsqrt(var + eps)).view(x3.shape)
    if weight is not None:
        y = y * _channel_view(weight, cdt)
    if bias is not None:
        y = y + _channel_view(bias, cdt)
    return y.to(x3.dtype), mean, var


def grouped_norm_reference(
    x3: Tensor, view: View, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Differentiable composition of the grouped norm (used for double backward)."""
    return grouped_norm_composed(x3, view, weight, bias, eps)[0]


def in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, ...) is active, outside
    torch.compile's tracing (which reports functorch's interpreter as active itself)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


def update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, batch_groups: int,
    count: int, momentum: float,
) -> None:
    """BatchNorm's running-statistics update from the batch statistics, in place.

    ``mean``/``var`` hold P0 * G biased statistics of ``count`` elements each (any shape); they
    are averaged over the P0 batch groups and the variance is stored unbiased
    (``count / (count - 1)``): ``running = (1 - momentum) * running + momentum * stat``.
    Call it without grad mode (the buffers are not differentiated).
    """
    if batch_groups > 1:
        mean = mean.reshape(batch_groups, -1).mean(0)
        var = var.reshape(batch_groups, -1).mean(0)
    # no view or cast op unless needed: each costs microseconds next to a (G,) lerp
    if mean.dim() != 1:
        mean, var = mean.reshape(-1), var.reshape(-1)
    if mean.dtype != running_mean.dtype:
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(var * (count / (count - 1)), momentum)


def _strides_like_channels_last(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """c10's rule for a 4D/5D tensor whose strides order its dimensions as channels-last does
    (C fastest, then the spatial axes from last to first, then N), ambiguous cases (C with
    stride 0, size-1 dimensions that order either way) counted as contiguous."""
    if strides[1] == 0:
        return False
    smallest = 0
    order = (1, 3, 2, 0) if len(sizes) == 4 else (1, 4, 3, 2, 0)
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def memory_format_of(x: Tensor) -> torch.memory_format | None:
    """The memory format torch's norms give their output and input gradient for ``x`` when
    it is not contiguous: ``torch.channels_last`` (4D) or ``torch.channels_last_3d`` (5D) for
    inputs laid out so (torch's ``suggest_memory_format``), else None (contiguous). Also None
    under torch.func transforms, whose wrapped tensors run the plain composition (no
    autograd.Function keeps a format there)."""
    if x.dim() == 4:
        fmt = torch.channels_last
    elif x.dim() == 5:
        fmt = torch.channels_last_3d
    else:
        return None
    if x.is_contiguous() or in_functorch_transform():
        return None
    if x.is_contiguous(memory_format=fmt):
        return fmt
    return fmt if _strides_like_channels_last(tuple(x.shape), tuple(x.stride())) else None


class _ContiguousFor(torch.autograd.Function):
    """``x.contiguous()`` whose gradient goes back in ``memory_format``: the engines work on
    contiguous tensors, and the input gradient keeps the input's format as torch's norms."""

    @staticmethod
    def forward(ctx, x, memory_format):  # type: ignore[override]
        ctx.memory_format = memory_format
        return x.contiguous()

    @staticmethod
    def backward(ctx, dx):  # type: ignore[override]
        return dx.contiguous(memory_format=ctx.memory_format), None


def contiguous_for(x: Tensor, memory_format: torch.memory_format | None) -> Tensor:
    """``x.contiguous()`` for an engine; with autograd, ``x``'s gradient comes back in
    ``memory_format`` (x's, see :func:`memory_format_of`; None: as the engine gives it)."""
    if memory_format is None or not (x.requires_grad and torch.is_grad_enabled()):
        return x.contiguous()
    return _ContiguousFor.apply(x, memory_format)


def is_fake(t: Tensor) -> bool:
    """Whether ``t`` is a fake tensor (torch's FakeTensorMode: shapes without data, e.g. in
    memory estimators). Caches never keep one: a real call would get it back and return fakes."""
    return isinstance(t, FakeTensor)


def unit_length(channels: int, spatial: int, num_groups: int) -> int:
    """L = gcd(S, D/G): the longest run of elements sharing one channel and one group.

    Groups of whole channels give L = S and bands (k = G/C per channel) L = S/k, in forms
    that stay symbolic when torch.compile makes the spatial size dynamic (a new image size).
    Straddling groups (whose membership depends on the size) take the gcd of the concrete
    sizes: under dynamo this specializes the graph on S; symbolic sizes outside dynamo
    (which ``isinstance`` can tell apart) fall back to 1, every element its own unit.
    """
    if channels % num_groups == 0:
        return spatial
    if num_groups % channels == 0:
        return spatial // (num_groups // channels)
    if torch.compiler.is_compiling():
        return math.gcd(int(spatial), int(channels) * int(spatial) // int(num_groups))
    if not all(isinstance(v, int) for v in (channels, spatial, num_groups)):
        return 1
    return math.gcd(spatial, channels * spatial // num_groups)


def differentiable_grads(
    x3: Tensor, weight: Tensor | None, bias: Tensor | None, view: View, eps: float, dy: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) of the grouped norm for ``create_graph=True`` backwards.

    Recomputes the forward as a differentiable composition and differentiates it, so the
    returned gradients carry their own graph (double backward). Every engine's Function uses it.
    """
    inputs = [t for t in (x3, weight, bias) if t is not None and t.requires_grad]
    y = grouped_norm_reference(x3, view, weight, bias, eps)
    grads = iter(torch.autograd.grad(y, inputs, dy.reshape(y.shape), create_graph=True,
                                     allow_unused=True))
    dx, dw, db = (next(grads) if t is not None and t.requires_grad else None
                  for t in (x3, weight, bias))
    return dx, dw, db


class GroupedNormFunction(torch.autograd.Function):
    """BGN/GBGN as a pure composition of torch ops over the units view (the general engine).

    ``x3`` (N, C, S) is viewed as (N, U, L), units of L = gcd(S, D/G) elements that share one
    channel and one group (U = D/L). Statistics: per-(n, u) mean and biased variance over the
    contiguous L (mean, then mean squared deviation: inductor reads each row twice from cache),
    merged by the law of total variance over the e examples of a batch group and the D/G/L units
    of a group. Backward: per-(n, u) sums of dy and dy*xhat in one pass over (dy, x) (the
    latter from sums shifted by the row's first element), the small group terms, then one
    elementwise pass for dx. Two passes forward, two backward: the shape
    inductor turns into fused loops under torch.compile, and the fallback for every layout.

    Inputs: ``x3`` contiguous (N, C, S); ``weight``/``bias`` (C,) or None; ``num_groups`` G;
    ``batch_groups`` P0; ``eps``. Outputs: y (N, U, L) in the input dtype (never a view made
    here), and the non-differentiable (P0, G) mean and biased variance in compute precision.
    """

    @staticmethod
    def forward(ctx, x3, weight, bias, num_groups, batch_groups, eps):  # type: ignore[override]
        n, c, s = x3.shape
        cdt = compute_dtype(x3.dtype)
        lay = UnitsPlan(n, c, s, num_groups, batch_groups)
        xu = x3.reshape(n, lay.u, lay.l).to(cdt)
        # per-(n, u) moments in two plain passes over each row (mean, then the mean square of
        # the deviations): exact like Welford's update, and inductor runs the second pass over
        # a row still in cache with vectorized adds instead of Welford's divisions
        mean_r = xu.mean(dim=2)
        dev = xu - mean_r.unsqueeze(2)
        var_r = (dev * dev).mean(dim=2)  # (N, U)
        g4 = (batch_groups, lay.e, num_groups, lay.upg)
        var_m, mean = torch.var_mean(mean_r.view(g4), dim=(1, 3), correction=0)
        var = var_r.view(g4).mean(dim=(1, 3)) + var_m  # (P0, G)
        rstd = torch.rsqrt(var + eps)
        scale, shift = lay.affine(rstd, mean, weight, bias, cdt)  # (N or 1, U, 1)
        y = torch.addcmul(shift, xu, scale)
        ctx.save_for_backward(x3, weight, bias, mean, rstd)
        ctx.lay, ctx.eps = lay, eps
        ctx.mark_non_differentiable(mean, var)
        return y.to(x3.dtype), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):  # type: ignore[override]
        x3, weight, bias, mean, rstd = ctx.saved_tensors
        lay: UnitsPlan = ctx.lay
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            view = (lay.p0, lay.e, lay.g, lay.c * lay.s // lay.g)
            return (*differentiable_grads(x3, weight, bias, view, ctx.eps, dy), None, None, None)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = mean.dtype
        n, u, l = lay.n, lay.u, lay.l
        xu = x3.reshape(n, u, l).to(cdt)
        dyu = dy.reshape(n, u, l).to(cdt)
        mean_u, rstd_u = lay.per_unit(mean), lay.per_unit(rstd)  # (N or 1, U, 1)
        # per-(n, u) sum(dy) and sum(dy * xhat) = rstd * (sum(dy * (x - x0)) + (x0 - mean) *
        # sum(dy)), x0 the row's first element: both reductions then index the row alone, and
        # inductor computes them in one loop over (dy, x) (with xhat's per-group statistics in
        # the reduction it split them and read dy twice). Shifted by an element of the row, the
        # differences stay small (exact for inputs like 1e4 + N(0, 1)), as in centred sums.
        x0 = xu[:, :, 0]
        s_dy = dyu.sum(dim=2)  # (N, U)
        s_dyx = (dyu * (xu - x0.unsqueeze(2))).sum(dim=2)
        s_dyx = (s_dyx + (x0 - mean_u.squeeze(2)) * s_dy) * rstd_u.squeeze(2)
        dw = lay.to_channels(s_dyx).to(weight.dtype) if need_w else None
        db = lay.to_channels(s_dy).to(bias.dtype) if need_b else None
        dx = None
        if need_x:
            w_u = lay.weight_per_unit(weight, cdt)  # (1, U) or None
            if w_u is not None:
                s_dy, s_dyx = s_dy * w_u, s_dyx * w_u
            g4 = (lay.p0, lay.e, lay.g, lay.upg)
            m1 = s_dy.view(g4).sum(dim=(1, 3)) / lay.count  # (P0, G)
            m2 = s_dyx.view(g4).sum(dim=(1, 3)) / lay.count
            m1_u, m2_u = lay.per_unit(m1), lay.per_unit(m2)
            dxh = dyu * w_u.unsqueeze(-1) if w_u is not None else dyu
            xhat = (xu - mean_u) * rstd_u
            dx = ((dxh - m1_u - xhat * m2_u) * rstd_u).to(x3.dtype).view(x3.shape)
        return dx, dw, db, None, None, None


class UnitsPlan:
    """The units view of one (N, C, S, G, P0) and the maps between its per-unit vectors and
    per-channel / per-group ones: the shape arithmetic both engines share.

    A *unit* is a run of L = gcd(S, D/G) consecutive elements of one example that lies in one
    channel and one group (U = D/L units per example): units are channels when G divides C,
    bands when C divides G, and finer pieces when groups straddle channels. Per unit, the
    statistics and the affine are constants, so every pass is a per-unit broadcast. ``rows`` is
    the number of per-unit coefficients a pass needs: U for BGN, N*U for GBGN (P0 > 1), whose
    batch groups have their own statistics.

    Build one with :func:`units_plan` (cached) for concrete sizes; the general engine builds its
    own under torch.compile, where sizes may be symbolic.
    """

    def __init__(self, n: int, c: int, s: int, g: int, p0: int, columns: bool = False) -> None:
        self.n, self.c, self.s, self.g, self.p0 = n, c, s, g, p0
        self.e = n // p0  # examples per batch group
        self.lg = c * s // g  # elements of one example in one group
        self.l = 1 if columns else unit_length(c, s, g)
        self.u = c * s // self.l
        self.upg = self.lg // self.l  # units per group
        self.upc = s // self.l  # units per channel
        self.count = self.e * self.lg  # elements per statistic
        self.rows = self.u if p0 == 1 else n * self.u
        self._indices: dict[tuple[str, torch.device], Tensor | None] = {}

    # --- broadcast views (no copies): the general engine, fused by inductor ------------------
    def per_unit(self, stat: Tensor) -> Tensor:
        """(P0, G) -> broadcastable (N or 1, U, 1) without copies."""
        p0, g, upg = self.p0, self.g, self.upg
        if p0 == 1:
            return stat.view(1, g, 1, 1).expand(1, g, upg, 1).reshape(1, self.u, 1)
        s = stat.view(p0, 1, g, 1, 1).expand(p0, self.e, g, upg, 1)
        return s.reshape(self.n, self.u, 1)

    def weight_per_unit(self, t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """(C,) -> (1, U)."""
        if t is None:
            return None
        return t.to(dtype).view(1, self.c, 1).expand(1, self.c, self.upc).reshape(1, self.u)

    def affine(self, rstd: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None,
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-unit scale and shift with y = x * scale + shift."""
        scale = self.per_unit(rstd)
        w_u = self.weight_per_unit(weight, dtype)
        if w_u is not None:
            scale = scale * w_u.unsqueeze(-1)
        shift = -self.per_unit(mean) * scale
        if bias is not None:
            shift = shift + self.weight_per_unit(bias, dtype).unsqueeze(-1)
        return scale, shift

    def to_channels(self, t: Tensor) -> Tensor:
        """Per-(n, unit) sums (N, U) -> per-channel sums (C,)."""
        return t.view(self.n, self.c, self.upc).sum(dim=(0, 2))

    # --- native kernels: the units view and contiguous per-unit coefficient rows -------------
    def view(self, t: Tensor) -> Tensor:
        """The units view of a contiguous tensor of N*D elements, laid out for native kernels
        whose "channels" are the coefficient rows: (N, U, L), (N, U) when L = 1 (their fast 2D
        layout), or (1, N*U, L) for GBGN."""
        if self.p0 == 1:
            return t.view(self.n, self.u) if self.l == 1 else t.view(self.n, self.u, self.l)
        return t.view(1, self.rows, self.l)

    def coef_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts one coefficient row against :meth:`view`."""
        return (1, self.rows) if (self.p0 == 1 and self.l == 1) else (1, self.rows, 1)

    def _make_index(self, kind: str, device: torch.device) -> Tensor:
        r = torch.arange(self.rows, device=device)
        unit = r % self.u
        if kind == "channel":
            return unit // self.upc
        idx = unit // self.upg
        if self.p0 > 1:
            idx = idx + (r // self.u // self.e) * self.g
        return idx

    def _index(self, kind: str, device: torch.device) -> Tensor | None:
        """(rows,) index from each coefficient row to its statistic (``"group"``) or channel
        (``"channel"``), cached per device; None where that map is the identity."""
        if self.p0 == 1 and (self.upg if kind == "group" else self.upc) == 1:
            return None
        if torch.compiler.is_compiling():
            return self._make_index(kind, device)
        key = (kind, device)
        idx = self._indices.get(key)
        if idx is None:
            with torch.inference_mode(False), torch.no_grad():
                idx = self._make_index(kind, device)
            if not is_fake(idx):  # made under FakeTensorMode: valid for that run only
                self._indices[key] = idx
        return idx

    def group_index(self, device: torch.device) -> Tensor | None:
        """(rows,) index from each coefficient row to its statistic; None for the identity."""
        return self._index("group", device)

    def channel_index(self, device: torch.device) -> Tensor | None:
        """(rows,) index from each coefficient row to its channel; None for the identity."""
        return self._index("channel", device)

    def groups_to_rows(self, t: Tensor) -> Tensor:
        """Per-statistic vectors (..., P0*G) -> per-row vectors (..., rows), one gather."""
        idx = self.group_index(t.device)
        return t if idx is None else t.index_select(-1, idx)

    def rows_to_channels(self, t: Tensor) -> Tensor:
        """Per-row sums (K, rows) -> per-channel sums (K, C)."""
        if self.p0 == 1 and self.upc == 1:
            return t
        return t.view(t.shape[0], -1, self.c, self.upc).sum(dim=(1, 3))

    def rows_to_groups(self, t: Tensor) -> Tensor:
        """Per-row sums (K, rows) -> per-statistic sums (K, P0*G)."""
        k = t.shape[0]
        if self.p0 == 1 and self.upg == 1:
            return t
        return t.view(k, self.p0, -1, self.g, self.upg).sum(dim=(2, 4)).view(k, -1)


@functools.lru_cache(maxsize=1024)
def units_plan(n: int, c: int, s: int, g: int, p0: int, columns: bool = False) -> UnitsPlan:
    """The cached :class:`UnitsPlan` of concrete sizes (eager mode)."""
    return UnitsPlan(n, c, s, g, p0, columns)


def grouped_norm(
    x3: Tensor, num_groups: int, batch_groups: int, weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply :class:`GroupedNormFunction` to (N, C, S) ``x3`` (made contiguous).

    Returns ``(y, mean, var)`` with ``y`` of shape (N, C, S) and statistics of shape (P0, G).
    """
    y, mean, var = GroupedNormFunction.apply(
        x3.contiguous(), weight, bias, num_groups, batch_groups, eps
    )
    return y.view(x3.shape), mean, var
