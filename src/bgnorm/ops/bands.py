"""The bands engine: BGN with G a multiple of C (each channel cut into k = G/C contiguous
bands) is torch's batch norm on the (N, G, D/G) view with gamma/beta repeated per band,
forward and backward, running statistics included (unbiased, n = N*D/G)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["bands_norm"]


def bands_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    """BGN of contiguous ``x`` (N, C, \\*) with ``num_groups`` = k * C groups (k bands per
    channel) in training: native batch norm on the (N, G, D/G) view; updates the running
    statistics in place like :func:`torch.nn.functional.batch_norm`. Returns y of x's shape.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 8, 6, 6)
        >>> bands_norm(x, 16, None, None, None, None, 0.1, 1e-5).shape
        torch.Size([4, 8, 6, 6])
    """
    n, c = x.shape[:2]
    k = num_groups // c
    return F.batch_norm(
        x.reshape(n, num_groups, -1), running_mean, running_var,
        None if weight is None else weight.repeat_interleave(k),
        None if bias is None else bias.repeat_interleave(k), True, momentum, eps,
    ).view(x.shape)
