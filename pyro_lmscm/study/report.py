r"""The study report: summary tables with bootstrap confidence intervals, plots, HTML.

Every metric is a mean over draws, the counterfactual and the interventional draws side by
side, with their difference (paired: both come from the same strings). Draws of one string
are not independent, so the intervals come from a **cluster bootstrap over strings**:
resample the strings with replacement :math:`B` times and recompute

.. math::

    \hat\mu = \frac{\sum_{s} \sum_{d \in D_s} x_{s,d}}{\sum_{s} |D_s|},

where :math:`D_s` are the draws of string :math:`s` that the metric counts (all of them,
or only the changed draws for the first divergence, only finite values for the
log-probabilities, only eligible draws for the attribute flip). The interval is the
percentile interval of the :math:`B` values at the config's ``confidence``.

Files written by :func:`write_report` into the study folder:

* ``summary.md`` / ``summary.csv``: the summary table (and per group, if the corpus has groups);
* ``draws.csv``: one row per draw with its metrics (no token lists);
* ``edit_distance.png``, ``divergence.png``: histograms, counterfactual vs interventional
  (needs matplotlib);
* ``report.html``: the self-contained HTML report (:mod:`~pyro_lmscm.study.html`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .config import StudyConfig

__all__ = [
    "KINDS",
    "METRICS",
    "Metric",
    "SummaryRow",
    "csv_cell",
    "draw_rows",
    "plot_histograms",
    "summarize",
    "summary_markdown",
    "write_report",
]

#: The two kinds of draws.
KINDS = ("counterfactual", "interventional")

Record = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    """A per-draw quantity and which draws it counts.

    :param key: the name in the tables.
    :param label: a human label.
    :param value: draw -> number, or ``None`` when the draw does not count.
    """

    key: str
    label: str
    value: Callable[[Record], float | None]


def _field(name: str, transform: Callable[[Any], float] = float) -> Callable[[Record], float | None]:
    def value(draw: Record) -> float | None:
        x = draw.get(name)
        return None if x is None else transform(x)

    return value


#: The metrics of the summary table, in order.
METRICS: tuple[Metric, ...] = (
    Metric("changed", "changed (share of draws)", _field("changed")),
    Metric("first_divergence", "first divergence (token; changed draws)", _field("first_divergence")),
    Metric("common_prefix", "longest common prefix (tokens)", _field("common_prefix")),
    Metric("token_edit_distance", "token edit distance", _field("token_edit_distance")),
    Metric(
        "normalized_token_edit_distance", "normalised token edit distance", _field("normalized_token_edit_distance")
    ),
    Metric("char_edit_distance", "character edit distance", _field("char_edit_distance")),
    Metric("length", "length (tokens)", _field("length")),
    Metric("log_prob_factual", "log p under the factual model (in its support)", _field("log_prob_factual")),
    Metric("log_prob_intervened", "log p under the intervened model", _field("log_prob_intervened")),
    Metric(
        "outside_factual_support",
        "outside the factual decoding support (share)",
        lambda d: float(d.get("log_prob_factual") is None),
    ),
    Metric("flipped", "attribute flipped (eligible draws)", _field("flipped")),
)


@dataclass
class SummaryRow:
    """One metric of one kind: the mean and its bootstrap interval.

    :ivar group: ``"all"`` or a corpus group.
    :ivar kind: ``"counterfactual"``, ``"interventional"`` or ``"difference"`` (CF - int.).
    :ivar n: the draws counted (for the difference, the strings with both).
    """

    group: str
    metric: str
    kind: str
    mean: float
    low: float
    high: float
    n: int


def _sums(records: Sequence[Record], kind: str, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Per-string sum and count of the metric over the draws of ``kind``."""
    sums, counts = np.zeros(len(records)), np.zeros(len(records))
    for s, record in enumerate(records):
        for draw in record[kind]:
            x = metric.value(draw)
            if x is not None:
                sums[s] += x
                counts[s] += 1
    return sums, counts


def _ratio(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(
    records: Sequence[Record],
    bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    group: str = "all",
    metrics: Sequence[Metric] = METRICS,
) -> list[SummaryRow]:
    """Means with cluster-bootstrap intervals for every metric and kind, plus the paired
    difference counterfactual minus interventional.

    Records with an ``error`` are left out.

    :param records: study records.
    :param bootstrap: :math:`B`.
    :param confidence: the interval's level.
    :param seed: seeds the resampling (the same seed gives the same intervals).
    :param group: the label of these records in the rows.
    :returns: rows in the order of ``metrics``, each metric as counterfactual,
        interventional, difference.
    """
    records = [r for r in records if r.get("error") is None]
    rows: list[SummaryRow] = []
    if not records:
        return rows
    rng = np.random.default_rng(seed)
    resample = rng.integers(0, len(records), size=(bootstrap, len(records)))
    for metric in metrics:
        stats = {}
        for kind in KINDS:
            sums, counts = _sums(records, kind, metric)
            point = _ratio(np.array([sums.sum()]), np.array([counts.sum()]))[0]
            boot = _ratio(sums[resample].sum(1), counts[resample].sum(1))
            stats[kind] = (point, boot, int(counts.sum()))
            low, high = _interval(boot, confidence)
            rows.append(SummaryRow(group, metric.key, kind, float(point), low, high, int(counts.sum())))
        (p_cf, b_cf, n_cf), (p_int, b_int, n_int) = stats[KINDS[0]], stats[KINDS[1]]
        n_both = min(n_cf, n_int)
        low, high = _interval(b_cf - b_int, confidence)
        rows.append(SummaryRow(group, metric.key, "difference", float(p_cf - p_int), low, high, n_both))
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.0f}"


def _cell(row: SummaryRow) -> str:
    if math.isnan(row.mean):
        return "–"
    return f"{_fmt(row.mean)} [{_fmt(row.low)}, {_fmt(row.high)}]"


def _labels(metrics: Iterable[Metric]) -> dict[str, str]:
    return {m.key: m.label for m in metrics}


def summary_markdown(
    rows: Sequence[SummaryRow], confidence: float = 0.95, metrics: Sequence[Metric] = METRICS
) -> str:
    """The summary as a markdown table: one line per (group, metric), the counterfactual,
    interventional and difference columns as ``mean [low, high]``."""
    labels = _labels(metrics)
    groups = list(dict.fromkeys(row.group for row in rows))
    level = f"{confidence:.0%}"
    head = "| metric | counterfactual | interventional | CF − interventional | draws (CF / int.) |"
    if len(groups) > 1 or groups[:1] != ["all"]:
        head = "| group " + head
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_key: dict[tuple[str, str], dict[str, SummaryRow]] = {}
    for row in rows:
        by_key.setdefault((row.group, row.metric), {})[row.kind] = row
    for (group, metric), kinds in by_key.items():
        cells = [labels.get(metric, metric), _cell(kinds["counterfactual"]), _cell(kinds["interventional"])]
        cells += [_cell(kinds["difference"]), f"{kinds['counterfactual'].n} / {kinds['interventional'].n}"]
        if head.startswith("| group"):
            cells.insert(0, group)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Means over draws with {level} cluster-bootstrap intervals (strings resampled).")
    return "\n".join(lines) + "\n"


#: A cell starting with one of these is read as a formula by spreadsheet programs.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a string starting with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return gets a leading ``'`` (OWASP's advice against
    formula injection); numbers and other values are left as they are.

    >>> csv_cell("=1+1"), csv_cell("-1 day"), csv_cell(-1.5), csv_cell("fine")
    ("'=1+1", "'-1 day", -1.5, 'fine')
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _summary_csv(rows: Sequence[SummaryRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "metric", "kind", "mean", "low", "high", "n"])
    for row in rows:
        writer.writerow([csv_cell(row.group), row.metric, row.kind, repr(row.mean), repr(row.low), repr(row.high), row.n])
    return buffer.getvalue()


#: Columns of ``draws.csv``.
DRAW_COLUMNS = (
    "index", "group", "kind", "draw", "changed", "first_divergence", "common_prefix", "token_edit_distance",
    "normalized_token_edit_distance", "char_edit_distance", "length", "log_prob_factual",
    "log_prob_intervened", "attribute", "flipped", "text",
)


def draw_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One flat row per draw (the :data:`DRAW_COLUMNS`), for CSV or ``pandas.DataFrame``."""
    out = []
    for record in records:
        if record.get("error") is not None:
            continue
        for kind in KINDS:
            for d, draw in enumerate(record[kind]):
                row = {"index": record["index"], "group": record.get("group"), "kind": kind, "draw": d}
                row.update({key: draw.get(key) for key in DRAW_COLUMNS if key not in row})
                out.append(row)
    return out


def plot_histograms(records: Sequence[Record], output_dir: Path, max_new_tokens: int) -> dict[str, Path]:
    """``edit_distance.png`` (normalised token and character edit distance) and
    ``divergence.png`` (first divergence of changed draws), counterfactual vs interventional.

    Drawn with matplotlib's object API on the Agg canvas (no pyplot, no GUI backend).
    Returns ``{}`` when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return {}
    records = [r for r in records if r.get("error") is None]
    colors = {"counterfactual": "#c2185b", "interventional": "#1f77b4"}

    def values(kind: str, key: str) -> list[float]:
        return [d[key] for r in records for d in r[kind] if d.get(key) is not None]

    files = {}
    fig = Figure(figsize=(9, 3.4), dpi=110)
    panels: list[tuple[Any, str, str, Any]] = [
        (fig.add_subplot(1, 2, 1), "normalized_token_edit_distance", "normalised token edit distance",
         list(np.linspace(0, 1, 21))),
        (fig.add_subplot(1, 2, 2), "char_edit_distance", "character edit distance", 20),
    ]
    for ax, key, title, bins in panels:
        for kind in KINDS:
            data = values(kind, key)
            if data:
                ax.hist(data, bins=bins, alpha=0.55, label=kind, color=colors[kind])
        ax.set_title(title)
        ax.set_ylabel("draws")
        ax.legend(frameon=False)
    fig.tight_layout()
    files["edit_distance_png"] = output_dir / "edit_distance.png"
    fig.savefig(files["edit_distance_png"])

    fig = Figure(figsize=(6, 3.4), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(np.arange(0, max_new_tokens + 2) - 0.5)
    for kind in KINDS:
        data = values(kind, "first_divergence")
        if data:
            ax.hist(data, bins=positions, alpha=0.55, label=kind, color=colors[kind])
    ax.set_title("first divergence from the factual string")
    ax.set_xlabel("token position")
    ax.set_ylabel("changed draws")
    ax.legend(frameon=False)
    fig.tight_layout()
    files["divergence_png"] = output_dir / "divergence.png"
    fig.savefig(files["divergence_png"])
    return files


def write_report(output_dir: str | Path, records: Sequence[Record], config: StudyConfig) -> dict[str, Path]:
    """Write the tables, the plots and the HTML report (see the module docstring).

    :returns: the files by name: ``summary_md``, ``summary_csv``, ``draws_csv``,
        ``edit_distance_png``, ``divergence_png`` (with matplotlib), ``html``.
    """
    from .html import write_html

    output_dir = Path(output_dir)
    rows = summarize(records, config.bootstrap, config.confidence, seed=config.seed)
    groups = sorted({r["group"] for r in records if r.get("group") and r.get("error") is None})
    group_rows: list[SummaryRow] = []
    for group in groups:
        members = [r for r in records if r.get("group") == group]
        group_rows += summarize(members, config.bootstrap, config.confidence, seed=config.seed, group=group)
    files: dict[str, Path] = {}
    text = summary_markdown(rows, config.confidence)
    if group_rows:
        keys = ("changed", "first_divergence", "normalized_token_edit_distance", "flipped")
        text += "\nBy group:\n\n" + summary_markdown([r for r in group_rows if r.metric in keys], config.confidence)
    errors = [r for r in records if r.get("error") is not None]
    if errors:
        text += f"\n{len(errors)} of {len(records)} strings were skipped (see `error` in the records).\n"
    files["summary_md"] = output_dir / "summary.md"
    files["summary_md"].write_text(text, encoding="utf-8")
    files["summary_csv"] = output_dir / "summary.csv"
    files["summary_csv"].write_text(_summary_csv(rows + group_rows), encoding="utf-8")
    files["draws_csv"] = output_dir / "draws.csv"
    with open(files["draws_csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(DRAW_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in draw_rows(records))
    files.update(plot_histograms(records, output_dir, config.max_new_tokens))
    files["html"] = write_html(output_dir / "report.html", records, config, rows, group_rows, files)
    return files
