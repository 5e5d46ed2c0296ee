"""Policies for choosing BGN's one hyper-parameter G.

The BGN paper (Zhou et al., AAAI 2021, Table 2) trained ResNet-50 on ImageNet with

=========  ===  ===  ===  ===  ==  ==  ==
batch      128  64   32   16   8   4   2
G          512  256  128  64   16  2   1
=========  ===  ===  ===  ===  ==  ==  ==

:func:`paper_groups` extends that table to every batch size by interpolating in log-log space and
rounding to a power of two (powers of two divide the D = C*H*W of typical CNN layers).

Example:
    >>> PAPER_GROUPS[32], paper_groups(32), paper_groups(24)
    (128, 128, 128)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ._checks import check_num_groups

__all__ = ["PAPER_GROUPS", "paper_groups", "channel_groups", "values_per_statistic"]

#: The paper's (batch size -> G) table.
PAPER_GROUPS: dict[int, int] = {128: 512, 64: 256, 32: 128, 16: 64, 8: 16, 4: 2, 2: 1}


def _as_int(value: Any) -> Any:
    """``value`` as a Python int when it is an integer of another type (``numpy.int64``...),
    as torch's layers accept them; any other value (bool included) is returned unchanged for the
    caller's own check to refuse."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def paper_groups(batch_size: int) -> int:
    r"""G for a per-worker ``batch_size`` following the BGN paper's table.

    Rule: let :math:`b = \log_2(\text{batch\_size})`. Between the table's points,
    :math:`\log_2 G` is linearly interpolated in :math:`b`; above 128 it continues the table's
    slope of 1 (G = 4 * batch size, as from 16 to 128); at 2 and below G = 1. The result is
    :math:`2^{\lfloor \log_2 G + 1/2 \rfloor}`, so the table's entries are returned exactly and
    every other batch size gets a power of two (e.g. 3 -> 2, 6 -> 8, 12 -> 32, 24 -> 128,
    48 -> 256, 100 -> 512, 256 -> 1024).

    Example:
        >>> [paper_groups(b) for b in (128, 64, 32, 16, 8, 4, 2, 1)]
        [512, 256, 128, 64, 16, 2, 1, 1]
    """
    batch_size = check_num_groups(_as_int(batch_size), "batch_size")
    points = sorted((math.log2(b), math.log2(g)) for b, g in PAPER_GROUPS.items())
    b = math.log2(batch_size)
    if b <= points[0][0]:
        lg = points[0][1]
    elif b >= points[-1][0]:
        lg = points[-1][1] + (b - points[-1][0])
    else:
        for (b0, g0), (b1, g1) in zip(points, points[1:]):
            if b0 <= b <= b1:
                lg = g0 + (g1 - g0) * (b - b0) / (b1 - b0)
                break
    return 2 ** max(0, math.floor(lg + 0.5 + 1e-9))


def channel_groups(channels_per_group: int) -> Callable[[int], int]:
    """A G policy for ``num_groups=`` callables: groups of ``channels_per_group`` whole channels.

    Returns a function of ``num_features`` (as :func:`bgnorm.convert_norm` and
    :func:`bgnorm.make_norm` accept), giving ``num_features // channels_per_group``.

    Example:
        >>> channel_groups(4)(64)
        16
    """
    channels_per_group = check_num_groups(_as_int(channels_per_group), "channels_per_group")

    def groups(num_features: int) -> int:
        num_features = _as_int(num_features)
        if num_features % channels_per_group:
            raise ValueError(
                f"channels_per_group={channels_per_group} does not divide num_features="
                f"{num_features}; pick a divisor of {num_features}"
            )
        return num_features // channels_per_group

    return groups


def values_per_statistic(module: nn.Module, input_shape: Sequence[int]) -> int:
    r"""How many numbers each statistic (mean, variance) of ``module`` is computed from in
    training, for an input of shape ``input_shape`` = (b, C, \*spatial).

    b is the batch the statistics see: the per-worker (per-GPU) batch without cross-process
    sync, the global batch with it. With S the number of spatial positions and D = C * S:

    ====================================================  ===========================
    layer                                                 values per statistic
    ====================================================  ===========================
    BatchGroupNorm (G groups)                             b * D / G
    GeneralBatchGroupNorm (G groups, e examples a group)  e * D / G
    torch BatchNorm / SyncBatchNorm                       b * S
    torch GroupNorm (G groups)                            (C / G) * S
    torch InstanceNorm                                    S
    torch LayerNorm                                       product of normalized_shape
    PositionalNorm                                        C
    ====================================================  ===========================

    BatchNorm is BGN with G = C (b * S) and GroupNorm is BGN on one example; the number is
    what the BGN paper's "noisy statistics" argument is about (few values: noisy estimates).

    Args:
        module: a normalization layer of one of the kinds above.
        input_shape: the layer's input shape in training, batch first.

    Raises:
        TypeError: ``module`` is not a normalization layer with batch or group statistics.
        ValueError: ``input_shape`` does not fit the layer (no batch or channel dimension,
            channels differing from the layer's, G not dividing D).

    Example:
        >>> import torch.nn as nn
        >>> from bgnorm import BatchGroupNorm2d
        >>> values_per_statistic(BatchGroupNorm2d(64, num_groups=16), (2, 64, 7, 7))
        392
        >>> values_per_statistic(nn.BatchNorm2d(64), (2, 64, 7, 7))
        98
        >>> values_per_statistic(nn.GroupNorm(32, 64), (2, 64, 7, 7))
        98
    """
    from .layers import PositionalNorm, _BatchGroupNorm

    shape = [int(s) for s in input_shape]
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return math.prod(module.normalized_shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(
            f"values_per_statistic({name}): input_shape must be (b, C, *spatial) with every size "
            f">= 1, got {tuple(shape)}"
        )
    b, c, spatial = shape[0], shape[1], math.prod(shape[2:])
    expected = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
    if expected is not None and expected != c:
        raise ValueError(
            f"values_per_statistic({name}): input_shape has {c} channels but the layer has "
            f"{expected}; pass the shape of the layer's own input"
        )
    if isinstance(module, _BatchGroupNorm):
        d = c * spatial
        if d % module.num_groups:
            raise ValueError(
                f"values_per_statistic({name}): num_groups={module.num_groups} does not divide "
                f"D = C*prod(spatial) = {d} of input_shape {tuple(shape)}"
            )
        e = module.examples_per_group or b
        return min(e, b) * d // module.num_groups
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return b * spatial
    if isinstance(module, nn.GroupNorm):
        return c // module.num_groups * spatial
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return spatial
    if isinstance(module, PositionalNorm):
        return c
    raise TypeError(
        f"values_per_statistic: {name} is not a normalization layer with batch or group "
        "statistics (BatchGroupNorm, BatchNorm, GroupNorm, InstanceNorm, LayerNorm, "
        "PositionalNorm)"
    )
