"""The eval passes of BGN/GBGN: one native pass with the (G,) running statistics, bound to one
configuration (sizes, layout, dtypes, device, memory format); the pass is chosen by
:func:`bgnorm.ops.dispatch.choose_eval_pass`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from . import dispatch
from .plan import UnitsPlan, contiguous_for, memory_format_of
from .units import _affine, _cudnn, _fold, _gather_rows

__all__ = ["EvalKernel", "native_eval_kernel"]


def _eval_columns(
    plan: UnitsPlan, group_index: Tensor | None, channel_index: Tensor | None, x: Tensor,
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval over the 2D (N, D) view: scale = w rsqrt(var + eps) and shift = b - mean * scale
    folded per unit, spread over the D columns of an example, applied by one addcmul."""
    rows = _gather_rows(group_index, channel_index, running_mean, running_var, weight, bias)
    if rows[0].dtype != x.dtype:  # parameters replaced by ones of another dtype since
        return _affine(plan.view(x.contiguous()), *rows, eps).view(x.shape)  # as _eval_units
    coef = torch.stack(_fold(*rows, eps))  # (2, U): scale, shift
    if plan.l > 1:
        coef = coef.view(2, plan.u, 1).expand(2, plan.u, plan.l).reshape(2, -1)
    return torch.addcmul(coef[1], x.view(plan.n, coef.shape[1]), coef[0]).view(x.shape)


def _eval_channels(
    index: Tensor | None, on_cuda: bool, x: Tensor, running_mean: Tensor, running_var: Tensor,
    weight: Tensor | None, bias: Tensor | None, eps: float,
) -> Tensor:
    """Eval when the units are channels (G divides C): torch's batch norm on x as it is, in
    any memory format, with the statistics gathered per channel by ``index`` (None: G = C).
    The layer's hot path in eval, so its arguments are bound once (``index`` for x's device;
    cuDNN's switch is read per call on CUDA only, where it matters)."""
    if index is not None:
        running_mean = running_mean.index_select(0, index)
        running_var = running_var.index_select(0, index)
    return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                            on_cuda and _cudnn())


def _eval_units(
    plan: UnitsPlan, group_index: Tensor | None, channel_index: Tensor | None,
    memory_format: torch.memory_format | None, x: Tensor, running_mean: Tensor,
    running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
) -> Tensor:
    """Eval over the units view (bands, straddling groups): one pass of :func:`_affine` with
    the rows gathered by the plan's indices for x's device (bound once per configuration).
    A channels-last x (``memory_format``) gets y and dx in its format, as torch's norms."""
    rows = _gather_rows(group_index, channel_index, running_mean, running_var, weight, bias)
    if memory_format is None:
        return _affine(plan.view(x.contiguous()), *rows, eps).view(x.shape)
    y = _affine(plan.view(contiguous_for(x, memory_format)), *rows, eps).view(x.shape)
    return y.contiguous(memory_format=memory_format)


#: An eval pass bound to one configuration: ``kernel(x, running_mean, running_var, weight,
#: bias, eps)``.
EvalKernel = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", float], Tensor]


def native_eval_kernel(x: Tensor, plan: UnitsPlan, param_dtype: torch.dtype) -> EvalKernel:
    """The eval pass of BGN/GBGN for inputs like ``x`` (N, C, *) over ``plan``'s units view:
    one native pass with the (G,) running statistics, bound to the configuration (sizes,
    layout, dtypes, device, memory format). Call it as ``kernel(x, running_mean, running_var,
    weight, bias, eps)``; layers keep it for the inputs they validated.

    The pass (:func:`~bgnorm.ops.dispatch.choose_eval_pass`):

    * "columns", many short units: the per-unit scale and shift are spread over the D columns
      of an example and one addcmul runs over the 2D (N, D) view (torch's batch-norm kernel
      pays a per-row cost: 6x slower on 2x2 maps on the 2-core CPU).
    * "channels", units that are channels (G divides C; G = C is BatchNorm): torch's batch
      norm on x as it is, in any memory format, with the statistics gathered per channel.
    * "units" (bands, straddling groups): the batch-norm pass over the units view (of a
      contiguous copy of a channels-last x, whose format y then takes).
    """
    group_index = plan.group_index(x.device)
    kind = dispatch.choose_eval_pass(x, plan, param_dtype)
    if kind == "columns":
        return functools.partial(_eval_columns, plan, group_index, plan.channel_index(x.device))
    if kind == "channels":
        return functools.partial(_eval_channels, group_index, x.device.type == "cuda")
    return functools.partial(_eval_units, plan, group_index, plan.channel_index(x.device),
                             memory_format_of(x))
