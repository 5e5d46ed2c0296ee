"""Batch Renormalization, FRN+TLU, EvoNorm-S0/B0 and Weight Standardization against float64
references written here from the papers' equations: outputs, input and parameter gradients
(autograd on the reference), running statistics and eval outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bgnorm
from bgnorm.small_batch import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
    renorm_limits,
    set_renorm_limits,
)
from bgnorm.weight_std import (
    StdConv1d,
    StdConv2d,
    StdConv3d,
    WeightStandardization,
    standardize_weights,
)

TOL = {"rtol": 1e-9, "atol": 1e-10}


def per_channel(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (dims - 2))


# -- references ---------------------------------------------------------------------------------
def brn_ref(x, gamma, beta, running_mean, running_var, r_max, d_max, eps, e=None,
            stop_gradient=True):
    """Ioffe 2017, Algorithm 1, per group of e examples; returns y, the batch statistics
    (mean, biased var, each (groups, C)) and r, d."""
    n, c = x.shape[:2]
    e = e or n
    xv = x.reshape(n // e, e, c, -1)
    mean = xv.mean(dim=(1, 3), keepdim=True)
    var = ((xv - mean) ** 2).mean(dim=(1, 3), keepdim=True)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var.reshape(1, 1, c, 1) + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mean - running_mean.reshape(1, 1, c, 1)) / sigma, -d_max, d_max)
    if stop_gradient:
        r, d = r.detach(), d.detach()
    xhat = (xv - mean) / sigma_b * r + d
    y = xhat.reshape(x.shape)
    if gamma is not None:
        y = y * per_channel(gamma, x.dim())
    if beta is not None:
        y = y + per_channel(beta, x.dim())
    return y, mean.reshape(-1, c), var.reshape(-1, c), r.reshape(-1, c), d.reshape(-1, c)


def frn_ref(x, gamma, beta, tau, eps):
    """Singh & Krishnan 2020, Eq. 1-3: nu^2 the mean square over the spatial extent."""
    dims = tuple(range(2, x.dim()))
    nu2 = (x * x).mean(dim=dims, keepdim=True) if dims else x * x
    y = per_channel(gamma, x.dim()) * x / torch.sqrt(nu2 + eps) + per_channel(beta, x.dim())
    return y if tau is None else torch.max(y, per_channel(tau, x.dim()).expand_as(y))


def evo_s0_ref(x, v, gamma, beta, groups, eps):
    """Liu et al. 2020, EvoNorm-S0: x * sigmoid(v x) / group_std(x)."""
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    mean = xg.mean(dim=(2, 3, 4), keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    std = torch.sqrt(var + eps).expand_as(xg).reshape(x.shape)
    num = x * torch.sigmoid(per_channel(v, 4) * x)
    return num / std * per_channel(gamma, 4) + per_channel(beta, 4)


def evo_b0_ref(x, v, gamma, beta, eps, batch_var=None, e=None):
    """Liu et al. 2020, EvoNorm-B0: x / max(batch_std, v x + instance_std); batch variance over
    (e, H, W) per group of e examples unless ``batch_var`` (eval: the running one) is given.
    Returns y and the batch variance (groups, C) (None in eval)."""
    n, c, h, w = x.shape
    if batch_var is None:
        e = e or n
        xv = x.reshape(n // e, e, c, h * w)
        mean = xv.mean(dim=(1, 3), keepdim=True)
        var = ((xv - mean) ** 2).mean(dim=(1, 3), keepdim=True)
        batch_std = torch.sqrt(var + eps).expand(n // e, e, c, 1).reshape(n, c, 1, 1)
        out_var = var.reshape(-1, c)
    else:
        batch_std = torch.sqrt(per_channel(batch_var, 4) + eps)
        out_var = None
    imean = x.mean(dim=(2, 3), keepdim=True)
    ivar = ((x - imean) ** 2).mean(dim=(2, 3), keepdim=True)
    right = per_channel(v, 4) * x + torch.sqrt(ivar + eps)
    y = x / torch.max(batch_std.expand_as(x), right) * per_channel(gamma, 4) \
        + per_channel(beta, 4)
    return y, out_var


def ws_ref(weight, eps):
    """Qiao et al. 2019, Eq. 5-6: per output channel over the fan-in, biased variance."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(weight.shape)


def _random_params(module: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)


def _grads(out: torch.Tensor, dy: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, dy, allow_unused=True))


# -- Batch Renormalization ------------------------------------------------------------------------
BRN_SHAPES = [(BatchRenorm1d, (8, 6)), (BatchRenorm1d, (8, 6, 5)), (BatchRenorm2d, (6, 5, 4, 3)),
              (BatchRenorm3d, (4, 3, 2, 3, 4))]


@pytest.mark.parametrize("cls,shape", BRN_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("limits", [(1.3, 0.4), (math.inf, math.inf)])
@pytest.mark.parametrize("e", [None, 2])
def test_batch_renorm_matches_the_paper(cls, shape, momentum, limits, e):
    """Three training steps (running statistics move away from 0/1, so r and d matter), each
    checked: output, gradients of x, gamma, beta with r and d constants, running statistics;
    then eval = BatchNorm's eval with the running statistics."""
    torch.manual_seed(0)
    r_max, d_max = limits
    m = cls(shape[1], momentum=momentum, r_max=r_max, d_max=d_max,
            examples_per_group=e).double()
    _random_params(m)
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    clipped = False
    for step in range(1, 4):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
        dy = torch.randn(shape, dtype=torch.float64)
        y = m(x)
        g = _grads(y, dy, [x, m.weight, m.bias])
        xr = x.detach().clone().requires_grad_()
        gamma = m.weight.detach().clone().requires_grad_()
        beta = m.bias.detach().clone().requires_grad_()
        yr, mean, var, r, d = brn_ref(xr, gamma, beta, rm, rv, r_max, d_max, 1e-5, e)
        gr = _grads(yr, dy, [xr, gamma, beta])
        torch.testing.assert_close(y, yr, **TOL)
        for a, b in zip(g, gr):
            torch.testing.assert_close(a, b, **TOL)
        clipped |= bool((r == r_max).any() or (r == 1 / r_max).any() or (d.abs() == d_max).any())
        count = (e or shape[0]) * math.prod(shape[2:])
        factor = momentum if momentum is not None else 1 / step
        rm = (1 - factor) * rm + factor * mean.mean(0)
        rv = (1 - factor) * rv + factor * (var * count / (count - 1)).mean(0)
        torch.testing.assert_close(m.running_mean, rm, **TOL)
        torch.testing.assert_close(m.running_var, rv, **TOL)
        assert int(m.num_batches_tracked) == step
    assert clipped == math.isfinite(r_max)  # the finite limits were reached: clipping tested
    m.eval()
    x = torch.randn(shape, dtype=torch.float64)
    expected = (x - per_channel(rm, x.dim())) / torch.sqrt(per_channel(rv, x.dim()) + 1e-5) \
        * per_channel(m.weight, x.dim()) + per_channel(m.bias, x.dim())
    torch.testing.assert_close(m(x), expected, **TOL)


def test_batch_renorm_gradients_treat_r_and_d_as_constants():
    """Gradients through r and d (the paper's stop-gradient left out) differ from the layer's."""
    torch.manual_seed(0)
    m = BatchRenorm2d(4, r_max=math.inf, d_max=math.inf).double()
    with torch.no_grad():
        m.running_mean.fill_(0.5)
        m.running_var.fill_(2.0)
    x = (torch.randn(3, 4, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    dy = torch.randn_like(x)
    (gx,) = _grads(m(x), dy, [x])
    xr = x.detach().clone().requires_grad_()
    rm, rv = torch.full((4,), 0.5, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64)
    (g_stop,) = _grads(brn_ref(xr, None, None, rm, rv, math.inf, math.inf, 1e-5)[0], dy, [xr])
    (g_through,) = _grads(brn_ref(xr, None, None, rm, rv, math.inf, math.inf, 1e-5,
                                  stop_gradient=False)[0], dy, [xr])
    torch.testing.assert_close(gx, g_stop, **TOL)
    assert (gx - g_through).abs().max() > 1e-3


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,bn_cls,shape", [(BatchRenorm1d, nn.BatchNorm1d, (8, 6)),
                                              (BatchRenorm2d, nn.BatchNorm2d, (4, 6, 3, 3)),
                                              (BatchRenorm3d, nn.BatchNorm3d, (2, 3, 2, 2, 2))])
def test_batch_renorm_with_r_max_1_d_max_0_is_batchnorm_bit_for_bit(cls, bn_cls, shape,
                                                                    momentum):
    torch.manual_seed(0)
    brn = cls(shape[1], momentum=momentum, r_max=1.0, d_max=0.0).double()
    bn = bn_cls(shape[1], momentum=momentum).double()
    _random_params(brn)
    bn.load_state_dict(brn.state_dict())
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64).requires_grad_()
        dy = torch.randn(shape, dtype=torch.float64)
        ga = _grads(brn(x), dy, [x, brn.weight, brn.bias])
        gb = _grads(bn(x), dy, [x, bn.weight, bn.bias])
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)
    for name, buf in bn.state_dict().items():
        assert torch.equal(brn.state_dict()[name], buf), name
    brn.eval(), bn.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(brn(x), bn(x))


def test_batch_renorm_without_running_stats_is_batchnorm_and_empty_batches_as_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    brn, bn = BatchRenorm2d(3, track_running_stats=False), nn.BatchNorm2d(3,
                                                                           track_running_stats=False)
    assert brn.running_mean is None and set(brn.state_dict()) == set(bn.state_dict())
    assert torch.equal(brn(x), bn(x))
    assert torch.equal(brn.eval()(x), bn.eval()(x))
    # an empty batch: empty output, running statistics unchanged, zero parameter gradients
    brn = BatchRenorm2d(3)
    y = brn(torch.randn(0, 3, 5, 5, requires_grad=True))
    y.sum().backward()
    assert y.shape == (0, 3, 5, 5) and torch.equal(brn.weight.grad, torch.zeros(3))
    assert torch.equal(brn.running_mean, torch.zeros(3)) and int(brn.num_batches_tracked) == 1


def test_batch_renorm_loads_batchnorm_checkpoints_and_half_precision():
    bn = nn.BatchNorm2d(8, bias=False)
    brn = BatchRenorm2d(8, bias=False)
    brn.load_state_dict(bn.state_dict(), strict=True)
    assert "bias=False" in repr(brn) and "r_max=3.0, d_max=5.0" in repr(brn)
    torch.manual_seed(0)
    m = BatchRenorm2d(8)
    m.running_mean.fill_(0.2)
    x = torch.randn(4, 8, 5, 5)
    ref = BatchRenorm2d(8)
    ref.load_state_dict(m.state_dict())
    expected = ref(x)
    for dtype in (torch.bfloat16, torch.float16):
        m.load_state_dict(ref.state_dict() | {"running_mean": torch.full((8,), 0.2),
                                              "running_var": torch.ones(8)})
        m.num_batches_tracked.zero_()
        y = m(x.to(dtype))
        assert y.dtype == dtype and m.running_var.dtype == torch.float32
        torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.05)


def test_renorm_limits_ramp_and_set_renorm_limits():
    assert renorm_limits(0) == (1.0, 0.0)
    assert renorm_limits(5000) == (1.0, 0.0)
    r, d = renorm_limits(15000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(5 * 10000 / 20000)
    assert renorm_limits(25000)[1] == 5.0 and renorm_limits(40000) == (3.0, 5.0)
    assert renorm_limits(10**7) == (3.0, 5.0)
    assert renorm_limits(2, warmup_steps=0, r_max=2.0, r_max_step=4, d_max=1.0,
                         d_max_step=8) == (1.5, 0.25)
    model = nn.Sequential(BatchRenorm2d(3), nn.Sequential(BatchRenorm1d(3)), nn.BatchNorm2d(3))
    assert set_renorm_limits(model, 2.0, 1.0) == 2
    assert (model[0].r_max, model[1][0].d_max) == (2.0, 1.0)


# -- FRN ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,shape", [(FilterResponseNorm1d, (5, 6)),
                                       (FilterResponseNorm1d, (5, 6, 7)),
                                       (FilterResponseNorm2d, (3, 4, 5, 6)),
                                       (FilterResponseNorm3d, (2, 3, 2, 3, 4))])
@pytest.mark.parametrize("tlu", [True, False])
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_filter_response_norm_matches_the_paper(cls, shape, tlu, learnable_eps):
    torch.manual_seed(0)
    m = cls(shape[1], tlu=tlu, learnable_eps=learnable_eps).double()
    _random_params(m)
    with torch.no_grad():
        if m.tau is not None:
            m.tau.sub_(1.0)  # thresholds between -0.5 and 0.5: both sides of max() are used
        if m.eps_learned is not None:
            m.eps_learned.fill_(-0.3)  # |eps_l|: a negative value counts as positive
    x = (torch.randn(shape, dtype=torch.float64) + 0.3).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    params = [p for p in (m.weight, m.bias, m.tau, m.eps_learned) if p is not None]
    y = m(x)
    g = _grads(y, dy, [x, *params])
    ref = [x.detach().clone().requires_grad_()] + [p.detach().clone().requires_grad_()
                                                   for p in params]
    gamma, beta = ref[1], ref[2]
    tau = ref[3] if tlu else None
    eps = 1e-5 + (ref[-1].abs() if learnable_eps else 0.0)
    yr = frn_ref(ref[0], gamma, beta, tau, eps)
    torch.testing.assert_close(y, yr, **TOL)
    for a, b in zip(g, _grads(yr, dy, ref)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(m.eval()(x), y, **TOL)  # no running statistics


def test_filter_response_norm_has_timms_parameters_and_keeps_the_input_dtype():
    m = FilterResponseNorm2d(4)
    assert set(m.state_dict()) == {"weight", "bias", "tau"} and m.eps == 1e-5
    assert torch.equal(m.weight, torch.ones(4)) and torch.equal(m.tau, torch.zeros(4))
    assert "eps_learned" in FilterResponseNorm2d(4, learnable_eps=True).state_dict()
    x = torch.randn(2, 4, 3, 3)
    assert m(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(m(x.bfloat16()).float(), m(x), rtol=0.02, atol=0.02)


# -- EvoNorm --------------------------------------------------------------------------------------
@pytest.mark.parametrize("c,kwargs,groups", [(8, {"groups": 4}, 4), (8, {"group_size": 8}, 1),
                                             (6, {"groups": 6}, 6), (64, {}, 32)])
def test_evonorm_s0_matches_the_paper(c, kwargs, groups):
    torch.manual_seed(0)
    m = EvoNorm2dS0(c, **kwargs).double()
    assert m.groups == groups
    _random_params(m)
    x = torch.randn(3, c, 4, 5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    params = [m.v, m.weight, m.bias]
    y = m(x)
    ref = [t.detach().clone().requires_grad_() for t in (x, *params)]
    yr = evo_s0_ref(ref[0], ref[1], ref[2], ref[3], groups, 1e-5)
    torch.testing.assert_close(y, yr, **TOL)
    for a, b in zip(_grads(y, dy, [x, *params]), _grads(yr, dy, ref)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(m.eval()(x), y, **TOL)


@pytest.mark.parametrize("e", [None, 2])
def test_evonorm_b0_matches_the_paper(e):
    torch.manual_seed(0)
    m = EvoNorm2dB0(6, momentum=0.2, examples_per_group=e).double()
    _random_params(m)
    with torch.no_grad():
        m.v.sub_(1.0)  # v between -0.5 and 0.5: either side of the max wins somewhere
    params = [m.v, m.weight, m.bias]
    running = torch.ones(6, dtype=torch.float64)
    for _ in range(2):
        x = (torch.randn(4, 6, 3, 3, dtype=torch.float64) * 2).requires_grad_()
        dy = torch.randn_like(x)
        y = m(x)
        ref = [t.detach().clone().requires_grad_() for t in (x, *params)]
        yr, var = evo_b0_ref(ref[0], ref[1], ref[2], ref[3], 1e-3, e=e)
        torch.testing.assert_close(y, yr, **TOL)
        for a, b in zip(_grads(y, dy, [x, *params]), _grads(yr, dy, ref)):
            torch.testing.assert_close(a, b, **TOL)
        count = (e or 4) * 9
        running = 0.8 * running + 0.2 * (var.detach() * count / (count - 1)).mean(0)
        torch.testing.assert_close(m.running_var, running, **TOL)
    left = torch.sqrt(running + 1e-3).view(1, -1, 1, 1)
    assert bool((yr.detach() != 0).all()) and bool((left < 10).all())
    m.eval()
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), evo_b0_ref(x, m.v, m.weight, m.bias, 1e-3, running)[0],
                               **TOL)


def test_evonorm_state_dicts_are_timms():
    assert set(EvoNorm2dS0(32).state_dict()) == {"weight", "bias", "v"}
    b0 = EvoNorm2dB0(32)
    assert set(b0.state_dict()) == {"weight", "bias", "v", "running_var"}
    assert (EvoNorm2dS0(32).eps, b0.eps, b0.momentum) == (1e-5, 1e-3, 0.1)


@pytest.mark.parametrize("make, keys", [
    (lambda: EvoNorm2dS0(8, 4, None, False), {"weight", "bias"}),
    (lambda: EvoNorm2dB0(8, False, 0.2), {"weight", "bias", "running_var"})])
def test_evonorm_without_activation_is_timms_affine_map(make, keys):
    # timm's apply_act=False (positional, in timm's order): gamma x + beta, no v, no statistics
    torch.manual_seed(0)
    m = make().double()
    assert m.v is None and set(m.state_dict()) == keys and not m.apply_act
    assert "apply_act=False" in repr(m)
    _random_params(m)
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    params = [m.weight, m.bias]
    ref = [t.detach().clone().requires_grad_() for t in (x, *params)]
    yr = ref[0] * ref[1].view(1, -1, 1, 1) + ref[2].view(1, -1, 1, 1)
    y = m(x)
    torch.testing.assert_close(y, yr, **TOL)
    for a, b in zip(_grads(y, dy, [x, *params]), _grads(yr, dy, ref)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(m.eval()(x), y, **TOL)
    if isinstance(m, EvoNorm2dB0):  # kept for timm's state dict, never updated (as timm's)
        assert torch.equal(m.running_var, torch.ones(8, dtype=torch.float64))
        assert m.momentum == 0.2 and m.eps == 1e-3


def test_evonorm_arguments_follow_timms_order():
    s0 = EvoNorm2dS0(8, 2, None, True, 1e-3)
    assert (s0.groups, s0.apply_act, s0.eps) == (2, True, 1e-3)
    b0 = EvoNorm2dB0(8, True, 0.3, 1e-4)
    assert (b0.apply_act, b0.momentum, b0.eps) == (True, 0.3, 1e-4)
    # the order before timm's (eps first) fails loudly instead of setting apply_act to a number
    with pytest.raises(TypeError, match=r"EvoNorm2dB0: apply_act must be True or False, got "
                                        r"0\.001.*pass eps and momentum by keyword"):
        EvoNorm2dB0(8, 1e-3, 0.1)
    with pytest.raises(TypeError, match=r"EvoNorm2dS0: apply_act must be True or False"):
        EvoNorm2dS0(8, 4, None, 1e-5)


# -- Weight Standardization ------------------------------------------------------------------------
@pytest.mark.parametrize("cls,shape,kwargs", [
    (StdConv1d, (2, 4, 9), {"kernel_size": 3, "padding": 1}),
    (StdConv2d, (2, 4, 6, 5), {"kernel_size": 3, "stride": 2, "groups": 2}),
    (StdConv3d, (1, 2, 4, 4, 4), {"kernel_size": 2, "bias": False}),
])
def test_std_conv_matches_the_paper(cls, shape, kwargs):
    torch.manual_seed(0)
    conv = cls(shape[1], 6, **kwargs).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    dy = torch.randn_like(y)
    params = [p for p in (conv.weight, conv.bias) if p is not None]
    ref = [t.detach().clone().requires_grad_() for t in (x, *params)]
    plain = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    yr = plain(ref[0], ws_ref(ref[1], 1e-6), ref[2] if len(ref) > 2 else None, conv.stride,
               conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(y, yr, **TOL)
    for a, b in zip(_grads(y, dy, [x, *params]), _grads(yr, dy, ref)):
        torch.testing.assert_close(a, b, **TOL)


def test_weight_standardization_parametrization_equals_std_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    std = StdConv2d(3, 5, 3, eps=1e-4)
    std.load_state_dict(conv.state_dict())
    torch.nn.utils.parametrize.register_parametrization(conv, "weight",
                                                        WeightStandardization(eps=1e-4))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), std(x), rtol=1e-6, atol=1e-6)


def test_standardize_weights_keeps_parameters_and_works_with_gn_and_bgn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect"),
                        nn.GroupNorm(4, 8), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(8, 8, 3, bias=False),
                                      bgnorm.BatchGroupNorm2d(8, num_groups=4)),
                        nn.ConvTranspose2d(8, 2, 2))
    x = torch.randn(4, 3, 6, 6)
    params = dict(net.named_parameters())
    keys = list(net.state_dict())
    net.eval()
    net = standardize_weights(net, eps=1e-5)
    assert [type(net[0]), type(net[3][0]), type(net[4])] == [StdConv2d, StdConv2d,
                                                              nn.ConvTranspose2d]
    assert dict(net.named_parameters()) == params and list(net.state_dict()) == keys
    assert not net[0].training and net[0].padding_mode == "reflect" and net[0].eps == 1e-5
    w = ws_ref(net[0].weight.double(), 1e-5).float()
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, net[0].bias)
    torch.testing.assert_close(net[0](x), expected, rtol=1e-5, atol=1e-5)
    net.train()
    net(x).sum().backward()
    assert net[3][0].weight.grad is not None
    only = standardize_weights(nn.Sequential(nn.Conv1d(2, 2, 1), nn.Conv1d(2, 2, 1)),
                               exclude=["1"])
    assert [type(m) for m in only] == [StdConv1d, nn.Conv1d]
    assert type(standardize_weights(nn.Conv3d(2, 2, 1))) is StdConv3d


# -- registry, conversion, suite -------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs,cls", [
    ("brn", {}, BatchRenorm2d), ("batch_renorm", {"dim": 1}, BatchRenorm1d),
    ("BatchRenorm", {"dim": 3}, BatchRenorm3d), ("frn", {}, FilterResponseNorm2d),
    ("frn", {"dim": 1}, FilterResponseNorm1d), ("FilterResponseNorm", {"dim": 3},
                                                FilterResponseNorm3d),
    ("evonorm_s0", {}, EvoNorm2dS0), ("EvoNorm-S0", {"groups": 4}, EvoNorm2dS0),
    ("evonorm_b0", {}, EvoNorm2dB0),
])
def test_registry_builds_the_small_batch_layers(name, kwargs, cls):
    assert type(bgnorm.make_norm(name, 24, **kwargs)) is cls


def test_registry_evonorm_s0_groups_default_like_gn():
    assert bgnorm.make_norm("evonorm_s0", 24).groups == 24  # largest divisor <= 32
    assert bgnorm.make_norm("evonorm_s0", 64).groups == 32
    assert bgnorm.make_norm("evonorm_s0", 64, group_size=16).groups == 4
    for name in ("brn", "frn", "evonorm_s0", "evonorm_b0"):
        assert name in bgnorm.norm_names()


def test_convert_batchnorm_to_batch_renorm_carries_everything():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, momentum=0.3, eps=1e-4),
                        nn.Flatten(), nn.LazyLinear(4), nn.BatchNorm1d(4, bias=False))
    net(torch.randn(8, 3, 5, 5))
    _random_params(net[1])
    net.eval()
    bn_out = net(torch.randn(8, 3, 5, 5))
    x = torch.randn(8, 3, 5, 5)
    bn_out = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net = bgnorm.convert_norm(net, "brn", r_max=2.0)
    assert type(net[1]) is BatchRenorm2d and type(net[4]) is BatchRenorm1d
    assert (net[1].momentum, net[1].eps, net[1].r_max, net[1].d_max) == (0.3, 1e-4, 2.0, 5.0)
    assert net[4].bias is None and not net[1].training
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(net(x), bn_out)  # eval: BatchNorm's eval with the same statistics


@pytest.mark.parametrize("name", ["frn", "evonorm_s0", "evonorm_b0"])
def test_convert_to_norm_activation_layers_is_refused_with_the_reason(name):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError, match="activation"):
        bgnorm.convert_norm(net, name)


def test_suite_norm_spec_classifies_and_builds_them():
    from bgnorm.repro.norms import BATCH_DEPENDENT, PER_EXAMPLE, NormSpec

    assert {"brn", "evonorm_b0"} <= BATCH_DEPENDENT and {"frn", "evonorm_s0"} <= PER_EXAMPLE
    assert type(NormSpec("brn", batch_size=4).make(8)) is BatchRenorm2d
    m = NormSpec("brn", batch_size=4, workers=2).make(8)
    assert m.examples_per_group == 4
    assert NormSpec("evonorm_b0", batch_size=2, workers=4).make(8).examples_per_group == 2
    assert NormSpec("evonorm_b0", batch_size=2).make(8).examples_per_group is None
    assert NormSpec("evonorm_s0", batch_size=2).make(16).groups == 16
    assert NormSpec("evonorm_s0", batch_size=2, num_groups=4).make(16).groups == 4
    assert type(NormSpec("frn", batch_size=2, workers=4).make(8)) is FilterResponseNorm2d
    spec = NormSpec("gn", batch_size=2, weight_standardization=True)
    assert spec.describe() == "GN(G=32)+WS"
    assert NormSpec.from_config({"norm": "gn", "weight_standardization": True}) == \
        NormSpec("gn", weight_standardization=True)


# -- errors ---------------------------------------------------------------------------------------
ERRORS = [
    (lambda: BatchRenorm2d(4, r_max=0.5), ValueError, r"BatchRenorm2d: r_max must be a number "
     r">= 1 .*got 0.5"),
    (lambda: BatchRenorm2d(4, d_max=-1), ValueError, r"d_max must be a number >= 0"),
    (lambda: BatchRenorm2d(0), ValueError, r"num_features must be a positive int"),
    (lambda: BatchRenorm2d(4, momentum=2.0), ValueError, r"momentum must be a number in \[0, 1\]"),
    (lambda: BatchRenorm2d(4)(torch.randn(2, 4, 3)), ValueError,
     r"BatchRenorm2d\(4\): expected 4D input \(got 3D input\)"),
    (lambda: BatchRenorm2d(4)(torch.randn(2, 5, 3, 3)), ValueError,
     r"expected input with 4 channels"),
    (lambda: BatchRenorm2d(4)(torch.randn(1, 4, 1, 1)), ValueError,
     r"Expected more than 1 value per channel when training"),
    (lambda: BatchRenorm2d(4, examples_per_group=3)(torch.randn(4, 4, 2, 2)), ValueError,
     r"batch size 4 is not divisible by examples_per_group=3"),
    (lambda: BatchRenorm2d(4)(torch.randint(0, 3, (2, 4, 2, 2))), TypeError,
     r"expected a floating-point input"),
    (lambda: _set_and_call(BatchRenorm2d(4)), ValueError, r"r_max must be a number >= 1"),
    (lambda: renorm_limits(10, warmup_steps=100, r_max_step=50), ValueError,
     r"r_max_step=50 must be after warmup_steps=100"),
    (lambda: renorm_limits(-1), ValueError, r"step must be an int >= 0"),
    (lambda: FilterResponseNorm2d(4, eps=0.0), ValueError, r"eps must be positive"),
    (lambda: FilterResponseNorm2d(4)(torch.randn(2, 4, 3)), ValueError,
     r"FilterResponseNorm2d\(4\): expected 4D input \(got 3D input\)"),
    (lambda: EvoNorm2dS0(24, groups=5), ValueError,
     r"EvoNorm2dS0: groups=5 must divide num_features=24 .*nearby valid values: 2, 3, 4, 6"),
    (lambda: EvoNorm2dS0(24, group_size=5), ValueError, r"group_size=5 must divide"),
    (lambda: EvoNorm2dS0(24, groups=0), ValueError, r"groups must be a positive int"),
    (lambda: EvoNorm2dB0(4, momentum=None), ValueError, r"momentum must be a number in \[0, 1\], "),
    (lambda: EvoNorm2dB0(4)(torch.randn(1, 4, 1, 1)), ValueError,
     r"EvoNorm2dB0\(4\): expected more than 1 value per channel when training"),
    (lambda: EvoNorm2dB0(4, eps=0), ValueError, r"eps must be positive"),
    (lambda: StdConv2d(3, 4, 3, eps=0), ValueError, r"StdConv2d: eps must be a positive number"),
    (lambda: standardize_weights(nn.Sequential(nn.Conv2d(1, 1, 1)), exclude=["nope"]),
     ValueError, r"exclude='nope' matches no module"),
    (lambda: bgnorm.make_norm("evonorm_b0", 8, dim=3), ValueError,
     r"make_norm\('evonorm_b0'\): dim must be 2"),
]


def _set_and_call(m):
    m.r_max = 0.9
    return m(torch.randn(2, 4, 2, 2))


@pytest.mark.parametrize("make,exc,pattern", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_arguments_name_the_problem_and_the_fix(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_standardize_weights_refuses_parametrized_convs_and_warns_when_nothing_to_do():
    conv = nn.Conv2d(2, 2, 1)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", nn.Identity())
    with pytest.raises(ValueError, match="WeightStandardization"):
        standardize_weights(nn.Sequential(conv))
    with pytest.warns(UserWarning, match="no Conv1d/2d/3d"):
        standardize_weights(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("affine,bias", [(False, True), (True, False)])
def test_batch_renorm_without_beta_or_affine_matches_the_paper(affine, bias):
    torch.manual_seed(0)
    m = BatchRenorm2d(5, affine=affine, bias=bias, r_max=1.2, d_max=0.1).double()
    with torch.no_grad():
        m.running_mean.fill_(0.7)
        m.running_var.fill_(3.0)
    if affine:
        _random_params(m)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn_like(x)
    y = m(x)
    rm, rv = torch.full((5,), 0.7, dtype=torch.float64), torch.full((5,), 3.0, dtype=torch.float64)
    params = [p for p in (m.weight, m.bias) if p is not None]
    ref = [t.detach().clone().requires_grad_() for t in (x, *params)]
    gamma = ref[1] if affine else None
    beta = ref[2] if affine and bias else None
    yr = brn_ref(ref[0], gamma, beta, rm, rv, 1.2, 0.1, 1e-5)[0]
    torch.testing.assert_close(y, yr, **TOL)
    for a, b in zip(_grads(y, dy, [x, *params]), _grads(yr, dy, ref)):
        torch.testing.assert_close(a, b, **TOL)


def test_update_bn_recomputes_batch_renorm_and_evonorm_b0_statistics():
    """bgnorm.update_bn (SWA): the running statistics become the average over the loader's
    batches of the batch mean and unbiased variance (EvoNorm-B0: variance only)."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 2, 2, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.var(dim=(0, 2, 3)) for b in batches]).mean(0)  # unbiased
    for layer in (BatchRenorm2d(3, momentum=0.3), EvoNorm2dB0(3, momentum=0.3)):
        net = nn.Sequential(layer).double().eval()
        bgnorm.update_bn(batches, net)
        torch.testing.assert_close(layer.running_var, variances, **TOL)
        if isinstance(layer, BatchRenorm2d):
            torch.testing.assert_close(layer.running_mean, means, **TOL)
            assert int(layer.num_batches_tracked) == 3
        assert not net.training and layer.momentum == 0.3 and not layer._forward_pre_hooks


@pytest.mark.parametrize("make", [lambda: BatchRenorm2d(8), lambda: BatchRenorm2d(
    8, examples_per_group=2), lambda: FilterResponseNorm2d(8, learnable_eps=True),
    lambda: EvoNorm2dS0(8, groups=4), lambda: EvoNorm2dB0(8), lambda: StdConv2d(8, 8, 3)])
def test_dynamo_traces_a_full_graph(make):
    torch.manual_seed(0)
    m, ref = make(), make()
    ref.load_state_dict(m.state_dict())
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(compiled(x), ref(x))
    m.eval(), ref.eval()
    torch.testing.assert_close(compiled(x), ref(x))


@pytest.mark.parametrize("spec", [
    {"name": "brn", "batch_size": 2, "workers": 2}, {"name": "frn"},
    {"name": "evonorm_s0", "num_groups": 4}, {"name": "evonorm_b0", "batch_size": 2, "workers": 2},
    {"name": "gn", "num_groups": 4, "weight_standardization": True},
    {"name": "bgn", "batch_size": 4, "num_groups": 8, "weight_standardization": True}])
def test_suite_models_train_with_each_method(spec):
    from bgnorm.repro.models import build_model
    from bgnorm.repro.norms import NormSpec, build_normed_model

    torch.manual_seed(0)
    spec = NormSpec(**spec)
    model, layers = build_normed_model(
        lambda nl: build_model("small_resnet", 10, nl, in_channels=1, width=8), spec, (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, StdConv2d) for m in convs) == spec.weight_standardization
    model.eval()
    assert torch.isfinite(model(x)).all()
