"""UnitsPlan's maps between per-row, per-channel and per-statistic vectors, checked element by
element against the definition of the layouts (every row's elements share one channel and one
statistic)."""

from __future__ import annotations

import pytest
import torch

from bgnorm.ops.plan import UnitsPlan, unit_length, units_plan
from bgnorm.ops.units import native_plan

# (N, C, S, G, P0): whole channels, bands, straddling, BGN and GBGN, and the columns layout
CASES = [
    (4, 8, 9, 2, 1), (4, 8, 8, 16, 1), (4, 6, 4, 4, 1), (6, 8, 9, 2, 3), (6, 6, 4, 4, 2),
    (4, 1, 5, 5, 1), (3, 5, 1, 5, 1),
]


@pytest.fixture(params=[(*case, columns) for case in CASES for columns in (False, True)
                        if not (columns and case[4] > 1)],  # the columns layout is for BGN
                ids=lambda p: "-".join(map(str, p)))
def case(request):
    """(N, C, S, G, P0, columns) and its plan, for every case in each layout it can take."""
    return request.param, UnitsPlan(*request.param)


def _element_maps(n, c, s, g, p0):
    """For every element of the (N, C*S) input: its channel and its statistic index."""
    d = c * s
    j = torch.arange(d)
    channel = (j // s).expand(n, d)
    group = (j // (d // g)).expand(n, d)
    stat = group + (torch.arange(n) // (n // p0)).view(n, 1) * g
    return channel, stat


def test_rows_share_one_channel_and_one_statistic(case):
    (n, c, s, g, p0, columns), plan = case
    assert plan.l == (1 if columns else unit_length(c, s, g))
    channel, stat = _element_maps(n, c, s, g, p0)
    # each row of the units view holds elements of one channel and one statistic
    rows_c = plan.view(channel.contiguous().float()).reshape(-1, plan.rows, plan.l)
    rows_s = plan.view(stat.contiguous().float()).reshape(-1, plan.rows, plan.l)
    assert (rows_c == rows_c[..., :1]).all() and (rows_s == rows_s[..., :1]).all()
    # ... and the plan's gathers name exactly those
    c_vec = torch.arange(c, dtype=torch.float32).view(1, c)
    s_vec = torch.arange(p0 * g, dtype=torch.float32).view(1, p0 * g)
    idx = plan.channel_index(c_vec.device)
    c_rows = c_vec if idx is None else c_vec.index_select(-1, idx)
    if p0 == 1:
        torch.testing.assert_close(c_rows[0], rows_c[0, :, 0])
        torch.testing.assert_close(plan.groups_to_rows(s_vec)[0], rows_s[0, :, 0])
    else:
        torch.testing.assert_close(c_rows[0], rows_c.reshape(-1)[::plan.l])
        torch.testing.assert_close(plan.groups_to_rows(s_vec)[0], rows_s.reshape(-1)[::plan.l])


def test_row_sums_reduce_to_channels_and_statistics(case):
    (n, c, s, g, p0, _), plan = case
    x = torch.randn(n, c * s, dtype=torch.float64)
    # per-row sums of the units view, as the native reductions produce them
    v = plan.view(x).reshape(-1, plan.rows, plan.l)
    row_sums = v.sum(dim=(0, 2)).view(1, -1)
    channel, stat = _element_maps(n, c, s, g, p0)
    want_c = torch.zeros(c, dtype=torch.float64).index_add_(0, channel.reshape(-1), x.reshape(-1))
    want_s = torch.zeros(p0 * g, dtype=torch.float64).index_add_(0, stat.reshape(-1),
                                                                 x.reshape(-1))
    torch.testing.assert_close(plan.rows_to_channels(row_sums)[0], want_c)
    torch.testing.assert_close(plan.rows_to_groups(row_sums)[0], want_s)


def test_plans_are_cached_and_columns_chosen_for_short_units():
    assert units_plan(4, 8, 9, 2, 1) is units_plan(4, 8, 9, 2, 1)
    assert native_plan(128, 64, 256, 512, 1).l == 1  # bands of 32 elements: columns
    assert native_plan(16, 512, 196, 32, 1).l == 196  # whole channels of 14x14: units
    assert native_plan(2, 64, 4, 8, 1).l == 4  # too few examples for columns
    assert native_plan(8, 64, 4, 8, 2).l == 4  # GBGN keeps its units
