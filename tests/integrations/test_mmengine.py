"""bgnorm.integrations.mmengine against the real mmengine package (pip install mmengine)."""

from __future__ import annotations

import pytest
import torch

import bgnorm

pytestmark = pytest.mark.integration
mmengine = pytest.importorskip(
    "mmengine", reason="mmengine is not installed (pip install 'bgnorm[integrations]')")

from mmengine.registry import MODELS, Registry  # noqa: E402

from bgnorm.integrations import mmengine as bgn_mm  # noqa: E402


def test_build_by_name_from_the_registry_and_a_child_scope():
    bgn_mm.register()
    bgn_mm.register()  # idempotent
    layer = MODELS.build(dict(type="BGN", num_features=64, num_groups=32))
    assert type(layer) is bgnorm.BatchGroupNorm2d and layer.num_groups == 32
    # a downstream project's registry (mmdet, mmseg) falls back to mmengine's
    child = Registry("model", parent=MODELS, scope="bgnorm_test_scope")
    assert child.get("FrozenBGN") is bgnorm.FrozenBatchGroupNorm
    assert child.build(dict(type="GBGN", num_features=8, num_groups=4,
                            examples_per_group=2)).examples_per_group == 2


#: registry name -> the attribute name build_norm_layer must give the layer (its _abbr_)
ABBREVIATIONS = {"BGN": "bgn", "BGN1d": "bgn", "BGN2d": "bgn", "BGN3d": "bgn",
                 "SyncBGN": "bgn", "GBGN": "gbgn", "GBGN1d": "gbgn", "GBGN2d": "gbgn",
                 "GBGN3d": "gbgn", "PN": "pn", "FrozenBN": "bn",
                 "FrozenBGN": "bgn", "BRN": "brn", "BRN1d": "brn", "BRN2d": "brn",
                 "BRN3d": "brn", "FRN": "frn", "FRN1d": "frn", "FRN2d": "frn", "FRN3d": "frn",
                 "EvoNormS0": "evonorm", "EvoNormB0": "evonorm"}


def test_every_registered_name_has_its_abbreviation():
    assert set(bgn_mm.LAYERS) == set(ABBREVIATIONS)


@pytest.mark.parametrize("name", list(bgn_mm.LAYERS))
def test_build_norm_layer_convention(name):
    """What mmcv's build_norm_layer does with a registered name: num_features first, eps set
    to 1e-5 unless given, the attribute named from the class's _abbr_."""
    bgn_mm.register()
    cls = bgn_mm.LAYERS[name]
    assert MODELS.get(name) is cls and cls._abbr_ == ABBREVIATIONS[name]
    kwargs = {"num_groups": 4} if "BGN" in name else {"groups": 4} if name == "EvoNormS0" else {}
    if name.startswith("GBGN"):
        kwargs["examples_per_group"] = 2
    layer = MODELS.get(name)(8, eps=1e-3, **kwargs)
    assert layer.num_features == 8 and layer.eps == 1e-3
    shape = (4, 8) if name.endswith("1d") else (4, 8, 3, 3, 3) if name.endswith("3d") else (
        4, 8, 3, 3)
    assert layer(torch.randn(shape)).shape == shape


#: registry name -> the weight-standardized conv class build_conv_layer must build
CONVS = {"StdConv": bgnorm.StdConv2d, "StdConv1d": bgnorm.StdConv1d,
         "StdConv2d": bgnorm.StdConv2d, "StdConv3d": bgnorm.StdConv3d}


@pytest.mark.parametrize("name", list(CONVS))
def test_build_conv_layer_convention(name):
    """What mmcv's build_conv_layer does: layer(*args, **kwargs, **rest of conv_cfg)."""
    bgn_mm.register()
    assert bgn_mm.CONV_LAYERS == CONVS
    cfg = dict(type=name, eps=1e-5)
    cls = MODELS.get(cfg.pop("type"))
    assert cls is CONVS[name]
    conv = cls(3, 8, 3, stride=1, padding=1, bias=False, **cfg)
    assert conv.eps == 1e-5 and conv.bias is None
    dims = 1 if name.endswith("1d") else 3 if name.endswith("3d") else 2
    x = torch.randn((2, 3) + (5,) * dims)
    assert conv(x).shape == (2, 8) + (5,) * dims


def test_name_taken_by_another_class_is_refused():
    registry = Registry("isolated_models")
    registry.register_module(name="PN", module=torch.nn.Identity)
    with pytest.raises(KeyError, match="'PN' is already registered.*force=True"):
        bgn_mm.register(registry)
    bgn_mm.register(registry, force=True)
    assert registry.get("PN") is bgnorm.PositionalNorm
