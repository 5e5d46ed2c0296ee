"""A flat name -> norm-layer registry, so any norm drops into any model.

``make_norm(name, num_features, **kwargs)`` always takes the channel count first, so
``functools.partial(make_norm, "bgn", num_groups=G)`` is a ``norm_layer`` for any model that calls
``norm_layer(channels)``.

==========  ============================================================  ====================
name        layer                                                         statistics
==========  ============================================================  ====================
bn          torch.nn.BatchNorm{dim}d; sync=True: torch.nn.SyncBatchNorm   (C,) over N, H, W
bgn         bgnorm.BatchGroupNorm{dim}d(C, num_groups);                   (G,) over N and D/G
            sync=True: bgnorm.SyncBatchGroupNorm(C, num_groups)
gbgn        bgnorm.GeneralBatchGroupNorm{dim}d(C, G, examples_per_group)  (N/e, G)
gn          torch.nn.GroupNorm(G, C), G = 32 by default                   (N, G)
ln          torch.nn.GroupNorm(1, C): one group over C, H, W              (N,)
in          torch.nn.GroupNorm(C, C): one group per channel               (N, C)
pn          bgnorm.PositionalNorm(C)                                      (N, H*W) over C
brn         bgnorm.BatchRenorm{dim}d(C), r_max=3, d_max=5                 (C,), renormalized
frn         bgnorm.FilterResponseNorm{dim}d(C): FRN + TLU                 (N, C), mean square
evonorm_s0  bgnorm.EvoNorm2dS0(C, groups), groups as gn's                 (N, G)
evonorm_b0  bgnorm.EvoNorm2dB0(C)                                         (C,) and (N, C)
none        torch.nn.Identity()                                           -
==========  ============================================================  ====================

bn, gn, ln and in are torch's own layers, configured as the GN and BGN papers use them in CNNs
(per-channel affine everywhere). ``dim`` (1, 2 or 3; default 2) picks the class of bn, bgn,
gbgn, brn and frn (the EvoNorms are 2d only, as timm's); ``sync=True`` gives the synchronized
layers of bn and bgn, which take input of any dimension (statistics over the process group in
training; without one, the per-worker layer).

frn, evonorm_s0 and evonorm_b0 are normalization-activation layers (see
:mod:`bgnorm.small_batch`): they replace a norm and the ReLU after it. Weight Standardization
is a transform of the convolutions, :func:`bgnorm.standardize_weights`, used with any norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ._checks import check_num_features, check_num_groups, nearby_divisors
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
from .policy import _as_int
from .small_batch import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
)

__all__ = ["make_norm", "norm_names", "canonical_name", "NORM_ALIASES"]

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_BGN = {1: BatchGroupNorm1d, 2: BatchGroupNorm2d, 3: BatchGroupNorm3d}
_GBGN = {1: GeneralBatchGroupNorm1d, 2: GeneralBatchGroupNorm2d, 3: GeneralBatchGroupNorm3d}
_BRN = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
_FRN = {1: FilterResponseNorm1d, 2: FilterResponseNorm2d, 3: FilterResponseNorm3d}


def _resolve(value: Any, num_features: int) -> Any:
    # integers of other types (numpy.int64...) become ints, as torch's layers accept them
    return _as_int(value(num_features) if callable(value) else value)


def _pick_dim(name: str, kwargs: dict[str, Any]) -> int:
    dim = kwargs.pop("dim", 2)
    if isinstance(dim, bool) or dim not in (1, 2, 3):
        raise ValueError(f"make_norm({name!r}): dim must be 1, 2 or 3, got {dim!r}")
    return dim


def _bn(c: int, **kw: Any) -> nn.Module:
    return _BN[_pick_dim("bn", kw)](c, **kw)


def _bgn(c: int, **kw: Any) -> nn.Module:
    cls = _BGN[_pick_dim("bgn", kw)]
    return cls(c, **kw)


def _gbgn(c: int, **kw: Any) -> nn.Module:
    if "examples_per_group" not in kw:
        raise TypeError(
            "make_norm('gbgn') needs examples_per_group=e (examples per batch group); "
            "e.g. make_norm('gbgn', C, num_groups=32, examples_per_group=4)"
        )
    kw.setdefault("num_groups", DEFAULT_NUM_GROUPS)
    cls = _GBGN[_pick_dim("gbgn", kw)]
    return cls(c, **kw)


def _no_dim(name: str, layer: str, kw: dict[str, Any]) -> None:
    if "dim" in kw:
        raise TypeError(
            f"make_norm({name!r}, sync=True) builds {layer}, which takes input of any dimension "
            f"(N, C, *): drop dim={kw['dim']!r}, or pass sync=False for the per-worker layer of "
            "that dimension"
        )


def _sync_bn(c: int, **kw: Any) -> nn.Module:
    _no_dim("bn", "torch.nn.SyncBatchNorm", kw)
    return nn.SyncBatchNorm(c, **kw)


def _sync_bgn(c: int, **kw: Any) -> nn.Module:
    _no_dim("bgn", "bgnorm.SyncBatchGroupNorm", kw)
    return SyncBatchGroupNorm(c, **kw)


def _gn_groups(c: int, kw: dict[str, Any]) -> int:
    if "channels_per_group" in kw:
        if "num_groups" in kw:
            raise TypeError("make_norm('gn'): pass num_groups or channels_per_group, not both")
        cpg = check_num_groups(kw.pop("channels_per_group"), "channels_per_group")
        if c % cpg:
            raise ValueError(
                f"make_norm('gn'): channels_per_group={cpg} must divide num_features={c}; "
                f"nearby valid values: {', '.join(map(str, nearby_divisors(c, cpg)))}"
            )
        return c // cpg
    if "num_groups" not in kw:
        # 32 groups as in the GN paper; layers with fewer channels (or C not divisible by 32)
        # use the largest divisor of C not above 32.
        return max(d for d in range(1, min(DEFAULT_NUM_GROUPS, c) + 1) if c % d == 0)
    g = check_num_groups(kw.pop("num_groups"))
    if c % g:
        raise ValueError(
            f"make_norm('gn'): num_groups={g} must divide num_features={c} for GroupNorm; "
            f"nearby valid values: {', '.join(map(str, nearby_divisors(c, g)))}"
        )
    return g


def _gn(c: int, **kw: Any) -> nn.Module:
    g = _gn_groups(c, kw)
    return nn.GroupNorm(g, c, **kw)


def _ln(c: int, **kw: Any) -> nn.Module:
    return nn.GroupNorm(1, c, **kw)


def _in(c: int, **kw: Any) -> nn.Module:
    return nn.GroupNorm(c, c, **kw)


def _pn(c: int, **kw: Any) -> nn.Module:
    return PositionalNorm(c, **kw)


def _brn(c: int, **kw: Any) -> nn.Module:
    return _BRN[_pick_dim("brn", kw)](c, **kw)


def _frn(c: int, **kw: Any) -> nn.Module:
    return _FRN[_pick_dim("frn", kw)](c, **kw)


def _only_2d(name: str, kw: dict[str, Any]) -> None:
    dim = kw.pop("dim", 2)
    if isinstance(dim, bool) or dim != 2:
        raise ValueError(
            f"make_norm({name!r}): dim must be 2, got {dim!r}; EvoNorm is defined here for "
            "(N, C, H, W) input only (as timm's EvoNorm2dS0/B0)")


def _evonorm_s0(c: int, **kw: Any) -> nn.Module:
    _only_2d("evonorm_s0", kw)
    if "num_groups" in kw:  # the registry's name for G; timm's layer calls it groups
        if "groups" in kw:
            raise TypeError("make_norm('evonorm_s0'): pass num_groups or groups, not both")
        kw["groups"] = kw.pop("num_groups")
    if "groups" not in kw and kw.get("group_size") is None:
        # as gn: 32 groups, or the largest divisor of C below 32
        kw["groups"] = max(d for d in range(1, min(DEFAULT_NUM_GROUPS, c) + 1) if c % d == 0)
    return EvoNorm2dS0(c, **kw)


def _evonorm_b0(c: int, **kw: Any) -> nn.Module:
    _only_2d("evonorm_b0", kw)
    return EvoNorm2dB0(c, **kw)


def _none(c: int, **kw: Any) -> nn.Module:
    return nn.Identity()


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "bn": _bn, "bgn": _bgn, "gbgn": _gbgn, "gn": _gn, "ln": _ln, "in": _in, "pn": _pn,
    "brn": _brn, "frn": _frn, "evonorm_s0": _evonorm_s0, "evonorm_b0": _evonorm_b0,
    "none": _none,
}
#: Normalization-activation layers: they replace a norm *and* the activation after it.
NORM_ACTIVATIONS = frozenset({"frn", "evonorm_s0", "evonorm_b0"})
_SYNC_FACTORIES: dict[str, Callable[..., nn.Module]] = {"bn": _sync_bn, "bgn": _sync_bgn}

#: Readable aliases (matched after lower-casing and removing "_", "-" and spaces), mapped to
#: the canonical names of :func:`norm_names`.
NORM_ALIASES: dict[str, str] = {
    "batchnorm": "bn", "batchnorm2d": "bn", "batchgroupnorm": "bgn",
    "generalbatchgroupnorm": "gbgn", "groupnorm": "gn", "layernorm": "ln",
    "instancenorm": "in", "positionalnorm": "pn", "pono": "pn", "identity": "none",
    "nonorm": "none", "batchrenorm": "brn", "batchrenormalization": "brn",
    "filterresponsenorm": "frn", "filterresponsenormalization": "frn", "frntlu": "frn",
    "filterresponsenormtlu": "frn",
    "filterresponsenormtlu2d": "frn", "evonorms0": "evonorm_s0", "evonorm2ds0": "evonorm_s0",
    "evonormb0": "evonorm_b0", "evonorm2db0": "evonorm_b0",
}


def norm_names() -> list[str]:
    """The canonical registry names, in the order of the table above.

    Example:
        >>> norm_names()  # doctest: +NORMALIZE_WHITESPACE
        ['bn', 'bgn', 'gbgn', 'gn', 'ln', 'in', 'pn', 'brn', 'frn', 'evonorm_s0',
         'evonorm_b0', 'none']
    """
    return list(_FACTORIES)


def canonical_name(name: str) -> str:
    """Map a name or alias (any case, with or without ``_``/``-``) to its canonical name.

    Raises ``ValueError`` listing the valid names and aliases for an unknown name.

    Example:
        >>> canonical_name("Batch_Group_Norm"), canonical_name("PONO"), canonical_name("bn")
        ('bgn', 'pn', 'bn')
        >>> canonical_name("EvoNorm-B0"), canonical_name("FilterResponseNormTlu2d")
        ('evonorm_b0', 'frn')
    """
    if not isinstance(name, str):
        raise TypeError(f"norm name must be a str, got {type(name).__name__}")
    key = name.lower().replace("_", "").replace("-", "").replace(" ", "")
    key = NORM_ALIASES.get(key, key)
    key = {k.replace("_", ""): k for k in _FACTORIES}.get(key.replace("_", ""), key)
    if key not in _FACTORIES:
        raise ValueError(
            f"unknown norm {name!r}; valid names: {', '.join(_FACTORIES)} "
            f"(aliases: {', '.join(sorted(NORM_ALIASES))})"
        )
    return key


def make_norm(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the norm layer called ``name`` for ``num_features`` channels.

    Keyword arguments go to the layer (``num_groups``, ``eps``, ``momentum``, ``affine``,
    ``bias`` (False: no beta, like torch's ``bias=False``), ``device``, ``dtype``,
    ``process_group``...); ``dim`` (1, 2 or 3, default 2) picks the 1d/2d/3d class of bn, bgn
    and gbgn; ``sync=True`` builds torch.nn.SyncBatchNorm (bn) or bgnorm.SyncBatchGroupNorm
    (bgn), which take any input dimension. Any keyword value may be a callable of
    ``num_features`` (e.g. ``num_groups=lambda c: c // 4``), resolved here; an error of the
    layer then says which callable returned the bad value. Integers of other types
    (``numpy.int64``) are accepted like ints, as torch's layers accept them.

    Example:
        >>> import functools
        >>> norm_layer = functools.partial(make_norm, "bgn", num_groups=16)
        >>> norm_layer(64)
        BatchGroupNorm2d(64, num_groups=16, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """  # noqa: E501
    key = canonical_name(name)
    num_features = check_num_features(_as_int(num_features))
    kw = {k: _resolve(v, num_features) for k, v in kwargs.items()}
    sync = kw.pop("sync", False)
    if not isinstance(sync, bool):
        raise TypeError(f"make_norm({key!r}): sync must be True or False, got {sync!r}")
    if sync and key not in _SYNC_FACTORIES:
        raise ValueError(
            f"make_norm({key!r}): sync=True exists for bn (torch.nn.SyncBatchNorm) and bgn "
            "(bgnorm.SyncBatchGroupNorm) only; "
            + ("gbgn's statistics are per batch group by design" if key == "gbgn" else
               f"{key!r} has no synchronized variant (its statistics are per worker)"
               if key in ("brn", "evonorm_b0") else
               f"{key!r} has no batch statistics to synchronize")
        )
    factory = _SYNC_FACTORIES[key] if sync else _FACTORIES[key]
    try:
        return factory(num_features, **kw)
    except (TypeError, ValueError) as err:
        resolved = [k for k, v in kwargs.items() if callable(v)]
        if not resolved:
            raise
        origin = ", ".join(
            f"{k}={kw[k]!r} was returned by the callable "
            f"{getattr(kwargs[k], '__qualname__', repr(kwargs[k]))}({num_features})"
            for k in resolved
        )
        raise with_message(err, f"{err} ({origin})") from err


def with_message(err: Exception, message: str) -> Exception:
    """An exception of ``err``'s type with another message (for context added on the way up);
    a ValueError or TypeError when that type cannot be built from a message."""
    try:
        new = type(err)(message)
    except Exception:
        new = (TypeError if isinstance(err, TypeError) else ValueError)(message)
    return new
