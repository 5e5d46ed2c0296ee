"""The contract between the reproduction runner and its tasks.

A *task* (classification sweeps, adversarial training, few-shot, domain adaptation, NAS) is a
:class:`Task`: it expands a preset into a grid of *cells* (plain JSON-serializable config dicts),
trains/evaluates one cell given a :class:`CellContext`, and renders the finished records into a
markdown section (plus PNG plots) laid out like the paper's tables.

The runner owns everything else: the results store, resuming, sharding, worker processes,
progress bars. A task never writes to the store; it returns its result dict from ``run`` and
persists in-progress state only through ``ctx.save_checkpoint`` / ``ctx.load_checkpoint``.

Data flows one way: CLI -> preset -> cells -> runner -> ``Task.run`` -> store -> ``Task.report``.
This module is the bottom of the suite: the store, the runner, the report, the shared step loop
(:mod:`bgnorm.repro.loop`) and the tasks import it; it imports nothing of the suite. The task
registry (``TASKS``, ``register_task``, ``get_task``) lives with the tasks, in
:mod:`bgnorm.repro.tasks.base`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["CellContext", "CellStopped", "Diverged", "Record", "Task"]


class Diverged(RuntimeError):
    """Raised by a task when training diverges (non-finite loss).

    The runner records the cell with ``status="diverged"`` (shown as "-" in tables, as the
    paper does) instead of failing the sweep. ``partial`` may carry metrics measured so far.
    """

    def __init__(self, message: str, partial: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial = dict(partial or {})


class CellStopped(BaseException):
    """Raised by ``ctx.save_checkpoint`` after a durable save when the runner asked the cell to
    stop (a SIGTERM/SIGINT preempting the sweep, see ``ctx.checkpoint_due``).

    The cell's checkpoint is on disk, so the same command resumes it exactly. A
    ``BaseException`` (like ``KeyboardInterrupt``), so that a task's ``except Exception`` does
    not swallow it: tasks let it propagate to the runner, which records nothing for the cell.
    """


class CellContext(Protocol):
    """What the runner hands to ``Task.run`` for one cell."""

    #: Stable id of the cell (a hash of its canonical config).
    cell_id: str
    #: The cell's full config (JSON-serializable; also stored with the result).
    config: dict[str, Any]
    #: Device to train on (``torch.device("cpu")`` by default, or cuda).
    device: torch.device
    #: Private scratch directory of this cell (checkpoints live here).
    workdir: Path

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically persist ``state`` (tensors, numbers, strings, lists, dicts only)."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last saved state (loaded with ``weights_only=True``), or None."""

    def checkpoint_due(self) -> bool:
        """True when it is time to checkpoint again (time-based, e.g. every 30 s), and at once
        when the runner asks the cell to stop: the next ``save_checkpoint`` then saves and
        raises :class:`CellStopped`. Tasks call it after every step (the shared step loop
        does)."""

    def progress(self, done: int, total: int, **metrics: float) -> None:
        """Report step progress (drives the per-step progress bar)."""

    def log(self, message: str) -> None:
        """A human-readable line for the terminal/log file."""


@dataclass
class Record:
    """One finished cell as the store holds it."""

    cell_id: str
    config: dict[str, Any]
    status: str  # "ok" or "diverged"
    result: dict[str, Any]
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)  # host, torch version, commit, time
    #: the same cell trained longer, when the report was given such a run (``bgnorm report
    #: --longer DIR``, :func:`~bgnorm.repro.report.attach_longer`): its convergence flag is
    #: then the suite's rule (within 1.5 points of the longer run), not the curve's proxy.
    #: Never stored.
    longer: Record | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Task:
    """A reproducible experiment of the suite.

    Attributes:
        name: the ``--task`` name on the command line.
        presets: preset names this task accepts (``smoke``, ``quick``, ``paper``, ...).
        cells: ``cells(preset, overrides) -> list of config dicts``; every config carries at
            least ``task`` and ``seed``. ``overrides`` holds CLI options (data root, device,
            epochs...), already parsed; keys the task does not apply must be ignored (the
            runner refuses them unless another selected task applies them, see ``options``).
            A config's optional ``"runtime"`` dict (data paths, loader workers: how a cell
            runs, not what it computes) is saved with the record but left out of the cell id,
            so shards on machines with different mount points agree on which cells are done.
        run: ``run(config, ctx) -> result dict`` (JSON-serializable metrics). Raises
            :class:`Diverged` on a non-finite loss. Must resume from ``ctx.load_checkpoint()``
            when one exists and must be deterministic on CPU for a fixed config.
        report: ``report(records, out_dir) -> markdown``: tables laid out like the paper's and
            PNG plots written into ``out_dir``; claims checked against the numbers, never
            hard-coded.
        title: a heading for the report section.
        check: ``check(configs) -> list of data locations`` (optional): before any cell
            starts, check that this machine can run these cells (their data present and
            well-formed) and raise ``FileNotFoundError``/``ValueError`` with one message
            naming the problem and the fix if not; return the paths it read (``--data-root``
            must be one of them, or it is not used).
        options: the protocol options (keys of ``overrides`` among
            :data:`bgnorm.repro.presets.OPTIONS`: ``"epochs"``, ``"groups"``...) the task
            applies; an option no selected task applies is refused (exit status 2). None: not
            declared, every option is passed through unchecked.
        settings: the keys ``--set KEY=VALUE`` may change, each with the values the presets
            give it (:func:`bgnorm.repro.presets.preset_settings`); an unknown key or a value
            of the wrong kind is refused. None: not declared, unchecked.
        computation: ``computation(config) -> mapping`` (optional): what a cell computes, for
            finding cells that are the same training run under two names (a G sweep's cell at
            the paper's G is the batch-size table's BGN cell). Cells whose computations are
            equal (compared as cell ids, ``"runtime"`` left out) are trained once; the runner
            records the others with the same result and ``result["same_run_as"]`` naming the
            cell that trained. None: the config without its ``"task"`` key.
    """

    name: str
    presets: tuple[str, ...]
    cells: Callable[[str, Mapping[str, Any]], list[dict[str, Any]]]
    run: Callable[[dict[str, Any], CellContext], dict[str, Any]]
    report: Callable[[list[Record], Path], str]
    title: str = ""
    check: Callable[[Sequence[dict[str, Any]]], list[str]] | None = None
    options: frozenset[str] | None = None
    settings: Mapping[str, tuple[Any, ...]] | None = None
    computation: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
