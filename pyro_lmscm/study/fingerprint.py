"""What a study record was computed from, as hashes: the resume check compares them.

A record depends on its prompt and given continuation, on the study's result settings
(intervention, decoding, seed, ...) and on the *content* of the models: a folder whose weights
were saved anew at the same path is another model. :func:`model_content` hashes a local
folder's files once and caches each file's sha256 by path, size and modification time, so a
resume rereads nothing that did not change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import InterventionError
from ..interventions.spec import read_spec
from ..loading import EMBEDDED_MODELS, cache_dir
from .config import StudyConfig
from .corpus import CorpusItem

__all__ = ["model_content", "record_fingerprint", "study_inputs"]

_HASH_CACHE = "file-sha256.json"


def _file_sha256(path: Path, cache: dict[str, Any]) -> str:
    stat = path.stat()
    key = str(path.resolve())
    entry = cache.get(key)
    if entry is not None and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
        return str(entry[2])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    cache[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def model_content(name_or_path: str) -> str:
    """A hash of what ``name_or_path`` loads: the wheel's sha256 for an embedded model, the
    sha256 of every file of a local folder (or of a local file), and the name itself for a
    hub id (whose content cannot be read offline)."""
    if name_or_path in EMBEDDED_MODELS:
        return f"embedded:{EMBEDDED_MODELS[name_or_path].sha256}"
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return f"name:{name_or_path}"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    cache_file = cache_dir() / _HASH_CACHE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
        digest.update(_file_sha256(file, cache).encode())
    try:  # the cache is a convenience: a read-only cache folder only costs a rehash
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{_HASH_CACHE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return f"sha256:{digest.hexdigest()}"


def study_inputs(config: StudyConfig) -> dict[str, str]:
    """The content hashes a study's results depend on beyond its settings: the factual
    model, a swapped-in model (``model=PATH``) and an intervention file."""
    inputs = {"model": model_content(config.model)}
    spec: Mapping[str, Any] | str = config.intervention
    if isinstance(spec, str):
        if spec.endswith((".json", ".yaml", ".yml")) and Path(spec).is_file():
            inputs["intervention_file"] = model_content(spec)
        try:
            spec = read_spec(spec)
        except InterventionError:
            return inputs  # the worker reports the bad spec
    if isinstance(spec, Mapping) and "model" in spec:
        inputs["intervention_model"] = model_content(str(spec["model"]))
    return inputs


def record_fingerprint(item: CorpusItem, config: StudyConfig, inputs: Mapping[str, str]) -> str:
    """The sha256 of everything that decides ``item``'s record."""
    data = {
        "prompt": item.prompt,
        "continuation": item.continuation,
        "settings": config.result_settings(),
        "inputs": dict(inputs),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
