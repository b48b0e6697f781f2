"""Run a study: every string of a corpus through abduction, action and prediction, resumably.

:func:`run_study` reads the corpus, skips the strings whose records are already stored in
the output folder, processes the others (here with one :class:`~pyro_lmscm.study.worker.StudyWorker`,
or on Ray with :mod:`~pyro_lmscm.study.ray_backend`), stores each record as soon as it is
done, and finally writes the report (:func:`~pyro_lmscm.study.report.write_report`).

The output folder holds ``study.json`` (the config and its result fingerprint), the records
(``records.jsonl`` or ``records.parquet/``) and the report files.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..runtime import compute_scope
from .config import StudyConfig, StudyError
from .corpus import CorpusItem, read_corpus
from .fingerprint import record_fingerprint, study_inputs
from .records import open_store
from .worker import StudyWorker, torch_threads

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
    """

    config: StudyConfig
    output_dir: Path
    records: list[dict[str, Any]]
    computed: int
    skipped: int
    elapsed_s: float
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def summary_markdown(self) -> str | None:
        path = self.files.get("summary_md")
        return path.read_text(encoding="utf-8") if path is not None else None


def _check_meta(output_dir: Path, config: StudyConfig, inputs: dict[str, str]) -> bool:
    """Write ``study.json``, or check that an existing one describes the same study: the same
    result settings and the same model contents.

    :returns: whether the stored records are all stale (only with ``force_recompute``).
    :raises StudyError: listing what changed, without ``force_recompute``.
    """
    path = output_dir / META_FILE
    settings = json.loads(json.dumps(config.result_settings(), default=str))
    stale = False
    if path.is_file():
        meta = json.loads(path.read_text(encoding="utf-8"))
        old = {**meta.get("result_settings", {}), **meta.get("inputs", inputs)}
        new = {**settings, **inputs}
        diff = [f"{key}: {old.get(key)!r} -> {value!r}" for key, value in new.items() if old.get(key) != value]
        if diff and not config.force_recompute:
            raise StudyError(
                f"{output_dir} holds the results of another study ({'; '.join(diff)}); choose another "
                "output folder, delete this one, or pass --force-recompute (force_recompute=True) to "
                "recompute every record."
            )
        stale = bool(diff)
    meta = {
        "fingerprint": config.fingerprint(),
        "result_settings": settings,
        "inputs": inputs,
        "config": config.to_dict(),
    }
    tmp = path.with_name(f".{META_FILE}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return stale


def _stale_records(
    records: list[dict[str, Any]], items: list[CorpusItem], fingerprints: dict[int, str], config: StudyConfig
) -> list[int]:
    """The indices of stored records made from other inputs than the corpus now gives.

    :raises StudyError: listing them, without ``force_recompute``.
    """
    stale = []
    for record in records:
        index = record["index"]
        if index >= len(items):
            continue
        item = items[index]
        if record.get("fingerprint") is not None:
            changed = record["fingerprint"] != fingerprints[index]
        else:  # records of an older version carry no fingerprint
            changed = record["prompt"] != item.prompt or record["continuation_given"] != (item.continuation is not None)
        if changed:
            stale.append(index)
    if stale and not config.force_recompute:
        first = items[stale[0]]
        shown = ", ".join(map(str, stale[:10])) + (" ..." if len(stale) > 10 else "")
        raise StudyError(
            f"{config.output_dir}: {len(stale)} stored records were made from other inputs than the corpus "
            f"now gives (records {shown}; record {stale[0]} now has prompt {first.prompt!r} and continuation "
            f"{first.continuation!r}); the corpus changed. Use another output folder, or pass "
            "--force-recompute (force_recompute=True) to recompute them."
        )
    return stale


class _Progress:
    """A rich progress bar with ETA on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int, done: int, description: str) -> None:
        self._progress = None
        if enabled:
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
) -> StudyResult:
    """Run (or resume) a counterfactual study and write its report.

    :param config: a :class:`StudyConfig`, a mapping of its fields, or a YAML / JSON file.
    :param lm: an already loaded factual model (local runs only; Ray workers load
        ``config.model`` themselves).
    :param on_record: called with each new record after it is stored.
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
    corpus = read_corpus(config.corpus_path)
    items = corpus[: config.limit] if config.limit is not None else corpus
    output_dir = config.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    inputs = study_inputs(config)
    all_stale = _check_meta(output_dir, config, inputs)
    fingerprints = {item.index: record_fingerprint(item, config, inputs) for item in items}
    store = open_store(output_dir, config.format)
    try:
        stored = store.load()
        stale = [r["index"] for r in stored] if all_stale else _stale_records(stored, items, fingerprints, config)
        if stale:
            store.remove(stale)
            stored = store.load()
        done = {record["index"] for record in stored}
        missing = {item.index for item in items if item.index not in done}
        # whole batches of the corpus only: a batch of which some records are stored (or
        # that a `limit` cuts) runs in full and stores the missing ones, so a resumed or
        # limited record equals an uninterrupted one
        size = config.batch_size
        todo = [item for item in corpus if any(i in missing for i in _block(item.index, size, len(corpus)))]
        skipped = len(items) - len(missing)
        computed = len(missing)

        with _Progress(config.progress, len(items), skipped, config.name) as bar:

            def store_record(record: dict[str, Any]) -> None:
                if record["index"] not in missing:
                    return  # a stored string of a batch that ran again
                missing.discard(record["index"])
                record["fingerprint"] = fingerprints[record["index"]]
                store.append(record)
                bar.advance()
                if on_record is not None:
                    on_record(record)

            if todo and config.ray:
                from .ray_backend import run_on_ray

                run_on_ray(config, todo, store_record)
            elif todo:
                with torch_threads(config.threads):
                    worker = StudyWorker(config, lm=lm)
                    # one set of float32 weight copies for the study, not one per block, and
                    # one heap kept for it (the scopes of each process_many call nest in these)
                    with compute_scope(worker.lm):
                        for _, block in itertools.groupby(todo, key=lambda item: item.index // size):
                            for record in worker.process_many(list(block)):
                                store_record(record)
        records = [record for record in store.load() if record["index"] < len(items)]
    finally:
        store.close()
    result = StudyResult(config, output_dir, records, computed, skipped, 0.0)
    if config.report:
        from .report import write_report

        result.files = write_report(output_dir, records, config)
    result.elapsed_s = time.perf_counter() - start
    return result


def load_study(output_dir: str | Path) -> tuple[StudyConfig, list[dict[str, Any]]]:
    """The config and records of a study folder (to redo a report, or analyse).

    :raises StudyError: if the folder holds no study.
    """
    output_dir = Path(output_dir)
    path = output_dir / META_FILE
    if not path.is_file():
        raise StudyError(f"{output_dir} holds no study ({META_FILE} is missing).")
    data = json.loads(path.read_text(encoding="utf-8"))["config"]
    data["output"] = str(output_dir)
    config = StudyConfig.from_mapping(data)
    store = open_store(output_dir, config.format)
    try:
        return config, store.load()
    finally:
        store.close()
