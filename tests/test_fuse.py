"""fuse_conv_norm / fuse_conv_norm_pair: every layout that folds gives the unfolded model's output
(float64 reference, tolerances far above float32 round-off), every one that does not is left in
place and reported with its reason, and folded models export."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import bgnorm
from bgnorm.fuse import FuseReport, fuse_conv_norm, fuse_conv_norm_pair


def _randomize(norm: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine (the initial ones would hide index bugs)."""
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            t = getattr(norm, name, None)
            if isinstance(t, torch.Tensor):
                if name == "running_var":
                    t.copy_(torch.rand_like(t) * 2 + 0.1)
                else:
                    t.copy_(torch.randn_like(t))
    return norm


def _check_folds(layer: nn.Module, norm: nn.Module, x: torch.Tensor) -> None:
    norm = _randomize(norm).eval()
    net = nn.Sequential(layer, norm).eval()
    want = copy.deepcopy(net).double()(x.double())
    report = fuse_conv_norm(net, example_inputs=(x,), warn=False)
    assert report.folded == [("0", "1")] and report.skipped == []
    assert isinstance(report.model[1], nn.Identity)
    scale = want.abs().max().item()
    torch.testing.assert_close(report.model(x).double(), want, rtol=0, atol=1e-5 * scale)
    # the pair function gives the same layer, and leaves its arguments alone
    before = [t.clone() for t in layer.parameters()]
    fused = fuse_conv_norm_pair(layer, norm)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    torch.testing.assert_close(fused(x).double(), want, rtol=0, atol=1e-5 * scale)


LAYOUTS = {
    # (layer, norm, input shape)
    "conv2d+bn": (lambda: nn.Conv2d(3, 8, 3), lambda: nn.BatchNorm2d(8), (4, 3, 7, 7)),
    "conv2d-nobias+bn": (lambda: nn.Conv2d(3, 8, 3, bias=False), lambda: nn.BatchNorm2d(8),
                         (4, 3, 7, 7)),
    "conv1d+bn1d": (lambda: nn.Conv1d(3, 8, 3), lambda: nn.BatchNorm1d(8), (4, 3, 9)),
    "conv3d+bn3d": (lambda: nn.Conv3d(2, 8, 3), lambda: nn.BatchNorm3d(8), (2, 2, 5, 5, 5)),
    "conv2d+bgn-G=C": (lambda: nn.Conv2d(3, 8, 3), lambda: bgnorm.BatchGroupNorm2d(8, 8),
                       (4, 3, 7, 7)),
    "conv2d+bgn-whole": (lambda: nn.Conv2d(3, 12, 3, bias=False),
                         lambda: bgnorm.BatchGroupNorm2d(12, 3), (4, 3, 7, 7)),
    "conv2d+bgn-G=1": (lambda: nn.Conv2d(3, 12, 3), lambda: bgnorm.BatchGroupNorm2d(12, 1),
                       (4, 3, 7, 7)),
    "conv1d+bgn1d": (lambda: nn.Conv1d(3, 12, 3), lambda: bgnorm.BatchGroupNorm1d(12, 4),
                     (4, 3, 9)),
    "conv3d+bgn3d": (lambda: nn.Conv3d(2, 8, 3), lambda: bgnorm.BatchGroupNorm3d(8, 2),
                     (2, 2, 5, 5, 5)),
    "conv2d+gbgn": (lambda: nn.Conv2d(3, 12, 3),
                    lambda: bgnorm.GeneralBatchGroupNorm2d(12, 4, 2), (4, 3, 7, 7)),
    "conv2d+syncbgn": (lambda: nn.Conv2d(3, 12, 3), lambda: bgnorm.SyncBatchGroupNorm(12, 6),
                       (4, 3, 7, 7)),
    "conv2d+bgn-noaffine": (lambda: nn.Conv2d(3, 8, 3),
                            lambda: bgnorm.BatchGroupNorm2d(8, 4, affine=False), (4, 3, 7, 7)),
    "grouped-conv+bgn": (lambda: nn.Conv2d(4, 12, 3, groups=2),
                         lambda: bgnorm.BatchGroupNorm2d(12, 4), (4, 4, 7, 7)),
    "depthwise-conv+bn": (lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1,
                                            padding_mode="reflect"),
                          lambda: nn.BatchNorm2d(6), (4, 6, 7, 7)),
    "convT2d+bgn": (lambda: nn.ConvTranspose2d(3, 8, 3, stride=2),
                    lambda: bgnorm.BatchGroupNorm2d(8, 4), (4, 3, 5, 5)),
    "grouped-convT2d+bn": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
                           lambda: nn.BatchNorm2d(6), (4, 4, 5, 5)),
    "convT1d+bgn1d": (lambda: nn.ConvTranspose1d(3, 8, 3, groups=1),
                      lambda: bgnorm.BatchGroupNorm1d(8, 2), (4, 3, 6)),
    "linear+bgn1d": (lambda: nn.Linear(5, 12), lambda: bgnorm.BatchGroupNorm1d(12, 4), (6, 5)),
    "linear-nobias+bn1d": (lambda: nn.Linear(5, 12, bias=False), lambda: nn.BatchNorm1d(12),
                           (6, 5)),
    # Batch Renormalization: BatchNorm's eval with its running statistics
    "conv2d+brn": (lambda: nn.Conv2d(3, 8, 3), lambda: bgnorm.BatchRenorm2d(8), (4, 3, 7, 7)),
    "conv1d+brn1d-nobias": (lambda: nn.Conv1d(3, 8, 3),
                            lambda: bgnorm.BatchRenorm1d(8, bias=False), (4, 3, 9)),
    "conv3d+brn3d-grouped-stats": (lambda: nn.Conv3d(2, 8, 3),
                                   lambda: bgnorm.BatchRenorm3d(8, examples_per_group=1),
                                   (2, 2, 5, 5, 5)),
    "linear+brn1d-noaffine": (lambda: nn.Linear(5, 12),
                              lambda: bgnorm.BatchRenorm1d(12, affine=False), (6, 5)),
    "convT2d+brn": (lambda: nn.ConvTranspose2d(3, 8, 3, stride=2),
                    lambda: bgnorm.BatchRenorm2d(8), (4, 3, 5, 5)),
    # weight-standardized convs: a conv with the fixed standardized weights at inference
    "stdconv2d+bn": (lambda: bgnorm.StdConv2d(3, 8, 3), lambda: nn.BatchNorm2d(8),
                     (4, 3, 7, 7)),
    "stdconv2d-nobias+bgn": (lambda: bgnorm.StdConv2d(3, 12, 3, bias=False, eps=1e-3),
                             lambda: bgnorm.BatchGroupNorm2d(12, 3), (4, 3, 7, 7)),
    "stdconv2d-grouped-reflect+brn": (
        lambda: bgnorm.StdConv2d(4, 12, 3, groups=2, padding=2, dilation=2,
                                 padding_mode="reflect"),
        lambda: bgnorm.BatchRenorm2d(12), (4, 4, 7, 7)),
    "stdconv1d-same+bgn1d": (lambda: bgnorm.StdConv1d(3, 8, 3, padding="same"),
                             lambda: bgnorm.BatchGroupNorm1d(8, 4), (4, 3, 9)),
    "stdconv3d+bn3d": (lambda: bgnorm.StdConv3d(2, 8, 3, stride=2), lambda: nn.BatchNorm3d(8),
                       (2, 2, 7, 7, 7)),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_folded_equals_unfolded(case):
    layer, norm, shape = LAYOUTS[case]
    _check_folds(layer(), norm(), torch.randn(shape))


def test_float64_model_folds_in_float64():
    conv, bgn = nn.Conv2d(3, 8, 3).double(), _randomize(bgnorm.BatchGroupNorm2d(8, 2)).double()
    net = nn.Sequential(conv, bgn).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = net(x)
    got = fuse_conv_norm(net, warn=False).model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class Residual(nn.Module):
    """conv -> norm feeding a residual sum; a second conv whose output is used twice."""

    def __init__(self, norm=lambda c: bgnorm.BatchGroupNorm2d(c, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm1 = norm(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm2 = norm(4)

    def forward(self, x):
        y = torch.relu(self.norm1(self.conv1(x)))
        z = self.conv2(y)
        return self.norm2(z) + z  # conv2's output is used outside the norm


def test_traced_pairs_and_output_used_elsewhere():
    m = Residual().eval()
    for mod in m.modules():
        if isinstance(mod, bgnorm.BatchGroupNorm2d):
            _randomize(mod)
    x = torch.randn(2, 4, 5, 5)
    want = m(x)
    with pytest.warns(UserWarning, match="norm2: the output of conv2 "
                                         "is also used by add"):
        report = fuse_conv_norm(m)
    assert report.folded == [("conv1", "norm1")]
    assert [name for name, _ in report.skipped] == ["norm2"]
    assert isinstance(report.model.norm1, nn.Identity)
    assert isinstance(report.model.norm2, bgnorm.BatchGroupNorm2d)  # left exactly as it was
    torch.testing.assert_close(report.model(x), want, rtol=0, atol=1e-5)
    # not in place by default: the argument keeps its norms and weights
    assert isinstance(m.norm1, bgnorm.BatchGroupNorm2d)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "norm, reason",
    [
        (lambda: bgnorm.BatchGroupNorm2d(4, 8), "cuts each channel into 2 bands"),
        (lambda: bgnorm.BatchGroupNorm2d(6, 4), "straddle channel boundaries"),
        (lambda: nn.GroupNorm(2, 4), "its own statistics"),
        (lambda: bgnorm.PositionalNorm(4), "its own statistics"),
        (lambda: nn.InstanceNorm2d(4, affine=True), "its own statistics"),
        (lambda: nn.BatchNorm2d(4, track_running_stats=False), "track_running_stats=False"),
        (lambda: bgnorm.BatchGroupNorm2d(4, 2, track_running_stats=False),
         "track_running_stats=False"),
        (lambda: bgnorm.BatchRenorm2d(4, track_running_stats=False), "track_running_stats=False"),
        (lambda: bgnorm.FilterResponseNorm2d(4), "own root mean square.*TLU max"),
        (lambda: bgnorm.FilterResponseNorm2d(4, tlu=False), "own root mean square.*at inference"),
        (lambda: bgnorm.EvoNorm2dS0(4, groups=2), "sigmoid"),
        (lambda: bgnorm.EvoNorm2dB0(4), r"max\(running std"),
    ],
)
def test_layouts_that_do_not_fold_are_left_and_reported(norm, reason):
    n = norm()
    c = n.num_features if hasattr(n, "num_features") else n.num_channels
    net = nn.Sequential(nn.Conv2d(3, c, 3), n).eval()
    before = copy.deepcopy(net.state_dict())
    report = fuse_conv_norm(net, inplace=True, warn=False)
    assert report.folded == []
    assert len(report.skipped) == 1 and report.skipped[0][0] == "1"
    assert re.search(reason, report.skipped[0][1])
    assert net[1] is n
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k], k
    with pytest.raises(ValueError, match=reason):
        fuse_conv_norm_pair(net[0], n)


@pytest.mark.parametrize("norm", [lambda: bgnorm.EvoNorm2dS0(4, groups=2, apply_act=False),
                                  lambda: bgnorm.EvoNorm2dB0(4, apply_act=False)])
def test_evonorm_without_activation_folds(norm):
    # apply_act=False: timm's EvoNorm is gamma x + beta, a per-channel affine map that folds
    torch.manual_seed(0)
    n = norm()
    with torch.no_grad():
        n.weight.uniform_(0.5, 2.0), n.bias.uniform_(-1.0, 1.0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), n).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = net(x)
    report = fuse_conv_norm(net, inplace=True, warn=False)
    assert report.folded == [("0", "1")] and isinstance(net[1], nn.Identity)
    torch.testing.assert_close(net(x), want)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, bgnorm.BatchRenorm2d])
def test_training_mode_refused(norm):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        fuse_conv_norm(net)
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        fuse_conv_norm_pair(net[0], net[1])
    net.eval()
    net[1].train()  # one layer kept in training mode on purpose: left, reported
    report = fuse_conv_norm(net, warn=False)
    assert report.folded == [] and "training mode" in report.skipped[0][1]


class SmallBatchNet(nn.Module):
    """The small-batch layers in one traceable model: weight-standardized convs before BGN and
    BRN, and normalization-activation layers (FRN, EvoNorm) that must stay."""

    def __init__(self):
        super().__init__()
        self.conv1 = bgnorm.StdConv2d(3, 8, 3, padding=1)
        self.norm1 = bgnorm.BatchGroupNorm2d(8, 4)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm2 = bgnorm.BatchRenorm2d(8)
        self.conv3 = bgnorm.StdConv2d(8, 8, 1)
        self.frn = bgnorm.FilterResponseNorm2d(8)
        self.conv4 = nn.Conv2d(8, 8, 1)
        self.evo_s0 = bgnorm.EvoNorm2dS0(8, groups=2)
        self.conv5 = nn.Conv2d(8, 8, 1)
        self.evo_b0 = bgnorm.EvoNorm2dB0(8)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        x = self.evo_s0(self.conv4(self.frn(self.conv3(x))))
        return self.evo_b0(self.conv5(x))


def test_small_batch_layers_traced_folded_or_reported():
    torch.manual_seed(0)
    m = SmallBatchNet()
    for mod in m.modules():
        _randomize(mod)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():  # FRN, EvoNorm: random affine, threshold and v too
        for p in (m.frn.tau, m.evo_s0.v, m.evo_b0.v):
            p.copy_(torch.randn_like(p))
    m.eval()
    want = copy.deepcopy(m).double()(x.double())
    report = fuse_conv_norm(m, example_inputs=(x,), warn=False)
    # the layers are leaves of the trace (their forwards branch on the input's dimension)
    assert report.untraced == []
    assert report.folded == [("conv1", "norm1"), ("conv2", "norm2")]
    assert [name for name, _ in report.skipped] == ["frn", "evo_s0", "evo_b0"]
    assert all("not a fixed affine map at inference" in why for _, why in report.skipped)
    folded = report.model
    # a folded StdConv is torch's conv with the StdConv's parameter tensors
    assert type(folded.conv1) is nn.Conv2d and folded.conv1.padding == (1, 1)
    assert type(folded.conv3) is bgnorm.StdConv2d  # nothing folded into it: unchanged
    # the folded norms' keys are gone, the bias-free conv2 got a bias, the rest is unchanged
    assert set(folded.state_dict()) == {k for k in m.state_dict()
                                        if not k.startswith(("norm1.", "norm2."))} | {"conv2.bias"}
    scale = want.abs().max().item()
    torch.testing.assert_close(folded(x).double(), want, rtol=0, atol=1e-5 * scale)
    exported = torch.export.export(folded, (x,)).module()
    torch.testing.assert_close(exported(x), folded(x), rtol=0, atol=1e-6)
    for norm in (m.frn, m.evo_s0, m.evo_b0):
        with pytest.raises(ValueError, match=f"cannot fold: {type(norm).__name__} .*nothing to "
                                             "fold"):
            fuse_conv_norm_pair(nn.Conv2d(8, 8, 1), norm)


def test_std_conv_fold_in_place_keeps_the_parameter_tensors():
    conv, bn = bgnorm.StdConv2d(3, 8, 3), _randomize(nn.BatchNorm2d(8))
    net = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 6, 6)
    want = net(x)
    weight, bias = conv.weight, conv.bias
    report = fuse_conv_norm(net, inplace=True, warn=False)
    assert report.model is net and type(net[0]) is nn.Conv2d
    assert net[0].weight is weight and net[0].bias is bias  # an optimizer keeps them
    torch.testing.assert_close(net(x), want, rtol=0, atol=1e-5)


def test_std_conv_subclass_with_its_own_forward_is_not_folded():
    class ScaledStdConv(bgnorm.StdConv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(ScaledStdConv(3, 4, 3), nn.BatchNorm2d(4)).eval()
    report = fuse_conv_norm(net, warn=False)
    assert report.folded == [] and "nor a bgnorm StdConv1d/2d/3d running its own" in (
        report.skipped[0][1])
    with pytest.raises(ValueError, match="nor a bgnorm StdConv1d/2d/3d running its own"):
        fuse_conv_norm_pair(net[0], net[1])


class StdConv(nn.Conv2d):
    """Weight-standardized conv: another function of the same weights."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1)
        return self._conv_forward(x, w, self.bias)


def test_custom_conv_and_shared_and_hooked_modules_not_folded():
    # the fx tracer traces through StdConv (not a torch.nn leaf); module order finds it
    net = nn.Sequential(StdConv(3, 4, 3), nn.BatchNorm2d(4)).eval()
    report = fuse_conv_norm(net, warn=False)
    assert report.folded == [] and "its input is not the output of a Conv" in report.skipped[0][1]
    with pytest.raises(ValueError, match="torch's own forward"):
        fuse_conv_norm_pair(net[0], net[1])

    shared = nn.BatchNorm2d(4)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), shared),
                        nn.Sequential(nn.Conv2d(4, 4, 1), shared)).eval()
    report = fuse_conv_norm(net, warn=False)
    assert report.folded == []
    assert any("more than once" in why or "more than one place" in why
               for _, why in report.skipped)

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    net[1].register_forward_hook(lambda *a: None)
    report = fuse_conv_norm(net, warn=False)
    assert report.folded == [] and "forward hooks" in report.skipped[0][1]


class Untraceable(nn.Module):
    """Data-dependent control flow (fx cannot trace it) around a Sequential and a bare pair."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3), bgnorm.BatchGroupNorm2d(8, 4), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 1)
        self.norm = nn.BatchNorm2d(8)
        self.inner = Residual(norm=nn.BatchNorm2d)

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:  # data-dependent
            y = -y
        return self.norm(self.conv(y))


def test_module_order_fallback_when_tracing_fails():
    m = Untraceable().eval()
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, bgnorm.BatchGroupNorm2d)):
            _randomize(mod)
    x = torch.randn(2, 3, 6, 6)
    want = m(x)
    report = fuse_conv_norm(m, warn=False)
    assert [name for name, _ in report.untraced] == [""]
    # the Sequential pair by order; the child Residual by its own graph (conv2's output is
    # used twice there); the bare conv -> norm of the untraceable forward is not assumed
    assert sorted(report.folded) == [("block.0", "block.1"), ("inner.conv1", "inner.norm1")]
    assert {name for name, _ in report.skipped} == {"norm", "inner.norm2"}
    torch.testing.assert_close(report.model(x), want, rtol=0, atol=1e-5)
    assert "traced by module order: <root>" in str(report)


def test_linear_needs_example_inputs_and_a_2d_output():
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)).eval()
    report = fuse_conv_norm(net, warn=False)
    assert report.folded == [] and "pass example_inputs" in report.skipped[0][1]
    assert fuse_conv_norm(net, (torch.randn(3, 5),), warn=False).folded == [("0", "1")]
    # (N, L, C) with L == C: BatchNorm1d normalizes L, not the linear's features
    report = fuse_conv_norm(net, (torch.randn(3, 8, 5),), warn=False)
    assert report.folded == [] and "output has shape (3, 8, 8)" in report.skipped[0][1]


def test_warning_lists_skipped_layers_and_can_be_silenced():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)).eval()
    with pytest.warns(UserWarning, match=r"left 1 norm layer\(s\) in place: 1: GroupNorm"):
        fuse_conv_norm(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse_conv_norm(net, warn=False)
        # nothing skipped: no warning even with warn=True
        fuse_conv_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())


def test_resnet_folds_every_norm_and_exports():
    from bgnorm.repro.models import cifar_resnet

    m = cifar_resnet(8, num_classes=5, norm_layer=lambda c: bgnorm.BatchGroupNorm2d(c, c // 4))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        m.train()
        m(x)
        m(x + 1)
    m.eval()
    want = m(x)
    report = fuse_conv_norm(m)
    assert isinstance(report, FuseReport) and report.skipped == []
    norms = [n for n, mod in m.named_modules() if isinstance(mod, bgnorm.BatchGroupNorm2d)]
    assert sorted(n for _, n in report.folded) == sorted(norms)
    assert not any(isinstance(mod, bgnorm.BatchGroupNorm2d) for mod in report.model.modules())
    torch.testing.assert_close(report.model(x), want, rtol=0, atol=1e-5)
    exported = torch.export.export(report.model, (x,)).module()
    torch.testing.assert_close(exported(x), want, rtol=0, atol=1e-5)


def test_docstring_examples():
    import doctest

    import bgnorm.fuse

    result = doctest.testmod(bgnorm.fuse, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
