"""Third-party deprecations that calls of ours trigger, on the core paths and every CLI command.

The suite's warning filters (``pyproject.toml``) only show third-party ``DeprecationWarning``,
``PendingDeprecationWarning`` and ``FutureWarning``, so that a new release of transformers,
click or torch cannot fail a fresh install. This file is where they still fail: each path runs
with those warnings recorded, and a warning whose stack passes through ``pyro_lmscm`` fails
the test, naming our innermost call. transformers also announces deprecations through its
logger (``logger.warning_once``, e.g. when ``output.past_key_values`` is read); those count
too.
"""

from __future__ import annotations

import gc
import logging
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyro.poutine as poutine
import pytest
import torch
from typer.testing import CliRunner

import pyro_lmscm
from pyro_lmscm import HindsightGumbelGuide, LanguageModelSCM, counterfactual
from pyro_lmscm.inference import abduct
from pyro_lmscm.interventions import ActivationSteering, LoRAAdapter
from pyro_lmscm.lm import cache_keyword
from pyro_lmscm.loading import load_lm
from pyro_lmscm.models import Decoding
from pyro_lmscm.testing import tiny_llama

PACKAGE = Path(pyro_lmscm.__file__).resolve().parent
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _our_call() -> str | None:
    """``file:line in function: code`` of the innermost frame of ours on the current stack."""
    ours = [frame for frame in traceback.extract_stack() if Path(frame.filename).resolve().is_relative_to(PACKAGE)]
    if not ours:
        return None
    frame = ours[-1]
    where = Path(frame.filename).resolve().relative_to(PACKAGE.parent)
    return f"{where}:{frame.lineno} in {frame.name}: {frame.line}"


@contextmanager
def deprecations_of_our_calls() -> Iterator[list[str]]:
    """Record every deprecation (warning or transformers log line) that a call of ours
    triggers inside the block, as ``"<category>: <message> -- triggered by <our call>"``."""
    from transformers.utils import logging as hf_logging

    found: list[str] = []

    def showwarning(message, category, filename, lineno, file=None, line=None):
        call = _our_call()
        if call is not None:
            found.append(f"{category.__name__}: {message} -- triggered by {call}")

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            call = _our_call()
            if "deprecat" in record.getMessage().lower() and call is not None:
                found.append(f"transformers log: {record.getMessage()} -- triggered by {call}")

    handler = Handler(logging.WARNING)
    hf_root = hf_logging.get_logger()
    logging.Logger.warning_once.cache_clear()  # a deprecation logged once before is logged again
    hf_root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            for category in DEPRECATIONS:
                warnings.simplefilter("always", category)
            warnings.showwarning = showwarning
            yield found
    finally:
        hf_root.removeHandler(handler)


def _assert_none(found: list[str]) -> None:
    assert not found, "third-party deprecations triggered by our calls:\n" + "\n".join(sorted(set(found)))


PROMPT = torch.tensor([2, 3, 4])


def _scm(lm) -> LanguageModelSCM:
    from peft import LoraConfig

    steer = ActivationSteering(torch.ones(lm.model.config.hidden_size), layer=0, alpha=0.5)
    lora = LoRAAdapter.from_config(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    mechanisms = {"steer": steer, "lora": lora}
    return LanguageModelSCM(lm, max_new_tokens=5, decoding=Decoding(top_k=10), mechanisms=mechanisms)


def test_load_abduction_and_counterfactual(tiny_folder):
    with deprecations_of_our_calls() as found:
        lm = load_lm(tiny_folder, progress=False)
        scm = _scm(lm)
        result = counterfactual(scm, PROMPT, None, {"mechanism": "steer"}, num_samples=3, seed=0, baseline=True)
        counterfactual(scm, PROMPT, result.factual_ids, {"mechanism": "lora"}, num_samples=3, seed=0)
        poutine.trace(HindsightGumbelGuide(scm, result.factual_ids)).get_trace(PROMPT)
        for method in ("exact", "importance"):
            abduct(scm, PROMPT, result.factual_ids, method=method, num_samples=4, seed=0)
    _assert_none(found)


def test_study(tiny_folder, tmp_path):
    from pyro_lmscm.study import StudyConfig, run_study

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the man said he\nthe woman\n")
    config = StudyConfig(corpus=str(corpus), output=str(tmp_path / "out"), model=tiny_folder,
                         intervention="w_0=5", num_samples=2, max_new_tokens=4, attribute=None,
                         bootstrap=50, progress=False, report=True)
    with deprecations_of_our_calls() as found:
        run_study(config)
    _assert_none(found)


def _cli(*args: str) -> None:
    from pyro_lmscm.cli import app

    # --verbose: the quiet default would silence the very warnings recorded here
    result = CliRunner().invoke(app, ["--verbose", *args])
    assert result.exit_code == 0, result.output


def _cli_cases(tiny_folder: str, tmp_path: Path) -> dict[str, list[str]]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the man said he\n")
    return {
        "counterfactual": ["counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                           "said he went", "--intervention", 'w_0="she"', "--samples", "2"],
        "counterfactual --generate --json": ["counterfactual", "--model", tiny_folder, "--prompt", "the man",
                                             "--generate", "--samples", "2", "--max-new-tokens", "3", "--json"],
        "models": ["models"],
        "compare-inference": ["compare-inference", "--tiny", "--num-samples", "32", "--max-new-tokens", "2",
                              "--methods", "exact,importance", "--plot", str(tmp_path / "plot.png")],
        "compare-mechanisms": ["compare-mechanisms", "--tiny", "--limit", "2", "--samples", "2",
                               "--max-new-tokens", "3", "--intervention", "w_0=5", "--corpus", str(corpus)],
        "study": ["study", "--corpus", str(corpus), "-o", str(tmp_path / "study"), "--model", tiny_folder,
                  "--intervention", "w_0=5", "--samples", "2", "--max-new-tokens", "3", "--bootstrap", "20",
                  "--no-progress"],
    }


@pytest.mark.parametrize("command", ["counterfactual", "counterfactual --generate --json", "models",
                                     "compare-inference", "compare-mechanisms", "study"])
def test_cli_command(command, tiny_folder, tmp_path):
    args = _cli_cases(tiny_folder, tmp_path)[command]
    with deprecations_of_our_calls() as found:
        _cli(*args)
    _assert_none(found)


# Gradio leaves sockets and event loops of its own for the garbage collector
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_explorer_page_and_run(tiny_folder):
    """`pyro-lmscm app` serves for as long as it lives (tests/test_explorer.py drives it in
    a browser); here its page is built and one run streams through its renderers."""
    pytest.importorskip("gradio")
    from pyro_lmscm.explorer import Explorer, ExploreRequest
    from pyro_lmscm.explorer.render import first_divergence_figure, render_summary, render_worlds
    from pyro_lmscm.explorer.ui import build_app, theme

    with deprecations_of_our_calls() as found:
        explorer = Explorer(load_lm(tiny_folder, progress=False))
        build_app(explorer, model_name="tiny"), theme()
        request = ExploreRequest("the man", intervention={"exclude_1": "factual"}, max_new_tokens=4)
        for snapshot in explorer.stream(request):
            render_summary(snapshot), render_worlds(snapshot), first_divergence_figure(snapshot)
    _assert_none(found)
    gc.collect()  # collect Gradio's leftovers here, under this test's filter, not in a later test


@pytest.mark.slow
def test_demo_on_the_embedded_model():
    with deprecations_of_our_calls() as found:
        _cli("demo", "--samples", "2", "--max-new-tokens", "4")
    _assert_none(found)


# -- the check itself can fail ---------------------------------------------------------------


def test_a_deprecated_call_of_ours_is_named(monkeypatch):
    """Baseline: a third-party deprecation reached through our code is caught and names our
    call; the same warning triggered outside our package is not ours."""
    lm = tiny_llama(seed=0)
    forward = lm.model.forward

    def deprecated_forward(*args, **kwargs):
        warnings.warn("old_api is deprecated", FutureWarning, stacklevel=2)
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", deprecated_forward)
    with deprecations_of_our_calls() as found:
        lm.model(input_ids=PROMPT[None])  # the test calls the model itself: not ours
    assert found == []
    with deprecations_of_our_calls() as found:
        lm.logits(PROMPT)
    assert len(found) == 1 and "old_api is deprecated" in found[0], found
    assert "pyro_lmscm/lm.py" in found[0] and "in logits" in found[0], found


@pytest.mark.skipif(
    cache_keyword(type(tiny_llama().model)) != "cache",
    reason="this transformers has no `cache` keyword, so `past_key_values` is not deprecated",
)
def test_the_old_cache_keyword_fails_the_check(monkeypatch):
    """With transformers >= 5.24, making HFLanguageModel pass `past_key_values` again (what
    it did before the feature detection) is caught and named."""
    lm = tiny_llama(seed=0)
    monkeypatch.setattr(lm, "_cache_keyword", "past_key_values")
    with deprecations_of_our_calls() as found:
        counterfactual(LanguageModelSCM(lm, max_new_tokens=3), PROMPT, None, {}, num_samples=2, seed=0)
    ours = ("past_key_values" in line and "pyro_lmscm/lm.py" in line and "in extend" in line for line in found)
    assert any(ours), found
