"""Study throughput: strings per minute, batched across strings, and against the seed paper's procedure.

Question (issue 16): how many strings per minute does a study process, one string at a time
(``batch_size=1``), in batches of strings (the default ``batch_size``), as an exact-only
study, and with the seed paper's reference procedure? Every case runs in this one process,
interleaved (A, B, C, D, A, B, ...), and each figure is the median over the repetitions.

=====================  =============================================================  =======
case                   what runs                                                      target
=====================  =============================================================  =======
MC, batch 1            ``run_study(batch_size=1)``: each string alone (factual sample,
                       abduction, 4 counterfactual + 4 baseline draws, exact metrics,
                       scoring)
MC, batch B            the same study in batches of B strings (left-padded)           ≥ 3x
                                                                                      batch 1
MC unscored, batch 1   both again with ``draw_scores=False``: the draws are not
and batch B            scored (no log-probabilities under either model, no exact
                       token probabilities; the reference computes neither)
draws only, batch B    the reference's work alone, batched: ``counterfactuals()`` of B
                       strings, factual sample + 4 counterfactuals each (no baseline,
                       no exact metrics, no scoring)
reference              the seed paper's procedure (shauli-ravfogel/lm-counterfactuals, ≤ 1/10
                       ``sampling.py`` / ``utils.py``), reimplemented here from its     of MC,
                       code and the paper: per string ``generate(do_sample=True)`` for  batch B
                       the factual string, then per counterfactual one teacher-forced
                       pass, the hindsight Gumbel noise in numpy (the max of the
                       perturbed logits ~ Gumbel(logsumexp), the others truncated
                       below it) and ``generate`` of the intervened model with a
                       ``GumbelProcessor`` adding the noise (greedy), one string and
                       one counterfactual at a time; no baseline, no exact metrics
exact-only             ``run_study(exact_only=True)``: factual strings, exact           500 x 25
                       P(unchanged), first-divergence law, most probable                tokens
                       counterfactual (4 beams); no draws                              < 3 min
MC, batch B, native    only on a CPU without native bf16 GEMM kernels: the MC study
bf16 kernels           with torch's own (reference) bf16 kernels instead of the
                       float32 GEMMs of ``bf16_kernels``, for their gain in this run
=====================  =============================================================  =======

Every case runs in :func:`~pyro_lmscm.runtime.compute_scope`, as a study does (the reference and
the draws-only case too): where the CPU has no native bfloat16 GEMM (AVX2 alone), bfloat16
linears of 8 rows or more multiply in float32 (a decoding step of one string keeps the native
kernel), and large tensors reuse freed heap memory instead of faulting in fresh pages.

The MC cases use the demo study's settings (SmolLM2 bfloat16, steering toward "female",
4 draws, 32 tokens, the full softmax: the reference's ``generate`` samples it too); the
exact-only case the paper's (25 tokens, top-k 50) on the paper corpus, cycled to
``--exact-strings`` beginnings (500 for the target: the corpus has 200, each index has
its own seed).

Usage::

    python benchmarks/bench_study.py                  # SmolLM2 bf16, 2 threads, ~15 minutes
    python benchmarks/bench_study.py --quick          # tiny model, seconds (CI)

It prints measured rates and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository, unless on PYTHONPATH

from pyro_lmscm.lm import HFLanguageModel
from pyro_lmscm.runtime import compute_scope, kernels, native_bf16_gemm
from pyro_lmscm.study import StudyConfig, run_study
from pyro_lmscm.study.config import DEFAULT_BATCH_SIZE, DEFAULT_EXACT_BATCH_SIZE

DEMO = Path(__file__).resolve().parents[1] / "pyro_lmscm" / "study" / "data"


def corpus_lines(name: str) -> list[str]:
    return [
        line.strip()
        for line in (DEMO / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]


def write_corpus(folder: Path, name: str, lines: list[str]) -> str:
    path = folder / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def study_case(
    lm: HFLanguageModel, folder: Path, corpus: str, settings: dict[str, Any], name: str, native: bool = False
) -> Callable[[], int]:
    """A study into a fresh folder per call; returns the strings processed. ``native``: with
    torch's own bfloat16 kernels, not the float32 GEMMs of :func:`~pyro_lmscm.runtime.bf16_kernels`."""
    runs = [0]

    def run() -> int:
        runs[0] += 1
        config = StudyConfig(
            corpus=corpus, output=str(folder / f"{name}-{runs[0]}"), name=name, report=False, progress=False,
            **settings,
        )
        # native: bf16_kernels (the runner's and the worker's) is told the CPU has bf16 kernels
        with mock.patch.object(kernels, "native_bf16_gemm", lambda: True) if native else contextlib.nullcontext():
            result = run_study(config, lm=lm)
        assert all(r.get("error") is None for r in result.records), [r["error"] for r in result.records if r["error"]]
        return result.computed

    return run


def draws_case(
    lm: HFLanguageModel, intervention: Any, prompts: list[str], batch_size: int, draws: int, tokens: int
) -> Callable[[], int]:
    """The reference's work alone, batched: per string the factual sample and ``draws``
    counterfactuals (no baseline, no exact metrics, no scoring), ``batch_size`` strings per
    :func:`~pyro_lmscm.counterfactuals` call."""
    from pyro_lmscm import LanguageModelSCM, counterfactuals
    from pyro_lmscm.interventions.spec import parse_intervention

    spec = parse_intervention(intervention, lm)
    scm = LanguageModelSCM(lm, tokens, mechanisms=spec.mechanisms)
    encoded = [lm.encode(text) for text in prompts]

    def run() -> int:
        with compute_scope(lm):
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start : start + batch_size]
                counterfactuals(scm, batch, None, spec.intervention, num_samples=draws, seed=0)
        return len(encoded)

    return run


# -- the seed paper's procedure, reimplemented ---------------------------------------------------


class GumbelProcessor:
    """transformers logits processor that adds precomputed noise ``(T, V)`` step by step (the
    reference's ``GumbelProcessor(precomputed_noise)``)."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise = noise
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores + self.noise[min(self.step, self.noise.shape[0] - 1)].to(scores.device, scores.dtype)
        self.step += 1
        return out


def hindsight_noise(logits: np.ndarray, observed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Posterior Gumbel noise ``(n, V)`` of an observation given the factual logits ``(n, V)``,
    in numpy as the reference does: per step the maximum of the perturbed logits is
    Gumbel(logsumexp) and sits on the observed token, the others are Gumbels truncated below it."""
    n, vocab = logits.shape
    top = np.logaddexp.reduce(logits, axis=-1) - np.log(-np.log(rng.uniform(size=n)))  # (n,)
    # a Gumbel(l_j) below `top`: inverse CDF on (0, F(top))
    cdf_top = np.exp(-np.exp(-(top[:, None] - logits)))
    u = rng.uniform(size=(n, vocab)) * cdf_top
    perturbed = logits - np.log(-np.log(np.clip(u, 1e-300, None)))
    perturbed[np.arange(n), observed] = top
    return perturbed - logits


def reference_case(
    lm: HFLanguageModel, mechanism: Any, prompts: list[str], draws: int, tokens: int, seed: int = 0
) -> Callable[[], int]:
    """The reference procedure over ``prompts``: one string and one counterfactual at a time."""
    from transformers import GenerationConfig, LogitsProcessorList

    model, tokenizer = lm.model, lm.tokenizer
    sample = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=tokens, pad_token_id=lm.pad_token_id,
        eos_token_id=lm.eos_token_ids or None,
    )
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=tokens, pad_token_id=lm.pad_token_id, eos_token_id=lm.eos_token_ids or None,
    )
    rng = np.random.default_rng(seed)

    @torch.no_grad()
    def run() -> int:
        # the study's kernels (float32 GEMMs from 8 rows on a CPU without bf16 ones) and allocations
        with compute_scope(lm):
            return procedure()

    def procedure() -> int:
        torch.manual_seed(seed)
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            mask = torch.ones_like(ids)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=sample)
            continuation = out[0, ids.shape[-1]:]
            for _ in range(draws):
                full = torch.cat([ids[0], continuation])[None]
                logits = model(full).logits[0, ids.shape[-1] - 1 : -1].float().numpy()
                noise = hindsight_noise(logits.astype(np.float64), continuation.numpy(), rng)
                processor = GumbelProcessor(torch.from_numpy(noise).float())
                with mechanism.activate(lm):
                    model.generate(
                        input_ids=ids, attention_mask=mask, generation_config=greedy,
                        logits_processor=LogitsProcessorList([processor]),
                    )
        return len(prompts)

    return run


# -- measuring -------------------------------------------------------------------------------------


def measure(cases: dict[str, Callable[[], int]], reps: int) -> dict[str, tuple[float, int]]:
    """Median seconds per string of each case, interleaved; with the strings per run."""
    per_string: dict[str, list[float]] = {name: [] for name in cases}
    counts: dict[str, int] = {}
    for rep in range(reps):
        for name, case in cases.items():
            start = time.perf_counter()
            counts[name] = case()
            per_string[name].append((time.perf_counter() - start) / counts[name])
            print(f"  rep {rep + 1}: {name}: {per_string[name][-1]:.3f} s per string", flush=True)
    return {name: (statistics.median(values), counts[name]) for name, values in per_string.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, a few strings (seconds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="strings per batch, MC")
    parser.add_argument("--exact-batch-size", type=int, default=DEFAULT_EXACT_BATCH_SIZE, help="the same, exact-only")
    parser.add_argument("--mc-strings", type=int, default=16, help="strings per MC run (batch B)")
    parser.add_argument("--single-strings", type=int, default=6, help="strings per run of batch 1 and the reference")
    parser.add_argument("--exact-strings", type=int, default=500, help="strings of the exact-only study")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pyro_lmscm.interventions.spec import parse_intervention
    from pyro_lmscm.loading import load_lm

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.quick:  # two tiny models saved as folders: the factual one and a model swap
            from pyro_lmscm.testing import tiny_llama

            for seed in (0, 1):
                tiny = tiny_llama(seed=seed)
                tiny.model.save_pretrained(folder / f"tiny{seed}")
                tiny.tokenizer.save_pretrained(folder / f"tiny{seed}")
            model, intervention, dtype = str(folder / "tiny0"), f"model={folder / 'tiny1'}", "float32"
            demo = paper = ["the man said he", "the old doctor walked", "the woman said she", "the city was"]
            args.mc_strings, args.single_strings, args.exact_strings, args.reps = 4, 2, 8, 1
        else:
            model, dtype = "smollm2-135m-instruct", "bfloat16"
            intervention = {"steer": {"direction": "female", "alpha": 1.0, "layer": 10}}
            demo, paper = corpus_lines("demo_corpus"), corpus_lines("paper_corpus")
        lm = load_lm(model, dtype=dtype, progress=False)
        spec = parse_intervention(intervention, lm)
        mechanism = next(iter(spec.mechanisms.values()))
        mc = dict(model=model, dtype=dtype, intervention=intervention, num_samples=4, max_new_tokens=32, top_k=None,
                  attribute=None, threads=args.threads)
        exact = dict(model=model, dtype=dtype, intervention=intervention, max_new_tokens=25, top_k=50,
                     attribute=None, threads=args.threads, exact_only=True, batch_size=args.exact_batch_size)
        cycled = [paper[i % len(paper)] for i in range(args.exact_strings)]
        single_corpus = write_corpus(folder, "single", demo[: args.single_strings])
        batched_corpus = write_corpus(folder, "batched", demo[: args.mc_strings])
        cases = {
            "MC, batch 1": study_case(lm, folder, single_corpus, {**mc, "batch_size": 1}, "single"),
            f"MC, batch {args.batch_size}": study_case(
                lm, folder, batched_corpus, {**mc, "batch_size": args.batch_size}, "batched"),
            "MC unscored, batch 1": study_case(
                lm, folder, single_corpus, {**mc, "batch_size": 1, "draw_scores": False}, "single-unscored"),
            f"MC unscored, batch {args.batch_size}": study_case(
                lm, folder, batched_corpus, {**mc, "batch_size": args.batch_size, "draw_scores": False},
                "batched-unscored"),
            "reference": reference_case(lm, mechanism, demo[: args.single_strings], draws=4, tokens=32),
            f"draws only, batch {args.batch_size}": draws_case(lm, intervention, demo[: args.mc_strings],
                                                               args.batch_size, draws=4, tokens=32),
            f"exact-only, batch {args.exact_batch_size}": study_case(
                lm, folder, write_corpus(folder, "exact", cycled), exact, "exact"),
        }
        if dtype == "bfloat16" and not native_bf16_gemm():  # the float32 GEMMs' gain, in the same run
            cases[f"MC, batch {args.batch_size}, native bf16 kernels"] = study_case(
                lm, folder, batched_corpus, {**mc, "batch_size": args.batch_size}, "batched-native", native=True)
        results = measure(cases, args.reps)

    import platform

    import transformers

    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, native bf16 GEMM: "
          f"{native_bf16_gemm()}), transformers {transformers.__version__}, model {model} {dtype}\n")
    print("| case | strings per run | s per string | strings per minute |")
    print("|---|---:|---:|---:|")
    for name, (seconds, count) in results.items():
        print(f"| {name} | {count} | {seconds:.3f} | {60 / seconds:.1f} |")
    batched = results[f"MC, batch {args.batch_size}"][0]
    exact_name = f"exact-only, batch {args.exact_batch_size}"
    single, reference, exact_only = results["MC, batch 1"][0], results["reference"][0], results[exact_name][0]
    print("\n| ratio (strings per minute) | measured | target |")
    print("|---|---:|---:|")
    print(f"| MC batch {args.batch_size} / MC batch 1 | {single / batched:.2f} | ≥ 3 |")
    print(f"| MC batch {args.batch_size} / reference | {reference / batched:.2f} | ≥ 10 |")
    print(f"| MC batch 1 / reference | {reference / single:.2f} | — |")
    lean, lean_single = results[f"MC unscored, batch {args.batch_size}"][0], results["MC unscored, batch 1"][0]
    print(f"| MC unscored (draw_scores=False) batch {args.batch_size} / batch 1 | {lean_single / lean:.2f} | (≥ 3) |")
    print(f"| MC unscored (draw_scores=False) batch {args.batch_size} / reference | {reference / lean:.2f} | (≥ 10) |")
    draws_only = results[f"draws only, batch {args.batch_size}"][0]
    print(f"| the reference's work alone (sample + 4 CF), batch {args.batch_size} / reference | "
          f"{reference / draws_only:.2f} | — |")
    native_name = f"MC, batch {args.batch_size}, native bf16 kernels"
    if native_name in results:
        print(f"| MC batch {args.batch_size}: float32 GEMMs / native bf16 kernels | "
              f"{results[native_name][0] / batched:.2f} | — |")
    total = exact_only * 500
    print(f"\nexact-only study, 500 strings x 25 tokens: {total / 60:.2f} min "
          f"({'measured on' if results[exact_name][1] == 500 else 'extrapolated from'} {results[exact_name][1]}"
          f" strings; target < 3 min)")
    if not math.isfinite(total):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
