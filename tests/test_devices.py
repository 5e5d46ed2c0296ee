"""Every layer on tensors without data: the meta device (shape-only runs, deferred
initialization) and torch's FakeTensorMode (memory estimators, tracing tools), through every
training engine and group layout. These runs also check that no pass leaves a tensor of another
device or a fake tensor behind in a cache, which later real calls would pick up."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import ENGINES, set_engine
from torch._subclasses.fake_tensor import FakeTensorMode

import bgnorm
from bgnorm.ops import units
from bgnorm.ops.plan import units_plan

# (layer factory, input shape): whole channels, bands, straddling groups, BatchNorm, 1d (the
# columns layout), a large input (the units engine under "auto"), 3d, GBGN, PositionalNorm
CASES = {
    "whole": (lambda dev: bgnorm.BatchGroupNorm2d(64, 16, device=dev), (8, 64, 8, 8)),
    "bands": (lambda dev: bgnorm.BatchGroupNorm2d(16, 64, device=dev), (8, 16, 8, 8)),
    "straddling": (lambda dev: bgnorm.BatchGroupNorm2d(12, 8, device=dev), (8, 12, 8, 8)),
    "batchnorm": (lambda dev: bgnorm.BatchGroupNorm2d(16, 16, device=dev), (4, 16, 4, 4)),
    "1d": (lambda dev: bgnorm.BatchGroupNorm1d(128, 16, device=dev), (64, 128)),
    "large": (lambda dev: bgnorm.BatchGroupNorm2d(256, 32, device=dev), (600, 256, 4, 4)),
    "3d": (lambda dev: bgnorm.BatchGroupNorm3d(16, 4, device=dev), (4, 16, 2, 4, 4)),
    "gbgn": (lambda dev: bgnorm.GeneralBatchGroupNorm2d(16, 4, 2, device=dev), (8, 16, 4, 4)),
    "pn": (lambda dev: bgnorm.PositionalNorm(16, device=dev), (4, 16, 4, 4)),
}


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request):
    return set_engine(request, request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_meta_device(case):
    make, shape = CASES[case]
    m = make("meta")
    x = torch.randn(shape, device="meta", requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and y.device.type == "meta"
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    assert m.weight.grad.device.type == "meta"
    m.eval()
    assert m(x).shape == x.shape


@pytest.mark.parametrize("case", list(CASES))
def test_fake_mode_leaves_real_calls_real(case):
    """A run under FakeTensorMode first (with empty caches), then real calls of the same sizes
    on the same layer and on a fresh one: plain tensors with the right values."""
    make, shape = CASES[case]
    units_plan.cache_clear()  # the run below is the first of these sizes
    units._IDENTITY_STATS.clear()
    torch.manual_seed(0)
    m = make(None)
    state = copy.deepcopy(m.state_dict())
    with FakeTensorMode(allow_non_fake_inputs=True):
        xf = torch.randn(shape, requires_grad=True)
        m(xf).sum().backward()
        m.eval()
        m(xf)
    x = torch.randn(shape)
    for mode in ("train", "eval"):
        m.load_state_dict(state)  # set aside whatever the fake run left in the buffers
        y = m.train(mode == "train")(x)
        assert type(y) is torch.Tensor, f"{mode}: a real input gave {type(y).__name__}"
        ref = make(None)
        ref.load_state_dict(state)
        want = ref.train(mode == "train")(x)
        assert type(want) is torch.Tensor, f"{mode}: a fresh layer gave {type(want).__name__}"
        torch.testing.assert_close(y, want)
