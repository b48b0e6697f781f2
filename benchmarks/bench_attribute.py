"""Exact attribution (:func:`pyro_lmscm.inference.attribute`): time per string and per part,
and per teacher-forced pass against one plain forward pass (measured in the same process).

SmolLM2 with gender steering at three layers (a Combined, one part per layer), by layer and
by step; ``--quick``: the tiny random model with a weight edit of its layers.

    python benchmarks/bench_attribute.py [--strings 3] [--tokens 24] [--layers 6,10,14] [--alpha 0.3]
    python benchmarks/bench_attribute.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_lmscm import LanguageModelSCM
from pyro_lmscm.inference import attribute
from pyro_lmscm.interventions import Combined, WeightDelta
from pyro_lmscm.seeding import seeded

PROMPTS = [
    "My brother is a doctor. Every morning, he",
    "The old man walked to the station because he",
    "Yesterday my uncle told me that he",
    "The young man at the bakery said he",
]


def _mechanism(args):
    if args.quick:
        from pyro_lmscm.testing import tiny_llama

        lm = tiny_llama(dtype=torch.float64, num_hidden_layers=3)
        g = torch.Generator().manual_seed(0)
        deltas = {f"model.layers.{i}.mlp.down_proj.weight": 0.05 * torch.randn(32, 64, generator=g, dtype=torch.float64)
                  for i in range(3)}
        return lm, WeightDelta(deltas), [lm.encode("the man"), lm.encode("the old doctor")]
    from pyro_lmscm.interventions.gender import gender_steering
    from pyro_lmscm.loading import load_lm

    lm = load_lm("smollm2-135m-instruct", progress=False)
    layers = [int(layer) for layer in args.layers.split(",")]
    steer = Combined([gender_steering(lm, "female", layer=layer, alpha=args.alpha) for layer in layers])
    return lm, steer, [lm.encode(prompt) for prompt in PROMPTS[: args.strings]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model (seconds)")
    parser.add_argument("--strings", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--layers", default="6,10,14")
    parser.add_argument("--alpha", type=float, default=0.3, help="per layer (small: P(unchanged) not ~0)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm, mechanism, prompts = _mechanism(args)
    scm = LanguageModelSCM(lm, args.tokens, mechanisms={"m": mechanism})
    by = ["layer"] if isinstance(mechanism, WeightDelta) else ["layer", "step"]
    print(f"model {lm!r}\nmechanism {mechanism!r}, parts {mechanism.parts()}\n")
    rows = []
    for i, prompt in enumerate(prompts):
        with seeded(i), torch.no_grad():
            observed = scm.model(prompt)
        inputs = torch.cat([prompt, observed[:-1]])[None].to(lm.device)
        forwards = []
        for _ in range(3):
            start = time.perf_counter()
            with torch.no_grad():
                lm.model(input_ids=inputs, use_cache=False, logits_to_keep=len(observed))
            forwards.append(time.perf_counter() - start)
        forward = statistics.median(forwards)
        for kind in by:
            start = time.perf_counter()
            result = attribute(scm, prompt, observed, {"mechanism": "m"}, by=kind)
            seconds = time.perf_counter() - start
            units = len(result.parts) if kind == "layer" else len(result.steps)
            rows.append((i, kind, units, result.num_passes, seconds, forward))
            if kind == "layer":
                shapley = ", ".join(f"{p}: {v:.3g}" for p, v in result.shapley.items())
                print(f"string {i} ({len(observed)} tokens): P(unchanged) {result.prob_unchanged:.3g}; "
                      f"Shapley log P {shapley}")
            else:
                print(f"string {i}: P(unchanged) acting from step s: "
                      f"{[round(result.prob_unchanged_from[s], 3) for s in result.steps]}; acting matters from step "
                      f"{result.first_step_that_matters} to {result.last_step_that_matters}")
    print("\n| string | by | parts or steps | passes | seconds | per part or step (s) | per pass / forward |")
    print("|---|---|---|---|---|---|---|")
    for i, kind, units, passes, seconds, forward in rows:
        print(f"| {i} | {kind} | {units} | {passes} | {seconds:.2f} | {seconds / units:.3f} | "
              f"{seconds / passes / forward:.2f} |")
    for kind in by:
        mine = [r for r in rows if r[1] == kind]
        print(f"by {kind}: {statistics.fmean(r[4] for r in mine):.2f} s per string, "
              f"{statistics.fmean(r[4] / r[2] for r in mine):.3f} s per part or step, "
              f"{statistics.fmean(r[3] for r in mine):.0f} passes per string")


if __name__ == "__main__":
    main()
