"""bgnorm: Batch Group Normalization (Zhou et al., AAAI 2021) for PyTorch.

Layers (``BatchGroupNorm1d/2d/3d``, ``GeneralBatchGroupNorm1d/2d/3d``, ``PositionalNorm``), the
functional API (:mod:`bgnorm.functional`), a norm registry (:func:`make_norm`), model conversion
(:func:`convert_norm`), the paper's G policy (:func:`paper_groups`), a G per layer
(:func:`auto_groups`, ``num_groups="auto"``), and the small-batch methods BGN is compared with
(Batch Renormalization, FRN, EvoNorm-S0/B0, Weight Standardization).
"""

from . import functional
from .convert import convert_norm
from .distributed import SyncBatchGroupNorm
from .layers import (
    DEFAULT_NUM_GROUPS,
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    GeneralBatchGroupNorm1d,
    GeneralBatchGroupNorm2d,
    GeneralBatchGroupNorm3d,
    PositionalNorm,
)
from .policy import (
    MIN_VALUES,
    PAPER_GROUPS,
    REFERENCE_FEATURES,
    GroupsReport,
    auto_groups,
    channel_groups,
    groups_report,
    paper_groups,
    paper_values_per_statistic,
    resolve_groups,
    values_per_statistic,
)
from .registry import canonical_name, make_norm, norm_names

# isort: split
# -- the small-batch methods (issue 15) --
from .small_batch import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
    renorm_limits,
    set_renorm_limits,
)
from .weight_std import StdConv1d, StdConv2d, StdConv3d, WeightStandardization, standardize_weights

# isort: split
# -- inference folding, SWA statistics, frozen norms (issue 16) --
from .frozen import FrozenBatchGroupNorm, FrozenBatchNorm, freeze_norms
from .fuse import FuseReport, fuse_conv_norm, fuse_conv_norm_pair
from .swa import update_bn

__version__ = "0.1.0"

__all__ = [
    "BatchGroupNorm1d",
    "BatchGroupNorm2d",
    "BatchGroupNorm3d",
    "DEFAULT_NUM_GROUPS",
    "GeneralBatchGroupNorm1d",
    "GeneralBatchGroupNorm2d",
    "GeneralBatchGroupNorm3d",
    "PAPER_GROUPS",
    "PositionalNorm",
    "SyncBatchGroupNorm",
    "canonical_name",
    "channel_groups",
    "convert_norm",
    "functional",
    "make_norm",
    "norm_names",
    "paper_groups",
    "values_per_statistic",
    # -- a G per layer (issue 15) --
    "MIN_VALUES",
    "REFERENCE_FEATURES",
    "GroupsReport",
    "auto_groups",
    "groups_report",
    "paper_values_per_statistic",
    "resolve_groups",
    # -- inference folding, SWA statistics, frozen norms (issue 16) --
    "FrozenBatchGroupNorm",
    "FrozenBatchNorm",
    "FuseReport",
    "freeze_norms",
    "fuse_conv_norm",
    "fuse_conv_norm_pair",
    "update_bn",
    # -- the small-batch methods (issue 15) --
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "EvoNorm2dB0",
    "EvoNorm2dS0",
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "StdConv1d",
    "StdConv2d",
    "StdConv3d",
    "WeightStandardization",
    "renorm_limits",
    "set_renorm_limits",
    "standardize_weights",
]
