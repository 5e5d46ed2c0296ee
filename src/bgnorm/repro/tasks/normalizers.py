"""Which normalizer at which per-worker batch: the ``normalizers`` task.

A practitioner with small per-worker batches today chooses among more methods than the BGN
paper compares. This task trains the same network on the same data with each of them, at every
per-worker batch size of the preset, with several seeds, and says which are best at each batch
size within noise:

==============  =========================================================================
method          layers (:class:`~bgnorm.repro.norms.NormSpec`)
==============  =========================================================================
``bgn-auto``    BGN, every layer's G from the per-layer policy (``num_groups="auto"``,
                :func:`bgnorm.auto_groups`)
``bgn``         BGN with the paper's G for the batch size (:func:`bgnorm.paper_groups`)
``bn``          BatchNorm
``brn``         Batch Renormalization (Ioffe 2017)
``gn``          GroupNorm, 32 groups (capped per layer at its channels)
``gn-ws``       GroupNorm + Weight Standardization of every convolution (Qiao et al. 2019)
``frn``         Filter Response Normalization + TLU (Singh & Krishnan 2020)
``evonorm-s0``  EvoNorm-S0 (Liu et al. 2020), 32 groups
``evonorm-b0``  EvoNorm-B0 (Liu et al. 2020)
==============  =========================================================================

FRN+TLU and the EvoNorms replace a norm *and* the ReLU after it: the models apply no ReLU after
them (:func:`bgnorm.repro.models.includes_activation`).

Protocol: the classification tasks' (:mod:`bgnorm.repro.tasks.classify`): their data, model,
virtual workers (W = ``total_batch`` / b; the batch-dependent methods compute statistics per
worker slice of b examples), linearly scaled learning rate and schedule, and
:func:`~bgnorm.repro.tasks.classify.run_classify` trains every cell. Every method runs on the
same seeds, so seed s has the same initialization draws and data order for all of them and
differences are paired over seeds. The per-example methods (GN, GN+WS, FRN, EvoNorm-S0) do not
see the worker split: one run stands for every per-worker batch with the same examples per step.
A cell computed by another task too (BN, BGN with the paper's G and GN are the ``batch-size``
task's cells of the same preset) is trained once (:attr:`~bgnorm.repro.api.Task.computation`),
and so is ``bgn-auto`` where the policy gives every layer one G, a fixed-G BGN cell; its cells
carry the policy's per-layer G (``layer_groups``, part of the id, checked before training by
:func:`~bgnorm.repro.tasks.classify.check_policy_groups`).

Presets (the classification presets of :mod:`bgnorm.repro.presets` plus :data:`GRID`):
``smoke`` (CI: 8x8 digits, 2 epochs, batch 8 and 2, one seed), ``quick`` (MNIST-5k at 16 px, 12
epochs, batch 64, 16, 4 and 2, 3 seeds) and ``full`` (36 epochs, batch 128 ... 2, 3 seeds).
``--set methods='["bn","frn"]'`` runs a subset.

The report: accuracy by method and per-worker batch (mean ± 95% interval over seeds, with the
suite's convergence marks), a PNG with a line per method, and per batch size the methods not
distinguishable from the best (:func:`best_within_noise`), judged on converged cells only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bgnorm

from ..presets import CLASSIFY_PRESETS, DATASET_DEFAULTS, preset_settings
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
from .base import Record, Task, register_task
from .classify import (
    _OPTIONS,
    _adjusted_note,
    _cell,
    _col_protocol,
    _covered,
    _merge_covered,
    _n_test,
    _preset,
    _protocol,
    check_classification_data,
    classification_computation,
    run_classify,
)

__all__ = [
    "GRID",
    "METHODS",
    "TASK_NORMALIZERS",
    "best_within_noise",
    "cells_normalizers",
    "method_of",
    "report_normalizers",
]

#: The methods by name: the norm and the cell keys besides it (see the module docstring), in
#: the report's order.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "bgn-auto": ("bgn", {"num_groups": "auto"}),
    "bgn": ("bgn", {}),
    "bn": ("bn", {}),
    "brn": ("brn", {}),
    "gn": ("gn", {}),
    "gn-ws": ("gn", {"weight_standardization": True}),
    "frn": ("frn", {}),
    "evonorm-s0": ("evonorm_s0", {}),
    "evonorm-b0": ("evonorm_b0", {}),
}
#: How the report names the methods.
LABELS = {"bgn-auto": "BGN (policy's G)", "bgn": "BGN (paper's G)", "bn": "BN", "brn": "BRN",
          "gn": "GN", "gn-ws": "GN+WS", "frn": "FRN+TLU", "evonorm-s0": "EvoNorm-S0",
          "evonorm-b0": "EvoNorm-B0"}
#: Cells in this order within a seed, slowest first (fewer stragglers in a parallel sweep);
#: measured on the quick preset, see the reproduction guide's "Which normalizer".
_COST_ORDER = ("evonorm-b0", "brn", "bn", "bgn-auto", "bgn", "evonorm-s0", "gn-ws", "frn", "gn")

#: The task's grid on top of each classification preset (whose batch sizes and epochs it
#: keeps): the methods, and 3 seeds for ``quick`` (seeds 0 and 1 are the batch-size task's;
#: measured about 40 CPU-minutes, see the reproduction guide's "Which normalizer").
GRID: dict[str, dict[str, Any]] = {
    "smoke": {"methods": list(METHODS)},
    "quick": {"methods": list(METHODS), "seeds": [0, 1, 2]},
    "full": {"methods": list(METHODS)},
}
_PRESETS = tuple(GRID)


def method_of(config: Mapping[str, Any]) -> str:
    """The method a cell config runs (the inverse of :data:`METHODS`).

    Example:
        >>> method_of({"norm": "bgn", "num_groups": "auto"}), method_of({"norm": "bgn",
        ...     "num_groups": 1}), method_of({"norm": "gn", "weight_standardization": True})
        ('bgn-auto', 'bgn', 'gn-ws')
    """
    norm = config["norm"]
    if norm == "bgn":
        return "bgn-auto" if config.get("num_groups") == "auto" else "bgn"
    name = norm.replace("_", "-")
    return f"{name}-ws" if config.get("weight_standardization") else name


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def cells_normalizers(preset: str, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cells of the ``normalizers`` task: every seed x method x per-worker batch size.

    Built by the classification tasks' cell builder, so BN, BGN with the paper's G and GN are
    the ``batch-size`` task's cells under another task name; a per-example method runs once per
    number of examples per step (``covers_batch_sizes``).
    """
    if preset not in GRID:
        raise ValueError(f"unknown preset {preset!r} for the normalizers task; valid presets: "
                         f"{', '.join(GRID)}")
    cfg = _preset(preset, overrides, GRID[preset])
    methods = list(cfg["methods"])
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'} "
                         f"for the normalizers task; valid methods: {', '.join(METHODS)} "
                         "(e.g. --set 'methods=[\"bn\", \"frn\"]')")
    methods.sort(key=_COST_ORDER.index)
    cells = []
    for seed in cfg["seeds"]:
        for method in methods:
            norm, extra = METHODS[method]
            cells += [_cell("normalizers", cfg, seed, norm, b, **extra)
                      for b in sorted(cfg["batch_sizes"], reverse=True)]
    return _merge_covered(cells)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _key(record: Record) -> list[tuple[str, int]]:
    return [(method_of(record.config), b) for b in _covered(record)]


def best_within_noise(cells: Mapping[str, Summary], tol: float
                      ) -> tuple[str, list[str], list[str], list[str]] | None:
    """``(best, tied, below, diverged)`` among the ``cells`` of one batch size (method ->
    :class:`~bgnorm.repro.report.Summary`): the method with the highest mean, the methods whose
    paired difference to it (:meth:`Summary.minus <bgnorm.repro.report.Summary.minus>`, over
    the seeds both ran) is at most ``tol`` (``best`` included, best first), those further
    below, and those whose every seed diverged. None when no cell finished.

    Example:
        >>> cells = {"bn": Summary((90.0, 91.0), seeds=(0, 1)),
        ...          "gn": Summary((97.0, 97.6), seeds=(0, 1)),
        ...          "frn": Summary((96.8, 97.0), seeds=(0, 1)),
        ...          "brn": Summary((), diverged=2)}
        >>> best_within_noise(cells, tol=0.5)
        ('gn', ['gn', 'frn'], ['bn'], ['brn'])
    """
    ok = {m: s for m, s in cells.items() if s.ok}
    if not ok:
        return None
    best = max(ok, key=lambda m: ok[m].mean)
    gaps = {m: ok[best].minus(s) for m, s in ok.items()}
    order = sorted(ok, key=lambda m: (gaps[m], m))
    tied = [m for m in order if gaps[m] <= tol]
    below = [m for m in order if gaps[m] > tol]
    diverged = sorted(m for m, s in cells.items() if s.all_diverged)
    return best, tied, below, diverged


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _claims(acc: Mapping[tuple[str, int], Summary], methods: Sequence[str],
            sizes: Sequence[int], n_test: int) -> list[Claim]:
    tol, tol_txt = noise_level(acc.values(), n_test)
    claims: list[Claim] = []
    near: dict[int, list[str]] = {}
    unjudged: list[int] = []
    for b in sizes:
        name = f"One method is best at {b} examples per worker"
        cells = {m: acc[(m, b)] for m in methods if (m, b) in acc}
        refused = not_judged(name, {f"{_label(m)} at batch {b}": s for m, s in cells.items()})
        if refused is not None:
            claims.append(refused)
            unjudged.append(b)
            continue
        found = best_within_noise(cells, tol)
        if found is None:
            claims.append(Claim(name, "not tested", f"No method finished at batch {b}."))
            continue
        best, tied, below, diverged = found
        near[b] = tied

        def listing(ms: Sequence[str], best: str = best, b: int = b) -> str:
            return ", ".join(f"{_label(m)} {acc[(m, b)].mean:.2f} "
                             f"({acc[(m, b)].minus(acc[(best, b)]):+.2f})" for m in ms)

        ev = (f"Best within noise at batch {b}: {listing(tied)}"
              + (f"; below: {listing(below)}" if below else "")
              + (f"; diverged: {', '.join(map(_label, diverged))}" if diverged else "")
              + (f"; not run: {', '.join(_label(m) for m in methods if (m, b) not in acc)}"
                 if any((m, b) not in acc for m in methods) else "")
              + f" (accuracy, then the paired difference to the best, pp); {tol_txt}.")
        verdict = "held" if len(tied) == 1 else "inconclusive"
        if verdict == "inconclusive":
            ev = f"{len(tied)} methods are not distinguishable from the best. " + ev
        claims.append(Claim(name, verdict, ev))
    name = "BGN with the policy's G is within noise of the best at every batch size"
    if unjudged:
        claims.append(Claim(name, "not judged",
                            f"Batch size(s) {', '.join(map(str, unjudged))} have cells that did "
                            "not train or are still improving (see above)."))
    elif not near or not any(("bgn-auto", b) in acc for b in near):
        claims.append(Claim(name, "not tested", "BGN with the policy's G was not run."))
    else:
        sizes_run = [b for b in near if ("bgn-auto", b) in acc]
        out = [b for b in sizes_run if "bgn-auto" not in near[b]]
        ev = "; ".join(
            f"batch {b}: {acc[('bgn-auto', b)].mean:.2f} vs the best "
            f"({_label(near[b][0])}) {acc[(near[b][0], b)].mean:.2f}"
            if acc[("bgn-auto", b)].ok else f"batch {b}: diverged" for b in sizes_run)
        claims.append(Claim(name, "did not hold" if out else "held",
                            ev + (f"; outside the noise at {', '.join(map(str, out))}"
                                  if out else "") + f"; {tol_txt}."))
    return claims


def _policy_groups(records: Sequence[Record], b: int) -> str:
    """The G values BGN's per-layer policy chose at per-worker batch ``b`` (over the layers)."""
    gs = {int(layer[2]) for r in records if r.status == "ok" and method_of(r.config) == "bgn-auto"
          and r.config["batch_size"] == b for layer in r.result.get("layers", [])}
    return ",".join(map(str, sorted(gs)))


def report_normalizers(records: list[Record], out_dir: Path) -> str:
    """The study's table (method x per-worker batch), its PNG and the per-batch-size claims
    (the runner appends the convergence section)."""
    title = "## Which normalizer at which per-worker batch (digits)"
    if not records:
        return title + "\n\nNo results yet.\n"
    acc = summarize(records, _key)
    sizes = sorted({b for _, b in acc}, reverse=True)
    methods = [m for m in METHODS if any(k[0] == m for k in acc)]
    methods += sorted({k[0] for k in acc} - set(methods))
    rows = [[_label(m), *(fmt_summary(acc.get((m, b))) for b in sizes)] for m in methods]
    rows += _col_protocol(records, sizes)
    rows.append(["*BGN's G (paper)*", *(str(bgnorm.paper_groups(b)) for b in sizes)])
    if "bgn-auto" in methods:
        rows.append(["*BGN's G (policy, per layer)*", *(_policy_groups(records, b)
                                                        for b in sizes)])
    table = markdown_table(["method \\ examples per worker", *map(str, sizes)], rows)
    plot = line_plot(
        out_dir / "normalizers.png",
        {_label(m): [(b, acc[(m, b)].mean if (m, b) in acc and acc[(m, b)].ok else None)
                     for b in sizes] for m in methods},
        xlabel="examples per worker (b)", ylabel="top-1 accuracy (%)",
        title="Accuracy vs per-worker batch, by normalizer", descending_x=True,
    )
    notes = [_protocol(records),
             "*Virtual workers:* each column's step is split into W slices of b examples; BN, "
             "BRN, EvoNorm-B0 and BGN compute statistics per slice, GN, GN+WS, FRN and "
             "EvoNorm-S0 per example (one run fills every column with the same examples per "
             "step). FRN+TLU and the EvoNorms replace the norm and its ReLU (no ReLU after "
             "them). Every method runs the same seeds: differences are paired over seeds."]
    adjusted = _adjusted_note(records)
    if adjusted:
        notes.append(adjusted)
    n_div = sum(r.status != "ok" for r in records)
    if n_div:
        notes.append(f"\"-\": diverged (non-finite loss) ({n_div} run(s)).")
    untrained = untrained_note(records)
    if untrained:
        notes.append(untrained)
    parts = [title, "", table, "", " ".join(notes), ""]
    if plot:
        parts += [f"![accuracy vs per-worker batch by normalizer]({plot.name})", ""]
    parts += ["### Best within noise, per batch size", "",
              render_claims(_claims(acc, methods, sizes, _n_test(records))), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

TASK_NORMALIZERS = register_task(Task(
    name="normalizers", presets=_PRESETS, cells=cells_normalizers, run=run_classify,
    report=report_normalizers,
    title="Which normalizer at which per-worker batch (BGN, BN, GN, GN+WS, BRN, FRN, EvoNorm)",
    check=check_classification_data, options=_OPTIONS - {"norms"},
    settings=preset_settings(*CLASSIFY_PRESETS.values(), *DATASET_DEFAULTS.values(),
                             *GRID.values()),
    computation=classification_computation,
))
