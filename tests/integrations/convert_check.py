"""The conversion check run on each framework's models: BN -> BGN, then training steps, eval,
a state-dict round trip and torch.export."""

from __future__ import annotations

import copy

import torch
from torch import nn

import bgnorm


def check_converted(model: nn.Module, x: torch.Tensor, output=lambda out: out,
                    groups=lambda c: max(1, c // 4), export: bool = True) -> None:
    torch.manual_seed(0)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn > 0
    model = bgnorm.convert_norm(model, "bgn", num_groups=groups)
    bgn_types = (bgnorm.BatchGroupNorm1d, bgnorm.BatchGroupNorm2d, bgnorm.BatchGroupNorm3d)
    assert sum(isinstance(m, bgn_types) for m in model.modules()) == n_bn
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        out = output(model(x))
        loss = out.float().square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    model.eval()
    with torch.no_grad():
        want = output(model(x))
    assert torch.isfinite(want).all()
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.data.normal_()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(output(clone(x)), want, rtol=0, atol=0)
    if export:
        class Wrapped(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, inp):
                return output(self.inner(inp))

        exported = torch.export.export(Wrapped(model).eval(), (x,)).module()
        torch.testing.assert_close(exported(x), want, rtol=1e-5, atol=1e-5)
