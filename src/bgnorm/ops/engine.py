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
"""

from __future__ import annotations

import torch
from torch import Tensor

View = tuple[int, int, int, int]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half types, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _channel_view(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).view(1, -1, 1)


def grouped_moments(x4: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of a ``(P0, R0, P1, R1)`` view over axes 1 and 3.

    Returns two tensors of shape ``(P0, 1, P1, 1)`` in :func:`compute_dtype` precision. Uses
    torch's numerically stable ``var_mean`` (no ``E[x^2] - E[x]^2`` cancellation).
    """
    xs = x4.to(compute_dtype(x4.dtype))
    var, mean = torch.var_mean(xs, dim=(1, 3), correction=0, keepdim=True)
    return mean, var


def grouped_norm_reference(
    x3: Tensor, view: View, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Differentiable composition of the grouped norm (used for double backward)."""
    cdt = compute_dtype(x3.dtype)
    x4 = x3.reshape(view).to(cdt)
    mean, var = grouped_moments(x4)
    y = ((x4 - mean) * torch.rsqrt(var + eps)).view(x3.shape)
    if weight is not None:
        y = y * _channel_view(weight, cdt)
    if bias is not None:
        y = y + _channel_view(bias, cdt)
    return y.to(x3.dtype)


class GroupedNormFunction(torch.autograd.Function):
    """Grouped normalization with per-channel affine over a ``(P0, R0, P1, R1)`` view.

    Inputs: ``x3`` contiguous of shape (N, C, S); ``weight``/``bias`` of shape (C,) or None;
    ``view`` a 4-tuple whose product is ``x3.numel()``; ``eps``.
    Outputs: ``y`` in the ``view`` shape and the input dtype, and the non-differentiable batch
    statistics ``mean`` and biased ``var`` of shape (P0, P1) in compute precision.
    """

    @staticmethod
    def forward(ctx, x3, weight, bias, view, eps):  # type: ignore[override]
        cdt = compute_dtype(x3.dtype)
        x4 = x3.view(view)
        mean, var = grouped_moments(x4)
        rstd = torch.rsqrt(var + eps)
        y4 = (x4.to(cdt) - mean).mul_(rstd)
        y3 = y4.view(x3.shape)  # in-place affine on a view of y4; y4 itself is returned
        if weight is not None:
            y3.mul_(_channel_view(weight, cdt))
        if bias is not None:
            y3.add_(_channel_view(bias, cdt))
        ctx.save_for_backward(x3, weight, bias, mean, rstd)
        ctx.view = view
        ctx.eps = eps
        m, v = mean.view(view[0], view[2]), var.view(view[0], view[2])
        ctx.mark_non_differentiable(m, v)
        # Outputs must not be views created here (in-place ops on them would be refused), so y
        # is returned in the 4-axis view shape and reshaped by the caller.
        return y4.to(x3.dtype), m, v

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):  # type: ignore[override]
        x3, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate a differentiable recomputation instead.
            inputs = [t for t in (x3, weight, bias) if t is not None and t.requires_grad]
            y = grouped_norm_reference(x3, ctx.view, weight, bias, ctx.eps)
            grads = iter(torch.autograd.grad(y, inputs, dy.reshape(y.shape), create_graph=True,
                                             allow_unused=True))
            out = [next(grads) if t is not None and t.requires_grad else None
                   for t in (x3, weight, bias)]
            return out[0], out[1], out[2], None, None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = compute_dtype(x3.dtype)
        view = ctx.view
        dyc = dy.reshape(x3.shape).to(cdt)
        xhat = (x3.view(view).to(cdt) - mean).mul_(rstd)
        dx = dw = db = None
        if need_w:
            dw = (dyc * xhat.view(x3.shape)).sum(dim=(0, 2)).to(weight.dtype)
        if need_b:
            db = dyc.sum(dim=(0, 2)).to(bias.dtype)
        if need_x:
            g = dyc * _channel_view(weight, cdt) if weight is not None else dyc
            g4 = g.view(view)
            m1 = g4.mean(dim=(1, 3), keepdim=True)
            m2 = (g4 * xhat).mean(dim=(1, 3), keepdim=True)
            dx = (g4 - m1).sub_(xhat.mul_(m2)).mul_(rstd).view(x3.shape).to(x3.dtype)
        return dx, dw, db, None, None


def grouped_norm(
    x3: Tensor, view: View, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply :class:`GroupedNormFunction`; ``x3`` is made contiguous first.

    Returns ``(y, mean, var)`` with ``y`` of shape (N, C, S) and statistics of shape (P0, P1).
    """
    y, mean, var = GroupedNormFunction.apply(x3.contiguous(), weight, bias, view, eps)
    return y.view(x3.shape), mean, var
