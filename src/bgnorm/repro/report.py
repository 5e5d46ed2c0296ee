"""Markdown tables, PNG plots and claim checks for the reproduction reports.

Helpers any task can use to render its records the way the papers lay out their results:

* :func:`summarize` groups records (e.g. by norm and batch size) and averages a metric over
  seeds, keeping track of diverged runs and of runs that did not train
  (:func:`training_problem`); :func:`fmt_summary` prints one table cell ("-" for a diverged
  run, as the papers do; "n/t" for a run that did not train; "?" for a cell not run yet);
* :func:`markdown_table` renders a table;
* :func:`line_plot` draws accuracy-vs-batch-size / accuracy-vs-G style plots to PNG;
* :class:`Claim`, :func:`render_claims` and :func:`difference_tolerance` state whether a paper's
  claim held in this run, with the numbers and the noise level they were judged against;
  :func:`not_judged` refuses to judge a claim on cells that did not train or are still
  improving;
* :func:`convergence` flags each cell *converged*, *still improving* or *did not train* from its
  learning curve (``result["curve"]``) by the criterion :data:`CONVERGENCE_CRITERION` states;
  :func:`curve_plot` draws the curves and :func:`curves_section` renders both for a task;
* :func:`write_report` assembles the sections into ``DIR/report.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import Record

__all__ = [
    "DIVERGED",
    "MISSING",
    "NOT_JUDGED",
    "NOT_TRAINED",
    "CONVERGED",
    "CONVERGENCE_CRITERION",
    "DID_NOT_FIT",
    "DID_NOT_TRAIN",
    "NOT_MEASURED",
    "STILL_IMPROVING",
    "Claim",
    "PairedDifference",
    "Summary",
    "convergence",
    "curve_plot",
    "curves_section",
    "atomic_write_text",
    "difference_tolerance",
    "fmt_summary",
    "line_plot",
    "length_comparison",
    "markdown_table",
    "noise_level",
    "not_judged",
    "paired_difference",
    "render_claims",
    "seed_residual",
    "summarize",
    "t_quantile",
    "training_problem",
    "untrained_note",
    "write_report",
]

#: Table entry of a diverged run (as in the papers).
DIVERGED = "-"
#: Table entry of a cell with no record yet (e.g. a shard still running).
MISSING = "?"
#: Table entry of a cell whose runs did not train (see :func:`training_problem`).
NOT_TRAINED = "n/t"
#: Verdict of a claim that needs a cell that did not train.
NOT_JUDGED = "not judged"
#: Flags of :func:`convergence`.
CONVERGED, STILL_IMPROVING, DID_NOT_TRAIN, NOT_MEASURED = (
    "converged", "still improving", "did not train", "not measured")
#: :func:`convergence`: a cell whose training loss (the labels' cross-entropy: records with
#: ``result["loss"] == "cross-entropy"``, or the curve's ``fit_loss``) ended above
#: ``FIT_LOSS * ln K`` (K classes) did not fit its training data: a result (the norm failed),
#: not a run cut short.
DID_NOT_FIT = "did not fit"
FIT_LOSS = 0.5
#: Table mark of a cell with a seed that did not fit its training data.
DID_NOT_FIT_MARK = "§"
#: Table mark of a cell with a seed still improving.
STILL_IMPROVING_MARK = "‡"
#: :func:`convergence`: the last quarter of training is the part after this fraction.
LAST_QUARTER = 0.75
#: :func:`convergence`: a fall of the training loss over the last quarter above this share of
#: its whole fall over the stage (from its highest point) is still improving. A share, not a
#: relative fall: with a schedule that anneals to 0 a converged network's loss keeps shrinking
#: at the end (0.025 -> 0.016, a 36% relative fall, is 2% of a fall from 0.5).
LOSS_FALL = 0.10
#: :func:`convergence` with a longer run of the same cell (``Record.longer``): converged when
#: the longer run's metric is at most this many points above the record's (the suite's rule,
#: as :func:`length_comparison` checks it).
LONGER_TOLERANCE = 1.5
#: The criterion, as the report states it.
CONVERGENCE_CRITERION = (
    "*did not train*: no training steps, no finite result, or at chance (within the test-set "
    "noise of 100/K % for K classes) with a training loss that never fell below 0.98 ln K; "
    "*still improving*: over the last quarter of training (from the last evaluation at or "
    f"before {LAST_QUARTER:.0%} of the steps to the end) the test metric rose by more than "
    "its noise (the binomial 95% half-width 1.96·sqrt(p(1-p)/n) at the final metric p and "
    "the n test examples; for episodic metrics the 95% interval over episodes), or the "
    "training loss fell by more than "
    f"{LOSS_FALL:.0%} of its whole fall over training (from its highest point to the end; "
    "where the training loss adds a term to the labels' cross-entropy, e.g. CAN's domain "
    "discrepancy, the cross-entropy part is the one judged); "
    "*did not fit* (checked first, for a training loss that is the labels' cross-entropy): "
    f"it trained, but its training loss ended above {FIT_LOSS:g} ln K, half a uniform "
    "guess's: the network did not fit its training data, the norm failed whatever its last "
    "quarter did (a result, judged like a converged cell and marked); "
    "*converged*: otherwise. Where the same cell was also trained longer (`bgnorm report "
    "--longer DIR`), that run decides instead of the curve: *converged* when the longer run "
    f"ends at most {LONGER_TOLERANCE:g} points above the cell, *still improving* when more. "
    "A cell with "
    "fewer than two evaluations (or a record from before learning curves were stored) is "
    "*not measured* and judged as before. Claims are judged on converged cells only.")


def _save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed into place), close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def training_problem(record: Record, metric: str = "acc") -> str | None:
    """Why ``record`` says nothing about its norm, or None when it trained.

    A diverged record (``status != "ok"``, a non-finite loss) is a result, shown as "-" like
    the papers do. A finished record did not train when

    * it took no training step (``result["steps"] == 0``, e.g. zero epochs or steps);
    * ``result[metric]`` is missing or not finite;
    * it stayed at chance: the result knows ``num_classes`` K, its ``acc`` is within the
      test-set noise of 100/K (:func:`difference_tolerance`) and the training loss (every
      recorded value: ``train_losses``, per epoch, else the learning curve's, else
      ``train_loss``) never went below
      0.98 ln K, the cross-entropy of a uniform guess.

    Example:
        >>> untrained = {"acc": float("nan"), "steps": 0}
        >>> training_problem(Record("a", {"seed": 0}, "ok", untrained, seconds=0.1))
        'no training steps (steps = 0)'
        >>> trained = {"acc": 91.0, "steps": 30}
        >>> training_problem(Record("b", {"seed": 0}, "ok", trained, seconds=9.0)) is None
        True
    """
    if record.status != "ok":
        return None
    result = record.result
    steps = result.get("steps")
    if isinstance(steps, (int, float)) and steps <= 0:
        return f"no training steps (steps = {steps:g})"
    value = result.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{metric} is {value!r}, not a finite number"
    classes, acc = result.get("num_classes"), result.get("acc")
    curve_losses = [p.get("train_loss") for p in _final_stage(record)]
    losses = (result.get("train_losses") or curve_losses
              or [result.get("train_loss")])
    n_test = result.get("n_test")
    if (isinstance(classes, int) and classes > 1 and isinstance(acc, (int, float))
            and isinstance(n_test, int) and n_test > 0
            and all(isinstance(v, (int, float)) for v in losses)):
        chance = 100.0 / classes
        uniform = math.log(classes)
        if acc <= chance + difference_tolerance(chance, n_test) and min(losses) >= 0.98 * uniform:
            return (f"at chance ({acc:.2f}% for {classes} classes) with a flat training loss "
                    f"(never below {min(losses):.3f}; a uniform guess gives {uniform:.3f})")
    return None


#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (a table to 30,
    then the Cornish-Fisher expansion ``1.96 + 2.3724 / df + 2.8227 / df**2``, within 0.001 of
    the exact value).

    Example:
        >>> t_quantile(1), t_quantile(4), round(t_quantile(1000), 3)
        (12.706, 2.776, 1.962)
    """
    if df < 1:
        return float("inf")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.3724 / df + 2.8227 / df**2


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the seeds both have: mean, 95% t half-width, number of pairs."""

    mean: float
    half_width: float
    n: int

    def __str__(self) -> str:
        if self.n > 1:
            return f"{self.mean:+.2f} ± {self.half_width:.2f} pp (paired over {self.n} seeds)"
        return f"{self.mean:+.2f} pp (one seed)"


def paired_difference(a: Iterable[Record], b: Iterable[Record], metric: str = "acc"
                      ) -> PairedDifference | None:
    """The paired difference ``a - b`` of ``result[metric]`` over the seeds both cells ran
    (same seed: same data order and initialization draws), or None without a common seed.

    Records that diverged or did not train (:func:`training_problem`) are left out. The noise
    model: the per-seed differences are independent draws, so their mean has the 95% interval
    ``mean ± t(n-1) * sd / sqrt(n)``; pairing removes what both cells share (the seed's data
    order), which unpaired seed-to-seed spreads would count twice.

    Example:
        >>> rec = lambda s, v: Record(str(s), {"seed": s}, "ok", {"acc": v}, 1.0)
        >>> print(paired_difference([rec(0, 91.0), rec(1, 93.0), rec(2, 95.0)],
        ...                         [rec(0, 90.0), rec(1, 92.0), rec(2, 93.5)]))
        +1.17 ± 0.72 pp (paired over 3 seeds)
    """
    def by_seed(records: Iterable[Record]) -> dict[Any, float]:
        return {r.config.get("seed"): float(r.result[metric]) for r in records
                if r.status == "ok" and training_problem(r, metric) is None}

    va, vb = by_seed(a), by_seed(b)
    seeds = sorted(set(va) & set(vb), key=repr)
    if not seeds:
        return None
    diffs = [va[s] - vb[s] for s in seeds]
    n = len(diffs)
    half = t_quantile(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    return PairedDifference(statistics.fmean(diffs), half, n)


@dataclass(frozen=True)
class Summary:
    """A metric over the seeds of one table cell."""

    values: tuple[float, ...]  # one per finished, non-diverged seed that trained
    diverged: int = 0
    #: why each seed that did not train did not (see :func:`training_problem`)
    untrained: tuple[str, ...] = ()
    #: seeds counted in ``values`` whose curve was still improving (see :func:`convergence`)
    unconverged: tuple[str, ...] = ()
    #: the seed of each entry of ``values`` (empty when unknown)
    seeds: tuple[Hashable, ...] = ()
    #: seeds counted in ``values`` that did not fit their training data (see
    #: :func:`convergence`): a result, judged, but marked
    unfit: tuple[str, ...] = ()

    def by_seed(self) -> dict[Hashable, float]:
        """``{seed: value}`` (empty when the seeds are unknown)."""
        return dict(zip(self.seeds, self.values)) if len(self.seeds) == len(self.values) else {}

    def minus(self, other: Summary) -> float:
        """``self - other`` paired over the seeds both ran (same seed: same data order and
        initialization draws): the mean of the per-seed differences; the difference of the
        means when either's seeds are unknown or they share none.

        Example:
            >>> a = Summary((91.0, 95.0), seeds=(0, 1))
            >>> b = Summary((90.0, 92.0, 80.0), seeds=(0, 1, 2))
            >>> a.minus(b), round(a.mean - b.mean, 2)
            (2.0, 5.67)
        """
        sa, sb = self.by_seed(), other.by_seed()
        common = [k for k in sa if k in sb]
        if not common:
            return self.mean - other.mean
        return statistics.fmean(sa[k] - sb[k] for k in common)

    def common_seeds(self, other: Summary) -> int:
        """How many seeds ``self`` and ``other`` both ran (0 when unknown)."""
        return len(set(self.by_seed()) & set(other.by_seed()))

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
    def half_width(self) -> float:
        """Half-width of the 95% t-interval of the mean over seeds (NaN for one seed)."""
        k = len(self.values)
        return t_quantile(k - 1) * self.std / math.sqrt(k) if k > 1 else float("nan")

    @property
    def n(self) -> int:
        """Number of seeds recorded (finished, diverged or untrained)."""
        return len(self.values) + self.diverged + len(self.untrained)

    @property
    def all_diverged(self) -> bool:
        """Every recorded seed diverged (the papers' "-")."""
        return self.diverged > 0 and not self.values and not self.untrained


def summarize(
    records: Iterable[Record],
    key: Callable[[Record], Hashable | Iterable[Hashable] | None],
    metric: str = "acc",
) -> dict[Hashable, Summary]:
    """Group ``records`` by ``key(record)`` and collect ``result[metric]`` over seeds.

    ``key`` may return one key, an iterable of keys (the record fills several table cells, e.g.
    a per-example norm that stands for several batch sizes), or None (skip the record). A record
    with ``status != "ok"`` counts as diverged; a finished record that did not train
    (:func:`training_problem`: no steps, a non-finite metric, stuck at chance) is kept apart
    with its reason, never averaged in.
    """
    values: dict[Hashable, list[float]] = {}
    seeds: dict[Hashable, list[Hashable]] = {}
    diverged: dict[Hashable, int] = {}
    untrained: dict[Hashable, list[str]] = {}
    unconverged: dict[Hashable, list[str]] = {}
    unfit: dict[Hashable, list[str]] = {}
    for rec in records:
        keys = key(rec)
        if keys is None:
            continue
        if isinstance(keys, (list, set, frozenset)):
            keys_list = list(keys)
        else:
            keys_list = [keys]
        flag, why = convergence(rec, metric)  # it asks training_problem first: once a record
        problem = why if flag == DID_NOT_TRAIN else None
        for k in keys_list:
            values.setdefault(k, [])
            seeds.setdefault(k, [])
            diverged.setdefault(k, 0)
            untrained.setdefault(k, [])
            unconverged.setdefault(k, [])
            unfit.setdefault(k, [])
            if rec.status != "ok":
                diverged[k] += 1
            elif problem is not None:
                untrained[k].append(f"seed {rec.config.get('seed', '?')}: {problem}")
            else:
                values[k].append(float(rec.result[metric]))
                seeds[k].append(_seed_key(rec.config.get("seed")))
                if flag == STILL_IMPROVING:
                    unconverged[k].append(f"seed {rec.config.get('seed', '?')}: {why}")
                elif flag == DID_NOT_FIT:
                    unfit[k].append(f"seed {rec.config.get('seed', '?')}: {why}")
    return {k: Summary(tuple(values[k]), diverged[k], tuple(untrained[k]),
                       tuple(unconverged[k]), _unique_or_empty(seeds[k]), tuple(unfit[k]))
            for k in values}


def _seed_key(seed: Any) -> Hashable:
    return tuple(seed) if isinstance(seed, list) else seed


def _unique_or_empty(seeds: list[Hashable]) -> tuple[Hashable, ...]:
    """The seeds, or () when one repeats (two records of a cell with one seed: not pairable)."""
    return tuple(seeds) if len(set(seeds)) == len(seeds) and None not in seeds else ()


def fmt_summary(summary: Summary | None, digits: int = 2, show_std: bool = True) -> str:
    """One table entry: ``"76.12"``, ``"76.12 ± 0.10"`` over seeds (mean ± the half-width of
    its 95% t-interval, :attr:`Summary.half_width`), ``"-"`` when every seed
    diverged, ``"n/t"`` when no seed trained, ``"?"`` when missing; a cell with some diverged
    or untrained seeds gets a ``†(k -)`` or ``†(k n/t)`` mark, one with a seed still improving
    (:func:`convergence`) a ``‡``."""
    if summary is None or summary.n == 0:
        return MISSING
    if not summary.ok:
        return DIVERGED if summary.diverged else NOT_TRAINED
    text = f"{summary.mean:.{digits}f}"
    if show_std and len(summary.values) > 1:
        text += f" ± {summary.half_width:.{digits}f}"
    marks = [f"{k} {m}" for k, m in ((summary.diverged, DIVERGED),
                                     (len(summary.untrained), NOT_TRAINED)) if k]
    if marks:
        text += f" †({', '.join(marks)})"
    if summary.unconverged:
        text += f" {STILL_IMPROVING_MARK}"
    if summary.unfit:
        text += f" {DID_NOT_FIT_MARK}"
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
    return _save_figure(fig, path)


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


def seed_residual(summaries: Iterable[Summary]) -> tuple[float, int, int] | None:
    """``(sigma, df, n_seeds)``: the training noise of one run once each seed's effect common
    to every cell is removed, from the cells that ran the same ``n_seeds >= 2`` seeds (the seed
    set giving the most degrees of freedom: a cell that lost a seed does not cut the others').

    The noise model: the metric of cell c at seed s is ``mu_c + beta_s + e_cs`` with ``beta_s``
    the seed's shared effect (its data order and initialization draws, the same for every cell
    of a table) and ``e_cs`` independent with one variance ``sigma**2``. ``sigma`` is estimated
    from the residuals of the two-way fit, with ``df = (cells - 1) * (seeds - 1)`` degrees of
    freedom (``seeds - 1`` for a single cell). A paired difference of two cells over n seeds
    then has standard error ``sigma * sqrt(2 / n)``: ``beta_s`` cancels. None with fewer than
    two common seeds.

    Example:
        >>> cells = [Summary((90.0, 92.0, 91.0), seeds=(0, 1, 2)),
        ...          Summary((95.0, 97.5, 96.0), seeds=(0, 1, 2))]
        >>> sigma, df, n = seed_residual(cells)
        >>> round(sigma, 3), df, n
        (0.204, 2, 3)
    """
    cells = [c.by_seed() for c in summaries if c.ok]
    cells = [c for c in cells if len(c) >= 2]
    if not cells:
        return None
    # the seed set whose cells give the most degrees of freedom (ties: the larger set), so one
    # cell that lost a seed (diverged) does not cut every other cell's seeds
    candidates = dict.fromkeys(tuple(sorted(c, key=repr)) for c in cells)  # first-seen order

    def dof(k: tuple[Hashable, ...]) -> int:
        n = sum(set(k) <= set(c) for c in cells)
        return (n - 1) * (len(k) - 1) if n > 1 else len(k) - 1

    seeds = max(candidates, key=lambda k: (dof(k), len(k)))
    rows = [[c[k] for k in seeds] for c in cells if set(seeds) <= set(c)]
    n_cells, n_seeds = len(rows), len(seeds)
    row_mean = [statistics.fmean(r) for r in rows]
    col_mean = [statistics.fmean(r[j] for r in rows) for j in range(n_seeds)]
    grand = statistics.fmean(row_mean)
    if n_cells == 1:
        resid = [rows[0][j] - row_mean[0] for j in range(n_seeds)]
        df = n_seeds - 1
    else:
        resid = [rows[i][j] - row_mean[i] - col_mean[j] + grand
                 for i in range(n_cells) for j in range(n_seeds)]
        df = (n_cells - 1) * (n_seeds - 1)
    return math.sqrt(sum(r * r for r in resid) / df), df, n_seeds


def noise_level(summaries: Iterable[Summary], n_test: int, z: float = 1.96
                ) -> tuple[float, str]:
    """The tolerance a difference between two cells is judged against, and a sentence saying
    what it covers.

    The larger of (a) :func:`difference_tolerance` at the best accuracy (test-set sampling of
    two accuracies, binomial) and (b) with several seeds, the 95% half-width of a difference
    paired over the n seeds the cells share, ``t(df) * sigma * sqrt(2 / n)`` with ``sigma`` and
    ``df`` from :func:`seed_residual` (training noise, each seed's common effect removed) over
    the cells whose every seed converged: a cell still improving or one that did not fit its
    training data spreads from seed to seed by another regime (where training was cut off; a
    collapse), which the one-variance model cannot pool (one such cell, 10 and 35% over two
    seeds, made sigma 4.3 pp where the 24 settled cells give 0.4); they are used only when no
    settled cell has two seeds. With one seed only (a) is known, and the sentence says so.
    Differences are computed paired over seeds (:meth:`Summary.minus`).
    """
    summaries = [s for s in summaries if s.ok]
    if not summaries:
        return float("inf"), "no finished runs"
    best = max(s.mean for s in summaries)
    test_tol = difference_tolerance(best, n_test, z)
    settled = [s for s in summaries if not s.unconverged and not s.unfit]
    residual = seed_residual(settled)
    left_out = len(summaries) - len(settled)
    if residual is None:
        residual, left_out = seed_residual(summaries), 0
    if residual is None:
        return test_tol, (
            f"noise level ±{test_tol:.2f} pp (95%, test-set sampling of {n_test} test images; "
            "one seed, so run-to-run training noise is not included: use --seeds 0,1,2)")
    sigma, df, n = residual
    seed_tol = t_quantile(df) * sigma * math.sqrt(2.0 / n)
    tol = max(test_tol, seed_tol)
    return tol, (
        f"noise level ±{tol:.2f} pp (95%), the larger of test-set sampling (±{test_tol:.2f}, "
        f"binomial, {n_test} test images) and training noise of a difference paired over {n} "
        f"seeds (±{seed_tol:.2f} = t({df}) x {sigma:.2f} x sqrt(2/{n}); {sigma:.2f} pp: the "
        "run-to-run std once each seed's effect common to every cell is removed"
        + (f", from the converged cells: {left_out} cell(s) still improving or that did not "
           "fit are left out" if left_out else "")
        + "); differences are means of per-seed differences")


@dataclass(frozen=True)
class Claim:
    """A paper's claim and whether it held in this run.

    ``verdict`` is one of ``"held"``, ``"did not hold"``, ``"inconclusive"`` (the difference is
    within noise), ``"not tested"`` (the cells needed were not run) and ``"not judged"`` (a
    cell it needs did not train, see :func:`not_judged`).
    """

    claim: str
    verdict: str
    evidence: str

    def render(self) -> str:
        """A markdown bullet."""
        mark = {"held": "✅", "did not hold": "❌", "inconclusive": "❔", "not tested": "…",
                NOT_JUDGED: "⚠️"}
        return f"- {mark.get(self.verdict, '')} **{self.claim}** — *{self.verdict}*. " \
               f"{self.evidence}"


def not_judged(claim: str, cells: Mapping[str, Summary | None]) -> Claim | None:
    """A ``"not judged"`` :class:`Claim` when a cell ``claim`` needs did not train or is still
    improving (:func:`convergence`), else None.

    ``cells`` maps a readable label of each table cell the claim is computed from (``"BN at
    batch 2"``) to its :class:`Summary`; the evidence names every cell with a seed that did not
    train and why. Claim code calls this first, so that no verdict rests on such a cell.

    Example:
        >>> s = Summary((), untrained=("seed 0: no training steps (steps = 0)",))
        >>> not_judged("BN degrades", {"BN at batch 2": s, "BN at batch 8": None}).verdict
        'not judged'
        >>> not_judged("BN degrades", {"BN at batch 8": Summary((90.0,))}) is None
        True
    """
    bad = [f"{label} ({'; '.join(s.untrained)})" for label, s in cells.items()
           if s is not None and s.untrained]
    moving = [f"{label} ({'; '.join(s.unconverged)})" for label, s in cells.items()
              if s is not None and s.unconverged]
    if not bad and not moving:
        return None
    parts = []
    if bad:
        parts.append(f"Cells that did not train: {', '.join(bad)}.")
    if moving:
        parts.append(f"Cells still improving: {', '.join(moving)}.")
    return Claim(claim, NOT_JUDGED,
                 " ".join(parts) + " A claim is judged on converged cells only: rerun these "
                 "cells with more epochs or steps (or check why they stayed at chance).")


def _final_stage(record: Record) -> list[Mapping[str, Any]]:
    curve = record.result.get("curve") if isinstance(record.result, Mapping) else None
    if not isinstance(curve, list) or not curve:
        return []
    stage = curve[-1].get("stage")
    return [p for p in curve if p.get("stage") == stage]


def _metric_noise(point: Mapping[str, Any], n_test: Any, z: float = 1.96) -> float:
    """The 95% half-width of one measurement of the metric at ``point`` (percentage points)."""
    ci = point.get("ci")
    if isinstance(ci, (int, float)) and math.isfinite(ci):
        return float(ci)
    if not isinstance(n_test, int) or n_test <= 0:
        return float("inf")
    p = min(max(float(point["metric"]) / 100.0, 1.0 / n_test), 1 - 1.0 / n_test)
    return 100.0 * z * math.sqrt(p * (1 - p) / n_test)


def _fit_key(points: Sequence[Mapping[str, Any]]) -> str:
    """The curve's loss that measures the fit of the labels: ``fit_loss`` (the labels'
    cross-entropy, recorded by tasks whose training loss adds other terms, e.g. CAN's CDD)
    when every point has it, else ``train_loss``."""
    has = all(isinstance(p.get("fit_loss"), (int, float)) for p in points)
    return "fit_loss" if points and has else "train_loss"


def _did_not_fit(record: Record, points: Sequence[Mapping[str, Any]]) -> str | None:
    """Why ``record`` did not fit its training data (:data:`DID_NOT_FIT`), or None: its
    labels' cross-entropy (the training loss of a ``"cross-entropy"`` record, or the curve's
    ``fit_loss``) ended above ``FIT_LOSS * ln K``."""
    classes = record.result.get("num_classes")
    key = _fit_key(points)
    loss = points[-1].get(key)
    # PGD's training loss is the adversarial examples' cross-entropy: not judged
    if key == "train_loss" and record.result.get("loss") != "cross-entropy":
        return None
    if not isinstance(classes, int) or classes < 2 or not isinstance(loss, (int, float)):
        return None
    limit = FIT_LOSS * math.log(classes)
    if not math.isfinite(loss) or loss <= limit:
        return None
    what = "training loss" if key == "train_loss" else "training cross-entropy"
    return (f"its {what} ended at {loss:.3f}, above {FIT_LOSS:g} ln {classes} = "
            f"{limit:.3f} (a uniform guess: {math.log(classes):.3f}): it did not fit its "
            "training data")


def convergence(record: Record, metric: str = "acc") -> tuple[str, str]:
    """``(flag, reason)``: :data:`CONVERGED`, :data:`STILL_IMPROVING`, :data:`DID_NOT_TRAIN`,
    :data:`DID_NOT_FIT` (the training loss ended above ``FIT_LOSS * ln K``: judged as a
    result, checked before "still improving") or
    :data:`NOT_MEASURED`, by :data:`CONVERGENCE_CRITERION`, from the record's learning curve
    (the points of its last stage in ``result["curve"]``, each with ``metric``, ``train_loss``
    and ``progress``, the fraction of the stage done). Where every point also has ``fit_loss``
    (the labels' cross-entropy of a task whose training loss adds other terms, e.g. CAN's
    CDD, which keeps falling after the accuracy has settled), the loss judged is ``fit_loss``.

    Let ``a`` be the last point at or before :data:`LAST_QUARTER` of the stage and ``b`` the
    last point. Still improving: ``metric_b - metric_a`` exceeds the 95% noise half-width of
    one measurement (binomial ``1.96 sqrt(p(1-p)/n)`` at ``p = metric_b`` and ``n = n_test``,
    or a point's ``ci``), or ``(loss_a - loss_b) / (loss_max - loss_b) > LOSS_FALL`` where
    ``loss_max`` is the stage's highest training loss (the last quarter's share of the whole
    fall).

    Example:
        >>> def rec(accs, losses):
        ...     curve = [{"progress": (i + 1) / len(accs), "metric": a, "train_loss": l}
        ...              for i, (a, l) in enumerate(zip(accs, losses))]
        ...     return Record("c", {"seed": 0}, "ok", {"acc": accs[-1], "n_test": 1000,
        ...                   "steps": 40, "curve": curve}, 1.0)
        >>> convergence(rec([80, 90, 95, 95.5], [1.0, 0.5, 0.3, 0.29]))[0]
        'converged'
        >>> convergence(rec([60, 70, 80, 90], [1.0, 0.8, 0.6, 0.4]))[0]
        'still improving'
    """
    if record.status != "ok":
        return NOT_MEASURED, "diverged"
    problem = training_problem(record, metric)
    if problem is not None:
        return DID_NOT_TRAIN, problem
    points = _final_stage(record)
    if len(points) >= 2 and (unfit := _did_not_fit(record, points)) is not None:
        return DID_NOT_FIT, unfit
    if record.longer is not None:
        checked = _longer_flag(record, record.longer, metric)
        if checked is not None:
            return checked
    if len(points) < 2:
        return NOT_MEASURED, ("no learning curve in the record" if not points
                              else "one evaluation only")
    last = points[-1]
    key = _fit_key(points)
    what = "training loss" if key == "train_loss" else "training cross-entropy (fit_loss)"

    def frac(i: int, p: Mapping[str, Any]) -> float:
        v = p.get("progress")
        return float(v) if isinstance(v, (int, float)) else (i + 1) / len(points)

    before = [p for i, p in enumerate(points[:-1]) if frac(i, p) <= LAST_QUARTER + 1e-12]
    if not before:
        return NOT_MEASURED, f"no evaluation at or before {LAST_QUARTER:.0%} of training"
    ref = before[-1]
    gain = float(last["metric"]) - float(ref["metric"])
    noise = _metric_noise(last, record.result.get("n_test"))
    la, lb = float(ref[key]), float(last[key])
    losses = [float(p[key]) for p in points if p.get(key) is not None]
    top = max((v for v in losses if math.isfinite(v)), default=la)
    total = top - lb
    fall = (la - lb) / total if total > 0 and math.isfinite(la) and math.isfinite(lb) else 0.0
    span = f"over the last quarter ({ref.get('progress', 0):.0%} -> 100% of training)"
    if gain > noise:
        return STILL_IMPROVING, (f"the metric rose {gain:+.2f} pp {span}, more than its noise "
                                 f"±{noise:.2f}")
    if fall > LOSS_FALL:
        return STILL_IMPROVING, (f"the {what} fell {la:.3f} -> {lb:.3f} {span}, "
                                 f"{fall:.0%} of its whole fall ({top:.3f} -> {lb:.3f})")
    return CONVERGED, (f"metric {gain:+.2f} pp (noise ±{noise:.2f}), {what} "
                       f"{la:.3f} -> {lb:.3f} {span} ({max(fall, 0.0):.0%} of its whole fall)")


def _longer_flag(record: Record, longer: Record, metric: str) -> tuple[str, str] | None:
    """:func:`convergence`'s flag from ``longer``, the same cell trained longer (None when it
    diverged, did not train or lacks the metric: the curve decides then)."""
    if longer.status != "ok" or training_problem(longer, metric) is not None:
        return None
    a, b = record.result.get(metric), longer.result.get(metric)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)):
        return None
    d = float(b) - float(a)
    run = f"the same cell trained {_length_factor(record, longer)} longer"
    if d > LONGER_TOLERANCE:
        return STILL_IMPROVING, (f"{run} reached {float(b):.2f} ({d:+.2f} pp, more than "
                                 f"{LONGER_TOLERANCE:g})")
    return CONVERGED, f"{run}: {float(b):.2f} ({d:+.2f} pp, within {LONGER_TOLERANCE:g})"


def attach_longer(records: Sequence[Record], longer: Sequence[Record]) -> list[Record]:
    """``records`` with each one's :attr:`~bgnorm.repro.api.Record.longer` set to the record
    of ``longer`` that is the same cell trained longer: the same config but the training
    lengths (:data:`~bgnorm.repro.presets.LENGTH_KEYS`) and ``runtime``, with a longer length
    (a record without such a partner is returned as it is).

    Example:
        >>> def rec(epochs, acc):
        ...     return Record(f"c{epochs}", {"task": "batch-size", "norm": "bn", "seed": 0,
        ...                   "epochs": epochs}, "ok", {"acc": acc, "steps": 10 * epochs}, 1.0)
        >>> [r] = attach_longer([rec(12, 97.0)], [rec(36, 97.4), rec(4, 90.0)])
        >>> r.longer.config["epochs"], convergence(r)
        (36, ('converged', 'the same cell trained 3x longer: 97.40 (+0.40 pp, within 1.5)'))
    """
    from .presets import LENGTH_KEYS
    from .store import config_identity

    index: dict[str, Record] = {}
    for o in longer:
        index.setdefault(config_identity(o.config, LENGTH_KEYS), o)
    out = []
    for r in records:
        o = index.get(config_identity(r.config, LENGTH_KEYS))
        factor = _length_factor(r, o) if o is not None else "?"
        if o is not None and factor != "?" and float(factor[:-1]) > 1:
            r = dataclasses.replace(r, longer=o)
        out.append(r)
    return out


_CELL_KEYS = ("experiment", "method", "source", "target", "network", "role", "num_groups",
              "gn_groups", "model", "final_size")


def _difference_noise(a: Record, b: Record, metric: str = "acc") -> float:
    """The 95% half-width of the difference of two runs' final metrics: the root sum of
    squares of each one's measurement noise (:func:`_metric_noise` at its final value: the
    binomial half-width on its ``n_test`` examples, or its episodes' interval), as if the two
    measurements were independent (they share the test set, so this errs on the wide side)."""
    def one(r: Record) -> float:
        curve = r.result.get("curve") or []
        point = dict(curve[-1]) if curve else {}
        point["metric"] = r.result[metric]
        return _metric_noise(point, r.result.get("n_test"))
    return math.hypot(one(a), one(b))


def length_comparison(short: Sequence[Record], long: Sequence[Record],
                      tolerance: float = LONGER_TOLERANCE,
                      metric: str = "acc") -> tuple[str, bool]:
    """Every cell of a run against the same cell trained longer (``bgnorm compare``): is the
    short run's metric within ``tolerance`` points of (or above) the long run's?

    Cells are matched on their whole config but the training lengths
    (:data:`~bgnorm.repro.presets.LENGTH_KEYS`) and ``runtime``, so ``long`` is typically a run
    with ``--length-factor 3`` (or ``--epochs`` 3x) of the same preset and seeds. Returns the
    markdown (a row per short cell: both values with their :func:`convergence` flags, the
    difference and its noise (:func:`_difference_noise`), the verdict, which says when a cell
    below the tolerance is within that noise; then a summary line) and whether there were
    cells and every short cell was compared and within the tolerance. A cell that did not
    train in both runs counts as within (the same result); one that trained in only one of
    them, or diverged in one, does not.

    Example:
        >>> def rec(epochs, acc, norm="bn"):
        ...     return Record(f"{norm}{epochs}", {"task": "batch-size", "norm": norm,
        ...                   "seed": 0, "epochs": epochs}, "ok", {"acc": acc}, 1.0)
        >>> text, ok = length_comparison([rec(12, 97.0), rec(12, 90.0, "ln")],
        ...                              [rec(36, 97.5), rec(36, 95.0, "ln")])
        >>> ok
        False
        >>> print(text.splitlines()[-1])  # doctest: +NORMALIZE_WHITESPACE
        1 of 2 cells within 1.5 points of the same cell trained longer (3x); worst: LN, seed 0:
        -5.00 points.
    """
    from .presets import LENGTH_KEYS
    from .store import config_identity

    longer = {config_identity(r.config, LENGTH_KEYS): r for r in long}
    by_task: dict[str, list[Record]] = {}
    for r in short:
        by_task.setdefault(str(r.config.get("task")), []).append(r)
    rows: list[list[str]] = []
    n = within = missing = below_in_noise = 0
    factors: set[str] = set()
    worst: tuple[float, str] | None = None

    def show(r: Record, flag: str) -> str:
        if r.status != "ok":
            return "diverged"
        if flag == DID_NOT_TRAIN:
            return "n/t"
        return f"{float(r.result[metric]):.2f} ({flag})"

    for task, recs in by_task.items():
        varying = _varying(recs)
        for r in sorted(recs, key=lambda r: (_cell_label(r, varying), str(r.config.get("seed")))):
            label = _cell_label(r, varying)
            flag_a = convergence(r, metric)[0]
            other = longer.get(config_identity(r.config, LENGTH_KEYS))
            if other is None:
                missing += 1
                rows.append([task, label, str(r.config.get("seed")), show(r, flag_a), "not run",
                             "", "", "not compared"])
                continue
            n += 1
            factors.add(_length_factor(r, other))
            flag_b = convergence(other, metric)[0]
            cells = [task, label, str(r.config.get("seed")), show(r, flag_a),
                     show(other, flag_b)]
            trained = (r.status == "ok" and flag_a != DID_NOT_TRAIN,
                       other.status == "ok" and flag_b != DID_NOT_TRAIN)
            if trained == (True, True):
                d = float(r.result[metric]) - float(other.result[metric])
                noise = _difference_noise(r, other, metric)
                ok = d >= -tolerance
                if worst is None or d < worst[0]:
                    worst = (d, f"{label}, seed {r.config.get('seed')}")
                in_noise = math.isfinite(noise) and -d <= noise  # unknown noise: not claimed
                if not ok and in_noise:
                    below_in_noise += 1
                verdict = ("within" if ok else "**below**"
                           + (" (within the noise)" if in_noise else ""))
                cells += [f"{d:+.2f}", f"±{noise:.2f}" if math.isfinite(noise) else "?",
                          verdict]
            else:
                ok = not any(trained) and r.status == other.status == "ok"
                cells += ["", "", "the same (did not train)" if ok else "**differs**"]
            within += ok
            rows.append(cells)
    table = markdown_table(
        ["task", "cell", "seed", "run", "longer run", "run - longer", "noise (95%)",
         f"within {tolerance:g}?"], rows, ["l", "l", "r", "r", "r", "r", "r", "l"])
    summary = _comparison_summary(
        within, n, tolerance, factors, missing, worst, below_in_noise,
        "within the noise of the difference (the test set cannot tell them from within)")
    return table + "\n\n" + summary, n > 0 and within == n and not missing


def seed_mean_comparison(short: Sequence[Record], long: Sequence[Record],
                         tolerance: float = LONGER_TOLERANCE, metric: str = "acc"
                         ) -> tuple[str, bool]:
    """:func:`length_comparison` over the seeds (``bgnorm compare --over-seeds``): is each
    cell's mean over its seeds within ``tolerance`` points of (or above) the same cell's mean
    trained longer?

    For outcomes whose spread from run to run is larger than the tolerance (CAN's target
    accuracy on the digits moves by about 5 points between seeds), no single seed can settle
    it; the mean over seeds can. Cells are matched as in :func:`length_comparison` and grouped
    over ``seed``; each row gives both means over the seeds the two runs share (95%
    t-intervals) and their paired difference (:func:`paired_difference`: the mean of the
    per-seed differences, ``± t(n-1) sd / sqrt(n)``). A cell is *within* when that mean
    difference is at least ``-tolerance``; a cell below is *within the noise* when its
    interval reaches 0 (the seeds cannot tell it from no difference). Seeds that diverged or
    did not train are left out of both means. Returns the markdown and whether there were
    cells and every short cell was compared and within.

    Example:
        >>> def rec(seed, steps, acc):
        ...     return Record(f"{seed}-{steps}", {"task": "nas", "norm": "bn", "seed": seed,
        ...                   "steps": steps}, "ok", {"acc": acc}, 1.0)
        >>> text, ok = seed_mean_comparison([rec(0, 10, 70.0), rec(1, 10, 80.0)],
        ...                                 [rec(0, 30, 75.0), rec(1, 30, 76.0)])
        >>> ok
        True
        >>> print(text.splitlines()[-1])  # doctest: +NORMALIZE_WHITESPACE
        1 of 1 cells within 1.5 points of the same cell trained longer (3x), over the seeds;
        worst: BN: -0.50 points.
    """
    from .presets import LENGTH_KEYS
    from .store import config_identity

    without = (*LENGTH_KEYS, "seed")
    longer: dict[str, list[Record]] = {}
    for r in long:
        longer.setdefault(config_identity(r.config, without), []).append(r)
    cells: dict[str, list[Record]] = {}
    for r in short:
        cells.setdefault(config_identity(r.config, without), []).append(r)
    rows: list[list[str]] = []
    n = within = missing = below_in_noise = 0
    factors: set[str] = set()
    worst: tuple[float, str] | None = None

    by_task: dict[str, list[list[Record]]] = {}
    for group in cells.values():
        by_task.setdefault(str(group[0].config.get("task")), []).append(group)
    for task, groups in by_task.items():
        varying = _varying([r for g in groups for r in g])
        for group in sorted(groups, key=lambda g: _cell_label(g[0], varying)):
            label = _cell_label(group[0], varying)
            other = longer.get(config_identity(group[0].config, without))
            seeds = ", ".join(sorted({str(r.config.get("seed")) for r in group}))
            if other is None:
                missing += 1
                rows.append([task, label, seeds, "", "not run", "", "not compared"])
                continue
            n += 1
            factors.add(_length_factor(group[0], other[0]))
            pd = paired_difference(group, other, metric)
            if pd is None:
                rows.append([task, label, seeds, "", "", "", "**no seed trained in both**"])
                continue
            trained = [{r.config.get("seed"): float(r.result[metric]) for r in records
                        if r.status == "ok" and training_problem(r, metric) is None}
                       for records in (group, other)]
            common = sorted(set(trained[0]) & set(trained[1]), key=repr)  # pd's seeds
            run_values, long_values = ([t[s] for s in common] for t in trained)

            ok = pd.mean >= -tolerance
            in_noise = pd.n > 1 and pd.mean + pd.half_width >= 0
            if worst is None or pd.mean < worst[0]:
                worst = (pd.mean, label)
            below_in_noise += (not ok) and in_noise
            within += ok
            diff = (f"{pd.mean:+.2f} ± {pd.half_width:.2f}" if pd.n > 1 else f"{pd.mean:+.2f}")
            rows.append([task, label, str(pd.n), fmt_summary(Summary(tuple(run_values))),
                         fmt_summary(Summary(tuple(long_values))), diff,
                         "within" if ok else "**below**" + (" (within the noise)"
                                                            if in_noise else "")])
    table = markdown_table(
        ["task", "cell", "seeds", "run (mean)", "longer run (mean)", "run - longer (paired)",
         f"within {tolerance:g}?"], rows, ["l", "l", "r", "r", "r", "r", "l"])
    summary = _comparison_summary(
        within, n, tolerance, factors, missing, worst, below_in_noise,
        "within the noise (their paired interval reaches 0)", scope=", over the seeds")
    return table + "\n\n" + summary, n > 0 and within == n and not missing


def _length_factor(a: Record, b: Record) -> str:
    """How many times longer ``b`` trained than ``a`` (``"3x"``), from the first training
    length (:data:`~bgnorm.repro.presets.LENGTH_KEYS`) both configs give; ``"?"`` if none."""
    from .presets import LENGTH_KEYS

    for k in LENGTH_KEYS:
        x, y = a.config.get(k), b.config.get(k)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x:
            return f"{y / x:g}x"
    return "?"


def _comparison_summary(within: int, n: int, tolerance: float, factors: set[str],
                        missing: int, worst: tuple[float, str] | None, below_in_noise: int,
                        in_noise: str, scope: str = "") -> str:
    """The last line of :func:`length_comparison` and :func:`seed_mean_comparison`."""
    summary = (f"{within} of {n} cells within {tolerance:g} points of the same cell trained "
               f"longer ({', '.join(sorted(factors)) or '?'}){scope}")
    if missing:
        summary += f"; {missing} cell(s) have no longer run"
    if worst is not None:
        summary += f"; worst: {worst[1]}: {worst[0]:+.2f} points"
    if below_in_noise:
        summary += f"; {below_in_noise} of the cells below are {in_noise}"
    return summary + "."


def _cell_label(record: Record, varying: Sequence[str]) -> str:
    c = record.config
    label = str(c.get("norm", "?")).upper()
    extra = [f"{k.replace('num_groups', 'G').replace('gn_groups', 'GN groups')}={c.get(k)}"
             for k in varying if k in c]
    return label + (f" ({', '.join(extra)})" if extra else "")


def _varying(records: Sequence[Record]) -> list[str]:
    return [k for k in _CELL_KEYS
            if len({repr(r.config.get(k)) for r in records if k in r.config}) > 1]


def curve_plot(path: str | os.PathLike, records: Sequence[Record], title: str = ""
               ) -> Path | None:
    """Test metric against epoch (or step) from each record's learning curve: one line per
    cell (norm and the settings that vary), averaged over seeds, one panel per batch size.
    Returns the PNG's path, None when no record has a curve or matplotlib is missing."""
    recs = [r for r in records if r.status == "ok" and _final_stage(r)]
    if not recs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the repro extra
        return None
    use_epoch = all("epoch" in p for r in recs for p in _final_stage(r))
    varying = _varying(recs)
    panels = sorted({r.config.get("batch_size") for r in recs}, key=lambda b: (b is None, b))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110,
                             squeeze=False, sharey=True)
    # one colour per cell label across the panels
    colors = {name: f"C{i % 10}" for i, name in
              enumerate(sorted({_cell_label(r, varying) for r in recs}))}
    for ax, bs in zip(axes[0], panels, strict=True):
        lines: dict[str, dict[float, list[float]]] = {}
        for r in recs:
            if r.config.get("batch_size") != bs:
                continue
            line = lines.setdefault(_cell_label(r, varying), {})
            for p in _final_stage(r):
                x = float(p["epoch"] if use_epoch else p["step"])
                line.setdefault(x, []).append(float(p["metric"]))
        for name, pts in sorted(lines.items()):
            xs = sorted(pts)
            ax.plot(xs, [statistics.fmean(pts[x]) for x in xs], marker="o", markersize=3,
                    linewidth=1.4, label=name, color=colors[name])
        ax.set_title(f"batch {bs}" if bs is not None else "")
        ax.set_xlabel("epoch" if use_epoch else "step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=1)
    axes[0][0].set_ylabel("test metric (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def curves_section(task: str, records: Sequence[Record], out_dir: str | os.PathLike,
                   metric: str = "acc") -> str:
    """The learning-curve part of a task's report: the plot ``curves_<task>.png`` in
    ``out_dir``, the criterion, and each cell's flag with its reason."""
    recs = [r for r in records if r.status == "ok"]
    if not recs:
        return ""
    png = curve_plot(Path(out_dir) / f"curves_{task}.png", recs, f"{task}: learning curves")
    varying = _varying(recs)
    rows = []
    for r in sorted(recs, key=lambda r: (str(r.config.get("batch_size")),
                                         _cell_label(r, varying), r.config.get("seed", 0))):
        flag, why = convergence(r, metric)
        rows.append([_cell_label(r, varying), r.config.get("batch_size", ""),
                     r.config.get("seed", ""), flag, why])
    counts = {f: sum(row[3] == f for row in rows) for f in
              (CONVERGED, DID_NOT_FIT, STILL_IMPROVING, DID_NOT_TRAIN, NOT_MEASURED)}
    summary = ", ".join(f"{n} {f}" for f, n in counts.items() if n)
    parts = [f"### Convergence ({task})", ""]
    if png is not None:
        parts += [f"![learning curves of {task}]({png.name})", ""]
    parts += [f"{summary}. Criterion: {CONVERGENCE_CRITERION} "
              f"\"{STILL_IMPROVING_MARK}\" in a table: a seed of that cell was still improving; "
              f"\"{DID_NOT_FIT_MARK}\": a seed did not fit its training data.",
              "", markdown_table(["cell", "batch", "seed", "flag", "why"], rows,
                                 align="lrrll"), ""]
    return "\n".join(parts)


def untrained_note(records: Iterable[Record], metric: str = "acc") -> str:
    """A sentence explaining the ``"n/t"`` table entries, or ``""`` when every record trained."""
    n = sum(training_problem(r, metric) is not None for r in records)
    if not n:
        return ""
    return (f"\"{NOT_TRAINED}\": did not train ({n} run(s): no training steps, no finite "
            "result, or stuck at chance with a flat loss); no claim is judged on such a cell.")


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
