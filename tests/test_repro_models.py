"""Tests for bgnorm.repro.models: architectures, norm-layer plumbing, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bgnorm
from bgnorm.repro.models import (
    MODELS,
    BasicBlock,
    Bottleneck,
    ResNet,
    build_model,
    cifar_resnet,
    resnet18,
    resnet50,
    small_resnet,
)
from bgnorm.repro.norms import NormSpec

# (name, factory) pairs; a factory takes the channel count and returns an nn.Module.
# Extend this list to run every model test with more normalization layers.
NORM_FACTORIES: list[tuple[str, object]] = [
    ("batchnorm", nn.BatchNorm2d),
    ("groupnorm_g1", lambda c: nn.GroupNorm(1, c)),
    ("groupnorm_gc", lambda c: nn.GroupNorm(c, c)),
    ("identity", nn.Identity),
    # bgnorm's norms (groups of 4 whole channels divide C*H*W at every resolution).
    ("bgn", lambda c: bgnorm.BatchGroupNorm2d(c, max(1, c // 4))),
    ("gbgn", lambda c: bgnorm.GeneralBatchGroupNorm2d(c, max(1, c // 4), examples_per_group=2)),
    ("pn", bgnorm.PositionalNorm),
    # The reproduction suite's virtual workers: statistics per slice of 2 examples.
    ("bn_virtual_workers", NormSpec("bn", batch_size=2, workers=2).make),
    ("bgn_virtual_workers", NormSpec("bgn", batch_size=2, workers=2, num_groups=8).make),
]

# (model name, build kwargs, input shape); all with 10 classes.
MODEL_CASES: list[tuple[str, dict, tuple[int, ...]]] = [
    ("resnet18", {}, (2, 3, 32, 32)),
    ("resnet50", {}, (2, 3, 32, 32)),
    ("cifar_resnet20", {}, (2, 3, 32, 32)),
    ("cifar_resnet", {"depth": 8, "in_channels": 1}, (2, 1, 28, 28)),
    ("small_resnet", {"in_channels": 1}, (4, 1, 28, 28)),
    ("small_resnet", {"in_channels": 1, "width": 8, "blocks_per_stage": (1, 1)}, (4, 1, 8, 8)),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


@pytest.mark.parametrize("norm_name,norm", NORM_FACTORIES, ids=[n for n, _ in NORM_FACTORIES])
@pytest.mark.parametrize(
    "model_name,kwargs,shape",
    MODEL_CASES,
    ids=[f"{n}-{'x'.join(map(str, s[1:]))}" for n, _, s in MODEL_CASES],
)
def test_forward_backward(model_name, kwargs, shape, norm_name, norm):
    model = build_model(model_name, num_classes=10, norm_layer=norm, **kwargs)
    model.train()
    x = torch.randn(shape)
    out = model(x)
    assert out.shape == (shape[0], 10)
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, torch.arange(shape[0]) % 10)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (shape[0], 10)


def test_standard_parameter_counts():
    assert _n_params(resnet18(num_classes=1000)) == 11_689_512
    assert _n_params(resnet50(num_classes=1000)) == 25_557_032


def test_parameter_counts_follow_norm_and_classes():
    # Identity norms remove exactly the affine parameters of the 20 BatchNorms of ResNet-18.
    bn = resnet18(num_classes=10)
    ident = resnet18(num_classes=10, norm_layer=nn.Identity)
    n_norm = sum(
        m.weight.numel() + m.bias.numel() for m in bn.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 20
    assert _n_params(bn) - _n_params(ident) == n_norm
    assert _n_params(bn) == 11_689_512 - 990 * 512 - 990


def test_cifar_resnet_depth():
    for depth in (8, 20, 32):
        model = cifar_resnet(depth=depth)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(convs) + len(linears) == depth
        assert len(_residual_blocks(model)) == 3 * (depth - 2) // 6
    assert model.fc.in_features == 64
    assert len(_residual_blocks(build_model("cifar_resnet", 10, depth=32))) == 15
    assert isinstance(build_model("cifar_resnet20", 10), ResNet)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth=21)


def test_small_resnet_structure():
    model = small_resnet(num_classes=10, in_channels=1, width=16, blocks_per_stage=(1, 2, 1))
    assert model.stem[0].in_channels == 1 and model.stem[0].out_channels == 16
    assert [len(stage) for stage in model.layers] == [1, 2, 1]
    assert model.fc.in_features == 64
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_in_channels_and_registry():
    for name in ("resnet18", "cifar_resnet20", "small_resnet"):
        model = build_model(name, num_classes=7, in_channels=1)
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.in_channels == 1
        assert model.fc.out_features == 7
    for required in ("resnet18", "resnet50", "cifar_resnet20", "cifar_resnet", "small_resnet"):
        assert required in MODELS
    with pytest.raises(ValueError, match="resnet18") as exc:
        build_model("resnet19", num_classes=10)
    assert "small_resnet" in str(exc.value)


def test_default_init():
    model = resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(2, c))
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # Kaiming normal, fan_out, relu gain: std = sqrt(2 / (out_channels * k * k)).
    conv = model.layers[3][0].conv2  # 512 x 512 x 3 x 3
    expected = math.sqrt(2.0 / (512 * 9))
    assert abs(conv.weight.std().item() / expected - 1) < 0.02


@pytest.mark.parametrize("builder", [resnet18, resnet50, cifar_resnet, small_resnet])
def test_zero_init_residual(builder):
    model = builder(num_classes=10, zero_init_residual=True)
    blocks = _residual_blocks(model)
    assert blocks
    zeroed = set()
    for block in blocks:
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.all(last.weight == 0)
        assert torch.all(last.bias == 0)
        zeroed.add(id(last))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and id(m) not in zeroed:
            assert torch.all(m.weight == 1), "only the last norm of each block is zeroed"
    # Without the option nothing is zeroed.
    plain = builder(num_classes=10)
    assert all(torch.all(m.weight == 1) for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


def test_zero_init_residual_makes_blocks_identity():
    model = cifar_resnet(depth=8, zero_init_residual=True).eval()
    block = model.layers[0][0]  # no downsample: output = relu(0 + x)
    x = torch.randn(2, 16, 8, 8).relu()
    torch.testing.assert_close(block(x), x)


class _NoWeightNorm(nn.Module):
    """A norm with ``weight = None`` and no extra attributes of any kind."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return x - mean


class _ShapedAffineNorm(nn.Module):
    """A custom norm with (1, C, 1, 1) affine parameters."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.randn(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


@pytest.mark.parametrize(
    "norm",
    [
        nn.Identity,
        lambda c: nn.GroupNorm(1, c, affine=False),
        lambda c: nn.BatchNorm2d(c, affine=False),
        _NoWeightNorm,
    ],
    ids=["identity", "groupnorm_noaffine", "batchnorm_noaffine", "weight_none"],
)
def test_zero_init_without_weight_builds(norm):
    for builder in (resnet18, cifar_resnet, small_resnet):
        model = builder(num_classes=10, norm_layer=norm, zero_init_residual=True)
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)


def test_custom_norm_init_and_zero_init():
    model = small_resnet(num_classes=10, norm_layer=_ShapedAffineNorm, zero_init_residual=True)
    blocks = _residual_blocks(model)
    for m in model.modules():
        if isinstance(m, _ShapedAffineNorm):
            assert torch.all(m.bias == 0)
            if any(m is b.bn2 for b in blocks):
                assert torch.all(m.weight == 0)
            else:
                assert torch.all(m.weight == 1)


def test_norm_factory_must_return_module():
    with pytest.raises(TypeError, match="nn.Module"):
        small_resnet(norm_layer=lambda c: None)


# --------------------------------------------------------------------------------------------
# Normalization-activation layers (FRN+TLU, EvoNorm-S0/B0): no ReLU after them
# --------------------------------------------------------------------------------------------

#: The suite's norms as the normalizers task builds them, by whether they include their
#: activation.
_NORM_ACT_SPECS = [NormSpec("frn"), NormSpec("evonorm_s0", num_groups=4),
                   NormSpec("evonorm_b0", batch_size=2, workers=2)]
_PLAIN_SPECS = [NormSpec("bn"), NormSpec("bn", batch_size=2, workers=2), NormSpec("gn"),
                NormSpec("bgn", batch_size=2, workers=2), NormSpec("brn"),
                NormSpec("gn", weight_standardization=True), NormSpec("pn"), NormSpec("none")]


def _old_forward(model: ResNet, x: torch.Tensor, relu_after_norm) -> torch.Tensor:
    """The models' forward written out, with a ReLU after a norm where ``relu_after_norm(norm)``
    (always True: the models before normalization-activation layers were handled)."""
    relu = nn.functional.relu
    conv, norm = model.stem[0], model.stem[1]
    out = norm(conv(x))
    out = relu(out) if relu_after_norm(norm) else out
    for stage in model.layers:
        for block in stage:
            identity = out if block.downsample is None else block.downsample(out)
            y = block.bn1(block.conv1(out))
            y = relu(y) if relu_after_norm(block.bn1) else y
            if isinstance(block, Bottleneck):
                y = block.bn2(block.conv2(y))
                y = relu(y) if relu_after_norm(block.bn2) else y
                y = block.bn3(block.conv3(y))
            else:
                y = block.bn2(block.conv2(y))
            out = relu(y + identity)
    return model.fc(torch.flatten(model.avgpool(out), 1))


def _build(spec: NormSpec, builder=small_resnet) -> ResNet:
    from bgnorm.repro.norms import build_normed_model

    torch.manual_seed(0)
    model, _ = build_normed_model(lambda nl: builder(num_classes=10, norm_layer=nl,
                                                     in_channels=1, width=8),
                                  spec, (1, 8, 8))
    return model


@pytest.mark.parametrize("spec", _NORM_ACT_SPECS, ids=lambda s: s.describe())
def test_norm_activation_layers_are_not_followed_by_a_relu(spec):
    import copy

    model = _build(spec)
    with torch.no_grad():  # a trained TLU's threshold (0 at initialisation: a ReLU)
        for m in model.modules():
            if isinstance(getattr(m, "tau", None), nn.Parameter):
                m.tau.fill_(-0.5)
    assert isinstance(model.stem[2], nn.Identity)
    assert all(not b.relu_after_bn1 for b in _residual_blocks(model))
    x = torch.randn(4, 1, 8, 8)
    expected = _old_forward(copy.deepcopy(model), x, relu_after_norm=lambda n: False)
    assert torch.equal(copy.deepcopy(model)(x), expected)
    # the ReLU after them changed the function (the bug this guards against)
    with_relu = _old_forward(copy.deepcopy(model), x, relu_after_norm=lambda n: True)
    assert not torch.equal(expected, with_relu)


@pytest.mark.parametrize("spec", _PLAIN_SPECS, ids=lambda s: s.describe())
def test_other_norms_keep_their_relu_modules_and_outputs(spec):
    import copy

    model = _build(spec)
    assert isinstance(model.stem[2], nn.ReLU)
    assert all(b.relu_after_bn1 for b in _residual_blocks(model))
    x = torch.randn(4, 1, 8, 8)
    expected = _old_forward(copy.deepcopy(model), x, relu_after_norm=lambda n: True)
    assert torch.equal(copy.deepcopy(model)(x), expected)
    # the same modules as before: the stem's ReLU and one per block (3 stages of one basic
    # block: 9 norms, 2 of them in projection shortcuts), no Identity but the "none" norms
    kinds = [type(m).__name__ for _, m in model.named_modules()]
    assert kinds.count("ReLU") == 1 + 3
    assert kinds.count("Identity") == (9 if spec.name == "none" else 0)


def test_bottleneck_skips_both_relus_after_norm_activation_layers():
    import copy

    x = torch.randn(2, 1, 16, 16)
    for spec, relu in ((NormSpec("frn"), False), (NormSpec("bn"), True)):
        torch.manual_seed(0)
        model = ResNet(Bottleneck, [1], [4], num_classes=10, in_channels=1,
                       norm_layer=spec.make, stem="cifar")
        [block] = _residual_blocks(model)
        assert (block.relu_after_bn1, block.relu_after_bn2) == (relu, relu)
        expected = _old_forward(copy.deepcopy(model), x, relu_after_norm=lambda n, r=relu: r)
        assert torch.equal(copy.deepcopy(model)(x), expected)


def test_includes_activation_can_be_declared_by_a_layer():
    from bgnorm.repro.models import includes_activation

    class NormAct(nn.BatchNorm2d):
        includes_activation = True

    model = small_resnet(norm_layer=NormAct, in_channels=1, width=4, blocks_per_stage=[1])
    assert isinstance(model.stem[2], nn.Identity)
    assert includes_activation(NormAct(4)) and not includes_activation(nn.GroupNorm(1, 4))
    assert not includes_activation(bgnorm.FilterResponseNorm2d(4, tlu=False))
    assert includes_activation(bgnorm.EvoNorm2dS0(4, groups=2))
    assert not includes_activation(bgnorm.EvoNorm2dB0(4, apply_act=False))  # timm's affine map
