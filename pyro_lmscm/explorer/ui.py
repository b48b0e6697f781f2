"""The explorer's Gradio page (``pyro-lmscm app``; needs the optional extra ``pyro-lmscm[app]``).

:func:`build_app` lays out the page on an :class:`~pyro_lmscm.explorer.session.Explorer`:
a prompt, an observed continuation (or "Sample one"), an intervention (gender steering with
α, a ROME edit, a prompt edit, forcing or excluding a token at a step -- chosen by clicking
that token in the factual string -- or a second model folder), settings, and the outputs:
the aligned worlds (:mod:`.render`), P(unchanged), the law of the first divergence as a bar
plot and the most probable counterfactual. A bad input shows its message in the page
(``#message``); the server keeps running.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from ..defaults import DEFAULTS
from ..errors import InferenceError, LMSCMError
from ..validation import as_int, as_real
from .render import first_divergence_figure, render_summary, render_worlds
from .session import Explorer, ExploreRequest

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["INTERVENTIONS", "build_app", "intervention_spec", "serve", "theme"]

logger = logging.getLogger(__name__)

STEER, ROME, PROMPT, TOKEN, MODEL, NONE = (
    "gender steering", "ROME edit", "prompt edit", "force / exclude a token", "second model", "none",
)
INTERVENTIONS = (STEER, ROME, PROMPT, TOKEN, MODEL, NONE)
EXCLUDE, FORCE = "exclude the factual token", "force a token"

DEFAULT_PROMPT = "My brother is a doctor. Every morning, he"


def intervention_spec(
    kind: str,
    direction: str = "female",
    alpha: float = 1.0,
    subject: str = "",
    rome_prompt: str = "",
    target: str = "",
    new_prompt: str = "",
    step: float | None = None,
    action: str = EXCLUDE,
    token: str = "",
    folder: str = "",
) -> dict[str, Any]:
    """The spec mapping (:func:`~pyro_lmscm.interventions.spec.parse_intervention`) of the
    page's intervention controls; its values are checked there."""
    from ..errors import InterventionError

    if kind == STEER:
        return {"steer": {"direction": direction, "alpha": as_real(alpha, "alpha", error=InterventionError)}}
    if kind == ROME:
        return {"rome": {"subject": subject, "prompt": rome_prompt, "target": target}}
    if kind == PROMPT:
        if not new_prompt or not new_prompt.strip():
            raise InterventionError("prompt edit: type the new prompt.")
        return {"prompt": new_prompt}
    if kind == TOKEN:
        if not isinstance(step, (int, float)) or not math.isfinite(step) or step != int(step) or step < 0:
            raise InterventionError("click a token of the factual string (or type a step) to force or exclude it.")
        if action == EXCLUDE:
            return {f"exclude_{int(step)}": "factual"}
        if not token:
            raise InterventionError("force a token: type the token to force (one token, mind the leading space).")
        return {f"w_{int(step)}": f'"{token}"'}  # quoted: a text, even one made of digits
    if kind == MODEL:
        if not folder or not folder.strip():
            raise InterventionError("second model: type the folder of a model with the same tokenizer.")
        return {"model": folder.strip()}
    if kind == NONE:
        return {}
    raise InterventionError(f"unknown intervention {kind!r}; choose one of {', '.join(INTERVENTIONS)}.")


def theme() -> Any:
    """Gradio's default theme on the system's fonts: some Gradio releases (6.0) fetch theirs
    from Google Fonts, and the page must work offline."""
    import gradio as gr

    return gr.themes.Default(
        font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace")
    )


def serve(explorer: Explorer, model_name: str = "", host: str = "127.0.0.1", port: int = 7860) -> None:
    """Build the page and serve it until interrupted, one run at a time (the model is
    shared); ``port=0`` takes a free port."""
    if port == 0:
        import socket

        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    demo = build_app(explorer, model_name=model_name)
    print(f"serving the explorer on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, show_error=True, quiet=True, share=False, theme=theme()
    )


def _whole(value: Any, name: str) -> int:
    """A number field of the page (a float from ``gr.Number``) as an ``int``.

    :raises InferenceError: naming the field, for an empty field or a fraction.
    """
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return as_int(value, name, error=InferenceError)


def _message(error: BaseException) -> str:
    return f"⚠️ **{type(error).__name__}:** {error}"


def build_app(explorer: Explorer, model_name: str = "", title: str = "pyro-lmscm explorer") -> gr.Blocks:
    """The Gradio page on ``explorer`` (launch it with ``.launch()``); ``model_name`` is
    shown in the header."""
    import gradio as gr

    def _state(prompt: str, ids: list[int]) -> dict[str, Any]:
        """The factual string as the page holds it: its text (without the end of sequence,
        as the observed box shows it) and its ids, which win while the text is unchanged."""
        eos = explorer.lm.eos_token_ids
        text = explorer.lm.decode([i for i in ids if i not in eos])
        return {"prompt": prompt, "text": text, "ids": ids, "tokens": explorer.token_texts(ids)}

    def factual_value(state: dict | None) -> list[tuple[str, str | None]]:
        if not state:
            return []
        # one labelled segment per step (unlabelled ones are not clickable in every Gradio
        # release; adjacent segments are not merged, so the clicked index is the step)
        return [(text, "observed") for text in state["tokens"]]

    def sample(prompt, seed, top_k, max_new_tokens):
        try:
            steps = _whole(max_new_tokens, "tokens") or DEFAULTS.max_new_tokens
            ids = explorer.sample(prompt, steps, _whole(seed, "seed"), _whole(top_k, "top-k") or None)
        except LMSCMError as error:
            return gr.skip(), gr.skip(), gr.skip(), _message(error)
        state = _state(prompt, ids)
        return state["text"], factual_value(state), state, ""

    def run(prompt, observed, state, kind, direction, alpha, subject, rome_prompt, target, new_prompt, step,
            action, token, folder, num_samples, seed, top_k, max_new_tokens, baseline,
            progress=gr.Progress()):
        skip = (gr.skip(),) * 6
        try:
            spec = intervention_spec(
                kind, direction, alpha, subject, rome_prompt, target, new_prompt, step, action, token, folder
            )
            same = bool(state) and state["prompt"] == prompt and state["text"] == (observed or "")
            request = ExploreRequest(
                prompt=prompt,
                observed=observed,
                observed_ids=state["ids"] if same else None,
                intervention=spec,
                num_samples=_whole(num_samples, "draws"),
                seed=_whole(seed, "seed"),
                max_new_tokens=_whole(max_new_tokens, "tokens") or None,
                top_k=_whole(top_k, "top-k") or None,
                baseline=bool(baseline),
            )
            snapshots = explorer.stream(request, progress=lambda fraction, what: progress(fraction, desc=what))
            exploration = next(snapshots)  # bad input raises here, before anything is shown
        except LMSCMError as error:
            yield (*skip, _message(error))
            return
        except Exception as error:  # noqa: BLE001 - the page reports it and the server lives on
            logger.exception("explorer run failed")
            yield (*skip, f"⚠️ **internal error** ({type(error).__name__}): {error}")
            return
        state = _state(prompt, exploration.factual.ids)
        # the sampled counterfactuals first, then with their exact probabilities, then the mode
        yield (
            state["text"] if not (observed or "").strip() else gr.skip(),
            factual_value(state),
            state,
            render_summary(exploration),
            render_worlds(exploration),
            None,  # the plot follows with the exact law
            "",
        )
        try:
            for exploration in snapshots:
                yield (gr.skip(), gr.skip(), gr.skip(), render_summary(exploration), render_worlds(exploration),
                       _plot(exploration), "")
        except Exception as error:  # noqa: BLE001
            logger.exception("explorer run failed")
            yield (*skip, f"⚠️ **internal error** ({type(error).__name__}): {error}")

    def _plot(exploration):
        figure = first_divergence_figure(exploration)
        return gr.skip() if figure is None else figure

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\nWhat would **this very string** have been under an intervention? Exact abduction of "
            f"the Gumbel noise, replay through the intervened model, exact probabilities."
            + (f" Model: `{model_name}`." if model_name else "")
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", elem_id="prompt")
                observed = gr.Textbox(
                    label="Observed continuation (paste one, or leave empty to sample one)", elem_id="observed"
                )
                with gr.Row():
                    sample_button = gr.Button("Sample one", elem_id="sample")
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                factual = gr.HighlightedText(
                    label="Factual string: click a token to force or exclude it",
                    elem_id="factual", combine_adjacent=False, show_legend=False, show_inline_category=False,
                    color_map={"observed": "#e0e7ff"},
                )
                with gr.Row(visible=False) as token_row:
                    selected = gr.Markdown(elem_id="selected")
                    exclude_button = gr.Button("Exclude it", elem_id="exclude-token", size="sm")
                    force_button = gr.Button("Force the token typed under 'force / exclude'", size="sm")
            with gr.Column(scale=2):
                kind = gr.Radio(list(INTERVENTIONS), value=STEER, label="Intervention", elem_id="kind")
                with gr.Group(visible=True) as steer_group:
                    direction = gr.Radio(["female", "male"], value="female", label="Steer toward")
                    alpha = gr.Slider(0.0, 4.0, value=1.0, step=0.25, label="α (steering strength)")
                with gr.Group(visible=False) as rome_group:
                    subject = gr.Textbox("The Louvre", label="Subject")
                    rome_prompt = gr.Textbox("The Louvre is located in the city of", label="Prompt template")
                    target = gr.Textbox(" Rome", label="New target (mind the leading space)")
                with gr.Group(visible=False) as prompt_group:
                    new_prompt = gr.Textbox(label="New prompt", elem_id="new-prompt")
                with gr.Group(visible=False) as token_group:
                    step = gr.Number(None, label="Step (click a factual token)", precision=0, elem_id="step")
                    action = gr.Radio([EXCLUDE, FORCE], value=EXCLUDE, label="Action", elem_id="action")
                    token = gr.Textbox(label="Token to force", elem_id="force-token")
                with gr.Group(visible=False) as model_group:
                    folder = gr.Textbox(label="Model folder (same tokenizer)", elem_id="model-folder")
                with gr.Accordion("Settings", open=False):
                    num_samples = gr.Slider(1, 64, value=DEFAULTS.num_samples, step=1, label="Counterfactual draws")
                    seed = gr.Number(DEFAULTS.seed, label="Seed", precision=0)
                    top_k = gr.Number(DEFAULTS.top_k or 0, label="top-k (0: none)", precision=0)
                    max_new_tokens = gr.Number(0, label="Tokens (0: the observation's length)", precision=0)
                    baseline = gr.Checkbox(False, label="Also the interventional baseline (fresh noise)")
        message = gr.Markdown(elem_id="message")
        summary = gr.Markdown(elem_id="summary")
        worlds = gr.HTML(elem_id="worlds")
        plot = gr.Plot(label="exact P(first divergence at step t)", elem_id="divergence", format="png")

        groups = (steer_group, rome_group, prompt_group, token_group, model_group)
        kind.change(
            lambda k: [gr.update(visible=k == name) for name in INTERVENTIONS[: len(groups)]], kind, list(groups)
        )
        outputs = [observed, factual, state, summary, worlds, plot, message]
        inputs = [prompt, observed, state, kind, direction, alpha, subject, rome_prompt, target, new_prompt, step,
                  action, token, folder, num_samples, seed, top_k, max_new_tokens, baseline]
        run_button.click(run, inputs, outputs)
        sample_button.click(sample, [prompt, seed, top_k, max_new_tokens], [observed, factual, state, message])

        def select(state, evt: gr.SelectData):
            t = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            text = state["tokens"][t] if state and 0 <= t < len(state["tokens"]) else ""
            return t, gr.update(visible=True), f"step **{t}**: `{text}`"

        # the module's annotations are strings (``from __future__``) naming the local import
        # ``gr``: give Gradio the class, by which it injects the event data
        select.__annotations__["evt"] = gr.SelectData
        factual.select(select, state, [step, token_row, selected])
        exclude_button.click(lambda: (TOKEN, EXCLUDE), None, [kind, action]).then(run, inputs, outputs)
        force_button.click(lambda: (TOKEN, FORCE), None, [kind, action]).then(run, inputs, outputs)
    return demo
