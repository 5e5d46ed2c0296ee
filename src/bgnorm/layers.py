"""nn.Modules of the family: BatchGroupNorm1d/2d/3d, GeneralBatchGroupNorm2d, PositionalNorm.

The modules hold the state (affine parameters, running statistics, the group layout) and
validate shapes; the math lives in :mod:`bgnorm.functional`.

Example:
    >>> BatchGroupNorm2d(64).num_groups == DEFAULT_NUM_GROUPS  # G when not given
    True
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from . import functional as BF
from .ops.plan import memory_format_of

__all__ = [
    "BatchGroupNorm1d",
    "BatchGroupNorm2d",
    "BatchGroupNorm3d",
    "GeneralBatchGroupNorm2d",
    "PositionalNorm",
    "DEFAULT_NUM_GROUPS",
]

_EXTRA_STATE = "_extra_state"  # torch's key for get_extra_state()

#: Default G of the BatchGroupNorm layers (the GN paper's default group count). The BGN paper
#: chooses G by batch size: see :func:`bgnorm.paper_groups`; ``num_groups="auto"`` chooses it
#: per layer (:func:`bgnorm.auto_groups`).
DEFAULT_NUM_GROUPS = 32

#: The ``num_groups`` value that lets a layer choose G from its first training input.
AUTO = "auto"


def _without_bias(module: nn.Module) -> bool:
    """Whether the layer has gamma but no beta (``bias=False``). torch's norms print ``bias=``
    always; ours print ``bias=False`` only, so every other repr (and the docs quoting them)
    stays as it was."""
    return module.affine and module.bias is None


def _memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (CPU: physical memory; CUDA: the GPU's), None if unknown."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (AttributeError, ValueError, OSError, RuntimeError):  # no sysconf (Windows), ...
        pass
    return None


def _bytes_text(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it >= 1 (e.g. ``8 TiB``)."""
    value, unit = float(nbytes), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:.3g} {unit}"


def _running_stats(
    who: _checks.Who, num_features: int, num_groups: int, factory_kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """The (G,) running mean (zeros) and variance (ones), or an error that names num_groups.

    G has no bound at construction (G = k*C cuts each channel into k bands, valid for spatial
    sizes divisible by k), but at run time G must divide D = C * prod(spatial): an input holds
    at least G values per example, so buffers of G values are never larger than one example.
    A G whose two buffers exceed the device's whole memory therefore fits no input; it is
    refused before allocating (on Linux a huge zeros() may "succeed" lazily and ones() then
    gets the process killed). Other failed allocations are re-raised naming num_groups."""
    probe = torch.empty(0, **factory_kwargs)
    nbytes = 2 * num_groups * probe.element_size()

    def message(problem: str) -> str:
        return (
            f"{_checks.label(who)}: num_groups={num_groups} {problem}. num_groups is G, the "
            f"number of groups over D = C * prod(spatial) of the input (C = {num_features}); it "
            f"must divide D, so it exceeds C only by cutting each channel into num_groups/C "
            f"bands of its spatial extent. Use a smaller num_groups (e.g. a divisor of C: "
            f"{', '.join(map(str, _checks.nearby_divisors(num_features, DEFAULT_NUM_GROUPS)))})"
        )

    total = _memory_bytes(probe.device)
    if nbytes >= 2**63:  # torch counts a storage's bytes in int64 (meta tensors included)
        limit = "more than a torch tensor can address"
    elif total is not None and nbytes > total:
        limit = f"more than the {probe.device.type} memory of this machine ({_bytes_text(total)})"
    else:
        limit = None
    if limit is not None:
        raise ValueError(message(
            f"is too large: its running statistics (running_mean and running_var, "
            f"{num_groups} values each) need {_bytes_text(nbytes)}, {limit}"))
    try:
        return (torch.zeros(num_groups, **factory_kwargs),
                torch.ones(num_groups, **factory_kwargs))
    except RuntimeError as err:  # torch.OutOfMemoryError included
        text = message(
            f"needs running statistics of {num_groups} values each ({_bytes_text(nbytes)} in "
            "all), "
            f"which could not be allocated: {str(err).splitlines()[0]}")
        try:
            new = type(err)(text)
        except Exception:  # an exception type with another constructor
            new = RuntimeError(text)
        raise new from err


class _BatchGroupNorm(nn.Module):
    """Common state and forward of BGN and GBGN (a BatchNorm-like module with (G,) stats)."""

    _version = 1
    #: The attribute name mmcv/mmengine's ``build_norm_layer`` gives the layer (``bgn1``, ...).
    _abbr_ = "bgn"
    _input_dims: tuple[int, ...] = ()  # accepted input.dim() values; empty: any (N, C, *)
    examples_per_group: int | None = None  # GBGN's e; None: one batch group (BGN)
    #: Built with num_groups="auto": G is chosen from the first training input and saved.
    _auto_groups = False
    #: convert_norm(..., num_groups="auto"): the replaced BatchNorm's (running_mean,
    #: running_var, num_batches_tracked, running_stats policy), carried over when G is chosen.
    _pending_channel_stats: tuple[Any, ...] | None = None
    #: The layer's qualified name in its model (set by convert_norm), named in error messages.
    _bgnorm_path: str | None = None

    def __init__(
        self,
        num_features: int,
        num_groups: int | str = DEFAULT_NUM_GROUPS,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        cls = type(self).__name__
        self.num_features = _checks.check_num_features(num_features, cls)
        self._auto_groups = isinstance(num_groups, str) and num_groups == AUTO
        if isinstance(num_groups, str) and not self._auto_groups:
            raise TypeError(
                f"{cls}: num_groups must be a positive int, got str {num_groups!r}; pass an "
                "integer such as num_groups=32, or num_groups='auto' to choose G from the first "
                "training input (bgnorm.auto_groups)")
        self.num_groups: int | str = AUTO if self._auto_groups else _checks.check_num_groups(
            num_groups, fn=cls)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            else:  # torch's BatchNorm(..., bias=False): gamma only, no "bias" in the state dict
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            # num_groups="auto": empty statistics until G is chosen (_settle_num_groups)
            mean, var = (torch.zeros(0, **factory_kwargs), torch.ones(0, **factory_kwargs)) \
                if self._auto_groups else _running_stats(
                    self._describe, self.num_features, self.num_groups, factory_kwargs)
            self.register_buffer("running_mean", mean)
            self.register_buffer("running_var", var)
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long,
                             **{k: v for k, v in factory_kwargs.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        # Spatial shape the group layout was fixed at; only used when groups straddle channels.
        self.layout_shape: tuple[int, ...] | None = None
        # the last input configuration that passed every check (see _validated)
        self._checked: tuple[Any, ...] | None = None
        self.reset_parameters()

    # -- state ---------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    @property
    def straddles_channels(self) -> bool:
        """True when groups are neither whole channels nor bands inside one channel."""
        c, g = self.num_features, self.num_groups
        return isinstance(g, int) and c % g != 0 and g % c != 0

    @property
    def groups_resolved(self) -> bool:
        """False while ``num_groups="auto"`` waits for the first training input."""
        return self.num_groups != AUTO

    def extra_repr(self) -> str:
        return (
            "{num_features}, num_groups={groups}, eps={eps}, momentum={momentum}, "
            "affine={affine}, {no_bias}track_running_stats={track_running_stats}".format(
                **self.__dict__, groups=repr(self.num_groups),
                no_bias="bias=False, " if _without_bias(self) else "")
        )

    # -- num_groups="auto" ---------------------------------------------------------------------
    def _policy_groups(self, input_shape: tuple[int, ...]) -> int:
        """The G :func:`bgnorm.auto_groups` picks for a training input of ``input_shape``: the
        statistics see the batch (GBGN: e of its examples), C and the spatial size."""
        from .policy import auto_groups

        b = int(input_shape[0])
        if self.examples_per_group is not None:
            b = min(b, self.examples_per_group)
        return auto_groups(self.num_features, tuple(input_shape[2:]), b)

    def _settle_num_groups(self, num_groups: int) -> None:
        """Fix G (an auto layer's choice, or the G of a checkpoint it loads): running
        statistics of G values (mean 0, variance 1) on the device and dtype of the empty ones."""
        g = _checks.check_num_groups(num_groups, fn=self._describe)
        if self.running_mean is not None and self.running_var is not None:
            kw = {"device": self.running_mean.device, "dtype": self.running_mean.dtype}
            self.running_mean, self.running_var = _running_stats(
                self._describe, self.num_features, g, kw)
        self.num_groups = g
        self._checked = None

    def _resolve_from_input(self, input: Tensor) -> None:
        """num_groups="auto" and no G yet: choose it from this input, in training only."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{self._describe()}: num_groups='auto' is chosen from the first training "
                "input, which torch.compile and torch.export cannot do inside a graph; resolve "
                "G before compiling or exporting: one eager training step, or "
                "bgnorm.resolve_groups(model, example_input)")
        if not self.training:
            raise RuntimeError(
                f"{self._describe()}: num_groups='auto' is chosen from the first training-mode "
                "input (its batch size, channels and spatial size), and this layer has not seen "
                "one, so it has no G and no running statistics for eval. Run a training step "
                "first (model.train(); model(x)), load a state dict saved after one, or choose "
                "G now with bgnorm.resolve_groups(model, example_input)")
        self._check_input_dim(input)
        _checks.check_input(self._describe, input)
        _checks.check_channels(self._describe, input, self.num_features)
        if input.numel() == 0:
            raise ValueError(
                f"{self._describe()}: num_groups='auto' cannot choose G from an empty input "
                f"(shape {tuple(input.shape)}); its first training input must hold at least "
                "one example and one value per channel")
        self._settle_num_groups(self._policy_groups(tuple(int(s) for s in input.shape)))
        self._carry_pending_stats()

    def _carry_pending_stats(self) -> None:
        """Running statistics from the BatchNorm that convert_norm replaced by this auto layer,
        now that G is known: copied at G = C, else estimated (running_stats="derive") as
        convert_norm does for a given G; mean 0 / variance 1 where it cannot."""
        pending, self._pending_channel_stats = self._pending_channel_stats, None
        if pending is None or self.running_mean is None or self.running_var is None:
            return
        from .convert import _group_statistics

        mean, var, count, policy = pending
        if mean.shape == self.running_mean.shape:
            stats = (mean, var)
        elif policy == "derive":
            stats = _group_statistics(mean, var, self.num_groups)
        else:
            stats = None
        if stats is not None:
            with torch.no_grad():
                self.running_mean.copy_(stats[0])
                self.running_var.copy_(stats[1])
                if count is not None and self.num_batches_tracked is not None:
                    self.num_batches_tracked.copy_(count)

    # The group layout recorded by straddling groups is the layer's extra state. It is saved
    # only when there is one, so a layer without (any G that divides C or is a multiple of C,
    # or straddling groups before their first input) has exactly BatchNorm's state dict keys:
    # at G = C a stock BatchNorm checkpoint loads strictly, and back. A state dict without the
    # key means "no layout recorded" (checkpoints of version 1 always have it).
    # An auto layer (num_groups="auto") also saves its G ("auto" before its first training
    # input), so a checkpoint restores the choice even without running statistics.
    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "layout_shape": None if self.layout_shape is None else list(self.layout_shape)}
        if self._auto_groups:
            state["num_groups"] = self.num_groups
        return state

    def set_extra_state(self, state: Any) -> None:
        shape = state.get("layout_shape") if isinstance(state, dict) else None
        self.layout_shape = None if shape is None else tuple(int(s) for s in shape)
        self._checked = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout_shape is None and not self._auto_groups:
            destination.pop(prefix + _EXTRA_STATE, None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):  # type: ignore[override]
        own = [name for name, t in (*self._parameters.items(), *self._buffers.items())
               if t is not None]
        if not own or any(prefix + name in state_dict for name in own):
            # this layer's entries without extra state (a BatchNorm checkpoint, or ours with
            # no layout recorded): no layout. A dict with none of its entries (strict=False
            # loads of another part of a model) leaves the recorded layout alone.
            state_dict.setdefault(prefix + _EXTRA_STATE, {"layout_shape": None})
        self._load_num_groups(state_dict, prefix, error_msgs)
        version = local_metadata.get("version", None)
        if version is None:
            # A dict without our metadata (hand-made, or from an older format): fill in what the
            # current format adds, the way torch's BatchNorm migrates num_batches_tracked.
            if self.track_running_stats and prefix + "num_batches_tracked" not in state_dict:
                state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        key = prefix + "running_mean"
        if key in state_dict and self.running_mean is not None:
            saved = state_dict[key]
            if (saved.dim() == 1 and saved.shape[0] == 0 and self.groups_resolved
                    and self.num_groups != 0):
                error_msgs.append(
                    f"{self._describe()}: the checkpoint was saved before its num_groups='auto' "
                    "layer chose G (no running statistics yet); save it after a training step")
            elif (saved.dim() == 1 and self.groups_resolved
                    and saved.shape[0] != self.num_groups):
                error_msgs.append(
                    f"{self._describe()}: the checkpoint's running statistics have "
                    f"{saved.shape[0]} groups but this layer has num_groups={self.num_groups}; "
                    f"construct the layer with num_groups={saved.shape[0]} to load it"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _load_num_groups(self, state_dict: dict[str, Any], prefix: str,
                         error_msgs: list[str]) -> None:
        """The checkpoint's G: a layer still waiting for it (num_groups="auto") takes it, from
        the saved num_groups or else the length of the running statistics (a torch BatchNorm
        checkpoint: G = C); a layer with another G gets an error (from the running statistics'
        check below where the checkpoint has them)."""
        extra = state_dict.get(prefix + _EXTRA_STATE)
        saved = extra.get("num_groups") if isinstance(extra, dict) else None
        mean = state_dict.get(prefix + "running_mean")
        if not _checks._is_int(saved):  # "auto" (saved before its first input) or absent
            saved = None
            if isinstance(mean, Tensor) and mean.dim() == 1 and mean.shape[0] > 0:
                saved = int(mean.shape[0])
        if saved is None or saved == self.num_groups:
            return
        if not self.groups_resolved:
            self._settle_num_groups(saved)
            self._pending_channel_stats = None  # the checkpoint's statistics win
        elif not (isinstance(mean, Tensor) and self.running_mean is not None):
            error_msgs.append(
                f"{self._describe()}: the checkpoint's layer has num_groups={saved} but this "
                f"layer has num_groups={self.num_groups}; construct the layer with "
                f"num_groups={saved} (or num_groups='auto') to load it")

    # -- forward -------------------------------------------------------------------------------
    def _describe(self) -> str:
        """The layer as error messages name it: its short repr and, when known, its place in
        the model, e.g. ``BatchGroupNorm2d(96, num_groups=24) at 'layer2.1.bn1'``."""
        e = self.examples_per_group
        text = f"{type(self).__name__}({self.num_features}, num_groups={self.num_groups!r}" + (
            ")" if e is None else f", examples_per_group={e})")
        return text if self._bgnorm_path is None else f"{text} at {self._bgnorm_path!r}"

    def _check_input_dim(self, input: Tensor) -> None:
        dims = self._input_dims
        if dims and input.dim() not in dims:
            want = " or ".join(f"{d}D" for d in dims)
            raise ValueError(
                f"{self._describe()}: expected {want} input (got {input.dim()}D input)")

    def _check_layout(self, input: Tensor) -> None:
        """Straddling groups: the input must have the recorded spatial size, if any (it is
        recorded by :meth:`_record_layout` once a call has succeeded)."""
        if not self.straddles_channels or self.layout_shape is None:
            return
        shape = tuple(int(s) for s in input.shape[2:])
        if shape != self.layout_shape and math.prod(shape) != 0:  # spatial size 0: no groups
            c, g = self.num_features, self.num_groups
            channel_groups = [d for d in _checks.nearby_divisors(c, g, 3)]
            raise ValueError(
                f"{self._describe()}: groups straddle channel "
                f"boundaries (C={c} is neither a multiple nor a divisor of num_groups={g}), so "
                f"group membership depends on the spatial size; this layer's groups were laid "
                f"out for spatial size {self.layout_shape} but the input has {shape}. Use inputs "
                f"of spatial size {self.layout_shape}, or choose num_groups that divides C "
                f"(e.g. {', '.join(map(str, channel_groups))}) or a multiple of C, which work at "
                "any size"
            )

    def _record_layout(self, input: Tensor) -> None:
        """Straddling groups: fix the layout at the spatial size of the first input that
        passed every check (never at a rejected one: it would refuse valid inputs after)."""
        if self.layout_shape is None and self.straddles_channels:
            shape = tuple(int(s) for s in input.shape[2:])
            if math.prod(shape) != 0:
                self.layout_shape = shape

    def _batch_norm_args(self) -> tuple[Tensor | None, Tensor | None, bool, float]:
        """(running_mean, running_var, use_batch_stats, momentum) as torch's _BatchNorm does."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return (
            self.running_mean if keep else None,
            self.running_var if keep else None,
            use_batch,
            factor,
        )

    def _common_checks(self, input: Tensor) -> None:
        if self.num_groups == AUTO:
            self._resolve_from_input(input)
        _checks.check_num_groups(self.num_groups, fn=self._describe)  # may have been set since
        self._check_input_dim(input)
        _checks.check_channels(self._describe, input, self.num_features)
        self._check_layout(input)

    def _check_key(self, input: Tensor) -> tuple[Any, ...]:
        # type(input): a pass bound for fake tensors (FakeTensorMode) holds fake indices
        # the memory format is part of it: the kept eval pass returns y in the input's
        return (input.shape, input.dtype, input.device,
                input.is_contiguous() or memory_format_of(input), self.training,
                self.num_groups, self.num_features, self.examples_per_group, self.eps, type(self),
                type(input))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._checked = None  # parameters may change dtype or device
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # The kept eval pass (a partial of an engine function with index tensors) is a cache of
        # bgnorm's internals: a pickled or deep-copied layer rebuilds it on its first call, so
        # whole-module files do not depend on private engine functions of this version.
        state = self.__dict__.copy()
        state["_checked"] = None
        return state

    def _eval_state(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(running_mean, running_var, weight, bias), read from the module's dicts (a quarter of
        the cost of four attribute lookups); parametrized tensors are looked up as attributes."""
        try:
            bufs, params = self._buffers, self._parameters
            return bufs["running_mean"], bufs["running_var"], params["weight"], params["bias"]
        except KeyError:
            return self.running_mean, self.running_var, self.weight, self.bias

    def forward(self, input: Tensor) -> Tensor:
        # ``_checked`` is (key, eval pass or None) for the last input configuration that passed
        # every check. The checks cost as much as a small layer's kernels and an eval pass
        # needs only its kernel, bound to the configuration (shape, dtype, device, memory
        # format, mode, hyper-parameters), so a layer checks once per configuration; in eval
        # the hot path is the key, four dict lookups and the kernel (each Python call here
        # costs as much as a few percent of a large pass when caches are cold). Never under
        # torch.compile, where the checks are free and guards decide recompilation.
        if torch.compiler.is_compiling():
            return self._checked_forward(input, None, False)
        key = self._check_key(input)
        checked = self._checked
        if checked is None or checked[0] != key:
            return self._checked_forward(input, key, False)
        kernel = checked[1]
        if kernel is not None:  # eval with running statistics: the kept pass
            rm, rv, w, b = self._eval_state()
            if rm is not None and rv is not None:
                return kernel(input, rm, rv, w, b, self.eps)
            return self._checked_forward(input, key, False)  # statistics removed since
        return self._checked_forward(input, key, True)

    def _checked_forward(self, input: Tensor, key: tuple[Any, ...] | None, valid: bool) -> Tensor:
        """Forward that runs the checks unless ``valid``, and keeps the configuration's
        ``(key, eval pass or None)`` when ``key`` is given (None: compiling)."""
        if not valid:
            self._common_checks(input)
        rm, rv, use_batch, factor = self._batch_norm_args()
        e = self.examples_per_group
        if not valid:
            BF._validate(self._describe, input, self.num_groups, e, rm, rv, self.weight,
                         self.bias, use_batch, self.eps)
        y = BF._grouped_batch_norm(input, self.num_groups, e, rm, rv, self.weight, self.bias,
                                   use_batch, factor, self.eps)
        if not valid:
            self._record_layout(input)
        if key is not None and not valid:
            kernel = None if use_batch else BF.eval_kernel(input, self.num_groups, rm,
                                                             self.weight)
            self._checked = (key, kernel)
        return y


class _BatchGroupNormNd(_BatchGroupNorm):
    r"""Batch Group Normalization (Zhou et al., AAAI 2021).

    The input (N, C, \*spatial) is viewed as (N, G, D/G) with D = C * prod(spatial) in
    row-major order. In training, each group's mean and biased variance are computed over the
    mini-batch and the group (Eq. 8-9 of the paper), then a per-channel affine follows:

    .. math::
        y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \gamma_c + \beta_c

    Running estimates of the G means and (unbiased, n = N*D/G) variances are kept with
    ``momentum`` (``None``: cumulative average) and used in eval mode, exactly like
    :class:`torch.nn.BatchNorm2d`; with ``track_running_stats=False`` batch statistics are used
    in eval too. G = C is BatchNorm; with one example and G dividing C it is GroupNorm.

    Group layouts and resolution:

    * G divides C (groups of C/G whole channels): independent of the spatial size.
    * G a multiple of C (each channel cut into k = G/C contiguous bands of its flattened
      spatial extent, e.g. horizontal strips of H/k rows): at another spatial size the bands
      are the same k equal fractions of each channel, so any size divisible by k works.
    * Otherwise groups straddle channel boundaries and their membership depends on the spatial
      size: the layer records the size of its first valid input (saved in the state dict) and
      raises on any other.

    Statistics are computed in float32 for float16/bfloat16 inputs; the output keeps the input
    dtype.

    ``num_groups="auto"`` lets the layer choose G from its first training-mode input with
    :func:`bgnorm.auto_groups` (the paper's G for the batch size, lowered where the layer's
    statistics would see fewer than 32 values), the way torch's lazy modules settle their
    shapes: until then the running statistics are empty and ``num_groups`` is ``'auto'``; from
    then on G is fixed (later inputs of other sizes do not change it) and saved in the state
    dict (``_extra_state``), so a fresh ``num_groups="auto"`` layer loads a checkpoint taken
    after the choice (so does a layer built with that G). Eval before the first training input
    raises (there are no statistics to use); so does a first call under ``torch.compile`` or
    ``torch.export``, which cannot change a module's buffers inside a graph: choose G first with
    an eager training step or :func:`bgnorm.resolve_groups`, which also suits wrapping in DDP
    (DDP registers the buffers it broadcasts when it wraps the model).

    Args:
        num_features: C, the number of channels.
        num_groups: G, any divisor of D, or ``"auto"`` (see above). Default: 32 (see
            :func:`bgnorm.paper_groups` for the paper's choice by batch size).
        eps: added to the variance. Default: 1e-5.
        momentum: running-average factor, or None for a cumulative average. Default: 0.1.
        affine: learn per-channel gamma and beta. Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        device, dtype: of the parameters and buffers.
        bias (keyword-only): with ``affine=True``, learn beta too; ``bias=False`` keeps gamma
            only (``bias`` is None and not in the state dict), as in torch's BatchNorm.
            Default: True.

    Attributes:
        _bgnorm_path: the layer's qualified name in its model (``str`` or None, default None),
            a plain attribute (not in the state dict) that :func:`bgnorm.convert_norm` sets;
            error messages name the layer by its short repr and this path, e.g.
            ``BatchGroupNorm2d(96, num_groups=24) at 'layer2.1.bn1': num_groups=24 must
            divide ...``.

    Shape:
    """


class BatchGroupNorm1d(_BatchGroupNormNd):
    __doc__ = (_BatchGroupNormNd.__doc__ or "") + r"""
        - Input: (N, C) or (N, C, L); Output: same shape.

    Example:
        >>> m = BatchGroupNorm1d(64, num_groups=16)
        >>> m(torch.randn(8, 64, 10)).shape
        torch.Size([8, 64, 10])
    """
    _input_dims = (2, 3)


class BatchGroupNorm2d(_BatchGroupNormNd):
    __doc__ = (_BatchGroupNormNd.__doc__ or "") + r"""
        - Input: (N, C, H, W); Output: same shape.

    Example:
        >>> m = BatchGroupNorm2d(64, num_groups=128)  # two bands per channel
        >>> m(torch.randn(8, 64, 8, 8)).shape
        torch.Size([8, 64, 8, 8])
    """
    _input_dims = (4,)


class BatchGroupNorm3d(_BatchGroupNormNd):
    __doc__ = (_BatchGroupNormNd.__doc__ or "") + r"""
        - Input: (N, C, D, H, W); Output: same shape.

    Example:
        >>> m = BatchGroupNorm3d(16, num_groups=4)
        >>> m(torch.randn(4, 16, 3, 4, 4)).shape
        torch.Size([4, 16, 3, 4, 4])
    """
    _input_dims = (5,)


class GeneralBatchGroupNorm2d(_BatchGroupNorm):
    r"""General Batch Group Normalization (GBGN), the BGN paper's baseline.

    The batch is cut into groups of ``examples_per_group`` = e consecutive examples and D into
    ``num_groups`` = G groups as in :class:`BatchGroupNorm2d`; each (batch group, group) pair
    has its own mean and biased variance (statistics of shape (N/e, G)). Running statistics are
    the average over the batch groups of the per-group mean and unbiased variance
    (n = e * D / G) and are used in eval like BatchNorm's. With e = N it is BGN; with G = C it
    is BatchNorm computed per slice of e examples (what data-parallel training does per GPU).

    Args:
        num_features: C.
        num_groups: G, any divisor of C*H*W, or ``"auto"``: chosen by
            :func:`bgnorm.auto_groups` from the first training input for statistics of e
            examples, as in BatchGroupNorm2d.
        examples_per_group: e; the training batch size must be a multiple of it.
        eps, momentum, affine, track_running_stats, device, dtype, bias (keyword-only): as in
            BatchGroupNorm2d.

    Attributes:
        _bgnorm_path: the layer's qualified name in its model (``str`` or None), set by
            :func:`bgnorm.convert_norm` and named in error messages, as in BatchGroupNorm2d.

    Shape:
        - Input: (N, C, H, W) with N divisible by e in training; Output: same shape.

    Example:
        >>> m = GeneralBatchGroupNorm2d(32, num_groups=8, examples_per_group=4)
        >>> m(torch.randn(16, 32, 5, 5)).shape
        torch.Size([16, 32, 5, 5])
    """

    _abbr_ = "gbgn"  # build_norm_layer's attribute name (gbgn1, ...)
    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        num_groups: int | str,
        examples_per_group: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, num_groups, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias,
        )
        self.examples_per_group = _checks.check_num_groups(
            examples_per_group, "examples_per_group", type(self).__name__)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(
            f"num_groups={self.num_groups}",
            f"num_groups={self.num_groups}, examples_per_group={self.examples_per_group}",
        )


class PositionalNorm(nn.Module):
    r"""Positional Normalization (Li et al., NeurIPS 2019) as used in the BGN paper.

    For every example and spatial position, the C channel values are normalized by their mean
    and biased variance; a per-channel affine follows. No running statistics and no moment
    re-injection: train and eval compute the same function.

    .. math::
        y_{n,c,s} = \gamma_c \frac{x_{n,c,s} - \mu_{n,s}}{\sqrt{\sigma^2_{n,s} + \epsilon}}
        + \beta_c, \qquad \mu_{n,s} = \frac{1}{C}\sum_c x_{n,c,s}

    Args:
        num_features: C.
        eps: added to the variance. Default: 1e-5.
        affine: learn per-channel gamma and beta. Default: True.
        device, dtype: of the parameters.
        bias (keyword-only): with ``affine=True``, learn beta too (``bias=False``: gamma only,
            as in torch's GroupNorm). Default: True.

    Attributes:
        _bgnorm_path: the layer's qualified name in its model (``str`` or None), set by
            :func:`bgnorm.convert_norm` and named in error messages, as in BatchGroupNorm2d.

    Shape:
        - Input: (N, C, \*); Output: same shape.

    Example:
        >>> m = PositionalNorm(16)
        >>> m(torch.randn(2, 16, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    _abbr_ = "pn"  # build_norm_layer's attribute name (pn1, ...)

    def __init__(
        self, num_features: int, eps: float = 1e-5, affine: bool = True,
        device: Any = None, dtype: Any = None, *, bias: bool = True,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = _checks.check_num_features(num_features, type(self).__name__)
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.zeros(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}" + (
            ", bias=False" if _without_bias(self) else "")

    #: The layer's qualified name in its model (set by convert_norm), named in error messages.
    _bgnorm_path: str | None = None

    def _describe(self) -> str:
        """The layer as error messages name it, e.g. ``PositionalNorm(16) at 'stem.norm'``."""
        text = f"{type(self).__name__}({self.num_features})"
        return text if self._bgnorm_path is None else f"{text} at {self._bgnorm_path!r}"

    def forward(self, input: Tensor) -> Tensor:
        _checks.check_input(self._describe, input)
        _checks.check_channels(self._describe, input, self.num_features)
        return BF.positional_norm(input, self.weight, self.bias, self.eps)


class GeneralBatchGroupNorm1d(GeneralBatchGroupNorm2d):
    r"""General Batch Group Normalization (GBGN) for (N, C) or (N, C, L) input.

    :class:`GeneralBatchGroupNorm2d` for another input dimension (only the input check
    differs): batch groups of ``examples_per_group`` = e examples, G groups of the D = C * L
    values of each example, statistics of shape (N/e, G).

    Shape:
        - Input: (N, C) or (N, C, L) with N divisible by e in training; Output: same shape.

    Example:
        >>> m = GeneralBatchGroupNorm1d(16, num_groups=4, examples_per_group=2)
        >>> m(torch.randn(8, 16, 10)).shape
        torch.Size([8, 16, 10])
    """

    _input_dims = (2, 3)


class GeneralBatchGroupNorm3d(GeneralBatchGroupNorm2d):
    r"""General Batch Group Normalization (GBGN) for (N, C, D, H, W) input.

    :class:`GeneralBatchGroupNorm2d` for volumes (only the input check differs): batch groups of
    ``examples_per_group`` = e examples, G groups of the C * D * H * W values of each example,
    statistics of shape (N/e, G).

    Shape:
        - Input: (N, C, D, H, W) with N divisible by e in training; Output: same shape.

    Example:
        >>> m = GeneralBatchGroupNorm3d(16, num_groups=4, examples_per_group=2)
        >>> m(torch.randn(4, 16, 3, 4, 4)).shape
        torch.Size([4, 16, 3, 4, 4])
    """

    _input_dims = (5,)


__all__ += ["GeneralBatchGroupNorm1d", "GeneralBatchGroupNorm3d"]
