"""Does the per-layer G policy transfer? The ``g-transfer`` task (issue 15, item 2).

:func:`bgnorm.auto_groups` (``num_groups="auto"``) gives each BGN layer the paper's G for the
per-worker batch b, lowered where the layer's statistics would see fewer than 32 values, as
whole channels or bands where they fit (``docs/choosing-g.md``). The paper measured its G on
one network; this study checks it where it was not: BGN is trained with every G of a sweep,
with the policy's per-layer G and with the paper's G (:func:`bgnorm.paper_groups`, one G for
every layer, capped per layer at the largest divisor of D below it) on networks whose layers
differ in size (D = C*H*W), at a small and a large per-worker batch, with the same seeds (same
data order and initialization) in every cell, so that differences are paired over seeds.
(Until the suite's measurements, ``docs/choosing-g.md``, the policy gave every layer the values
per statistic the paper's G gives ResNet-50's median layer; the quick preset's recorded tables
are of that rule.)

Cells (per seed x network x per-worker batch b), each with a ``role``:

* ``sweep``: BGN with each G of ``g_sweep``. A G larger than a layer allows is capped in that
  layer at the largest divisor of its D below it (:class:`~bgnorm.repro.norms.NormSpec`); the
  report lists the G every layer got.
* ``policy``: BGN with ``num_groups="auto"``; the cell's ``layer_groups`` are the G the policy
  gives each norm layer (so a change of the policy changes the cell's id).
* ``paper``: BGN with the paper's G for b.

Cells that are one training run are trained once (:func:`transfer_computation`): the paper's G
when it is a swept G, the policy when it gives one G to every layer that is a swept G (the
paper's G where it fits every layer), and a swept G that another task's cell already trained
(the quick preset's 16 px network at b = 64 and 2 are the ``g-sweep`` task's cells at G = 256,
64 and 1).

The report (:func:`report_transfer`) gives, per network x batch, the accuracy of every G, the
policy's per-layer G and values per statistic, the best swept G, the policy's and the paper's
difference to it (paired over seeds), and the claims "the policy's G is within noise of the
best swept G" and the same for the paper's G, judged on converged cells only
(:func:`bgnorm.repro.report.not_judged`), against the suite's noise level
(:func:`bgnorm.repro.report.noise_level`).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bgnorm
from bgnorm.layers import AUTO

from ..norms import PER_EXAMPLE
from ..presets import CLASSIFY_PRESETS, apply_overrides, preset_settings
from ..report import (
    Claim,
    Summary,
    fmt_summary,
    markdown_table,
    noise_level,
    not_judged,
    paired_difference,
    render_claims,
    summarize,
    untrained_note,
)
from .base import Record, Task, register_task
from .classify import (
    _IN_MEMORY,
    _adjusted_note,
    _cell,
    check_classification_data,
    classification_computation,
    run_classify,
)

__all__ = [
    "NET_16PX",
    "NET_28PX",
    "NET_DEEP",
    "ROLES",
    "TASK_G_TRANSFER",
    "TRANSFER_PRESETS",
    "cells_transfer",
    "layer_summary",
    "report_transfer",
    "transfer_computation",
]

#: The cells' roles: a G of the sweep, the per-layer policy, the paper's G.
ROLES = ("sweep", "policy", "paper")
_PRESETS = ("smoke", "quick", "full")


def _base(preset: str) -> dict[str, Any]:
    """The classification preset's protocol (optimizer, schedule, worker split, data)."""
    keep = ("dataset", "split_seed", "test_fraction", "zero_init_residual", "epochs",
            "median_of", "base_lr", "lr_reference_batch", "momentum", "weight_decay",
            "milestones", "lr_gamma", "warmup_epochs", "schedule", "crop_padding", "hflip",
            "amp", "eval_batch_size", "total_batch", "seeds")
    return {k: copy.deepcopy(CLASSIFY_PRESETS[preset][k]) for k in keep}


#: The quick preset's network (the ``batch-size`` and ``g-sweep`` tasks'): 3 stages of 16, 32
#: and 64 channels on 16 px digits, ending at 4x4; D = 4096, 2048, 1024.
NET_16PX = {"name": "16px-w16", "image_size": 16, "model": "small_resnet",
            "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]}}
#: The same layers on the digits at their native 28 px: D = 12544, 6272, 3136 (3x), the policy's
#: G at b = 64 is 4x the 16 px network's (32, 16, 8 against 8, 4, 2); 1.7x the CPU time.
NET_28PX = {"name": "28px-w16", "image_size": 28, "model": "small_resnet",
            "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1, 1]}}
#: The mechanism study's deeper network: 5 stages of 8 ... 128 channels on 16 px, ending at
#: 1x1; D = 2048 down to 128.
NET_DEEP = {"name": "16px-deep-1x1", "image_size": 16, "model": "small_resnet",
            "model_kwargs": {"width": 8, "blocks_per_stage": [1, 1, 1, 1, 1],
                             "stage_strides": [1, 2, 2, 2, 2]}}

#: Presets of the ``g-transfer`` task.
TRANSFER_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        # seconds: 8x8 digits, two widths, 2 epochs, one seed
        **_base("smoke"),
        "networks": [
            {"name": "8px-w4", "image_size": None, "model": "small_resnet",
             "model_kwargs": {"width": 4, "blocks_per_stage": [1, 1]}},
            {"name": "8px-w16", "image_size": None, "model": "small_resnet",
             "model_kwargs": {"width": 16, "blocks_per_stage": [1, 1]}},
        ],
        "batch_sizes": [8, 2], "g_sweep": [16, 4, 1], "total_batch": 32,
        "lr_reference_batch": 16, "seeds": [0],
    },
    "quick": {
        # 2 networks x 2 batch sizes x 2 seeds, 44 training runs, about 28 CPU-minutes (see
        # docs/reproduction.md, "Does the per-layer G policy transfer?")
        **_base("quick"),
        "networks": [NET_16PX, NET_28PX],
        "batch_sizes": [64, 2], "g_sweep": [256, 64, 16, 4, 1],
    },
    "full": {
        # three networks, every power of 2 up to 256 and b = 8 too, 3 seeds, 2x the epochs
        **_base("quick"),
        "networks": [NET_16PX, NET_28PX, NET_DEEP],
        "batch_sizes": [64, 8, 2], "g_sweep": [256, 128, 64, 32, 16, 8, 4, 2, 1],
        "epochs": 24, "seeds": [0, 1, 2],
    },
}

_NETWORK_KEYS = {"name", "image_size", "model", "model_kwargs"}


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def _preset(preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    from ..models import MODELS

    if preset not in TRANSFER_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: "
                         f"{', '.join(TRANSFER_PRESETS)}")
    cfg = apply_overrides(copy.deepcopy(TRANSFER_PRESETS[preset]), overrides)
    if cfg["dataset"] not in _IN_MEMORY:
        raise ValueError(f"g-transfer trains on the datasets held in memory "
                         f"({', '.join(_IN_MEMORY)}), not {cfg['dataset']!r}")
    names = [n.get("name") if isinstance(n, Mapping) else None for n in cfg["networks"]]
    for net in cfg["networks"]:
        if not isinstance(net, Mapping) or not {"name", "model"} <= set(net) or (
                set(net) - _NETWORK_KEYS):
            raise ValueError(f"--set networks: each network is an object with keys name, "
                             f"model and optionally image_size and model_kwargs, got {net!r}")
        if net["model"] not in MODELS:
            raise ValueError(f"network {net['name']!r}: unknown model {net['model']!r}; valid "
                             f"models: {', '.join(sorted(MODELS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"--set networks: the names must differ, got {names}")
    return cfg


def _network_cfg(cfg: Mapping[str, Any], net: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(cfg)
    out.update(image_size=net.get("image_size"), model=net["model"],
               model_kwargs=copy.deepcopy(dict(net.get("model_kwargs") or {})))
    return out


def cells_transfer(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cells of the ``g-transfer`` task: per seed x network x per-worker batch, BGN with every
    G of the sweep (``role="sweep"``), with the per-layer policy (``"policy"``, its layers' G
    in ``layer_groups``) and with the paper's G (``"paper"``).

    The worker split and learning rate are the classification tasks' (``total_batch``
    examples a step in virtual workers of b, lr ``base_lr`` per ``lr_reference_batch``
    examples, scaled linearly). The paper's cell is a cell of its own even where its G is
    swept: the runner trains the two once (:func:`transfer_computation`).
    """
    cfg = _preset(preset, overrides)
    cells: list[dict[str, Any]] = []
    for seed in cfg["seeds"]:
        for net in cfg["networks"]:
            ncfg = _network_cfg(cfg, net)
            for b in sorted({int(b) for b in cfg["batch_sizes"]}, reverse=True):
                extra = {"network": net["name"]}
                for g in sorted({int(g) for g in cfg["g_sweep"]}, reverse=True):
                    cells.append(_cell("g-transfer", ncfg, seed, "bgn", b, num_groups=g,
                                       role="sweep", **extra))
                # the policy's per-layer G are stamped in the cell (layer_groups)
                cells.append(_cell("g-transfer", ncfg, seed, "bgn", b, num_groups=AUTO,
                                   role="policy", **extra))
                cells.append(_cell("g-transfer", ncfg, seed, "bgn", b, role="paper", **extra))
    return cells


def transfer_computation(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``g-transfer`` cell computes (:attr:`Task.computation
    <bgnorm.repro.api.Task>`): the classification cell without its role and network name, and
    the policy's cell as the fixed G it is when the policy gives every layer the same G.

    So the paper's cell at a swept G, and the policy's cell that is one swept G in every layer,
    are trained once with that swept cell; a swept cell is the ``g-sweep`` task's cell with the
    same G, network and seed (:func:`~bgnorm.repro.tasks.classify.classification_computation`).

    Example:
        >>> base = {"task": "g-transfer", "norm": "bgn", "seed": 0, "batch_size": 2,
        ...         "workers": 32, "network": "16px-w16"}
        >>> sweep = transfer_computation({**base, "role": "sweep", "num_groups": 1})
        >>> policy = transfer_computation({**base, "role": "policy", "num_groups": "auto",
        ...                                "layer_groups": [1, 1, 1]})
        >>> sweep == policy == transfer_computation({**base, "role": "paper", "num_groups": 1})
        True
        >>> transfer_computation({**base, "role": "policy", "num_groups": "auto",
        ...                       "layer_groups": [8, 4, 2]})["layer_groups"]
        [8, 4, 2]
    """
    return classification_computation(
        {k: v for k, v in config.items() if k not in ("role", "network")})


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def layer_summary(record: Record) -> list[tuple[int, tuple[int, ...], int, int]]:
    """``(C, spatial, G, values per statistic)`` of every norm layer of a finished cell, from
    its result's ``layers``; values per statistic = b * C * prod(spatial) / G with b the
    per-worker batch (:func:`bgnorm.values_per_statistic` of the layer).

    Example:
        >>> rec = Record("c", {"batch_size": 64}, "ok",
        ...              {"layers": [[16, [16, 16], 8], [64, [4, 4], 2]]}, 1.0)
        >>> layer_summary(rec)
        [(16, (16, 16), 8, 32768), (64, (4, 4), 2, 32768)]
    """
    b = int(record.config["batch_size"])
    out = []
    for channels, spatial, groups in record.result.get("layers") or []:
        d = int(channels) * math.prod(int(s) for s in spatial)
        out.append((int(channels), tuple(int(s) for s in spatial), int(groups),
                    b * d // int(groups)))
    return out


def _span(values: Sequence[int]) -> str:
    if not values:
        return "?"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}..{hi}"


def _key(rec: Record) -> tuple[str, int, str, int | str]:
    c = rec.config
    return (c["network"], int(c["batch_size"]), c["role"],
            AUTO if c["role"] == "policy" else int(c["num_groups"]))


def _same_run(rec: Record) -> str:
    from ..store import cell_id

    return cell_id(transfer_computation(rec.config))


def _label(role: str, g: int | str) -> str:
    return {"sweep": f"G = {g}", "policy": "policy (auto)", "paper": f"paper's G = {g}"}[role]


def _diff_text(cell: Sequence[Record], best: Sequence[Record], a: Summary, b: Summary) -> str:
    pd = paired_difference(cell, best)
    return str(pd) if pd is not None else f"{a.minus(b):+.2f} pp (no common seed)"


def _judge(name: str, label: str, cell: Summary | None, sweep: Mapping[int, Summary],
           best: int | None, recs: Mapping[Any, list[Record]], key: Any, best_key: Any,
           tol: float, tol_txt: str, group: str) -> Claim:
    """One "within noise of the best swept G" claim for one network x batch."""
    if cell is None:
        return Claim(name, "not tested",
                     f"{label[0].upper()}{label[1:]} was not run for {group} (yet).")
    cells = {f"{group}, G = {g}": s for g, s in sweep.items()}
    cells[f"{group}, {label}"] = cell
    unjudged = not_judged(name, cells)
    if unjudged is not None:
        return unjudged
    if best is None:
        return Claim(name, "not tested", f"No swept G of {group} finished without diverging.")
    if not cell.ok:
        return Claim(name, "did not hold", f"{label} diverged at every seed ({group}); the "
                     f"best swept G = {best}: {fmt_summary(sweep[best])}.")
    gap = cell.minus(sweep[best])
    verdict = "held" if gap >= -tol else "did not hold"
    text = (f"{label[0].upper()}{label[1:]}: {fmt_summary(cell)}; the best swept G = {best}: "
            f"{fmt_summary(sweep[best])}")
    if recs.get(key) and {_same_run(r) for r in recs[key]} == {
            _same_run(r) for r in recs[best_key]}:
        text += f"; {label} is the best swept G (the same run)"
    else:
        diff = _diff_text(recs[key], recs[best_key], cell, sweep[best])
        where = ("above" if gap > 0 else "below") + (
            " it, within the noise" if verdict == "held" else " it, more than the noise")
        text += f"; {label} minus the best: {diff}, {abs(gap):.2f} pp {where}"
    return Claim(name, verdict, text + f"; {tol_txt}.")


def _plot(path: Path, groups: Sequence[tuple[str, int]], acc: Mapping[Any, Summary],
          layers: Mapping[Any, list[int]], paper_g: Mapping[tuple[str, int], int]
          ) -> Path | None:
    """Accuracy vs G, a panel per network x batch: the sweep (mean ± 95% interval), the
    policy's accuracy as a bar over its layers' G (smallest..largest), the paper's G a star."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the repro extra
        return None
    from ..report import _save_figure

    nets = list(dict.fromkeys(n for n, _ in groups))
    sizes = sorted({b for _, b in groups}, reverse=True)
    fig, axes = plt.subplots(len(nets), len(sizes), figsize=(4.0 * len(sizes),
                                                             3.2 * len(nets)),
                             dpi=110, squeeze=False)
    for i, net in enumerate(nets):
        for j, b in enumerate(sizes):
            ax = axes[i][j]
            ax.set_title(f"{net}, b = {b}", fontsize=9)
            sweep = sorted((g, s) for (n, bb, role, g), s in acc.items()
                           if (n, bb, role) == (net, b, "sweep") and s.ok)
            if sweep:
                ax.errorbar([g for g, _ in sweep], [s.mean for _, s in sweep],
                            yerr=[0.0 if math.isnan(s.half_width) else s.half_width
                                  for _, s in sweep],
                            marker="o", markersize=4, capsize=2, label="swept G")
            pol = acc.get((net, b, "policy", AUTO))
            gs = layers.get((net, b, "policy", AUTO))
            if pol is not None and pol.ok and gs:
                lo, hi = min(gs), max(gs)
                ax.plot([lo, hi], [pol.mean] * 2, color="C3", linewidth=3, alpha=0.7,
                        solid_capstyle="butt")
                ax.plot([statistics.median(gs)], [pol.mean], "s", color="C3",
                        label=f"policy (G = {_span(gs)} by layer)")
            pg = paper_g.get((net, b))
            pap = acc.get((net, b, "paper", pg))
            if pap is not None and pap.ok:
                ax.plot([pg], [pap.mean], "*", color="C2", markersize=11,
                        label=f"paper's G = {pg}")
            ax.set_xscale("log", base=2)
            ticks = sorted({g for g, _ in sweep} | set(gs or ()) | ({pg} if pg else set()))
            if ticks:
                ax.set_xticks(ticks)
                ax.set_xticklabels([str(t) for t in ticks], fontsize=7)
                ax.minorticks_off()
            ax.set_xlabel("G (per layer: capped at the layer's D)", fontsize=8)
            ax.set_ylabel("top-1 accuracy (%)", fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("BGN: accuracy vs G, the policy's and the paper's choice", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def report_transfer(records: list[Record], out_dir: Path) -> str:
    """Per network x batch: the accuracy of every swept G, the policy's and the paper's, the
    policy's per-layer G and values per statistic, the differences to the best swept G (paired
    over seeds), the summary table, the plot ``g-transfer.png`` and the claims."""
    title = "## Does the per-layer G policy transfer? BGN's G swept on networks of other sizes"
    records = [r for r in records if r.config.get("role") in ROLES]
    if not records:
        return title + "\n\nNo results yet.\n"
    acc = summarize(records, _key)
    recs: dict[Any, list[Record]] = {}
    layers: dict[Any, list[int]] = {}
    values: dict[Any, list[int]] = {}
    shapes: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    runs: dict[Any, set[str]] = {}
    for r in records:
        k = _key(r)
        recs.setdefault(k, []).append(r)
        runs.setdefault(k, set()).add(_same_run(r))
        if r.status == "ok" and r.result.get("layers"):
            summary = layer_summary(r)
            layers.setdefault(k, [g for _, _, g, _ in summary])
            values.setdefault(k, [v for _, _, _, v in summary])
            shapes.setdefault(r.config["network"], [(c, s) for c, s, _, _ in summary])
    nets = list(dict.fromkeys(r.config["network"] for r in records))
    groups = [(n, b) for n in nets
              for b in sorted({k[1] for k in acc if k[0] == n}, reverse=True)]
    # the paper's G as its cells ran (bgnorm.paper_groups of the batch when they did not)
    paper_g = {(n, b): next((int(k[3]) for k in acc if k[:3] == (n, b, "paper")),
                            bgnorm.paper_groups(b)) for n, b in groups}
    n_test = min((int(r.result.get("n_test") or 0) for r in records if r.status == "ok"),
                 default=0)
    parts = [title, "", _framing(), ""]
    summary_rows, claims = [], []
    tallies: dict[str, dict[str, list[str]]] = {"policy": {}, "paper": {}}
    for net, b in groups:
        group = f"{net}, b={b}"
        sweep = {k[3]: s for k, s in acc.items() if k[:3] == (net, b, "sweep")}
        ok = {g: s for g, s in sweep.items() if s.ok}
        best = max(ok, key=lambda g: ok[g].mean) if ok else None
        pol_key, pap_key = (net, b, "policy", AUTO), (net, b, "paper", paper_g[(net, b)])
        best_key = (net, b, "sweep", best)
        # the noise from the distinct runs of the group (a cell recorded from another's run
        # would count one run twice)
        distinct: dict[str, Summary] = {}
        for k in sorted((k for k in acc if k[:2] == (net, b)), key=lambda k: ROLES.index(k[2])):
            for run in sorted(runs.get(k, ())):
                distinct.setdefault(run, acc[k])
        tol, tol_txt = noise_level(distinct.values(), n_test)
        rows = []
        for k in sorted((k for k in acc if k[:2] == (net, b)),
                        key=lambda k: (ROLES.index(k[2]), -(k[3] if k[2] != "policy" else 0))):
            s = acc[k]
            marks = []
            if k == best_key:
                marks.append("best swept G")
            if k[2] == "sweep" and k[3] == paper_g[(net, b)]:
                marks.append("the paper's G")
            same = [g for g in ok if runs.get((net, b, "sweep", g)) == runs.get(k)]
            if k[2] != "sweep" and same:
                marks.append(f"the same run as G = {same[0]}")
            diff = ("" if best is None or k == best_key or not s.ok
                    else _diff_text(recs[k], recs[best_key], s, sweep[best]))
            rows.append([_label(k[2], k[3]), _span(layers.get(k, [])),
                         _span(values.get(k, [])), fmt_summary(s), diff, "; ".join(marks)])
        parts += [f"### {net}, b = {b} per worker", "",
                  markdown_table(["cell", "G per layer", "values / statistic",
                                  "top-1 accuracy (%)", "minus the best swept G",
                                  "note"], rows, align="llrrrl"), ""]
        if pol_key in layers:
            per_shape = []
            for (c, sp), g, v in zip(shapes[net], layers[pol_key], values[pol_key],
                                     strict=True):
                text = f"{c}x{'x'.join(map(str, sp))}: G = {g} ({v} values)"
                if text not in per_shape:
                    per_shape.append(text)
            parts += ["*The policy's G by layer shape* (C x H x W: G, values per statistic): "
                      + "; ".join(per_shape) + ".", ""]
        pol = _judge(f"The policy's G is within noise of the best swept G ({group})",
                     "the policy", acc.get(pol_key), sweep, best, recs, pol_key, best_key, tol,
                     tol_txt, group)
        pap = _judge(f"The paper's G = {paper_g[(net, b)]} is within noise of the best swept "
                     f"G ({group})", f"the paper's G = {paper_g[(net, b)]}", acc.get(pap_key),
                     sweep, best, recs, pap_key, best_key, tol, tol_txt, group)
        claims += [pol, pap]
        tallies["policy"].setdefault(pol.verdict, []).append(group)
        tallies["paper"].setdefault(pap.verdict, []).append(group)

        ds = [c * math.prod(sp) for c, sp in shapes.get(net, [])]
        summary_rows.append([
            net, _span(ds), str(b),
            f"{best} ({fmt_summary(sweep[best])})" if best is not None else "?",
            _span(layers.get(pol_key, [])), _vs_best(acc.get(pol_key), ok.get(best)), pol.verdict,
            str(paper_g[(net, b)]), _vs_best(acc.get(pap_key), ok.get(best)), pap.verdict])
    plot = _plot(out_dir / "g-transfer.png", groups, acc, layers, paper_g)
    summary = markdown_table(
        ["network", "D per layer", "b", "best swept G (accuracy)", "policy's G",
         "policy (minus best)", "policy within noise", "paper's G", "paper (minus best)",
         "paper within noise"], summary_rows, align="lrrrrrlrrl")
    parts += ["### Policy and paper against the best swept G", "", summary, ""]
    parts += [_tally(tallies), "", _protocol(records), ""]
    notes = [n for n in (_adjusted_note(records), untrained_note(records)) if n]
    if notes:
        parts += [" ".join(notes), ""]
    if plot:
        parts += [f"![accuracy vs G, the policy's and the paper's choice]({plot.name})", ""]
    parts += ["### Claims checked", "", render_claims(claims), ""]
    return "\n".join(parts)  # the runner appends the convergence section


def _vs_best(cell: Summary | None, best: Summary | None) -> str:
    if cell is None or best is None or not cell.ok:
        return fmt_summary(cell)
    return f"{fmt_summary(cell)} ({cell.minus(best):+.2f})"


def _tally(tallies: Mapping[str, Mapping[str, list[str]]]) -> str:
    out = []
    for who, label in (("policy", "The policy's G"), ("paper", "The paper's G")):
        t = tallies[who]
        n = sum(map(len, t.values()))
        parts = [f"{v} on {len(g)} ({', '.join(g)})" for v, g in sorted(t.items())]
        out.append(f"{label} against the best swept G, of {n} network x batch pair(s): "
                   + "; ".join(parts) + ".")
    return " ".join(out)


def _framing() -> str:
    return ("*What this measures:* the per-layer G policy (`num_groups=\"auto\"`, "
            "`bgnorm.auto_groups`) gives each layer the paper's G for the batch, lowered where "
            "a statistic would see fewer than 32 values, as whole channels or bands where they "
            "fit; the paper measured its G on ResNet-50 only. Here every G of a "
            "sweep, the policy and the paper's one-G-for-all-layers table are trained on "
            "networks whose layers hold other numbers of values (D = C·H·W), at a small and a "
            "large per-worker batch, with the same seeds in every cell. *Criterion:* a choice "
            "is within noise of the best swept G when its accuracy minus the best swept G's "
            "(paired over seeds) is not below minus the noise level; judged on converged cells "
            "only. \"values / statistic\" = b·C·H·W / G per layer (smallest..largest).")


def _protocol(records: Sequence[Record]) -> str:
    c = records[0].config
    nets: dict[str, Mapping[str, Any]] = {}
    for r in records:
        nets.setdefault(r.config["network"], r.config)
    desc = "; ".join(
        f"{name}: {n['model']}" + "".join(f" {k}={v}" for k, v in
                                          sorted((n.get("model_kwargs") or {}).items()))
        + f" at {n.get('image_size') or 'native'} px" for name, n in nets.items())
    split = sorted({(r.config["batch_size"], r.config["workers"], r.config["lr"])
                    for r in records if r.config["norm"] not in PER_EXAMPLE}, reverse=True)
    workers = ", ".join(f"b = {b}: {w} x {b} (lr {lr:g})" for b, w, lr in split)
    seeds = sorted({r.config["seed"] for r in records})
    epochs = sorted({int(r.config["epochs"]) for r in records})
    decay = ("cosine to 0" if (c.get("schedule") or "step") == "cosine"
             else f"step decay x{c.get('lr_gamma', 0.1):g}")
    return (f"*Protocol:* {c['dataset']}; networks: {desc}. Virtual workers x examples per "
            f"worker: {workers}; lr {c['base_lr']:g} per {c['lr_reference_batch']} examples a "
            f"step scaled linearly, SGD momentum {c['momentum']:g}, weight decay "
            f"{c['weight_decay']:g}, {c.get('warmup_epochs') or 0:g} warm-up epoch(s) then "
            f"{decay}, {', '.join(map(str, epochs))} epochs; accuracy = median of the last "
            f"{c['median_of']} epochs' test accuracies, mean ± 95% interval over "
            f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), the same seeds (data order, "
            "initialization) in every cell.")


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

TASK_G_TRANSFER = register_task(Task(
    name="g-transfer", presets=_PRESETS, cells=cells_transfer, run=run_classify,
    report=report_transfer,
    title="Does the per-layer G policy transfer? (G sweep vs policy vs paper's G, 2+ networks)",
    check=check_classification_data,
    options=frozenset({"epochs", "seeds", "batch_sizes", "groups", "amp"}),
    settings=preset_settings(*TRANSFER_PRESETS.values()), computation=transfer_computation,
))
