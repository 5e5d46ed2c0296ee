"""Regression tests of issue 13 for the layers and the functional API: torch 2.13's ``bias=``,
eps validation, strict loading of BatchNorm checkpoints, failed first calls, empty tensors,
memory formats, errors that name the layer, numpy integers and huge ``num_groups``."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from reference import ENGINES, bgn_eval_ref, bgn_ref, gbgn_ref, pn_ref, set_engine
from torch import nn

from bgnorm import (
    BatchGroupNorm1d,
    BatchGroupNorm2d,
    BatchGroupNorm3d,
    GeneralBatchGroupNorm2d,
    PositionalNorm,
    SyncBatchGroupNorm,
)
from bgnorm import functional as BF

F64 = torch.float64


def _torch_batchnorm_has_bias() -> bool:
    """Whether torch's BatchNorm takes torch 2.13's keyword-only ``bias=`` (the GPU machine's
    torch 2.11 may not: the tests that compare with it are skipped there)."""
    return "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def _torch_batch_norm_checks_eps() -> bool:
    """Whether torch's batch_norm refuses eps = 0 in training with ValueError (torch 2.13)."""
    try:
        torch.nn.functional.batch_norm(torch.ones(2, 2), None, None, training=True, eps=0.0)
    except ValueError:
        return True
    except Exception:  # another error type: not the behaviour these tests compare with
        return False
    return False


needs_torch_bias = pytest.mark.skipif(
    not _torch_batchnorm_has_bias(), reason="this torch's BatchNorm has no bias= (torch 2.13)")
needs_torch_eps_check = pytest.mark.skipif(
    not _torch_batch_norm_checks_eps(), reason="this torch's batch_norm accepts eps = 0")


@pytest.fixture
def sync_path(tmp_path, monkeypatch):
    """SyncBatchGroupNorm's synchronized path in this process: a group of one rank (gloo; NCCL
    when the tests run on CUDA, BGNORM_TEST_DEVICE=cuda), which the layer is made to
    synchronize over (it runs locally on one rank otherwise)."""
    import torch.distributed as dist
    from conftest import TEST_DEVICE

    backend = "gloo"
    if TEST_DEVICE.type == "cuda":
        if not dist.is_nccl_available():
            pytest.skip("the synchronized path on CUDA needs NCCL")
        backend = "nccl"
        if TEST_DEVICE.index is not None:  # (set_device needs an index; None: the current)
            torch.cuda.set_device(TEST_DEVICE.index)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    monkeypatch.setattr(SyncBatchGroupNorm, "_sync_group",
                        lambda self: dist.group.WORLD if self.training else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---- finding 3: torch 2.13's keyword-only bias= ---------------------------------------------

BIAS_LAYERS = {
    "bgn1d": lambda **kw: BatchGroupNorm1d(6, 3, **kw),
    "bgn2d": lambda **kw: BatchGroupNorm2d(6, 3, **kw),
    "bgn3d": lambda **kw: BatchGroupNorm3d(6, 3, **kw),
    "gbgn": lambda **kw: GeneralBatchGroupNorm2d(6, 3, 2, **kw),
    "sync": lambda **kw: SyncBatchGroupNorm(6, 3, **kw),
    "pn": lambda **kw: PositionalNorm(6, **kw),
}


@needs_torch_bias
@pytest.mark.parametrize("make", BIAS_LAYERS.values(), ids=BIAS_LAYERS.keys())
def test_bias_false_registers_no_bias_like_torch(make):
    m = make(bias=False)
    ref = nn.BatchNorm2d(6, bias=False)
    assert m.bias is None and isinstance(m.weight, nn.Parameter)
    assert "bias" not in m.state_dict() and "bias" not in dict(m.named_parameters())
    assert "weight" in m.state_dict()
    assert "bias=False" in repr(m) and "bias=False" in repr(ref)
    assert "bias" not in repr(make())  # the default repr is unchanged
    assert isinstance(make().bias, nn.Parameter)
    # affine=False has neither parameter, whatever bias says (as torch)
    off = make(affine=False, bias=True)
    assert off.weight is None and off.bias is None
    m.reset_parameters()  # no bias to reset
    assert torch.equal(m.weight, torch.ones(6))


@needs_torch_bias
def test_bias_is_keyword_only_like_torch():
    with pytest.raises(TypeError):
        nn.BatchNorm2d(6, 1e-5, 0.1, True, True, None, None, False)
    with pytest.raises(TypeError):
        BatchGroupNorm2d(6, 3, 1e-5, 0.1, True, True, None, None, False)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("g", [6, 3, 12, 4], ids=["G=C", "whole", "bands", "straddle"])
def test_bias_false_forward_backward(g, engine, request):
    set_engine(request, engine)
    m = BatchGroupNorm2d(6, g, bias=False, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2, 6))
    x = torch.randn(4, 6, 2, 3, dtype=F64, requires_grad=True)
    y = m(x)
    yr = bgn_ref(x, g, m.weight)[0]
    torch.testing.assert_close(y, yr)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.weight), dy)
    want = torch.autograd.grad(yr, (x, m.weight), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    m.eval()
    torch.testing.assert_close(
        m(x), bgn_eval_ref(x, g, m.running_mean, m.running_var, m.weight))


@needs_torch_bias
def test_bias_false_at_g_equal_c_is_batchnorm_bit_for_bit():
    bgn = BatchGroupNorm2d(5, 5, bias=False, dtype=F64)
    bn = nn.BatchNorm2d(5, bias=False, dtype=F64)
    x = torch.randn(4, 5, 3, 3, dtype=F64)
    assert torch.equal(bgn(x), bn(x))
    assert set(bgn.state_dict()) == set(bn.state_dict())


def test_sync_conversion_keeps_bias_false():
    net = nn.Sequential(BatchGroupNorm2d(6, 3, bias=False))
    net = SyncBatchGroupNorm.convert_sync_batchgroupnorm(net)
    assert isinstance(net[0], SyncBatchGroupNorm) and net[0].bias is None
    assert "bias" not in net[0].state_dict()
    net(torch.randn(2, 6, 2, 2))


# ---- finding 4: eps validated as torch's batch_norm ------------------------------------------

EPS_FUNCTIONS = {
    "bgn": lambda x, **kw: BF.batch_group_norm(x, 3, torch.zeros(3), torch.ones(3), **kw),
    "gbgn": lambda x, **kw: BF.general_batch_group_norm(x, 3, 2, torch.zeros(3), torch.ones(3),
                                                        **kw),
}


@needs_torch_eps_check
@pytest.mark.parametrize("fn", EPS_FUNCTIONS.values(), ids=EPS_FUNCTIONS.keys())
def test_functional_eps_is_validated_like_batch_norm(fn):
    x = torch.randn(4, 6, 2, 2)
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError) as bn_err:
            torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)
        assert "eps must be positive" in str(bn_err.value)  # torch 2.11 (CUDA run): no "during"
        with pytest.raises(ValueError, match=r"_norm: eps must be positive during training, "
                                             rf"but got {eps}; .*e\.g\. eps=1e-5"):
            fn(x, training=True, eps=eps)
    with pytest.raises(ValueError, match=r"_norm: eps must be non-negative, but got -1\.0; "):
        fn(x, training=False, eps=-1.0)
    y = fn(x, training=False, eps=0.0)  # allowed in eval, as torch's batch_norm
    torch.testing.assert_close(y, x)  # running statistics 0 and 1, eps = 0: the identity


LAYERS_G3 = {
    "bgn1d": lambda **kw: BatchGroupNorm1d(6, 3, **kw),
    "bgn2d": lambda **kw: BatchGroupNorm2d(6, 3, **kw),
    "bgn3d": lambda **kw: BatchGroupNorm3d(6, 3, **kw),
    "gbgn": lambda **kw: GeneralBatchGroupNorm2d(6, 3, 2, **kw),
    "sync": lambda **kw: SyncBatchGroupNorm(6, 3, **kw),
}
INPUT_G3 = {"bgn1d": (4, 6, 3), "bgn2d": (4, 6, 2, 2), "bgn3d": (4, 6, 2, 1, 2),
            "gbgn": (4, 6, 2, 2), "sync": (4, 6, 2, 2)}


def test_synchronized_eps_is_validated_like_batch_norm(sync_path):
    m = SyncBatchGroupNorm(6, 3, eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be positive during training, but got 0\.0"):
        m(torch.randn(4, 6, 2))
    SyncBatchGroupNorm(6, 3)(torch.randn(4, 6, 2))  # the synchronized path runs


@pytest.mark.parametrize("name", LAYERS_G3)
def test_layer_eps_is_validated_like_batch_norm(name):
    make, x = LAYERS_G3[name], torch.randn(INPUT_G3[name])
    with pytest.raises(ValueError, match=r"eps must be positive during training, but got 0\.0"):
        make(eps=0.0)(x)
    m = make(eps=0.0).eval()
    torch.testing.assert_close(m(x), x)  # eval: eps = 0 is valid
    with pytest.raises(ValueError, match=r"eps must be positive during training"):
        make(eps=0.0, track_running_stats=False).eval()(x)  # batch statistics in eval
    m = make().eval()
    m(x)
    m.eps = -1.0  # after a validated call: checked again
    with pytest.raises(ValueError, match=r"eps must be non-negative, but got -1\.0"):
        m(x)


# ---- finding 9: strict loading of stock BatchNorm checkpoints --------------------------------

BN_TWINS = [
    (BatchGroupNorm1d, nn.BatchNorm1d, {}),
    (BatchGroupNorm2d, nn.BatchNorm2d, {}),
    (BatchGroupNorm3d, nn.BatchNorm3d, {}),
    (BatchGroupNorm2d, nn.BatchNorm2d, {"bias": False}),
    (BatchGroupNorm2d, nn.BatchNorm2d, {"affine": False}),
    (BatchGroupNorm2d, nn.BatchNorm2d, {"affine": False, "track_running_stats": False}),
]


@pytest.mark.parametrize("bgn_cls,bn_cls,kw", BN_TWINS)
def test_g_equal_c_strict_loads_a_batchnorm_checkpoint_and_back(bgn_cls, bn_cls, kw):
    if "bias" in kw and not _torch_batchnorm_has_bias():
        pytest.skip("this torch's BatchNorm has no bias= (torch 2.13)")
    bn = bn_cls(6, **kw)
    for t in bn.state_dict().values():
        if t.is_floating_point():
            t.uniform_(0.5, 1.5)
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(7)
    net = nn.Sequential(nn.Identity(), bgn_cls(6, 6, **kw))
    net.load_state_dict(nn.Sequential(nn.Identity(), bn).state_dict())  # strict
    for name, t in bn.state_dict().items():
        assert torch.equal(net[1].state_dict()[name], t), name
    assert set(net[1].state_dict()) == set(bn.state_dict())
    bn_cls(6, **kw).load_state_dict(net[1].state_dict())  # and back into torch's layer


def test_extra_state_only_when_a_layout_is_recorded():
    m = BatchGroupNorm2d(4, 6)  # straddling groups
    assert "_extra_state" not in m.state_dict()
    m(torch.randn(4, 4, 3, 3))
    sd = m.state_dict()
    assert sd["_extra_state"] == {"layout_shape": [3, 3]}
    fresh = BatchGroupNorm2d(4, 6)
    fresh.load_state_dict(sd)
    assert fresh.layout_shape == (3, 3)
    # a checkpoint without the key (saved before any input): no layout
    fresh.load_state_dict(BatchGroupNorm2d(4, 6).state_dict())
    assert fresh.layout_shape is None
    # a strict=False load of another part of a model leaves the recorded layout alone
    net = nn.Sequential(nn.Linear(2, 2), m)
    net.load_state_dict({"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}, strict=False)
    assert m.layout_shape == (3, 3)


@pytest.mark.parametrize("layout", [None, [3, 3]])
def test_checkpoints_of_version_1_still_load(layout):
    """Before, every state dict had "_extra_state" (layout_shape None when nothing recorded)."""
    src = BatchGroupNorm2d(4, 6)
    sd = dict(src.state_dict())
    sd["_extra_state"] = {"layout_shape": layout}
    sd = type(src.state_dict())(sd)
    sd._metadata = {"": {"version": 1}}
    m = BatchGroupNorm2d(4, 6)
    m.load_state_dict(sd)
    assert m.layout_shape == (None if layout is None else tuple(layout))


# ---- finding 7: a failed first call does not fix a straddling layer's layout -----------------

STRADDLING = {
    "bgn2d": lambda: BatchGroupNorm2d(8, 6),
    "gbgn": lambda: GeneralBatchGroupNorm2d(8, 6, 2),
    "sync": lambda: SyncBatchGroupNorm(8, 6),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make", STRADDLING.values(), ids=STRADDLING.keys())
def test_failed_first_call_does_not_record_the_layout(make, training):
    _failed_first_call(make, training)


def test_failed_first_call_does_not_record_the_layout_synchronized(sync_path):
    _failed_first_call(STRADDLING["sync"], True)


def _failed_first_call(make, training):
    m = make().train(training)
    with pytest.raises(ValueError, match=r"num_groups=6 must divide D = C\*H\*W = 8\*5\*5"):
        m(torch.randn(4, 8, 5, 5))
    assert m.layout_shape is None and "_extra_state" not in m.state_dict()
    if training:  # a valid size, but one value per group
        with pytest.raises(ValueError, match="expected more than 1 value per group"):
            BatchGroupNorm2d(8, 6 * 8)(torch.randn(1, 8, 6, 1))
    x = torch.randn(4, 8, 3, 3, dtype=F64)
    y = m.double()(x)  # the valid size that follows works, and is the one recorded
    assert m.layout_shape == (3, 3)
    assert m.state_dict()["_extra_state"] == {"layout_shape": [3, 3]}
    if training and not isinstance(m, GeneralBatchGroupNorm2d):
        torch.testing.assert_close(y, bgn_ref(x, 6, m.weight, m.bias)[0])
    with pytest.raises(ValueError, match=r"laid out for spatial size \(3, 3\)"):
        m(torch.randn(4, 8, 6, 6, dtype=F64))


# ---- finding 8: empty tensors -----------------------------------------------------------------

EMPTY_CASES = [  # (layer class, torch twin, input shape, groups: G = C, whole, bands, straddle)
    (BatchGroupNorm1d, nn.BatchNorm1d, (0, 6), (6, 3, 2)),
    (BatchGroupNorm1d, nn.BatchNorm1d, (0, 6, 4), (6, 3, 12, 4)),
    (BatchGroupNorm2d, nn.BatchNorm2d, (0, 6, 2, 3), (6, 3, 12, 4)),
    (BatchGroupNorm3d, nn.BatchNorm3d, (0, 6, 2, 1, 3), (6, 3, 12, 4)),
    (BatchGroupNorm2d, nn.BatchNorm2d, (2, 6, 0, 0), (6, 3, 12, 4)),
    (BatchGroupNorm2d, nn.BatchNorm2d, (2, 6, 3, 0), (6, 3, 12, 4)),
    (BatchGroupNorm3d, nn.BatchNorm3d, (0, 6, 0, 2, 2), (6, 3, 12, 4)),
]


def _run_empty(m, shape, dtype=torch.float32):
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
        if m.running_mean is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = m(x)
    y.backward(torch.randn_like(y))
    after = {k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    grads = (None if m.weight is None else m.weight.grad, None if m.bias is None else m.bias.grad)
    return y, x.grad, grads, before, after


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls,bn_cls,shape,groups", EMPTY_CASES,
                         ids=[str(c[2]) for c in EMPTY_CASES])
def test_empty_input_behaves_as_batchnorm(cls, bn_cls, shape, groups, training, engine,
                                          request):
    set_engine(request, engine)
    for momentum in (0.1, None):
        bn = bn_cls(6, momentum=momentum).train(training)
        yb, dxb, (dwb, dbb), before_b, after_b = _run_empty(bn, shape)
        for g in groups:
            m = cls(6, g, momentum=momentum).train(training)
            y, dx, (dw, db), before, after = _run_empty(m, shape)
            assert y.shape == yb.shape == shape and y.dtype == yb.dtype
            assert dx.shape == dxb.shape == shape
            assert torch.equal(dw, dwb) and torch.equal(db, dbb)  # zeros, as torch's
            for name in ("running_mean", "running_var"):  # left alone, as torch's
                assert torch.equal(after[name], before[name]), (g, name)
                assert torch.equal(after_b[name], before_b[name])
            assert int(after["num_batches_tracked"]) == int(after_b["num_batches_tracked"])
            if m.straddles_channels and 0 not in shape[2:]:  # an empty batch of a valid size
                assert m.layout_shape == shape[2:]
            else:  # spatial size 0: no groups to lay out
                assert m.layout_shape is None


@pytest.mark.parametrize("g", [6, 3, 12, 4])
def test_empty_batch_in_every_form(g):
    """GBGN, the functional API, half precision, no affine, no running statistics."""
    x = torch.randn(0, 6, 2, 3)
    for m in (GeneralBatchGroupNorm2d(6, g, 2), BatchGroupNorm2d(6, g, affine=False),
              BatchGroupNorm2d(6, g, track_running_stats=False),
              BatchGroupNorm2d(6, g, bias=False), SyncBatchGroupNorm(6, g)):
        for training in (True, False):
            assert m.train(training)(x).shape == x.shape
    assert BF.batch_group_norm(x, g, training=True).shape == x.shape
    assert BF.general_batch_group_norm(x, g, 3, training=True).shape == x.shape
    xh = torch.randn(0, 6, 2, 3, dtype=torch.bfloat16, requires_grad=True)
    m = BatchGroupNorm2d(6, g)
    y = m(xh)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xh.grad.shape == xh.shape
    assert torch.equal(m.weight.grad, torch.zeros(6))


def test_straddling_layer_takes_empty_inputs_after_its_layout_is_recorded():
    m = BatchGroupNorm2d(8, 6)
    m(torch.randn(2, 8, 3, 3))
    assert m(torch.randn(2, 8, 0, 0)).shape == (2, 8, 0, 0)
    assert m(torch.randn(0, 8, 3, 3)).shape == (0, 8, 3, 3)
    with pytest.raises(ValueError, match=r"laid out for spatial size \(3, 3\)"):
        m(torch.randn(0, 8, 6, 6))  # a size it refuses at any batch size
    assert m.layout_shape == (3, 3)


# ---- finding 14: y and dx keep the input's memory format ---------------------------------------

FORMAT_LAYOUTS = {  # name: the layer for C = 6, given the BGN class of the input's dimension
    "G=C": lambda cls: cls(6, 6),
    "whole": lambda cls: cls(6, 3),
    "bands": lambda cls: cls(6, 12),
    "straddle": lambda cls: cls(6, 9),
    "gbgn": lambda cls: GeneralBatchGroupNorm2d(6, 9, 2),
    "pn": lambda cls: PositionalNorm(6),
}
FORMATS = {"4d": (BatchGroupNorm2d, (4, 6, 4, 3), torch.channels_last),
           "5d": (BatchGroupNorm3d, (4, 6, 2, 2, 3), torch.channels_last_3d)}


def _format_reference(m, x, training):
    """y of layer ``m`` on float64 ``x`` from reference.py."""
    w, b = m.weight, m.bias
    if isinstance(m, PositionalNorm):
        return pn_ref(x, w, b)
    if not training:
        return bgn_eval_ref(x, m.num_groups, m.running_mean, m.running_var, w, b)
    if isinstance(m, GeneralBatchGroupNorm2d):
        return gbgn_ref(x, m.num_groups, m.examples_per_group, w, b)[0]
    return bgn_ref(x, m.num_groups, w, b)[0]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,layout", [(d, la) for d in FORMATS for la in FORMAT_LAYOUTS
                                          if not (d == "5d" and la == "gbgn")])  # GBGN: 2D
def test_output_and_input_gradient_keep_channels_last(dims, layout, training, engine,
                                                      request):
    set_engine(request, engine)
    cls, shape, fmt = FORMATS[dims]
    m = FORMAT_LAYOUTS[layout](cls).double().train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    leaf = torch.randn(shape, dtype=F64).to(memory_format=fmt).requires_grad_()
    for _ in range(2):  # the first call validates, the second takes kept passes
        x = leaf * 1  # a non-leaf input: its gradient is what the norm returns, as it is
        assert x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
        y = m(x)
        dy = torch.randn(shape, dtype=F64)
        params = (x, m.weight, m.bias)
        grads = torch.autograd.grad(y, params, dy)
        assert y.is_contiguous(memory_format=fmt), "y lost the input's memory format"
        assert grads[0].is_contiguous(memory_format=fmt), "dx lost the input's memory format"
        ref = _format_reference(m, x, training)
        torch.testing.assert_close(y, ref)
        for got, want in zip(grads, torch.autograd.grad(ref, params, dy)):
            torch.testing.assert_close(got, want)
    # contiguous inputs stay contiguous (PositionalNorm's input gradient is channels-last,
    # from torch's LayerNorm over C of the channels-last view: as it always was)
    xc = torch.randn(shape, dtype=F64, requires_grad=True) * 1
    yc = m(xc)
    assert yc.is_contiguous()
    dxc = torch.autograd.grad(yc, xc, torch.randn(shape, dtype=F64))[0]
    assert dxc.is_contiguous() or isinstance(m, PositionalNorm)


@pytest.mark.parametrize("g", [6, 3, 12, 9])
def test_synchronized_layer_keeps_channels_last(g, sync_path):
    m = SyncBatchGroupNorm(6, g, dtype=F64)
    for shape, fmt in (((4, 6, 4, 3), torch.channels_last),
                       ((4, 6, 2, 2, 3), torch.channels_last_3d)):
        x = torch.randn(shape, dtype=F64).to(memory_format=fmt).requires_grad_() * 1
        y = m(x)
        (dx,) = torch.autograd.grad(y, x, torch.randn(shape, dtype=F64))
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, bgn_ref(x, g, m.weight, m.bias)[0])
        m.layout_shape = None  # the next shape (straddling groups)


@pytest.mark.parametrize("engine", ENGINES)
def test_channels_last_double_backward(engine, request):
    set_engine(request, engine)
    m = BatchGroupNorm2d(6, 9).double()
    x0 = torch.randn(4, 6, 4, 3, dtype=F64)
    out = []
    for x in (x0.clone(), x0.to(memory_format=torch.channels_last)):
        x.requires_grad_()
        (dx,) = torch.autograd.grad(m(x).pow(3).sum(), x, create_graph=True)
        out.append((dx, torch.autograd.grad(dx.square().sum(), x)[0]))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


def test_strides_like_channels_last_follow_torch():
    """Sliced channels-last inputs (not dense) keep the format as torch's BatchNorm does."""
    x = torch.randn(4, 6, 8, 6).to(memory_format=torch.channels_last)[:, :, ::2]
    m, bn = BatchGroupNorm2d(6, 9), nn.BatchNorm2d(6)
    assert bn(x).is_contiguous(memory_format=torch.channels_last)
    assert m(x).is_contiguous(memory_format=torch.channels_last)
    assert m.eval()(x).is_contiguous(memory_format=torch.channels_last)
    # ambiguous (C = 1, 1x1 maps) or other strides: contiguous output, as torch's
    ambiguous = [torch.randn(4, 1, 3, 3), torch.randn(4, 6, 1, 1)]
    cases = [t.to(memory_format=torch.channels_last) for t in ambiguous] + [
        torch.randn(4, 6, 4, 4)[..., ::2], torch.randn(4, 3, 6, 4).transpose(1, 2)]
    for u in cases:
        c = u.shape[1]
        for g in (c, 2, 3, 3 * c, 4):  # G = C, whole channels, bands, straddling
            for training in (True, False):
                if u[0].numel() % g:
                    continue
                ours = BatchGroupNorm2d(c, g).train(training)
                theirs = nn.BatchNorm2d(c).train(training)
                assert ours(u).is_contiguous() and theirs(u).is_contiguous()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("g", [4, 16, 6], ids=["whole", "bands", "straddle"])
def test_compiled_layers_keep_channels_last(g, training):
    """torch.compile(fullgraph=True) (the general engine) keeps the formats of eager mode."""
    torch._dynamo.reset()
    m = BatchGroupNorm2d(8, g).train(training)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    leaf = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    x = leaf * 1
    y = cm(x)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, m(x.detach()))


# ---- finding 12: errors name the layer ---------------------------------------------------------


def _named(layer, path="features.3"):
    layer._bgnorm_path = path  # what convert_norm sets
    return layer


FORWARD_ERRORS = {  # name: (layer, input, exception, message after the layer's description)
    "dims": (BatchGroupNorm2d(96, 24), torch.randn(2, 96, 4), ValueError,
             r"expected 4D input \(got 3D input\)"),
    "channels": (BatchGroupNorm2d(96, 24), torch.randn(2, 95, 2, 2), ValueError,
                 r"expected input with 96 channels"),
    "divide": (BatchGroupNorm2d(96, 24 * 96), torch.randn(2, 96, 5, 5), ValueError,
               r"num_groups=2304 must divide D"),
    "one-value": (BatchGroupNorm2d(96, 96), torch.randn(1, 96, 1, 1), ValueError,
                  r"expected more than 1 value per group when training"),
    "eps": (BatchGroupNorm2d(96, 24, eps=0.0), torch.randn(2, 96, 2, 2), ValueError,
            r"eps must be positive during training"),
    "integer": (BatchGroupNorm2d(96, 24), torch.ones(2, 96, 2, 2, dtype=torch.long), TypeError,
                r"expected a floating-point input"),
    "1d": (BatchGroupNorm1d(96, 24), torch.randn(2, 96, 2, 2), ValueError,
           r"expected 2D or 3D input"),
    "3d": (BatchGroupNorm3d(96, 24), torch.randn(2, 96, 2, 2), ValueError,
           r"expected 5D input"),
    "gbgn-batch": (GeneralBatchGroupNorm2d(96, 24, 4), torch.randn(6, 96, 2, 2), ValueError,
                   r"batch size 6 is not divisible by examples_per_group=4"),
    "sync-dims": (SyncBatchGroupNorm(96, 24), torch.randn(2), ValueError,
                  r"expected at least 2D input"),
    "sync-divide": (SyncBatchGroupNorm(96, 24 * 96), torch.randn(2, 96, 5, 5), ValueError,
                    r"num_groups=2304 must divide D"),
    "pn-channels": (PositionalNorm(96), torch.randn(2, 95, 3), ValueError,
                    r"expected input with 96 channels"),
    "pn-integer": (PositionalNorm(96), torch.ones(2, 96, dtype=torch.long), TypeError,
                   r"expected a floating-point input"),
}
DESCRIPTIONS = {"BatchGroupNorm2d": r"BatchGroupNorm2d\(96, num_groups=(24|2304|96)\)",
                "BatchGroupNorm1d": r"BatchGroupNorm1d\(96, num_groups=24\)",
                "BatchGroupNorm3d": r"BatchGroupNorm3d\(96, num_groups=24\)",
                "GeneralBatchGroupNorm2d":
                    r"GeneralBatchGroupNorm2d\(96, num_groups=24, examples_per_group=4\)",
                "SyncBatchGroupNorm": r"SyncBatchGroupNorm\(96, num_groups=(24|2304)\)",
                "PositionalNorm": r"PositionalNorm\(96\)"}


@pytest.mark.parametrize("case", FORWARD_ERRORS)
def test_forward_errors_name_the_layer_and_its_path(case):
    layer, x, exc, message = FORWARD_ERRORS[case]
    desc = DESCRIPTIONS[type(layer).__name__]
    layer._bgnorm_path = None
    with pytest.raises(exc, match=rf"^{desc}: {message}"):
        layer(x)
    net = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), _named(layer)))
    with pytest.raises(exc, match=rf"^{desc} at 'features\.3': {message}"):
        net(x)
    if case not in ("one-value", "eps", "gbgn-batch"):  # errors of training only
        with pytest.raises(exc, match=rf"^{desc} at 'features\.3': {message}"):
            layer.eval()(x)


def test_straddling_layout_error_names_the_layer():
    m = _named(BatchGroupNorm2d(96, 40), "layer2.0.bn1")
    m(torch.randn(2, 96, 5, 5))
    with pytest.raises(ValueError, match=r"^BatchGroupNorm2d\(96, num_groups=40\) at "
                                         r"'layer2\.0\.bn1': groups straddle channel boundaries"):
        m(torch.randn(2, 96, 10, 10))


def test_state_dict_error_names_the_layer():
    m = _named(BatchGroupNorm2d(8, 2), "head.norm")
    with pytest.raises(RuntimeError, match=r"BatchGroupNorm2d\(8, num_groups=2\) at "
                                           r"'head\.norm': the checkpoint's running statistics "
                                           r"have 4 groups"):
        m.load_state_dict(BatchGroupNorm2d(8, 4).state_dict())


def test_synchronized_errors_name_the_layer(sync_path):
    m = _named(SyncBatchGroupNorm(4, 36), "body.sync")  # 36 groups of one value at 3x3
    with pytest.raises(ValueError, match=r"^SyncBatchGroupNorm\(4, num_groups=36\) at "
                                         r"'body\.sync': expected more than 1 value per group"):
        m(torch.randn(1, 4, 3, 3))
    m = _named(SyncBatchGroupNorm(4, 5), "body.sync")
    with pytest.raises(ValueError, match=r"^SyncBatchGroupNorm\(4, num_groups=5\) at "
                                         r"'body\.sync': num_groups=5 must divide D"):
        m(torch.randn(2, 4, 3, 3))
    x = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    m = _named(SyncBatchGroupNorm(4, 2, dtype=F64), "body.sync")
    with pytest.raises(RuntimeError, match=r"^SyncBatchGroupNorm\(4, num_groups=2\) at "
                                           r"'body\.sync' does not support double backward"):
        torch.autograd.grad(m(x).square().sum(), x, create_graph=True)


def test_the_path_is_a_plain_attribute():
    import copy
    import pickle

    m = _named(BatchGroupNorm2d(8, 4))
    assert "_bgnorm_path" not in m.state_dict() and BatchGroupNorm2d(8, 4)._bgnorm_path is None
    assert copy.deepcopy(m)._bgnorm_path == pickle.loads(pickle.dumps(m))._bgnorm_path
    assert repr(m) == repr(BatchGroupNorm2d(8, 4))
    sync = SyncBatchGroupNorm.convert_sync_batchgroupnorm(nn.Sequential(m))[0]
    assert sync._bgnorm_path == "features.3"


CONSTRUCTOR_ERRORS = {
    "BatchGroupNorm1d": lambda g: BatchGroupNorm1d(8, g),
    "BatchGroupNorm2d": lambda g: BatchGroupNorm2d(8, g),
    "BatchGroupNorm3d": lambda g: BatchGroupNorm3d(8, g),
    "GeneralBatchGroupNorm2d": lambda g: GeneralBatchGroupNorm2d(8, g, 2),
    "SyncBatchGroupNorm": lambda g: SyncBatchGroupNorm(8, g),
}


@pytest.mark.parametrize("cls", CONSTRUCTOR_ERRORS)
@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-2, ValueError), (True, TypeError),
                                     (2.0, TypeError), ("4", TypeError)])
def test_bad_num_groups_names_the_layer_class(cls, bad, exc):
    with pytest.raises(exc, match=rf"^{cls}: num_groups must be a positive int, got .*; pass "
                                  r"an integer"):
        CONSTRUCTOR_ERRORS[cls](bad)


def test_other_constructor_errors_name_the_layer_class():
    with pytest.raises(ValueError, match=r"^GeneralBatchGroupNorm2d: examples_per_group must be "
                                         r"a positive int, got 0"):
        GeneralBatchGroupNorm2d(8, 2, 0)
    for cls in (BatchGroupNorm2d, PositionalNorm, SyncBatchGroupNorm):
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: num_features must be a "
                                             r"positive int \(the channel count C\), got 0"):
            cls(0)


def test_num_groups_changed_after_construction_is_checked_with_the_layer_named():
    m = _named(BatchGroupNorm2d(8, 4))
    m.num_groups = 0
    with pytest.raises(ValueError, match=r"^BatchGroupNorm2d\(8, num_groups=0\) at 'features\.3'"
                                         r": num_groups must be a positive int, got 0"):
        m(torch.randn(2, 8, 2, 2))


# ---- finding 13: numpy integers, as torch takes them --------------------------------------------

@pytest.mark.parametrize("np_int", ["int64", "int32", "uint8"])
def test_numpy_integers_are_taken_and_stored_as_python_ints(np_int):
    import pickle

    t = getattr(np, np_int)
    assert isinstance(nn.BatchNorm2d(t(8)), nn.BatchNorm2d)  # torch takes them
    layers = [BatchGroupNorm2d(t(8), t(4)), BatchGroupNorm1d(num_features=t(8), num_groups=t(4)),
              BatchGroupNorm3d(t(8), num_groups=t(4)), SyncBatchGroupNorm(t(8), t(4)),
              GeneralBatchGroupNorm2d(t(8), t(4), examples_per_group=t(2)), PositionalNorm(t(8))]
    for m in layers:
        for attr in ("num_features", "num_groups", "examples_per_group"):
            value = getattr(m, attr, None)
            assert value is None or type(value) is int, (m, attr)
        assert "numpy" not in repr(m) and "np." not in repr(m)
        assert "numpy" not in pickle.dumps(m).decode("latin-1")
    m = BatchGroupNorm2d(t(8), t(6))  # straddling: the recorded layout is ints too
    m(torch.randn(2, 8, 3, 3))
    assert m.state_dict()["_extra_state"] == {"layout_shape": [3, 3]}
    x = torch.randn(4, 8, 3, 3, dtype=F64)
    torch.testing.assert_close(BF.batch_group_norm(x, t(4), training=True), bgn_ref(x, 4)[0])
    torch.testing.assert_close(BF.general_batch_group_norm(x, t(4), t(2), training=True),
                               gbgn_ref(x, 4, 2)[0])


@pytest.mark.parametrize("bad", [True, np.bool_(True), np.float64(4.0), 4.0, "4", None])
def test_bools_and_non_integers_are_still_refused(bad):
    with pytest.raises(TypeError, match=r"num_groups must be a positive int"):
        BatchGroupNorm2d(8, bad)
    with pytest.raises(TypeError, match=r"num_groups must be a positive int"):
        BF.batch_group_norm(torch.randn(2, 8), bad, training=True)
    with pytest.raises(TypeError, match=r"examples_per_group must be a positive int"):
        GeneralBatchGroupNorm2d(8, 4, bad)
    with pytest.raises(ValueError, match=r"num_features must be a positive int"):
        BatchGroupNorm2d(bad, 4)
    with pytest.raises(ValueError, match=r"num_groups must be a positive int, got -4"):
        BatchGroupNorm2d(8, np.int64(-4))


# ---- finding 16: a huge num_groups fails clearly -------------------------------------------------

HUGE = {
    "bgn2d": lambda g, **kw: BatchGroupNorm2d(8, g, **kw),
    "bgn1d": lambda g, **kw: BatchGroupNorm1d(8, g, **kw),
    "gbgn": lambda g, **kw: GeneralBatchGroupNorm2d(8, g, 2, **kw),
    "sync": lambda g, **kw: SyncBatchGroupNorm(8, g, **kw),
}
FIX = r"num_groups is G, the number of groups over D = C \* prod\(spatial\) .* Use a smaller " \
      r"num_groups \(e\.g\. a divisor of C: 1, 2, 4, 8\)"


@pytest.mark.parametrize("make", HUGE.values(), ids=HUGE.keys())
def test_huge_num_groups_is_refused_before_allocating(make, monkeypatch):
    from bgnorm import layers

    # 2**40 groups: 8 TiB of running statistics, more than this machine's memory
    with pytest.raises(ValueError, match=r"num_groups=1099511627776 is too large: its running "
                                         r"statistics .* need 8 TiB, more than the "
                                         r"(cpu|cuda) memory "
                                         rf"of this machine .*{FIX}"):
        make(2**40)
    with pytest.raises(ValueError, match=r"need 128 EiB, more than a torch tensor can address"):
        make(2**64)  # beyond int64 (torch's own error: "Overflow when unpacking long long")
    # the bound is the device's memory: 2**28 groups (2 GiB) on a 1 GiB machine
    monkeypatch.setattr(layers, "_memory_bytes", lambda d: None if d.type == "meta" else 2**30)
    with pytest.raises(ValueError, match=r"num_groups=268435456 is too large: .* need 2 GiB, "
                                         r"more than the (cpu|cuda) memory of this machine "
                                         r"\(1 GiB\)"):
        make(2**28)
    assert make(2**40, device="meta").running_mean.shape == (2**40,)  # nothing allocated
    m = make(2**40, track_running_stats=False)  # no buffers: the forward check names it
    with pytest.raises(ValueError, match=r"num_groups=1099511627776 must divide D"):
        m(torch.randn(4, 8, 4, 4) if not isinstance(m, BatchGroupNorm1d) else torch.randn(4, 8))


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                                                "you tried to allocate 4096 bytes"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                                          "2.00 GiB")])
def test_failed_allocation_of_the_statistics_names_num_groups(error, monkeypatch):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "ones", fail)
    with pytest.raises(type(error), match=r"^BatchGroupNorm2d\(8, num_groups=512\): "
                                          r"num_groups=512 needs running statistics of 512 "
                                          r"values each \(4 KiB in all\), which could not be "
                                          rf"allocated: {str(error)[:20]}.*{FIX}"):
        BatchGroupNorm2d(8, 512)


# ---- the same on CUDA (skipped without a GPU) --------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,layout", [(d, la) for d in FORMATS for la in FORMAT_LAYOUTS
                                          if not (d == "5d" and la == "gbgn")])
def test_cuda_channels_last_empty_inputs_and_bias_false(dims, layout, training):
    cls, shape, fmt = FORMATS[dims]
    m = FORMAT_LAYOUTS[layout](cls).to("cuda", F64).train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    x = (torch.randn(shape, dtype=F64, device="cuda").to(memory_format=fmt)
         .requires_grad_() * 1)
    y = m(x)
    dy = torch.randn(shape, dtype=F64, device="cuda")
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    ref = _format_reference(m, x, training)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(dx, torch.autograd.grad(ref, x, dy)[0])
    empty = torch.randn((0, *shape[1:]), dtype=F64, device="cuda", requires_grad=True)
    assert m(empty).shape == empty.shape
    if not isinstance(m, PositionalNorm):
        nobias = type(m)(6, m.num_groups, *([m.examples_per_group] if m.examples_per_group
                                            else []), bias=False, device="cuda")
        assert nobias.bias is None and nobias.train(training)(x.float()).shape == shape


@cuda
def test_cuda_huge_num_groups_is_refused_by_the_gpu_memory():
    with pytest.raises(ValueError, match=r"num_groups=1099511627776 is too large: .* more than "
                                         r"the cuda memory of this machine"):
        BatchGroupNorm2d(8, 2**40, device="cuda")


def test_pickled_layer_holds_no_engine_internals():
    """A layer pickled after an eval call does not carry its cached eval pass (a partial of a
    private engine function): the file loads with any bgnorm version that has the layer."""
    import pickle

    m = BatchGroupNorm2d(8, 4).eval()
    x = torch.randn(2, 8, 3, 3)
    want = m(x)
    blob = pickle.dumps(m)
    assert b"bgnorm.ops" not in blob
    torch.testing.assert_close(pickle.loads(blob)(x), want, rtol=0, atol=0)
