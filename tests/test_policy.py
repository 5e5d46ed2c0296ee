"""bgnorm.policy.values_per_statistic: the count of numbers behind each statistic, checked
against the statistics the layers actually compute."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bgnorm
from bgnorm import values_per_statistic
from bgnorm.layers import PositionalNorm


def _bgn_count_by_perturbation(layer: nn.Module, shape: tuple[int, ...]) -> int:
    """How many input values move the first group's mean: perturb each value of a zero input
    by one and see whether the (first) output value changes. Independent of the formula."""
    layer.train()
    x = torch.zeros(shape, dtype=torch.float64)
    x.view(-1)[0] = 1.0  # a non-constant input so the variance is not zero
    base = layer(x).reshape(-1)[0]
    count = 0
    for i in range(x.numel()):
        y = x.clone()
        y.view(-1)[i] += 0.5
        if not torch.isclose(layer(y).reshape(-1)[0], base, rtol=0, atol=1e-12):
            count += 1
    return count


def _clipped(layer: nn.Module) -> nn.Module:
    """BRN whose r is clipped: unclipped, its training output (x - mu_B) / sigma_B * r + d is
    (x - mu) / sigma with the running statistics, and reads no batch statistic at all. Its
    running statistics must not move between calls either (momentum 0)."""
    layer.running_var.fill_(1e4)
    return layer


def _with_v(layer: nn.Module, v: float) -> nn.Module:
    with torch.no_grad():
        layer.v.fill_(v)
    return layer


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: bgnorm.BatchGroupNorm2d(4, num_groups=2), (3, 4, 2, 3)),
        (lambda: bgnorm.BatchGroupNorm2d(4, num_groups=8), (2, 4, 2, 2)),  # straddling groups
        (lambda: bgnorm.BatchGroupNorm1d(6, num_groups=3), (2, 6, 5)),
        (lambda: bgnorm.BatchGroupNorm3d(2, num_groups=1), (2, 2, 2, 1, 2)),
        (lambda: bgnorm.GeneralBatchGroupNorm2d(4, num_groups=2, examples_per_group=2),
         (4, 4, 2, 2)),
        (lambda: nn.BatchNorm2d(3), (2, 3, 2, 2)),
        (lambda: nn.BatchNorm1d(3), (4, 3)),
        (lambda: nn.GroupNorm(2, 4), (2, 4, 3, 1)),
        (lambda: nn.InstanceNorm2d(3), (2, 3, 2, 3)),
        (lambda: nn.LayerNorm([3, 2, 2]), (2, 3, 2, 2)),
        (lambda: PositionalNorm(5), (2, 5, 2, 2)),
        (lambda: _clipped(bgnorm.BatchRenorm2d(3, momentum=0.0)), (2, 3, 2, 2)),
        (lambda: _clipped(bgnorm.BatchRenorm2d(3, momentum=0.0, examples_per_group=2)),
         (4, 3, 2, 1)),
        (lambda: _clipped(bgnorm.BatchRenorm1d(3, momentum=0.0)), (4, 3)),
        (lambda: bgnorm.FilterResponseNorm2d(3), (2, 3, 2, 3)),
        (lambda: bgnorm.EvoNorm2dS0(4, groups=2), (2, 4, 2, 2)),
        # v = -10 keeps B0's denominator on the batch variance (its statistic) for output 0
        (lambda: _with_v(bgnorm.EvoNorm2dB0(3), -10.0), (2, 3, 2, 2)),
        (lambda: _with_v(bgnorm.EvoNorm2dB0(3, examples_per_group=2), -10.0), (4, 3, 1, 2)),
    ],
)
def test_values_per_statistic_counts_what_the_layer_reads(make, shape):
    layer = make().double()
    assert values_per_statistic(layer, shape) == _bgn_count_by_perturbation(layer, shape)


def test_values_per_statistic_examples():
    assert values_per_statistic(bgnorm.BatchGroupNorm2d(64, num_groups=1), (2, 64, 7, 7)) == \
        2 * 64 * 49
    # BatchNorm is BGN with G = C; GroupNorm with G groups is BGN on one example
    bgn_c = bgnorm.BatchGroupNorm2d(64, num_groups=64)
    assert values_per_statistic(bgn_c, (8, 64, 7, 7)) == \
        values_per_statistic(nn.BatchNorm2d(64), (8, 64, 7, 7)) == 8 * 49
    assert values_per_statistic(nn.SyncBatchNorm(8), (4, 8, 3, 3)) == 36
    assert values_per_statistic(bgnorm.BatchGroupNorm2d(64, num_groups=32), (1, 64, 7, 7)) == \
        values_per_statistic(nn.GroupNorm(32, 64), (5, 64, 7, 7)) == math.prod((2, 49))


def test_values_per_statistic_refuses_what_it_cannot_count():
    with pytest.raises(TypeError, match="Conv2d is not a normalization layer"):
        values_per_statistic(nn.Conv2d(3, 3, 1), (2, 3, 4, 4))
    with pytest.raises(ValueError, match="has 3 channels but the layer has 4"):
        values_per_statistic(nn.BatchNorm2d(4), (2, 3, 4, 4))
    with pytest.raises(ValueError, match="num_groups=3 does not divide D"):
        values_per_statistic(bgnorm.BatchGroupNorm2d(4, num_groups=3), (2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"\(b, C, \*spatial\)"):
        values_per_statistic(nn.BatchNorm1d(4), (4,))
