"""The calling conventions of timm (``norm_layer(num_features)``) and detectron2
(``get_norm(norm, out_channels)``: a name or a callable of the channel count), with stand-ins
that call the norm exactly as they do (neither package is a dependency)."""

from __future__ import annotations

import functools

import torch
from torch import nn

import bgnorm


def _detectron2_get_norm(norm, out_channels):
    """detectron2.layers.get_norm's contract: None/"" -> None, a str -> its table, a callable
    -> norm(out_channels)."""
    if norm is None or norm == "":
        return None
    if isinstance(norm, str):
        raise KeyError(norm)  # bgnorm layers are passed as callables
    return norm(out_channels)


class _TimmStyleBlock(nn.Module):
    """timm blocks build norms as norm_layer(channels) (and act layers separately)."""

    def __init__(self, in_chs, out_chs, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        self.bn = norm_layer(out_chs)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_timm_norm_layer_callable():
    for norm_layer in (functools.partial(bgnorm.BatchGroupNorm2d, num_groups=8),
                       functools.partial(bgnorm.make_norm, "bgn", num_groups=8),
                       bgnorm.PositionalNorm):
        block = _TimmStyleBlock(3, 16, norm_layer=norm_layer)
        assert block(torch.randn(2, 3, 8, 8)).shape == (2, 16, 8, 8)


def test_detectron2_get_norm_callable():
    norm = _detectron2_get_norm(lambda c: bgnorm.BatchGroupNorm2d(c, 32), 256)
    assert isinstance(norm, bgnorm.BatchGroupNorm2d) and norm.num_features == 256
    frozen = _detectron2_get_norm(lambda c: bgnorm.FrozenBatchGroupNorm(c, 32), 64)
    assert list(frozen.parameters()) == []
    assert _detectron2_get_norm("", 64) is None


def test_mmcv_abbreviations_are_class_attributes():
    """mmcv/mmengine's build_norm_layer names the layer's attribute from the class's _abbr_
    (else from the class name: "batchgroupnorm2d1"); the classes carry it themselves, whether
    or not bgnorm.integrations.mmengine.register() ran (no mmengine needed)."""
    expected = {
        bgnorm.BatchGroupNorm1d: "bgn", bgnorm.BatchGroupNorm2d: "bgn",
        bgnorm.BatchGroupNorm3d: "bgn", bgnorm.SyncBatchGroupNorm: "bgn",
        bgnorm.GeneralBatchGroupNorm1d: "gbgn", bgnorm.GeneralBatchGroupNorm2d: "gbgn",
        bgnorm.GeneralBatchGroupNorm3d: "gbgn", bgnorm.PositionalNorm: "pn",
        bgnorm.FrozenBatchNorm: "bn", bgnorm.FrozenBatchGroupNorm: "bgn",
        bgnorm.BatchRenorm1d: "brn", bgnorm.BatchRenorm2d: "brn", bgnorm.BatchRenorm3d: "brn",
        bgnorm.FilterResponseNorm1d: "frn", bgnorm.FilterResponseNorm2d: "frn",
        bgnorm.FilterResponseNorm3d: "frn", bgnorm.EvoNorm2dS0: "evonorm",
        bgnorm.EvoNorm2dB0: "evonorm",
    }
    for cls, abbr in expected.items():
        assert cls._abbr_ == abbr, cls.__name__
