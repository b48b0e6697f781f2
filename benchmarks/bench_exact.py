"""Exact P(unchanged) on SmolLM2 against the Monte Carlo estimate, and its cost against one
teacher-forced forward pass (measured side by side, interleaved, in one process).

    python benchmarks/bench_exact.py [--draws 2000] [--tokens 48] [--reps 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pyro_lmscm import LanguageModelSCM, counterfactual, exact_counterfactual
from pyro_lmscm.interventions.gender import gender_steering
from pyro_lmscm.loading import load_lm

PROMPT = "My brother is a doctor. Every morning, he"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.3, help="steering strength (small: P(unchanged) not ~0)")
    parser.add_argument("--mechanism", choices=("steer", "rome"), default="steer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = load_lm("smollm2-135m-instruct", progress=False)
    if args.mechanism == "rome":  # an unrelated fact edited: the story should rarely change
        from pyro_lmscm.interventions import rome_edit

        mechanism = rome_edit(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", layer=6)
    else:
        mechanism = gender_steering(lm, "female", alpha=args.alpha)
    scm = LanguageModelSCM(lm, args.tokens, mechanisms={"female": mechanism})
    prompt = lm.encode(PROMPT)
    observed = counterfactual(scm, prompt, None, {}, seed=0).factual_ids
    inputs = torch.cat([prompt, observed[:-1]])[None]
    exact = exact_counterfactual(scm, prompt, observed, {"mechanism": "female"})
    times: dict[str, list[float]] = {"forward": [], "prob_unchanged": []}
    for _ in range(args.reps):
        start = time.perf_counter()
        with torch.no_grad():
            lm.model(input_ids=inputs, use_cache=False, logits_to_keep=len(observed))
        times["forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        value = exact.prob_unchanged()
        times["prob_unchanged"].append(time.perf_counter() - start)
    forward, exact_time = (statistics.median(times[k]) for k in ("forward", "prob_unchanged"))
    result = counterfactual(scm, prompt, observed, {"mechanism": "female"}, num_samples=args.draws, seed=1,
                            chunk_size=250)
    n = len(observed)
    unchanged = (result.counterfactual_ids[:, :n] == observed).all(-1).double()
    mean = float(unchanged.mean())
    half = 2.576 * math.sqrt(max(mean * (1 - mean), 1e-12) / args.draws)
    print(f"observed {n} tokens; mechanism {mechanism!r}")
    print(f"exact P(unchanged) = {value:.6f}; Monte Carlo {mean:.4f}, "
          f"99% interval [{mean - half:.4f}, {mean + half:.4f}]"
          f" ({args.draws} draws); inside: {mean - half <= value <= mean + half}")
    print(f"time: forward {forward * 1e3:.1f} ms, prob_unchanged {exact_time * 1e3:.1f} ms, "
          f"ratio {exact_time / forward:.2f} (target <= 2.5)")


if __name__ == "__main__":
    main()
