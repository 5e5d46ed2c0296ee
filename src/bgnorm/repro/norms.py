"""Norm layers for the reproduction suite, built from a cell config.

A :class:`NormSpec` says which normalization a model uses and how the training batch is split
into workers; :func:`build_normed_model` builds any ``norm_layer``-style model (see
:mod:`bgnorm.repro.models`) with it, resolving every layer's group count against that layer's
actual shape.

Virtual workers
---------------
The papers' batch sizes are *per worker* (8 GPUs, statistics computed within each GPU, gradients
averaged). On one device, a batch of ``workers * batch_size`` examples is cut into ``workers``
consecutive slices of ``batch_size`` examples and the batch-dependent norms compute their
statistics per slice (running statistics are the average of the slices' statistics):

=======  ==========================================  =============================================
norm     1 worker                                    W virtual workers of b examples
=======  ==========================================  =============================================
bn       ``torch.nn.BatchNorm2d(C)``                 ``GeneralBatchGroupNorm2d(C, C, b)``
bgn      ``BatchGroupNorm2d(C, G)``                  ``GeneralBatchGroupNorm2d(C, G, b)``
gbgn     ``GeneralBatchGroupNorm2d(C, G, e)``        the same (e divides b, so slices of e never
                                                     cross a worker boundary)
brn      ``BatchRenorm2d(C)``                        ``BatchRenorm2d(C, examples_per_group=b)``
evonorm  ``EvoNorm2dB0(C)``                          ``EvoNorm2dB0(C, examples_per_group=b)``
_b0
gn, ln,  per-example statistics: unaffected by       the same
in, pn,  the split
frn,
evonorm
_s0,
none
=======  ==========================================  =============================================

frn (with its TLU), evonorm_s0 and evonorm_b0 are normalization-activation layers: they replace
a norm and the ReLU after it, so the suite's models (:mod:`bgnorm.repro.models`, see
:func:`~bgnorm.repro.models.includes_activation`) apply no ReLU after them, as in their papers.
``weight_standardization=True`` turns every convolution of the model into a weight-standardized
one (:func:`bgnorm.standardize_weights`), e.g. GN+WS.

The optimizer sees the whole batch (the gradient is averaged over all ``W * b`` examples, as
DDP averages the workers' gradients).

Group counts
------------
BGN/GBGN's G must divide D = C*H*W of every layer, and GN's number of groups must divide C. The
papers' values (chosen for ResNet-50 on 224x224 images) need not fit a small network, so each
layer uses the largest valid value not above the requested one (G > D becomes D; GN's 32 groups
on a 16-channel layer become 16, i.e. InstanceNorm there). :func:`build_normed_model` returns
what every layer actually got, so reports can say so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import bgnorm
from bgnorm.layers import AUTO

__all__ = [
    "BATCH_DEPENDENT",
    "DISPLAY_NAMES",
    "LayerInfo",
    "NormSpec",
    "PER_EXAMPLE",
    "build_normed_model",
    "largest_divisor_at_most",
    "probe_norm_inputs",
]

#: Norms whose statistics depend on other examples of the batch (they see the worker split).
BATCH_DEPENDENT = frozenset({"bn", "bgn", "gbgn", "brn", "evonorm_b0"})
#: Norms computed per example (the batch split does not change them).
PER_EXAMPLE = frozenset({"gn", "ln", "in", "pn", "frn", "evonorm_s0", "none"})
#: How tables name the norms (the papers' abbreviations).
DISPLAY_NAMES = {
    "bn": "BN", "in": "IN", "ln": "LN", "gn": "GN", "pn": "PN", "gbgn": "GBGN", "bgn": "BGN",
    "brn": "BRN", "frn": "FRN", "evonorm_s0": "EvoNorm-S0", "evonorm_b0": "EvoNorm-B0",
    "none": "none",
}


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is ``<= limit`` (at least 1).

    Example:
        >>> largest_divisor_at_most(1024, 512), largest_divisor_at_most(256, 512)
        (512, 256)
        >>> largest_divisor_at_most(3 * 49, 32)
        21
    """
    if n < 1 or limit < 1:
        raise ValueError(f"n and limit must be >= 1, got n={n}, limit={limit}")
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for cand in (d, n // d):
                if best < cand <= limit:
                    best = cand
    return best


@dataclass(frozen=True)
class LayerInfo:
    """What one norm layer of a built model got."""

    index: int
    channels: int
    spatial: tuple[int, ...]
    module: str  # repr of the layer
    requested_groups: int | None = None
    groups: int | None = None

    @property
    def adjusted(self) -> bool:
        """True when the layer's group count differs from the requested one."""
        return self.requested_groups is not None and self.groups != self.requested_groups


@dataclass(frozen=True)
class NormSpec:
    """A normalization and the worker split it runs under.

    Args:
        name: registry name or alias (``bn``, ``bgn``, ``gbgn``, ``gn``, ``ln``, ``in``, ``pn``,
            ``brn``, ``frn``, ``evonorm_s0``, ``evonorm_b0``, ``none``).
        batch_size: per-worker batch size b (the statistics' batch for the batch-dependent
            norms).
        workers: W virtual workers; the training batch has ``W * b`` examples.
        num_groups: BGN/GBGN's G (``None``: :func:`bgnorm.paper_groups` of ``batch_size``;
            ``"auto"``: the per-layer policy :func:`bgnorm.auto_groups` of each layer's C,
            spatial size and the examples one statistic sees, b for BGN and e for GBGN), or
            GN's and EvoNorm-S0's number of groups (``None``: 32, as the GN paper).
        channels_per_group: GN only, instead of ``num_groups`` (the GN paper's second study).
        examples_per_group: GBGN's e, a divisor of ``batch_size`` (``None``: ``batch_size``).
        eps: passed to every layer that has one; ``None`` (default): each layer's default
            (1e-5; 1e-3 for EvoNorm-B0, as timm's).
        momentum: passed to every layer with running statistics.
        weight_standardization: standardize every convolution's weight (GN+WS, BGN+WS, ...).

    Example:
        >>> spec = NormSpec("bn", batch_size=2, workers=8)
        >>> spec.make(16)
        GeneralBatchGroupNorm2d(16, num_groups=16, examples_per_group=2, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """  # noqa: E501

    name: str
    batch_size: int = 32
    workers: int = 1
    num_groups: int | str | None = None
    channels_per_group: int | None = None
    examples_per_group: int | None = None
    eps: float | None = None
    momentum: float | None = 0.1
    weight_standardization: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", bgnorm.canonical_name(self.name))
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError(
                f"batch_size and workers must be >= 1, got {self.batch_size} and {self.workers}"
            )
        if self.name == "gbgn":
            e = self.examples_per_group or self.batch_size
            if self.batch_size % e:
                raise ValueError(
                    f"gbgn: examples_per_group={e} must divide the per-worker batch size "
                    f"{self.batch_size} (so no batch group spans two workers)"
                )
        if self.num_groups == AUTO and self.name not in ("bgn", "gbgn"):
            raise ValueError(f"num_groups='auto' (the per-layer G policy) applies to bgn and "
                             f"gbgn only, not {self.name!r}")
        if self.num_groups is not None and self.channels_per_group is not None:
            raise ValueError("pass num_groups or channels_per_group, not both")
        if self.name == "evonorm_b0" and self.momentum is None:
            raise ValueError("evonorm_b0: momentum must be a number in [0, 1] (EvoNorm-B0 "
                             "keeps no batch count for a cumulative average), got None")
        if self.channels_per_group is not None and self.name != "gn":
            raise ValueError(f"channels_per_group applies to gn only, not {self.name!r}")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NormSpec:
        """The spec of a cell config (keys ``norm``, ``batch_size``, ``workers``,
        ``num_groups``, ``gn_groups``, ``gn_channels_per_group``, ``gbgn_examples``)."""
        name = bgnorm.canonical_name(config["norm"])
        groups = config.get("gn_groups") if name == "gn" else config.get("num_groups")
        return cls(
            name=name,
            batch_size=int(config.get("batch_size", 32)),
            workers=int(config.get("workers", 1)),
            num_groups=None if groups is None else (
                AUTO if groups == AUTO else int(groups)),
            channels_per_group=(
                int(config["gn_channels_per_group"])
                if name == "gn" and config.get("gn_channels_per_group") is not None
                else None
            ),
            examples_per_group=(
                int(config["gbgn_examples"])
                if name == "gbgn" and config.get("gbgn_examples") is not None
                else None
            ),
            weight_standardization=bool(config.get("weight_standardization", False)),
        )

    @property
    def batch_dependent(self) -> bool:
        """True for norms whose statistics span several examples (bn, bgn, gbgn)."""
        return self.name in BATCH_DEPENDENT

    @property
    def total_batch(self) -> int:
        """Examples per optimizer step: ``workers * batch_size``."""
        return self.workers * self.batch_size

    @property
    def auto(self) -> bool:
        """True when every layer's G comes from the per-layer policy (``num_groups="auto"``)."""
        return self.num_groups == AUTO

    @property
    def groups(self) -> int | str | None:
        """The requested group count: G for bgn/gbgn (paper policy by default, ``"auto"``
        for the per-layer policy), GN's and EvoNorm-S0's groups."""
        if self.name in ("bgn", "gbgn"):
            return self.num_groups if self.num_groups is not None else bgnorm.paper_groups(
                self.batch_size)
        if self.name in ("gn", "evonorm_s0"):
            return self.num_groups if self.num_groups is not None else bgnorm.DEFAULT_NUM_GROUPS
        return None

    def describe(self) -> str:
        """A short human description, e.g. ``"BGN(G=16) x 8 workers of 8"``."""
        label = DISPLAY_NAMES.get(self.name, self.name)
        if self.name in ("bgn", "gbgn"):
            label += f"(G={self.groups}"
            if self.name == "gbgn":
                label += f", e={self.examples_per_group or self.batch_size}"
            label += ")"
        elif self.name == "gn":
            label += (f"(C/G={self.channels_per_group})" if self.channels_per_group
                      else f"(G={self.groups})")
        elif self.name == "evonorm_s0":
            label += f"(G={self.groups})"
        if self.weight_standardization:
            label += "+WS"
        if self.batch_dependent and self.workers > 1:
            label += f" x {self.workers} workers of {self.batch_size}"
        return label

    def layer_groups(self, channels: int, spatial: Sequence[int] | None) -> int | None:
        """The group count a layer of ``channels`` x ``spatial`` gets (None: not grouped)."""
        if self.name in ("bgn", "gbgn"):
            if self.auto:
                if spatial is None:
                    raise ValueError(
                        f"{self.describe()}: the per-layer G policy needs each layer's spatial "
                        "size; build the model with build_normed_model(..., input_shape)")
                return bgnorm.auto_groups(channels, tuple(spatial),
                                          self.examples_per_group or self.batch_size)
            g = self.groups
            if spatial is None:
                return g
            return largest_divisor_at_most(channels * math.prod(spatial), g)
        if self.name == "gn":
            if self.channels_per_group is not None:
                return max(1, channels // self.channels_per_group)
            return largest_divisor_at_most(channels, self.groups)
        if self.name == "evonorm_s0":
            return largest_divisor_at_most(channels, self.groups)
        return None

    def make(self, channels: int, spatial: Sequence[int] | None = None) -> nn.Module:
        """The norm layer for ``channels`` (and ``spatial`` = (H, W) when known)."""
        kw: dict[str, Any] = {} if self.eps is None else {"eps": self.eps}
        g = self.layer_groups(channels, spatial)
        name = self.name
        # the batch-dependent norms of bgnorm.small_batch: statistics per worker slice
        split = {"examples_per_group": self.batch_size} if self.workers > 1 else {}
        if name == "brn":
            return bgnorm.BatchRenorm2d(channels, momentum=self.momentum, **kw, **split)
        if name == "evonorm_b0":
            return bgnorm.EvoNorm2dB0(channels, momentum=self.momentum, **kw, **split)
        if name == "evonorm_s0":
            return bgnorm.EvoNorm2dS0(channels, groups=g, **kw)
        if name == "bn":
            if self.workers == 1:
                return nn.BatchNorm2d(channels, momentum=self.momentum, **kw)
            return bgnorm.GeneralBatchGroupNorm2d(
                channels, channels, self.batch_size, momentum=self.momentum, **kw)
        if name == "bgn":
            if self.workers == 1:
                return bgnorm.BatchGroupNorm2d(channels, g, momentum=self.momentum, **kw)
            return bgnorm.GeneralBatchGroupNorm2d(
                channels, g, self.batch_size, momentum=self.momentum, **kw)
        if name == "gbgn":
            e = self.examples_per_group or self.batch_size
            return bgnorm.GeneralBatchGroupNorm2d(channels, g, e, momentum=self.momentum, **kw)
        if name == "gn":
            return nn.GroupNorm(g, channels, **kw)
        if name == "none":
            return nn.Identity()
        return bgnorm.make_norm(name, channels, **kw)

    def factory(self) -> Callable[[int], nn.Module]:
        """A ``norm_layer(channels)`` callable (group counts not checked against shapes)."""
        return self.make


def probe_norm_inputs(
    build: Callable[[Callable[[int], nn.Module]], nn.Module],
    input_shape: Sequence[int],
) -> list[tuple[int, tuple[int, ...]]]:
    """``(channels, spatial)`` of every ``norm_layer`` call of ``build``, in call order.

    ``build(norm_layer)`` is run once on the meta device (no memory, no compute) with identity
    norms, and one example of ``input_shape`` = (C, H, W) is traced through it.
    """
    calls: list[int] = []
    shapes: dict[int, tuple[int, ...]] = {}

    class _Probe(nn.Identity):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.index = len(calls)
            calls.append(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shapes.setdefault(self.index, tuple(x.shape[2:]))
            return x

    with torch.device("meta"):
        model = build(_Probe)
        model.eval()
        with torch.no_grad():
            model(torch.empty(1, *input_shape))
    return [(c, shapes.get(i, ())) for i, c in enumerate(calls)]


def build_normed_model(
    build: Callable[[Callable[[int], nn.Module]], nn.Module],
    spec: NormSpec,
    input_shape: Sequence[int] | None = None,
) -> tuple[nn.Module, list[LayerInfo]]:
    """Build ``build(norm_layer)`` with ``spec``'s norms; returns the model and its layers.

    With ``input_shape`` = (C, H, W) every layer's group count is resolved against its own
    D = C*H*W (see the module docstring); without it the requested counts are used as they are.
    Seed torch's RNG before calling: the model's initialisation draws from it (the probe does
    not).

    Example:
        >>> from bgnorm.repro.models import build_model
        >>> spec = NormSpec("bgn", batch_size=128)  # paper G = 512
        >>> model, layers = build_normed_model(
        ...     lambda nl: build_model("small_resnet", 10, nl, in_channels=1, width=8), spec,
        ...     (1, 8, 8))
        >>> [(l.channels, l.groups) for l in layers][:3]
        [(8, 512), (8, 512), (8, 512)]
        >>> sorted({l.groups for l in layers if l.adjusted})
        [128, 256]
        >>> model, layers = build_normed_model(  # the per-layer policy: G from each layer's D
        ...     lambda nl: build_model("small_resnet", 10, nl, in_channels=1, width=8),
        ...     NormSpec("bgn", batch_size=2, workers=8, num_groups="auto"), (1, 8, 8))
        >>> [(l.channels, l.spatial, l.groups) for l in layers][:2]
        [(8, (8, 8), 1), (8, (8, 8), 1)]
    """
    probed = probe_norm_inputs(build, input_shape) if input_shape is not None else None
    infos: list[LayerInfo] = []

    def norm_layer(channels: int) -> nn.Module:
        i = len(infos)
        spatial = None
        if probed is not None:
            if i >= len(probed) or probed[i][0] != channels:
                raise RuntimeError(
                    "build() called norm_layer in a different order on the probe and on the real "
                    "build; build_normed_model needs a deterministic model constructor"
                )
            spatial = probed[i][1]
        module = spec.make(channels, spatial)
        infos.append(LayerInfo(
            index=i, channels=channels, spatial=tuple(spatial or ()), module=repr(module),
            requested_groups=None if spec.auto else spec.groups,
            groups=spec.layer_groups(channels, spatial),
        ))
        return module

    model = build(norm_layer)
    if spec.weight_standardization:
        model = bgnorm.standardize_weights(model)
    return model, infos
