"""Adversarial training building blocks (Table 5 of the BGN paper).

* :func:`pgd_attack`: the L-infinity projected gradient descent attack of Madry et al.
  (ICLR 2018), written from its definition: an optional uniform random start inside the
  eps-ball, then ``steps`` iterations of

  .. math::
      x^{t+1} = \\Pi_{B_\\infty(x, \\epsilon) \\cap [lo, hi]}
                \\big(x^t + \\alpha \\, \\mathrm{sign}(\\nabla_{x^t} L(f(x^t), y))\\big)

  where the projection is the element-wise clamp onto the intersection of the eps-ball around
  the clean input and the valid pixel range. ``eps``, ``step_size`` and the range may be
  per-channel tensors, so the attack works directly on standardized inputs (see
  :func:`normalized_attack_params`).
* :class:`WideResNet`: the pre-activation Wide ResNet of Zagoruyko & Komodakis (BMVC 2016),
  depth ``6n+4``; the paper uses WRN-10-2.
* :func:`adversarial_train_step` (one Madry-style adversarial training step) and
  :func:`robust_accuracy` (clean and PGD accuracy of a model on a tensor dataset).

Everything takes plain tensors and modules; nothing here knows about the runner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PAPER_ADV",
    "WideResNet",
    "adversarial_train_step",
    "normalized_attack_params",
    "pgd_attack",
    "robust_accuracy",
    "wide_resnet",
]

NormFactory = Callable[[int], nn.Module]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Bound = Union[float, torch.Tensor]

#: The paper's adversarial-training setting (Table 5): WRN-10-2, a 4-step PGD attack with step
#: 2/255 and L-infinity radius 0.0157 (~4/255) in [0, 1] pixel space, Adam with lr 0.01.
PAPER_ADV: dict[str, float] = {
    "depth": 10,
    "widen_factor": 2,
    "eps": 0.0157,
    "step_size": 2.0 / 255.0,
    "steps": 4,
    "lr": 0.01,
}


# --------------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------------


def _as_bound(value: Bound, x: torch.Tensor, name: str) -> torch.Tensor:
    """A float or a tensor broadcastable to ``x`` (a 1-D tensor of length C is per channel)."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() == 1 and x.dim() >= 2 and t.numel() == x.shape[1] and t.numel() > 1:
        t = t.view(1, -1, *([1] * (x.dim() - 2)))
    try:
        torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the input of shape "
            f"{tuple(x.shape)}; pass a float, a length-C tensor or a tensor broadcastable to x"
        ) from None
    return t


@contextmanager
def _frozen_parameters(model: nn.Module):
    """Temporarily set ``requires_grad=False`` on every parameter; restores the exact flags."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Bound,
    step_size: Bound,
    steps: int,
    random_start: bool = True,
    clamp: tuple[Bound, Bound] | None = (0.0, 1.0),
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L-infinity PGD (Madry et al., 2018): adversarial examples that maximize ``loss_fn``.

    Starting from ``x`` (or, with ``random_start``, from ``x + U(-eps, eps)`` projected onto the
    valid range), takes ``steps`` signed-gradient ascent steps of size ``step_size`` on
    ``loss_fn(model(x_adv), y)``, each followed by the projection onto
    ``[max(x - eps, lo), min(x + eps, hi)]`` (the eps-ball intersected with the valid range).

    Args:
        model: the classifier; called as ``model(x)``. Its train/eval mode is left exactly as
            the caller set it (in train mode, norms with running statistics update them during
            the attack's forward passes, as in Madry et al.'s adversarial training; use eval mode
            to evaluate robustness). Its parameters' ``requires_grad`` flags are switched off
            during the attack and restored afterwards, so no gradient reaches ``.grad`` of any
            parameter.
        x: clean inputs ``(N, C, *)``, assumed inside the valid range.
        y: targets for ``loss_fn`` (class indices for the default cross-entropy).
        eps: the L-infinity radius: a float, a length-C tensor (per channel, e.g. for
            standardized inputs) or a tensor broadcastable to ``x``.
        step_size: the step size alpha (same forms as ``eps``).
        steps: number of gradient steps; ``steps=0`` disables the attack and returns a copy of
            ``x`` (no random start).
        random_start: start from a uniform random point of the eps-ball (Madry et al.).
        clamp: the valid input range ``(lo, hi)``, each a float or a per-channel tensor; None
            for no range constraint.
        loss_fn: ``loss_fn(logits, y) -> scalar`` to maximize; default mean cross-entropy.
        generator: random generator for the random start (deterministic attacks).

    Returns:
        The adversarial inputs, detached, same shape/dtype/device as ``x``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 2])
        >>> x_adv = pgd_attack(model, x, y, eps=0.1, step_size=0.05, steps=3)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), bool(x_adv.min() >= 0)
        (True, True)
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    x = x.detach()
    if steps == 0:
        return x.clone()
    eps_t = _as_bound(eps, x, "eps")
    step_t = _as_bound(step_size, x, "step_size")
    if bool((eps_t < 0).any()) or bool((step_t < 0).any()):
        raise ValueError("eps and step_size must be >= 0")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn

    lower, upper = x - eps_t, x + eps_t
    if clamp is not None:
        lo = _as_bound(clamp[0], x, "clamp[0]")
        hi = _as_bound(clamp[1], x, "clamp[1]")
        lower, upper = torch.maximum(lower, lo), torch.minimum(upper, hi)

    def project(z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(z, lower), upper)

    if random_start:
        dev = generator.device if generator is not None else x.device
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)
        x_adv = project(x + (2.0 * noise - 1.0) * eps_t)
    else:
        x_adv = x.clone()

    with _frozen_parameters(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project(x_adv.detach() + step_t * grad.sign())
    return x_adv.detach()


def normalized_attack_params(
    mean: Sequence[float],
    std: Sequence[float],
    eps: float,
    step_size: float,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Convert a pixel-space attack budget to standardized inputs ``(x - mean) / std``.

    For images in [0, 1] standardized per channel, the pixel-space radius ``eps`` becomes
    ``eps / std_c`` in channel c and the valid range becomes ``[(0 - mean_c) / std_c,
    (1 - mean_c) / std_c]``; the attack in the standardized space is then exactly the
    pixel-space attack. Returns ``(eps_c, step_c, (lo_c, hi_c))`` as length-C float tensors,
    ready for :func:`pgd_attack` (e.g. with a :class:`~bgnorm.repro.data.TensorSplit`'s
    ``mean`` and ``std``).
    """
    m = torch.as_tensor(mean, dtype=torch.float32).flatten()
    s = torch.as_tensor(std, dtype=torch.float32).flatten()
    if m.numel() != s.numel() or m.numel() == 0:
        raise ValueError("mean and std must be non-empty and of equal length")
    if bool((s <= 0).any()):
        raise ValueError("std must be positive")
    return eps / s, step_size / s, ((0.0 - m) / s, (1.0 - m) / s)


# --------------------------------------------------------------------------------------------
# Wide ResNet
# --------------------------------------------------------------------------------------------


class _WideBasic(nn.Module):
    """Pre-activation block: norm-ReLU-conv3x3-norm-ReLU-(dropout)-conv3x3 + shortcut."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, norm_layer: NormFactory, dropout: float
    ) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal_in_out = in_ch == out_ch and stride == 1
        # 1x1 projection of the pre-activated input where the shape changes (as in the
        # authors' implementation); identity otherwise.
        self.shortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_ch, out_ch, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.dropout(F.relu(self.bn2(o))))
        return o + shortcut


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis, 2016) with a pluggable norm layer.

    A 3x3 conv to 16 channels, three groups of ``n = (depth - 4) / 6`` pre-activation basic
    blocks with ``16k``, ``32k``, ``64k`` channels (stride 2 at the start of groups 2 and 3),
    then norm-ReLU, global average pooling and a linear classifier. Works on any input size
    (32x32 CIFAR, 28x28 and 8x8 digits...). WRN-28-10 has 36.5M parameters for 10 classes.

    Args:
        depth: ``6n + 4`` with ``n >= 1`` (10, 16, 22, 28, ...). The paper's Table 5 uses 10.
        widen_factor: k (the paper: 2).
        num_classes: classifier outputs.
        norm_layer: ``norm_layer(channels) -> nn.Module`` (e.g.
            ``functools.partial(bgnorm.make_norm, "bgn", num_groups=8)``).
        in_channels: input channels (3 for CIFAR, 1 for digits).
        dropout: dropout between the two convs of a block (0 in the paper's setting).

    Shape:
        ``(N, in_channels, H, W) -> (N, num_classes)``;
        :meth:`forward_features` gives ``(N, 64k)``.
    """

    def __init__(
        self,
        depth: int = 10,
        widen_factor: int = 2,
        num_classes: int = 10,
        norm_layer: NormFactory = nn.BatchNorm2d,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), "
                             f"got {depth!r}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be an int >= 1, got {widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        in_ch = widths[0]
        for g, out_ch in enumerate(widths[1:]):
            blocks = []
            for b in range(n):
                stride = 2 if (g > 0 and b == 0) else 1
                blocks.append(_WideBasic(in_ch, out_ch, stride, norm_layer, dropout))
                in_ch = out_ch
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = norm_layer(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            else:
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter):
                    with torch.no_grad():  # norm layers: gamma = 1, beta = 0
                        w.fill_(1.0)
                        b.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier, shape ``(N, num_features)``."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, widen_factor={self.widen_factor}"


def wide_resnet(
    depth: int = 10,
    widen_factor: int = 2,
    num_classes: int = 10,
    norm_layer: NormFactory = nn.BatchNorm2d,
    in_channels: int = 3,
    dropout: float = 0.0,
) -> WideResNet:
    """Build a :class:`WideResNet` (defaults: the paper's WRN-10-2)."""
    return WideResNet(depth, widen_factor, num_classes, norm_layer, in_channels, dropout)


# --------------------------------------------------------------------------------------------
# Training and evaluation helpers
# --------------------------------------------------------------------------------------------


def adversarial_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Bound,
    step_size: Bound,
    steps: int,
    clamp: tuple[Bound, Bound] | None = (0.0, 1.0),
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    attack_in_eval_mode: bool = False,
) -> dict[str, float]:
    """One step of Madry et al.'s adversarial training: minimize the loss on PGD examples.

    Crafts ``x_adv = pgd_attack(model, x, y, ...)`` (with the model in train mode, or in eval
    mode with ``attack_in_eval_mode``), then takes one optimizer step on
    ``loss_fn(model(x_adv), y)`` in train mode. The model is left in train mode.

    If the loss is not finite the optimizer step is skipped, so the caller can record the
    divergence (the runner's ``Diverged``) with the weights of the last finite step.

    Returns:
        ``{"loss": adversarial loss, "accuracy": accuracy on x_adv (before the update)}``.
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    model.train(not attack_in_eval_mode)
    x_adv = pgd_attack(
        model, x, y, eps=eps, step_size=step_size, steps=steps, random_start=random_start,
        clamp=clamp, loss_fn=loss_fn, generator=generator,
    )
    model.train()
    logits = model(x_adv)
    loss = loss_fn(logits, y)
    loss_value = float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    if math.isfinite(loss_value):
        loss.backward()
        optimizer.step()
    acc = float((logits.detach().argmax(1) == y).float().mean()) if logits.dim() == 2 else 0.0
    return {"loss": loss_value, "accuracy": acc}


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Bound,
    step_size: Bound,
    steps: int,
    clamp: tuple[Bound, Bound] | None = (0.0, 1.0),
    random_start: bool = True,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Clean and robust (PGD) accuracy of ``model`` on ``(x, y)``, in eval mode.

    Robust accuracy is the accuracy on the PGD examples of every test input (Madry et al.'s
    "adversarial accuracy"); an input counts only if its own adversarial example is classified
    correctly. The model is evaluated in eval mode and its previous mode is restored.

    Returns:
        ``{"clean_accuracy", "robust_accuracy", "n"}`` (accuracies as fractions in [0, 1]).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    clean = robust = 0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            with torch.no_grad():
                clean += int((model(xb).argmax(1) == yb).sum())
            xa = pgd_attack(
                model, xb, yb, eps=eps, step_size=step_size, steps=steps,
                random_start=random_start, clamp=clamp, loss_fn=loss_fn, generator=generator,
            )
            with torch.no_grad():
                robust += int((model(xa).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    n = len(x)
    return {
        "clean_accuracy": clean / max(n, 1),
        "robust_accuracy": robust / max(n, 1),
        "n": n,
    }
