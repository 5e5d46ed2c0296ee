"""The registry of the suite's tasks; the contract itself (:class:`Task`, :class:`CellContext`,
:class:`Record`, :class:`Diverged`) lives at the bottom of the suite, in :mod:`bgnorm.repro.api`,
and is re-exported here for compatibility.
"""

from __future__ import annotations

from ..api import CellContext, Diverged, Record, Task

__all__ = ["Diverged", "CellContext", "Record", "Task", "TASKS", "register_task", "get_task"]

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (name must be new)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; an unknown name lists the valid ones."""
    from . import _load_all  # noqa: F401  (registers the built-in tasks)

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
