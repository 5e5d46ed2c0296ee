r"""The small-batch methods practitioners compare BGN with, as layers of this library.

* :class:`BatchRenorm1d`/``2d``/``3d``: Batch Renormalization (Ioffe, NeurIPS 2017), with
  :func:`renorm_limits` (the paper's r_max/d_max ramp) and :func:`set_renorm_limits`.
* :class:`FilterResponseNorm1d`/``2d``/``3d``: Filter Response Normalization with the
  Thresholded Linear Unit (Singh & Krishnan, CVPR 2020), as timm's ``FilterResponseNormTlu2d``.
* :class:`EvoNorm2dS0` and :class:`EvoNorm2dB0` (Liu et al., NeurIPS 2020), as timm's.

Weight Standardization (Qiao et al. 2019), a transform of the convolutions rather than a norm,
is in :mod:`bgnorm.weight_std`.

Which statistics each uses (x of shape (N, C, \*spatial), S the spatial positions):

============  ==========================================  =============  ================
layer         statistics                                  batch          running stats
============  ==========================================  =============  ================
BRN           mean, variance per channel over (N, S),     dependent      mean, variance
              corrected towards the running ones by r, d
FRN           mean square per (example, channel) over S   per example    none
EvoNorm-S0    variance per (example, group) over C/G, S   per example    none
EvoNorm-B0    variance per channel over (N, S), and per   dependent      variance
              (example, channel) over S
============  ==========================================  =============  ================

FRN and the EvoNorms are normalization-*activation* layers: they replace a norm and the
activation after it (BN + ReLU), so a model that applies ReLU after them computes something
else than the papers' layers.

Example:
    >>> brn = BatchRenorm2d(8, r_max=3.0, d_max=5.0)
    >>> brn(torch.randn(4, 8, 5, 5)).shape
    torch.Size([4, 8, 5, 5])
    >>> [round(limit, 3) for limit in renorm_limits(30000)]  # the paper's ramp at step 30k
    [2.429, 5.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from . import _checks

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "EvoNorm2dB0",
    "EvoNorm2dS0",
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "renorm_limits",
    "set_renorm_limits",
]


def _stats_dtype(input: Tensor) -> torch.dtype:
    """float32 statistics for half and bfloat16 inputs (the output keeps the input dtype)."""
    return torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (kept), differentiable: two passes (mean, then
    the mean square about it). torch.var/var_mean compute the same but on CPU run about 50x
    slower than a sum (measured: 15 ms against 0.2 ms on 8x64x32x32, one thread)."""
    mean = x.mean(dim=dims, keepdim=True)
    return mean, (x - mean).square().mean(dim=dims, keepdim=True)


def _channel_shape(input: Tensor) -> tuple[int, ...]:
    """(1, C, 1, ...): a per-channel vector broadcast against ``input``."""
    return (1, -1) + (1,) * (input.dim() - 2)


def _describe(module: nn.Module, extra: str = "") -> str:
    """A layer as errors name it, e.g. ``BatchRenorm2d(64) at 'layer1.0.bn1'``."""
    text = f"{type(module).__name__}({module.num_features}{extra})"
    path = getattr(module, "_bgnorm_path", None)
    return text if path is None else f"{text} at {path!r}"


def _check_input(module: nn.Module, input: Tensor, dims: tuple[int, ...]) -> None:
    who = module._describe  # type: ignore[attr-defined]
    if input.dim() not in dims:
        want = " or ".join(f"{d}D" for d in dims)
        raise ValueError(f"{who()}: expected {want} input (got {input.dim()}D input)")
    _checks.check_input(who, input)
    _checks.check_channels(who, input, module.num_features)  # type: ignore[arg-type]


def _check_momentum(who: str, momentum: object, allow_none: bool) -> None:
    if momentum is None and allow_none:
        return
    if (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
            or not 0.0 <= momentum <= 1.0):
        none = " or None (a cumulative average)" if allow_none else ""
        raise ValueError(
            f"{who}: momentum must be a number in [0, 1]{none}, got {momentum!r}; the running "
            "statistics move by this fraction towards each batch's, e.g. momentum=0.1")


def _check_limits(who: _checks.Who, r_max: object, d_max: object) -> None:
    """r_max >= 1 and d_max >= 0 (inf allowed: no clipping); anything else would clip r to an
    empty interval, or d to one that excludes 0, silently."""
    for name, value, low, example in (("r_max", r_max, 1.0, "r_max=3.0"),
                                      ("d_max", d_max, 0.0, "d_max=5.0")):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or math.isnan(value) or value < low):
            raise ValueError(
                f"{_checks.label(who)}: {name} must be a number >= {low:g} (inf: no clipping), "
                f"got {value!r}; "
                f"r is clipped to [1/r_max, r_max] and d to [-d_max, d_max], so r_max=1, "
                f"d_max=0 is BatchNorm. Pass e.g. {example}, or ramp it with "
                "bgnorm.renorm_limits(step)")


# -- Batch Renormalization ---------------------------------------------------------------------
class _BatchRenorm(_NormBase):
    r"""Batch Renormalization (Ioffe, NeurIPS 2017).

    In training, with the batch statistics :math:`\mu_B, \sigma_B^2` of each channel (mean and
    biased variance over N and the spatial positions) and the running ones
    :math:`\mu, \sigma^2`:

    .. math::
        \sigma_B = \sqrt{\sigma_B^2 + \epsilon}, \quad \sigma = \sqrt{\sigma^2 + \epsilon},
        \quad r = \operatorname{sg}\Big(\operatorname{clip}_{[1/r_{max},\, r_{max}]}
        \frac{\sigma_B}{\sigma}\Big), \quad d = \operatorname{sg}\Big(
        \operatorname{clip}_{[-d_{max},\, d_{max}]} \frac{\mu_B - \mu}{\sigma}\Big)

    .. math::
        y = \gamma \Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

    (sg: stop-gradient, r and d are constants for the backward pass). Then the running
    statistics are updated exactly as :class:`torch.nn.BatchNorm2d` does (``momentum``;
    ``None``: cumulative average; the running variance averages the unbiased batch variances),
    and in eval mode :math:`y = \gamma (x - \mu) / \sigma + \beta`, BatchNorm's eval. The paper
    averages :math:`\sigma` itself; averaging :math:`\sigma^2` as BatchNorm does keeps the state
    dict and eval of BatchNorm, so a BatchNorm checkpoint loads as it is, and with
    ``r_max=1, d_max=0`` the layer is BatchNorm in train and eval.

    The paper trains with ``r_max=1, d_max=0`` (BatchNorm) for the first 5k steps, then relaxes
    them to 3 (at 40k steps) and 5 (at 25k steps): :func:`renorm_limits` gives that ramp and
    :func:`set_renorm_limits` applies it to every layer of a model; or set the attributes
    ``r_max``/``d_max`` yourself. The defaults are the paper's final values.

    With ``examples_per_group=e`` the statistics (and r, d) are computed per group of e
    consecutive examples, as each worker computes them in data-parallel training (the running
    statistics then average the groups' statistics). ``track_running_stats=False`` (or running
    buffers set to None): batch statistics in train and eval, r = 1 and d = 0, BatchNorm.

    Args:
        num_features: C, the number of channels.
        eps: added to both variances. Default: 1e-5.
        momentum: running-average factor, or None for a cumulative average. Default: 0.1.
        affine: learn per-channel gamma and beta. Default: True.
        track_running_stats: keep running statistics (needed for r and d). Default: True.
        device, dtype: of the parameters and buffers.
        bias (keyword-only): with ``affine=True``, learn beta too. Default: True.
        r_max (keyword-only): bound of r, >= 1 (inf: no bound). Default: 3.0.
        d_max (keyword-only): bound of d, >= 0 (inf: no bound). Default: 5.0.
        examples_per_group (keyword-only): e, examples per statistics group (training batches
            must be a multiple of it), or None for the whole batch. Default: None.

    Shape:
    """

    _abbr_ = "brn"
    _input_dims: tuple[int, ...] = ()
    #: The layer's qualified name in its model (set by convert_norm), named in error messages.
    _bgnorm_path: str | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        examples_per_group: int | None = None,
    ) -> None:
        cls = type(self).__name__
        num_features = _checks.check_num_features(num_features, cls)
        _check_momentum(cls, momentum, allow_none=True)
        _check_limits(cls, r_max, d_max)
        if examples_per_group is not None:
            examples_per_group = _checks.check_num_groups(examples_per_group,
                                                          "examples_per_group", cls)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.examples_per_group = examples_per_group

    def _describe(self) -> str:
        return _describe(self)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"
        if self.examples_per_group is not None:
            text += f", examples_per_group={self.examples_per_group}"
        return text

    def _check_input_dim(self, input: Tensor) -> None:
        _check_input(self, input, self._input_dims)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        _check_limits(self._describe, self.r_max, self.d_max)  # attributes may be set later
        # running-average factor and mode, exactly as torch's _BatchNorm.forward
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        rm = self.running_mean if keep else None
        rv = self.running_var if keep else None
        if not use_batch:  # eval with running statistics: BatchNorm's eval
            return F.batch_norm(input, rm, rv, self.weight, self.bias, False, 0.0, self.eps)
        e = self.examples_per_group
        if rm is None or rv is None:  # nothing to renormalize towards: BatchNorm, r=1, d=0
            if e is None:
                return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0,
                                    self.eps)
            return self._grouped(input, e, None, None, 0.0)
        if e is not None:
            return self._grouped(input, e, rm, rv, factor)
        if input.numel() == 0:  # as BatchNorm: empty output, statistics unchanged
            return F.batch_norm(input, rm, rv, self.weight, self.bias, True, factor, self.eps)
        with torch.no_grad():
            # torch's own batch-norm statistics kernel: mean and biased variance per channel
            mean, var = torch.batch_norm_update_stats(input.to(_stats_dtype(input)), None,
                                                      None, 0.0)
            r, d = self._corrections(mean, var, rm, rv)
        # gamma * ((x - mu_B) / sigma_B * r + d) + beta is BatchNorm's training pass with
        # gamma*r and beta + gamma*d: torch's kernel, forward and backward, in one call (it also
        # updates the running statistics, after r and d have read them).
        weight, bias = self._renormalized_affine(r, d)
        return F.batch_norm(input, rm, rv, weight, bias, True, factor, self.eps)

    def _corrections(self, mean: Tensor, var: Tensor, rm: Tensor, rv: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """r and d from batch statistics (any leading shape) and the running ones (no grad)."""
        running_std = (rv.to(var.dtype) + self.eps).sqrt()
        r = ((var + self.eps).sqrt() / running_std).clamp(1.0 / self.r_max, self.r_max)
        d = ((mean - rm.to(mean.dtype)) / running_std).clamp(-self.d_max, self.d_max)
        return r, d

    def _renormalized_affine(self, r: Tensor, d: Tensor, shape: tuple[int, ...] = (-1,)
                             ) -> tuple[Tensor, Tensor]:
        """gamma*r and beta + gamma*d (gamma = 1, beta = 0 where the layer has none), with
        gamma and beta viewed as ``shape`` to broadcast against r and d."""
        if self.weight is None:
            return r, d
        weight = self.weight.view(shape)
        r, d = r.to(weight.dtype), d.to(weight.dtype)
        bias = weight * d
        return weight * r, bias if self.bias is None else self.bias.view(shape) + bias

    def _grouped(self, input: Tensor, e: int, rm: Tensor | None, rv: Tensor | None,
                 factor: float) -> Tensor:
        """Statistics per group of e examples: (N/e, C) means and variances."""
        n, c = input.shape[0], input.shape[1]
        _checks.check_batch_groups(self._describe, input, e)
        count = e * math.prod(input.shape[2:])
        if count == 1:
            raise ValueError(
                f"{self._describe()}: expected more than 1 value per channel and group when "
                f"training, got input of shape {tuple(input.shape)} with examples_per_group={e}; "
                "use larger groups or eval mode")
        dtype = _stats_dtype(input)
        x = input.to(dtype).reshape(n // e, e, c, -1)
        mean, var = _moments(x, (1, 3))  # (N/e, 1, C, 1)
        rstd = (var + self.eps).rsqrt()
        if rm is None or rv is None:
            scale, shift = rstd, -mean * rstd
            if self.weight is not None:
                w = self.weight.to(dtype).view(1, 1, c, 1)
                scale, shift = scale * w, shift * w
            if self.bias is not None:
                shift = shift + self.bias.to(dtype).view(1, 1, c, 1)
        else:
            with torch.no_grad():
                r, d = self._corrections(mean.detach(), var.detach(), rm.view(1, 1, c, 1),
                                         rv.view(1, 1, c, 1))
            w, b = self._renormalized_affine(r, d, (1, 1, c, 1))
            scale = rstd * w.to(dtype)
            shift = b.to(dtype) - mean * scale
            if input.numel() > 0:
                with torch.no_grad():  # the average over the groups, as GBGN's
                    unbiased = var.detach() * (count / (count - 1))
                    rm.lerp_(mean.detach().mean(dim=0).view(c).to(rm.dtype), factor)
                    rv.lerp_(unbiased.mean(dim=0).view(c).to(rv.dtype), factor)
        return (x * scale + shift).reshape(input.shape).to(input.dtype)


class BatchRenorm1d(_BatchRenorm):
    __doc__ = (_BatchRenorm.__doc__ or "") + r"""
        - Input: (N, C) or (N, C, L); Output: same shape.

    Example:
        >>> m = BatchRenorm1d(16)
        >>> m(torch.randn(8, 16)).shape
        torch.Size([8, 16])
    """
    _input_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = (_BatchRenorm.__doc__ or "") + r"""
        - Input: (N, C, H, W); Output: same shape.

    Example:
        >>> m = BatchRenorm2d(16, r_max=1.0, d_max=0.0)  # the paper's first steps: BatchNorm
        >>> x = torch.randn(4, 16, 5, 5)
        >>> torch.allclose(m(x), nn.BatchNorm2d(16)(x))
        True
    """
    _input_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = (_BatchRenorm.__doc__ or "") + r"""
        - Input: (N, C, D, H, W); Output: same shape.

    Example:
        >>> m = BatchRenorm3d(4)
        >>> m(torch.randn(2, 4, 3, 3, 3)).shape
        torch.Size([2, 4, 3, 3, 3])
    """
    _input_dims = (5,)


def renorm_limits(
    step: int,
    *,
    warmup_steps: int = 5000,
    r_max: float = 3.0,
    r_max_step: int = 40000,
    d_max: float = 5.0,
    d_max_step: int = 25000,
) -> tuple[float, float]:
    r"""The (r_max, d_max) of Batch Renormalization at training step ``step``.

    The paper's schedule: BatchNorm (r_max = 1, d_max = 0) for ``warmup_steps`` steps, then r_max
    rises to ``r_max`` at step ``r_max_step`` and d_max to ``d_max`` at ``d_max_step``, and stay
    there. The paper says the limits are "gradually relaxed"; the ramps here are linear:

    .. math::
        r_{max}(t) = 1 + (r_{max} - 1)\,\mathrm{clip}_{[0,1]}\frac{t - t_0}{t_r - t_0}, \quad
        d_{max}(t) = d_{max}\,\mathrm{clip}_{[0,1]}\frac{t - t_0}{t_d - t_0}

    The defaults are the paper's ImageNet steps; scale them to your run's length (e.g. warm-up
    over the first ~5% of the steps).

    Example:
        >>> renorm_limits(0), renorm_limits(5000), renorm_limits(25000), renorm_limits(10**6)
        ((1.0, 0.0), (1.0, 0.0), (2.142857142857143, 5.0), (3.0, 5.0))
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchRenorm2d(8))
        >>> for step in range(3):  # in the training loop, before each step
        ...     _ = set_renorm_limits(model, *renorm_limits(step, warmup_steps=1, r_max_step=3,
        ...                                                 d_max_step=2))
        >>> model[1].r_max, model[1].d_max
        (2.0, 5.0)
    """
    for name, value in (("step", step), ("warmup_steps", warmup_steps),
                        ("r_max_step", r_max_step), ("d_max_step", d_max_step)):
        if not _checks._is_int(value) or value < 0:  # type: ignore[operator]
            raise ValueError(f"renorm_limits: {name} must be an int >= 0, got {value!r}")
    for name, end in (("r_max_step", r_max_step), ("d_max_step", d_max_step)):
        if end <= warmup_steps:
            raise ValueError(
                f"renorm_limits: {name}={end} must be after warmup_steps={warmup_steps} (the "
                f"ramp runs from warmup_steps to {name}); e.g. {name}={warmup_steps + 1000}")
    _check_limits("renorm_limits", r_max, d_max)

    def ramp(end: int) -> float:
        return min(1.0, max(0.0, (step - warmup_steps) / (end - warmup_steps)))

    return 1.0 + (r_max - 1.0) * ramp(r_max_step), d_max * ramp(d_max_step)


def set_renorm_limits(model: nn.Module, r_max: float, d_max: float) -> int:
    """Set ``r_max`` and ``d_max`` of every Batch Renormalization layer of ``model`` (itself
    included); returns how many layers were set. Call it before each training step with
    :func:`renorm_limits` of the step (see its example).

    Example:
        >>> set_renorm_limits(nn.Sequential(BatchRenorm2d(4), BatchRenorm1d(4)), 2.0, 1.0)
        2
    """
    _check_limits("set_renorm_limits", r_max, d_max)
    layers = [m for m in model.modules() if isinstance(m, _BatchRenorm)]
    for layer in layers:
        layer.r_max, layer.d_max = float(r_max), float(d_max)
    return len(layers)


# -- Filter Response Normalization + TLU -------------------------------------------------------
class _FilterResponseNorm(nn.Module):
    r"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, 2020).

    For every example n and channel c, with :math:`\nu^2_{n,c}` the mean square of the channel's
    values over the spatial positions (no mean subtraction; over nothing for (N, C) input, where
    :math:`\nu^2 = x^2`):

    .. math::
        \nu^2_{n,c} = \frac{1}{|S|}\sum_{s} x_{n,c,s}^2, \qquad
        y = \gamma_c \frac{x}{\sqrt{\nu^2_{n,c} + \epsilon}} + \beta_c, \qquad
        z = \max(y, \tau_c)

    The TLU (learned threshold :math:`\tau`) replaces the ReLU that would follow, so the layer
    replaces BatchNorm *and* its ReLU; ``tlu=False`` returns y. Per example and channel: no
    running statistics, train and eval compute the same function. Parameter names, ``eps`` and
    initialisation (:math:`\gamma = 1, \beta = 0, \tau = 0`) are those of timm's
    ``FilterResponseNormTlu2d``, whose state dict loads as it is.

    ``learnable_eps=True`` adds the paper's learned epsilon for layers with few spatial
    positions (1x1 maps, fully-connected layers): :math:`\epsilon + |\epsilon_l|` with the scalar
    parameter ``eps_learned`` (:math:`\epsilon_l`, initialised to ``learnable_eps_init``, as
    the absolute value has no gradient at 0).

    Args:
        num_features: C.
        eps: the constant :math:`\epsilon`. Default: 1e-5 (timm's; the paper uses 1e-6).
        device, dtype: of the parameters.
        tlu (keyword-only): apply the TLU. Default: True.
        learnable_eps (keyword-only): learn :math:`\epsilon_l`. Default: False.
        learnable_eps_init (keyword-only): initial :math:`\epsilon_l`. Default: 1e-4.

    Shape:
    """

    _abbr_ = "frn"
    _input_dims: tuple[int, ...] = ()
    _bgnorm_path: str | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
        *,
        tlu: bool = True,
        learnable_eps: bool = False,
        learnable_eps_init: float = 1e-4,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        cls = type(self).__name__
        self.num_features = _checks.check_num_features(num_features, cls)
        if eps < 0 or (eps == 0 and not learnable_eps):
            raise ValueError(
                f"{cls}: eps must be positive, got {eps}; a channel of zeros has mean square 0, "
                "so this would divide by zero. Pass e.g. eps=1e-5 (or learnable_eps=True with "
                "eps=0)")
        self.eps = eps
        self.tlu = tlu
        self.learnable_eps = learnable_eps
        self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        if tlu:
            self.tau = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        else:
            self.register_parameter("tau", None)
        self.learnable_eps_init = learnable_eps_init
        if learnable_eps:
            self.eps_learned = nn.Parameter(torch.empty((), **factory_kwargs))
        else:
            self.register_parameter("eps_learned", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.eps_learned is not None:
            nn.init.constant_(self.eps_learned, self.learnable_eps_init)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, tlu={self.tlu}"
        return text + (", learnable_eps=True" if self.learnable_eps else "")

    def _describe(self) -> str:
        return _describe(self)

    def forward(self, input: Tensor) -> Tensor:
        _check_input(self, input, self._input_dims)
        x = input.to(_stats_dtype(input))
        if x.dim() > 2:  # the mean square from the 2-norm: one pass over x
            dims = tuple(range(2, x.dim()))
            count = math.prod(x.shape[2:])
            nu2 = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True).square() / count
        else:
            nu2 = x.square()
        eps: Tensor | float = self.eps
        if self.eps_learned is not None:
            eps = self.eps_learned.abs().to(x.dtype) + self.eps
        shape = _channel_shape(x)
        # gamma / sqrt(nu^2 + eps) is (N, C, 1...): one multiply-add over x
        scale = (nu2 + eps).rsqrt() * self.weight.to(x.dtype).view(shape)
        y = torch.addcmul(self.bias.to(x.dtype).view(shape), x, scale)
        if self.tau is not None:
            y = torch.maximum(y, self.tau.to(x.dtype).view(shape))
        return y.to(input.dtype)


class FilterResponseNorm1d(_FilterResponseNorm):
    __doc__ = (_FilterResponseNorm.__doc__ or "") + r"""
        - Input: (N, C) or (N, C, L); Output: same shape.

    Example:
        >>> m = FilterResponseNorm1d(16, learnable_eps=True)  # (N, C): one value per filter
        >>> m(torch.randn(8, 16)).shape
        torch.Size([8, 16])
    """
    _input_dims = (2, 3)


class FilterResponseNorm2d(_FilterResponseNorm):
    __doc__ = (_FilterResponseNorm.__doc__ or "") + r"""
        - Input: (N, C, H, W); Output: same shape.

    Example:
        >>> m = FilterResponseNorm2d(16)
        >>> y = m(torch.randn(2, 16, 5, 5))
        >>> y.shape, bool((y >= 0).all())  # tau = 0 at initialisation: max(y, 0)
        (torch.Size([2, 16, 5, 5]), True)
    """
    _input_dims = (4,)


class FilterResponseNorm3d(_FilterResponseNorm):
    __doc__ = (_FilterResponseNorm.__doc__ or "") + r"""
        - Input: (N, C, D, H, W); Output: same shape.

    Example:
        >>> m = FilterResponseNorm3d(4, tlu=False)
        >>> m(torch.randn(2, 4, 3, 3, 3)).shape
        torch.Size([2, 4, 3, 3, 3])
    """
    _input_dims = (5,)


# -- EvoNorm ------------------------------------------------------------------------------------
def _evonorm_params(module: nn.Module, c: int, apply_act: bool,
                    factory_kwargs: dict[str, Any]) -> None:
    if not isinstance(apply_act, bool):
        raise TypeError(
            f"{type(module).__name__}: apply_act must be True or False, got {apply_act!r}; "
            "the arguments follow timm's order (num_features, groups, group_size, apply_act, "
            "eps) for EvoNorm2dS0 and (num_features, apply_act, momentum, eps) for "
            "EvoNorm2dB0: pass eps and momentum by keyword")
    module.apply_act = apply_act
    module.weight = nn.Parameter(torch.ones(c, **factory_kwargs))
    module.bias = nn.Parameter(torch.zeros(c, **factory_kwargs))
    if apply_act:
        module.v = nn.Parameter(torch.ones(c, **factory_kwargs))
    else:
        module.register_parameter("v", None)


def _evonorm_reset(module: nn.Module) -> None:
    nn.init.ones_(module.weight)
    nn.init.zeros_(module.bias)
    if module.v is not None:
        nn.init.ones_(module.v)


def _evonorm_affine(module: nn.Module, input: Tensor) -> Tensor:
    """``apply_act=False``: timm's layer is then the per-channel affine map alone."""
    shape = _channel_shape(input)
    return torch.addcmul(module.bias.to(input.dtype).view(shape), input,
                         module.weight.to(input.dtype).view(shape))


def _check_eps(who: str, eps: float) -> None:
    if not eps > 0:
        raise ValueError(
            f"{who}: eps must be positive, got {eps}; it is added to variances that are 0 for "
            "constant inputs. Pass e.g. eps=1e-5")


class EvoNorm2dS0(nn.Module):
    r"""EvoNorm-S0 (Liu et al., NeurIPS 2020), a per-example normalization-activation layer.

    With :math:`\sigma^2_{n,g}` the biased variance of example n over the C/G channels of group
    g and the spatial positions (GroupNorm's groups):

    .. math::
        y = \frac{x\, \operatorname{sigmoid}(v_c\, x)}{\sqrt{\sigma^2_{n,g} + \epsilon}}\,
        \gamma_c + \beta_c

    It replaces a norm *and* the activation after it (BN + ReLU). No running statistics: train
    and eval compute the same function. Arguments (in timm's order), parameter names
    (``weight``, ``bias``, ``v``), ``eps`` and initialisation (:math:`\gamma = v = 1,
    \beta = 0`) are those of timm's ``EvoNorm2dS0``, whose state dict loads as it is.

    With ``apply_act=False`` (timm's switch for a layer not followed by an activation) the
    layer is :math:`y = \gamma_c x + \beta_c` alone, as timm's: no statistics, no ``v``
    parameter (the state dict is timm's for that setting too).

    Args:
        num_features: C.
        groups: G, a divisor of C. Default: 32.
        group_size: channels per group instead of ``groups`` (C/G), a divisor of C.
            Default: None.
        apply_act: the normalization-activation above (True) or the affine map alone (False).
            Default: True.
        eps: added to the variance. Default: 1e-5.
        device, dtype: of the parameters.

    Shape:
        - Input: (N, C, H, W); Output: same shape.

    Example:
        >>> m = EvoNorm2dS0(64, groups=8)
        >>> m(torch.randn(2, 64, 5, 5)).shape
        torch.Size([2, 64, 5, 5])
        >>> EvoNorm2dS0(64, group_size=16).groups
        4
    """

    _abbr_ = "evonorm"
    _bgnorm_path: str | None = None

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        cls = type(self).__name__
        self.num_features = c = _checks.check_num_features(num_features, cls)
        if group_size is not None:
            size = _checks.check_num_groups(group_size, "group_size", cls)
            if c % size:
                raise ValueError(
                    f"{cls}: group_size={size} must divide num_features={c}; nearby valid "
                    f"values: {', '.join(map(str, _checks.nearby_divisors(c, size)))}")
            groups = c // size
        groups = _checks.check_num_groups(groups, "groups", cls)
        if c % groups:
            raise ValueError(
                f"{cls}: groups={groups} must divide num_features={c} (groups of whole "
                f"channels, as GroupNorm's); nearby valid values: "
                f"{', '.join(map(str, _checks.nearby_divisors(c, groups)))}, or pass group_size")
        _check_eps(cls, eps)
        self.groups = groups
        self.eps = eps
        _evonorm_params(self, c, apply_act, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        _evonorm_reset(self)

    def extra_repr(self) -> str:
        act = "" if self.apply_act else ", apply_act=False"
        return f"{self.num_features}, groups={self.groups}{act}, eps={self.eps}"

    def _describe(self) -> str:
        return _describe(self, f", groups={self.groups}")

    def forward(self, input: Tensor) -> Tensor:
        _check_input(self, input, (4,))
        if self.v is None:
            return _evonorm_affine(self, input)
        x = input.to(_stats_dtype(input))
        n = x.shape[0]
        var = _moments(x.reshape(n, self.groups, -1), (2,))[1]
        rstd = (var + self.eps).rsqrt().repeat_interleave(self.num_features // self.groups, 1)
        shape = _channel_shape(x)
        scale = rstd.unsqueeze(-1) * self.weight.to(x.dtype).view(shape)  # (N, C, 1, 1)
        numerator = x * torch.sigmoid(x * self.v.to(x.dtype).view(shape))
        return torch.addcmul(self.bias.to(x.dtype).view(shape), numerator, scale).to(input.dtype)


class EvoNorm2dB0(nn.Module):
    r"""EvoNorm-B0 (Liu et al., NeurIPS 2020), a batch-dependent normalization-activation layer.

    With :math:`\sigma^2_{c}` the biased variance of channel c over the batch and the spatial
    positions (BatchNorm's; in eval the running variance) and :math:`\sigma^2_{n,c}` that of
    example n over the spatial positions (InstanceNorm's):

    .. math::
        y = \frac{x}{\max\big(\sqrt{\sigma^2_c + \epsilon},\;
        v_c\, x + \sqrt{\sigma^2_{n,c} + \epsilon}\big)}\, \gamma_c + \beta_c

    In training the running variance moves towards the batch's unbiased variance by
    ``momentum`` (as BatchNorm's); there is no running mean (B0 uses no mean). Arguments (in
    timm's order), parameter and buffer names (``weight``, ``bias``, ``v``, ``running_var``),
    ``eps`` and initialisation are those of timm's ``EvoNorm2dB0``, whose state dict loads as
    it is. With ``apply_act=False`` the layer is :math:`y = \gamma_c x + \beta_c` alone, as
    timm's: no ``v``, and the running variance is kept (timm's state dict has it) but never
    updated.
    With ``examples_per_group=e`` the batch variance is per group of e consecutive examples
    (a worker's batch in data-parallel training); the running variance averages the groups'.

    Args:
        num_features: C.
        apply_act: the normalization-activation above (True) or the affine map alone (False).
            Default: True.
        momentum: running-average factor in [0, 1]. Default: 0.1.
        eps: added to both variances. Default: 1e-3 (timm's).
        device, dtype: of the parameters and buffer.
        examples_per_group (keyword-only): e, or None for the whole batch. Default: None.

    Shape:
        - Input: (N, C, H, W); Output: same shape.

    Example:
        >>> m = EvoNorm2dB0(16)
        >>> m(torch.randn(4, 16, 5, 5)).shape
        torch.Size([4, 16, 5, 5])
        >>> bool((m.running_var != 1).all())  # updated in training
        True
    """

    _abbr_ = "evonorm"
    _bgnorm_path: str | None = None

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-3,
        device: Any = None,
        dtype: Any = None,
        *,
        examples_per_group: int | None = None,
    ) -> None:
        super().__init__()
        cls = type(self).__name__
        self.num_features = c = _checks.check_num_features(num_features, cls)
        _check_eps(cls, eps)
        _check_momentum(cls, momentum, allow_none=False)
        if examples_per_group is not None:
            examples_per_group = _checks.check_num_groups(examples_per_group,
                                                          "examples_per_group", cls)
        self.eps = eps
        self.momentum = momentum
        self.examples_per_group = examples_per_group
        factory_kwargs = {"device": device, "dtype": dtype}
        _evonorm_params(self, c, apply_act, factory_kwargs)
        self.register_buffer("running_var", torch.ones(c, **factory_kwargs))

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        _evonorm_reset(self)

    def extra_repr(self) -> str:
        act = "" if self.apply_act else ", apply_act=False"
        text = f"{self.num_features}{act}, eps={self.eps}, momentum={self.momentum}"
        e = self.examples_per_group
        return text + ("" if e is None else f", examples_per_group={e}")

    def _describe(self) -> str:
        return _describe(self)

    def forward(self, input: Tensor) -> Tensor:
        _check_input(self, input, (4,))
        if self.v is None:
            return _evonorm_affine(self, input)
        x = input.to(_stats_dtype(input))
        n, c = x.shape[:2]
        shape = _channel_shape(x)
        # instance moments (N, C): InstanceNorm's std, and the batch variance from them (the
        # mean of the variances plus the variance of the means: exact for equal counts)
        instance_mean, instance_var = _moments(x.reshape(n, c, -1), (2,))
        if self.training:
            e = max(n, 1) if self.examples_per_group is None else self.examples_per_group
            _checks.check_batch_groups(self._describe, input, e)
            spatial = x.shape[2] * x.shape[3]
            count = e * spatial
            if count == 1:
                raise ValueError(
                    f"{self._describe()}: expected more than 1 value per channel when training, "
                    f"got input of shape {tuple(input.shape)}"
                    + ("" if self.examples_per_group is None else
                       f" with examples_per_group={e}") + "; use a larger batch or eval mode")
            group_means = instance_mean.reshape(n // e, e, c, 1)
            _, spread = _moments(group_means, (1,))
            var = instance_var.reshape(n // e, e, c, 1).mean(dim=1, keepdim=True) + spread
            if x.numel() > 0:
                with torch.no_grad():
                    unbiased = var.detach().mean(dim=0).view(c) * (count / (count - 1))
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
            batch_std = (var + self.eps).sqrt().expand(n // e, e, c, 1)
            batch_std = batch_std.reshape(n, c, 1, 1)
        else:
            batch_std = (self.running_var.to(x.dtype) + self.eps).sqrt().view(shape)
        instance_std = (instance_var.unsqueeze(-1) + self.eps).sqrt()  # (N, C, 1, 1)
        right = torch.addcmul(instance_std, x, self.v.to(x.dtype).view(shape))
        y = x / torch.maximum(batch_std, right)
        return torch.addcmul(self.bias.to(x.dtype).view(shape), y,
                             self.weight.to(x.dtype).view(shape)).to(input.dtype)
