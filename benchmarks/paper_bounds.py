"""The paper study (``pyro-lmscm study --paper``) with exact bounds over mechanisms per string
(issue 36): the Gumbel-max value and the intervals over counterfactually stable mechanisms and
over all mechanisms of P(unchanged) and E[first divergence], for every string of every row.

``run`` runs :func:`~pyro_lmscm.study.paper.run_paper_study` itself (the same corpus, rows,
seeds and records as the CLI with the same options). While the study computes its exact
metrics, it also computes the bounds of each string from the same teacher-forced pass:
``pyro_lmscm.inference.exact.observed_log_probs`` (the batched pass of the intervened model on
the observed strings, from which the study takes P(unchanged) and E[first divergence]) is
wrapped so that each string's decoded intervened logits also go to
:func:`~pyro_lmscm.inference.bounds.observed_keep_bounds`, as
:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds` does with its own pass. The first
string of every batch is also checked against ``ExactCounterfactual.bounds()`` itself (one
extra pass). The bounds go to ``<bounds>/<row folder>.jsonl``, one line per string, keyed by
its prompt and observed ids; the records of the study are unchanged. Rows may run in
separate processes (``--rows``) into one output folder; a killed run resumes.

``summarize`` matches the bounds to the records of each row, checks that the Gumbel-max values
equal the records' exact P(unchanged) and E[first divergence], and writes the means over
strings with 95% cluster-bootstrap intervals (a CSV and a markdown table).

    python benchmarks/paper_bounds.py run --output /work/scratch/paper-study --rows memit-louvre --batch-size 32
    python benchmarks/paper_bounds.py summarize --output /work/scratch/paper-study --csv docs/results/paper_bounds.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLASSES = ("gumbel", "stable", "any")


def _plain(table: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(map(float, v)) if isinstance(v, tuple) else float(v)) for k, v in table.items()}


def _bounds_record(exact: Any, bounds: Any) -> dict[str, Any]:
    keep = bounds.keep
    return {
        "prompt_ids": exact.prompt_ids.tolist(),
        "observed_ids": exact.observed_ids.tolist(),
        "prob_unchanged": _plain(bounds.prob_unchanged),
        "expected_first_divergence": _plain(bounds.expected_first_divergence),
        "keep": {
            "gumbel": keep["gumbel"].tolist(),
            "stable": [keep["stable"][0].tolist(), keep["stable"][1].tolist()],
            "any": [keep["any"][0].tolist(), keep["any"][1].tolist()],
        },
    }


def _close(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-9) -> float:
    """The largest absolute difference between two bound tables."""
    worst = 0.0
    for name in CLASSES:
        x, y = np.atleast_1d(a[name]), np.atleast_1d(b[name])
        worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


def run(args: argparse.Namespace) -> None:
    import pyro_lmscm.inference.exact as exact_module
    import pyro_lmscm.study.runner as runner_module
    from pyro_lmscm.inference.bounds import observed_keep_bounds
    from pyro_lmscm.study.paper import PAPER_ROWS, run_paper_study

    torch.set_num_threads(args.threads)
    bounds_dir = Path(args.bounds or f"{args.output}-bounds")
    bounds_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"sink": None, "checked": 0, "worst": 0.0}
    original_observed = exact_module.observed_log_probs
    original_run_study = runner_module.run_study

    def observed_log_probs(exacts, batch_size=16):  # the study's pass, plus the bounds from it
        out = []
        for i, (exact, logits) in enumerate(exact_module._observed_logits(exacts, batch_size)):
            stay = exact._observed_log_q(logits=logits)
            out.append((stay, exact._observed_scores(exact._factual[None], {}),
                        exact._observed_scores(logits, exact._forced)))
            bounds = observed_keep_bounds(
                exact.scm.noise, stay, exact._factual, logits[0].cpu(), exact.observed_ids.cpu(), exact._noisy_steps()
            )
            line = _bounds_record(exact, bounds)
            if i == 0:  # the library's own bounds(), with its own pass
                own = exact.bounds()
                worst = max(_close(line["prob_unchanged"], _plain(own.prob_unchanged)),
                            _close(line["expected_first_divergence"], _plain(own.expected_first_divergence)))
                state["worst"] = max(state["worst"], worst)
                state["checked"] += 1
                line["checked_against_bounds"] = worst
            if state["sink"] is not None:
                state["sink"].write(json.dumps(line) + "\n")
                state["sink"].flush()
        return out

    def run_study(config, *a, **k):
        with open(bounds_dir / f"{Path(config.output).name}.jsonl", "a", encoding="utf-8") as sink:
            state["sink"] = sink
            try:
                return original_run_study(config, *a, **k)
            finally:
                state["sink"] = None

    exact_module.observed_log_probs = observed_log_probs
    runner_module.run_study = run_study
    try:
        rows = PAPER_ROWS if not args.rows else tuple(r for r in PAPER_ROWS if r.key in args.rows.split(","))
        start = time.perf_counter()
        result = run_paper_study(
            args.output, rows=rows, num_samples=args.samples, batch_size=args.batch_size, draw_scores=False,
            limit=args.limit, threads=args.threads, progress=False,
            on_row=lambda row: print(f"{row.row.key}: {row.strings} strings, {row.seconds:.0f} s", flush=True),
        )
    finally:
        exact_module.observed_log_probs = original_observed
        runner_module.run_study = original_run_study
    print(result.markdown)
    print(f"{time.perf_counter() - start:.0f} s; bounds checked against ExactCounterfactual.bounds() on "
          f"{state['checked']} strings, largest difference {state['worst']:.2e}")


# -- summary ------------------------------------------------------------------------------


def _load_bounds(path: Path) -> dict[tuple[tuple[int, ...], tuple[int, ...]], dict[str, Any]]:
    out = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            out[(tuple(data["prompt_ids"]), tuple(data["observed_ids"]))] = data  # the last of equal keys
    return out


def _trimmed(ids: list[int], eos: set[int]) -> tuple[int, ...]:
    for i, token in enumerate(ids):
        if token in eos:
            return tuple(ids[: i + 1])
    return tuple(ids)


def _mean_ci(values: np.ndarray, resample: np.ndarray) -> tuple[float, float, float]:
    boot = values[resample].mean(1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


def summarize(args: argparse.Namespace) -> None:
    from pyro_lmscm.loading import load_lm
    from pyro_lmscm.study.paper import PAPER_ROWS
    from pyro_lmscm.study.runner import load_study

    lm = load_lm("smollm2-135m-instruct", progress=False)
    eos = set(lm.eos_token_ids)
    output = Path(args.output)
    bounds_dir = Path(args.bounds or f"{args.output}-bounds")
    rows_out, per_string = [], []
    for row in PAPER_ROWS:
        folder = output / row.key
        if not (folder / "study.json").is_file():
            print(f"{row.key}: no study yet")
            continue
        _, records = load_study(folder)
        records = [r for r in records if r.get("error") is None]
        table = _load_bounds(bounds_dir / f"{row.key}.jsonl")
        matched, worst = [], 0.0
        for record in sorted(records, key=lambda r: r["index"]):
            prompt = tuple(lm.encode(record["prompt"]).tolist())
            found = [v for (p, o), v in table.items() if p == prompt and _trimmed(list(o), eos) == tuple(
                record["factual"]["ids"])]
            if not found:
                continue
            b = found[0]
            worst = max(worst, abs(b["prob_unchanged"]["gumbel"] - record["exact"]["prob_unchanged"]),
                        abs(b["expected_first_divergence"]["gumbel"] - record["exact"]["expected_first_divergence"]))
            matched.append((record, b))
        if not matched:
            print(f"{row.key}: no bounds matched")
            continue
        n = len(matched)
        rng = np.random.default_rng(0)
        resample = rng.integers(0, n, size=(args.bootstrap, n))
        entry: dict[str, Any] = {"row": row.key, "label": row.label, "strings": n, "of": len(records),
                                 "largest_difference_to_records": worst}
        for query in ("prob_unchanged", "expected_first_divergence"):
            columns = {
                "gumbel": np.array([b[query]["gumbel"] for _, b in matched]),
                "stable_low": np.array([b[query]["stable"][0] for _, b in matched]),
                "stable_high": np.array([b[query]["stable"][1] for _, b in matched]),
                "any_low": np.array([b[query]["any"][0] for _, b in matched]),
                "any_high": np.array([b[query]["any"][1] for _, b in matched]),
            }
            for name, values in columns.items():
                entry[f"{query}_{name}"] = _mean_ci(values, resample)
        pu_stable_high = np.array([b["prob_unchanged"]["stable"][1] for _, b in matched])
        pu_stable_low = np.array([b["prob_unchanged"]["stable"][0] for _, b in matched])
        pu_gumbel = np.array([b["prob_unchanged"]["gumbel"] for _, b in matched])
        lengths = np.array([len(b["observed_ids"]) for _, b in matched])
        # strings that change with probability > 1/2 (> 0.99) under every stable mechanism
        entry["share_changed_surely_stable"] = float(np.mean(pu_stable_high < 0.5))
        entry["share_changed_stable_high_lt_0.01"] = float(np.mean(pu_stable_high < 0.01))
        # strings Gumbel-max keeps (> 0.99) that some stable mechanism changes with probability > 1/2
        entry["share_gumbel_kept_stable_changed"] = float(np.mean((pu_gumbel > 0.99) & (pu_stable_low < 0.5)))
        entry["mean_length"] = float(lengths.mean())
        rows_out.append(entry)
        for record, b in matched:
            per_string.append({"row": row.key, "index": record["index"], "n": len(b["observed_ids"]),
                               **{f"pu_{k}": b["prob_unchanged"][k] for k in CLASSES},
                               **{f"efd_{k}": b["expected_first_divergence"][k] for k in CLASSES}})
    text = markdown(rows_out)
    print(text)
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("row,label,strings,query,class,mean,low,high\n")
            for e in rows_out:
                for query in ("prob_unchanged", "expected_first_divergence"):
                    for name in ("gumbel", "stable_low", "stable_high", "any_low", "any_high"):
                        mean, low, high = e[f"{query}_{name}"]
                        f.write(f"{e['row']},\"{e['label']}\",{e['strings']},{query},{name},{mean:.6g},{low:.6g},"
                                f"{high:.6g}\n")
        path.with_suffix(".json").write_text(json.dumps(rows_out, indent=1), encoding="utf-8")
        path.with_suffix(".md").write_text(text, encoding="utf-8")
    if args.per_string:
        Path(args.per_string).write_text("\n".join(json.dumps(r) for r in per_string) + "\n", encoding="utf-8")


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
        "| E[D] stable low | stable high | any low | any high | P(changed) > 1/2 under every stable mechanism |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        cells = []
        for query in ("prob_unchanged", "expected_first_divergence"):
            for name in ("stable_low", "stable_high", "any_low", "any_high"):
                m, lo, hi = e[f"{query}_{name}"]
                cells.append(f"{_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]")
        cells.append(f"{e['share_changed_surely_stable']:.1%}")
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the paper study, recording bounds per string")
    r.add_argument("--output", required=True, help="the paper study's folder")
    r.add_argument("--bounds", help="the folder of the bounds (default OUTPUT-bounds)")
    r.add_argument("--rows", help="comma-separated row keys (default all)")
    r.add_argument("--samples", type=int, default=1)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--limit", type=int)
    r.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("summarize", help="means over strings with bootstrap intervals")
    s.add_argument("--output", required=True)
    s.add_argument("--bounds")
    s.add_argument("--bootstrap", type=int, default=2000)
    s.add_argument("--csv", help="write the table here (and .json, .md beside it)")
    s.add_argument("--per-string", help="write one JSON line per string and row here")
    args = parser.parse_args()
    (run if args.command == "run" else summarize)(args)


if __name__ == "__main__":
    main()
