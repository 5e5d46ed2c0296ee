"""bgnorm.functional against float64 references written from the equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import ENGINES, bgn_eval_ref, bgn_ref, divisors, gbgn_ref, pn_ref, set_engine

from bgnorm import functional as BF
from bgnorm.ops.dispatch import force_engine


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request):
    """Run every test through each training engine and layout (see reference.ENGINES)."""
    return set_engine(request, request.param)

SHAPES = [(5, 6), (3, 6, 4), (2, 4, 3, 4), (3, 2, 2, 3, 2)]
CASES = [
    (shape, g) for shape in SHAPES for g in divisors(shape[1] * int(torch.Size(shape[2:]).numel()))
]


def _params(c, dtype=torch.float64):
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=dtype).requires_grad_()
    return w, b


def _grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


@pytest.mark.parametrize("shape,g", CASES, ids=[f"{s}-G{g}" for s, g in CASES])
def test_forward_backward_every_valid_g(shape, g):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    w, b = _params(shape[1])
    rm = torch.zeros(g, dtype=torch.float64)
    rv = torch.ones(g, dtype=torch.float64)
    y = BF.batch_group_norm(x, g, rm, rv, w, b, training=True, momentum=0.3)
    yr, mean, var = bgn_ref(x, g, w, b)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    for got, want in zip(_grads(y, (x, w, b), dy), _grads(yr, (x, w, b), dy)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    n = x.numel() // g
    torch.testing.assert_close(rm, 0.3 * mean.detach())
    torch.testing.assert_close(rv, 0.7 + 0.3 * var.detach() * n / (n - 1))
    # eval with those running statistics
    ye = BF.batch_group_norm(x, g, rm, rv, w, b, training=False)
    torch.testing.assert_close(ye, bgn_eval_ref(x, g, rm, rv, w, b), rtol=1e-10, atol=1e-10)
    for got, want in zip(
        _grads(ye, (x, w, b), dy), _grads(bgn_eval_ref(x, g, rm, rv, w, b), (x, w, b), dy)
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# whole channels, bands, straddling, BatchNorm, a single group
GRAD_CASES = [((3, 4, 2, 3), 2), ((3, 4, 2, 3), 8), ((3, 4, 2, 3), 3), ((3, 4, 2, 3), 4),
              ((2, 6, 5), 1), ((2, 6, 5), 10)]


@pytest.mark.parametrize("shape,g", GRAD_CASES)
def test_gradcheck_and_gradgradcheck(shape, g, engine):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, b = _params(shape[1])

    def fn(x, w, b):
        return BF.batch_group_norm(x, g, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    if engine not in ("units-bnstats", "units-columns"):  # double backward as units-gnstats
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradgradcheck_general_and_positional(engine):
    if engine in ("units-bnstats", "units-columns"):
        pytest.skip("same double-backward code as units-gnstats")
    x = torch.randn(4, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    w, b = _params(6)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: BF.general_batch_group_norm(x, 4, 2, None, None, w, b, True), (x, w, b)
    )
    assert torch.autograd.gradgradcheck(
        lambda x: BF.batch_group_norm(x, 4, None, None, None, None, True), (x,)
    )
    if engine == "general":  # engine-independent: torch's LayerNorm kernel
        assert torch.autograd.gradgradcheck(lambda x, w, b: BF.positional_norm(x, w, b),
                                            (x, w, b))


def test_g_equal_c_is_native_batch_norm_bit_for_bit():
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    w, b = _params(5)
    rm1, rv1 = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = BF.batch_group_norm(x, 5, rm1, rv1, w, b, True, 0.1, 1e-5)
    y2 = F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5)
    assert torch.equal(y1, y2) and torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    dy = torch.randn_like(y1)
    for g1, g2 in zip(_grads(y1, (x, w, b), dy), _grads(y2, (x, w, b), dy)):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("g", [2, 8, 3])
@pytest.mark.parametrize("e", [1, 2, 6])
def test_general_batch_group_norm(g, e):
    x = torch.randn(6, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    w, b = _params(4)
    rm = torch.zeros(g, dtype=torch.float64)
    rv = torch.ones(g, dtype=torch.float64)
    y = BF.general_batch_group_norm(x, g, e, rm, rv, w, b, True, 0.5)
    yr, mean, var = gbgn_ref(x, g, e, w, b)
    torch.testing.assert_close(y, yr)
    dy = torch.randn_like(y)
    for got, want in zip(_grads(y, (x, w, b), dy), _grads(yr, (x, w, b), dy)):
        torch.testing.assert_close(got, want)
    n = e * x[0].numel() // g
    torch.testing.assert_close(rm, 0.5 * mean.detach().mean(0))
    torch.testing.assert_close(rv, 0.5 + 0.5 * (var.detach() * n / (n - 1)).mean(0))
    if e == 6:
        torch.testing.assert_close(y, BF.batch_group_norm(x, g, None, None, w, b, True))


@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 5), (2, 3, 4, 5), (2, 3, 2, 2, 2)])
def test_positional_norm(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, b = _params(shape[1])
    y = BF.positional_norm(x, w, b)
    yr = pn_ref(x, w, b)
    torch.testing.assert_close(y, yr)
    dy = torch.randn_like(y)
    for got, want in zip(_grads(y, (x, w, b), dy), _grads(yr, (x, w, b), dy)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("g", [4, 16, 64, 6])  # whole channels, BN, bands, straddling
def test_large_offset_float32(g):
    """1e4 + N(0, 1): E[x^2] - E[x]^2 formulas lose every digit here."""
    x32 = 1e4 + torch.randn(8, 16, 6, 6)
    x64 = x32.double()
    w, b = _params(16)
    y = BF.batch_group_norm(x32.requires_grad_(), g, None, None, w.float(), b.float(), True)
    yr, _, _ = bgn_ref(x64.requires_grad_(), g, w, b)
    # float32 cannot hold the mean 1e4 closer than half an ulp (~5e-4): the round-off bound.
    # A cancelling E[x^2] - E[x]^2 would be off by O(1) here.
    bound = 4 * torch.finfo(torch.float32).eps * 1e4
    assert (y.double() - yr).abs().max() < bound
    dy = torch.randn_like(yr)
    (dx,) = torch.autograd.grad(y, x32, dy.float())
    (dxr,) = torch.autograd.grad(yr, x64, dy)
    assert (dx.double() - dxr).abs().max() / dxr.abs().max() < 1e-3


@pytest.mark.parametrize("g", [4, 16, 64, 6])  # whole channels, BN, bands, straddling
def test_large_offset_gradients_float32(g):
    """Every gradient at 1e4 + N(0, 1) with a +20 outlier every third element (so rows start
    at outliers: the general engine shifts its backward sums by each row's first element)
    stays at float32 round-off: measured <= 4e-5 of the largest gradient on every engine
    (an unshifted sum(dy * x) - mean * sum(dy) in the general engine: up to 1.1e-4)."""
    torch.manual_seed(0)
    x32 = 1e4 + torch.randn(8, 16, 6, 6)
    x32.view(8, 16, 36)[:, :, ::3] += 20.0
    w, b = _params(16)
    x = x32.clone().requires_grad_()
    w32, b32 = (p.detach().float().requires_grad_() for p in (w, b))
    y = BF.batch_group_norm(x, g, None, None, w32, b32, True)
    x64 = x32.double().requires_grad_()
    yr, _, _ = bgn_ref(x64, g, w, b)
    dy = torch.randn_like(yr)
    got = _grads(y, (x, w32, b32), dy.float())
    want = _grads(yr, (x64, w, b), dy)
    for name, a, r in zip(("dx", "dw", "db"), got, want):
        err = ((a.double() - r).abs().max() / r.abs().max()).item()
        assert err < 1e-4, f"{name}: {err:.1e}"


@pytest.mark.parametrize("g", [4, 16, 64, 6])
def test_large_offset_float32_in_eval(g):
    """Eval with running statistics near 1e4 stays at float32 round-off on every eval pass
    (channels, units, and the columns pass under the "units-columns" variant)."""
    x32 = 1e4 + torch.randn(8, 16, 6, 6)
    w, b = (p.detach() for p in _params(16))
    rm = 1e4 + torch.randn(g, dtype=torch.float64) * 0.1
    rv = torch.rand(g, dtype=torch.float64) + 0.5
    y = BF.batch_group_norm(x32, g, rm.float(), rv.float(), w.float(), b.float(), False)
    yr = bgn_eval_ref(x32.double(), g, rm.float().double(), rv.float().double(), w.float().double(),
                      b.float().double())
    bound = 2 * torch.finfo(torch.float32).eps * 1e4 * float(w.abs().max() / rv.min().sqrt())
    assert (y.double() - yr).abs().max() < bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [4, 16, 64, 6])
def test_half_precision(dtype, g):
    x = torch.randn(8, 16, 6, 6).to(dtype)
    w, b = (p.detach().float().requires_grad_() for p in _params(16))
    rm, rv = torch.zeros(g), torch.ones(g)
    xr = x.detach().requires_grad_()
    y = BF.batch_group_norm(xr, g, rm, rv, w, b, training=True)
    assert y.dtype == dtype and rm.dtype == torch.float32 and rv.dtype == torch.float32
    yr, mean, _ = bgn_ref(x.double(), g, w.double(), b.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (y.double() - yr).abs().max() < tol * 10
    torch.testing.assert_close(rm.double(), 0.1 * mean, rtol=1e-3, atol=1e-4)
    y.float().sum().backward()
    assert xr.grad.dtype == dtype and w.grad.dtype == torch.float32
    ye = BF.batch_group_norm(x, g, rm, rv, w, b, training=False)
    assert ye.dtype == dtype


@pytest.mark.parametrize("g", [4, 16, 64, 6])
def test_non_contiguous_and_channels_last(g):
    x = torch.randn(4, 16, 6, 6, dtype=torch.float64)
    want = BF.batch_group_norm(x, g, training=True)
    cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(BF.batch_group_norm(cl, g, training=True), want)
    nc = torch.randn(4, 6, 6, 16, dtype=torch.float64).permute(0, 3, 1, 2)
    torch.testing.assert_close(
        BF.batch_group_norm(nc, g, training=True),
        BF.batch_group_norm(nc.contiguous(), g, training=True),
    )


def test_empty_batch_in_eval():
    x = torch.randn(0, 8, 3, 3)
    y = BF.batch_group_norm(x, 4, torch.zeros(4), torch.ones(4), training=False)
    assert y.shape == x.shape


@pytest.mark.parametrize("g", [4, 16, 64, 6])
def test_outputs_allow_in_place_ops(g):
    """Outputs are never views made inside a custom Function: in-place ReLU must work."""
    x = torch.randn(4, 16, 6, 6, requires_grad=True)
    y = BF.batch_group_norm(x, g, training=True)
    torch.relu_(y).sum().backward()
    y2 = BF.positional_norm(x)
    torch.relu_(y2).sum().backward()
    y3 = BF.general_batch_group_norm(x, 4, 2, training=True)
    torch.relu_(y3).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_positional_norm_keeps_memory_format():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    cl = x.to(memory_format=torch.channels_last)
    y = BF.positional_norm(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, pn_ref(x))
    assert BF.positional_norm(x).is_contiguous()


# whole channels (2D, 3D, 4D: 2D and (N, C, 1) views take CUDA's channels-last reduction),
# bands, straddling groups; BGN and GBGN
SAVED_CASES = [((6, 8), 4, None), ((4, 6, 1), 3, None), ((3, 4, 2, 3), 2, None),
               ((3, 4, 2, 3), 8, None), ((3, 4, 2, 3), 3, None), ((4, 6, 5), 3, 2),
               ((4, 6, 2), 12, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,g,e", SAVED_CASES)
def test_engines_with_saved_statistics_reduction(shape, g, e, dtype, engine, request):
    """The native engines' backward with the argument form CUDA needs (saved statistics and a
    weight of ones, no running statistics: eval_reduction_devices=()) against the
    float64 reference on every device; with CUDA's form CPU must agree too, and on CUDA this
    is the form that runs (the eval-mode form failed there with "save_mean should always be
    defined", "tensor does not have a device" and empty weight gradients)."""
    if engine == "general":
        pytest.skip("no native reduction")
    forced = force_engine(eval_reduction_devices=())
    forced.__enter__()
    request.addfinalizer(lambda: forced.__exit__(None, None, None))
    x64 = torch.randn(shape, dtype=torch.float64) * 2 + 1
    x = x64.to(dtype).requires_grad_()
    w, b = (p.detach().to(torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
            for p in _params(shape[1]))
    if e is None:
        y = BF.batch_group_norm(x, g, None, None, w, b, training=True)
    else:
        y = BF.general_batch_group_norm(x, g, e, None, None, w, b, training=True)
    dy = torch.randn(shape, dtype=torch.float64)
    got = (y, *_grads(y, (x, w, b), dy.to(dtype)))
    x64r, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = gbgn_ref(x64r, g, shape[0] if e is None else e, w64, b64)[0]
    want = (yr, *_grads(yr, (x64r, w64, b64), dy))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for a, r in zip(got, want):
        assert a.shape == r.shape
        assert (a.double() - r).abs().max() <= tol * (1 + r.abs().max())
