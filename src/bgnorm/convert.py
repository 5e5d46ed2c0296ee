"""Swap the BatchNorm layers of any model for another norm of the registry."""

from __future__ import annotations

import copy
import fnmatch
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .registry import NORM_ACTIVATIONS, canonical_name, make_norm, with_message

__all__ = ["convert_norm"]

#: torch's own BatchNorm classes: what convert_norm replaces without asking.
_TORCH_BATCHNORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)
_DIMS: dict[type[nn.Module], int] = {
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
    nn.LazyBatchNorm1d: 1, nn.LazyBatchNorm2d: 2, nn.LazyBatchNorm3d: 3,
}
_SUBCLASS_POLICIES = ("error", "skip", "convert")
_RUNNING_STATS_POLICIES = ("derive", "reset")


def _own_class(module: nn.Module) -> type[nn.Module]:
    """The module's class, seen through the class torch.nn.utils.parametrize injects."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def _torch_base(cls: type[nn.Module]) -> type[nn.Module] | None:
    """The nearest of torch's BatchNorm classes among ``cls``'s ancestors (itself included)."""
    return next((k for k in cls.__mro__ if k in _TORCH_BATCHNORMS), None)


def _what_it_adds(module: nn.Module) -> str | None:
    """None for torch's own BatchNorms and for subclasses that behave exactly like them (the
    forward is torch's and there are no submodules, e.g. a renamed class); otherwise what the
    subclass adds, for the error message."""
    cls = _own_class(module)
    base = _torch_base(cls)
    if cls is base:
        return None
    if base is None:
        return f"a subclass of {_BatchNorm.__module__}._BatchNorm, not of torch's BatchNorm " \
            "classes"
    own = cls.__mro__[: cls.__mro__.index(base)]
    adds = []
    forward = next((k for k in own if "forward" in vars(k)), None)
    if forward is not None:
        adds.append(f"its own forward (from {forward.__qualname__})")
    children = [f"{n}={type(c).__name__}" for n, c in module.named_children()
                if n != "parametrizations"]
    if children:
        adds.append("submodules " + ", ".join(children))
    if not adds:
        return None
    return f"a subclass of torch.nn.{base.__name__} with " + " and ".join(adds)


def _matcher(
    module: nn.Module, exclude: Iterable[str | type[nn.Module]]
) -> tuple[list[str], tuple[type[nn.Module], ...]]:
    """Split ``exclude`` into name patterns and classes; a pattern that names no module is an
    error (a typo would otherwise convert what the user meant to keep)."""
    if isinstance(exclude, (str, type)):
        exclude = [exclude]
    names: list[str] = []
    classes: list[type[nn.Module]] = []
    for item in exclude:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            classes.append(item)
        else:
            raise TypeError(
                "convert_norm: exclude= takes module names (qualified, as in "
                "model.named_modules(), shell wildcards allowed) and nn.Module classes, got "
                f"{type(item).__name__} {item!r}"
            )
    paths = [p for p, _ in module.named_modules() if p]
    for pattern in names:
        if not any(_name_matches(p, [pattern]) for p in paths):
            near = [p for p in paths if "." not in p][:8]
            raise ValueError(
                f"convert_norm: exclude={pattern!r} matches no module of the "
                f"{type(module).__name__}; names are qualified as in model.named_modules() "
                f"(top level: {', '.join(near) or 'none'}), shell wildcards (*, ?) allowed"
            )
    return names, tuple(classes)


def _name_matches(path: str, patterns: list[str]) -> bool:
    """A pattern excludes the module it names and everything inside it."""
    return any(fnmatch.fnmatchcase(path, p) or path.startswith(p + ".") for p in patterns)


def _build(
    path: str, bn: _BatchNorm, key: str, kwargs: dict[str, Any], running_stats: str
) -> tuple[nn.Module, str | None]:
    """The replacement of the layer at ``path`` and what happened to its running statistics
    (see _carry_running_stats); errors name the layer, its class and the fix."""
    where = f"layer {path!r}" if path else "the model itself"
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(
            f"convert_norm: {where} is a {type(bn).__name__} that has not been materialized "
            f"yet, so its channel count is unknown; run one forward pass of the model first "
            "(e.g. model(example_input)), which turns it into a BatchNorm with its channel "
            f"count, or build it as {type(bn).__name__.replace('Lazy', '')}(num_features)"
        )
    try:
        new, stats = _replacement(bn, key, kwargs, running_stats)
        _carry_hooks(bn, new)
    except (TypeError, ValueError) as err:
        raise with_message(
            err, f"convert_norm: cannot convert {where} ({type(bn).__name__} with "
            f"num_features={bn.num_features}) to {key!r}: {err}"
        ) from err
    if path:
        # read by the bgnorm layers to name the layer in their errors
        new._bgnorm_path = path  # type: ignore[assignment]
    return new, stats


def _replacement(
    bn: _BatchNorm, key: str, kwargs: dict[str, Any], running_stats: str
) -> tuple[nn.Module, str | None]:
    kw = dict(kwargs)
    base = _torch_base(_own_class(bn))
    if key in ("bn", "bgn", "gbgn", "brn"):
        _choose_class(bn, base, key, kw)
        kw.setdefault("momentum", bn.momentum)
        kw.setdefault("track_running_stats", bn.track_running_stats)
    if key != "none":
        kw.setdefault("eps", bn.eps)
        kw.setdefault("affine", bn.affine)
        if bn.affine and bn.bias is None:  # torch's BatchNorm(..., bias=False)
            kw.setdefault("bias", False)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    if ref is not None and key != "none":
        kw.setdefault("device", ref.device)
        kw.setdefault("dtype", ref.dtype)
    new = make_norm(key, bn.num_features, **kw)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old, cur = getattr(bn, name, None), getattr(new, name, None)
            if isinstance(old, nn.Parameter) and isinstance(cur, nn.Parameter):
                cur.copy_(old)
                cur.requires_grad_(old.requires_grad)
        stats = _carry_running_stats(bn, new, running_stats)
    _carry_parametrizations(bn, new)
    new.train(bn.training)
    return new, stats


def _carry_running_stats(bn: _BatchNorm, new: nn.Module, policy: str) -> str | None:
    """Give ``new`` running statistics from ``bn``'s. Copied where they mean the same thing
    (same shape: G = C); otherwise, with ``policy="derive"``, estimated from the per-channel
    ones where the groups allow it (returns "derived"), else left at mean 0 / variance 1
    (returns "reset"). None: copied, or nothing to carry."""
    old_mean, old_var = bn.running_mean, bn.running_var
    mean, var = getattr(new, "running_mean", None), getattr(new, "running_var", None)
    if getattr(new, "num_groups", None) == "auto":
        # no G yet: the layer carries them over (as below) when it chooses its G
        if isinstance(old_mean, torch.Tensor) and isinstance(old_var, torch.Tensor):
            count = bn.num_batches_tracked
            new._pending_channel_stats = (  # type: ignore[assignment]
                old_mean.detach().clone(), old_var.detach().clone(),
                None if count is None else count.detach().clone(), policy)
        return None
    if not (isinstance(old_mean, torch.Tensor) and isinstance(old_var, torch.Tensor)
            and isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)):
        return None  # one side keeps no statistics
    if mean.shape == old_mean.shape:
        stats: tuple[torch.Tensor, torch.Tensor] | None = (old_mean, old_var)
        outcome = None
    elif policy == "derive":
        stats = _group_statistics(old_mean, old_var, mean.numel())
        outcome = "reset" if stats is None else "derived"
    else:
        return None  # reset, as asked
    if stats is not None:
        mean.copy_(stats[0])
        var.copy_(stats[1])
        count = getattr(new, "num_batches_tracked", None)
        if isinstance(count, torch.Tensor) and isinstance(bn.num_batches_tracked, torch.Tensor):
            count.copy_(bn.num_batches_tracked)
    return outcome


def _group_statistics(
    channel_mean: torch.Tensor, channel_var: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    r"""Estimates of the running statistics of ``groups`` groups from per-channel ones.

    Groups of k = C/G whole channels (every channel has the same count of values per batch):
    :math:`\mu_g = \frac1k \sum_{c \in g} \mu_c` and
    :math:`\sigma^2_g = \frac1k \sum_{c \in g} (\sigma^2_c + (\mu_c - \mu_g)^2)`, an identity
    for the mean and variance of a population that is the union of the channels' populations
    (exact for biased variances). As an estimate of BGN's running statistics it is exact for
    the mean (the running mean is linear in the batch means), approximate for the variance:
    BatchNorm's running variance is an average of unbiased batch variances (factor n/(n-1),
    n unknown here), and the spread term uses the average channel means, so it leaves out the
    batch-to-batch fluctuation of the channel means about their group mean.

    Bands (G = kC, k contiguous bands per channel): each band gets its channel's statistics,
    which assumes the statistics do not depend on the position within the channel.

    None when groups straddle channels: which channels a group covers depends on the spatial
    size, unknown here.
    """
    c = channel_mean.numel()
    mean, var = channel_mean.double(), channel_var.double()
    if c % groups == 0:
        mean, var = mean.view(groups, c // groups), var.view(groups, c // groups)
        group_mean = mean.mean(dim=1)
        spread = (mean - group_mean[:, None]).square().mean(dim=1)
        return group_mean, var.mean(dim=1) + spread
    if groups % c == 0:
        return mean.repeat_interleave(groups // c), var.repeat_interleave(groups // c)
    return None


def _choose_class(bn: _BatchNorm, base: type | None, key: str, kw: dict[str, Any]) -> None:
    """Set ``dim``/``sync`` in ``kw``: BatchNorm1d/2d/3d keep their dimension; SyncBatchNorm,
    which takes input of any dimension, becomes the synchronized layer of bn/bgn (that takes
    any dimension too) with its process group, or the per-worker layer of the given ``dim``."""
    if kw.get("sync"):
        kw.pop("dim", None)  # the synchronized layers take any dimension
    elif base in _DIMS:
        kw["dim"] = _DIMS[base]
    elif "dim" not in kw:  # SyncBatchNorm, or a _BatchNorm subclass of no fixed dimension
        if key == "gbgn" or "sync" in kw or not isinstance(bn, nn.SyncBatchNorm):
            raise ValueError(
                f"{type(bn).__name__} has no fixed input dimension, and the {key!r} layers "
                "without synchronization have one class per dimension"
                + (" (gbgn has no synchronized variant)" if key == "gbgn" else "")
                + ": pass dim=1, 2 or 3 for the dimension of this layer's input (1: (N, C) "
                "or (N, C, L); 2: (N, C, H, W); 3: (N, C, D, H, W))"
            )
        kw["sync"] = True
    if kw.get("sync") and isinstance(bn, nn.SyncBatchNorm):
        kw.setdefault("process_group", bn.process_group)


def _carry_parametrizations(bn: nn.Module, new: nn.Module) -> None:
    """Re-register ``bn``'s parametrizations (torch.nn.utils.parametrize) on ``new``: a copy of
    each parametrization list, with its unconstrained original tensor(s), so the effective
    gamma/beta and what the optimizer trains stay the same."""
    if not parametrize.is_parametrized(bn):
        return
    for tensor_name, plist in bn.parametrizations.items():  # type: ignore[union-attr]
        current = getattr(new, tensor_name, None)
        if current is None:
            continue  # the new layer has no such tensor (asked for: affine=False, "none")
        effective = getattr(bn, tensor_name)
        if not isinstance(current, torch.Tensor) or current.shape != effective.shape:
            raise ValueError(
                f"the parametrization of {tensor_name!r} (shape {tuple(effective.shape)}) "
                f"cannot carry over to the new {type(new).__name__}, whose {tensor_name} has "
                f"shape {tuple(getattr(current, 'shape', ()))}; remove it first with "
                f"torch.nn.utils.parametrize.remove_parametrizations(layer, {tensor_name!r})"
            )
        # Registering a no-op creates the machinery (parametrized class, property, the list);
        # the copied list then replaces the no-op's.
        parametrize.register_parametrization(new, tensor_name, nn.Identity(), unsafe=True)
        carried = copy.deepcopy(plist).to(device=current.device, dtype=current.dtype)
        new.parametrizations[tensor_name] = carried  # type: ignore[index]


#: The hook dicts of an nn.Module: carried over to the new layer.
_HOOKS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _carry_hooks(bn: nn.Module, new: nn.Module) -> None:
    """Move ``bn``'s hooks (forward, backward, state dict) to ``new``: the dicts themselves, so
    the handles returned when they were registered still remove them. Hooks that hold the old
    layer (load-state-dict pre-hooks registered with the module) are pointed at the new one."""
    for hook in bn._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            fn = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            raise ValueError(
                f"its {hook.name!r} is reparametrized by torch.nn.utils.{fn} (hooks that "
                f"do not carry over); remove it first (torch.nn.utils.remove_{fn}(layer)), or "
                f"use torch.nn.utils.parametrizations.{fn}, which convert_norm carries over"
            )
    if not any(getattr(bn, name) for name in _HOOKS):
        return
    for name in _HOOKS:
        setattr(new, name, getattr(bn, name))
    new._is_full_backward_hook = bn._is_full_backward_hook
    for hook in new._load_state_dict_pre_hooks.values():
        if getattr(hook, "with_module", False) and hook.module() is bn:
            hook.module = weakref.ref(new)


def _warn_statistics(in_eval: dict[str, list[str]]) -> None:
    """Eval-mode layers whose statistics could not be copied: their outputs change at once."""
    derived, reset = in_eval["derived"], in_eval["reset"]
    parts = []
    if derived:
        parts.append(
            f"  estimated from BatchNorm's ({', '.join(derived)}): exact group means; group "
            "variances approximated by the mean channel variance plus the spread of the "
            "channel means"
        )
    if reset:
        parts.append(
            f"  reset to mean 0, variance 1 ({', '.join(reset)}): their groups straddle "
            "channels, so which channels a group covers depends on the input size"
        )
    warnings.warn(
        f"convert_norm: {len(derived) + len(reset)} converted layer(s) are in eval mode with "
        "num_groups != num_features, where BatchNorm's per-channel running statistics cannot "
        "be copied as they are. Their running statistics were:\n" + "\n".join(parts) + "\n"
        "Eval outputs of these layers change at once. Re-estimate their statistics before "
        "evaluating: model.train(), forward passes over some hundred training batches under "
        "torch.no_grad() (momentum=None on these layers gives an exact average over those "
        "batches), then model.eval()",
        UserWarning,
        stacklevel=3,
    )


def convert_norm(
    module: nn.Module,
    name: str,
    *,
    subclasses: str = "error",
    exclude: Iterable[str | type[nn.Module]] = (),
    running_stats: str = "derive",
    **kwargs: Any,
) -> nn.Module:
    r"""Replace every BatchNorm of ``module`` by ``make_norm(name, num_features, **kwargs)``.

    Keyword arguments go to :func:`bgnorm.make_norm` (``num_groups``, ``examples_per_group``,
    ...); their values may be callables of ``num_features`` (``num_groups=lambda c: c // 16``,
    :func:`bgnorm.channel_groups`). ``num_groups="auto"`` (bgn, gbgn) gives each layer the G
    of :func:`bgnorm.auto_groups` for its own size, chosen from its first training input (or
    by :func:`bgnorm.resolve_groups`); BatchNorm's running statistics are carried over (as
    below, by ``running_stats``) when G is chosen, and are lost if the model is saved before.
    Unless given there, each new layer takes the old one's
    ``eps``, ``affine``, ``bias=False`` (a BatchNorm without beta gives a layer without beta),
    device and dtype, and for bn/bgn/gbgn/brn its ``momentum`` and ``track_running_stats``. It
    keeps
    the old layer's training mode, gamma and beta (values and ``requires_grad``; a gamma or beta
    under ``torch.nn.utils.parametrize`` keeps its parametrizations and unconstrained tensors)
    and hooks (forward, backward and state-dict hooks move over; their handles still remove
    them). A BatchNorm under the hook-based ``torch.nn.utils.weight_norm``/``spectral_norm``
    raises: remove it first or use ``torch.nn.utils.parametrizations``.

    Which layers: torch's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and the lazy variants (once
    materialized by a forward pass), and subclasses that behave exactly like them (torch's
    forward, no submodules: e.g. a class that only renames BatchNorm2d). A subclass with its
    own ``forward`` or with submodules (timm's ``BatchNormAct2d``: BatchNorm, then dropout and
    activation submodules) would lose what it adds, so ``subclasses`` decides:

    * ``"error"`` (default): raise, listing every such layer with its path and class;
    * ``"skip"``: leave them as they are (they keep BatchNorm's statistics);
    * ``"convert"``: replace them by the plain norm anyway; what their forward added (e.g. an
      activation) is lost, so add it back yourself.

    ``exclude`` leaves modules alone: qualified names as in ``model.named_modules()`` (a name
    excludes that module and everything inside it; shell wildcards such as ``"layer4.*"``
    allowed; a name that matches no module raises) and ``nn.Module`` classes (any instance).

    Dimensions: BatchNorm1d/2d/3d become the 1d/2d/3d class of bn/bgn/gbgn. SyncBatchNorm,
    which takes input of any dimension, becomes the synchronized layer of bn and bgn
    (``torch.nn.SyncBatchNorm``, :class:`bgnorm.SyncBatchGroupNorm`, with its process group),
    which takes any dimension too; ``dim=1``, ``2`` or ``3`` makes it the per-worker layer of
    that dimension instead (``dim=`` applies to SyncBatchNorm layers only; gbgn, which has no
    synchronized variant, needs it). ``sync=True`` makes every converted bn/bgn synchronized.

    Batch Renormalization (``"brn"``, ``r_max=``/``d_max=`` keywords) keeps BatchNorm's
    parameters and running statistics as they are (the same (C,) statistics, the same eval), so
    a trained BatchNorm model converts and fine-tunes with BRN. The normalization-activation
    layers (``"frn"``, ``"evonorm_s0"``, ``"evonorm_b0"``) are refused: they replace a norm *and*
    the activation after it, which convert_norm cannot see, so the model's ReLU would follow
    them; build the model with them instead.

    Running statistics are copied where they keep their meaning (same shape: G = C). With
    G != C, ``running_stats`` decides. ``"derive"`` (default) estimates the (G,) statistics from
    the per-channel ones: a group of whole channels gets the mean of their running means
    (exact) and the mean of their running variances plus the spread of their means,
    :math:`\sigma^2_g = \frac1k \sum_{c \in g} (\sigma^2_c + (\mu_c - \mu_g)^2)` (an
    approximation); a band inside a channel gets that channel's statistics; groups that
    straddle channels (their layout depends on the input size) start from mean 0 and variance
    1. ``"reset"``: every such layer starts from mean 0 and variance 1. Layers left in eval
    mode with derived or reset statistics make convert_norm warn, naming them: their outputs
    change at once; re-estimate the statistics with training-mode forward passes over some
    training batches before evaluating.

    Returns the converted model: ``module`` itself, modified in place, or a new module when the
    root is a BatchNorm. Warns when there is nothing to convert. Errors name the layer (its
    qualified name, class and channel count) and the fix, and leave the model untouched (every
    replacement is built before any is swapped in). A layer shared by several parents stays one
    layer. Each new layer records its qualified name in the attribute ``_bgnorm_path``, which
    bgnorm's layers use to name themselves in their errors.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = convert_norm(net, "bgn", num_groups=4)
        >>> type(net[1]).__name__
        'BatchGroupNorm2d'
    """
    key = canonical_name(name)
    if key in NORM_ACTIVATIONS:
        raise ValueError(
            f"convert_norm: {key!r} is a normalization-activation layer: it replaces a norm and "
            "the activation after it (e.g. BatchNorm2d + ReLU), but convert_norm swaps the "
            "norms only, so the model's ReLU would stay after it and the result would not be "
            f"the paper's layer. Build the model with norm_layer=functools.partial("
            f"bgnorm.make_norm, {key!r}) and no activation after its norms (or remove those "
            "activations yourself)")
    if subclasses not in _SUBCLASS_POLICIES:
        raise ValueError(
            f"convert_norm: subclasses must be one of {', '.join(map(repr, _SUBCLASS_POLICIES))},"
            f" got {subclasses!r}"
        )
    if running_stats not in _RUNNING_STATS_POLICIES:
        raise ValueError(
            "convert_norm: running_stats must be one of "
            f"{', '.join(map(repr, _RUNNING_STATS_POLICIES))}, got {running_stats!r}"
        )
    names, classes = _matcher(module, exclude)

    # Plan first (which layers, each checked), build every replacement, then swap: an error
    # leaves the model untouched.
    targets: list[tuple[str, nn.Module | None, str, _BatchNorm]] = []
    custom: list[tuple[str, _BatchNorm, str]] = []
    left_alone = 0  # BatchNorms excluded or skipped

    def visit(path: str, parent: nn.Module | None, attr: str, child: nn.Module) -> None:
        nonlocal left_alone
        if (path and _name_matches(path, names)) or isinstance(child, classes):
            left_alone += sum(isinstance(m, _BatchNorm) for m in child.modules())
            return
        if isinstance(child, _BatchNorm):
            adds = _what_it_adds(child)
            if adds is not None:
                if subclasses == "error":
                    custom.append((path, child, adds))
                if subclasses != "convert":
                    left_alone += 1
                    return
            targets.append((path, parent, attr, child))
            return
        for child_name, grandchild in child.named_children():
            visit(f"{path}.{child_name}" if path else child_name, child, child_name, grandchild)

    visit("", None, "", module)
    if custom:
        lines = "\n".join(
            f"  {path or '(the model itself)'}: {type(m).__name__}, {adds}"
            for path, m, adds in custom
        )
        raise TypeError(
            f"convert_norm: {len(custom)} BatchNorm layer(s) of another class than torch's "
            f"would lose what their class adds if replaced by a plain {key!r} norm:\n{lines}\n"
            "Pass subclasses='skip' to leave such layers as they are, subclasses='convert' to "
            "replace them anyway (then add what they did, e.g. their activation, back "
            "yourself), or exclude=[names or classes] to leave out some of them"
        )
    new_of: dict[int, nn.Module] = {}  # a layer shared by several parents stays shared
    in_eval: dict[str, list[str]] = {"derived": [], "reset": []}
    for path, _, _, bn in targets:
        if id(bn) not in new_of:
            new, stats = _build(path, bn, key, kwargs, running_stats)
            new_of[id(bn)] = new
            if stats is not None and not new.training:
                in_eval[stats].append(path or "(the model itself)")
    if in_eval["derived"] or in_eval["reset"]:
        _warn_statistics(in_eval)
    for _, parent, attr, bn in targets:
        if parent is None:
            return new_of[id(bn)]
        setattr(parent, attr, new_of[id(bn)])
    if not targets:
        why = f" ({left_alone} excluded or skipped)" if left_alone else ""
        warnings.warn(
            f"convert_norm: {type(module).__name__} has no BatchNorm layer to convert to "
            f"{key!r}{why}; the model is returned unchanged",
            stacklevel=2,
        )
    return module
