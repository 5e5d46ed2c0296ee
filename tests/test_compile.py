"""torch.compile(fullgraph=True) of training steps and eval passes; no recompile for each new
batch size or image size."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch import nn

from bgnorm import BatchGroupNorm2d, GeneralBatchGroupNorm2d, PositionalNorm

pytestmark = pytest.mark.slow


def _net(norm):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


NORMS = {
    "whole": lambda: BatchGroupNorm2d(8, num_groups=2),    # whole channels
    "bands": lambda: BatchGroupNorm2d(8, num_groups=16),   # bands
    "straddle": lambda: BatchGroupNorm2d(8, num_groups=6),  # straddling
    "gbgn": lambda: GeneralBatchGroupNorm2d(8, 4, 2),
    "pn": lambda: PositionalNorm(8),
}


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_compiled_training_step_matches_eager(norm):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _net(norm())
    compiled_model = _net(norm())
    compiled_model.load_state_dict(eager.state_dict())
    counter = torch._dynamo.testing.CompileCounter()

    def step(model, x):
        loss = model(x).square().mean()
        loss.backward()
        return loss

    cmodel = torch.compile(compiled_model, fullgraph=True, backend=counter)
    for n in (4, 8, 6, 10):
        x = torch.randn(n, 3, 6, 6)
        le, lc = step(eager, x), step(cmodel, x)
        torch.testing.assert_close(lc, le)
        for pe, pc in zip(eager.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)
    for be, bc in zip(eager.buffers(), compiled_model.buffers()):
        torch.testing.assert_close(bc, be)
    assert counter.frame_count <= 2, "recompiled for every batch size"


def test_inductor_fullgraph_two_batch_sizes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _net(BatchGroupNorm2d(8, num_groups=4))
    ref = _net(BatchGroupNorm2d(8, num_groups=4))
    ref.load_state_dict(model.state_dict())
    cmodel = torch.compile(model, fullgraph=True)  # inductor, forward and backward graphs
    for n in (4, 8):
        x = torch.randn(n, 3, 6, 6)
        cmodel(x).square().mean().backward()
        ref(x).square().mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def _trained_pair(norm):
    """An eager model and a copy, both with running statistics moved off their init."""
    torch.manual_seed(0)
    eager = _net(norm())
    with torch.no_grad():
        for n in (4, 8):
            eager(torch.randn(n, 3, 6, 6) * 2 + 1)
    copy = _net(norm())
    copy.load_state_dict(eager.state_dict())
    return eager, copy


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_compiled_eval_matches_eager(norm):
    torch._dynamo.reset()
    eager, compiled_model = _trained_pair(norm)
    eager.eval()
    compiled_model.eval()
    counter = torch._dynamo.testing.CompileCounter()
    cmodel = torch.compile(compiled_model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for n in (4, 8, 6, 10):
            x = torch.randn(n, 3, 6, 6)
            torch.testing.assert_close(cmodel(x), eager(x))
    assert counter.frame_count <= 2, "recompiled for every batch size"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("groups", [2, 8, 16], ids=["whole", "bn", "bands"])
def test_compiled_new_image_sizes(groups, training):
    # a new spatial size makes dynamo trace S symbolically: the units plan must not need its
    # concrete value (it once called math.gcd on it, which fullgraph cannot trace)
    torch._dynamo.reset()
    eager, compiled_model = _trained_pair(lambda: BatchGroupNorm2d(8, num_groups=groups))
    eager.train(training)
    compiled_model.train(training)
    counter = torch._dynamo.testing.CompileCounter()
    cmodel = torch.compile(compiled_model, fullgraph=True, backend=counter)
    for size in (6, 8, 10, 12):
        x = torch.randn(4, 3, size, size)
        ye, yc = eager(x), cmodel(x)
        torch.testing.assert_close(yc, ye)
        if training:
            ye.square().mean().backward()
            yc.square().mean().backward()
            for pe, pc in zip(eager.parameters(), compiled_model.parameters()):
                torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)
    for be, bc in zip(eager.buffers(), compiled_model.buffers()):
        torch.testing.assert_close(bc, be)
    assert counter.frame_count <= 2, "recompiled for every image size"
