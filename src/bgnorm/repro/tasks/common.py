"""Helpers shared by the tasks of the BGN paper's Tables 3-7 (adversarial, few-shot, domain
adaptation, NAS), so that all of them resolve presets, norms, batches and checkpoints the same
way: :func:`task_preset`, :func:`norm_cell`, :func:`build_with_norm`, :func:`step_batch`,
and report helpers (the step loop itself is :mod:`bgnorm.repro.loop`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import bgnorm

from ..norms import DISPLAY_NAMES, NormSpec, build_normed_model
from ..report import untrained_note
from ..train import BatchCursor, Schedule, derive_seed, standard_layout
from .base import Record

__all__ = [
    "NORMS",
    "NORM_SETTINGS",
    "TASK_OPTIONS",
    "build_with_norm",
    "check_tensor_data",
    "diverged_note",
    "load_tensors",
    "lr_schedule",
    "norm_cell",
    "norm_label",
    "norm_order",
    "step_batch",
    "task_preset",
]

#: The norms of the BGN paper's Tables 3-7, in its order.
NORMS = ["bn", "in", "ln", "gn", "pn", "bgn"]
#: The protocol options :func:`task_preset` applies (a task that cannot apply one of them, e.g.
#: ``dataset`` for domain adaptation, leaves it out of its ``Task.options``).
TASK_OPTIONS = frozenset({"dataset", "data_root", "image_size", "norms", "seeds"})
#: Settings :func:`norm_cell` reads besides a task's preset keys: BGN's G (default: the paper's
#: G for the batch size) and GN's groups (default 32).
NORM_SETTINGS = {"num_groups": bgnorm.paper_groups(32), "gn_groups": bgnorm.DEFAULT_NUM_GROUPS}


# --------------------------------------------------------------------------------------------
# Helpers shared by the tasks of Tables 3-7
# --------------------------------------------------------------------------------------------


def task_preset(presets: Mapping[str, Mapping[str, Any]], preset: str,
                overrides: Mapping[str, Any], options: frozenset[str] = TASK_OPTIONS,
                task: str = "") -> dict[str, Any]:
    """A deep copy of ``presets[preset]`` with the CLI overrides applied, every one of them or
    refused.

    Applied: the protocol options in ``options`` (the task's ``Task.options``; by default
    :data:`TASK_OPTIONS`: ``norms``, ``seeds``, ``dataset``, ``data_root``, ``image_size``),
    then ``set`` (``--set key=value``, applied last). Any other protocol option
    (:data:`bgnorm.repro.presets.OPTIONS`: ``--epochs``, ``--model``, ``--amp``,
    ``--batch-sizes``, ``--groups``, ``--loader-workers``...) raises ``ValueError`` naming it
    (exit status 2 from the CLI); the runner hands each task only the options it applies
    (:func:`bgnorm.repro.presets.task_overrides`) after refusing those no selected task applies.

    Example:
        >>> task_preset({"quick": {"steps": 10, "seeds": [0]}}, "quick", {"seeds": [1, 2]})
        {'steps': 10, 'seeds': [1, 2]}
        >>> task_preset({"quick": {"steps": 10}}, "quick", {"epochs": 3}, task="nas")
        Traceback (most recent call last):
        ...
        ValueError: --epochs is not applied by the nas task (it applies --data-root, ...)
    """
    from ..presets import OPTIONS, option_flag

    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(presets)}")
    refused = [option_flag(k) for k in OPTIONS if overrides.get(k) is not None
               and k not in options]
    if refused:
        name = f"the {task} task" if task else "this task"
        raise ValueError(
            f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} not applied by {name} "
            f"(it applies {', '.join(sorted(option_flag(k) for k in options))}; set its other "
            "keys with --set KEY=VALUE: `bgnorm tasks --settings` lists them)")
    cfg = copy.deepcopy(dict(presets[preset]))
    for key in OPTIONS:
        if key in options and overrides.get(key) is not None:
            cfg[key] = overrides[key]
    for key, value in (overrides.get("set") or {}).items():
        cfg[key] = value
    return cfg


def norm_cell(task: str, cfg: Mapping[str, Any], seed: int, norm: str, keys: Sequence[str],
              **extra: Any) -> dict[str, Any]:
    """One cell config: ``keys`` of ``cfg``, the norm and its group count, as classify does.

    BGN's G is :func:`bgnorm.paper_groups` of the batch size (the paper's policy) unless the
    preset sets ``num_groups``; GN uses 32 groups (capped per layer, see
    :class:`~bgnorm.repro.norms.NormSpec`).
    """
    name = bgnorm.canonical_name(norm)
    cell: dict[str, Any] = {"task": task, "seed": int(seed), "norm": name}
    cell.update({k: copy.deepcopy(cfg.get(k)) for k in keys})
    cell["batch_size"] = int(cfg["batch_size"])
    cell["workers"] = 1
    if name in ("bgn", "gbgn"):
        g = cfg.get("num_groups")
        cell["num_groups"] = int(bgnorm.paper_groups(cell["batch_size"]) if g is None else g)
    if name == "gn":
        g = cfg.get("gn_groups")
        cell["gn_groups"] = int(bgnorm.DEFAULT_NUM_GROUPS if g is None else g)
    cell.update(extra)
    runtime = {k: cfg.get(k) for k in ("data_root", "loader_workers") if cfg.get(k) is not None}
    if runtime:
        cell["runtime"] = runtime
    return cell


def build_with_norm(build: Callable[[Callable[[int], nn.Module]], nn.Module],
                    config: Mapping[str, Any], input_shape: Sequence[int], seed_tag: str = "init"
                    ) -> tuple[nn.Module, NormSpec, list]:
    """``build(norm_layer)`` with the cell's norm (seeded from the cell), on CPU."""
    spec = NormSpec.from_config(config)
    torch.manual_seed(derive_seed(config["seed"], seed_tag))
    model, layers = build_normed_model(build, spec, tuple(input_shape))
    return model, spec, layers


def lr_schedule(config: Mapping[str, Any], total_steps: int, default: str = "constant"
                ) -> Schedule:
    """The learning rate of a cell by optimizer step, from its ``lr``, ``schedule`` and
    ``lr_warmup_steps`` (see :class:`~bgnorm.repro.train.Schedule`).

    ``schedule``: ``"constant"`` (``lr`` throughout, after the warm-up) or ``"cosine"`` (linear
    warm-up over ``lr_warmup_steps``, then cosine from ``lr`` to 0 at ``total_steps``); a cell
    without the key gets ``default``. Every norm of a task's preset gets the same schedule.

    Example:
        >>> s = lr_schedule({"lr": 0.01, "schedule": "cosine", "lr_warmup_steps": 10}, 110)
        >>> [round(s(i), 4) for i in (0, 9, 10, 60, 109)]
        [0.001, 0.01, 0.01, 0.005, 0.0]
    """
    kind = config.get("schedule") or default
    warmup = int(config.get("lr_warmup_steps") or 0)
    peak = float(config["lr"])
    if kind == "constant":
        return Schedule(peak, warmup_steps=warmup)
    if kind == "cosine":
        return Schedule(peak, warmup_steps=warmup, kind="cosine", total_steps=int(total_steps))
    raise ValueError(f"unknown schedule {kind!r}; expected 'constant' or 'cosine' (the preset "
                     "key `schedule`, e.g. --set schedule=cosine)")


def step_batch(batches: BatchCursor, step: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number ``step`` of an endless sequence of epochs of ``batches``' source (for
    :class:`~bgnorm.repro.train.InMemoryBatches` a pure function of the step), on ``device``
    in the standard layout. The cursor iterates each epoch once, instead of drawing the
    epoch's order again for every step."""
    xb, yb = batches.batch(step)
    return standard_layout(xb.to(device)), yb.to(device)


def norm_order(records: Sequence[Record]) -> list[str]:
    """The norms present, in the paper's order."""
    present = {r.config["norm"] for r in records}
    order = [n for n in NORMS if n in present]
    return order + sorted(present - set(order))


def norm_label(config: Mapping[str, Any]) -> str:
    """``BN``, ``GN``, ``BGN`` ... as the tables name them."""
    return DISPLAY_NAMES.get(config["norm"], config["norm"])


def diverged_note(records: Sequence[Record]) -> str:
    """What "-" (diverged) and "n/t" (did not train) mean, when the records have any."""
    n = sum(r.status != "ok" for r in records)
    notes = [f"\"-\": diverged (non-finite loss), as in the paper ({n} run(s))." if n else "",
             untrained_note(records)]
    return " ".join(note for note in notes if note)


def check_tensor_data(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The :attr:`Task.check` of tasks that read :func:`load_tensors`: bundled digits, or a
    well-formed CIFAR-10 copy at ``--data-root``."""
    from .. import data as D

    checked: list[str] = []
    for name, root in sorted({(c["dataset"], (c.get("runtime") or {}).get("data_root"))
                              for c in configs}, key=str):
        if name in D.BUNDLED_DATASETS:
            continue
        if name != "cifar10":
            raise ValueError(f"unknown dataset {name!r} for this task (bundled: "
                             f"{', '.join(D.BUNDLED_DATASETS)}; or cifar10 with --data-root)")
        if not root:
            raise ValueError("dataset 'cifar10' is read from your own copy: pass --data-root")
        checked.append(str(D.check_cifar10(root)))
    return checked


def load_tensors(config: Mapping[str, Any]) -> tuple[Any, str]:
    """``(TensorSplit, kind)`` of a cell's dataset: bundled digits in memory, or the user's
    CIFAR-10 copy (``runtime.data_root``) loaded into memory as standardized tensors."""
    from .. import data as D

    name = config["dataset"]
    if name in D.BUNDLED_DATASETS:
        return D.bundled_dataset(name, seed=int(config.get("split_seed", 0)),
                                 size=config.get("image_size")), "bundled"
    if name == "cifar10":
        root = (config.get("runtime") or {}).get("data_root")
        if not root:
            raise ValueError("dataset 'cifar10' is read from your own copy: pass --data-root")

        def stack(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
            ds = D.CIFAR10(root, train=train, transform=None)
            xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
            return torch.stack(xs).float(), torch.tensor(ys)

        xtr, ytr = stack(True)
        xte, yte = stack(False)
        if xtr.max() > 1.5:
            xtr, xte = xtr / 255.0, xte / 255.0
        mean, std = torch.tensor(D.CIFAR10_MEAN), torch.tensor(D.CIFAR10_STD)
        sh = (1, 3, 1, 1)
        return D.TensorSplit(
            (xtr - mean.view(sh)) / std.view(sh), ytr, (xte - mean.view(sh)) / std.view(sh), yte,
            10, 3, "cifar10", tuple(D.CIFAR10_MEAN), tuple(D.CIFAR10_STD)), "cifar10"
    raise ValueError(f"unknown dataset {name!r} for this task (bundled: "
                     f"{', '.join(D.BUNDLED_DATASETS)}; or cifar10 with --data-root)")


