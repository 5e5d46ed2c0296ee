"""Unsupervised domain adaptation building blocks (Table 7 of the BGN paper).

The paper adapts with CAN, the Contrastive Adaptation Network (Kang, Jiang, Yang & Hauptmann,
CVPR 2019). Its ingredients, implemented here as pure functions of feature tensors:

* :func:`cdd_loss` / :func:`cdd_terms` / :func:`class_discrepancy_matrix`: the *contrastive
  domain discrepancy*. With ``D[c1, c2]`` the squared multi-kernel MMD between the source
  features of class c1 and the target features of (pseudo-)class c2,

  .. math::
      \\mathcal{D}^{cdd} = \\underbrace{\\frac{1}{M}\\sum_{c} D[c, c]}_{\\text{intra}}
        - \\underbrace{\\frac{1}{M(M-1)}\\sum_{c \\ne c'} D[c, c']}_{\\text{inter}}

  so minimizing it pulls same-class source/target features together and pushes different
  classes apart. ``D[c1, c2] = e_ss + e_tt - 2 e_st`` with each ``e`` the mean kernel value
  over the corresponding sample pairs; the kernel is a sum of ``kernel_num`` Gaussians
  ``exp(-|a - b|^2 / (gamma * kernel_mul^(i - kernel_num // 2)))`` whose base bandwidth
  ``gamma`` is, per class pair, the mean squared distance among the pooled samples of source
  class c1 and target class c2 (detached), exactly as in the authors' code.
* :func:`cluster_target`: CAN's target labelling: spherical k-means (cosine distance
  ``(1 - cos) / 2``) on the target features, initialised from the source class centers,
  clusters matched back to classes, then ambiguous target samples (too far from their center)
  and classes with too few samples are filtered out (label -1).
* :func:`class_aware_sample`: CAN's class-aware sampling of a mini-batch: a few classes, with
  the same number of source and target examples from each.
* :func:`two_digit_domains`: the quick preset's two bundled digit domains (MNIST-5k and
  scikit-learn's 8x8 digits) resized to one size.

Simplifications with respect to CAN, documented in docs/tasks.md: one feature layer per call
(CAN sums the CDD over the feature and the probability layer: call :func:`cdd_loss` on each and
add); shared norm layers between domains instead of CAN's domain-specific BatchNorm (source and
target go through separate forward passes, so batch statistics are still per domain in
training); cluster/class matching uses the Hungarian algorithm when scipy is installed and a
greedy matching otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "PAPER_CAN",
    "CDDTerms",
    "TargetClusters",
    "cdd_loss",
    "cdd_terms",
    "class_aware_sample",
    "class_discrepancy_matrix",
    "cluster_target",
    "cosine_distance",
    "filter_clusters",
    "spherical_kmeans",
    "two_digit_domains",
]

#: CAN's Office-31 setting (Kang et al., 2019, and the authors' configs): ResNet-50, SGD with
#: lr 0.001 (x10 for the new layers), momentum 0.9, weight decay 5e-4, "inv" lr decay, CDD
#: weight 0.3 with 5 kernels of multiplier 2 on the feature and probability layers, class-aware
#: batches of 10 classes x 3 examples per domain, source batch 30, clustering stop threshold
#: 0.005, filtering threshold 0.05 (cosine distance) and at least 3 samples per class.
PAPER_CAN: dict[str, float] = {
    "lr": 0.001,
    "lr_mult_new_layers": 10.0,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "inv_alpha": 0.001,
    "inv_beta": 0.75,
    "cdd_weight": 0.3,
    "kernel_num": 5,
    "kernel_mul": 2.0,
    "classes_per_batch": 10,
    "per_class": 3,
    "source_batch": 30,
    "cluster_eps": 0.005,
    "filter_threshold": 0.05,
    "min_per_class": 3,
    "max_loops": 50,
}


# --------------------------------------------------------------------------------------------
# Contrastive domain discrepancy
# --------------------------------------------------------------------------------------------


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(len(a), len(b))``, exact on the diagonal."""
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)


def class_discrepancy_matrix(
    src_feats: torch.Tensor,
    src_labels: torch.Tensor,
    tgt_feats: torch.Tensor,
    tgt_labels: torch.Tensor,
    num_classes: int,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-pair discrepancies ``D`` ``(M, M)`` and the mask of classes used ``(M,)``.

    ``D[c1, c2]`` is the squared multi-kernel MMD between source class c1 and target class c2
    (see the module docstring). Target samples labelled -1 (filtered out) are ignored. A class
    is *used* when it has at least one source and one target sample; rows/columns of unused
    classes are zero. Differentiable with respect to both feature tensors (bandwidths are
    detached, as in CAN).
    """
    if src_feats.dim() != 2 or tgt_feats.dim() != 2 or src_feats.shape[1] != tgt_feats.shape[1]:
        raise ValueError("features must be 2-D (N, D) with the same D in both domains")
    if len(src_feats) != len(src_labels) or len(tgt_feats) != len(tgt_labels):
        raise ValueError("one label per feature row is required")
    if kernel_num < 1 or kernel_mul <= 0:
        raise ValueError("kernel_num must be >= 1 and kernel_mul > 0")
    keep = tgt_labels >= 0
    tgt_feats, tgt_labels = tgt_feats[keep], tgt_labels[keep]
    M = num_classes
    S = F.one_hot(src_labels.long(), M).to(src_feats.dtype)  # (ns, M)
    T = F.one_hot(tgt_labels.long(), M).to(tgt_feats.dtype)  # (nt, M)
    ns_c, nt_c = S.sum(0), T.sum(0)  # samples per class
    used = (ns_c > 0) & (nt_c > 0)

    d_ss = _sq_dists(src_feats, src_feats)
    d_tt = _sq_dists(tgt_feats, tgt_feats)
    d_st = _sq_dists(src_feats, tgt_feats)

    with torch.no_grad():
        # Base bandwidth per class pair: mean squared distance over the pooled set
        # {source c1} U {target c2}, excluding the zero self-distances.
        sum_ss = torch.einsum("ic,ij,jc->c", S, d_ss, S)  # (M,)
        sum_tt = torch.einsum("ic,ij,jc->c", T, d_tt, T)  # (M,)
        sum_st = S.t() @ d_st @ T  # (M, M)
        n1, n2 = ns_c.unsqueeze(1), nt_c.unsqueeze(0)
        pairs = n1 * n1 + n2 * n2 + 2 * n1 * n2 - n1 - n2
        gamma = (sum_ss.unsqueeze(1) + sum_tt.unsqueeze(0) + 2 * sum_st) / pairs.clamp_min(1)
        powers = torch.arange(kernel_num, dtype=gamma.dtype, device=gamma.device)
        factors = kernel_mul ** (powers - kernel_num // 2)  # (K,)
        bw = (gamma.unsqueeze(-1) * factors).clamp_min(1e-5)  # (M, M, K)

    def kernel(d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # d: (..., 1), b broadcastable (..., K): sum over the K Gaussians.
        return torch.exp(-d / b).sum(-1)

    ys, yt = src_labels.long(), tgt_labels.long()
    # e_ss[c1, c2]: mean over source pairs (i, j) both in c1 with bandwidth bw[c1, c2].
    same_s = (S @ S.t()).unsqueeze(-1)  # (ns, ns, 1), 1 where y_i == y_j
    k_ss = kernel(d_ss[:, :, None, None], bw[ys][:, None, :, :]) * same_s  # (ns, ns, M)
    e_ss = torch.einsum("ic,ijd->cd", S, k_ss) / (ns_c * ns_c).clamp_min(1).unsqueeze(1)
    # e_tt[c1, c2]: mean over target pairs both in c2 with bandwidth bw[c1, c2].
    same_t = (T @ T.t()).unsqueeze(-1)
    bw_t = bw.permute(1, 0, 2)[yt]  # (nt, M[c1], K) indexed by the target class c2
    k_tt = kernel(d_tt[:, :, None, None], bw_t[:, None, :, :]) * same_t  # (nt, nt, M[c1])
    e_tt = (torch.einsum("ic,ijd->cd", T, k_tt) / (nt_c * nt_c).clamp_min(1).unsqueeze(1)).t()
    # e_st[c1, c2]: mean over (source in c1, target in c2) with bandwidth bw[c1, c2].
    k_st = kernel(d_st.unsqueeze(-1), bw[ys][:, yt])  # (ns, nt)
    e_st = (S.t() @ k_st @ T) / (ns_c.unsqueeze(1) * nt_c.unsqueeze(0)).clamp_min(1)

    D = e_ss + e_tt - 2 * e_st
    mask = used.unsqueeze(1) & used.unsqueeze(0)
    return torch.where(mask, D, torch.zeros_like(D)), used


@dataclass
class CDDTerms:
    """The two CDD terms and the loss ``intra - inter`` (scalar tensors)."""

    intra: torch.Tensor
    inter: torch.Tensor
    loss: torch.Tensor


def cdd_terms(
    src_feats: torch.Tensor,
    src_labels: torch.Tensor,
    tgt_feats: torch.Tensor,
    tgt_labels: torch.Tensor,
    num_classes: int,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
    intra_only: bool = False,
) -> CDDTerms:
    """Intra-class and inter-class discrepancy of CAN (see :func:`class_discrepancy_matrix`).

    ``intra`` is the mean of ``D[c, c]`` over the *used* classes (present in both domains),
    ``inter`` the mean of ``D[c1, c2]`` over ordered pairs of distinct used classes (0 when
    fewer than two are used or with ``intra_only``), ``loss = intra - inter``. CAN divides by
    the number of classes selected in its class-aware batch, which are exactly the used ones.
    """
    D, used = class_discrepancy_matrix(
        src_feats, src_labels, tgt_feats, tgt_labels, num_classes, kernel_mul, kernel_num
    )
    m = int(used.sum())
    zero = D.sum() * 0.0
    intra = torch.diagonal(D).sum() / m if m > 0 else zero
    if intra_only or m < 2:
        inter = zero
    else:
        inter = (D.sum() - torch.diagonal(D).sum()) / (m * (m - 1))
    return CDDTerms(intra=intra, inter=inter, loss=intra - inter)


def cdd_loss(
    src_feats: torch.Tensor,
    src_labels: torch.Tensor,
    tgt_feats: torch.Tensor,
    tgt_labels: torch.Tensor,
    num_classes: int,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
    intra_only: bool = False,
) -> torch.Tensor:
    """CAN's contrastive domain discrepancy ``intra - inter`` (a scalar to minimize).

    Args:
        src_feats: source features ``(Ns, D)``.
        src_labels: source labels ``(Ns,)`` in ``0 .. num_classes - 1``.
        tgt_feats: target features ``(Nt, D)``.
        tgt_labels: target pseudo-labels ``(Nt,)`` (e.g. from :func:`cluster_target`); -1
            marks a filtered-out sample, which is ignored.
        num_classes: M.
        kernel_mul: ratio between consecutive Gaussian bandwidths (CAN: 2).
        kernel_num: number of Gaussian kernels (CAN: 5).
        intra_only: drop the inter-class term (CAN's "intra only" ablation).

    With ``num_classes=1`` and all labels 0 this is the plain multi-kernel MMD^2 between the
    two feature sets.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> f = torch.randn(8, 4, generator=g)
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> abs(float(cdd_terms(f, y, f, y, 4).intra)) < 1e-6
        True
    """
    return cdd_terms(src_feats, src_labels, tgt_feats, tgt_labels, num_classes, kernel_mul,
                     kernel_num, intra_only).loss


# --------------------------------------------------------------------------------------------
# Target clustering (CAN's alternating optimization, labelling step)
# --------------------------------------------------------------------------------------------


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CAN's cosine distance ``(1 - cos(a_i, b_j)) / 2`` in [0, 1], shape ``(len(a), len(b))``."""
    return 0.5 * (1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).t())


def spherical_kmeans(
    feats: torch.Tensor,
    init_centers: torch.Tensor,
    max_iters: int = 100,
    tol: float = 0.005,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Spherical k-means with cosine distance, from ``init_centers`` ``(K, D)``.

    Alternates assignment to the nearest center and center update (the normalized sum of the
    normalized assigned features; CAN sums the raw features, which weights long feature
    vectors more). A cluster that loses all
    its samples falls back to its initial center, as in CAN. Stops when the mean cosine
    distance between consecutive centers falls below ``tol`` (CAN: 0.005) or after
    ``max_iters``. Returns ``(labels (N,), centers (K, D) unit-norm, iterations)``.
    """
    centers = F.normalize(init_centers.detach().to(feats.dtype), dim=1)
    init = centers
    feats = feats.detach()
    K = len(centers)
    iterations = 0
    while iterations < max_iters:
        iterations += 1
        labels = cosine_distance(feats, centers).argmin(1)
        onehot = F.one_hot(labels, K).to(feats.dtype)
        sums = onehot.t() @ F.normalize(feats, dim=1)
        empty = onehot.sum(0) == 0
        new = torch.where(empty.unsqueeze(1), init, F.normalize(sums, dim=1))
        change = torch.diagonal(cosine_distance(new, centers)).mean()
        centers = new
        if float(change) < tol:
            break
    labels = cosine_distance(feats, centers).argmin(1)
    return labels, centers, iterations


def _match_clusters(cost: torch.Tensor) -> list[int]:
    """Assignment cluster -> class minimizing ``cost[cluster, class]`` (Hungarian if scipy)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - greedy fallback without scipy
        k = cost.shape[1]
        out: dict[int, int] = {}
        taken: set[int] = set()
        for flat in torch.argsort(cost.flatten()).tolist():
            r, c = divmod(flat, k)
            if r not in out and c not in taken:
                out[r] = c
                taken.add(c)
        return [out[r] for r in range(cost.shape[0])]
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    mapping = dict(zip(rows.tolist(), cols.tolist()))
    return [mapping[r] for r in range(cost.shape[0])]


def filter_clusters(
    labels: torch.Tensor,
    dist_to_center: torch.Tensor,
    num_classes: int,
    threshold: float | None = 0.05,
    min_per_class: int = 3,
) -> tuple[torch.Tensor, list[int]]:
    """CAN's filtering: drop ambiguous samples and under-populated classes.

    A sample is kept when its cosine distance to its own cluster center is below ``threshold``
    (None keeps every sample); a class is kept when at least ``min_per_class`` kept samples
    carry it. Returns ``(labels with -1 for dropped samples, kept classes)``.
    """
    keep = torch.ones_like(labels, dtype=torch.bool)
    if threshold is not None:
        keep = dist_to_center < threshold
    counts = torch.bincount(labels[keep], minlength=num_classes)
    classes = [c for c in range(num_classes) if int(counts[c]) >= min_per_class]
    keep = keep & torch.isin(labels, torch.tensor(classes, dtype=labels.dtype,
                                                  device=labels.device))
    return torch.where(keep, labels, torch.full_like(labels, -1)), classes


@dataclass
class TargetClusters:
    """Result of :func:`cluster_target`.

    ``labels``: pseudo-labels with -1 for filtered-out samples; ``raw_labels``: the cluster
    assignment of every sample (after matching clusters to classes); ``dist``: cosine distance
    of each sample to its cluster center; ``centers``: unit-norm target centers ``(M, D)``
    ordered by class; ``classes``: the classes kept by filtering; ``iterations``: k-means
    iterations run.
    """

    labels: torch.Tensor
    raw_labels: torch.Tensor
    dist: torch.Tensor
    centers: torch.Tensor
    classes: list[int]
    iterations: int


@torch.no_grad()
def cluster_target(
    src_feats: torch.Tensor,
    src_labels: torch.Tensor,
    tgt_feats: torch.Tensor,
    num_classes: int,
    threshold: float | None = 0.05,
    min_per_class: int = 3,
    max_iters: int = 100,
    tol: float = 0.005,
) -> TargetClusters:
    """CAN's target labelling: cluster the target features, initialised from source centers.

    1. Source class centers: the (normalized) sum of the source features of each class
       (classes absent from the source get a zero center and attract nothing).
    2. :func:`spherical_kmeans` of the target features from those centers.
    3. Clusters are matched to classes by minimum total cosine distance between final and
       initial centers (Hungarian algorithm, as CAN; greedy without scipy).
    4. :func:`filter_clusters` with ``threshold`` (cosine distance; CAN uses 0.05 on Office-31,
       1.0 -- no filtering -- by default) and ``min_per_class``.
    """
    src_feats, tgt_feats = src_feats.detach(), tgt_feats.detach()
    onehot = F.one_hot(src_labels.long(), num_classes).to(src_feats.dtype)
    src_centers = F.normalize(onehot.t() @ src_feats, dim=1)
    labels, centers, iters = spherical_kmeans(tgt_feats, src_centers, max_iters, tol)
    mapping = _match_clusters(cosine_distance(centers, src_centers))
    perm = torch.tensor(mapping, dtype=torch.long, device=labels.device)
    labels = perm[labels]
    ordered = torch.empty_like(centers)
    ordered[perm] = centers
    dist = cosine_distance(tgt_feats, ordered).gather(1, labels.unsqueeze(1)).squeeze(1)
    filtered, classes = filter_clusters(labels, dist, num_classes, threshold, min_per_class)
    return TargetClusters(filtered, labels, dist, ordered, classes, iters)


def class_aware_sample(
    src_labels: torch.Tensor,
    tgt_labels: torch.Tensor,
    classes: Sequence[int],
    num_classes_per_batch: int,
    per_class: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAN's class-aware sampling: indices of a source and a target mini-batch.

    Picks ``min(num_classes_per_batch, len(classes))`` classes at random among ``classes``
    (e.g. :attr:`TargetClusters.classes`), then ``per_class`` source examples with that label
    and ``per_class`` target examples with that pseudo-label (without replacement when the
    class has enough examples, with replacement otherwise). Returns
    ``(src_idx, tgt_idx, chosen_classes)``; the source labels of ``src_idx`` and the target
    pseudo-labels of ``tgt_idx`` both follow ``chosen_classes``, ``per_class`` each.
    """
    if not classes:
        raise ValueError("class_aware_sample needs at least one class")
    src_labels, tgt_labels = src_labels.cpu(), tgt_labels.cpu()
    cls = torch.as_tensor(list(classes))
    chosen = cls[torch.randperm(len(cls), generator=generator)[:num_classes_per_batch]]

    def draw(labels: torch.Tensor, c: int) -> torch.Tensor:
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:
            raise ValueError(f"class {c} has no examples in one of the domains")
        if len(idx) >= per_class:
            return idx[torch.randperm(len(idx), generator=generator)[:per_class]]
        return idx[torch.randint(len(idx), (per_class,), generator=generator)]

    src = torch.cat([draw(src_labels, int(c)) for c in chosen])
    tgt = torch.cat([draw(tgt_labels, int(c)) for c in chosen])
    return src, tgt, chosen


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def two_digit_domains(size: int | tuple[int, int] = 8, seed: int = 0,
                      test_fraction: float = 0.2, crop: bool = True):
    """The quick preset's two digit domains at one image size: ``(mnist5k, digits)``.

    MNIST-5k (28x28 handwritten digits, 5000 images) and scikit-learn's 8x8 digits (1797
    images), each digit framed on its content (``crop``,
    :func:`~bgnorm.repro.data.crop_to_content`: MNIST's digits sit in a 20x20 box inside
    28x28, scikit-learn's fill their 8x8 frame; unframed, a source-only BN network transfers
    at 42% / 22% instead of 86% / 57%), resized to ``size`` (bilinear, antialiased) and returned as
    :class:`~bgnorm.repro.data.TensorSplit` objects, each standardized with its own training
    images' statistics (the target's are computable without labels). Both have 10 classes and
    one channel; adaptation runs in both directions.
    """
    from .data import bundled_dataset

    mnist = bundled_dataset("mnist5k", seed=seed, test_fraction=test_fraction, size=size,
                            crop=crop)
    digits = bundled_dataset("digits", seed=seed, test_fraction=test_fraction, size=size,
                             crop=crop)
    return mnist, digits
