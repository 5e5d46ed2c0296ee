"""Inference speed of a ResNet-18 with its norms folded into the convs (bgnorm.fuse_conv_norm)
against the same model unfolded, with BatchNorm and with BatchGroupNorm (groups of whole
channels, which fold exactly).

Folded and unfolded models are timed in the same process, interleaved rep by rep (see
bench_norms.interleaved), eval mode under torch.no_grad; the ratio is the median over reps of
folded / unfolded time in the same rep. The folded model's output is checked against the
unfolded one before timing.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_fuse.py            # batch 16 at 32x32
    OMP_NUM_THREADS=2 python benchmarks/bench_fuse.py --reps 300 --size 64
    python benchmarks/bench_fuse.py --csv benchmarks/results.csv  # also append CSV rows
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import bgnorm
from bgnorm.repro.models import resnet18

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_norms import (  # noqa: E402
    _commit,
    _machine,
    _print_table,
    append_csv,
    eval_fwd,
    interleaved,
)

NORMS = {
    "BN": nn.BatchNorm2d,
    "BGN G=32": lambda c: bgnorm.BatchGroupNorm2d(c, 32),
    "BGN G=C/4": lambda c: bgnorm.BatchGroupNorm2d(c, c // 4),
}


def trained_like(norm, batch: int, size: int) -> nn.Module:
    """resnet18 with running statistics away from their initial values, in eval mode."""
    torch.manual_seed(0)
    model = resnet18(num_classes=10, norm_layer=norm)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(batch, 3, size, size))
    return model.eval()


def bench(name: str, batch: int, size: int, reps: int) -> dict:
    model = trained_like(NORMS[name], batch, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every norm must fold
        report = bgnorm.fuse_conv_norm(model)
    folded = report.model
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        want, got = model(x), folded(x)
    err = (got - want).abs().max().item() / want.abs().max().item()
    (t_unfolded, t_folded), (_, ratio) = interleaved(
        [eval_fwd(model, x), eval_fwd(folded, x)], reps
    )
    return {"model": f"resnet18 {name}", "folded_norms": len(report.folded),
            "unfolded_ms": t_unfolded * 1e3, "folded_ms": t_folded * 1e3,
            "folded_over_unfolded": ratio, "max_rel_err": err}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s), batch {args.batch} at "
          f"{args.size}x{args.size}, {args.reps} interleaved reps, eval, no_grad")
    rows = [bench(name, args.batch, args.size, args.reps) for name in NORMS]
    _print_table(rows, [("model", "model", ""), ("folded norms", "folded_norms", ""),
                        ("unfolded ms", "unfolded_ms", ".2f"), ("folded ms", "folded_ms", ".2f"),
                        ("folded / unfolded", "folded_over_unfolded", ".2f"),
                        ("max rel err", "max_rel_err", ".1e")])
    if args.csv is not None:
        tags = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": _machine(), "torch": torch.__version__, "commit": _commit(),
                "threads": threads}
        for r in rows:
            r["cell"] = f"{r['model']} b{args.batch} {args.size}px"
        append_csv(args.csv, "fuse", rows, tags)
        print(f"rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
