"""``pyro-lmscm attribute``: which layers of an intervention (or which steps) change an observed string."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..defaults import DEFAULTS
from .app import (
    app,
    console,
    device_option,
    dtype_option,
    err_console,
    flag,
    model_option,
    one_line_errors,
    progress_bar,
    quiet_option,
)

__all__ = ["attribute_command"]


def _number(value: float | None, digits: str = ".4g") -> str:
    return "-" if value is None else format(value, digits)


@app.command("attribute")
def attribute_command(
    prompt: str = typer.Option(..., help="Prompt text."),
    text: str = typer.Option(..., help="The observed continuation text."),
    intervention: str = typer.Option(
        ...,
        help="Spec selecting a mechanism, as for `counterfactual`: 'memit=...', 'finetune=victorian', "
        "'model=PATH' (split as its weight difference per layer), 'steer=female:1.0:4,8,12' (steering at several "
        "layers), or a JSON/YAML file.",
    ),
    by: str = typer.Option("layer", help="'layer': the mechanism's parts; 'step': acting from step s on."),
    model: str = model_option(),
    max_exact_parts: int = typer.Option(12, min=0, help="Exact Shapley values up to this many parts."),
    permutations: int = typer.Option(64, min=1, help="Random orders of the Shapley estimate above that."),
    seed: int = typer.Option(DEFAULTS.seed),
    temperature: float = typer.Option(DEFAULTS.temperature),
    top_k: Optional[int] = typer.Option(DEFAULTS.top_k, help="Keep the k most likely tokens (default: all)."),
    top_p: Optional[float] = typer.Option(DEFAULTS.top_p, help="Nucleus mass (default: all tokens)."),
    dtype: str = dtype_option(),
    device: Optional[str] = device_option(),
    as_json: bool = flag("--json", help="Print JSON instead of a table."),
    quiet: bool = quiet_option(),
    plot: Optional[Path] = typer.Option(None, help="Also save a bar chart (PNG) of the values per part or step."),
) -> None:
    """Exact attribution of an intervention's effect on the observed string: P(unchanged) with each
    part alone and without it, and Shapley values of log P(unchanged) and E[first divergence]
    (or, with --by step, the effect of acting from each step on)."""
    from ..inference import StepAttribution, attribute
    from ..interventions.spec import parse_intervention
    from ..loading import load_lm
    from ..models import Decoding, LanguageModelSCM
    from ..runtime import compute_scope

    with one_line_errors():
        start = time.perf_counter()
        lm = load_lm(model, dtype=dtype, device=device, progress=not as_json)
        with compute_scope(lm), progress_bar(quiet):
            spec = parse_intervention(intervention, lm)
            observed = lm.encode(text)
            scm = LanguageModelSCM(lm, int(observed.shape[-1]), Decoding(temperature, top_k, top_p), spec.mechanisms)
            result = attribute(
                scm, lm.encode(prompt), observed, spec.intervention, by=by, max_exact_parts=max_exact_parts,
                num_permutations=permutations, seed=seed,
            )
        seconds = time.perf_counter() - start
        if plot is not None:
            result.plot().savefig(plot, dpi=120)
            err_console.print(f"saved {plot}")
        if as_json:
            json.dump({"intervention": intervention, **result.to_dict(), "seconds": seconds}, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        if isinstance(result, StepAttribution):
            table = Table(title=f"{escape(intervention)}: acting from step s on ({result.num_passes} passes)")
            for column in ("step", "token", "P(unchanged) from s", "E[first div.] from s", "effect on log P"):
                table.add_column(escape(column), justify="left" if column == "token" else "right")
            tokens = lm.token_texts(observed.tolist())
            for s in result.steps:
                table.add_row(str(s), repr(tokens[s]), _number(result.prob_unchanged_from[s]),
                              _number(result.first_divergence_from[s], ".3f"), _number(result.effect[s], ".3g"))
            console.print(table)
            console.print(f"acting matters from step {result.first_step_that_matters} to step "
                          f"{result.last_step_that_matters}")
        else:
            how = "exact" if result.exact else f"{result.num_permutations} permutations, ± s.e."
            table = Table(title=f"{escape(intervention)}: P(unchanged) = {result.prob_unchanged:.4g} "
                                f"(Shapley {how}; {result.num_passes} passes)")
            columns = ("part", "P(unchanged) alone", "P(unchanged) without", "Shapley log P", "Shapley E[first div.]")
            for column in columns:
                table.add_column(escape(column), justify="left" if column == "part" else "right")
            for part in result.parts:
                error = "" if result.exact else f" ± {result.shapley_se[part]:.2g}"
                table.add_row(part, _number(result.prob_unchanged_alone[part]),
                              _number(result.prob_unchanged_without[part]),
                              _number(result.shapley[part], ".3g") + error,
                              _number(result.shapley_first_divergence[part], ".3g"))
            console.print(table)
            total = sum(result.shapley.values())
            whole = math.log(result.prob_unchanged) if result.prob_unchanged > 0 else -math.inf
            console.print(f"Shapley values add up to {total:.6g}; log P(unchanged) of the whole minus that of no "
                          f"part = {whole - math.log(result.prob_unchanged_empty):.6g}")
        console.print(f"[dim]loaded and attributed (one teacher-forced pass per subset) in {seconds:.1f} s[/]")
