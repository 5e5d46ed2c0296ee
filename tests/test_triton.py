"""The Triton engine (bgnorm.ops.triton_bgn) against the float64 references.

On CPU every kernel runs under Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when a
kernel is *defined* (``@triton.jit`` at import of bgnorm.ops.triton_kernels), so this module
sets it before anything imports the kernels, and the ``kernels`` fixture re-imports them
under the interpreter if some earlier import defined them compiled. With
``BGNORM_TEST_DEVICE=cuda`` the same tests run the compiled kernels on the GPU. Shapes are tiny:
the interpreter runs each program as numpy calls. The "tiny" tiling makes every loop of the
kernels run several times (segments, blocks per segment, merge steps) on these shapes.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from conftest import TEST_DEVICE
from reference import gbgn_ref, set_engine

if TEST_DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from bgnorm import functional as BF  # noqa: E402
from bgnorm.ops import triton_bgn  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_bgn.available(), reason="triton is not installed")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernel module, interpreted on CPU (re-imported if it was defined compiled)."""
    if TEST_DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("BGNORM_TEST_DEVICE=cuda but no CUDA device")
        return triton_bgn._kernels()
    if not triton_bgn._interpreted():
        importlib.reload(triton_bgn._kernels())
        triton_bgn._INTERPRETER.clear()
    assert triton_bgn._interpreted()
    return triton_bgn._kernels()


TINY = {"TILE": 8, "TARGET_PROGRAMS": 8, "MERGE_BLOCK": 4, "CL_CHANNELS": 4}


@pytest.fixture(params=["default", "tiny"])
def tiling(request, monkeypatch):
    if request.param == "tiny":
        for name, value in TINY.items():
            monkeypatch.setattr(triton_bgn, name, value)
    return request.param


# (shape, G, examples per group or None): whole channels, one group, bands, straddling groups
# (units of 2 and of 1 element), 3D bands, 5D, 2D, and GBGN
LAYOUTS = [
    ((2, 8, 4, 4), 4, None),
    ((2, 8, 4, 4), 1, None),
    ((2, 4, 4, 4), 8, None),
    ((2, 6, 2, 2), 4, None),
    ((3, 3, 2, 2), 4, None),
    ((2, 6, 5), 10, None),
    ((2, 4, 2, 2, 3), 2, None),
    ((4, 6), 3, None),
    ((4, 8, 3, 3), 2, 2),
]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-G{g}" + (f"-e{e}" if e else "") for s, g, e in LAYOUTS]


def _formats(dim: int) -> list[str]:
    return ["contiguous", "channels_last", "strided"] if dim in (4, 5) else ["contiguous"]


CASES = [(lay, fmt) for lay in LAYOUTS for fmt in _formats(len(lay[0]))]
CASE_IDS = [f"{i}-{fmt}" for (lay, fmt), i in
            zip(CASES, [LAYOUT_IDS[LAYOUTS.index(lay)] for lay, _ in CASES])]


def _layout(x: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "channels_last":
        cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=cl)
    if fmt == "strided":  # neither layout: every other element of a wider tensor
        return torch.stack([x, x], dim=-1)[..., 0]
    return x


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def _run(shape, g, e, fmt, dtype, affine, device, param_dtype=torch.float32, offset=0.0):
    """Triton forward+backward and the float64 reference on the same values: a dict of
    (got, want) pairs for y, mean, var, dx, dw, db."""
    n, c = shape[:2]
    e = n if e is None else e
    x0 = (torch.randn(shape, device=device) * 3 + 1 + offset).to(dtype)
    x = _layout(x0, fmt).requires_grad_()
    w = b = None
    if affine:
        w = (torch.rand(c, device=device) + 0.5).to(param_dtype).requires_grad_()
        b = torch.randn(c, device=device).to(param_dtype).requires_grad_()
    y, mean, var = triton_bgn.triton_grouped_norm(x, g, n // e, w, b, 1e-5)
    dy = torch.randn(shape, device=device).to(dtype)
    ins = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, ins, dy)
    x64 = x0.double().requires_grad_()
    w64, b64 = ((None if t is None else t.detach().double().requires_grad_()) for t in (w, b))
    yr, mr, vr = gbgn_ref(x64, g, e, w64, b64)
    refs = torch.autograd.grad(yr, [t for t in (x64, w64, b64) if t is not None], dy.double())
    out = {"y": (y, yr), "mean": (mean, mr.reshape(-1)), "var": (var, vr.reshape(-1))}
    out.update(zip(("dx", "dw", "db"), zip(grads, refs)))
    # layout, dtype and no unwritten elements
    assert y.dtype == dtype and grads[0].dtype == dtype
    assert mean.dtype == var.dtype == torch.float32
    if fmt == "channels_last":
        cl = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=cl) and grads[0].is_contiguous(memory_format=cl)
    if affine:
        assert grads[1].dtype == grads[2].dtype == param_dtype
    return out


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_matches_reference(case, affine, tiling, device):
    (shape, g, e), fmt = case
    for name, (got, want) in _run(shape, g, e, fmt, torch.float32, affine, device).items():
        assert torch.isfinite(got).all(), name
        assert _rel(got, want) < 1e-5, f"{name}: {_rel(got, want):.1e}"


HALF_LAYOUTS = [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3], LAYOUTS[8]]


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layout", HALF_LAYOUTS, ids=[LAYOUT_IDS[LAYOUTS.index(lay)]
                                                      for lay in HALF_LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision(dtype, layout, fmt, device):
    """Half inputs: float32 statistics (to float32 round-off of the half values) and outputs
    rounded once to the input dtype (the interpreter may truncate: 2 eps)."""
    shape, g, e = layout
    param_dtype = torch.bfloat16 if fmt == "channels_last" else torch.float32
    res = _run(shape, g, e, fmt, dtype, True, device, param_dtype)
    tol = 2 * torch.finfo(dtype).eps
    for name, (got, want) in res.items():
        bound = 1e-5 if name in ("mean", "var") else tol
        if name in ("dw", "db"):
            bound = 2 * torch.finfo(param_dtype).eps if param_dtype != torch.float32 else 1e-5
        assert _rel(got, want) < bound, f"{name}: {_rel(got, want):.1e}"


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("g", [3, 12, 24, 4])  # whole channels, bands, bands of 8, straddling
def test_large_offset_float32(g, fmt, device):
    """1e4 + N(0, 1) with +20 outliers: E[x^2] - E[x]^2 would lose every digit; the split
    Chan merges and the mean-centred backward sums stay at float32 round-off. The mean is a
    float32 near 1e4 (ulp ~1e-3): every engine's dgamma carries (mean - mu) * sum(dy) * rstd,
    about 1e-4 of the largest dgamma here; dx and dbeta stay below 1e-4."""
    x32 = 1e4 + torch.randn(4, 6, 4, 4, device=device)
    x32.view(4, 6, 16)[:, :, ::3] += 20.0
    w = (torch.rand(6, device=device) + 0.5).requires_grad_()
    b = torch.randn(6, device=device).requires_grad_()
    x = _layout(x32.clone(), fmt).requires_grad_()
    y, mean, var = triton_bgn.triton_grouped_norm(x, g, 1, w, b, 1e-5)
    x64 = x32.double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    yr, mr, vr = gbgn_ref(x64, g, 4, w64, b64)
    assert (y.double() - yr).abs().max() < 4 * torch.finfo(torch.float32).eps * 1e4
    assert _rel(var, vr.reshape(-1)) < 1e-4
    dy = torch.randn_like(yr)
    got = torch.autograd.grad(y, (x, w, b), dy.float())
    want = torch.autograd.grad(yr, (x64, w64, b64), dy)
    for name, a, r, bound in zip(("dx", "dw", "db"), got, want, (1e-4, 3e-4, 1e-4)):
        assert _rel(a, r) < bound, f"{name}: {_rel(a, r):.1e}"


@pytest.mark.parametrize("needed", ["x", "w", "b", "wb"])
def test_only_requested_gradients(needed, device):
    """Each subset of (x, weight, bias) gets exactly its gradients, equal to the full ones."""
    x0 = torch.randn(2, 8, 3, 3, device=device)
    w0, b0 = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    x, w, b = (t.clone().requires_grad_(k in needed) for t, k in zip((x0, w0, b0), "xwb"))
    y, _, _ = triton_bgn.triton_grouped_norm(x, 2, 1, w, b, 1e-5)
    dy = torch.randn_like(y)
    ins = [t for t in (x, w, b) if t.requires_grad]
    got = torch.autograd.grad(y, ins, dy)
    full = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    yf, _, _ = triton_bgn.triton_grouped_norm(full[0], 2, 1, full[1], full[2], 1e-5)
    want = dict(zip("xwb", torch.autograd.grad(yf, full, dy)))
    for k, a in zip([k for k in "xwb" if k in needed], got):
        torch.testing.assert_close(a, want[k])


@pytest.mark.parametrize("e", [None, 2])
@pytest.mark.parametrize("g", [2, 24, 6])
def test_functional_engine_running_stats(g, e, device, monkeypatch, request):
    """force_engine("triton") runs the kernels from the functional API and updates the running
    statistics exactly like the other engines (unbiased, averaged over batch groups)."""
    calls = []
    real = triton_bgn.triton_grouped_norm
    monkeypatch.setattr(triton_bgn, "triton_grouped_norm", lambda *a: calls.append(1) or real(*a))
    set_engine(request, "triton")
    x = torch.randn(4, 8, 3, 3, device=device, dtype=torch.float32) * 2 + 1
    w, b = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    rm, rv = torch.zeros(g, device=device), torch.ones(g, device=device)
    if e is None:
        y = BF.batch_group_norm(x, g, rm, rv, w, b, training=True, momentum=0.3)
        yr, mr, vr = gbgn_ref(x.double(), g, 4, w.double(), b.double())
    else:
        y = BF.general_batch_group_norm(x, g, e, rm, rv, w, b, training=True, momentum=0.3)
        yr, mr, vr = gbgn_ref(x.double(), g, e, w.double(), b.double())
    assert calls == [1]
    assert _rel(y, yr) < 1e-5
    count = (e or 4) * 8 * 9 // g
    torch.testing.assert_close(rm.double(), 0.3 * mr.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.7 + 0.3 * vr.mean(0) * count / (count - 1),
                               rtol=1e-5, atol=1e-6)


def test_functional_engine_falls_back_for_float64(monkeypatch, request):
    """float64 is not a Triton dtype: force_engine("triton") takes the other engines there."""
    set_engine(request, "triton")
    monkeypatch.setattr(triton_bgn, "triton_grouped_norm", None)  # would raise if called
    assert not triton_bgn.supports(torch.zeros(2, 4, dtype=torch.float64))
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    y = BF.batch_group_norm(x, 2, training=True)
    torch.testing.assert_close(y, gbgn_ref(x, 2, 4)[0])


def test_double_backward(device):
    """create_graph=True differentiates a recomputation: second derivatives match float64."""
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    w = (torch.rand(4, device=device) + 0.5).requires_grad_()
    y, _, _ = triton_bgn.triton_grouped_norm(x, 2, 1, w, None, 1e-5)
    (dx,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
    (ddw,) = torch.autograd.grad(dx.pow(2).sum(), w)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = gbgn_ref(x64, 2, 2, w64)[0]
    (dxr,) = torch.autograd.grad((yr * y.detach().double().sin()).sum(), x64, create_graph=True)
    (ddwr,) = torch.autograd.grad(dxr.pow(2).sum(), w64)
    assert _rel(ddw, ddwr) < 1e-4


def test_fake_tensor_shapes_and_layout():
    """The fake implementations give the real outputs' shapes, dtypes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        y, mean, var, rstd = torch.ops.bgnorm.bgn_triton_fwd(x, None, None, 4, 2, 1e-5)
        dx, dw, db = torch.ops.bgnorm.bgn_triton_bwd(y, x, None, mean, rstd, 4, 2, True)
        dx0, _, _ = torch.ops.bgnorm.bgn_triton_bwd(y, x, None, mean, rstd, 4, 2, False)
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == torch.bfloat16
    assert mean.shape == var.shape == rstd.shape == (8,) and mean.dtype == torch.float32
    assert dx.stride() == x.stride() and dw.shape == db.shape == (8,) and dx0.numel() == 0


def test_opcheck(device):
    """torch.library.opcheck: schema, fake/meta, autograd registration, AOT dispatch."""
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    w = (torch.rand(8, device=device) + 0.5).requires_grad_()
    b = torch.randn(8, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.bgnorm.bgn_triton_fwd.default, (x, w, b, 4, 1, 1e-5))
    x2 = x.detach().to(memory_format=torch.channels_last)
    y, mean, var, rstd = torch.ops.bgnorm.bgn_triton_fwd(x2, w.detach(), None, 4, 1, 1e-5)
    torch.library.opcheck(torch.ops.bgnorm.bgn_triton_bwd.default,
                          (torch.randn_like(y), x2, w.detach(), mean, rstd, 4, 1, True))


def test_compile_fullgraph_one_op(device, request):
    """torch.compile(fullgraph=True) of BGN with force_engine("triton"): one custom op each way,
    the same values as eager, running statistics updated in the graph."""
    set_engine(request, "triton")
    x = torch.randn(4, 8, 3, 3, device=device).to(memory_format=torch.channels_last)
    w = (torch.rand(8, device=device) + 0.5).requires_grad_()
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm2, rv2 = rm.clone(), rv.clone()

    def f(x, w, rm, rv):
        return BF.batch_group_norm(x, 4, rm, rv, w, None, training=True, momentum=0.2)

    graphs = []

    def counting(gm, example_inputs):  # dynamo's graph: the op appears once, no graph break
        graphs.append(gm)
        return gm.forward

    assert triton_bgn.supports(x)  # the first (eager) check, before tracing
    ye = f(x, w, rm, rv)
    xc = x.clone().requires_grad_()
    yc = torch.compile(f, fullgraph=True, backend=counting)(xc, w, rm2, rv2)
    ops = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert ops.count("bgnorm.bgn_triton_fwd") == 1, ops
    torch.testing.assert_close(yc, ye)
    yc.sum().backward()
    assert xc.grad is not None and torch.isfinite(xc.grad).all()
    torch.testing.assert_close(rm2, rm)
    torch.testing.assert_close(rv2, rv)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_eager_path_equals_custom_op(fmt, device):
    """Eager calls run the kernels without the custom-op dispatch (triton_bgn._Eager); the
    ops (what torch.compile sees) give the same values bit for bit, with and without dx."""
    x0 = _layout(torch.randn(4, 8, 3, 3, device=device) * 2 + 1, fmt)
    w, b = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    ys, grads = [], []
    for eager in (True, False):
        x, wr, br = (t.clone().requires_grad_() for t in (x0, w, b))
        if eager:
            y, mean, var = triton_bgn.triton_grouped_norm(x, 6, 2, wr, br, 1e-5)
        else:
            y, mean, var, _ = torch.ops.bgnorm.bgn_triton_fwd(x, wr, br, 6, 2, 1e-5)
        assert type(y.grad_fn).__name__.startswith("_Eager" if eager else "Generated")
        dy = torch.linspace(-1, 1, y.numel(), device=device).view(y.shape)
        ys.append((y, mean, var))
        grads.append(torch.autograd.grad(y, (x, wr, br), dy, retain_graph=True)
                     + torch.autograd.grad(y, (wr, br), dy))  # no dx: the merge kernel alone
    for a, r in zip(ys[0] + grads[0], ys[1] + grads[1]):
        assert torch.equal(a, r)
    assert grads[0][0].is_contiguous(memory_format=_memory_format_of(x0))


def _memory_format_of(x):
    return torch.channels_last if not x.is_contiguous() else torch.contiguous_format


def test_functional_engine_reads_channels_last(device, monkeypatch, request):
    """Through the functional API a channels-last input reaches the kernels as it is (the
    other engines copy it to NCHW and back: two copies each way, most of the GPU time of a
    channels-last layer in the first GPU run); y and dx keep its format."""
    seen = []
    real = triton_bgn.triton_grouped_norm
    monkeypatch.setattr(triton_bgn, "triton_grouped_norm",
                        lambda x, *a: seen.append(x.is_contiguous()) or real(x, *a))
    set_engine(request, "triton")
    x0 = torch.randn(4, 8, 3, 3, device=device) * 2 + 1
    x = x0.to(memory_format=torch.channels_last).requires_grad_()
    w = (torch.rand(8, device=device) + 0.5).requires_grad_()
    y = BF.batch_group_norm(x, 6, None, None, w, None, training=True)
    assert seen == [False]
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, gbgn_ref(x0.double(), 6, 4, w.detach().double())[0]) < 1e-5


def test_direct_launches_reuse_the_jit_compiled_kernel(monkeypatch):
    """On CUDA a kernel's first launch of a key goes through the JIT (which compiles and
    returns the kernel); later ones call that compiled kernel with the constexprs appended in
    the kernel's argument order; an error there hands every later launch back to the JIT."""
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *a: calls.append(("direct", grid, a))

    class Kernel:
        arg_names = ["x", "n", "BJ", "FLAG"]

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("jit", grid, a, kw)) or Compiled()

    class Arg:  # stands for a CUDA tensor
        device = torch.device("cuda")

    monkeypatch.setattr(triton_bgn, "_COMPILED", {})
    monkeypatch.setattr(triton_bgn, "_DIRECT", {"on": True})
    kernel, x = Kernel(), Arg()
    meta = dict(FLAG=True, BJ=8, num_warps=4)
    for n in (3, 3, 4):
        triton_bgn._launch(kernel, 5, (x, n), meta)
    assert calls == [("jit", (5,), (x, 3), meta), ("direct", (5, 1, 1), (x, 3, 8, True)),
                     ("jit", (5,), (x, 4), meta)]  # a new int value: a new key
    Compiled.__getitem__ = lambda self, grid: (lambda *a: 1 / 0)
    calls.clear()
    triton_bgn._launch(kernel, 5, (x, 3), meta)
    triton_bgn._launch(kernel, 5, (x, 4), meta)
    assert [c[0] for c in calls] == ["jit", "jit"] and not triton_bgn._DIRECT["on"]


@pytest.mark.parametrize("buffers", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e", [None, 2])
def test_running_stats_fused_like_update_running(e, buffers, device):
    """BGN's running statistics updated by the merge kernel (GBGN: by update_running after
    it) equal update_running's result from the returned batch statistics."""
    from bgnorm.ops.plan import update_running

    x = torch.randn(4, 8, 3, 3, device=device) * 2 + 1
    p0 = 1 if e is None else 4 // e
    rm = torch.rand(6, device=device).to(buffers)
    rv = (torch.rand(6, device=device) + 0.5).to(buffers)
    rm2, rv2 = rm.clone(), rv.clone()
    _, mean, var = triton_bgn.triton_grouped_norm(x, 6, p0, None, None, 1e-5, (rm, rv, 0.3))
    update_running(rm2, rv2, mean, var, p0, (4 // p0) * 8 * 9 // 6, 0.3)
    tol = dict(rtol=1e-6, atol=1e-6) if buffers == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(rm, rm2, **tol)
    torch.testing.assert_close(rv, rv2, **tol)


def test_fused_running_update_bumps_versions(device):
    """The merge kernel writes the running buffers through their pointers: their version
    counters move as after an in-place op, so autograd can see the change."""
    x = torch.randn(4, 8, 3, 3, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    before = (rm._version, rv._version)
    triton_bgn.triton_grouped_norm(x, 4, 1, None, None, 1e-5, (rm, rv, 0.1))
    assert rm._version > before[0] and rv._version > before[1]
