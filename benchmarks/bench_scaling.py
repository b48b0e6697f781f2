"""How the cost of one observation grows with its length T: the sampled counterfactuals,
the exact probabilities, the most probable counterfactual (beam search) and the exact
sampler, with the peak resident memory of each, for T = 32, 128 and 512 (issue 40).

Measured side by side in one process (one thread, the cases interleaved in each
repetition); the observation is a fixed English text of T tokens (the opening paragraphs of
docs/architecture.md), so no time is spent sampling it, under gender steering.

    python benchmarks/bench_scaling.py                      # SmolLM2 fp32, T = 32,128,512
    python benchmarks/bench_scaling.py --quick              # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from pyro_lmscm import LanguageModelSCM, counterfactual, exact_counterfactual

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Notes for the next maintainer of this library:"


def _status_mb(key: str) -> float:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def measured(run: Callable[[], object]) -> tuple[float, float, float | None]:
    """Wall-clock and CPU seconds of ``run()`` (the process's CPU time: on a machine shared
    with other jobs the wall clock measures the scheduler as much as the work) and its peak
    resident memory above the resident set before it (MiB): the kernel's high-water mark
    ``VmHWM``, reset to the resident set first by ``/proc/self/clear_refs`` (``None`` where
    that is refused)."""
    before = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        reset = True
    except OSError:
        reset = False
    start, cpu = time.perf_counter(), time.process_time()
    run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, (_status_mb("VmHWM") - before) if reset else None


def setup(quick: bool, lengths: list[int]):
    """The model, its steering mechanism, the prompt and the longest observation."""
    if quick:
        from pyro_lmscm.interventions import ActivationSteering
        from pyro_lmscm.lm import HFLanguageModel
        from pyro_lmscm.testing import tiny_llama

        tiny = tiny_llama()
        tiny.model.config.max_position_embeddings = 4096  # (rotary positions: no table to outgrow)
        lm = HFLanguageModel(tiny.model, tiny.tokenizer)
        torch.manual_seed(0)
        mechanism = ActivationSteering(torch.randn(lm.model.config.hidden_size), layer=0)
        prompt = torch.tensor([2, 3, 14, 4])
        text = torch.randint(3, lm.vocab_size, (max(lengths),), generator=torch.Generator().manual_seed(0))
        return lm, mechanism, prompt, text
    from pyro_lmscm.interventions.gender import gender_steering
    from pyro_lmscm.loading import load_lm

    lm = load_lm("smollm2-135m-instruct", progress=False)
    mechanism = gender_steering(lm, "female", alpha=0.3)
    text = lm.encode((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    if text.shape[-1] < max(lengths):
        raise SystemExit(f"docs/architecture.md has only {text.shape[-1]} tokens")
    return lm, mechanism, lm.encode(PROMPT), text


def cases(lm, mechanism, prompt, observed, draws: int, beams: int):
    """The cases of one length: name -> a call."""
    T = observed.shape[-1]
    scm = LanguageModelSCM(lm, T, mechanisms={"female": mechanism})
    intervention = {"mechanism": "female"}

    def exact_probabilities():
        exact = exact_counterfactual(scm, prompt, observed, intervention)
        exact.prob_unchanged()
        exact.first_divergence()

    @functools.cache
    def exact():  # built on first use, outside the timed call (its abduction is part of "exact")
        return exact_counterfactual(scm, prompt, observed, intervention)

    def timed(run: Callable[[object], object]) -> Callable[[], object]:
        def call() -> object:
            return run(exact())

        call.prepare = exact  # type: ignore[attr-defined]
        return call
    return {
        f"counterfactual(N={draws})": lambda: counterfactual(scm, prompt, observed, intervention,
                                                             num_samples=draws, seed=0),
        "exact (prob_unchanged, first_divergence)": exact_probabilities,
        f"mode({beams} beams)": timed(lambda e: e.mode(num_beams=beams)),
        f"sample({draws})": timed(lambda e: e.sample(draws, seed=0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, T = 8, 32 (seconds)")
    parser.add_argument("--tokens", default=None, help="comma-separated lengths (default 32,128,512)")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the shorter lengths")
    parser.add_argument("--once", type=int, default=512, help="lengths from this on run one repetition")
    parser.add_argument("--draws", type=int, default=4, help="N of counterfactual(N) and sample(N) at every T")
    parser.add_argument("--big-draws", type=int, default=100, help="N of the extra sample(N)/counterfactual(N)")
    parser.add_argument("--big-tokens", type=int, default=32, help="T of the extra sample(N)/counterfactual(N)")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=None,
                        help="comma-separated prefixes of the cases to run (counterfactual, exact, mode, sample), "
                             "e.g. to run the long cases in processes of their own")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(t) for t in (args.tokens or ("8,32" if args.quick else "32,128,512")).split(",")]
    big_tokens = min(args.big_tokens, max(lengths))
    lm, mechanism, prompt, text = setup(args.quick, lengths + [big_tokens])
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(uptime; {os.cpu_count()} CPUs), torch threads {args.threads}", flush=True)
    table = {T: cases(lm, mechanism, prompt, text[:T], args.draws, args.beams) for T in lengths}
    if args.cases:
        chosen = tuple(args.cases.split(","))
        table = {T: {name: call for name, call in calls.items() if name.startswith(chosen)}
                 for T, calls in table.items()}
    big = cases(lm, mechanism, prompt, text[:big_tokens], args.big_draws, args.beams)
    big = {name: call for name, call in big.items() if name.startswith(("counterfactual", "sample")) and args.big_draws}
    times: dict[tuple[int, str], list[float]] = {}
    cpu_times: dict[tuple[int, str], list[float]] = {}
    peaks: dict[tuple[int, str], float | None] = {}
    exact_counterfactual(  # a warm-up call: lazy buffers, page-ins
        LanguageModelSCM(lm, 4, mechanisms={"female": mechanism}), prompt, text[:4], {"mechanism": "female"}
    ).prob_unchanged()
    def run(T: int, name: str, call: Callable[[], object]) -> None:
        getattr(call, "prepare", lambda: None)()
        seconds, cpu, peak = measured(call)
        times.setdefault((T, name), []).append(seconds)
        cpu_times.setdefault((T, name), []).append(cpu)
        peaks[(T, name)] = peak if peaks.get((T, name)) is None else max(peak or 0, peaks[(T, name)] or 0)
        load = os.getloadavg()[0]
        print(f"  T={T} {name}: {seconds:.2f} s wall, {cpu:.2f} s CPU, peak +{'?' if peak is None else round(peak)} "
              f"MiB, load {load:.1f}", flush=True)

    # the shorter lengths first, repeated and interleaved; the lengths from --once on, once;
    # the sample(N)/counterfactual(N) pair of --big-draws last
    for rep in range(args.reps):
        for T in [T for T in lengths if T < args.once]:
            for name, call in table[T].items():
                run(T, name, call)
    for T in [T for T in lengths if T >= args.once]:
        for name, call in table[T].items():
            run(T, name, call)
    for name, call in big.items():
        run(big_tokens, name, call)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    for label, measure in (("wall-clock", times), ("CPU", cpu_times)):
        print(f"{label} seconds (median)\n")
        report(measure, peaks, list(table[lengths[0]]), lengths, args, big_tokens)


def report(measure, peaks, names, lengths, args, big_tokens) -> None:
    """The table of one measure (seconds per case and length, the peak memory) and its ratios."""
    median = {key: statistics.median(value) for key, value in measure.items()}
    lengths = [T for T in lengths if all((T, name) in median for name in names)]  # (those measured)
    print("| case | " + " | ".join(f"T = {T}: s (peak MiB)" for T in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for name in names:
        cells = []
        for T in lengths:
            peak = peaks.get((T, name))
            cells.append(f"{median[(T, name)]:.2f} ({'?' if peak is None else f'{peak:.0f}'})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("| ratio (target) | value |")
    print("|---|---:|")
    if len(lengths) >= 2:
        short, long = lengths[-2], lengths[-1]
        for name in names:
            print(f"| {name}: T={long} / T={short} (≤ {5.0 * long / (4 * short):.1f}) | "
                  f"{median[(long, name)] / median[(short, name)]:.2f} |")
    pair = f"sample({args.draws})", f"counterfactual(N={args.draws})"
    for T in lengths:
        if (T, pair[0]) in median and (T, pair[1]) in median:
            print(f"| {pair[0]} / {pair[1]}, T={T} (≤ 1.5) | {median[(T, pair[0])] / median[(T, pair[1])]:.2f} |")
    n = args.big_draws
    pair = f"sample({n})", f"counterfactual(N={n})"
    if n and (big_tokens, pair[0]) in median and (big_tokens, pair[1]) in median:
        ratio = median[(big_tokens, pair[0])] / median[(big_tokens, pair[1])]
        print(f"| {pair[0]} / {pair[1]}, T={big_tokens} (≤ 1.5) | {ratio:.2f} |")
    print()

if __name__ == "__main__":
    main()
