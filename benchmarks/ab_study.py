"""The study benchmarks of two checkouts, side by side: is a change within a few percent of before?

Question (issue 34): are the MC and the exact-only study as fast after a change as before it?
``bench_study.py`` times one checkout; this script times two, each in its own code. It runs
two cases of ``bench_study.py`` in each checkout, with that checkout's ``pyro_lmscm`` and its
own ``bench_study`` helpers (corpus, settings):

- **MC, batch 16**: the demo study's settings (SmolLM2 bfloat16, steering toward "female",
  4 counterfactual + 4 baseline draws, 32 tokens, full softmax, exact metrics and scores),
  16 strings in one batch;
- **exact-only, batch 64**: the paper's settings (25 tokens, top-k 50), the first 64 strings
  of the paper corpus in one batch.

Each repetition is one fresh process per checkout, alternating (A, B, A, B, ...), so that the
machine's drift falls on both sides alike; each process warms up on 4 other strings first.
It prints the seconds per string of each run, the medians, the ratio of the medians and the
per-repetition ratios, and whether the two checkouts wrote the same records (a digest of each
record's factual string, counterfactual draws, interventional draws and exact metrics: the
same work), and if not, which of those fields differ; exact metrics that one checkout
computes and the other does not are named apart (work one side does and the other does not).

Usage::

    git worktree add --detach /tmp/before 4d46c2e       # the code before the change
    taskset -c 0 python benchmarks/ab_study.py /tmp/before .  --reps 3   # SmolLM2, ~5 min per process
    python benchmarks/ab_study.py . . --quick            # tiny models, seconds (CI runs it)

Pin the whole run to one core (``taskset``; the child processes inherit it) and keep
``--threads 1`` on a shared machine. It prints measured numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = ("MC, batch 16", "exact-only, batch 64")
#: The fields of a record compared between the checkouts: the work itself.
FIELDS = ("factual", "counterfactual", "interventional", "exact")


def _digest(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _compare(runs: list[dict[str, Any]]) -> str:
    """Whether every run wrote the same records, field by field of :data:`FIELDS` and of the
    exact metrics that all runs have; exact metrics that only some runs compute (a checkout's
    new ones) are named apart: they are work the other checkout does not do."""
    common = set.intersection(*(set(run["digests"]) for run in runs))
    differ = sorted(key for key in common if len({run["digests"][key] for run in runs}) > 1)
    fields = [set(run["exact_fields"]) for run in runs]
    only = sorted(set.union(*fields) - set.intersection(*fields))
    extra = f"; exact metrics of one checkout only: {', '.join(only)}" if only else ""
    return ("yes" if not differ else "no: " + ", ".join(differ)) + extra


def child(repo: Path, threads: int, quick: str | None) -> dict[str, Any]:
    """Both cases in the checkout ``repo`` (this process imports its code); seconds per string."""
    sys.path[:0] = [str(repo), str(repo / "benchmarks")]  # before this checkout's own
    import torch

    import pyro_lmscm

    if not Path(pyro_lmscm.__file__).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"pyro_lmscm was imported from {pyro_lmscm.__file__}, not from {repo}")
    import bench_study  # this checkout's helpers

    from pyro_lmscm.loading import load_lm
    from pyro_lmscm.study import StudyConfig, run_study

    torch.set_num_threads(threads)
    if quick:  # the two tiny model folders the parent saved
        model, dtype = str(Path(quick) / "tiny0"), "float32"
        intervention: Any = f"model={Path(quick) / 'tiny1'}"
        demo = paper = ["the man said he", "the old doctor walked", "the woman said she", "the city was"] * 20
    else:
        model, dtype = "smollm2-135m-instruct", "bfloat16"
        intervention = {"steer": {"direction": "female", "alpha": 1.0, "layer": 10}}
        demo, paper = bench_study.corpus_lines("demo_corpus"), bench_study.corpus_lines("paper_corpus")
    lm = load_lm(model, dtype=dtype, progress=False)
    mc = dict(model=model, dtype=dtype, intervention=intervention, num_samples=4, max_new_tokens=32, top_k=None,
              attribute=None, threads=threads)
    exact = dict(model=model, dtype=dtype, intervention=intervention, max_new_tokens=25, top_k=50,
                 attribute=None, threads=threads, exact_only=True)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def study(name: str, lines: list[str], settings: dict[str, Any]) -> Any:
            corpus = bench_study.write_corpus(folder, name, lines)
            config = StudyConfig(corpus=corpus, output=str(folder / name), name=name, report=False, progress=False,
                                 **settings)
            return run_study(config, lm=lm)

        warm = demo[16:20] if len(demo) >= 20 else demo[:4]
        study("warm-mc", warm, {**mc, "batch_size": 4})
        study("warm-exact", warm, {**exact, "batch_size": 4})
        runs = {"MC, batch 16": (demo[:16], {**mc, "batch_size": 16}),
                "exact-only, batch 64": (paper[:64], {**exact, "batch_size": 64})}
        for (name, (lines, settings)), slug in zip(runs.items(), ("mc", "exact")):
            start = time.perf_counter()
            result = study(slug, lines, settings)
            seconds = time.perf_counter() - start
            errors = [r["error"] for r in result.records if r.get("error")]
            if errors:
                raise SystemExit(f"{name}: {errors[:3]}")
            digests = {field: _digest([r.get(field) for r in result.records]) for field in FIELDS[:-1]}
            exact_fields = sorted({key for r in result.records for key in (r.get("exact") or {})})
            digests |= {f"exact.{key}": _digest([(r.get("exact") or {}).get(key) for r in result.records])
                        for key in exact_fields}
            out[name] = {"seconds_per_string": seconds / result.computed, "strings": result.computed,
                         "digests": digests, "exact_fields": exact_fields}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="the checkout before the change (a git worktree)")
    parser.add_argument("after", type=Path, help="the checkout after it")
    parser.add_argument("--reps", type=int, default=3, help="processes per checkout, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny models (seconds)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick-folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.threads, args.quick_folder)), flush=True)
        return
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    for side, repo in sides.items():
        if not (repo / "pyro_lmscm").is_dir() or not (repo / "benchmarks" / "bench_study.py").is_file():
            parser.error(f"{side}: {repo} is not a pyro-lmscm checkout with benchmarks/bench_study.py")
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if args.quick:  # one pair of tiny model folders, the same for both sides
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from pyro_lmscm.testing import tiny_llama

            for seed in (0, 1):
                tiny = tiny_llama(seed=seed)
                tiny.model.save_pretrained(Path(tmp) / f"tiny{seed}")
                tiny.tokenizer.save_pretrained(Path(tmp) / f"tiny{seed}")
            extra = ["--quick-folder", tmp]
        for rep in range(args.reps):
            for side, repo in sides.items():
                command = [sys.executable, __file__, str(repo), str(repo), "--child", str(repo),
                           "--threads", str(args.threads), *extra]
                env = {**os.environ, "PYTHONPATH": str(repo)}
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if done.returncode != 0 or line is None:
                    raise SystemExit(f"{side} ({repo}) failed:\n{done.stderr[-3000:]}")
                results[side].append(json.loads(line[len("RESULT "):]))
                shown = ", ".join(f"{case}: {results[side][-1][case]['seconds_per_string']:.3f}" for case in CASES)
                print(f"rep {rep + 1}, {side}: {shown} s per string", flush=True)
    print(f"\n{args.reps} alternating processes per checkout, {args.threads} thread(s); before: {sides['before']}, "
          f"after: {sides['after']}\n")
    print("| case | before, s per string (median) | after | after / before | per repetition | same records |")
    print("|---|---:|---:|---:|---|---|")
    for case in CASES:
        before = [r[case]["seconds_per_string"] for r in results["before"]]
        after = [r[case]["seconds_per_string"] for r in results["after"]]
        paired = ", ".join(f"{a / b:.3f}" for a, b in zip(after, before))
        same = {side: _compare([r[case] for r in results[side]]) for side in sides}  # run to run
        across = _compare([r[case] for side in sides for r in results[side]])
        print(f"| {case} | {statistics.median(before):.3f} | {statistics.median(after):.3f} | "
              f"{statistics.median(after) / statistics.median(before):.3f} | {paired} | "
              f"{across}{'' if set(same.values()) == {'yes'} else f' (run to run: {same})'} |")


if __name__ == "__main__":
    main()
