"""The benchmark's measurement helpers (timing logic checked with a fake clock; the timings
themselves are never asserted: targets live in the benchmark's report)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_norms",
                                                  ROOT / "benchmarks" / "bench_norms.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_norms"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_norms", None)


class FakeClock:
    """perf_counter that advances only when a timed function runs; the machine's speed drifts
    by a factor that changes every call (as on a noisy VM)."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self):
        return self.now

    def work(self, name, cost, speeds):
        def run():
            self.calls.append(name)  # calls 2k and 2k+1 (one rep's pair) share speeds[k]
            self.now += cost * speeds[(len(self.calls) - 1) // 2]
        return run


def test_interleaved_runs_abba_and_pairs_neighbouring_times(bench, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    # the machine's speed changes between reps, not within one: every rep's pair has ratio 1.2,
    # which pairing the wrong neighbours (e.g. by call order in a BA rep) would not give
    speeds = [1.0, 3.0, 1.0, 3.0, 3.0, 1.0]
    a = clock.work("a", 1.0, speeds)
    b = clock.work("b", 1.2, speeds)
    meds, ratios = bench.interleaved([a, b], reps=5, warmup=1)
    assert clock.calls[:2] == ["a", "b"]  # warmup
    assert clock.calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # ABBA
    assert ratios[0] == 1.0
    assert ratios[1] == pytest.approx(1.2)
    assert len(meds) == 2 and meds[1] > 0


def test_pin_allocator_reports_what_it_did(bench):
    note = bench.pin_allocator()
    assert note.startswith(("glibc malloc pinned", "default allocator", "mallopt failed"))
