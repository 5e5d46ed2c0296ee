"""Regression tests for the conversion, registry and policy findings of issue 13.

Each test names the finding it covers; every one of them failed before its fix.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as P

import bgnorm
from bgnorm import channel_groups, convert_norm, make_norm, paper_groups


# -- finding 13: numpy integers are accepted like ints -------------------------------------------
def test_numpy_integers_in_policies_and_registry():
    assert paper_groups(np.int64(16)) == 64 and type(paper_groups(np.int64(16))) is int
    assert paper_groups(np.int32(3)) == paper_groups(3)
    groups = channel_groups(np.int64(4))
    assert groups(64) == 16 and type(groups(64)) is int
    assert groups(np.int64(64)) == 16 and type(groups(np.int64(64))) is int
    m = make_norm("bgn", np.int64(8), num_groups=np.int64(4), dim=np.int64(1))
    assert isinstance(m, bgnorm.BatchGroupNorm1d)
    assert type(m.num_features) is int and type(m.num_groups) is int and m.num_groups == 4
    gn = make_norm("gn", np.int16(8), num_groups=np.int64(2))
    assert type(gn.num_groups) is int and gn.num_groups == 2
    assert make_norm("gbgn", 8, num_groups=np.int8(2), examples_per_group=np.int64(2)) \
        .examples_per_group == 2
    assert make_norm("bgn", 8, num_groups=channel_groups(np.int64(2))).num_groups == 4
    # what torch refuses stays refused: floats and bools are not counts
    with pytest.raises(TypeError, match=r"batch_size must be a positive int, got float"):
        paper_groups(np.float64(16))
    with pytest.raises(TypeError, match=r"channels_per_group must be a positive int, got bool"):
        channel_groups(True)


# -- finding 1: BatchNorm subclasses with their own forward are never replaced silently ----------
class BatchNormAct2d(nn.BatchNorm2d):
    """Stand-in for timm's timm.layers.norm_act.BatchNormAct2d (timm is not a dependency): a
    BatchNorm2d subclass, so that checkpoints of BN + act models load, with ``drop`` and ``act``
    submodules and its own forward: batch norm, then drop, then act."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act_kwargs = dict(act_kwargs or {})
        if inplace:
            act_kwargs["inplace"] = True
        self.act = act_layer(**act_kwargs) if apply_act and act_layer else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if keep else None,
                         self.running_var if keep else None, self.weight, self.bias,
                         use_batch, factor, self.eps)
        return self.act(self.drop(x))


class RenamedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that adds nothing: behaves exactly like BatchNorm2d."""


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.bn1 = BatchNormAct2d(8)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 1), RenamedBatchNorm2d(8)),
            nn.Sequential(nn.Conv2d(8, 8, 1), BatchNormAct2d(8, act_layer=nn.SiLU)),
        )

    def forward(self, x):
        return self.blocks(self.bn1(self.bn0(self.conv(x))))


def test_convert_refuses_batchnorm_subclass_with_own_forward():
    net = Stem()
    with pytest.raises(TypeError) as info:
        convert_norm(net, "bgn", num_groups=4)
    msg = str(info.value)
    assert "2 BatchNorm layer(s)" in msg
    assert "bn1: BatchNormAct2d, a subclass of torch.nn.BatchNorm2d with its own forward " \
        "(from BatchNormAct2d) and submodules drop=Identity, act=ReLU" in msg
    assert "blocks.1.1: BatchNormAct2d" in msg and "act=SiLU" in msg
    assert "subclasses='skip'" in msg and "subclasses='convert'" in msg and "exclude=" in msg
    # nothing was modified: the plain BatchNorm2d before the failing layer is still there
    assert type(net.bn0) is nn.BatchNorm2d and type(net.blocks[0][1]) is RenamedBatchNorm2d
    # the root itself
    with pytest.raises(TypeError, match=r"\(the model itself\): BatchNormAct2d"):
        convert_norm(BatchNormAct2d(8), "bgn", num_groups=4)


def test_convert_subclasses_skip_convert_and_exclude():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    net = Stem().double()
    act_layer, act_out = net.bn1, net.bn1(torch.randn(2, 8, 3, 3, dtype=torch.float64))
    skipped = convert_norm(net, "bgn", num_groups=8, subclasses="skip")
    assert skipped is net and net.bn1 is act_layer and type(net.blocks[1][1]) is BatchNormAct2d
    assert type(net.bn0) is bgnorm.BatchGroupNorm2d
    # a subclass that adds nothing behaves like BatchNorm2d and is converted
    assert type(net.blocks[0][1]) is bgnorm.BatchGroupNorm2d
    assert act_out.min() >= 0  # the kept layer still applies its ReLU
    net(x).sum().backward()

    net = Stem()
    convert_norm(net, "bgn", num_groups=4, subclasses="convert")
    assert type(net.bn1) is bgnorm.BatchGroupNorm2d and not hasattr(net.bn1, "act")

    net = Stem()
    convert_norm(net, "gn", num_groups=2, exclude=["bn1", BatchNormAct2d, "blocks.0.*"])
    assert type(net.bn0) is nn.GroupNorm and type(net.bn1) is BatchNormAct2d
    assert type(net.blocks[0][1]) is RenamedBatchNorm2d
    net = Stem()
    convert_norm(net, "gn", num_groups=2, exclude="blocks", subclasses="skip")
    assert type(net.bn0) is nn.GroupNorm and type(net.blocks[0][1]) is RenamedBatchNorm2d
    with pytest.raises(ValueError, match=r"exclude='block' matches no module of the Stem; .*"
                                         r"\(top level: conv, bn0, bn1, blocks\)"):
        convert_norm(Stem(), "gn", exclude=["block"])
    with pytest.raises(TypeError, match=r"exclude= takes module names .* got int 3"):
        convert_norm(Stem(), "gn", exclude=[3])
    with pytest.raises(ValueError, match=r"subclasses must be one of 'error', 'skip', "
                                         r"'convert', got 'keep'"):
        convert_norm(Stem(), "gn", subclasses="keep")
    with pytest.warns(UserWarning, match=r"no BatchNorm layer to convert to 'gn' \(4 excluded "
                                         r"or skipped\)"):
        convert_norm(Stem(), "gn", exclude=[nn.BatchNorm2d])


# -- finding 2: parametrized gamma/beta keep their parametrization -------------------------------
class Positive(nn.Module):
    """gamma = exp(theta), with theta the unconstrained tensor the optimizer trains."""

    def forward(self, theta):
        return theta.exp()

    def right_inverse(self, gamma):
        return gamma.log()


@pytest.mark.parametrize("groups", [8, 2])
def test_convert_carries_parametrized_gamma_and_beta(groups):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).double()
    bn = net[1]
    P.register_parametrization(bn, "weight", Positive())
    P.register_parametrization(bn, "bias", Positive())
    P.register_parametrization(bn, "bias", Positive())  # a chain: beta = exp(exp(theta))
    with torch.no_grad():
        bn.weight = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
        bn.bias = torch.linspace(1.5, 3.0, 8, dtype=torch.float64)
    bn.parametrizations.bias.original.requires_grad_(False)
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    theta = bn.parametrizations.weight.original.detach().clone()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    if groups == 8:
        net.eval()  # G = C: statistics carry over, so the eval outputs must be equal
    before = net(x)
    convert_norm(net, "bgn", num_groups=groups)
    new = net[1]
    assert isinstance(new, bgnorm.BatchGroupNorm2d) and P.is_parametrized(new, "weight")
    assert [type(p) for p in new.parametrizations.bias] == [Positive, Positive]
    torch.testing.assert_close(new.weight, gamma, rtol=1e-15, atol=0)
    torch.testing.assert_close(new.bias, beta, rtol=1e-15, atol=0)
    assert torch.equal(new.parametrizations.weight.original, theta)
    assert not new.parametrizations.bias.original.requires_grad
    # the parametrizations are copies: the old layer is independent of the new one
    assert new.parametrizations.weight.original is not bn.parametrizations.weight.original
    y = net(x)
    if groups == 8:
        torch.testing.assert_close(y, before, rtol=1e-12, atol=1e-12)
    else:  # training mode: BGN of the conv output with the same effective gamma and beta
        ref = bgnorm.functional.batch_group_norm(net[0](x), groups, weight=gamma, bias=beta,
                                                 training=True)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert new.parametrizations.weight.original.grad is not None


def test_convert_carries_weight_norm_parametrization():
    bn = nn.BatchNorm1d(6).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    torch.nn.utils.parametrizations.weight_norm(bn, "weight", dim=None)
    gamma = bn.weight.detach().clone()
    new = convert_norm(nn.Sequential(bn), "bgn", num_groups=3)[0]
    assert isinstance(new, bgnorm.BatchGroupNorm1d)
    assert {n for n, _ in new.parametrizations.weight.named_parameters()} == \
        {"original0", "original1"}
    torch.testing.assert_close(new.weight, gamma, rtol=1e-14, atol=0)


# -- finding 3: bias=False (torch 2.13's keyword-only argument) ----------------------------------
_BIAS_LAYERS = (bgnorm.BatchGroupNorm1d, bgnorm.BatchGroupNorm2d, bgnorm.BatchGroupNorm3d,
                bgnorm.GeneralBatchGroupNorm2d, bgnorm.PositionalNorm, bgnorm.SyncBatchGroupNorm)


def _layers_take_bias() -> bool:
    """Whether every bgnorm layer takes torch's keyword-only ``bias=`` (a layer-side change)."""
    return all("bias" in inspect.signature(cls.__init__).parameters for cls in _BIAS_LAYERS)


def _layers_load_batchnorm_checkpoints() -> bool:
    """Whether a BatchGroupNorm2d with G = C strict-loads a stock BatchNorm2d state dict (the
    layer side of finding 9: the checkpoint has no ``_extra_state``)."""
    try:
        bgnorm.BatchGroupNorm2d(4, 4).load_state_dict(nn.BatchNorm2d(4).state_dict())
    except RuntimeError:
        return False
    return True


needs_layer_bias = pytest.mark.skipif(
    not _layers_take_bias(), reason="the bgnorm layers do not take bias= yet (layer-side fix)")
needs_batchnorm_checkpoints = pytest.mark.skipif(
    not _layers_load_batchnorm_checkpoints(),
    reason="BatchGroupNorm does not strict-load BatchNorm checkpoints yet (layer-side fix)")


@pytest.mark.parametrize("name", ["bn", "gn", "ln", "in"])
def test_convert_batchnorm_without_bias_to_torch_layers(name):
    bn = nn.BatchNorm2d(8, bias=False).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    bn(torch.randn(4, 8, 3, 3, dtype=torch.float64))
    bn.eval()
    net = nn.Sequential(nn.Identity(), bn)
    checkpoint = {k: v.clone() for k, v in net.state_dict().items()}
    convert_norm(net, name, **({"num_groups": 4} if name == "gn" else {}))
    new = net[1]
    assert new.bias is None and "1.bias" not in net.state_dict()
    assert torch.equal(new.weight, bn.weight)
    assert make_norm(name, 8, bias=False).bias is None
    assert make_norm(name, 8).bias is not None
    if name == "bn":  # torch's synchronized variant too
        assert make_norm("bn", 8, sync=True, bias=False).bias is None
        sync = convert_norm(nn.Sequential(nn.SyncBatchNorm(8, bias=False)), "bn")[0]
        assert type(sync) is nn.SyncBatchNorm and sync.bias is None
    if name == "bn":
        net.load_state_dict(checkpoint)  # strict
        x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
        assert torch.equal(net(x), bn(x))


@needs_layer_bias
@pytest.mark.parametrize("name", ["bgn", "gbgn", "pn"])
def test_registry_bias_false_for_bgnorm_layers(name):
    kw = {"bgn": {"num_groups": 4}, "gbgn": {"num_groups": 4, "examples_per_group": 2}}
    layer = make_norm(name, 8, bias=False, **kw.get(name, {}))
    assert layer.bias is None and layer.weight is not None
    assert "bias" not in layer.state_dict()
    converted = convert_norm(nn.Sequential(nn.BatchNorm2d(8, bias=False)), name,
                             **kw.get(name, {}))[0]
    assert converted.bias is None and converted.weight is not None
    if name == "bgn":
        assert make_norm("bgn", 8, num_groups=4, sync=True, bias=False).bias is None


@needs_layer_bias
@needs_batchnorm_checkpoints
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_convert_batchnorm_without_bias_loads_its_checkpoint_at_g_equal_c(dim):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](6, bias=False).double()
    x = torch.randn(4, 6, *[3] * dim, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    bn(x)
    bn.eval()
    net = nn.Sequential(bn)
    checkpoint = {k: v.clone() for k, v in net.state_dict().items()}
    expected = bn(x)
    convert_norm(net, "bgn", num_groups=6)
    assert net[0].bias is None
    net.load_state_dict(checkpoint)  # strict
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


# -- finding 12: errors name the layer; converted layers know their path -------------------------
class Trunk(nn.Module):
    def __init__(self, lazy=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.body = nn.ModuleDict({"conv": nn.Conv2d(8, 6, 1),
                                   "norm": nn.LazyBatchNorm2d() if lazy else nn.BatchNorm2d(6)})

    def forward(self, x):
        x = self.stem(x)
        return self.body["norm"](self.body["conv"](x))


def _unchanged(net):
    return type(net.stem[1]) is nn.BatchNorm2d


def test_convert_errors_name_the_layer_class_and_fix():
    net = Trunk()
    with pytest.raises(ValueError) as info:
        convert_norm(net, "bgn", num_groups=lambda c: c - 6)  # 0 groups for C = 6
    msg = str(info.value)
    assert msg.startswith("convert_norm: cannot convert layer 'body.norm' (BatchNorm2d with "
                          "num_features=6) to 'bgn': ")
    assert "num_groups must be a positive int, got 0" in msg
    assert "num_groups=0 was returned by the callable " \
        "test_convert_errors_name_the_layer_class_and_fix.<locals>.<lambda>(6)" in msg
    assert _unchanged(net)
    with pytest.raises(TypeError, match=r"layer 'stem.1' \(BatchNorm2d with num_features=8\) "
                                        r"to 'bgn': BatchGroupNorm2d: num_groups must be a "
                                        r"positive int, got "
                                        r"float 2.0.*returned by the callable"):
        convert_norm(net, "bgn", num_groups=lambda c: c / 4)
    with pytest.raises(ValueError, match=r"layer 'body.norm' .* to 'gn': make_norm\('gn'\): "
                                         r"num_groups=4 must divide num_features=6 for "
                                         r"GroupNorm; nearby valid values: 1, 2, 3, 6"):
        convert_norm(net, "gn", num_groups=4)
    with pytest.raises(ValueError, match=r"layer 'stem.1' .*num_groups must be a positive "
                                         r"int, got 0"):
        convert_norm(net, "gn", num_groups=0)  # was a ZeroDivisionError in the registry
    with pytest.raises(ValueError, match=r"channels_per_group must be a positive int, got 0"):
        make_norm("gn", 8, channels_per_group=0)
    with pytest.raises(ValueError, match=r"the model itself \(BatchNorm1d with "
                                         r"num_features=4\) to 'gbgn'"):
        convert_norm(nn.BatchNorm1d(4), "gbgn", num_groups=2, examples_per_group=0)
    assert _unchanged(net)


def test_convert_lazy_batchnorm_needs_materializing_first():
    net = Trunk(lazy=True)
    with pytest.raises(ValueError) as info:
        convert_norm(net, "bgn", num_groups=2)
    assert str(info.value) == (
        "convert_norm: layer 'body.norm' is a LazyBatchNorm2d that has not been materialized "
        "yet, so its channel count is unknown; run one forward pass of the model first (e.g. "
        "model(example_input)), which turns it into a BatchNorm with its channel count, or "
        "build it as BatchNorm2d(num_features)")
    assert _unchanged(net)
    net(torch.randn(2, 3, 5, 5))
    convert_norm(net, "bgn", num_groups=2)
    assert type(net.body["norm"]) is bgnorm.BatchGroupNorm2d and net.body["norm"].num_groups == 2


def test_converted_layers_record_their_path():
    net = Trunk()
    shared = net.stem[1]
    net.body["again"] = shared  # one layer at two places stays one layer
    convert_norm(net, "bgn", num_groups=2)
    assert net.stem[1]._bgnorm_path == "stem.1" and net.body["norm"]._bgnorm_path == "body.norm"
    assert net.body["again"] is net.stem[1]
    assert convert_norm(nn.BatchNorm2d(4), "bgn", num_groups=2)._bgnorm_path is None


# -- finding 15: SyncBatchNorm (any dimension) and 1d/3d GBGN ------------------------------------
class Volume(nn.Module):
    """A small 3D network: Conv3d + SyncBatchNorm, Conv3d + BatchNorm3d, a BatchNorm1d head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(2, 8, 3, padding=1), nn.SyncBatchNorm(8), nn.ReLU(),
            nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 27, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        return self.head(self.features(x))


def _forward_backward(net, x):
    y = net(x)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return y


@pytest.mark.parametrize("groups", ["C", 2])
def test_convert_3d_network_with_syncbatchnorm_to_bgn(groups):
    torch.manual_seed(0)
    net = Volume().double()
    pg = object()  # stands for a process group: carried over, never used without torch.distributed
    net.features[1].process_group = pg
    x = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    reference = net(x)
    convert_norm(net, "bgn", num_groups=(lambda c: c) if groups == "C" else groups)
    sync, bgn3, bgn1 = net.features[1], net.features[4], net.head[2]
    assert type(sync) is bgnorm.SyncBatchGroupNorm and sync.process_group is pg
    assert type(bgn3) is bgnorm.BatchGroupNorm3d and type(bgn1) is bgnorm.BatchGroupNorm1d
    y = _forward_backward(net, x)
    if groups == "C":  # G = C is BatchNorm
        torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    net.eval()
    net(x)


def test_convert_syncbatchnorm_to_bn_and_per_worker_dims():
    net = Volume()
    convert_norm(net, "bn")
    assert type(net.features[1]) is nn.SyncBatchNorm and type(net.features[4]) is nn.BatchNorm3d
    # dim= makes SyncBatchNorm the per-worker layer of that dimension, and only SyncBatchNorm
    net = Volume()
    convert_norm(net, "bgn", num_groups=2, dim=3)
    assert type(net.features[1]) is bgnorm.BatchGroupNorm3d
    assert type(net.head[2]) is bgnorm.BatchGroupNorm1d
    _forward_backward(net, torch.randn(4, 2, 3, 3, 3, requires_grad=True))
    # sync=True: every bn/bgn layer synchronized
    net = Volume()
    convert_norm(net, "bgn", num_groups=2, sync=True)
    assert all(type(net.features[i]) is bgnorm.SyncBatchGroupNorm for i in (1, 4))
    assert type(net.head[2]) is bgnorm.SyncBatchGroupNorm
    with pytest.raises(ValueError, match=r"layer 'features.1' \(SyncBatchNorm with "
                                         r"num_features=8\) to 'bgn': SyncBatchNorm has no fixed "
                                         r"input dimension.*pass dim=1, 2 or 3"):
        convert_norm(Volume(), "bgn", num_groups=2, sync=False)


@pytest.mark.parametrize("dim", [1, 3])
def test_convert_gbgn_from_batchnorm_1d_3d(dim):
    torch.manual_seed(0)
    net = Volume().double()
    del net.features[1]  # leave BatchNorm3d and BatchNorm1d
    x = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    convert_norm(net, "gbgn", num_groups=2, examples_per_group=2)
    layer = net.features[3] if dim == 3 else net.head[2]
    assert type(layer) is (bgnorm.GeneralBatchGroupNorm3d if dim == 3
                           else bgnorm.GeneralBatchGroupNorm1d)
    _forward_backward(net, x)
    # against the functional GBGN on the layer's own input
    inputs = []
    layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    y = net(x)
    ref = bgnorm.functional.general_batch_group_norm(
        inputs[0], 2, 2, weight=layer.weight, bias=layer.bias, training=True)
    out = y if dim == 1 else net.features[3](inputs[0])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 5D input\)"):
        bgnorm.GeneralBatchGroupNorm2d(8, 2, 2)(torch.randn(4, 8, 3, 3, 3))
    with pytest.raises(ValueError, match=r"gbgn has no synchronized variant.*pass dim=1, 2"):
        convert_norm(Volume(), "gbgn", num_groups=2, examples_per_group=2)
    vol = Volume()
    convert_norm(vol, "gbgn", num_groups=2, examples_per_group=2, dim=3)
    assert type(vol.features[1]) is bgnorm.GeneralBatchGroupNorm3d


def test_registry_dims_and_sync():
    assert type(make_norm("gbgn", 8, num_groups=2, examples_per_group=2, dim=1)) is \
        bgnorm.GeneralBatchGroupNorm1d
    assert type(make_norm("bgn", 8, num_groups=2, sync=True)) is bgnorm.SyncBatchGroupNorm
    assert type(make_norm("bn", 8, sync=True)) is nn.SyncBatchNorm
    assert type(make_norm("bn", 8, sync=False, dim=3)) is nn.BatchNorm3d
    with pytest.raises(ValueError, match=r"make_norm\('gn'\): sync=True exists for bn "
                                         r"\(torch.nn.SyncBatchNorm\) and bgn"):
        make_norm("gn", 8, sync=True)
    with pytest.raises(ValueError, match=r"gbgn's statistics are per batch group by design"):
        make_norm("gbgn", 8, num_groups=2, examples_per_group=2, sync=True)
    with pytest.raises(TypeError, match=r"takes input of any dimension \(N, C, \*\): drop "
                                        r"dim=2"):
        make_norm("bgn", 8, sync=True, dim=2)
    with pytest.raises(ValueError, match=r"dim must be 1, 2 or 3, got True"):
        make_norm("bgn", 8, dim=True)


# -- finding 5: eval-mode models with G != C: statistics derived, never reset silently ----------
def _population_batchnorm(x):
    """A BatchNorm2d in eval whose running statistics are the exact per-channel mean and
    (biased) variance of the data ``x``: the statistics of a fully estimated population."""
    bn = nn.BatchNorm2d(x.shape[1]).double()
    with torch.no_grad():
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        bn.num_batches_tracked.fill_(500)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def test_convert_eval_model_derives_group_statistics_and_warns():
    torch.manual_seed(0)
    # channels with different means and scales, so the spread of the means matters
    x = torch.randn(16, 8, 5, 5, dtype=torch.float64) * torch.linspace(0.5, 3, 8).view(1, 8, 1, 1) \
        + torch.linspace(-2, 2, 8, dtype=torch.float64).view(1, 8, 1, 1)
    net = nn.Sequential(nn.Identity(), _population_batchnorm(x))
    with pytest.warns(UserWarning) as record:
        convert_norm(net, "bgn", num_groups=2)
    msg = str(record[0].message)
    assert "1 converted layer(s) are in eval mode with num_groups != num_features" in msg
    assert "estimated from BatchNorm's (1): exact group means" in msg
    assert "Re-estimate their statistics" in msg
    layer = net[1]
    # the group statistics of the data itself: groups of 4 whole channels
    groups = x.reshape(16, 2, 4, 5, 5).transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(layer.running_mean, groups.mean(dim=1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer.running_var, groups.var(dim=1, unbiased=False),
                               rtol=1e-13, atol=1e-13)
    assert int(layer.num_batches_tracked) == 500
    # so the eval output is BGN of x with the population's group statistics
    mean, var = groups.mean(dim=1), groups.var(dim=1, unbiased=False)
    expected = ((x.reshape(16, 2, -1) - mean.view(1, 2, 1))
                / (var.view(1, 2, 1) + layer.eps).sqrt()).reshape(x.shape)
    expected = expected * layer.weight.view(1, 8, 1, 1) + layer.bias.view(1, 8, 1, 1)
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


def test_convert_statistics_bands_straddling_reset_and_training():
    torch.manual_seed(0)
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64) + torch.arange(4.0).view(1, 4, 1, 1)
    bn = _population_batchnorm(x)
    # bands: each of a channel's 3 bands gets the channel's statistics
    with pytest.warns(UserWarning, match=r"estimated from BatchNorm's \(\(the model itself\)\)"):
        bands = convert_norm(bn, "bgn", num_groups=12)
    assert torch.equal(bands.running_mean, bn.running_mean.repeat_interleave(3))
    assert torch.equal(bands.running_var, bn.running_var.repeat_interleave(3))
    # straddling groups: no estimate is possible; reset, and said so
    with pytest.warns(UserWarning, match=r"reset to mean 0, variance 1 \(0\): their groups "
                                         r"straddle channels"):
        straddle = convert_norm(nn.Sequential(bn), "bgn", num_groups=3)[0]
    assert torch.equal(straddle.running_mean, torch.zeros(3, dtype=torch.float64))
    assert int(straddle.num_batches_tracked) == 0
    # asked for a reset: done, no warning; training mode: derived, no warning (batch statistics
    # are used until eval, and the derived ones are where the running average starts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reset = convert_norm(bn, "bgn", num_groups=2, running_stats="reset")
        assert torch.equal(reset.running_var, torch.ones(2, dtype=torch.float64))
        assert int(reset.num_batches_tracked) == 0
        trained = convert_norm(bn.train(), "gbgn", num_groups=2, examples_per_group=2)
        assert not torch.equal(trained.running_mean, torch.zeros(2, dtype=torch.float64))
        convert_norm(bn.eval(), "bgn", num_groups=4)  # G = C: copied
    with pytest.raises(ValueError, match=r"running_stats must be one of 'derive', 'reset', "
                                         r"got 'keep'"):
        convert_norm(bn, "bgn", running_stats="keep")


# -- finding 9 (conversion side): a converted model strict-loads a stock BatchNorm checkpoint ----
@needs_batchnorm_checkpoints
def test_converted_model_at_g_equal_c_loads_stock_batchnorm_checkpoint():
    torch.manual_seed(0)
    pretrained = Volume().double()
    with torch.no_grad():
        for m in pretrained.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64)
    pretrained(x)  # running statistics of one batch
    pretrained.eval()
    checkpoint = {k: v.clone() for k, v in pretrained.state_dict().items()}
    expected = pretrained(x)
    # convert a freshly built model, then load the pretrained BatchNorm checkpoint into it
    fresh = convert_norm(Volume().double(), "bgn", num_groups=lambda c: c)
    fresh.load_state_dict(checkpoint)  # strict
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected, rtol=1e-12, atol=1e-12)


# -- conversion keeps the layer's state around it: mode, device, dtype, requires_grad, hooks -----
def test_convert_carries_forward_and_backward_hooks():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    seen = []
    handles = [
        net[1].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__))),
        net[1].register_forward_hook(lambda m, args, out: seen.append(("post", out.shape))),
        net[1].register_forward_hook(lambda m, args, kwargs, out: seen.append(("kw", len(kwargs))),
                                     with_kwargs=True),
        net[1].register_full_backward_hook(lambda m, gin, gout: seen.append(("bwd", len(gin)))),
    ]
    convert_norm(net, "bgn", num_groups=2)
    net(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
    assert seen == [("pre", "BatchGroupNorm2d"), ("post", torch.Size([2, 8, 3, 3])), ("kw", 0),
                    ("bwd", 1)]
    for handle in handles:  # the handles still remove them
        handle.remove()
    seen.clear()
    net(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
    assert seen == []


def test_convert_refuses_hook_based_weight_norm_and_carries_state_dict_hooks():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    with pytest.warns(FutureWarning):  # torch deprecates the hook-based weight_norm
        torch.nn.utils.weight_norm(net[1], "weight")
    with pytest.raises(ValueError, match=r"layer '1' .*'weight' is reparametrized by "
                                         r"torch.nn.utils.weight_norm .*remove_weight_norm"
                                         r".*parametrizations.weight_norm"):
        convert_norm(net, "bgn", num_groups=3)
    assert type(net[1]) is nn.BatchNorm1d
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    calls = []
    net[1].register_load_state_dict_post_hook(lambda module, keys: calls.append(module))
    net[1]._register_load_state_dict_pre_hook(lambda module, *args: calls.append(module),
                                              with_module=True)
    checkpoint = net.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_norm(net, "bn")
    net.load_state_dict(checkpoint)
    assert calls == [net[1], net[1]] and type(net[1]) is nn.BatchNorm1d  # the new layer


def test_convert_keeps_mode_device_dtype_and_requires_grad():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(4, affine=False),
                        nn.BatchNorm2d(4, device="meta", dtype=torch.float16))
    net[0].double().bias.requires_grad_(False)
    net[1].eval()
    convert_norm(net, "bgn", num_groups=4)
    assert net[0].weight.dtype == torch.float64 and net[0].weight.requires_grad
    assert not net[0].bias.requires_grad and net[0].training
    assert net[1].running_mean.dtype == torch.float32 and not net[1].training
    assert net[2].weight.device.type == "meta" and net[2].running_var.dtype == torch.float16
    # a dtype asked for is the dtype given (it was overridden by the old layer's)
    asked = convert_norm(nn.Sequential(nn.BatchNorm2d(4)), "gn", num_groups=2,
                        dtype=torch.float64)[0]
    assert asked.weight.dtype == torch.float64


class AnyDimBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm of no fixed dimension that is not one of torch's classes."""

    def _check_input_dim(self, input):
        pass


def test_convert_batchnorm_of_no_fixed_dimension_needs_dim():
    net = nn.Sequential(AnyDimBatchNorm(4))
    with pytest.raises(TypeError, match=r"layer\(s\) of another class"):
        convert_norm(net, "bgn", num_groups=2)
    # replaced only when asked, and never made synchronized behind the user's back
    with pytest.raises(ValueError, match=r"AnyDimBatchNorm has no fixed input dimension.*"
                                         r"pass dim=1, 2 or 3"):
        convert_norm(net, "bgn", num_groups=2, subclasses="convert")
    convert_norm(net, "bgn", num_groups=2, subclasses="convert", dim=3)
    assert type(net[0]) is bgnorm.BatchGroupNorm3d
