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
