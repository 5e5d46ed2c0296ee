r"""Weight Standardization (Qiao et al., 2019): convolutions whose filters are standardized.

Each output channel's filter (its C_in/groups * prod(kernel) weights, the fan-in) is shifted to
mean 0 and scaled to variance 1 before the convolution, in every forward pass (the gradient
flows through the standardization):

.. math::
    \hat W_{o,i} = \frac{W_{o,i} - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}}, \qquad
    \mu_o = \frac{1}{I}\sum_i W_{o,i}, \quad \sigma_o^2 = \frac{1}{I}\sum_i (W_{o,i} - \mu_o)^2

(I the fan-in, biased variance). It is meant to be used with a batch-independent norm after
the convolution (the paper's GN+WS) or with BGN. Three ways to get it:

* :class:`StdConv1d`/``2d``/``3d``: torch's Conv1d/2d/3d with the same arguments and a
  keyword-only ``eps`` (default 1e-6, timm's ``StdConv2d``);
* :func:`standardize_weights`: turns the plain convolutions of a model into those, keeping
  their parameters (the same tensors: an optimizer built before keeps working) and their
  state-dict keys;
* :class:`WeightStandardization`: a ``torch.nn.utils.parametrize`` parametrization for any
  module's weight of shape (out, ...).

The standardization runs on torch's batch-norm kernel (the (out, fan-in) weight viewed as one
example of ``out`` channels), forward and backward. Transposed convolutions (weight
(C_in, C_out/groups, ...)) are not standardized by :func:`standardize_weights`.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.ReLU())
    >>> net = standardize_weights(net)
    >>> net[0]
    StdConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), eps=1e-06)
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "StdConv1d",
    "StdConv2d",
    "StdConv3d",
    "WeightStandardization",
    "standardize_weights",
]

#: timm's StdConv2d default.
DEFAULT_WS_EPS = 1e-6


def _check_eps(who: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(
            f"{who}: eps must be a positive number, got {eps!r}; it is added to each filter's "
            "variance, which is 0 for a constant filter (e.g. zero-initialised). Pass e.g. "
            f"eps={DEFAULT_WS_EPS} (the default)")
    return float(eps)


def standardize(weight: Tensor, eps: float) -> Tensor:
    """``weight`` (out, \\*) with each output channel's values at mean 0 and variance 1."""
    out = weight.shape[0]
    flat = weight.reshape(1, out, -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(
        weight)


class WeightStandardization(nn.Module):
    r"""A parametrization that standardizes a weight per output channel (dim 0), as in
    :mod:`bgnorm.weight_std`'s equation, for ``torch.nn.utils.parametrize``.

    Args:
        eps: added to each output channel's variance. Default: 1e-6.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> conv = nn.Conv2d(3, 8, 3)
        >>> _ = parametrize.register_parametrization(conv, "weight", WeightStandardization())
        >>> w = conv.weight.flatten(1)
        >>> bool(w.mean(1).abs().max() < 1e-6), bool((w.var(1, correction=0) - 1).abs().max() < 1e-3)
        (True, True)
    """  # noqa: E501

    def __init__(self, eps: float = DEFAULT_WS_EPS) -> None:
        super().__init__()
        self.eps = _check_eps(type(self).__name__, eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, weight: Tensor) -> Tensor:
        return standardize(weight, self.eps)


class _StdConvMixin:
    """forward of torch's conv with the standardized weight."""

    eps: float
    weight: Tensor
    bias: Tensor | None

    def _init_eps(self, eps: float) -> None:
        self.eps = _check_eps(type(self).__name__, eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"  # type: ignore[misc]

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(  # type: ignore[attr-defined]
            input, standardize(self.weight, self.eps), self.bias)


class StdConv1d(_StdConvMixin, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with Weight Standardization (see :mod:`bgnorm.weight_std`).

    Takes Conv1d's arguments and a keyword-only ``eps`` (default 1e-6).

    Example:
        >>> StdConv1d(4, 8, 3, padding=1)(torch.randn(2, 4, 10)).shape
        torch.Size([2, 8, 10])
    """

    def __init__(self, *args: Any, eps: float = DEFAULT_WS_EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_eps(eps)


class StdConv2d(_StdConvMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with Weight Standardization (see :mod:`bgnorm.weight_std`).

    Takes Conv2d's arguments (``bias=True``, ``padding=0`` by default, as torch's; timm's
    StdConv2d defaults to no bias and "same" padding) and a keyword-only ``eps`` (default 1e-6,
    timm's).

    Example:
        >>> conv = StdConv2d(3, 8, 3, padding=1, bias=False)
        >>> conv(torch.randn(2, 3, 6, 6)).shape
        torch.Size([2, 8, 6, 6])
    """

    def __init__(self, *args: Any, eps: float = DEFAULT_WS_EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_eps(eps)


class StdConv3d(_StdConvMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with Weight Standardization (see :mod:`bgnorm.weight_std`).

    Takes Conv3d's arguments and a keyword-only ``eps`` (default 1e-6).

    Example:
        >>> StdConv3d(2, 4, 3)(torch.randn(1, 2, 5, 5, 5)).shape
        torch.Size([1, 4, 3, 3, 3])
    """

    def __init__(self, *args: Any, eps: float = DEFAULT_WS_EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_eps(eps)


_STD_CONV: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: StdConv1d, nn.Conv2d: StdConv2d, nn.Conv3d: StdConv3d,
}


def _std_conv_of(conv: nn.Module, eps: float) -> nn.Module:
    """The StdConv of ``conv``'s class with ``conv``'s own parameters (the same tensors)."""
    cls = _STD_CONV[type(conv)]
    with torch.device("meta"):  # no memory: the parameters are replaced right after
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode, eps=eps)
    new.weight = conv.weight
    new.bias = conv.bias
    for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                 "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if getattr(conv, name):
            raise ValueError(f"it has {name.strip('_').replace('_', ' ')}, which would not "
                             "carry over; remove them first")
    new.train(conv.training)
    return new


def standardize_weights(
    model: nn.Module, *, eps: float = DEFAULT_WS_EPS, exclude: Iterable[str] = ()
) -> nn.Module:
    """Turn every ``torch.nn.Conv1d/2d/3d`` of ``model`` into :class:`StdConv1d`/``2d``/``3d``.

    Each new convolution keeps the old one's parameters (the very same tensors, so the state
    dict keys, ``requires_grad`` and an optimizer built before are unchanged) and arguments
    (stride, padding, dilation, groups, padding mode) and training mode. Subclasses of the conv
    classes (StdConv included) and transposed convolutions are left as they are. ``exclude``:
    qualified module names (shell wildcards allowed) to leave alone, e.g. ``["stem.*"]``.

    Returns the model, modified in place (a new module when ``model`` is itself a Conv).
    Warns when there is nothing to standardize. A conv whose weight is under
    ``torch.nn.utils.parametrize`` or that has hooks raises (they would not carry over; register
    :class:`WeightStandardization` as a parametrization yourself instead).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 1))
        >>> weight = net[0].weight
        >>> net = standardize_weights(net, exclude=["2"])
        >>> type(net[0]).__name__, net[0].weight is weight, type(net[2]).__name__
        ('StdConv2d', True, 'Conv2d')
    """
    eps = _check_eps("standardize_weights", eps)
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude)
    paths = [p for p, _ in model.named_modules()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths if p):
            raise ValueError(
                f"standardize_weights: exclude={pattern!r} matches no module of the "
                f"{type(model).__name__}; names are qualified as in model.named_modules(), shell "
                "wildcards (*, ?) allowed")

    def excluded(path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) or path.startswith(p + ".") for p in patterns)

    swaps: list[tuple[nn.Module | None, str, nn.Module]] = []
    for path, module in model.named_modules():
        if path and excluded(path):
            continue
        if parametrize.is_parametrized(module) and isinstance(module, tuple(_STD_CONV)):
            raise ValueError(
                f"standardize_weights: conv {path or '(the model itself)'!r} has parametrized "
                "tensors (torch.nn.utils.parametrize), which would not carry over; register "
                "bgnorm.WeightStandardization on it yourself with "
                "torch.nn.utils.parametrize.register_parametrization(conv, 'weight', "
                "bgnorm.WeightStandardization())")
        if type(module) in _STD_CONV:
            try:
                new = _std_conv_of(module, eps)
            except ValueError as err:
                raise ValueError(f"standardize_weights: conv {path!r}: {err}") from err
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if path else None
            swaps.append((parent, attr, new))
    if not swaps:
        warnings.warn(f"standardize_weights: {type(model).__name__} has no Conv1d/2d/3d to "
                      "standardize; the model is returned unchanged", stacklevel=2)
    for parent, attr, new in swaps:
        if parent is None:
            return new
        setattr(parent, attr, new)
    return model
