"""Regression tests for the conversion, registry and policy findings of issue 13.

Each test names the finding it covers; every one of them failed before its fix.
"""

from __future__ import annotations

import numpy as np
import pytest

import bgnorm
from bgnorm import channel_groups, make_norm, paper_groups


# -- finding 13: numpy integers are accepted like ints -------------------------------------------
def test_numpy_integers_in_policies_and_registry():
    assert paper_groups(np.int64(16)) == 64 and type(paper_groups(np.int64(16))) is int
    assert paper_groups(np.int32(3)) == paper_groups(3)
    groups = channel_groups(np.int64(4))
    assert groups(64) == 16 and type(groups(64)) is int
    assert groups(np.int64(64)) == 16 and type(groups(np.int64(64))) is int
    m = make_norm("bgn", np.int64(8), num_groups=np.int64(4), dim=np.int64(1))
    assert isinstance(m, bgnorm.BatchGroupNorm1d)
    assert type(m.num_features) is int and type(m.num_groups) is int and m.num_groups == 4
    gn = make_norm("gn", np.int16(8), num_groups=np.int64(2))
    assert type(gn.num_groups) is int and gn.num_groups == 2
    assert make_norm("gbgn", 8, num_groups=np.int8(2), examples_per_group=np.int64(2)) \
        .examples_per_group == 2
    assert make_norm("bgn", 8, num_groups=channel_groups(np.int64(2))).num_groups == 4
    # what torch refuses stays refused: floats and bools are not counts
    with pytest.raises(TypeError, match=r"batch_size must be a positive int, got float"):
        paper_groups(np.float64(16))
    with pytest.raises(TypeError, match=r"channels_per_group must be a positive int, got bool"):
        channel_groups(True)
