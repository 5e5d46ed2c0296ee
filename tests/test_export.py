"""torch.export of every layer (how models are deployed: AOTInductor, ExecuTorch, ONNX), strict
and non-strict, in eval and training mode, with a dynamic batch dimension where the layout
allows one. The exported program must agree with eager at another batch size, running
statistics included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.export import Dim

import bgnorm

# (layer factory, input shape, dynamic batch): whole channels, bands, straddling groups, a
# large input with short units (eager eval takes the columns pass there), 1d, GBGN (batch a
# multiple of examples_per_group: static), PositionalNorm
CASES = {
    "whole": (lambda: bgnorm.BatchGroupNorm2d(16, 4), (8, 16, 4, 4), True),
    "bands": (lambda: bgnorm.BatchGroupNorm2d(16, 64), (8, 16, 4, 4), True),
    "straddling": (lambda: bgnorm.BatchGroupNorm2d(12, 8), (8, 12, 4, 4), True),
    "large": (lambda: bgnorm.BatchGroupNorm2d(600, 30), (64, 600, 4, 4), True),
    "1d": (lambda: bgnorm.BatchGroupNorm1d(64, 16), (32, 64), True),
    "gbgn": (lambda: bgnorm.GeneralBatchGroupNorm2d(16, 4, 2), (8, 16, 4, 4), False),
    "pn": (lambda: bgnorm.PositionalNorm(16), (4, 16, 4, 4), True),
}


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_eager(case, mode, strict):
    make, shape, dynamic = CASES[case]
    torch.manual_seed(0)
    m = make()
    x = torch.randn(shape)
    m(x)  # running statistics off their initial values
    m.train(mode == "train")
    ref = copy.deepcopy(m)
    dyn = {"input": {0: Dim("batch", min=2, max=1024)}} if dynamic else None
    ep = torch.export.export(m, (x,), strict=strict, dynamic_shapes=dyn)
    exported = ep.module()
    x2 = torch.randn((shape[0] * 2,) + shape[1:]) if dynamic else torch.randn(shape)
    torch.testing.assert_close(exported(x2), ref(x2))
    want = dict(ref.named_buffers())
    got = dict(exported.named_buffers())
    # strict export leaves out buffers the program does not use (num_batches_tracked in eval)
    assert {"running_mean", "running_var"} & want.keys() <= got.keys() <= want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=f"buffer {name}")


def test_compile_traces_the_engines_not_the_composition(monkeypatch):
    """torch.compile's tracing reports functorch's interpreter as active: the layers must still
    take their compiled path there (the fused general engine; PositionalNorm keeping
    channels-last), not the plain composition meant for torch.func transforms."""
    from bgnorm import functional as BF

    def composed(*args, **kwargs):
        raise AssertionError("the torch.func composition was traced under torch.compile")

    monkeypatch.setattr(BF, "grouped_norm_composed", composed)
    torch._dynamo.reset()
    m = torch.compile(bgnorm.BatchGroupNorm2d(64, 16), fullgraph=True, backend="eager")
    x = torch.randn(8, 64, 8, 8, requires_grad=True)
    m(x).sum().backward()
    pn = torch.compile(bgnorm.PositionalNorm(16), fullgraph=True, backend="eager")
    xc = torch.randn(2, 16, 4, 4).to(memory_format=torch.channels_last)
    assert pn(xc).is_contiguous(memory_format=torch.channels_last)
