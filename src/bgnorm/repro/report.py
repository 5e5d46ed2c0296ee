"""Markdown tables, PNG plots and claim checks for the reproduction reports.

Helpers any task can use to render its records the way the papers lay out their results:

* :func:`summarize` groups records (e.g. by norm and batch size) and averages a metric over
  seeds, keeping track of diverged runs; :func:`fmt_summary` prints one table cell ("-" for a
  diverged run, as the papers do; "?" for a cell not run yet);
* :func:`markdown_table` renders a table;
* :func:`line_plot` draws accuracy-vs-batch-size / accuracy-vs-G style plots to PNG;
* :class:`Claim`, :func:`render_claims` and :func:`difference_tolerance` state whether a paper's
  claim held in this run, with the numbers and the noise level they were judged against;
* :func:`write_report` assembles the sections into ``DIR/report.md``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks.base import Record

__all__ = [
    "DIVERGED",
    "MISSING",
    "Claim",
    "Summary",
    "atomic_write_text",
    "difference_tolerance",
    "fmt_summary",
    "line_plot",
    "markdown_table",
    "noise_level",
    "render_claims",
    "summarize",
    "write_report",
]

#: Table entry of a diverged run (as in the papers).
DIVERGED = "-"
#: Table entry of a cell with no record yet (e.g. a shard still running).
MISSING = "?"


@dataclass(frozen=True)
class Summary:
    """A metric over the seeds of one table cell."""

    values: tuple[float, ...]  # one per finished, non-diverged seed
    diverged: int = 0

    @property
    def ok(self) -> bool:
        """At least one seed finished without diverging."""
        return bool(self.values)

    @property
    def mean(self) -> float:
        """Mean over the finished seeds (NaN if none)."""
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def n(self) -> int:
        """Number of seeds recorded (finished or diverged)."""
        return len(self.values) + self.diverged


def summarize(
    records: Iterable[Record],
    key: Callable[[Record], Hashable | Iterable[Hashable] | None],
    metric: str = "acc",
) -> dict[Hashable, Summary]:
    """Group ``records`` by ``key(record)`` and collect ``result[metric]`` over seeds.

    ``key`` may return one key, an iterable of keys (the record fills several table cells, e.g.
    a per-example norm that stands for several batch sizes), or None (skip the record). A record
    with ``status != "ok"`` or a non-finite metric counts as diverged.
    """
    values: dict[Hashable, list[float]] = {}
    diverged: dict[Hashable, int] = {}
    for rec in records:
        keys = key(rec)
        if keys is None:
            continue
        if isinstance(keys, (list, set, frozenset)):
            keys_list = list(keys)
        else:
            keys_list = [keys]
        v = rec.result.get(metric) if rec.status == "ok" else None
        for k in keys_list:
            values.setdefault(k, [])
            diverged.setdefault(k, 0)
            if isinstance(v, (int, float)) and math.isfinite(v):
                values[k].append(float(v))
            else:
                diverged[k] += 1
    return {k: Summary(tuple(values[k]), diverged[k]) for k in values}


def fmt_summary(summary: Summary | None, digits: int = 2, show_std: bool = True) -> str:
    """One table entry: ``"76.12"``, ``"76.12 ± 0.10"`` over seeds, ``"-"`` when every seed
    diverged, ``"?"`` when missing; a partly diverged cell gets a ``†(k -)`` mark."""
    if summary is None or summary.n == 0:
        return MISSING
    if not summary.ok:
        return DIVERGED
    text = f"{summary.mean:.{digits}f}"
    if show_std and len(summary.values) > 1:
        text += f" ± {summary.std:.{digits}f}"
    if summary.diverged:
        text += f" †({summary.diverged} {DIVERGED})"
    return text


def markdown_table(
    header: Sequence[Any], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None
) -> str:
    """A GitHub-flavoured markdown table; ``align`` entries are ``"l"``, ``"r"`` or ``"c"``.

    Example:
        >>> print(markdown_table(["norm", "32"], [["BN", "76.4"]], align="lr"))
        | norm |   32 |
        | :--- | ---: |
        | BN   | 76.4 |
    """
    cols = len(header)
    if any(len(r) != cols for r in rows):
        raise ValueError("every row must have as many entries as the header")
    align = list(align or ["l"] + ["r"] * (cols - 1))
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(cols)]

    def fmt(row: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(row):
            if align[i] == "r":
                out.append(c.rjust(widths[i]))
            elif align[i] == "c":
                out.append(c.center(widths[i]))
            else:
                out.append(c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    seps = []
    for w, a in zip(widths, align):
        if a == "r":
            seps.append("-" * (w - 1) + ":")
        elif a == "c":
            seps.append(":" + "-" * (w - 2) + ":")
        else:
            seps.append(":" + "-" * (w - 1))
    lines = [fmt(cells[0]), "| " + " | ".join(seps) + " |"] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def line_plot(
    path: str | os.PathLike,
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log2_x: bool = True,
    descending_x: bool = False,
    note: str = "",
) -> Path | None:
    """Draw one line per series (``name -> [(x, y)]``, ``y=None`` for a missing/diverged point)
    and save a PNG; returns the path, or None when matplotlib is not installed.

    ``log2_x`` puts x on a base-2 log scale with the data's x values as ticks (batch sizes, G);
    ``descending_x`` runs x from large to small (as the GN paper plots batch sizes).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the repro extra
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    xs_all: set[float] = set()
    markers = "osD^v<>ph*X"
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted((float(x), y) for x, y in pts)
        xs_all.update(x for x, _ in pts)
        xs = [x for x, y in pts if y is not None and math.isfinite(y)]
        ys = [y for _, y in pts if y is not None and math.isfinite(y)]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=name, linewidth=1.6,
                markersize=4)
    if log2_x:
        ax.set_xscale("log", base=2)
        ticks = sorted(xs_all)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    if descending_x:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def difference_tolerance(acc_pct: float, n_test: int, z: float = 1.96) -> float:
    """Smallest difference (percentage points) between two test accuracies near ``acc_pct``
    measured on ``n_test`` examples that is outside binomial noise (``z`` standard errors of the
    difference of two independent estimates).

    Example:
        >>> round(difference_tolerance(98.0, 1000), 2)
        1.23
    """
    p = min(max(acc_pct / 100.0, 0.0), 1.0)
    if n_test <= 0:
        return float("inf")
    p = min(max(p, 1.0 / n_test), 1 - 1.0 / n_test)  # never zero noise
    return 100.0 * z * math.sqrt(2.0 * p * (1 - p) / n_test)


def noise_level(summaries: Iterable[Summary], n_test: int, z: float = 1.96
                ) -> tuple[float, str]:
    """The tolerance claims are judged against, and a sentence saying what it covers.

    The larger of (a) :func:`difference_tolerance` at the best accuracy (test-set sampling) and
    (b) with several seeds, ``z * sqrt(2 / n_seeds) * s`` where ``s`` is the pooled seed-to-seed
    standard deviation of the cells (training noise). With one seed only (a) is known, and the
    sentence says so.
    """
    summaries = [s for s in summaries if s.ok]
    if not summaries:
        return float("inf"), "no finished runs"
    best = max(s.mean for s in summaries)
    tol = difference_tolerance(best, n_test, z)
    text = f"noise level ±{tol:.2f} pp (95% test-set sampling, {n_test} test images"
    multi = [s for s in summaries if len(s.values) > 1]
    if multi:
        pooled = math.sqrt(statistics.fmean(s.std**2 for s in multi))
        n = min(len(s.values) for s in multi)
        seed_tol = z * math.sqrt(2.0 / n) * pooled
        text += f"; seed-to-seed std {pooled:.2f} pp over {n} seeds -> ±{seed_tol:.2f}"
        tol = max(tol, seed_tol)
        text = text.replace(f"±{difference_tolerance(best, n_test, z):.2f}", f"±{tol:.2f}", 1)
    else:
        text += "; one seed, so run-to-run training noise is not included: use --seeds 0,1,2"
    return tol, text + ")"


@dataclass(frozen=True)
class Claim:
    """A paper's claim and whether it held in this run.

    ``verdict`` is one of ``"held"``, ``"did not hold"``, ``"inconclusive"`` (the difference is
    within noise), ``"not tested"`` (the cells needed were not run).
    """

    claim: str
    verdict: str
    evidence: str

    def render(self) -> str:
        """A markdown bullet."""
        mark = {"held": "✅", "did not hold": "❌", "inconclusive": "❔", "not tested": "…"}
        return f"- {mark.get(self.verdict, '')} **{self.claim}** — *{self.verdict}*. " \
               f"{self.evidence}"


def render_claims(claims: Sequence[Claim]) -> str:
    """The claims as a markdown list."""
    return "\n".join(c.render() for c in claims)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(
    out_dir: str | os.PathLike, sections: Sequence[str], title: str = "Reproduction report",
    preamble: str = "",
) -> Path:
    """Write ``DIR/report.md`` from ``sections`` (markdown strings, one per task)."""
    parts = [f"# {title}", ""]
    if preamble:
        parts += [preamble, ""]
    parts += [s.rstrip() + "\n" for s in sections]
    return atomic_write_text(Path(out_dir) / "report.md", "\n".join(parts))
