"""The paper study (``pyro-lmscm study --paper``) with its exact bounds over mechanisms
(issue 36): per row, the Gumbel-max value and the intervals over counterfactually stable
mechanisms and over all mechanisms of P(unchanged) and E[first divergence], over all strings.

Every study record carries them (``record["exact"]["bounds"]``,
:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds` from the same teacher-forced pass as
P(unchanged)), and ``paper.md`` has their means. ``run`` runs (or resumes)
:func:`~pyro_lmscm.study.paper.run_paper_study` with the given rows, so that the rows can run in
separate processes into one folder; a last ``run`` with every row resumes them all and writes
the report. ``summarize`` reads the records and writes the means over strings with 95%
cluster-bootstrap intervals, and what the study's summary does not give: the share of strings
that change with probability above 1/2 (above 0.99) under every stable mechanism, and the
share that Gumbel-max keeps (P(unchanged) > 0.99) but some stable mechanism changes with
probability above 1/2.

    python benchmarks/paper_bounds.py run --output /work/scratch/paper-study --rows memit-louvre --batch-size 32
    python benchmarks/paper_bounds.py run --output /work/scratch/paper-study --batch-size 32   # all rows: the report
    python benchmarks/paper_bounds.py summarize --output /work/scratch/paper-study --csv docs/results/paper_bounds.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ENDS = ("gumbel", "stable_low", "stable_high", "any_low", "any_high")
QUERIES = ("prob_unchanged", "expected_first_divergence")


def run(args: argparse.Namespace) -> None:
    import torch

    from pyro_lmscm.study.paper import PAPER_ROWS, run_paper_study

    torch.set_num_threads(args.threads)
    rows = PAPER_ROWS if not args.rows else tuple(r for r in PAPER_ROWS if r.key in args.rows.split(","))
    start = time.perf_counter()
    result = run_paper_study(
        args.output, rows=rows, num_samples=args.samples, batch_size=args.batch_size, draw_scores=False,
        limit=args.limit, threads=args.threads, progress=False,
        on_row=lambda row: print(f"{row.row.key}: {row.strings} strings, {row.seconds:.0f} s", flush=True),
    )
    print(result.markdown)
    print(f"{time.perf_counter() - start:.0f} s")


# -- summary ------------------------------------------------------------------------------


def _mean_ci(values: np.ndarray, resample: np.ndarray) -> tuple[float, float, float]:
    boot = values[resample].mean(1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


def summarize(args: argparse.Namespace) -> None:
    from pyro_lmscm.study.paper import PAPER_ROWS
    from pyro_lmscm.study.runner import load_study

    output = Path(args.output)
    rows_out = []
    for row in PAPER_ROWS:
        folder = output / row.key
        if not (folder / "study.json").is_file():
            print(f"{row.key}: no study yet")
            continue
        _, records = load_study(folder)
        records = [r for r in records if r.get("error") is None and "bounds" in (r.get("exact") or {})]
        if not records:
            continue
        n = len(records)
        resample = np.random.default_rng(0).integers(0, n, size=(args.bootstrap, n))
        column = {key: np.array([r["exact"]["bounds"][f"{query}_{end}"] for r in records])
                  for query in QUERIES for end in ENDS for key in [f"{query}_{end}"]}
        entry: dict[str, Any] = {"row": row.key, "label": row.label, "strings": n}
        for key, values in column.items():
            entry[key] = _mean_ci(values, resample)
        high, low, gumbel = (column[f"prob_unchanged_{e}"] for e in ("stable_high", "stable_low", "gumbel"))
        entry["share_changed_above_half_every_stable"] = float(np.mean(high < 0.5))
        entry["share_changed_above_0.99_every_stable"] = float(np.mean(high < 0.01))
        entry["share_gumbel_kept_some_stable_changed"] = float(np.mean((gumbel > 0.99) & (low < 0.5)))
        entry["share_certainly_kept_every_stable"] = float(np.mean(low > 0.99))
        entry["median_width_stable_prob_unchanged"] = float(np.median(high - low))
        entry["check_gumbel_equals_exact"] = float(max(
            abs(r["exact"]["bounds"]["prob_unchanged_gumbel"] - r["exact"]["prob_unchanged"]) for r in records))
        rows_out.append(entry)
    text = markdown(rows_out)
    print(text)
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("row,label,strings,query,end,mean,low,high\n")
            for e in rows_out:
                for query in QUERIES:
                    for end in ENDS:
                        mean, low, high = e[f"{query}_{end}"]
                        f.write(f"{e['row']},\"{e['label']}\",{e['strings']},{query},{end},{mean:.6g},{low:.6g},"
                                f"{high:.6g}\n")
        path.with_suffix(".json").write_text(json.dumps(rows_out, indent=1), encoding="utf-8")
        path.with_suffix(".md").write_text(text, encoding="utf-8")


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) < 0.01:
        return f"{x:.1e}"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| intervention | strings | P(unchanged), Gumbel-max | stable mechanisms | any mechanism "
        "| E[first divergence], Gumbel-max | stable mechanisms | any mechanism |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        cells = []
        for query in ("prob_unchanged", "expected_first_divergence"):
            g = e[f"{query}_gumbel"]
            cells.append(f"{_fmt(g[0])} [{_fmt(g[1])}, {_fmt(g[2])}]")
            for cls in ("stable", "any"):
                lo, hi = e[f"{query}_{cls}_low"], e[f"{query}_{cls}_high"]
                cells.append(f"{_fmt(lo[0])}–{_fmt(hi[0])}")
        lines.append(f"| {e['label']} | {e['strings']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bootstrap intervals of the interval ends (95%, strings resampled):",
        "",
        "| intervention | P(unchanged) stable low | stable high | any low | any high "
        "| E[D] stable low | stable high | any low | any high |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        cells = []
        for query in ("prob_unchanged", "expected_first_divergence"):
            for name in ("stable_low", "stable_high", "any_low", "any_high"):
                m, lo, hi = e[f"{query}_{name}"]
                cells.append(f"{_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]")
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per string: shares of the strings",
        "",
        "| intervention | changed w.p. > 1/2 under every stable mechanism | changed w.p. > 0.99 under every "
        "stable mechanism | kept w.p. > 0.99 under every stable mechanism | Gumbel-max keeps (> 0.99), some stable "
        "mechanism changes (> 1/2) | median width of the stable interval of P(unchanged) |",
        "|---|---|---|---|---|---|",
    ]
    for e in rows:
        lines.append(
            f"| {e['label']} | {e['share_changed_above_half_every_stable']:.1%} | "
            f"{e['share_changed_above_0.99_every_stable']:.1%} | {e['share_certainly_kept_every_stable']:.1%} | "
            f"{e['share_gumbel_kept_some_stable_changed']:.1%} | {e['median_width_stable_prob_unchanged']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the paper study (its records carry the bounds)")
    r.add_argument("--output", required=True, help="the paper study's folder")
    r.add_argument("--rows", help="comma-separated row keys (default all)")
    r.add_argument("--samples", type=int, default=1)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--limit", type=int)
    r.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("summarize", help="means over strings with bootstrap intervals")
    s.add_argument("--output", required=True)
    s.add_argument("--bootstrap", type=int, default=2000)
    s.add_argument("--csv", help="write the table here (and .json, .md beside it)")
    args = parser.parse_args()
    (run if args.command == "run" else summarize)(args)


if __name__ == "__main__":
    main()
