"""Unsupervised domain adaptation with each normalization: the ``domain-adaptation`` task
(BGN paper Table 7).

CAN (Kang et al., 2019): a ResNet backbone (norms swapped) trained with cross-entropy on the
labelled source plus the contrastive domain discrepancy (:func:`~bgnorm.repro.domain.cdd_loss`
on the pooled features and on the softmax probabilities) between class-aware source and target
batches, alternating with target clustering (:func:`~bgnorm.repro.domain.cluster_target`).
Every direction is a cell; the table gives target accuracy per direction and their mean, with
a source-only row (cross-entropy on the source only, same steps). Quick preset: MNIST-5k <->
scikit-learn digits, each digit framed on its content and resized to 8x8 (the resolution of
scikit-learn's digits), tested, as in CAN's protocol, on every target image (transductive).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..domain import PAPER_CAN, cdd_loss, class_aware_sample, cluster_target
from ..loop import StepLoop
from ..norms import DISPLAY_NAMES
from ..presets import preset_settings
from ..report import (
    DIVERGED,
    MISSING,
    NOT_TRAINED,
    Summary,
    fmt_summary,
    markdown_table,
    summarize,
    t_quantile,
)
from ..train import BatchCursor, InMemoryBatches, derive_seed, standard_layout
from .base import CellContext, Record, Task, register_task
from .common import (
    NORM_SETTINGS,
    NORMS,
    TASK_OPTIONS,
    build_with_norm,
    diverged_note,
    lr_schedule,
    norm_cell,
    norm_order,
    step_batch,
    task_preset,
)

__all__ = ["DOMAIN_PRESETS", "TASK_DOMAIN", "cells_domain", "report_domain", "run_domain"]

_PRESETS = ("smoke", "quick", "paper")
#: The protocol options the task applies: its domains name their data sets (no --dataset).
_OPTIONS = TASK_OPTIONS - {"dataset"}
_DIGITS = {"mnist5k": "MNIST", "digits": "Digits"}
DOMAIN_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "image_size": 8, "crop_to_content": True, "transductive": True,
        "directions": [["mnist5k", "digits"]], "model": "small_resnet",
        "model_kwargs": {"width": 8, "blocks_per_stage": [1, 1]}, "batch_size": 32,
        "warmup_steps": 3, "loops": 1, "loop_steps": 3, "lr": 0.05, "momentum": 0.9,
        "weight_decay": 5e-4, "cdd_weight": 0.3, "classes_per_batch": 10, "per_class": 3,
        "kernel_num": 5, "kernel_mul": 2.0, "filter_threshold": 1.0, "min_per_class": 3,
        "norms": ["bn", "bgn"], "source_only_norms": ["bn"], "seeds": [0],
    },
    "quick": {
        "image_size": 8, "crop_to_content": True, "transductive": True,
        "directions": [["mnist5k", "digits"], ["digits", "mnist5k"]],
        "model": "small_resnet", "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]},
        # 300 + 3 x 150 steps (the first sizing's 100 + 3 x 50, x3): over 8 seeds, 12 of 14
        # cells' means within 1.5 points of 3x, the other two within the noise; seed by seed
        # CAN's outcome on the digits moves by about 4 points (docs/reproduction.md)
        "batch_size": 64, "warmup_steps": 300, "loops": 3, "loop_steps": 150, "lr": 0.05,
        "schedule": "cosine", "lr_warmup_steps": 30, "momentum": 0.9, "weight_decay": 5e-4,
        "cdd_weight": PAPER_CAN["cdd_weight"],
        "classes_per_batch": 10, "per_class": 3, "kernel_num": 5, "kernel_mul": 2.0,
        "filter_threshold": 1.0, "min_per_class": 3, "norms": NORMS,
        # 4 seeds: a cell moves by about 4 points from seed to seed (CAN's draw of labels),
        # so 2 seeds cannot tell CAN from source only; 4 can (the report says what they resolve)
        "source_only_norms": ["bn"], "seeds": [0, 1, 2, 3],
    },
    "paper": {
        # CAN's Office-31 setting (PAPER_CAN) on the user's domains as image folders
        # (--data-root DIR with one class-folder tree per domain, e.g. DIR/amazon, DIR/webcam).
        "image_size": 224, "directions": [["amazon", "webcam"], ["amazon", "dslr"],
                                          ["webcam", "amazon"], ["webcam", "dslr"],
                                          ["dslr", "amazon"], ["dslr", "webcam"]],
        "transductive": True,  # folder domains: trained on and tested on every target image
        "model": "resnet50", "model_kwargs": {}, "batch_size": int(PAPER_CAN["source_batch"]),
        "warmup_steps": 0, "loops": int(PAPER_CAN["max_loops"]), "loop_steps": 200,
        "lr": PAPER_CAN["lr"], "momentum": PAPER_CAN["momentum"],
        "weight_decay": PAPER_CAN["weight_decay"], "cdd_weight": PAPER_CAN["cdd_weight"],
        "classes_per_batch": int(PAPER_CAN["classes_per_batch"]),
        "per_class": int(PAPER_CAN["per_class"]), "kernel_num": int(PAPER_CAN["kernel_num"]),
        "kernel_mul": PAPER_CAN["kernel_mul"], "filter_threshold": PAPER_CAN["filter_threshold"],
        "min_per_class": int(PAPER_CAN["min_per_class"]), "norms": NORMS,
        "source_only_norms": ["bn"], "seeds": [0],
    },
}
_KEYS = ("image_size", "crop_to_content", "transductive", "model", "model_kwargs",
         "warmup_steps", "loops", "loop_steps", "lr",
         "schedule", "lr_warmup_steps", "momentum", "weight_decay", "cdd_weight",
         "classes_per_batch", "per_class", "kernel_num", "kernel_mul", "filter_threshold",
         "min_per_class")


def cells_domain(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CAN cells per norm x direction x seed, plus source-only cells."""
    cfg = task_preset(DOMAIN_PRESETS, preset, overrides, _OPTIONS,
                      task="domain-adaptation")
    if preset == "paper" and not cfg.get("data_root"):
        raise ValueError("the paper preset reads the domains from your own copy: pass "
                         "--data-root DIR with one class-folder tree per domain")
    cells = []
    for s in cfg["seeds"]:
        for src, tgt in cfg["directions"]:
            cells += [norm_cell("domain-adaptation", cfg, s, n, _KEYS, source=src, target=tgt,
                                method="can") for n in cfg["norms"]]
            cells += [norm_cell("domain-adaptation", cfg, s, n, _KEYS, source=src, target=tgt,
                                method="source-only") for n in cfg["source_only_norms"]]
    return cells


def check_domain_data(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Bundled digit domains, or one class-folder tree per domain under ``--data-root``."""
    from ..data import BUNDLED_DATASETS, check_image_folders

    pairs = {((c.get("runtime") or {}).get("data_root"),
              tuple(d for d in (c["source"], c["target"]) if d not in BUNDLED_DATASETS))
             for c in configs}
    checked: list[str] = []
    for root, folders in sorted(pairs, key=str):
        if not folders:
            continue
        if not root:
            raise ValueError(f"domains {', '.join(folders)} are read from your own copy: pass "
                             "--data-root DIR with one class-folder tree per domain (DIR/"
                             f"{folders[0]}/<class>/<image>)")
        checked += map(str, check_image_folders(root, folders, same_classes=True))
    return list(dict.fromkeys(checked))


def _domain(name: str, config: Mapping[str, Any], target: bool = False):
    """A standardized TensorSplit of one domain (bundled digits or DIR/<name> folders).

    A bundled target domain with ``transductive`` set is trained on (without labels) and
    tested on all of its images, CAN's protocol (and the folder domains' below); otherwise
    its held-out 20% is the test set.
    """
    from .. import data as D

    if name in D.BUNDLED_DATASETS:
        split = D.bundled_dataset(name, seed=0, size=config.get("image_size"),
                                  crop=bool(config.get("crop_to_content")))
        if target and config.get("transductive"):
            x = torch.cat([split.x_train, split.x_test])
            y = torch.cat([split.y_train, split.y_test])
            split = dataclasses.replace(split, x_train=x, y_train=y, x_test=x, y_test=y)
        return split
    if target and not config.get("transductive"):
        raise ValueError(f"domain-adaptation: the target domain {name!r} is an image folder, "
                         "tested on every one of its images (CAN's protocol), which needs "
                         "transductive=true; folders have no held-out split (drop --set "
                         "transductive=false)")
    root = Path((config.get("runtime") or {})["data_root"]).expanduser() / name
    size = int(config.get("image_size") or 224)
    ds = D.ImageFolder(root, transform=D.imagenet_eval_transform(size, resize=size))
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    x, y = torch.stack(xs), torch.tensor(ys)
    # unsupervised DA: train on every target image (labels unused) and test on all of them
    return D.TensorSplit(x, y, x, y, len(ds.classes), 3, name, D.IMAGENET_MEAN, D.IMAGENET_STD)


@torch.no_grad()
def _features(model, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model.forward_features(standard_layout(x[i:i + 500].to(device)))
                     for i in range(0, len(x), 500)])
    model.train(was)
    return out


def run_domain(config: dict[str, Any], ctx: CellContext) -> dict[str, Any]:
    """Train one direction with CAN (or source only); target test accuracy."""
    from ..models import build_model

    device = ctx.device
    src, tgt = _domain(config["source"], config), _domain(config["target"], config, target=True)
    shape = (src.in_channels, *src.image_size)
    ncls = src.num_classes
    model, spec, layers = build_with_norm(
        lambda nl: build_model(config["model"], ncls, nl, src.in_channels,
                               **dict(config.get("model_kwargs") or {})), config, shape)
    model.to(device)
    train = InMemoryBatches(src.x_train, src.y_train, spec.total_batch,
                            seed=derive_seed(config["seed"], "data"))
    batches = BatchCursor(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]),
                                momentum=float(config["momentum"]),
                                weight_decay=float(config["weight_decay"]))
    warm, loops, per_loop = (int(config["warmup_steps"]), int(config["loops"]),
                             int(config["loop_steps"]))
    total = warm + loops * per_loop
    can = config["method"] == "can"
    loop = StepLoop(ctx, total, len(train))
    task = loop.task
    task.setdefault("kept_classes", [])
    # CAN's training loss adds the CDD, which keeps falling after the accuracy has settled:
    # the curve also records the labels' cross-entropy (``fit_loss``), the part the report's
    # convergence criterion judges; the steps' values since the last evaluation, resumable.
    task.setdefault("fit_losses", [])

    # CAN's "inv" decay (the paper), or cosine with warm-up (quick preset: the target accuracy
    # swings by 10+ points between evaluations at a slowly decaying lr; annealed to 0 it settles)
    kind = config.get("schedule") or "inv"
    cosine = lr_schedule(config, total) if kind != "inv" else None

    def update(step: int) -> dict[str, Any]:
        if cosine is not None:
            lr = cosine(step)
        else:
            lr = float(config["lr"]) / (1 + PAPER_CAN["inv_alpha"] * step) ** PAPER_CAN["inv_beta"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        if can and step >= warm and (step - warm) % per_loop == 0:
            # labelling step of CAN's alternating optimization
            cl = cluster_target(_features(model, src.x_train, device), src.y_train.to(device),
                                _features(model, tgt.x_train, device), ncls,
                                threshold=float(config["filter_threshold"]),
                                min_per_class=int(config["min_per_class"]))
            task["pseudo"] = cl.labels.cpu()
            task["classes"] = [int(c) for c in cl.classes]
            task["kept_classes"].append(len(cl.classes))
        xb, yb = step_batch(batches, step, device)
        loss = F.cross_entropy(model(xb), yb)
        if can:
            task["fit_losses"].append(float(loss.detach()))
        cdd_value = 0.0
        if can and step >= warm and task.get("classes"):
            g = torch.Generator().manual_seed(derive_seed(config["seed"], "class-aware", step))
            si, ti, _ = class_aware_sample(src.y_train, task["pseudo"], task["classes"],
                                           int(config["classes_per_batch"]),
                                           int(config["per_class"]), g)
            fs = model.forward_features(standard_layout(src.x_train[si].to(device)))
            ft = model.forward_features(standard_layout(tgt.x_train[ti].to(device)))
            ys, yt = src.y_train[si].to(device), task["pseudo"][ti].to(device)
            kw = {"kernel_mul": float(config["kernel_mul"]),
                  "kernel_num": int(config["kernel_num"])}
            cdd = (cdd_loss(fs, ys, ft, yt, ncls, **kw)
                   + cdd_loss(F.softmax(model.fc(fs), 1), ys, F.softmax(model.fc(ft), 1), yt,
                              ncls, **kw))
            cdd_value = float(cdd.detach())
            loss = loss + float(config["cdd_weight"]) * cdd
        value = float(loss.detach())
        if math.isfinite(value):  # a non-finite loss is the loop's Diverged, without a step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {"loss": value, "cdd": cdd_value}

    def predict(x: torch.Tensor) -> torch.Tensor:
        was = model.training
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(standard_layout(x[i:i + 500].to(device))).argmax(1)
                              for i in range(0, len(x), 500)]).cpu()
        model.train(was)
        return pred

    def evaluate() -> dict[str, Any]:
        acc = 100.0 * float((predict(tgt.x_test) == tgt.y_test).float().mean())
        src_acc = 100.0 * float((predict(src.x_test) == src.y_test).float().mean())
        point = {"metric": acc, "source_acc": src_acc}
        if can:
            fits, task["fit_losses"] = task["fit_losses"], []
            point["fit_loss"] = math.fsum(fits) / len(fits) if fits else float("nan")
        return point

    model.train()
    m = loop.run({"model": model, "optimizer": optimizer}, update, evaluate=evaluate)
    return {
        "acc": m["metric"], "source_acc": m["source_acc"],
        "n_test": len(tgt.y_test), "steps": total, "kept_classes": task["kept_classes"],
        "num_classes": ncls,
        "train_loss": loop.tail_loss(), "train_seconds": loop.seconds, "curve": loop.curve,
        "norm": spec.describe(), "groups_adjusted": sum(l.adjusted for l in layers),
    }


def _direction(c: Mapping[str, Any]) -> str:
    return f"{_DIGITS.get(c['source'], c['source'])} → {_DIGITS.get(c['target'], c['target'])}"


def report_domain(records: list[Record], out_dir: Path) -> str:
    """BGN paper Table 7: target accuracy per direction and mean, per norm, plus source only."""
    title = "## Unsupervised domain adaptation with CAN (BGN paper Table 7)"
    if not records:
        return title + "\n\nNo results yet.\n"
    dirs = []
    for r in records:
        d = _direction(r.config)
        if d not in dirs:
            dirs.append(d)
    acc = summarize(records, lambda r: (r.config["method"], r.config["norm"],
                                        _direction(r.config)))
    rows = []
    for method, label in (("source-only", "source only ({})"), ("can", "CAN + {}")):
        for n in norm_order([r for r in records if r.config["method"] == method]):
            cells = [acc.get((method, n, d)) for d in dirs]
            mean = (DIVERGED if any(s is not None and s.all_diverged for s in cells) else
                    NOT_TRAINED if any(s is not None and not s.ok for s in cells) else
                    MISSING if any(s is None for s in cells) else
                    f"{sum(s.mean for s in cells) / len(cells):.2f}")
            rows.append([label.format(DISPLAY_NAMES.get(n, n)),
                         *(fmt_summary(s) for s in cells), mean])
    table = markdown_table(["method", *dirs, "mean"], rows)
    c = next(r.config for r in records if r.config["method"] == "can") if any(
        r.config["method"] == "can" for r in records) else records[0].config
    target_text = (" on every target image, which the adaptation also sees without labels "
                   "(transductive, as in CAN)" if c.get("transductive") else
                   " on the target's held-out 20%")
    crop_text = (" (each digit framed on its content first, as scikit-learn's digits were)"
                 if c.get("crop_to_content") else "")
    lr_text = ("CAN's inv decay" if (c.get("schedule") or "inv") == "inv" else
               f"{int(c.get('lr_warmup_steps') or 0)} warm-up steps then cosine to 0")
    notes = [
        f"*Protocol:* target test accuracy (%){target_text}; {c['model']} backbone with the "
        f"norm swapped, {c['image_size']} px{crop_text}; {c['warmup_steps']} source-only "
        "warm-up steps then "
        f"{c['loops']} clustering loops x {c['loop_steps']} steps of source batch "
        f"{c['batch_size']} + CDD (weight {c['cdd_weight']:g}, features and probabilities) on "
        f"class-aware batches of {c['classes_per_batch']} classes x {c['per_class']}; SGD lr "
        f"{c['lr']:g} with {lr_text}. Source-only rows train the same number of steps "
        "on the source cross-entropy only."]
    if c.get("image_size") and int(c["image_size"]) <= 32:
        notes.append(
            "*What this preset can show:* whether CDD adaptation helps over source only and how "
            "the norms compare on a small digits shift (MNIST-5k <-> scikit-learn digits) after "
            "a few hundred steps from scratch; not the paper's Office-31 numbers (ImageNet-"
            "pretrained ResNet-50).")
    notes.append(_spread_note(acc))
    dn = diverged_note(records)
    if dn:
        notes.append(dn)
    return "\n".join([title, "", table, "", " ".join(notes), ""])


def _spread_note(cells: Mapping[Any, Summary]) -> str:
    """What the seeds resolve: the cells' seed-to-seed standard deviations and the smallest
    difference between two cells' means that is outside its 95% interval at that spread.

    CAN's target accuracy on the digits moves from run to run by several points (a draw of
    which clusters get which label), more than the differences between norms; the note says
    so from the records instead of a fixed warning. With ``n`` seeds a cell and the median
    standard deviation ``s``, two means differ resolvably when they are more than
    ``t(2n - 2) * s * sqrt(2 / n)`` apart (unpaired: pairing by seed does not remove a
    spread that comes from the adaptation's own draw).
    """
    sds = sorted(v.std for v in cells.values() if v and len(v.values) > 1)
    seeds = [len(v.values) for v in cells.values() if v and v.values]
    if not sds:
        return ("*Seeds:* one a cell, so the spread from run to run is not measured (on the "
                "digits it is several points: pass more seeds, e.g. `--seeds 0,1,2,3`).")
    n, s = min(seeds), statistics.median(sds)
    resolved = t_quantile(2 * n - 2) * s * math.sqrt(2 / n)
    return (f"*Seeds:* {n}{'+' if max(seeds) > n else ''} a cell; from seed to seed the cells "
            f"move by {sds[0]:.1f}-{sds[-1]:.1f} points (standard deviation, median {s:.1f}), "
            f"so two cells' means are told apart only when they differ by more than about "
            f"{resolved:.1f} points (95%, {n} seeds each).")


TASK_DOMAIN = register_task(Task(
    name="domain-adaptation", presets=_PRESETS, cells=cells_domain, run=run_domain,
    report=report_domain, title="Unsupervised domain adaptation (BGN paper Table 7)",
    check=check_domain_data,
    options=_OPTIONS,
    settings=preset_settings(*DOMAIN_PRESETS.values(), NORM_SETTINGS),
))
