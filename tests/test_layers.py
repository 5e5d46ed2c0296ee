"""The modules: BatchNorm/GroupNorm equivalences, running statistics, resolution, state dicts."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from reference import ENGINES, bgn_eval_ref, bgn_ref, gbgn_ref, set_engine
from torch import nn

from bgnorm import (
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    GeneralBatchGroupNorm2d,
    PositionalNorm,
)


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request):
    """Run every test through each training engine and layout (see reference.ENGINES)."""
    return set_engine(request, request.param)


BN_PAIRS = [
    (BatchGroupNorm1d, nn.BatchNorm1d, (6, 5)),
    (BatchGroupNorm1d, nn.BatchNorm1d, (6, 5, 7)),
    (BatchGroupNorm2d, nn.BatchNorm2d, (6, 5, 4, 3)),
    (BatchGroupNorm3d, nn.BatchNorm3d, (4, 5, 2, 3, 2)),
]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bgn_cls,bn_cls,shape", BN_PAIRS)
def test_g_equal_c_is_batchnorm_bit_for_bit(bgn_cls, bn_cls, shape, momentum):
    c = shape[1]
    bgn = bgn_cls(c, num_groups=c, momentum=momentum, dtype=torch.float64)
    bn = bn_cls(c, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        for m in (bgn, bn):
            m.weight.copy_(torch.linspace(0.5, 2, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    for _ in range(4):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 3
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = bgn(x1), bn(x2)
        assert torch.equal(y1, y2)
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        assert torch.equal(x1.grad, x2.grad)
        assert torch.equal(bgn.weight.grad, bn.weight.grad)
        assert torch.equal(bgn.bias.grad, bn.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bgn, name), getattr(bn, name)), name
    bgn.eval()
    bn.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(bgn(x), bn(x))


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_single_example_is_groupnorm(g):
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    bgn = BatchGroupNorm2d(8, num_groups=g, dtype=torch.float64)
    gn = nn.GroupNorm(g, 8, dtype=torch.float64)
    with torch.no_grad():
        for m in (bgn, gn):
            m.weight.copy_(torch.linspace(0.5, 2, 8))
            m.bias.copy_(torch.linspace(-1, 1, 8))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = bgn(x1), gn(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bgn.weight.grad, gn.weight.grad)


@pytest.mark.parametrize("g", [2, 8, 3])
def test_running_stats_cumulative_average(g):
    m = BatchGroupNorm2d(4, num_groups=g, momentum=None, dtype=torch.float64)
    means, vars_ = [], []
    for _ in range(3):
        x = torch.randn(5, 4, 2, 3, dtype=torch.float64) * 3 + 1
        m(x)
        _, mean, var = bgn_ref(x, g)
        n = x.numel() // g
        means.append(mean)
        vars_.append(var * n / (n - 1))
    torch.testing.assert_close(m.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(m.running_var, torch.stack(vars_).mean(0))
    assert int(m.num_batches_tracked) == 3
    m.eval()
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), bgn_eval_ref(x, g, m.running_mean, m.running_var,
                                                   m.weight, m.bias))


def test_track_running_stats_false_uses_batch_stats_in_eval():
    m = BatchGroupNorm2d(4, num_groups=8, track_running_stats=False, dtype=torch.float64).eval()
    assert m.running_mean is None and m.num_batches_tracked is None
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(m(x), bgn_ref(x, 8, m.weight, m.bias)[0])


def test_gbgn_module_running_stats_average_over_batch_groups():
    m = GeneralBatchGroupNorm2d(4, num_groups=2, examples_per_group=2, momentum=1.0,
                                dtype=torch.float64)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    y = m(x)
    yr, mean, var = gbgn_ref(x, 2, 2, m.weight, m.bias)
    torch.testing.assert_close(y, yr)
    n = 2 * 4 * 9 // 2
    torch.testing.assert_close(m.running_mean, mean.mean(0))
    torch.testing.assert_close(m.running_var, (var * n / (n - 1)).mean(0))
    m.eval()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)  # any batch size in eval
    torch.testing.assert_close(m(x), bgn_eval_ref(x, 2, m.running_mean, m.running_var,
                                                   m.weight, m.bias))
    assert "examples_per_group=2" in repr(m)


def test_positional_norm_module():
    m = PositionalNorm(6)
    x = torch.randn(2, 6, 3, 3)
    y = m(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 3), atol=1e-6, rtol=0)
    assert torch.equal(m.eval()(x), y)
    assert repr(m) == "PositionalNorm(6, eps=1e-05, affine=True)"


# ---- resolution ---------------------------------------------------------------------------


def test_whole_channel_groups_work_at_any_size():
    m = BatchGroupNorm2d(8, num_groups=4)
    m(torch.randn(4, 8, 6, 6))
    m.eval()
    for hw in [(3, 3), (7, 5), (12, 12)]:
        x = torch.randn(2, 8, *hw)
        torch.testing.assert_close(
            m(x), bgn_eval_ref(x, 4, m.running_mean, m.running_var, m.weight, m.bias)
        )
    m.train()
    m(torch.randn(4, 8, 5, 7))


def test_bands_are_fractions_of_each_channel_at_any_divisible_size():
    m = BatchGroupNorm2d(4, num_groups=8)  # two bands per channel: top and bottom halves
    m(torch.randn(4, 4, 6, 6))
    m.eval()
    x = torch.randn(2, 4, 10, 10)
    y = m(x)
    rm, rv = m.running_mean.view(4, 2), m.running_var.view(4, 2)
    top = (x[:, :, :5] - rm[:, 0].view(1, 4, 1, 1)) / torch.sqrt(rv[:, 0].view(1, 4, 1, 1) + 1e-5)
    torch.testing.assert_close(y[:, :, :5], top)
    with pytest.raises(ValueError, match=r"splits each channel into 2 bands, so the spatial "
                                         r"size 25 must be divisible by 2"):
        m(torch.randn(2, 4, 5, 5))


def test_straddling_groups_raise_at_another_size_even_after_reload():
    m = BatchGroupNorm2d(4, num_groups=6)
    assert m.straddles_channels
    m(torch.randn(4, 4, 3, 3))
    assert m.layout_shape == (3, 3)
    msg = r"groups straddle channel boundaries .* laid out for spatial size \(3, 3\) but the " \
          r"input has \(6, 6\)"
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(4, 4, 6, 6))
    fresh = BatchGroupNorm2d(4, num_groups=6)
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    with pytest.raises(ValueError, match=msg):
        fresh(torch.randn(1, 4, 6, 6))
    fresh(torch.randn(1, 4, 3, 3))


def test_checks_run_again_for_a_new_configuration_after_a_validated_one():
    """Layers skip re-validating an input configuration they have checked; anything that
    changes the configuration (dtype, shape, mode, a loaded layout) is checked again."""
    m = BatchGroupNorm2d(4, num_groups=6)
    x = torch.randn(4, 4, 3, 3)
    m(x)
    m(x)  # validated configuration
    with pytest.raises(TypeError, match="expected a floating-point input"):
        m(x.long())
    with pytest.raises(ValueError, match="expected input with 4 channels"):
        m(torch.randn(4, 5, 3, 3))
    with pytest.raises(ValueError, match="expected more than 1 value per group"):
        BatchGroupNorm2d(4, num_groups=36)(torch.randn(1, 4, 3, 3))
    # a fresh layer that validated 6x6 inputs, then loads a layout recorded at 3x3
    other = BatchGroupNorm2d(4, num_groups=6)
    other(torch.randn(4, 4, 6, 6))
    other(torch.randn(4, 4, 6, 6))
    other.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match=r"laid out for spatial size \(3, 3\)"):
        other(torch.randn(4, 4, 6, 6))


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("shape,g", [((8, 16, 3, 3), 4), ((8, 16, 4, 4), 64), ((8, 12, 6, 6), 8),
                                     ((16, 8, 2, 2), 16)])
def test_kept_eval_pass_follows_every_change_of_state(shape, g):
    """A layer keeps the eval pass of a validated configuration; every later change of its
    state (in-place edits of the running statistics or parameters, a loaded state dict, a
    dtype or memory-format change, replaced parameters, removed statistics) shows in the
    output exactly as in a fresh layer's."""
    c = shape[1]
    m = BatchGroupNorm2d(c, num_groups=g).eval()

    def check(x):
        for _ in range(2):  # the first call validates, the second takes the kept pass
            fresh = BatchGroupNorm2d(c, num_groups=g, dtype=m.weight.dtype).eval()
            fresh.load_state_dict(m.state_dict())
            fresh.running_mean, fresh.running_var = m.running_mean, m.running_var
            y = m(x)
            torch.testing.assert_close(y, fresh(x), rtol=0, atol=0)
            assert y.dtype == x.dtype and y.shape == x.shape
        return y

    x = torch.randn(shape)
    y0 = check(x)
    with torch.no_grad():
        m.running_mean.add_(1.0)
        m.running_var.mul_(2.0)
        m.weight.mul_(3.0)
        m.bias.sub_(1.0)
    y1 = check(x)
    torch.testing.assert_close(y1, bgn_eval_ref(x.double(), g, m.running_mean.double(),
                                                m.running_var.double(), m.weight.double(),
                                                m.bias.double()).float())
    assert not torch.allclose(y0, y1)
    other = BatchGroupNorm2d(c, num_groups=g)
    with torch.no_grad():
        other.running_mean.normal_()
        other.weight.normal_()
    m.load_state_dict(other.state_dict())
    check(x)
    check(x.to(memory_format=torch.channels_last))
    m.double()
    check(x.double())
    m.float()
    m.weight = nn.Parameter(torch.randn(c))  # new parameter objects
    m.bias = nn.Parameter(torch.randn(c))
    check(x)
    y = m(x)
    torch.nn.utils.parametrize.register_parametrization(m, "weight", _Doubled())
    torch.testing.assert_close(m(x), m(x))
    assert not torch.allclose(m(x), y)  # the parametrized weight is used
    torch.nn.utils.parametrize.remove_parametrizations(m, "weight")
    check(x)
    m.running_mean = m.running_var = None  # batch statistics from now on
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, bgn_ref(x.double(), g, m.weight.double(),
                                          m.bias.double())[0].float())


@pytest.mark.parametrize("shape,g", [((8, 16, 6, 6), 4), ((8, 16, 6, 6), 64), ((8, 12, 6, 6), 8),
                                     ((16, 8, 2, 2), 16)])
def test_saved_bytes_do_not_exceed_native_batch_norm(shape, g, engine):
    """Autograd keeps no more for BGN's backward than for BatchNorm2d's: the input and small
    statistics, with G-long vectors instead of C-long ones when G > C (as torch's batch norm
    keeps five: weight, running and saved statistics)."""

    def saved(m):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(shape, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        return sum(seen.values())

    extra = 5 * 4 * max(g - shape[1], 0)
    ours, native = saved(BatchGroupNorm2d(shape[1], num_groups=g)), saved(nn.BatchNorm2d(shape[1]))
    assert ours <= native + extra, (ours, native)


# ---- state dicts ---------------------------------------------------------------------------


@pytest.mark.parametrize("g", [4, 16, 6])
def test_state_dict_round_trip(g):
    m = BatchGroupNorm2d(8, num_groups=g)
    with torch.no_grad():
        m.weight.uniform_()
    for _ in range(2):
        m(torch.randn(4, 8, 3, 4))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    m2 = BatchGroupNorm2d(8, num_groups=g)
    m2.load_state_dict(sd)
    m.eval()
    m2.eval()
    x = torch.randn(2, 8, 3, 4)
    assert torch.equal(m(x), m2(x))
    assert m.state_dict()._metadata[""]["version"] == 1
    assert int(m2.num_batches_tracked) == 2


def test_state_dict_num_groups_mismatch_is_loud():
    sd = BatchGroupNorm2d(8, num_groups=4).state_dict()
    with pytest.raises(RuntimeError, match=r"checkpoint's running statistics have 4 groups but "
                                           r"this layer has num_groups=2; construct the layer "
                                           r"with num_groups=4"):
        BatchGroupNorm2d(8, num_groups=2).load_state_dict(sd)


def test_state_dict_without_metadata_is_migrated():
    src = BatchGroupNorm2d(8, num_groups=4)
    sd = {k: v for k, v in src.state_dict().items()
          if k not in ("num_batches_tracked", "_extra_state")}
    m = BatchGroupNorm2d(8, num_groups=4)
    m.num_batches_tracked.fill_(5)
    m.load_state_dict(sd)  # a plain dict: no version metadata
    assert int(m.num_batches_tracked) == 0


def test_deepcopy_and_repr():
    m = BatchGroupNorm2d(8, num_groups=4, momentum=None)
    assert repr(m) == ("BatchGroupNorm2d(8, num_groups=4, eps=1e-05, momentum=None, affine=True, "
                       "track_running_stats=True)")
    m2 = copy.deepcopy(m)
    assert m2.num_groups == 4


def test_module_half_precision_keeps_float32_buffers():
    m = BatchGroupNorm2d(16, num_groups=4)
    x = torch.randn(4, 16, 3, 3, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and m.running_mean.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [4, 16, 64, 6])
def test_module_entirely_in_half_precision(dtype, g):
    m = BatchGroupNorm2d(16, num_groups=g, dtype=dtype)
    x = torch.randn(4, 16, 6, 6, dtype=dtype, requires_grad=True)
    y = m(x)
    y.float().square().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype and m.weight.grad.dtype == dtype
    ref = bgn_ref(x.detach().double(), g)[0]
    assert (y.double() - ref).abs().max() < 0.1
    m.eval()
    assert m(x).dtype == dtype


def test_affine_false():
    m = BatchGroupNorm2d(4, num_groups=2, affine=False, dtype=torch.float64)
    assert m.weight is None
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(m(x), bgn_ref(x, 2)[0])


# ---- bad input -----------------------------------------------------------------------------

ERRORS = [
    (lambda: BatchGroupNorm2d(8, num_groups=0), ValueError,
     r"num_groups must be a positive int, got 0"),
    (lambda: BatchGroupNorm2d(8, num_groups=-2), ValueError,
     r"num_groups must be a positive int, got -2"),
    (lambda: BatchGroupNorm2d(8, num_groups=2.5), TypeError,
     r"num_groups must be a positive int, got float 2.5"),
    (lambda: BatchGroupNorm2d(8, num_groups=True), TypeError, r"got bool True"),
    (lambda: BatchGroupNorm2d(0), ValueError, r"num_features must be a positive int"),
    (lambda: BatchGroupNorm2d(8, 4)(torch.randn(2, 6, 3, 3)), ValueError,
     r"expected input with 8 channels \(dim 1\), got 6 channels in input of shape "
     r"\(2, 6, 3, 3\)"),
    (lambda: BatchGroupNorm2d(8, 4)(torch.randn(2, 8, 3)), ValueError,
     r"expected 4D input \(got 3D input\)"),
    (lambda: BatchGroupNorm1d(8, 4)(torch.randn(2, 8, 3, 3)), ValueError,
     r"expected 2D or 3D input \(got 4D input\)"),
    (lambda: BatchGroupNorm3d(8, 4)(torch.randn(2, 8, 3, 3)), ValueError,
     r"expected 5D input \(got 4D input\)"),
    (lambda: BatchGroupNorm2d(8, 48)(torch.randn(2, 8, 7, 7)), ValueError,
     r"num_groups=48 must divide D = C\*H\*W = 8\*7\*7 = 392 .* nearby valid values: "
     r"14, 28, 49, 56\. num_groups=48 = 6 x C splits each channel into 6 bands"),
    (lambda: BatchGroupNorm1d(10, 4)(torch.randn(2, 10)), ValueError,
     r"num_groups=4 must divide D = C = 10 = 10 .* nearby valid values: 1, 2, 5, 10"),
    (lambda: BatchGroupNorm1d(4, 4)(torch.randn(1, 4)), ValueError,
     r"expected more than 1 value per group when training, got input of shape \(1, 4\) with "
     r"num_groups=4 \(1 value per group\); use a larger batch, fewer groups, or eval mode"),
    (lambda: BatchGroupNorm2d(4, 2)(torch.randint(0, 5, (2, 4, 3, 3))), TypeError,
     r"expected a floating-point input, got dtype torch.int64; convert it first"),
    (lambda: GeneralBatchGroupNorm2d(4, 2, 4)(torch.randn(6, 4, 3, 3)), ValueError,
     r"batch size 6 is not divisible by examples_per_group=4; use a batch size that is a "
     r"multiple of 4 \(e.g. drop_last=True in the DataLoader\) or one of examples_per_group "
     r"in \{1, 2, 3, 6\}"),
    (lambda: GeneralBatchGroupNorm2d(4, 2, 0), ValueError,
     r"examples_per_group must be a positive int, got 0"),
    (lambda: PositionalNorm(4)(torch.randn(2, 5, 3)), ValueError,
     r"expected input with 4 channels"),
]


@pytest.mark.parametrize("make,exc,pattern", ERRORS,
                         ids=[f"err{i}" for i in range(len(ERRORS))])
def test_bad_input_messages(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_inference_mode_then_training():
    """The units engine's reusable CPU buffer must work inside and outside inference mode."""
    m = BatchGroupNorm2d(8, num_groups=2)
    x = torch.randn(4, 8, 8, 8)
    with torch.inference_mode():
        y1 = m(x)
    xr = x.clone().requires_grad_()
    y2 = m(xr)
    y2.sum().backward()
    torch.testing.assert_close(y1, y2.detach())
