"""The layers under torch.func transforms (grad, grad of grad, vmap, jvp), as MAML-style
few-shot training and model ensembles use them. Like BatchNorm there, training needs
``track_running_stats=False`` (torch.func.replace_all_batch_norm_modules_ does that for
BatchNorm): a transform cannot update a captured buffer in place."""

from __future__ import annotations

import pytest
import torch
from reference import ENGINES, set_engine
from torch import nn
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import bgnorm

# (norm factory, input shape): whole channels (the small-input Function), bands, straddling
# groups, a large input (the units engine), 1d (columns), 3d, GBGN, PositionalNorm
CASES = {
    "whole": (lambda **k: bgnorm.BatchGroupNorm2d(16, 4, **k), (8, 16, 4, 4)),
    "bands": (lambda **k: bgnorm.BatchGroupNorm2d(16, 64, **k), (8, 16, 4, 4)),
    "straddling": (lambda **k: bgnorm.BatchGroupNorm2d(12, 8, **k), (8, 12, 4, 4)),
    "large": (lambda **k: bgnorm.BatchGroupNorm2d(600, 30, **k), (64, 600, 4, 4)),
    "1d": (lambda **k: bgnorm.BatchGroupNorm1d(64, 16, **k), (32, 64)),
    "3d": (lambda **k: bgnorm.BatchGroupNorm3d(8, 4, **k), (4, 8, 2, 3, 3)),
    "gbgn": (lambda **k: bgnorm.GeneralBatchGroupNorm2d(16, 4, 2, **k), (8, 16, 4, 4)),
    "pn": (lambda **k: bgnorm.PositionalNorm(16), (4, 16, 4, 4)),
}


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request):
    """Forced engines too: under a transform every one gives way to the composition."""
    return set_engine(request, request.param)


def _model(case: str, **kw) -> tuple[nn.Module, torch.Tensor]:
    make, shape = CASES[case]
    torch.manual_seed(0)
    norm = make(**kw)
    lin = nn.Linear(shape[1], shape[1], dtype=torch.float64)
    model = nn.Sequential(_ChannelMix(lin), norm.double()).double()
    return model, torch.randn(shape, dtype=torch.float64)


class _ChannelMix(nn.Module):
    """A per-position linear map over channels, so gradients flow into parameters upstream."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.movedim(1, -1)).movedim(-1, 1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_grad_and_grad_of_grad_match_autograd(case, mode):
    if mode == "train":
        model, x = _model(case, track_running_stats=False)
    else:
        model, x = _model(case)
        model.train()(x)  # running statistics off their initial values
        model.eval()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss(p):
        return functional_call(model, (p, buffers), (x,)).pow(3).mean()

    got = grad(loss)(params)
    want = torch.autograd.grad(loss(params), list(params.values()), create_graph=True)
    for g, w in zip(got.values(), want):
        torch.testing.assert_close(g, w)

    # second order (MAML): the gradient of the summed gradient
    got2 = grad(lambda p: sum(v.sum() for v in grad(loss)(p).values()))(params)
    want2 = torch.autograd.grad(sum(w.sum() for w in want), list(params.values()))
    for g, w in zip(got2.values(), want2):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_over_an_ensemble(case):
    models = [_model(case, track_running_stats=False)[0] for _ in range(3)]
    for i, m in enumerate(models):  # distinct members
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * i)
    x = _model(case, track_running_stats=False)[1]
    params, buffers = stack_module_state(models)
    base = models[0]

    def run(p, b, inp):
        return functional_call(base, (p, b), (inp,))

    got = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(got[i], m(x))


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_matches_double_backward(case):
    model, x = _model(case, track_running_stats=False)
    v = torch.randn_like(x)
    _, got = jvp(model, (x,), (v,))
    # reference: J v through autograd (the double-backward trick, with the engines' Functions)
    _, want = torch.autograd.functional.jvp(model, x, v)
    torch.testing.assert_close(got, want)
