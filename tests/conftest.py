import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

#: The device tests that take the ``device`` fixture run on: ``BGNORM_TEST_DEVICE=cuda`` runs
#: them on the GPU (the float64 references stay on the same device), default CPU.
TEST_DEVICE = torch.device(os.environ.get("BGNORM_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    """The device of :data:`TEST_DEVICE` (skips the test when it is CUDA and none is present)."""
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("BGNORM_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): the setting the suite trains with."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
