"""The composed engine: BGN/GBGN as a plain composition of differentiable torch ops.

No autograd.Function: this is what runs under torch.func transforms (grad, vmap, jvp), which
cannot run the other engines' Functions, and what every engine's backward differentiates when
it is itself differentiated (``create_graph=True``: :func:`differentiable_grads`), so double
backward is exact. Over the view (P0, R0, P1, R1) of a contiguous (N, C, S) input (see
:mod:`bgnorm.ops.general`), statistics have shape (P0, P1), reduced over R0 and R1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import View, compute_dtype


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
