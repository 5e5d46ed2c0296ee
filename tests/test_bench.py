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


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh without CUDA: the dry mode (tiny shapes, Triton's interpreter)
    runs every section of the GPU benchmark and writes its table, so the script the GPU run
    depends on cannot rot. Timings are not checked, only that each part produced its rows."""
    import csv
    import os
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA the script runs the full GPU check")
    pytest.importorskip("triton")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "correctness: 8 cells checked, 0 above tolerance" in log, log[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_bench.csv")))
    impls = {(r["section"], r["impl"]) for r in rows}
    assert {("copy", "d2d copy"), ("layer", "bn"), ("layer", "bgn-triton"), ("layer", "gn"),
            ("resnet50-step", "bn"), ("resnet50-step", "triton")} <= impls
    assert all("failed" not in r["note"] for r in rows), [r for r in rows if "failed" in r["note"]]
    triton_rows = [r for r in rows if r["impl"] == "bgn-triton"]
    assert all(float(r["max_rel_err"]) < 2e-2 for r in triton_rows)
    assert (tmp_path / "gpu_bench.md").read_text().count("| layer |") == sum(
        r["section"] == "layer" for r in rows)


def test_small_batch_cells_have_the_right_references(bench):
    """The benchmark's float64 references of the small-batch cells agree with the layers (the
    error columns of their rows are meaningful), BRN's after its running statistics moved."""
    import torch

    for cell in bench.small_batch_cells((4, 8, 5, 5)):
        ours, native, _ = bench.make_pair(cell)
        bench._init(ours, 8)
        bench._init(native, 8)
        torch.manual_seed(0)
        for _ in range(2):
            x = torch.randn(cell.shape) * 2 + 1
            with torch.no_grad():
                ref = bench.reference_f64(cell, ours, x)
                out = ours(x)
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
            assert out.shape == native(x).shape
