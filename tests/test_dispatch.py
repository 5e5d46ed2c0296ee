"""The choice of engine (bgnorm.ops.dispatch): pinned tables of inputs and the engine, layout
and eval pass each gets, by device (CPU, CUDA as fake tensors, meta), layout, size, dtype,
tracing and torch.func; and force_engine, the override tests and benchmarks use.

The tables pin the choices the engines made before they moved to one dispatch module (the
same choice for every input, checked then over 4400 combinations against the old code)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bgnorm import functional as BF
from bgnorm.ops import dispatch, triton_bgn
from bgnorm.ops.dispatch import choose_engine, choose_eval_pass, force_engine
from bgnorm.ops.plan import units_plan
from bgnorm.ops.units import native_plan

CL = "channels_last"

# (shape, G, e or None, layout, forced engine, engine chosen on CPU)
CPU_TABLE = [
    ((8, 64, 7, 7), 16, None, None, "auto", "channels"),  # whole channels, small
    ((8, 64, 7, 7), 64, None, None, "auto", "batchnorm"),  # G = C
    ((8, 64, 7, 7), 128, None, None, "auto", "bands"),
    ((8, 64, 7, 7), 16, 2, None, "auto", "units"),  # GBGN
    ((8, 64, 7, 7), 16, 8, None, "auto", "channels"),  # GBGN with e = N chooses as BGN
    ((8, 64, 7, 7), 64, 8, None, "auto", "bands"),  # ... except for G = C
    ((8, 12, 8, 8), 8, None, None, "auto", "units"),  # straddling groups
    ((8, 64, 32, 32), 16, None, None, "auto", "units"),  # above SMALL_NUMEL
    ((8, 64, 32, 32), 256, None, CL, "auto", "units"),
    ((64, 128), 16, None, None, "auto", "channels"),  # 2D
    ((4, 16, 2, 4, 4), 4, None, None, "auto", "channels"),  # 5D
    ((512, 64, 2, 2), 128, None, CL, "auto", "bands"),
    ((8, 64, 7, 7), 16, None, None, "batchnorm", "channels"),
    ((8, 64, 32, 32), 256, None, None, "batchnorm", "bands"),  # forced: any size
    ((8, 12, 8, 8), 8, None, None, "batchnorm", "units"),  # straddling: units
    ((8, 64, 7, 7), 16, 2, None, "batchnorm", "units"),
    ((8, 64, 7, 7), 16, None, None, "units", "units"),
    ((8, 64, 7, 7), 64, None, None, "units", "batchnorm"),  # G = C: whatever is forced
    ((8, 64, 7, 7), 16, None, CL, "general", "general"),
    ((8, 64, 7, 7), 16, 2, None, "general", "general"),
    ((8, 64, 7, 7), 16, None, None, "units-columns", "units"),
    ((8, 64, 7, 7), 16, None, None, "triton", "channels"),  # CPU without the interpreter: auto
    ((8, 64, 7, 7), 64, None, None, "triton", "batchnorm"),
]


def _input(shape, layout, device="cpu", dtype=torch.float32):
    x = torch.empty(shape, device=device, dtype=dtype)
    return x if layout is None else x.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,g,e,layout,forced,want", CPU_TABLE)
def test_cpu_engine_table(shape, g, e, layout, forced, want):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = _input(shape, layout, dtype=dtype)
        expected = want
        if forced == "triton" and triton_bgn.supports(x) and want != "batchnorm":
            expected = "triton"  # Triton's interpreter on (the test suite): CPU runs the kernels
        with force_engine(forced):
            assert choose_engine(x, g, e) == expected


@pytest.mark.parametrize("shape,g,e,layout,forced,want", CPU_TABLE)
def test_meta_tensors_choose_as_cpu(shape, g, e, layout, forced, want):
    """Meta tensors (shape-only runs) choose by the same table as CPU ones (not CUDA's)."""
    if forced == "triton":
        pytest.skip("meta tensors are no Triton input")
    with force_engine(forced):
        assert choose_engine(_input(shape, layout, "meta"), g, e) == want


# (shape, G, e, forced, engine on CUDA for float32 with Triton, without it / for float64)
CUDA_TABLE = [
    ((8, 64, 7, 7), 16, None, "auto", "triton", "general"),
    ((8, 64, 7, 7), 64, None, "auto", "batchnorm", "batchnorm"),
    ((8, 64, 32, 32), 16, 2, "auto", "triton", "general"),
    ((8, 12, 8, 8), 8, None, "auto", "triton", "general"),
    ((64, 128), 16, None, "auto", "triton", "general"),
    ((8, 64, 7, 7), 16, None, "batchnorm", "channels", "channels"),
    ((8, 64, 32, 32), 256, None, "batchnorm", "bands", "bands"),
    ((8, 64, 7, 7), 16, None, "units", "units", "units"),
    ((8, 64, 7, 7), 16, None, "general", "general", "general"),
    ((8, 64, 7, 7), 16, None, "triton", "triton", "general"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,g,e,forced,with_triton,without", CUDA_TABLE)
def test_cuda_engine_table(shape, g, e, forced, with_triton, without, dtype):
    """CUDA inputs (fake CUDA tensors: no GPU needed) take the first engine of CUDA_ENGINES
    that runs them: never the native engines until a GPU run has verified them."""
    with FakeTensorMode(), force_engine(forced):
        for layout in (None, CL) if len(shape) == 4 else (None,):
            x = _input(shape, layout, "cuda", dtype)
            triton_ok = triton_bgn.supports(x)
            assert triton_ok == (triton_bgn.available() and dtype != torch.float64)
            assert choose_engine(x, g, e) == (with_triton if triton_ok else without)


def test_cuda_engines_order(monkeypatch):
    """CUDA_ENGINES is read in order; "native" is the CPU choice."""
    with FakeTensorMode():
        x = torch.empty(8, 64, 7, 7, device="cuda")
        big = torch.empty(8, 64, 32, 32, device="cuda")
        monkeypatch.setattr(dispatch, "CUDA_ENGINES", ("native",))
        assert choose_engine(x, 16) == "channels" and choose_engine(big, 16) == "units"
        monkeypatch.setattr(dispatch, "CUDA_ENGINES", ("general", "triton"))
        assert choose_engine(big, 16) == "general"


def test_traced_takes_general(monkeypatch):
    """Under torch.compile's tracing "auto" is the general engine on every device; forced
    engines and G = C stay as they are."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_engine(torch.empty(8, 64, 7, 7), 16) == "general"
    assert choose_engine(torch.empty(8, 64, 32, 32), 16, 2) == "general"
    assert choose_engine(torch.empty(8, 64, 7, 7), 64) == "batchnorm"
    with FakeTensorMode():
        assert choose_engine(torch.empty(8, 64, 7, 7, device="cuda", dtype=torch.float64),
                             16) == "general"
    with force_engine("units"):
        assert choose_engine(torch.empty(8, 64, 7, 7), 16) == "units"


def test_traced_by_torch_compile():
    """The choice inside a real torch.compile trace: the general engine's Function."""
    seen = []
    real = dispatch.choose_engine

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    torch._dynamo.reset()
    f = torch.compile(lambda x: BF.batch_group_norm(x, 4, training=True), backend="eager",
                      fullgraph=True)
    orig, dispatch.choose_engine = dispatch.choose_engine, spy
    try:
        f(torch.randn(4, 8, 3, 3))
    finally:
        dispatch.choose_engine = orig
    assert seen == ["general"]


def test_torch_func_takes_composed():
    """torch.func transforms take the composition, whatever is forced (not for G = C)."""
    seen = []

    def f(x, g):
        seen.append(choose_engine(x, g))
        return BF.batch_group_norm(x, g, training=True).sum()

    x = torch.randn(4, 8, 3, 3)
    for forced in ("auto", "units", "general", "triton"):
        with force_engine(forced):
            torch.func.grad(f)(x, 4)
            torch.func.grad(f)(x, 8)
    assert seen == ["composed", "batchnorm"] * 4


# (N, C, S, G, P0, forced, columns layout, statistics per unit)
UNITS_TABLE = [
    (8, 12, 64, 8, 1, "auto", True, True),  # straddling, units of 16
    (8, 12, 64, 8, 2, "auto", False, False),  # GBGN: never columns, group-norm statistics
    (3, 64, 4, 128, 1, "auto", False, True),  # N < COLUMNS_MIN_BATCH; groups of 2
    (8, 64, 49, 16, 1, "auto", False, False),  # long units and groups
    (2, 64, 4, 16, 1, "auto", False, True),  # groups of 16 < SHORT_GROUP
    (64, 128, 1, 16, 1, "auto", True, True),  # 2D
    (8, 64, 49, 16, 1, "units-columns", True, True),
    (2, 64, 4, 16, 1, "units-gnstats", False, False),
    (8, 64, 49, 16, 1, "units-bnstats", False, True),
    (8, 12, 64, 8, 1, "units-bnstats", False, True),
]


@pytest.mark.parametrize("n,c,s,g,p0,forced,columns,unit_stats", UNITS_TABLE)
def test_units_sub_choices(n, c, s, g, p0, forced, columns, unit_stats):
    with force_engine(forced):
        plan = native_plan(n, c, s, g, p0)
        assert (plan.l == 1) == columns == dispatch.use_columns(n, c, s, g, p0)
        assert dispatch.use_unit_statistics(plan) == unit_stats


# (shape, G, layout, dtype, forced, eval pass)
EVAL_TABLE = [
    ((8, 64, 7, 7), 16, None, torch.float32, "auto", "channels"),
    ((8, 64, 7, 7), 128, None, torch.float32, "auto", "units"),  # bands
    ((600, 256, 4, 4), 32, None, torch.float32, "auto", "columns"),  # many short units
    ((600, 256, 4, 4), 32, CL, torch.float32, "auto", "channels"),
    ((600, 256, 4, 4), 32, None, torch.bfloat16, "auto", "channels"),
    ((512, 64, 2, 2), 128, None, torch.float64, "auto", "columns"),
    ((512, 64, 2, 2), 128, CL, torch.float32, "auto", "units"),
    ((64, 128), 32, None, torch.float32, "auto", "channels"),  # 2D: never columns
    ((8, 64, 7, 7), 16, None, torch.float32, "units-columns", "columns"),
    ((600, 256, 4, 4), 32, None, torch.float32, "units-gnstats", "channels"),
]


@pytest.mark.parametrize("shape,g,layout,dtype,forced,want", EVAL_TABLE)
def test_eval_pass_table(shape, g, layout, dtype, forced, want, monkeypatch):
    x = _input(shape, layout, dtype=dtype)
    plan = units_plan(shape[0], shape[1], x[0, 0].numel(), g, 1)
    with force_engine(forced):
        assert choose_eval_pass(x, plan, dtype) == want
        meta = _input(shape, layout, "meta", dtype)
        native_pass = "channels" if plan.l == plan.s else "units"
        assert choose_eval_pass(meta, plan, dtype) == native_pass  # columns: CPU only
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        # traced: never the columns pass (a choice by batch size)
        assert choose_eval_pass(x, plan, dtype) == native_pass


def test_force_engine_restores_and_nests():
    assert dispatch.forced_engine() == "auto" and dispatch.thresholds() == dispatch.Thresholds()
    with force_engine("units-columns"):
        assert dispatch.forced_engine() == "units"
        assert dispatch.thresholds().columns_min_batch == 1
        with force_engine(eval_reduction_devices=()):  # keeps the engine and thresholds
            assert dispatch.forced_engine() == "units"
            assert dispatch.thresholds().columns_min_batch == 1
            assert not dispatch.eval_reduction(torch.device("cpu"))
        with pytest.raises(RuntimeError, match="boom"), force_engine("general"):
            assert dispatch.forced_engine() == "general"
            raise RuntimeError("boom")
        assert dispatch.forced_engine() == "units"
        with force_engine("units"):  # a plain name: the measured thresholds
            assert dispatch.thresholds() == dispatch.Thresholds()
    assert dispatch.forced_engine() == "auto" and dispatch.thresholds() == dispatch.Thresholds()
    assert dispatch.eval_reduction(torch.device("cpu"))


def test_force_engine_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown engine 'cudnn'.*'auto'"):
        with force_engine("cudnn"):
            pass
    with pytest.raises(TypeError, match=r"unknown thresholds \['short_grup'\]"):
        with force_engine("units", short_grup=3):
            pass
    assert dispatch.forced_engine() == "auto"


def test_force_engine_is_process_wide():
    """Another thread sees the forced engine (a process-wide setting, restored on exit)."""
    seen = []
    with force_engine("general"):
        t = threading.Thread(target=lambda: seen.append(dispatch.forced_engine()))
        t.start()
        t.join()
    assert seen == ["general"] and dispatch.forced_engine() == "auto"


@pytest.mark.parametrize("forced,engine", [("units", "units"), ("general", "general"),
                                           ("batchnorm", "channels"), ("auto", "channels")])
def test_forced_engine_runs(forced, engine, monkeypatch):
    """The functional API runs the engine that force_engine selects."""
    calls = []
    from bgnorm import functional

    for name, fn in (("units", "native_grouped_norm"), ("general", "grouped_norm"),
                     ("channels", "channel_groups_norm")):
        real = getattr(functional, fn)
        monkeypatch.setattr(functional, fn,
                            lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    with force_engine(forced):
        BF.batch_group_norm(torch.randn(4, 8, 3, 3), 4, training=True)
    assert calls == [engine]
