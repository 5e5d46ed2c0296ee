"""Tests for bgnorm.repro.nas: DARTS operations, the mixed operation, architecture parameters,
the first-order search step, genotype derivation and the evaluation network."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bgnorm
from bgnorm.repro.nas import (
    DARTS_V1,
    DARTS_V2,
    PAPER_NAS,
    PRIMITIVES,
    EvalNetwork,
    FactorizedReduce,
    Genotype,
    MixedOp,
    SearchCell,
    SearchNetwork,
    darts_optimizers,
    darts_search_step,
    derive_genotype,
    drop_path,
    genotype_from_dict,
    genotype_to_dict,
    input_blind,
    make_op,
    num_edges,
)

NORMS = {
    "bn": functools.partial(bgnorm.make_norm, "bn"),
    "bgn": functools.partial(bgnorm.make_norm, "bgn", num_groups=4),
    "gn": functools.partial(bgnorm.make_norm, "gn", num_groups=2),
    "ln": functools.partial(bgnorm.make_norm, "ln"),
    "in": functools.partial(bgnorm.make_norm, "in"),
    "pn": functools.partial(bgnorm.make_norm, "pn"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_search(norm="bn", C=4, layers=3, classes=5, in_channels=1) -> SearchNetwork:
    return SearchNetwork(C=C, num_classes=classes, layers=layers, norm_layer=NORMS[norm],
                         in_channels=in_channels)


def _batch(n=8, size=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, classes, (n,),
                                                                      generator=g)


# ------------------------------------------------------------------------------ operations


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", PRIMITIVES)
def test_operations_shapes(name, stride):
    op = make_op(name, 6, stride, NORMS["bn"], affine=False)
    x = torch.randn(2, 6, 8, 8)
    out = op(x)
    assert out.shape == (2, 6, 8 // stride, 8 // stride)
    if name == "none":
        assert torch.all(out == 0)
    if name == "skip_connect" and stride == 1:
        assert torch.equal(out, x)
    for m in op.modules():  # search-phase ops have no affine norm parameters
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight is None


def test_eight_primitives_and_unknown_op():
    assert len(PRIMITIVES) == 8 and PRIMITIVES[0] == "none"
    with pytest.raises(ValueError, match="sep_conv_3x3"):
        make_op("conv_7x1_1x7", 4, 1, NORMS["bn"])


def test_factorized_reduce_even_and_odd():
    fr = FactorizedReduce(4, 6, NORMS["bn"])
    assert fr(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)
    assert fr(torch.randn(2, 4, 7, 7)).shape == (2, 6, 4, 4)
    with pytest.raises(ValueError):
        FactorizedReduce(4, 5, NORMS["bn"])


def test_factory_without_affine_keyword_gets_frozen_identity_affine():
    plain = MixedOp(4, 1, lambda c: nn.GroupNorm(1, c))
    keyword = MixedOp(4, 1, functools.partial(nn.GroupNorm, 1))
    norms = [m for m in plain.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.weight is not None and not m.weight.requires_grad for m in norms)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert all(m.weight is None for m in keyword.modules() if isinstance(m, nn.GroupNorm))
    # same function as the affine=False norms
    keyword.load_state_dict({k: v for k, v in plain.state_dict().items()
                             if k in keyword.state_dict()})
    x, w = torch.randn(2, 4, 6, 6), F.softmax(torch.randn(8), dim=0)
    torch.testing.assert_close(plain(x, w), keyword(x, w))
    # a search step works with frozen parameters (they are skipped by the optimizers)
    model = SearchNetwork(C=4, num_classes=5, layers=3, norm_layer=lambda c: nn.GroupNorm(1, c),
                          in_channels=1)
    w_opt, a_opt = darts_optimizers(model)
    darts_search_step(model, w_opt, a_opt, _batch(), _batch())
    frozen = [p for p in model.weights_parameters() if not p.requires_grad]
    assert frozen and all(torch.all((p == 1) | (p == 0)) for p in frozen)
    # the evaluation network accepts any factory
    EvalNetwork(DARTS_V2, C=4, layers=3, num_classes=3, norm_layer=lambda c: nn.GroupNorm(1, c),
                in_channels=1)


# ------------------------------------------------------------------------------- MixedOp


@pytest.mark.parametrize("norm", ["bn", "bgn"])
def test_mixed_op_is_the_weighted_sum(norm):
    torch.manual_seed(0)
    op = MixedOp(4, 1, NORMS[norm]).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    w = F.softmax(torch.randn(8, dtype=torch.float64), dim=0)
    for mode in (True, False):
        op.train(mode)
        expected = sum(w[i] * op.ops[i](x) for i in range(8))
        torch.testing.assert_close(op(x, w), expected)
    # one-hot weights select one operation
    op.eval()
    for i in (1, 4):
        torch.testing.assert_close(op(x, F.one_hot(torch.tensor(i), 8).double()), op.ops[i](x))
    with pytest.raises(ValueError):
        op(x, w[:7])


def test_mixed_op_pools_get_a_non_affine_norm():
    op = MixedOp(4, 2, NORMS["bgn"])
    for name, sub in zip(PRIMITIVES, op.ops):
        if "pool" in name:
            assert isinstance(sub, nn.Sequential)
            assert isinstance(sub[1], bgnorm.BatchGroupNorm2d) and sub[1].weight is None


# ------------------------------------------------------------------------------ the supernet


def test_architecture_parameters():
    model = _tiny_search()
    assert num_edges(4) == 14
    arch = model.arch_parameters()
    assert [a.shape for a in arch] == [(14, 8), (14, 8)]
    assert arch[0] is model.alphas_normal and arch[1] is model.alphas_reduce
    assert arch[0].abs().max() < 1e-2  # 1e-3 * N(0, 1)
    weights = model.weights_parameters()
    ids = {id(p) for p in weights}
    assert all(id(a) not in ids for a in arch)
    assert len(weights) + 2 == len(list(model.parameters()))
    assert "alphas_normal" in model.state_dict()
    # reduction cells at layers // 3 and 2 * layers // 3
    model6 = _tiny_search(layers=6)
    assert [c.reduction for c in model6.cells] == [False, False, True, False, True, False]
    # every norm inside the cells is non-affine; the stem's is affine
    assert model.stem[1].weight is not None
    for cell in model.cells:
        for m in cell.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.weight is None


@pytest.mark.parametrize("norm", list(NORMS))
def test_search_network_forward_backward(norm):
    model = _tiny_search(norm)
    x, y = _batch()
    out = model(x)
    assert out.shape == (8, 5)
    F.cross_entropy(out, y).backward()
    assert model.alphas_normal.grad is not None and model.alphas_reduce.grad is not None
    assert torch.isfinite(model.alphas_normal.grad).all()


def test_search_cell_output_channels():
    cell = SearchCell(4, 4, 12, 12, 4, reduction=True, reduction_prev=False,
                      norm_layer=NORMS["bn"])
    w = F.softmax(torch.zeros(14, 8), dim=-1)
    out = cell(torch.randn(2, 12, 8, 8), torch.randn(2, 12, 8, 8), w)
    assert out.shape == (2, 16, 4, 4)


def test_search_step_updates_alphas_and_weights():
    model = _tiny_search("bgn")
    w_opt, a_opt = darts_optimizers(model, w_lr=0.1, a_lr=0.01)
    alphas = [a.detach().clone() for a in model.arch_parameters()]
    weights = [p.detach().clone() for p in model.weights_parameters()]
    stats = darts_search_step(model, w_opt, a_opt, _batch(seed=0), _batch(seed=1))
    assert set(stats) == {"val_loss", "train_loss", "train_accuracy"}
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert all(not torch.equal(a, b) for a, b in zip(alphas, model.arch_parameters()))
    changed = sum(not torch.equal(a, b) for a, b in zip(weights, model.weights_parameters()))
    assert changed > 0.9 * len(weights)
    assert model.training


def test_search_step_keeps_the_two_updates_apart():
    model = _tiny_search("bn")
    # alphas frozen (lr 0): weights still move; weights frozen: alphas still move
    w_opt = torch.optim.SGD(model.weights_parameters(), lr=0.1)
    a_opt = torch.optim.SGD(model.arch_parameters(), lr=0.0)
    alphas = [a.detach().clone() for a in model.arch_parameters()]
    darts_search_step(model, w_opt, a_opt, _batch(seed=0), _batch(seed=1))
    assert all(torch.equal(a, b) for a, b in zip(alphas, model.arch_parameters()))
    w_opt = torch.optim.SGD(model.weights_parameters(), lr=0.0)
    a_opt = torch.optim.SGD(model.arch_parameters(), lr=0.1)
    weights = [p.detach().clone() for p in model.weights_parameters()]
    darts_search_step(model, w_opt, a_opt, _batch(seed=0), _batch(seed=1))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.weights_parameters()))


def test_search_step_is_first_order():
    # The alpha update is exactly -lr * dL_val/dalpha at the current weights (no unrolling).
    model = _tiny_search("gn").double()
    val = tuple(t.double() if t.is_floating_point() else t for t in _batch(seed=1))
    train = tuple(t.double() if t.is_floating_point() else t for t in _batch(seed=0))
    model.train()
    grads = torch.autograd.grad(F.cross_entropy(model(val[0]), val[1]), model.arch_parameters())
    before = [a.detach().clone() for a in model.arch_parameters()]
    w_opt = torch.optim.SGD(model.weights_parameters(), lr=0.05)
    a_opt = torch.optim.SGD(model.arch_parameters(), lr=1.0)
    darts_search_step(model, w_opt, a_opt, train, val, grad_clip=None)
    for a0, g, a1 in zip(before, grads, model.arch_parameters()):
        torch.testing.assert_close(a1.detach(), a0 - g)


def test_search_step_skips_non_finite_losses():
    model = _tiny_search("bn")
    w_opt, a_opt = darts_optimizers(model)
    before = [p.detach().clone() for p in model.parameters()]
    nan_loss = lambda lg, y: F.cross_entropy(lg, y) * float("nan")  # noqa: E731
    stats = darts_search_step(model, w_opt, a_opt, _batch(), _batch(), loss_fn=nan_loss)
    assert stats["train_loss"] != stats["train_loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_few_search_steps_lower_the_loss():
    torch.manual_seed(0)
    model = _tiny_search("bn", C=4)
    w_opt, a_opt = darts_optimizers(model, w_lr=0.05)
    x, y = _batch(n=16, seed=3)
    first = darts_search_step(model, w_opt, a_opt, (x, y), (x, y))["train_loss"]
    for _ in range(4):
        last = darts_search_step(model, w_opt, a_opt, (x, y), (x, y))["train_loss"]
    assert last < first


# ------------------------------------------------------------------------------- genotypes


def _alphas_for(gene: list[tuple[str, int]], steps: int = 4) -> torch.Tensor:
    """Alphas whose derived cell is ``gene`` (first listed edge of a node the strongest)."""
    a = torch.zeros(num_edges(steps), len(PRIMITIVES))
    start = 0
    for i in range(steps):
        for rank, (op, j) in enumerate(gene[2 * i : 2 * i + 2]):
            a[start + j, PRIMITIVES.index(op)] = 5.0 - rank
        start += 2 + i
    return a


def test_derive_genotype_hand_crafted():
    a = torch.zeros(14, 8)
    # node 0 (edges 0-1): edge 1 sep_conv_5x5 strongest, edge 0 max_pool
    a[1, 5], a[0, 1] = 3.0, 2.0
    # node 1 (edges 2-4, inputs 0,1,2): a dominant 'none' on input 0 is never chosen, and as
    # the ranking uses softmax weights it also makes input 0's other ops weak (DARTS' rule):
    # input 2 dil_conv_3x3 (softmax 0.64) and input 1 sep_conv_3x3 (0.28) win.
    a[2, 0], a[2, 3] = 9.0, 1.5
    a[3, 4] = 1.0
    a[4, 6] = 2.5
    # node 2 (edges 5-8, inputs 0..3): inputs 3 and 1
    a[8, 7], a[6, 2] = 4.0, 3.5
    # node 3 (edges 9-13, inputs 0..4): inputs 4 and 0
    a[13, 4], a[9, 5] = 2.0, 1.9
    g = derive_genotype(a, _alphas_for(DARTS_V2.reduce))
    assert g.normal == [("sep_conv_5x5", 1), ("max_pool_3x3", 0),
                        ("dil_conv_3x3", 2), ("sep_conv_3x3", 1),
                        ("dil_conv_5x5", 3), ("avg_pool_3x3", 1),
                        ("sep_conv_3x3", 4), ("sep_conv_5x5", 0)]
    assert g.reduce == DARTS_V2.reduce
    assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2])
def test_derive_genotype_round_trips_published_cells(genotype):
    g = derive_genotype(_alphas_for(genotype.normal), _alphas_for(genotype.reduce))
    assert g == genotype


def test_derive_genotype_ignores_none_and_breaks_ties_like_darts():
    a = torch.zeros(14, 8)
    a[:, 0] = 10.0  # 'none' dominates everywhere: ignored; all other ops tie
    g = derive_genotype(a, a)
    # ties: the lowest input indices and the first non-none operation (max_pool_3x3)
    assert g.normal == [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4
    with pytest.raises(ValueError, match="shape"):
        derive_genotype(torch.zeros(13, 8), a)


def test_search_network_genotype_and_serialization():
    model = _tiny_search()
    with torch.no_grad():
        model.alphas_normal.copy_(_alphas_for(DARTS_V2.normal))
        model.alphas_reduce.copy_(_alphas_for(DARTS_V2.reduce))
    g = model.genotype()
    assert g == DARTS_V2
    d = genotype_to_dict(g)
    import json

    assert genotype_from_dict(json.loads(json.dumps(d))) == DARTS_V2


def test_darts_v2_constant():
    assert isinstance(DARTS_V2, Genotype)
    assert DARTS_V2.normal[0] == ("sep_conv_3x3", 0) and DARTS_V2.normal[-1] == ("dil_conv_3x3",
                                                                                  2)
    assert DARTS_V2.reduce.count(("max_pool_3x3", 1)) == 3
    assert PAPER_NAS["eval"]["C"] == 36 and PAPER_NAS["search"]["layers"] == 8


# -------------------------------------------------------------------------- eval network


@pytest.mark.parametrize("norm", list(NORMS))
def test_eval_network_darts_v2_forward_backward(norm):
    model = EvalNetwork(DARTS_V2, C=4, layers=3, num_classes=5, norm_layer=NORMS[norm],
                        in_channels=1)
    x, y = _batch(n=4, size=16)
    out = model(x)
    assert out.shape == (4, 5)
    F.cross_entropy(out, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_eval_network_auxiliary_and_drop_path():
    torch.manual_seed(0)
    model = EvalNetwork(DARTS_V2, C=4, layers=6, num_classes=5, norm_layer=NORMS["bn"],
                        in_channels=1, auxiliary=True, drop_path_prob=0.3)
    x, _ = _batch(n=4, size=32)
    logits, aux = model.forward_with_aux(x)
    assert logits.shape == aux.shape == (4, 5)
    x28, _ = _batch(n=4, size=28)
    assert model.forward_with_aux(x28)[1].shape == (4, 5)  # non-8x8 maps pooled adaptively
    model.eval()
    logits, aux = model.forward_with_aux(x)
    assert aux is None
    torch.testing.assert_close(model(x), logits)  # no drop-path in eval mode
    # deterministic given the seed in training (drop-path draws from the global RNG)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    torch.testing.assert_close(a, b)


def test_eval_network_structure():
    model = EvalNetwork(DARTS_V2, C=4, layers=6, num_classes=3, norm_layer=NORMS["bn"],
                        in_channels=1)
    assert [c.reduction for c in model.cells] == [False, False, True, False, True, False]
    for cell in model.cells:
        assert len(cell.ops) == 8 and cell.multiplier == 4
    # affine norms in the evaluation network
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.weight is not None for m in norms)
    bad = Genotype(normal=[("skip_connect", 3), ("skip_connect", 0)] * 4, normal_concat=[2],
                   reduce=DARTS_V2.reduce, reduce_concat=[2])
    with pytest.raises(ValueError, match="state 3"):
        EvalNetwork(bad, C=4, layers=3, num_classes=3, in_channels=1)


def test_drop_path():
    x = torch.ones(1000, 2, 2, 2)
    g = torch.Generator().manual_seed(0)
    out = drop_path(x, 0.25, g)
    kept = (out[:, 0, 0, 0] > 0).float().mean()
    assert 0.7 < float(kept) < 0.8
    values = out.unique()
    assert len(values) == 2 and values[0] == 0
    assert float(values[1]) == pytest.approx(1 / 0.75)
    assert torch.equal(drop_path(x, 0.0), x)


def test_docstring_examples():
    import doctest

    import bgnorm.repro.nas as module

    result = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name,blind", [("in", True), ("gn4", False), ("bn", False)])
def test_input_blind_on_the_evaluation_network(name, blind):
    factory = {
        "in": functools.partial(nn.InstanceNorm2d, affine=True),
        "gn4": lambda c: nn.GroupNorm(4, c),  # 4..16 channels: 1 to 4 channels a group
        "bn": nn.BatchNorm2d,
    }[name]
    torch.manual_seed(0)
    # 4 cells: the last is a normal cell (DARTS_V2's: convs and skips, no pooling)
    net = EvalNetwork(DARTS_V2, 4, 4, 10, factory, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert input_blind(net, (1, 8, 8)) is blind
    # the check leaves the network as it was (running statistics included)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_input_blind_on_the_search_network():
    # GN with one channel a group is IN: blind; the search network too (its pools are normed)
    torch.manual_seed(0)
    one_per_group = lambda c, affine=True: nn.GroupNorm(c, c, affine=affine)  # noqa: E731
    assert input_blind(SearchNetwork(2, 10, 3, one_per_group, 1), (1, 8, 8))
    two_per_group = lambda c, affine=True: nn.GroupNorm(c // 2, c, affine=affine)  # noqa: E731
    assert not input_blind(SearchNetwork(2, 10, 3, two_per_group, 1), (1, 8, 8))
