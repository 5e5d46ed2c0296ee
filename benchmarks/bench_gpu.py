"""BGN on a GPU: the Triton engine against bgnorm's native engines, torch.compile'd BGN, cuDNN
BatchNorm2d and torch GroupNorm, on ResNet-50 stage shapes; and a ResNet-50 training step.

Writes ``gpu_bench.csv`` and ``gpu_bench.md`` to ``--out`` (default ``$OUT`` or a temp dir),
rewriting both after every cell, so a run cut short keeps what it measured. Order: the copy
bandwidth, correctness of every cell's shape at a small batch (Triton vs float64 reference,
outputs poisoned with NaN first), then timings (forward, backward, forward+backward medians
with CUDA events, L2 flushed between reps) by priority, the end-to-end step, and stops before
``--budget`` seconds. ``--dry`` (automatic without CUDA): tiny shapes on CPU under Triton's
interpreter, one rep, so that the script cannot rot (tests/test_bench.py runs it).

Effective bandwidth counts the bytes a pass must move: forward reads x and writes y (2 tensor
sizes), backward reads x and dy and writes dx (3), forward+backward 5; ``bw_frac`` is that over
the measured device-to-device copy bandwidth (bytes read + written).

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

DRY = "--dry" in sys.argv
try:
    import torch as _torch_probe  # noqa: F401
    _CUDA = _torch_probe.cuda.is_available()
except Exception:  # pragma: no cover
    _CUDA = False
if DRY or not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bgnorm  # noqa: E402
from bgnorm import functional as BF  # noqa: E402
from bgnorm.ops import triton_bgn  # noqa: E402
from bgnorm.ops.dispatch import force_engine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import gbgn_ref  # noqa: E402

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # ResNet-50 stage (C, H=W)
DRY_STAGES = [(8, 4), (16, 2)]
FIELDS = ["section", "impl", "dtype", "format", "N", "C", "HW", "G", "fwd_us", "bwd_us",
          "fwdbwd_us", "fwdbwd_vs_bn", "bw_frac_fwdbwd", "gpu_fwdbwd_us", "gpu_vs_bn",
          "max_rel_err", "note"]
#: The BGN training engines timed on every cell (names of bgnorm.ops.dispatch.force_engine;
#: "batchnorm" only where its layouts apply, none at G = C, which is torch's BatchNorm).
ENGINES = ("auto", "triton", "general", "units", "batchnorm")
#: The ResNet-50 training step: BatchNorm2d, then BGN on each engine.
E2E_ENGINES = ("bn", "triton", "general", "units", "batchnorm")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class Timer:
    """Median time (us) of ``fn`` over reps: CUDA events, L2 flushed before every rep."""

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = (torch.empty(64 << 20, dtype=torch.int32, device=device)
                      if device.type == "cuda" else None)

    def __call__(self, fn, gpu_only: bool = False) -> float:
        """``gpu_only``: the device time alone, the host's launches queued behind a ~2 ms
        device sleep (torch.cuda._sleep) so that they are not waited for; the difference to
        the plain time is the host-bound part."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                self.flush.zero_()
                if gpu_only:
                    torch.cuda._sleep(4_000_000)  # cycles: ~2 ms at the H200's ~2 GHz
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, dry: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    numel = (1 << 16) if dry else (1 << 28)  # 1 GiB of float32 on the GPU
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    us = Timer(device, 3 if dry else 20, 1 if dry else 5)(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def make_impls(g: int, c: int, compiled_ok: bool):
    """name -> (function of (x, w, b, rm, rv) returning y, engine to force or None, whether the
    affine parameters take the input's dtype: torch's GroupNorm module in bfloat16 has
    bfloat16 parameters, the BN/BGN layers keep float32 ones under autocast)."""
    def bn(x, w, b, rm, rv):
        return F.batch_norm(x, rm[:c], rv[:c], w, b, True, 0.1, 1e-5)

    def gn(x, w, b, rm, rv):
        return F.group_norm(x, g, w, b, 1e-5)

    def bgn(x, w, b, rm, rv):
        return BF.batch_group_norm(x, g, rm[:g], rv[:g], w, b, True, 0.1, 1e-5)

    def bgn_triton(x, w, b, rm, rv):  # the kernels alone (also at G = C)
        return triton_bgn.triton_grouped_norm(x, g, 1, w, b, 1e-5, (rm[:g], rv[:g], 0.1))[0]

    impls = {"bn": (bn, None, False), "bgn-triton": (bgn_triton, None, False)}
    for engine in ENGINES:
        if engine == "triton" or (g == c and engine != "auto"):
            continue  # G = C: every engine is torch's BatchNorm
        if engine == "batchnorm" and c % g and g % c:
            continue
        impls[f"bgn-{engine}"] = (bgn, engine, False)
    if c % g == 0:
        impls["gn"] = (gn, None, True)
    if compiled_ok:
        impls["bgn-compiled"] = (torch.compile(bgn), "auto", False)
    return impls


def check_cell(device, dtype, fmt, c, hw, g, n_small) -> float:
    """Max relative error (y, dx, dw, db) of the Triton engine vs float64 at a small batch,
    with the caching allocator's next blocks poisoned with NaN (unwritten elements show)."""
    shape = (n_small, c, hw, hw)
    x0 = (torch.randn(shape, device=device) * 2 + 3).to(dtype)
    x = x0.contiguous(memory_format=fmt).requires_grad_()
    w = (torch.rand(c, device=device) + 0.5).requires_grad_()
    b = torch.randn(c, device=device).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    for _ in range(2):  # poison: blocks of these sizes come back NaN-filled
        torch.full_like(x0, float("nan"))
    y, _, _ = triton_bgn.triton_grouped_norm(x, g, 1, w, b, 1e-5)
    got = (y, *torch.autograd.grad(y, (x, w, b), dy))
    x64 = x0.double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    yr = gbgn_ref(x64, g, n_small, w64, b64)[0]
    want = (yr, *torch.autograd.grad(yr, (x64, w64, b64), dy.double()))
    err = 0.0
    for a, r in zip(got, want):
        if not torch.isfinite(a).all():
            return float("nan")
        err = max(err, ((a.double() - r).abs().max() / r.abs().max()).item())
    return err


def time_cell(timer, impl, engine, device, dtype, fmt, n, c, hw, params_like_input=False):
    shape = (n, c, hw, hw)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    pdt = dtype if params_like_input else torch.float32
    w = torch.ones(c, device=device, dtype=pdt, requires_grad=True)
    b = torch.zeros(c, device=device, dtype=pdt, requires_grad=True)
    rm = torch.zeros(max(c, 4 * n), device=device)  # G <= 4 N (paper_groups)
    rv = torch.ones_like(rm)
    dy = torch.randn_like(x)
    out = {}
    with force_engine(engine or "auto"):
        out["fwd"] = timer(lambda: impl(x, w, b, rm, rv))
        y = impl(x, w, b, rm, rv)
        out["bwd"] = timer(lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True))
        out["fwdbwd"] = timer(lambda: torch.autograd.grad(impl(x, w, b, rm, rv), (x, w, b), dy))
        if device.type == "cuda":
            out["gpu_fwdbwd"] = timer(
                lambda: torch.autograd.grad(impl(x, w, b, rm, rv), (x, w, b), dy), gpu_only=True)
    return out


def resnet_step(device, dtype_name, engine, batch, steps, warmup, dry):
    if dry:  # the interpreter is far too slow for ResNet-50: a conv-BN stack
        nn = torch.nn
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    else:
        import torchvision

        model = torchvision.models.resnet50()
    if engine != "bn":
        g = bgnorm.paper_groups(batch)
        model = bgnorm.convert_norm(model, "bgn", num_groups=g)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    res = 8 if dry else 224
    x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (batch,), device=device)
    auto = dict(device_type=device.type, dtype=torch.bfloat16, enabled=dtype_name == "bf16")

    def step():
        with torch.autocast(**auto):
            loss = F.cross_entropy(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with force_engine("auto" if engine == "bn" else engine):
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - t0)


def write(rows, out: Path, header: str) -> None:
    with open(out / "gpu_bench.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in FIELDS})
    lines = [header, "", "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in FIELDS) + " |")
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_"))
    ap.add_argument("--budget", type=float, default=270.0, help="seconds before stopping")
    ap.add_argument("--compile-cells", type=int, default=2, help="cells timed compiled")
    ap.add_argument("--dry", action="store_true", help="tiny CPU run under the interpreter")
    args = ap.parse_args()
    dry = args.dry or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    if dry:  # few interpreted programs per kernel
        triton_bgn.TARGET_PROGRAMS = 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The dry run exists to exercise every section: a slow (loaded) CPU must not make it skip
    # one, so its budget never cuts anything (the caller's timeout still bounds it).
    budget = Budget(math.inf if dry else args.budget)
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if not dry else platform.processor() or "cpu"
    import triton

    header = (f"# BGN GPU benchmark: {gpu}, torch {torch.__version__}, triton "
              f"{triton.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
              + (" (DRY RUN: CPU interpreter, not timings)" if dry else ""))
    rows: list[dict] = []
    copy_bw = copy_bandwidth(device, dry)
    rows.append({"section": "copy", "impl": "d2d copy", "note": f"{copy_bw / 1e9:.0f} GB/s"})
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    write(rows, out, header)

    stages = DRY_STAGES if dry else STAGES
    batches = [2] if dry else [32, 8, 128]
    dtypes = [torch.float32, torch.bfloat16]
    fmts = [("nchw", torch.contiguous_format), ("cl", torch.channels_last)]
    timer = Timer(device, 1 if dry else 15, 1 if dry else 3)

    # correctness first, every cell's shape at a small batch
    errs = {}
    for c, hw in stages:
        for batch in batches:
            g = bgnorm.paper_groups(batch)
            if (c * hw * hw) % g or budget.left() < budget.seconds / 2:
                continue
            for dtype in dtypes:
                for fname, fmt in fmts:
                    key = (c, hw, g, dtype, fname)
                    try:
                        errs[key] = check_cell(device, dtype, fmt, c, hw, g, 2 if dry else 4)
                    except Exception as exc:  # report, keep going
                        traceback.print_exc()
                        errs[key] = float("nan")
                        print(f"check failed {key}: {exc}", flush=True)
    bad = {k: v for k, v in errs.items() if not (v < (2e-2 if k[3] != torch.float32 else 1e-4))}
    print(f"correctness: {len(errs)} cells checked, {len(bad)} above tolerance: {bad}", flush=True)

    compiled_left = args.compile_cells
    e2e_done = False
    for batch in batches:
        g = bgnorm.paper_groups(batch)
        for dtype in dtypes:
            for fname, fmt in fmts:
                for c, hw in stages:
                    if budget.left() < min(30.0, 0.2 * budget.seconds):
                        break
                    if (c * hw * hw) % g:
                        continue
                    # torch.compile (slow to build) only after the batch-32 cells and the e2e step
                    use_compile = compiled_left > 0 and e2e_done and budget.left() > 120 and not dry
                    compiled_left -= use_compile
                    cell = dict(dtype=str(dtype).split(".")[-1], format=fname, N=batch, C=c,
                                HW=hw, G=g)
                    bn_us = None
                    bn_gpu = None
                    for name, (impl, engine, like) in make_impls(g, c, use_compile).items():
                        row = dict(cell, section="layer", impl=name)
                        try:
                            t = time_cell(timer, impl, engine, device, dtype, fmt, batch, c, hw,
                                          like)
                        except Exception as exc:
                            row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                            rows.append(row)
                            print(row, flush=True)
                            continue
                        size = batch * c * hw * hw * torch.tensor([], dtype=dtype).element_size()
                        row.update(fwd_us=t["fwd"], bwd_us=t["bwd"], fwdbwd_us=t["fwdbwd"])
                        row["bw_frac_fwdbwd"] = 5 * size / (t["fwdbwd"] * 1e-6) / copy_bw
                        if name == "bn":
                            bn_us = t["fwdbwd"]
                        if bn_us:
                            row["fwdbwd_vs_bn"] = t["fwdbwd"] / bn_us
                        if "gpu_fwdbwd" in t:
                            row["gpu_fwdbwd_us"] = t["gpu_fwdbwd"]
                            if name == "bn":
                                bn_gpu = t["gpu_fwdbwd"]
                            if bn_gpu:
                                row["gpu_vs_bn"] = t["gpu_fwdbwd"] / bn_gpu
                        if name == "bgn-triton":
                            row["max_rel_err"] = errs.get((c, hw, g, dtype, fname), "")
                            if g == c:
                                row["note"] = "G = C: force_engine('triton') uses BatchNorm here"
                        rows.append(row)
                        print({k: _fmt(v) for k, v in row.items()}, flush=True)
                    write(rows, out, header)
        if not e2e_done and budget.left() > min(60.0, 0.3 * budget.seconds):  # after batch 1
            e2e_done = True
            rbatch = 2 if dry else 32
            for dname in ("fp32", "bf16"):
                for engine in E2E_ENGINES:
                    if budget.left() < min(40.0, 0.1 * budget.seconds):
                        break
                    row = dict(section="resnet50-step", impl=f"{engine}", dtype=dname,
                               format="cl", N=rbatch, G=bgnorm.paper_groups(rbatch))
                    try:
                        ips = resnet_step(device, dname, engine, rbatch, 1 if dry else 10,
                                          1 if dry else 3, dry)
                        row["note"] = f"{ips:.1f} images/s"
                        row["images_per_s"] = ips
                    except Exception as exc:
                        traceback.print_exc()
                        row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                    rows.append(row)
                    print(row, flush=True)
                    write(rows, out, header)
    write(rows, out, header)
    print(f"\nwrote {out / 'gpu_bench.csv'} ({budget.elapsed():.0f} s)\n")
    print((out / "gpu_bench.md").read_text())
    text = summary(rows, header)
    (out / "gpu_summary.md").write_text(text)
    print(text)  # last: the end of the run's output holds the most important rows


def summary(rows: list[dict], header: str) -> str:
    """The compact table printed last: per cell BN's forward+backward time, the fastest BGN
    engine (all BGN rows but torch.compile's) with its ratio to BN, its bandwidth fraction and
    its device-only ratio (host work hidden), the Triton and GroupNorm ratios; the failures;
    the ResNet-50 steps in images/s and as a fraction of BN's."""
    cells: dict[tuple, dict[str, dict]] = {}
    failed: dict[str, int] = {}
    for r in rows:
        if r.get("section") != "layer":
            continue
        if "fwdbwd_us" not in r:
            failed[r["impl"]] = failed.get(r["impl"], 0) + 1
            continue
        key = tuple(r[k] for k in ("dtype", "format", "N", "C", "HW", "G"))
        cells.setdefault(key, {})[r["impl"]] = r
    lines = [header.replace("# ", "## Summary: "), "",
             "| dtype | fmt | N | C | HW | G | BN us | best BGN | x BN | bw | gpu x BN "
             "| triton x BN | gn x BN |", "|" + "---|" * 13]
    for key, impls in cells.items():
        bn = impls.get("bn")
        bgns = {k: v for k, v in impls.items() if k.startswith("bgn-") and k != "bgn-compiled"}
        if bn is None or not bgns:
            continue
        best = min(bgns, key=lambda k: bgns[k]["fwdbwd_us"])
        b = bgns[best]

        def ratio(name, impls=impls, bn=bn):
            return _fmt(impls[name]["fwdbwd_us"] / bn["fwdbwd_us"]) if name in impls else ""

        lines.append("| " + " | ".join(str(v) for v in key) + " | " + " | ".join([
            _fmt(bn["fwdbwd_us"]), best[4:], ratio(best), _fmt(b.get("bw_frac_fwdbwd", "")),
            _fmt(b.get("gpu_vs_bn", "")), ratio("bgn-triton"), ratio("gn")]) + " |")
    if failed:
        lines += ["", "failed layer rows: " + ", ".join(f"{k} x{v}" for k, v in failed.items())]
    e2e = [r for r in rows if r.get("section") == "resnet50-step"]
    for dname in dict.fromkeys(r["dtype"] for r in e2e):
        got = {r["impl"]: r.get("images_per_s") for r in e2e if r["dtype"] == dname}
        base = got.get("bn")
        parts = [f"{k} {v:.0f}" + (f" ({v / base:.2f}x)" if base and k != "bn" else "")
                 if v else f"{k} failed" for k, v in got.items()]
        lines.append(f"\nresnet50 step {dname} images/s: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
