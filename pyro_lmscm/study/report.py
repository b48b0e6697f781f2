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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .config import StudyError
from .records import JSONLStore, ParquetStore
from .summary import (
    KINDS,
    METRICS,
    Metric,
    Record,
    SummaryRow,
    summarize,
    summary_markdown,
)

if TYPE_CHECKING:
    from .config import StudyConfig

__all__ = [
    "KINDS",
    "METRICS",
    "Metric",
    "SummaryRow",
    "csv_cell",
    "draw_rows",
    "load_records",
    "plot_histograms",
    "summarize",
    "summary_markdown",
    "write_report",
]

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
        cells = [csv_cell(row.group), row.metric, row.kind, repr(row.mean), repr(row.low), repr(row.high), row.n]
        writer.writerow(cells)
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


def load_records(path: str | Path) -> Any:
    """The records of a study as a ``pandas.DataFrame``, one row per draw (the columns of
    :data:`DRAW_COLUMNS`, plus the string's exact ``prob_unchanged`` and
    ``expected_first_divergence`` where recorded); records with an error are left out.

    :param path: a study folder, its ``records.jsonl`` or its ``records.parquet`` folder.
    :raises StudyError: for a path with no records, or without pandas.
    """
    try:
        import pandas as pd
    except ImportError as error:
        raise StudyError("load_records() needs pandas: pip install 'pyro-lmscm[pandas]'.") from error
    path = Path(path)
    if path.is_dir() and path.name == "records.parquet":
        store: Any = ParquetStore(path)
    elif path.is_file():
        store = JSONLStore(path)
    elif (path / "records.jsonl").is_file():
        store = JSONLStore(path / "records.jsonl")
    elif (path / "records.parquet").is_dir():
        store = ParquetStore(path / "records.parquet")
    else:
        raise StudyError(f"no study records at {str(path)!r} (a folder with records.jsonl or records.parquet).")
    records = store.load()
    rows = draw_rows(records)
    exact = {r["index"]: r.get("exact") or {} for r in records if r.get("error") is None}
    for row in rows:
        row["prob_unchanged"] = exact[row["index"]].get("prob_unchanged")
        row["expected_first_divergence"] = exact[row["index"]].get("expected_first_divergence")
    columns = [*DRAW_COLUMNS, "prob_unchanged", "expected_first_divergence"]
    return pd.DataFrame(rows, columns=columns)


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

    if not any(r[kind] for r in records for kind in KINDS):
        return {}  # an exact-only study has no draws to plot
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
        keys = ("changed", "first_divergence", "normalized_token_edit_distance", "flipped", "prob_unchanged")
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
