"""Counterfactuals at the cost of plain generation: timings against ``model.generate``.

Question (issue 6): what does a Gumbel counterfactual cost next to what it is made of?
Abduction needs one teacher-forced forward pass over prompt + observation plus
:math:`O(T \\cdot V)` noise work; each counterfactual is one KV-cached decoding run of the
intervened model, what ``model.generate(do_sample=True)`` costs. Every ratio below is
measured side by side in one process: the cases run interleaved (A, B, C, A, B, C, ...)
and each time is the median over the repetitions.

=====================  =========================================================  ======
ratio                  measures                                                   target
=====================  =========================================================  ======
abduction / forward    exact abduction of a T-token observation (one draw,        1.25
                       ``HindsightGumbelGuide.sample_noise``, what
                       ``counterfactual`` runs) vs one teacher-forced forward
                       pass over the same tokens; also reported: the same draw
                       as T traced Pyro sites (``poutine.trace`` of the guide)
counterfactual / gen   one counterfactual of T tokens given abducted noise vs     1.15
                       ``generate(do_sample=True, top_k=0, max_new_tokens=T)``
cf(N=1) / (fwd + gen)  the whole ``counterfactual(..., num_samples=1)``           1.20
                       (also reported: with ``baseline=True``, which decodes a
                       second row of fresh noise in the same batch)
batch / sequential     ``counterfactual(num_samples=N)`` vs N sequential calls    0.50
                       with ``num_samples=1``
batch / paper          ``counterfactual(num_samples=N)`` vs the seed paper's      0.12
                       procedure run N times (``bench_study.reference_case``'s
                       per-counterfactual work: one teacher-forced pass, the
                       hindsight noise in numpy, ``generate`` of the intervened
                       model with the noise added; one at a time, so N x the
                       median of one)
=====================  =========================================================  ======

Fair comparison. Both sides run the same model object, dtype, thread count and KV
cache (``use_cache=True``), for exactly T steps: ``generate`` gets ``min_new_tokens=T``
(no early end of sequence), and the SCM runs on a copy of the language model whose
``eos_token_ids`` is emptied, so no row stops early. The observation is a T-token sample
of ``generate`` (hence free of end-of-sequence tokens). The counterfactual intervenes on
the prompt (another prompt of the same length), so it leaves the observed path and every
step runs the intervened model.

Also: ``--profile`` (pyinstrument) splits the time of ``counterfactual`` into Pyro's
handlers, this package's Python, and torch / transformers; ``--memory`` reports the peak
resident memory of ``counterfactual(num_samples=64)`` with and without ``chunk_size``,
each in a fresh subprocess (``--memory-only``: nothing else; ``--memory-runs null`` only the
first, the null intervention without chunks); ``--floor`` times the matrix products alone of
``counterfactual(num_samples=N)`` (``torch.profiler``) against the paper's procedure run N times;
``--prefixes`` counts how many of the N x T row-steps have a prefix that no earlier row had
(the most a decoder that shares prefixes could save).

Usage::

    python benchmarks/bench_counterfactual.py --quick          # tiny model, < 1 minute
    python benchmarks/bench_counterfactual.py                  # SmolLM2 fp32 + bf16 + tiny
    python benchmarks/bench_counterfactual.py --models smollm2-fp32 --profile --memory
    python benchmarks/bench_counterfactual.py --memory-only --memory-runs null  # the memory target
    python benchmarks/bench_counterfactual.py --models smollm2-fp32 --floor  # matrix products vs 16 x paper
    python benchmarks/bench_counterfactual.py --models smollm2-fp32,smollm2-bf16 --prefixes  # shared prefixes

It prints measured ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository, unless on PYTHONPATH

from pyro_lmscm import HindsightGumbelGuide, LanguageModelSCM, counterfactual
from pyro_lmscm.lm import HFLanguageModel

MODELS = ("smollm2-fp32", "smollm2-bf16", "tiny")
#: Timing stand-ins for SmolLM2 where its weights cannot be had (a device machine that reaches no
#: package registry, and takes at most 64 MiB along): its architecture, the ``config.json`` of the
#: embedded model, with random weights. Every step does the same work as with the real weights;
#: the prompts are the real tokenizer's ids of :data:`PROMPT` and :data:`ALT_PROMPT`
#: (``tests/test_benchmarks.py`` checks both against the embedded model). The final norm is
#: scaled so that the logits spread as SmolLM2's do (:data:`SMOLLM2_LOGIT_STD`): random weights
#: alone give nearly uniform next-token laws (logit std 0.48), whose noise work runs faster on a
#: CPU (no denormal numbers in the truncated Gumbels).
ARCH_MODELS = ("smollm2-arch-fp32", "smollm2-arch-bf16")
SMOLLM2_ARCH = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 9.999999747378752e-06, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
#: SmolLM2's per-step standard deviation of the logits over the vocabulary, averaged over a 32-token
#: sample after :data:`PROMPT` (3.55; the maximum minus the minimum is about 35).
SMOLLM2_LOGIT_STD = 3.55
PROMPT = "The old man walked to the city and"
ALT_PROMPT = "The young woman walked to the city and"
PROMPT_IDS = (504, 1573, 555, 13197, 288, 260, 2240, 284)
ALT_PROMPT_IDS = (504, 1805, 4166, 13197, 288, 260, 2240, 284)
TARGETS = {  # ratio name -> (target, True if the ratio must be at most the target)
    "abduction / forward": 1.25,
    "counterfactual / generate": 1.15,
    "cf(N=1) / (forward + generate)": 1.20,
    "batch N / N sequential": 0.50,
    "batch N / N x paper": 0.12,
}


@dataclass
class Setup:
    """One model configuration, ready to time."""

    name: str
    lm: HFLanguageModel
    scm: LanguageModelSCM
    prompt: torch.Tensor
    alt_prompt: torch.Tensor
    observed: torch.Tensor
    generate: Callable[[], torch.Tensor]


def load(name: str, device: str | None = None) -> HFLanguageModel:
    """A model of :data:`MODELS` or :data:`ARCH_MODELS` on ``device`` (default: ``load_lm``'s, a GPU if any)."""
    from pyro_lmscm.loading import check_device, load_lm

    if name == "tiny":
        from pyro_lmscm.testing import tiny_llama

        lm = tiny_llama()
        return HFLanguageModel(lm.model.to(check_device(device)), lm.tokenizer)
    if name in ARCH_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_ARCH)).eval()
        with torch.no_grad():
            spread = model(torch.tensor([PROMPT_IDS])).logits[0].std(-1).mean()
            model.model.norm.weight.mul_(SMOLLM2_LOGIT_STD / spread)
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        return HFLanguageModel(model.to(check_device(device), dtype).eval(), None)  # type: ignore[arg-type]
    dtype_name = {"smollm2-fp32": "float32", "smollm2-bf16": "bfloat16"}[name]
    return load_lm("smollm2-135m-instruct", dtype=dtype_name, device=device, progress=False)


def build(name: str, tokens: int, device: str | None = None) -> Setup:
    """The language model, an SCM that never stops early, two prompts, a T-token observation."""
    from transformers import GenerationConfig

    lm = load(name, device)
    if lm.tokenizer is not None and name != "tiny":
        prompt, alt_prompt = lm.encode(PROMPT), lm.encode(ALT_PROMPT)
    elif name in ARCH_MODELS:
        prompt, alt_prompt = torch.tensor(PROMPT_IDS), torch.tensor(ALT_PROMPT_IDS)
    else:  # tiny vocabulary: words "the old man ..." by id
        prompt, alt_prompt = torch.tensor([2, 3, 14, 4, 26, 9, 12, 3]), torch.tensor([2, 3, 15, 5, 26, 9, 12, 3])
    assert prompt.shape == alt_prompt.shape, "the two prompts must have the same length"
    config = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
        use_cache=True, pad_token_id=lm.pad_token_id, eos_token_id=lm.eos_token_ids or None,
    )
    input_ids = prompt[None].to(lm.device)
    attention_mask = torch.ones_like(input_ids)

    @torch.no_grad()
    def generate() -> torch.Tensor:
        return lm.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)

    generate.config = config  # type: ignore[attr-defined]  # (the N-row case decodes with the same settings)

    torch.manual_seed(0)
    observed = generate()[0, prompt.shape[-1]:].cpu()
    assert observed.shape[-1] == tokens and not bool(torch.isin(observed, torch.tensor(lm.eos_token_ids)).any())
    no_eos = copy.copy(lm)
    no_eos.eos_token_ids = []  # every row runs all T steps, like generate(min_new_tokens=T)
    scm = LanguageModelSCM(no_eos, max_new_tokens=tokens)
    return Setup(name, lm, scm, prompt, alt_prompt, observed, generate)


def cases(setup: Setup, draws: int, sequential: bool) -> dict[str, Callable[[], Any]]:
    scm, prompt, observed = setup.scm, setup.prompt, setup.observed
    inputs = torch.cat([prompt, observed[:-1]])[None].to(setup.lm.device)
    intervention = {"prompt": setup.alt_prompt}
    one = pyro.plate("__draws", 1, dim=-1)

    @torch.no_grad()
    def forward() -> torch.Tensor:  # what abduction needs: logits at the T observed positions
        return setup.lm.model(input_ids=inputs, use_cache=False, logits_to_keep=observed.shape[-1]).logits

    def abduction() -> torch.Tensor:  # a fresh guide: includes its forward pass
        return HindsightGumbelGuide(scm, observed).sample_noise(prompt, (1,))  # what counterfactual() runs

    def traced_abduction() -> poutine.Trace:  # the same draw as T Pyro sites
        return poutine.trace(one(HindsightGumbelGuide(scm, observed))).get_trace(prompt)

    guide_trace = traced_abduction()
    intervened = one(poutine.do(scm.model, data={scm.site("prompt"): setup.alt_prompt}))

    def prediction() -> torch.Tensor:
        return poutine.replay(intervened, trace=guide_trace)(prompt)

    paper = paper_counterfactual(setup)
    rows = setup.alt_prompt[None].expand(draws, -1).to(setup.lm.device)

    @torch.no_grad()
    def generate_rows() -> torch.Tensor:  # the model's own work of N draws: N rows of T sampled steps
        config = setup.generate.config  # type: ignore[attr-defined]
        return setup.lm.model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), generation_config=config)

    def whole(n: int, baseline: bool = False) -> Callable[[], Any]:
        return lambda: counterfactual(scm, prompt, observed, intervention, num_samples=n, baseline=baseline)

    timed = {
        "forward": forward,
        "abduction": abduction,
        "abduction, traced sites": traced_abduction,
        "generate": setup.generate,
        "counterfactual": prediction,
        "cf(N=1)": whole(1),
        "cf(N=1), baseline": whole(1, baseline=True),
        f"cf(N={draws})": whole(draws),
        f"generate, {draws} rows": generate_rows,
        "paper (1 CF)": paper,
    }
    if sequential:
        timed[f"{draws} x cf(N=1)"] = lambda: [whole(1)() for _ in range(draws)]
    return timed


def paper_counterfactual(setup: Setup) -> Callable[[], Any]:
    """One counterfactual of the observation by the seed paper's procedure (the per-counterfactual
    loop of ``bench_study.reference_case``): a teacher-forced pass for the factual logits, the
    hindsight Gumbel noise in numpy, then ``generate`` (greedy, ``min_new_tokens=T``) on the
    intervened prompt with the noise added by a logits processor."""
    import numpy as np
    from bench_study import GumbelProcessor, hindsight_noise
    from transformers import GenerationConfig, LogitsProcessorList

    model, prompt, observed = setup.lm.model, setup.prompt, setup.observed
    tokens = observed.shape[-1]
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=setup.lm.pad_token_id,
        eos_token_id=setup.lm.eos_token_ids or None,
    )
    full = torch.cat([prompt, observed])[None].to(setup.lm.device)
    alt = setup.alt_prompt[None].to(setup.lm.device)
    rng = np.random.default_rng(0)

    @torch.no_grad()
    def run() -> torch.Tensor:
        logits = model(full).logits[0, prompt.shape[-1] - 1 : -1].float().cpu().numpy()
        noise = hindsight_noise(logits.astype(np.float64), observed.numpy(), rng)
        processor = GumbelProcessor(torch.from_numpy(noise).float().to(setup.lm.device))
        return model.generate(
            input_ids=alt, attention_mask=torch.ones_like(alt), generation_config=greedy,
            logits_processor=LogitsProcessorList([processor]),
        )

    return run


def _synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it (nothing on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(timed: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    for fn in timed.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(reps):
        for name, fn in timed.items():
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def ratios(t: dict[str, float], draws: int) -> dict[str, tuple[float, str]]:
    sequential = t.get(f"{draws} x cf(N=1)")
    how = "measured"
    if sequential is None:
        sequential, how = draws * t["cf(N=1)"], f"{draws} x median of cf(N=1)"
    return {
        "abduction / forward": (t["abduction"] / t["forward"], ""),
        "abduction, traced sites / forward": (t["abduction, traced sites"] / t["forward"], ""),
        "counterfactual / generate": (t["counterfactual"] / t["generate"], ""),
        "cf(N=1) / (forward + generate)": (t["cf(N=1)"] / (t["forward"] + t["generate"]), ""),
        "cf(N=1), baseline / (forward + generate)": (t["cf(N=1), baseline"] / (t["forward"] + t["generate"]), ""),
        "batch N / N sequential": (t[f"cf(N={draws})"] / sequential, how),
        "batch N / N x paper": (t[f"cf(N={draws})"] / (draws * t["paper (1 CF)"]), f"{draws} x median of one"),
        # the floor of the last ratio on this hardware: the model's own decoding of N rows (no SCM)
        "generate N rows / N x paper": (t[f"generate, {draws} rows"] / (draws * t["paper (1 CF)"]), ""),
        "batch N / generate N rows": (t[f"cf(N={draws})"] / t[f"generate, {draws} rows"], ""),
    }


def markdown(results: dict[str, dict[str, float]], draws: int) -> str:
    names = list(results)
    lines = ["| time (ms, median) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    rows = list(next(iter(results.values())))
    for row in rows:
        cells = [f"{results[n][row] * 1e3:,.1f}" if row in results[n] else "—" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio (target) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    computed = {n: ratios(results[n], draws) for n in names}
    for key in computed[names[0]]:
        target = TARGETS.get(key)
        cells = []
        for n in names:
            value, how = computed[n][key]
            verdict = "" if target is None else (" pass" if value <= target else " **miss**")
            cells.append(f"{value:.3f}{verdict}" + (f" ({how})" if how else ""))
        label = f"{key} (≤ {target})" if target is not None else f"{key} (no target)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CATEGORIES = {
    "pyro": "Pyro: poutine handlers, primitives, distributions (and the torch calls they make)",
    "noise": "noise sampling: gumbel_max_posterior.py (RNG + elementwise)",
    "lm": "torch + transformers (the LM, tensor ops)",
    "pyro_lmscm": "pyro_lmscm, other Python (inline tensor operators count here)",
    "other": "other (NumPy, stdlib, ...)",
}


def profile(setup: Setup, draws: int) -> str:
    """Share of the time of ``counterfactual`` per category of :data:`CATEGORIES`."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return "pyinstrument is not installed: pip install -e '.[bench]'"
    sizes = (1, draws)
    lines = ["| share of time | " + " | ".join(f"cf(N={n})" for n in sizes) + " |", "|---|---:|---:|"]
    shares = []
    for n in sizes:
        def run(n: int = n) -> None:
            counterfactual(setup.scm, setup.prompt, setup.observed, {"prompt": setup.alt_prompt}, num_samples=n)

        run()
        profiler = Profiler(interval=0.0005)
        profiler.start()
        run()
        profiler.stop()
        shares.append(_shares(profiler.last_session.root_frame()))
    for key, label in CATEGORIES.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * s.get(key, 0.0):.2f} %" for s in shares) + " |")
    lines.append("| total (s, under the profiler) | " + " | ".join(f"{s['total']:.2f}" for s in shares) + " |")
    return "\n".join(lines)


#: The matrix-product kernels of a forward pass (the linears, the LM head; attention runs in
#: its own fused kernel and is not counted).
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_floor(setup: Setup, draws: int, reps: int) -> str:
    """What the matrix products alone of ``counterfactual(num_samples=N)`` cost against the seed
    paper's procedure run N times: the part of the ``batch N / N x paper`` ratio that no change
    of ours can remove, since the N rows must go through the model's linears and LM head.

    One run under ``torch.profiler`` gives the self time and FLOPs of :data:`GEMM_OPS`; the
    paper's counterfactual is timed without a profiler (median of ``reps``). For scale: this
    core's throughput on a large product (512 x 576 x 1536, the model's dtype), the best the
    same kernels do here."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def run() -> None:
        counterfactual(setup.scm, setup.prompt, setup.observed, {"prompt": setup.alt_prompt}, num_samples=draws)

    run()  # warm-up
    paper_s = measure({"paper": paper_counterfactual(setup)}, reps)["paper"]
    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        run()
        profiled_s = time.perf_counter() - start
    events = [event for event in prof.key_averages() if event.key in GEMM_OPS]
    gemm_s = sum(event.self_cpu_time_total for event in events) / 1e6
    gflop = sum(event.flops for event in events) / 1e9
    dtype = next(setup.lm.model.parameters()).dtype
    a, w = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    best = 2 * 512 * 576 * 1536 / measure({"product": lambda: torch.nn.functional.linear(a, w)}, 20)["product"] / 1e9
    return "\n".join([
        f"| GEMM floor, {setup.name} | value |",
        "|---|---:|",
        f"| cf(N={draws}) under the profiler (s) | {profiled_s:.4g} |",
        f"| its matrix products ({', '.join(GEMM_OPS)}), self time (s) | {gemm_s:.4g} |",
        f"| their work (GFLOP) / throughput (GFLOP/s) | {gflop:.4g} / {gflop / gemm_s:.1f} |",
        f"| this core on a 512 x 576 x 1536 product, {dtype} (GFLOP/s) | {best:.1f} |",
        f"| paper (1 CF), median of {reps} (s) | {paper_s:.4g} |",
        f"| matrix products of cf(N={draws}) / {draws} x paper (the target of the whole: ≤ 0.12) | "
        f"**{gemm_s / (draws * paper_s):.3f}** |",
    ])


def shared_prefixes(setup: Setup, draws: int, seeds: int) -> str:
    """How much decoding work sharing prefixes could save in ``counterfactual(num_samples=N)``:
    rows that have emitted the same tokens so far have the same next-token logits, so a decoder
    that ran each distinct prefix once would run, at step ``t``, only the distinct ``w_<t`` of the
    N rows. Reported over ``seeds`` calls: that share of the N x T row-steps, and the mean step at
    which a draw first leaves the observed string (before it, every row's prefix is the observed
    one, which one teacher-forced pass could cover). Counts, not times: the best any such
    scheme could do for the ``batch N / N x paper`` ratio."""
    tokens = setup.observed.shape[-1]
    distinct, divergence = [], []
    for seed in range(seeds):
        ids = counterfactual(
            setup.scm, setup.prompt, setup.observed, {"prompt": setup.alt_prompt}, num_samples=draws, seed=seed
        ).counterfactual_ids.cpu()
        rows = ids.tolist()
        distinct.append(sum(len({tuple(row[:t]) for row in rows}) for t in range(tokens)) / (draws * tokens))
        same = (ids == setup.observed).long().cumprod(-1).sum(-1)
        divergence.append(float(same.float().mean()))
    return "\n".join([
        f"| shared prefixes, {setup.name}, N = {draws}, T = {tokens}, {seeds} seeds | value |",
        "|---|---:|",
        f"| row-steps with a distinct prefix (what a prefix-sharing decoder runs) | {statistics.mean(distinct):.3f} |",
        f"| mean first step off the observed string (of {tokens}) | {statistics.mean(divergence):.2f} |",
    ])


def _category(path: str | None) -> str | None:
    if not path or path.startswith("<"):
        return None
    parts = Path(path).parts
    if parts[-1] == "gumbel_max_posterior.py":
        return "noise"
    for package, category in (("pyro_lmscm", "pyro_lmscm"), ("pyro", "pyro"), ("torch", "lm"), ("transformers", "lm")):
        if package in parts:
            return category
    return "other"


def _shares(root: Any) -> dict[str, float]:
    """Self time per category. A frame of ``gumbel_max_posterior.py`` takes its whole
    subtree; torch code called by Pyro counts as Pyro's; any other torch op counts as
    ``lm``; other C calls count as their caller's."""
    totals: dict[str, float] = {}

    def walk(frame: Any, inherited: str) -> None:
        category = _category(frame.file_path)
        if category is None:
            name = f"{frame.class_name or ''}.{frame.function or ''}"
            torch_op = any(key in name for key in ("Tensor", "_VariableFunctions", "torch", "_C."))
            category = "lm" if torch_op and inherited not in ("pyro", "noise") else inherited
        elif category == "lm" and inherited == "pyro" and "transformers" not in Path(frame.file_path).parts:
            category = "pyro"  # torch work on Pyro's behalf (torch.distributions, broadcasting)
        if category == "noise" or frame.is_synthetic_leaf or not frame.children:
            totals[category] = totals.get(category, 0.0) + frame.time
            return
        own = frame.time - sum(child.time for child in frame.children)
        totals[category] = totals.get(category, 0.0) + max(own, 0.0)
        for child in frame.children:
            walk(child, category)

    walk(root, "other")
    total = sum(totals.values())
    shares = {k: v / total for k, v in totals.items()}
    shares["total"] = total
    return shares


def _status_mb(key: str) -> float:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(name: str, tokens: int, draws: int, chunk_size: int | None, baseline: bool, case: str) -> None:
    """Peak resident memory above the model while one ``counterfactual`` runs (a fresh process).

    ``case`` "null": ``counterfactual(scm, prompt, None, {}, num_samples=draws, seed=0)`` on the
    SCM as loaded (it samples the factual string, then replays it); "prompt": the observed
    T-token string under another prompt, on the SCM that never stops early. A warm-up call
    with 2 draws first pages in the weights and builds every lazy buffer; the model's memory
    is the resident set after it. The peak is the kernel's high-water mark (``ru_maxrss``),
    reset to the current resident set after the warm-up (``/proc/self/clear_refs``), so it is
    the measured call's own peak."""
    import resource

    setup = build(name, tokens, device="cpu")  # resident memory: the target is the CPU's
    if case == "null":
        from pyro_lmscm import LanguageModelSCM

        scm, observed, intervention = LanguageModelSCM(setup.lm, max_new_tokens=tokens), None, {}
    else:
        scm, observed, intervention = setup.scm, setup.observed, {"prompt": setup.alt_prompt}
    kwargs: dict[str, Any] = {"baseline": baseline, "seed": 0}
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    counterfactual(scm, setup.prompt, observed, intervention, num_samples=2, **kwargs)
    model = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # the high-water mark starts again from the resident set
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    result = counterfactual(scm, setup.prompt, observed, intervention, num_samples=draws, **kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "model_mb": model, "peak_mb": peak - model, "after_mb": _status_mb("VmRSS") - model, "reset": reset,
        "steps": int(result.counterfactual_ids.shape[-1]), "factual_length": int(result.factual_ids.shape[-1]),
        "seconds": seconds,
    }))


def memory(name: str, tokens: int, draws: int, runs: list[tuple[str, int | None, bool]], threads: int) -> str:
    vocab = load(name, "cpu").vocab_size if name == "tiny" else 49152
    noise_mb = draws * tokens * vocab * 4 / 2**20
    lines = [
        (
            f"peak resident memory above the model (ru_maxrss, after a warm-up call), "
            f"`counterfactual(num_samples={draws})`, T = {tokens}, V = {vocab}; posterior noise N·T·V·4 B = "
            f"{noise_mb:,.0f} MB. null: `counterfactual(scm, prompt, None, {{}}, num_samples={draws}, seed=0)`; "
            "prompt: the observed string under another prompt"
        ),
        "",
        "| case | chunk_size | baseline | factual tokens | peak RSS increase (MB) | left after (MB) | time (s) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for case, chunk, baseline in runs:
        command = [
            sys.executable, __file__, "--memory-child", name, str(tokens), str(draws), str(chunk), str(baseline),
            case, "--threads", str(threads),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            lines.append(f"| {case} | {chunk} | {baseline} | failed: {out.stderr.strip().splitlines()[-1:]} | | | |")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        mark = "" if result["reset"] else " (high-water mark not reset)"
        lines.append(
            f"| {case} | {chunk} | {baseline} | {result['factual_length']} | {result['peak_mb']:,.0f}{mark} | "
            f"{result['after_mb']:,.0f} | {result['seconds']:.1f} |"
        )
    return "\n".join(lines)


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), " if torch.cuda.is_available() else ""
    return (
        f"{gpu}{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), transformers "
        f"{transformers.__version__}, pyro {pyro.__version__}, Python {platform.python_version()}; "
        f"load average at start {load:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repetitions (CI size)")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {MODELS + ARCH_MODELS}")
    parser.add_argument(
        "--device", default=None,
        help="cpu or cuda[:i] for the timed cases (default: a GPU if there is one); --memory and --floor: the CPU",
    )
    parser.add_argument("--tokens", type=int, default=64, help="T, observed and generated tokens")
    parser.add_argument("--draws", type=int, default=16, help="N, posterior draws in one batch")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case (median)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads, the same for every case (default 1: stable timings on a shared machine)",
    )
    parser.add_argument(
        "--sequential", choices=("run", "estimate"), default=None,
        help="run N sequential single-draw calls, or estimate them as N x cf(N=1) (default: run "
        "on the tiny model, estimate on SmolLM2)",
    )
    parser.add_argument("--profile", action="store_true", help="pyinstrument: Pyro's share of the time")
    parser.add_argument(
        "--floor", action="store_true",
        help="only the matrix products' share of batch N / N x paper (torch.profiler), per model",
    )
    parser.add_argument(
        "--prefixes", action="store_true",
        help="only the share of the N x T row-steps with a distinct prefix (what sharing prefixes could save)",
    )
    parser.add_argument("--memory", action="store_true", help="peak memory of num_samples=64 per chunk_size")
    parser.add_argument(
        "--memory-only", action="store_true",
        help="only the memory runs: the null intervention without chunks (the target: at most 150 MB on SmolLM2 "
        "fp32 at T = 64), then the other cases",
    )
    parser.add_argument(
        "--memory-runs", default="null,prompt,prompt:16,prompt:4,prompt+baseline,prompt:16+baseline",
        help="the memory runs, comma-separated: case (null or prompt), then :chunk_size, then +baseline",
    )
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, tokens, draws, chunk, baseline, case = args.memory_child
        memory_child(name, int(tokens), int(draws), None if chunk == "None" else int(chunk), baseline == "True", case)
        return
    memory_runs: list[tuple[str, int | None, bool]] = []
    for run in args.memory_runs.split(","):
        case, _, chunk = run.removesuffix("+baseline").partition(":")
        memory_runs.append((case, int(chunk) if chunk else None, run.endswith("+baseline")))
    if args.memory_only:
        name = "tiny" if args.quick else (args.models or "smollm2-fp32").split(",")[0]
        print(f"Machine: {machine(args.threads)}\n")
        print(memory(name, args.tokens, 64, memory_runs, args.threads))
        return

    models = args.models.split(",") if args.models else (["tiny"] if args.quick else list(MODELS))
    reps = args.reps or (3 if args.quick else 5)
    print(f"Machine: {machine(args.threads)}\n")
    if args.prefixes:
        for name in models:
            print(shared_prefixes(build(name, args.tokens, device="cpu"), args.draws, 5) + "\n")
        return
    if args.floor:
        for name in models:
            print(gemm_floor(build(name, args.tokens, device="cpu"), args.draws, reps) + "\n")
        return
    print(f"T = {args.tokens} tokens, N = {args.draws} draws, median of {reps} interleaved repetitions "
          f"({4 * reps} on tiny).\n")
    results = {}
    for name in models:
        setup = build(name, args.tokens, args.device)
        sequential = args.sequential or ("run" if name == "tiny" else "estimate")
        start = time.perf_counter()
        # the tiny model's cases take milliseconds: more repetitions against scheduler noise
        results[name] = measure(cases(setup, args.draws, sequential == "run"), reps * 4 if name == "tiny" else reps)
        print(f"  {name}: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if args.profile:
            print(f"### Profile, {name}\n\n{profile(setup, args.draws)}\n")
        del setup
    print(markdown(results, args.draws))
    if args.memory:
        if "chunk_size" not in inspect.signature(counterfactual).parameters:
            print("\n(counterfactual has no chunk_size: memory skipped)")
            return
        name = "tiny" if args.quick else "smollm2-fp32"
        print()
        print(memory(name, args.tokens, 64, memory_runs, args.threads))


if __name__ == "__main__":
    main()
