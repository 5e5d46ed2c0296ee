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
* Each worker reports on a pipe of its own. A worker that dies (``kill -9``, the OOM killer)
  fails only the cell it was running (its checkpoint stays, and the same command resumes
  it); the other workers go on and a new worker takes the next cell.

Distributed (``torchrun``, see :mod:`bgnorm.repro.dist`): when a process group was set up by
:func:`bgnorm.repro.dist.init_distributed`, every rank runs the same cells one after the other in
its own process (no worker pool), each cell trained with DDP over all ranks; only rank 0 writes
the store, deletes checkpoints and prints progress; a failed cell stops the sweep (a rank that
died leaves the process group unusable), and the same command resumes it.

Clusters (see the "Running on a cluster" guide, ``bgnorm docs cluster``):

* **One cell, one runner.** Before training a cell the runner claims it with a
  :class:`~bgnorm.repro.store.CellLock` in its folder; a heartbeat thread renews the claims'
  leases. Several runners on one directory (a requeued job while the old copy still runs, the
  same command started twice) train different cells; a cell held by another runner is skipped
  and come back to at the end: this runner *waits* until it is recorded (or its holder stops or
  dies, and it takes the cell over), so that a command that exits 0 has every cell of its shard
  recorded. A lock whose holder died (same host: its pid is gone) or whose lease expired (other
  hosts) is taken over, and the cell resumes from its checkpoint.
* **Graceful preemption.** SIGTERM or SIGINT: no new cell starts, each running cell is asked
  to checkpoint at its next step and stop (``ctx.checkpoint_due()`` becomes True, then
  ``ctx.save_checkpoint`` raises :class:`~bgnorm.repro.api.CellStopped`), the runner waits up
  to ``grace_seconds`` for them, records nothing half-done, prints the command that resumes
  the sweep and raises :class:`SweepPreempted` (``bgnorm reproduce`` exits with
  :data:`EXIT_PREEMPTED` = 75, EX_TEMPFAIL). A second signal stops at once.
* **No orphans.** Workers die with the runner, whatever killed it (Linux: a parent-death signal
  set with ``prctl``; elsewhere and as a fallback: a thread polling the parent's pid).
* **Disk faults.** A full disk or an unwritable directory while writing a record or a
  checkpoint stops the sweep with one :class:`~bgnorm.repro.store.DiskFaultError` naming the
  file and the fix (exit status 74); finished records are kept. Checkpoints carry their size
  and SHA-256; a damaged one is moved aside with a log line and the cell resumes from the
  previous good checkpoint (kept as ``checkpoint.prev.pt``) or restarts from step 0.

Distributed runs (``torchrun``) take no cell locks and keep the default signal handling: run one
distributed command per directory.

Before the first cell starts, :func:`check_environment` checks what every cell needs (the
``[repro]`` extra installed, the device available, each task's data present and well-formed:
:attr:`Task.check <bgnorm.repro.api.Task>`) and raises one ``ValueError`` naming the
problem and the fix, instead of one traceback per failed cell.

Shards: ``shard=(i, n)`` takes every n-th cell of the full grid (in grid order, starting at the
i-th), writes ``results-shard-i-of-n.jsonl``, and skips cells any store in ``DIR`` already has;
:func:`render_report` merges all stores.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import io
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

import torch

from ..layers import AUTO
from . import dist as _dist
from .api import CellStopped, Diverged, Record, Task
from .report import (
    LONGER_TOLERANCE,
    attach_longer,
    curves_section,
    training_problem,
    write_report,
)
from .store import (
    DISK_ERRNOS,
    CellLock,
    DiskFaultError,
    RecordedIds,
    ResultStore,
    cell_id,
    config_identity,
    describe_holder,
    disk_fault,
    finished_at,
    read_records,
    run_meta,
    store_path,
)
from .tasks.base import TASKS, get_task

__all__ = [
    "EXIT_DISK_FAULT",
    "EXIT_PREEMPTED",
    "REPRO_MODULES",
    "LocalCellContext",
    "RunOptions",
    "RunSummary",
    "SweepInterrupted",
    "SweepPreempted",
    "available_cores",
    "check_environment",
    "missing_modules",
    "plan_cells",
    "scale_lengths",
    "render_report",
    "run_sweep",
    "select_shard",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: The checkpoint before the last one, kept so that a damaged last one costs little.
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
#: Exit status of a sweep stopped by SIGTERM/SIGINT (EX_TEMPFAIL): resumable, requeue it.
EXIT_PREEMPTED = 75
#: Exit status of a sweep stopped by a full disk or an unwritable directory (EX_IOERR).
EXIT_DISK_FAULT = 74
# A checkpoint file is torch.save's bytes followed by this trailer: magic, size, SHA-256.
_TRAILER_MAGIC = b"BGNCKPT1"
_TRAILER_SIZE = len(_TRAILER_MAGIC) + 8 + 32
#: The modules of the ``[repro]`` extra: import name -> the package that installs it.
REPRO_MODULES = {"matplotlib": "matplotlib", "mlxtend": "mlxtend", "sklearn": "scikit-learn",
                 "tqdm": "tqdm", "PIL": "pillow"}


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep; :func:`run_sweep` has printed how to resume it."""


class SweepPreempted(SweepInterrupted):
    """A SIGTERM or SIGINT stopped a sweep gracefully: the running cells checkpointed (within
    the grace period), nothing half-done was recorded, and :func:`run_sweep` has printed the
    command that resumes it. ``bgnorm reproduce`` exits with :data:`EXIT_PREEMPTED`."""


class _StopNow(BaseException):
    """A second signal (or the grace period's end in a one-process sweep): stop at once."""


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

    A checkpoint file is ``torch.save``'s bytes followed by their size and SHA-256; the one
    before it is kept as ``checkpoint.prev.pt``. :meth:`load_checkpoint` checks both, moves a
    damaged file aside (``*.corrupt``) with a log line and falls back to the previous good
    checkpoint, or to None (the cell restarts from step 0).

    Args:
        cell_id, config, device: as in the protocol.
        workdir: the cell's scratch directory (created when first needed).
        checkpoint_seconds: :meth:`checkpoint_due` becomes True this long after the last save.
        reporter: ``reporter(kind, cell_id, payload)`` receives ``"progress"`` (dict with
            ``done``, ``total`` and metrics) and ``"log"`` (str) events; progress is throttled
            to ``progress_seconds``.
        stop: ``stop() -> bool``: True once the runner asks the cell to stop (a SIGTERM); then
            :meth:`checkpoint_due` is True and the next :meth:`save_checkpoint` saves and
            raises :class:`~bgnorm.repro.api.CellStopped`.
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
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.cell_id = cell_id
        self.config = config
        self.device = device
        self.workdir = Path(workdir)
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.reporter = reporter
        self.progress_seconds = progress_seconds
        self.stop = stop
        self._last_save = time.monotonic()
        self._last_progress = 0.0
        #: False on the non-zero ranks of a distributed run: saving is a no-op there.
        self.writable = True

    @property
    def checkpoint_path(self) -> Path:
        """Where the checkpoint lives."""
        return self.workdir / CHECKPOINT_NAME

    def stop_requested(self) -> bool:
        """True once the runner asked this cell to checkpoint and stop."""
        return self.stop is not None and bool(self.stop())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with ``state`` (temp file, fsync, os.replace; the
        previous one becomes ``checkpoint.prev.pt``).

        Raises :class:`~bgnorm.repro.store.DiskFaultError` when the disk is full or the
        directory unwritable, and :class:`~bgnorm.repro.api.CellStopped` after the save when
        the runner asked the cell to stop.
        """
        if self.writable:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            payload = buffer.getvalue()
            trailer = (_TRAILER_MAGIC + len(payload).to_bytes(8, "little")
                       + hashlib.sha256(payload).digest())
            tmp = self.workdir / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as fh:
                    fh.write(payload)
                    fh.write(trailer)
                    fh.flush()
                    os.fsync(fh.fileno())
                if self.checkpoint_path.is_file():
                    os.replace(self.checkpoint_path, self.workdir / PREVIOUS_CHECKPOINT_NAME)
                os.replace(tmp, self.checkpoint_path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)  # a partial file only takes the space it lacks
                if exc.errno in DISK_ERRNOS:
                    raise disk_fault(exc, self.checkpoint_path,
                                     f"the checkpoint of cell {self.cell_id}") from exc
                raise
            try:  # make the rename itself durable
                dfd = os.open(self.workdir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:  # pragma: no cover - e.g. platforms without directory fds
                pass
        self._last_save = time.monotonic()
        if self.stop_requested():
            raise CellStopped(f"cell {self.cell_id} checkpointed and stopped on request")

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last good checkpoint (``weights_only=True``, tensors on the CPU), or None."""
        previous = self.workdir / PREVIOUS_CHECKPOINT_NAME
        for path in (self.checkpoint_path, previous):
            if not path.is_file():
                continue
            state, problem = _read_checkpoint(path)
            if state is not None:
                if path == previous:
                    self.log(f"resuming from the previous checkpoint {path}")
                return state
            fallback = ("resuming from the previous checkpoint"
                        if path != previous and previous.is_file()
                        else "the cell restarts from step 0")
            self.log(f"the checkpoint {path} is damaged ({problem}); moved to "
                     f"{path.name}.corrupt, {fallback}")
            if self.writable:
                try:
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                except OSError:  # pragma: no cover - e.g. a read-only directory
                    pass
        return None

    def checkpoint_due(self) -> bool:
        """True once ``checkpoint_seconds`` have passed since the last save (or the start), or
        once the runner asked the cell to stop."""
        if self.stop_requested():
            return True
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


def _read_checkpoint(path: Path) -> tuple[dict[str, Any] | None, str]:
    """``(state, "")`` for a good checkpoint file, ``(None, what is wrong)`` for a damaged one."""
    data = path.read_bytes()
    if len(data) >= _TRAILER_SIZE and data[-_TRAILER_SIZE:][:len(_TRAILER_MAGIC)] == \
            _TRAILER_MAGIC:
        trailer = data[-_TRAILER_SIZE:]
        size = int.from_bytes(trailer[len(_TRAILER_MAGIC):len(_TRAILER_MAGIC) + 8], "little")
        payload = data[:-_TRAILER_SIZE]
        if size != len(payload):
            return None, f"{len(payload)} bytes where {size} were written"
        if hashlib.sha256(payload).digest() != trailer[-32:]:
            return None, "its SHA-256 does not match"
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True), ""
    if _TRAILER_MAGIC in data[-2 * _TRAILER_SIZE:]:
        return None, "its size and checksum trailer is cut"
    # No trailer: written by an older version of the suite (no checksum then), or cut before
    # the trailer: then torch.load finds the zip archive incomplete (or, cut exactly at the
    # trailer, whole).
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), ""
    except Exception as exc:  # a truncated zip, garbage: whatever torch.load says
        return None, f"no size and checksum, and torch.load fails: {type(exc).__name__}"


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def scale_lengths(config: Mapping[str, Any], factor: int) -> dict[str, Any]:
    """``config`` with every training length (:data:`~bgnorm.repro.presets.LENGTH_KEYS`:
    epochs, steps, warm-up steps, CAN's loop steps, NAS's search and evaluation steps) times
    ``factor``, nothing else changed: the same cell trained ``factor`` times longer (the
    convergence check, ``--length-factor``). A warm-up given in epochs stays as it is, and the
    schedules, stated as fractions of training or computed from the total, stretch with it.

    Example:
        >>> scale_lengths({"task": "adversarial", "steps": 120, "lr_warmup_steps": 12,
        ...                "lr": 0.01}, 3)
        {'task': 'adversarial', 'steps': 360, 'lr_warmup_steps': 36, 'lr': 0.01}
    """
    from .presets import LENGTH_KEYS

    out = dict(config)
    for key in LENGTH_KEYS:
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = value * int(factor)
    return out


def plan_cells(
    tasks: Sequence[str], preset: str, overrides: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """``(cell_id, config)`` for every cell of ``tasks`` at ``preset``, in grid order, without
    duplicates; with ``overrides["length_factor"]`` = k, every cell trained k times longer
    (:func:`scale_lengths`).

    Raises ``ValueError`` for an option or ``--set`` key no task of ``tasks`` applies
    (:func:`~bgnorm.repro.presets.check_overrides`), and for a length factor on a task whose
    cells state no training length; each task receives the options it applies
    (:func:`~bgnorm.repro.presets.task_overrides`).
    """
    from .presets import LENGTH_KEYS, check_overrides, task_overrides

    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    selected = [get_task(name) for name in tasks]
    check_overrides(selected, overrides)
    factor = int(overrides.get("length_factor") or 1)
    if factor < 1:
        raise ValueError(f"--length-factor must be >= 1, got {factor}")
    for task in selected:
        name = task.name
        if preset not in task.presets:
            raise ValueError(
                f"task {name!r} has no preset {preset!r}; its presets: {', '.join(task.presets)}"
            )
        for config in task.cells(preset, task_overrides(task, overrides)):
            if config.get("task") != name:
                raise ValueError(f"task {name!r} produced a cell of task {config.get('task')!r}")
            if factor != 1:
                scaled = scale_lengths(config, factor)
                if scaled == config:
                    raise ValueError(
                        f"--length-factor: the {name} task's cells state no training length "
                        f"({', '.join(LENGTH_KEYS)}); train it longer with --set instead")
                config = scaled
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

_CONN: Any = None  # this worker's end of its pipe to the runner
_STOP: Any = None  # the runner's stop flag (a shared byte, read without a lock)
_LOCAL_STOP = threading.Event()  # a SIGTERM sent to this worker itself
_PR_SET_PDEATHSIG = 1


def _init_worker(threads: int, conn: Any, stop: Any = None, parent: int | None = None) -> None:
    global _CONN, _STOP
    _CONN, _STOP = conn, stop
    if parent is not None:
        _die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the runner decides what the workers do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGTERM sent to a worker itself (a scheduler signalling every process of the job):
    # checkpoint the cell at its next step and stop it, as the runner would ask.
    signal.signal(signal.SIGTERM, lambda signum, frame: _LOCAL_STOP.set())
    torch.set_num_threads(threads)


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when the runner (pid ``parent``) dies, whatever killed it."""
    if sys.platform.startswith("linux"):
        try:  # the kernel kills this process when its parent exits
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread below
            pass
    if os.getppid() != parent:  # the runner died before the line above
        os._exit(3)
    # Elsewhere (and as a second line of defence): poll the parent's pid. An idle worker
    # blocks in the pool's queue, whose write end it holds itself, so it would never see EOF.
    threading.Thread(target=_watch_parent, args=(parent,), name="bgnorm-parent-watch",
                     daemon=True).start()


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(3)


def _pipe_reporter(kind: str, cid: str, payload: Any) -> None:
    if _CONN is not None:
        try:
            _CONN.send(("event", kind, os.getpid(), cid, payload))
        except Exception:  # pragma: no cover - a closed pipe (the runner is gone) or pickling
            pass


def _execute(job: dict[str, Any], reporter: Callable[[str, str, Any], None] | None,
             stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run one cell; returns ``{status, result, seconds}``: status "ok"/"diverged"/"failed",
    "stopped" (checkpointed on request), "not started" (a stop came first) or "disk" (a
    :class:`~bgnorm.repro.store.DiskFaultError`, its message in ``error``)."""
    if stop is not None and stop():
        return {"status": "not started"}
    config = job["config"]
    ctx = LocalCellContext(
        job["cell_id"], config, torch.device(job["device"]), job["workdir"],
        job["checkpoint_seconds"], reporter, stop=stop,
    )
    env = _dist.active()
    ctx.writable = env is None or env.is_main
    if reporter is not None:
        reporter("start", job["cell_id"], job.get("label", job["cell_id"]))
    t0 = time.perf_counter()
    try:
        result = get_task(config["task"]).run(config, ctx)
        status = "ok"
    except CellStopped:
        return {"status": "stopped", "seconds": time.perf_counter() - t0}
    except Diverged as exc:
        result = {"error": str(exc), **exc.partial}
        status = "diverged"
    except DiskFaultError as exc:
        return {"status": "disk", "error": str(exc), "seconds": time.perf_counter() - t0}
    except Exception:  # reported by the parent; the sweep goes on
        return {"status": "failed", "error": traceback.format_exc(),
                "seconds": time.perf_counter() - t0}
    return {"status": status, "result": result, "seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads()}


def _worker_stop() -> bool:
    return _LOCAL_STOP.is_set() or (_STOP is not None and bool(_STOP.value))


def _worker_loop(conn: Any, threads: int, stop: Any, parent: int) -> None:
    """A worker process: run the cells the runner sends on ``conn`` until it sends None (or
    goes away), answering each with ``("outcome", cell id, outcome)``; progress and log events
    go on the same pipe. Each worker has a pipe of its own, so a worker killed in the middle of
    a message tears only its own pipe."""
    _init_worker(threads, conn, stop, parent)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        outcome = _execute(job, _pipe_reporter, _worker_stop)
        try:
            conn.send(("outcome", job["cell_id"], outcome))
        except (EOFError, OSError):
            return
        except Exception:  # a result that does not pickle: the cell failed, say why
            conn.send(("outcome", job["cell_id"],
                       {"status": "failed", "error": traceback.format_exc()}))


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
    """What ``bgnorm reproduce`` asks for (see :func:`run_sweep`).

    ``grace_seconds``: after a SIGTERM/SIGINT, how long the running cells get to checkpoint
    and stop. ``lease_seconds``: how long a cell's lock stays valid without a heartbeat (other
    hosts take the cell over after that). ``resume_command``: the command line printed when a
    signal stops the sweep.
    """

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
    grace_seconds: float = 20.0
    lease_seconds: float = 120.0
    resume_command: str | None = None


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
    #: cells recorded from another cell's training run (the same computation, see
    #: :func:`same_run_key`), counted in ``finished``/``diverged`` too
    shared: int = 0
    #: Cells another runner on the same directory recorded while this one ran.
    recorded_elsewhere: int = 0
    #: Cells whose lock this runner took over from a runner that died or stopped renewing it.
    taken_over: int = 0
    #: Cells checkpointed and stopped by a signal (they resume on the next run).
    stopped: int = 0

    @property
    def ok(self) -> bool:
        """No cell failed."""
        return not self.failed


def _label(config: Mapping[str, Any]) -> str:
    parts = [config["task"], str(config.get("network", "")), str(config.get("norm", ""))]
    for key, fmt in (("role", "({})"), ("batch_size", "b={}"), ("workers", "W={}"),
                     ("num_groups", "G={}"), ("gn_groups", "G={}"),
                     ("gn_channels_per_group", "C/G={}"),
                     ("final_size", "last {0}x{0}"), ("seed", "seed={}")):
        if config.get(key) is not None and not (key == "workers" and config[key] == 1):
            parts.append(fmt.format(config[key]))
    return " ".join(p for p in parts if p)


def same_run_key(config: Mapping[str, Any]) -> str:
    """The id of what ``config``'s cell computes (:attr:`Task.computation
    <bgnorm.repro.api.Task>`): two cells with the same key are one training run, which the
    sweep trains once and records under both ids."""
    try:  # get_task registers the built-in tasks on first use
        task: Task | None = get_task(str(config.get("task")))
    except ValueError:  # a record of a task this version does not have
        task = None
    computation = getattr(task, "computation", None)
    comp = (computation(config) if computation is not None
            else {k: v for k, v in config.items() if k != "task"})
    return cell_id(comp)


def _same_run_plan(
    todo: Sequence[tuple[str, dict[str, Any]]], recorded: Mapping[str, str]
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, list[tuple[str, dict[str, Any]]]],
           list[tuple[str, dict[str, Any], str]]]:
    """Split ``todo`` into the cells to train, the cells recorded from a trained cell's outcome
    (``{cell to train: [followers]}``) and the cells recorded from an existing record
    (``(cell id, config, recorded cell id)``); ``recorded`` maps same-run keys of the store's
    records to their cell ids."""
    train: list[tuple[str, dict[str, Any]]] = []
    followers: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    copies: list[tuple[str, dict[str, Any], str]] = []
    lead: dict[str, str] = {}
    for cid, cfg in todo:
        key = same_run_key(cfg)
        if key in recorded:
            copies.append((cid, cfg, recorded[key]))
        elif key in lead:
            followers.setdefault(lead[key], []).append((cid, cfg))
        else:
            lead[key] = cid
            train.append((cid, cfg))
    return train, followers, copies


class _Stop:
    """The runner's stop state: set by the first SIGTERM/SIGINT (or a disk fault)."""

    def __init__(self, grace_seconds: float, shared: Any = None) -> None:
        self.event = threading.Event()
        # The flag the worker processes read (a multiprocessing RawValue): a byte in shared
        # memory, read and written without a lock that a killed worker could leave taken.
        self.shared = shared
        self.grace_seconds = float(grace_seconds)
        self.reason: str | None = None
        self.deadline = float("inf")
        self.signals = 0

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.deadline = time.monotonic() + self.grace_seconds
            if self.shared is not None:
                self.shared.value = 1
            self.event.set()


class _Cells:
    """Hands out this runner's cells: claims each before it runs, skips the ones another runner
    holds and comes back to them at the end, renews the held claims (the heartbeat)."""

    def __init__(self, order: Sequence[str], out: Path, labels: Mapping[str, str],
                 lease_seconds: float, claims: bool, say: Callable[[str], None],
                 summary: RunSummary) -> None:
        self.queue = list(order)
        self.out = out
        self.labels = labels
        self.lease_seconds = float(lease_seconds)
        self.claims = claims
        self.say = say
        self.summary = summary
        # the store's cell ids, read incrementally: a claim re-checks them after its lock is
        # taken (another runner may have recorded the cell just before), reading only what was
        # appended since the last check
        self.recorded = RecordedIds(out)
        self.held_elsewhere: dict[str, dict[str, Any] | None] = {}
        self.locks: dict[str, CellLock] = {}
        self._guard = threading.Lock()
        self._halt = threading.Event()
        self._heart: threading.Thread | None = None
        self._waiting_said = 0.0
        # How often to look again at cells held by other runners.
        self.poll_seconds = max(0.05, min(2.0, self.lease_seconds / 8))

    def pending(self) -> bool:
        return bool(self.queue or self.held_elsewhere)

    def _claim(self, cid: str) -> bool:
        lock = CellLock(self.out / "cells" / cid, self.lease_seconds)
        try:
            acquired = lock.acquire()
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise disk_fault(exc, lock.path, f"the lock of cell {cid}") from exc
            raise
        if not acquired:
            if cid not in self.held_elsewhere:
                self.say(f"{self.labels[cid]}: held by {describe_holder(lock.holder)}; "
                         "coming back to it at the end")
            self.held_elsewhere[cid] = lock.holder
            return False
        # Recorded by another runner just before its lock went: nothing to train.
        self.recorded.refresh()
        if cid in self.recorded:
            lock.release()
            self.summary.recorded_elsewhere += 1
            try:
                lock.folder.rmdir()
            except OSError:
                pass
            return False
        if lock.took_over is not None:
            self.summary.taken_over += 1
            self.say(f"{self.labels[cid]}: took over the lock of "
                     f"{describe_holder(lock.took_over)} (its holder is gone)")
        with self._guard:
            self.locks[cid] = lock
        return True

    def next(self) -> str | None:
        """The next cell this runner now holds, or None when none is free right now."""
        if not self.claims:
            return self.queue.pop(0) if self.queue else None
        if self.queue:
            self.recorded.refresh()
        while self.queue:
            cid = self.queue.pop(0)
            if cid in self.recorded:
                self.summary.recorded_elsewhere += 1
                continue
            if self._claim(cid):
                return cid
        if self.held_elsewhere:  # at the end: the cells other runners held
            self.recorded.refresh()
            for cid in list(self.held_elsewhere):
                if cid in self.recorded:
                    del self.held_elsewhere[cid]
                    self.summary.recorded_elsewhere += 1
                elif self._claim(cid):
                    del self.held_elsewhere[cid]
                    return cid
        return None

    def wait(self, stop: _Stop) -> None:
        """Wait a little for the cells other runners hold (saying so now and then)."""
        now = time.monotonic()
        if now - self._waiting_said > 300:
            self._waiting_said = now
            holders = sorted({describe_holder(h) for h in self.held_elsewhere.values()})
            self.say(f"waiting for {len(self.held_elsewhere)} cell(s) held by other runners "
                     f"({'; '.join(holders)}): each is skipped once recorded, or taken over "
                     "if its runner stops or dies")
        stop.event.wait(self.poll_seconds)

    def done(self, cid: str, removed: bool = False) -> None:
        """Give up the claim on ``cid`` (``removed``: its folder, lock included, is gone)."""
        with self._guard:
            lock = self.locks.pop(cid, None)
        if lock is not None:
            lock.forget() if removed else lock.release()

    def release_all(self) -> None:
        for cid in list(self.locks):
            self.done(cid)

    def start_heartbeat(self) -> None:
        if not self.claims:
            return
        self._heart = threading.Thread(target=self._beat, name="bgnorm-heartbeat", daemon=True)
        self._heart.start()

    def stop_heartbeat(self) -> None:
        self._halt.set()
        if self._heart is not None:
            self._heart.join(5)

    def _beat(self) -> None:
        interval = max(0.02, self.lease_seconds / 4)
        while not self._halt.wait(interval):
            with self._guard:
                held = list(self.locks.items())
            for cid, lock in held:
                try:
                    if lock.renew():
                        continue
                except OSError:  # a full disk: keep the lease if we can, try again later
                    continue
                if lock.held:
                    lock.forget()
                    self.say(f"{self.labels[cid]}: lost its lock (taken over after this runner "
                             "did not renew it within --lease-seconds); whichever runner "
                             "finishes it first records it, once")


def run_sweep(options: RunOptions) -> RunSummary:
    """Run (or resume) the sweep described by ``options``; returns a :class:`RunSummary`.

    Records go to ``store_path(out_dir, shard)``; checkpoints and the cells' locks to
    ``out_dir/cells/<id>/`` (deleted once the cell is recorded unless ``keep_checkpoints``).

    Raises:
        SweepPreempted: a SIGTERM/SIGINT stopped the sweep (the resume command is printed).
        DiskFaultError: a full disk or an unwritable directory (finished records are kept).
    """
    t_start = time.perf_counter()
    env = _dist.active()
    main = env is None or env.is_main
    out = Path(options.out_dir)
    if main:  # other ranks never write files
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise disk_fault(exc, out, "the run directory") from exc
            raise
    cells = plan_cells(options.tasks, options.preset, options.overrides)
    mine = select_shard(cells, options.shard)
    stored = read_records(out) if main else []
    by_id = {r.cell_id: r for r in stored}
    done = set(by_id)
    # a cell computing what a recorded cell computed is recorded from it (diverged included)
    recorded = {}
    for r in stored:
        recorded.setdefault(same_run_key(r.config), r.cell_id)
    # Every rank must train the same cells: rank 0's view of the store decides.
    if env is not None:
        done, recorded = _dist.broadcast_object((done, recorded), "planning the sweep")
    todo = [(cid, cfg) for cid, cfg in mine if cid not in done]
    to_train, followers, copies = _same_run_plan(todo, recorded)
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
    todo = to_train

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
                      f"running the other {len(mine) - summary.skipped}")
    shared = len(copies) + sum(map(len, followers.values()))
    if shared and main:
        display.write(f"{shared} cell(s) are the same training run as another cell (e.g. a G "
                      "sweep's cell at the paper's G): trained once, recorded under both")
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
    # Locks and graceful signals for a runner of its own; a distributed run is one runner
    # spread over ranks that must train the same cells in the same order: neither.
    own = env is None
    pool_mode = own and jobs > 1 and bool(jobs_spec)
    mp_ctx = mp.get_context("spawn") if pool_mode else None
    stop = _Stop(options.grace_seconds,
                 mp_ctx.RawValue("b", 0) if mp_ctx is not None else None)
    handout = _Cells(list(jobs_spec), out, {c: s["label"] for c, s in jobs_spec.items()},
                     options.lease_seconds, claims=own and main, say=display.write,
                     summary=summary)
    fault: list[DiskFaultError] = []

    def record_same_run(cid: str, cfg: dict[str, Any], source: Record) -> None:
        """Record ``cid`` with the outcome of ``source``, the same training run."""
        result = dict(source.result)
        result["same_run_as"] = result.get("same_run_as") or source.cell_id
        # the training's provenance, but this record's own time: a policy cell recorded now
        # from an older run must supersede the record an older policy made of the same cell
        # (supersede_policy_records orders by finished_at)
        meta = dict(source.meta)
        meta["trained_at"] = meta.get("trained_at") or meta.get("finished_at")
        meta["finished_at"] = finished_at()
        rec = Record(cell_id=cid, config=cfg, status=source.status, result=result,
                     seconds=0.0, meta=meta)
        store.append(rec)
        summary.shared += 1
        if rec.status == "ok":
            summary.finished += 1
        else:
            summary.diverged += 1
        display.write(f"recorded {_label(cfg)}: the same run as {result['same_run_as']}")

    if main:
        for cid, cfg, source_id in copies:
            record_same_run(cid, cfg, by_id[source_id])

    def record(cid: str, outcome: dict[str, Any]) -> None:
        cfg = jobs_spec[cid]["config"]
        label = jobs_spec[cid]["label"]
        status = outcome["status"]
        if status in ("stopped", "not started"):
            summary.stopped += status == "stopped"
            handout.done(cid)
            return
        if status == "disk":
            handout.done(cid)
            fault.append(DiskFaultError(0, outcome["error"], jobs_spec[cid]["workdir"]))
            stop.request("a disk fault")
            return
        if status == "failed":
            handout.done(cid)
            summary.failed.append((label, outcome["error"]))
            if env is not None and not main:
                print(f"rank {env.rank}: FAILED {label}\n{outcome['error']}", file=sys.stderr,
                      flush=True)
            else:
                display.cell_done(f"FAILED {label}\n{outcome['error']}")
            return
        if not main:
            for _ in range(1 + len(followers.get(cid, ()))):
                if status == "ok":
                    summary.finished += 1
                else:
                    summary.diverged += 1
            return
        rec = Record(
            cell_id=cid, config=cfg, status=status, result=outcome["result"],
            seconds=float(outcome["seconds"]),
            meta=run_meta(device=str(device), threads=outcome.get("threads", threads),
                          jobs=jobs, preset=options.preset, shard=options.shard),
        )
        if env is not None:
            rec.meta["world_size"] = env.world_size
            rec.meta["sync_norm"] = env.sync_norm
        try:
            appended = store.append(rec)
        except DiskFaultError as exc:  # its checkpoint stays: the rerun records it quickly
            handout.done(cid)
            fault.append(exc)
            stop.request("a disk fault")
            return
        # The record is durable before the lock goes (with the folder): a runner that claims
        # the cell after this sees the record.
        if options.keep_checkpoints:
            handout.done(cid)
        else:
            shutil.rmtree(out / "cells" / cid, ignore_errors=True)
            handout.done(cid, removed=True)
        if not appended:  # another runner recorded it first (its lock was lost, see _beat)
            summary.recorded_elsewhere += 1
            return
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
        for fcid, fcfg in followers.get(cid, ()):
            record_same_run(fcid, fcfg, rec)

    restore = _install_signal_handlers(stop, inline=not pool_mode) if own else None
    handout.start_heartbeat()
    stopped_now = False
    try:
        if not pool_mode:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                reporter = ((lambda k, c, p: display.event(k, os.getpid(), c, p))
                            if main else None)
                while not stop.requested:
                    cid = handout.next()
                    if cid is None:
                        if not handout.pending():
                            break
                        handout.wait(stop)
                        continue
                    outcome = _execute(jobs_spec[cid], reporter,
                                       stop.event.is_set if own else None)
                    record(cid, outcome)
                    if env is not None and outcome["status"] == "failed":
                        print(f"rank {env.rank}: stopping the sweep after a failed cell (if a "
                              "rank died, the process group is unusable); run the same command "
                              "again to resume", file=sys.stderr, flush=True)
                        break
            finally:
                torch.set_num_threads(prev)
        else:
            _run_pool(jobs_spec, jobs, threads, display, record, handout, stop, mp_ctx)
    except _StopNow:
        stopped_now = True
    except KeyboardInterrupt:  # no handler installed (a distributed run, another thread)
        display.close()
        print(f"\ninterrupted: {summary.finished + summary.diverged} cells recorded; run the "
              "same command again to resume", file=sys.stderr)
        raise SweepInterrupted() from None
    finally:
        handout.stop_heartbeat()
        handout.release_all()
        if restore is not None:
            restore()
    display.close()
    summary.seconds = time.perf_counter() - t_start
    if fault:
        raise fault[0]
    if stop.requested:
        resume = options.resume_command or "the same command"
        how = ("at once, without waiting for the running cells" if stopped_now else
               f"{summary.stopped} running cell(s) checkpointed")
        print(f"\nstopped by {stop.reason} ({how}): {summary.finished + summary.diverged} "
              "cells recorded in this run, nothing half-done recorded; resume with:\n"
              f"  {resume}", file=sys.stderr, flush=True)
        raise SweepPreempted()
    return summary


def _install_signal_handlers(stop: _Stop, inline: bool) -> Callable[[], None] | None:
    """SIGTERM/SIGINT -> ``stop.request``; a second one -> :class:`_StopNow`. In a one-process
    sweep (``inline``) an alarm raises :class:`_StopNow` when the grace period ends. Returns
    the function that restores the previous handlers (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_signal(signum: int, frame: Any) -> None:
        stop.signals += 1
        name = signal.Signals(signum).name
        if stop.signals > 1:
            raise _StopNow(name)
        stop.request(name)
        os.write(2, (f"\nbgnorm: {name}: no new cells; the running ones checkpoint at their "
                     f"next step (up to {stop.grace_seconds:g} s, --grace-seconds); a second "
                     "signal stops at once\n").encode())
        if inline and hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, max(stop.grace_seconds, 0.001))

    def on_alarm(signum: int, frame: Any) -> None:
        if stop.requested:
            raise _StopNow("the grace period's end")

    wanted = [signal.SIGTERM, signal.SIGINT]
    if inline and hasattr(signal, "SIGALRM"):
        wanted.append(signal.SIGALRM)
    previous = {}
    for sig in wanted:
        previous[sig] = signal.signal(sig, on_alarm if sig == getattr(signal, "SIGALRM", None)
                                      else on_signal)

    def restore() -> None:
        if inline and hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


class _Worker:
    """One worker process of a sweep and the runner's end of its pipe."""

    def __init__(self, ctx: Any, threads: int, stop: _Stop) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_loop, name="bgnorm-worker", daemon=True,
                                   args=(child, threads, stop.shared, os.getpid()))
        self.process.start()
        child.close()  # the worker holds the only other end: its death reads as EOF here
        self.cid: str | None = None

    def give(self, job: dict[str, Any]) -> bool:
        """Send the worker ``job``; False if it is gone."""
        try:
            self.conn.send(job)
        except OSError:
            return False
        self.cid = job["cell_id"]
        return True

    def messages(self) -> tuple[list[tuple[Any, ...]], bool]:
        """The messages waiting on the pipe, and whether the worker is gone (the pipe closed,
        or torn in the middle of a message by the worker's death)."""
        got = []
        try:
            while self.conn.poll():
                got.append(self.conn.recv())
        except (EOFError, OSError):
            return got, True
        return got, False

    def death(self) -> str:
        """How the (dead) worker ended, for the failed cell's report."""
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"killed by {name}" + (" (the OOM killer or kill -9?)"
                                         if -code == signal.SIGKILL else "")
        else:
            how = f"exit status {code}"
        return (f"the worker process (pid {self.process.pid}) running this cell died: {how}. "
                "Its last checkpoint is kept: run the same command again to resume the cell.")

    def end(self, kill: bool) -> None:
        """Ask an idle worker to exit, or kill a busy one; ``join`` waits for it."""
        if kill or self.cid is not None:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass

    def join(self) -> None:
        self.process.join(5)
        if self.process.exitcode is None:  # pragma: no cover - did not exit when asked
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def _run_pool(jobs_spec: dict[str, dict[str, Any]], jobs: int, threads: int, display: _Display,
              record: Callable[[str, dict[str, Any]], None], handout: _Cells, stop: _Stop,
              ctx: Any) -> None:
    """Run the cells in up to ``jobs`` worker processes, handing each one out only when a
    worker is free (claimed just before), until all are done or a stop was requested.

    A worker that dies (``kill -9``, the OOM killer) fails only the cell it was running (its
    checkpoint stays for the rerun); the other workers go on, and a new worker takes its
    place for the next cell."""
    workers: list[_Worker] = []
    clean = False
    try:
        while True:
            while not stop.requested:
                worker = next((w for w in workers if w.cid is None), None)
                if worker is None and len(workers) >= jobs:
                    break
                cid = handout.next()
                if cid is None:
                    break
                if worker is None:
                    worker = _Worker(ctx, threads, stop)
                    workers.append(worker)
                if not worker.give(jobs_spec[cid]):  # died while idle: a new one takes it
                    workers.remove(worker)
                    worker.join()
                    worker = _Worker(ctx, threads, stop)
                    workers.append(worker)
                    if not worker.give(jobs_spec[cid]):
                        workers.remove(worker)
                        worker.join()
                        record(cid, {"status": "failed", "error": worker.death()})
            busy = [w for w in workers if w.cid is not None]
            if not busy:
                if stop.requested or not handout.pending():
                    break
                handout.wait(stop)  # only cells held by other runners are left
                continue
            wait_connections([w.conn for w in workers] + [w.process.sentinel for w in workers],
                             timeout=0.1)
            for worker in list(workers):
                got, gone = worker.messages()
                if not gone and worker.process.exitcode is not None:
                    got += worker.messages()[0]  # what it sent before it died
                    gone = True
                for message in got:
                    if message[0] == "event":
                        display.event(*message[1:])
                    else:
                        _, cid, outcome = message
                        worker.cid = None
                        record(cid, outcome)
                if gone:
                    workers.remove(worker)
                    if worker.cid is not None:
                        cid, worker.cid = worker.cid, None
                        record(cid, {"status": "failed", "error": worker.death()})
                    worker.join()
            if stop.requested and any(w.cid is not None for w in workers) and \
                    time.monotonic() > stop.deadline:
                display.write(f"the grace period ({stop.grace_seconds:g} s) is over: stopping "
                              f"{sum(w.cid is not None for w in workers)} cell(s) at their last "
                              "checkpoint")
                break
        clean = True
    finally:
        # a second signal, the grace period's end, an error: kill the busy workers
        for worker in workers:
            if worker.cid is not None:
                handout.done(worker.cid)
            worker.end(kill=not clean)
        for worker in workers:
            worker.join()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def supersede_policy_records(records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """``(kept, superseded)``: the records of ``num_groups="auto"`` cells that a newer record
    of the same cell under another policy replaces are set apart.

    An auto cell's id holds the G the policy gave its layers (``layer_groups``), so when
    :func:`bgnorm.auto_groups` changes (or for records made before cells were stamped), running
    the sweep again records the same cell under a new id. Both would fill the same table entry
    and be averaged as if they were two seeds; the report keeps the newest (by
    ``meta["finished_at"]``, then store order) and says which it left out.

    Example:
        >>> def rec(cid, groups, when):
        ...     config = {"task": "normalizers", "norm": "bgn", "num_groups": "auto", "seed": 0}
        ...     if groups is not None:
        ...         config["layer_groups"] = groups
        ...     return Record(cid, config, "ok", {}, 1.0, {"finished_at": when})
        >>> kept, old = supersede_policy_records([rec("new", [4, 2], "2026-12-01T04:00:00"),
        ...                                       rec("old", None, "2026-11-29T10:00:00")])
        >>> [r.cell_id for r in kept], [r.cell_id for r in old]
        (['new'], ['old'])
    """
    groups: dict[str, list[tuple[str, int]]] = {}
    for i, r in enumerate(records):
        if r.config.get("num_groups") == AUTO:
            groups.setdefault(config_identity(r.config, ["layer_groups"]), []).append(
                (str(r.meta.get("finished_at") or ""), i))
    drop: set[int] = set()
    for members in groups.values():
        drop.update(i for _, i in sorted(members)[:-1])
    return ([r for i, r in enumerate(records) if i not in drop],
            [records[i] for i in sorted(drop)])


def render_report(out_dir: str | os.PathLike, tasks: Sequence[str] | None = None,
                  longer: Sequence[str | os.PathLike] = ()) -> str:
    """Merge every store in ``out_dir``, render each task's section and write ``report.md``.

    ``tasks`` restricts (and orders) the sections; by default every task with records, in
    registration order. ``longer``: run directories holding some of the same cells trained
    longer (e.g. ``--epochs`` 3x of the cells flagged still improving): those cells'
    convergence flags come from the longer run (:func:`~bgnorm.repro.report.attach_longer`);
    their numbers in the tables stay this run's. Returns the markdown.
    """
    out = Path(out_dir)
    records, superseded = supersede_policy_records(read_records(out))
    checked = 0
    if longer:
        long = supersede_policy_records([r for d in longer for r in read_records(d)])[0]
        records = attach_longer(records, long)
        checked = sum(r.longer is not None for r in records)
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
    if superseded:
        preamble += (
            f" Left out: {len(superseded)} record(s) of `num_groups=\"auto\"` cells that a newer "
            "record of the same cell replaces (made under another G policy, or before the "
            "policy's per-layer G were part of the cell): "
            + ", ".join(f"`{r.cell_id}`" for r in superseded) + ".")
    if longer:
        preamble += (
            f" Convergence of {checked} of them checked against the same cells trained longer "
            f"in {', '.join(f'`{d}`' for d in longer)} (the suite's rule: converged when the "
            f"longer run ends at most {LONGER_TOLERANCE:g} points higher).")
    path = write_report(out, sections, preamble=preamble)
    return path.read_text(encoding="utf-8")
