"""The self-contained HTML report of a study: one row per string, tokens aligned.

One file, no network: inline CSS, a few lines of inline JavaScript (column sorting) and the
plots as ``data:`` URIs. Each string's row shows its prompt, the factual continuation
aligned token by token with the first counterfactual draw (Levenshtein alignment; changed
tokens coloured, the first divergence outlined), and, folded, every counterfactual and
interventional draw aligned the same way. Hovering a token shows its probability under the
factual and the intervened mechanism. Clicking a column header sorts the rows by it (again:
the other way); rows without a value go last.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rapidfuzz.distance import Levenshtein

from .summary import EXACT, EXACT_METRICS, KINDS, METRICS, SummaryRow

if TYPE_CHECKING:
    from .config import StudyConfig

__all__ = ["render_html", "write_html"]

Record = dict[str, Any]

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.45em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; }
.meta td { padding: 1px 12px 1px 0; } .meta td:first-child { color: #666; }
table.summary td, table.summary th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.summary td.l, table.summary th.l { text-align: left; }
.plots img { height: 300px; max-width: 60%; margin-right: 1%; border: 1px solid #eee; }
#strings { width: 100%; }
#strings > thead th { position: sticky; top: 0; background: #f4f4f8; border-bottom: 2px solid #999;
  padding: 4px 6px; text-align: left; white-space: nowrap; }
#strings > thead th[data-sort] { cursor: pointer; user-select: none; }
#strings > thead th[data-sort]::after { content: " \\2195"; color: #aaa; }
#strings > thead th[aria-sort=ascending]::after { content: " \\25B2"; color: #333; }
#strings > thead th[aria-sort=descending]::after { content: " \\25BC"; color: #333; }
#strings > tbody > tr { border-bottom: 1px solid #ddd; vertical-align: top; }
#strings > tbody > tr > td { padding: 6px; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.prompt { color: #555; margin-bottom: 3px; } .prompt b { color: #222; }
.scroll { overflow-x: auto; max-width: 56vw; }
table.al { margin: 3px 0; font: 12px/1.3 ui-monospace, "DejaVu Sans Mono", monospace;
  border-collapse: separate; border-spacing: 1px 1px; }
table.al th { font-weight: normal; color: #777; text-align: right; padding-right: 6px; white-space: nowrap; }
table.al td { white-space: pre; padding: 1px 1px; border-radius: 2px; }
td.eq { color: #444; } td.sub, td.ins { background: #f8d7e6; color: #6a0a3a; }
td.del { background: #e9e9e9; color: #888; text-decoration: line-through; }
td.gap { color: #bbb; } td.div { outline: 2px solid #d32f2f; }
details summary { cursor: pointer; color: #555; font-size: 12px; }
.err { color: #b00020; } .lab { font-size: 12px; color: #555; }
"""

_JS = """
(function () {
  var table = document.getElementById('strings');
  var tbody = table.tBodies[0];
  var headers = table.tHead.querySelectorAll('th[data-sort]');
  function value(row, key, type) {
    var raw = row.getAttribute('data-' + key);
    if (raw === null || raw === '') return null;
    return type === 'str' ? raw : parseFloat(raw);
  }
  function sortBy(th) {
    var key = th.getAttribute('data-sort');
    var type = th.getAttribute('data-type') || 'num';
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = value(a, key, type), y = value(b, key, type);
      if (x === null && y === null) return value(a, 'index', 'num') - value(b, 'index', 'num');
      if (x === null) return 1;
      if (y === null) return -1;
      var c = type === 'str' ? String(x).localeCompare(String(y)) : x - y;
      if (c === 0) c = value(a, 'index', 'num') - value(b, 'index', 'num');
      return ascending ? c : -c;
    });
    rows.forEach(function (row) { tbody.appendChild(row); });
    headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
  }
  headers.forEach(function (th) {
    th.addEventListener('click', function () { sortBy(th); });
  });
})();
"""

_KIND_SHORT = {"counterfactual": "CF", "interventional": "int."}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _prob(log_p: float | None) -> str:
    if log_p is None:
        return "0 (outside the support)"
    p = math.exp(log_p)
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _piece(token: str) -> str:
    """A token made visible: newlines, tabs and all-space tokens get a glyph; a token whose
    text is empty (the first bytes of a character that the next token completes) gets "…"."""
    if not token:
        return "…"
    if not token.strip(" "):
        return token.replace(" ", "␣")
    return token.replace("\n", "↵").replace("\t", "⇥")


def _q(q: float) -> str:
    return f"{q:.3f}" if q >= 0.001 else f"{q:.1e}"


def _cell(tokens: Sequence[str], lp_f: Sequence[float | None] | None, lp_i: Sequence[float | None] | None,
          i: int | None, tag: str, divergence: bool, q: Sequence[float] | None = None, q_label: str = "") -> str:
    """One token; ``q`` (exact counterfactual probabilities, if known) colours its underline:
    solid blue for a token the counterfactual keeps for sure, fading to none at 0."""
    classes = [tag] + (["div"] if divergence else [])
    if i is None:
        return f'<td class="gap{" div" if divergence else ""}">·</td>'
    title = repr(tokens[i])
    if lp_f is not None and lp_i is not None:  # (a draw not scored has neither, draw_scores=False)
        title += f"  p(factual) = {_prob(lp_f[i])}  p(intervened) = {_prob(lp_i[i])}"
    style = ""
    if q is not None and i < len(q) and q[i] is not None:
        title += f"  {q_label} = {_q(float(q[i]))}"
        style = f' style="border-bottom:3px solid rgba(37,99,235,{min(1.0, max(0.0, float(q[i]))):.3f})"'
        classes.append("q")
    return f'<td class="{" ".join(classes)}"{style} title="{_e(title)}">{_e(_piece(tokens[i]))}</td>'


def _alignment(factual: Record, draw: Record, label: str, stay: Sequence[float] | None = None) -> str:
    """Two rows, factual over ``draw``, aligned by a Levenshtein edit script; ``stay`` are the
    exact probabilities that the counterfactual keeps each factual token."""
    columns: list[tuple[int | None, int | None, str]] = []
    for op in Levenshtein.opcodes(factual["ids"], draw["ids"]):
        tag, i1, i2, j1, j2 = op.tag, op.src_start, op.src_end, op.dest_start, op.dest_end
        width = max(i2 - i1, j2 - j1)
        for k in range(width):
            i = i1 + k if k < i2 - i1 else None
            j = j1 + k if k < j2 - j1 else None
            kind = {"equal": "eq", "replace": "sub", "delete": "del", "insert": "ins"}[tag]
            columns.append((i, j, kind))
    top, bottom = [], []
    marked = False
    for i, j, kind in columns:
        is_div = not marked and kind != "eq"  # the first edit: where the strings part
        marked = marked or is_div
        top.append(_cell(factual["tokens"], factual["token_log_prob_factual"], factual["token_log_prob_intervened"],
                         i, kind, is_div, stay, "p(counterfactual keeps it | same prefix)"))
        bottom.append(_cell(draw["tokens"], draw["token_log_prob_factual"], draw["token_log_prob_intervened"],
                            j, kind if j is not None else "gap", is_div, draw.get("token_prob_counterfactual"),
                            "p(counterfactual) exact"))
    return (
        f'<div class="scroll"><table class="al"><tr><th>factual</th>{"".join(top)}</tr>'
        f'<tr><th>{_e(label)}</th>{"".join(bottom)}</tr></table></div>'
    )


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _attr(value: float | None) -> str:
    return "" if value is None else repr(round(value, 6))


def _row(record: Record) -> str:
    index = record["index"]
    group = record.get("group") or ""
    head = f'<div class="prompt"><b>{_e(record["prompt"])}</b></div>'
    if record.get("error") is not None:
        return (
            f'<tr class="string-row" data-index="{index}" data-group="{_e(group)}"><td class="num">{index}</td>'
            f'<td>{_e(group)}</td><td>{head}<div class="err">skipped: {_e(record["error"])}</div></td>'
            + '<td class="num">–</td>' * 7 + "</tr>"
        )
    factual, cf, it = record["factual"], record["counterfactual"], record["interventional"]
    changed = _mean([d["changed"] for d in cf])
    divergence = _mean([d["first_divergence"] for d in cf])
    cf_distance = _mean([d["normalized_token_edit_distance"] for d in cf])
    int_distance = _mean([d["normalized_token_edit_distance"] for d in it])
    chars = _mean([d["char_edit_distance"] for d in cf])
    flipped = _mean([d["flipped"] for d in cf])
    exact = record.get("exact") or {}
    stay = exact.get("token_prob_unchanged")
    unchanged = exact.get("prob_unchanged")
    given = "observed" if record.get("continuation_given") else "sampled"
    body = [head, f'<div class="lab">factual ({given}): {_e(factual["text"])}</div>']
    if cf:
        body.append(_alignment(factual, cf[0], "CF 1", stay))
    elif exact.get("mode_ids") is not None:  # exact-only: the most probable counterfactual
        n = len(exact["mode_ids"])
        mode = {"ids": exact["mode_ids"], "tokens": exact["mode_tokens"],
                "token_log_prob_factual": [None] * n, "token_log_prob_intervened": [None] * n}
        body.append(_alignment(factual, mode, "mode", stay))
    folded = []
    for kind in KINDS:
        for d, draw in enumerate(record[kind]):
            if kind == "counterfactual" and d == 0:
                continue
            folded.append(_alignment(factual, draw, f"{_KIND_SHORT[kind]} {d + 1}", stay))
    body.append(
        f"<details><summary>all {len(cf)} counterfactual and {len(it)} interventional draws</summary>"
        + "".join(folded) + "</details>"
    )
    labels = factual.get("attribute")
    attr_text = "–" if labels is None else f'{_e(labels)} → {_e(", ".join(str(d["attribute"]) for d in cf))}'
    attrs = {
        "index": str(index), "group": _e(group), "changed": _attr(changed), "divergence": _attr(divergence),
        "cf-distance": _attr(cf_distance), "int-distance": _attr(int_distance), "char": _attr(chars),
        "flipped": _attr(flipped), "unchanged": _attr(unchanged),
    }
    data = " ".join(f'data-{k}="{v}"' for k, v in attrs.items())
    n_changed = sum(d["changed"] for d in cf)
    unchanged_text = "–" if unchanged is None else f"{unchanged:.2g}"
    bounds = exact.get("bounds")
    if unchanged is not None and bounds:  # the ranges over mechanisms (ExactCounterfactual.bounds())
        unchanged_text += "".join(
            f'<br><span class="lab" title="P(unchanged) over {title}">{short} '
            f'{bounds[f"prob_unchanged_{key}_low"]:.2g}–{bounds[f"prob_unchanged_{key}_high"]:.2g}</span>'
            for key, short, title in (
                ("stable", "stable", "counterfactually stable mechanisms"), ("any", "any", "all mechanisms")
            )
        )
    return (
        f'<tr class="string-row" {data}><td class="num">{index}</td><td>{_e(group)}</td>'
        f'<td>{"".join(body)}</td><td class="num">{unchanged_text}</td><td class="num">{n_changed}/{len(cf)}</td>'
        f'<td class="num">{_num(divergence, 1)}</td><td class="num cf-distance">{_num(cf_distance)}</td>'
        f'<td class="num">{_num(int_distance)}</td><td class="num">{_num(chars, 1)}</td>'
        f'<td><span class="lab">{attr_text}</span><br>{_num(flipped)}</td></tr>'
    )


def _exact_table(rows: Sequence[SummaryRow], with_group: bool) -> str:
    labels = {m.key: m.label for m in EXACT_METRICS}
    head = ('<th class="l">group</th>' if with_group else "") + '<th class="l">exact metric</th><th>mean</th>'
    lines = []
    for row in rows:
        first = f'<td class="l">{_e(row.group)}</td>' if with_group else ""
        value = "–" if math.isnan(row.mean) else (
            f"{row.mean:.4g} <span class=lab>[{row.low:.4g}, {row.high:.4g}]</span>"
        )
        lines.append(f'<tr>{first}<td class="l">{_e(labels.get(row.metric, row.metric))}</td><td>{value}</td></tr>')
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def _summary_table(rows: Sequence[SummaryRow], with_group: bool) -> str:
    exact = [row for row in rows if row.kind == EXACT]
    rows = [row for row in rows if row.kind != EXACT]
    if exact:
        return _summary_table(rows, with_group) + _exact_table(exact, with_group)
    labels = {m.key: m.label for m in METRICS}
    by_key: dict[tuple[str, str], dict[str, SummaryRow]] = {}
    for row in rows:
        by_key.setdefault((row.group, row.metric), {})[row.kind] = row

    def cell(row: SummaryRow) -> str:
        if math.isnan(row.mean):
            return "–"
        return f"{row.mean:.3f} <span class=lab>[{row.low:.3f}, {row.high:.3f}]</span>"

    head = ('<th class="l">group</th>' if with_group else "") + (
        '<th class="l">metric</th><th>counterfactual</th><th>interventional</th><th>CF − interventional</th>'
    )
    lines = []
    for (group, metric), kinds in by_key.items():
        first = f'<td class="l">{_e(group)}</td>' if with_group else ""
        lines.append(
            f'<tr>{first}<td class="l">{_e(labels.get(metric, metric))}</td>'
            + "".join(f"<td>{cell(kinds[k])}</td>" for k in ("counterfactual", "interventional", "difference"))
            + "</tr>"
        )
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(path.stem)}" src="data:image/png;base64,{data}">'


def render_html(
    records: Sequence[Record],
    config: StudyConfig,
    rows: Sequence[SummaryRow],
    group_rows: Sequence[SummaryRow] = (),
    files: dict[str, Path] | None = None,
) -> str:
    """The report as one HTML string (see the module docstring)."""
    files = files or {}
    errors = sum(1 for r in records if r.get("error") is not None)
    decoding = f"temperature {config.temperature}, top-k {config.top_k}, top-p {config.top_p}"
    meta = [
        ("model", f"{config.model} ({config.dtype})"),
        ("intervention", config.intervention),
        ("strings", f"{len(records)}" + (f" ({errors} skipped)" if errors else "")),
        ("draws per string", f"{config.num_samples} counterfactual + {config.num_samples} interventional"),
        ("max new tokens", config.max_new_tokens),
        ("decoding", decoding),
        ("seed", config.seed),
        ("attribute check", config.attribute),
    ]
    level = f"{config.confidence:.0%}"
    plots = "".join(_image(files[k]) for k in ("edit_distance_png", "divergence_png") if k in files)
    columns = (
        '<th data-sort="index" aria-sort="ascending">#</th><th data-sort="group" data-type="str">group</th>'
        "<th>prompt · factual vs counterfactual tokens (hover a token for its probabilities; blue underline: "
        "the exact counterfactual probability of the token)</th>"
        '<th data-sort="unchanged" title="exact probability that the counterfactual equals the factual string">'
        "P(unchanged)</th>"
        '<th data-sort="changed" title="counterfactual draws that differ from the factual string">changed</th>'
        '<th data-sort="divergence" title="mean first divergence of the changed counterfactual draws">first div.</th>'
        '<th data-sort="cf-distance" title="mean normalised token edit distance, counterfactual">CF edit dist.</th>'
        '<th data-sort="int-distance" title="mean normalised token edit distance, interventional">int. edit dist.</th>'
        '<th data-sort="char" title="mean character edit distance, counterfactual">CF char dist.</th>'
        '<th data-sort="flipped" title="share of counterfactual draws whose attribute flipped">attribute (flipped)</th>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>Counterfactual study: {_e(config.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Counterfactual study: {_e(config.name)}</h1>",
        '<table class="meta">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meta) + "</table>",
        "<h2>Summary</h2>",
        f"<p class=lab>Means over draws with {level} cluster-bootstrap intervals (strings resampled). "
        "Counterfactual: the same noise as the factual string, replayed through the intervened model. "
        "Interventional: fresh noise, intervened model.</p>",
        _summary_table(rows, with_group=False),
    ]
    if group_rows:
        keys = ("changed", "first_divergence", "normalized_token_edit_distance", "flipped", "prob_unchanged")
        parts += ["<h2>By group</h2>", _summary_table([r for r in group_rows if r.metric in keys], with_group=True)]
    if plots:
        parts += ["<h2>Plots</h2>", f'<div class="plots">{plots}</div>']
    parts += [
        f"<h2>Strings ({len(records)})</h2>",
        '<p class="lab">Click a column header to sort. Pink: tokens the edit script changes; red outline: the '
        "first divergence; grey struck: factual tokens the draw drops.</p>",
        f'<table id="strings"><thead><tr>{columns}</tr></thead><tbody>',
        *(_row(record) for record in records),
        "</tbody></table>",
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(
    path: str | Path,
    records: Sequence[Record],
    config: StudyConfig,
    rows: Sequence[SummaryRow],
    group_rows: Sequence[SummaryRow] = (),
    files: dict[str, Path] | None = None,
) -> Path:
    """Write :func:`render_html` to ``path`` and return it."""
    path = Path(path)
    path.write_text(render_html(records, config, rows, group_rows, files), encoding="utf-8")
    return path
