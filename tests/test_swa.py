"""bgnorm.update_bn: the running statistics of every BN/BGN/GBGN/SyncBGN after one pass equal
the cumulative average of the per-batch statistics, computed directly in float64."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

import bgnorm
from bgnorm import update_bn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12, momentum=0.3)
        self.whole = bgnorm.BatchGroupNorm2d(12, 4, momentum=None)
        self.bands = bgnorm.BatchGroupNorm2d(12, 24)
        self.conv2 = nn.Conv2d(12, 6, 3, padding=1)
        self.straddle = bgnorm.BatchGroupNorm2d(6, 4)
        self.gbgn = bgnorm.GeneralBatchGroupNorm2d(6, 3, examples_per_group=2, momentum=0.2)
        self.sync = bgnorm.SyncBatchGroupNorm(6, 2)
        self.untracked = nn.BatchNorm2d(6, track_running_stats=False)
        self.fc = nn.Linear(6 * 16, 8)
        self.bgn1d = bgnorm.BatchGroupNorm1d(8, 2)

    def forward(self, x):
        x = self.bands(self.whole(self.bn(self.conv1(x)))).relu()
        x = self.untracked(self.sync(self.gbgn(self.straddle(self.conv2(x)))))
        return self.bgn1d(self.fc(x.flatten(1)))


# layer -> (num_groups, examples_per_group or None); BN is G = C
GROUPS = {"bn": (12, None), "whole": (4, None), "bands": (24, None), "straddle": (4, None),
          "gbgn": (3, 2), "sync": (2, None), "bgn1d": (2, None)}


def _batch_stats(x: torch.Tensor, g: int, e: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of one batch in float64 (GBGN: averaged over batch groups)."""
    x = x.double()
    n = x.shape[0]
    e = n if e is None else e
    xv = x.reshape(n // e, e, g, -1)
    count = e * xv.shape[3]
    mean = xv.mean(dim=(1, 3))
    var = ((xv - mean[:, None, :, None]) ** 2).sum(dim=(1, 3)) / (count - 1)
    return mean.mean(0), var.mean(0)


def _loader():
    torch.manual_seed(1)
    # batches as a tensor, an (input, target) tuple and a [input] list; sizes differ
    return [torch.randn(8, 3, 4, 4) * 2 + 1,
            (torch.randn(6, 3, 4, 4), torch.zeros(6)),
            [torch.randn(4, 3, 4, 4) - 0.5]]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_running_stats_are_the_cumulative_average_of_batch_stats(mode):
    net = Net().train(mode == "train")
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in GROUPS}
    for name in GROUPS:
        getattr(net, name).register_forward_pre_hook(
            lambda m, args, name=name: inputs[name].append(args[0].detach().clone()))
    momenta = {name: getattr(net, name).momentum for name in GROUPS}
    update_bn(_loader(), net, device="cpu")

    assert net.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in net.modules())
    for name, (g, e) in GROUPS.items():
        layer = getattr(net, name)
        assert layer.momentum == momenta[name], name
        assert len(inputs[name]) == 3
        stats = [_batch_stats(x, g, e) for x in inputs[name]]
        want_mean = torch.stack([m for m, _ in stats]).mean(0)
        want_var = torch.stack([v for _, v in stats]).mean(0)
        torch.testing.assert_close(layer.running_mean.double(), want_mean, rtol=1e-5,
                                   atol=1e-6, msg=f"{name} running_mean")
        torch.testing.assert_close(layer.running_var.double(), want_var, rtol=1e-5,
                                   atol=1e-6, msg=f"{name} running_var")
        assert int(layer.num_batches_tracked) == 3, name
    assert net.untracked.running_mean is None


def test_matches_torch_update_bn_on_batchnorm_and_fixes_what_it_leaves():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), bgnorm.BatchGroupNorm2d(8, 2)).eval()
    loader = _loader()
    theirs, ours = copy.deepcopy(net), copy.deepcopy(net)
    torch.optim.swa_utils.update_bn(loader, theirs)
    update_bn(loader, ours)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(ours.state_dict()[key], theirs.state_dict()[key]), key
    # torch's runs the BGN layer in training mode with its momentum, so its statistics keep
    # a weight of 0.9**3 on the stale ones; ours are reset first and do not depend on them
    stale = copy.deepcopy(net)
    stale[4].running_mean.fill_(5.0)
    theirs_stale, ours_stale = copy.deepcopy(stale), copy.deepcopy(stale)
    torch.optim.swa_utils.update_bn(loader, theirs_stale)
    update_bn(loader, ours_stale)
    assert torch.equal(ours_stale[4].running_mean, ours[4].running_mean)
    assert torch.equal(ours_stale[4].running_var, ours[4].running_var)
    gap = theirs_stale[4].running_mean - theirs[4].running_mean
    torch.testing.assert_close(gap, torch.full_like(gap, 5.0 * 0.9**3))


def test_restores_momenta_and_mode_when_a_batch_fails():
    net = Net().eval()
    with pytest.raises(RuntimeError):
        update_bn([torch.randn(4, 5, 4, 4)], net)  # wrong channel count for conv1
    assert not net.training and net.bn.momentum == 0.3 and net.whole.momentum is None


def test_model_without_batch_norms_is_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)).eval()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    update_bn(_loader(), net)
    assert calls == [] and not net.training


def test_docstring_examples():
    import bgnorm.swa

    result = doctest.testmod(bgnorm.swa, extraglobs={"torch": torch, "nn": nn},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
