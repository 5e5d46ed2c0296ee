"""Image classification with each normalization: the ``batch-size``, ``g-sweep`` and ``groups``
tasks.

``batch-size``
    BGN paper Table 2 / Fig. 1 (bottom): top-1 accuracy of BN, IN, LN, GN (32 groups), PN, GBGN
    and BGN (G from :func:`bgnorm.paper_groups`) at 128, 64, 32, 16, 8, 4 and 2 images per
    worker.
``g-sweep``
    BGN paper Table 1: BGN with G = 512 ... 1 at the largest and the smallest batch size.
``groups``
    GN paper Table 3: GN's number of groups (64 ... 1 = LN) and channels per group
    (64 ... 1 = IN) at 32 images per worker, with BN and no normalization as baselines.

All three train the same way (:func:`run_classify`): a model from :mod:`bgnorm.repro.models`
with the cell's norm (:class:`bgnorm.repro.norms.NormSpec`, virtual workers included), SGD with
the linearly scaled learning rate and step decay (:mod:`bgnorm.repro.train`), and the median of
the last epochs' test accuracies. Presets: :mod:`bgnorm.repro.presets`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import bgnorm
from bgnorm.layers import AUTO

from ..norms import DISPLAY_NAMES, PER_EXAMPLE, NormSpec, build_normed_model
from ..presets import (
    CLASSIFY_PRESETS,
    DATASET_DEFAULTS,
    apply_overrides,
    classify_preset,
    preset_settings,
    workers_for,
)
from ..report import (
    Claim,
    Summary,
    fmt_summary,
    line_plot,
    markdown_table,
    noise_level,
    not_judged,
    render_claims,
    summarize,
    untrained_note,
)
from ..train import (
    ClassifyRecipe,
    InMemoryBatches,
    LoaderBatches,
    derive_seed,
    scaled_lr,
    train_classifier,
)
from .base import CellContext, Record, Task, register_task

__all__ = [
    "TASK_BATCH_SIZE",
    "TASK_G_SWEEP",
    "TASK_GROUPS",
    "cells_batch_size",
    "classification_computation",
    "check_classification_data",
    "cells_g_sweep",
    "cells_groups",
    "check_policy_groups",
    "input_shape",
    "load_classification_data",
    "policy_groups",
    "report_batch_size",
    "report_g_sweep",
    "report_groups",
    "run_classify",
    "stamp_policy_groups",
]

_PRESETS = ("smoke", "quick", "full", "paper")
#: Keys of a preset copied into every cell (the sweep axes are expanded instead).
_CELL_KEYS = (
    "dataset", "image_size", "split_seed", "test_fraction", "model", "model_kwargs",
    "zero_init_residual", "epochs", "median_of", "base_lr", "lr_reference_batch", "momentum",
    "weight_decay", "milestones", "lr_gamma", "warmup_epochs", "schedule", "crop_padding",
    "hflip", "amp", "eval_batch_size",
)
_RUNTIME_KEYS = ("data_root", "loader_workers")
#: Datasets held in memory as one standardized TensorSplit; the others stream from a data root.
_IN_MEMORY = ("digits", "mnist5k", "fashion-mnist")
_LOADER_DATASETS = ("cifar10", "imagenet", "imagefolder")
_COST_RANK = {"gbgn": 0, "bn": 1, "bgn": 2, "pn": 3, "ln": 4, "gn": 5, "in": 6, "none": 7}


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def _preset(preset: str, overrides: Mapping[str, Any],
            defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The classification preset ``preset`` with a task's own ``defaults`` (its grid, e.g. the
    normalizers task's methods) and then the CLI ``overrides`` applied, checked."""
    from ..models import MODELS

    cfg = classify_preset(preset)
    cfg.update(copy.deepcopy(dict(defaults or {})))
    cfg = apply_overrides(cfg, overrides)
    if cfg["dataset"] in _LOADER_DATASETS and not cfg.get("data_root"):
        raise ValueError(
            f"dataset {cfg['dataset']!r} is read from your own copy: pass --data-root DIR "
            "(nothing is downloaded); see `bgnorm docs reproduction`"
        )
    if cfg.get("train_subset") is not None and cfg["dataset"] in _LOADER_DATASETS:
        raise ValueError(
            f"train_subset applies to the datasets held in memory ({', '.join(_IN_MEMORY)}), "
            f"not to {cfg['dataset']!r}: drop --set train_subset, or subset your copy"
        )
    if cfg["model"] not in MODELS:
        raise ValueError(f"unknown model {cfg['model']!r}; valid models: "
                         f"{', '.join(sorted(MODELS))}")
    return cfg


def _cell(task: str, cfg: Mapping[str, Any], seed: int, norm: str, batch_size: int,
          **extra: Any) -> dict[str, Any]:
    """One cell config: the preset's training keys plus the norm and its worker split."""
    name = bgnorm.canonical_name(norm)
    workers = workers_for(cfg, batch_size)
    cell: dict[str, Any] = {"task": task, "seed": int(seed), "norm": name}
    cell.update({k: cfg.get(k) for k in _CELL_KEYS})
    if cfg.get("train_subset") is not None:
        # Only when set: the cells of configs without a subset keep their ids.
        cell["train_subset"] = int(cfg["train_subset"])
    cell["batch_size"] = int(batch_size)
    cell["workers"] = workers
    if name in ("bgn", "gbgn"):
        g = extra.pop("num_groups", None)
        # "auto": every layer's G from the per-layer policy (bgnorm.auto_groups)
        cell["num_groups"] = (g if g == AUTO else
                              int(bgnorm.paper_groups(batch_size) if g is None else g))
    if name == "gbgn":
        cell["gbgn_examples"] = min(int(cfg.get("gbgn_examples") or batch_size), batch_size)
    if name == "gn" and "gn_channels_per_group" not in extra:
        g = extra.pop("gn_groups", None)
        cell["gn_groups"] = int(bgnorm.DEFAULT_NUM_GROUPS if g is None else g)
    cell.update(extra)
    if name in PER_EXAMPLE:
        # Per-example statistics do not see the worker split: the run depends on the examples
        # per step only, so one run stands for every per-worker size with that total.
        cell["batch_size"], cell["workers"] = workers * int(batch_size), 1
        cell["covers_batch_sizes"] = [int(batch_size)]
    cell["lr"] = scaled_lr(cfg["base_lr"], cell["batch_size"], cell["workers"],
                           cfg["lr_reference_batch"])
    runtime = {k: cfg.get(k) for k in _RUNTIME_KEYS if cfg.get(k) is not None}
    if runtime:
        cell["runtime"] = runtime
    return stamp_policy_groups(cell)


def stamp_policy_groups(cell: dict[str, Any]) -> dict[str, Any]:
    """``cell`` (in place, and returned) with ``layer_groups``, the G the policy gives each of
    its layers (:func:`policy_groups`), if it is a ``num_groups="auto"`` cell. They are part of
    the cell's id: a changed policy makes new cells, and a cell listed by another policy is
    refused before it trains (:func:`check_policy_groups`). Call it on the finished cell."""
    if cell.get("num_groups") == AUTO:
        cell["layer_groups"] = policy_groups(cell)
    return cell


#: (channels, native side) of the in-memory datasets' images; ``image_size`` resizes them.
_NATIVE_SHAPES = {"digits": (1, 8), "mnist5k": (1, 28), "fashion-mnist": (1, 28)}


def input_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(C, H, W)`` of one example of a cell's dataset, as :func:`load_classification_data`
    gives it, without reading the data (cells are listed before the data check runs).

    Example:
        >>> input_shape({"dataset": "mnist5k", "image_size": 16})
        (1, 16, 16)
        >>> input_shape({"dataset": "cifar10"}), input_shape({"dataset": "imagenet"})
        ((3, 32, 32), (3, 224, 224))
    """
    name, size = config["dataset"], config.get("image_size")
    if name in _NATIVE_SHAPES:
        channels, native = _NATIVE_SHAPES[name]
        side = native if size is None else int(size)
        return channels, side, side
    if name == "cifar10":
        return 3, 32, 32
    if name in ("imagenet", "imagefolder"):
        side = int(size or 224)
        return 3, side, side
    raise ValueError(f"unknown dataset {name!r}; valid datasets: "
                     f"{', '.join((*_IN_MEMORY, *_LOADER_DATASETS))}")


def policy_groups(config: Mapping[str, Any]) -> list[int]:
    """The G the per-layer policy (:func:`bgnorm.auto_groups`) gives each norm layer of a
    ``num_groups="auto"`` cell's model, in the model's order, for the cell's per-worker batch
    and :func:`input_shape`.

    Example:
        >>> cell = {"norm": "bgn", "num_groups": "auto", "batch_size": 64, "workers": 1,
        ...         "dataset": "mnist5k", "image_size": 16, "model": "small_resnet",
        ...         "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]}}
        >>> policy_groups(cell)  # the paper's G = 256 is a whole group of every layer here
        [256, 256, 256, 256, 256, 256, 256, 256, 256]
        >>> policy_groups({**cell, "image_size": 28})  # 32x14x14, 64x7x7: 7 bands per channel
        [256, 256, 256, 224, 224, 224, 448, 448, 448]
    """
    from .mechanism import layer_values

    return [int(layer["groups"]) for layer in layer_values(config, input_shape(config))]


def check_policy_groups(config: Mapping[str, Any]) -> None:
    """Refuse a ``num_groups="auto"`` cell whose ``layer_groups`` (stamped when the cells were
    listed, part of its id) are not what the policy gives its layers now: the cell was listed
    by another version of :func:`bgnorm.auto_groups`, and training it would record one policy's
    run under the other's cell. Raises ``ValueError`` naming both; cells without
    ``layer_groups`` (listed before they were stamped) are let through."""
    if config.get("num_groups") != AUTO or config.get("layer_groups") is None:
        return
    now = policy_groups(config)
    if now != list(config["layer_groups"]):
        raise ValueError(
            f"{config.get('task', 'this task')}: the policy now gives this cell's layers "
            f"G = {now}, the cell was made with {list(config['layer_groups'])}: "
            "bgnorm.auto_groups changed since the cells were listed; list the cells again "
            "(a new policy is a new cell)")


def _merge_covered(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge per-example cells that are the same run for several per-worker batch sizes."""
    out: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    from ..store import cell_id

    for c in cells:
        if "covers_batch_sizes" not in c:
            out.append(c)
            continue
        key = cell_id({k: v for k, v in c.items() if k != "covers_batch_sizes"})
        if key in index:
            prev = out[index[key]]
            prev["covers_batch_sizes"] = sorted(
                set(prev["covers_batch_sizes"]) | set(c["covers_batch_sizes"]), reverse=True)
        else:
            index[key] = len(out)
            out.append(c)
    return out


def cells_batch_size(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cells of the ``batch-size`` task: every norm x per-worker batch size x seed."""
    cfg = _preset(preset, overrides)
    # Slowest cells first (fewer stragglers at the end of a parallel sweep): GBGN/BN with many
    # small statistic groups, then BGN, then the per-example norms; large G first.
    norms = sorted(cfg["norms"], key=lambda n: _COST_RANK.get(bgnorm.canonical_name(n), 9))
    cells = [
        _cell("batch-size", cfg, seed, norm, b)
        for seed in cfg["seeds"]
        for norm in norms
        for b in sorted(cfg["batch_sizes"], reverse=True)
    ]
    return _merge_covered(cells)


def cells_g_sweep(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cells of the ``g-sweep`` task: BGN with every G at the largest and smallest batch."""
    cfg = _preset(preset, overrides)
    sizes = cfg.get("g_sweep_batch_sizes") or sorted(
        {max(cfg["batch_sizes"]), min(cfg["batch_sizes"])}, reverse=True)
    return [
        _cell("g-sweep", cfg, seed, "bgn", b, num_groups=int(g))
        for seed in cfg["seeds"]
        for b in sizes
        for g in sorted(cfg["g_sweep"], reverse=True)
    ]


def cells_groups(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cells of the ``groups`` task: GN by number of groups and by channels per group, plus
    the baselines (BN, no normalization), all at ``groups_batch_size`` images per worker."""
    cfg = _preset(preset, overrides)
    b = int(cfg["groups_batch_size"])
    cells = []
    for seed in cfg["seeds"]:
        cells += [_cell("groups", cfg, seed, "gn", b, gn_groups=int(g)) for g in cfg["gn_groups"]]
        cells += [_cell("groups", cfg, seed, "gn", b, gn_channels_per_group=int(k))
                  for k in cfg["gn_channels_per_group"]]
        cells += [_cell("groups", cfg, seed, n, b) for n in cfg["groups_baselines"]]
    return cells


# --------------------------------------------------------------------------------------------
# Running one cell
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _in_memory(name: str, root: str | None, size: int | None, split_seed: int,
               test_fraction: float, train_subset: int | None):
    from .. import data as D

    if name == "fashion-mnist":
        # Its own 10,000-image test set: test_fraction does not apply.
        return D.fashion_mnist_dataset(root, size=size, train_subset=train_subset,
                                       seed=split_seed)
    return D.bundled_dataset(name, seed=split_seed, test_fraction=test_fraction, size=size,
                             train_subset=train_subset)


def check_classification_data(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The three tasks' :attr:`~bgnorm.repro.api.Task.check`: every cell's dataset is
    bundled, Fashion-MNIST's IDX files (the Debian package's folder, or ``--data-root``), or a
    well-formed copy at ``--data-root`` (CIFAR-10 batches; ``train/`` and ``val/`` (or
    ``test/``) class folders with the same classes); a ``train_subset`` fits the training set."""
    from .. import data as D

    checked: list[str] = []
    for name, root, subset in sorted({(c["dataset"], (c.get("runtime") or {}).get("data_root"),
                                       c.get("train_subset")) for c in configs}, key=str):
        if name in D.BUNDLED_DATASETS:
            if subset is not None:
                c = next(c for c in configs if c["dataset"] == name)
                _in_memory(name, None, c.get("image_size"), int(c.get("split_seed", 0)),
                           float(c.get("test_fraction", 0.2)), int(subset))
            continue
        if name == "fashion-mnist":
            checked.append(str(D.check_fashion_mnist(root, subset)))
            continue
        if not root:
            raise ValueError(f"dataset {name!r} needs a data root (--data-root)")
        if name == "cifar10":
            checked.append(str(D.check_cifar10(root)))
        elif name in ("imagenet", "imagefolder"):
            checked += map(str, D.check_image_folders(root, ["train", ("val", "test")]))
        else:
            raise ValueError(f"unknown dataset {name!r}")
    return checked


def load_classification_data(
    config: Mapping[str, Any], device: torch.device, train_batch: int
) -> tuple[Any, Any, dict[str, Any]]:
    """``(train, test, info)`` batch sources for a cell config.

    Bundled digits (``mnist5k``, ``digits``) and Fashion-MNIST (its IDX files, see
    :func:`bgnorm.repro.data.fashion_mnist_dataset`) are held in memory on ``device``
    (:class:`~bgnorm.repro.train.InMemoryBatches`), a stratified ``train_subset`` of the
    training images if set; ``cifar10`` (python-pickle batches) and
    ``imagenet``/``imagefolder`` (``root/train``, ``root/val`` class folders) are read from
    ``config["runtime"]["data_root"]`` through DataLoaders. ``info`` has ``num_classes``,
    ``in_channels``, ``input_shape`` and ``n_test``.
    """
    from .. import data as D

    name = config["dataset"]
    seed = derive_seed(config["seed"], "data")
    runtime = config.get("runtime") or {}
    if name in _IN_MEMORY:
        subset = config.get("train_subset")
        split = _in_memory(name, runtime.get("data_root"), config.get("image_size"),
                           int(config.get("split_seed", 0)),
                           float(config.get("test_fraction", 0.2)),
                           None if subset is None else int(subset))
        xtr, ytr = split.x_train.to(device), split.y_train.to(device)
        xte, yte = split.x_test.to(device), split.y_test.to(device)
        train = InMemoryBatches(
            xtr, ytr, train_batch, seed=seed, drop_last=True,
            crop_padding=int(config.get("crop_padding") or 0),
            pad_value=split.background_value().to(device), hflip=bool(config.get("hflip")),
        )
        test = InMemoryBatches(xte, yte, int(config.get("eval_batch_size") or 500),
                               shuffle=False, drop_last=False)
        info = {"num_classes": split.num_classes, "in_channels": split.in_channels,
                "input_shape": (split.in_channels, *split.image_size), "n_test": len(yte)}
        return train, test, info
    root = runtime.get("data_root")
    if not root:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root)")
    size = int(config.get("image_size") or 224)
    if name == "cifar10":
        train_ds = D.CIFAR10(root, train=True, transform=D.cifar_train_transform())
        test_ds = D.CIFAR10(root, train=False, transform=D.cifar_eval_transform())
        num_classes, shape = len(train_ds.classes), (3, 32, 32)
    elif name in ("imagenet", "imagefolder"):
        root_p = Path(root).expanduser()
        val_dir = root_p / "val" if (root_p / "val").is_dir() else root_p / "test"
        train_ds = D.ImageFolder(root_p / "train", transform=D.imagenet_train_transform(size))
        test_ds = D.ImageFolder(
            val_dir, transform=D.imagenet_eval_transform(size, resize=round(size * 256 / 224)))
        if train_ds.classes != test_ds.classes:
            raise ValueError(f"{root_p}: train and {val_dir.name} have different class folders")
        num_classes, shape = len(train_ds.classes), (3, size, size)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    workers = int(runtime.get("loader_workers") or 0)
    pin = device.type == "cuda"
    train = LoaderBatches(train_ds, train_batch, seed=seed, num_workers=workers, pin_memory=pin)
    test = LoaderBatches(test_ds, int(config.get("eval_batch_size") or 100), seed=seed,
                         shuffle=False, drop_last=False, num_workers=workers, pin_memory=pin)
    info = {"num_classes": num_classes, "in_channels": 3, "input_shape": shape,
            "n_test": len(test_ds)}
    return train, test, info


def run_classify(config: dict[str, Any], ctx: CellContext) -> dict[str, Any]:
    """Train and evaluate one classification cell (all three tasks); see the module docstring.

    Deterministic on CPU for a fixed config; resumes from ``ctx``'s checkpoint.
    """
    from .. import dist as _dist
    from ..models import build_model

    check_policy_groups(config)
    device = ctx.device
    spec = NormSpec.from_config(config)
    train, test, info = load_classification_data(config, device, spec.total_batch)
    env = _dist.active()
    model_spec = spec
    layout: dict[str, Any] | None = None
    sync_norm = False
    if env is not None:
        # Each rank holds W/R of the W virtual workers (see bgnorm.repro.dist); the batch
        # sources still produce the global batch, of which each rank keeps its slice.
        local = _dist.local_workers(spec.workers, env)
        sync_norm = env.sync_norm and spec.workers == 1 and (
            spec.name in ("bn", "bgn")
            or spec.name == "gbgn" and spec.examples_per_group in (None, spec.batch_size))
        lo, hi = _dist.shard_bounds(spec.total_batch, env)
        if local != spec.workers:
            model_spec = dataclasses.replace(spec, workers=local)
        layout = {"world_size": env.world_size, "workers_per_rank": local,
                  "sync_norm": sync_norm, "examples_per_rank": hi - lo}
        if spec.workers == 1 and env.world_size > 1 and spec.batch_dependent and not sync_norm:
            ctx.log(f"one worker per rank: statistics over {hi - lo} examples per rank instead "
                    f"of the cell's {spec.batch_size} (use --sync-norm for the cell's)")

    def build(norm_layer):
        return build_model(
            config["model"], info["num_classes"], norm_layer, info["in_channels"],
            zero_init_residual=bool(config.get("zero_init_residual")),
            **dict(config.get("model_kwargs") or {}),
        )

    torch.manual_seed(derive_seed(config["seed"], "init"))
    model, layers = build_normed_model(build, model_spec, info["input_shape"])
    model.to(device)
    recipe = ClassifyRecipe(
        epochs=int(config["epochs"]),
        lr=float(config["lr"]),
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight_decay"]),
        milestones=tuple(config["milestones"]),
        gamma=float(config.get("lr_gamma", 0.1)),
        warmup_epochs=float(config.get("warmup_epochs") or 0),
        schedule=str(config.get("schedule") or "step"),
        median_of=int(config["median_of"]),
        check_every=1 if device.type == "cpu" else 50,
    )
    result = train_classifier(model, train, test, recipe, ctx, device, config.get("amp"),
                              env=env, sync_norm=sync_norm)
    if layout is not None:
        result["distributed"] = layout
    result.update(
        norm=spec.describe(),
        n_test=info["n_test"],
        num_classes=info["num_classes"],
        params=sum(p.numel() for p in model.parameters()),
        layers=[[l.channels, list(l.spatial), l.groups] for l in layers],
        groups_adjusted=sum(l.adjusted for l in layers),
    )
    return result


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _n_test(records: Sequence[Record]) -> int:
    ns = [int(r.result.get("n_test") or 0) for r in records if r.status == "ok"]
    return min(ns) if ns else 0


def _protocol(records: Sequence[Record]) -> str:
    c = records[0].config
    model = c["model"] + "".join(
        f" {k}={v}" for k, v in sorted((c.get("model_kwargs") or {}).items()))
    size = c.get("image_size") or "native"
    seeds = sorted({r.config["seed"] for r in records})
    ms = ", ".join(f"{m:g}" for m in c["milestones"])
    warm = float(c.get("warmup_epochs") or 0)
    decay = (f"decayed x{c.get('lr_gamma', 0.1):g} at {ms} of training"
             if (c.get("schedule") or "step") == "step" else "cosine decay to 0")
    if warm:
        decay = f"linear warm-up over {warm:g} epoch(s), {decay}"
    subset = c.get("train_subset")
    data = f"{c['dataset']} ({size} px" + (f", {subset} training images)" if subset else ")")
    return (
        f"*Protocol:* {data}, {model}; {c['epochs']} epochs, SGD momentum "
        f"{c['momentum']:g}, weight decay {c['weight_decay']:g}, lr {c['base_lr']:g} per "
        f"{c['lr_reference_batch']} examples per step scaled linearly, {decay}; "
        f"accuracy = median of the last "
        f"{c['median_of']} epochs' test accuracies (top-1, %), mean over {len(seeds)} seed(s); "
        f"amp: {c.get('amp') or 'none'}."
    )


def _covered(rec: Record) -> list[int]:
    return list(rec.config.get("covers_batch_sizes") or [rec.config["batch_size"]])


def _col_protocol(records: Sequence[Record], sizes: Sequence[int]) -> list[list[str]]:
    """Rows "virtual workers", "examples/step", "lr" for a batch-size table."""
    by_b: dict[int, dict[str, Any]] = {}
    for r in records:
        c = r.config
        if c["norm"] not in PER_EXAMPLE:
            by_b.setdefault(c["batch_size"], c)
    for r in records:  # per-example cells know the total batch only
        for b in _covered(r):
            if b not in by_b:
                c = r.config
                by_b[b] = {**c, "batch_size": b, "workers": c["batch_size"] // b}
    rows = [["*virtual workers W*"], ["*examples / step*"], ["*learning rate*"]]
    for b in sizes:
        c = by_b.get(b)
        rows[0].append(str(c["workers"]) if c else "")
        rows[1].append(str(c["workers"] * c["batch_size"]) if c else "")
        rows[2].append(f"{c['lr']:g}" if c else "")
    return rows


def _fmt_delta(x: float) -> str:
    return f"{x:+.2f}"


def _batch_size_claims(acc: dict[tuple[str, int], Summary], sizes: list[int], n_test: int
                       ) -> list[Claim]:
    def get(norm: str, b: int) -> float | None:
        s = acc.get((norm, b))
        return s.mean if s is not None and s.ok else None

    def diverged(norm: str, b: int) -> bool:
        s = acc.get((norm, b))
        return s is not None and s.all_diverged

    def cells(norms: Sequence[str]) -> dict[str, Summary | None]:
        return {f"{DISPLAY_NAMES.get(n, n)} at batch {b}": acc.get((n, b))
                for n in norms for b in sizes}

    claims = []
    small = min(sizes)
    tol, tol_txt = noise_level(acc.values(), n_test)

    # 1. BN degrades at small batch.
    bn = {b: get("bn", b) for b in sizes}
    bn_ok = {b: v for b, v in bn.items() if v is not None}
    unjudged = not_judged("BN degrades at small batch sizes", cells(["bn"]))
    if unjudged is not None:
        claims.append(unjudged)
    elif diverged("bn", small):
        claims.append(Claim("BN degrades at small batch sizes", "held",
                            f"BN diverged at batch {small}."))
    elif len(bn_ok) >= 2 and bn_ok.get(small) is not None:
        best_b = max(bn_ok, key=bn_ok.get)
        drop = acc[("bn", best_b)].minus(acc[("bn", small)])  # paired over seeds
        verdict = "held" if drop > tol else "did not hold"
        claims.append(Claim(
            "BN degrades at small batch sizes", verdict,
            f"BN: {bn_ok[best_b]:.2f} at batch {best_b} (its best) vs {bn_ok[small]:.2f} at "
            f"batch {small}, a drop of {drop:.2f} pp; {tol_txt}."))
    else:
        claims.append(Claim("BN degrades at small batch sizes", "not tested",
                            "BN was not run at two or more batch sizes."))

    # 2. BGN is stable across batch sizes.
    bgn = {b: get("bgn", b) for b in sizes}
    bgn_ok = {b: v for b, v in bgn.items() if v is not None}
    unjudged = not_judged("BGN is stable across batch sizes", cells(["bgn"]))
    if unjudged is not None:
        claims.append(unjudged)
    elif len(bgn_ok) >= 2:
        spread = max(bgn_ok.values()) - min(bgn_ok.values())
        bn_spread = (max(bn_ok.values()) - min(bn_ok.values())) if len(bn_ok) >= 2 else None
        div = [b for b in sizes if diverged("bgn", b)]
        verdict = "held" if spread <= tol and not div else "did not hold"
        ev = (f"BGN ranges over {spread:.2f} pp ({min(bgn_ok.values()):.2f}-"
              f"{max(bgn_ok.values()):.2f}) across batch sizes {', '.join(map(str, sizes))}")
        if bn_spread is not None:
            ev += f" (BN: {bn_spread:.2f} pp)"
        if div:
            ev += f"; diverged at {', '.join(map(str, div))}"
        claims.append(Claim("BGN is stable across batch sizes", verdict, ev + f"; {tol_txt}."))
    else:
        claims.append(Claim("BGN is stable across batch sizes", "not tested",
                            "BGN was not run at two or more batch sizes."))

    # 3. BGN beats the others.
    others = sorted({n for n, _ in acc if n != "bgn"})
    unjudged = not_judged("BGN beats the other norms at every batch size",
                          cells(["bgn", *others]))
    if unjudged is not None:
        claims.append(unjudged)
        return claims
    rows, top, worse = [], [], []
    for b in sizes:
        v = get("bgn", b)
        cand = [(get(n, b), n) for n in others if get(n, b) is not None]
        if v is None or not cand:
            continue
        best_v, best_n = max(cand)
        gap = acc[("bgn", b)].minus(acc[(best_n, b)])  # paired over seeds
        rows.append(f"{b}: {gap:+.2f} vs {DISPLAY_NAMES.get(best_n, best_n)}")
        if gap >= 0:
            top.append(b)
        elif -gap > tol:
            worse.append(b)
    if not rows:
        claims.append(Claim("BGN beats the other norms", "not tested",
                            "BGN and at least one other norm are needed at a common batch size."))
    else:
        n = len(rows)
        if worse:
            verdict = "did not hold"
        elif len(top) == n:
            verdict = "held"
        else:
            verdict = "inconclusive"
        ev = (f"BGN was the best norm at {len(top)} of {n} batch sizes and significantly worse "
              f"than the best other norm at {len(worse)}"
              f"{' (' + ', '.join(map(str, worse)) + ')' if worse else ''}; BGN minus the best "
              f"other norm per batch size: {'; '.join(rows)} (pp); {tol_txt}.")
        claims.append(Claim("BGN beats the other norms at every batch size", verdict, ev))
    return claims


def report_batch_size(records: list[Record], out_dir: Path) -> str:
    """BGN paper Table 2 (norm x batch size) + Fig. 1 (bottom) plot + claim checks."""
    if not records:
        return "## Accuracy vs batch size (BGN paper Table 2)\n\nNo results yet.\n"
    sizes = sorted({b for r in records for b in _covered(r)}, reverse=True)
    norms_present = {r.config["norm"] for r in records}
    order = [n for n in ("bn", "in", "ln", "gn", "pn", "gbgn", "bgn", "none")
             if n in norms_present]
    order += sorted(norms_present - set(order))

    def key(r: Record):
        return [(r.config["norm"], b) for b in _covered(r)]

    acc = summarize(records, key)
    header = ["norm", *map(str, sizes)]
    rows = [[DISPLAY_NAMES.get(n, n), *(fmt_summary(acc.get((n, b))) for b in sizes)]
            for n in order]
    rows += _col_protocol(records, sizes)
    g_row = ["*BGN's G*"]
    for b in sizes:
        gs = {r.config.get("num_groups") for r in records
              if r.config["norm"] == "bgn" and r.config["batch_size"] == b}
        g_row.append(",".join(str(g) for g in sorted(gs)) if gs else "")
    rows.append(g_row)
    table = markdown_table(header, rows)
    plot = line_plot(
        out_dir / "batch-size.png",
        {DISPLAY_NAMES.get(n, n): [(b, acc[(n, b)].mean if (n, b) in acc and acc[(n, b)].ok
                                    else None) for b in sizes] for n in order},
        xlabel="batch size (images per worker)", ylabel="top-1 accuracy (%)",
        title="Accuracy vs batch size", descending_x=True,
    )
    notes = [_protocol(records)]
    notes.append(
        "*Virtual workers:* each column's batch is split into W slices of b examples; BN, GBGN "
        "and BGN compute statistics per slice (running statistics averaged over the slices), "
        "the optimizer steps on the whole W x b batch. IN, LN, GN and PN do not depend on the "
        "split, so where two columns have the same examples per step one run fills both.")
    gbgn = [r for r in records if r.config["norm"] == "gbgn"]
    if gbgn:
        es = sorted({r.config["gbgn_examples"] for r in gbgn})
        notes.append(f"*GBGN:* batch groups of e = {', '.join(map(str, es))} examples "
                     "(capped at b), G as BGN's.")
    adjusted = _adjusted_note(records)
    if adjusted:
        notes.append(adjusted)
    n_div = sum(r.status != "ok" for r in records)
    if n_div:
        notes.append(f"\"-\": diverged (non-finite loss), as in the paper ({n_div} run(s)).")
    untrained = untrained_note(records)
    if untrained:
        notes.append(untrained)
    parts = ["## Accuracy vs batch size (BGN paper Table 2, Fig. 1 bottom)", "", table, ""]
    parts += [" ".join(notes), ""]
    if plot:
        parts += [f"![accuracy vs batch size]({plot.name})", ""]
    parts += ["### Claims checked", "",
              render_claims(_batch_size_claims(acc, sizes, _n_test(records))), ""]
    return "\n".join(parts)


def _adjusted_note(records: Sequence[Record]) -> str:
    """Which requested group counts did not fit some layers (see NormSpec.layer_groups)."""
    seen: dict[tuple[str, int | None], set[int]] = {}
    for r in records:
        if r.status != "ok" or not r.result.get("groups_adjusted"):
            continue
        spec = NormSpec.from_config(r.config)
        if spec.channels_per_group or spec.auto:
            continue  # G = C / k, or the policy's valid G, by construction
        requested = spec.groups  # the default G where the config names none (GN, EvoNorm-S0)
        used = {int(l[2]) for l in r.result.get("layers", []) if l[2] != requested}
        seen.setdefault((r.config["norm"], requested), set()).update(used)
    if not seen:
        return ""
    items = [f"{DISPLAY_NAMES.get(n, n)} G={g} -> {', '.join(map(str, sorted(u)))}"
             for (n, g), u in sorted(seen.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0)))]
    return ("*Group counts that did not fit a layer* (G must divide C·H·W for BGN, C for GN) "
            "used the largest valid value below them in those layers: " + "; ".join(items) + ".")


def report_g_sweep(records: list[Record], out_dir: Path) -> str:
    """BGN paper Table 1 (batch size x G) + accuracy-vs-G plot + the G claim."""
    title = "## BGN's G at the largest and smallest batch size (BGN paper Table 1)"
    if not records:
        return title + "\n\nNo results yet.\n"
    acc = summarize(records, lambda r: (r.config["batch_size"], r.config["num_groups"]))
    sizes = sorted({b for b, _ in acc}, reverse=True)
    gs = sorted({g for _, g in acc}, reverse=True)
    header = ["batch size \\ G", *map(str, gs)]
    rows = []
    for b in sizes:
        row = [str(b)]
        for g in gs:
            cell = fmt_summary(acc.get((b, g)))
            if g == bgnorm.paper_groups(b) and cell not in ("?",):
                cell = f"**{cell}**"
            row.append(cell)
        rows.append(row)
    table = markdown_table(header, rows)
    plot = line_plot(
        out_dir / "g-sweep.png",
        {f"batch {b}": [(g, acc[(b, g)].mean if (b, g) in acc and acc[(b, g)].ok else None)
                        for g in gs] for b in sizes},
        xlabel="G (groups over C·H·W)", ylabel="top-1 accuracy (%)", title="BGN: accuracy vs G",
    )
    n_test = _n_test(records)
    claims = _g_claims(acc, sizes, gs, n_test)
    notes = [_protocol(records), "**Bold**: the G that `bgnorm.paper_groups` gives for that "
             "batch size (the paper's choice)."]
    adjusted = _adjusted_note(records)
    if adjusted:
        notes.append(adjusted)
    notes.append(untrained_note(records))
    parts = [title, "", table, "", " ".join(n for n in notes if n), ""]
    if plot:
        parts += [f"![accuracy vs G]({plot.name})", ""]
    parts += ["### Claims checked", "", render_claims(claims), ""]
    return "\n".join(parts)


_G_SUFFERS = "Large G suffers at small batch sizes (too few values per statistic)"
_G_POLICY = "The paper's G policy is (near) the best G"


def _g_claims(acc: dict[Any, Summary], sizes: list[int], gs: list[int], n_test: int
              ) -> list[Claim]:
    claim = "Large G is best at large batch sizes, small G at small batch sizes"
    if len(sizes) < 2 or len(gs) < 2:
        return [Claim(claim, "not tested", "Needs G values at two batch sizes.")]
    big, small = max(sizes), min(sizes)
    cells = {f"G={g} at batch {b}": acc.get((b, g)) for b in (big, small) for g in gs}
    names = (claim, _G_SUFFERS, _G_POLICY)
    unjudged = [not_judged(name, cells) for name in names]
    if unjudged[0] is not None:
        return [c for c in unjudged if c is not None]

    def curve(b: int) -> dict[int, float]:
        return {g: acc[(b, g)].mean for g in gs if (b, g) in acc and acc[(b, g)].ok}

    cb, cs = curve(big), curve(small)
    if len(cb) < 2 or len(cs) < 2:
        return [Claim(claim, "not tested", "Too few finished G values at one batch size.")]
    tol, tol_txt = noise_level(acc.values(), n_test)
    best_big, best_small = max(cb, key=cb.get), max(cs, key=cs.get)
    # The G values within noise of each batch size's best; the claim needs the large batch's
    # near-best G to lie above the small batch's.
    # (differences paired over seeds)
    near_big = sorted(g for g in cb if acc[(big, best_big)].minus(acc[(big, g)]) <= tol)
    near_small = sorted(g for g in cs
                        if acc[(small, best_small)].minus(acc[(small, g)]) <= tol)
    ev = (f"Best G at batch {big}: {best_big} ({cb[best_big]:.2f}), at batch {small}: "
          f"{best_small} ({cs[best_small]:.2f}); G within noise of the best: "
          f"{{{', '.join(map(str, near_big))}}} at batch {big}, "
          f"{{{', '.join(map(str, near_small))}}} at batch {small}; {tol_txt}.")
    if min(near_big) > max(near_small):
        verdict = "held"
    elif max(near_big) < min(near_small):
        verdict = "did not hold"
    else:
        verdict = "inconclusive"
        if best_big < best_small:
            ev = "The best G grew as the batch shrank, within noise. " + ev
        elif best_big == best_small:
            ev = "The same G was best at both batch sizes. " + ev
    claims = [Claim(claim, verdict, ev)]
    g_max = max(set(cb) & set(cs)) if set(cb) & set(cs) else None
    if g_max is not None and best_big in cs and g_max != best_big:
        drop_max = acc[(big, g_max)].minus(acc[(small, g_max)])
        drop_best = acc[(big, best_big)].minus(acc[(small, best_big)])
        extra = drop_max - drop_best
        verdict = "held" if extra > tol else "did not hold" if extra < -tol else "inconclusive"
        claims.append(Claim(
            _G_SUFFERS, verdict,
            f"From batch {big} to batch {small}, G={g_max} loses {drop_max:+.2f} pp "
            f"({cb[g_max]:.2f} -> {cs[g_max]:.2f}) and the best G at batch {big} (G={best_big}) "
            f"loses {drop_best:+.2f} pp: {extra:+.2f} pp more at the large G; {tol_txt}."))
    paper = []
    for b, c in ((big, cb), (small, cs)):
        g = bgnorm.paper_groups(b)
        if g in c:
            best = max(c, key=c.get)
            paper.append(f"batch {b}: paper's G={g} {c[g]:.2f} vs best G={best} {c[best]:.2f} "
                         f"({c[g] - c[best]:+.2f})")
    if paper:
        within = all(
            acc[(b, max(c, key=c.get))].minus(acc[(b, bgnorm.paper_groups(b))]) <= tol
            for b, c in ((big, cb), (small, cs)) if bgnorm.paper_groups(b) in c
        )
        claims.append(Claim(_G_POLICY,
                            "held" if within else "did not hold", "; ".join(paper) + "."))
    return claims


def report_groups(records: list[Record], out_dir: Path) -> str:
    """GN paper Table 3 (error by number of groups / channels per group) + baselines."""
    title = "## GN's group division and a no-normalization baseline (GN paper Table 3)"
    if not records:
        return title + "\n\nNo results yet.\n"

    def key(r: Record):
        c = r.config
        if c["norm"] == "gn" and c.get("gn_channels_per_group"):
            return ("cpg", int(c["gn_channels_per_group"]))
        if c["norm"] == "gn":
            return ("G", int(c["gn_groups"]))
        return ("base", c["norm"])

    # errors, keeping each seed's identity and its convergence flags (paired differences,
    # the seed noise model and "not judged" need them)
    acc = summarize(records, key)
    err = {k: dataclasses.replace(s, values=tuple(100.0 - v for v in s.values))
           for k, s in acc.items()}
    oks = [s.mean for s in err.values() if s.ok]
    best = min(oks) if oks else float("nan")

    def row(kind: str, label: str, values: list[int], last: str) -> list[list[str]]:
        head = [label] + [f"{v}{last if v == 1 else ''}" for v in values]
        e = ["top-1 error (%)"] + [fmt_summary(err.get((kind, v))) for v in values]
        d = ["Δ to best"] + [
            _fmt_delta(err[(kind, v)].mean - best) if (kind, v) in err and err[(kind, v)].ok
            else "" for v in values]
        return [head, e, d]

    gs = sorted({k[1] for k in err if k[0] == "G"}, reverse=True)
    ks = sorted({k[1] for k in err if k[0] == "cpg"}, reverse=True)
    parts = [title, ""]
    if gs:
        t = row("G", "# groups (G)", gs, " (=LN)")
        parts += [markdown_table(t[0], t[1:]), ""]
    if ks:
        t = row("cpg", "channels per group", ks, " (=IN)")
        parts += [markdown_table(t[0], t[1:]), ""]
    bases = sorted(k[1] for k in err if k[0] == "base")
    if bases:
        parts += [markdown_table(
            ["baseline", "top-1 error (%)", "Δ to best"],
            [[DISPLAY_NAMES.get(b, b), fmt_summary(err[("base", b)]),
              _fmt_delta(err[("base", b)].mean - best) if err[("base", b)].ok else ""]
             for b in bases]), ""]
    b = records[0].config["batch_size"]
    w = records[0].config["workers"]
    notes = [_protocol(records),
             f"All at {b} examples per worker step ({w} virtual worker(s) for BN)."
             if records[0].config["norm"] != "bn" else "",
             "GN's groups are capped per layer: G larger than a layer's channels means one "
             "channel per group there (IN); channels per group larger than C means one group "
             "(LN)."]
    adjusted = _adjusted_note(records)
    if adjusted:
        notes.append(adjusted)
    notes.append(untrained_note(records))
    parts += [" ".join(n for n in notes if n), ""]
    series = {}
    if gs:
        series["by number of groups G"] = [
            (g, err[("G", g)].mean if err[("G", g)].ok else None) for g in gs]
    if ks:
        series["by channels per group"] = [
            (k, err[("cpg", k)].mean if err[("cpg", k)].ok else None) for k in ks]
    plot = line_plot(out_dir / "groups.png", series, xlabel="G  /  channels per group",
                     ylabel="top-1 error (%)", title="GN: group division") if series else None
    if plot:
        parts += [f"![GN group division]({plot.name})", ""]
    extremes = _gn_extremes(records, key)
    if extremes:
        parts += ["*Same division as an extreme on this network* (the group counts every layer "
                  "got): " + "; ".join(
                      f"{'G' if k[0] == 'G' else 'channels per group'} = {k[1]} is {name}"
                      for k, name in sorted(extremes.items())) + ". Not counted as "
                  "intermediate in the claims.", ""]
    parts += ["### Claims checked", "", render_claims(_groups_claims(
        err, acc.values(), gs, ks, _n_test(records), extremes)), ""]
    return "\n".join(parts)


def _gn_extremes(records: Sequence[Record], key: Callable[[Record], Any]) -> dict[Any, str]:
    """GN cells whose capped group counts make them LN (one group in every layer) or IN (one
    channel per group in every layer) on the network they ran on, from the records' layers
    (``[channels, spatial, groups]`` per norm layer)."""
    out: dict[Any, str] = {}
    for r in records:
        k = key(r)
        layers = (r.result or {}).get("layers") or []
        if r.config.get("norm") != "gn" or not layers or k in out:
            continue
        try:
            pairs = [(int(c), int(g)) for c, _, g in layers]
        except (TypeError, ValueError):
            continue
        if all(g == 1 for _, g in pairs):
            out[k] = "LN"
        elif all(g == c for c, g in pairs):
            out[k] = "IN"
    return {k: v for k, v in out.items() if k not in (("G", 1), ("cpg", 1))}


def _groups_claims(err: dict[Any, Summary], accuracies: Iterable[Summary], gs: list[int],
                   ks: list[int], n_test: int, extremes: Mapping[Any, str] | None = None
                   ) -> list[Claim]:
    extremes = extremes or {}
    claims = []
    ok = {k: s.mean for k, s in err.items() if s.ok}

    def cell_label(k: tuple[str, Any]) -> str:
        return {"G": f"GN with G={k[1]}", "cpg": f"GN with {k[1]} channel(s)/group"}.get(
            k[0], DISPLAY_NAMES.get(k[1], str(k[1])))

    gn_cells = {cell_label(k): s for k, s in err.items() if k[0] in ("G", "cpg")}
    # noise_level reads accuracies (its binomial term is at the best accuracy)
    tol, tol_txt = noise_level(accuracies, n_test)
    gn = {k: v for k, v in ok.items() if k[0] in ("G", "cpg")}
    ext = {}
    if ("G", 1) in ok:
        ext["LN (G=1)"] = ok[("G", 1)]
    if ("cpg", 1) in ok:
        ext["IN (1 channel/group)"] = ok[("cpg", 1)]
    mid = {k: v for k, v in gn.items() if not (k[1] == 1) and k not in extremes}
    c1 = "Intermediate group counts beat both extremes, LN and IN"
    unjudged = not_judged(c1, gn_cells)
    if unjudged is not None:
        claims.append(unjudged)
    elif ext and mid:
        best_k = min(mid, key=mid.get)
        label = f"{'G' if best_k[0] == 'G' else 'channels/group'}={best_k[1]}"
        gaps = {n: v - mid[best_k] for n, v in ext.items()}
        verdict = ("held" if all(g > tol for g in gaps.values()) else
                   "did not hold" if any(g < -tol for g in gaps.values()) else "inconclusive")
        ev = (f"best intermediate GN ({label}) error {mid[best_k]:.2f}%; "
              + "; ".join(f"{n}: {v:.2f}% ({gaps[n]:+.2f})" for n, v in ext.items())
              + f"; {tol_txt}.")
        claims.append(Claim(c1, verdict, ev))
    else:
        claims.append(Claim(c1, "not tested", "Needs G=1 or 1 channel/group, and another GN."))
    c2 = "Normalization helps: no normalization is worse than GN and BN"
    base_cells = {cell_label(k): s for k, s in err.items() if k[0] == "base"}
    unjudged = not_judged(c2, {**gn_cells, **base_cells})
    if unjudged is not None:
        claims.append(unjudged)
    elif ("base", "none") in ok and gn:
        best_norm = min([v for v in gn.values()] + ([ok[("base", "bn")]]
                                                     if ("base", "bn") in ok else []))
        gap = ok[("base", "none")] - best_norm
        verdict = "held" if gap > tol else "did not hold" if gap < -tol else "inconclusive"
        claims.append(Claim(c2, verdict,
                            f"no normalization: {ok[('base', 'none')]:.2f}% error vs best "
                            f"normalized {best_norm:.2f}% ({gap:+.2f} pp); {tol_txt}."))
    elif ("base", "none") in err and err[("base", "none")].all_diverged:
        claims.append(Claim(c2, "held", "Training without normalization diverged."))
    else:
        claims.append(Claim(c2, "not tested", "The no-normalization baseline was not run."))
    return claims


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def classification_computation(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a classification cell computes (:attr:`Task.computation`): its config without the
    task's name and the batch sizes a per-example run stands for, with GBGN whose batch groups
    are the whole per-worker batch (e = b) named BGN, which it is.

    So the G sweep's cell at the paper's G is the batch-size table's BGN cell, GBGN at b = e is
    BGN, the groups study's BN (and GN with 32 groups) at its batch size are the batch-size
    table's, and a ``num_groups="auto"`` cell whose policy gives every layer the same G (its
    ``layer_groups``; each a divisor of its layer's D) is the fixed-G cell it builds: the
    runner trains each once.

    Example:
        >>> base = {"seed": 0, "batch_size": 2, "workers": 32, "num_groups": 1}
        >>> a = classification_computation({**base, "task": "g-sweep", "norm": "bgn"})
        >>> b = classification_computation({**base, "task": "batch-size", "norm": "gbgn",
        ...                                 "gbgn_examples": 2})
        >>> a == b
        True
        >>> a == classification_computation({**base, "task": "normalizers", "norm": "bgn",
        ...                                  "num_groups": "auto", "layer_groups": [1, 1, 1]})
        True
    """
    out = {k: v for k, v in config.items() if k not in ("task", "covers_batch_sizes")}
    if out.get("norm") == "gbgn" and out.get("gbgn_examples") == out.get("batch_size"):
        out["norm"] = "bgn"
        del out["gbgn_examples"]
    groups = out.get("layer_groups")
    if out.get("num_groups") == AUTO and groups and len(set(groups)) == 1:
        # every layer gets G = g, a divisor of its D: the fixed-G cell builds the same model
        out["num_groups"] = int(groups[0])
        del out["layer_groups"]
    return out


#: The protocol options each task applies (``Task.options``): the G sweep (``--groups``) is the
#: g-sweep's; the g-sweep trains BGN only and the groups task GN and its baselines at
#: ``groups_batch_size``, so they do not apply ``--norms`` (nor groups ``--batch-sizes``).
_OPTIONS = frozenset({"dataset", "data_root", "loader_workers", "model", "image_size", "epochs",
                      "seeds", "batch_sizes", "norms", "amp"})
_SETTINGS = preset_settings(*CLASSIFY_PRESETS.values(), *DATASET_DEFAULTS.values())

TASK_BATCH_SIZE = register_task(Task(
    name="batch-size", presets=_PRESETS, cells=cells_batch_size, run=run_classify,
    report=report_batch_size, title="Accuracy vs batch size (BGN paper Table 2, Fig. 1)",
    check=check_classification_data, options=_OPTIONS, settings=_SETTINGS,
    computation=classification_computation,
))
TASK_G_SWEEP = register_task(Task(
    name="g-sweep", presets=_PRESETS, cells=cells_g_sweep, run=run_classify,
    report=report_g_sweep, title="BGN's G sweep (BGN paper Table 1)",
    check=check_classification_data, options=_OPTIONS - {"norms"} | {"groups"},
    settings=_SETTINGS, computation=classification_computation,
))
TASK_GROUPS = register_task(Task(
    name="groups", presets=_PRESETS, cells=cells_groups, run=run_classify,
    report=report_groups, title="GN group division (GN paper Table 3)",
    check=check_classification_data, options=_OPTIONS - {"norms", "batch_sizes"},
    settings=_SETTINGS, computation=classification_computation,
))
