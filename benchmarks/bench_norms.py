"""Speed, memory and accuracy of bgnorm's layers against torch's native layers, in one run.

Every ratio compares two layers timed in the same process, interleaved rep by rep, so machine
load affects both alike. Targets (from the project's performance issue) are printed beside the
measured numbers; nothing here asserts them.

Usage::

    python benchmarks/bench_norms.py            # full grid, compile and end-to-end sections
    python benchmarks/bench_norms.py --quick    # small smoke run (CI)
    python benchmarks/bench_norms.py --csv out.csv --threads 2

Rows are appended to ``--csv`` (default benchmarks/results.csv) tagged with machine, torch
version and git commit.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bgnorm
from bgnorm import BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# grid
@dataclass
class Cell:
    name: str
    shape: tuple[int, ...]
    groups: int
    kind: str = "bgn"  # bgn | gbgn | pn | brn | frn | evonorm_s0 | evonorm_b0 | ws
    extra: dict = field(default_factory=dict)


def full_grid() -> list[Cell]:
    """ResNet-50 stage activations (C = 64..2048), spatial sizes scaled so cells take ms here."""
    pg = bgnorm.paper_groups
    cells = [
        Cell("b2 stage1", (2, 256, 56, 56), pg(2)),
        Cell("b4 stage2", (4, 512, 28, 28), pg(4)),
        Cell("b8 stage3", (8, 1024, 14, 14), pg(8)),
        Cell("b16 stage4", (16, 2048, 7, 7), pg(16)),
        Cell("b32 stage1", (32, 256, 14, 14), pg(32)),
        Cell("b128 stem", (128, 64, 16, 16), pg(128)),
        Cell("b128 stage4", (128, 2048, 2, 2), pg(128)),
        Cell("G32 stage2", (16, 512, 14, 14), 32),
        Cell("G32 stage3", (32, 1024, 7, 7), 32),
        Cell("1d fc", (1024, 2048), 256),  # 1024 rows: BN takes a few ms, like the other cells
        Cell("3d video", (8, 64, 8, 28, 28), 16),
        Cell("straddle", (16, 96, 28, 28), 64),
        Cell("gbgn e=4", (32, 256, 14, 14), 32, "gbgn", {"examples_per_group": 4}),
        Cell("pn", (16, 256, 28, 28), 0, "pn"),
        *small_batch_cells((16, 256, 28, 28)),
    ]
    return cells


def small_batch_cells(shape: tuple[int, ...]) -> list[Cell]:
    """The small-batch methods (bgnorm.small_batch, bgnorm.weight_std) on one shape: BRN
    against BatchNorm2d, the normalization-activation layers against BatchNorm2d + ReLU (what
    they replace), StdConv2d against Conv2d (3x3, C -> C)."""
    return [
        Cell("brn", shape, 0, "brn"),
        Cell("frn+tlu", shape, 0, "frn"),
        Cell("evonorm-s0", shape, math.gcd(shape[1], 32), "evonorm_s0"),  # GN's 32 groups
        Cell("evonorm-b0", shape, 0, "evonorm_b0"),
        Cell("ws conv", shape, 0, "ws"),
    ]


def quick_grid() -> list[Cell]:
    return [
        Cell("b4 small", (4, 64, 16, 16), 2),
        Cell("b32 bands", (32, 16, 8, 8), 128),
        Cell("straddle", (8, 12, 8, 8), 8),
        Cell("1d", (64, 128), 16),
        Cell("3d", (4, 16, 4, 8, 8), 4),
        Cell("gbgn", (8, 32, 8, 8), 8, "gbgn", {"examples_per_group": 2}),
        Cell("pn", (8, 32, 8, 8), 0, "pn"),
        *small_batch_cells((8, 32, 8, 8)),
    ]


# --------------------------------------------------------------------------------------------
# layers
_BGN = {2: BatchGroupNorm1d, 3: BatchGroupNorm1d, 4: BatchGroupNorm2d, 5: BatchGroupNorm3d}
_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class ChannelsLastLayerNorm(nn.Module):
    """The closest native layer to PositionalNorm: LayerNorm over C at every position."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.movedim(1, -1)).movedim(-1, 1)


def make_pair(cell: Cell) -> tuple[nn.Module, nn.Module, str]:
    c = cell.shape[1]
    dim = len(cell.shape)
    if cell.kind == "brn":
        return bgnorm.BatchRenorm2d(c), nn.BatchNorm2d(c), "BatchNorm2d"
    if cell.kind in ("frn", "evonorm_s0", "evonorm_b0"):
        ours = {"frn": lambda: bgnorm.FilterResponseNorm2d(c),
                "evonorm_s0": lambda: bgnorm.EvoNorm2dS0(c, groups=cell.groups),
                "evonorm_b0": lambda: bgnorm.EvoNorm2dB0(c)}[cell.kind]()
        return ours, nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()), "BatchNorm2d+ReLU"
    if cell.kind == "ws":
        torch.manual_seed(0)
        native = nn.Conv2d(c, c, 3, padding=1)
        ours = bgnorm.StdConv2d(c, c, 3, padding=1)
        ours.load_state_dict(native.state_dict())
        return ours, native, "Conv2d 3x3"
    if cell.kind == "pn":
        return bgnorm.PositionalNorm(c), ChannelsLastLayerNorm(c), "LayerNorm(C) channels-last"
    if cell.kind == "gbgn":
        ours = bgnorm.GeneralBatchGroupNorm2d(c, cell.groups, cell.extra["examples_per_group"])
        return ours, nn.BatchNorm2d(c), "BatchNorm2d"
    return _BGN[dim](c, num_groups=cell.groups), _BN[dim](c), _BN[dim].__name__


def _init(m: nn.Module, c: int) -> None:
    if isinstance(m, nn.Sequential):  # BatchNorm2d + ReLU
        m = m[0]
    if isinstance(m, nn.Conv2d):
        return  # the Weight Standardization cell: the conv's own initialisation
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if p is None and hasattr(m, "ln"):
                p = getattr(m.ln, name)
            if p is not None:
                lo, hi = (0.5, 1.5) if name == "weight" else (-1.0, 1.0)
                p.copy_(torch.linspace(lo, hi, c))


# --------------------------------------------------------------------------------------------
# measurement
def interleaved(
    fns: list[Callable[[], object]], reps: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Time fns alternately rep by rep, in reversed order on odd reps (ABBA: a fn that gains
    from running after another gains as often as it loses). Returns each fn's median seconds and
    the median over reps of each fn's time divided by the first fn's time in the same rep: on a
    machine whose speed drifts by tens of percent within a second, a ratio of neighbours in
    time is far steadier than a ratio of two medians. Balanced for two fns, as used here; with
    three or more the middle ones never run first or last (measured ~5% apart on this VM), so
    compare more variants in a random order per rep instead."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps):
        order = range(len(fns)) if rep % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    ratios = [statistics.median(a / b for a, b in zip(t, times[0])) for t in times]
    return [statistics.median(t) for t in times], ratios


def fwd_bwd(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    xr = x.clone().requires_grad_()

    def run() -> None:
        m.zero_grad(set_to_none=True)
        xr.grad = None
        m(xr).backward(dy)

    return run


def eval_fwd(m: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            m(x)

    return run


def saved_bytes(m: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one training forward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except RuntimeError:  # e.g. wrapper subclasses
            seen[id(t)] = t.numel() * t.element_size()
        return t

    xr = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(xr)
    # the input itself is owned by the caller; count only what the layer adds
    seen.pop(xr.untyped_storage().data_ptr(), None)
    del y
    return sum(seen.values()) + x.numel() * x.element_size()


def reference_f64(cell: Cell, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 output from the equations, with the layer's gamma/beta."""
    xd = x.double()
    n, c = xd.shape[:2]
    small = _small_batch_reference(cell, m, xd)
    if small is not None:
        return small
    if cell.kind == "pn":
        mean = xd.mean(1, keepdim=True)
        var = ((xd - mean) ** 2).mean(1, keepdim=True)
        y = (xd - mean) / torch.sqrt(var + 1e-5)
    else:
        e = cell.extra.get("examples_per_group", n)
        v = xd.reshape(n // e, e, cell.groups, -1)
        mean = v.mean(dim=(1, 3), keepdim=True)
        var = ((v - mean) ** 2).mean(dim=(1, 3), keepdim=True)
        y = ((v - mean) / torch.sqrt(var + 1e-5)).reshape(xd.shape)
    shape = (1, c) + (1,) * (xd.dim() - 2)
    return y * m.weight.double().view(shape) + m.bias.double().view(shape)


def _small_batch_reference(cell: Cell, m: nn.Module, xd: torch.Tensor) -> torch.Tensor | None:
    """float64 training output of the small-batch cells from their papers' equations (None:
    another kind); BRN reads the layer's running statistics, so call it before the layer."""
    def vec(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().view(1, -1, 1, 1)

    def std(t: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
        return torch.sqrt(t.var(dim=dims, correction=0, keepdim=True) + eps)

    if cell.kind == "ws":
        w = m.weight.detach().double().flatten(1)
        w = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, correction=0, keepdim=True)
                                                       + m.eps)
        return F.conv2d(xd, w.view_as(m.weight), m.bias.detach().double(), padding=1)
    if cell.kind == "brn":
        mean = xd.mean(dim=(0, 2, 3), keepdim=True)
        batch_std = std(xd, (0, 2, 3), m.eps)
        running_std = torch.sqrt(vec(m.running_var) + m.eps)
        r = (batch_std / running_std).clamp(1 / m.r_max, m.r_max)
        d = ((mean - vec(m.running_mean)) / running_std).clamp(-m.d_max, m.d_max)
        y = (xd - mean) / batch_std * r + d
    elif cell.kind == "frn":
        y = xd / torch.sqrt(xd.square().mean(dim=(2, 3), keepdim=True) + m.eps)
    elif cell.kind == "evonorm_s0":
        n, c = xd.shape[:2]
        g = xd.reshape(n, m.groups, -1)
        group_std = std(g, (2,), m.eps).expand_as(g).reshape(xd.shape)
        y = xd * torch.sigmoid(vec(m.v) * xd) / group_std
    elif cell.kind == "evonorm_b0":
        right = vec(m.v) * xd + std(xd, (2, 3), m.eps)
        y = xd / torch.max(std(xd, (0, 2, 3), m.eps).expand_as(xd), right)
    else:
        return None
    y = y * vec(m.weight) + vec(m.bias)
    return torch.max(y, vec(m.tau).expand_as(y)) if cell.kind == "frn" else y


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = (out.double() - ref).abs().max().item()
    return err, err / max(ref.abs().max().item(), 1e-30)


def bn_error(x: torch.Tensor, bn: nn.Module) -> float:
    """Native BatchNorm's own max error against its float64 self, for scale."""
    bn64 = type(bn)(bn.num_features)
    bn64.load_state_dict(bn.state_dict())
    bn64 = bn64.double().train()
    return (bn.train()(x).double() - bn64(x.double())).abs().max().item()


# --------------------------------------------------------------------------------------------
def bench_cell(cell: Cell, reps: int, offset: float = 0.0) -> dict:
    torch.manual_seed(0)
    x = torch.randn(cell.shape) + offset
    dy = torch.randn(cell.shape)
    ours, native, native_name = make_pair(cell)
    c = cell.shape[1]
    _init(ours, c)
    _init(native, c)
    ours.train()
    native.train()
    (t_nat, t_ours), (_, train_ratio) = interleaved(
        [fwd_bwd(native, x, dy), fwd_bwd(ours, x, dy)], reps)
    ours.eval()
    native.eval()
    # an eval pass is a few times shorter than a training step: more reps for the same noise
    (e_nat, e_ours), (_, eval_ratio) = interleaved(
        [eval_fwd(native, x), eval_fwd(ours, x)], 4 * reps)
    ours.train()
    native.train()
    mem_ours, mem_nat = saved_bytes(ours, x), saved_bytes(native, x)
    with torch.no_grad():
        ref = reference_f64(cell, ours, x)  # first: BRN's reference reads its running stats
        abs_err, rel_err = errors(ours(x), ref)
        xo = torch.randn(cell.shape) + 1e4
        ref = reference_f64(cell, ours, xo)
        off_err, _ = errors(ours(xo), ref)
        with_bn = isinstance(native, nn.modules.batchnorm._BatchNorm)
        bn_off = bn_error(xo, native) if with_bn else float("nan")
    return {
        "cell": cell.name, "kind": cell.kind, "shape": "x".join(map(str, cell.shape)),
        "G": cell.groups, "layout": _layout(cell), "native": native_name,
        "train_ms": t_ours * 1e3, "native_train_ms": t_nat * 1e3, "train_ratio": train_ratio,
        "eval_ms": e_ours * 1e3, "native_eval_ms": e_nat * 1e3, "eval_ratio": eval_ratio,
        "saved_MB": mem_ours / 2**20, "native_saved_MB": mem_nat / 2**20,
        "saved_ratio": mem_ours / mem_nat, "max_abs_err": abs_err, "max_rel_err": rel_err,
        "offset1e4_abs_err": off_err, "native_bn_offset1e4_abs_err": bn_off,
    }


def _layout(cell: Cell) -> str:
    if cell.kind == "evonorm_s0":
        return f"{cell.shape[1] // cell.groups} ch/group"
    if cell.kind != "bgn":
        return cell.kind
    c = cell.shape[1]
    g = cell.groups
    if g == c:
        return "BN (G=C)"
    if c % g == 0:
        return f"{c // g} ch/group"
    if g % c == 0:
        return f"{g // c} bands/ch"
    return "straddling"


def bench_compile(cell: Cell, reps: int) -> dict:
    """torch.compile'd BGN fwd+bwd vs eager native BN; compile time reported separately."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(cell.shape)
    dy = torch.randn(cell.shape)
    ours, native, _ = make_pair(cell)
    compiled = torch.compile(ours, fullgraph=True)
    t0 = time.perf_counter()
    fwd_bwd(compiled, x, dy)()
    compile_s = time.perf_counter() - t0
    (t_nat, t_c), (_, ratio) = interleaved(
        [fwd_bwd(native, x, dy), fwd_bwd(compiled, x, dy)], reps)
    # a new batch size must not trigger a recompile for each size
    n2 = x.shape[0] * 2
    x2 = torch.randn((n2,) + tuple(x.shape[1:]))
    fwd_bwd(compiled, x2, torch.randn_like(x2))()
    x3 = torch.randn((n2 * 2,) + tuple(x.shape[1:]))
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fwd_bwd(compiled, x3, torch.randn_like(x3))()
    frames_after = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return {"cell": cell.name, "compiled_ms": t_c * 1e3, "native_ms": t_nat * 1e3,
            "ratio": ratio, "compile_s": compile_s,
            "recompiled_on_3rd_size": frames_after > frames_before}


def bench_end_to_end(batch: int, size: int, reps: int) -> dict:
    """Images/s of one ResNet-18 training step, BatchNorm2d vs every norm converted to BGN."""
    from bgnorm.repro.models import resnet18

    torch.manual_seed(0)
    bn_model = resnet18(num_classes=10)
    g = bgnorm.paper_groups(batch)
    torch.manual_seed(0)  # same initial weights
    bgn_model = bgnorm.convert_norm(resnet18(num_classes=10), "bgn", num_groups=g)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return run

    opt_bn = torch.optim.SGD(bn_model.parameters(), lr=0.01, momentum=0.9)
    opt_bgn = torch.optim.SGD(bgn_model.parameters(), lr=0.01, momentum=0.9)
    (t_bn, t_bgn), (_, time_ratio) = interleaved(
        [step(bn_model, opt_bn), step(bgn_model, opt_bgn)], reps, 1)
    return {"model": "resnet18", "batch": batch, "size": size, "G": g,
            "bn_img_s": batch / t_bn, "bgn_img_s": batch / t_bgn, "ratio": 1.0 / time_ratio}


# --------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()}cpu {platform.node()}"


def _print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    header = " | ".join(h for h, _, _ in cols)
    print("| " + header + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(format(r[k], f) if f else str(r[k]) for _, k, f in cols) + " |")


def append_csv(path: Path, section: str, rows: list[dict], tags: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["timestamp", "machine", "torch", "commit", "threads", "section", "cell",
                        "metric", "value"])
        for r in rows:
            key = r.get("cell", r.get("model", ""))
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    w.writerow([tags["timestamp"], tags["machine"], tags["torch"], tags["commit"],
                                tags["threads"], section, key, k, f"{v:.6g}"])


def pin_allocator() -> str:
    """Turn off glibc's heap trimming and dynamic mmap threshold (mallopt) for this process.

    With glibc's defaults, whether a fresh multi-MB tensor comes from memory the process
    already has or from new pages (hundreds of page faults, as costly as a pass over the data)
    depends on the allocation history: either layer's time then jumps by up to 3x from rep to
    rep. Pinning the allocator (what torch's CPU launcher does by preloading jemalloc or
    tcmalloc) measures the kernels. Returns a note for the report.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return "default allocator (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
    return "glibc malloc pinned (no trim, 32 MiB mmap threshold)" if ok else "mallopt failed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--csv", type=Path, default=HERE / "results.csv")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's heap trimming (see pin_allocator)")
    args = ap.parse_args(argv)
    malloc = "default allocator" if args.default_malloc else pin_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 25)
    tags = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{_machine()}; {malloc}", "torch": torch.__version__, "commit": _commit(),
            "threads": torch.get_num_threads()}
    print(f"# bgnorm benchmark  torch {tags['torch']}  commit {tags['commit']}  "
          f"{tags['machine']}  threads {tags['threads']}")
    grid = quick_grid() if args.quick else full_grid()
    rows = []
    for cell in grid:
        rows.append(bench_cell(cell, reps))
        print(f"  {cell.name}: train {rows[-1]['train_ratio']:.2f}x", file=sys.stderr, flush=True)
    print("\n## Training forward+backward and eval forward vs the native layer (ratios < 1: "
          "faster)\n")
    _print_table(rows, [
        ("cell", "cell", ""), ("shape", "shape", ""), ("G", "G", ""), ("layout", "layout", ""),
        ("native", "native", ""), ("train ms", "train_ms", ".2f"),
        ("native ms", "native_train_ms", ".2f"), ("train x", "train_ratio", ".2f"),
        ("eval x", "eval_ratio", ".2f"), ("saved MB", "saved_MB", ".1f"),
        ("native MB", "native_saved_MB", ".1f"), ("max abs err", "max_abs_err", ".1e"),
        ("max rel err", "max_rel_err", ".1e"), ("1e4+N(0,1) err", "offset1e4_abs_err", ".1e"),
        ("BN's 1e4 err", "native_bn_offset1e4_abs_err", ".1e"),
    ])
    bgn_rows = [r for r in rows if r["kind"] == "bgn"]
    ratios = [r["train_ratio"] for r in bgn_rows]
    eval_ratios = [r["eval_ratio"] for r in bgn_rows]
    print(f"\nBGN train fwd+bwd: median {statistics.median(ratios):.2f}x (target <= 1.0), "
          f"worst {max(ratios):.2f}x (target <= 1.15)")
    print(f"BGN eval fwd: median {statistics.median(eval_ratios):.2f}x, worst "
          f"{max(eval_ratios):.2f}x (target <= 1.0)")
    print(f"BGN saved bytes: worst {max(r['saved_ratio'] for r in bgn_rows):.2f}x native "
          "(target <= 1.0)")
    for r in rows:
        if r["kind"] in ("brn", "frn", "evonorm_s0", "evonorm_b0", "ws"):
            print(f"{r['cell']}: train {r['train_ratio']:.2f}x, eval {r['eval_ratio']:.2f}x, "
                  f"saved {r['saved_ratio']:.2f}x {r['native']} (no target)")
    append_csv(args.csv, "layers", rows, tags)

    if not args.no_compile:
        cells = grid[:1] if args.quick else [c for c in grid if c.kind == "bgn"][:6]
        crow = [bench_compile(c, reps) for c in cells]
        print("\n## torch.compile(fullgraph=True) BGN fwd+bwd vs eager native BN (target <= 0.6x)"
              "\n")
        _print_table(crow, [("cell", "cell", ""), ("compiled ms", "compiled_ms", ".2f"),
                            ("native ms", "native_ms", ".2f"), ("ratio", "ratio", ".2f"),
                            ("compile s", "compile_s", ".1f"),
                            ("recompile at 3rd size", "recompiled_on_3rd_size", "")])
        append_csv(args.csv, "compile", crow, tags)

    if not args.no_e2e:
        e2e = [bench_end_to_end(8, 32, 2)] if args.quick else [
            bench_end_to_end(16, 64, 20), bench_end_to_end(32, 64, 12)]
        print("\n## End to end: ResNet-18 training step, BGN vs BatchNorm2d (target >= 0.97x)\n")
        _print_table(e2e, [("batch", "batch", ""), ("size", "size", ""), ("G", "G", ""),
                           ("BN img/s", "bn_img_s", ".1f"), ("BGN img/s", "bgn_img_s", ".1f"),
                           ("BGN/BN", "ratio", ".3f")])
        append_csv(args.csv, "end_to_end", e2e, tags)
    print(f"\nrows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
