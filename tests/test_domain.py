"""Tests for bgnorm.repro.domain: CAN's contrastive domain discrepancy (against a direct
transcription of its definition), target clustering/filtering, class-aware sampling and the
two bundled digit domains."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bgnorm.repro.domain import (
    PAPER_CAN,
    cdd_loss,
    cdd_terms,
    class_aware_sample,
    class_discrepancy_matrix,
    cluster_target,
    cosine_distance,
    filter_clusters,
    spherical_kmeans,
    two_digit_domains,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_D(src, ys, tgt, yt, M, kernel_mul=2.0, kernel_num=5):
    """Direct transcription of CAN's D[c1, c2] with loops (float64)."""
    src, tgt = src.double(), tgt.double()
    D = torch.zeros(M, M, dtype=torch.float64)
    for c1 in range(M):
        a = src[ys == c1]
        for c2 in range(M):
            b = tgt[yt == c2]
            if len(a) == 0 or len(b) == 0:
                continue
            d_aa = ((a[:, None] - a[None]) ** 2).sum(-1)
            d_bb = ((b[:, None] - b[None]) ** 2).sum(-1)
            d_ab = ((a[:, None] - b[None]) ** 2).sum(-1)
            n1, n2 = len(a), len(b)
            gamma = (d_aa.sum() + d_bb.sum() + 2 * d_ab.sum()) / (
                n1 * n1 + n2 * n2 + 2 * n1 * n2 - n1 - n2)
            bws = [max(float(gamma) * kernel_mul ** (i - kernel_num // 2), 1e-5)
                   for i in range(kernel_num)]

            def k(d, bws=bws):
                return sum(torch.exp(-d / bw) for bw in bws)

            D[c1, c2] = k(d_aa).mean() + k(d_bb).mean() - 2 * k(d_ab).mean()
    return D


def _blobs(n_per_class, M, dim, shift=0.0, seed=0, spread=0.3):
    """Class-conditional Gaussians: class c centred at 2 * e_c (+ shift along the last axis)."""
    g = _gen(seed)
    centers = 2.0 * torch.eye(M, dim)
    labels = torch.arange(M).repeat_interleave(n_per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    feats[:, -1] += shift
    return feats, labels


# ------------------------------------------------------------------------------------- CDD


def test_matrix_matches_the_definition():
    g = _gen(0)
    src, tgt = torch.randn(23, 5, generator=g), torch.randn(19, 5, generator=g) + 0.5
    ys = torch.randint(0, 4, (23,), generator=g)
    yt = torch.randint(0, 4, (19,), generator=g)
    D, used = class_discrepancy_matrix(src.double(), ys, tgt.double(), yt, 4)
    torch.testing.assert_close(D, _reference_D(src, ys, tgt, yt, 4))
    assert used.all()
    for km, kn in [(1.5, 3), (2.0, 1)]:
        D2, _ = class_discrepancy_matrix(src.double(), ys, tgt.double(), yt, 4, km, kn)
        torch.testing.assert_close(D2, _reference_D(src, ys, tgt, yt, 4, km, kn))


def test_intra_and_inter_are_means_of_diagonal_and_off_diagonal():
    src, ys = _blobs(6, 3, 4, seed=1)
    tgt, yt = _blobs(5, 3, 4, shift=0.5, seed=2)
    terms = cdd_terms(src, ys, tgt, yt, 3)
    D = _reference_D(src, ys, tgt, yt, 3).float()
    assert float(terms.intra) == pytest.approx(float(torch.diagonal(D).mean()), rel=1e-5)
    off = D.sum() - torch.diagonal(D).sum()
    assert float(terms.inter) == pytest.approx(float(off / 6), rel=1e-5)
    assert float(terms.loss) == pytest.approx(float(terms.intra - terms.inter), rel=1e-5)
    assert float(cdd_loss(src, ys, tgt, yt, 3)) == pytest.approx(float(terms.loss), rel=1e-6)
    # well separated classes: inter-class discrepancy is much larger than intra-class
    assert terms.inter > 2 * terms.intra
    only = cdd_terms(src, ys, tgt, yt, 3, intra_only=True)
    assert float(only.inter) == 0.0 and float(only.loss) == pytest.approx(float(terms.intra))


def test_zero_for_identical_distributions():
    src, ys = _blobs(8, 4, 6)
    terms = cdd_terms(src.double(), ys, src.double(), ys, 4)
    assert abs(float(terms.intra)) < 1e-10
    assert float(terms.inter) > 0.1
    # two large independent samples of the same class-conditional distributions: ~0 too
    a, ya = _blobs(60, 3, 4, seed=3)
    b, yb = _blobs(60, 3, 4, seed=4)
    assert float(cdd_terms(a, ya, b, yb, 3).intra) < 0.1


def test_intra_grows_with_the_class_conditional_shift():
    src, ys = _blobs(20, 3, 5, seed=0)
    values = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        tgt, yt = _blobs(20, 3, 5, shift=shift, seed=1)
        values.append(float(cdd_terms(src, ys, tgt, yt, 3).intra))
    assert values == sorted(values) and values[-1] > 10 * values[0]


def test_inter_shrinks_when_target_classes_are_mislabelled():
    # Target pseudo-labels permuted: the "inter" pairs now contain the true matches, so inter
    # falls and intra rises -- the loss gets worse, as the contrastive objective intends.
    src, ys = _blobs(15, 3, 4, seed=0)
    tgt, yt = _blobs(15, 3, 4, seed=1)
    good = cdd_terms(src, ys, tgt, yt, 3)
    bad = cdd_terms(src, ys, tgt, (yt + 1) % 3, 3)
    assert bad.intra > good.intra and bad.inter < good.inter and bad.loss > good.loss


def test_gradients_flow_to_both_domains():
    src, ys = _blobs(5, 3, 4, seed=0)
    tgt, yt = _blobs(5, 3, 4, shift=0.7, seed=1)
    src.requires_grad_(True)
    tgt.requires_grad_(True)
    loss = cdd_loss(src, ys, tgt, yt, 3)
    loss.backward()
    for t in (src, tgt):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # a gradient step on the target features lowers the loss
    with torch.no_grad():
        moved = tgt - 0.05 * tgt.grad
    assert cdd_loss(src.detach(), ys, moved, yt, 3) < loss.detach()


def test_filtered_and_missing_classes():
    src, ys = _blobs(6, 4, 5, seed=0)
    tgt, yt = _blobs(6, 4, 5, shift=0.3, seed=1)
    base = cdd_terms(src, ys, tgt, yt, 4)
    # samples labelled -1 are ignored
    extra = torch.cat([tgt, 50 * torch.randn(3, 5)])
    extra_y = torch.cat([yt, torch.full((3,), -1)])
    again = cdd_terms(src, ys, extra, extra_y, 4)
    assert float(again.loss) == pytest.approx(float(base.loss), rel=1e-6)
    # a class without target samples is not used: same as computing on the 3 other classes
    keep = yt != 3
    D, used = class_discrepancy_matrix(src, ys, tgt[keep], yt[keep], 4)
    assert used.tolist() == [True, True, True, False]
    assert torch.all(D[3] == 0) and torch.all(D[:, 3] == 0)
    keep_s = ys != 3
    ref = cdd_terms(src[keep_s], ys[keep_s], tgt[keep], yt[keep], 3)
    got = cdd_terms(src, ys, tgt[keep], yt[keep], 4)
    assert float(got.loss) == pytest.approx(float(ref.loss), rel=1e-5)
    # fewer than two used classes: no inter term
    one = cdd_terms(src, ys, tgt[yt == 0], yt[yt == 0], 4)
    assert float(one.inter) == 0.0


def test_single_class_is_multi_kernel_mmd():
    g = _gen(0)
    a, b = torch.randn(10, 3, generator=g).double(), torch.randn(12, 3, generator=g).double()
    mmd = cdd_loss(a, torch.zeros(10, dtype=torch.long), b, torch.zeros(12, dtype=torch.long), 1)
    ref = _reference_D(a, torch.zeros(10, dtype=torch.long), b,
                       torch.zeros(12, dtype=torch.long), 1)[0, 0]
    torch.testing.assert_close(mmd, ref)
    assert float(mmd) > 0


def test_cdd_errors():
    with pytest.raises(ValueError):
        cdd_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(4, 2),
                 torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        cdd_loss(torch.randn(4, 3), torch.zeros(3, dtype=torch.long), torch.randn(4, 3),
                 torch.zeros(4, dtype=torch.long), 2)


# ------------------------------------------------------------------------------ clustering


def _directions(M, dim, seed=0):
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return q[:M]  # M orthonormal directions


def _cluster_data(M=5, dim=16, n=40, noise=0.1, seed=0, rotate=0.3):
    """Source and target around M orthonormal directions; target rotated a little."""
    g = _gen(seed)
    dirs = _directions(M, dim, seed)
    ys = torch.arange(M).repeat_interleave(n)
    yt = torch.arange(M).repeat_interleave(n)[torch.randperm(M * n, generator=g)]
    src = dirs[ys] * 3 + noise * torch.randn(M * n, dim, generator=g)
    shift = rotate * torch.randn(M, dim, generator=g) / math.sqrt(dim)
    tgt = (dirs + shift)[yt] * 2 + noise * torch.randn(M * n, dim, generator=g)
    return src, ys, tgt, yt


def test_cosine_distance_range():
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    d = cosine_distance(a, b)
    assert d.shape == (5, 4) and d.min() >= -1e-6 and d.max() <= 1 + 1e-6
    torch.testing.assert_close(torch.diagonal(cosine_distance(a, a)), torch.zeros(5),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.diagonal(cosine_distance(a, -a)), torch.ones(5))


def test_clustering_recovers_well_separated_clusters():
    src, ys, tgt, yt = _cluster_data()
    res = cluster_target(src, ys, tgt, 5, threshold=None, min_per_class=1)
    assert torch.equal(res.raw_labels, yt)
    assert torch.equal(res.labels, yt)
    assert res.classes == [0, 1, 2, 3, 4]
    assert res.iterations >= 1
    torch.testing.assert_close(res.centers.norm(dim=1), torch.ones(5))
    # each target center points to its own class direction
    dirs = _directions(5, 16, 0)
    assert torch.equal(cosine_distance(res.centers, dirs).argmin(1), torch.arange(5))


def test_clusters_are_matched_back_to_classes():
    # Initial centres swapped for classes 0 and 1: k-means converges to the true clusters but
    # with cluster indices 1, 0, 2; matching the final centres to the initial ones maps the
    # clusters back (as CAN does against the source centres).
    from bgnorm.repro.domain import _match_clusters

    g = _gen(0)
    dirs = torch.eye(3)
    feats = torch.cat([dirs[c] + 0.05 * torch.randn(20, 3, generator=g) for c in range(3)])
    init = torch.stack([dirs[1] + dirs[0] * 0.8, dirs[0] + dirs[1] * 0.8, dirs[2]])
    labels, centers, it = spherical_kmeans(feats, init)
    truth = torch.arange(3).repeat_interleave(20)
    assert torch.equal(labels, torch.tensor([1, 0, 2])[truth])
    assert 1 <= it <= 100
    # matching final centres to the true class directions restores the class order
    mapping = _match_clusters(cosine_distance(centers, dirs))
    assert mapping == [1, 0, 2]
    assert torch.equal(torch.tensor(mapping)[labels], truth)
    cost = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.9], [0.3, 0.4, 0.0]])
    assert _match_clusters(cost) == [1, 0, 2]
    # an emptied cluster falls back to its initial centre
    lone = torch.stack([dirs[0], -dirs[0]])
    labels, centers, _ = spherical_kmeans(dirs[0].repeat(5, 1), lone)
    assert labels.tolist() == [0] * 5
    torch.testing.assert_close(centers[1], -dirs[0])


def test_filtering_drops_ambiguous_samples_and_small_classes():
    src, ys, tgt, yt = _cluster_data(M=4, n=30)
    dirs = _directions(4, 16, 0)
    ambiguous = (dirs[0] + dirs[1] + dirs[2] + dirs[3]).repeat(3, 1)  # equidistant-ish
    # class 3 has only 2 target samples in the set we cluster
    keep = torch.cat([(yt != 3).nonzero().flatten(), (yt == 3).nonzero().flatten()[:2]])
    t = torch.cat([tgt[keep], ambiguous])
    res = cluster_target(src, ys, t, 4, threshold=0.05, min_per_class=3)
    assert res.classes == [0, 1, 2]
    assert torch.all(res.labels[-3:] == -1)  # ambiguous samples filtered
    assert torch.all(res.labels[res.raw_labels == 3] == -1)  # small class filtered
    kept = res.labels >= 0
    assert torch.equal(res.labels[kept], yt[keep][kept[: len(keep)]])
    assert torch.all(res.dist[kept] < 0.05)


def test_filter_clusters_directly():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    dist = torch.tensor([0.01, 0.02, 0.5, 0.01, 0.01, 0.0, 0.0, 0.0, 0.9])
    out, classes = filter_clusters(labels, dist, 4, threshold=0.05, min_per_class=2)
    assert classes == [0, 1, 2]
    assert out.tolist() == [0, 0, -1, 1, 1, 2, 2, 2, -1]
    out, classes = filter_clusters(labels, dist, 4, threshold=None, min_per_class=3)
    assert classes == [0, 2] and out.tolist() == [0, 0, 0, -1, -1, 2, 2, 2, 2]


def test_class_aware_sample():
    ys = torch.arange(6).repeat_interleave(10)
    yt = torch.arange(6).repeat(7)
    yt[:6] = -1
    src, tgt, chosen = class_aware_sample(ys, yt, [0, 2, 3, 5], 3, 4, _gen(0))
    assert len(chosen) == 3 and set(chosen.tolist()) <= {0, 2, 3, 5}
    assert torch.equal(ys[src], chosen.repeat_interleave(4))
    assert torch.equal(yt[tgt], chosen.repeat_interleave(4))
    assert len(set(src.tolist())) == 12  # without replacement when possible
    again = class_aware_sample(ys, yt, [0, 2, 3, 5], 3, 4, _gen(0))
    assert torch.equal(again[0], src) and torch.equal(again[1], tgt)
    # a class with fewer target examples than per_class is drawn with replacement
    few = torch.tensor([0, 1, 1, 1])
    s, t, _ = class_aware_sample(torch.tensor([0, 0, 0, 1, 1, 1]), few, [0], 1, 3, _gen(1))
    assert torch.equal(few[t], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        class_aware_sample(ys, yt, [], 2, 2)


# ------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("size", [8, 16])
def test_two_digit_domains(size):
    mnist, digits = two_digit_domains(size=size, seed=0)
    assert mnist.name == "mnist5k" and digits.name == "digits"
    for d in (mnist, digits):
        assert d.image_size == (size, size) and d.in_channels == 1 and d.num_classes == 10
        assert abs(float(d.x_train.mean())) < 1e-4
    assert len(mnist.x_train) == 4000 and len(digits.x_train) + len(digits.x_test) == 1797


def _frame_fill(split) -> float:
    """Fraction of images whose content reaches two opposite edges (it fills its frame)."""
    x = split.x_train * torch.tensor(split.std).view(1, -1, 1, 1) + torch.tensor(
        split.mean).view(1, -1, 1, 1)
    on = x[:, 0] > 0.1
    rows, cols = on.any(2), on.any(1)
    return float(((rows[:, 0] & rows[:, -1]) | (cols[:, 0] & cols[:, -1])).float().mean())


def test_two_digit_domains_are_framed_alike():
    # MNIST's digits sit in a 20x20 box inside 28x28; scikit-learn's fill their 8x8 frame.
    # Framed on their content, both fill theirs; resized whole, MNIST's do not.
    framed = two_digit_domains(size=8, seed=0)
    plain = two_digit_domains(size=8, seed=0, crop=False)
    assert _frame_fill(framed[0]) > 0.95 and _frame_fill(framed[1]) > 0.95
    assert _frame_fill(plain[0]) < 0.5 < _frame_fill(plain[1])


def test_paper_constants():
    assert PAPER_CAN["kernel_num"] == 5 and PAPER_CAN["kernel_mul"] == 2.0
    assert PAPER_CAN["cdd_weight"] == 0.3


def test_docstring_examples():
    import doctest

    import bgnorm.repro.domain as module

    result = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
