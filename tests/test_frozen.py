"""FrozenBatchNorm / FrozenBatchGroupNorm / freeze_norms: the frozen layer is its layer's eval mode
in any mode, has no parameters, shares the state-dict format both ways, folds and exports."""

from __future__ import annotations

import copy
import doctest
import re
import warnings

import pytest
import torch
from torch import nn

import bgnorm
from bgnorm import FrozenBatchGroupNorm, FrozenBatchNorm, freeze_norms


def _trained(layer: nn.Module, shape) -> nn.Module:
    """``layer`` with running statistics and affine away from their initial values, in eval."""
    torch.manual_seed(3)
    layer.train()
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(shape) * 3 + 1)
        for name in ("weight", "bias"):
            p = getattr(layer, name, None)
            if p is not None:
                p.copy_(torch.randn_like(p))
    return layer.eval()


BGN_CASES = {
    "whole": (lambda: bgnorm.BatchGroupNorm2d(12, 3), (4, 12, 5, 5)),
    "G=C": (lambda: bgnorm.BatchGroupNorm2d(12, 12), (4, 12, 5, 5)),
    "bands": (lambda: bgnorm.BatchGroupNorm2d(4, 8), (4, 4, 6, 6)),
    "straddling": (lambda: bgnorm.BatchGroupNorm2d(6, 4), (4, 6, 4, 4)),
    "1d-2D": (lambda: bgnorm.BatchGroupNorm1d(12, 4), (8, 12)),
    "1d-3D": (lambda: bgnorm.BatchGroupNorm1d(12, 6), (4, 12, 7)),
    "3d": (lambda: bgnorm.BatchGroupNorm3d(8, 2), (2, 8, 3, 4, 4)),
    "gbgn": (lambda: bgnorm.GeneralBatchGroupNorm2d(8, 4, 2), (4, 8, 3, 3)),
    "sync": (lambda: bgnorm.SyncBatchGroupNorm(8, 4), (4, 8, 3, 3)),
    "noaffine": (lambda: bgnorm.BatchGroupNorm2d(8, 4, affine=False), (4, 8, 3, 3)),
}


@pytest.mark.parametrize("case", list(BGN_CASES))
def test_frozen_bgn_is_the_eval_layer_in_any_mode(case):
    make, shape = BGN_CASES[case]
    bgn = _trained(make(), shape)
    frozen = FrozenBatchGroupNorm.from_module(bgn)
    assert list(frozen.parameters()) == []
    x = torch.randn(shape, requires_grad=True)
    want = bgn(x)
    for mode in (False, True):
        frozen.train(mode)
        before = {k: v.clone() for k, v in frozen.state_dict().items()
                  if isinstance(v, torch.Tensor)}
        got = frozen(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for k, v in frozen.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before[k]), k  # nothing updated in training mode
    # gradients reach the input, as through the eval-mode layer
    (gx,) = torch.autograd.grad(frozen(x).square().sum(), x)
    (want_gx,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(gx, want_gx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(BGN_CASES))
def test_state_dicts_load_both_ways(case):
    make, shape = BGN_CASES[case]
    bgn = _trained(make(), shape)
    frozen = FrozenBatchGroupNorm(bgn.num_features, bgn.num_groups, affine=bgn.affine)
    frozen.load_state_dict(bgn.state_dict())  # strict
    x = torch.randn(shape)
    torch.testing.assert_close(frozen(x), bgn(x), rtol=0, atol=0)
    assert frozen.layout_shape == bgn.layout_shape
    assert int(frozen.num_batches_tracked) == int(bgn.num_batches_tracked) == 3
    back = make()
    back.load_state_dict(frozen.state_dict())  # strict
    for k, v in bgn.state_dict().items():
        got = back.state_dict()[k]
        assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v, k


def test_frozen_bgn_keeps_the_straddling_layout():
    bgn = _trained(bgnorm.BatchGroupNorm2d(6, 4), (4, 6, 4, 4))
    frozen = FrozenBatchGroupNorm.from_module(bgn)
    with pytest.raises(ValueError, match=r"laid out for spatial size \(4, 4\).*\(2, 8\)"):
        frozen(torch.randn(2, 6, 2, 8))


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (8, 6)), (nn.BatchNorm1d, (4, 6, 5)),
                                        (nn.BatchNorm2d, (4, 6, 3, 3)),
                                        (nn.BatchNorm3d, (2, 6, 2, 3, 3))])
def test_frozen_bn_is_batchnorm_eval_bit_for_bit(cls, shape):
    bn = _trained(cls(6), shape)
    frozen = FrozenBatchNorm.from_module(bn).train()
    x = torch.randn(shape)
    assert torch.equal(frozen(x), bn(x))
    assert list(frozen.parameters()) == []
    again = FrozenBatchNorm(6)
    again.load_state_dict(bn.state_dict())
    assert torch.equal(again(x), bn(x))
    back = cls(6)
    back.load_state_dict(frozen.state_dict())
    assert torch.equal(back.eval()(x), bn(x))


BN_LIKE = {
    # layers whose eval mode is BatchNorm's with their running statistics, and their inputs
    "bn-nobias": (lambda: nn.BatchNorm2d(6, bias=False), (4, 6, 3, 3)),
    "brn1d-2D": (lambda: bgnorm.BatchRenorm1d(6), (8, 6)),
    "brn1d-3D": (lambda: bgnorm.BatchRenorm1d(6, momentum=None), (4, 6, 5)),
    "brn2d": (lambda: bgnorm.BatchRenorm2d(6, r_max=2.0, d_max=1.0), (4, 6, 3, 3)),
    "brn3d-grouped": (lambda: bgnorm.BatchRenorm3d(6, examples_per_group=1), (2, 6, 2, 3, 3)),
    "brn2d-nobias": (lambda: bgnorm.BatchRenorm2d(6, bias=False), (4, 6, 3, 3)),
    "brn2d-noaffine": (lambda: bgnorm.BatchRenorm2d(6, affine=False), (4, 6, 3, 3)),
}


@pytest.mark.parametrize("case", list(BN_LIKE))
def test_frozen_bn_of_batchnorm_like_layers(case):
    """BatchRenorm (and BatchNorm(bias=False)) freeze to FrozenBatchNorm: their eval mode in
    any mode, bit for bit, with their own state-dict keys both ways."""
    make, shape = BN_LIKE[case]
    layer = _trained(make(), shape)
    frozen = FrozenBatchNorm.from_module(layer).train()
    x = torch.randn(shape) * 2 - 1
    assert torch.equal(frozen(x), layer(x))
    assert list(frozen.parameters()) == []
    assert list(frozen.state_dict()) == list(layer.state_dict())
    back = make()
    back.load_state_dict(frozen.state_dict())
    assert torch.equal(back.eval()(x), layer(x))
    net = freeze_norms(nn.Sequential(copy.deepcopy(layer)).train())
    assert type(net[0]) is FrozenBatchNorm and torch.equal(net(x), layer(x))
    net.load_state_dict(nn.Sequential(layer).state_dict())  # strict: the same keys


def test_freeze_norms_small_batch_layers():
    net = nn.Sequential(bgnorm.BatchRenorm2d(4), bgnorm.FilterResponseNorm2d(4),
                        bgnorm.EvoNorm2dS0(4, groups=2), bgnorm.EvoNorm2dB0(4),
                        bgnorm.BatchRenorm2d(4, track_running_stats=False))
    with pytest.warns(UserWarning) as caught:
        out = freeze_norms(copy.deepcopy(net))
    assert [type(m).__name__ for m in out] == [
        "FrozenBatchNorm", "FilterResponseNorm2d", "EvoNorm2dS0", "EvoNorm2dB0",
        "BatchRenorm2d"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "track_running_stats=False" in messages[0] and "left in place: 4" in messages[0]
    assert re.search(r"1 EvoNorm2dB0 layer\(s\) were left in place: 3\. .*not a per-channel "
                     r"affine.*batch statistics.*eval mode", messages[1])
    kept = freeze_norms(nn.Sequential(bgnorm.BatchRenorm2d(4), nn.BatchNorm2d(4)), brn=False)
    assert [type(m).__name__ for m in kept] == ["BatchRenorm2d", "FrozenBatchNorm"]
    with warnings.catch_warnings():  # nothing batch-dependent left: no warning
        warnings.simplefilter("error")
        freeze_norms(nn.Sequential(bgnorm.FilterResponseNorm2d(4), bgnorm.BatchRenorm2d(4),
                                   bgnorm.EvoNorm2dB0(4, apply_act=False)))  # an affine map
    with pytest.raises(TypeError, match="expected a BatchNorm or BatchRenorm layer, got "
                                        "EvoNorm2dB0"):
        FrozenBatchNorm.from_module(bgnorm.EvoNorm2dB0(4))


def test_torchvision_style_state_dict_without_count_loads():
    """torchvision's/detectron2's FrozenBatchNorm2d state dicts have no num_batches_tracked."""
    bn = _trained(nn.BatchNorm2d(4), (4, 4, 3, 3))
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    frozen = FrozenBatchNorm(4)
    frozen.load_state_dict(sd)
    assert int(frozen.num_batches_tracked) == 0
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(frozen(x), bn(x))
    # and ours has torchvision's four keys (its loader drops the count)
    assert {"weight", "bias", "running_mean", "running_var"} <= frozen.state_dict().keys()


def test_mismatched_groups_named_in_the_error():
    bgn = bgnorm.BatchGroupNorm2d(8, 4)
    with pytest.raises(RuntimeError, match="4 entries but this layer has 2 .num_groups=2."):
        FrozenBatchGroupNorm(8, 2).load_state_dict(bgn.state_dict())


def test_bias_none_is_kept_none():
    bgn = _trained(bgnorm.BatchGroupNorm2d(8, 4), (4, 8, 3, 3))
    bgn.register_parameter("bias", None)  # what bias=False gives
    frozen = FrozenBatchGroupNorm.from_module(bgn)
    assert frozen.bias is None and frozen.weight is not None
    assert "bias" not in frozen.state_dict()
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(frozen(x), bgn(x), rtol=0, atol=0)
    assert FrozenBatchGroupNorm(8, 4, bias=False).bias is None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3), bgnorm.BatchGroupNorm2d(8, 2), nn.ReLU(),
            nn.Conv2d(8, 8, 1), bgnorm.GeneralBatchGroupNorm2d(8, 4, 2),
            nn.Conv2d(8, 8, 1), bgnorm.SyncBatchGroupNorm(8, 16),  # bands
            nn.GroupNorm(2, 8), bgnorm.PositionalNorm(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4, 6), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.features(x), 2))


def test_freeze_norms_converts_and_keeps_the_state_dict():
    net = Net()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for _ in range(2):
            net(x)
    net.eval()
    want = net(x)
    sd = copy.deepcopy(net.state_dict())
    frozen = freeze_norms(copy.deepcopy(net))
    kinds = [type(m).__name__ for m in frozen.modules()]
    assert kinds.count("FrozenBatchNorm") == 2 and kinds.count("FrozenBatchGroupNorm") == 3
    assert "GroupNorm" in kinds and "PositionalNorm" in kinds
    frozen.train()  # frozen norms ignore the mode
    frozen.features[10].eval()
    frozen.features[11].eval()
    torch.testing.assert_close(frozen(x), want, rtol=0, atol=0)
    frozen.load_state_dict(sd)  # strict: same keys
    back = Net()
    back.load_state_dict(frozen.state_dict())  # and back
    torch.testing.assert_close(back.eval()(x), want, rtol=0, atol=0)
    # fine-tuning: the frozen norms have no parameters and their buffers do not move
    norm_params = sum(p.numel() for m in net.modules() if isinstance(
        m, (nn.BatchNorm2d, nn.BatchNorm1d, bgnorm.BatchGroupNorm2d,
            bgnorm.GeneralBatchGroupNorm2d, bgnorm.SyncBatchGroupNorm)) for p in m.parameters())
    assert sum(p.numel() for p in frozen.parameters()) == (
        sum(p.numel() for p in net.parameters()) - norm_params)
    frozen.train()(x).sum().backward()
    assert torch.equal(frozen.features[4].running_mean, sd["features.4.running_mean"])


def test_freeze_norms_options_root_and_untracked():
    net = nn.Sequential(nn.BatchNorm2d(4), bgnorm.BatchGroupNorm2d(4, 2),
                        nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.warns(UserWarning, match="left in place: 2"):
        out = freeze_norms(net, bgn=False)
    assert [type(m).__name__ for m in out] == ["FrozenBatchNorm", "BatchGroupNorm2d",
                                                "BatchNorm2d"]
    root = freeze_norms(bgnorm.BatchGroupNorm3d(4, 2))
    assert isinstance(root, FrozenBatchGroupNorm)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FrozenBatchGroupNorm.from_module(bgnorm.BatchGroupNorm2d(4, 2, track_running_stats=False))


def test_frozen_norms_fold_export_and_are_left_by_update_bn():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), bgnorm.BatchGroupNorm2d(8, 2), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), bgnorm.BatchGroupNorm2d(8, 16),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        net(x)
    frozen = freeze_norms(net.eval())
    want = frozen(x)
    sd = copy.deepcopy(frozen.state_dict())
    bgnorm.update_bn([x], frozen)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, sd[k]) if isinstance(v, torch.Tensor) else v == sd[k], k
    exported = torch.export.export(frozen, (x,)).module()
    torch.testing.assert_close(exported(x), want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = bgnorm.fuse_conv_norm(frozen)
    assert report.folded == [("0", "1"), ("5", "6")]
    assert report.skipped[0][0] == "4" and "bands" in report.skipped[0][1]
    torch.testing.assert_close(report.model(x), want, rtol=0, atol=1e-5)


def test_docstring_examples():
    import bgnorm.frozen

    result = doctest.testmod(bgnorm.frozen, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
