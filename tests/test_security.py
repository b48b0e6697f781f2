"""No code from data: no config key, corpus, model folder or explorer field runs code.

Every "nothing runs" test gives the code a marker file to write (at import) and checks that
the file does not exist afterwards; the input prompt of ``transformers`` is replaced by one
that records the question and answers "y", as a user would who presses y, so that code that
asked would have run.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pyro_lmscm import loading
from pyro_lmscm.errors import ModelLoadError, RemoteCodeError
from pyro_lmscm.loading import load_lm, load_model_and_tokenizer
from pyro_lmscm.study import StudyConfig, StudyError, run_study
from pyro_lmscm.testing import tiny_llama

# -- a model folder that brings its own code ----------------------------------------------------

_CONFIG_CODE = """
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = {model_type!r}


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""

_TOKENIZER_CODE = """
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""

#: folder kinds: config.json with auto_map and an unknown model_type, with auto_map and a known
#: one, tokenizer_config.json with auto_map, and an unknown model_type with no code at all
KINDS = ("auto_map", "auto_map_llama", "tokenizer_auto_map", "unknown_type")


def _payload(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code from the model folder ran')\n"


def evil_folder(root: Path, marker: Path, kind: str) -> Path:
    """A tiny Llama saved with ``save_pretrained`` whose files ask for code of their own, which
    writes ``marker`` when imported."""
    folder = root / f"evil-{kind}"
    lm = tiny_llama(seed=1)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if kind in ("auto_map", "auto_map_llama"):
        model_type = "evil" if kind == "auto_map" else "llama"
        config["model_type"] = model_type
        config["auto_map"] = {
            "AutoConfig": "modeling_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        }
        (folder / "modeling_evil.py").write_text(_payload(marker) + _CONFIG_CODE.format(model_type=model_type))
    elif kind == "tokenizer_auto_map":
        path = folder / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text())
        tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        tokenizer_config["tokenizer_class"] = "EvilTokenizer"
        path.write_text(json.dumps(tokenizer_config))
        (folder / "tokenization_evil.py").write_text(_payload(marker) + _TOKENIZER_CODE)
    else:
        config["model_type"] = "evil"
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture
def hf_modules(monkeypatch, tmp_path):
    """Keep transformers' copies of dynamic modules (if any were made) in ``tmp_path``."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"), raising=False)


@pytest.fixture
def prompts(monkeypatch, hf_modules):
    """Replace ``input`` by one that records each question and answers "y" (and stdin by a "y")."""
    asked: list[str] = []

    def answer_yes(question: str = "") -> str:
        asked.append(question)
        return "y"

    monkeypatch.setattr("builtins.input", answer_yes)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    return asked


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    for name in ("modeling_evil", "tokenization_evil"):  # whatever an old version imported
        for key in [key for key in sys.modules if key.endswith(name)]:
            del sys.modules[key]


def _refused(error: BaseException) -> None:
    assert isinstance(error, RemoteCodeError) and isinstance(error, ModelLoadError), repr(error)
    message = str(error)
    assert "remote code" in message and "never runs" in message, message


@pytest.fixture(scope="module")
def factual_lm():
    return tiny_llama(seed=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ["load_lm", "load_model_and_tokenizer"])
def test_a_model_folder_that_needs_code_is_refused(tmp_path, marker, prompts, kind, entry):
    folder = evil_folder(tmp_path, marker, kind)
    load = load_lm if entry == "load_lm" else load_model_and_tokenizer
    with pytest.raises(ModelLoadError) as info:
        load(str(folder), progress=False)
    _refused(info.value)
    assert str(folder) in str(info.value) and ("auto_map" in str(info.value) or "model_type" in str(info.value))
    assert prompts == [] and not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", ["string", "mapping"])
def test_a_model_swap_to_such_a_folder_is_refused(tmp_path, marker, prompts, factual_lm, kind, spec):
    from pyro_lmscm.interventions.spec import parse_intervention

    folder = evil_folder(tmp_path, marker, kind)
    with pytest.raises(ModelLoadError) as info:
        parse_intervention(f"model={folder}" if spec == "string" else {"model": str(folder)}, factual_lm)
    _refused(info.value)
    assert prompts == [] and not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_the_explorer_second_model_field_is_refused(tmp_path, marker, prompts, factual_lm, kind):
    from pyro_lmscm.explorer import Explorer, ExploreRequest
    from pyro_lmscm.explorer.ui import MODEL, intervention_spec

    folder = evil_folder(tmp_path, marker, kind)
    request = ExploreRequest(prompt="the man said", intervention=intervention_spec(MODEL, folder=f" {folder} "))
    with pytest.raises(ModelLoadError) as info:
        Explorer(factual_lm).run(request)
    _refused(info.value)
    assert prompts == [] and not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", ["model", "intervention"])
def test_a_study_config_naming_such_a_folder_is_refused(tmp_path, marker, prompts, factual_lm, kind, field):
    """From a YAML file: as the study's `model:` and as a `model=PATH` intervention."""
    folder = evil_folder(tmp_path, marker, kind)
    (tmp_path / "corpus.txt").write_text("the man said he\n")
    settings = {"corpus": "corpus.txt", "output": str(tmp_path / "out"), "num_samples": 1, "max_new_tokens": 2,
                "intervention": "w_0=3", "attribute": None, "progress": False, "report": False}
    settings["model" if field == "model" else "intervention"] = str(folder) if field == "model" else f"model={folder}"
    (tmp_path / "study.yaml").write_text(json.dumps(settings))  # JSON is YAML
    with pytest.raises(ModelLoadError) as info:
        run_study(tmp_path / "study.yaml", lm=None if field == "model" else factual_lm)
    _refused(info.value)
    assert prompts == [] and not marker.exists()


def test_the_study_cli_refuses_such_a_folder_with_y_on_stdin(tmp_path, marker, hf_modules):
    """The CLI with "y" typed on its stdin (no patched prompt): a one-line error, no code."""
    from pyro_lmscm.cli.app import app

    folder = evil_folder(tmp_path, marker, "auto_map")
    (tmp_path / "corpus.txt").write_text("the man said he\n")
    result = CliRunner().invoke(app, [
        "study", "--corpus", str(tmp_path / "corpus.txt"), "-o", str(tmp_path / "out"), "--model", str(folder),
        "--intervention", "w_0=3", "--attribute", "none", "--samples", "1", "--max-new-tokens", "2",
        "--no-progress", "--no-report",
    ], input="y\ny\ny\n")
    assert result.exit_code == 2, result.output
    assert "remote code" in result.output and "Do you wish" not in result.output
    assert not marker.exists()


def test_a_cached_hub_id_that_needs_code_is_refused(tmp_path, marker, prompts, monkeypatch):
    """A hub id whose cached config.json has an auto_map is refused from the cache, offline."""
    import huggingface_hub

    folder = evil_folder(tmp_path, marker, "auto_map")
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=0: False)
    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo_id: True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(folder / name))
    with pytest.raises(ModelLoadError) as info:
        load_lm("evil-org/evil-model", progress=False)
    _refused(info.value)
    assert "evil-org/evil-model" in str(info.value)
    assert prompts == [] and not marker.exists()


@pytest.mark.parametrize("kind", ["auto_map", "tokenizer_auto_map"])
def test_transformers_alone_refuses_the_code_too(tmp_path, marker, prompts, monkeypatch, kind):
    """Defence in depth: without the check of the folder, trust_remote_code=False makes
    transformers raise (it does not ask), and the error still says remote code."""
    folder = evil_folder(tmp_path, marker, kind)
    monkeypatch.setattr(loading, "refuse_remote_code", lambda folder, name=None: None)
    with pytest.raises(ModelLoadError) as info:
        load_lm(str(folder), progress=False)
    assert "remote code" in str(info.value) and "never runs" in str(info.value)
    assert prompts == [] and not marker.exists()


def test_every_load_passes_trust_remote_code_false(tmp_path, monkeypatch):
    """A clean folder loads, and both from_pretrained calls were told trust_remote_code=False."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = tiny_llama(seed=0)
    lm.model.save_pretrained(tmp_path / "clean")
    lm.tokenizer.save_pretrained(tmp_path / "clean")
    seen: list[tuple[str, object]] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "missing")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    loaded = load_lm(str(tmp_path / "clean"), progress=False)
    assert loaded.tokenizer is not None
    assert seen == [("AutoModelForCausalLM", False), ("AutoTokenizer", False)]


def test_every_from_pretrained_in_the_package_passes_trust_remote_code_false():
    """Static guard: each ``from_pretrained(...)`` call in pyro_lmscm says trust_remote_code=False."""
    import ast

    import pyro_lmscm

    calls = []
    for path in Path(pyro_lmscm.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                keywords = {k.arg: k.value for k in node.keywords}
                value = keywords.get("trust_remote_code")
                ok = isinstance(value, ast.Constant) and value.value is False
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert len(calls) >= 4 and all(ok for _, ok in calls), calls


# -- study configs: code runs only when the caller allows it -------------------------------------


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """An importable module that writes a marker file when imported and when its ``label`` runs;
    yields (its "module:function" name, the marker)."""
    name = f"lmscm_marker_{os.getpid()}_{abs(hash(str(tmp_path)))}"
    marker = tmp_path / "MARKER"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{name}.py").write_text(
        f"import pathlib\nMARKER = pathlib.Path({str(marker)!r})\nMARKER.write_text('imported')\n\n\n"
        "def label(text):\n    MARKER.write_text('ran')\n    return 'x'\n"
    )
    monkeypatch.syspath_prepend(str(code))
    yield f"{name}:label", marker
    sys.modules.pop(name, None)


def _study_files(tmp_path: Path, function: str, fmt: str, allow_code: object = True) -> Path:
    (tmp_path / "corpus.txt").write_text("the man said he\nthe woman said she\n")
    settings = {"corpus": "corpus.txt", "output": str(tmp_path / "out"), "num_samples": 1, "max_new_tokens": 2,
                "intervention": "w_0=3", "attribute": {"name": "code", "function": function, "target": "y"},
                "progress": False, "report": False, "allow_code": allow_code}
    path = tmp_path / f"study.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(settings))
    else:
        import yaml

        path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize("value", [True, "yes", 1])
def test_allow_code_in_a_config_file_is_refused(tmp_path, marker_module, factual_lm, fmt, value):
    function, marker = marker_module
    path = _study_files(tmp_path, function, fmt, allow_code=value)
    with pytest.raises(StudyError, match=rf"study config '.*study\.{fmt}' sets `allow_code`.*--allow-code"):
        StudyConfig.from_file(path)
    with pytest.raises(StudyError, match="sets `allow_code`"):
        run_study(path, lm=factual_lm)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the caller's flag does not make the file's key acceptable: the key is refused either way
    with pytest.raises(StudyError, match="sets `allow_code`"):
        StudyConfig.from_file(path, allow_code=True)


def test_builtins_exec_in_a_config_file_is_refused(tmp_path, factual_lm):
    """The probe's config: allow_code: true and attribute.function: builtins:exec."""
    marker = tmp_path / "MARKER"
    path = _study_files(tmp_path, "builtins:exec", "yaml")
    corpus = f"the man said he\topen({str(marker)!r}, 'w').write('exec ran')\n"
    (tmp_path / "corpus.txt").write_text(corpus)
    with pytest.raises(StudyError, match=r"study\.yaml' sets `allow_code`"):
        run_study(path, lm=factual_lm)
    path = _study_files(tmp_path, "builtins:exec", "yaml", allow_code=None)
    text = path.read_text().replace("allow_code: null\n", "")
    path.write_text(text)
    assert "allow_code" not in text
    with pytest.raises(StudyError, match=r"attribute 'code' names the function 'builtins:exec'.*--allow-code"):
        run_study(path, lm=factual_lm)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_allow_code_in_a_mapping_or_worker_dict_is_refused(tmp_path, marker_module, factual_lm):
    from pyro_lmscm.study.worker import StudyWorker

    function, marker = marker_module
    (tmp_path / "corpus.txt").write_text("the man said he\n")
    data = {"corpus": str(tmp_path / "corpus.txt"), "output": str(tmp_path / "out"), "intervention": "w_0=3",
            "attribute": {"name": "code", "function": function, "target": "y"}, "allow_code": True,
            "progress": False, "report": False}
    with pytest.raises(StudyError, match="sets `allow_code`"):
        StudyConfig.from_mapping(data)
    with pytest.raises(StudyError, match="sets `allow_code`"):
        run_study(data, lm=factual_lm)
    with pytest.raises(StudyError, match="sets `allow_code`"):
        StudyWorker(data, lm=factual_lm)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_caller_allows_code_and_then_it_runs(tmp_path, marker_module, factual_lm, tiny_folder):
    """The control: the same function runs (and writes the marker) when the caller allows it,
    in Python and through the Ray actor's plain-data path, and is never written to study.json."""
    from pyro_lmscm.study.ray_backend import _RayWorker

    function, marker = marker_module
    path = _study_files(tmp_path, function, "yaml", allow_code=None)
    text = path.read_text().replace("allow_code: null\n", "")
    path.write_text(text.replace("intervention: w_0=3", f"model: {tiny_folder}\nintervention: w_0=3"))
    with pytest.raises(StudyError, match="--allow-code"):
        run_study(path, lm=factual_lm)
    assert not marker.exists()
    config = StudyConfig.from_file(path, allow_code=True)
    result = run_study(config, lm=factual_lm)
    assert marker.read_text() == "ran" and {r["factual"]["attribute"] for r in result.records} == {"x"}
    meta = json.loads((tmp_path / "out" / "study.json").read_text())
    assert "allow_code" not in meta["config"]
    marker.unlink()
    refusal = _RayWorker(config.to_dict()).refusal()  # the plain dict alone does not allow code
    assert isinstance(refusal, StudyError) and "--allow-code" in str(refusal)
    assert not marker.exists()
    assert _RayWorker(config.to_dict(), True).worker.attribute.label("a") == "x" and marker.read_text() == "ran"


def test_a_study_folder_never_switches_code_on(tmp_path, marker_module):
    """A study.json (of an older version, or written by hand) that says allow_code: true is
    read as data: the loaded config does not allow code."""
    from pyro_lmscm.study.runner import load_study

    function, marker = marker_module
    (tmp_path / "corpus.txt").write_text("the man said he\n")
    config = {"corpus": str(tmp_path / "corpus.txt"), "name": "old", "allow_code": True,
              "attribute": {"name": "code", "function": function, "target": "y"}}
    (tmp_path / "study.json").write_text(json.dumps({"config": config}))
    with pytest.raises(StudyError, match="--allow-code"):
        load_study(tmp_path)
    del config["attribute"]
    (tmp_path / "study.json").write_text(json.dumps({"config": config}))
    assert load_study(tmp_path)[0].allow_code is False
    assert not marker.exists()


def test_the_cli_flag_allows_code_and_the_file_cannot(tmp_path, marker_module, tiny_folder):
    from pyro_lmscm.cli.app import app

    function, marker = marker_module
    path = _study_files(tmp_path, function, "yaml")
    path.write_text(path.read_text().replace("intervention: w_0=3", f"model: {tiny_folder}\nintervention: w_0=3"))
    runner = CliRunner()
    result = runner.invoke(app, ["study", str(path)])
    assert result.exit_code == 2 and "sets `allow_code`" in result.output, result.output
    assert not marker.exists() and not (tmp_path / "out").exists()
    result = runner.invoke(app, ["study", str(path), "--allow-code"])  # the flag does not excuse the key
    assert result.exit_code == 2 and "sets `allow_code`" in result.output, result.output
    assert not marker.exists()
    path.write_text(path.read_text().replace("allow_code: true\n", ""))
    result = runner.invoke(app, ["study", str(path)])
    assert result.exit_code == 2 and "--allow-code" in result.output and not marker.exists()
    result = runner.invoke(app, ["study", str(path), "--allow-code", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert marker.read_text() == "ran"


# -- study names and output paths stay in their folder ----------------------------------------------

BAD_NAMES = ["..", ".", "../x", "../../etc", "/tmp/x", "a/b", "a\\b", "..\\x", "a\0b", "", "  ", "C:x", "a\nb"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_leaves_studies_is_refused(name):
    with pytest.raises(StudyError, match="`name` must be a plain folder name"):
        StudyConfig(corpus="x.txt", name=name)


@pytest.mark.parametrize("name", ["..", ".", "../x", "a\\b", "a\0b"])
def test_nothing_is_written_for_a_bad_name(tmp_path, monkeypatch, factual_lm, name):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "corpus.txt").write_text("the man said he\n")
    (tmp_path / "study.json").write_text(json.dumps({
        "corpus": str(tmp_path / "corpus.txt"), "name": name, "intervention": "w_0=3", "num_samples": 1,
        "max_new_tokens": 2, "attribute": None, "progress": False,
    }))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.chdir(work)
    with pytest.raises(StudyError, match="`name`"):
        run_study(tmp_path / "study.json", lm=factual_lm)
    from pyro_lmscm.cli.app import app

    result = CliRunner().invoke(app, ["study", "--corpus", str(tmp_path / "corpus.txt"), "--name", name,
                                      "--model", "unused", "--no-progress"])
    assert result.exit_code == 2 and "`name`" in result.output, result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_good_names_stay_in_studies():
    for name in ("demo", "gender-steer_1.0", "étude", "a b", "..x", "x.."):
        assert StudyConfig(corpus="x.txt", name=name).output_dir == Path("studies") / name


def test_a_nul_in_output_is_a_typed_error():
    with pytest.raises(StudyError, match="`output`"):
        StudyConfig(corpus="x.txt", output="out\0put")


# -- Ray clusters, pickled checkpoints and Parquet records ------------------------------------------


def test_a_config_file_cannot_choose_a_ray_cluster(tmp_path, monkeypatch):
    """Joining a Ray cluster trusts it with the process (Ray passes pickles): a config file's
    `ray_address` is refused before Ray is touched; the caller's override is honoured."""
    ray = pytest.importorskip("ray")
    marker = tmp_path / "MARKER"

    def init(*args, **kwargs):
        marker.write_text(f"ray.init{args}{kwargs}")
        raise RuntimeError("no cluster in this test")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    (tmp_path / "corpus.txt").write_text("the man said he\n")
    path = tmp_path / "study.yaml"
    path.write_text(f"corpus: corpus.txt\noutput: {tmp_path / 'out'}\nray_address: ray://evil.example:10001\n"
                    "intervention: w_0=3\nattribute: null\nprogress: false\n")
    with pytest.raises(StudyError, match=r"study\.yaml' sets `ray_address`.*--ray-address"):
        run_study(path, lm=tiny_llama(seed=0))
    assert not marker.exists() and not (tmp_path / "out").exists()
    path.write_text(path.read_text().replace("ray_address: ray://evil.example:10001\n", ""))
    config = StudyConfig.from_file(path, ray_address="127.0.0.1:6379")
    assert config.ray and config.ray_address == "127.0.0.1:6379"


def test_a_pickled_checkpoint_runs_no_code(tmp_path, marker, prompts):
    """A folder whose weights are a pickle (pytorch_model.bin) that runs code when unpickled:
    transformers unpickles with weights_only=True, so the load fails and nothing runs."""
    import torch

    folder = tmp_path / "pickled"
    lm = tiny_llama(seed=1)
    lm.model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    state = dict(lm.model.state_dict())
    state["evil"] = _MkdirOnUnpickle(str(marker))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="Could not load model"):
        load_lm(str(folder), progress=False)
    assert prompts == [] and not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the control: the payload is live
    assert marker.exists()


class _MkdirOnUnpickle:
    """Unpickling it creates ``path`` (``os.mkdir(path)``: code that runs)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_parquet_records_run_no_code(tmp_path):
    """A records part whose Arrow schema carries a pickled extension type (CVE-2023-47248,
    pyarrow < 14.0.1): loading the study's records runs nothing."""
    pa = pytest.importorskip("pyarrow")
    import pickle

    import pyarrow.parquet as pq

    from pyro_lmscm.study.records import open_store

    marker = tmp_path / "MARKER"
    evil = pa.field("evil", pa.binary(), metadata={
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": pickle.dumps(_MkdirOnUnpickle(str(marker))),
    })
    table = pa.table({"index": pa.array([0], pa.int64()), "evil": pa.array([b"x"], pa.binary())})
    table = table.cast(pa.schema([pa.field("index", pa.int64()), evil]))
    (tmp_path / "records.parquet").mkdir()
    pq.write_table(table, tmp_path / "records.parquet" / "part-000000000.parquet")
    store = open_store(tmp_path, "parquet")
    try:
        store.load()
    except Exception as error:  # a foreign part may be refused; it must not run code
        assert not isinstance(error, (SystemExit, KeyboardInterrupt))
    finally:
        store.close()
    assert not marker.exists()
    pickle.loads(evil.metadata[b"ARROW:extension:metadata"])  # the control: the payload is live
    assert marker.exists()


# -- YAML and corpora are read as data ---------------------------------------------------------------


def _python_tag(marker: Path) -> str:
    """A YAML value that an unsafe loader (yaml.load, FullLoader, UnsafeLoader) would turn into
    a call of os.mkdir(marker)."""
    return f"!!python/object/apply:os.mkdir [{json.dumps(str(marker))}]"


def test_yaml_files_are_read_safely(tmp_path, factual_lm):
    """Python tags in a study config or an intervention file construct nothing (a yaml.SafeLoader)."""
    import yaml

    from pyro_lmscm.interventions.spec import parse_intervention

    marker = tmp_path / "MARKER"
    (tmp_path / "corpus.txt").write_text("the man said he\n")
    config = tmp_path / "study.yaml"
    config.write_text(f"corpus: corpus.txt\nname: {_python_tag(marker)}\n")
    with pytest.raises(StudyError, match=r"study\.yaml' is not valid"):
        StudyConfig.from_file(config)
    spec = tmp_path / "intervention.yaml"
    spec.write_text(f"w_0: {_python_tag(marker)}\n")
    with pytest.raises(Exception):  # noqa: B017 -- any refusal will do (typed errors: issue 35 item 5); no code
        parse_intervention(str(spec), factual_lm)
    config.write_text(f"corpus: corpus.txt\nintervention: {spec}\noutput: {tmp_path / 'out'}\nprogress: false\n")
    with pytest.raises(Exception):  # noqa: B017
        run_study(config, lm=factual_lm)
    assert not marker.exists()
    yaml.unsafe_load(spec.read_text())  # the control: the tag is live under an unsafe loader
    assert marker.exists()


def test_a_corpus_is_text(tmp_path):
    """Code-looking prompts in .txt, .jsonl and .csv corpora are read as the text they are."""
    from pyro_lmscm.study import read_corpus

    marker = tmp_path / "MARKER"
    code = f"__import__('os').mkdir({str(marker)!r})"
    tag = _python_tag(marker)
    (tmp_path / "c.txt").write_text(f"{code}\n{tag}\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": code}) + "\n" + json.dumps({"prompt": tag}) + "\n")
    (tmp_path / "c.csv").write_text(f'prompt\n"{code}"\n"{tag.replace(chr(34), chr(34) * 2)}"\n')
    for suffix in ("txt", "jsonl", "csv"):
        assert [item.prompt for item in read_corpus(tmp_path / f"c.{suffix}")] == [code, tag], suffix
    assert not marker.exists()
