"""The units engine: BGN and GBGN on PyTorch's native kernels, for every group layout.

Let x be (N, C, S) contiguous, D = C*S, G groups of Lg = D/G elements, and batch groups of e
examples (P0 = N/e; BGN is P0 = 1). Cut D into *units* of L = gcd(S, Lg) elements: a unit lies in
one channel and one group, so per unit the statistics and the affine are constants. Units are
channels when G divides C (L = S), bands when C divides G (L = S*C/G), and finer pieces when
groups straddle channels. The passes run over the units view, whose coefficient rows are the
units (:class:`~bgnorm.ops.plan.UnitsPlan`). BGN inputs with short units (L <
:data:`~bgnorm.ops.dispatch.SHORT_UNIT`, e.g. bands of 32 or 2x2 maps) use the *columns* layout
instead: every element of an example is its own unit (L = 1) and every pass runs over the 2D
(N, D) view, where torch's CPU kernels have no per-row cost.

Forward (two passes over x):
  1. statistics: per-(n, g) mean and biased variance from the native group-norm kernel on the
     (N, G, Lg) view (eps = 0), merged over each batch group by the law of total variance; or,
     for short groups (:data:`~bgnorm.ops.dispatch.SHORT_GROUP`) and the columns layout,
     per-unit moments over (N, L) from the native batch-norm statistics kernel, merged over
     each group's units. Merges are exact (equal parts) and centred, so inputs like
     1e4 + N(0, 1) keep float32 round-off accuracy;
  2. one native pass over the units view with the group statistics and gamma/beta gathered per
     row: y = (x - mean_g) * rsqrt(var_g + eps) * gamma_c + beta_c (eval-mode batch norm, or
     an addcmul with the folded scale/shift on 2D views), written into the group-norm kernel's
     output buffer when there is one (a fresh full-size CPU allocation costs page faults).

Backward (three passes): the native eval-mode batch-norm backward with only the weight/bias
gradients requested yields per-row sum(dy) and sum(dy * xhat); gamma's and beta's gradients
and the group terms are small reductions of those; then

  dx = A_u * dy + B'_u * xhat + C'_u,  A_u = gamma_c rstd_g,
  B'_u = -rstd_g m2_g,  C'_u = -rstd_g m1_g,
  m1_g = mean_R(gamma_c dy),  m2_g = mean_R(gamma_c dy xhat),

as one pass of the forward's kind (B'_u * xhat + C'_u, xhat recomputed from the saved
statistics) and one in-place addcmul. Only x and the (P0*G,) statistics are saved. Every op used
exists on CPU and CUDA. Double backward recomputes a differentiable composition (see
:func:`bgnorm.ops.composed.grouped_norm_reference`).

Eval is one pass with the running statistics (:mod:`bgnorm.ops.eval`), and small inputs with
groups of whole channels take :mod:`bgnorm.ops.channels` (fewer, heavier kernels). The helpers
of the native passes (fold, affine, row gathers, reductions) live here and serve those too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import dispatch
from .composed import differentiable_grads
from .plan import UnitsPlan, compute_dtype, is_fake, units_plan, update_running

__all__ = ["native_grouped_norm", "native_plan", "NativeGroupedNormFunction"]

_unsafe_view = torch.ops.aten._unsafe_view.default  # a reshape that autograd sees as a new tensor


def _spread(m: Tensor, v: Tensor, last: bool) -> tuple[Tensor, Tensor]:
    """Merge equal-size parts: ``m``/``v`` hold the parts' means and biased variances as a
    contiguous 2D tensor with the parts along dim 1 (``last``, shape (K, parts)) or dim 0
    (shape (parts, K)). Returns the (K,) mean and biased variance by the law of total variance,
    ``var = mean(v) + mean((m - mean)^2)``, in a few plain small ops (each costs tens of
    microseconds on a CPU whose caches a big kernel has just flushed, whatever its size).
    """
    d = 1 if last else 0
    # centred on the first part: the spread of large means (inputs like 1e4 + N(0, 1)) is then
    # computed from small differences (exact subtractions), and the mean keeps half-ulp accuracy
    ref = m.narrow(d, 0, 1)
    dm = m - ref
    mean_d = dm.mean(d, keepdim=True)
    dev = dm - mean_d
    return (mean_d + ref).view(-1), torch.addcmul(v, dev, dev).mean(d)


def _unit_moments(xv: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (dim 1) mean and biased variance of the units view ``xv`` (N, U) or (N, U, L).

    Torch's batch-norm statistics kernel (CPU and CUDA) computes them; it has no meta or fake
    implementation, so meta tensors (shape-only runs, deferred initialization) and fake tensors
    (torch's FakeTensorMode, e.g. memory estimation on CUDA) get the same shapes from
    ``var_mean``, which has both.
    """
    if xv.device.type == "meta" or is_fake(xv):
        v, m = torch.var_mean(xv, dim=(0,) if xv.dim() == 2 else (0, 2), correction=0)
        return m, v
    return torch.batch_norm_update_stats(xv, None, None, 0.0)


def _moments(
    x: Tensor, plan: UnitsPlan, cdt: torch.dtype
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(P0*G,) mean and biased variance in ``cdt`` from native per-row moments, and the
    group-norm kernel's output buffer (x's size, contents unused) when there is one.

    BGN with groups shorter than :data:`~bgnorm.ops.dispatch.SHORT_GROUP` (or columns):
    per-unit moments over (N, L) from the batch-norm statistics kernel, merged over the units
    of each group. Otherwise per-(n, g) moments from the group-norm kernel (eps = 0; its
    normalized output is not used), merged over the examples of each batch group. Both merges
    are exact (parts of equal size). The output buffer is returned for reuse as the layer's
    output: a fresh full-size allocation costs page faults on CPU, as much as a pass over the
    data.
    """
    xs = x if x.dtype == cdt else x.to(cdt)
    if dispatch.use_unit_statistics(plan):
        m, v = _unit_moments(plan.view(xs))  # (U,)
        if plan.upg == 1:
            return m, v, None
        mean, var = _spread(m.view(plan.g, plan.upg), v.view(plan.g, plan.upg), True)
        return mean, var, None
    n, g, lg = plan.n, plan.g, plan.lg
    buf, m, rstd = torch.native_group_norm(xs.view(n, g, lg), None, None, n, g, lg, g, 0.0)
    if buf.dtype != x.dtype:
        buf = None
    v = rstd.pow(-2)  # eps = 0: rstd = 1/sqrt(var); a constant row gives inf, i.e. var 0
    if n == 1:
        return m.view(g), v.view(g), buf
    if plan.p0 > 1:  # (P0, e, G) -> (e, P0*G): the examples of each batch group along dim 0
        m = m.view(plan.p0, plan.e, g).transpose(0, 1).reshape(plan.e, plan.p0 * g)
        v = v.view(plan.p0, plan.e, g).transpose(0, 1).reshape(plan.e, plan.p0 * g)
    return (*_spread(m, v, False), buf)


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled


def _fold(
    mean_r: Tensor, var_r: Tensor, w_r: Tensor | None, b_r: Tensor | None, eps: float,
    rstd_r: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row ``scale = w rsqrt(var + eps)`` and ``shift = b - mean * scale``, folded as torch's
    batch-norm kernel folds them, so that ``y = x * scale + shift``. ``rstd_r`` replaces
    ``rsqrt(var + eps)`` when the caller already has it."""
    if rstd_r is None:
        scale = (var_r + eps).rsqrt_()
        if w_r is not None:
            scale = scale.mul_(w_r)
    else:
        scale = rstd_r if w_r is None else rstd_r * w_r
    if b_r is None:
        return scale, (mean_r * scale).neg_()
    return scale, torch.addcmul(b_r, mean_r, scale, value=-1)


def _affine(
    xv: Tensor, mean_r: Tensor, var_r: Tensor, w_r: Tensor | None, b_r: Tensor | None,
    eps: float, out: Tensor | None = None, rstd_r: Tensor | None = None,
) -> Tensor:
    """``(x - mean) * rsqrt(var + eps) * w + b`` per coefficient row of the units view ``xv``.

    Torch's eval-mode batch norm does it in one pass; on CPU its kernel for the 2D (N, U)
    layout (L = 1, e.g. 1d layers) is ~3x slower than TensorIterator's, so there the same fold
    (scale = w rsqrt(var + eps), shift = b - mean scale, as the batch-norm kernel computes it)
    (:func:`_fold`) feeds one addcmul. ``out`` (a buffer of xv's size, or None) receives the
    result; ``rstd_r``, when given, is the per-row ``rsqrt(var + eps)`` (used on 2D views).
    """
    if xv.dim() == 2 and xv.device.type == "cpu" and xv.dtype == mean_r.dtype:
        scale, shift = _fold(mean_r, var_r, w_r, b_r, eps, rstd_r)
        if out is None:
            return torch.addcmul(shift, xv, scale)
        return torch.addcmul(shift, xv, scale, out=out.view(xv.shape))
    if out is None:
        return torch.batch_norm(xv, w_r, b_r, mean_r, var_r, False, 0.0, eps, _cudnn())
    return torch.ops.aten.native_batch_norm.out(
        xv, w_r, b_r, mean_r, var_r, False, 0.0, eps, out=out.view(xv.shape),
        save_mean=xv.new_empty(0), save_invstd=xv.new_empty(0),
    )[0]


def _cast(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s dtype (no op call when it already is: each costs microseconds)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _gather_rows(
    group_index: Tensor | None, channel_index: Tensor | None, mean: Tensor, var: Tensor,
    weight: Tensor | None, bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-row mean, variance (in the parameters' dtype), weight and bias, gathered by a plan's
    row indices (None: the identity)."""
    pdt = mean.dtype if weight is None else weight.dtype
    if mean.dtype != pdt:
        mean, var = mean.to(pdt), var.to(pdt)
    if group_index is not None:
        mean, var = mean.index_select(-1, group_index), var.index_select(-1, group_index)
    if channel_index is not None:
        weight = None if weight is None else weight.index_select(-1, channel_index)
        bias = None if bias is None else bias.index_select(-1, channel_index)
    return mean, var, weight, bias


def _rows(
    plan: UnitsPlan, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-row mean, variance (in the parameters' dtype), weight and bias for the units view."""
    return _gather_rows(plan.group_index(mean.device), plan.channel_index(mean.device), mean,
                        var, weight, bias)


def _row_sums_eval(
    dyv: Tensor, xv: Tensor, mean_r: Tensor, var_r: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-row ``sum(dy * xhat)`` and ``sum(dy)`` of the units view (rows along dim 1) from
    torch's eval-mode batch-norm backward with only the weight/bias gradients requested:
    the statistics are passed as running statistics (any parameter dtype). On
    :data:`~bgnorm.ops.dispatch.EVAL_REDUCTION_DEVICES` only: CUDA's kernel needs the saved
    statistics and a weight (see :func:`_row_sums_saved`)."""
    _, s_dyx, s_dy = torch.ops.aten.native_batch_norm_backward(
        dyv, xv, None, mean_r, var_r, None, None, False, eps, [False, True, True]
    )
    return s_dyx, s_dy


def _row_sums_saved(
    dyv: Tensor, xv: Tensor, mean_c: Tensor, rstd_c: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_row_sums_eval` on any device: the training-mode batch-norm backward with the
    per-row ``mean_c`` and ``rstd_c`` = rsqrt(var + eps) as saved statistics (contiguous,
    in :func:`~bgnorm.ops.plan.compute_dtype`, i.e. CUDA's accumulate type) and a weight of
    ones in that dtype. CUDA's ``batch_norm_backward_cuda`` (aten/src/ATen/native/cuda/
    Normalization.cu) asserts that save_mean/save_invstd are defined whenever no fused
    grad_input is asked for, and its reduction allocates grad_weight/grad_bias from
    ``weight.options()`` (an undefined weight raises "tensor does not have a device"; the
    channels-last reduction, taken by 2D views, returns empty ones instead). With a defined
    weight the returned gradients are ``sum(dy * (x - mean)) * rstd`` and ``sum(dy)``,
    independent of the weight's values, in the weight's dtype."""
    ones = _identity_stats(xv.shape[1], mean_c.dtype, mean_c.device)[1]
    _, s_dyx, s_dy = torch.ops.aten.native_batch_norm_backward(
        dyv, xv, ones, None, None, mean_c, rstd_c, True, 0.0, [False, True, True]
    )
    return s_dyx, s_dy


class NativeGroupedNormFunction(torch.autograd.Function):
    """BGN/GBGN over native kernels; see the module docstring for the math.

    Inputs: ``x`` contiguous (N, C, *); ``weight``/``bias`` (C,) or None; ``plan`` its
    :class:`~bgnorm.ops.plan.UnitsPlan`; ``running`` the (running_mean, running_var) buffers
    to update in place, or None; ``momentum``; ``eps``. Output: y like ``x``. Saves ``x`` and
    the (P0*G,) statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, running, momentum, eps):  # type: ignore[override]
        cdt = compute_dtype(x.dtype)
        mean, var, buf = _moments(x, plan, cdt)
        if running is not None:
            update_running(*running, mean, var, plan.p0, plan.count, momentum)
        mean_r, var_r, w_r, b_r = _rows(plan, mean, var, weight, bias)
        y = _affine(plan.view(x), mean_r, var_r, w_r, b_r, eps, buf)
        # only x and the (P0*G,) statistics are kept: the per-row vectors are rebuilt in
        # backward (a few small gathers; they are as long as C*S in the columns layout)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.plan, ctx.eps = plan, eps
        if y.shape == x.shape and y._base is None:  # 2D inputs: y is already a fresh tensor
            return y
        return _unsafe_view(y, x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, mean, var = ctx.saved_tensors
        plan: UnitsPlan = ctx.plan
        eps = ctx.eps
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            view = (plan.p0, plan.e, plan.g, plan.lg)
            x3 = x.view(plan.n, plan.c, plan.s)
            dx, dw, db = differentiable_grads(x3, weight, bias, view, eps, dy)
            dx = None if dx is None else dx.reshape(x.shape)
            return dx, dw, db, None, None, None, None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mean_r, var_r, w_r, _ = _rows(plan, mean, var, weight, None)
        xv, dyv = plan.view(x), plan.view(dy if dy.is_contiguous() else dy.contiguous())
        rstd = (var + eps).rsqrt()
        # per-row sum(dy * xhat) and sum(dy) in one native reduction pass
        if dispatch.eval_reduction(xv.device):
            s_dyx, s_dy = _row_sums_eval(dyv, xv, mean_r, var_r, eps)
        else:
            s_dyx, s_dy = _row_sums_saved(
                dyv, xv, *plan.groups_to_rows(torch.stack((mean, rstd))).unbind(0))
        sums = torch.stack((s_dy, s_dyx))  # (2, rows)
        dw = db = dx = None
        if need_w or need_b:
            if plan.p0 == 1 and plan.upc == 1:  # rows are channels
                db, dw = s_dy, s_dyx
            else:
                db, dw = plan.rows_to_channels(sums).unbind(0)
            dw = _cast(dw, weight) if need_w else None
            db = _cast(db, bias) if need_b else None
        if need_x:
            if w_r is not None:
                sums = sums * w_r
            # dx = A*dy + (-rstd m2)*xhat + (-rstd m1): A = gamma rstd, m1 = mean_R(gamma dy),
            # m2 = mean_R(gamma dy xhat); xhat recomputed by the kernel from the saved stats
            coef = plan.rows_to_groups(sums).mul(rstd * (-1.0 / plan.count))  # (2, P0*G)
            c1_r, c2_r, rstd_r = plan.groups_to_rows(
                _cast(torch.cat((coef, rstd.view(1, -1))), mean_r)).unbind(0)
            a_r = rstd_r if w_r is None else rstd_r * w_r
            dx = _affine(xv, mean_r, var_r, c2_r, c1_r, eps, rstd_r=rstd_r)
            dx = dx.addcmul_(dyv, a_r.view(plan.coef_shape()))
            if dx.shape != x.shape:
                dx = dx.view(x.shape)
        return dx, dw, db, None, None, None, None


def native_plan(n: int, c: int, s: int, g: int, p0: int) -> UnitsPlan:
    """The units plan the native engine runs (N, C, S, G, P0) with: columns for short units."""
    return units_plan(n, c, s, g, p0, dispatch.use_columns(n, c, s, g, p0))


def native_grouped_norm(
    x: Tensor, num_groups: int, batch_groups: int, weight: Tensor | None, bias: Tensor | None,
    running: tuple[Tensor, Tensor] | None, momentum: float, eps: float,
) -> Tensor:
    """Apply :class:`NativeGroupedNormFunction` to ``x`` (N, C, *) (made contiguous), updating
    ``running`` (running_mean, running_var) in place when given."""
    n, c = x.shape[:2]
    plan = native_plan(n, c, math.prod(x.shape[2:]), num_groups, batch_groups)
    return NativeGroupedNormFunction.apply(
        x.contiguous(), weight, bias, plan, running, momentum, eps
    )


_IDENTITY_STATS: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def _identity_stats(c: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(C,) zeros and ones: running statistics with which torch's eval-mode batch norm (eps =
    0) is the per-channel affine ``y = x * weight + bias``. Cached (never written to), except
    fake tensors made under FakeTensorMode."""
    key = (c, dtype, device)
    stats = _IDENTITY_STATS.get(key)
    if stats is None:
        with torch.inference_mode(False), torch.no_grad():
            stats = (torch.zeros(c, dtype=dtype, device=device),
                     torch.ones(c, dtype=dtype, device=device))
        if not is_fake(stats[0]):
            if len(_IDENTITY_STATS) >= 64:  # bounded: models have a few channel counts
                _IDENTITY_STATS.clear()
            _IDENTITY_STATS[key] = stats
    return stats
