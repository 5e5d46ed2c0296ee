"""The sweep runner: cells -> worker processes -> results store -> report.

:func:`run_sweep` expands the tasks' presets into cells, drops the cells already recorded in
``DIR`` (any shard's store), keeps this shard's share, and runs the rest in worker processes:

* ``jobs`` processes from a ``spawn`` context, each with ``threads`` torch threads (default:
  the machine's cores divided among the jobs; on a 2-core CPU two one-thread jobs have about
  twice the throughput of one two-thread job). ``jobs=1`` runs in this process.
* Each cell gets a :class:`LocalCellContext`: its checkpoint lives in ``DIR/cells/<cell_id>/``,
  written to a temporary file and ``os.replace``-d into place, loaded with
  ``torch.load(weights_only=True)``. A cell killed at any moment resumes from its last
  checkpoint when the same command runs again.
* Only this (parent) process writes the store, one fsync'd line per finished cell
  (:class:`~bgnorm.repro.store.ResultStore`), so ``kill -9`` never leaves a half-written or
  duplicate record and never loses a finished one.
* A cell whose loss becomes NaN/inf is recorded with ``status="diverged"``; a cell that raises
  anything else is reported as failed at the end (exit status 1), and the rest of the sweep
  goes on.

Distributed (``torchrun``, see :mod:`bgnorm.repro.dist`): when a process group was set up by
:func:`bgnorm.repro.dist.init_distributed`, every rank runs the same cells one after the other in
its own process (no worker pool), each cell trained with DDP over all ranks; only rank 0 writes
the store, deletes checkpoints and prints progress; a failed cell stops the sweep (a rank that
died leaves the process group unusable), and the same command resumes it.

Before the first cell starts, :func:`check_environment` checks what every cell needs (the
``[repro]`` extra installed, the device available, each task's data present and well-formed:
:attr:`Task.check <bgnorm.repro.api.Task>`) and raises one ``ValueError`` naming the
problem and the fix, instead of one traceback per failed cell. Ctrl-C stops the sweep with
:class:`SweepInterrupted` after printing how to resume it.

Shards: ``shard=(i, n)`` takes every n-th cell of the full grid (in grid order, starting at the
i-th), writes ``results-shard-i-of-n.jsonl``, and skips cells any store in ``DIR`` already has;
:func:`render_report` merges all stores.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import dist as _dist
from .api import Diverged, Record
from .report import curves_section, training_problem, write_report
from .store import ResultStore, cell_id, read_records, run_meta, store_path
from .tasks.base import TASKS, get_task

__all__ = [
    "REPRO_MODULES",
    "LocalCellContext",
    "RunOptions",
    "RunSummary",
    "SweepInterrupted",
    "available_cores",
    "check_environment",
    "missing_modules",
    "plan_cells",
    "render_report",
    "run_sweep",
    "select_shard",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: The modules of the ``[repro]`` extra: import name -> the package that installs it.
REPRO_MODULES = {"matplotlib": "matplotlib", "mlxtend": "mlxtend", "sklearn": "scikit-learn",
                 "tqdm": "tqdm", "PIL": "pillow"}


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep; :func:`run_sweep` has printed how to resume it."""


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# The cell context
# --------------------------------------------------------------------------------------------


class LocalCellContext:
    """A :class:`~bgnorm.repro.api.CellContext` backed by a directory.

    Usable on its own to run a task's cell by hand, e.g. in a test or a notebook:

    >>> import tempfile
    >>> ctx = LocalCellContext("abc", {"task": "t"}, torch.device("cpu"), tempfile.mkdtemp())
    >>> ctx.load_checkpoint() is None
    True
    >>> ctx.save_checkpoint({"step": 3, "w": torch.ones(2)})
    >>> ctx.load_checkpoint()["step"]
    3

    Args:
        cell_id, config, device: as in the protocol.
        workdir: the cell's scratch directory (created when first needed).
        checkpoint_seconds: :meth:`checkpoint_due` becomes True this long after the last save.
        reporter: ``reporter(kind, cell_id, payload)`` receives ``"progress"`` (dict with
            ``done``, ``total`` and metrics) and ``"log"`` (str) events; progress is throttled
            to ``progress_seconds``.
    """

    def __init__(
        self,
        cell_id: str,
        config: dict[str, Any],
        device: torch.device,
        workdir: str | os.PathLike,
        checkpoint_seconds: float = 60.0,
        reporter: Callable[[str, str, Any], None] | None = None,
        progress_seconds: float = 0.25,
    ) -> None:
        self.cell_id = cell_id
        self.config = config
        self.device = device
        self.workdir = Path(workdir)
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.reporter = reporter
        self.progress_seconds = progress_seconds
        self._last_save = time.monotonic()
        self._last_progress = 0.0
        self._parent = os.getppid()
        self._watch_parent = False
        #: False on the non-zero ranks of a distributed run: saving is a no-op there.
        self.writable = True

    @property
    def checkpoint_path(self) -> Path:
        """Where the checkpoint lives."""
        return self.workdir / CHECKPOINT_NAME

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with ``state`` (temp file, fsync, os.replace)."""
        if not self.writable:
            self._last_save = time.monotonic()
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.checkpoint_path)
        try:  # make the rename itself durable
            dfd = os.open(self.workdir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # pragma: no cover - e.g. platforms without directory fds
            pass
        self._last_save = time.monotonic()

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint (``weights_only=True``, tensors on the CPU), or None."""
        if not self.checkpoint_path.is_file():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    def checkpoint_due(self) -> bool:
        """True once ``checkpoint_seconds`` have passed since the last save (or the start)."""
        self._check_parent()
        return time.monotonic() - self._last_save >= self.checkpoint_seconds

    def progress(self, done: int, total: int, **metrics: float) -> None:
        """Forward step progress to the reporter (throttled; the last step always goes)."""
        now = time.monotonic()
        if self.reporter is None:
            return
        if done < total and now - self._last_progress < self.progress_seconds:
            return
        self._last_progress = now
        self.reporter("progress", self.cell_id, {"done": done, "total": total, **metrics})

    def log(self, message: str) -> None:
        """Forward a log line to the reporter."""
        if self.reporter is not None:
            self.reporter("log", self.cell_id, message)

    def _check_parent(self) -> None:
        # A worker whose runner was killed (kill -9) stops instead of training on as an orphan;
        # the rerun resumes its cell from the last checkpoint.
        if self._watch_parent and os.getppid() != self._parent:
            os._exit(3)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def plan_cells(
    tasks: Sequence[str], preset: str, overrides: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """``(cell_id, config)`` for every cell of ``tasks`` at ``preset``, in grid order, without
    duplicates.

    Raises ``ValueError`` for an option or ``--set`` key no task of ``tasks`` applies
    (:func:`~bgnorm.repro.presets.check_overrides`); each task receives the options it applies
    (:func:`~bgnorm.repro.presets.task_overrides`).
    """
    from .presets import check_overrides, task_overrides

    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    selected = [get_task(name) for name in tasks]
    check_overrides(selected, overrides)
    for task in selected:
        name = task.name
        if preset not in task.presets:
            raise ValueError(
                f"task {name!r} has no preset {preset!r}; its presets: {', '.join(task.presets)}"
            )
        for config in task.cells(preset, task_overrides(task, overrides)):
            if config.get("task") != name:
                raise ValueError(f"task {name!r} produced a cell of task {config.get('task')!r}")
            cid = cell_id(config)
            if cid not in seen:
                seen.add(cid)
                out.append((cid, config))
    return out


def select_shard(cells: Sequence[Any], shard: tuple[int, int] | None) -> list[Any]:
    """Shard ``(i, n)`` (1-based) of ``cells``: every n-th cell starting at the i-th.

    Example:
        >>> select_shard(list("abcdefg"), (2, 3))
        ['b', 'e']
    """
    if shard is None:
        return list(cells)
    i, n = shard
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"--shard i/n needs 1 <= i <= n, got {i}/{n}")
    return [c for k, c in enumerate(cells) if k % n == i - 1]


def missing_modules(modules: Mapping[str, str] = REPRO_MODULES) -> list[str]:
    """The packages of ``modules`` (import name -> package) that cannot be imported here.

    Looked up with :func:`importlib.util.find_spec`, without importing them.
    """
    missing = []
    for name, package in modules.items():
        if name in sys.modules:
            found = sys.modules[name] is not None
        else:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
        if not found:
            missing.append(package)
    return missing


def check_environment(cells: Sequence[tuple[str, Mapping[str, Any]]],
                      device: str | torch.device = "cpu") -> list[str]:
    """Check, before any cell starts, that this machine can run ``cells``.

    The ``[repro]`` extra must be installed (:data:`REPRO_MODULES`), ``device`` available, and
    each task's data present and well-formed (its :attr:`~bgnorm.repro.api.Task.check`).
    Raises one ``ValueError`` naming the problem and the fix; returns the data locations the
    tasks read.
    """
    from .train import resolve_device

    missing = missing_modules()
    if missing:
        raise ValueError(f"the reproduction suite needs the [repro] extra, and "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                         "installed: pip install 'bgnorm[repro]'")
    try:
        resolve_device(device)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for _, config in cells:
        by_task.setdefault(config["task"], []).append(config)
    checked: list[str] = []
    for name, configs in by_task.items():
        task = get_task(name)
        if task.check is None:
            continue
        try:
            checked += task.check(configs)
        except (OSError, ValueError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(f"the {name} cells cannot read their data: {message}") from None
    return checked


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------

_QUEUE: Any = None


def _init_worker(threads: int, q: Any) -> None:
    global _QUEUE
    _QUEUE = q
    torch.set_num_threads(threads)


def _queue_reporter(kind: str, cid: str, payload: Any) -> None:
    if _QUEUE is not None:
        try:
            _QUEUE.put_nowait((kind, os.getpid(), cid, payload))
        except Exception:  # pragma: no cover - a full or closed queue must not kill the cell
            pass


def _execute(job: dict[str, Any], reporter: Callable[[str, str, Any], None] | None,
             watch_parent: bool) -> dict[str, Any]:
    """Run one cell; returns ``{status, result, seconds}`` (status "ok"/"diverged"/"failed")."""
    config = job["config"]
    ctx = LocalCellContext(
        job["cell_id"], config, torch.device(job["device"]), job["workdir"],
        job["checkpoint_seconds"], reporter,
    )
    ctx._watch_parent = watch_parent
    env = _dist.active()
    ctx.writable = env is None or env.is_main
    if reporter is not None:
        reporter("start", job["cell_id"], job.get("label", job["cell_id"]))
    t0 = time.perf_counter()
    try:
        result = get_task(config["task"]).run(config, ctx)
        status = "ok"
    except Diverged as exc:
        result = {"error": str(exc), **exc.partial}
        status = "diverged"
    except Exception:  # reported by the parent; the sweep goes on
        return {"status": "failed", "error": traceback.format_exc(),
                "seconds": time.perf_counter() - t0}
    return {"status": status, "result": result, "seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads()}


def _worker_main(job: dict[str, Any]) -> dict[str, Any]:
    return _execute(job, _queue_reporter, watch_parent=True)


# --------------------------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------------------------


class _Display:
    """tqdm bars: one for the cells, one per running worker for its steps."""

    def __init__(self, total: int, jobs: int, enabled: bool) -> None:
        # Bars only on a terminal; logs and CI get one line per finished cell.
        self.enabled = enabled and sys.stderr.isatty()
        self.bars: dict[int, Any] = {}
        self.slots: dict[int, int] = {}
        self.labels: dict[str, str] = {}
        self.cells = None
        self.tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.tqdm = tqdm
            except ImportError:  # pragma: no cover - tqdm is in the repro extra
                self.enabled = False
        if self.enabled:
            self.cells = self.tqdm(total=total, desc="cells", unit="cell", position=0,
                                   dynamic_ncols=True, leave=True)

    def write(self, line: str) -> None:
        if self.tqdm is not None and self.enabled:
            self.tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _bar(self, pid: int):
        if pid not in self.bars:
            slot = len(self.slots) + 1
            self.slots[pid] = slot
            self.bars[pid] = self.tqdm(total=1, position=slot, leave=False, unit="step",
                                       dynamic_ncols=True)
        return self.bars[pid]

    def event(self, kind: str, pid: int, cid: str, payload: Any) -> None:
        if kind == "start":
            self.labels[cid] = str(payload)
        if kind == "log":  # rare (e.g. "resumed at step ..."): always shown
            self.write(f"  [{self.labels.get(cid, cid)}] {payload}")
            return
        if not self.enabled:
            return
        bar = self._bar(pid)
        if kind == "start":
            self.labels[cid] = str(payload)
            bar.reset(total=1)
            bar.set_description_str(str(payload)[:48])
        elif kind == "progress":
            total = int(payload.get("total") or 1)
            if bar.total != total:
                bar.reset(total=total)
            bar.n = int(payload.get("done") or 0)
            post = {k: f"{v:.3g}" for k, v in payload.items()
                    if k not in ("done", "total") and isinstance(v, (int, float))}
            bar.set_postfix(post, refresh=False)
            bar.refresh()

    def cell_done(self, line: str) -> None:
        if self.enabled:
            self.cells.update(1)
        self.write(line)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.cells is not None:
            self.cells.close()


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """What ``bgnorm reproduce`` asks for (see :func:`run_sweep`)."""

    tasks: list[str]
    preset: str
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    jobs: int | None = None
    threads: int | None = None
    shard: tuple[int, int] | None = None
    device: str = "cpu"
    checkpoint_seconds: float = 60.0
    progress: bool = True
    keep_checkpoints: bool = False


@dataclass
class RunSummary:
    """What a sweep did."""

    planned: int = 0
    skipped: int = 0
    finished: int = 0
    diverged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, traceback)
    seconds: float = 0.0
    jobs: int = 1
    threads: int = 1

    @property
    def ok(self) -> bool:
        """No cell failed."""
        return not self.failed


def _label(config: Mapping[str, Any]) -> str:
    parts = [config["task"], str(config.get("norm", ""))]
    for key, fmt in (("batch_size", "b={}"), ("workers", "W={}"), ("num_groups", "G={}"),
                     ("gn_groups", "G={}"), ("gn_channels_per_group", "C/G={}"),
                     ("seed", "seed={}")):
        if config.get(key) is not None and not (key == "workers" and config[key] == 1):
            parts.append(fmt.format(config[key]))
    return " ".join(p for p in parts if p)


def run_sweep(options: RunOptions) -> RunSummary:
    """Run (or resume) the sweep described by ``options``; returns a :class:`RunSummary`.

    Records go to ``store_path(out_dir, shard)``; checkpoints to ``out_dir/cells/<id>/`` (deleted
    once the cell is recorded unless ``keep_checkpoints``).
    """
    t_start = time.perf_counter()
    env = _dist.active()
    main = env is None or env.is_main
    out = Path(options.out_dir)
    if main:  # other ranks never write files
        out.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(options.tasks, options.preset, options.overrides)
    mine = select_shard(cells, options.shard)
    done = {r.cell_id for r in read_records(out)} if main else set()
    # Every rank must train the same cells: rank 0's view of the store decides.
    done = _dist.broadcast_object(done, "planning the sweep") if env is not None else done
    todo = [(cid, cfg) for cid, cfg in mine if cid not in done]
    if todo:  # one clear message, not a traceback per cell
        read = check_environment(todo, options.device)
        for key in ("data_root", "loader_workers"):
            if options.overrides.get(key) is not None and not read:
                flag = "--" + key.replace("_", "-")
                raise ValueError(
                    f"{flag} is not used: every cell to run trains on bundled digits, which "
                    "are not read from disk; choose data read from --data-root (--dataset "
                    "cifar10, imagenet or imagefolder for the classification tasks, the paper "
                    f"preset for the others) or drop {flag}")
    summary = RunSummary(planned=len(mine), skipped=len(mine) - len(todo))
    store = ResultStore(store_path(out, options.shard))

    device = torch.device(options.device)
    cores = available_cores()
    if env is not None:  # one cell at a time, in this process, on all ranks together
        jobs = 1
    elif options.jobs:
        jobs = int(options.jobs)
    elif device.type == "cpu":
        jobs = max(1, min(cores, len(todo)))
    else:
        jobs = 1
    jobs = max(1, min(jobs, max(1, len(todo))))
    per_machine = jobs
    if env is not None:  # the ranks on this machine share its cores
        per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    threads = int(options.threads) if options.threads else max(1, cores // per_machine)
    summary.jobs, summary.threads = jobs, threads

    display = _Display(len(todo), jobs, options.progress and main)
    if summary.skipped and main:
        display.write(f"{summary.skipped} of {len(mine)} cells already recorded in {out}; "
                      f"running the other {len(todo)}")
    jobs_spec = {
        cid: {
            "cell_id": cid,
            "config": cfg,
            "device": str(device),
            "workdir": str(out / "cells" / cid),
            "checkpoint_seconds": options.checkpoint_seconds,
            "label": _label(cfg),
        }
        for cid, cfg in todo
    }

    def record(cid: str, outcome: dict[str, Any]) -> None:
        cfg = jobs_spec[cid]["config"]
        label = jobs_spec[cid]["label"]
        if outcome["status"] == "failed":
            summary.failed.append((label, outcome["error"]))
            if env is not None and not main:
                print(f"rank {env.rank}: FAILED {label}\n{outcome['error']}", file=sys.stderr,
                      flush=True)
            else:
                display.cell_done(f"FAILED {label}\n{outcome['error']}")
            return
        if not main:
            if outcome["status"] == "ok":
                summary.finished += 1
            else:
                summary.diverged += 1
            return
        rec = Record(
            cell_id=cid, config=cfg, status=outcome["status"], result=outcome["result"],
            seconds=float(outcome["seconds"]),
            meta=run_meta(device=str(device), threads=outcome.get("threads", threads),
                          jobs=jobs, preset=options.preset, shard=options.shard),
        )
        if env is not None:
            rec.meta["world_size"] = env.world_size
            rec.meta["sync_norm"] = env.sync_norm
        store.append(rec)
        if not options.keep_checkpoints:
            shutil.rmtree(out / "cells" / cid, ignore_errors=True)
        if rec.status == "ok":
            summary.finished += 1
            acc = rec.result.get("acc")
            problem = training_problem(rec)
            what = (f"did not train: {problem}" if problem else
                    f"acc {acc:.2f}%" if isinstance(acc, (int, float)) else "ok")
        else:
            summary.diverged += 1
            what = f"diverged ({rec.result.get('error', '')})"
        display.cell_done(f"done {label}: {what} in {rec.seconds:.1f}s")

    try:
        if jobs == 1:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                reporter = ((lambda k, c, p: display.event(k, os.getpid(), c, p))
                            if main else None)
                for cid in jobs_spec:
                    outcome = _execute(jobs_spec[cid], reporter, watch_parent=False)
                    record(cid, outcome)
                    if env is not None and outcome["status"] == "failed":
                        print(f"rank {env.rank}: stopping the sweep after a failed cell (if a "
                              "rank died, the process group is unusable); run the same command "
                              "again to resume", file=sys.stderr, flush=True)
                        break
            finally:
                torch.set_num_threads(prev)
        elif jobs_spec:
            _run_pool(jobs_spec, jobs, threads, display, record, summary)
    except KeyboardInterrupt:
        display.close()
        print(f"\ninterrupted: {summary.finished + summary.diverged} cells recorded; run the "
              "same command again to resume", file=sys.stderr)
        raise SweepInterrupted() from None
    display.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _run_pool(jobs_spec: dict[str, dict[str, Any]], jobs: int, threads: int, display: _Display,
              record: Callable[[str, dict[str, Any]], None], summary: RunSummary) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, q)) as pool:
        futures: dict[Future, str] = {pool.submit(_worker_main, spec): cid
                                      for cid, spec in jobs_spec.items()}
        pending = set(futures)
        try:
            while pending:
                _drain(q, display)
                finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                for fut in finished:
                    cid = futures[fut]
                    try:
                        outcome = fut.result()
                    except BrokenProcessPool as exc:
                        outcome = {"status": "failed", "error": f"worker process died: {exc}"}
                    except Exception:
                        outcome = {"status": "failed", "error": traceback.format_exc()}
                    _drain(q, display)
                    record(cid, outcome)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _drain(q: Any, display: _Display) -> None:
    while True:
        try:
            kind, pid, cid, payload = q.get_nowait()
        except queue_mod.Empty:
            return
        except (EOFError, OSError):  # pragma: no cover - queue torn down
            return
        display.event(kind, pid, cid, payload)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def render_report(out_dir: str | os.PathLike, tasks: Sequence[str] | None = None) -> str:
    """Merge every store in ``out_dir``, render each task's section and write ``report.md``.

    ``tasks`` restricts (and orders) the sections; by default every task with records, in
    registration order. Returns the markdown.
    """
    out = Path(out_dir)
    records = read_records(out)
    from .tasks import _load_all  # noqa: F401  (registers the built-in tasks)

    present = []
    for r in records:
        t = r.config.get("task")
        if t not in present:
            present.append(t)
    names = list(tasks) if tasks else [t for t in TASKS if t in present]
    unknown = [t for t in present if t not in TASKS]
    sections = []
    for name in names:
        task = get_task(name)
        recs = [r for r in records if r.config.get("task") == name]
        # every task's curves and convergence flags, rendered the same way
        sections.append(task.report(recs, out).rstrip() + "\n\n" + curves_section(name, recs, out))
    if unknown:
        sections.append("Records of unknown tasks (not rendered): " + ", ".join(map(str, unknown)))
    n_ok = sum(r.status == "ok" for r in records)
    n_untrained = sum(training_problem(r) is not None for r in records)
    untrained = f", {n_untrained} of them did not train" if n_untrained else ""
    preamble = (f"{len(records)} cells recorded in `{out}` ({n_ok} finished{untrained}, "
                f"{len(records) - n_ok} diverged); merged from every `results*.jsonl` store.")
    path = write_report(out, sections, preamble=preamble)
    return path.read_text(encoding="utf-8")
