"""make_norm names and layers, convert_norm on a multi-level model, paper_groups."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from reference import bgn_ref, gbgn_ref, pn_ref
from torch import nn

import bgnorm
from bgnorm import convert_norm, make_norm, paper_groups


def _ref_groups(x, g, per_example):
    """GroupNorm-style reference: stats per example over g groups of (C, H, W)."""
    n = x.shape[0]
    xv = x.reshape(n, g, -1)
    mean = xv.mean(dim=2, keepdim=True)
    var = ((xv - mean) ** 2).mean(dim=2, keepdim=True)
    return ((xv - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)


def _std(x, dims, eps):
    mean = x.mean(dim=dims, keepdim=True)
    return torch.sqrt(((x - mean) ** 2).mean(dim=dims, keepdim=True) + eps), mean


def _brn_first_step(x, eps=1e-5):
    """Batch Renormalization's first training step: running mean 0, variance 1."""
    std, mean = _std(x, (0, 2, 3), eps)
    r = (std / (1 + eps) ** 0.5).clamp(1 / 3, 3)
    d = (mean / (1 + eps) ** 0.5).clamp(-5, 5)
    return (x - mean) / std * r + d


def _evonorm_b0(x, eps=1e-3):
    batch_std = _std(x, (0, 2, 3), eps)[0]
    return x / torch.max(batch_std.expand_as(x), x + _std(x, (2, 3), eps)[0])


X = torch.randn(4, 8, 3, 3, dtype=torch.float64)

REFS = {
    "bn": lambda x: bgn_ref(x, 8)[0],
    "bgn": lambda x: bgn_ref(x, 4)[0],
    "gbgn": lambda x: gbgn_ref(x, 4, 2)[0],
    "gn": lambda x: _ref_groups(x, 4, True),
    "ln": lambda x: _ref_groups(x, 1, True),
    "in": lambda x: _ref_groups(x, 8, True),
    "pn": lambda x: pn_ref(x),
    "brn": _brn_first_step,
    "frn": lambda x: torch.clamp_min(x / torch.sqrt((x * x).mean(dim=(2, 3), keepdim=True)
                                                    + 1e-5), 0),
    "evonorm_s0": lambda x: x * torch.sigmoid(x) / _std(x, (2, 3), 1e-5)[0],  # 8 groups of 1
    "evonorm_b0": _evonorm_b0,
    "none": lambda x: x,
}
KW = {"bgn": {"num_groups": 4}, "gbgn": {"num_groups": 4, "examples_per_group": 2},
      "gn": {"num_groups": 4}}


@pytest.mark.parametrize("name", bgnorm.norm_names())
def test_registry_layers_against_references(name):
    m = make_norm(name, 8, dtype=torch.float64, **KW.get(name, {})) if name != "none" \
        else make_norm(name, 8)
    torch.testing.assert_close(m(X), REFS[name](X))


def test_registry_classes_and_aliases():
    assert isinstance(make_norm("BatchNorm", 8), nn.BatchNorm2d)
    assert isinstance(make_norm("bn", 8, dim=1), nn.BatchNorm1d)
    assert isinstance(make_norm("batch_group_norm", 8, num_groups=2, dim=3),
                      bgnorm.BatchGroupNorm3d)
    assert isinstance(make_norm("Group-Norm", 64), nn.GroupNorm)
    assert make_norm("gn", 64).num_groups == 32
    assert make_norm("gn", 16).num_groups == 16  # fewer channels than 32 groups: IN
    assert make_norm("gn", 48).num_groups == 24
    assert make_norm("gn", 64, channels_per_group=16).num_groups == 4
    assert make_norm("ln", 8).num_groups == 1 and make_norm("in", 8).num_groups == 8
    assert isinstance(make_norm("pono", 8), bgnorm.PositionalNorm)
    assert isinstance(make_norm("identity", 8), nn.Identity)
    assert make_norm("bgn", 64, num_groups=lambda c: c // 4).num_groups == 16
    layer = functools.partial(make_norm, "bgn", num_groups=16)
    assert layer(64).num_features == 64


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown norm 'batchgroup'; valid names: bn, bgn, "
                                         r"gbgn, gn, ln, in, pn, brn, frn, evonorm_s0, evonorm_b0, "
                                         r"none"):
        make_norm("batchgroup", 8)
    with pytest.raises(ValueError, match=r"num_groups=3 must divide num_features=8"):
        make_norm("gn", 8, num_groups=3)
    with pytest.raises(TypeError, match=r"needs examples_per_group"):
        make_norm("gbgn", 8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.inner = nn.Sequential(nn.Conv2d(8, 16, 1), nn.SyncBatchNorm(16), nn.ReLU())

    def forward(self, x):
        return self.inner(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.head(self.block(x))


def test_convert_multi_level_model():
    net = Net().double()
    with torch.no_grad():
        net.block.bn.weight.uniform_()
        net.head[2].bias.uniform_()
    net.block.bn.weight.requires_grad_(False)
    gamma, beta = net.block.bn.weight.clone(), net.head[2].bias.clone()
    net.eval()
    with pytest.warns(UserWarning, match=r"3 converted layer\(s\) are in eval mode"):
        out = convert_norm(net, "bgn", num_groups=lambda c: c // 2)
    assert out is net
    assert isinstance(net.block.bn, bgnorm.BatchGroupNorm2d) and net.block.bn.num_groups == 4
    # SyncBatchNorm (any input dimension) becomes its synchronized counterpart
    assert type(net.block.inner[1]) is bgnorm.SyncBatchGroupNorm
    assert isinstance(net.head[2], bgnorm.BatchGroupNorm1d) and net.head[2].num_groups == 3
    assert not net.block.bn.training and net.block.bn.weight.dtype == torch.float64
    assert not net.block.bn.weight.requires_grad
    assert net.head[2].running_mean.dtype == torch.float64
    assert torch.equal(net.block.bn.weight, gamma) and torch.equal(net.head[2].bias, beta)
    net(torch.randn(2, 3, 4, 4, dtype=torch.float64))  # the converted model runs (eval)


def test_convert_copies_gamma_beta_and_running_stats_when_meaningful():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.arange(4.0))
        bn.bias.copy_(-torch.arange(4.0))
    bn(torch.randn(8, 4, 3, 3))
    bn.eval()
    new = convert_norm(bn, "bgn", num_groups=4)  # the root itself: a new module
    assert isinstance(new, bgnorm.BatchGroupNorm2d) and new is not bn
    assert torch.equal(new.weight, bn.weight) and torch.equal(new.bias, bn.bias)
    assert torch.equal(new.running_mean, bn.running_mean) and not new.training
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(new(x), bn(x))
    other = convert_norm(nn.Sequential(bn), "bgn", num_groups=2, running_stats="reset")[0]
    assert torch.equal(other.running_mean, torch.zeros(2))
    gn = convert_norm(nn.Sequential(nn.BatchNorm2d(4)), "gn", num_groups=2)[0]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 2


def test_convert_warns_when_nothing_to_convert():
    with pytest.warns(UserWarning, match=r"no BatchNorm layer to convert"):
        convert_norm(nn.Sequential(nn.Linear(2, 2)), "bgn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_norm(nn.Sequential(nn.BatchNorm1d(2)), "ln")
    with pytest.raises(ValueError, match=r"unknown norm"):
        convert_norm(nn.Sequential(nn.BatchNorm1d(2)), "foo")


def test_paper_groups_table_and_rule():
    assert [paper_groups(b) for b in (128, 64, 32, 16, 8, 4, 2)] == [512, 256, 128, 64, 16, 2, 1]
    assert [paper_groups(b) for b in (1, 3, 6, 12, 24, 48, 100, 256)] == \
        [1, 2, 8, 32, 128, 256, 512, 1024]
    gs = [paper_groups(b) for b in range(1, 600)]
    assert gs == sorted(gs) and all(g & (g - 1) == 0 for g in gs)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        paper_groups(0)
    assert bgnorm.channel_groups(4)(64) == 16
    with pytest.raises(ValueError, match="channels_per_group=3 does not divide"):
        bgnorm.channel_groups(3)(64)
