"""The ``bgnorm`` command line.

``bgnorm reproduce --task batch-size --preset quick --out runs/quick``
    Run (or resume) a reproduction sweep and write ``DIR/report.md`` with tables and PNG plots.
``bgnorm report DIR``
    Re-render the report from every results store in ``DIR`` (shards merged).
``bgnorm tasks [--settings]``
    List the tasks and their presets (and each task's options and ``--set`` keys).
``bgnorm docs [NAME]``
    List the guides installed with the package (``bgnorm/docs/*.md``), or print one.
``bgnorm groups --model resnet50 --batch-size 8 [--image-size 224]``
    Per norm layer of one of the suite's models: the G ``num_groups="auto"`` chooses, the
    paper's G and the values per statistic of each (``bgnorm docs choosing-g``).
``torchrun --nproc-per-node=N -m bgnorm.cli reproduce ...``
    The same sweep, each cell trained with DDP over N processes (``bgnorm docs distributed``).

``bgnorm docs reproduction`` prints the guide to the presets, the protocol and running on GPUs
and your data. The help texts are self-contained: they name no file a pip-installed user lacks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n (e.g. 2/4), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise argparse.ArgumentTypeError(f"--shard i/n needs 1 <= i <= n, got {text!r}")
    return i, n


class _UsageError(ValueError):
    """A command line that cannot run: ``main`` prints it as ``bgnorm: ...``, exit status 2."""


def _number(kind: type, minimum: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) >= ``minimum`` (> when ``strict``)."""
    bound = f"{'>' if strict else '>='} {minimum}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} {bound}, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


def _int_list(minimum: int | None = None) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each >= ``minimum``."""

    def parse(text: str) -> list[int]:
        from .repro.presets import parse_int_list

        try:
            values = parse_int_list(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
        low = [v for v in values if minimum is not None and v < minimum]
        if low:
            raise argparse.ArgumentTypeError(
                f"every value must be >= {minimum}, got {', '.join(map(str, low))} in {text!r}")
        return values  # type: ignore[return-value]

    return parse


def _norm_list(text: str) -> list[str]:
    from .registry import canonical_name

    try:
        names = [canonical_name(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError(f"expected at least one norm, got {text!r}")
    return names


#: The presets in a line each (the help's summary; `bgnorm docs reproduction` has the details).
_PRESET_HELP = {
    "smoke": "a check of the pipeline, under a minute on a CPU (bundled 8x8 digits)",
    "quick": "the default: minutes on a laptop CPU (bundled MNIST digits)",
    "full": "every batch size, G and GN group division, 3 seeds: hours on a CPU (bundled)",
    "paper": "the papers' protocol: your data (--data-root) on GPUs (--device cuda)",
}


def _overview() -> str:
    """What the suite runs and writes, for the help texts (no file or URL a pip-installed
    user would lack: the tasks come from the registry, the guides from `bgnorm docs`)."""
    from .repro.tasks import (
        TASKS,
        _load_all,  # noqa: F401
    )

    width = max(map(len, TASKS), default=0)
    lines = ["presets (--preset):"]
    lines += [f"  {name:7s} {text}" for name, text in _PRESET_HELP.items()]
    lines += ["", "tasks (--task NAME, a comma list or all):"]
    lines += [f"  {name:{width}s}  {task.title}" for name, task in TASKS.items()]
    lines += [
        "",
        "output (--out DIR):",
        "  DIR/report.md       the papers' tables and the claims checked (also printed)",
        "  DIR/*.png           plots",
        "  DIR/results*.jsonl  one record per finished cell (one store per shard)",
        "  DIR/cells/          checkpoints of unfinished cells (the same command resumes)",
        "",
        "example:",
        "  bgnorm reproduce --task batch-size,g-sweep,mechanism --preset quick --out runs/quick",
        "",
        "more:",
        "  bgnorm tasks --settings    each task's options and --set keys",
        "  bgnorm docs                the guides installed with bgnorm",
        "  bgnorm docs reproduction   the suite's guide: presets, protocol, data, GPUs",
        "  bgnorm docs cluster        preemption, requeued jobs, exit statuses (SLURM, k8s)",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    overview = _overview()
    parser = argparse.ArgumentParser(
        prog="bgnorm",
        description="Batch Group Normalization for PyTorch: the reproduction suite trains\n"
                    "networks with each normalization, writes the papers' tables and checks\n"
                    "their claims.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=overview,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rp = sub.add_parser(
        "reproduce", help="run or resume a sweep and write the report",
        description="Run (or resume: finished cells are skipped, unfinished ones resume\n"
                    "from their checkpoint) a reproduction sweep and write DIR/report.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=overview,
    )
    rp.add_argument("--task", default="batch-size",
                    help="task name, comma list, or 'all' (see `bgnorm tasks`; default "
                         "batch-size)")
    rp.add_argument("--preset", default="quick",
                    help="smoke, quick (default), full or paper; see below")
    rp.add_argument("--out", required=True, type=Path, help="run directory (results, report)")
    g = rp.add_argument_group("execution")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--jobs", type=_number(int, 1), default=None,
                   help="cells in parallel (default: CPU cores on cpu, 1 on cuda)")
    g.add_argument("--threads", type=_number(int, 1), default=None,
                   help="torch threads per job (default: cores / jobs)")
    g.add_argument("--shard", type=_shard, default=None,
                   help="i/n: run the i-th of n interleaved shares of the cells (any scheduler)")
    g.add_argument("--checkpoint-every", type=_number(float, 0), default=60.0,
                   metavar="SECONDS",
                   help="checkpoint each running cell this often (default 60)")
    g.add_argument("--grace-seconds", type=_number(float, 0), default=20.0,
                   help="after SIGTERM/SIGINT, how long the running cells get to checkpoint "
                   "before the sweep exits with status 75 (default 20)")
    g.add_argument("--lease-seconds", type=_number(float, 1), default=120.0,
                   help="a cell's lock expires this long after its runner's last heartbeat; "
                   "runners on other hosts then take the cell over (default 120)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the cells' checkpoints after they are recorded")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-report", action="store_true", help="do not render the report")
    g.add_argument("--list", action="store_true", help="list the cells and exit")
    d = rp.add_argument_group("distributed (launched by torchrun; `bgnorm docs distributed`)")
    d.add_argument("--distributed", action="store_true",
                   help="train each cell with DDP over the ranks of the torch.distributed "
                        "environment (automatic when launched by torchrun)")
    d.add_argument("--sync-norm", action="store_true",
                   help="statistics over the global batch: BGN -> SyncBatchGroupNorm, BN -> "
                        "SyncBatchNorm (cells with one worker); default: per rank")
    d.add_argument("--dist-timeout", type=_number(float, 0, strict=True), default=300.0,
                   metavar="SECONDS",
                   help="fail instead of waiting longer than this for another rank "
                        "(default 300)")
    o = rp.add_argument_group("protocol overrides (defaults come from the preset)")
    o.add_argument("--dataset", default=None,
                   help="digits, mnist5k (bundled), fashion-mnist (apt-get install "
                        "dataset-fashion-mnist, or its 4 IDX files in --data-root), cifar10, "
                        "imagenet, imagefolder (yours)")
    o.add_argument("--data-root", default=None,
                   help="root of your dataset copy (fashion-mnist: default "
                        "/usr/share/datasets/fashion-mnist)")
    o.add_argument("--loader-workers", type=_number(int, 0), default=None,
                   help="DataLoader workers (0: load in the training process)")
    o.add_argument("--model", default=None,
                   help="resnet18, resnet50, cifar_resnet, small_resnet, ...")
    o.add_argument("--image-size", type=_number(int, 1), default=None,
                   help="input resolution")
    o.add_argument("--epochs", type=_number(int, 1), default=None,
                   help="training epochs (>= 1)")
    o.add_argument("--seeds", type=_int_list(0), default=None, help="e.g. 0,1,2")
    o.add_argument("--batch-sizes", type=_int_list(1), default=None,
                   help="per-worker batch sizes, e.g. 128,64,32,16,8,4,2")
    o.add_argument("--norms", type=_norm_list, default=None, help="e.g. bn,gn,bgn")
    o.add_argument("--groups", type=_int_list(1), default=None,
                   help="G values of the g-sweep task (>= 1; other tasks refuse it)")
    o.add_argument("--amp", choices=["none", "bf16"], default=None,
                   help="mixed precision (default: bf16 on cuda, none on cpu)")
    o.add_argument("--length-factor", type=_number(int, 1), default=None, metavar="K",
                   help="train every cell K times longer (epochs, steps, warm-up steps... x K; "
                        "the convergence check, see `bgnorm compare`)")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any preset key (value parsed as JSON), e.g. --set "
                        "total_batch=64 --set 'model_kwargs={\"width\": 32}'")

    cp = sub.add_parser(
        "compare", help="every cell of a run against the same cell trained longer",
        description="The convergence check: match every cell of RUN with the same cell in "
                    "LONGER (its config but the training lengths: e.g. LONGER made with "
                    "--length-factor 3) and say whether RUN's metric is within --tolerance "
                    "points of (or above) LONGER's. Prints a markdown table; exit status 0 when "
                    "every cell of RUN was compared and is within, 1 otherwise.")
    cp.add_argument("run", type=Path, help="run directory")
    cp.add_argument("longer", type=Path, help="run directory of the same cells trained longer")
    cp.add_argument("--tolerance", type=_number(float, 0), default=1.5,
                    help="points (default 1.5)")
    cp.add_argument("--task", default=None, help="only these tasks (comma list)")
    cp.add_argument("--over-seeds", action="store_true",
                    help="compare each cell's mean over its seeds (paired over the seeds both "
                         "runs have, with 95%% intervals) instead of every seed on its own: for "
                         "outcomes that vary from run to run by more than the tolerance")

    rr = sub.add_parser("report", help="render DIR/report.md from DIR's results stores")
    rr.add_argument("out", type=Path, help="run directory")
    rr.add_argument("--task", default=None, help="only these tasks (comma list)")
    rr.add_argument("--quiet", action="store_true", help="do not print the report")
    rr.add_argument("--longer", action="append", type=Path, default=[], metavar="DIR",
                    help="a run directory with some of the same cells trained longer (e.g. "
                         "--epochs 3x of the cells flagged still improving; repeatable): "
                         "their convergence flags come from that run (converged when it ends "
                         "at most 1.5 points higher), their numbers stay this run's")

    tp = sub.add_parser("tasks", help="list the tasks and their presets")
    tp.add_argument("--settings", action="store_true",
                    help="also list each task's options and --set keys")

    dp = sub.add_parser(
        "docs", help="list the guides installed with bgnorm, or print one",
        description="The guides (markdown) ship with the package: without NAME, list them with "
                    "their installed paths; with NAME (e.g. reproduction), print one.")
    dp.add_argument("name", nargs="?", default=None, help="a guide's name, e.g. reproduction")

    from .repro.models import MODELS

    gp = sub.add_parser(
        "groups", help="per norm layer of a model: the G num_groups='auto' chooses",
        description="For each norm layer of one of the suite's models (built with BatchNorm, "
                    "on the meta device: nothing is computed), print the G that "
                    "num_groups='auto' (bgnorm.auto_groups) chooses for the per-worker batch, "
                    "the paper's single G (bgnorm.paper_groups) and the values per statistic "
                    "of each, as a markdown table. `bgnorm docs choosing-g` explains the rule.")
    gp.add_argument("--model", choices=sorted(MODELS), default="resnet50",
                    help="the model (default: resnet50)")
    gp.add_argument("--batch-size", type=_number(int, 1), required=True,
                    help="examples per worker (what one statistic sees)")
    gp.add_argument("--image-size", type=_number(int, 1), default=None,
                    help="input height and width (default: 224 for resnet18/50, 32 otherwise)")
    gp.add_argument("--in-channels", type=_number(int, 1), default=3,
                    help="input channels (default: 3)")
    gp.add_argument("--values", type=_number(float, 0, strict=True), default=None,
                    help="aim at this many values per statistic instead of the paper's G "
                         "(auto_groups' target_values)")
    gp.add_argument("--min-values", type=_number(float, 2), default=None,
                    help="the fewest values per statistic a G may leave (default: 32, "
                         "bgnorm.MIN_VALUES)")
    return parser


def _groups(args: argparse.Namespace) -> int:
    import torch

    from .policy import groups_report
    from .repro.models import build_model

    size = args.image_size or (224 if args.model in ("resnet18", "resnet50") else 32)
    with torch.device("meta"):
        model = build_model(args.model, num_classes=10, in_channels=args.in_channels)
    try:
        floor = {} if args.min_values is None else {"min_values": args.min_values}
        report = groups_report(model, (args.batch_size, args.in_channels, size, size),
                               target_values=args.values, **floor)
    except RuntimeError as exc:  # e.g. an image too small for the model's down-sampling
        raise _UsageError(f"groups: {args.model} cannot run on {size}x{size} inputs: "
                          f"{str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # e.g. --values below the floor
        raise _UsageError(f"groups: {str(exc).replace('target_values', '--values')}"
                          .replace("min_values", "--min-values")) from None
    print(f"{args.model}, {size}x{size} px, {args.batch_size} per worker\n")
    print(report)
    return 0


def _docs_dir() -> Path | None:
    """The guides' folder: ``bgnorm/docs`` of the installed package (package data), or the
    ``docs/`` folder of a source checkout where that link is missing."""
    package = Path(__file__).resolve().parent
    for folder in (package / "docs", package.parent.parent / "docs"):
        if folder.is_dir() and any(folder.glob("*.md")):
            return folder
    return None


def _docs(name: str | None) -> int:
    folder = _docs_dir()
    if folder is None:
        raise _UsageError("the guides are not installed with this copy of bgnorm (expected "
                          f"{Path(__file__).resolve().parent / 'docs'}); reinstall the package")
    guides = {p.stem: p for p in sorted(folder.glob("*.md"))}
    if name is None:
        width = max(map(len, guides))
        print(f"Guides installed with bgnorm, in {folder}:")
        for stem, path in guides.items():
            title = next((line.lstrip("# ").strip() for line in
                          path.read_text(encoding="utf-8").splitlines() if line.strip()), "")
            print(f"  {stem:{width}s}  {title}")
        print("`bgnorm docs NAME` prints one (markdown).")
        return 0
    key = name[:-3] if name.endswith(".md") else name
    if key not in guides:
        raise _UsageError(f"no guide {name!r}; guides: {', '.join(guides)}")
    sys.stdout.write(guides[key].read_text(encoding="utf-8"))
    return 0


def _tasks(spec: str, preset: str | None) -> list[str]:
    from .repro.tasks import (
        TASKS,
        _load_all,  # noqa: F401
    )

    valid = f"valid tasks: {', '.join(TASKS)} or all (`bgnorm tasks` describes them)"
    if spec.strip() == "all":
        names = [n for n, t in TASKS.items() if preset is None or preset in t.presets]
    else:
        names = list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise _UsageError(f"unknown task(s) {', '.join(unknown)}; {valid}")
    if not names:
        raise _UsageError(f"--task {spec!r} names no task; {valid}")
    return names


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol options of ``bgnorm reproduce`` as the tasks' ``overrides`` (no device)."""
    from .repro.presets import parse_set

    return {
        "dataset": args.dataset, "data_root": args.data_root,
        "loader_workers": args.loader_workers, "model": args.model,
        "image_size": args.image_size, "epochs": args.epochs, "seeds": args.seeds,
        "batch_sizes": args.batch_sizes, "norms": args.norms, "groups": args.groups,
        "amp": args.amp, "set": parse_set(args.set), "length_factor": args.length_factor,
    }


def _reproduce(args: argparse.Namespace) -> int:
    import time

    from .repro import dist as _dist
    from .repro.presets import PRESETS, check_overrides
    from .repro.tasks import get_task
    from .repro.train import resolve_device

    t0 = time.perf_counter()
    if args.preset not in PRESETS:
        raise _UsageError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    tasks = _tasks(args.task, args.preset)
    # Every option is applied by a selected task or refused, before anything starts.
    try:
        overrides = _overrides(args)
        notes = check_overrides([get_task(t) for t in tasks], overrides)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    distributed = args.distributed or _dist.launched_by_torchrun()
    if args.jobs is not None and distributed:
        raise _UsageError("--jobs: a distributed run trains one cell at a time on all its "
                          "ranks (the ranks are the parallelism); drop --jobs")
    if args.sync_norm and not distributed:
        raise _UsageError("--sync-norm synchronizes statistics across the processes of a "
                          "distributed run: launch with torchrun (or pass --distributed in a "
                          "torch.distributed environment), or drop --sync-norm")
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:  # no CUDA, a device string torch does not know
        raise _UsageError(str(exc)) from None
    env = None
    if distributed:
        env, device = _dist.init_distributed(device, args.dist_timeout, args.sync_norm)
    if env is None or env.is_main:
        for note in notes:
            print(f"bgnorm: note: {note}", file=sys.stderr)
    try:
        return _reproduce_in(args, tasks, {**overrides, "device": str(device)}, device, env,
                             t0)
    finally:
        _dist.shutdown()


def _reproduce_in(args: argparse.Namespace, tasks: list[str], overrides: dict[str, Any],
                  device, env, t0: float) -> int:
    import time

    from .repro.runner import (
        EXIT_DISK_FAULT,
        RunOptions,
        plan_cells,
        render_report,
        run_sweep,
        select_shard,
    )
    from .repro.store import DiskFaultError

    main = env is None or env.is_main
    try:
        if args.list:
            if not main:
                return 0
            cells = select_shard(plan_cells(tasks, args.preset, overrides), args.shard)
            for cid, cfg in cells:
                from .repro.runner import _label

                print(cid, _label(cfg))
            print(f"{len(cells)} cells", file=sys.stderr)
            return 0
        summary = run_sweep(RunOptions(
            tasks=tasks, preset=args.preset, out_dir=args.out, overrides=overrides,
            jobs=args.jobs, threads=args.threads, shard=args.shard, device=str(device),
            checkpoint_seconds=args.checkpoint_every, progress=not args.no_progress,
            keep_checkpoints=args.keep_checkpoints, grace_seconds=args.grace_seconds,
            lease_seconds=args.lease_seconds, resume_command=_resume_command(args),
        ))
    except ValueError as exc:
        print(f"bgnorm: {exc}", file=sys.stderr)
        return 2
    except DiskFaultError as exc:
        print(f"bgnorm: {exc}", file=sys.stderr)
        return EXIT_DISK_FAULT
    if not main:  # rank 0 reports
        return 1 if summary.failed else 0
    if not args.no_report:
        text = render_report(args.out, tasks)
        print(text)
    wall = time.perf_counter() - t0
    shared = (f" ({summary.shared} of them recorded from the same run as another cell)"
              if summary.shared else "")
    print(
        f"{summary.finished} finished, {summary.diverged} diverged{shared}, "
        f"{len(summary.failed)} failed, {summary.skipped} already recorded"
        f"; {summary.jobs} job(s) x {summary.threads} "
        f"thread(s); {wall:.0f} s. Report: {args.out / 'report.md'}",
        file=sys.stderr,
    )
    if summary.failed:
        print("failed cells:\n" + "\n".join(f"  {label}" for label, _ in summary.failed),
              file=sys.stderr)
        print("they are not recorded, and rerun from their last checkpoints once the cause is "
              "fixed (a worker killed by the OOM killer or kill -9 needs no fix); resume with:\n"
              f"  {_resume_command(args)}", file=sys.stderr)
        return 1
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this sweep, as it was typed."""
    import shlex

    argv = getattr(args, "argv", None) or sys.argv[1:]
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    head = (["bgnorm"] if prog == "bgnorm" or getattr(args, "argv", None)
            else [sys.executable, "-m", "bgnorm.cli"])
    return shlex.join([*head, *argv])


def _compare(args: argparse.Namespace) -> int:
    from .repro.report import length_comparison, seed_mean_comparison
    from .repro.store import read_records, store_files

    for d in (args.run, args.longer):
        if not store_files(d):
            print(f"bgnorm: no results*.jsonl store in {d}", file=sys.stderr)
            return 2
    tasks = set(_tasks(args.task, None)) if args.task else None

    def records(d: Path) -> list:
        return [r for r in read_records(d) if tasks is None or r.config.get("task") in tasks]

    compare = seed_mean_comparison if args.over_seeds else length_comparison
    text, ok = compare(records(args.run), records(args.longer), args.tolerance)
    print(text)
    return 0 if ok else 1


def _report(args: argparse.Namespace) -> int:
    from .repro.runner import render_report
    from .repro.store import store_files

    for d in (args.out, *args.longer):
        if not store_files(d):
            print(f"bgnorm: no results*.jsonl store in {d}", file=sys.stderr)
            return 2
    tasks = _tasks(args.task, None) if args.task else None
    text = render_report(args.out, tasks, longer=args.longer)
    if not args.quiet:
        print(text)
    print(f"Report: {args.out / 'report.md'}", file=sys.stderr)
    return 0


def _list_tasks(settings: bool = False) -> int:
    import textwrap

    from .repro.presets import OPTIONS, option_flag
    from .repro.tasks import (
        TASKS,
        _load_all,  # noqa: F401
    )

    width = max(map(len, TASKS), default=0)
    for name, task in TASKS.items():
        print(f"{name:{width}s}  presets: {', '.join(task.presets):26s} {task.title}")
        if not settings:
            continue
        options = [option_flag(k) for k in OPTIONS if task.options is None or k in task.options]
        keys = sorted(task.settings) if task.settings is not None else ["(not declared)"]
        for head, items in (("options", options), ("--set keys", keys)):
            print(textwrap.fill(", ".join(items), width=100, initial_indent=f"  {head}: ",
                                subsequent_indent="    "))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bgnorm`` console script."""
    from .repro.runner import EXIT_PREEMPTED, SweepInterrupted, SweepPreempted

    args = _parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "report":
            return _report(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "tasks":
            return _list_tasks(args.settings)
        if args.command == "docs":
            return _docs(args.name)
        if args.command == "groups":
            return _groups(args)
    except _UsageError as exc:
        print(f"bgnorm: {exc}", file=sys.stderr)
        return 2
    except SweepPreempted:  # SIGTERM/SIGINT: the runner printed the resume command
        return EXIT_PREEMPTED
    except SweepInterrupted:  # the runner printed how to resume
        return 130
    except KeyboardInterrupt:
        print("\nbgnorm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`bgnorm ... | head`): stop quietly, as a shell
        # tool does on SIGPIPE; stdout goes to devnull so that the exit flush cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return 2  # pragma: no cover - argparse enforces the commands


if __name__ == "__main__":
    sys.exit(main())
