r"""Recompute the running statistics of every batch-statistics norm in a model (for SWA).

:func:`torch.optim.swa_utils.update_bn` recomputes only torch's BatchNorm layers: on a model
with BatchGroupNorm it would leave their running statistics from the last training iterate,
which do not match the averaged weights. :func:`update_bn` is the same procedure for BatchNorm
and every layer of this package that keeps running statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import _BatchGroupNorm
from .small_batch import EvoNorm2dB0, _BatchRenorm

__all__ = ["update_bn"]


@torch.no_grad()
def update_bn(
    loader: Iterable[Any], model: nn.Module, device: int | str | torch.device | None = None
) -> None:
    r"""Recompute the running statistics of every BatchNorm (1d/2d/3d, SyncBatchNorm),
    BatchGroupNorm1d/2d/3d, GeneralBatchGroupNorm2d, SyncBatchGroupNorm, BatchRenorm1d/2d/3d
    and EvoNorm2dB0 (its running variance) in ``model`` with one pass over ``loader``, as
    :func:`torch.optim.swa_utils.update_bn` does for BatchNorm.

    Each such layer's running statistics are reset and its ``momentum`` set to None (a
    cumulative average), the model is put in training mode and run on every batch under
    ``torch.no_grad``; then the momenta and the model's training mode are restored. After K
    batches a layer holds, per group g,

    .. math::
        \hat\mu_g = \frac{1}{K} \sum_{k=1}^{K} \mu_g^{(k)}, \qquad
        \hat\sigma^2_g = \frac{1}{K} \sum_{k=1}^{K} \frac{n_k}{n_k - 1} \sigma^{2\,(k)}_g,

    with :math:`\mu^{(k)}, \sigma^{2\,(k)}` the batch statistics of batch k (n_k values per group;
    for GeneralBatchGroupNorm2d the average over its batch groups), and ``num_batches_tracked``
    = K. Layers with ``track_running_stats=False`` keep none. Frozen norms are not touched.

    Args:
        loader: an iterable of batches (e.g. a ``DataLoader``); each batch is a tensor, or a
            list or tuple whose first element is the model's input.
        model: the model; its training mode is restored on return.
        device: if given, each input is moved there before ``model`` is called.

    Example:
        >>> import bgnorm
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), bgnorm.BatchGroupNorm2d(8, num_groups=4))
        >>> loader = [(torch.randn(4, 3, 6, 6), 0) for _ in range(3)]
        >>> update_bn(loader, net)
        >>> int(net[1].num_batches_tracked), net[1].momentum
        (3, 0.1)
    """
    momenta: dict[nn.Module, float | None] = {}
    for module in model.modules():
        if isinstance(module, (_BatchNorm, _BatchGroupNorm, _BatchRenorm, EvoNorm2dB0)):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    # EvoNorm2dB0 keeps no batch count: its k-th batch gets momentum 1/k (the same average)
    seen: dict[nn.Module, int] = {}

    def cumulative(module: nn.Module, args: Any) -> None:
        seen[module] = seen.get(module, 0) + 1
        module.momentum = 1.0 / seen[module]

    hooks = [m.register_forward_pre_hook(cumulative) for m in momenta
             if isinstance(m, EvoNorm2dB0)]
    for module in momenta:
        module.momentum = None
    try:
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        # restored even when a batch fails (torch's own update_bn leaves momentum=None then)
        for hook in hooks:
            hook.remove()
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
