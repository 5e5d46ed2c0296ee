"""Policies for choosing BGN's one hyper-parameter G.

The BGN paper (Zhou et al., AAAI 2021, Table 2) trained ResNet-50 on ImageNet with

=========  ===  ===  ===  ===  ==  ==  ==
batch      128  64   32   16   8   4   2
G          512  256  128  64   16  2   1
=========  ===  ===  ===  ===  ==  ==  ==

:func:`paper_groups` extends that table to every batch size by interpolating in log-log space and
rounding to a power of two (powers of two divide the D = C*H*W of typical CNN layers).

That is one G for every layer. :func:`auto_groups` makes it valid for every layer of any
network (what ``num_groups="auto"`` on the layers and in :func:`bgnorm.convert_norm` uses): the
paper's G for the batch size, lowered in a layer only where its statistics would see fewer than
:data:`MIN_VALUES` values, and only whole channels or bands where they fit. ``target_values=``
aims at a number of values per statistic instead (e.g. :func:`paper_values_per_statistic`, the
values the paper's G gives ResNet-50's median layer, D = :data:`REFERENCE_FEATURES`).
:func:`groups_report` lists what it chooses for every layer of a model; :func:`resolve_groups`
makes the choice without training. ``docs/choosing-g.md`` has the rule's derivation and the
measurements behind it.

Example:
    >>> PAPER_GROUPS[32], paper_groups(32), paper_groups(24)
    (128, 128, 128)
    >>> auto_groups(128, (28, 28), 8) == PAPER_GROUPS[8], MIN_VALUES
    (True, 32)
    >>> REFERENCE_FEATURES, paper_values_per_statistic(32) == 32 * REFERENCE_FEATURES / 128
    (100352, True)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ._checks import check_num_features, check_num_groups

__all__ = [
    "MIN_VALUES",
    "PAPER_GROUPS",
    "REFERENCE_FEATURES",
    "auto_groups",
    "channel_groups",
    "group_layout",
    "paper_groups",
    "paper_values_per_statistic",
    "values_per_statistic",
    "resolve_groups",
    "groups_report",
    "GroupsReport",
    "GroupsRow",
]

#: The paper's (batch size -> G) table.
PAPER_GROUPS: dict[int, int] = {128: 512, 64: 256, 32: 128, 16: 64, 8: 16, 4: 2, 2: 1}

#: The fewest values per statistic :func:`auto_groups` leaves a layer (where it has that many):
#: the suite's mechanism study measured BGN with 2 values per statistic collapsing (10-40% on
#: digits), 8 in every layer losing 1.4 points, and 32 within noise of BatchNorm.
MIN_VALUES: int = 32


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
    return 2 ** max(0, math.floor(_paper_log2_groups(batch_size) + 0.5 + 1e-9))


def _paper_log2_groups(batch_size: int) -> float:
    """log2 of the paper's G at ``batch_size`` before rounding: the table's points joined by
    straight lines in (log2 b, log2 G), slope 1 above 128, G = 1 at 2 and below."""
    points = sorted((math.log2(b), math.log2(g)) for b, g in PAPER_GROUPS.items())
    b = math.log2(batch_size)
    if b <= points[0][0]:
        return points[0][1]
    if b >= points[-1][0]:
        return points[-1][1] + (b - points[-1][0])
    for (b0, g0), (b1, g1) in zip(points, points[1:]):
        if b0 <= b <= b1:
            return g0 + (g1 - g0) * (b - b0) / (b1 - b0)
    raise AssertionError("unreachable: b lies between the table's first and last points")


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
    BatchRenorm (e examples a group, or the whole batch)  min(e, b) * S
    FilterResponseNorm (mean square per example)          S
    EvoNorm-S0 (G groups)                                 (C / G) * S
    EvoNorm-B0 (batch variance; e examples a group)       min(e, b) * S
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
    from .small_batch import EvoNorm2dB0, EvoNorm2dS0, _BatchRenorm, _FilterResponseNorm

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
    if isinstance(module, (_BatchRenorm, EvoNorm2dB0)):
        return min(module.examples_per_group or b, b) * spatial
    if isinstance(module, _FilterResponseNorm):
        return spatial
    if isinstance(module, EvoNorm2dS0):
        return c // module.groups * spatial
    raise TypeError(
        f"values_per_statistic: {name} is not a normalization layer with batch or group "
        "statistics (BatchGroupNorm, BatchNorm, GroupNorm, InstanceNorm, LayerNorm, "
        "PositionalNorm, BatchRenorm, FilterResponseNorm, EvoNorm-S0/B0)"
    )


# -- a per-layer G: the values per statistic the paper's G gives on ResNet-50 ---------------------

#: D = C * H * W of the median normalization layer of ResNet-50 at 224 x 224 px: of its 53 norm
#: layers, 12 have D = 100352 (128 x 28 x 28, 512 x 14 x 14 and 2048 x 7 x 7), 16 fewer values
#: and 25 more. The reference of :func:`paper_values_per_statistic`.
REFERENCE_FEATURES: int = 100_352


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def paper_values_per_statistic(batch_size: int) -> float:
    r"""The values per statistic the paper's G gives at a per-worker ``batch_size`` on a
    ResNet-50 layer of :data:`REFERENCE_FEATURES` = 100352 values per example: a target for
    :func:`auto_groups` (``target_values=paper_values_per_statistic``, its rule before the
    suite's measurements made the paper's G its default: it gives every layer these values).

    At the table's batch sizes, :math:`V^*(b) = b \cdot 100352 / G_{paper}(b)`:

    ========  =====  =====  =====  =====  =====  ======  ======
    b         128    64     32     16     8      4       2
    G         512    256    128    64     16     2       1
    V*(b)     25088  25088  25088  25088  50176  200704  200704
    ========  =====  =====  =====  =====  =====  ======  ======

    From 16 to 128 examples the paper keeps the values per statistic constant (G = 4b); below
    16 it wants more of them (2x at 8, 8x at 4 and 2, where G = 1, the fewest groups there
    are, is reached). Between the table's batch sizes :math:`\log_2 V^*` is linear in
    :math:`\log_2 b`; beyond them it stays at the nearest end's value (25088 above 128,
    200704 below 2).

    Example:
        >>> [round(paper_values_per_statistic(b)) for b in (256, 128, 16, 8, 4, 2, 1)]
        [25088, 25088, 25088, 50176, 200704, 200704, 200704]
        >>> round(paper_values_per_statistic(12))  # between 8 and 16: 50176 / 2**0.585
        33451
    """
    batch_size = check_num_groups(_as_int(batch_size), "batch_size")
    table = sorted((b, b * REFERENCE_FEATURES / g) for b, g in PAPER_GROUPS.items())
    b = min(max(batch_size, table[0][0]), table[-1][0])
    for (b0, v0), (b1, v1) in zip(table, table[1:]):
        if b in (b0, b1):  # the table's own values, exactly
            return v0 if b == b0 else v1
        if b0 < b < b1:
            return v0 * (v1 / v0) ** (math.log2(b / b0) / math.log2(b1 / b0))
    raise AssertionError("unreachable: b is clamped to the table's range")


def _spatial(spatial_shape: Sequence[int] | int, fn: str) -> tuple[int, ...]:
    if isinstance(spatial_shape, numbers.Integral) and not isinstance(spatial_shape, bool):
        spatial_shape = (int(spatial_shape),)
    try:
        shape = tuple(_as_int(s) for s in spatial_shape)  # type: ignore[union-attr]
    except TypeError:
        shape = (spatial_shape,)  # type: ignore[assignment]
    if not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(
            f"{fn}: spatial_shape must be the layer's spatial sizes (H, W), (L,), (T, H, W) or () "
            f"for (N, C) input, each an int >= 1; got {spatial_shape!r}")
    return shape


def _log_distance(groups: int, ideal: float) -> float:
    """|log2(groups / ideal)|, rounded so that candidates equally far in exact arithmetic tie
    (the tie then goes to the smaller G) whatever the floating-point round-off."""
    return round(abs(math.log2(groups / ideal)), 9)


def auto_groups(
    num_features: int,
    spatial_shape: Sequence[int] | int,
    batch_size: int,
    *,
    target_values: float | Callable[[int], float] | None = None,
    min_values: float = MIN_VALUES,
    allow_straddling: bool = True,
) -> int:
    r"""G for one BGN layer: the paper's G for the batch size, lowered where the layer would
    get fewer than ``min_values`` values per statistic; only whole groups where they fit.

    A statistic of BGN with G groups is computed from :math:`V = b D / G` values (b examples,
    D = C * prod(spatial_shape) values per example). The rule asks for

    .. math::
        G^\ast = \min\Big(G_{paper}(b),\; \frac{b D}{V_{min}}\Big)

    (:func:`paper_groups`, one G for every layer as in the paper; :math:`V_{min}` =
    ``min_values``, default :data:`MIN_VALUES` = 32) and returns the candidate G nearest to
    :math:`G^\ast` in :math:`|\log_2(G / G^\ast)|` (ties go to the smaller G, i.e. more values)
    among those that leave at least :math:`V_{min}` values per statistic (G = 1 where even one
    group has fewer). Candidates are the G that make whole groups:

    * divisors of C (groups of C/G whole channels: any spatial size works), and
    * k * C with k dividing prod(spatial_shape) (each channel cut into k bands),

    both valid for the layer (they divide D). With ``allow_straddling`` (default) a G whose
    groups straddle channels (any other divisor of D) is taken only where no whole-group
    candidate lies within a factor of 2 of :math:`G^\ast` and it lies closer; such groups depend
    on the spatial size (the layer then accepts only inputs of its first size).

    Why this rule (``docs/choosing-g.md`` has the measurements): on every network the suite
    trained (five, with layers of D = 128 to 12,544 values per example, b = 2 to 128, three
    seeds where converged) the paper's single G was as good as any per-layer choice measured,
    and BGN failed only where a statistic saw too few values (2 values: collapsed to 10-40%;
    8 values in every layer: 1.4 points lost; from 32 on, within noise of BN). The earlier rule
    (give every layer the values per statistic the paper's G gives ResNet-50's median layer,
    i.e. ``target_values=paper_values_per_statistic``) chose 2-32 groups on small networks at
    large batch and lost 1-19 points there. On ResNet-50 at 224 px this rule gives the paper's
    G on every layer at every batch size.

    Args:
        num_features: C.
        spatial_shape: the layer's spatial sizes in training ((H, W), (L,), (T, H, W); () or 1
            for (N, C) input).
        batch_size: the examples one statistic sees: the per-worker batch (the global batch
            with cross-process synchronization; e for GBGN).
        target_values: instead of the paper's G, aim at this many values per statistic (a
            number or a callable of ``batch_size``): :math:`G^\ast = b D /` ``target_values``,
            the G of a G sweep on your own network carried to other layers; at least
            ``min_values``. Default: None (the paper's G).
        min_values: the fewest values per statistic a G may leave (>= 2). Default: 32.
        allow_straddling: allow groups that straddle channels (see above). Default: True.

    Example:
        >>> auto_groups(128, (28, 28), 8), auto_groups(256, (56, 56), 8)  # ResNet-50: the paper's
        (16, 16)
        >>> auto_groups(64, (4, 4), 64)  # paper's G = 256: 4 bands of each channel, 256 values
        256
        >>> auto_groups(64, (1, 1), 16)  # the paper's 64 would leave 16 values: 32 of 32
        32
        >>> auto_groups(64, (8, 8), 2, target_values=256)  # a target from your own G sweep
        32
        >>> auto_groups(96, (), 64, target_values=1000)  # (N, C) input: divisors of C only
        6
    """
    fn = "auto_groups"
    c = check_num_features(_as_int(num_features), fn)
    spatial = _spatial(spatial_shape, fn)
    b = check_num_groups(_as_int(batch_size), "batch_size", fn)
    if (isinstance(min_values, bool) or not isinstance(min_values, numbers.Real)
            or not math.isfinite(min_values) or min_values < 2):
        raise ValueError(
            f"{fn}: min_values must be a number >= 2 (the fewest values a statistic may be "
            f"computed from; training needs more than one), got {min_values!r}")
    d = c * math.prod(spatial)
    if target_values is None:
        ideal = float(paper_groups(b))
    else:
        target = target_values(b) if callable(target_values) else target_values
        if (isinstance(target, bool) or not isinstance(target, numbers.Real)
                or not math.isfinite(target) or target <= 0):
            raise ValueError(
                f"{fn}: target_values must be a positive number of values per statistic (or "
                f"a callable of batch_size returning one), got {target!r}")
        if target < min_values:
            raise ValueError(
                f"{fn}: target_values={target!r} is below min_values={min_values!r} at "
                f"batch_size={b}; lower min_values to aim that low")
        ideal = b * d / float(target)
    ideal = min(ideal, b * d / float(min_values))
    most = max(1, math.floor(b * d / min_values))
    s = math.prod(spatial)
    whole = [g for g in {*_divisors(c), *(c * k for k in _divisors(s))} if g <= most]
    best = min(whole, key=lambda g: (_log_distance(g, ideal), g))
    if allow_straddling and _log_distance(best, ideal) > 1:
        other = min((g for g in _divisors(d) if g <= most),
                    key=lambda g: (_log_distance(g, ideal), g))
        if _log_distance(other, ideal) < _log_distance(best, ideal):
            best = other
    return best


def group_layout(num_features: int, num_groups: int) -> str:
    """How ``num_groups`` groups cut a layer of ``num_features`` channels, in words.

    Example:
        >>> group_layout(64, 16), group_layout(64, 64), group_layout(64, 256), group_layout(6, 4)
        ('4 channels', '1 channel', '4 bands/channel', 'straddling')
    """
    c, g = int(num_features), int(num_groups)
    if c % g == 0:
        return f"{c // g} channel{'s' if c // g > 1 else ''}"
    if g % c == 0:
        return f"{g // c} bands/channel"
    return "straddling"


# -- the layers of a model: what auto_groups chooses, and choosing it -----------------------------

def _batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with batch statistics: torch's BatchNorms and bgnorm's BatchGroupNorms."""
    from .layers import _BatchGroupNorm

    kinds = (nn.modules.batchnorm._BatchNorm, _BatchGroupNorm)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def _norm_input_shapes(
    model: nn.Module, example_input: Tensor | Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """The input shape of every batch-statistics layer of ``model`` (by qualified name) in a
    forward pass of ``example_input`` (a tensor or a shape), found on a copy of the model on
    the meta device (no computation; a copy on the input's device, in eval mode without
    gradients, for models the meta device cannot run). The model itself is left untouched;
    the copy's num_groups="auto" layers choose their G on the way, as in training."""
    import copy

    import torch

    from .layers import _BatchGroupNorm

    if isinstance(example_input, Tensor):
        real = example_input
    else:
        shape = tuple(_as_int(s) for s in example_input)
        if len(shape) < 2 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ValueError(
                "example_input must be a tensor or the shape of one, (b, C, *spatial) with "
                f"every size >= 1; got {example_input!r}")
        dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()),
                     torch.get_default_dtype())
        real = torch.zeros(shape, device="meta", dtype=dtype)  # the dtype the model computes in

    def run(twin: nn.Module, x: Tensor) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}

        def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def record(module: nn.Module, args: tuple[Any, ...]) -> None:
                shape = tuple(int(s) for s in args[0].shape)
                shapes.setdefault(name, shape)
                if isinstance(module, _BatchGroupNorm) and not module.groups_resolved:
                    module._settle_num_groups(module._policy_groups(shape))  # eval needs a G
            return record

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in _batch_norms(twin)]
        try:
            with torch.no_grad():
                twin.eval()(x)
        finally:
            for h in handles:
                h.remove()
        return shapes

    try:
        return run(copy.deepcopy(model).to("meta"), real.to("meta"))
    except (NotImplementedError, RuntimeError, TypeError, ValueError):
        if real.is_meta:
            raise
        return run(copy.deepcopy(model), real)


def resolve_groups(model: nn.Module, example_input: Tensor | Sequence[int]) -> nn.Module:
    """Choose G now for every ``num_groups="auto"`` layer of ``model`` that has none yet, from
    its input in a forward pass of ``example_input`` (a training batch, or its shape: the
    per-worker batch first), without training: what the first training step would choose.

    Use it before ``torch.compile``, ``torch.export`` or wrapping the model in DDP, and to
    evaluate or inspect a model before training. The pass runs on a copy of the model on the
    meta device (or, where the meta device cannot run the model, a copy in eval mode without
    gradients), so parameters, running statistics and modes are untouched; each auto layer gets
    running statistics of G values (mean 0, variance 1, or those of the BatchNorm that
    :func:`bgnorm.convert_norm` replaced by it). Layers the pass does not reach keep waiting for
    their first training input.

    Returns ``model``.

    Example:
        >>> from bgnorm import BatchGroupNorm2d
        >>> net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), BatchGroupNorm2d(64, "auto"))
        >>> _ = resolve_groups(net, (16, 3, 32, 32))
        >>> net[1].num_groups, net[1].running_mean.shape
        (64, torch.Size([64]))
    """
    shapes = _norm_input_shapes(model, example_input)
    for name, layer in _batch_norms(model):
        if name in shapes and getattr(layer, "num_groups", None) == "auto":
            layer._settle_num_groups(layer._policy_groups(shapes[name]))
            layer._carry_pending_stats()
    return model


@dataclass(frozen=True)
class GroupsRow:
    """One layer of a :class:`GroupsReport` (see there)."""

    name: str
    norm: str
    input_shape: tuple[int, ...]
    examples: int
    groups: int
    values: int
    paper_groups: int
    paper_values: int | None
    current_groups: int | None
    current_values: int | None

    @property
    def num_features(self) -> int:
        return self.input_shape[1]

    @property
    def features(self) -> int:
        """D = C * prod(spatial)."""
        return math.prod(self.input_shape[1:])


@dataclass(frozen=True)
class GroupsReport:
    """Per batch-statistics layer of a model: the G :func:`auto_groups` chooses and the G of
    the paper's table, with the values per statistic of each. ``str()`` is a table.
    ``target_values`` is the number auto_groups aimed at (None: the paper's G), ``min_values``
    its floor.

    Built by :func:`groups_report`. Rows (:class:`GroupsRow`) hold the layer's qualified name,
    class and training input shape; ``examples`` (b, the examples one statistic sees);
    ``groups``/``values``: auto_groups' G and its values per statistic b*D/G;
    ``paper_groups``/``paper_values``: ``paper_groups(b)`` and its values (None where it does
    not divide D); ``current_groups``/``current_values``: the layer as it is (BatchNorm: C and
    b*S; BGN: its G; None for an auto layer that has not chosen yet).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))
        >>> report = groups_report(net, (4, 3, 10, 10))
        >>> row = report.rows[0]
        >>> row.input_shape, row.groups, row.values, row.paper_groups, row.current_groups
        ((4, 16, 8, 8), 2, 2048, 2, 16)
    """

    batch_size: int
    target_values: float | None
    min_values: float
    rows: tuple[GroupsRow, ...]

    def __str__(self) -> str:
        head = ["layer", "norm", "C", "spatial", "D", "auto G", "groups of", "values/stat",
                f"paper G ({paper_groups(self.batch_size)})", "values/stat", "now G",
                "values/stat"]
        lines = [head, ["---"] * len(head)]
        for r in self.rows:
            spatial = "x".join(map(str, r.input_shape[2:])) or "-"
            lines.append([
                r.name or "(model)", r.norm, str(r.num_features), spatial, str(r.features),
                str(r.groups), group_layout(r.num_features, r.groups), str(r.values),
                str(r.paper_groups) + ("" if r.paper_values is not None else " (invalid)"),
                "-" if r.paper_values is None else str(r.paper_values),
                "-" if r.current_groups is None else str(r.current_groups),
                "-" if r.current_values is None else str(r.current_values)])
        text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
        floor = f"{self.min_values:g}"
        rule = (f"the paper's G, lowered where a layer would get fewer than {floor} values "
                "per statistic" if self.target_values is None else
                f"aiming at {round(self.target_values)} values per statistic (at least "
                f"{floor})")
        return (f"{text}\n\nbatch b = {self.batch_size} per statistic (per worker); auto G: "
                f"bgnorm.auto_groups, {rule}; paper G: bgnorm.paper_groups({self.batch_size}) "
                f"= {paper_groups(self.batch_size)} on every layer")


def groups_report(
    model: nn.Module,
    example_input: Tensor | Sequence[int],
    *,
    target_values: float | Callable[[int], float] | None = None,
    min_values: float = MIN_VALUES,
    allow_straddling: bool = True,
) -> GroupsReport:
    """What :func:`auto_groups` chooses for each batch-statistics layer of ``model``
    (torch's BatchNorms and bgnorm's BatchGroupNorms, in ``named_modules`` order), beside the
    paper's single G, for a training batch like ``example_input`` (a tensor or its shape; its
    first dimension is the per-worker batch b).

    The layers' input shapes come from one pass on a copy of the model on the meta device
    (see :func:`resolve_groups`); the model is not changed. GBGN layers' statistics see e
    examples, the others b. ``target_values``, ``min_values`` and ``allow_straddling`` go to
    auto_groups.

    Example:
        >>> from bgnorm.repro.models import resnet50
        >>> with torch.device("meta"):
        ...     net = resnet50()
        >>> report = groups_report(net, (8, 3, 224, 224))
        >>> len(report.rows), sum(r.groups == r.paper_groups == 16 for r in report.rows)
        (53, 53)
        >>> print(str(report).splitlines()[2])
        | stem.1 | BatchNorm2d | 64 | 112x112 | 802816 | 16 | 4 channels | 401408 | 16 | 401408 | 64 | 100352 |
    """  # noqa: E501
    from .layers import _BatchGroupNorm

    shapes = _norm_input_shapes(model, example_input)
    rows = []
    batch = None
    for name, layer in _batch_norms(model):
        if name not in shapes:
            continue
        shape = shapes[name]
        b, c, d = shape[0], shape[1], math.prod(shape[1:])
        batch = b if batch is None else batch
        e = getattr(layer, "examples_per_group", None)
        examples = min(b, e) if e else b
        g = auto_groups(c, shape[2:], examples, target_values=target_values,
                        min_values=min_values, allow_straddling=allow_straddling)
        paper = paper_groups(examples)
        current = None
        if isinstance(layer, _BatchGroupNorm):
            current = layer.num_groups if layer.groups_resolved else None
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            current = c
        rows.append(GroupsRow(
            name=name, norm=type(layer).__name__, input_shape=shape, examples=examples,
            groups=g, values=examples * d // g, paper_groups=paper,
            paper_values=examples * d // paper if d % paper == 0 else None,
            current_groups=current,
            current_values=None if current is None or d % current else examples * d // current))
    b = batch if batch is not None else int(
        (example_input.shape if isinstance(example_input, Tensor) else example_input)[0])
    target = None if target_values is None else float(
        target_values(b) if callable(target_values) else target_values)
    return GroupsReport(batch_size=b, target_values=target, min_values=min_values,
                        rows=tuple(rows))
