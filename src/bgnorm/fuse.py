r"""Inference folding: an eval-mode norm after a conv or linear layer folded into its weights.

In eval mode BatchNorm, and BatchGroupNorm whose groups are whole channels (C a multiple of G,
G = C included), normalize with constant running statistics, so each channel c gets a fixed
affine map. With :math:`g(c) = \lfloor c / (C/G) \rfloor` the group of channel c,

.. math::
    s_c = \gamma_c / \sqrt{\hat\sigma^2_{g(c)} + \epsilon}, \qquad
    t_c = \beta_c - \hat\mu_{g(c)} s_c, \qquad y_c = s_c x_c + t_c,

and a conv or linear layer producing x folds it exactly: output channel c's weights are scaled
by :math:`s_c` and its bias becomes :math:`s_c b_c + t_c`. The norm is then replaced by
``nn.Identity``. Bands (G a multiple of C) and groups that straddle channels are a different
affine per *position* and do not fold; neither do norms with per-example statistics (GroupNorm,
LayerNorm, InstanceNorm, PositionalNorm) nor the normalization-activation layers of
:mod:`bgnorm.small_batch` (FilterResponseNorm1d/2d/3d, EvoNorm2dS0, EvoNorm2dB0: per-example
statistics and a nonlinearity, in eval mode too). They are left in place and reported.

Folded norms: BatchNorm1d/2d/3d and SyncBatchNorm, BatchGroupNorm1d/2d/3d,
GeneralBatchGroupNorm2d (its eval mode uses the (G,) running statistics like BGN),
SyncBatchGroupNorm, BatchRenorm1d/2d/3d (whose eval mode is BatchNorm's, with its running
statistics) and the frozen forms of :mod:`bgnorm.frozen`; into Conv1d/2d/3d (any ``groups``,
any padding mode), ConvTranspose1d/2d/3d (any ``groups``), Linear and the weight-standardized
StdConv1d/2d/3d of :mod:`bgnorm.weight_std`. A StdConv computes a conv with the fixed weights
:math:`\hat W` (its standardized weights) at inference; folding scales :math:`\hat W`, which
a StdConv would standardize again, so the folded layer is torch's Conv1d/2d/3d with the
weights :math:`s_c \hat W_c` (same arguments, the same parameter tensors, new values).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from .distributed import SyncBatchGroupNorm
from .layers import PositionalNorm, _BatchGroupNorm
from .small_batch import EvoNorm2dB0, EvoNorm2dS0, _BatchRenorm, _FilterResponseNorm
from .weight_std import StdConv1d, StdConv2d, StdConv3d, _StdConvMixin, standardize

__all__ = ["FuseReport", "fuse_conv_norm", "fuse_conv_norm_pair"]

# Layers a norm folds into: only torch's own forward (a subclass with another forward, e.g. a
# weight-standardized conv, computes something else from the same weights).
_FOLD_INTO = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
# Weight-standardized convs: a conv with fixed (standardized) weights at inference; the folded
# layer is the torch conv they derive from.
_STD_CONVS: dict[type[nn.Module], type[nn.Module]] = {
    StdConv1d: nn.Conv1d, StdConv2d: nn.Conv2d, StdConv3d: nn.Conv3d,
}
# Norms with per-example statistics: never a constant affine at inference.
_PER_EXAMPLE = (nn.GroupNorm, nn.LayerNorm, _InstanceNorm, PositionalNorm)
# Normalization-activation layers: per-example statistics and a nonlinearity, in eval too.
_NORM_ACTIVATIONS = (_FilterResponseNorm, EvoNorm2dS0, EvoNorm2dB0)
# Norms whose eval mode is an affine map of running statistics (if the layout allows).
_RUNNING_STATS = (_BatchNorm, _BatchGroupNorm, _BatchRenorm)


def _frozen_types() -> tuple[type, ...]:
    try:
        from .frozen import FrozenBatchGroupNorm, FrozenBatchNorm
    except ImportError:  # pragma: no cover - the module ships with the package
        return ()
    return (FrozenBatchNorm, FrozenBatchGroupNorm)


def _norm_types() -> tuple[type, ...]:
    """Every norm class the report speaks about."""
    return (*_RUNNING_STATS, *_frozen_types(), *_PER_EXAMPLE, *_NORM_ACTIVATIONS)


def _torch_forward(module: nn.Module, bases: Sequence[type]) -> bool:
    """True when ``module`` is one of ``bases`` and runs that base's own forward."""
    return any(isinstance(module, b) and type(module).forward is b.forward for b in bases)


def _describe(module: nn.Module) -> str:
    return type(module).__name__


def _is_std_conv(layer: nn.Module) -> bool:
    """A StdConv1d/2d/3d running its own (weight-standardizing) forward."""
    return isinstance(layer, tuple(_STD_CONVS)) and (
        type(layer).forward is _StdConvMixin.forward)


def _norm_activation_problem(norm: nn.Module) -> str:
    """Why a normalization-activation layer of bgnorm.small_batch does not fold."""
    name = _describe(norm)
    if isinstance(norm, _FilterResponseNorm):
        what = ("divides each example's channel by its own root mean square (per-example "
                "statistics, in eval mode too)"
                + (", then applies its TLU max(y, tau)" if norm.tau is not None else ""))
    elif isinstance(norm, EvoNorm2dS0):
        what = ("computes x * sigmoid(v x) divided by each example's group standard deviation "
                "(per-example statistics and a nonlinearity, in eval mode too)")
    else:
        what = ("divides by max(running std, v x + each example's standard deviation) (a "
                "nonlinearity of per-example statistics, in eval mode too)")
    return (f"{name} {what}, so it is not a fixed affine map at inference; it stays as it is "
            "after the layer (nothing to fold: it normalizes and activates in one layer)")


def _channel_affine(norm: nn.Module) -> tuple[Tensor, Tensor] | str:
    """The per-channel (scale, shift) of ``norm`` in float64, each of shape (C,), or the reason
    it is not a per-channel affine map."""
    name = _describe(norm)
    frozen = _frozen_types()
    if isinstance(norm, frozen):
        return norm.channel_affine()  # type: ignore[operator]
    if isinstance(norm, _PER_EXAMPLE):
        return (f"{name} normalizes each example with its own statistics, so it is not a fixed "
                "affine map at inference")
    if _torch_forward(norm, (EvoNorm2dS0, EvoNorm2dB0)) and norm.v is None:
        # apply_act=False: timm's EvoNorm is then gamma * x + beta, in either mode
        return (norm.weight.detach().to(torch.float64), norm.bias.detach().to(torch.float64))
    if isinstance(norm, _NORM_ACTIVATIONS):
        return _norm_activation_problem(norm)
    if not isinstance(norm, _RUNNING_STATS):
        return f"{name} is not a norm fuse_conv_norm knows"
    if not _torch_forward(norm, (_BatchNorm, nn.SyncBatchNorm, _BatchGroupNorm,
                                 SyncBatchGroupNorm, _BatchRenorm)):
        return f"{name} overrides forward(); only the library's own forward is folded"
    if norm.training:
        return (f"{name} is in training mode (it normalizes with batch statistics); call "
                "model.eval() before folding")
    if norm.running_mean is None or norm.running_var is None:
        return (f"{name} has track_running_stats=False, so it normalizes with batch statistics "
                "in eval mode too; only layers with running statistics fold")
    if isinstance(norm, _BatchGroupNorm) and not norm.groups_resolved:
        return (f"{name}(num_groups='auto') has not chosen its G yet (it has no statistics): "
                "train it first, or load a checkpoint saved after training")
    c = norm.num_features
    rm = norm.running_mean.detach().to(torch.float64)
    rv = norm.running_var.detach().to(torch.float64)
    if isinstance(norm, _BatchGroupNorm):
        g = norm.num_groups
        if c % g:
            if g % c == 0:
                return (f"{name}(num_features={c}, num_groups={g}) cuts each channel into "
                        f"{g // c} bands with their own statistics: a per-position affine, not "
                        "a per-channel one (choose num_groups dividing C to make it foldable)")
            return (f"{name}(num_features={c}, num_groups={g}) has groups that straddle channel "
                    "boundaries: a per-position affine, not a per-channel one (choose "
                    "num_groups dividing C to make it foldable)")
        index = torch.arange(c, device=rm.device) // (c // g)
        rm, rv = rm[index], rv[index]
    return _affine_from_stats(rm, rv, norm.weight, norm.bias, norm.eps)


def _affine_from_stats(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(scale, shift) in float64 from per-channel statistics and an optional affine."""
    scale = torch.rsqrt(var.to(torch.float64) + eps)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64)
    shift = -mean.to(torch.float64) * scale
    if bias is not None:
        shift = shift + bias.detach().to(torch.float64)
    return scale, shift


def _out_channels(layer: nn.Module) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def _layer_problem(layer: nn.Module, num_features: int) -> str | None:
    """Why ``layer`` cannot take a norm's affine, or None."""
    name = _describe(layer)
    if not (_torch_forward(layer, _FOLD_INTO) or _is_std_conv(layer)):
        return (f"{name} is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear running torch's "
                "own forward, nor a bgnorm StdConv1d/2d/3d running its own")
    if parametrize.is_parametrized(layer):
        return f"{name} has parametrized weights (the stored tensors are not the weights used)"
    weight = layer.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{name} is a lazy module that was never run (its weights are uninitialized)"
    if not weight.is_floating_point():
        return f"{name} has {weight.dtype} weights; only floating-point weights fold"
    if _out_channels(layer) != num_features:
        return (f"{name} has {_out_channels(layer)} output channels but the norm has "
                f"num_features={num_features}")
    return None


def _plain_conv(layer: nn.Module) -> nn.Module:
    """The torch conv a StdConv derives from, with its arguments, training mode and the very
    same parameter tensors (whose values the caller replaces)."""
    cls = _STD_CONVS[next(k for k in type(layer).__mro__ if k in _STD_CONVS)]
    with torch.device("meta"):  # no memory: the parameters are replaced right after
        plain = cls(layer.in_channels, layer.out_channels, layer.kernel_size,
                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                    groups=layer.groups, bias=layer.bias is not None,
                    padding_mode=layer.padding_mode)
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain.train(layer.training)


@torch.no_grad()
def _folded(layer: nn.Module, scale: Tensor, shift: Tensor) -> nn.Module:
    """``layer`` with output channel c scaled by ``scale[c]`` and ``shift[c]`` added: ``layer``
    itself, changed in place, or for a StdConv the torch conv computing its inference function
    (with the StdConv's parameter tensors, changed in place)."""
    if _is_std_conv(layer):
        w64 = standardize(layer.weight.detach().to(torch.float64), layer.eps)
        layer = _plain_conv(layer)
    else:
        w64 = layer.weight.detach().to(torch.float64)
    _fold_into(layer, w64, scale, shift)
    return layer


def _fold_into(layer: nn.Module, w64: Tensor, scale: Tensor, shift: Tensor) -> None:
    """Set ``layer``'s weights to ``w64`` (the weights its forward uses, float64) with output
    channels scaled by ``scale``, and add ``shift`` to its bias, in place (float64 arithmetic,
    stored in the layer's dtype)."""
    weight = layer.weight
    scale = scale.to(w64.device)
    shift = shift.to(w64.device)
    if isinstance(layer, _ConvNd) and layer.transposed:
        # weight (C_in, C_out / groups, *k): output channel j of group i is [i*C_in/groups:, j]
        groups = layer.groups
        c_in, per_group = w64.shape[:2]
        kernel = w64.shape[2:]
        w64 = w64.reshape(groups, c_in // groups, per_group, *kernel)
        w64 = w64 * scale.reshape(groups, 1, per_group, *([1] * len(kernel)))
        w64 = w64.reshape(c_in, per_group, *kernel)
    else:  # Conv (C_out, C_in / groups, *k) and Linear (C_out, C_in): one row per channel
        w64 = w64 * scale.reshape(-1, *([1] * (w64.dim() - 1)))
    weight.copy_(w64.to(weight.dtype))
    old_bias = layer.bias
    new_bias = shift if old_bias is None else old_bias.detach().to(torch.float64) * scale + shift
    if old_bias is None:
        layer.bias = nn.Parameter(
            new_bias.to(dtype=weight.dtype), requires_grad=weight.requires_grad
        )
    else:
        old_bias.copy_(new_bias.to(old_bias.dtype))


def fuse_conv_norm_pair(layer: nn.Module, norm: nn.Module) -> nn.Module:
    r"""A copy of ``layer`` (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear or StdConv1d/2d/3d)
    with the eval-mode ``norm`` that follows it folded in: ``new(x) == norm(layer(x))`` to float
    round-off. The copy of a StdConv is torch's Conv1d/2d/3d with the folded standardized
    weights (a StdConv would standardize them again).

    ``norm`` is a BatchNorm, a BatchGroupNorm/GeneralBatchGroupNorm2d/SyncBatchGroupNorm with
    groups of whole channels (C a multiple of G) and running statistics, a BatchRenorm1d/2d/3d
    with running statistics, or a frozen norm of :mod:`bgnorm.frozen`. With
    :math:`s_c = \gamma_c / \sqrt{\hat\sigma^2_{g(c)} + \epsilon}` and
    :math:`t_c = \beta_c - \hat\mu_{g(c)} s_c`, output channel c's weights are multiplied
    by :math:`s_c` and its bias becomes :math:`s_c b_c + t_c` (a bias is added when the layer
    had none). The arithmetic is float64, stored in the layer's dtype. Neither
    argument is modified.

    The channel axis the norm normalizes must be the layer's output-channel axis: always so for
    a batched conv; for Linear it means the linear output is (N, C) (BatchNorm1d on a (N, L, C)
    output would normalize L). Raises ``ValueError`` naming the reason when the pair does not
    fold (training mode, ``track_running_stats=False``, bands or straddling groups, per-example
    norms, the normalization-activation layers FilterResponseNorm and EvoNorm, channel counts
    that differ, a subclass with its own forward).

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8).eval()
        >>> fused = fuse_conv_norm_pair(conv, bn)
        >>> x = torch.randn(2, 3, 6, 6)
        >>> torch.allclose(fused(x), bn(conv(x)), atol=1e-6)
        True
    """
    affine = _channel_affine(norm)
    if isinstance(affine, str):
        raise ValueError(f"fuse_conv_norm_pair: cannot fold: {affine}")
    problem = _layer_problem(layer, int(affine[0].shape[0]))
    if problem is not None:
        raise ValueError(f"fuse_conv_norm_pair: cannot fold into this layer: {problem}")
    return _folded(copy.deepcopy(layer), *affine)


@dataclass
class FuseReport:
    """What :func:`fuse_conv_norm` did.

    Attributes:
        model: the folded model (the argument itself when ``inplace=True``, else a copy).
        folded: ``(layer name, norm name)`` of every folded pair; each norm is now an
            ``nn.Identity``.
        skipped: ``(norm name, reason)`` for every norm left in place.
        untraced: ``(module name, error)`` for every module torch.fx could not trace, whose
            pairs were searched by module order instead ("" names the root).

    ``str(report)`` lists all three, one line each.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8))
        >>> report = fuse_conv_norm(net.eval(), warn=False)
        >>> report.folded, [name for name, _ in report.skipped]
        ([('0', '1')], ['2'])
        >>> print(report)  # doctest: +ELLIPSIS
        fuse_conv_norm: folded 1 norm(s), left 1 in place
          folded  1 into 0
          skipped 2: ...
    """

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fuse_conv_norm: folded {len(self.folded)} norm(s), left "
                 f"{len(self.skipped)} in place"]
        lines += [f"  folded  {norm or '<root>'} into {layer}" for layer, norm in self.folded]
        lines += [f"  skipped {norm or '<root>'}: {why}" for norm, why in self.skipped]
        lines += [f"  traced by module order: {name or '<root>'} ({err})"
                  for name, err in self.untraced]
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """fx tracer that keeps every norm a leaf (their forwards branch on input properties)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*_norm_types(), *_STD_CONVS)) or super().is_leaf_module(
            m, module_qualified_name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _find_pairs(
    module: nn.Module, prefix: str, pairs: list[tuple[str, str]], reasons: dict[str, str],
    untraced: list[tuple[str, str]],
) -> None:
    """Candidate (layer, norm) pairs under ``module``: from its fx graph, or when it does not
    trace, from consecutive children of nn.Sequential and from its children's graphs."""
    norm_types = _norm_types()
    try:
        graph = _Tracer().trace(module)
    except Exception as err:  # anything a forward may raise on proxies
        untraced.append((prefix, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                         if str(err) else type(err).__name__))
        graph = None
    if graph is not None:
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            norm = module.get_submodule(node.target)
            if not isinstance(norm, norm_types):
                continue
            full = _join(prefix, node.target)
            src = node.args[0] if node.args else None
            layer = (module.get_submodule(src.target) if isinstance(src, fx.Node)
                     and src.op == "call_module" else None)
            if len(node.args) != 1 or node.kwargs:
                reasons[full] = "it is called with more than one argument"
            elif layer is None or not isinstance(layer, _FOLD_INTO):
                reasons[full] = "its input is not the output of a Conv or Linear module"
            elif len(src.users) != 1:
                users = ", ".join(u.name for u in src.users if u is not node)
                reasons[full] = (f"the output of {_join(prefix, src.target)} is also used by "
                                 f"{users}, which must keep seeing the unnormalized values")
            elif calls[node.target] != 1 or calls[src.target] != 1:
                reasons[full] = "the norm or its conv is called more than once in forward()"
            else:
                pairs.append((_join(prefix, src.target), full))
        return
    if type(module).forward is nn.Sequential.forward:
        children = list(module.named_children())
        for (layer_name, layer), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(norm, norm_types) and isinstance(layer, _FOLD_INTO):
                pairs.append((_join(prefix, layer_name), _join(prefix, norm_name)))
    for name, child in module.named_children():
        if not isinstance(child, norm_types) and next(child.children(), None) is not None:
            _find_pairs(child, _join(prefix, name), pairs, reasons, untraced)


def _output_shapes(model: nn.Module, names: set[str], example_inputs: tuple[Any, ...]
                   ) -> dict[str, list[torch.Size]]:
    """Output shapes of the named modules when ``model`` runs on ``example_inputs``."""
    shapes: dict[str, list[torch.Size]] = {name: [] for name in names}
    handles = []
    for name in names:
        def hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
            if isinstance(out, Tensor):
                shapes[name].append(out.shape)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _shape_problem(layer: nn.Module, shapes: list[torch.Size] | None) -> str | None:
    """Why the layer's recorded output shapes do not put its channels on the norm's axis 1."""
    if shapes is None:
        if isinstance(layer, nn.Linear):
            return ("a Linear output folds only when it is (N, C) (a (N, L, C) output puts L on "
                    "the norm's channel axis); pass example_inputs so fuse_conv_norm can check")
        return None
    if not shapes:
        return "the layer did not run on example_inputs"
    want = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()
    bad = [tuple(s) for s in shapes if len(s) != want]
    if bad:
        return (f"its output has shape {bad[0]}, so the norm's channel axis is not the layer's "
                f"output-channel axis (expected a {want}D output)")
    return None


def fuse_conv_norm(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    inplace: bool = False,
    warn: bool = True,
) -> FuseReport:
    """Fold every eval-mode norm that directly follows a conv or linear layer into it.

    Pairs are found by torch.fx symbolic tracing: a norm module called on the output of a
    Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear or StdConv1d/2d/3d module, that output used by
    nothing else, each module called once. Where a module does not trace (data-dependent
    control flow), its pairs are taken from consecutive children of ``nn.Sequential``
    containers and its children are traced one by one. Each pair is folded with
    :func:`fuse_conv_norm_pair` and the norm is replaced by ``nn.Identity``, so the model
    class, module names and the other modules stay (a folded StdConv becomes torch's conv of
    its dimension, under the same name with the same parameter tensors); the result exports
    with ``torch.export`` like the original.

    Every norm that is not folded is left unchanged and listed in the report with its reason:
    bands or straddling groups of BatchGroupNorm (a per-position affine), per-example norms
    (GroupNorm, LayerNorm, InstanceNorm, PositionalNorm), the normalization-activation layers
    (FilterResponseNorm1d/2d/3d, EvoNorm2dS0/B0), ``track_running_stats=False``, a norm
    in training mode, a norm whose input is not a conv/linear output or whose conv output is
    also used elsewhere, modules with forward hooks or shared between places in the model.

    Linear + norm pairs fold only when ``example_inputs`` shows the linear output is (N, C);
    when ``example_inputs`` is given, conv pairs are checked the same way (a batched output).

    Args:
        model: the model, in eval mode (``model.training`` must be False).
        example_inputs: positional inputs of ``model`` for the shape checks, or None.
        inplace: fold into ``model`` itself; default: into a deep copy.
        warn: emit one ``UserWarning`` listing the norms left in place, if any.

    Returns:
        A :class:`FuseReport` with ``model`` (the folded model), ``folded`` and ``skipped``.

    Example:
        >>> import bgnorm
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), bgnorm.BatchGroupNorm2d(16, 4), nn.ReLU())
        >>> report = fuse_conv_norm(net.eval())
        >>> report.folded
        [('0', '1')]
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(report.model(x), net(x), atol=1e-5)
        True
    """
    if model.training:
        raise ValueError(
            "fuse_conv_norm: the model is in training mode, where norms use batch statistics "
            "and folding would change its output; call model.eval() first"
        )
    target = model if inplace else copy.deepcopy(model)
    report = FuseReport(target)
    norm_types = _norm_types()
    pairs: list[tuple[str, str]] = []
    reasons: dict[str, str] = {}
    _find_pairs(target, "", pairs, reasons, report.untraced)

    occurrences = Counter(id(m) for _, m in target.named_modules(remove_duplicate=False))
    modules = dict(target.named_modules())
    shapes = None
    if example_inputs is not None:
        shapes = _output_shapes(target, {layer for layer, _ in pairs},
                                tuple(example_inputs))
    folded: set[str] = set()
    for layer_name, norm_name in pairs:
        layer, norm = modules[layer_name], modules[norm_name]
        affine = _channel_affine(norm)
        problem = affine if isinstance(affine, str) else _layer_problem(
            layer, int(affine[0].shape[0]))
        if problem is None:
            problem = _shape_problem(layer, None if shapes is None else shapes[layer_name])
        if problem is None and (occurrences[id(layer)] > 1 or occurrences[id(norm)] > 1):
            problem = "the norm or its layer appears in more than one place in the model"
        if problem is None and any(
            m._forward_hooks or m._forward_pre_hooks for m in (layer, norm)
        ):
            problem = "the norm or its layer has forward hooks, which would see other values"
        if problem is not None:
            reasons[norm_name] = (problem if isinstance(affine, str)
                                  else f"cannot fold into {layer_name}: {problem}")
            continue
        assert not isinstance(affine, str)
        new_layer = _folded(layer, *affine)
        if new_layer is not layer:  # a StdConv, now a torch conv
            parent_name, _, child = layer_name.rpartition(".")
            setattr(target.get_submodule(parent_name), child, new_layer)
        parent_name, _, child = norm_name.rpartition(".")
        setattr(target.get_submodule(parent_name), child, nn.Identity())
        folded.add(norm_name)
        report.folded.append((layer_name, norm_name))

    for name, module in modules.items():
        if not isinstance(module, norm_types) or name in folded:
            continue
        if name in reasons:
            why = reasons[name]
        else:
            affine = _channel_affine(module)
            why = (affine if isinstance(affine, str)
                   else "no Conv or Linear module feeds it directly")
        report.skipped.append((name, why))
    if warn and report.skipped:
        listed = "; ".join(f"{n or '<root>'}: {w}" for n, w in report.skipped[:8])
        more = len(report.skipped) - 8
        warnings.warn(
            f"fuse_conv_norm left {len(report.skipped)} norm layer(s) in place: {listed}"
            + (f"; and {more} more (see the returned report)" if more > 0 else "")
            + " (pass warn=False to silence)",
            stacklevel=2,
        )
    return report
