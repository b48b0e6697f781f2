"""What a study record was computed from, as hashes: the resume check compares them.

A record depends on its prompt and given continuation, on the study's result settings
(intervention, decoding, seed, ...), on the *content* of the models (a folder whose weights
were saved anew at the same path is another model) and on its **batch-mates**: the strings
of a batch (``batch_size`` consecutive corpus indices) draw their noise from one generator,
so a record changes when another string of its batch changes, joins or leaves it (the
corpus grew into its last batch). Each record therefore carries two hashes:

* ``fingerprint`` (:func:`record_fingerprint`): its own inputs and the study's settings and
  model contents; when it changed, the corpus was edited at that string;
* ``batch_fingerprint`` (:func:`batch_fingerprints`): everything the record depends on, the
  items of its whole batch (index, prompt, continuation, id, group), the batch size, the
  result settings, the model contents and the seed policy
  (:data:`~pyro_lmscm.study.worker.SEED_POLICY`). The resume check compares it.

:func:`model_content` hashes a local folder's files once and caches each file's sha256 by
path, size and modification time, so a resume rereads nothing that did not change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InterventionError
from ..interventions.spec import read_spec
from ..loading import EMBEDDED_MODELS, cache_dir
from .config import StudyConfig
from .corpus import CorpusItem
from .worker import SEED_POLICY

__all__ = ["batch_fingerprints", "model_content", "record_fingerprint", "study_inputs"]

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
    """The sha256 of ``item``'s own inputs (its prompt and continuation) with the study's
    result settings and model contents (not its batch-mates: see :func:`batch_fingerprints`)."""
    data: dict[str, Any] = {
        "prompt": item.prompt,
        "continuation": item.continuation,
        "settings": config.result_settings(),
        "inputs": dict(inputs),
    }
    if item.messages is not None:  # a chat row: its conversation (a text row's hash stays as it was)
        data["messages"] = [dict(m) for m in item.messages]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def batch_fingerprints(
    corpus: Sequence[CorpusItem], config: StudyConfig, inputs: Mapping[str, str]
) -> dict[int, str]:
    """The resume fingerprint of every record of ``corpus``, by index: the sha256 of its index
    and of everything its batch depends on. The batches are the blocks of
    ``config.batch_size`` consecutive indices of the *whole* corpus (as the runner and the
    worker cut them, a ``limit`` aside); each block's hash covers its items (all fields), the
    batch size, :meth:`~pyro_lmscm.study.config.StudyConfig.result_settings`, the model
    contents ``inputs`` (:func:`study_inputs`) and the seed policy.

    :param corpus: the whole corpus, in index order.
    """
    size = config.batch_size
    common = {
        "settings": config.result_settings(),
        "batch_size": size,
        "inputs": dict(inputs),
        "seed_policy": SEED_POLICY,
    }
    out: dict[int, str] = {}
    for start in range(0, len(corpus), size):
        block = corpus[start : start + size]
        data = {**common, "batch": [item.to_dict() for item in block]}
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
        for item in block:
            out[item.index] = hashlib.sha256(f"{digest}:{item.index}".encode()).hexdigest()
    return out
