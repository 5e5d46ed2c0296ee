"""BGN and GBGN on PyTorch's native kernels: the fast path for every group layout.

Let x be (N, C, S) contiguous, D = C*S, G groups of Lg = D/G elements, and batch groups of e
examples (P0 = N/e; BGN is P0 = 1). Cut D into *units* of L = gcd(S, Lg) elements: a unit lies in
one channel and one group, so per unit the statistics and the affine are constants. Units are
channels when G divides C (L = S), bands when C divides G (L = S*C/G), and finer pieces when
groups straddle channels.

Forward (two passes over x):
  1. per-(n, g) mean and biased variance from the native group-norm kernel on the (N, G, Lg)
     view (eps = 0, its normalized output is discarded), merged over each batch group by the law
     of total variance in float64 (tiny (N, G) tensors); for short groups in BGN, per-unit
     moments from the native batch-norm statistics kernel, merged over each group's units;
  2. one native eval-mode batch-norm pass over the units view with the group statistics and
     gamma/beta expanded per unit: y = (x - mean_g) * rsqrt(var_g + eps) * gamma_c + beta_c.

Backward (three passes): the native eval-mode batch-norm backward with only the weight/bias
gradients requested yields per-unit sum(dy) and sum(dy * xhat); gamma's and beta's gradients
and the group terms are small reductions of those; then

  dx = A_u * dy + B_u * x + C_u,  A_u = gamma_c rstd_g,  B_u = -rstd_g^2 m2_g,
  C_u = -rstd_g m1_g + rstd_g^2 m2_g mean_g,
  m1_g = mean_R(gamma_c dy),  m2_g = mean_R(gamma_c dy xhat),

as one native eval batch-norm pass (B_u * x + C_u) and one in-place addcmul. Only x and the
(P0, G) statistics are saved. Every op used exists on CPU and CUDA. Double backward recomputes a
differentiable composition (see :func:`bgnorm.ops.engine.grouped_norm_reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .engine import compute_dtype, differentiable_grads, unit_length

__all__ = [
    "native_grouped_norm", "NativeGroupedNormFunction", "channel_groups_norm",
    "ChannelGroupsFunction",
]


class _Layout:
    """Index maps of the units view for one (N, C, S, G, P0).

    Small per-unit vectors are built with ``expand`` + ``reshape`` and reductions of size-1 axes
    are skipped: on small activations the layer's cost is its count of tiny ops.
    """

    def __init__(self, x3: Tensor, num_groups: int, batch_groups: int) -> None:
        n, c, s = x3.shape
        self.n, self.c, self.s, self.g, self.p0 = n, c, s, num_groups, batch_groups
        self.e = n // batch_groups
        self.lg = c * s // num_groups
        self.l = unit_length(c, s, num_groups)
        self.u = c * s // self.l
        self.units_per_channel = s // self.l
        self.units_per_group = self.lg // self.l
        self.count = self.e * self.lg  # elements per statistic

    def view(self, t: Tensor) -> Tensor:
        """(N, U, L) for BGN ((N, U) when L = 1, the native kernels' fast 2D layout);
        (1, N*U, L) when batch groups have their own statistics."""
        if self.p0 == 1:
            return t.view(self.n, self.u) if self.l == 1 else t.view(self.n, self.u, self.l)
        return t.view(1, self.n * self.u, self.l)

    def coef_view(self, t: Tensor) -> Tensor:
        """A per-unit vector shaped to broadcast against :meth:`view`."""
        return t.view(1, -1) if (self.p0 == 1 and self.l == 1) else t.view(1, -1, 1)

    def per_unit(self, stat: Tensor) -> Tensor:
        """(..., P0, G) group statistics -> (..., U) or (..., N*U) per channel of the view."""
        lead = stat.shape[:-2]
        k = self.units_per_group
        if self.p0 == 1:
            if k == 1:
                return stat.reshape(*lead, self.u)
            s = stat.reshape(*lead, self.g, 1).expand(*lead, self.g, k)
            return s.reshape(*lead, self.u).contiguous()  # native kernels need real strides
        s = stat.reshape(*lead, self.p0, 1, self.g, 1).expand(*lead, self.p0, self.e, self.g, k)
        return s.reshape(*lead, self.n * self.u).contiguous()

    def channel_to_unit(self, t: Tensor | None) -> Tensor | None:
        """(C,) per-channel tensor -> per channel of the units view."""
        if t is None:
            return None
        k = self.units_per_channel
        if k > 1:
            t = t.view(self.c, 1).expand(self.c, k).reshape(self.u).contiguous()
        if self.p0 == 1:
            return t
        return t.view(1, self.u).expand(self.n, self.u).reshape(-1).contiguous()

    def unit_sums_to_channels(self, t: Tensor) -> Tensor:
        """Per-unit sums (..., U) or (..., N*U) -> per-channel sums (..., C)."""
        lead = t.shape[:-1]
        if self.p0 == 1 and self.units_per_channel == 1:
            return t
        v = t.view(*lead, -1, self.c, self.units_per_channel)
        return v.sum(dim=(-3, -1))

    def unit_sums_to_groups(self, t: Tensor) -> Tensor:
        """Per-unit sums (..., U) or (..., N*U) -> per-statistic sums (..., P0, G)."""
        lead = t.shape[:-1]
        return t.view(*lead, self.p0, -1, self.g, self.units_per_group).sum(dim=(-3, -1))


#: Groups shorter than this get their BGN statistics from the native batch-norm statistics
#: kernel on the units view, merged over the units of a group (faster for short rows); longer
#: ones from per-(n, g) native group-norm moments merged over the batch (faster for long
#: rows). Both kernels are numerically stable; measured on CPU with benchmarks/bench_norms.py.
SHORT_GROUP = 32


_SCRATCH: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _discard_buffer(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable CPU buffer of ``n`` elements for the group-norm kernel's unused output.

    A fresh full-size allocation per call costs page faults on CPU (glibc returns large blocks
    to the OS); the values written here are never read, so one buffer per dtype, as large as
    the largest input seen, serves every layer and thread. CUDA's caching allocator needs none.
    """
    key = (dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):
            buf = torch.empty(n, dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf[:n]


def _moments(x3: Tensor, lay: _Layout) -> tuple[Tensor, Tensor]:
    """(P0, G) mean and biased variance in compute precision, from native per-row moments.

    Parts of equal size are merged by the law of total variance, with the stable ``var_mean``
    for the spread of the part means.
    """
    cdt = compute_dtype(x3.dtype)
    xs = x3 if x3.dtype == cdt else x3.to(cdt)
    if lay.p0 == 1 and lay.lg < SHORT_GROUP:
        # per-unit moments over (N, L), merged over the units of each group
        m, v = torch.batch_norm_update_stats(lay.view(xs), None, None, 0.0)
        if lay.units_per_group == 1:
            return m.view(1, lay.g), v.view(1, lay.g)
        shape = (1, lay.g, lay.units_per_group)
        dim = 2
    else:
        xg = xs.view(lay.n, lay.g, lay.lg)
        if xs.device.type == "cpu":
            m = xs.new_empty((lay.n, lay.g))
            rstd = xs.new_empty((lay.n, lay.g))
            torch.ops.aten.native_group_norm.out(
                xg, None, None, lay.n, lay.g, lay.lg, lay.g, 0.0,
                out0=_discard_buffer(xs.numel(), xs.dtype, xs.device).view(xg.shape),
                out1=m, out2=rstd,
            )
        else:
            _, m, rstd = torch.native_group_norm(xg, None, None, lay.n, lay.g, lay.lg, lay.g, 0.0)
        v = rstd.pow(-2)  # eps = 0: rstd = 1/sqrt(var); a constant row gives inf, i.e. var 0
        shape = (lay.p0, lay.e, lay.g)
        dim = 1
    var_m, mean = torch.var_mean(m.view(shape), dim=dim, correction=0)
    return mean, v.view(shape).mean(dim=dim).add_(var_m)


class NativeGroupedNormFunction(torch.autograd.Function):
    """BGN/GBGN over native kernels; see the module docstring for the math.

    Inputs: ``x3`` contiguous (N, C, S); ``weight``/``bias`` (C,) or None; ``num_groups``;
    ``batch_groups`` (P0); ``eps``. Outputs: y in the units-view shape and the input dtype, and
    the non-differentiable (P0, G) mean and biased variance in compute precision.
    """

    @staticmethod
    def forward(ctx, x3, weight, bias, num_groups, batch_groups, eps):  # type: ignore[override]
        lay = _Layout(x3, num_groups, batch_groups)
        mean, var = _moments(x3, lay)
        pdt = mean.dtype if weight is None else weight.dtype
        mean_u, var_u = lay.per_unit(mean.to(pdt)), lay.per_unit(var.to(pdt))
        y = F.batch_norm(lay.view(x3), mean_u, var_u, lay.channel_to_unit(weight),
                         lay.channel_to_unit(bias), False, 0.0, eps)
        ctx.save_for_backward(x3, weight, bias, mean, var, mean_u, var_u)
        ctx.lay, ctx.eps = lay, eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var  # y in the units-view shape: never a view made here

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):  # type: ignore[override]
        x3, weight, bias, mean, var, mean_u, var_u = ctx.saved_tensors
        lay: _Layout = ctx.lay
        eps = ctx.eps
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            view = (lay.p0, lay.e, lay.g, lay.lg)
            return (*differentiable_grads(x3, weight, bias, view, eps, dy), None, None, None)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xv, dyv = lay.view(x3), lay.view(dy.contiguous())
        # per-unit sum(dy * xhat) and sum(dy) in one native reduction pass
        _, s_dyx, s_dy = torch.ops.aten.native_batch_norm_backward(
            dyv, xv, None, mean_u, var_u, None, None, False, eps, [False, True, True]
        )
        dw = lay.unit_sums_to_channels(s_dyx).to(weight.dtype) if need_w else None
        db = lay.unit_sums_to_channels(s_dy).to(bias.dtype) if need_b else None
        dx = None
        if need_x:
            w_u = lay.channel_to_unit(weight)
            if w_u is not None:
                w_u = w_u.to(mean.dtype)
                s_dy, s_dyx = s_dy * w_u, s_dyx * w_u
            m1 = lay.unit_sums_to_groups(s_dy).div_(lay.count)
            m2 = lay.unit_sums_to_groups(s_dyx).div_(lay.count)
            rstd = torch.rsqrt(var + eps)
            b_g = rstd.square().mul_(m2).neg_()
            c_g = torch.addcmul(rstd * m1, b_g, mean).neg_()
            a_u = lay.per_unit(rstd)
            if w_u is not None:
                a_u = a_u * w_u
            ones = torch.ones_like(a_u)
            dx = F.batch_norm(xv, torch.zeros_like(a_u), ones, lay.per_unit(b_g),
                              lay.per_unit(c_g), False, 0.0, 0.0)  # B_u * x + C_u in one pass
            dx = dx.addcmul_(dyv, lay.coef_view(a_u)).view(x3.shape)
        return dx, dw, db, None, None, None


def native_grouped_norm(
    x3: Tensor, num_groups: int, batch_groups: int,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply :class:`NativeGroupedNormFunction` to (N, C, S) ``x3`` (made contiguous)."""
    y, mean, var = NativeGroupedNormFunction.apply(
        x3.contiguous(), weight, bias, num_groups, batch_groups, eps
    )
    return y.view(x3.shape), mean, var


class ChannelGroupsFunction(torch.autograd.Function):
    """BGN with groups of k = C/G whole channels in few native calls (the small-tensor path).

    On the (N, G, k*S) view each group is one "channel" of torch's batch norm, so
    ``native_batch_norm`` in training mode (no affine) gives x-hat, the (G,) statistics and the
    running-statistics update (unbiased, n = N*D/G) exactly; the per-channel affine is one more
    pass. Backward: dx from ``native_batch_norm_backward`` in training mode on the same view with
    grad ``dy * gamma_c``; gamma's and beta's gradients from its eval-mode reduction on the
    (N, C, S) view. Saves x and the (G,) statistics. Fewer, heavier kernels than
    :class:`NativeGroupedNormFunction`: the faster choice when per-call overhead dominates.
    """

    @staticmethod
    def forward(ctx, x3, weight, bias, running_mean, running_var, num_groups, momentum, eps):  # type: ignore[override]
        n, c, s = x3.shape
        xg = x3.view(n, num_groups, -1)
        xhat, mean, invstd = torch.native_batch_norm(
            xg, None, None, running_mean, running_var, True, momentum, eps
        )
        y = xhat  # returned as is (never a view made here) when there is no affine
        if weight is not None or bias is not None:
            shape = (1, c, 1)
            xh3 = xhat.view(n, c, s)
            w = weight.view(shape) if weight is not None else None
            b = bias.view(shape) if bias is not None else None
            y = torch.addcmul(b, xh3, w) if (w is not None and b is not None) else (
                xh3 * w if w is not None else xh3 + b)
            y = y.to(x3.dtype)
        ctx.save_for_backward(x3, weight, bias, mean, invstd)
        ctx.eps, ctx.num_groups = eps, num_groups
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x3, weight, bias, mean, invstd = ctx.saved_tensors
        n, c, s = x3.shape
        g = ctx.num_groups
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            view = (1, n, g, c * s // g)
            grads = differentiable_grads(x3, weight, bias, view, ctx.eps, dy)
            return (*grads, None, None, None, None, None)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = compute_dtype(x3.dtype)  # half inputs: the backward runs in float32
        dy = dy.contiguous().view(n, c, s).to(cdt)
        xc = x3.to(cdt)
        mean, invstd = mean.to(cdt), invstd.to(cdt)
        dx = dw = db = None
        if need_x:
            dxh = dy * weight.view(1, c, 1).to(cdt) if weight is not None else dy
            dx = torch.ops.aten.native_batch_norm_backward(
                dxh.view(n, g, -1), xc.view(n, g, -1), None, None, None, mean, invstd, True,
                ctx.eps, [True, False, False],
            )[0].view(n, c, s).to(x3.dtype)
        if need_w or need_b:
            k = c // g
            mean_c = mean.view(g, 1).expand(g, k).reshape(c).contiguous()
            var_c = invstd.pow(-2).view(g, 1).expand(g, k).reshape(c).contiguous()
            _, s_dyx, s_dy = torch.ops.aten.native_batch_norm_backward(
                dy, xc, None, mean_c, var_c, None, None, False, 0.0, [False, True, True]
            )
            dw = s_dyx.to(weight.dtype) if need_w else None
            db = s_dy.to(bias.dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None


def channel_groups_norm(
    x3: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    """Apply :class:`ChannelGroupsFunction` (C divisible by G) to (N, C, S) ``x3``; updates the
    running statistics in place like torch's batch norm."""
    return ChannelGroupsFunction.apply(
        x3.contiguous(), weight, bias, running_mean, running_var, num_groups, momentum, eps
    )
