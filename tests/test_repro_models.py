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
