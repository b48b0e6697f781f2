"""``pyro-lmscm study``: run, resume or re-report a counterfactual study from the command line.

Flags override the values of a config file.

    pyro-lmscm study --demo                                   # the built-in SmolLM2 study
    pyro-lmscm study my_study.yaml --samples 8 --ray          # a config file, on Ray
    pyro-lmscm study --corpus prompts.jsonl --intervention 'steer=female:1.0' -o out/
    pyro-lmscm study --report-only -o out/                    # rewrite the report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import LMSCMError, StudyError
from ..validation import MAX_THREADS
from .app import app, device_option, flag, one_line, progress_bar

__all__ = ["study_command"]

_console = Console()
_err = Console(stderr=True)


def _attribute(value: str | None) -> Any:
    if value is None:
        return None
    if value.lower() == "none":
        return "none"
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as error:
            raise StudyError(f"--attribute {value!r:.80} is not a valid JSON mapping: {error}.") from None
    return value


def _paper(
    output, model, dtype, samples, max_new_tokens, limit, seed, bootstrap, threads, progress, batch_size, draw_scores
) -> None:
    from ..study.paper import run_paper_study

    options = {
        "model": model, "dtype": dtype, "num_samples": samples, "max_new_tokens": max_new_tokens,
        "limit": limit, "seed": seed, "bootstrap": bootstrap, "threads": threads, "batch_size": batch_size,
        "draw_scores": draw_scores,
    }
    def on_row(row: Any) -> None:
        mean = {end: row.get(f"prob_unchanged_{end}", "exact") for end in ("gumbel", "stable_low", "stable_high",
                                                                           "any_low", "any_high")}
        bounds = ""
        if all(value is not None for value in mean.values()):
            bounds = (
                f", mean P(unchanged) {mean['gumbel'].mean:.3g} (stable mechanisms {mean['stable_low'].mean:.3g}–"
                f"{mean['stable_high'].mean:.3g}; any mechanism {mean['any_low'].mean:.3g}–{mean['any_high'].mean:.3g})"
            )
        _console.print(f"[bold]{escape(row.row.label)}[/]: {row.strings} strings, {row.seconds:.0f} s{escape(bounds)}")

    result = run_paper_study(
        output or "studies/paper", progress=progress, **{k: v for k, v in options.items() if v is not None},
        on_row=on_row,
    )
    _console.print(result.markdown, markup=False, highlight=False, soft_wrap=True)
    _console.print(f"[bold]report:[/] {result.files['html']}")


@app.command("study")
def study_command(
    config: Optional[Path] = typer.Argument(None, help="A YAML or JSON study config (see StudyConfig)."),
    demo: bool = flag("--demo", help="The built-in demo study: 50 prompts, SmolLM2, steered toward 'female' "
                      "(results in studies/demo)."),
    paper: bool = flag(
        "--paper", help="The paper's side-effect comparison: MEMIT, ROME, steering, MiMiC, a LoRA fine-tune "
        "on 200 encyclopaedic beginnings (SmolLM2, fp32, 25 tokens; --samples, --limit, --output apply)."
    ),
    corpus: Optional[str] = typer.Option(None, help="Corpus of prompts: .txt, .jsonl or .csv (or 'demo')."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Results folder (default studies/<name>)."),
    name: Optional[str] = typer.Option(None, help="Study name."),
    model: Optional[str] = typer.Option(None, help="Embedded model name, HF folder or hub id."),
    dtype: Optional[str] = typer.Option(None, help="float32 or bfloat16 (default: float32)."),
    intervention: Optional[str] = typer.Option(
        None, help="Spec ('steer=female:1.0', 'model=PATH', 'w_0=\"She\"') or a JSON/YAML file."
    ),
    samples: Optional[int] = typer.Option(None, min=1, help="Posterior (and interventional) draws per string."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1),
    temperature: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None, min=0, help="Keep the k most likely tokens (default: all; 0: all)."),
    top_p: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, min=0),
    attribute: Optional[str] = typer.Option(None, help="'gender', 'gender:male', 'none', or a JSON mapping."),
    format: Optional[str] = typer.Option(None, "--format", help="Records as jsonl or parquet."),
    threads: Optional[int] = typer.Option(
        None, min=1, max=MAX_THREADS, help="Torch threads per process (and per Ray worker)."
    ),
    limit: Optional[int] = typer.Option(None, min=0, help="Only the first N strings."),
    bootstrap: Optional[int] = typer.Option(None, min=1, help="Bootstrap resamples."),
    ray: bool = flag("--ray", help="Run on a local Ray instance (or --ray-address)."),
    ray_address: Optional[str] = typer.Option(None, help="Address of a Ray cluster."),
    workers: Optional[int] = typer.Option(None, min=1, help="Ray workers, one model each."),
    shard_size: Optional[int] = typer.Option(None, min=1, help="Strings per Ray task."),
    report_only: bool = flag(
        "--report-only", help="Rewrite the report of --output (with --demo: studies/demo) from its records."
    ),
    no_report: bool = flag("--no-report", help="Skip tables, plots and HTML."),
    no_progress: bool = flag("--no-progress", "--quiet", "-q", help="No progress bar."),
    allow_code: bool = flag(
        "--allow-code", help="Allow an attribute that names a Python function to run on every text."
    ),
    force_recompute: bool = flag(
        "--force-recompute", help="Recompute records whose inputs changed, instead of refusing to resume."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Strings decoded together (default 16; 1 runs each alone). "
        "Results are reproducible for a given batch size."
    ),
    exact_only: bool = flag(
        "--exact-only", help="Only the exact metrics per string, no draws: P(unchanged), the first-divergence "
        "law, the most probable counterfactual."
    ),
    no_draw_scores: bool = flag(
        "--no-draw-scores", help="Do not score the draws (their log-probabilities under both models and "
        "exact token probabilities stay null): about 1.5-2x faster in batches."
    ),
    device: Optional[str] = device_option(),
    attribution: Optional[str] = typer.Option(
        None, "--attribution", help="'layer': add each string's exact attribution of the effect to the parts of the "
        "intervention's mechanism (Shapley values, each part alone and left out); 'none' for none."
    ),
) -> None:
    """A counterfactual study over a corpus: tables, plots and an HTML report; resumable."""
    from ..study.config import StudyConfig, demo_config
    from ..study.report import write_report
    from ..study.runner import load_study, run_study

    try:
        if paper:
            if demo or config is not None or corpus is not None or report_only:
                raise StudyError("--paper runs its own corpus and interventions; drop --demo, --corpus and configs.")
            if exact_only or (device is not None and device != "cpu"):
                raise StudyError("--paper reports draws on the CPU; drop --exact-only and --device.")
            _paper(output, model, dtype, samples, max_new_tokens, limit, seed, bootstrap, threads, not no_progress,
                   batch_size, False if no_draw_scores else None)
            return
        if report_only:
            if output is None and demo:
                output = str(demo_config().output_dir)
            if output is None:
                raise StudyError("--report-only needs --output (or --demo), the folder of an existing study.")
            study, records = load_study(output)
            files = write_report(study.output_dir, records, study)
            summary = files["summary_md"].read_text(encoding="utf-8")
            _console.print(summary, markup=False, highlight=False, soft_wrap=True)
            _console.print(f"[bold]report:[/] {files['html']}")
            return
        if corpus is not None and corpus != "demo":
            corpus = str(Path(corpus).resolve())  # relative to the working directory, not the config
        overrides: dict[str, Any] = {
            "corpus": corpus,
            "output": output,
            "name": name,
            "model": model,
            "dtype": dtype,
            "intervention": intervention,
            "num_samples": samples,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "attribute": _attribute(attribute),
            "format": format,
            "threads": threads,
            "limit": limit,
            "bootstrap": bootstrap,
            "ray": True if ray else None,
            "ray_address": ray_address,
            "num_workers": workers,
            "shard_size": shard_size,
            "report": False if no_report else None,
            "progress": False if no_progress else None,
            "force_recompute": True if force_recompute else None,
            "batch_size": batch_size,
            "exact_only": True if exact_only else None,
            "draw_scores": False if no_draw_scores else None,
            "device": device,
            "attribution": attribution,
        }
        if demo and config is not None:
            raise StudyError("give either a config file or --demo, not both.")
        if demo:
            study = demo_config(allow_code=allow_code, **overrides)
        elif config is not None:
            study = StudyConfig.from_file(config, allow_code=allow_code, **overrides)
        elif corpus is not None:
            given = {k: v for k, v in overrides.items() if v is not None}
            study = StudyConfig.from_mapping(given, allow_code=allow_code)
        else:
            raise StudyError("give a config file, --demo, or --corpus FILE.")
        if study.top_k == 0:
            study = StudyConfig.from_mapping({**study.to_dict(), "top_k": None}, allow_code=allow_code)
        if study.attribution == "none":
            study = StudyConfig.from_mapping({**study.to_dict(), "attribution": None}, allow_code=allow_code)
        if study.attribute == "none":
            study = StudyConfig.from_mapping({**study.to_dict(), "attribute": None}, allow_code=allow_code)
        with progress_bar(not study.progress):
            result = run_study(study)
    except (LMSCMError, ValueError) as error:
        _err.print(f"[bold red]error:[/] {one_line(error)}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    recomputed = f" ({result.recomputed} of them again, with their changed batch)" if result.recomputed else ""
    _console.print(
        f"{result.computed} strings computed{recomputed}, {result.skipped} resumed; loaded, decoded, scored and "
        f"reported in {result.elapsed_s:.1f} s "
        f"-> {result.output_dir}"
    )
    if result.summary_markdown is not None:
        _console.print(result.summary_markdown, markup=False, highlight=False, soft_wrap=True)
        _console.print(f"[bold]report:[/] {result.files['html']}")
