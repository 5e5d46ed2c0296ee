"""A G per layer: bgnorm.auto_groups (the rule, calibrated on ResNet-50), num_groups="auto" on the
layers (chosen from the first training input, saved in the state dict), convert_norm,
resolve_groups, groups_report and `bgnorm groups`."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings
from functools import partial

import pytest
import torch
from torch import nn

import bgnorm
from bgnorm import (
    MIN_VALUES,
    PAPER_GROUPS,
    REFERENCE_FEATURES,
    auto_groups,
    groups_report,
    paper_groups,
    paper_values_per_statistic,
    resolve_groups,
)
from bgnorm.policy import group_layout
from bgnorm.repro.models import cifar_resnet, resnet50, small_resnet


def _meta(build, **kwargs):
    with torch.device("meta"):
        return build(**kwargs)


@pytest.fixture(scope="module")
def resnet50_meta():
    return _meta(resnet50)


# -- the rule ------------------------------------------------------------------------------------

def test_paper_values_per_statistic_is_the_table_on_the_median_layer():
    for b, g in PAPER_GROUPS.items():
        assert paper_values_per_statistic(b) == b * REFERENCE_FEATURES / g
    # between and beyond the table: monotone (fewer examples never ask for fewer values)
    values = [paper_values_per_statistic(b) for b in range(1, 1025)]
    assert all(v0 >= v1 for v0, v1 in zip(values, values[1:]))
    assert values[0] == paper_values_per_statistic(2)
    assert values[-1] == paper_values_per_statistic(128)


def test_reference_features_is_the_median_layer_of_resnet50(resnet50_meta):
    report = groups_report(resnet50_meta, (2, 3, 224, 224))
    sizes = sorted(r.features for r in report.rows)
    assert len(sizes) == 53 and sizes[26] == REFERENCE_FEATURES
    assert sum(s == REFERENCE_FEATURES for s in sizes) == 12


@pytest.mark.parametrize("batch_size", sorted({*PAPER_GROUPS, 1, 3, 12, 24, 48, 256}))
def test_the_paper_table_on_resnet50_at_224(resnet50_meta, batch_size):
    """Where the table applies (ResNet-50, 224 px): the paper's G on every one of the 53
    layers, at the table's batch sizes and between and beyond them (paper_groups)."""
    report = groups_report(resnet50_meta, (batch_size, 3, 224, 224))
    assert len(report.rows) == 53
    for row in report.rows:
        assert group_layout(row.num_features, row.groups) != "straddling"
        if row.paper_values is None:  # 256 per worker: G = 1024 does not divide D = 25,088
            assert batch_size > max(PAPER_GROUPS) and row.features == 25088, row
            assert row.groups == 512
            continue
        assert row.groups == paper_groups(batch_size) == row.paper_groups, row
        assert row.values >= MIN_VALUES
        if batch_size in PAPER_GROUPS:
            assert row.groups == PAPER_GROUPS[batch_size]


@pytest.mark.parametrize("batch_size", sorted(PAPER_GROUPS))
def test_the_values_target_gives_resnet50s_median_layer_values(resnet50_meta, batch_size):
    """target_values=paper_values_per_statistic (the rule before the suite's measurements):
    the paper's G on the 12 layers of the median size, and on every layer the values per
    statistic the paper's G gives there, exactly (G = 1 where even one group has fewer)."""
    report = groups_report(resnet50_meta, (batch_size, 3, 224, 224),
                           target_values=paper_values_per_statistic)
    target = batch_size * REFERENCE_FEATURES // PAPER_GROUPS[batch_size]
    assert report.target_values == target and "aiming at" in str(report)
    for row in report.rows:
        assert row.features % row.groups == 0
        assert group_layout(row.num_features, row.groups) != "straddling"
        if row.features == REFERENCE_FEATURES:
            assert row.groups == PAPER_GROUPS[batch_size] == paper_groups(batch_size)
        if batch_size * row.features >= target:
            assert row.values == target, row
        else:
            assert row.groups == 1, row


BATCHES = (1, 2, 3, 4, 6, 8, 16, 24, 64, 128, 256)
MODELS = [
    ("resnet50", partial(resnet50), 3, 224),
    ("cifar_resnet20", partial(cifar_resnet, depth=20), 3, 32),
    ("small_resnet-16px", partial(small_resnet, in_channels=1), 1, 16),
    ("small_resnet-8px", partial(small_resnet, in_channels=1), 1, 8),
]


@pytest.mark.parametrize("name, build, channels, size", MODELS, ids=[m[0] for m in MODELS])
def test_valid_groups_on_every_layer_of_the_suite_models(name, build, channels, size):
    model = _meta(build)
    for b in BATCHES:
        report = groups_report(model, (b, channels, size, size))
        assert report.rows
        for row in report.rows:
            d = row.features
            assert d % row.groups == 0, row
            assert row.values == b * d // row.groups
            assert row.values >= MIN_VALUES or row.groups == 1, row
            # the paper's G wherever it is a whole group leaving MIN_VALUES values
            paper = paper_groups(b)
            if b * d // paper >= MIN_VALUES and (
                    row.num_features % paper == 0 or paper % row.num_features == 0) and (
                    d % paper == 0):
                assert row.groups == paper, row
            assert group_layout(row.num_features, row.groups) != "straddling", row
            assert row.groups == auto_groups(row.num_features, row.input_shape[2:], b)


@pytest.mark.parametrize("c, spatial", [(96, ()), (96, (1,)), (24, (10,)), (16, (3, 4, 4)),
                                        (7, (5, 5)), (6, (7, 9, 11))])
def test_valid_groups_for_1d_and_3d_layers(c, spatial):
    d = c * math.prod(spatial)
    for b in BATCHES:
        for target, floor in ((None, 32), (None, 2), (2, 2), (10, 2), (1000, 32), (1e9, 32)):
            g = auto_groups(c, spatial, b, target_values=target, min_values=floor)
            assert d % g == 0 and (b * d // g >= floor or g == 1)
            whole = auto_groups(c, spatial, b, target_values=target, min_values=floor,
                                allow_straddling=False)
            assert d % whole == 0 and (c % whole == 0 or whole % c == 0)
            assert b * d // whole >= floor or whole == 1
            ideal = min(paper_groups(b) if target is None else b * d / target, b * d / floor)
            if g != whole:  # straddling only where whole groups are more than 2x off
                assert c % g and g % c
                assert abs(math.log2(whole / ideal)) > 1
                assert abs(math.log2(g / ideal)) < abs(math.log2(whole / ideal))


def test_nearest_in_log_with_whole_groups_preferred():
    auto = partial(auto_groups, min_values=2)
    # ideal G = b*D/V = 48: 32 and 64 divide C; 64 is nearer in log2 (0.415 vs 0.585)
    assert auto(64, (4, 4), 3, target_values=64) == 64
    # exactly between two candidates: the smaller G (more values per statistic)
    assert auto(64, (4, 4), 1, target_values=1024 / math.sqrt(32 * 64)) == 32
    # C = 11, S = 16, ideal 4: whole groups are 1, 11, 22, ...: 11 is 2.75x off, so a
    # straddling G = 4 is taken, unless straddling groups are refused
    assert auto(11, (16,), 1, target_values=44) == 4
    assert auto(11, (16,), 1, target_values=44, allow_straddling=False) == 11
    # C = 7, ideal 4: 7 is within a factor of 2, so whole channels win over straddling 4
    assert auto(7, (16,), 1, target_values=28) == 7
    # bands: ideal 4C
    assert auto(8, (6, 6), 2, target_values=18) == 32
    # never fewer than min_values values per statistic
    assert auto(4, (), 1, target_values=2) == 2
    assert auto(4, (), 1, target_values=3, min_values=3) == 1
    # a callable target gets the batch size
    assert auto(64, (8, 8), 16, target_values=lambda b: b * 64) == 64


@pytest.mark.parametrize("c, spatial, b, expected", [
    (512, (14, 14), 128, 512),  # the paper's G: 25,088 values
    (64, (4, 4), 64, 256),      # the paper's 256 as 4 bands of each channel: 256 values
    (64, (1, 1), 16, 32),       # the paper's 64 would leave 16 values: 32 groups of 32
    (128, (1, 1), 128, 128),    # 512 does not divide D = 128 (and would leave 32): G = C
    (16, (), 2, 1),             # 32 values in all: one group
    (8, (), 2, 1),              # 16 values in all: fewer than the floor, the most there are
    (96, (), 64, 96),           # (N, C): G <= C, 96 groups of 64 values
])
def test_the_paper_g_lowered_to_the_floor(c, spatial, b, expected):
    g = auto_groups(c, spatial, b)
    assert g == expected
    d = c * math.prod(spatial)
    assert b * d // g >= MIN_VALUES or g == 1


def test_min_values_is_a_floor_on_the_values_per_statistic():
    # the paper's G = 1 at b = 2, whatever the layer
    assert auto_groups(64, (2, 2), 2) == 1
    # the paper's G at b = 8 on a 1x1 layer of 128 channels: 16 groups of 64 values
    assert auto_groups(128, (1, 1), 8) == 16
    # a stricter floor lowers it further; a looser one gives the paper's G back
    assert auto_groups(128, (1, 1), 8, min_values=128) == 8
    assert auto_groups(64, (1, 1), 16, min_values=2) == 64
    with pytest.raises(ValueError, match=r"min_values must be a number >= 2"):
        auto_groups(64, (1, 1), 16, min_values=1)
    with pytest.raises(ValueError, match=r"target_values=8 is below min_values=32 at "
                                         r"batch_size=16; lower min_values"):
        auto_groups(64, (1, 1), 16, target_values=8)


def test_auto_groups_refuses_bad_arguments():
    with pytest.raises(ValueError, match="target_values must be a positive number"):
        auto_groups(8, (4, 4), 2, target_values=0)
    with pytest.raises(ValueError, match="target_values must be a positive number"):
        auto_groups(8, (4, 4), 2, target_values=lambda b: float("nan"))
    with pytest.raises(ValueError, match="spatial_shape must be"):
        auto_groups(8, (4, 0), 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        auto_groups(8, (4, 4), 0)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        auto_groups(0, (4, 4), 2)
    import numpy as np

    assert auto_groups(np.int64(128), (np.int64(28), 28), np.int64(8)) == 16


# -- num_groups="auto" on the layers -------------------------------------------------------------

def _fixed_twin(layer, groups):
    cls = type(layer)
    kwargs = {"examples_per_group": layer.examples_per_group} if layer.examples_per_group else {}
    return cls(layer.num_features, groups, **kwargs).double()


@pytest.mark.parametrize("make, shape", [
    (lambda: bgnorm.BatchGroupNorm1d(12, "auto"), (6, 12)),
    (lambda: bgnorm.BatchGroupNorm1d(12, "auto"), (4, 12, 10)),
    (lambda: bgnorm.BatchGroupNorm2d(16, num_groups="auto"), (4, 16, 6, 6)),
    (lambda: bgnorm.BatchGroupNorm3d(8, num_groups="auto"), (2, 8, 3, 4, 4)),
    (lambda: bgnorm.GeneralBatchGroupNorm2d(16, "auto", examples_per_group=2), (8, 16, 4, 4)),
    (lambda: bgnorm.GeneralBatchGroupNorm1d(12, "auto", examples_per_group=2), (4, 12, 5)),
    (lambda: bgnorm.GeneralBatchGroupNorm3d(8, "auto", examples_per_group=2), (4, 8, 2, 3, 3)),
])
@pytest.mark.parametrize("target", [None, 8])
def test_auto_layer_is_the_fixed_layer_of_its_choice(make, shape, target, monkeypatch):
    if target is not None:  # a small target makes G > 1 on these small layers
        real = bgnorm.policy.auto_groups
        monkeypatch.setattr(bgnorm.policy, "auto_groups",
                            lambda *a, **k: real(*a, target_values=target, min_values=2))
    layer = make().double()
    assert "num_groups='auto'" in repr(layer) and layer.running_mean.numel() == 0
    b = min(shape[0], layer.examples_per_group or shape[0])
    expected = bgnorm.policy.auto_groups(shape[1], shape[2:], b)
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    assert layer.num_groups == expected and layer.groups_resolved
    assert f"num_groups={expected}," in repr(layer)
    twin = _fixed_twin(layer, expected)
    torch.testing.assert_close(y, twin(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, twin.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_var, twin.running_var, rtol=0, atol=1e-12)
    # fixed from then on: another batch size does not change G
    layer(torch.randn((2 * shape[0], *shape[1:]), dtype=torch.float64))
    assert layer.num_groups == expected
    layer.eval()
    twin.eval()
    twin.load_state_dict(layer.state_dict(), strict=False)
    torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=1e-12)


def test_auto_layer_refuses_eval_before_its_first_training_input():
    layer = bgnorm.BatchGroupNorm2d(8, "auto").eval()
    with pytest.raises(RuntimeError, match=r"BatchGroupNorm2d\(8, num_groups='auto'\): "
                       r"num_groups='auto' is chosen from the first training-mode input.*"
                       r"resolve_groups"):
        layer(torch.randn(2, 8, 3, 3))
    assert not layer.groups_resolved
    layer.train()
    with pytest.raises(ValueError, match="cannot choose G from an empty input"):
        layer(torch.randn(0, 8, 3, 3))
    with pytest.raises(ValueError, match="expected input with 8 channels"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(2, 8, 3))
    assert not layer.groups_resolved  # rejected inputs choose nothing
    layer(torch.randn(2, 8, 3, 3))
    assert layer.groups_resolved


def test_bad_num_groups_strings_and_sync_are_refused():
    with pytest.raises(TypeError, match="num_groups must be a positive int, got str 'Auto'"
                                        ".*or num_groups='auto'"):
        bgnorm.BatchGroupNorm2d(8, "Auto")
    with pytest.raises(ValueError, match="SyncBatchGroupNorm: num_groups='auto' is not supported"):
        bgnorm.SyncBatchGroupNorm(8, "auto")
    with pytest.raises(ValueError, match="num_groups='auto' is not supported"):
        bgnorm.make_norm("bgn", 8, num_groups="auto", sync=True)


def _trained(layer, shape):
    layer.train()
    layer(torch.randn(shape, dtype=layer.weight.dtype if layer.affine else torch.float32))
    return layer


def test_state_dict_round_trip():
    shape = (8, 128, 28, 28)  # the median ResNet-50 layer at batch 8: G = 16
    layer = _trained(bgnorm.BatchGroupNorm2d(128, "auto"), shape)
    assert layer.num_groups == 16
    sd = layer.state_dict()
    assert sd["_extra_state"] == {"layout_shape": None, "num_groups": 16}
    fresh = bgnorm.BatchGroupNorm2d(128, "auto")
    assert not fresh.load_state_dict(sd).missing_keys
    assert fresh.num_groups == 16
    assert torch.equal(fresh.running_var, layer.running_var)
    fresh.eval()(torch.randn(2, 128, 28, 28))  # eval works after loading
    # a layer built with that G loads it too; one with another G says what to do
    bgnorm.BatchGroupNorm2d(128, 16).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="construct the layer with num_groups=16"):
        bgnorm.BatchGroupNorm2d(128, 32).load_state_dict(sd)
    # torch.save / load of the module and of the state dict
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    again = bgnorm.BatchGroupNorm2d(128, "auto")
    again.load_state_dict(torch.load(buffer))
    assert again.num_groups == 16


def test_state_dict_before_the_choice_and_without_running_stats():
    waiting = bgnorm.BatchGroupNorm2d(8, "auto")
    sd = waiting.state_dict()
    assert sd["_extra_state"]["num_groups"] == "auto" and sd["running_mean"].numel() == 0
    other = bgnorm.BatchGroupNorm2d(8, "auto")
    other.load_state_dict(sd)  # still waiting
    assert not other.groups_resolved
    resolved = _trained(bgnorm.BatchGroupNorm2d(8, "auto"), (4, 8, 3, 3))
    with pytest.raises(RuntimeError, match="saved before its num_groups='auto' layer chose G"):
        resolved.load_state_dict(sd)
    # without running statistics the choice travels in the extra state alone
    untracked = bgnorm.BatchGroupNorm2d(8, "auto", track_running_stats=False)
    real = bgnorm.policy.auto_groups
    untracked._policy_groups = lambda shape: real(8, shape[2:], shape[0], target_values=36)
    _trained(untracked, (4, 8, 3, 3))
    assert untracked.num_groups == 8
    copy_ = bgnorm.BatchGroupNorm2d(8, "auto", track_running_stats=False)
    copy_.load_state_dict(untracked.state_dict())
    assert copy_.num_groups == 8
    with pytest.raises(RuntimeError, match="the checkpoint's layer has num_groups=8"):
        bgnorm.BatchGroupNorm2d(8, 4, track_running_stats=False).load_state_dict(
            untracked.state_dict())
    # a torch BatchNorm checkpoint holds per-channel statistics: G = C
    bn = nn.BatchNorm2d(8)
    from_bn = bgnorm.BatchGroupNorm2d(8, "auto")
    from_bn.load_state_dict(bn.state_dict())
    assert from_bn.num_groups == 8


def test_waiting_layer_copies_moves_and_pickles():
    layer = bgnorm.BatchGroupNorm2d(8, "auto")
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not twin.groups_resolved
    layer.double()
    _trained(layer, (4, 8, 3, 3))
    assert layer.running_mean.dtype == torch.float64 and layer.running_mean.numel() == 2
    meta = copy.deepcopy(bgnorm.BatchGroupNorm2d(8, "auto")).to("meta")
    meta(torch.randn(4, 8, 3, 3, device="meta"))
    assert meta.running_mean.device.type == "meta"


def test_convert_norm_auto_gives_each_layer_its_own_g():
    model = small_resnet(in_channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about, in training or eval mode
        model = bgnorm.convert_norm(model, "bgn", num_groups="auto")
        bgnorm.convert_norm(small_resnet(in_channels=1).eval(), "bgn", num_groups="auto")
    layers = [m for m in model.modules() if isinstance(m, bgnorm.BatchGroupNorm2d)]
    assert len(layers) == 9 and all(not m.groups_resolved for m in layers)
    with pytest.raises(RuntimeError, match="has not seen one"):
        copy.deepcopy(model).eval()(torch.randn(2, 1, 8, 8))
    report = groups_report(model, (4, 1, 8, 8), target_values=16, min_values=2)
    assert all(r.current_groups is None for r in report.rows)
    real = bgnorm.policy.auto_groups
    for m in layers:  # a small target, so that the layers differ in G
        m._policy_groups = (lambda shape: real(shape[1], shape[2:], shape[0], target_values=16,
                                               min_values=2))
    model.train()(torch.randn(4, 1, 8, 8))
    assert [m.num_groups for m in layers] == [r.groups for r in report.rows]
    assert len({m.num_groups for m in layers}) > 1
    model.eval()(torch.randn(2, 1, 8, 8))


def test_resolve_groups_chooses_without_training():
    norm = partial(bgnorm.make_norm, "bgn", num_groups="auto")
    model = cifar_resnet(20, norm_layer=norm)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    report = groups_report(model, (64, 3, 32, 32))
    assert resolve_groups(model, (64, 3, 32, 32)) is model
    layers = [m for m in model.modules() if isinstance(m, bgnorm.BatchGroupNorm2d)]
    assert [m.num_groups for m in layers] == [r.groups for r in report.rows]
    assert model.training
    after = model.state_dict()
    for k, v in before.items():  # parameters untouched; statistics now of G values
        if v.numel():
            assert torch.equal(after[k], v), k
    # a real tensor as the example works the same
    model2 = cifar_resnet(20, norm_layer=norm)
    resolve_groups(model2, torch.randn(64, 3, 32, 32))
    assert [m.num_groups for m in model2.modules()
            if isinstance(m, bgnorm.BatchGroupNorm2d)] == [r.groups for r in report.rows]


def test_compile_and_export_of_a_waiting_layer():
    x = torch.randn(4, 8, 3, 3)
    with pytest.raises(RuntimeError, match="resolve G before compiling or exporting"):
        torch.export.export(bgnorm.BatchGroupNorm2d(8, "auto"), (x,))
    layer = bgnorm.BatchGroupNorm2d(8, "auto")
    resolve_groups(layer, x.shape)
    program = torch.export.export(layer, (x,))
    assert layer.num_groups == 2  # the paper's G at b = 4
    torch.testing.assert_close(program.module()(x), bgnorm.BatchGroupNorm2d(8, 2)(x))


def test_groups_report_table_and_current_groups(resnet50_meta):
    report = groups_report(resnet50_meta, (8, 3, 224, 224))
    text = str(report)
    assert text.count("\n| ") == 54  # header rule + 53 layers
    assert "paper G (16)" in text and ("auto G: bgnorm.auto_groups, the paper's G, lowered "
                                       "where a layer would get fewer than 32 values") in text
    row = next(r for r in report.rows if r.name == "layers.3.0.bn3")
    assert (row.num_features, row.input_shape[2:], row.groups, row.values) == (2048, (7, 7), 16,
                                                                             50176)
    assert (row.current_groups, row.current_values) == (2048, 8 * 49)
    # 256 per worker: the paper's G = 1024 does not divide the 7x7 layers' D = 25088
    big = groups_report(resnet50_meta, (256, 3, 224, 224))
    assert any(r.paper_values is None for r in big.rows) and "(invalid)" in str(big)
    # GBGN layers' statistics see e examples
    net = nn.Sequential(nn.Conv2d(3, 16, 3), bgnorm.GeneralBatchGroupNorm2d(16, 4, 2))
    row = groups_report(net, (8, 3, 6, 6)).rows[0]
    assert row.examples == 2 and row.current_groups == 4 and row.current_values == 2 * 256 // 4


def test_groups_report_refuses_a_bad_shape():
    with pytest.raises(ValueError, match="example_input must be a tensor or the shape of one"):
        groups_report(nn.BatchNorm2d(3), (3,))


def test_cli_groups(capsys):
    from bgnorm.cli import main

    assert main(["groups", "--model", "small_resnet", "--batch-size", "2", "--image-size", "8",
                 "--in-channels", "1"]) == 0
    out = capsys.readouterr().out
    assert "small_resnet, 8x8 px, 2 per worker" in out and out.count("| BatchNorm2d |") == 9
    assert "the paper's G, lowered where a layer would get fewer than 32 values" in out
    assert main(["groups", "--model", "resnet50", "--batch-size", "8", "--values", "100"]) == 0
    assert "aiming at 100 values per statistic (at least 32)" in capsys.readouterr().out
    assert main(["groups", "--model", "resnet50", "--batch-size", "8", "--values", "8",
                 "--min-values", "4"]) == 0
    assert "aiming at 8 values per statistic (at least 4)" in capsys.readouterr().out
    assert main(["groups", "--model", "resnet50", "--batch-size", "8", "--values", "8"]) == 2
    assert re.search(r"bgnorm: groups: auto_groups: --values=8\.0 is below --min-values=32 "
                     r"at batch_size=8; lower --min-values", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["groups", "--model", "resnet50"])  # --batch-size is required


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_compile_chooses_eagerly_or_refuses_with_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="resolve_groups"):  # dynamo's Unsupported is one
        torch.compile(bgnorm.BatchGroupNorm2d(8, "auto"), backend="eager", fullgraph=True)(x)
    layer = bgnorm.BatchGroupNorm2d(8, "auto").double()
    y = torch.compile(layer, backend="eager")(x)
    twin = bgnorm.BatchGroupNorm2d(8, layer.num_groups).double()
    torch.testing.assert_close(y, twin(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_var, twin.running_var, rtol=0, atol=1e-12)


def test_the_guide_table_is_what_the_code_chooses():
    """docs/choosing-g.md's table: the rule's G on the mechanism study's 5-stage network."""
    from pathlib import Path

    from bgnorm.repro.tasks.transfer import NET_DEEP

    guide = (Path(__file__).resolve().parents[1] / "docs" / "choosing-g.md").read_text()
    rows = [line for line in guide.splitlines() if line.startswith("| ") and " x " in line
            and line.split("|")[2].strip().isdigit()]
    assert len(rows) == 5
    model = _meta(partial(small_resnet, in_channels=1, **NET_DEEP["model_kwargs"]))
    batches = sorted(PAPER_GROUPS, reverse=True)
    reports = {b: groups_report(model, (b, 1, 16, 16)) for b in batches}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        c, h, w = (int(v) for v in cells[0].split(" x "))
        chosen = [next(r for r in reports[b].rows if r.input_shape[1:] == (c, h, w))
                  for b in batches]
        count = sum(r.input_shape[1:] == (c, h, w) for r in reports[batches[0]].rows)
        assert [int(v) for v in cells[3:10]] == [r.groups for r in chosen], line
        assert int(cells[2]) == count and int(cells[1]) == c * h * w, line
        assert int(cells[10]) == min(r.values for r in chosen), line


def _bn_model_with_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)).double()
    for bn in (model[1], model[3]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("running_stats", ["derive", "reset"])
@pytest.mark.parametrize("target", [4096, 256, 16])  # G = 1 / whole channels, G = C, bands
def test_convert_norm_auto_carries_batchnorm_statistics_when_g_is_chosen(running_stats, target,
                                                                           monkeypatch):
    real = bgnorm.policy.auto_groups
    monkeypatch.setattr(bgnorm.policy, "auto_groups",
                        lambda *a, **k: real(*a, target_values=target, min_values=2))
    shape = (4, 3, 4, 4)
    auto = bgnorm.convert_norm(_bn_model_with_statistics(), "bgn", num_groups="auto",
                               running_stats=running_stats)
    resolve_groups(auto, shape)
    layers = [auto[1], auto[3]]
    chosen = [m.num_groups for m in layers]
    assert chosen == [real(c, (4, 4), 4, target_values=target, min_values=2) for c in (16, 8)]
    fixed = _bn_model_with_statistics()
    for i, g in zip((1, 3), chosen):  # the same conversion with the G given
        fixed[i] = bgnorm.convert_norm(fixed[i], "bgn", num_groups=g,
                                       running_stats=running_stats)
    for a, f in zip(layers, (fixed[1], fixed[3])):
        assert torch.equal(a.running_mean, f.running_mean)
        assert torch.equal(a.running_var, f.running_var)
        assert torch.equal(a.num_batches_tracked, f.num_batches_tracked)
    # and through the first training step
    auto2 = bgnorm.convert_norm(_bn_model_with_statistics(), "bgn", num_groups="auto",
                                running_stats=running_stats)
    x = torch.randn(shape, dtype=torch.float64)
    auto2(x)
    fixed(x)
    for a, f in zip((auto2[1], auto2[3]), (fixed[1], fixed[3])):
        torch.testing.assert_close(a.running_var, f.running_var, rtol=0, atol=1e-12)


def test_a_checkpoint_wins_over_the_carried_statistics():
    auto = bgnorm.convert_norm(_bn_model_with_statistics(), "bgn", num_groups="auto")
    trained = bgnorm.convert_norm(_bn_model_with_statistics(), "bgn", num_groups="auto")
    resolve_groups(trained, (4, 3, 4, 4))
    for m in (trained[1], trained[3]):
        m.running_mean.fill_(3.0)
    auto.load_state_dict(trained.state_dict())
    assert auto[1]._pending_channel_stats is None
    resolve_groups(auto, (4, 3, 4, 4))  # nothing left to choose or carry
    assert torch.equal(auto[1].running_mean, trained[1].running_mean)


def test_tools_name_a_layer_that_has_not_chosen():
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), bgnorm.BatchGroupNorm2d(8, "auto")).eval()

    report = bgnorm.fuse_conv_norm(net(), warn=False)
    assert not report.folded
    assert "has not chosen its G yet" in report.skipped[0][1]
    with pytest.raises(ValueError, match="num_groups='auto'\\) has not chosen its G yet"):
        bgnorm.freeze_norms(net())
    model = net()
    bgnorm.update_bn([torch.randn(4, 3, 6, 6)], model)  # a training pass: it chooses
    assert model[1].groups_resolved and not model[1].training
    bgnorm.freeze_norms(model)
