"""Models for the Batch Group Normalization reproduction suite.

Every model is built around a ``norm_layer`` factory: a callable that takes the channel count
as its only positional argument and returns an ``nn.Module`` (``nn.BatchNorm2d``,
``lambda c: nn.GroupNorm(32, c)``, ``nn.Identity``, a bgnorm layer, ...). The models never touch
norm-specific attributes; the only attributes they look at are the optional ``weight`` and
``bias`` parameters, which are initialised to 1 / 0 (and ``weight`` to 0 for the last norm of
each residual block when ``zero_init_residual=True``), and whether a norm includes its
activation (:func:`includes_activation`).

Normalization-activation layers
-------------------------------
FRN with its TLU (:class:`bgnorm.FilterResponseNorm2d`) and EvoNorm-S0/B0
(:class:`bgnorm.EvoNorm2dS0`, :class:`bgnorm.EvoNorm2dB0`) replace a norm *and* the activation
after it, as in their papers and in timm's ``norm_act`` layers. Where a ReLU directly follows a
norm (the stem's, the first norm of a basic block, the first two of a bottleneck) the models
apply it only when :func:`includes_activation` of that norm is False, so these layers are not
followed by a second activation. The ReLU after the residual sum follows the sum, not a norm,
and stays; a norm not followed by a ReLU (the last of a block, the projection shortcut's) is the
layer as the factory built it. For every other norm the model is what it was: the same modules,
parameters and outputs.

Architectures:

* :func:`resnet18`, :func:`resnet50`: ImageNet ResNets (7x7 stride-2 stem + max-pool,
  ``BasicBlock`` / ``Bottleneck`` with the stride in the 3x3 conv, "ResNet v1.5"); with
  ``num_classes=1000`` they have exactly 11,689,512 and 25,557,032 parameters like the standard
  implementations.
* :func:`cifar_resnet`: the CIFAR ResNet of He et al. (2016), depth ``6n+2``, stages of
  16/32/64 channels, projection (1x1 conv + norm) shortcuts where the shape changes.
* :func:`small_resnet`: a tiny ResNet for quick CPU experiments on 28x28 / 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

import bgnorm

__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "NormFactory",
    "ResNet",
    "build_model",
    "cifar_resnet",
    "includes_activation",
    "resnet18",
    "resnet50",
    "small_resnet",
    "strides_to_final_size",
]

NormFactory = Callable[[int], nn.Module]


def includes_activation(norm: nn.Module) -> bool:
    """True when ``norm`` is a normalization-activation layer: it replaces a norm and the
    activation after it, so a model applies no ReLU after it.

    A module that declares a boolean ``includes_activation`` attribute is taken at its word
    (so user layers can opt in); otherwise FRN with its TLU (``tlu=True``) and EvoNorm-S0/B0
    (``apply_act=True``) include their activation, every other module does not.

    Example:
        >>> includes_activation(bgnorm.FilterResponseNorm2d(8)), includes_activation(
        ...     bgnorm.FilterResponseNorm2d(8, tlu=False))
        (True, False)
        >>> includes_activation(bgnorm.EvoNorm2dB0(8)), includes_activation(nn.BatchNorm2d(8))
        (True, False)
    """
    declared = getattr(norm, "includes_activation", None)
    if isinstance(declared, bool):
        return declared
    if isinstance(norm, (bgnorm.EvoNorm2dS0, bgnorm.EvoNorm2dB0)):
        return bool(norm.apply_act)
    if isinstance(norm, (bgnorm.FilterResponseNorm1d, bgnorm.FilterResponseNorm2d,
                         bgnorm.FilterResponseNorm3d)):
        return bool(norm.tlu)
    return False


def _activation_after(norm: nn.Module) -> nn.Module:
    """The activation a model puts after ``norm``: ReLU, or none for a norm-activation layer."""
    return nn.Identity() if includes_activation(norm) else nn.ReLU(inplace=True)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int, norm_layer: NormFactory) -> nn.Module | None:
    """Projection shortcut (1x1 conv + norm) when the shape changes, else ``None`` (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34, CIFAR ResNets)."""

    expansion = 1

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, norm_layer: NormFactory = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, out_ch)
        self.bn2 = norm_layer(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm_layer)
        # a norm-activation layer is not followed by the ReLU (see the module docstring)
        self.relu_after_bn1 = not includes_activation(self.bn1)

    def last_norm(self) -> nn.Module:
        """The norm whose output is added to the shortcut (target of zero-init)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        if self.relu_after_bn1:
            out = self.relu(out)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, "v1.5") -> 1x1 bottleneck block (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, norm_layer: NormFactory = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, out_ch)
        self.bn3 = norm_layer(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm_layer)
        # a norm-activation layer is not followed by the ReLU (see the module docstring)
        self.relu_after_bn1 = not includes_activation(self.bn1)
        self.relu_after_bn2 = not includes_activation(self.bn2)

    def last_norm(self) -> nn.Module:
        """The norm whose output is added to the shortcut (target of zero-init)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        if self.relu_after_bn1:
            out = self.relu(out)
        out = self.bn2(self.conv2(out))
        if self.relu_after_bn2:
            out = self.relu(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _NormRecorder:
    """Wraps a norm factory and remembers every module it created (for initialisation)."""

    def __init__(self, factory: NormFactory) -> None:
        self.factory = factory
        self.created: list[nn.Module] = []

    def __call__(self, channels: int) -> nn.Module:
        module = self.factory(channels)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"norm_layer({channels}) returned {type(module).__name__}, expected an nn.Module"
            )
        self.created.append(module)
        return module


def _param(module: nn.Module, name: str) -> nn.Parameter | None:
    value = getattr(module, name, None)
    return value if isinstance(value, nn.Parameter) else None


def _init_weights(
    model: nn.Module, norms: Sequence[nn.Module], blocks: Sequence[nn.Module], zero_init: bool
) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    with torch.no_grad():
        for norm in norms:
            weight, bias = _param(norm, "weight"), _param(norm, "bias")
            if weight is not None:
                weight.fill_(1.0)
            if bias is not None:
                bias.zero_()
        if zero_init:
            for block in blocks:
                weight = _param(block.last_norm(), "weight")
                if weight is not None:
                    weight.zero_()


class ResNet(nn.Module):
    """Generic ResNet: ``stem -> stages of residual blocks -> global avg-pool -> linear``.

    Use the constructors (:func:`resnet18`, :func:`resnet50`, :func:`cifar_resnet`,
    :func:`small_resnet`) rather than this class directly. ``stage_strides`` gives the stride
    of each stage's first block (default: 1, then 2 for every later stage).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
        norm_layer: NormFactory = nn.BatchNorm2d,
        stem: str = "imagenet",
        stem_width: int | None = None,
        zero_init_residual: bool = False,
        stage_strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError("layers and widths must be non-empty and of equal length")
        if stage_strides is None:
            stage_strides = [1] + [2] * (len(layers) - 1)
        stage_strides = [int(s) for s in stage_strides]
        if len(stage_strides) != len(layers) or any(s not in (1, 2) for s in stage_strides):
            raise ValueError(
                f"stage_strides must give 1 or 2 for each of the {len(layers)} stages, got "
                f"{list(stage_strides)}"
            )
        recorder = _NormRecorder(norm_layer)
        stem_width = widths[0] if stem_width is None else stem_width
        if stem == "imagenet":
            conv = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
            norm = recorder(stem_width)
            self.stem = nn.Sequential(
                conv, norm, _activation_after(norm),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        elif stem == "cifar":
            conv = _conv3x3(in_channels, stem_width)
            norm = recorder(stem_width)
            self.stem = nn.Sequential(conv, norm, _activation_after(norm))
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")

        stages: list[nn.Module] = []
        ch = stem_width
        for i, (n_blocks, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n_blocks):
                stride = stage_strides[i] if j == 0 else 1
                blocks.append(block(ch, planes, stride, recorder))
                ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        self.num_features = ch

        res_blocks = [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        _init_weights(self, recorder.created, res_blocks, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier, shape ``(N, num_features)``."""
        x = self.layers(self.stem(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnet18(
    num_classes: int = 1000,
    norm_layer: NormFactory = nn.BatchNorm2d,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> ResNet:
    """ImageNet ResNet-18 (BasicBlock, [2, 2, 2, 2]); 11,689,512 params for 1000 classes."""
    return ResNet(
        BasicBlock,
        [2, 2, 2, 2],
        [64, 128, 256, 512],
        num_classes=num_classes,
        in_channels=in_channels,
        norm_layer=norm_layer,
        stem="imagenet",
        zero_init_residual=zero_init_residual,
    )


def resnet50(
    num_classes: int = 1000,
    norm_layer: NormFactory = nn.BatchNorm2d,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> ResNet:
    """ImageNet ResNet-50 v1.5 (Bottleneck, [3, 4, 6, 3]); 25,557,032 params for 1000 classes."""
    return ResNet(
        Bottleneck,
        [3, 4, 6, 3],
        [64, 128, 256, 512],
        num_classes=num_classes,
        in_channels=in_channels,
        norm_layer=norm_layer,
        stem="imagenet",
        zero_init_residual=zero_init_residual,
    )


def cifar_resnet(
    depth: int = 20,
    num_classes: int = 10,
    norm_layer: NormFactory = nn.BatchNorm2d,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> ResNet:
    """CIFAR ResNet (He et al. 2016): depth ``6n+2``, stages of 16/32/64 channels.

    Uses a 3x3 stem without pooling and projection shortcuts (1x1 conv + norm) where the shape
    changes, so it works for 32x32 and smaller inputs (28x28, 8x8, ...).
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"cifar_resnet depth must be 6n+2 with n >= 1 (20, 32, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock,
        [n, n, n],
        [16, 32, 64],
        num_classes=num_classes,
        in_channels=in_channels,
        norm_layer=norm_layer,
        stem="cifar",
        zero_init_residual=zero_init_residual,
    )


def small_resnet(
    num_classes: int = 10,
    norm_layer: NormFactory = nn.BatchNorm2d,
    in_channels: int = 3,
    width: int = 16,
    blocks_per_stage: Sequence[int] = (1, 1, 1),
    zero_init_residual: bool = False,
    stage_strides: Sequence[int] | None = None,
    max_width: int | None = None,
) -> ResNet:
    """Small fast ResNet for CPU runs on 28x28 / 8x8 digits.

    3x3 stem conv to ``width`` channels + norm + ReLU, then one stage per entry of
    ``blocks_per_stage`` with ``min(width * 2**i, max_width)`` channels, global average pooling
    and a linear classifier. Each stage's first block has stride ``stage_strides[i]`` (default:
    1 for the first stage, 2 for every later one); :func:`strides_to_final_size` picks them so
    that the last stage ends at a chosen spatial size.

    Example:
        >>> strides = strides_to_final_size(16, 5, final_size=1)
        >>> model = small_resnet(10, in_channels=1, width=8, blocks_per_stage=[1] * 5,
        ...                      stage_strides=strides, max_width=64)
        >>> strides, model.num_features, model.layers(model.stem(torch.zeros(2, 1, 16, 16))).shape
        ([1, 2, 2, 2, 2], 64, torch.Size([2, 64, 1, 1]))
    """
    if width < 1 or not blocks_per_stage or any(b < 1 for b in blocks_per_stage):
        raise ValueError("width must be >= 1 and blocks_per_stage a non-empty list of ints >= 1")
    if max_width is not None and max_width < width:
        raise ValueError(f"max_width={max_width} must be >= width={width} (or None: no cap)")
    widths = [width * 2**i for i in range(len(blocks_per_stage))]
    if max_width is not None:
        widths = [min(w, max_width) for w in widths]
    return ResNet(
        BasicBlock,
        list(blocks_per_stage),
        widths,
        num_classes=num_classes,
        in_channels=in_channels,
        norm_layer=norm_layer,
        stem="cifar",
        zero_init_residual=zero_init_residual,
        stage_strides=stage_strides,
    )


def strides_to_final_size(image_size: int, num_stages: int, final_size: int) -> list[int]:
    """Stage strides of a ``num_stages``-stage :func:`small_resnet` on ``image_size`` px inputs
    whose last stage ends at ``final_size`` x ``final_size``.

    A stride-2 3x3 convolution (padding 1) maps n positions to ceil(n / 2). The first stage
    keeps stride 1; the following stages halve the size until it reaches ``final_size``, and
    the rest keep it (so, with widths doubling every stage, networks ending at 4x4, 2x2 and 1x1
    have the same layers and parameters and differ only in where they stop downsampling).

    Example:
        >>> [strides_to_final_size(16, 5, s) for s in (4, 2, 1)]
        [[1, 2, 2, 1, 1], [1, 2, 2, 2, 1], [1, 2, 2, 2, 2]]
    """
    if image_size < 1 or num_stages < 1 or final_size < 1:
        raise ValueError(f"image_size, num_stages and final_size must be >= 1, got "
                         f"{image_size}, {num_stages} and {final_size}")
    strides, size, reachable = [1], image_size, [image_size]
    for _ in range(num_stages - 1):
        if size > final_size:
            size = -(-size // 2)
            strides.append(2)
            reachable.append(size)
        else:
            strides.append(1)
    if size != final_size:
        raise ValueError(
            f"a {num_stages}-stage small_resnet on {image_size} px inputs cannot end at "
            f"{final_size}x{final_size}: it reaches "
            f"{', '.join(str(s) for s in reachable)} (add stages or pick one of these sizes)")
    return strides


MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "cifar_resnet": cifar_resnet,
    "cifar_resnet20": partial(cifar_resnet, depth=20),
    "cifar_resnet32": partial(cifar_resnet, depth=32),
    "cifar_resnet56": partial(cifar_resnet, depth=56),
    "cifar_resnet110": partial(cifar_resnet, depth=110),
    "small_resnet": small_resnet,
}


def build_model(
    name: str,
    num_classes: int,
    norm_layer: NormFactory = nn.BatchNorm2d,
    in_channels: int = 3,
    **kwargs,
) -> nn.Module:
    """Build a registered model by name (see :data:`MODELS`).

    Extra keyword arguments go to the constructor (e.g. ``depth`` for ``"cifar_resnet"``,
    ``width`` / ``blocks_per_stage`` / ``stage_strides`` / ``max_width`` for
    ``"small_resnet"``, ``zero_init_residual``).
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}"
        ) from None
    return ctor(num_classes=num_classes, norm_layer=norm_layer, in_channels=in_channels, **kwargs)
