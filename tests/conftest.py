import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

#: Triton reads TRITON_INTERPRET when a kernel is defined; set it before any test imports
#: bgnorm's kernels, so without a GPU every Triton kernel of the session runs interpreted
#: on CPU whatever test module imports them first.
if os.environ.get("BGNORM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The device tests that take the ``device`` fixture run on: ``BGNORM_TEST_DEVICE=cuda`` runs
#: them on the GPU (the float64 references stay on the same device), default CPU.
TEST_DEVICE = torch.device(os.environ.get("BGNORM_TEST_DEVICE", "cpu"))

if TEST_DEVICE.type == "cpu":
    # The Triton engine's tests run its kernels under Triton's interpreter, which Triton reads
    # when a function is decorated: before triton is first imported, also by another test
    # module's import (torch.compile's inductor imports it), or tl.zeros & co. stay compiled
    # functions that interpreted kernels cannot call. (Inductor's CPU code does not use it.)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """The device of :data:`TEST_DEVICE` (skips the test when it is CUDA and none is present)."""
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("BGNORM_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    return TEST_DEVICE


#: Test modules of the layers that run unchanged on TEST_DEVICE: with BGNORM_TEST_DEVICE=cuda
#: their tensors are created there (torch.set_default_device), float64 references included.
DEVICE_MODULES = {"test_functional", "test_layers", "test_hardening_layers"}


@pytest.fixture(autouse=True)
def _default_device(request):
    name = getattr(request.module, "__name__", "").rpartition(".")[2]
    if TEST_DEVICE.type == "cpu" or name not in DEVICE_MODULES:
        yield
        return
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("BGNORM_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    torch.set_default_device(TEST_DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(None)


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
