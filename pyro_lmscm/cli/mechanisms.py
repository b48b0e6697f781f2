"""``pyro-lmscm compare-mechanisms``: how much counterfactuals depend on the noise model."""

from __future__ import annotations

import json
import time
from typing import Optional

import torch
import typer
from rich.table import Table

from ..defaults import DEFAULTS
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

__all__ = ["compare_mechanisms_command"]


def _noise_label(noise: str) -> str:
    """A short name of a noise model's repr, distinct per row: ``Gumbel-max``,
    ``inverse CDF, probability order``."""
    import re

    match = re.fullmatch(r"InverseCDF\(order='(\w+)'(.*)\)", noise)
    if match:
        return f"inverse CDF, {match.group(1)} order" + (", permuted" if match.group(2) else "")
    return "Gumbel-max" if noise == "GumbelMax()" else noise


@app.command("compare-mechanisms")
def compare_mechanisms_command(
    intervention: str = typer.Option("steer=female", help="Intervention spec, as for `counterfactual`."),
    corpus: str = typer.Option("demo", help="A corpus file (.txt/.jsonl/.csv) or 'demo'."),
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N strings."),
    model: str = model_option(),
    tiny: bool = flag("--tiny", help="A tiny random model (fast, for tests)."),
    samples: int = typer.Option(8, min=1, help="Sampled counterfactuals per string and noise model."),
    max_new_tokens: int = typer.Option(DEFAULTS.max_new_tokens, min=1),
    dtype: str = dtype_option(),
    device: Optional[str] = device_option(),
    seed: int = typer.Option(DEFAULTS.seed, min=0),
    threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="Torch CPU threads."),
    json_output: bool = flag("--json", help="Print JSON instead of a table."),
    quiet: bool = quiet_option(),
) -> None:
    """Gumbel-max vs inverse-CDF (probability and vocabulary order) on the same observations:
    exact P(unchanged), exact expected first divergence, sampled edit distance, and the
    shift of the expected first divergence when the vocabulary is relabelled."""
    from ..inference import compare_mechanisms
    from ..interventions.spec import describe, parse_intervention
    from ..models import LanguageModelSCM
    from ..runtime import compute_scope
    from ..study.config import StudyConfig
    from ..study.corpus import read_corpus

    with one_line_errors():
        if threads is not None:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        if tiny:
            from ..testing import tiny_llama

            lm = tiny_llama()
        else:
            from ..loading import load_lm

            lm = load_lm(model, dtype=dtype, device=device, progress=not json_output)
        items = read_corpus(StudyConfig(corpus=corpus).corpus_path if corpus == "demo" else corpus)
        items = items[:limit] if limit is not None else items
        with compute_scope(lm), progress_bar(quiet):  # building the intervention and the queries
            spec = parse_intervention(intervention, lm)
            scm = LanguageModelSCM(lm, max_new_tokens, mechanisms=spec.mechanisms)
            prompts = [lm.encode(item.prompt) for item in items]
            observed = [
                None if item.continuation is None else lm.encode(item.continuation)[:max_new_tokens] for item in items
            ]
            rows = compare_mechanisms(scm, prompts, spec.intervention, observed, num_samples=samples, seed=seed)
        seconds = time.perf_counter() - start
        if json_output:
            print(json.dumps({"rows": [row.to_dict() for row in rows], "seconds": seconds}, indent=2))
            return
        table = Table(
            title=f"{describe(intervention)} over {len(items)} strings, {max_new_tokens} tokens, {samples} draws"
        )
        for column in ("noise model", "exact P(unchanged)", "exact E[first div.]", "edit distance",
                       "relabel shift (mean / max)", "strings"):
            if column == "noise model":
                table.add_column(column, justify="left", overflow="fold", min_width=20)
            else:
                table.add_column(column, justify="right")
        for row in rows:
            table.add_row(_noise_label(row.noise), f"{row.prob_unchanged:.4f}", f"{row.expected_first_divergence:.2f}",
                          f"{row.edit_distance:.3f}", f"{row.relabel_shift:.1e} / {row.relabel_shift_max:.1e}",
                          str(row.strings))
        console.print(table)
        console.print(f"loaded, sampled and scored in {seconds:.0f} s")
