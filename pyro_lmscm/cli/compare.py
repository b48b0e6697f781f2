"""``pyro-lmscm compare-inference``: exact abduction against approximate inference, as a table and a plot.

The question, the methods and the references are in ``examples/compare_inference.py``,
which runs this command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import typer

from ..defaults import DEFAULTS
from ..inference import (
    NUTS_MAX_VOCAB,
    AbductionComparison,
    Exact,
    Importance,
    Prior,
    RelaxedNUTS,
    RelaxedSVI,
    compare_abduction,
    plot_comparison,
)
from ..models import LanguageModelSCM
from ..runtime import compute_scope
from ..validation import MAX_THREADS
from .app import (
    app,
    console,
    device_option,
    dtype_option,
    flag,
    model_option,
    one_line_errors,
    progress_bar,
    quiet_option,
)

__all__ = ["compare_inference"]

PROMPTS = {  # (factual prompt, counterfactual prompt)
    "tiny": ("the doctor said", "the nurse said"),
    "lm": ("My friend is a doctor. Yesterday", "My friend is a nurse. Yesterday"),
}
METHOD_NAMES = ("exact", "importance", "relaxed-svi", "relaxed-nuts", "prior")


@app.command("compare-inference")
def compare_inference(
    tiny: bool = flag("--tiny", help="Use a tiny random model (fast, for CI)."),
    model: str = model_option(),
    dtype: str = dtype_option(),
    device: Optional[str] = device_option(),
    prompt: Optional[str] = typer.Option(None, help="The factual prompt."),
    counterfactual_prompt: Optional[str] = typer.Option(None, help="The prompt under the intervention."),
    observed: Optional[str] = typer.Option(None, help="The observed continuation (default: sampled)."),
    max_new_tokens: int = typer.Option(5, min=1),
    num_samples: int = typer.Option(64, min=1, help="Draws per method."),
    reference_samples: Optional[int] = typer.Option(None, min=1, help="Exact reference draws."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated; default: all that fit the model."),
    temperature: float = typer.Option(0.05, help="Relaxation temperature tau of SVI."),
    nuts_temperature: float = typer.Option(0.1, help="Relaxation temperature tau of NUTS."),
    svi_steps: int = typer.Option(300, min=0),
    svi_particles: int = typer.Option(2, min=1),
    svi_lr: float = typer.Option(0.1, help="Adam learning rate of SVI."),
    nuts_warmup: int = typer.Option(50, min=0),
    nuts_tree_depth: int = typer.Option(5, min=1),
    seed: int = typer.Option(DEFAULTS.seed, min=0),
    plot: Path = typer.Option(Path("compare_inference.png"), help="PNG to write."),
    threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="Torch CPU threads."),
    quiet: bool = quiet_option(),
) -> None:
    """Exact abduction vs importance sampling, relaxed SVI and NUTS: a table and an ArviZ plot."""
    with one_line_errors():
        if threads is not None:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        if tiny:
            from ..testing import tiny_llama

            lm, name = tiny_llama(), "tiny random Llama"
        else:
            from ..loading import load_lm

            lm, name = load_lm(model, dtype=dtype, device=device), model
        default_prompt, default_counterfactual = PROMPTS["tiny" if tiny else "lm"]
        prompt_text = prompt or default_prompt
        counterfactual_text = counterfactual_prompt or default_counterfactual
        scm = LanguageModelSCM(lm, max_new_tokens=max_new_tokens)
        available = {
            "exact": lambda: Exact(),
            "importance": lambda: Importance(),
            "relaxed-svi": lambda: RelaxedSVI(
                temperature=temperature, num_steps=svi_steps, learning_rate=svi_lr, num_particles=svi_particles
            ),
            "relaxed-nuts": lambda: RelaxedNUTS(
                temperature=nuts_temperature, warmup_steps=nuts_warmup, max_tree_depth=nuts_tree_depth
            ),
            "prior": lambda: Prior(),
        }
        if methods is None:
            names = [n for n in METHOD_NAMES if n != "relaxed-nuts" or scm.vocab_size <= NUTS_MAX_VOCAB]
            if scm.vocab_size > NUTS_MAX_VOCAB:
                console.print(
                    f"(relaxed-nuts left out: vocabulary {scm.vocab_size} > {NUTS_MAX_VOCAB}; HMC over n*V dims)"
                )
        else:
            names = [n.strip() for n in methods.split(",") if n.strip()]
            unknown = sorted(set(names) - set(available))
            if unknown:
                raise typer.BadParameter(
                    f"unknown methods {unknown}; choose from {sorted(available)}", param_hint="--methods"
                )
        console.print(f"model: {name} (vocabulary {scm.vocab_size}), loaded in {time.perf_counter() - start:.1f} s")
        with compute_scope(lm), progress_bar(quiet):
            comparison = compare_abduction(
                scm, lm.encode(prompt_text), None if observed is None else lm.encode(observed),
                {"prompt": lm.encode(counterfactual_text)}, [available[n]() for n in names], num_samples,
                reference_samples=reference_samples, seed=seed,
            )
        _report(comparison, prompt_text, counterfactual_text)
        title = f"{name}: {prompt_text!r} -> {counterfactual_text!r}, {num_samples} draws per method"
        for label in plot_comparison(comparison, plot, title):
            console.print(f"(plot: {label} left out, too few draws of positive weight)")
        console.print(f"\nsaved {plot}; loaded, compared and plotted in {time.perf_counter() - start:.1f} s")


def _report(comparison: AbductionComparison, prompt_text: str, counterfactual_text: str) -> None:
    reference = comparison.reference
    out = [
        f"\nprompt:          {prompt_text!r}",
        f"observed:        {reference.factual_text!r}",
        f"intervention:    prompt := {counterfactual_text!r}\n",
        comparison.to_markdown(),
        "\nmost frequent exact counterfactual strings:",
        *(f"  {count:4d}  {text!r}" for text, count in list(reference.text_counts().items())[:5]),
        "most frequent interventional strings (fresh noise):",
        *(f"  {count:4d}  {text!r}" for text, count in list(comparison.interventional.text_counts().items())[:5]),
    ]
    for statistic in ("changed", "edit_distance"):
        cf = reference.expectation(statistic)
        iv = comparison.interventional.expectation(statistic)
        out.append(f"{statistic:>14}: counterfactual {cf}, interventional {iv}, difference {cf - iv}")
    console.print("\n".join(out), markup=False, highlight=False, soft_wrap=True)
