"""The explorer's worlds as one HTML table, aligned step by step with the factual string.

Each column is a step ``t``. Each counterfactual token is shaded by its exact conditional
probability q(s_t | s_<t) (white: certain; deep blue: improbable), with the value on hover
(``title``); a token that differs from the factual one at its step is bold magenta, the first
divergence of each row is outlined in orange, and steps past the observation are dimmed.
Every text is escaped. Pure functions: no Gradio here.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from .session import Exploration, WorldRow

__all__ = ["STYLE", "first_divergence_figure", "render_summary", "render_worlds"]

STYLE = """
<style>
.lmscm-worlds { overflow-x: auto; }
.lmscm-worlds table { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 13px; }
.lmscm-worlds th, .lmscm-worlds td { padding: 2px 3px; border: 1px solid #e5e7eb; white-space: pre; }
.lmscm-worlds th.world { text-align: left; font-family: ui-sans-serif, system-ui, sans-serif; font-weight: 600;
  position: sticky; left: 0; background: #f9fafb; z-index: 1; }
.lmscm-worlds thead th { color: #6b7280; font-weight: 400; }
.lmscm-worlds td.changed { color: #a21caf; font-weight: 700; }
.lmscm-worlds td.first-divergence { outline: 2px solid #ea580c; outline-offset: -2px; }
.lmscm-worlds td.past { color: #9ca3af; font-style: italic; }
.lmscm-worlds tr.interventional th.world { color: #6b7280; }
.lmscm-legend { font-family: ui-sans-serif, system-ui, sans-serif; font-size: 12px; color: #4b5563; margin: 4px 0; }
</style>
"""


def _shade(prob: float) -> str:
    """White at probability 1, deep blue toward 0 (on a square-root scale, so that 0.5 is
    already visible)."""
    alpha = min(max(1.0 - prob, 0.0), 1.0) ** 0.5 * 0.75
    return f"background: rgba(37, 99, 235, {alpha:.3f});"


def _row(label: str, row: WorldRow, factual: WorldRow, steps: int, css: str, label_title: str = "") -> str:
    span = len(factual.ids)
    cells = []
    for t in range(steps):
        if t >= len(row.ids):
            cells.append("<td></td>")
            continue
        classes = []
        if row is not factual and t < span and row.ids[t] != factual.ids[t]:
            classes.append("changed")
        if row is not factual and row.first_divergence == t:
            classes.append("first-divergence")
        if t >= span:
            classes.append("past")
        title = f"t = {t}"
        style = ""
        if row.probs is not None:
            title += f" · q(token | prefix) = {row.probs[t]:.4g}"
            style = f' style="{_shade(row.probs[t])}"'
        cls = f' class="{" ".join(classes)}"' if classes else ""
        cells.append(f'<td{cls}{style} title="{escape(title)}" data-step="{t}">{escape(row.tokens[t])}</td>')
    title = f' title="{escape(label_title)}"' if label_title else ""
    return f'<tr class="{css}"><th class="world"{title}>{escape(label)}</th>{"".join(cells)}</tr>'


def render_worlds(exploration: Exploration) -> str:
    """The aligned table of the factual string, the most probable counterfactual, the
    sampled counterfactuals (one row per distinct string, with its count) and the
    interventional baseline."""
    worlds = [exploration.factual, *exploration.counterfactuals]
    if exploration.mode is not None:
        worlds.append(exploration.mode)
    worlds.extend(exploration.interventional or [])
    steps = max(len(w.ids) for w in worlds)
    factual = exploration.factual
    rows = [_row("factual", factual, factual, steps, "factual")]
    if exploration.mode is not None:
        p = math.exp(exploration.mode.log_prob or 0.0)
        rows.append(_row(f"most probable (p = {p:.3g})", exploration.mode, factual, steps, "mode"))
    n = exploration.num_samples
    for i, row in enumerate(exploration.counterfactuals):
        label = f"counterfactual #{i + 1} (×{row.count}/{n})"
        hint = "" if row.log_prob is None else f"exact log P(this string) = {row.log_prob:.4g}"
        rows.append(_row(label, row, factual, steps, "counterfactual", hint))
    for i, row in enumerate(exploration.interventional or []):
        rows.append(_row(f"interventional #{i + 1} (×{row.count}/{n})", row, factual, steps, "interventional"))
    header = "".join(f"<th>{t}</th>" for t in range(steps))
    legend = (
        '<div class="lmscm-legend">Shade: the exact conditional probability of the token under the '
        "counterfactual distribution (hover for the value; white = certain, blue = improbable). "
        '<b style="color:#a21caf">Bold magenta</b>: differs from the factual token; '
        '<span style="outline:2px solid #ea580c">orange box</span>: first divergence; '
        "<i>grey</i>: past the observed string. Interventional rows: fresh noise (no shade).</div>"
    )
    return (
        f'{STYLE}<div class="lmscm-worlds" id="lmscm-worlds">{legend}<table><thead><tr><th class="world">'
        f'{escape(exploration.description)}</th>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
    )


def render_summary(exploration: Exploration) -> str:
    """Markdown: P(unchanged), the expected first divergence and the most probable
    counterfactual."""
    if exploration.exact_error is not None:
        return f"**Exact probabilities unavailable:** {exploration.exact_error}"
    if exploration.prob_unchanged is None:
        return f"*computing {exploration.pending} …*"
    n = len(exploration.factual.ids)
    changed = sum(row.count for row in exploration.counterfactuals if row.first_divergence is not None)
    lines = [
        f"**P(unchanged) = {exploration.prob_unchanged:.4g}** (exact; {changed}/{exploration.num_samples} "
        f"sampled counterfactuals changed over the observed {n} tokens)",
        f"**E[first divergence] = {exploration.expected_first_divergence:.3g}** tokens "
        f"(the unchanged string counts as {n})",
    ]
    if exploration.mode is not None:
        p = math.exp(exploration.mode.log_prob or 0.0)
        text = exploration.mode.text.replace("`", "'")
        lines.append(f"**Most probable counterfactual** (p = {p:.3g}): `{text}`")
    elif exploration.pending:
        lines.append(f"*computing {exploration.pending} …*")
    return "\n\n".join(lines)


def first_divergence_figure(exploration: Exploration) -> Any:
    """A small bar plot of the exact law of the first divergence (the last bar:
    unchanged), as a matplotlib ``Figure`` (no pyplot state); ``None`` before the law is
    known."""
    from matplotlib.figure import Figure

    law = exploration.first_divergence
    if law is None:
        return None
    figure = Figure(figsize=(7.5, 2.2), layout="constrained")
    axes = figure.add_subplot()
    labels = [str(t) for t in range(len(law) - 1)] + ["unchanged"]
    axes.bar(range(len(law)), law, color=["#2563eb"] * (len(law) - 1) + ["#9ca3af"])
    axes.set_xticks(range(len(law)), labels, fontsize=7, rotation=90 if len(law) > 16 else 0)
    axes.set_ylim(0, 1)
    axes.set_ylabel("probability", fontsize=8)
    axes.set_xlabel("step of the first divergence from the factual string", fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.spines[["top", "right"]].set_visible(False)
    return figure
