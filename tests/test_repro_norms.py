"""Tests for bgnorm.repro.norms: norm specs, virtual workers, per-layer group counts."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bgnorm
import bgnorm.repro.norms as N
from bgnorm.repro.models import build_model
from bgnorm.repro.norms import NormSpec, build_normed_model, largest_divisor_at_most


def test_docstring_examples():
    result = doctest.testmod(N, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("n,limit,want", [(1024, 512, 512), (256, 512, 256), (147, 32, 21),
                                          (16, 32, 16), (7, 1, 1)])
def test_largest_divisor_at_most(n, limit, want):
    assert largest_divisor_at_most(n, limit) == want


def _slices(x, b):
    return [x[i : i + b] for i in range(0, len(x), b)]


def test_virtual_worker_bn_is_batchnorm_per_slice():
    torch.manual_seed(0)
    b, w = 2, 4
    m = NormSpec("bn", batch_size=b, workers=w).make(6).double()
    x = torch.randn(b * w, 6, 5, 5, dtype=torch.float64)
    y = m(x)
    ref = torch.cat([F.batch_norm(s, None, None, training=True, eps=m.eps) for s in _slices(x, b)])
    torch.testing.assert_close(y, ref)
    means = torch.stack([s.mean(dim=(0, 2, 3)) for s in _slices(x, b)]).mean(0)
    varu = torch.stack([s.var(dim=(0, 2, 3), unbiased=True) for s in _slices(x, b)]).mean(0)
    torch.testing.assert_close(m.running_mean, 0.1 * means)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * varu)


def test_virtual_worker_bgn_is_bgn_per_slice():
    torch.manual_seed(0)
    spec = NormSpec("bgn", batch_size=4, workers=2, num_groups=3)
    m = spec.make(6).double()
    ref_layer = bgnorm.BatchGroupNorm2d(6, 3).double()
    x = torch.randn(8, 6, 4, 4, dtype=torch.float64)
    ref = torch.cat([ref_layer(s) for s in _slices(x, 4)])
    torch.testing.assert_close(m(x), ref)


def test_single_worker_layers_are_the_plain_ones():
    assert type(NormSpec("bn", batch_size=32).make(8)) is nn.BatchNorm2d
    assert type(NormSpec("bgn", batch_size=32).make(8, (4, 4))) is bgnorm.BatchGroupNorm2d
    assert type(NormSpec("pn").make(8)) is bgnorm.PositionalNorm
    assert type(NormSpec("none").make(8)) is nn.Identity
    ln = NormSpec("ln").make(8)
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    inn = NormSpec("in").make(8)
    assert isinstance(inn, nn.GroupNorm) and inn.num_groups == 8


def test_group_counts_are_capped_per_layer():
    gn = NormSpec("gn")  # 32 groups as in the GN paper
    assert gn.make(16).num_groups == 16 and gn.make(64).num_groups == 32
    assert NormSpec("gn", channels_per_group=64).make(16).num_groups == 1
    assert NormSpec("gn", channels_per_group=4).make(16).num_groups == 4
    bgn = NormSpec("bgn", batch_size=128)  # paper G = 512
    assert bgn.groups == 512
    assert bgn.make(16, (4, 4)).num_groups == 256  # D = 256 < 512
    assert bgn.make(16, (8, 8)).num_groups == 512


def test_spec_validation_and_config():
    with pytest.raises(ValueError, match="must divide the per-worker batch"):
        NormSpec("gbgn", batch_size=6, examples_per_group=4)
    with pytest.raises(ValueError, match="unknown norm"):
        NormSpec("nope")
    with pytest.raises(ValueError, match="not both"):
        NormSpec("gn", num_groups=4, channels_per_group=2)
    spec = NormSpec.from_config({"norm": "GBGN", "batch_size": 8, "workers": 4, "num_groups": 16,
                                 "gbgn_examples": 2})
    assert (spec.name, spec.total_batch, spec.groups, spec.examples_per_group) == (
        "gbgn", 32, 16, 2)
    assert "x 4 workers of 8" in spec.describe()
    gn = NormSpec.from_config({"norm": "gn", "gn_channels_per_group": 8, "batch_size": 32})
    assert gn.channels_per_group == 8 and gn.num_groups is None


@pytest.mark.parametrize("model,kw,shape", [
    ("small_resnet", {"width": 16}, (1, 16, 16)),
    ("cifar_resnet", {"depth": 8}, (3, 32, 32)),
    ("resnet18", {}, (3, 64, 64)),
    ("resnet50", {}, (3, 64, 64)),
])
def test_build_normed_model_resolves_every_layer(model, kw, shape):
    spec = NormSpec("bgn", batch_size=2, workers=2, num_groups=512)
    torch.manual_seed(0)
    net, layers = build_normed_model(
        lambda nl: build_model(model, 10, nl, in_channels=shape[0], **kw), spec, shape)
    norms = [m for m in net.modules() if isinstance(m, bgnorm.GeneralBatchGroupNorm2d)]
    assert len(norms) == len(layers) > 0
    for m, info in zip(norms, layers):
        d = info.channels * info.spatial[0] * info.spatial[1]
        assert m.num_groups == info.groups == largest_divisor_at_most(d, 512)
    if model != "small_resnet":
        return  # the big ones: construction only
    out = net(torch.randn(4, *shape))
    out.sum().backward()
    assert out.shape == (4, 10)


def test_build_normed_model_is_seeded_like_a_plain_build():
    torch.manual_seed(3)
    plain = build_model("small_resnet", 10, nn.BatchNorm2d, in_channels=1, width=8)
    torch.manual_seed(3)
    net, _ = build_normed_model(
        lambda nl: build_model("small_resnet", 10, nl, in_channels=1, width=8),
        NormSpec("bn", batch_size=32), (1, 8, 8))
    for a, b in zip(plain.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,workers,b,e", [
    ("bgn", 1, 64, None), ("bgn", 8, 2, None), ("gbgn", 2, 8, 2),
])
def test_auto_groups_come_from_the_policy_layer_by_layer(name, workers, b, e):
    spec = NormSpec.from_config({"norm": name, "batch_size": b, "workers": workers,
                                 "num_groups": "auto", "gbgn_examples": e})
    assert spec.auto and spec.describe().startswith(f"{name.upper()}(G=auto")
    torch.manual_seed(0)
    net, layers = build_normed_model(
        lambda nl: build_model("small_resnet", 10, nl, in_channels=1, width=16), spec,
        (1, 16, 16))
    kinds = (bgnorm.BatchGroupNorm2d, bgnorm.GeneralBatchGroupNorm2d)
    norms = [m for m in net.modules() if isinstance(m, kinds)]
    assert len(norms) == len(layers) == 9
    stat_batch = e or b  # the examples one statistic sees
    for m, info in zip(norms, layers):
        want = bgnorm.auto_groups(info.channels, info.spatial, stat_batch)
        assert m.num_groups == info.groups == want
        assert info.requested_groups is None and not info.adjusted
    if b == 64:  # the paper's G = 256 fits every layer (D = 4096, 2048, 1024)
        assert {i.groups for i in layers} == {256}


def test_auto_groups_need_shapes_and_a_bgn():
    with pytest.raises(ValueError, match="applies to bgn and gbgn only"):
        NormSpec("gn", num_groups="auto")
    with pytest.raises(ValueError, match="needs each layer's spatial size"):
        NormSpec("bgn", num_groups="auto").make(16)
