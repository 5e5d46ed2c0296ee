"""Neural architecture search building blocks (Tables 3 and 4 of the BGN paper).

The DARTS search space and first-order DARTS (Liu, Simonyan & Yang, ICLR 2019), with every
normalization created by a ``norm_layer`` factory so that the norm can be swapped in both the
search and the evaluation phase:

* :data:`PRIMITIVES` / :func:`make_op`: the 8 candidate operations ``none``, ``max_pool_3x3``,
  ``avg_pool_3x3``, ``skip_connect``, ``sep_conv_3x3``, ``sep_conv_5x5``, ``dil_conv_3x3``,
  ``dil_conv_5x5``.
* :class:`MixedOp`, :class:`SearchCell`, :class:`SearchNetwork`: the continuous relaxation.
  A cell has 2 inputs, 4 intermediate nodes and 14 edges; reduction cells sit at 1/3 and 2/3
  of the depth. The architecture parameters ``alphas_normal`` / ``alphas_reduce`` have shape
  ``(14, 8)``.
* :func:`darts_search_step`: one first-order DARTS step (alphas on a validation batch with the
  weights fixed, then the weights on a training batch).
* :class:`Genotype`, :func:`derive_genotype`: the discrete cell (top-2 incoming edges per node
  by their strongest non-``none`` operation, as DARTS); :data:`DARTS_V1` / :data:`DARTS_V2`:
  the published cells.
* :class:`EvalNetwork`: the CIFAR-style network built from a genotype, with drop-path and an
  optional auxiliary head.

Norm factories and ``affine``. As in DARTS, the search network uses norms *without* affine
parameters inside its cells and the evaluation network uses affine norms. The search classes
call ``norm_layer(C, affine=False)`` when the factory takes an ``affine`` keyword (as
``functools.partial(bgnorm.make_norm, "bgn", num_groups=8)``, ``nn.BatchNorm2d`` and
``functools.partial(nn.GroupNorm, 4)`` do); any other ``norm_layer(C)`` factory (e.g. the
runner's per-layer factories) is called as usual and the affine parameters of the norm it
returns are frozen at the identity (weight 1, bias 0, ``requires_grad=False``; see
:func:`freeze_affine`), which computes exactly the non-affine norm. The evaluation network
calls ``norm_layer(C)`` only. Stems always use affine norms, as in DARTS.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DARTS_V1",
    "DARTS_V2",
    "PAPER_NAS",
    "PRIMITIVES",
    "EvalNetwork",
    "FactorizedReduce",
    "Genotype",
    "MixedOp",
    "ReLUConvNorm",
    "SearchCell",
    "SearchNetwork",
    "darts_optimizers",
    "darts_search_step",
    "derive_genotype",
    "drop_path",
    "freeze_affine",
    "input_blind",
    "genotype_from_dict",
    "genotype_to_dict",
    "make_op",
    "num_edges",
]

NormFactory = Callable[..., nn.Module]

#: The DARTS candidate operations, in the order of the alpha columns.
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

#: DARTS' CIFAR-10 hyper-parameters (Liu et al., 2019), used by the paper preset.
#: Search: 8 cells, 16 initial channels, 50 epochs, batch 64, weights by SGD (lr 0.025 cosine
#: to 0.001, momentum 0.9, wd 3e-4, grad clip 5), alphas by Adam (lr 3e-4, betas (0.5, 0.999),
#: wd 1e-3), half of the training set as the validation split for alphas.
#: Evaluation: 20 cells, 36 initial channels, 600 epochs, batch 96, SGD lr 0.025 cosine,
#: momentum 0.9, wd 3e-4, cutout 16, drop-path 0.2, auxiliary head weight 0.4, grad clip 5.
PAPER_NAS: dict[str, dict[str, object]] = {
    "search": {
        "layers": 8, "C": 16, "epochs": 50, "batch_size": 64, "w_lr": 0.025,
        "w_lr_min": 0.001, "w_momentum": 0.9, "w_weight_decay": 3e-4, "grad_clip": 5.0,
        "a_lr": 3e-4, "a_betas": (0.5, 0.999), "a_weight_decay": 1e-3, "train_portion": 0.5,
    },
    "eval": {
        "layers": 20, "C": 36, "epochs": 600, "batch_size": 96, "lr": 0.025, "momentum": 0.9,
        "weight_decay": 3e-4, "cutout": 16, "drop_path_prob": 0.2, "auxiliary_weight": 0.4,
        "grad_clip": 5.0,
    },
}


def _accepts_affine(factory: NormFactory) -> bool:
    """Whether ``factory`` can be called with an ``affine=`` keyword."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the torch convention
        return True
    return any(p.name == "affine" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def freeze_affine(module: nn.Module) -> nn.Module:
    """Fix a norm's affine parameters at the identity (weight 1, bias 0, no gradient).

    The module then computes what it would with ``affine=False``, whatever its class.
    """
    with torch.no_grad():
        for name, value in (("weight", 1.0), ("bias", 0.0)):
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter):
                p.fill_(value)
                p.requires_grad_(False)
    return module


def _norm(norm_layer: NormFactory, channels: int, affine: bool) -> nn.Module:
    """``norm_layer(channels)``, or its non-affine version for ``affine=False``.

    A factory that takes an ``affine`` keyword gets ``affine=False``; any other factory (e.g. a
    plain ``norm_layer(channels)`` callable) is called as usual and its affine parameters are
    frozen at the identity (:func:`freeze_affine`), which computes the same function.
    """
    if affine:
        return norm_layer(channels)
    if _accepts_affine(norm_layer):
        return norm_layer(channels, affine=False)
    return freeze_affine(norm_layer(channels))


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------


class ReLUConvNorm(nn.Sequential):
    """ReLU -> conv (no bias) -> norm (DARTS' ``ReLUConvBN``)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 norm_layer: NormFactory, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            _norm(norm_layer, C_out, affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> norm."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, norm_layer: NormFactory, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            _norm(norm_layer, C_out, affine),
        )


class SepConv(nn.Sequential):
    """Two stacked ReLU-depthwise-pointwise-norm blocks (DARTS' separable convolution)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 norm_layer: NormFactory, affine: bool = True) -> None:
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, norm_layer, affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, norm_layer, affine),
        )


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two stride-2 1x1 convs on offset grids, concatenated, + norm.

    For odd input sizes the offset path is zero-padded on the bottom/right so both paths give
    ``ceil(H / 2)`` (DARTS only meets even sizes).
    """

    def __init__(self, C_in: int, C_out: int, norm_layer: NormFactory,
                 affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.norm = _norm(norm_layer, C_out, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = x[:, :, 1:, 1:]
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            shifted = F.pad(shifted, (0, w % 2, 0, h % 2))
        return self.norm(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def make_op(name: str, C: int, stride: int, norm_layer: NormFactory,
            affine: bool = True) -> nn.Module:
    """Build the DARTS operation ``name`` on ``C`` channels with the given stride.

    Pools are ``count_include_pad=False`` averages and 3x3 max-pools with padding 1;
    ``skip_connect`` is the identity at stride 1 and a :class:`FactorizedReduce` at stride 2;
    separable convs are two ReLU-dw-pw-norm blocks, dilated convs one with dilation 2.
    """
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(C, C, norm_layer, affine)
    if name == "sep_conv_3x3":
        return SepConv(C, C, 3, stride, 1, norm_layer, affine)
    if name == "sep_conv_5x5":
        return SepConv(C, C, 5, stride, 2, norm_layer, affine)
    if name == "dil_conv_3x3":
        return DilConv(C, C, 3, stride, 2, 2, norm_layer, affine)
    if name == "dil_conv_5x5":
        return DilConv(C, C, 5, stride, 4, 2, norm_layer, affine)
    raise ValueError(f"unknown DARTS operation {name!r}; valid: {', '.join(PRIMITIVES)}")


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------


def num_edges(steps: int = 4) -> int:
    """Edges of a cell with ``steps`` intermediate nodes: ``2 + 3 + ... + (steps + 1)``."""
    return sum(2 + i for i in range(steps))


class MixedOp(nn.Module):
    """The continuous relaxation of one edge: ``sum_o w_o * o(x)`` over the 8 operations.

    Pools are followed by a non-affine norm, as in DARTS' search network (so that their output
    scale is comparable with the normalized convolutions).
    """

    def __init__(self, C: int, stride: int, norm_layer: NormFactory) -> None:
        super().__init__()
        ops = []
        for name in PRIMITIVES:
            op = make_op(name, C, stride, norm_layer, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, _norm(norm_layer, C, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``weights``: ``(len(PRIMITIVES),)`` mixing weights (softmax of the edge's alphas)."""
        if weights.shape != (len(self.ops),):
            raise ValueError(f"expected {len(self.ops)} weights, got {tuple(weights.shape)}")
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    """A DARTS search cell: 2 inputs, ``steps`` intermediate nodes, every edge a MixedOp.

    Inputs are the outputs of the previous two cells, preprocessed to ``C`` channels by
    ReLU-conv1x1-norm (or a :class:`FactorizedReduce` when the cell before the previous one had
    twice the resolution). Node i sums the MixedOps of all its predecessors; in a reduction
    cell the edges from the two inputs have stride 2. The output concatenates the last
    ``multiplier`` nodes.
    """

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, norm_layer: NormFactory) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps, self.multiplier = steps, multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, norm_layer, affine=False)
        else:
            self.preprocess0 = ReLUConvNorm(C_prev_prev, C, 1, 1, 0, norm_layer, affine=False)
        self.preprocess1 = ReLUConvNorm(C_prev, C, 1, 1, 0, norm_layer, affine=False)
        self.ops = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1, norm_layer)
            for i in range(steps) for j in range(2 + i)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            s = sum(self.ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier :], dim=1)


class Genotype(NamedTuple):
    """A discrete DARTS architecture.

    ``normal`` / ``reduce``: ``2 * steps`` pairs ``(operation, input)``, two per intermediate
    node in node order (input 0 and 1 are the cell inputs, 2.. the earlier nodes);
    ``*_concat``: the nodes concatenated into the cell output.
    """

    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]


#: The first-order DARTS cell of Liu et al. (the repository's genotypes.DARTS_V1).
DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)

#: The published second-order DARTS cell (2.76% CIFAR-10 error; genotypes.DARTS_V2 / DARTS).
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)


def _parse_cell(weights: torch.Tensor, steps: int) -> list[tuple[str, int]]:
    none = PRIMITIVES.index("none")
    w = weights.detach().double().cpu().tolist()
    gene: list[tuple[str, int]] = []
    start = 0
    for i in range(steps):
        rows = w[start : start + 2 + i]

        def strength(edge: int, rows: list[list[float]] = rows) -> float:
            return max(v for k, v in enumerate(rows[edge]) if k != none)

        # Python's sort is stable: ties keep the lower input index first, as in DARTS.
        for j in sorted(range(2 + i), key=lambda e: -strength(e))[:2]:
            k_best = max((k for k in range(len(PRIMITIVES)) if k != none),
                         key=lambda k, row=rows[j]: (row[k], -k))
            gene.append((PRIMITIVES[k_best], j))
        start += 2 + i
    return gene


def derive_genotype(alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor,
                    steps: int = 4, multiplier: int = 4) -> Genotype:
    """The discrete cell of DARTS from architecture parameters ``(num_edges(steps), 8)``.

    For each intermediate node, the weights are ``softmax(alphas)`` per edge; the node keeps
    the two incoming edges whose strongest non-``none`` operation has the largest weight, each
    with that operation (ties: the lower index, as DARTS). The cell output concatenates the
    last ``multiplier`` nodes.

    Example:
        >>> a = torch.zeros(14, 8)
        >>> a[1, PRIMITIVES.index("sep_conv_3x3")] = 1.0  # node 0: input 1 with sep_conv_3x3
        >>> g = derive_genotype(a, a)
        >>> g.normal[:2], g.normal_concat
        ([('sep_conv_3x3', 1), ('max_pool_3x3', 0)], [2, 3, 4, 5])
    """
    expected = (num_edges(steps), len(PRIMITIVES))
    for name, a in (("alphas_normal", alphas_normal), ("alphas_reduce", alphas_reduce)):
        if tuple(a.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(a.shape)}")
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(
        normal=_parse_cell(F.softmax(alphas_normal.detach(), dim=-1), steps),
        normal_concat=concat,
        reduce=_parse_cell(F.softmax(alphas_reduce.detach(), dim=-1), steps),
        reduce_concat=list(concat),
    )


class SearchNetwork(nn.Module):
    """The DARTS supernet: stem, ``layers`` search cells, global pooling, linear classifier.

    Reduction cells (channels doubled, resolution halved) sit at ``layers // 3`` and
    ``2 * layers // 3``. All normal cells share ``alphas_normal`` and all reduction cells
    ``alphas_reduce``, both of shape ``(num_edges(steps), 8)`` = ``(14, 8)``, initialised to
    ``1e-3 * N(0, 1)``. They are registered as parameters (so they are saved in the
    ``state_dict``) but kept apart from the network weights: optimize
    :meth:`weights_parameters` and :meth:`arch_parameters` with separate optimizers.

    Args:
        C: initial channels (DARTS search: 16).
        num_classes: classifier outputs.
        layers: number of cells (DARTS search: 8).
        norm_layer: a factory accepting ``(channels, affine=False)`` (see the module doc).
        in_channels: input channels.
        steps: intermediate nodes per cell (4).
        multiplier: nodes concatenated into the cell output (4).
        stem_multiplier: the stem has ``stem_multiplier * C`` channels (3).
    """

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8,
                 norm_layer: NormFactory = nn.BatchNorm2d, in_channels: int = 3,
                 steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3) -> None:
        super().__init__()
        if layers < 3:
            raise ValueError(f"layers must be >= 3 (two of them are reduction cells), "
                             f"got {layers}")
        self.steps, self.multiplier = steps, multiplier
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
                                  _norm(norm_layer, C_curr, affine=True))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        cells = []
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                                    reduction_prev, norm_layer))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.cells = nn.ModuleList(cells)
        self.classifier = nn.Linear(C_prev, num_classes)
        k = num_edges(steps)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, len(PRIMITIVES)))

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters ``[alphas_normal, alphas_reduce]``."""
        return [self.alphas_normal, self.alphas_reduce]

    def weights_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the architecture parameters."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(s1, 1), 1))

    def genotype(self) -> Genotype:
        """:func:`derive_genotype` of the current architecture parameters."""
        return derive_genotype(self.alphas_normal, self.alphas_reduce, self.steps,
                               self.multiplier)


def darts_optimizers(
    model: SearchNetwork,
    w_lr: float = 0.025,
    w_momentum: float = 0.9,
    w_weight_decay: float = 3e-4,
    a_lr: float = 3e-4,
    a_betas: tuple[float, float] = (0.5, 0.999),
    a_weight_decay: float = 1e-3,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """DARTS' optimizers: SGD for the weights and Adam for the alphas (defaults: the paper)."""
    w_opt = torch.optim.SGD(model.weights_parameters(), lr=w_lr, momentum=w_momentum,
                            weight_decay=w_weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=a_lr, betas=a_betas,
                             weight_decay=a_weight_decay)
    return w_opt, a_opt


def darts_search_step(
    model: SearchNetwork,
    w_optimizer: torch.optim.Optimizer,
    a_optimizer: torch.optim.Optimizer,
    train_batch: tuple[torch.Tensor, torch.Tensor],
    val_batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    grad_clip: float | None = 5.0,
) -> dict[str, float]:
    """One first-order DARTS step (Liu et al., 2019, Algorithm 1 with xi = 0).

    1. Architecture step: ``alpha <- alpha - a_lr * grad_alpha L_val(w, alpha)`` on
       ``val_batch``, the weights w held fixed (the first-order approximation drops the
       second-order term of the unrolled model). Only the alphas receive gradients.
    2. Weight step: ``w <- w - w_lr * grad_w L_train(w, alpha)`` on ``train_batch`` with the
       updated alphas, gradient norm clipped to ``grad_clip`` (DARTS: 5). Only the weights
       receive gradients.

    The model is put in train mode (both batches use batch statistics, as in DARTS). Steps
    whose loss is not finite are skipped, so the caller can record the divergence.

    Returns:
        ``{"val_loss", "train_loss", "train_accuracy"}`` (losses before the updates).
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    model.train()
    arch = [p for p in model.arch_parameters() if p.requires_grad]
    weights = [p for p in model.weights_parameters() if p.requires_grad]

    x_val, y_val = val_batch
    a_optimizer.zero_grad(set_to_none=True)
    val_loss = loss_fn(model(x_val), y_val)
    val_value = float(val_loss.detach())
    if torch.isfinite(val_loss):
        val_loss.backward(inputs=arch)
        a_optimizer.step()

    x_tr, y_tr = train_batch
    w_optimizer.zero_grad(set_to_none=True)
    logits = model(x_tr)
    train_loss = loss_fn(logits, y_tr)
    train_value = float(train_loss.detach())
    if torch.isfinite(train_loss):
        train_loss.backward(inputs=weights)
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(weights, grad_clip)
        w_optimizer.step()
    acc = float((logits.detach().argmax(1) == y_tr).float().mean())
    return {"val_loss": val_value, "train_loss": train_value, "train_accuracy": acc}


# --------------------------------------------------------------------------------------------
# Evaluation network
# --------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, drop_prob: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero whole examples of a path with probability ``drop_prob``, rescaling the rest."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    dev = generator.device if generator is not None else x.device
    mask = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=dev).to(x.device)
    return x * (mask < keep).to(x.dtype) / keep


class EvalCell(nn.Module):
    """A discrete cell built from a genotype (two operations per intermediate node)."""

    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, norm_layer: NormFactory) -> None:
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, norm_layer)
        else:
            self.preprocess0 = ReLUConvNorm(C_prev_prev, C, 1, 1, 0, norm_layer)
        self.preprocess1 = ReLUConvNorm(C_prev, C, 1, 1, 0, norm_layer)
        pairs = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        if len(pairs) % 2 or not pairs:
            raise ValueError("a genotype cell needs two (operation, input) pairs per node")
        self.steps = len(pairs) // 2
        for i, (_, idx) in enumerate(pairs):
            if not 0 <= idx < 2 + i // 2:
                raise ValueError(f"genotype edge {i} reads state {idx}, which does not exist yet")
        self.indices = [idx for _, idx in pairs]
        self.concat = list(concat)
        self.multiplier = len(self.concat)
        self.ops = nn.ModuleList(
            make_op(name, C, 2 if reduction and idx < 2 else 1, norm_layer)
            for name, idx in pairs
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            hs = []
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.indices[k]])
                if self.training and drop_prob > 0.0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS' CIFAR auxiliary classifier (ReLU, 5x5/3 avg-pool, 1x1 conv 128, 2x2 conv 768).

    DARTS assumes an 8x8 input (32x32 images); other sizes are pooled adaptively to 2x2.
    """

    def __init__(self, C: int, num_classes: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False), norm_layer(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), norm_layer(768), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        x = self.pool(x) if tuple(x.shape[-2:]) == (8, 8) else F.adaptive_avg_pool2d(x, 2)
        return self.classifier(torch.flatten(self.features(x), 1))


class EvalNetwork(nn.Module):
    """The network trained from a genotype (DARTS' ``NetworkCIFAR``) with a pluggable norm.

    Stem (3x3 conv to ``stem_multiplier * C`` + norm), ``layers`` cells with reductions at
    1/3 and 2/3 of the depth, global average pooling and a linear classifier. Drop-path with
    probability :attr:`drop_path_prob` (set it per epoch, DARTS ramps it linearly to 0.2) is
    applied to every non-identity operation in training. With ``auxiliary=True`` an auxiliary
    head reads the output of the cell at ``2 * layers // 3``; get its logits from
    :meth:`forward_with_aux` (``forward`` returns the main logits only).

    Args:
        genotype: e.g. :data:`DARTS_V2` or the result of :func:`derive_genotype`.
        C: initial channels (DARTS evaluation: 36).
        layers: number of cells (DARTS evaluation: 20).
        num_classes: classifier outputs.
        norm_layer: ``norm_layer(channels)`` (affine norms).
        in_channels: input channels.
        auxiliary: add the auxiliary head.
        drop_path_prob: initial drop-path probability.
        stem_multiplier: 3 as in DARTS.
    """

    def __init__(self, genotype: Genotype, C: int = 36, layers: int = 20,
                 num_classes: int = 10, norm_layer: NormFactory = nn.BatchNorm2d,
                 in_channels: int = 3, auxiliary: bool = False, drop_path_prob: float = 0.0,
                 stem_multiplier: int = 3) -> None:
        super().__init__()
        if layers < 3:
            raise ValueError(f"layers must be >= 3 (two of them are reduction cells), "
                             f"got {layers}")
        self.layers, self.drop_path_prob = layers, drop_path_prob
        self.genotype = genotype
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
                                  norm_layer(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        cells = []
        reduction_prev = False
        self.aux_index = 2 * layers // 3
        C_aux = C_prev
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                            norm_layer)
            cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_prev
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, norm_layer) if auxiliary else None
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, auxiliary logits)``; the latter is None in eval mode or without a head."""
        aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(torch.flatten(F.adaptive_avg_pool2d(s1, 1), 1))
        return logits, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(x)[0]


def input_blind(model: nn.Module, input_shape: Sequence[int], batch: int = 8,
                seed: int = 0) -> bool:
    r"""Whether the features ``model`` pools for its classifier ignore the input (a structural
    property, checked on one random batch before any training).

    Every operation of a search cell ends with a norm (convolutions, the factorized reduce, the
    pools, which the search network follows by a norm) or is zero or the identity of a state
    that did, and a cell outputs sums of them; so does an evaluation network's last cell when
    its genotype has no pooling there (DARTS_V2's normal cell, which ends the paper's
    network). With a norm whose statistic is one channel of one example (IN, or GN with one
    channel per group), each output channel then has spatial mean exactly its bias
    :math:`\beta_c` (0 without affine), for every input, so the global average pooling before
    the classifier yields a constant: the logits cannot depend on the image and the network
    stays at chance however it is trained. Per-example norms over several channels (LN, PN, GN
    with >= 2 channels a group) and batch norms keep an input-dependent pooled feature.

    ``model`` is a :class:`SearchNetwork` or :class:`EvalNetwork` (anything with a
    ``classifier`` module); it is run once in training mode without gradients and restored.
    Blind means: across the batch the classifier's input varies by at most ``1e-4`` times its
    largest magnitude (round-off is ~1e-6; a network that sees its input varies by O(1)).

    Example:
        >>> import functools
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> inorm = functools.partial(nn.InstanceNorm2d, affine=True)
        >>> input_blind(EvalNetwork(DARTS_V2, 4, 4, 10, inorm, 1), (1, 8, 8))
        True
        >>> input_blind(EvalNetwork(DARTS_V2, 4, 4, 10, nn.BatchNorm2d, 1), (1, 8, 8))
        False
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_shape), generator=g)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen: list[torch.Tensor] = []
    hook = model.classifier.register_forward_hook(
        lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    was = model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}  # running stats move in train
    try:
        model.train()
        with torch.no_grad():
            model(x.to(device))
    finally:
        hook.remove()
        model.load_state_dict(state)
        model.train(was)
    features = seen[0].float()
    spread = (features - features.mean(0)).abs().max()
    return bool(spread <= 1e-4 * max(1.0, float(features.abs().max())))


def genotype_to_dict(genotype: Genotype) -> dict[str, list]:
    """A JSON-serializable form of a genotype (lists of ``[op, input]`` pairs)."""
    return {
        "normal": [[op, int(i)] for op, i in genotype.normal],
        "normal_concat": [int(i) for i in genotype.normal_concat],
        "reduce": [[op, int(i)] for op, i in genotype.reduce],
        "reduce_concat": [int(i) for i in genotype.reduce_concat],
    }


def genotype_from_dict(d: dict[str, Sequence]) -> Genotype:
    """Inverse of :func:`genotype_to_dict`."""
    return Genotype(
        normal=[(str(op), int(i)) for op, i in d["normal"]],
        normal_concat=[int(i) for i in d["normal_concat"]],
        reduce=[(str(op), int(i)) for op, i in d["reduce"]],
        reduce_concat=[int(i) for i in d["reduce_concat"]],
    )
