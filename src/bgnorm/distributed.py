r"""SyncBatchGroupNorm: Batch Group Normalization with statistics over a whole process group.

In data-parallel training each rank holds a slice of the global batch. :class:`SyncBatchGroupNorm`
computes the BGN statistics of the *global* batch (the concatenation of every rank's slice in
the process group), so the result equals single-process BGN on the concatenated batch: outputs,
input gradients, summed weight/bias gradients and running statistics.

Communication (per layer, per training step), all on the input's device (gloo for CPU tensors,
NCCL for CUDA tensors; only ordinary tensor ops, nothing CPU-only):

* forward, all-reduce 1 (G + 1 numbers): the number of values per group m_r and the per-group
  sums S_{r,g}; every rank then has the global mean
  :math:`\mu_g = \sum_r S_{r,g} / \sum_r m_r`.
* forward, all-reduce 2 (G numbers): the per-group sums of squared deviations about the
  *global* mean, :math:`Q_{r,g} = \sum (x - \mu_g)^2`; :math:`\sigma^2_g = \sum_r Q_{r,g} / M`.
  This is the two-pass algorithm: no :math:`E[x^2] - E[x]^2` cancellation, so inputs such as
  ``1e4 + randn`` keep full precision in float32.
* backward, one all-reduce (2G numbers): the per-group sums of dxh and dxh * xh of the
  closed-form backward; weight/bias gradients stay local (DDP reduces them like any other).

That is 2G + 1 numbers in the forward and 2G in the backward. Eval mode, and training without an
initialized process group or with a group of one rank, use the local BGN path and never
communicate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _checks
from .layers import DEFAULT_NUM_GROUPS, _BatchGroupNorm, _BatchGroupNormNd
from .ops.plan import compute_dtype, contiguous_for, memory_format_of

__all__ = ["SyncBatchGroupNorm"]

_NAME = "SyncBatchGroupNorm"


def _all_reduce(buf: Tensor, group: Any, what: str, layer: _checks.Who = _NAME) -> None:
    """Sum ``buf`` in place over ``group``; a failed collective names the layer (``layer``,
    see :mod:`bgnorm._checks`) and the likely causes."""
    try:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        try:
            where = f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
        except Exception:  # the group may be unusable by now
            where = "this rank"
        msg = (
            f"{_checks.label(layer)}: the all-reduce of {what} over the process group failed on "
            f"{where}: "
            f"{err}\nLikely causes: another rank died or stalled (the wait is bounded by the "
            "process group's timeout, init_process_group(timeout=...)); ranks ran different "
            f"sequences of {_NAME} calls (every rank must run the layer in training mode, and "
            "backpropagate through it, the same number of times with the same num_groups); or "
            f"the backend does not support {buf.device.type} tensors (gloo: CPU, NCCL: CUDA)"
        )
        try:
            new = type(err)(msg)
        except Exception:  # an exception type with another constructor
            new = RuntimeError(msg)
        raise new from err


class _SyncBatchGroupNormFunction(torch.autograd.Function):
    """BGN of a contiguous (N, C, S) input with statistics all-reduced over a process group.

    Inputs: ``x3`` (N, C, S) contiguous, N may be 0; ``weight``/``bias`` (C,) or None;
    ``running_mean``/``running_var`` (G,) or None (updated in place from the global
    statistics); ``num_groups``; ``eps``; ``momentum`` (the running-average factor); ``group``;
    ``layer``, who errors name (see :mod:`bgnorm._checks`). Output: ``y`` (N, C, S) in the
    input dtype.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x3: Tensor, weight: Tensor | None, bias: Tensor | None,
        running_mean: Tensor | None, running_var: Tensor | None, num_groups: int, eps: float,
        momentum: float, group: Any, layer: _checks.Who = _NAME,
    ) -> Tensor:
        n, c, s = x3.shape
        g = num_groups
        group_size = c * s // g
        local_count = n * group_size
        cdt = compute_dtype(x3.dtype)
        x4 = x3.view(1, n, g, group_size).to(cdt)  # no copy unless half precision

        # Pass 1: values per group and per-group sums -> global mean (G + 1 numbers).
        sums = x4.sum(dim=(0, 1, 3))
        buf = torch.cat([sums.new_full((1,), float(local_count)), sums])
        _all_reduce(buf, group, f"the group sums ({g + 1} numbers, forward)", layer)
        total = buf[0]
        if local_count <= 1:
            # A global count <= 1 implies a local one <= 1 on every rank, so every rank gets here
            # and raises together (nobody is left waiting). A device sync only in this rare case.
            total_count = int(total.item())
            if total_count <= 1:
                raise ValueError(
                    f"{_checks.label(layer)}: expected more than 1 value per group when "
                    "training, got "
                    f"{total_count} value(s) per group over the whole process group (world size "
                    f"{dist.get_world_size(group)}, num_groups={g}, this rank's input shape "
                    f"{tuple(x3.shape)} as (N, C, S)); use a larger batch, fewer groups, or "
                    "eval mode"
                )
        mean = buf[1:] / total

        # Pass 2: squared deviations about the global mean -> global variance (G numbers).
        centered = x4 - mean.view(1, 1, g, 1)
        sq = centered.square().sum(dim=(0, 1, 3))
        _all_reduce(sq, group, f"the squared deviations ({g} numbers, forward)", layer)
        var = sq / total
        rstd = torch.rsqrt(var + eps)

        if running_mean is not None and running_var is not None:
            # Identical on every rank: all inputs of this update are all-reduced values.
            unbiased = var * (total / (total - 1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        y4 = centered.mul_(rstd.view(1, 1, g, 1))
        y = y4.view(n, c, s)  # in-place affine through a view; y4 itself is returned
        if weight is not None:
            y.mul_(weight.to(cdt).view(1, c, 1))
        if bias is not None:
            y.add_(bias.to(cdt).view(1, c, 1))
        ctx.save_for_backward(x3, weight, mean, rstd, total)
        ctx.num_groups = g
        ctx.group, ctx.layer = group, layer
        # Never return a view made here: in-place ops on it (ReLU(inplace=True)) would be refused.
        return y4.to(x3.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            # Raised on every rank before any collective, so nobody is left waiting.
            raise RuntimeError(
                f"{_checks.label(ctx.layer)} does not support double backward (a backward with "
                "create_graph=True through the synchronized statistics). Use the per-rank "
                "BatchGroupNorm layers for gradient penalties and other higher-order gradients, "
                "or compute them in eval mode"
            )
        x3, weight, mean, rstd, total = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n, c, s = x3.shape
        g = ctx.num_groups
        cdt = compute_dtype(x3.dtype)
        view = (1, n, g, c * s // g)
        dyc = dy.contiguous().view(n, c, s).to(cdt)
        xhat = (x3.view(view).to(cdt) - mean.view(1, 1, g, 1)).mul_(rstd.view(1, 1, g, 1))
        dx = dw = db = None
        # Local weight/bias gradients (zeros on an empty rank, so DDP sees every parameter).
        if need_w and weight is not None:
            dw = (dyc * xhat.view(n, c, s)).sum(dim=(0, 2)).to(weight.dtype)
        if need_b:
            db = dyc.sum(dim=(0, 2)).to(dtype=dy.dtype if weight is None else weight.dtype)
        if need_x:
            gy = dyc * weight.to(cdt).view(1, c, 1) if weight is not None else dyc
            g4 = gy.view(view)
            sums = torch.cat([g4.sum(dim=(0, 1, 3)), (g4 * xhat).sum(dim=(0, 1, 3))])
            _all_reduce(sums, ctx.group, f"the gradient sums ({2 * g} numbers, backward)",
                        ctx.layer)
            m1 = (sums[:g] / total).view(1, 1, g, 1)
            m2 = (sums[g:] / total).view(1, 1, g, 1)
            dx = (g4 - m1).sub_(xhat.mul_(m2)).mul_(rstd.view(1, 1, g, 1))
            dx = dx.view(n, c, s).to(x3.dtype)
        return dx, dw, db, None, None, None, None, None, None, None


class SyncBatchGroupNorm(_BatchGroupNorm):
    r"""Batch Group Normalization with statistics over the whole batch of a process group.

    The layer of :class:`bgnorm.BatchGroupNorm2d` (same parameters, buffers, state dict,
    ``repr``, group layouts and running-statistics semantics) for any input (N, C, \*), with the
    batch statistics of the *global* batch: the concatenation of the inputs of all ranks of
    ``process_group``. Viewing each rank's input as (N_r, G, D/G):

    .. math::
        \mu_g = \frac{1}{M} \sum_r \sum_{n, j} x^{(r)}_{n,g,j}, \qquad
        \sigma^2_g = \frac{1}{M} \sum_r \sum_{n, j} (x^{(r)}_{n,g,j} - \mu_g)^2, \qquad
        M = \frac{D}{G} \sum_r N_r,

    then :math:`y = (x - \mu_g) / \sqrt{\sigma^2_g + \epsilon} \cdot \gamma_c + \beta_c` on every
    rank. Ranks may hold different batch sizes, including zero (an empty rank joins every
    collective with zeros and returns an empty output), without biasing the statistics. Counts
    are per value, so ranks may even hold different spatial sizes when groups are whole
    channels or bands.

    The running estimates are updated from the global statistics (variance stored unbiased with
    M / (M - 1); ``momentum=None`` is a cumulative average), identically on every rank.

    Communication per layer and training step: two all-reduces in the forward (G + 1 numbers:
    values per group and per-group sums; then G numbers: squared deviations about the global
    mean, a numerically stable two-pass variance) and one in the backward (2G numbers: the
    per-group sums of the closed-form input gradient). Weight and bias gradients stay local,
    as with :class:`torch.nn.SyncBatchNorm`: DDP reduces them. In eval mode, and in training
    when torch.distributed is not initialized or the group has one rank, the layer is plain
    BatchGroupNorm and never communicates.

    Every rank of the group must call the layer in training mode the same number of times with
    the same ``num_groups`` (as for any collective). If a rank dies or stalls, the others raise
    a ``RuntimeError`` naming this layer once the process group notices: at once for a closed
    connection, otherwise after the timeout given to ``init_process_group(timeout=...)``
    (with NCCL, the watchdog enforces the timeout and by default aborts the process).

    Double backward (``create_graph=True`` through a training-mode forward with
    synchronization) is not supported and raises a clear error on every rank.

    Args:
        num_features: C, the number of channels.
        num_groups: G, any divisor of D = C * prod(spatial). Default: 32.
        eps: added to the variance. Default: 1e-5.
        momentum: running-average factor, or None for a cumulative average. Default: 0.1.
        affine: learn per-channel gamma and beta. Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        process_group: the group to synchronize over; None: the default (world) group.
        device, dtype: of the parameters and buffers.
        bias (keyword-only): with ``affine=True``, learn beta too (``bias=False``: gamma only,
            as in torch's SyncBatchNorm). Default: True.

    Shape:
        - Input: (N, C, \*) with N >= 0 on each rank; Output: same shape.

    Example:
        >>> from bgnorm import BatchGroupNorm2d, SyncBatchGroupNorm
        >>> m = SyncBatchGroupNorm(64, num_groups=16)
        >>> m(torch.randn(8, 64, 7, 7)).shape  # no process group: local BGN, no communication
        torch.Size([8, 64, 7, 7])
        >>> net = nn.Sequential(nn.Conv2d(3, 64, 3), BatchGroupNorm2d(64, num_groups=16))
        >>> net = SyncBatchGroupNorm.convert_sync_batchgroupnorm(net)
        >>> type(net[1]).__name__, net[1].num_groups
        ('SyncBatchGroupNorm', 16)
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = DEFAULT_NUM_GROUPS,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        if isinstance(num_groups, str) and num_groups == "auto":
            raise ValueError(
                "SyncBatchGroupNorm: num_groups='auto' is not supported: the statistics see the "
                "global batch of the process group, which one rank's first input does not show, "
                "and every rank must choose the same G. Choose G with bgnorm.auto_groups(C, "
                "spatial_shape, batch_size=<global batch>) and pass it, or resolve a per-worker "
                "model's auto layers (bgnorm.resolve_groups) before synchronizing them")
        super().__init__(
            num_features, num_groups, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self._describe()}: expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self) -> Any:
        """The process group to synchronize over, or None when no communication is needed."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        group = self._sync_group()
        if group is None:  # no communication: a local BatchGroupNorm (checks kept per input)
            return super().forward(input)
        self._common_checks(input)
        rm, rv, _, factor = self._batch_norm_args()
        _checks.check_input(self._describe, input)
        _checks.check_eps(self._describe, self.eps, True)
        _checks.check_groups_divide(self._describe, input, self.num_groups)
        n, c = input.shape[0], input.shape[1]
        fmt = memory_format_of(input)  # y and dx keep a channels-last input's format
        x3 = contiguous_for(input, fmt).view(n, c, math.prod(input.shape[2:]))
        y = _SyncBatchGroupNormFunction.apply(
            x3, self.weight, self.bias, rm, rv, self.num_groups, self.eps, factor, group,
            self._describe,
        )
        self._record_layout(input)
        y = y.view(input.shape)
        return y if fmt is None else y.contiguous(memory_format=fmt)

    @classmethod
    def convert_sync_batchgroupnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every BatchGroupNorm1d/2d/3d in ``module`` by a :class:`SyncBatchGroupNorm`.

        The analogue of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, which knows only
        torch's BatchNorm classes and silently leaves BGN layers per-worker (call both on a model
        that mixes the two). The new layer takes over the old one's
        parameter and buffer tensors themselves (so optimizers and devices are unaffected),
        its hyper-parameters, group layout and training mode. GeneralBatchGroupNorm2d (whose
        statistics are per batch group by design) and layers that are already synchronized are
        left alone.

        Returns ``module``, modified in place, or a new layer when ``module`` itself is a
        BatchGroupNorm.

        Example:
            >>> from bgnorm import BatchGroupNorm1d, SyncBatchGroupNorm
            >>> net = nn.Sequential(nn.Linear(4, 8), BatchGroupNorm1d(8, num_groups=2))
            >>> net = SyncBatchGroupNorm.convert_sync_batchgroupnorm(net)
            >>> type(net[1]).__name__, net[1].num_groups
            ('SyncBatchGroupNorm', 2)
        """
        out = module
        if isinstance(module, _BatchGroupNormNd):
            out = cls(
                module.num_features, module.num_groups, module.eps, module.momentum,
                module.affine, module.track_running_stats, process_group,
                bias=module.bias is not None,
            )
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.layout_shape = module.layout_shape
            out._bgnorm_path = module._bgnorm_path
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchgroupnorm(child, process_group))
        return out
