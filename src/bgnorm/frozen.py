r"""Frozen norms: fixed statistics and affine, stored as buffers (for fine-tuning with frozen
BatchNorm, as detection and segmentation models do), and :func:`freeze_norms` to convert a model.

:class:`FrozenBatchNorm` computes BatchNorm's eval mode (which is Batch Renormalization's too);
:class:`FrozenBatchGroupNorm` computes BatchGroupNorm's eval mode, for any input (N, C, \*) and
any group layout:

.. math::
    y = \frac{x - \hat\mu_{g}}{\sqrt{\hat\sigma^2_{g} + \epsilon}} \gamma_c + \beta_c

with the stored running statistics, in training mode too, and no parameters: nothing is
learned and nothing is updated. Gradients flow to the input.

State dicts use the unfrozen layer's keys (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``, and BGN's ``_extra_state``), so a frozen model loads
the unfrozen model's state dict and the other way round. A dict without
``num_batches_tracked`` (torchvision's or detectron2's FrozenBatchNorm2d format) loads too
(the count becomes 0), and torchvision's FrozenBatchNorm2d drops the key when it loads ours.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _checks
from . import functional as BF
from .layers import DEFAULT_NUM_GROUPS, _BatchGroupNorm
from .small_batch import EvoNorm2dB0, _BatchRenorm

__all__ = ["FrozenBatchGroupNorm", "FrozenBatchNorm", "freeze_norms"]


class _FrozenNorm(nn.Module):
    """Buffers, state-dict handling and the per-channel affine of the frozen norms."""

    _version = 1
    num_groups: int

    def __init__(self, num_features: int, num_stats: int, eps: float, affine: bool,
                 bias: bool, device: Any, dtype: Any) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = _checks.check_num_features(num_features)
        self.eps = eps
        self.affine = affine
        self.register_buffer(
            "weight", torch.ones(num_features, **factory_kwargs) if affine else None)
        self.register_buffer(
            "bias", torch.zeros(num_features, **factory_kwargs) if affine and bias else None)
        self.register_buffer("running_mean", torch.zeros(num_stats, **factory_kwargs))
        self.register_buffer("running_var", torch.ones(num_stats, **factory_kwargs))
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device))

    @torch.no_grad()
    def _copy_from(self, norm: nn.Module) -> None:
        """Take ``norm``'s statistics and affine (copies, same device and dtype)."""
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src = getattr(norm, name, None)
            if src is not None and getattr(self, name) is not None:
                setattr(self, name, src.detach().clone())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):  # type: ignore[override]
        # torchvision's and detectron2's FrozenBatchNorm2d keep no count: take it as 0
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        key = prefix + "running_mean"
        if key in state_dict and state_dict[key].dim() == 1 and (
            state_dict[key].shape[0] != self.running_mean.shape[0]
        ):
            error_msgs.append(
                f"{type(self).__name__}: the checkpoint's running statistics have "
                f"{state_dict[key].shape[0]} entries but this layer has "
                f"{self.running_mean.shape[0]} ({self._stats_what()}); construct it to match"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _stats_what(self) -> str:
        return f"num_features={self.num_features}"

    def _channel_stats(self) -> tuple[Tensor, Tensor] | str:
        """Per-channel running mean and variance, or why there are none."""
        return self.running_mean, self.running_var

    def channel_affine(self) -> tuple[Tensor, Tensor] | str:
        r"""The layer as a per-channel map :math:`y_c = s_c x_c + t_c`: ``(s, t)`` in float64,
        each of shape (C,), or a string saying why it is not one (bands or straddling groups).
        :func:`bgnorm.fuse_conv_norm` folds it into the preceding conv with these."""
        stats = self._channel_stats()
        if isinstance(stats, str):
            return stats
        mean, var = stats
        scale = torch.rsqrt(var.detach().to(torch.float64) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.detach().to(torch.float64)
        shift = -mean.detach().to(torch.float64) * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().to(torch.float64)
        return scale, shift


class FrozenBatchNorm(_FrozenNorm):
    r"""BatchNorm with fixed statistics and affine (buffers only): BatchNorm's eval mode,
    always.

    .. math::
        y = \frac{x - \hat\mu_c}{\sqrt{\hat\sigma^2_c + \epsilon}} \gamma_c + \beta_c

    computed by :func:`torch.nn.functional.batch_norm` with ``training=False``, so the output
    equals an eval-mode :class:`torch.nn.BatchNorm2d` with the same buffers exactly; eps is
    added to the variance as there (and in torchvision's FrozenBatchNorm2d). Any input
    (N, C, \*): one class for 1d, 2d and 3d. The state dict has BatchNorm's keys. It is also
    the frozen form of :class:`bgnorm.BatchRenorm2d` (1d, 3d), whose eval mode is BatchNorm's
    with its running statistics and whose state dict has the same keys.

    Args:
        num_features: C.
        eps: added to the variance. Default: 1e-5.
        affine: keep ``weight`` and ``bias`` (gamma, beta) buffers. Default: True.
        bias: keep the ``bias`` buffer when ``affine`` (keyword only; BatchNorm's
            ``bias=False``). Default: True.

    Shape:
        - Input: (N, C, \*); Output: same shape.

    Example:
        >>> bn = nn.BatchNorm2d(8).eval()
        >>> frozen = FrozenBatchNorm.from_module(bn)
        >>> x = torch.randn(2, 8, 4, 4)
        >>> torch.equal(frozen(x), bn(x))
        True
    """

    _abbr_ = "bn"  # the attribute name mmcv's build_norm_layer gives it (bn1, ...)

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None, *, bias: bool = True) -> None:
        super().__init__(num_features, num_features, eps, affine, bias, device, dtype)

    @classmethod
    def from_module(cls, bn: _BatchNorm | _BatchRenorm) -> FrozenBatchNorm:
        """A frozen copy of a BatchNorm (1d/2d/3d, SyncBatchNorm) or a BatchRenorm1d/2d/3d with
        running statistics (the eval mode of each)."""
        if not isinstance(bn, (_BatchNorm, _BatchRenorm)):
            raise TypeError(f"FrozenBatchNorm.from_module: expected a BatchNorm or BatchRenorm "
                            f"layer, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"FrozenBatchNorm.from_module: {type(bn).__name__} has "
                "track_running_stats=False, so there are no statistics to freeze")
        frozen = cls(bn.num_features, bn.eps, bn.affine, bias=bn.bias is not None)
        frozen._copy_from(bn)
        return frozen

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise ValueError(f"FrozenBatchNorm: expected input of shape (N, C, *), got "
                             f"{input.dim()}D input")
        _checks.check_channels("FrozenBatchNorm", input, self.num_features)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


class FrozenBatchGroupNorm(_FrozenNorm):
    r"""BatchGroupNorm with fixed statistics and affine (buffers only): BatchGroupNorm's eval
    mode, always, for any input (N, C, \*) (one class for 1d, 2d and 3d).

    The input is viewed as (N, G, D/G) like :class:`bgnorm.BatchGroupNorm2d`, and

    .. math::
        y = \frac{x - \hat\mu_{g}}{\sqrt{\hat\sigma^2_{g} + \epsilon}} \gamma_c + \beta_c

    with the stored (G,) running statistics, computed by
    :func:`bgnorm.functional.batch_group_norm` with ``training=False`` (equal to the eval-mode
    layer exactly). Groups of whole channels are a per-channel affine map and fold into a
    preceding conv (:func:`bgnorm.fuse_conv_norm`); bands and straddling groups do not. Groups
    that straddle channels keep the spatial size they were laid out for (``layout_shape``, in
    the state dict as the BGN layer's ``_extra_state``) and refuse any other, like the layer.

    Args:
        num_features: C.
        num_groups: G. Default: 32.
        eps: added to the variance. Default: 1e-5.
        affine: keep ``weight`` (gamma) and ``bias`` (beta) buffers. Default: True.
        bias: keep the ``bias`` buffer when ``affine`` (keyword only). Default: True.

    Shape:
        - Input: (N, C, \*); Output: same shape.

    Example:
        >>> import bgnorm
        >>> bgn = bgnorm.BatchGroupNorm2d(16, num_groups=4).eval()
        >>> frozen = FrozenBatchGroupNorm.from_module(bgn)
        >>> frozen.load_state_dict(bgn.state_dict())  # the same keys
        <All keys matched successfully>
        >>> x = torch.randn(2, 16, 4, 4)
        >>> torch.equal(frozen(x), bgn(x))
        True
    """

    _abbr_ = "bgn"

    def __init__(self, num_features: int, num_groups: int = DEFAULT_NUM_GROUPS,
                 eps: float = 1e-5, affine: bool = True, *, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        num_groups = _checks.check_num_groups(num_groups)
        super().__init__(num_features, num_groups, eps, affine, bias, device, dtype)
        self.num_groups = num_groups
        self.layout_shape: tuple[int, ...] | None = None

    @classmethod
    def from_module(cls, bgn: _BatchGroupNorm) -> FrozenBatchGroupNorm:
        """A frozen copy of a BatchGroupNorm1d/2d/3d, GeneralBatchGroupNorm2d or
        SyncBatchGroupNorm with running statistics (the eval mode of each)."""
        if not isinstance(bgn, _BatchGroupNorm):
            raise TypeError(f"FrozenBatchGroupNorm.from_module: expected a BatchGroupNorm "
                            f"layer, got {type(bgn).__name__}")
        if bgn.running_mean is None:
            raise ValueError(
                f"FrozenBatchGroupNorm.from_module: {type(bgn).__name__} has "
                "track_running_stats=False, so there are no statistics to freeze")
        if not bgn.groups_resolved:
            raise ValueError(
                f"FrozenBatchGroupNorm.from_module: {bgn._describe()} has not chosen its G yet, "
                "so there are no statistics to freeze; train it first (its first training "
                "input chooses G), or load a checkpoint saved after training")
        frozen = cls(bgn.num_features, bgn.num_groups, bgn.eps, bgn.weight is not None,
                     bias=bgn.bias is not None)
        frozen._copy_from(bgn)
        frozen.layout_shape = bgn.layout_shape
        return frozen

    @property
    def straddles_channels(self) -> bool:
        """True when groups are neither whole channels nor bands inside one channel."""
        c, g = self.num_features, self.num_groups
        return c % g != 0 and g % c != 0

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
                f"affine={self.affine}")

    def get_extra_state(self) -> dict[str, Any]:
        return {"layout_shape": None if self.layout_shape is None else list(self.layout_shape)}

    def set_extra_state(self, state: Any) -> None:
        shape = state.get("layout_shape") if isinstance(state, dict) else None
        self.layout_shape = None if shape is None else tuple(int(s) for s in shape)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):  # type: ignore[override]
        state_dict.setdefault(prefix + "_extra_state", {"layout_shape": None})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _stats_what(self) -> str:
        return f"num_groups={self.num_groups}"

    def _channel_stats(self) -> tuple[Tensor, Tensor] | str:
        c, g = self.num_features, self.num_groups
        if c % g:
            kind = (f"cuts each channel into {g // c} bands" if g % c == 0
                    else "has groups that straddle channel boundaries")
            return (f"FrozenBatchGroupNorm(num_features={c}, num_groups={g}) {kind}: a "
                    "per-position affine, not a per-channel one")
        index = torch.arange(c, device=self.running_mean.device) // (c // g)
        return self.running_mean[index], self.running_var[index]

    def _check_layout(self, input: Tensor) -> None:
        if not self.straddles_channels:
            return
        shape = tuple(int(s) for s in input.shape[2:])
        if self.layout_shape is None:
            self.layout_shape = shape
        elif shape != self.layout_shape:
            c, g = self.num_features, self.num_groups
            raise ValueError(
                f"FrozenBatchGroupNorm({c}, num_groups={g}): groups straddle channel "
                f"boundaries, so group membership depends on the spatial size; the statistics "
                f"were laid out for spatial size {self.layout_shape} but the input has {shape}. "
                f"Use inputs of spatial size {self.layout_shape}"
            )

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise ValueError(f"FrozenBatchGroupNorm: expected input of shape (N, C, *), got "
                             f"{input.dim()}D input")
        _checks.check_channels("FrozenBatchGroupNorm", input, self.num_features)
        self._check_layout(input)
        return BF.batch_group_norm(input, self.num_groups, self.running_mean, self.running_var,
                                   self.weight, self.bias, training=False, eps=self.eps)


def freeze_norms(
    module: nn.Module, *, bn: bool = True, bgn: bool = True, brn: bool = True
) -> nn.Module:
    """Replace the BatchNorm (1d/2d/3d, SyncBatchNorm) layers of ``module`` by
    :class:`FrozenBatchNorm` (``bn=True``), the BatchGroupNorm1d/2d/3d,
    GeneralBatchGroupNorm2d and SyncBatchGroupNorm layers by :class:`FrozenBatchGroupNorm`
    (``bgn=True``) and the BatchRenorm1d/2d/3d layers by :class:`FrozenBatchNorm` (``brn=True``;
    their eval mode is BatchNorm's), with their statistics, affine, eps, device and dtype.

    Each frozen layer computes its layer's eval mode, whatever the model's mode, and the
    model's state dict keeps its keys: the frozen model loads the unfrozen model's state dict
    and the other way round. Layers with ``track_running_stats=False`` have nothing to freeze
    and are left in place with a warning. EvoNorm2dB0 keeps a running variance too, but its
    eval mode is not a per-channel affine map (no frozen layer computes it): it is left in
    place with a warning, as in training mode it still uses and updates batch statistics
    (with ``apply_act=False`` it is an affine map in both modes and is left without one).
    Layers without batch statistics (GroupNorm, LayerNorm, InstanceNorm, PositionalNorm,
    FilterResponseNorm, EvoNorm2dS0) compute the same in both modes and are left as they are.
    To freeze part of a model, call it on that part (``freeze_norms(model.backbone)``).

    Returns ``module``, modified in place, or the frozen layer when ``module`` is itself a norm.

    Example:
        >>> import bgnorm
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), bgnorm.BatchGroupNorm2d(8, 2), nn.ReLU())
        >>> sd = net.state_dict()
        >>> net = freeze_norms(net)
        >>> type(net[1]).__name__
        'FrozenBatchGroupNorm'
        >>> net.load_state_dict(sd)
        <All keys matched successfully>
    """
    left: list[str] = []
    evonorm_b0: list[str] = []

    def convert(norm: nn.Module, name: str) -> nn.Module:
        if isinstance(norm, EvoNorm2dB0):
            if norm.v is not None:  # apply_act=False: an affine map in both modes
                evonorm_b0.append(name)
            return norm
        frozen: type[_FrozenNorm] | None = None
        if (bn and isinstance(norm, _BatchNorm)) or (brn and isinstance(norm, _BatchRenorm)):
            frozen = FrozenBatchNorm
        elif bgn and isinstance(norm, _BatchGroupNorm):
            frozen = FrozenBatchGroupNorm
        if frozen is None:
            return norm
        if norm.running_mean is None:
            left.append(name)
            return norm
        return frozen.from_module(norm)  # type: ignore[attr-defined]

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            new = convert(child, full)
            if new is not child:
                setattr(parent, child_name, new)
            else:
                walk(child, full)

    out = convert(module, "<root>")
    if out is module:
        walk(module, "")
    if left:
        warnings.warn(
            f"freeze_norms: {len(left)} layer(s) have track_running_stats=False (no "
            f"statistics to freeze) and were left in place: {', '.join(left[:8])}"
            + (" ..." if len(left) > 8 else ""),
            stacklevel=2,
        )
    if evonorm_b0:
        warnings.warn(
            f"freeze_norms: {len(evonorm_b0)} EvoNorm2dB0 layer(s) were left in place: "
            f"{', '.join(evonorm_b0[:8])}" + (" ..." if len(evonorm_b0) > 8 else "") + ". "
            "EvoNorm-B0 divides by max(running std, v x + each example's std), not a "
            "per-channel affine map, so no frozen layer computes it; in training mode it still "
            "normalizes with batch statistics and updates running_var. To keep them frozen, put "
            "them in eval mode after each model.train() (e.g. for m in model.modules(): if "
            "isinstance(m, bgnorm.EvoNorm2dB0): m.eval()) and set requires_grad=False on their "
            "parameters",
            stacklevel=2,
        )
    return out

