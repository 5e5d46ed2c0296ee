"""The general engine: the closed-form grouped norm for every group layout.

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
channel and one group), which every engine shares, is in :mod:`bgnorm.ops.plan`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .composed import differentiable_grads
from .plan import UnitsPlan, compute_dtype


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
