"""Tasks of the reproduction suite; importing :mod:`._load_all` registers the built-in ones."""

from .base import TASKS, CellContext, Diverged, Record, Task, get_task, register_task

__all__ = ["TASKS", "CellContext", "Diverged", "Record", "Task", "get_task", "register_task"]
