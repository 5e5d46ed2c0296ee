"""Input validation shared by the functional API and the modules.

Every check names the problem and the fix, in the style of torch's own messages, built lazily.
``fn`` names who failed: a function name, or (layers) a callable that returns the layer's
description (its short repr and place in the model), called only to build a message.
Under torch.compile a condition on static shapes is a Python bool decided while tracing (the
failing branch is never traced); a condition on symbolic shapes goes through ``torch._check_with``
with a constant message, so the graph stays whole either way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import Tensor

#: Who a message names: a function's name, or a callable returning a layer's description.
Who = Union[str, Callable[[], str]]  # Union: evaluated at run time, also on Python 3.9


def label(fn: Who) -> str:
    """The text of ``fn`` (a name, or a callable that returns one)."""
    return fn if isinstance(fn, str) else fn()


def require(cond: object, exc: type[Exception], message: Callable[[], str], short: str) -> None:
    """Raise ``exc(message())`` unless ``cond``; ``short`` is the message for symbolic shapes."""
    if isinstance(cond, bool):
        if not cond:
            raise exc(message())
    else:
        torch._check_with(exc, cond, lambda: short)  # type: ignore[arg-type]


def _is_int(value: object) -> bool:
    """An integer as torch takes one for a size: int or a numpy integer (any
    ``numbers.Integral``), but not a bool (nor numpy's, which is not Integral)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_num_groups(
    num_groups: object, what: str = "num_groups", fn: Who | None = None
) -> int:
    """Validate a group count given at construction or call time (an int or a numpy
    integer); returns it as a Python int. ``fn``, when given, names the layer or function in
    the message."""
    where = "" if fn is None else f"{label(fn)}: "
    if not _is_int(num_groups):
        raise TypeError(
            f"{where}{what} must be a positive int, got {type(num_groups).__name__} "
            f"{num_groups!r}; pass an integer such as {what}=32"
        )
    if num_groups <= 0:
        raise ValueError(
            f"{where}{what} must be a positive int, got {num_groups}; pass an integer >= 1 "
            f"such as {what}=32"
        )
    return int(num_groups)  # type: ignore[call-overload]


def check_num_features(num_features: object, fn: Who | None = None) -> int:
    """Validate a channel count C (an int or a numpy integer); returns it as a Python int.
    ``fn`` names the layer."""
    if not _is_int(num_features) or num_features <= 0:  # type: ignore[operator]
        where = "" if fn is None else f"{label(fn)}: "
        raise ValueError(
            f"{where}num_features must be a positive int (the channel count C), got "
            f"{num_features!r}"
        )
    return int(num_features)  # type: ignore[call-overload]


def nearby_divisors(total: int, target: int, count: int = 4) -> list[int]:
    """The ``count`` divisors of ``total`` closest to ``target`` (sorted ascending)."""
    divs: set[int] = set()
    for d in range(1, math.isqrt(total) + 1):
        if total % d == 0:
            divs.update((d, total // d))
    return sorted(sorted(divs, key=lambda d: (abs(d - target), d))[:count])


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_input(fn: Who, input: Tensor) -> None:
    """Floating-point tensor with at least 2 dimensions (N, C, *)."""
    require(
        input.is_floating_point(), TypeError,
        lambda: f"{label(fn)}: expected a floating-point input, got dtype {input.dtype}; "
        "convert it first, e.g. input.float()", "expected a floating-point input",
    )
    require(
        input.dim() >= 2, ValueError,
        lambda: f"{label(fn)}: expected input of shape (N, C, *) with at least 2 dimensions, "
        f"got {input.dim()}D input of shape {_shape_str(input.shape)}",
        "expected input of shape (N, C, *)",
    )


def check_eps(fn: Who, eps: float, training: bool) -> None:
    """As torch's batch_norm: eps > 0 when normalizing with batch statistics (training), eps >= 0
    with running statistics (a zero-variance group would otherwise divide by zero: NaN)."""
    if training and eps <= 0.0:
        raise ValueError(
            f"{label(fn)}: eps must be positive during training, but got {eps}; eps is added to "
            "the batch variance, and a group of equal values has variance 0, so this would "
            "divide by zero (NaN output). Pass a small positive eps, e.g. eps=1e-5 (the default)"
        )
    elif eps < 0.0:
        raise ValueError(
            f"{label(fn)}: eps must be non-negative, but got {eps}; eps is added to the variance "
            "before its square root. Pass eps >= 0, e.g. eps=1e-5 (the default)"
        )


def check_groups_divide(fn: Who, input: Tensor, num_groups: int) -> None:
    """``num_groups`` must divide D = C * prod(spatial)."""
    c = input.shape[1]
    spatial = tuple(input.shape[2:])
    d = c * math.prod(spatial)

    def msg() -> str:
        dims = "*".join(["C", "H", "W", "T"][: 1 + len(spatial)]) if len(spatial) <= 3 else "C*S"
        dims_val = "*".join(str(int(s)) for s in (c, *spatial))
        text = (
            f"{label(fn)}: num_groups={num_groups} must divide D = {dims} = {dims_val} = "
            f"{int(d)} (input shape {_shape_str(input.shape)}); "
            f"nearby valid values: {', '.join(map(str, nearby_divisors(int(d), num_groups)))}"
        )
        if num_groups % int(c) == 0:
            k = num_groups // int(c)
            text += (
                f". num_groups={num_groups} = {k} x C splits each channel into {k} bands, so the "
                f"spatial size {int(d) // int(c)} must be divisible by {k}"
            )
        return text

    require(d % num_groups == 0, ValueError, msg, "num_groups must divide D = C * prod(spatial)")


def check_channels(fn: Who, input: Tensor, num_features: int) -> None:
    require(
        input.shape[1] == num_features, ValueError,
        lambda: f"{label(fn)}: expected input with {num_features} channels (dim 1), got "
        f"{int(input.shape[1])} channels in input of shape {_shape_str(input.shape)}",
        "wrong number of channels",
    )


def check_vector(fn: Who, name: str, t: Tensor | None, size: int, what: str) -> None:
    if t is None:
        return
    require(
        t.dim() == 1 and t.shape[0] == size, ValueError,
        lambda: f"{label(fn)}: expected {name} of shape ({size},) ({what}), got shape "
        f"{_shape_str(t.shape)}",
        f"wrong shape of {name}",
    )


def check_values_per_group(fn: Who, input: Tensor, count: int, num_groups: int) -> None:
    """As torch's batch_norm: one value per statistic is refused in training; none (an empty
    batch or spatial size) is not, the output is then empty."""
    require(
        count != 1, ValueError,
        lambda: f"{label(fn)}: expected more than 1 value per group when training, got input of "
        f"shape {_shape_str(input.shape)} with num_groups={num_groups} ({int(count)} value per "
        "group); use a larger batch, fewer groups, or eval mode",
        "expected more than 1 value per group when training",
    )


def check_batch_groups(fn: Who, input: Tensor, examples_per_group: int) -> None:
    n = input.shape[0]

    def msg() -> str:
        valid = [d for d in range(1, int(n) + 1) if int(n) % d == 0]
        return (
            f"{label(fn)}: batch size {int(n)} is not divisible by examples_per_group="
            f"{examples_per_group}; use a batch size that is a multiple of "
            f"{examples_per_group} (e.g. drop_last=True in the DataLoader) or one of "
            f"examples_per_group in {{{', '.join(map(str, valid))}}}"
        )

    require(n % examples_per_group == 0, ValueError, msg,
            "batch size must be divisible by examples_per_group")
