"""The channels engine: BGN with groups of whole channels (C a multiple of G) in few native
calls, the faster choice on small inputs where per-call overhead dominates."""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .composed import differentiable_grads
from .plan import compute_dtype, units_plan
from .units import _cast, _identity_stats, _row_sums_saved, _unsafe_view

__all__ = ["ChannelGroupsFunction", "channel_groups_norm"]


class ChannelGroupsFunction(torch.autograd.Function):
    """BGN with groups of k = C/G whole channels in few native calls (the small-tensor path).

    On the (N, G, k*S) view each group is one "channel" of torch's batch norm, so
    ``native_batch_norm`` in training mode (no affine) gives x-hat, the (G,) statistics and the
    running-statistics update (unbiased, n = N*D/G) exactly; the per-channel affine follows in
    place. Backward: dx from ``native_batch_norm_backward`` in training mode on the same view
    with grad ``dy * gamma_c``; gamma's and beta's gradients from its reduction on the (N, C, S)
    view with each channel's group statistics. Saves x and the (G,) statistics. Fewer, heavier
    kernels than :class:`NativeGroupedNormFunction`: the faster choice when per-call overhead
    dominates. Takes x (N, C, *) contiguous as it is and returns y of its shape, so autograd
    records no view nodes around it (each costs as much as a small kernel).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_groups, momentum, eps):  # type: ignore[override]
        n, c = x.shape[:2]
        s = x.numel() // (n * c) if n * c else 0
        xhat, mean, invstd = torch.native_batch_norm(
            x.view(n, num_groups, -1), None, None, running_mean, running_var, True, momentum,
            eps,
        )
        y = xhat  # never a view made here: returned through _unsafe_view
        if weight is not None or bias is not None:
            xh3 = xhat.view(n, c, s)
            same = (weight is None or weight.dtype == xhat.dtype) and (
                bias is None or bias.dtype == xhat.dtype)
            if same and dispatch.channels_affine_kernel(s):
                # y = xhat * gamma_c + beta_c by torch's eval-mode batch norm with zero means
                # and unit variances (eps = 0: its scale is gamma, its shift beta, exactly):
                # its per-channel kernel is 2-3x faster on CPU than a broadcast addcmul
                zeros, ones = _identity_stats(c, xhat.dtype, xhat.device)
                y = torch.batch_norm(xh3, weight, bias, zeros, ones, False, 0.0, 0.0, False)
            else:
                w = weight.view(1, c, 1) if weight is not None else None
                b = bias.view(1, c, 1) if bias is not None else None
                if same and w is not None and b is not None:
                    # in place over x-hat (a fresh buffer that backward does not keep)
                    y = torch.addcmul(b, xh3, w, out=xh3)
                else:  # gamma or beta alone, or parameters of another dtype (half input)
                    y = torch.addcmul(b, xh3, w) if (w is not None and b is not None) else (
                        xh3 * w if w is not None else xh3 + b)
                    y = _cast(y, x)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.num_groups = eps, num_groups
        return _unsafe_view(y, x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, mean, invstd = ctx.saved_tensors
        n, c = x.shape[:2]
        s = x.numel() // (n * c) if n * c else 0
        g = ctx.num_groups
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            view = (1, n, g, c * s // g)
            dx, dw, db = differentiable_grads(x.view(n, c, s), weight, bias, view, ctx.eps, dy)
            dx = None if dx is None else dx.reshape(x.shape)
            return dx, dw, db, None, None, None, None, None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # half inputs: the backward runs in float32 (no cast op calls otherwise: each costs
        # microseconds, as much as these small layers' kernels)
        cdt = compute_dtype(x.dtype)
        dy3 = (dy if dy.is_contiguous() else dy.contiguous()).view(n, c, s)
        x3 = x.view(n, c, s)
        if dy3.dtype != cdt:
            dy3, x3 = dy3.to(cdt), x3.to(cdt)
        if mean.dtype != cdt:
            mean, invstd = mean.to(cdt), invstd.to(cdt)
        dx = dw = db = None
        if need_x:
            dxh = dy3 * weight.view(1, c, 1) if weight is not None else dy3
            dx = torch.ops.aten.native_batch_norm_backward(
                dxh.view(n, g, -1), x3.view(n, g, -1), None, None, None, mean, invstd, True,
                ctx.eps, [True, False, False],
            )[0].view(x.shape)
            dx = _cast(dx, x)
        if need_w or need_b:
            # sum(dy * xhat) and sum(dy) per channel: the training-mode reduction with the
            # saved (mean, invstd) of each channel's group
            plan = units_plan(n, c, s, g, 1)  # whole channels: rows are channels
            mean_c, invstd_c = plan.groups_to_rows(torch.stack((mean, invstd))).unbind(0)
            if dispatch.eval_reduction(x3.device):
                _, s_dyx, s_dy = torch.ops.aten.native_batch_norm_backward(
                    dy3, x3, None, None, None, mean_c, invstd_c, True, 0.0, [False, True, True]
                )
            else:  # CUDA allocates the weight gradients like its weight: one is needed
                s_dyx, s_dy = _row_sums_saved(dy3, x3, mean_c, invstd_c)
            dw = _cast(s_dyx, weight) if need_w else None
            db = _cast(s_dy, bias) if need_b else None
        return dx, dw, db, None, None, None, None, None


def channel_groups_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    """Apply :class:`ChannelGroupsFunction` (C divisible by G) to ``x`` (N, C, *) (made
    contiguous); returns y of x's shape and updates the running statistics in place like
    torch's batch norm."""
    return ChannelGroupsFunction.apply(
        x.contiguous(), weight, bias, running_mean, running_var, num_groups, momentum, eps
    )
