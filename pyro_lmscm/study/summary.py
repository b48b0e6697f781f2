"""The summary of a study: its metrics, per kind of draw, with cluster-bootstrap intervals
(:func:`summarize`), and the Markdown table (:func:`summary_markdown`). The CSV, plots and
HTML report (:mod:`~pyro_lmscm.study.report`, :mod:`~pyro_lmscm.study.html`) build on it."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .. import seeding

if TYPE_CHECKING:
    pass

__all__ = [
    "ATTRIBUTION",
    "ATTRIBUTION_COLUMNS",
    "EXACT",
    "EXACT_METRICS",
    "KINDS",
    "METRICS",
    "Metric",
    "SummaryRow",
    "markdown_text",
    "summarize",
    "summary_markdown",
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
        "outside the factual decoding support (share)",  # of the draws scored (a null token_log_prob_factual: not)
        lambda d: None if d.get("token_log_prob_factual", ()) is None else float(d.get("log_prob_factual") is None),
    ),
    Metric("flipped", "attribute flipped (eligible draws)", _field("flipped")),
)


def _bound(name: str) -> Callable[[Record], float | None]:
    """The bound ``name`` (:data:`~pyro_lmscm.study.records.BOUNDS_KEYS`) of a record's exact
    metrics; ``None`` for a record without bounds (written before they were recorded)."""

    def value(exact: Record) -> float | None:
        x = (exact.get("bounds") or {}).get(name)
        return None if x is None else float(x)

    return value


#: The kind of the rows of the exact metrics: one value per string, not per draw.
EXACT = "exact"

#: The exact per-string metrics (``record["exact"]``), averaged over strings.
EXACT_METRICS: tuple[Metric, ...] = (
    Metric("prob_unchanged", "exact P(unchanged)", _field("prob_unchanged")),
    Metric(
        "expected_first_divergence",
        "exact expected first divergence (tokens kept; n if unchanged)",
        _field("expected_first_divergence"),
    ),
    # their bounds over mechanisms (record["exact"]["bounds"]; ExactCounterfactual.bounds())
    *(
        Metric(f"{query}_{end}", f"{label}, {where}", _bound(f"{query}_{end}"))
        for query, label in (("prob_unchanged", "P(unchanged)"), ("expected_first_divergence", "E[first divergence]"))
        for end, where in (
            ("gumbel", "Gumbel-max"),
            ("stable_low", "stable mechanisms: low end"),
            ("stable_high", "stable mechanisms: high end"),
            ("any_low", "any mechanism: low end"),
            ("any_high", "any mechanism: high end"),
        )
    ),
    # exact-only studies: the most probable counterfactual (beam search)
    Metric("mode_changed", "most probable counterfactual differs (share of strings)", _field("mode_changed")),
    Metric(
        "mode_normalized_char_edit_distance",
        "most probable counterfactual: normalised character edit distance",
        _field("mode_normalized_char_edit_distance"),
    ),
)


#: The kind of the rows of the attribution (:attr:`~pyro_lmscm.study.StudyConfig.attribution`):
#: one value per string and part; the row's metric is ``"<value>@<part>"``.
ATTRIBUTION = "attribution"

#: The per-part values of the attribution in the summary, with their labels.
ATTRIBUTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("shapley", "Shapley value of log P(unchanged)"),
    ("prob_unchanged_alone", "P(unchanged), the part alone"),
    ("prob_unchanged_without", "P(unchanged), all parts but it"),
    ("shapley_first_divergence", "Shapley value of E[first divergence]"),
    ("first_divergence_alone", "E[first divergence], the part alone"),
    ("first_divergence_without", "E[first divergence], all parts but it"),
)


def attribution_metric(value: str, part: str) -> str:
    """The ``metric`` of the summary row of attribution ``value`` for ``part``."""
    return f"{value}@{part}"


@dataclass
class SummaryRow:
    """One metric of one kind: the mean and its bootstrap interval.

    :ivar group: ``"all"`` or a corpus group.
    :ivar kind: ``"counterfactual"``, ``"interventional"``, ``"difference"`` (CF - int.),
        ``"exact"`` (:data:`EXACT_METRICS`, a mean over strings) or ``"attribution"``
        (:data:`ATTRIBUTION_COLUMNS` per part, metric ``"<value>@<part>"``, a mean over strings).
    :ivar n: the draws counted (for the difference, the strings with both; for ``"exact"``,
        the strings).
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
    difference counterfactual minus interventional; then the exact metrics
    (:data:`EXACT_METRICS`), means over strings with intervals from the same resamples.

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
    rng = seeding.numpy_generator(seed)
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
    if any("exact" in r for r in records):
        for metric in EXACT_METRICS:
            values = [metric.value(r.get("exact") or {}) for r in records]
            sums = np.array([0.0 if v is None else v for v in values])
            counts = np.array([0.0 if v is None else 1.0 for v in values])
            point = _ratio(np.array([sums.sum()]), np.array([counts.sum()]))[0]
            low, high = _interval(_ratio(sums[resample].sum(1), counts[resample].sum(1)), confidence)
            rows.append(SummaryRow(group, metric.key, EXACT, float(point), low, high, int(counts.sum())))
    for part, name, values in _attribution_values(records):
        sums = np.array([0.0 if v is None else v for v in values])
        counts = np.array([0.0 if v is None else 1.0 for v in values])
        point = _ratio(np.array([sums.sum()]), np.array([counts.sum()]))[0]
        low, high = _interval(_ratio(sums[resample].sum(1), counts[resample].sum(1)), confidence)
        rows.append(
            SummaryRow(group, attribution_metric(name, part), ATTRIBUTION, float(point), low, high, int(counts.sum()))
        )
    return rows


def _attribution_values(records: Sequence[Record]) -> list[tuple[str, str, list[float | None]]]:
    """Per part (in the order first seen) and value of :data:`ATTRIBUTION_COLUMNS`, the value of
    every record (``None`` where it has no attribution, not that part, or a non-finite value)."""
    found = [r.get("attribution") or {} for r in records]
    parts = list(dict.fromkeys(part for a in found for part in a.get("parts") or ()))
    out = []
    for part in parts:
        for name, _ in ATTRIBUTION_COLUMNS:
            values = []
            for a in found:
                where = (a.get("parts") or []).index(part) if part in (a.get("parts") or []) else None
                value = None if where is None else a[name][where]
                values.append(None if value is None else float(value))
            out.append((part, name, values))
    return out


def _fmt(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "–"
    if 0 < abs(x) < 10 ** -digits:  # e.g. a small exact P(unchanged)
        return f"{x:.1e}"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.0f}"


def _cell(row: SummaryRow) -> str:
    if math.isnan(row.mean):
        return "–"
    return f"{_fmt(row.mean)} [{_fmt(row.low)}, {_fmt(row.high)}]"


def markdown_text(text: str) -> str:
    r"""``text`` (a corpus group name) as inert text in a markdown table cell: HTML tags
    (``<script>``) and entities escaped, ``|``, ``[`` and ``]`` backslash-escaped, line breaks
    as spaces.

    >>> markdown_text("<script>alert(1)</script> | [x](javascript:y)")
    '&lt;script&gt;alert(1)&lt;/script&gt; \\| \\[x\\](javascript:y)'
    """
    text = html.escape(" ".join(str(text).splitlines()), quote=False)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def _labels(metrics: Iterable[Metric]) -> dict[str, str]:
    return {m.key: m.label for m in metrics}


def summary_markdown(
    rows: Sequence[SummaryRow], confidence: float = 0.95, metrics: Sequence[Metric] = METRICS
) -> str:
    """The summary as a markdown table: one line per (group, metric), the counterfactual,
    interventional and difference columns as ``mean [low, high]``."""
    labels = _labels(metrics)
    exact = [row for row in rows if row.kind == EXACT]
    attribution = [row for row in rows if row.kind == ATTRIBUTION]
    rows = [row for row in rows if row.kind not in (EXACT, ATTRIBUTION)]
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
            cells.insert(0, markdown_text(group))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Means over draws with {level} cluster-bootstrap intervals (strings resampled).")
    if exact:
        exact_labels = _labels(EXACT_METRICS)
        with_group = head.startswith("| group")
        lines += ["", ("| group " if with_group else "") + "| exact metric (per string) | mean | strings |"]
        lines.append("|---" * (4 if with_group else 3) + "|")
        for row in exact:
            cells = [exact_labels.get(row.metric, row.metric), _cell(row), str(row.n)]
            lines.append("| " + " | ".join(([markdown_text(row.group)] if with_group else []) + cells) + " |")
        lines += ["", f"Exact metrics (exact_counterfactual): means over strings, {level} bootstrap intervals."]
    if attribution:
        with_group = head.startswith("| group")
        table = attribution_table(attribution)
        lines += ["", ("| group " if with_group else "") + "| part | " + " | ".join(table[0]) + " |"]
        lines.append("|---" * (len(table[0]) + (2 if with_group else 1)) + "|")
        for group, part, found in table[1]:
            lines.append(
                "| " + " | ".join(([markdown_text(group)] if with_group else []) + [markdown_text(part)]
                                  + [_cell(c) if c is not None else "–" for c in found]) + " |"
            )
        lines += [
            "",
            f"Exact attribution of the effect to the parts of the intervention's mechanism (inference.attribute): "
            f"means over strings, {level} bootstrap intervals.",
        ]
    return "\n".join(lines) + "\n"


def attribution_table(
    rows: Sequence[SummaryRow],
) -> tuple[list[str], list[tuple[str, str, list[SummaryRow | None]]]]:
    """The attribution rows (kind :data:`ATTRIBUTION`) as a table: the column labels
    (:data:`ATTRIBUTION_COLUMNS`) and per (group, part) its rows in that order."""
    cells: dict[tuple[str, str], dict[str, SummaryRow]] = {}
    for row in rows:
        if row.kind == ATTRIBUTION:
            name, _, part = row.metric.partition("@")
            cells.setdefault((row.group, part), {})[name] = row
    body = [(group, part, [by.get(name) for name, _ in ATTRIBUTION_COLUMNS]) for (group, part), by in cells.items()]
    return [label for _, label in ATTRIBUTION_COLUMNS], body
