"""Which layers carry the side effects of the paper study's interventions (issue 37)?

For each row of the paper study (:data:`~pyro_lmscm.study.paper.PAPER_ROWS`: MEMIT over its
edited layers, ROME, CAA steering, MiMiC, the LoRA fine-tune) and each chosen string of the
paper corpus, :func:`~pyro_lmscm.inference.attribute` with ``by="layer"``: exact P(unchanged)
and E[first divergence] with each part alone and without it, and Shapley values of
log P(unchanged) and of E[first divergence] over the parts (exact over all subsets up to
``--max-exact-parts`` parts, else a seeded permutation estimate).

The factual strings are those of a paper study (``--study``, the records written by
``pyro-lmscm study --paper`` or ``benchmarks/paper_bounds.py run``): the same prompts and
observed continuations, the same mechanisms (built from the same specs), the same decoding
(25 tokens, top-k 50, fp32). ``--limit N`` takes the first N strings of the corpus; ``--top N``
the N strings with the lowest P(unchanged) under that row among those (where the side effects
are). ``--groups G`` splits a mechanism of many parts into G contiguous groups of its parts
(e.g. the LoRA fine-tune's 30 layers into 5 groups of 6), each group one part.

Cost: per string one teacher-forced pass of the factual model, then one of the intervened model
per evaluated subset: ``2^k - 1`` for ``k`` parts (exact; the empty subset is the factual
model). :func:`~pyro_lmscm.inference.attributions` batches them across the strings
(``--batch-size`` strings per pass, each subset's sub-mechanism built once per ``--group``);
the script prints the time per string and per string and pass.

    python benchmarks/paper_attribution.py --study /work/scratch/paper-study --rows memit-louvre --limit 32 --top 8
    python benchmarks/paper_attribution.py --summarize /work/scratch/paper-attribution.jsonl --csv docs/results/a.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch

from pyro_lmscm.models.mechanism import Mechanism


class Grouped(Mechanism):
    """A mechanism whose parts are groups of another's parts (``{group: [inner parts]}``)."""

    def __init__(self, inner: Mechanism, groups: dict[str, list[str]]) -> None:
        self.inner = inner
        self.groups = groups

    def check(self, lm: Any) -> None:
        self.inner.check(lm)

    def activate(self, lm: Any) -> ContextManager[Any]:
        return self.inner.activate(lm)

    def parts(self) -> list[str]:
        return list(self.groups)

    def _restricted(self, parts: list[str]) -> Mechanism:
        return self.inner.restricted([inner for group in parts for inner in self.groups[group]])

    def __repr__(self) -> str:
        return f"Grouped({self.inner!r}, {len(self.groups)} groups)"


def grouped(mechanism: Mechanism, count: int) -> Mechanism:
    parts = mechanism.parts()
    if count <= 0 or count >= len(parts):
        return mechanism
    chunks = np.array_split(np.arange(len(parts)), count)
    groups = {}
    for chunk in chunks:
        names = [parts[i] for i in chunk]
        label = names[0] if len(names) == 1 else f"{names[0]}–{names[-1].split()[-1]}"
        groups[label] = names
    return Grouped(mechanism, groups)


def run(args: argparse.Namespace) -> None:
    from pyro_lmscm import LanguageModelSCM
    from pyro_lmscm.inference import attributions
    from pyro_lmscm.interventions.spec import parse_intervention
    from pyro_lmscm.loading import load_lm
    from pyro_lmscm.models import Decoding
    from pyro_lmscm.study.paper import PAPER_ROWS
    from pyro_lmscm.study.runner import load_study

    torch.set_num_threads(args.threads)
    lm = load_lm("smollm2-135m-instruct", progress=False)
    out = Path(args.out)
    done = set()
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.add((data["row"], data["index"]))
    rows = [r for r in PAPER_ROWS if not args.rows or r.key in args.rows.split(",")]
    for row in rows:
        start = time.perf_counter()
        spec = parse_intervention(row.intervention, lm)
        key = next(iter(spec.mechanisms))
        mechanism = grouped(spec.mechanisms[key], args.groups) if args.groups else spec.mechanisms[key]
        build = time.perf_counter() - start
        while True:  # the study may still be running: wait for the strings asked for
            folder = Path(args.study) / row.key
            if (folder / "study.json").is_file():
                config, records = load_study(folder)
                if not args.wait or len(records) >= (args.limit or 200):
                    break
            elif not args.wait:
                raise SystemExit(f"{folder} holds no study")
            time.sleep(30)
        records = sorted((r for r in records if r.get("error") is None), key=lambda r: r["index"])
        if args.limit is not None:
            records = [r for r in records if r["index"] < args.limit]
        if args.top is not None:
            records = sorted(records, key=lambda r: r["exact"]["prob_unchanged"])[: args.top]
        decoding = Decoding(config.temperature, config.top_k, config.top_p)
        scm = LanguageModelSCM(lm, config.max_new_tokens, decoding, mechanisms={key: mechanism})
        print(f"{row.key}: {mechanism!r}, {len(mechanism.parts())} parts {mechanism.parts()}; built in {build:.0f} s; "
              f"{len(records)} strings", flush=True)
        todo = [r for r in records if (row.key, r["index"]) not in done]
        for group in range(0, len(todo), args.group):
            chunk = todo[group : group + args.group]
            prompts = [lm.encode(r["prompt"]) for r in chunk]
            observed = [torch.tensor(r["factual"]["ids"]) for r in chunk]
            t0 = time.perf_counter()
            results = attributions(scm, prompts, observed, {"mechanism": key}, by=args.by,
                                   max_exact_parts=args.max_exact_parts, num_permutations=args.permutations,
                                   seed=0, batch_size=args.batch_size)
            seconds = (time.perf_counter() - t0) / len(chunk)
            with open(out, "a", encoding="utf-8") as f:
                for record, ids, result in zip(chunk, observed, results):
                    line = {
                        "row": row.key, "index": record["index"], "n": len(ids), "seconds": seconds,
                        "strings_per_batch": min(args.batch_size, len(chunk)),
                        "study_prob_unchanged": record["exact"]["prob_unchanged"], **result.to_dict(),
                    }
                    f.write(json.dumps(line) + "\n")
            passes = results[0].num_passes
            print(f"  {row.key}: strings {group + 1}-{group + len(chunk)} of {len(todo)}: {passes} passes each, "
                  f"{seconds:.2f} s per string ({seconds / max(passes, 1):.3f} s per string and pass), "
                  f"P(unchanged) of the first {results[0].to_dict().get('prob_unchanged')}", flush=True)


def _ci(values: np.ndarray, rng: np.random.Generator, bootstrap: int) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return float(values[0]), float("nan"), float("nan")
    boot = values[rng.integers(0, values.size, size=(bootstrap, values.size))].mean(1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


def summarize_steps(lines: list[dict[str, Any]]) -> None:
    """``by="step"``: per string, P(unchanged) and E[first divergence] acting from step s on."""
    print("| intervention | string | n | P(unchanged) from s = 0 (whole) | s = 1 (not on the prompt) | s = 2 | s = 5 "
          "| s = 10 | E[first divergence] from s = 0 | s = 1 | first step that matters |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        p, e = line["prob_unchanged_from"], line["first_divergence_from"]

        def at(table: dict[str, Any], s: int, fmt: str = ".3g") -> str:
            value = table.get(str(s), table.get(s))
            return "–" if value is None else format(value, fmt)

        print(f"| {line['row']} | {line['index']} | {line['n']} | {at(p, 0)} | {at(p, 1)} | {at(p, 2)} | {at(p, 5)} "
              f"| {at(p, 10)} | {at(e, 0, '.2f')} | {at(e, 1, '.2f')} | {line['first_step_that_matters']} |")
    print()


def summarize(args: argparse.Namespace) -> None:
    lines = [json.loads(x) for x in Path(args.summarize).read_text(encoding="utf-8").splitlines() if x.strip()]
    steps = [line for line in lines if line.get("by") == "step"]
    if steps:
        summarize_steps(steps)
    by_row: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        if line.get("by") != "step":
            by_row.setdefault(line["row"], []).append(line)
    if not by_row:
        return
    rng = np.random.default_rng(0)
    table = []
    md = ["| intervention | part | strings (with finite log P) | Shapley of log P(unchanged) "
          "| share of log P(unchanged) | P(unchanged) alone | P(unchanged) without "
          "| Shapley of E[first divergence] | time per pass (s) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for row, items in by_row.items():
        parts = items[0]["parts"]
        per_pass = np.mean([i["seconds"] / i["num_passes"] for i in items])
        # log P(unchanged) is -inf when a subset makes the string impossible (P = 0, e.g. an observed
        # token outside the intervened top-k): those strings have no finite Shapley values of log P
        finite = [i for i in items if all(i["shapley"][p] is not None and np.isfinite(i["shapley"][p]) for p in parts)]
        total = np.array([np.log(i["prob_unchanged"]) for i in finite])
        for part in parts:
            shap = np.array([i["shapley"][part] for i in finite]) if finite else np.array([np.nan])
            shap_efd = np.array([i["shapley_first_divergence"][part] for i in items])
            alone = np.array([i["prob_unchanged_alone"][part] for i in items])
            without = np.array([i["prob_unchanged_without"][part] for i in items])
            share = shap.sum() / total.sum() if finite and total.sum() != 0 else float("nan")
            entry = {"row": row, "part": part, "strings": len(items), "finite_log_p": len(finite),
                     "shapley": _ci(shap, rng, args.bootstrap),
                     "share": float(share), "alone": _ci(alone, rng, args.bootstrap),
                     "without": _ci(without, rng, args.bootstrap),
                     "shapley_first_divergence": _ci(shap_efd, rng, args.bootstrap), "seconds_per_pass": per_pass,
                     "exact": all(i["exact"] for i in items)}
            table.append(entry)

            def cell(v: tuple[float, float, float], digits: int = 3, kind: str = "f") -> str:
                return f"{v[0]:.{digits}{kind}} [{v[1]:.{digits}{kind}}, {v[2]:.{digits}{kind}}]"

            md.append(f"| {row} | {part} | {len(items)} ({len(finite)}) | {cell(entry['shapley'])} | {share:.0%} | "
                      f"{cell(entry['alone'], 3, 'g')} | {cell(entry['without'], 3, 'g')} | "
                      f"{cell(entry['shapley_first_divergence'], 2)} | {per_pass:.2f} |")
        whole = _ci(np.array([i["prob_unchanged"] for i in items]), rng, args.bootstrap)
        mean_log = f"{total.mean():.3f}" if finite else "–"
        md.append(f"| {row} | whole (sum) | {len(items)} ({len(finite)}) | {mean_log} | 100% | {whole[0]:.3g} | | | |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(table, indent=1), encoding="utf-8")
        path.with_suffix(".md").write_text(text, encoding="utf-8")
        with open(path, "w", encoding="utf-8") as f:
            f.write("row,part,strings,shapley,shapley_low,shapley_high,share,alone,without,shapley_efd,seconds_per_pass\n")
            for e in table:
                f.write(f"{e['row']},{e['part']},{e['strings']},{e['shapley'][0]:.6g},{e['shapley'][1]:.6g},"
                        f"{e['shapley'][2]:.6g},{e['share']:.4f},{e['alone'][0]:.6g},{e['without'][0]:.6g},"
                        f"{e['shapley_first_divergence'][0]:.6g},{e['seconds_per_pass']:.3f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", help="the paper study's folder (its records give the strings)")
    parser.add_argument("--rows", help="comma-separated row keys (default all)")
    parser.add_argument("--limit", type=int, help="only the first N strings of the corpus")
    parser.add_argument("--top", type=int, help="of those, the N with the lowest P(unchanged) under the row")
    parser.add_argument("--by", default="layer", choices=("layer", "step"),
                        help="layer: the parts; step: acting from step s on (steering, MiMiC)")
    parser.add_argument("--groups", type=int, help="split the parts into this many contiguous groups")
    parser.add_argument("--max-exact-parts", type=int, default=12)
    parser.add_argument("--permutations", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="strings per teacher-forced pass")
    parser.add_argument("--group", type=int, default=50, help="strings per call of attributions() (one JSONL write)")
    parser.add_argument("--wait", action="store_true", help="wait until the study has the strings asked for")
    parser.add_argument("--out", default="/work/scratch/paper-attribution.jsonl", help="one JSON line per string")
    parser.add_argument("--summarize", help="summarize this JSONL instead of running")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--csv", help="with --summarize: write the table here (and .json, .md beside it)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args)
    else:
        if not args.study:
            parser.error("--study is required to run")
        run(args)


if __name__ == "__main__":
    main()
