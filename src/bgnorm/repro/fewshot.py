"""Few-shot learning building blocks (Table 6 of the BGN paper).

The method is *weight imprinting* (Qi, Brown & Lowe, "Low-Shot Learning with Imprinted
Weights", CVPR 2018) with a cosine classifier on a ResNet-12 backbone:

1. Train ``backbone -> CosineClassifier`` with cross-entropy on the *base* classes.
2. For an N-way K-shot episode of *novel* classes, embed the support images, L2-normalize the
   embeddings, average them per class and L2-normalize the mean: these unit vectors are the
   imprinted classifier weights of the N novel classes (:func:`imprint_weights`).
3. Classify the query images by cosine similarity to the imprinted weights; the episode's
   accuracy is the fraction of correct queries. Report the mean over many episodes (600 in the
   paper) with a 95% confidence interval (:func:`mean_confidence_interval`).

Episodes classify among their N novel classes only (the standard N-way protocol), so base-class
weights play no role at test time, and no fine-tuning follows the imprinting.

For speed, :func:`embed` computes the normalized embeddings of a whole novel-class pool once;
:func:`evaluate_episodes` then samples episodes as index sets into that feature matrix
(identical results to re-embedding each episode in eval mode, where every embedding depends
only on its own image).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PAPER_FEWSHOT",
    "CosineClassifier",
    "Episode",
    "FewShotData",
    "ResNet12",
    "base_novel_split",
    "bundled_fewshot",
    "embed",
    "episode_accuracy",
    "evaluate_episodes",
    "imprint_from_features",
    "imprint_weights",
    "mean_confidence_interval",
    "sample_episode",
]

NormFactory = Callable[[int], nn.Module]

#: The paper's few-shot evaluation protocol (Table 6): 5-way 1-shot and 5-shot episodes,
#: mean accuracy over 600 episodes with 95% confidence intervals, ResNet-12 backbone. The 15
#: queries per class are the common few-shot choice, not a number taken from the paper.
PAPER_FEWSHOT: dict[str, object] = {
    "n_way": 5,
    "shots": (1, 5),
    "n_query": 15,
    "episodes": 600,
    "confidence": 0.95,
    "channels": (64, 160, 320, 640),
}


@contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------------------
# Backbone and classifier
# --------------------------------------------------------------------------------------------


class _ResBlock12(nn.Module):
    """Three 3x3 conv-norm(-LeakyReLU) layers, a 1x1 conv-norm shortcut, LeakyReLU, max-pool 2."""

    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormFactory, slope: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = norm_layer(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = norm_layer(out_ch)
        self.conv3 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn3 = norm_layer(out_ch)
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), norm_layer(out_ch))
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        if min(out.shape[-2:]) >= 2:  # 2x2 max-pool; a 1x1 map is left as is (tiny inputs)
            out = F.max_pool2d(out, 2, ceil_mode=True)
        return out


class ResNet12(nn.Module):
    """The ResNet-12 few-shot backbone (as in TADAM / MetaOptNet / the imprinting literature).

    Four residual blocks, each three 3x3 conv-norm layers with LeakyReLU(0.1), a 1x1 conv-norm
    shortcut, a LeakyReLU after the addition and a 2x2 max-pool (``ceil_mode``, skipped once the
    map is 1x1, so 28x28 -> 14 -> 7 -> 4 -> 2 and 8x8 -> 4 -> 2 -> 1 -> 1), followed by global
    average pooling. DropBlock, used by some ResNet-12 recipes, is not included.

    Args:
        norm_layer: ``norm_layer(channels) -> nn.Module``.
        in_channels: input channels.
        channels: the four block widths; (64, 160, 320, 640) is the standard MetaOptNet width,
            (64, 128, 256, 512) the TADAM one; smaller tuples for CPU runs.
        negative_slope: LeakyReLU slope (0.1).

    Shape:
        ``(N, in_channels, H, W) -> (N, channels[-1])`` (the embedding, not normalized).
    """

    def __init__(
        self,
        norm_layer: NormFactory = nn.BatchNorm2d,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be four positive widths, got {channels}")
        blocks = []
        in_ch = in_channels
        for out_ch in channels:
            blocks.append(_ResBlock12(in_ch, out_ch, norm_layer, negative_slope))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1)


class CosineClassifier(nn.Module):
    """Cosine-similarity classifier: ``logits = s * <x / |x|, w_c / |w_c|>``.

    The logits lie in ``[-s, s]``. The scale ``s`` is a learnable scalar (as in Qi et al.)
    when ``learn_scale=True``, else a fixed buffer.

    Args:
        in_features: embedding size.
        num_classes: number of class weight vectors.
        scale: initial (or fixed) value of ``s``.
        learn_scale: learn ``s`` with the other parameters.
    """

    def __init__(
        self, in_features: int, num_classes: int, scale: float = 10.0, learn_scale: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        s = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(s)
        else:
            self.register_buffer("scale", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    @torch.no_grad()
    def imprint(self, weights: torch.Tensor) -> None:
        """Replace the class weights by ``weights`` (``(num_classes, in_features)``)."""
        if weights.shape != self.weight.shape:
            raise ValueError(f"expected weights of shape {tuple(self.weight.shape)}, "
                             f"got {tuple(weights.shape)}")
        self.weight.copy_(weights)

    def extra_repr(self) -> str:
        learn = isinstance(self.scale, nn.Parameter)
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"learn_scale={learn}")


# --------------------------------------------------------------------------------------------
# Imprinting and episodes
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def embed(
    backbone: nn.Module,
    x: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """L2-normalized embeddings ``(N, D)`` of ``x``, computed in eval mode (mode restored)."""
    out = []
    with _eval_mode(backbone):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            if device is not None:
                xb = xb.to(device)
            out.append(F.normalize(backbone(xb).float(), dim=1))
    if not out:
        raise ValueError("embed needs at least one input")
    return torch.cat(out)


def imprint_from_features(
    features: torch.Tensor, labels: torch.Tensor, n_way: int
) -> torch.Tensor:
    """Imprinted weights ``(n_way, D)``: the normalized mean of the normalized embeddings.

    ``w_c = normalize(mean_{i: y_i = c} normalize(f_i))`` (Qi et al., 2018); ``labels`` take
    values in ``0 .. n_way - 1`` and every class needs at least one example.
    """
    if features.dim() != 2 or len(features) != len(labels):
        raise ValueError("features must be (N, D) with one label per row")
    f = F.normalize(features, dim=1)
    onehot = F.one_hot(labels.long(), n_way).to(f.dtype)  # (N, n_way)
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"no support example for episode classes {missing}")
    means = onehot.t() @ f / counts.unsqueeze(1)
    return F.normalize(means, dim=1)


def imprint_weights(
    backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int
) -> torch.Tensor:
    """Imprint ``n_way`` novel-class weights from a support set (Qi et al., 2018).

    Embeds ``support_x`` with ``backbone`` in eval mode (its mode is restored), then returns
    :func:`imprint_from_features` of the embeddings: unit-norm rows, row c being the normalized
    mean of the normalized embeddings of the support images labelled c (``0 .. n_way - 1``).
    """
    feats = embed(backbone, support_x)
    return imprint_from_features(feats, support_y.to(feats.device), n_way)


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode: indices into the pool and episode-relative labels.

    ``classes[j]`` is the pool label of episode class j; ``support_y`` / ``query_y`` hold
    episode labels in ``0 .. n_way - 1``.
    """

    classes: torch.Tensor
    support_idx: torch.Tensor
    support_y: torch.Tensor
    query_idx: torch.Tensor
    query_y: torch.Tensor


def sample_episode(
    labels: torch.Tensor,
    classes: Iterable[int] | None,
    n_way: int,
    k_shot: int,
    n_query: int,
    generator: torch.Generator | None = None,
) -> Episode:
    """Sample an N-way K-shot episode with ``n_query`` queries per class.

    Draws ``n_way`` distinct classes from ``classes`` (default: every label present), then, per
    class, ``k_shot + n_query`` distinct examples without replacement: the first ``k_shot``
    form the support set, the rest the query set, so the two sets are disjoint. Deterministic
    for a given ``generator`` state.
    """
    labels = torch.as_tensor(labels).flatten().cpu()
    pool = torch.unique(labels) if classes is None else torch.as_tensor(list(classes)).unique()
    if n_way < 1 or k_shot < 1 or n_query < 1:
        raise ValueError("n_way, k_shot and n_query must all be >= 1")
    if n_way > len(pool):
        raise ValueError(f"n_way={n_way} exceeds the {len(pool)} available classes")
    chosen = pool[torch.randperm(len(pool), generator=generator)[:n_way]]
    s_idx, s_y, q_idx, q_y = [], [], [], []
    for j, c in enumerate(chosen.tolist()):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < k_shot + n_query:
            raise ValueError(
                f"class {c} has {len(idx)} examples, fewer than k_shot + n_query = "
                f"{k_shot + n_query}"
            )
        idx = idx[torch.randperm(len(idx), generator=generator)[: k_shot + n_query]]
        s_idx.append(idx[:k_shot])
        q_idx.append(idx[k_shot:])
        s_y.append(torch.full((k_shot,), j, dtype=torch.long))
        q_y.append(torch.full((n_query,), j, dtype=torch.long))
    return Episode(chosen, torch.cat(s_idx), torch.cat(s_y), torch.cat(q_idx), torch.cat(q_y))


def episode_accuracy(
    class_weights: torch.Tensor, query_features: torch.Tensor, query_y: torch.Tensor
) -> float:
    """Fraction of queries whose highest cosine similarity is with their own class weight.

    The cosine classifier's scale does not change the arg-max, so it is not needed here.
    """
    sims = F.normalize(query_features, dim=1) @ F.normalize(class_weights, dim=1).t()
    return float((sims.argmax(1) == query_y.to(sims.device)).float().mean())


def evaluate_episodes(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    k_shot: int,
    n_query: int,
    episodes: int,
    generator: torch.Generator | None = None,
    classes: Iterable[int] | None = None,
) -> list[float]:
    """Accuracies of ``episodes`` imprinting episodes over a pool of embeddings.

    ``features`` are the pool's embeddings (e.g. :func:`embed` of the novel-class images) and
    ``labels`` their classes. Each episode is :func:`sample_episode`, imprinted with
    :func:`imprint_from_features` on its support features and scored with
    :func:`episode_accuracy` on its queries.
    """
    labels = torch.as_tensor(labels).cpu()
    accs = []
    for _ in range(episodes):
        ep = sample_episode(labels, classes, n_way, k_shot, n_query, generator)
        w = imprint_from_features(features[ep.support_idx], ep.support_y.to(features.device),
                                  n_way)
        accs.append(episode_accuracy(w, features[ep.query_idx], ep.query_y))
    return accs


def mean_confidence_interval(
    accs: Sequence[float] | torch.Tensor, confidence: float = 0.95, quantile: str = "normal"
) -> tuple[float, float]:
    """Mean and confidence-interval half-width of per-episode accuracies.

    ``half_width = q * s / sqrt(n)`` with ``s`` the sample standard deviation (``n - 1`` in the
    denominator) and ``q`` the two-sided quantile: the normal one by default
    (``q = 1.959964`` for 95%, the usual "1.96 * std / sqrt(n)" of few-shot papers), or
    Student's t with ``n - 1`` degrees of freedom for ``quantile="t"`` (needs scipy). For 600
    episodes the two agree to about 0.2% of the half-width (1.9600 vs 1.9640), i.e. to three
    decimals of an accuracy in percent. Some few-shot code uses ``n`` instead of ``n - 1`` in
    ``s``; the difference is a factor ``sqrt(n / (n - 1))`` (1.0008 for n = 600).

    Example:
        >>> m, h = mean_confidence_interval([0.5, 0.7, 0.6, 0.8])
        >>> round(m, 4), round(h, 4)
        (0.65, 0.1265)
    """
    values = [float(a) for a in (accs.flatten().tolist() if torch.is_tensor(accs) else accs)]
    n = len(values)
    if n < 2:
        raise ValueError(f"need at least two values for a confidence interval, got {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = statistics.fmean(values)
    std = statistics.stdev(values)
    p = 0.5 + confidence / 2.0
    if quantile == "normal":
        q = statistics.NormalDist().inv_cdf(p)
    elif quantile == "t":
        try:
            from scipy import stats
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("quantile='t' needs scipy; use quantile='normal'") from e
        q = float(stats.t.ppf(p, n - 1))
    else:
        raise ValueError(f"quantile must be 'normal' or 't', got {quantile!r}")
    return mean, q * std / math.sqrt(n)


# --------------------------------------------------------------------------------------------
# Data: an honest base / novel class split
# --------------------------------------------------------------------------------------------


@dataclass
class FewShotData:
    """Base-class train/test data and a disjoint novel-class pool.

    ``y_base_*`` are relabelled ``0 .. len(base_classes) - 1`` (for the base classifier);
    ``y_novel`` keeps the original labels. Images are standardized with the statistics of the
    base training images only, so nothing about the novel classes is used before evaluation.
    """

    x_base_train: torch.Tensor
    y_base_train: torch.Tensor
    x_base_test: torch.Tensor
    y_base_test: torch.Tensor
    x_novel: torch.Tensor
    y_novel: torch.Tensor
    base_classes: tuple[int, ...]
    novel_classes: tuple[int, ...]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_base_classes(self) -> int:
        return len(self.base_classes)


def base_novel_split(
    x: torch.Tensor,
    y: torch.Tensor,
    base_classes: Iterable[int] = range(5),
    novel_classes: Iterable[int] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FewShotData:
    """Split raw images ``x`` (in [0, 1]) by class into base and novel sets.

    Base-class images are split stratified into train/test (``test_fraction``); all images of
    the novel classes (default: every class not in ``base_classes``) form the novel pool, which
    the base training never sees. The default is digits 0-4 base, 5-9 novel.
    """
    from .data import stratified_split

    base = tuple(sorted(int(c) for c in base_classes))
    present = sorted(int(c) for c in torch.unique(y).tolist())
    novel = (tuple(c for c in present if c not in base) if novel_classes is None
             else tuple(sorted(int(c) for c in novel_classes)))
    if not base or not novel or set(base) & set(novel):
        raise ValueError(f"base {base} and novel {novel} classes must be non-empty and disjoint")
    missing = [c for c in base + novel if c not in present]
    if missing:
        raise ValueError(f"classes {missing} have no examples")
    is_base = torch.isin(y, torch.tensor(base))
    is_novel = torch.isin(y, torch.tensor(novel))
    xb, yb = x[is_base], y[is_base]
    remap = torch.full((max(present) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(base)] = torch.arange(len(base))
    x_tr, y_tr, x_te, y_te = stratified_split(xb, remap[yb], test_fraction=test_fraction,
                                              seed=seed)
    dims = (0, *range(2, x.dim()))
    mean = x_tr.mean(dim=dims)
    std = x_tr.std(dim=dims).clamp_min(1e-8)
    shape = (1, -1, *([1] * (x.dim() - 2)))

    def norm(t: torch.Tensor) -> torch.Tensor:
        return ((t - mean.view(shape)) / std.view(shape)).contiguous()

    return FewShotData(
        x_base_train=norm(x_tr), y_base_train=y_tr, x_base_test=norm(x_te), y_base_test=y_te,
        x_novel=norm(x[is_novel]), y_novel=y[is_novel].clone(),
        base_classes=base, novel_classes=novel, in_channels=int(x.shape[1]),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
    )


def bundled_fewshot(
    name: str = "mnist5k",
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    base_classes: Iterable[int] = range(5),
    test_fraction: float = 0.2,
) -> FewShotData:
    """:func:`base_novel_split` of a bundled digit set (``"mnist5k"`` or ``"digits"``).

    ``size`` optionally resizes the images first (bilinear, antialiased). With the defaults:
    digits 0-4 are the base classes (2000 train / 500 test images of MNIST-5k), digits 5-9 the
    novel pool (2500 images, 500 per class).
    """
    from .data import _resize_batch, load_digits8x8, load_mnist5k

    loaders = {"mnist5k": load_mnist5k, "digits": load_digits8x8}
    if name not in loaders:
        raise ValueError(f"unknown bundled dataset {name!r}; valid names: {', '.join(loaders)}")
    x, y = loaders[name]()
    if size is not None:
        x = _resize_batch(x, size)
    return base_novel_split(x, y, base_classes=base_classes, test_fraction=test_fraction,
                            seed=seed)
