"""Few-shot learning with each normalization: the ``few-shot`` task (BGN paper Table 6).

Weight imprinting with a cosine classifier on ResNet-12 (:mod:`bgnorm.repro.fewshot`): the
backbone and a cosine classifier are trained on the base classes; then 5-way 1-shot and 5-shot
episodes of the novel classes are classified with imprinted weights, and the mean accuracy over
600 episodes is reported with its 95% confidence interval. Quick preset: MNIST-5k digits 0-4
base, 5-9 novel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..fewshot import (
    PAPER_FEWSHOT,
    CosineClassifier,
    ResNet12,
    bundled_fewshot,
    embed,
    evaluate_episodes,
    mean_confidence_interval,
)
from ..loop import StepLoop
from ..norms import DISPLAY_NAMES
from ..presets import preset_settings
from ..report import (
    NOT_TRAINED,
    STILL_IMPROVING,
    convergence,
    markdown_table,
    training_problem,
)
from ..train import BatchCursor, InMemoryBatches, check_finite, derive_seed
from .base import CellContext, Record, Task, register_task
from .common import (
    NORM_SETTINGS,
    NORMS,
    TASK_OPTIONS,
    build_with_norm,
    diverged_note,
    norm_cell,
    norm_order,
    step_batch,
    task_preset,
)

__all__ = ["FEWSHOT_PRESETS", "TASK_FEWSHOT", "cells_fewshot", "report_fewshot", "run_fewshot"]

_PRESETS = ("smoke", "quick", "paper")
FEWSHOT_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "dataset": "digits", "image_size": None, "channels": [8, 8, 16, 16],
        "batch_size": 32, "steps": 4, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
        "n_way": 5, "shots": [1, 5], "n_query": 5, "episodes": 20, "norms": ["bn", "bgn"],
        "seeds": [0],
    },
    "quick": {
        # 900 steps: at 300, LN's 1-shot accuracy ended 2.7 points below the same cell at 900;
        # at 900 every norm is at or above itself at 2,700 (longer training fits the base
        # classes and loses 1.6-4.5 points on the novel ones; docs/reproduction.md)
        "dataset": "mnist5k", "image_size": 16, "channels": [16, 32, 64, 128],
        "batch_size": 64, "steps": 900, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
        "n_way": 5, "shots": [1, 5], "n_query": 15, "episodes": 600, "norms": NORMS,
        "seeds": [0, 1],
    },
    "paper": {
        # ResNet-12 (64-160-320-640), 5-way 1/5-shot, 600 episodes, 15 queries (paper
        # protocol); base training (SGD 0.1, wd 5e-4, 90 epochs, step decay) is this suite's
        # suggestion. Data: image folders root/base and root/novel (e.g. miniImageNet 64/20).
        "dataset": "imagefolder", "image_size": 84, "channels": list(PAPER_FEWSHOT["channels"]),
        "batch_size": 64, "steps": 90 * 600, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
        "n_way": 5, "shots": [1, 5], "n_query": 15, "episodes": 600, "norms": NORMS,
        "seeds": [0],
    },
}
_KEYS = ("dataset", "image_size", "channels", "steps", "lr", "momentum", "weight_decay",
         "n_way", "shots", "n_query", "episodes")


def cells_fewshot(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One cell per norm x seed."""
    cfg = task_preset(FEWSHOT_PRESETS, preset, overrides, task="few-shot")
    if cfg["dataset"] == "imagefolder" and not cfg.get("data_root"):
        raise ValueError("the paper preset reads base/novel class folders from your own copy: "
                         "pass --data-root DIR with DIR/base and DIR/novel")
    return [norm_cell("few-shot", cfg, s, n, _KEYS) for s in cfg["seeds"] for n in cfg["norms"]]


def check_fewshot_data(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Bundled digits, or ``--data-root`` with ``base/`` and ``novel/`` class folders."""
    from ..data import BUNDLED_DATASETS, check_image_folders

    checked: list[str] = []
    for name, root in sorted({(c["dataset"], (c.get("runtime") or {}).get("data_root"))
                              for c in configs}, key=str):
        if name in BUNDLED_DATASETS:
            continue
        if name != "imagefolder":
            raise ValueError(f"unknown dataset {name!r} for the few-shot task (bundled: "
                             f"{', '.join(BUNDLED_DATASETS)}; or imagefolder with --data-root)")
        if not root:
            raise ValueError("the few-shot task reads base/novel class folders from your own "
                             "copy: pass --data-root DIR with DIR/base and DIR/novel")
        checked += map(str, check_image_folders(root, ["base", "novel"], same_classes=False))
    return checked


def _load(config: Mapping[str, Any]):
    """``FewShotData``: bundled digits (0-4 base), or ``data_root/{base,novel}`` folders."""
    from ..data import BUNDLED_DATASETS

    if config["dataset"] in BUNDLED_DATASETS:
        return bundled_fewshot(config["dataset"], seed=0, size=config.get("image_size"))
    from ..data import ImageFolder, imagenet_eval_transform
    from ..fewshot import FewShotData

    root = Path((config.get("runtime") or {})["data_root"]).expanduser()
    size = int(config.get("image_size") or 84)
    tf = imagenet_eval_transform(size, resize=size)

    def stack(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        ds = ImageFolder(folder, transform=tf)
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return torch.stack(xs), torch.tensor(ys)

    xb, yb = stack(root / "base")
    xn, yn = stack(root / "novel")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(yb), generator=g)
    n_te = max(1, len(yb) // 20)
    te, tr = perm[:n_te], perm[n_te:]
    return FewShotData(xb[tr], yb[tr], xb[te], yb[te], xn, yn,
                       tuple(range(int(yb.max()) + 1)), tuple(sorted(set(yn.tolist()))), 3,
                       (0.0,) * 3, (1.0,) * 3)


def run_fewshot(config: dict[str, Any], ctx: CellContext) -> dict[str, Any]:
    """Train ResNet-12 + cosine classifier on the base classes, then imprinting episodes."""
    device = ctx.device
    data = _load(config)
    shape = tuple(data.x_base_train.shape[1:])
    channels = tuple(int(c) for c in config["channels"])

    def build(nl):
        backbone = ResNet12(nl, data.in_channels, channels)
        return nn.Sequential(backbone, CosineClassifier(backbone.num_features,
                                                        data.num_base_classes))

    model, spec, layers = build_with_norm(build, config, shape)
    model.to(device)
    train = InMemoryBatches(data.x_base_train, data.y_base_train, spec.total_batch,
                            seed=derive_seed(config["seed"], "data"))
    batches = BatchCursor(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]),
                                momentum=float(config["momentum"]),
                                weight_decay=float(config["weight_decay"]))
    total = int(config["steps"])

    def update(step: int) -> dict[str, Any]:
        # cosine decay of the lr over the base training
        lr = float(config["lr"]) * 0.5 * (1 + torch.cos(torch.tensor(
            torch.pi * step / total)).item())
        for group in optimizer.param_groups:
            group["lr"] = lr
        xb, yb = step_batch(batches, step, device)
        loss = F.cross_entropy(model(xb), yb)
        value = float(loss.detach())
        if math.isfinite(value):  # a non-finite loss is the loop's Diverged, without a step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {"loss": value}

    def evaluate() -> dict[str, Any]:
        """Base-class test accuracy and the novel-class episodes (the first shot count is the
        curve's metric)."""
        was = model.training
        model.eval()
        with torch.no_grad():
            base_acc = 100.0 * float((model(data.x_base_test.to(device)).argmax(1).cpu()
                                      == data.y_base_test).float().mean())
        feats = embed(model[0], data.x_novel, device=device).cpu()
        model.train(was)
        check_finite(feats.sum(), "novel-class embeddings")
        out: dict[str, Any] = {"base_test_acc": base_acc}
        for k in config["shots"]:
            g = torch.Generator().manual_seed(derive_seed(config["seed"], "episodes", k))
            accs = evaluate_episodes(feats, data.y_novel, int(config["n_way"]), int(k),
                                     int(config["n_query"]), int(config["episodes"]), g)
            mean, half = mean_confidence_interval(accs)
            out[f"acc_{k}shot"] = 100.0 * mean
            out[f"ci_{k}shot"] = 100.0 * half
        out["metric"] = out[f"acc_{config['shots'][0]}shot"]
        out["ci"] = out[f"ci_{config['shots'][0]}shot"]  # the curve metric's noise
        return out

    loop = StepLoop(ctx, total, len(train))
    model.train()
    m = loop.run({"model": model, "optimizer": optimizer}, update, evaluate=evaluate,
                 what="base training loss")
    result: dict[str, Any] = {k: v for k, v in m.items() if k not in ("metric", "ci")}
    result.update(acc=m["metric"], steps=total, train_loss=loop.tail_loss(),
                  train_seconds=loop.seconds, curve=loop.curve,
                  norm=spec.describe(), params=sum(p.numel() for p in model.parameters()),
                  groups_adjusted=sum(l.adjusted for l in layers))
    return result


def report_fewshot(records: list[Record], out_dir: Path) -> str:
    """BGN paper Table 6: 5-way 1-shot and 5-shot accuracy (mean ± 95% CI) per norm."""
    title = "## Few-shot learning with imprinted weights (BGN paper Table 6)"
    if not records:
        return title + "\n\nNo results yet.\n"
    c = records[0].config
    shots = list(c["shots"])
    by_norm: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.config["seed"]):
        by_norm.setdefault(r.config["norm"], r)  # first seed (the CI is over episodes)
    rows = []
    for n in norm_order(records):
        r = by_norm[n]
        row = [DISPLAY_NAMES.get(n, n)]
        # "-": diverged, "n/t": finished without training (no steps, no finite result)
        missing = "-" if r.status != "ok" else NOT_TRAINED if training_problem(r) else None
        moving = " ‡" if convergence(r)[0] == STILL_IMPROVING else ""
        for k in shots:
            if missing:
                row.append(missing)
            else:
                row.append(f"{r.result[f'acc_{k}shot']:.2f} ± {r.result[f'ci_{k}shot']:.2f}"
                           + moving)
        row.append(missing or f"{r.result['base_test_acc']:.2f}")
        rows.append(row)
    header = ["norm", *(f"{c['n_way']}-way {k}-shot (%)" for k in shots),
              "base-class test acc. (%)"]
    table = markdown_table(header, rows)
    notes = [
        f"*Protocol:* {c['dataset']} ({c.get('image_size') or 'native'} px); ResNet-12 "
        f"({'-'.join(map(str, c['channels']))}) + cosine classifier trained on the base classes "
        f"for {c['steps']} SGD steps of {c['batch_size']} (lr {c['lr']:g}, cosine decay); "
        f"novel-class episodes with imprinted weights, {c['n_query']} queries per class, mean "
        f"over {c['episodes']} episodes ± 95% confidence interval (over episodes, one "
        "training run per norm)."]
    if c["dataset"] in ("digits", "mnist5k"):
        notes.append(
            "*What this preset can show:* base digits 0-4, novel digits 5-9 never seen in "
            "training; digits are far easier than miniImageNet, so accuracies are high and "
            "differences between norms small. The CI covers episode sampling only, not "
            "training noise.")
    d = diverged_note(records)
    if d:
        notes.append(d)
    return "\n".join([title, "", table, "", " ".join(notes), ""])


TASK_FEWSHOT = register_task(Task(
    name="few-shot", presets=_PRESETS, cells=cells_fewshot, run=run_fewshot,
    report=report_fewshot, title="Few-shot learning (BGN paper Table 6)",
    check=check_fewshot_data,
    options=TASK_OPTIONS,
    settings=preset_settings(*FEWSHOT_PRESETS.values(), NORM_SETTINGS),
))
