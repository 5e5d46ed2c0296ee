"""BN -> BGN conversion of MONAI networks (2D and 3D): training steps, eval, state-dict round
trip, torch.export."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration
monai = pytest.importorskip("monai",
                            reason="monai is not installed (pip install 'bgnorm[integrations]')")

from convert_check import check_converted  # noqa: E402
from monai.networks import nets  # noqa: E402


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["unet", "densenet121", "segresnet"])
def test_convert_and_train(name, dims):
    torch.manual_seed(0)
    size = (32,) * dims if dims == 2 else (16,) * dims
    if name == "unet":
        model = nets.UNet(spatial_dims=dims, in_channels=1, out_channels=2,
                          channels=(8, 16, 32), strides=(2, 2), norm="batch")
    elif name == "densenet121":
        model = nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=3)
        if dims == 3:
            size = (32,) * 3
    else:
        model = nets.SegResNet(spatial_dims=dims, init_filters=8, in_channels=1,
                               out_channels=2, norm="batch", blocks_down=(1, 2),
                               blocks_up=(1,))
    check_converted(model, torch.randn(2, 1, *size))
