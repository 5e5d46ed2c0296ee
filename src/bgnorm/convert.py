"""Swap the BatchNorm layers of any model for another norm of the registry."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import canonical_name, make_norm

__all__ = ["convert_norm"]

_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _replacement(bn: _BatchNorm, key: str, kwargs: dict[str, Any]) -> nn.Module:
    kw = dict(kwargs)
    if key in ("bn", "bgn"):
        kw.setdefault("dim", next((d for cls, d in _DIMS.items() if isinstance(bn, cls)), 2))
    if key in ("bn", "bgn", "gbgn"):
        kw.setdefault("momentum", bn.momentum)
        kw.setdefault("track_running_stats", bn.track_running_stats)
    if key != "none":
        kw.setdefault("eps", bn.eps)
        kw.setdefault("affine", bn.affine)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = make_norm(key, bn.num_features, **kw)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old, cur = getattr(bn, name, None), getattr(new, name, None)
            if isinstance(old, nn.Parameter) and isinstance(cur, nn.Parameter):
                cur.copy_(old)
                cur.requires_grad_(old.requires_grad)
        # Running statistics carry over only where they mean the same thing (G = C).
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            old, cur = getattr(bn, name, None), getattr(new, name, None)
            if isinstance(old, torch.Tensor) and isinstance(cur, torch.Tensor) and (
                old.shape == cur.shape
            ):
                cur.copy_(old)
    new.train(bn.training)
    return new


def convert_norm(module: nn.Module, name: str, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``module`` by ``make_norm(name)``.

    gamma/beta are copied (with their ``requires_grad``), and the new layers get the old
    layer's device, dtype, training mode, ``eps`` (and for bn/bgn/gbgn ``momentum`` and
    ``track_running_stats``) unless given in ``kwargs``. Running statistics are copied only
    when they keep their meaning (same shape, e.g. BGN with G = C). Keyword values may be
    callables of ``num_features`` (``num_groups=lambda c: c // 16``). SyncBatchNorm becomes the
    2d variant unless ``dim=`` says otherwise.

    Returns the converted model: ``module`` itself, modified in place, or a new module when the
    root is a BatchNorm. Warns when there is nothing to convert.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = convert_norm(net, "bgn", num_groups=4)
        >>> type(net[1]).__name__
        'BatchGroupNorm2d'
    """
    key = canonical_name(name)
    count = 0

    def walk(parent: nn.Module) -> None:
        nonlocal count
        for child_name, child in parent.named_children():
            if isinstance(child, _BatchNorm):
                setattr(parent, child_name, _replacement(child, key, kwargs))
                count += 1
            else:
                walk(child)

    if isinstance(module, _BatchNorm):
        return _replacement(module, key, kwargs)
    walk(module)
    if count == 0:
        warnings.warn(
            f"convert_norm: {type(module).__name__} has no BatchNorm layer to convert to "
            f"{key!r}; the model is returned unchanged",
            stacklevel=2,
        )
    return module
