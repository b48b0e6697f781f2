r"""The seed paper's side-effect comparison at small scale (``pyro-lmscm study --paper``).

Ravfogel et al. (2024) compare how much common interventions change unrelated text: the
counterfactuals of Wikipedia sentence beginnings under knowledge edits (MEMIT), linear
steering (MiMiC, honesty) and instruction tuning. :func:`run_paper_study` runs the same
comparison on the embedded SmolLM2, one :func:`~pyro_lmscm.study.run_study` per
intervention (:data:`PAPER_ROWS`) over :data:`paper corpus <corpus_path>` (200 five-word
encyclopaedic beginnings written for the package, none about the edited facts; the
observed continuations are sampled from the factual model, 25 tokens), and reports per row:

* the exact expected fraction of identical strings, the mean over strings of the exact
  P(unchanged) (no draws), with a 95% cluster-bootstrap interval;
* over the sampled counterfactual draws: the share identical to the factual string, the
  mean normalised character edit distance and the mean word-level common prefix (as a
  fraction of the factual string's words, :func:`~pyro_lmscm.metrics.word_common_prefix`);
* the same for the interventional baseline (fresh noise, same intervened model);
* how much of the exact numbers is the Gumbel-max assumption: the means over strings of
  P(unchanged) and E[first divergence] under Gumbel-max and of the low and high ends of their
  exact ranges over counterfactually stable mechanisms and over all mechanisms
  (:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`, :data:`BOUNDS_COLUMNS`), each with a
  95% bootstrap interval;
* for the Louvre edits, the targeted check: on 30 prompts about the Louvre, among the
  counterfactuals of factual strings that mention Paris, the share that mention Rome only,
  Paris only, both or neither.

It writes ``paper.md`` (beside the paper's own figures, :data:`PAPER_REFERENCE`),
``paper.csv``, ``paper.png`` and ``paper.html`` (linking each row's study report). Each
row is a resumable study in its own folder, so a killed run resumes.
"""

from __future__ import annotations

import base64
import csv
import io
import time
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .config import StudyConfig, StudyError
from .summary import EXACT, Metric, SummaryRow, _field, summarize

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = [
    "PAPER_LOUVRE_CHECK",
    "PAPER_REFERENCE",
    "PAPER_ROWS",
    "PaperResult",
    "PaperRow",
    "PaperRowResult",
    "corpus_path",
    "louvre_check",
    "run_paper_study",
]

LOUVRE = "The Louvre|The Louvre is located in the city of| Rome"


@dataclass(frozen=True)
class PaperRow:
    """One intervention of the comparison.

    :ivar key: its folder name.
    :ivar label: its label in the tables.
    :ivar intervention: the spec (:func:`~pyro_lmscm.interventions.spec.parse_intervention`).
    :ivar louvre: also run the targeted Paris/Louvre check.
    """

    key: str
    label: str
    intervention: str | Mapping[str, Any]
    louvre: bool = False


#: The rows of ``study --paper`` on SmolLM2, knowledge edits first.
PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow("memit-louvre", "MEMIT Louvre → Rome", f"memit={LOUVRE}", louvre=True),
    PaperRow("memit-koalas", "MEMIT Koalas → New Zealand", "memit=Koalas|Koalas are native to| New Zealand"),
    PaperRow("rome-louvre", "ROME Louvre → Rome", f"rome={LOUVRE}", louvre=True),
    PaperRow("steer-gender", "gender steering (CAA, α = 1)", "steer=female"),
    PaperRow("mimic-gender", "MiMiC gender", "mimic=female"),
    PaperRow("lora-finetune", "LoRA fine-tune (Victorian register)", "finetune=victorian"),
)

#: The paper's figures (their released outputs: 500 prompts per intervention, 25 new tokens,
#: one counterfactual each), as (pair with their models, identical strings, mean normalised
#: character edit distance, mean word-level common prefix).
PAPER_REFERENCE: tuple[tuple[str, float, float, float], ...] = (
    ("GPT2-XL MEMIT Koalas", 0.818, 0.063, 0.92),
    ("GPT2-XL MEMIT Louvre", 0.704, 0.109, 0.87),
    ("GPT2-XL MiMiC gender", 0.148, 0.363, 0.54),
    ("LLaMA3-8B-Instruct MiMiC gender", 0.0, 0.585, 0.30),
    ("LLaMA3-8B-Instruct honesty steering", 0.0, 0.584, 0.31),
    ("LLaMA3-8B → Instruct", 0.002, 0.588, 0.26),
)

#: The paper's MEMIT Louvre notebook: of 75 continuations mentioning both Paris and the
#: Louvre, the share of counterfactuals that mention Rome only, Paris only, both.
PAPER_LOUVRE_CHECK: dict[str, float] = {"n": 75, "rome_only": 0.547, "paris_only": 0.453, "both": 0.0}


def corpus_path(name: str = "paper_corpus") -> Path:
    """The built-in corpus ``data/<name>.txt`` (``"paper_corpus"`` or ``"paper_louvre"``)."""
    path = resources.files("pyro_lmscm.study").joinpath(f"data/{name}.txt")
    return Path(str(path))


def _annotate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the records whose draws also hold the paper's per-draw measures."""
    from ..metrics import normalized_char_edit_distance, word_common_prefix

    out = []
    for record in records:
        if record.get("error") is not None:
            continue
        factual = record["factual"]["text"]
        copy = dict(record)
        for kind in ("counterfactual", "interventional"):
            copy[kind] = [
                {
                    **draw,
                    "identical": float(not draw["changed"]),
                    "normalized_char_edit_distance": normalized_char_edit_distance(factual, draw["text"]),
                    "word_common_prefix": word_common_prefix(factual, draw["text"]),
                }
                for draw in record[kind]
            ]
        out.append(copy)
    return out


PAPER_METRICS: tuple[Metric, ...] = (
    Metric("identical", "identical to the factual string (share of draws)", _field("identical")),
    Metric(
        "normalized_char_edit_distance", "normalised character edit distance",
        _field("normalized_char_edit_distance"),
    ),
    Metric("word_common_prefix", "word-level common prefix (share of words)", _field("word_common_prefix")),
)


def louvre_check(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Among the counterfactual draws of the factual strings that mention Paris: the share
    that mention Rome only, Paris only, both, or neither (``n``: those strings, ``draws``:
    their draws)."""
    draws = [
        draw["text"]
        for record in records
        if record.get("error") is None and "Paris" in record["factual"]["text"]
        for draw in record["counterfactual"]
    ]
    strings = sum(1 for r in records if r.get("error") is None and "Paris" in r["factual"]["text"])
    counts = {"rome_only": 0, "paris_only": 0, "both": 0, "neither": 0}
    for text in draws:
        rome, paris = "Rome" in text, "Paris" in text
        counts["both" if rome and paris else "rome_only" if rome else "paris_only" if paris else "neither"] += 1
    total = max(len(draws), 1)
    return {"n": strings, "draws": len(draws), **{k: v / total for k, v in counts.items()}}


@dataclass
class PaperRowResult:
    """One row's numbers: ``summary`` maps ``(metric, kind)`` to its
    :class:`~pyro_lmscm.study.summary.SummaryRow` (kinds ``counterfactual``,
    ``interventional``, ``difference`` and, for ``prob_unchanged``, ``exact``)."""

    row: PaperRow
    strings: int
    summary: dict[tuple[str, str], SummaryRow]
    louvre: dict[str, float] | None
    seconds: float
    report: Path | None

    def get(self, metric: str, kind: str) -> SummaryRow | None:
        return self.summary.get((metric, kind))


@dataclass
class PaperResult:
    """What :func:`run_paper_study` did: the rows, the report files and the seconds."""

    rows: list[PaperRowResult]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    markdown: str = ""


def run_paper_study(
    output: str | Path = "studies/paper",
    *,
    model: str = "smollm2-135m-instruct",
    dtype: str = "float32",
    rows: Sequence[PaperRow] = PAPER_ROWS,
    corpus: str | Path | None = None,
    louvre_corpus: str | Path | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 25,
    limit: int | None = None,
    seed: int = 0,
    top_k: int | None = 50,
    bootstrap: int = 2000,
    threads: int = 1,
    progress: bool = True,
    lm: HFLanguageModel | None = None,
    on_row: Callable[[PaperRowResult], None] | None = None,
    batch_size: int = 1,
    draw_scores: bool = True,
) -> PaperResult:
    """Run (or resume) the comparison study; see the module docstring.

    :param output: the folder; each row's study goes in ``output/<row.key>`` (and the
        Louvre check in ``output/<row.key>-louvre``).
    :param rows: the interventions (default :data:`PAPER_ROWS`).
    :param corpus, louvre_corpus: the corpora (default the built-in ones).
    :param num_samples: counterfactual (and interventional) draws per string.
    :param limit: only the first ``limit`` strings of each corpus.
    :param lm: an already loaded model, shared by the rows (else ``model`` is loaded once).
    :param on_row: called with each row's result as it completes.
    :param batch_size: strings per batch (:attr:`StudyConfig.batch_size`); 1, the default
        here, is how the README's table was made.
    :param draw_scores: score the draws (:attr:`StudyConfig.draw_scores`); the comparison
        itself uses no score, and off each row runs about 1.5-2x faster in batches.
    :raises StudyError: on a bad setting; the row studies raise theirs.
    """
    from ..loading import load_lm
    from .runner import run_study

    start = time.perf_counter()
    if not rows:
        raise StudyError("run_paper_study: `rows` is empty.")
    keys = [row.key for row in rows]
    if len(set(keys)) != len(keys):
        raise StudyError(f"run_paper_study: row keys must be distinct, got {keys}.")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if lm is None:
        lm = load_lm(model, dtype=dtype, progress=progress)
    common: dict[str, Any] = dict(
        model=model, dtype=dtype, num_samples=num_samples, max_new_tokens=max_new_tokens, limit=limit, seed=seed,
        top_k=top_k, bootstrap=bootstrap, threads=threads, progress=progress, attribute=None, report=True,
        batch_size=batch_size, draw_scores=draw_scores,
    )
    results = []
    for row in rows:
        row_start = time.perf_counter()
        config = StudyConfig(
            corpus=str(corpus or corpus_path()), output=str(output / row.key), name=f"paper-{row.key}",
            intervention=row.intervention, **common,
        )
        study = run_study(config, lm=lm)
        annotated = _annotate(study.records)
        summary = {(r.metric, r.kind): r for r in summarize(annotated, bootstrap, seed=seed, metrics=PAPER_METRICS)}
        check = None
        if row.louvre:
            louvre = StudyConfig(
                corpus=str(louvre_corpus or corpus_path("paper_louvre")), output=str(output / f"{row.key}-louvre"),
                name=f"paper-{row.key}-louvre", intervention=row.intervention, **{**common, "report": False},
            )
            check = louvre_check(run_study(louvre, lm=lm).records)
        result = PaperRowResult(
            row, len(annotated), summary, check, time.perf_counter() - row_start, study.files.get("html")
        )
        results.append(result)
        if on_row is not None:
            on_row(result)
    paper = PaperResult(results, seconds=time.perf_counter() - start)
    paper.files = write_paper_report(output, paper, num_samples=num_samples, max_new_tokens=max_new_tokens)
    paper.markdown = paper.files["md"].read_text(encoding="utf-8")
    return paper


# -- the report ---------------------------------------------------------------------------


def _cell(row: SummaryRow | None, digits: int = 3) -> str:
    if row is None:
        return "–"
    fmt = f"{{:.{digits}g}}" if abs(row.mean) < 1e-2 and row.mean != 0 else f"{{:.{digits}f}}"
    return f"{fmt.format(row.mean)} [{fmt.format(row.low)}, {fmt.format(row.high)}]"


COLUMNS = (
    ("prob_unchanged", EXACT, "exact E[identical] (mean P(unchanged))"),
    ("identical", "counterfactual", "identical, sampled CF"),
    ("normalized_char_edit_distance", "counterfactual", "norm. char edit, CF"),
    ("word_common_prefix", "counterfactual", "word prefix, CF"),
    ("identical", "interventional", "identical, interventional"),
    ("normalized_char_edit_distance", "interventional", "norm. char edit, interventional"),
    ("word_common_prefix", "interventional", "word prefix, interventional"),
)


#: The columns of the tables of bounds over mechanisms, one table per query (P(unchanged) and
#: E[first divergence]): means over strings of :meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`.
BOUNDS_COLUMNS = (
    ("gumbel", "Gumbel-max"),
    ("stable_low", "stable: low"),
    ("stable_high", "stable: high"),
    ("any_low", "any: low"),
    ("any_high", "any: high"),
)

#: The queries of the bounds tables, with their titles.
BOUNDS_QUERIES = (
    ("prob_unchanged", "mean P(unchanged)"),
    ("expected_first_divergence", "mean E[first divergence] (tokens kept)"),
)


def bounds_tables(result: PaperResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per query of :data:`BOUNDS_QUERIES`: its title, the column labels and one row of cells
    per intervention (the label, then each end's mean over strings with its interval)."""
    tables = []
    for query, title in BOUNDS_QUERIES:
        head = ["intervention"] + [label for _, label in BOUNDS_COLUMNS]
        body = [
            [row.row.label] + [_cell(row.get(f"{query}_{end}", EXACT)) for end, _ in BOUNDS_COLUMNS]
            for row in result.rows
        ]
        tables.append((title, head, body))
    return tables


def paper_markdown(result: PaperResult, num_samples: int, max_new_tokens: int) -> str:
    """The tables of ``paper.md``."""
    strings = result.rows[0].strings if result.rows else 0
    lines = [
        f"# Side effects of interventions: counterfactuals of {strings} encyclopaedic sentence beginnings",
        "",
        f"SmolLM2-135M-Instruct, {max_new_tokens} new tokens, {num_samples} counterfactual and {num_samples} "
        "interventional draws per string; means with 95% cluster-bootstrap intervals over strings.",
        "",
        "| intervention | " + " | ".join(label for _, _, label in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in result.rows:
        cells = [_cell(row.get(metric, kind)) for metric, kind, _ in COLUMNS]
        lines.append(f"| {row.row.label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How much of it is the Gumbel-max assumption: the exact ranges over counterfactually stable mechanisms "
        "and over all mechanisms with the model's next-token laws (ExactCounterfactual.bounds()), means over "
        "strings of each end with 95% bootstrap intervals.",
    ]
    for title, head, body in bounds_tables(result):
        lines += ["", f"{title}:", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += [
        "",
        "The paper's figures (their models; 500 prompts, 25 new tokens, one counterfactual each):",
        "",
        "| pair (their models) | identical strings | mean normalised char edit | mean word-level common prefix |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {identical:.1%} | {edit:.3f} | {prefix:.2f} |" for name, identical, edit, prefix in
              PAPER_REFERENCE]
    checks = [row for row in result.rows if row.louvre is not None]
    if checks:
        lines += [
            "",
            "Targeted check, prompts about the Louvre: among the counterfactuals of factual strings that mention "
            "Paris, the share that mention",
            "",
            "| edit | factual strings with Paris | draws | Rome only | Paris only | both | neither |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in checks:
            c = row.louvre or {}
            lines.append(
                f"| {row.row.label} | {int(c['n'])} | {int(c['draws'])} | {c['rome_only']:.1%} | "
                f"{c['paris_only']:.1%} | {c['both']:.1%} | {c['neither']:.1%} |"
            )
        ref = PAPER_LOUVRE_CHECK
        lines.append(
            f"| paper, GPT2-XL MEMIT Louvre | {int(ref['n'])} | | {ref['rome_only']:.1%} | {ref['paris_only']:.1%} "
            f"| {ref['both']:.1%} | |"
        )
    lines += ["", f"{result.seconds:.0f} s in all: " + ", ".join(f"{r.row.key} {r.seconds:.0f} s" for r in result.rows)]
    return "\n".join(lines) + "\n"


def _plot(result: PaperResult, path: Path) -> None:
    from matplotlib.figure import Figure

    labels = [row.row.label for row in result.rows]
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    for axes, (metric, kinds, title) in zip(
        (left, right),
        (("prob_unchanged", (EXACT,), "exact expected share of identical strings"),
         ("normalized_char_edit_distance", ("counterfactual", "interventional"), "normalised char edit distance")),
    ):
        width = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            rows = [row.get(metric, kind) for row in result.rows]
            means = [r.mean if r else 0.0 for r in rows]
            errors = [[r.mean - r.low if r else 0.0 for r in rows], [r.high - r.mean if r else 0.0 for r in rows]]
            positions = [i + (k - (len(kinds) - 1) / 2) * width for i in range(len(rows))]
            axes.bar(positions, means, width, yerr=errors, capsize=3, label=kind)
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        axes.set_ylim(0, 1)
        axes.set_title(title, fontsize=9)
        if len(kinds) > 1:
            axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def write_paper_report(output: Path, result: PaperResult, num_samples: int, max_new_tokens: int) -> dict[str, Path]:
    """``paper.md``, ``paper.csv``, ``paper.png`` and ``paper.html`` in ``output``."""
    files = {name: output / f"paper.{name}" for name in ("md", "csv", "png", "html")}
    markdown = paper_markdown(result, num_samples, max_new_tokens)
    files["md"].write_text(markdown, encoding="utf-8")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "label", "metric", "kind", "mean", "low", "high", "n"])
    for row in result.rows:
        for (metric, kind), s in sorted(row.summary.items()):
            writer.writerow([row.row.key, row.row.label, metric, kind, s.mean, s.low, s.high, s.n])
        for name, value in (row.louvre or {}).items():
            writer.writerow([row.row.key, row.row.label, f"louvre_{name}", "counterfactual", value, "", "", ""])
    files["csv"].write_text(buffer.getvalue(), encoding="utf-8")
    _plot(result, files["png"])
    image = base64.b64encode(files["png"].read_bytes()).decode("ascii")
    links = "".join(
        f'<li><a href="{escape(str(row.report.relative_to(output)))}">{escape(row.row.label)}</a></li>'
        for row in result.rows if row.report is not None and row.report.is_relative_to(output)
    )
    header = "".join(f"<th>{escape(label)}</th>" for _, _, label in COLUMNS)
    body = "".join(
        f"<tr><th>{escape(row.row.label)}</th>"
        + "".join(f"<td>{escape(_cell(row.get(metric, kind)))}</td>" for metric, kind, _ in COLUMNS)
        + "</tr>"
        for row in result.rows
    )
    bounds = "".join(
        f"<h2>{escape(title)} over mechanisms</h2><table><tr>"
        + "".join(f"<th>{escape(label)}</th>" for label in head) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + "</tr>" for cells in rows)
        + "</table>"
        for title, head, rows in bounds_tables(result)
    )
    files["html"].write_text(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>pyro-lmscm paper study</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}</style></head><body>"
        f"<h1>Side effects of interventions</h1><table><tr><th>intervention</th>{header}</tr>{body}</table>{bounds}"
        f'<p><img alt="paper" src="data:image/png;base64,{image}"></p>'
        f"<h2>Per-intervention reports</h2><ul>{links}</ul>"
        f"<h2>Tables</h2><pre>{escape(markdown)}</pre></body></html>",
        encoding="utf-8",
    )
    return files
