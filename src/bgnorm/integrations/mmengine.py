"""Register bgnorm's layers in mmengine's ``MODELS`` registry (OpenMMLab: mmdet, mmseg, ...).

After :func:`register`, a config selects a norm by name like torch's (``"BN"``, ``"GN"``)::

    norm_cfg = dict(type="BGN", num_groups=32)          # BatchGroupNorm2d
    norm_cfg = dict(type="FrozenBGN", num_groups=32)    # FrozenBatchGroupNorm
    norm_cfg = dict(type="BRN", r_max=3.0, d_max=5.0)   # BatchRenorm2d
    conv_cfg = dict(type="StdConv")                     # StdConv2d (weight standardization)

mmcv's ``build_norm_layer(cfg, num_features, postfix)`` looks the name up in ``MODELS``, calls
``layer(num_features, eps=1e-5 unless given, **rest)`` and names the attribute from the class's
``_abbr_`` plus the postfix (``bgn1``); every class registered here takes the channel count
first and ``eps=`` like torch's BatchNorm, and carries an ``_abbr_`` class attribute:

=============  ==========================  ======
name           class                       _abbr_
=============  ==========================  ======
BGN, BGN2d     BatchGroupNorm2d            bgn
BGN1d          BatchGroupNorm1d            bgn
BGN3d          BatchGroupNorm3d            bgn
SyncBGN        SyncBatchGroupNorm          bgn
GBGN, GBGN2d   GeneralBatchGroupNorm2d     gbgn
GBGN1d         GeneralBatchGroupNorm1d     gbgn
GBGN3d         GeneralBatchGroupNorm3d     gbgn
PN             PositionalNorm              pn
FrozenBN       FrozenBatchNorm             bn
FrozenBGN      FrozenBatchGroupNorm        bgn
BRN, BRN2d     BatchRenorm2d               brn
BRN1d          BatchRenorm1d               brn
BRN3d          BatchRenorm3d               brn
FRN, FRN2d     FilterResponseNorm2d        frn
FRN1d          FilterResponseNorm1d        frn
FRN3d          FilterResponseNorm3d        frn
EvoNormS0      EvoNorm2dS0                 evonorm
EvoNormB0      EvoNorm2dB0                 evonorm
=============  ==========================  ======

FRN and the EvoNorms are normalization-*activation* layers (see :mod:`bgnorm.small_batch`): a
module built with them should have no activation after its norm (``act_cfg=None`` where the
module takes one). build_norm_layer passes ``eps=1e-5`` when the config gives none, which is
the layers' own default except EvoNorm-B0's (1e-3, timm's): give ``eps=1e-3`` in its config to
keep timm's. EvoNorm-S0 takes ``groups`` (or ``group_size``), not ``num_groups``.

The weight-standardized convolutions are in :data:`CONV_LAYERS`, for mmcv's
``build_conv_layer(conv_cfg, in_channels, out_channels, kernel_size, ...)``, which calls
``layer(*args, **kwargs, **rest)`` (torch's conv arguments, and ``eps=`` from the config):

=============  ==========================
name           class
=============  ==========================
StdConv        StdConv2d
StdConv1d      StdConv1d
StdConv2d      StdConv2d
StdConv3d      StdConv3d
=============  ==========================

mmengine is imported only when :func:`register` runs; it is not a dependency of bgnorm.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..distributed import SyncBatchGroupNorm
from ..frozen import FrozenBatchGroupNorm, FrozenBatchNorm
from ..layers import (
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    GeneralBatchGroupNorm1d,
    GeneralBatchGroupNorm2d,
    GeneralBatchGroupNorm3d,
    PositionalNorm,
)
from ..small_batch import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
)
from ..weight_std import StdConv1d, StdConv2d, StdConv3d

__all__ = ["CONV_LAYERS", "LAYERS", "register"]

#: registry name -> class; each class carries the ``_abbr_`` build_norm_layer names the
#: attribute with (a class attribute, so it is there whether or not :func:`register` ran)
LAYERS: dict[str, type[nn.Module]] = {
    "BGN": BatchGroupNorm2d,
    "BGN1d": BatchGroupNorm1d,
    "BGN2d": BatchGroupNorm2d,
    "BGN3d": BatchGroupNorm3d,
    "SyncBGN": SyncBatchGroupNorm,
    "GBGN": GeneralBatchGroupNorm2d,
    "GBGN1d": GeneralBatchGroupNorm1d,
    "GBGN2d": GeneralBatchGroupNorm2d,
    "GBGN3d": GeneralBatchGroupNorm3d,
    "PN": PositionalNorm,
    "FrozenBN": FrozenBatchNorm,
    "FrozenBGN": FrozenBatchGroupNorm,
    "BRN": BatchRenorm2d,
    "BRN1d": BatchRenorm1d,
    "BRN2d": BatchRenorm2d,
    "BRN3d": BatchRenorm3d,
    "FRN": FilterResponseNorm2d,
    "FRN1d": FilterResponseNorm1d,
    "FRN2d": FilterResponseNorm2d,
    "FRN3d": FilterResponseNorm3d,
    "EvoNormS0": EvoNorm2dS0,
    "EvoNormB0": EvoNorm2dB0,
}

#: registry name -> conv class, for mmcv's build_conv_layer (``conv_cfg=dict(type=...)``)
CONV_LAYERS: dict[str, type[nn.Module]] = {
    "StdConv": StdConv2d,
    "StdConv1d": StdConv1d,
    "StdConv2d": StdConv2d,
    "StdConv3d": StdConv3d,
}


def register(registry: Any = None, *, force: bool = False) -> Any:
    """Register the layers of :data:`LAYERS` and :data:`CONV_LAYERS` in ``registry`` by name.

    Calling it again is harmless; a name already taken by another class raises ``KeyError``
    unless ``force=True``, which replaces it.

    Args:
        registry: an mmengine ``Registry``. Default: ``mmengine.registry.MODELS``, which every
            OpenMMLab project's MODELS registry falls back to.
        force: replace names registered for other classes.

    Returns:
        The registry.

    The example needs mmengine (``tests/test_docs.py`` runs it when mmengine is installed).

    Example:
        >>> from bgnorm.integrations import mmengine as bgn_mm
        >>> MODELS = bgn_mm.register()
        >>> MODELS.build(dict(type="BGN", num_features=64, num_groups=32))
        BatchGroupNorm2d(64, num_groups=32, ...)
        >>> MODELS.get("GBGN")._abbr_  # build_norm_layer names the attribute gbgn1, gbgn2...
        'gbgn'
    """
    if registry is None:
        try:
            from mmengine.registry import MODELS
        except ImportError as err:
            raise ImportError(
                "bgnorm.integrations.mmengine.register() needs mmengine (pip install mmengine), "
                "or pass the registry to register the layers in"
            ) from err
        registry = MODELS
    for name, cls in {**LAYERS, **CONV_LAYERS}.items():
        existing = registry.module_dict.get(name)
        if existing is cls:
            continue
        if existing is not None and not force:
            raise KeyError(
                f"bgnorm.integrations.mmengine.register: the name {name!r} is already "
                f"registered in {registry.name!r} for {existing.__module__}."
                f"{existing.__qualname__}; pass force=True to replace it with bgnorm's "
                f"{cls.__name__}"
            )
        registry.register_module(name=name, module=cls, force=force)
    return registry
