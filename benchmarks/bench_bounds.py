"""The cost of ExactCounterfactual.bounds() against prob_unchanged(): both take one
teacher-forced pass of the intervened model on the observation; bounds() adds the intervals'
pass over the vocabulary per step (target: ratio <= 1.2). Repetitions interleaved, the order
alternating, in one process on a fixed number of torch threads; medians.

    python benchmarks/bench_bounds.py [--model tiny|smollm2] [--tokens 32] [--reps 21] [--threads 1] [--top-k K]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_lmscm import LanguageModelSCM, ModelSwap, counterfactual, exact_counterfactual
from pyro_lmscm.models import Decoding

PROMPT = "My brother is a doctor. Every morning, he"


def _setup(model: str, tokens: int, top_k: int | None):
    """(exact counterfactual, words): tiny Llama under a model swap, or SmolLM2 under gender steering."""
    if model == "tiny":
        from pyro_lmscm.testing import tiny_llama

        lm, other = tiny_llama(seed=0, logit_scale=8.0), tiny_llama(seed=1, logit_scale=8.0)
        scm = LanguageModelSCM(lm, tokens, Decoding(top_k=top_k), mechanisms={"other": ModelSwap(other)})
        prompt, name = torch.tensor([2, 3, 4]), "other"
    else:
        from pyro_lmscm.interventions.gender import gender_steering
        from pyro_lmscm.loading import load_lm

        lm = load_lm("smollm2-135m-instruct", progress=False)
        steer = gender_steering(lm, "female", alpha=0.3)
        scm = LanguageModelSCM(lm, tokens, Decoding(top_k=top_k), mechanisms={"female": steer})
        prompt, name = lm.encode(PROMPT), "female"
    observed = counterfactual(scm, prompt, None, {}, seed=0).factual_ids
    exact = exact_counterfactual(scm, prompt, observed, {"mechanism": name})
    return exact, f"{model}, V = {scm.vocab_size}, top-k {top_k}, {len(observed)} observed tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=None, help="top-k decoding (default: the full softmax)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    exact, words = _setup(args.model, args.tokens, args.top_k)
    calls = {"prob_unchanged": exact.prob_unchanged, "bounds": exact.bounds}
    for call in calls.values():  # warm up
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}  # process time: robust to other processes
    for rep in range(args.reps):
        for name in (list(calls) if rep % 2 == 0 else list(calls)[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            calls[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    base, bounds = (statistics.median(times[name]) for name in calls)
    base_cpu, bounds_cpu = (statistics.median(cpu[name]) for name in calls)
    out = exact.bounds()
    print(f"{words}; {args.threads} torch thread(s), {args.reps} interleaved repetitions")
    for query in ("prob_unchanged", "expected_first_divergence"):
        table = getattr(out, query)
        print(f"{query}: model {table['model']:.4g}, stable {table['stable'][0]:.4g}-{table['stable'][1]:.4g}, "
              f"any {table['any'][0]:.4g}-{table['any'][1]:.4g}")
    print(f"wall time: prob_unchanged {base * 1e3:.2f} ms, bounds {bounds * 1e3:.2f} ms; "
          f"CPU time: {base_cpu * 1e3:.2f} ms, {bounds_cpu * 1e3:.2f} ms")
    print(f"| bounds / prob_unchanged (≤ 1.2) | {bounds / base:.3f} |")
    print(f"| bounds / prob_unchanged, CPU time (≤ 1.2) | {bounds_cpu / base_cpu:.3f} |")


if __name__ == "__main__":
    main()
