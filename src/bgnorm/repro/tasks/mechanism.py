"""The paper's mechanism on digits: accuracy against the number of values per statistic, the
``mechanism`` task.

The BGN paper's argument is a mechanism: BatchNorm degrades at small per-worker batch because
each statistic is computed from few values (b * H * W of them), and BGN draws values from C, H
and W too. The number of values behind a statistic (:func:`bgnorm.values_per_statistic`) is set
by the per-worker batch b *and* the layer's spatial size, so this study varies both: the same
5-stage ResNet (:func:`~bgnorm.repro.models.small_resnet`) ends at 4x4, 2x2 or 1x1
(:func:`~bgnorm.repro.models.strides_to_final_size`: only the strides move), trained with b = 2
... 128 examples per worker on the paper's 8 virtual workers (lr 0.1 * b / 32).

Norms are named in the preset's ``norms`` list (:data:`NORM_VARIANTS`): ``bn``, ``gn`` (32
groups, capped per layer at the layer's channels), ``bgn`` (the paper's G for the batch size,
:func:`bgnorm.paper_groups`) and ``bgn-g<G>`` (a fixed G in every layer). A new variant, such
as another G rule, is one more entry of :data:`NORM_VARIANTS` (a function of the per-worker
batch returning the cell's norm keys); ``bgn-auto`` is BGN with the per-layer policy's G
(:func:`bgnorm.auto_groups`, each layer's G stored in the cell's ``layer_groups``).
``--norms bn,gn,bgn`` selects among the registry names; the fixed-G variants and ``bgn-auto``
go through ``--set 'norms=["bn", "bgn-g16", "bgn-auto"]'``, as do ``final_sizes``,
``workers``, ``min_steps`` and every other key of :data:`MECHANISM_PRESETS`.

The report gives, for every cell, the smallest and median values per statistic over the norm
layers, the accuracy against the smallest (table and PNG, a line per norm), the number of
values below which BN fails (computed from the converged cells) and the claims, judged on
converged cells only. It is the paper's mechanism on 5,000 digits, not its ImageNet numbers.
"""

from __future__ import annotations

import copy
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import bgnorm

from ..norms import PER_EXAMPLE, NormSpec, probe_norm_inputs
from ..presets import apply_overrides, preset_settings, workers_for
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
from ..train import scaled_lr
from .base import CellContext, Record, Task, register_task
from .classify import (
    check_classification_data,
    input_shape,
    load_classification_data,
    run_classify,
    stamp_policy_groups,
)

__all__ = [
    "MECHANISM_PRESETS",
    "NORM_VARIANTS",
    "TASK_MECHANISM",
    "bn_threshold",
    "cells_mechanism",
    "layer_values",
    "report_mechanism",
    "run_mechanism",
    "variant_keys",
]

_PRESETS = ("smoke", "quick", "full")

#: The norms of the study by name: each maps the per-worker batch b to the cell's norm keys
#: (read by :meth:`bgnorm.repro.norms.NormSpec.from_config`). ``bgn-g<G>`` (a fixed G) is
#: parsed by :func:`variant_keys`; add an entry here for a new variant.
NORM_VARIANTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "bn": lambda b: {"norm": "bn"},
    "gn": lambda b: {"norm": "gn", "gn_groups": bgnorm.DEFAULT_NUM_GROUPS},
    "bgn": lambda b: {"norm": "bgn", "num_groups": bgnorm.paper_groups(b)},
    # every layer's G from the per-layer policy (bgnorm.auto_groups); the cell carries the G
    # it gives each layer (layer_groups, checked before training)
    "bgn-auto": lambda b: {"norm": "bgn", "num_groups": "auto"},
}
_FIXED_G = re.compile(r"bgn-g([1-9][0-9]*)")
#: How the report names the variants (``bgn-g<G>`` -> "BGN (G=<G>)").
_LABELS = {"bn": "BN", "gn": "GN (32 groups)", "bgn": "BGN (paper's G)",
           "bgn-auto": "BGN (policy's G)"}

_COMMON: dict[str, Any] = {
    "model": "small_resnet",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "milestones": [0.3, 0.6, 0.9],
    "lr_gamma": 0.1,
    "schedule": "cosine",
    "warmup_epochs": 1,
    "base_lr": 0.1,
    "zero_init_residual": False,
    "split_seed": 0,
    "test_fraction": 0.2,
    "crop_padding": 0,
    "hflip": False,
    "amp": None,
    "eval_batch_size": 500,
    # the paper's protocol: 8 workers of b examples, lr 0.1 * b / 32 (0.1 per 256 per step)
    "workers": 8,
    "total_batch": None,
    "lr_reference_batch": 256,
    # each cell trains at least this many steps (more epochs where 8 x b leaves few steps)
    "min_steps": 0,
}

#: Presets of the ``mechanism`` task.
MECHANISM_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        **_COMMON,
        "dataset": "digits", "image_size": None,
        "model_kwargs": {"width": 4, "blocks_per_stage": [1, 1, 1, 1]},
        "final_sizes": [2, 1], "batch_sizes": [8, 2], "norms": ["bn", "gn", "bgn", "bgn-g4"],
        "workers": None, "total_batch": 32, "lr_reference_batch": 32,
        "epochs": 2, "median_of": 2, "seeds": [0],
    },
    "quick": {
        # the headline (BN, GN and BGN at b = 2 and 32 on the network ending at 1x1): about
        # 3 minutes on 2 cores, see docs/reproduction.md, "The mechanism"
        **_COMMON,
        "dataset": "mnist5k", "image_size": 16,
        "model_kwargs": {"width": 8, "blocks_per_stage": [1, 1, 1, 1, 1]},
        "final_sizes": [1], "batch_sizes": [32, 2], "norms": ["bn", "gn", "bgn"],
        "epochs": 15, "median_of": 3, "seeds": [0],
    },
    "full": {
        **_COMMON,
        "dataset": "mnist5k", "image_size": 16,
        "model_kwargs": {"width": 8, "blocks_per_stage": [1, 1, 1, 1, 1]},
        # b spaced 4x apart (2 ... 128): the values per statistic move 4x a step, the threshold
        # is bracketed as finely as the cost allows (about 2.5 CPU-hours, docs/reproduction.md)
        "final_sizes": [4, 2, 1], "batch_sizes": [128, 32, 8, 2],
        "norms": ["bn", "gn", "bgn", "bgn-auto", "bgn-g512"],
        # 8 x 128 examples per step leave 3 steps an epoch: at least the 225 steps of b = 32
        "epochs": 15, "min_steps": 225, "median_of": 3, "seeds": [0, 1, 2],
    },
}

#: Keys of a preset copied into every cell (the sweep axes are expanded instead).
_CELL_KEYS = ("dataset", "image_size", "split_seed", "test_fraction", "model",
              "zero_init_residual", "median_of", "base_lr", "lr_reference_batch", "momentum",
              "weight_decay", "milestones", "lr_gamma", "warmup_epochs", "schedule",
              "crop_padding", "hflip", "amp", "eval_batch_size")


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def variant_keys(name: str, batch_size: int) -> dict[str, Any]:
    """The norm keys of the variant ``name`` at ``batch_size`` examples per worker.

    Example:
        >>> variant_keys("bgn", 2), variant_keys("bgn-g16", 2), variant_keys("bn", 2)
        ({'norm': 'bgn', 'num_groups': 1}, {'norm': 'bgn', 'num_groups': 16}, {'norm': 'bn'})
    """
    if name in NORM_VARIANTS:
        return dict(NORM_VARIANTS[name](int(batch_size)))
    match = _FIXED_G.fullmatch(name)
    if match:
        return {"norm": "bgn", "num_groups": int(match.group(1))}
    raise ValueError(f"unknown norm {name!r} for the mechanism task; valid norms: "
                     f"{', '.join(NORM_VARIANTS)} and bgn-g<G> (BGN with a fixed G, e.g. "
                     "bgn-g16)")


def _label(variant: str) -> str:
    match = _FIXED_G.fullmatch(variant)
    return f"BGN (G={match.group(1)})" if match else _LABELS.get(variant, variant)


def _preset(preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if preset not in MECHANISM_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: "
                         f"{', '.join(MECHANISM_PRESETS)}")
    return apply_overrides(copy.deepcopy(MECHANISM_PRESETS[preset]), overrides)


def cells_mechanism(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cells of the ``mechanism`` task: every seed x final size x norm x per-worker batch.

    Each cell's ``model_kwargs`` carry the ``stage_strides`` that end the network at its
    ``final_size``; ``epochs`` is raised to reach ``min_steps`` steps; GN (per-example
    statistics) runs once per examples-per-step, covering every b with that total.
    """
    from ..models import strides_to_final_size
    from ..store import cell_id

    cfg = _preset(preset, overrides)
    size = input_shape(cfg)[1]  # from the dataset's name and image_size, no data read
    stages = len(cfg["model_kwargs"]["blocks_per_stage"])
    n_train = None
    cells: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    for seed in cfg["seeds"]:
        for final in cfg["final_sizes"]:
            strides = strides_to_final_size(size, stages, int(final))
            for variant in cfg["norms"]:
                for b in sorted(cfg["batch_sizes"], reverse=True):
                    keys = variant_keys(variant, b)
                    workers = workers_for(cfg, b)
                    cell: dict[str, Any] = {"task": "mechanism", "seed": int(seed),
                                            "variant": variant, **keys}
                    cell.update({k: copy.deepcopy(cfg.get(k)) for k in _CELL_KEYS})
                    cell["model_kwargs"] = {**cfg["model_kwargs"], "stage_strides": strides}
                    cell["final_size"] = int(final)
                    cell["batch_size"], cell["workers"] = int(b), workers
                    if keys["norm"] in PER_EXAMPLE:
                        cell["batch_size"], cell["workers"] = workers * int(b), 1
                    per_step = cell["batch_size"] * cell["workers"]
                    epochs = int(cfg["epochs"])
                    if cfg.get("min_steps"):
                        if n_train is None:
                            n_train = _train_examples(cfg)
                        steps_per_epoch = max(1, n_train // per_step)
                        epochs = max(epochs, -(-int(cfg["min_steps"]) // steps_per_epoch))
                    cell["epochs"] = epochs
                    cell["lr"] = scaled_lr(cfg["base_lr"], cell["batch_size"],
                                           cell["workers"], cfg["lr_reference_batch"])
                    if keys["norm"] in PER_EXAMPLE:
                        key = cell_id(cell)
                        if key in index:
                            prev = cells[index[key]]
                            prev["covers_batch_sizes"] = sorted(
                                {*prev["covers_batch_sizes"], int(b)}, reverse=True)
                            continue
                        index[key] = len(cells)
                        cell["covers_batch_sizes"] = [int(b)]
                    cells.append(stamp_policy_groups(cell))
    return cells


def _train_examples(cfg: Mapping[str, Any]) -> int:
    from ..data import bundled_dataset

    split = bundled_dataset(cfg["dataset"], seed=int(cfg.get("split_seed", 0)),
                            test_fraction=float(cfg.get("test_fraction", 0.2)),
                            size=cfg.get("image_size"))
    return len(split.y_train)


# --------------------------------------------------------------------------------------------
# Running one cell
# --------------------------------------------------------------------------------------------


def layer_values(config: Mapping[str, Any], input_shape: Sequence[int],
                 num_classes: int = 10) -> list[dict[str, Any]]:
    """Every norm layer of a cell's model: channels, spatial size, G and the values behind each
    of its statistics in training (:func:`bgnorm.values_per_statistic` of the layer the cell
    builds, for the per-worker batch the statistics see).

    ``input_shape`` = (C, H, W) of one example.

    Example:
        >>> cfg = {"norm": "bn", "batch_size": 2, "workers": 8, "model": "small_resnet",
        ...        "model_kwargs": {"width": 4, "blocks_per_stage": [1, 1, 1, 1]}}
        >>> [(l["channels"], l["spatial"], l["values"]) for l in layer_values(cfg, (1, 8, 8))]
        ... # doctest: +NORMALIZE_WHITESPACE
        [(4, [8, 8], 128), (4, [8, 8], 128), (4, [8, 8], 128), (8, [4, 4], 32),
         (8, [4, 4], 32), (8, [4, 4], 32), (16, [2, 2], 8), (16, [2, 2], 8), (16, [2, 2], 8),
         (32, [1, 1], 2), (32, [1, 1], 2), (32, [1, 1], 2)]
    """
    from ..models import build_model

    spec = NormSpec.from_config(config)

    def build(norm_layer: Callable[[int], torch.nn.Module]) -> torch.nn.Module:
        return build_model(config["model"], num_classes, norm_layer, int(input_shape[0]),
                           **dict(config.get("model_kwargs") or {}))

    out = []
    for channels, spatial in probe_norm_inputs(build, tuple(input_shape)):
        module = spec.make(channels, spatial)
        # the statistics' batch: one worker's b (bn/bgn split the W * b step into workers)
        shape = (spec.total_batch, channels, *spatial)
        out.append({"channels": channels, "spatial": list(spatial),
                    "groups": spec.layer_groups(channels, spatial),
                    "values": int(bgnorm.values_per_statistic(module, shape))})
    return out


def run_mechanism(config: dict[str, Any], ctx: CellContext) -> dict[str, Any]:
    """Train one cell with :func:`~bgnorm.repro.tasks.classify.run_classify` and add its
    layers' values per statistic (``result["values_per_statistic"]``, one per norm layer, and
    their smallest and median)."""
    _, _, info = load_classification_data(config, torch.device("cpu"), 1)
    layers = layer_values(config, info["input_shape"], info["num_classes"])
    last = tuple(layers[-1]["spatial"])
    final = int(config["final_size"])
    if last != (final, final):
        raise ValueError(f"the model's last norm layer sees {last}, not the cell's final_size "
                         f"{final}x{final}: check model_kwargs' stage_strides")
    result = run_classify(config, ctx)
    values = [layer["values"] for layer in layers]
    result.update(values_per_statistic=values, values_smallest=min(values),
                  values_median=statistics.median(values))
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _covered(rec: Record) -> list[int]:
    return list(rec.config.get("covers_batch_sizes") or [rec.config["batch_size"]])


def _key(rec: Record) -> list[tuple[str, int, int]]:
    return [(rec.config["variant"], int(rec.config["final_size"]), b) for b in _covered(rec)]


def _order(variants: Sequence[str]) -> list[str]:
    fixed = sorted((v for v in variants if _FIXED_G.fullmatch(v)),
                   key=lambda v: int(v.split("-g")[1]))
    known = [v for v in NORM_VARIANTS if v in variants]
    return known + fixed + sorted(set(variants) - set(known) - set(fixed))


def bn_threshold(points: Sequence[tuple[int, Summary]], tol: float
                 ) -> tuple[str, int | None, int | None, float]:
    """Where BN fails, from its cells as ``(smallest values per statistic, accuracy)`` pairs.

    A cell *fails* when its mean accuracy is more than ``tol`` below the best BN cell (or every
    seed diverged). Returns ``(kind, fail_max, hold_min, best)``: ``kind`` is ``"threshold"``
    (every failing cell has fewer values than every holding one: BN fails at ``fail_max``
    values or fewer and holds from ``hold_min``), ``"none failed"``, ``"interleaved"``
    (failing and holding cells alternate: no single threshold) or ``"no data"`` (no cell
    finished).

    Example:
        >>> cells = [(2, Summary((26.0,))), (8, Summary((98.1,))), (32, Summary((98.2,)))]
        >>> bn_threshold(cells, 1.0)
        ('threshold', 2, 8, 98.2)
    """
    ok = [(v, s.mean) for v, s in points if s.ok]
    if not ok:
        return "no data", None, None, float("nan")
    best = max(a for _, a in ok)
    fail = sorted(v for v, s in points if _failed(s, best, tol))
    hold = sorted(v for v, s in points if s.ok and not _failed(s, best, tol))
    if not fail:
        return "none failed", None, min(hold), best
    if max(fail) < min(hold):
        return "threshold", max(fail), min(hold), best
    return "interleaved", max(fail), min(hold), best


def _failed(s: Summary, best: float, tol: float) -> bool:
    """A cell *fails* when every seed diverged or its mean is more than ``tol`` below ``best``."""
    return s.all_diverged or (s.ok and s.mean < best - tol)


def _gap_verdict(gaps: Sequence[tuple[str, float]], tol: float) -> str:
    """*held* when every gap exceeds ``tol``, *did not hold* when one is below ``-tol``."""
    return ("held" if all(g > tol for _, g in gaps) else
            "did not hold" if any(g < -tol for _, g in gaps) else "inconclusive")


def _n_test(records: Sequence[Record]) -> int:
    ns = [int(r.result.get("n_test") or 0) for r in records if r.status == "ok"]
    return min(ns) if ns else 0


def report_mechanism(records: list[Record], out_dir: Path) -> str:
    """The study's table (norm x last stage x batch -> values per statistic, accuracy), the
    accuracy-vs-values plot, BN's threshold and the claims, with the convergence section."""
    title = "## The mechanism: accuracy against the values per statistic (digits)"
    if not records:
        return title + "\n\nNo results yet.\n"
    acc = summarize(records, _key)
    values: dict[tuple[str, int, int], tuple[int, float]] = {}
    for r in records:
        if "values_smallest" in r.result:
            for k in _key(r):
                values[k] = (int(r.result["values_smallest"]), float(r.result["values_median"]))
    variants = _order(sorted({k[0] for k in acc}))
    finals = sorted({k[1] for k in acc}, reverse=True)
    sizes = sorted({k[2] for k in acc}, reverse=True)
    flags = {k: ("still improving" if s.unconverged else "did not train" if s.untrained
                 else "diverged" if s.all_diverged else "did not fit" if s.unfit
                 else "converged") for k, s in acc.items()}
    rows = []
    for v in variants:
        for f in finals:
            for b in sizes:
                k = (v, f, b)
                if k not in acc:
                    continue
                vs = values.get(k)
                groups = {r.config.get("num_groups") or r.config.get("gn_groups")
                          for r in records if k in _key(r)} - {None}
                rows.append([_label(v), ",".join(map(str, sorted(groups))), f"{f}x{f}", str(b),
                             str(vs[0]) if vs else "?", f"{vs[1]:g}" if vs else "?",
                             fmt_summary(acc[k]), flags[k]])
    table = markdown_table(["norm", "G", "last stage", "b per worker", "values/stat (smallest)",
                            "values/stat (median)", "top-1 accuracy (%)", "convergence"],
                           rows, align="lrlrrrrl")
    series = {}
    for v in variants:
        pts: dict[int, list[float]] = {}
        for (vv, f, b), s in acc.items():
            if vv == v and (vv, f, b) in values and s.ok:
                pts.setdefault(values[(vv, f, b)][0], []).append(s.mean)
        series[_label(v)] = [(x, statistics.fmean(ys)) for x, ys in sorted(pts.items())]
    series = {k: v for k, v in series.items() if v}
    moving = sum(bool(s.unconverged) for s in acc.values())
    plot = line_plot(out_dir / "mechanism.png", series,
                     xlabel="values per statistic (smallest over the norm layers, log scale)",
                     ylabel="top-1 accuracy (%)", title="Accuracy vs values per statistic",
                     note=f"mean over seeds; {moving} point(s) still improving (see the table)"
                     ) if series else None
    tol, tol_txt = noise_level(acc.values(), _n_test(records))
    claims = _claims(acc, values, tol, tol_txt)
    c = records[0].config
    seeds = sorted({r.config["seed"] for r in records})
    split = sorted({(r.config["batch_size"], r.config["workers"]) for r in records
                    if r.config["norm"] not in PER_EXAMPLE}, reverse=True)
    workers = ", ".join(f"{w} x {b}" for b, w in split) or "per-example norms only"
    epochs = sorted({int(r.config["epochs"]) for r in records})
    epochs_txt = (f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}")
    protocol = (
        f"*Protocol:* {c['dataset']} ({c.get('image_size') or 'native'} px), {c['model']} of "
        f"{len(c['model_kwargs']['blocks_per_stage'])} stages from "
        f"{c['model_kwargs'].get('width')} channels, the last stage ending at "
        f"{', '.join(f'{f}x{f}' for f in finals)} (only the strides differ); virtual workers x "
        f"examples per worker: {workers} (GN: the same examples per step on one worker); lr "
        f"{c['base_lr']:g} per {c['lr_reference_batch']} examples per step, SGD momentum "
        f"{c['momentum']:g}, weight decay {c['weight_decay']:g}, cosine after "
        f"{c.get('warmup_epochs', 0):g} warm-up epoch(s), {epochs_txt} epochs; accuracy = "
        f"median of the last {c['median_of']} epochs' test accuracies, mean ± 95% interval "
        f"over {len(seeds)} seed(s).")
    framing = (
        f"*What this is:* the paper's mechanism (statistics from few values are noisy) on "
        f"{c['dataset']} digits, made visible by a network whose last stage reaches 1x1 as an "
        "ImageNet-style ResNet does on 28-32 px inputs. It is not a reproduction of the "
        "paper's ImageNet numbers: the threshold below is where BN fails on this data and "
        "network; ImageNet's ResNet-50 still loses ~10 points at 98 values per statistic.")
    vps = ("*Values per statistic* (`bgnorm.values_per_statistic`): the numbers each mean and "
           "variance is computed from in training, b x H x W for BN (b the per-worker batch), "
           "b x C x H x W / G for BGN, (C / G) x H x W for GN; smallest and median over the "
           "model's norm layers. The plot's x axis is the smallest (the layer that sees the "
           "fewest).")
    parts = [title, "", framing, "", table, "", protocol, " ", vps]
    note = untrained_note(records)
    if note:
        parts += [" ", note]
    parts += [""]
    if plot:
        parts += ["![accuracy vs values per statistic](mechanism.png)", ""]
    parts += ["### Claims checked", "", render_claims(claims), ""]
    return "\n".join(parts)  # the runner appends the convergence section, as for every task


def _claims(acc: Mapping[tuple[str, int, int], Summary],
            values: Mapping[tuple[str, int, int], tuple[int, float]], tol: float,
            tol_txt: str) -> list[Claim]:
    claims: list[Claim] = []
    bn_keys = [k for k in acc if k[0] == "bn" and k in values]
    bn_cells = {f"BN at {k[1]}x{k[1]}, b={k[2]}": acc[k] for k in bn_keys}
    name = "BN fails where its statistics see few values"
    if len(bn_keys) < 2:
        return [Claim(name, "not tested", "Needs BN at two or more values per statistic.")]
    unjudged = not_judged(name, bn_cells)
    failing: list[tuple[str, int, int]] = []
    # judged where a fixed-G BGN ran: a large G at a small batch is the designed test
    follows: Claim | None = None
    if any(_FIXED_G.fullmatch(k[0]) for k in acc):
        follows = Claim(_FOLLOWS, "not tested", "BN showed no single threshold (see above).")
    if unjudged is not None:
        claims.append(unjudged)
        follows = follows and Claim(_FOLLOWS, "not judged", "Needs BN's verdict (see above).")
    else:
        points = sorted(((values[k][0], acc[k]) for k in bn_keys), key=lambda p: p[0])
        kind, fail_max, hold_min, best = bn_threshold(points, tol)
        listing = "; ".join(f"{k[1]}x{k[1]}, b={k[2]}: {values[k][0]} values, "
                            f"{fmt_summary(acc[k])}"
                            for k in sorted(bn_keys, key=lambda k: (values[k][0], -k[1])))
        if kind == "threshold":
            failing = [k for k in bn_keys if values[k][0] <= fail_max]
            if follows is not None:
                follows = _follows_values(acc, values, fail_max, hold_min,
                                          max(values[k][0] for k in bn_keys), best, tol,
                                          tol_txt)
            claims.append(Claim(name, "held",
                                f"BN failed (more than the noise below its best, {best:.2f}) "
                                f"with {fail_max} values per statistic or fewer and held from "
                                f"{hold_min}: the threshold lies between {fail_max} and "
                                f"{hold_min} values. BN (last stage, b: smallest values per "
                                f"statistic, accuracy): {listing}; {tol_txt}."))
        elif kind == "none failed":
            claims.append(Claim(name, "did not hold",
                                f"BN stayed within the noise of its best ({best:.2f}) down to "
                                f"{points[0][0]} values per statistic: no failure in the tested "
                                f"range. {listing}; {tol_txt}."))
        else:
            failing = [k for k in bn_keys if acc[k].ok and acc[k].mean < best - tol]
            claims.append(Claim(name, "inconclusive",
                                f"BN failed at some points and held at others with more and "
                                f"fewer values (no single threshold): {listing}; {tol_txt}."))
    if follows is not None:
        claims.append(follows)
    holds = [("GN and BGN with the paper's G hold where BN fails", ("gn", "bgn"))]
    if any(k[0] == "bgn-auto" for k in acc):
        holds.append(("BGN with the per-layer policy's G holds where BN fails", ("bgn-auto",)))
    for name, variants in holds:
        if unjudged is not None:
            claims.append(Claim(name, "not judged", "Needs BN's verdict (see above)."))
        elif not failing:
            claims.append(Claim(name, "not tested", "BN failed in no cell."))
        else:
            claims.append(_holds_where_bn_fails(name, variants, failing, acc, tol, tol_txt))
    return claims + _large_batch_claim(acc, values, tol, tol_txt)


_FOLLOWS = ("The failure follows the values per statistic, not the norm (BGN fails where its "
            "statistics see as few values as BN's failing ones)")


def _follows_values(acc: Mapping[tuple[str, int, int], Summary],
                    values: Mapping[tuple[str, int, int], tuple[int, float]], fail_max: int,
                    hold_min: int, bn_max: int, best: float, tol: float, tol_txt: str) -> Claim:
    """Every BGN cell (any G; batch statistics, as BN's) whose smallest values per statistic
    lie in BN's tested range against BN's threshold: at ``fail_max`` values or fewer it should
    fail (more than ``tol`` below BN's best, ``best``), from ``hold_min`` up to ``bn_max`` hold.
    *held* when every such cell does, and at least one BGN cell is below the threshold."""
    cells = {k: s for k, s in acc.items() if k in values and k[0] not in ("bn", "gn")
             and (values[k][0] <= fail_max or hold_min <= values[k][0] <= bn_max)}
    below = [k for k in cells if values[k][0] <= fail_max]
    if not below:
        return Claim(_FOLLOWS, "not tested", f"No BGN cell has {fail_max} values per statistic "
                     "or fewer (a large fixed G at a small batch, e.g. bgn-g512 at b=2).")
    unjudged = not_judged(_FOLLOWS, {f"{_label(k[0])} at {k[1]}x{k[1]}, b={k[2]}": s
                                     for k, s in cells.items()})
    if unjudged is not None:
        return unjudged

    def text(k: tuple[str, int, int]) -> str:
        s = cells[k]
        return (f"{_label(k[0])} at {k[1]}x{k[1]}, b={k[2]}: {values[k][0]} values, "
                + ("diverged" if not s.ok else f"{s.mean:.2f}"))

    wrong = [k for k in cells if _failed(cells[k], best, tol) != (values[k][0] <= fail_max)]
    order = sorted(cells, key=lambda k: (values[k][0], k))
    if not wrong:
        return Claim(_FOLLOWS, "held",
                     f"Every BGN cell with {fail_max} values per statistic or fewer failed and "
                     f"every one with {hold_min} to {bn_max} held, as BN did (its best "
                     f"{best:.2f}): " + "; ".join(text(k) for k in order) + f"; {tol_txt}.")
    return Claim(_FOLLOWS, "did not hold",
                 f"Against BN's threshold (fail at {fail_max} values or fewer, hold from "
                 f"{hold_min}): " + "; ".join(text(k) for k in sorted(wrong, key=order.index))
                 + f" went the other way; {tol_txt}.")


def _holds_where_bn_fails(name: str, variants: Sequence[str],
                          failing: Sequence[tuple[str, int, int]],
                          acc: Mapping[tuple[str, int, int], Summary], tol: float,
                          tol_txt: str) -> Claim:
    """``variants`` against BN in each cell where BN failed: *held* when every one is more
    than ``tol`` above BN there, *did not hold* when one is more than ``tol`` below."""
    others = {f"{_label(v)} at {f}x{f}, b={b}": acc.get((v, f, b))
              for (_, f, b) in failing for v in variants}
    unjudged = not_judged(name, {k: s for k, s in others.items() if s is not None})
    if unjudged is not None:
        return unjudged
    gaps, missing = [], []
    for _, f, b in failing:
        bn = acc[("bn", f, b)]
        for v in variants:
            s = acc.get((v, f, b))
            if s is None or not s.ok:
                missing.append(f"{_label(v)} at {f}x{f}, b={b}")
                continue
            if not bn.ok:  # every BN seed diverged
                gaps.append((f"{_label(v)} at {f}x{f}, b={b}: {s.mean:.2f} vs BN diverged",
                             float("inf")))
                continue
            gaps.append((f"{_label(v)} at {f}x{f}, b={b}: {s.mean:.2f} vs BN {bn.mean:.2f}",
                         s.mean - bn.mean))
    if not gaps:
        return Claim(name, "not tested", f"Not run: {', '.join(missing)}.")
    return Claim(name, _gap_verdict(gaps, tol), "; ".join(t for t, _ in gaps)
                 + (f"; not run: {', '.join(missing)}" if missing else "") + f"; {tol_txt}.")


def _large_batch_claim(acc: Mapping[tuple[str, int, int], Summary],
                       values: Mapping[tuple[str, int, int], tuple[int, float]], tol: float,
                       tol_txt: str) -> list[Claim]:
    """The paper's other half: at large batch, BGN with a large G beats BN."""
    name = "At the largest batch, BGN with a large G beats BN (too many values confuse BN)"
    big = max(k[2] for k in acc)
    if big < 128:
        return [Claim(name, "not tested", f"The largest per-worker batch run is {big}; the "
                      "paper's claim is about 128 and above (the full preset runs it).")]
    rows, cells = [], {}
    for f in sorted({k[1] for k in acc if k[2] == big}, reverse=True):
        bn = acc.get(("bn", f, big))
        bgns = {k: s for k, s in acc.items()
                if k[1] == f and k[2] == big and (k[0] == "bgn" or _FIXED_G.fullmatch(k[0]))}
        if bn is None or not bgns:
            continue
        cells[f"BN at {f}x{f}, b={big}"] = bn
        cells.update({f"{_label(k[0])} at {f}x{f}, b={big}": s for k, s in bgns.items()})
        rows.append((f, bn, bgns))
    if not rows:
        return [Claim(name, "not tested", f"BN and BGN were not both run at b={big}.")]
    unjudged = not_judged(name, cells)
    if unjudged is not None:
        return [unjudged]
    gaps = []
    for f, bn, bgns in rows:
        ok = {k: s.mean for k, s in bgns.items() if s.ok}
        if not ok or not bn.ok:
            continue
        k = max(ok, key=ok.get)
        gaps.append((f"{f}x{f}: {_label(k[0])} (the best BGN) {ok[k]:.2f} "
                     f"({values.get(k, ('?',))[0]} values) vs BN {bn.mean:.2f} "
                     f"({values.get(('bn', f, big), ('?',))[0]} values)", ok[k] - bn.mean))
    if not gaps:
        return [Claim(name, "not tested", "No finished BN/BGN pair at the largest batch.")]
    return [Claim(name, _gap_verdict(gaps, tol), "; ".join(t for t, _ in gaps) + f"; {tol_txt}.")]


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

TASK_MECHANISM = register_task(Task(
    name="mechanism", presets=_PRESETS, cells=cells_mechanism, run=run_mechanism,
    report=report_mechanism,
    title="The mechanism: accuracy vs values per statistic (BN, GN, BGN; digits)",
    check=check_classification_data, options=frozenset({"epochs", "seeds", "batch_sizes",
                                                         "norms"}),
    settings=preset_settings(*MECHANISM_PRESETS.values()),
))
