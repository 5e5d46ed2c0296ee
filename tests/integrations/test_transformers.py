"""BN -> BGN conversion of Hugging Face transformers vision models built from configs (random
init, no downloads): training steps, eval, state-dict round trip, torch.export."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'bgnorm[integrations]')")

from convert_check import check_converted  # noqa: E402


def _logits(out):
    return out.logits


@pytest.mark.parametrize("name", ["resnet", "regnet", "mobilenet_v2"])
def test_convert_and_train(name):
    torch.manual_seed(0)
    if name == "resnet":
        config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                           depths=[1, 1], num_labels=3)
        model = transformers.ResNetForImageClassification(config)
    elif name == "regnet":
        config = transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                           depths=[1, 1], groups_width=8, num_labels=3)
        model = transformers.RegNetForImageClassification(config)
    else:
        config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.35,
                                                num_labels=3)
        model = transformers.MobileNetV2ForImageClassification(config)
    check_converted(model, torch.randn(4, 3, 32, 32), output=_logits)
