"""ENGINE = "auto": the choice of training engine by device (bgnorm.functional.auto_engine)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bgnorm import functional as BF
from bgnorm.ops import triton_bgn


def test_cpu_choice_by_size():
    assert BF.auto_engine(torch.empty(8, 64, 7, 7)) == "batchnorm"
    assert BF.auto_engine(torch.empty(8, 64, 32, 32)) == "units"  # above SMALL_NUMEL
    assert BF.auto_engine(torch.empty(8, 64, 7, 7), batch_groups=2) == "units"  # GBGN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_takes_engines_verified_there(dtype, monkeypatch):
    """CUDA inputs (fake CUDA tensors: no GPU needed) take the first engine of CUDA_ENGINES
    that runs them: never the native engines until a GPU run has verified them."""
    with FakeTensorMode():
        x = torch.empty(8, 64, 7, 7, device="cuda", dtype=dtype)
        big = torch.empty(8, 64, 32, 32, device="cuda", dtype=dtype)
        triton_ok = triton_bgn.available() and dtype != torch.float64
        assert BF.auto_engine(x) == ("triton" if triton_ok else "general")
        assert BF.auto_engine(x, batch_groups=2) == ("triton" if triton_ok else "general")
        monkeypatch.setattr(BF, "CUDA_ENGINES", ("native",))
        assert BF.auto_engine(x) == "batchnorm" and BF.auto_engine(big) == "units"
        monkeypatch.setattr(BF, "CUDA_ENGINES", ("general", "triton"))
        assert BF.auto_engine(big) == "general"
