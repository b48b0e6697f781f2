"""The explorer's worlds as one HTML table, aligned step by step with the factual string.

Each column is a step ``t``. Each counterfactual token is shaded by its exact conditional
probability q(s_t | s_<t) (white: certain; blue: improbable), with the value on hover
(``title``); a token that differs from the factual one at its step is bold magenta, the first
divergence of each row is outlined in orange, and steps past the observation are dimmed.
Long strings wrap: every ``k`` steps the table starts a new block with its own step header
and row labels, ``k`` at most :data:`STEPS_PER_LINE` and small enough that the token columns
stay within :data:`BLOCK_WIDTH` characters (:func:`steps_per_block`: long tokens, fewer steps
per block); a token longer than :data:`TOKEN_WIDTH` characters wraps inside its cell. The
table fits a 1000-pixel window; in a narrower one it scrolls sideways, its row labels kept.
Whitespace is shown visibly (``␣`` for a token made of spaces, ``↵`` for a line break, ``⇥``
for a tab), so that no chip is blank. (``␣``, not ``␠``: common fonts such as DejaVu have no
``␠``, which then shows as an empty box.) Every text is escaped. Pure functions: no Gradio here.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

from .session import Exploration, WorldRow

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BLOCK_WIDTH", "STEPS_PER_LINE", "STYLE", "TOKEN_WIDTH", "attribution_figure", "first_divergence_figure",
    "render_summary", "render_worlds", "steps_per_block", "visible",
]

#: The most steps of one block of the aligned table: longer strings wrap onto further blocks.
STEPS_PER_LINE = 8

#: The widest token cell, in characters of the table's monospace font: a longer token wraps.
TOKEN_WIDTH = 12

#: The most characters the token columns of the table take (each counts its widest token, at
#: most :data:`TOKEN_WIDTH`, plus :data:`_CELL_MARGIN` for its padding and border): at most
#: about 530 px at 13 px, which with the row labels (at most 10em) fits the 680 px the page
#: gives the table in a 1000-pixel window.
BLOCK_WIDTH = 72
_CELL_MARGIN = 2

# Every rule is under the table's id: Gradio's own `.prose td` rules (wide padding, dark
# borders) would otherwise win over class selectors.
STYLE = """
<style>
#lmscm-worlds { overflow-x: auto; max-width: 100%; }
#lmscm-worlds table { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 13px; margin: 0; }
#lmscm-worlds caption { text-align: left; font-family: ui-sans-serif, system-ui, sans-serif; font-weight: 600;
  padding: 2px 0 4px 0; }
#lmscm-worlds th, #lmscm-worlds td { padding: 2px 4px; border: 1px solid #e5e7eb; white-space: pre;
  vertical-align: top; line-height: 1.35; }
#lmscm-worlds table, #lmscm-worlds tbody, #lmscm-worlds tr { border: none; }
#lmscm-worlds td .tok { color: inherit; display: inline-block; max-width: TOKEN_WIDTHch; white-space: pre-wrap;
  overflow-wrap: anywhere; }
#lmscm-worlds th.world { text-align: left; font-family: ui-sans-serif, system-ui, sans-serif; font-weight: 600;
  position: sticky; left: 0; background: #f9fafb; z-index: 1; white-space: normal; min-width: 7.5em;
  max-width: 10em; }
#lmscm-worlds th.world .count { white-space: nowrap; font-weight: 400; }
@media (min-width: 1200px) { #lmscm-worlds th.world { white-space: nowrap; max-width: none; } }
#lmscm-worlds tr.steps th { color: #6b7280; font-weight: 400; background: #f9fafb; }
#lmscm-worlds tbody + tbody tr.steps th { border-top: 3px solid #d1d5db; }
#lmscm-worlds td.changed { color: #701a75; font-weight: 700; }
#lmscm-worlds td.first-divergence { outline: 2px solid #ea580c; outline-offset: -2px; }
#lmscm-worlds td.past { color: #374151; font-style: italic; }
#lmscm-worlds .ws { opacity: 0.6; }  /* the cell's own colour, faded: readable on any shade */
#lmscm-worlds tr.interventional th.world { color: #6b7280; }
.lmscm-legend { font-family: ui-sans-serif, system-ui, sans-serif; font-size: 12px; color: #4b5563; margin: 4px 0; }
</style>
""".replace("TOKEN_WIDTHch", f"{TOKEN_WIDTH}ch")


def steps_per_block(widths: list[int], width: int = BLOCK_WIDTH, most: int = STEPS_PER_LINE) -> int:
    """How many steps each block of the aligned table holds: the most, up to ``most``, whose
    token columns stay within ``width`` characters. The blocks are rows of one table, so
    that the row labels align: column ``j`` is as wide as the widest token at steps ``j``,
    ``j + k``, ``j + 2k``, ... (each at most :data:`TOKEN_WIDTH`, plus the cell's margin).
    At least one step.

    :param widths: the widest token of each step, in characters.

    >>> steps_per_block([3] * 20), steps_per_block([12] * 6 + [1]), steps_per_block([3, 3, 30, 3, 3, 3])
    (8, 5, 6)
    """
    cost = [min(max(w, 1), TOKEN_WIDTH) + _CELL_MARGIN for w in widths]
    for k in range(max(min(most, len(cost)), 1), 1, -1):
        if sum(max(cost[j::k]) for j in range(k)) <= width:
            return k
    return 1


#: How whitespace shows: a line break, a tab, a carriage return.
_WHITESPACE = {"\n": "↵", "\t": "⇥", "\r": "\\r"}


def visible(token: str) -> str:
    """``token`` with its whitespace made visible: line breaks as ``↵``, tabs as ``⇥``, and a
    token made only of spaces as one ``␣`` per space (a word's leading space stays a space);
    an empty piece (part of a character spread over several tokens) as ``◌``.

    >>> visible(" "), visible("\\n\\n"), visible(" she"), visible("")
    ('␣', '↵↵', ' she', '◌')
    """
    if token == "":
        return "◌"
    shown = "".join(_WHITESPACE.get(c, c) for c in token)
    if not shown.strip(" "):
        return "␣" * len(shown)
    return shown


def _cell_text(token: str) -> str:
    """The escaped, visible text of a cell; the glyphs standing for whitespace are dimmed."""
    shown = visible(token)
    out = []
    for c in shown:
        glyph = c in "␣↵⇥◌" and c not in token
        out.append(f'<span class="ws">{c}</span>' if glyph else escape(c))
    return "".join(out)


#: The shade of a token of probability 0 (Tailwind's blue-300): light enough that the table's
#: text colours (black, the magenta of ``td.changed``, the grey of ``td.past``) keep WCAG AA
#: contrast (at least 4.5:1) on every shade.
SHADE_RGB = (147, 197, 253)


def _shade(prob: float) -> str:
    """White at probability 1, :data:`SHADE_RGB` toward 0 (on a square-root scale, so that 0.5
    is already visible)."""
    alpha = min(max(1.0 - prob, 0.0), 1.0) ** 0.5
    return "background: rgba({}, {}, {}, {:.3f});".format(*SHADE_RGB, alpha)


def _row(label: str, row: WorldRow, factual: WorldRow, steps: range, css: str, label_title: str = "") -> str:
    span = len(factual.ids)
    cells = []
    for t in steps:
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
        cells.append(f'<td{cls}{style} title="{escape(title)}" data-step="{t}"><span class="tok">'
                     f'{_cell_text(row.tokens[t])}</span></td>')
    title = f' title="{escape(label_title)}"' if label_title else ""
    name, _, count = label.partition(" (")  # the count or probability: kept on one line
    shown = escape(name) + (f' <span class="count">({escape(count)}</span>' if count else "")
    return f'<tr class="{css}"><th class="world"{title}>{shown}</th>{"".join(cells)}</tr>'


def render_worlds(exploration: Exploration) -> str:
    """The aligned table of the factual string, the most probable counterfactual, the
    sampled counterfactuals (one row per distinct string, with its count) and the
    interventional baseline: one ``<tbody>`` block per :func:`steps_per_block` steps, each
    with its step header and row labels."""
    worlds = [exploration.factual, *exploration.counterfactuals]
    if exploration.mode is not None:
        worlds.append(exploration.mode)
    worlds.extend(exploration.interventional or [])
    steps = max(len(w.ids) for w in worlds)
    factual = exploration.factual
    labelled: list[tuple[str, WorldRow, str, str]] = [("factual", factual, "factual", "")]
    if exploration.mode is not None:
        p = math.exp(exploration.mode.log_prob or 0.0)
        labelled.append((f"most probable (p = {p:.3g})", exploration.mode, "mode", ""))
    n = exploration.num_samples
    for i, row in enumerate(exploration.counterfactuals):
        hint = "" if row.log_prob is None else f"exact log P(this string) = {row.log_prob:.4g}"
        labelled.append((f"counterfactual #{i + 1} (×{row.count}/{n})", row, "counterfactual", hint))
    for i, row in enumerate(exploration.interventional or []):
        labelled.append((f"interventional #{i + 1} (×{row.count}/{n})", row, "interventional", ""))
    blocks = []
    widths = [max((len(visible(w.tokens[t])) for w in worlds if t < len(w.tokens)), default=1) for t in range(steps)]
    k = steps_per_block(widths)
    for start in range(0, max(steps, 1), k):
        block = range(start, min(start + k, steps))
        header = "".join(f"<th>{t}</th>" for t in block)
        rows = "".join(_row(label, row, factual, block, css, hint) for label, row, css, hint in labelled)
        blocks.append(f'<tbody><tr class="steps"><th class="world">step</th>{header}</tr>{rows}</tbody>')
    legend = (
        '<div class="lmscm-legend">Shade: the exact conditional probability of the token under the '
        "counterfactual distribution (hover for the value; white = certain, blue = improbable). "
        '<b style="color:#701a75">Bold magenta</b>: differs from the factual token; '
        '<span style="outline:2px solid #ea580c">orange box</span>: first divergence; '
        "<i>grey</i>: past the observed string; ␣ a space, ↵ a line break, ⏎ the end of the text. "
        "Interventional rows: fresh noise (no shade).</div>"
    )
    return (
        f'{STYLE}<div class="lmscm-worlds" id="lmscm-worlds">{legend}<table><caption>'
        f'{escape(exploration.description)}</caption>{"".join(blocks)}</table></div>'
    )


def _interval(interval: tuple[float, float], digits: str) -> str:
    low, high = interval
    return f"{low:{digits}}–{high:{digits}}"


def render_summary(exploration: Exploration) -> str:
    """Markdown: P(unchanged) and the expected first divergence, each with its range over
    counterfactually stable mechanisms and over all mechanisms, the most probable
    counterfactual, and why the effect is not attributed to parts (where it is not)."""
    if exploration.exact_error is not None:
        return f"**Exact probabilities unavailable:** {exploration.exact_error}"
    if exploration.prob_unchanged is None:
        return f"*computing {exploration.pending} …*"
    n = len(exploration.factual.ids)
    changed = sum(row.count for row in exploration.counterfactuals if row.first_divergence is not None)
    unchanged = f"**P(unchanged) = {exploration.prob_unchanged:.4g}**"
    divergence = f"**E[first divergence] = {exploration.expected_first_divergence:.3g}** tokens"
    bounds = exploration.bounds
    if bounds is not None:
        p, e = bounds.prob_unchanged, bounds.expected_first_divergence
        unchanged += (f" (Gumbel-max; stable mechanisms {_interval(p['stable'], '.2g')}; "
                      f"any mechanism {_interval(p['any'], '.2g')})")
        divergence += (f" (stable mechanisms {_interval(e['stable'], '.3g')}; "
                       f"any mechanism {_interval(e['any'], '.3g')})")
    lines = [
        f"{unchanged} · {changed}/{exploration.num_samples} sampled counterfactuals changed over the observed "
        f"{n} tokens",
        f"{divergence}; the unchanged string counts as {n}",
    ]
    if exploration.mode is not None:
        p_mode = math.exp(exploration.mode.log_prob or 0.0)
        text = visible(exploration.mode.text).replace("`", "'")
        lines.append(f"**Most probable counterfactual** (p = {p_mode:.3g}): `{text}`")
    if exploration.attribution_note:
        lines.append(f"**Parts:** {exploration.attribution_note}")
    if exploration.pending:
        lines.append(f"*computing {exploration.pending} …*")
    return "\n\n".join(lines)


def first_divergence_figure(exploration: Exploration) -> Figure | None:
    """A small plot of the exact law of the first divergence as bars (the last bar:
    unchanged) and, over them, its CDF P(first divergence ≤ t) under Gumbel-max with the band
    it may take over counterfactually stable mechanisms and over all mechanisms; a
    matplotlib ``Figure`` (no pyplot state), ``None`` before the law is known."""
    from matplotlib.figure import Figure

    law = exploration.first_divergence
    if law is None:
        return None
    n = len(law) - 1
    figure = Figure(figsize=(9, 2.6), layout="constrained")
    axes = figure.add_subplot()
    labels = [str(t) for t in range(n)] + ["unchanged"]
    axes.bar(range(len(law)), law, color=["#2563eb"] * n + ["#9ca3af"], label="P(first divergence = t)")
    bounds = exploration.bounds
    if bounds is not None and n:
        cdf = bounds.first_divergence_cdf
        steps = list(range(n))
        for name, color, alpha, text in (("any", "#f59e0b", 0.18, "any mechanism"),
                                         ("stable", "#ea580c", 0.35, "stable mechanisms")):
            low, high = (v[:n].tolist() for v in cdf[name])
            axes.fill_between(steps, low, high, step="mid", color=color, alpha=alpha, linewidth=0,
                              label=f"P(first divergence ≤ t): {text}")
        axes.step(steps, cdf["gumbel"][:n].tolist(), where="mid", color="#9a3412", linewidth=1.2,
                  label="P(first divergence ≤ t): Gumbel-max")
        figure.legend(fontsize=6, loc="outside right upper", frameon=False)
    axes.set_xticks(range(len(law)), labels, fontsize=7, rotation=90 if len(law) > 16 else 0)
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("probability", fontsize=8)
    axes.set_xlabel("step of the first divergence from the factual string", fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.spines[["top", "right"]].set_visible(False)
    return figure


def attribution_figure(exploration: Exploration) -> Figure | None:
    """Bars of the attribution to the mechanism's parts (:func:`~pyro_lmscm.inference.attribute`):
    left, the Shapley value of each part for log P(unchanged) (they add up to the whole
    intervention's log P(unchanged); error bars: standard errors of a permutation estimate);
    right, P(unchanged) with the part alone and with every part but it. ``None`` without an
    attribution."""
    from matplotlib.figure import Figure

    result = exploration.attribution
    if result is None:
        return None
    parts = result.parts
    y = list(range(len(parts)))
    height = max(1.8, 0.28 * len(parts) + 0.9)
    figure = Figure(figsize=(7.5, height), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    shapley = [result.shapley[part] for part in parts]
    finite = [v if math.isfinite(v) else 0.0 for v in shapley]
    errors = None if result.exact else [result.shapley_se[part] for part in parts]
    left.barh(y, finite, xerr=errors, color=["#a21caf" if v < 0 else "#2563eb" for v in finite])
    for i, v in enumerate(shapley):
        if not math.isfinite(v):
            left.annotate(f"{v}", (0, i), fontsize=7, va="center")
    how = "exact" if result.exact else f"{result.num_permutations} random orders ± s.e."
    left.set_title(f"Shapley value of log P(unchanged) ({how})\nsum = {sum(shapley):.3g}", fontsize=8)
    left.axvline(0, color="#6b7280", linewidth=0.8)
    left.set_yticks(y, parts, fontsize=7)
    left.invert_yaxis()
    width = 0.4
    right.barh([i - width / 2 for i in y], [result.prob_unchanged_alone[p] for p in parts], height=width,
               color="#2563eb", label="this part alone")
    right.barh([i + width / 2 for i in y], [result.prob_unchanged_without[p] for p in parts], height=width,
               color="#9ca3af", label="all parts but this one")
    right.axvline(result.prob_unchanged, color="#ea580c", linewidth=1, linestyle="--", label="all parts")
    right.set_xlim(0, 1)
    right.set_title("P(unchanged)", fontsize=8)
    right.legend(fontsize=6, loc="lower right", frameon=False)
    for axes in (left, right):
        axes.tick_params(axis="x", labelsize=7)
        axes.spines[["top", "right"]].set_visible(False)
    return figure
