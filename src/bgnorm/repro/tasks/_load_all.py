"""Import every built-in task module so that each registers itself (see base.register_task)."""

import importlib

_MODULES = [
    "classify",        # batch-size, g-sweep, groups (issue: the reproduction suite)
    "adversarial",     # Table 5
    "fewshot",         # Table 6
    "domain",          # Table 7
    "nas",             # Tables 3 and 4
    "mechanism",       # accuracy vs values per statistic (issue 19)
    "transfer",        # g-transfer: the per-layer G policy against a G sweep (issue 15)
    "normalizers",     # which normalizer at which per-worker batch (issue 15)
]

for _name in _MODULES:
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as exc:  # a task module not written yet
        if exc.name != f"{__package__}.{_name}":
            raise

# The listing order (`bgnorm tasks`, the CLI's errors) is this module list's, whichever task
# module happened to be imported first (a test or a user importing one task's module).
from .base import TASKS  # noqa: E402

_RANK = {f"{__package__}.{name}": i for i, name in enumerate(_MODULES)}
_ordered = sorted(TASKS.items(), key=lambda item: _RANK.get(item[1].run.__module__, len(_RANK)))
TASKS.clear()
TASKS.update(_ordered)
