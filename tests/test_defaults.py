"""Every entry point takes its defaults from pyro_lmscm.defaults.DEFAULTS."""

import inspect

import pytest
import typer

from pyro_lmscm.cli import app
from pyro_lmscm.defaults import DEFAULTS, Defaults
from pyro_lmscm.explorer.session import Explorer, ExploreRequest
from pyro_lmscm.loading import load_lm, load_model_and_tokenizer
from pyro_lmscm.models import Decoding
from pyro_lmscm.study.config import StudyConfig, demo_config

#: CLI option name -> the DEFAULTS field it must default to (or None: the study's flags,
#: which default to "not given" and fall back to StudyConfig, checked below).
FIELDS = {"model": "model", "dtype": "dtype", "device": "device", "temperature": "temperature",
          "top_k": "top_k", "top_p": "top_p", "samples": "num_samples", "seed": "seed"}


def _commands():
    group = typer.main.get_command(app)
    return {name: command for name, command in group.commands.items()}


def test_the_default_decoding_is_the_full_softmax_in_float32():
    assert (DEFAULTS.top_k, DEFAULTS.top_p, DEFAULTS.temperature) == (None, None, 1.0)
    assert DEFAULTS.dtype == "float32" and DEFAULTS.max_new_tokens == 32
    with pytest.raises(Exception):
        DEFAULTS.top_k = 50  # frozen


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_takes_its_defaults_from_DEFAULTS(name):
    command = _commands()[name]
    params = {p.name: p for p in command.params}  # (typer >= 0.25 vendors click: no isinstance)
    assert {"model", "seed"} & set(params) or name in ("models",), name
    for option, field in FIELDS.items():
        if option not in params:
            continue
        default = params[option].default
        if name == "study":  # None: not given, StudyConfig's default applies
            assert default is None, (name, option)
        elif (name, option) in (("compare-mechanisms", "samples"), ("compare-inference", "temperature")):
            continue  # draws per string and noise model; the relaxation's temperature: their own knobs
        else:
            assert default == getattr(DEFAULTS, field), (name, option, default)
    if "max_new_tokens" in params and name not in ("study", "compare-inference"):
        # None: the observation's length, else DEFAULTS.max_new_tokens
        assert params["max_new_tokens"].default in (None, DEFAULTS.max_new_tokens), name


def test_python_api_study_and_explorer_take_the_same_defaults():
    decoding = Decoding()
    assert (decoding.temperature, decoding.top_k, decoding.top_p) == (
        DEFAULTS.temperature, DEFAULTS.top_k, DEFAULTS.top_p)
    for function in (load_lm, load_model_and_tokenizer):
        signature = inspect.signature(function)
        assert signature.parameters["name_or_path"].default == DEFAULTS.model
        assert signature.parameters["dtype"].default == DEFAULTS.dtype
        assert signature.parameters["device"].default == DEFAULTS.device
    config = StudyConfig(corpus="demo")
    for field in ("model", "dtype", "device", "max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        assert getattr(config, field) == getattr(DEFAULTS, field), field
    assert config.num_samples == DEFAULTS.num_samples
    demo = demo_config()  # the built-in demo study too (it was bfloat16 with its own decoding)
    for field in ("model", "dtype", "max_new_tokens", "temperature", "top_k", "top_p", "num_samples"):
        assert getattr(demo, field) == getattr(DEFAULTS, field), field
    request = ExploreRequest(prompt="the man")
    assert (request.top_k, request.num_samples, request.seed) == (DEFAULTS.top_k, DEFAULTS.num_samples, DEFAULTS.seed)
    sample = inspect.signature(Explorer.sample).parameters
    assert sample["top_k"].default == DEFAULTS.top_k and sample["max_new_tokens"].default == DEFAULTS.max_new_tokens


def test_a_changed_default_reaches_the_study_config(monkeypatch):
    """The fields read DEFAULTS (not a copy of its values): a StudyConfig class built after a
    change sees it. Dataclass defaults are bound at class creation, so check the source."""
    source = inspect.getsource(StudyConfig)
    for field in ("model", "dtype", "max_new_tokens", "temperature", "top_k", "top_p", "num_samples", "seed"):
        assert f"= DEFAULTS.{field}" in source, field
    assert Defaults(top_k=5).top_k == 5
