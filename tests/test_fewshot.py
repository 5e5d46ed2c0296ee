"""Tests for bgnorm.repro.fewshot: ResNet-12, the cosine classifier, weight imprinting,
episode sampling, the confidence interval and the base/novel split."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import bgnorm
from bgnorm.repro.fewshot import (
    PAPER_FEWSHOT,
    CosineClassifier,
    ResNet12,
    base_novel_split,
    bundled_fewshot,
    embed,
    episode_accuracy,
    evaluate_episodes,
    imprint_from_features,
    imprint_weights,
    mean_confidence_interval,
    sample_episode,
)

NORMS = {
    "bn": functools.partial(bgnorm.make_norm, "bn"),
    "bgn": functools.partial(bgnorm.make_norm, "bgn", num_groups=4),
    "gn": functools.partial(bgnorm.make_norm, "gn", num_groups=4),
    "ln": functools.partial(bgnorm.make_norm, "ln"),
    "in": functools.partial(bgnorm.make_norm, "in"),
    "pn": functools.partial(bgnorm.make_norm, "pn"),
}
SMALL = (8, 16, 16, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- ResNet-12


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("size", [28, 8])
def test_resnet12_shapes_with_norms(norm, size):
    model = ResNet12(NORMS[norm], in_channels=1, channels=SMALL)
    x = torch.randn(3, 1, size, size)
    out = model(x)
    assert out.shape == (3, 32) and model.num_features == 32
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet12_structure():
    model = ResNet12(nn.BatchNorm2d, in_channels=3)
    assert model.num_features == PAPER_FEWSHOT["channels"][-1] == 640
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16  # 4 blocks x (3 convs + 1 shortcut)
    assert sum(c.kernel_size == (3, 3) for c in convs) == 12
    # Standard ResNet-12 (64-160-320-640): the usual "12.4M" parameters, no classifier.
    # Hand count per block (in -> out): 9*in*out + 2*9*out^2 + in*out (1x1) + 4 norms * 2*out.
    def block(i, o):
        return 9 * i * o + 18 * o * o + i * o + 8 * o

    n = sum(p.numel() for p in model.parameters())
    assert n == block(3, 64) + block(64, 160) + block(160, 320) + block(320, 640) == 12_424_320
    # spatial sizes after each block on 28x28 inputs:
    feats = []
    h = torch.randn(1, 3, 28, 28)
    for block in model.blocks:
        h = block(h)
        feats.append(tuple(h.shape[-2:]))
    assert feats == [(14, 14), (7, 7), (4, 4), (2, 2)]
    with pytest.raises(ValueError):
        ResNet12(channels=(8, 16, 32))


# ------------------------------------------------------------------------ cosine classifier


def test_cosine_classifier_range_and_scale():
    clf = CosineClassifier(16, 5, scale=7.0)
    x = torch.randn(20, 16) * 100
    out = clf(x)
    assert out.shape == (20, 5)
    assert out.abs().max() <= 7.0 + 1e-5
    assert isinstance(clf.scale, nn.Parameter)
    fixed = CosineClassifier(16, 5, scale=3.0, learn_scale=False)
    assert "scale" in dict(fixed.named_buffers())
    assert all(name != "scale" for name, _ in fixed.named_parameters())
    # a class weight equal to the input direction gives the maximum logit s
    w = torch.randn(5, 16)
    fixed.imprint(w)
    torch.testing.assert_close(fixed(w * 4)[torch.arange(5), torch.arange(5)],
                               torch.full((5,), 3.0))
    with pytest.raises(ValueError):
        fixed.imprint(torch.randn(4, 16))


def test_cosine_classifier_is_scale_invariant_in_inputs():
    clf = CosineClassifier(8, 3)
    x = torch.randn(4, 8)
    torch.testing.assert_close(clf(x), clf(x * 5.0))


# ------------------------------------------------------------------------------- imprinting


def test_imprint_from_features_is_normalized_class_mean():
    g = _gen(0)
    feats = torch.randn(12, 6, generator=g) * torch.rand(12, 1, generator=g) * 10
    labels = torch.tensor([0, 1, 2] * 4)
    w = imprint_from_features(feats, labels, 3)
    assert w.shape == (3, 6)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))
    for c in range(3):  # hand computation, Qi et al.: normalize(mean(normalize(f)))
        rows = [feats[i] / feats[i].norm() for i in range(12) if labels[i] == c]
        mean = sum(rows) / len(rows)
        torch.testing.assert_close(w[c], mean / mean.norm())
    with pytest.raises(ValueError, match="no support"):
        imprint_from_features(feats[:2], torch.tensor([0, 0]), 2)


def test_one_shot_imprint_is_the_normalized_embedding():
    feats = torch.randn(5, 4)
    w = imprint_from_features(feats, torch.arange(5), 5)
    torch.testing.assert_close(w, feats / feats.norm(dim=1, keepdim=True))


def test_imprint_weights_uses_eval_mode_and_restores_it():
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        backbone[1].running_mean.fill_(0.3)
    backbone.train()
    x = torch.randn(10, 1, 6, 6)
    y = torch.tensor([0, 1] * 5)
    w = imprint_weights(backbone, x, y, 2)
    assert backbone.training  # restored
    assert torch.equal(backbone[1].running_mean, torch.full((4,), 0.3))  # no stat update
    backbone.eval()
    with torch.no_grad():
        expected = imprint_from_features(backbone(x), y, 2)
    torch.testing.assert_close(w, expected)
    # embeddings of single images are the same one by one (eval mode) or as a batch
    e = embed(backbone, x, batch_size=3)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(10))


# ---------------------------------------------------------------------------------- episodes


def _pool(n_classes: int = 8, per_class: int = 12) -> torch.Tensor:
    return torch.arange(n_classes).repeat_interleave(per_class)[torch.randperm(n_classes *
                                                                               per_class)]


@pytest.mark.parametrize("k_shot", [1, 5])
def test_sample_episode(k_shot):
    labels = _pool() + 10  # classes 10..17
    ep = sample_episode(labels, None, n_way=5, k_shot=k_shot, n_query=4, generator=_gen(0))
    assert len(ep.classes) == 5 and len(set(ep.classes.tolist())) == 5
    assert set(ep.classes.tolist()) <= set(range(10, 18))
    assert len(ep.support_idx) == 5 * k_shot and len(ep.query_idx) == 5 * 4
    assert torch.equal(torch.bincount(ep.support_y, minlength=5), torch.full((5,), k_shot))
    assert torch.equal(torch.bincount(ep.query_y, minlength=5), torch.full((5,), 4))
    s, q = set(ep.support_idx.tolist()), set(ep.query_idx.tolist())
    assert len(s) == len(ep.support_idx) and len(q) == len(ep.query_idx) and not s & q
    # episode labels index ep.classes
    assert torch.equal(labels[ep.support_idx], ep.classes[ep.support_y])
    assert torch.equal(labels[ep.query_idx], ep.classes[ep.query_y])


def test_sample_episode_seeded_and_restricted_to_classes():
    labels = _pool()
    a = sample_episode(labels, [1, 3, 5, 7, 0, 2], 5, 1, 3, _gen(4))
    b = sample_episode(labels, [1, 3, 5, 7, 0, 2], 5, 1, 3, _gen(4))
    assert torch.equal(a.support_idx, b.support_idx) and torch.equal(a.query_idx, b.query_idx)
    assert set(a.classes.tolist()) <= {0, 1, 2, 3, 5, 7}
    others = [sample_episode(labels, None, 5, 1, 3, _gen(s)).support_idx for s in range(5, 10)]
    assert any(not torch.equal(o, a.support_idx) for o in others)


def test_sample_episode_errors():
    labels = _pool(4, 5)
    with pytest.raises(ValueError, match="exceeds"):
        sample_episode(labels, None, 5, 1, 1)
    with pytest.raises(ValueError, match="fewer than"):
        sample_episode(labels, None, 3, 3, 3)
    with pytest.raises(ValueError):
        sample_episode(labels, None, 3, 0, 3)


def test_episode_accuracy_and_evaluation_on_separable_features():
    # Features: class c points along axis c plus small noise -> imprinting is perfect.
    g = _gen(0)
    labels = _pool(6, 10)
    feats = torch.nn.functional.one_hot(labels, 6).float() + 0.05 * torch.randn(60, 6,
                                                                                generator=g)
    accs = evaluate_episodes(feats, labels, n_way=5, k_shot=1, n_query=5, episodes=20,
                             generator=_gen(1))
    assert accs == [1.0] * 20
    # a weight matrix that swaps two classes gets those queries wrong
    w = torch.eye(3)[[1, 0, 2]]
    q = torch.eye(3)
    assert episode_accuracy(w, q, torch.tensor([0, 1, 2])) == pytest.approx(1 / 3)
    # noise features: chance level
    noise = torch.randn(60, 6, generator=g)
    mean, _ = mean_confidence_interval(evaluate_episodes(noise, labels, 5, 1, 5, 100, _gen(2)))
    assert 0.1 < mean < 0.35


# ----------------------------------------------------------------------- confidence interval


def test_mean_confidence_interval_hand_computation():
    accs = [0.6, 0.8, 0.7, 0.9, 0.5]
    mean, half = mean_confidence_interval(accs)
    m = sum(accs) / 5
    sd = math.sqrt(sum((a - m) ** 2 for a in accs) / 4)  # sample std, n - 1
    assert mean == pytest.approx(0.7)
    assert half == pytest.approx(1.959963984540054 * sd / math.sqrt(5))
    assert half == pytest.approx(1.96 * sd / math.sqrt(5), rel=1e-4)
    # tensors work too; 99% is wider
    m2, h2 = mean_confidence_interval(torch.tensor(accs), confidence=0.99)
    assert m2 == pytest.approx(mean) and h2 > half


def test_confidence_interval_normal_vs_t_for_600_episodes():
    g = _gen(0)
    accs = (0.6 + 0.1 * torch.randn(600, generator=g)).tolist()
    m, h_norm = mean_confidence_interval(accs)
    pytest.importorskip("scipy")
    _, h_t = mean_confidence_interval(accs, quantile="t")
    assert h_t > h_norm
    assert round(100 * h_t, 3) - round(100 * h_norm, 3) <= 0.001 + 1e-9  # percent, 3 decimals
    assert h_t / h_norm == pytest.approx(1.9640 / 1.9600, rel=2e-4)


def test_confidence_interval_errors():
    with pytest.raises(ValueError):
        mean_confidence_interval([0.5])
    with pytest.raises(ValueError):
        mean_confidence_interval([0.5, 0.6], confidence=1.0)
    with pytest.raises(ValueError):
        mean_confidence_interval([0.5, 0.6], quantile="z")


# ------------------------------------------------------------------------------------- data


def test_base_novel_split_synthetic():
    x = torch.rand(100, 1, 4, 4)
    y = torch.arange(10).repeat(10)
    d = base_novel_split(x, y, base_classes=[0, 2, 4, 6, 8])
    assert d.base_classes == (0, 2, 4, 6, 8) and d.novel_classes == (1, 3, 5, 7, 9)
    assert set(d.y_base_train.tolist()) == set(range(5)) == set(d.y_base_test.tolist())
    assert set(d.y_novel.tolist()) == {1, 3, 5, 7, 9}
    assert len(d.x_base_train) + len(d.x_base_test) == 50 and len(d.x_novel) == 50
    assert abs(float(d.x_base_train.mean())) < 1e-5  # standardized with base-train stats
    with pytest.raises(ValueError, match="disjoint"):
        base_novel_split(x, y, base_classes=[0, 1], novel_classes=[1, 2])


def test_bundled_fewshot_mnist_digits_0_4_base():
    d = bundled_fewshot("mnist5k", seed=0)
    assert d.base_classes == (0, 1, 2, 3, 4) and d.novel_classes == (5, 6, 7, 8, 9)
    assert len(d.x_base_train) == 2000 and len(d.x_base_test) == 500
    assert len(d.x_novel) == 2500 and d.x_novel.shape[1:] == (1, 28, 28)
    assert torch.equal(torch.bincount(d.y_novel)[5:], torch.full((5,), 500))
    assert d.num_base_classes == 5 and d.in_channels == 1
    small = bundled_fewshot("digits", seed=1, size=16)
    assert small.x_novel.shape[-2:] == (16, 16)
    with pytest.raises(ValueError):
        bundled_fewshot("cifar")


def test_tiny_end_to_end_imprinting_beats_chance():
    """Train a tiny ResNet-12 on base digits 0-4 briefly, then imprint novel digits 5-9."""
    torch.manual_seed(0)
    d = bundled_fewshot("digits", seed=0)
    backbone = ResNet12(NORMS["bgn"], in_channels=1, channels=SMALL)
    model = nn.Sequential(backbone, CosineClassifier(32, 5))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = _gen(0)
    for _ in range(40):
        idx = torch.randint(0, len(d.x_base_train), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(d.x_base_train[idx]), d.y_base_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    feats = embed(backbone, d.x_novel)
    accs = evaluate_episodes(feats, d.y_novel, 5, 5, 10, 30, _gen(1))
    mean, half = mean_confidence_interval(accs)
    assert mean > 0.4 and half > 0  # chance is 0.2


def test_docstring_examples():
    import doctest

    import bgnorm.repro.fewshot as module

    result = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
