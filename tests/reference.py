"""float64 references written directly from the equations (no bgnorm code)."""

from __future__ import annotations

import torch


def affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def gbgn_ref(x, num_groups, examples_per_group, weight=None, bias=None, eps=1e-5):
    """Eq. 8-9 per batch group: x as (N/e, e, G, D/G); mean and biased var over axes 1, 3."""
    n = x.shape[0]
    e = examples_per_group
    xv = x.reshape(n // e, e, num_groups, -1)
    mean = xv.sum(dim=(1, 3), keepdim=True) / (e * xv.shape[3])
    var = ((xv - mean) ** 2).sum(dim=(1, 3), keepdim=True) / (e * xv.shape[3])
    y = ((xv - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return affine(y, weight, bias), mean.reshape(n // e, num_groups), var.reshape(
        n // e, num_groups
    )


def bgn_ref(x, num_groups, weight=None, bias=None, eps=1e-5):
    y, mean, var = gbgn_ref(x, num_groups, x.shape[0], weight, bias, eps)
    return y, mean[0], var[0]


def bgn_eval_ref(x, num_groups, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    xv = x.reshape(x.shape[0], num_groups, -1)
    y = (xv - running_mean.reshape(1, -1, 1)) / torch.sqrt(running_var.reshape(1, -1, 1) + eps)
    return affine(y.reshape(x.shape), weight, bias)


def pn_ref(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def divisors(d: int) -> list[int]:
    return [g for g in range(1, d + 1) if d % g == 0]


#: Every training engine and layout the tests run each case through (names of
#: bgnorm.ops.dispatch.force_engine): the few-calls batch-norm engines, the units engine with
#: each statistics kernel and with the columns layout, and the closed-form general engine (the
#: torch.compile path).
ENGINES = ["batchnorm", "units-bnstats", "units-gnstats", "units-columns", "general"]


def set_engine(request, name: str) -> str:
    """Force the engine ``name`` (one of :data:`ENGINES`) for the rest of a test: enters
    ``force_engine(name)`` and leaves it when ``request`` (the test's or a fixture's pytest
    request) finishes."""
    from bgnorm.ops.dispatch import force_engine

    forced = force_engine(name)
    forced.__enter__()
    request.addfinalizer(lambda: forced.__exit__(None, None, None))
    return name
