"""The cache of converted embedded models is keyed by the ``transformers`` major version.

``save_pretrained`` of transformers 5.x writes a folder that 4.x cannot read (its tokenizer
class ``TokenizersBackend``) or misreads without a word (``rope_parameters``: 4.x runs the model
with its default RoPE base), so each major version converts its own copy. These tests replace
the download and the GGUF conversion with a tiny Llama saved by ``save_pretrained`` whose
``config.json`` records the version that "wrote" it, and pretend other versions by patching
``loading._transformers_version``: no SmolLM2 here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from pyro_lmscm import loading
from pyro_lmscm.errors import ModelLoadError
from pyro_lmscm.loading import EMBEDDED_MODELS, fetch_embedded, load_model_and_tokenizer
from pyro_lmscm.testing import tiny_llama

SMOLLM2 = "smollm2-135m-instruct"
SPEC = EMBEDDED_MODELS[SMOLLM2]
MAJOR = int(transformers.__version__.split(".")[0])
OTHER = 4 if MAJOR != 4 else 5  # a major version that is not the installed one


def _save_tiny(folder: Path, version: str) -> Path:
    """A tiny Llama and its tokenizer saved into ``folder``, as if ``transformers`` ``version`` wrote it."""
    lm = tiny_llama(seed=0)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)  # type: ignore[union-attr]
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = version
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_ENV_VAR, str(root))
    return root


@pytest.fixture
def conversions(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders the (fake) conversion wrote, in order; the wheel is neither downloaded nor checked."""
    done: list[Path] = []

    def download(requirement: str, dest: Path) -> Path:
        dest.mkdir(parents=True)
        (dest / "fake.whl").write_bytes(b"")
        return dest / "fake.whl"

    def extract(wheel: Path, dest: Path) -> Path:
        dest.mkdir(parents=True)
        (dest / "fake.gguf").write_bytes(b"")
        return dest / "fake.gguf"

    def convert(gguf: Path, out: Path, spec: object) -> None:
        _save_tiny(out, loading._transformers_version())
        done.append(out)

    monkeypatch.setattr(loading, "_pip_download", download)
    monkeypatch.setattr(loading, "_verify_sha256", lambda path, expected: None)
    monkeypatch.setattr(loading, "_extract_gguf", extract)
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return done


def _pretend(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(loading, "_transformers_version", lambda: version)


@pytest.mark.parametrize(("version", "key"), [("4.56.2", "tf4"), ("4.57.1", "tf4"), ("5.0.0rc1", "tf5"),
                                              ("5.25.0", "tf5"), ("6.1.0.dev0", "tf6")])
def test_the_folder_name_has_the_transformers_major_version(
    cache: Path, monkeypatch: pytest.MonkeyPatch, version: str, key: str
) -> None:
    assert loading._converted_dir(SPEC) == cache.resolve() / f"{SMOLLM2}-{SPEC.sha256[:12]}-tf{MAJOR}"
    _pretend(monkeypatch, version)
    assert loading._converted_dir(SPEC) == cache.resolve() / f"{SMOLLM2}-{SPEC.sha256[:12]}-{key}"


def test_each_major_version_converts_its_own_copy(
    cache: Path, conversions: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = fetch_embedded(SMOLLM2, progress=False)
    assert mine.name.endswith(f"-tf{MAJOR}") and len(conversions) == 1
    assert fetch_embedded(SMOLLM2, progress=False) == mine and len(conversions) == 1  # reused

    _pretend(monkeypatch, f"{OTHER}.3.0")  # another venv sharing the cache
    theirs = fetch_embedded(SMOLLM2, progress=False)
    assert theirs.name.endswith(f"-tf{OTHER}") and theirs != mine and len(conversions) == 2
    assert fetch_embedded(SMOLLM2, progress=False) == theirs and len(conversions) == 2

    _pretend(monkeypatch, f"{OTHER}.4.1")  # a minor upgrade reads the same copy
    assert fetch_embedded(SMOLLM2, progress=False) == theirs and len(conversions) == 2
    monkeypatch.undo()
    assert loading._saved_by(mine) == transformers.__version__  # the first copy is untouched
    assert loading._saved_by(theirs) == f"{OTHER}.3.0"


@pytest.mark.parametrize(("written_by", "running", "reused"), [
    ("5.25.0", "5.3.0", True),  # 5.x reads a folder that an earlier release converted under 5.x
    ("5.25.0", "4.56.2", False),  # another major version converts its own copy
    ("4.56.2", "4.57.1", False),  # 4.x conversions of earlier releases had the wrong special tokens
    ("4.56.2", "5.25.0", False),
])
def test_an_unkeyed_folder_of_earlier_releases_is_read_only_by_its_major_version_from_5(
    cache: Path, conversions: list[Path], monkeypatch: pytest.MonkeyPatch, written_by: str, running: str,
    reused: bool,
) -> None:
    legacy = cache / f"{SMOLLM2}-{SPEC.sha256[:12]}"
    cache.mkdir()
    _save_tiny(legacy, written_by)
    _pretend(monkeypatch, running)
    folder = fetch_embedded(SMOLLM2, progress=False)
    if reused:
        assert folder == legacy.resolve() and conversions == []
        model, tokenizer = load_model_and_tokenizer(SMOLLM2, device="cpu", progress=False)
        assert tokenizer is not None and model.config.vocab_size == len(tokenizer)
    else:
        assert folder.name == f"{legacy.name}-tf{running[0]}" and len(conversions) == 1
    assert loading._saved_by(legacy) == written_by  # the old folder is left as it was


@pytest.mark.parametrize("written_by", [f"{OTHER}.2.0", None])
def test_a_folder_copied_in_from_another_major_version_raises_naming_it(
    cache: Path, conversions: list[Path], written_by: str | None
) -> None:
    folder = loading._converted_dir(SPEC)
    folder.parent.mkdir(parents=True)
    _save_tiny(folder, written_by or "")
    if written_by is None:  # no version recorded at all
        config = json.loads((folder / "config.json").read_text())
        del config["transformers_version"]
        (folder / "config.json").write_text(json.dumps(config))
    for call in (lambda: fetch_embedded(SMOLLM2, progress=False),
                 lambda: load_model_and_tokenizer(SMOLLM2, device="cpu", progress=False)):
        with pytest.raises(ModelLoadError, match="Delete the folder") as info:
            call()
        assert str(folder) in str(info.value) and transformers.__version__ in str(info.value)
    assert conversions == []  # nothing converted over it


@pytest.mark.parametrize("damage", ["config.json is not JSON", "config.json is a list", "no config.json"])
def test_a_damaged_folder_raises_naming_it(cache: Path, conversions: list[Path], damage: str) -> None:
    folder = loading._converted_dir(SPEC)
    folder.parent.mkdir(parents=True)
    _save_tiny(folder, transformers.__version__)
    if damage == "config.json is not JSON":
        (folder / "config.json").write_text('{"model_type": "llama", ')
    elif damage == "config.json is a list":
        (folder / "config.json").write_text("[]")
    else:
        (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="is damaged") as info:
        load_model_and_tokenizer(SMOLLM2, device="cpu", progress=False)
    assert str(folder) in str(info.value) and "Delete the folder" in str(info.value)
    assert conversions == []


@pytest.mark.parametrize("damage", ["tokenizer.json", "model.safetensors"])
def test_a_folder_this_transformers_cannot_read_raises_naming_it(
    cache: Path, conversions: list[Path], damage: str
) -> None:
    folder = fetch_embedded(SMOLLM2, progress=False)
    (folder / damage).write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="delete it to convert the model again") as info:
        load_model_and_tokenizer(SMOLLM2, device="cpu", progress=False)
    message = str(info.value)
    assert str(folder) in message and f"written by transformers {transformers.__version__}" in message
    assert "token ids only" not in message  # the advice for a user's own folder, not for the cache


def test_models_command_shows_a_damaged_folder_and_lists_on(cache: Path) -> None:
    from typer.testing import CliRunner

    from pyro_lmscm.cli import app

    folder = loading._converted_dir(SPEC)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("not json")
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps the message to the terminal's width
    assert "unusable" in text and "is damaged" in text and SMOLLM2 in text


def test_the_gguf_tokenizer_gets_the_models_end_and_padding_tokens() -> None:
    from transformers import LlamaConfig

    from pyro_lmscm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # <pad> 0, </s> 1, <s> 2
    tokenizer.eos_token = "<s>"  # as 4.x reads SmolLM2's GGUF tokenizer: the start token ends, no padding
    tokenizer.pad_token = None
    loading._match_special_tokens(tokenizer, LlamaConfig(eos_token_id=1, pad_token_id=0, bos_token_id=2))
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("</s>", 1, 0)
    assert tokenizer.bos_token_id == 2
    assert tokenizer("the man")["input_ids"] == tokenizer("the man", add_special_tokens=False)["input_ids"]
