"""Run a study: every string of a corpus through abduction, action and prediction, resumably.

:func:`run_study` reads the corpus, skips the strings whose records are already stored in
the output folder and still match it, processes the others (here with one :class:`~pyro_lmscm.study.worker.StudyWorker`,
or on Ray with :mod:`~pyro_lmscm.study.ray_backend`), stores each record as soon as it is
done, and finally writes the report (:func:`~pyro_lmscm.study.report.write_report`).

The output folder holds ``study.json`` (the config and its result fingerprint), the records
(``records.jsonl`` or ``records.parquet/``) and the report files.

A record depends on the other strings of its batch (:mod:`~pyro_lmscm.study.worker`), and
its resume fingerprint covers them (:mod:`~pyro_lmscm.study.fingerprint`): a resume keeps a
stored record only if its whole batch is unchanged, and recomputes a changed batch whole, so
a resumed study equals a fresh run of its final corpus and config. A batch changed by an
edit of a stored string (its prompt, continuation, id or group) is refused unless
``force_recompute`` is set; one changed only by its other strings (the corpus grew into
the last batch) is recomputed.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..loading import check_device
from ..runtime import compute_scope
from ..validation import as_path
from .config import StudyConfig, StudyError
from .corpus import CorpusItem, read_corpus
from .fingerprint import batch_fingerprints, record_fingerprint, study_inputs
from .records import check_complete, open_store
from .worker import MessengerFactory, StudyWorker, check_messengers, torch_threads

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["StudyResult", "load_study", "run_study"]

META_FILE = "study.json"


@dataclass
class StudyResult:
    """What :func:`run_study` did.

    :ivar config: the config.
    :ivar output_dir: the results folder.
    :ivar records: all records of the corpus (sorted by index).
    :ivar computed: strings processed by this call.
    :ivar skipped: strings found already stored (resumed).
    :ivar elapsed_s: wall-clock seconds of this call.
    :ivar files: report files by name (``"summary_md"``, ``"html"``, ...).
    :ivar recomputed: stored records dropped and computed again (among ``computed``): the
        records of a batch that changed (see :func:`~pyro_lmscm.study.fingerprint.batch_fingerprints`).
    """

    config: StudyConfig
    output_dir: Path
    records: list[dict[str, Any]]
    computed: int
    skipped: int
    elapsed_s: float
    files: dict[str, Path] = field(default_factory=dict)
    recomputed: int = 0

    @property
    def summary_markdown(self) -> str | None:
        path = self.files.get("summary_md")
        return path.read_text(encoding="utf-8") if path is not None else None


def _read_meta(path: Path) -> dict[str, Any]:
    """The content of a ``study.json``: an object whose ``config`` is an object.

    :raises StudyError: naming the file, for anything else.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        raise StudyError(f"{path} is not a readable study file ({type(error).__name__}: {error}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise StudyError(
            f"{path} is not a study file: expected an object with a `config` object, got {meta!r:.80}."
        )
    for key in ("result_settings", "inputs"):
        if not isinstance(meta.get(key, {}), dict):
            raise StudyError(f"{path}: `{key}` must be an object, got {meta[key]!r:.80}.")
    return meta


def _has_records(output_dir: Path, format: str | None = None) -> bool:
    """Whether the folder holds any stored record in ``format`` (either format: ``None``)."""
    jsonl, parquet = output_dir / "records.jsonl", output_dir / "records.parquet"
    return (format != "parquet" and jsonl.is_file() and jsonl.stat().st_size > 0) or (
        format != "jsonl" and parquet.is_dir() and any(parquet.glob("part-*"))
    )


def _check_meta(output_dir: Path, config: StudyConfig, inputs: dict[str, str]) -> bool:
    """Check that an existing ``study.json`` describes the same study: the same result
    settings and the same model contents (reads only; :func:`_write_meta` writes it).

    :returns: whether the stored records are all stale (only with ``force_recompute``).
    :raises StudyError: listing what changed, without ``force_recompute``.
    """
    path = output_dir / META_FILE
    if not (path.is_file() and _has_records(output_dir)):  # without records it describes no results yet
        return False
    meta = _read_meta(path)
    old = {**meta.get("result_settings", {}), **meta.get("inputs", inputs)}
    new = {**_settings(config), **inputs}
    # a dropped attribution changes the records as an added one does (older settings dropped keys
    # whose value became a default: those still resume)
    keys = [*new, *(["attribution"] if "attribution" in old and "attribution" not in new else [])]
    # compared as JSON text, so that 1 and 1.0 differ here as they do in the records' fingerprints
    diff = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys
            if _json(old.get(key)) != _json(new.get(key))]
    if diff and not config.force_recompute:
        raise StudyError(
            f"{output_dir} holds the results of another study ({'; '.join(diff)}); choose another "
            "output folder, delete this one, or pass --force-recompute (force_recompute=True) to "
            "recompute every record."
        )
    return bool(diff)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _settings(config: StudyConfig) -> dict[str, Any]:
    """The result settings as ``study.json`` holds them (JSON values)."""
    return json.loads(json.dumps(config.result_settings(), default=str))  # type: ignore[no-any-return]


def _write_meta(output_dir: Path, config: StudyConfig, inputs: dict[str, str]) -> None:
    """Write ``study.json`` (aside, then renamed)."""
    path = output_dir / META_FILE
    meta = {
        "fingerprint": config.fingerprint(),
        "result_settings": _settings(config),
        "inputs": inputs,
        "config": config.to_dict(),
    }
    tmp = path.with_name(f".{META_FILE}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _shown(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")


def _stale_records(
    records: list[dict[str, Any]],
    items: list[CorpusItem],
    fingerprints: dict[int, str],
    batch_fingerprints: dict[int, str],
    config: StudyConfig,
) -> list[int]:
    """The indices of the stored records to recompute: every record of each batch that holds
    a record whose resume fingerprint (:func:`~pyro_lmscm.study.fingerprint.batch_fingerprints`)
    no longer matches. A batch whose own records are unchanged but whose other strings
    changed, joined or left (the corpus grew into its last batch) is recomputed silently, and
    so is a batch with a record stored before records carried their bounds over mechanisms
    (``exact["bounds"]``).

    :raises StudyError: without ``force_recompute``, if a stored record was made from other
        inputs than the corpus now gives (its prompt, continuation, id or group), or if a
        record in a batch of several strings was stored by an older version, whose
        fingerprint did not cover its batch-mates (records of ``batch_size`` 1 are checked by
        their own fingerprint).
    """
    size = config.batch_size
    changed, unchecked, moved = [], [], []
    for record in records:
        index = record["index"]
        if index >= len(items):
            continue  # beyond the limit: checked when a run reaches it
        item = items[index]
        if record.get("fingerprint") is not None:
            own = record["fingerprint"] != fingerprints[index]
        else:  # records of an older version carry no fingerprint
            own = (
                record.get("prompt") != item.prompt
                or record.get("continuation_given") != (item.continuation is not None)
            )
        if own or record.get("id") != item.id or record.get("group") != item.group:
            changed.append(index)
        elif record.get("batch_fingerprint") is None:
            if size > 1:  # stored by an older version: its batch-mates cannot be checked
                unchecked.append(index)
        elif record["batch_fingerprint"] != batch_fingerprints[index]:
            moved.append(index)
        elif record.get("error") is None and (record.get("exact") or {}).get("bounds") is None:
            moved.append(index)  # stored before records carried their bounds: the batch runs again, same numbers
    if changed and not config.force_recompute:
        first = items[changed[0]]
        raise StudyError(
            f"{config.output_dir}: {len(changed)} stored records were made from other inputs than the corpus "
            f"now gives (records {_shown(changed)}; record {changed[0]} now has prompt {first.prompt!r} and "
            f"continuation {first.continuation!r} (id {first.id!r}, group {first.group!r})); the corpus changed. "
            "Use another output folder, or pass --force-recompute (force_recompute=True) to recompute them with "
            f"their batches (batch_size={size}: the strings of a batch draw their noise together)."
        )
    if unchecked and not config.force_recompute:
        raise StudyError(
            f"{config.output_dir}: {len(unchecked)} stored records (records {_shown(unchecked)}) were stored by an "
            "older pyro-lmscm, whose record fingerprints do not cover a record's batch-mates; with "
            f"batch_size={size} a record depends on the other strings of its batch, so these cannot be checked "
            "against the corpus. Pass --force-recompute (force_recompute=True) to recompute them, or use another "
            "output folder."
        )
    blocks = {index // size for index in (*changed, *unchecked, *moved)}
    return [record["index"] for record in records if record["index"] // size in blocks]


class _Progress:
    """A rich progress bar with ETA on stderr (or nothing); the caller's listener of
    :mod:`pyro_lmscm.reporting` instead, where one is installed (the command line's bar)."""

    def __init__(self, enabled: bool, total: int, done: int, description: str) -> None:
        from ..reporting import listening, report

        self._progress = None
        self._report = None
        if listening():
            self._report = lambda n: report(f"study {description}: strings", n, total)
            if done:
                self._report(done)
        elif enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task(description, total=total, completed=done)

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def advance(self, n: int = 1) -> None:
        if self._report is not None:
            self._report(n)
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


def _block(index: int, size: int, total: int) -> range:
    """The corpus indices of the batch of ``index``."""
    start = index - index % size
    return range(start, min(start + size, total))


def run_study(
    config: StudyConfig | Mapping[str, Any] | str | Path,
    *,
    lm: HFLanguageModel | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    messengers: Mapping[str, MessengerFactory] | None = None,
) -> StudyResult:
    """Run (or resume) a counterfactual study and write its report.

    :param config: a :class:`StudyConfig`, a mapping of its fields, or a YAML / JSON file.
    :param lm: an already loaded factual model (local runs only; Ray workers load
        ``config.model`` themselves).
    :param on_record: called with each new record after it is stored.
    :param messengers: the user's own Pyro Messengers, added to the config's intervention
        (local runs only): by name, a factory ``factory(scm)`` that builds the Messenger for
        the study's SCM. The names (not the code) enter the resume fingerprints: rename one
        when you change what it does.
    :returns: a :class:`StudyResult`.
    :raises StudyError: for a bad config or corpus, or an output folder of another study.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "corpus.txt").write_text("the man said he\\nthe woman said she\\n")
    >>> config = StudyConfig(corpus=str(folder / "corpus.txt"), output=str(folder / "out"),
    ...     intervention="w_0=3", num_samples=2, max_new_tokens=4, attribute=None,
    ...     report=False, progress=False)
    >>> result = run_study(config, lm=tiny_lm)
    >>> len(result.records), all(d["ids"][0] == 3 for r in result.records for d in r["counterfactual"])
    (2, True)
    """
    start = time.perf_counter()
    config = StudyConfig.coerce(config)
    messengers = check_messengers(messengers, config)
    corpus = read_corpus(config.corpus_path)
    items = corpus[: config.limit] if config.limit is not None else corpus
    output_dir = config.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise StudyError(f"the output folder {str(output_dir)!r} is a file; choose another output folder.")
    other = next(kind for kind in ("jsonl", "parquet") if kind != config.format)
    if _has_records(output_dir, other):  # one store per folder: a resume reads the config's format only
        raise StudyError(
            f"{output_dir} holds records in the {other!r} format, but the config asks for format="
            f"{config.format!r}, which would compute them all again beside them; resume with format={other!r}, "
            "or choose another output folder."
        )
    check_device(config.device)  # an unknown or missing device writes nothing
    inputs = study_inputs(config)
    if messengers:
        inputs["messengers"] = json.dumps(sorted(messengers))
    # what to run is worked out from the folder as it is (nothing written yet)
    all_stale = _check_meta(output_dir, config, inputs)
    fingerprints = {item.index: record_fingerprint(item, config, inputs) for item in items}
    by_batch = batch_fingerprints(corpus, config, inputs)
    store = open_store(output_dir, config.format)
    try:
        stored = store.load()
        if all_stale:
            stale = [r["index"] for r in stored]
        else:
            stale = _stale_records(stored, items, fingerprints, by_batch, config)
        recomputed = sum(index < len(items) for index in stale)
        done = {record["index"] for record in stored} - set(stale)
        missing = {item.index for item in items if item.index not in done}
        # whole batches of the corpus only: a batch of which some records are stored (or
        # that a `limit` cuts) runs in full and stores the missing ones, so a resumed or
        # limited record equals an uninterrupted one
        size = config.batch_size
        todo = [item for item in corpus if any(i in missing for i in _block(item.index, size, len(corpus)))]
        skipped = len(items) - len(missing)
        computed = len(missing)
        worker = None
        if todo and not config.ray:
            # the model, dtype, device, intervention and attribute check are checked (the worker
            # built) before anything is written or a stored record dropped, so a bad config
            # leaves the folder as it was
            with torch_threads(config.threads):
                worker = StudyWorker(config, lm=lm, messengers=messengers)
            worker.check_chat(todo)  # a chat corpus for a model without a chat template
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file on the way, no permission, a read-only disk
            raise StudyError(f"cannot create the output folder {str(output_dir)!r}: {error}.") from None
        written: list[bool] = []

        def write() -> None:
            """study.json and the removal of the stale records, once: when the first new record
            is stored (a Ray actor refuses a bad config only once it is started) or at the end."""
            if not written:
                written.append(True)
                _write_meta(output_dir, config, inputs)
                if stale:
                    store.remove(stale)

        if not todo:
            write()

        with _Progress(config.progress, len(items), skipped, config.name) as bar:

            def store_record(record: dict[str, Any]) -> None:
                if record["index"] not in missing:
                    return  # a stored string of a batch that ran again
                write()
                missing.discard(record["index"])
                record["fingerprint"] = fingerprints[record["index"]]
                record["batch_fingerprint"] = by_batch[record["index"]]
                store.append(record)
                bar.advance()
                if on_record is not None:
                    on_record(record)

            if todo and config.ray:
                from .ray_backend import run_on_ray

                run_on_ray(config, todo, store_record)
            elif worker is not None:
                with torch_threads(config.threads):
                    # one set of float32 weight copies for the study, not one per block, and
                    # one heap kept for it (the scopes of each process_many call nest in these)
                    with compute_scope(worker.lm):
                        for _, block in itertools.groupby(todo, key=lambda item: item.index // size):
                            for record in worker.process_many(list(block)):
                                store_record(record)
        write()
        records = [record for record in store.load() if record["index"] < len(items)]
    finally:
        store.close()
    result = StudyResult(config, output_dir, records, computed, skipped, 0.0, recomputed=recomputed)
    if config.report:
        from .report import write_report

        result.files = write_report(output_dir, records, config)
    result.elapsed_s = time.perf_counter() - start
    return result


def load_study(output_dir: str | Path) -> tuple[StudyConfig, list[dict[str, Any]]]:
    """The config and records of a study folder (to redo a report, or analyse).

    :raises StudyError: if the folder holds no study.
    """
    output_dir = as_path(output_dir, "`output_dir`", StudyError)
    path = output_dir / META_FILE
    if not path.is_file():
        raise StudyError(f"{output_dir} holds no study ({META_FILE} is missing).")
    data = dict(_read_meta(path)["config"])
    data.pop("allow_code", None)  # older versions stored it; a study folder never switches code on
    data["output"] = str(output_dir)
    try:
        config = StudyConfig.from_mapping(data)
    except StudyError as error:
        raise StudyError(f"{path}: the stored config is not valid: {error}") from None
    store = open_store(output_dir, config.format)
    try:
        records = store.load()
    finally:
        store.close()
    for record in records:
        check_complete(record, str(store.path))
    return config, records
