r"""The public math of the family: pure functions, no module state.

Batch Group Normalization (Zhou et al., AAAI 2021, Eq. 8-9). For ``input`` of shape
(N, C, \*spatial) let D = C * prod(spatial) and view it in row-major order as (N, G, D/G). For
group g the statistics are taken over the whole mini-batch and the group:

.. math::
    \mu_g = \frac{1}{N D/G} \sum_{n, j} x_{n,g,j}, \qquad
    \sigma^2_g = \frac{1}{N D/G} \sum_{n, j} (x_{n,g,j} - \mu_g)^2  \quad\text{(biased)},

    y_{n,c,s} = \gamma_c \frac{x_{n,c,s} - \mu_{g(c,s)}}{\sqrt{\sigma^2_{g(c,s)} + \epsilon}}
    + \beta_c.

Any G dividing D is valid. G = C is BatchNorm; G a multiple of C splits each channel into G/C
contiguous bands; G a divisor of C groups C/G whole channels; other G give groups that straddle
channel boundaries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .ops import dispatch, triton_bgn
from .ops.bands import bands_norm
from .ops.channels import channel_groups_norm
from .ops.composed import grouped_norm_composed
from .ops.eval import EvalKernel, native_eval_kernel
from .ops.general import grouped_norm
from .ops.plan import UnitsPlan, contiguous_for, memory_format_of, units_plan, update_running
from .ops.units import native_grouped_norm

__all__ = ["batch_group_norm", "general_batch_group_norm", "positional_norm"]


def _plan(n: int, c: int, s: int, g: int, p0: int) -> UnitsPlan:
    """The units plan of these sizes: cached in eager mode, built afresh while tracing."""
    if torch.compiler.is_compiling():
        return UnitsPlan(n, c, s, g, p0)
    return units_plan(n, c, s, g, p0)


def _empty_norm(
    input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 0.0,
) -> Tensor:
    """The output for an empty ``input`` (N = 0 or a spatial size of 0), as torch's
    BatchNorm gives it: an empty tensor of the input's shape, dtype and memory format, linked
    to ``weight`` and ``bias`` so that their gradients are zeros (no statistics: running
    statistics are left as they are). The signature of an eval kernel."""
    y = input.clone()
    if weight is not None or bias is not None:
        shape = (1, -1) + (1,) * (input.dim() - 2)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        y = y.to(input.dtype)
    return y


def eval_kernel(
    input: Tensor, num_groups: int, running_mean: Tensor, weight: Tensor | None
) -> EvalKernel:
    """The eval pass of BGN/GBGN for inputs like ``input``, bound to their configuration
    (sizes, dtypes, device, memory format): call it as ``kernel(input, running_mean,
    running_var, weight, bias, eps)``. Layers keep it for the inputs they validated (see
    :func:`bgnorm.ops.eval.native_eval_kernel`)."""
    if input.numel() == 0:
        return _empty_norm
    n, c = input.shape[:2]
    plan = _plan(n, c, math.prod(input.shape[2:]), num_groups, 1)
    pdt = running_mean.dtype if weight is None else weight.dtype
    return native_eval_kernel(input, plan, pdt)


def _validate(
    fn: _checks.Who, input: Tensor, num_groups: int, examples_per_group: int | None,
    running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, training: bool, eps: float,
) -> None:
    """Every check of BGN/GBGN's arguments, with messages that name the problem and the fix
    and ``fn`` (the function, or a callable returning the layer's description)."""
    _checks.check_num_groups(num_groups, fn=fn)
    _checks.check_eps(fn, eps, training)
    _checks.check_input(fn, input)
    c = input.shape[1]
    _checks.check_groups_divide(fn, input, num_groups)
    _checks.check_vector(fn, "weight", weight, c, "one gamma per channel")
    _checks.check_vector(fn, "bias", bias, c, "one beta per channel")
    _checks.check_vector(fn, "running_mean", running_mean, num_groups, "one per group")
    _checks.check_vector(fn, "running_var", running_var, num_groups, "one per group")
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{_checks.label(fn)}: pass both running_mean and running_var, or neither")
    if not training:
        if running_mean is None:
            raise ValueError(
                f"{_checks.label(fn)}: training=False normalizes with running statistics, but "
                "running_mean and running_var are None; pass them, or use training=True for "
                "batch statistics"
            )
        return
    e = input.shape[0]
    if examples_per_group is not None:
        _checks.check_batch_groups(fn, input, examples_per_group)
        e = examples_per_group
    count = e * (math.prod(input.shape[1:]) // num_groups)
    _checks.check_values_per_group(fn, input, count, num_groups)


def _grouped_batch_norm(
    input: Tensor,
    num_groups: int,
    examples_per_group: int | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """BGN (``examples_per_group=None``: one batch group) and GBGN on validated arguments."""
    if input.numel() == 0:  # an empty batch or spatial size: an empty output, as BatchNorm's
        return _empty_norm(input, None, None, weight, bias)
    if not training:  # constant statistics: one native pass
        kernel = eval_kernel(input, num_groups, running_mean, weight)
        return kernel(input, running_mean, running_var, weight, bias, eps)

    engine = dispatch.choose_engine(input, num_groups, examples_per_group)
    if engine == "batchnorm":  # G = C is BatchNorm: torch's own kernel, bit for bit, any layout
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    args = (num_groups, examples_per_group, running_mean, running_var, weight, bias, momentum, eps)
    fmt = None if input.is_contiguous() else memory_format_of(input)
    if fmt is None or (engine == "triton" and triton_bgn.reads_layout(input)):
        return _train(input, engine, *args)  # (the Triton kernels read channels-last as it is)
    # the other engines work on contiguous tensors: y and dx keep a channels-last input's
    # memory format, as torch's norms do (a copy each way)
    return _train(contiguous_for(input, fmt), engine, *args).contiguous(memory_format=fmt)


def _train(
    input: Tensor,
    engine: str,
    num_groups: int,
    examples_per_group: int | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """BGN/GBGN in training on ``engine`` (:func:`bgnorm.ops.dispatch.choose_engine`)."""
    n, c = input.shape[:2]
    if engine == "bands":
        return bands_norm(input, num_groups, weight, bias, running_mean, running_var, momentum,
                          eps)
    if engine == "channels":
        return channel_groups_norm(
            input, num_groups, weight, bias, running_mean, running_var, momentum, eps
        )
    e = n if examples_per_group is None else examples_per_group
    p0 = n // e
    running = None if running_mean is None else (running_mean, running_var)
    if engine == "triton":
        return triton_bgn.triton_grouped_norm(
            input, num_groups, p0, weight, bias, eps,
            None if running is None else (*running, momentum))[0]
    if engine in ("composed", "general"):
        s = math.prod(input.shape[2:])
        x3 = input.reshape(n, c, s)
        if engine == "composed":
            view = (p0, e, num_groups, c * s // num_groups)
            y, mean, var = grouped_norm_composed(x3, view, weight, bias, eps)
        else:
            y, mean, var = grouped_norm(x3, num_groups, p0, weight, bias, eps)
        if running is not None:
            with torch.no_grad():
                update_running(*running, mean, var, p0, e * (c * s // num_groups), momentum)
        return y.view(input.shape)
    return native_grouped_norm(input, num_groups, p0, weight, bias, running, momentum, eps)


def batch_group_norm(
    input: Tensor,
    num_groups: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Group Normalization of ``input`` (N, C, \*) with ``num_groups`` groups over D.

    With ``training=True`` the batch statistics (biased variance) normalize the input and, when
    given, ``running_mean``/``running_var`` (shape (G,)) are updated in place exactly like
    :func:`torch.nn.functional.batch_norm`: ``running = (1 - momentum) * running + momentum *
    stat``, with the unbiased variance ``var * n / (n - 1)``, n = N * D / G. With
    ``training=False`` the running statistics normalize the input.

    Args:
        input: floating tensor of shape (N, C, \*).
        num_groups: G, any positive divisor of D = C * prod(spatial).
        running_mean, running_var: (G,) buffers, or None.
        weight, bias: per-channel affine parameters of shape (C,), or None.
        training: use (and update) batch statistics.
        momentum: running-average factor.
        eps: added to the variance; as in :func:`torch.nn.functional.batch_norm` it must be
            positive in training and non-negative otherwise (ValueError).

    Returns:
        Tensor of the shape and dtype of ``input``. Statistics are computed in float32 for
        float16/bfloat16 inputs. An empty ``input`` (N = 0 or a spatial size of 0) gives an
        empty output and leaves the running statistics alone, as torch's batch_norm.

    Shape:
        - input: (N, C, \*); weight, bias: (C,); running_mean, running_var: (G,);
          output: (N, C, \*), in the memory format of ``input``.

    Example:
        >>> x = torch.randn(8, 64, 7, 7)
        >>> y = batch_group_norm(x, 16, training=True)  # groups of 4 whole channels
        >>> y.shape
        torch.Size([8, 64, 7, 7])
    """
    fn = "batch_group_norm"
    num_groups = _checks.check_num_groups(num_groups, fn=fn)  # numpy integers: Python ints
    _validate(fn, input, num_groups, None, running_mean, running_var, weight, bias, training,
              eps)
    return _grouped_batch_norm(
        input, num_groups, None, running_mean, running_var, weight, bias, training, momentum, eps
    )


def general_batch_group_norm(
    input: Tensor,
    num_groups: int,
    examples_per_group: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""General Batch Group Normalization (GBGN): groups over the batch *and* over D.

    The batch is cut into N/e groups of ``examples_per_group`` = e consecutive examples; each is
    normalized like :func:`batch_group_norm` with its own (G,) statistics, i.e. ``input`` viewed
    as (N/e, e, G, D/G) is reduced over axes 1 and 3 (statistics of shape (N/e, G)). For batch
    group b (the examples n with :math:`\lfloor n / e \rfloor = b`) and group g:

    .. math::
        \mu_{b,g} = \frac{1}{e D/G} \sum_{n \in b,\, j} x_{n,g,j}, \qquad
        \sigma^2_{b,g} = \frac{1}{e D/G} \sum_{n \in b,\, j} (x_{n,g,j} - \mu_{b,g})^2,

        y_{n,c,s} = \gamma_c \frac{x_{n,c,s} - \mu_{b(n),g(c,s)}}
        {\sqrt{\sigma^2_{b(n),g(c,s)} + \epsilon}} + \beta_c.

    Running statistics are updated with the average over the batch groups of each group's mean
    and unbiased variance (:math:`\sigma^2_{b,g} \, n/(n-1)`, n = e * D / G), as
    :func:`batch_group_norm` updates them; with ``training=False`` they normalize every
    example. ``examples_per_group = N`` is :func:`batch_group_norm`; with G = C it is
    BatchNorm computed per slice of e examples ("virtual workers").

    Args:
        input: floating tensor of shape (N, C, \*); in training N must be a multiple of e.
        num_groups: G, any positive divisor of D = C * prod(spatial).
        examples_per_group: e, the number of consecutive examples per batch group.
        running_mean, running_var: (G,) buffers, or None.
        weight, bias: per-channel affine parameters of shape (C,), or None.
        training: use batch statistics (and update the running ones when given).
        momentum: running-average factor.
        eps: added to the variance (positive in training, non-negative otherwise).

    Returns:
        Tensor of the shape and dtype of ``input`` (statistics in float32 for
        float16/bfloat16 inputs).

    Shape:
        - input: (N, C, \*); weight, bias: (C,); running_mean, running_var: (G,);
          output: (N, C, \*).

    Example:
        >>> x = torch.randn(8, 32, 4, 4)
        >>> general_batch_group_norm(x, 8, examples_per_group=2, training=True).shape
        torch.Size([8, 32, 4, 4])
    """
    fn = "general_batch_group_norm"
    num_groups = _checks.check_num_groups(num_groups, fn=fn)  # numpy integers: Python ints
    examples_per_group = _checks.check_num_groups(examples_per_group, "examples_per_group", fn)
    _validate(fn, input, num_groups, examples_per_group, running_mean, running_var, weight, bias,
              training, eps)
    return _grouped_batch_norm(
        input, num_groups, examples_per_group, running_mean, running_var, weight, bias,
        training, momentum, eps,
    )


def positional_norm(
    input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    r"""Positional Normalization (Li et al., 2019): statistics over C at every position.

    ``input`` (N, C, \*) is viewed as (N, C, S, 1): mean and biased variance over the channels
    of each example and position (statistics of shape (N, S)), then a per-channel affine:

    .. math::
        \mu_{n,s} = \frac{1}{C} \sum_c x_{n,c,s}, \qquad
        \sigma^2_{n,s} = \frac{1}{C} \sum_c (x_{n,c,s} - \mu_{n,s})^2, \qquad
        y_{n,c,s} = \gamma_c \frac{x_{n,c,s} - \mu_{n,s}}{\sqrt{\sigma^2_{n,s} + \epsilon}}
        + \beta_c.

    It is computed as torch's LayerNorm over C of the channels-last view of ``input``.
    The moments are not re-injected (as the BGN paper used PN). No running statistics: train and
    eval behave the same.

    Args:
        input: floating tensor of shape (N, C, \*).
        weight, bias: per-channel affine parameters of shape (C,), or None.
        eps: added to the variance.

    Returns:
        Tensor of the shape and dtype of ``input``, in its memory format.

    Shape:
        - input: (N, C, \*); weight, bias: (C,); output: (N, C, \*).

    Example:
        >>> positional_norm(torch.randn(2, 16, 5, 5)).mean(dim=1).abs().max() < 1e-5
        tensor(True)
    """
    fn = "positional_norm"
    _checks.check_input(fn, input)
    c = input.shape[1]
    _checks.check_vector(fn, "weight", weight, c, "one gamma per channel")
    _checks.check_vector(fn, "bias", bias, c, "one beta per channel")
    # LayerNorm over C of the channels-last view is exactly PN: torch's own kernel, forward,
    # backward and double backward. The output keeps the input's memory format.
    y = F.layer_norm(input.movedim(1, -1), (c,), weight, bias, eps).movedim(-1, 1)
    if memory_format_of(input) is not None:  # (never under torch.func: vmap cannot query it)
        return y  # channels-last: y (and dx) already are
    return y.contiguous()
