"""The explorer's Gradio page (``pyro-lmscm app``; needs the optional extra ``pyro-lmscm[app]``).

:func:`build_app` lays out the page on an :class:`~pyro_lmscm.explorer.session.Explorer`:
a prompt -- or, in chat mode, a system prompt and a user turn -- an observed continuation
(the assistant's reply in chat mode; or "Sample one"), an intervention (gender steering with
α, a ROME edit, a prompt edit, a system-prompt or user-turn edit of a chat, forcing or
excluding a token at a step -- chosen by clicking that token in the factual string -- or a
second model folder), settings, and the outputs: one progress line (``#status``), the aligned
worlds (:mod:`.render`), P(unchanged) with its range over other mechanisms, the law of the
first divergence with its band, the most probable counterfactual and the attribution to the
mechanism's parts. A bad input shows its message in the page (``#message``); the server
keeps running.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from ..defaults import DEFAULTS
from ..errors import InferenceError, LMSCMError, ServeError
from ..validation import as_int, as_real
from .render import attribution_figure, first_divergence_figure, render_summary, render_worlds, visible
from .session import Explorer, ExploreRequest

if TYPE_CHECKING:
    import gradio as gr

__all__ = [
    "INTERVENTIONS", "build_app", "chat_messages", "check_address", "intervention_spec", "second_model_info", "serve",
    "theme",
]

logger = logging.getLogger(__name__)

STEER, ROME, PROMPT, SYSTEM, USER, TOKEN, MODEL, NONE = (
    "gender steering", "ROME edit", "prompt edit", "system prompt edit (chat)", "user turn edit (chat)",
    "force / exclude a token", "second model", "none",
)
INTERVENTIONS = (STEER, ROME, PROMPT, SYSTEM, USER, TOKEN, MODEL, NONE)
EXCLUDE, FORCE = "exclude the factual token", "force a token"

DEFAULT_PROMPT = "My brother is a doctor. Every morning, he"
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_USER = "Describe a nurse's morning in one sentence."


def chat_messages(system: str, user: str) -> list[dict[str, str]]:
    """The chat of the page's chat mode: the system prompt (none when empty) and the user turn."""
    system, user = system or "", user or ""
    return ([{"role": "system", "content": system}] if system.strip() else []) + [{"role": "user", "content": user}]


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
    new_system: str = "",
    new_user: str = "",
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
    if kind == SYSTEM:  # an empty system prompt removes it
        return {"system": new_system or ""}
    if kind == USER:
        if not new_user or not new_user.strip():
            raise InterventionError("user turn edit: type the new user turn.")
        return {"user": new_user}
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


def second_model_info(explorer: Explorer) -> str:
    """The help text of the second-model field: where that model loads. It loads on the
    factual model's device and in its dtype (:func:`~pyro_lmscm.interventions.spec.parse_intervention`
    ``model=``), since the counterfactual runs both models in one process; ``pyro-lmscm app
    --device`` chooses that device for both."""
    dtype = str(explorer.lm.dtype).removeprefix("torch.")
    return (f"Loads on the app's device ({explorer.lm.device}) in {dtype}, beside the factual model: the "
            "counterfactual runs both. Choose it with pyro-lmscm app --device.")


def theme() -> Any:
    """Gradio's default theme on the system's fonts: some Gradio releases (6.0) fetch theirs
    from Google Fonts, and the page must work offline."""
    import gradio as gr

    return gr.themes.Default(
        font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace")
    )


def check_address(host: str, port: int) -> int:
    """The port to serve on (a free one for ``port=0``), after binding ``(host, port)`` once.

    :raises ServeError: naming ``--host`` or ``--port``, for a host that does not resolve or is
        not this machine's, or a port that is taken.
    """
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (OSError, UnicodeError) as error:
        raise ServeError(f"cannot serve on --host {host!r}: {getattr(error, 'strerror', None) or error}.") from None
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            what = f"--host {host!r}" if port == 0 else f"--host {host!r} --port {port}"
            raise ServeError(
                f"cannot serve on {what}: {error.strerror or error} (is the address this machine's, the port free?)."
            ) from None
        return int(probe.getsockname()[1])


def serve(explorer: Explorer, model_name: str = "", host: str = "127.0.0.1", port: int = 7860) -> None:
    """Build the page and serve it until interrupted, one run at a time (the model is
    shared); ``port=0`` takes a free port.

    :raises ServeError: if ``(host, port)`` cannot be served on (:func:`check_address`)."""
    port = check_address(host, port)
    demo = build_app(explorer, model_name=model_name)
    print(f"serving the explorer on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, show_error=True, quiet=True, share=False, theme=theme(), css=CSS
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


#: The page's CSS (given to ``launch``): the aligned table may scroll sideways within the page;
#: the plots start below their labels (Gradio lays a plot's label over its top edge).
CSS = """
#worlds { max-width: 100%; overflow-x: auto; }
#divergence .matplotlib, #attribution .matplotlib { padding-top: 32px; }
"""


def build_app(explorer: Explorer, model_name: str = "", title: str = "pyro-lmscm explorer") -> gr.Blocks:
    """The Gradio page on ``explorer`` (launch it with ``.launch()``); ``model_name`` is
    shown in the header."""
    import gradio as gr

    def _state(prompt: Any, ids: list[int]) -> dict[str, Any]:
        """The factual string as the page holds it: its prompt (text or chat messages), its
        text (without the end of sequence, as the observed box shows it) and its ids, which
        win while the prompt and text are unchanged."""
        eos = explorer.lm.eos_token_ids
        text = explorer.lm.decode([i for i in ids if i not in eos])
        return {"prompt": prompt, "text": text, "ids": ids, "tokens": explorer.token_texts(ids)}

    def factual_value(state: dict | None) -> list[tuple[str, str | None]]:
        if not state:
            return []
        # one labelled segment per step (unlabelled ones are not clickable in every Gradio
        # release; adjacent segments are not merged, so the clicked index is the step);
        # whitespace shows as ␠ / ↵, never as a blank chip
        return [(visible(text), "observed") for text in state["tokens"]]

    def _prompt(chat, prompt, system, user):
        return chat_messages(system, user) if chat else prompt

    def sample(chat, prompt, system, user, seed, top_k, max_new_tokens):
        prompt = _prompt(chat, prompt, system, user)
        try:
            steps = _whole(max_new_tokens, "tokens") or DEFAULTS.max_new_tokens
            ids = explorer.sample(prompt, steps, _whole(seed, "seed"), _whole(top_k, "top-k") or None)
        except LMSCMError as error:
            return gr.skip(), gr.skip(), gr.skip(), _message(error)
        state = _state(prompt, ids)
        return state["text"], factual_value(state), state, ""

    def run(chat, prompt, system, user, observed, state, kind, direction, alpha, subject, rome_prompt, target,
            new_prompt, new_system, new_user, step, action, token, folder, num_samples, seed, top_k, max_new_tokens,
            baseline, attribute, progress=gr.Progress()):
        skip = (gr.skip(),) * 8
        try:
            prompt = _prompt(chat, prompt, system, user)
            spec = intervention_spec(
                kind, direction, alpha, subject, rome_prompt, target, new_prompt, step, action, token, folder,
                new_system, new_user,
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
                attribute=bool(attribute),
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
        # the sampled counterfactuals first, then with their exact probabilities, the mode and
        # the attribution to parts; the status line says what is still running
        yield (
            state["text"] if not (observed or "").strip() else gr.skip(),
            factual_value(state),
            state,
            _status(exploration),
            render_summary(exploration),
            render_worlds(exploration),
            None,  # the plots follow with the exact law and the attribution
            gr.update(value=None, visible=False),
            "",
        )
        try:
            for exploration in snapshots:
                yield (gr.skip(), gr.skip(), gr.skip(), _status(exploration), render_summary(exploration),
                       render_worlds(exploration), _plot(first_divergence_figure(exploration)),
                       _attribution(exploration), "")
        except Exception as error:  # noqa: BLE001
            logger.exception("explorer run failed")
            yield (*skip, f"⚠️ **internal error** ({type(error).__name__}): {error}")

    def _status(exploration):
        return ""  # the progress indicator shows here while running; the summary says what is pending

    def _plot(figure):
        return gr.skip() if figure is None else figure

    def _attribution(exploration):
        figure = attribution_figure(exploration)
        return gr.skip() if figure is None else gr.update(value=figure, visible=True)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\nWhat would **this very string** have been under an intervention? Exact abduction of "
            f"the Gumbel noise, replay through the intervened model, exact probabilities."
            + (f" Model: `{model_name}`." if model_name else "")
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Checkbox(False, label="Chat: a system prompt and a user turn; the observed string is the "
                                   "assistant's reply", elem_id="chat")
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", elem_id="prompt")
                with gr.Group(visible=False) as chat_group:
                    system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", elem_id="system")
                    user = gr.Textbox(DEFAULT_USER, label="User turn", elem_id="user")
                observed = gr.Textbox(  # grows with its text: a long observation stays readable
                    label="Observed continuation (paste one, or leave empty to sample one)", elem_id="observed",
                    lines=3, max_lines=8,
                )
                with gr.Row():
                    sample_button = gr.Button("Sample one", elem_id="sample")
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                factual = gr.HighlightedText(
                    label="Factual string: click a token to force or exclude it (␣ a space, ↵ a line break, ⏎ the end)",
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
                with gr.Group(visible=False) as system_group:
                    new_system = gr.Textbox(label="New system prompt (empty: none)", elem_id="new-system")
                with gr.Group(visible=False) as user_group:
                    new_user = gr.Textbox(label="New user turn", elem_id="new-user")
                with gr.Group(visible=False) as token_group:
                    step = gr.Number(None, label="Step (click a factual token)", precision=0, elem_id="step")
                    action = gr.Radio([EXCLUDE, FORCE], value=EXCLUDE, label="Action", elem_id="action")
                    token = gr.Textbox(label="Token to force", elem_id="force-token")
                with gr.Group(visible=False) as model_group:
                    folder = gr.Textbox(label="Model folder (same tokenizer)", elem_id="model-folder",
                                        info=second_model_info(explorer))
                with gr.Accordion("Settings", open=False):
                    num_samples = gr.Slider(1, 64, value=DEFAULTS.num_samples, step=1, label="Counterfactual draws")
                    seed = gr.Number(DEFAULTS.seed, label="Seed", precision=0)
                    top_k = gr.Number(DEFAULTS.top_k or 0, label="top-k (0: none, the full softmax)", precision=0,
                                      elem_id="top-k")
                    max_new_tokens = gr.Number(0, label="Tokens (0: the observation's length)", precision=0)
                    baseline = gr.Checkbox(False, label="Also the interventional baseline (fresh noise)")
                    attribute = gr.Checkbox(True, label="Attribute the effect to the mechanism's parts (layers)")
        status = gr.Markdown(elem_id="status", min_height=48)  # room for the one progress indicator
        message = gr.Markdown(elem_id="message")
        summary = gr.Markdown(elem_id="summary")
        worlds = gr.HTML(elem_id="worlds")
        plot = gr.Plot(label="exact P(first divergence at step t), with the CDF's range over other mechanisms",
                       elem_id="divergence", format="png")
        parts_plot = gr.Plot(label="the effect attributed to the mechanism's parts", elem_id="attribution",
                             format="png", visible=False)

        groups = {STEER: steer_group, ROME: rome_group, PROMPT: prompt_group, SYSTEM: system_group,
                  USER: user_group, TOKEN: token_group, MODEL: model_group}
        kind.change(lambda k: [gr.update(visible=k == name) for name in groups], kind, list(groups.values()))
        observed_labels = ("Observed continuation (paste one, or leave empty to sample one)",
                           "Observed assistant reply (paste one, or leave empty to sample one)")
        chat.change(
            lambda on: (gr.update(visible=not on), gr.update(visible=on), gr.update(label=observed_labels[bool(on)])),
            chat, [prompt, chat_group, observed],
        )
        outputs = [observed, factual, state, status, summary, worlds, plot, parts_plot, message]
        inputs = [chat, prompt, system, user, observed, state, kind, direction, alpha, subject, rome_prompt, target,
                  new_prompt, new_system, new_user, step, action, token, folder, num_samples, seed, top_k,
                  max_new_tokens, baseline, attribute]
        # one progress indicator, on the status line: the inputs and the streamed results stay
        # readable (Gradio's default puts one on every output and fades them)
        # a Run pressed while a run streams is queued, not dropped (Gradio drops it under the default
        # trigger_mode "once"): the newest request runs when the current one ends
        running: dict[str, Any] = {"show_progress": "full", "show_progress_on": [status], "trigger_mode": "always_last"}
        run_button.click(run, inputs, outputs, **running)
        sample_button.click(sample, [chat, prompt, system, user, seed, top_k, max_new_tokens],
                            [observed, factual, state, message], show_progress_on=[status])

        def select(state, evt: gr.SelectData):
            t = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            text = state["tokens"][t] if state and 0 <= t < len(state["tokens"]) else ""
            return t, gr.update(visible=True), f"step **{t}**: `{visible(text)}`"

        # the module's annotations are strings (``from __future__``) naming the local import
        # ``gr``: give Gradio the class, by which it injects the event data
        select.__annotations__["evt"] = gr.SelectData
        factual.select(select, state, [step, token_row, selected])
        exclude_button.click(lambda: (TOKEN, EXCLUDE), None, [kind, action]).then(run, inputs, outputs, **running)
        force_button.click(lambda: (TOKEN, FORCE), None, [kind, action]).then(run, inputs, outputs, **running)
    return demo
