"""Per-string records and the stores that write them incrementally, so a study can resume.

A **record** is a JSON-able dict for one string with all its draws (the schema is
:data:`RECORD_SCHEMA_DOC`). Log-probabilities of :math:`-\\infty` (a string outside the
decoding support of a mechanism) are stored as ``None``.

Two stores, both safe against a crash at any moment:

* :class:`JSONLStore` (``records.jsonl``): one line per record, flushed and ``fsync``-ed
  after each. A line cut short by a crash is ignored on reading and removed before the
  next append.
* :class:`ParquetStore` (``records.parquet/``): one part file per record, written under a
  temporary name and renamed into place (atomic); needs ``pyarrow``. The folder is a
  Parquet dataset (``pandas.read_parquet("records.parquet")``).

On restart a study skips the indices already stored (:meth:`RecordStore.done`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .config import StudyError

__all__ = [
    "ATTRIBUTION_VALUES",
    "BOUNDS_KEYS",
    "DRAW_FIELDS",
    "RECORD_SCHEMA_DOC",
    "JSONLStore",
    "ParquetStore",
    "RecordStore",
    "check_complete",
    "open_store",
]

#: The keys of a record's ``exact["bounds"]``: P(unchanged) and E[first divergence] under
#: Gumbel-max and the low and high ends of their ranges over counterfactually stable mechanisms
#: and over all mechanisms (:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`).
BOUNDS_KEYS = tuple(
    f"{query}_{end}"
    for query in ("prob_unchanged", "expected_first_divergence")
    for end in ("gumbel", "stable_low", "stable_high", "any_low", "any_high")
)

#: The per-part values of a record's ``attribution`` (:attr:`StudyConfig.attribution`), each a
#: list aligned with its ``parts``: the fields of :class:`~pyro_lmscm.inference.attribute.Attribution`.
ATTRIBUTION_VALUES = (
    "shapley",
    "shapley_se",
    "prob_unchanged_alone",
    "prob_unchanged_without",
    "shapley_first_divergence",
    "shapley_first_divergence_se",
    "first_divergence_alone",
    "first_divergence_without",
)

#: Per-draw fields, in order (the counterfactual and the interventional draws alike).
DRAW_FIELDS = (
    "ids",
    "text",
    "tokens",
    "token_log_prob_factual",
    "token_log_prob_intervened",
    "log_prob_factual",
    "log_prob_intervened",
    "changed",
    "first_divergence",
    "token_edit_distance",
    "normalized_token_edit_distance",
    "char_edit_distance",
    "common_prefix",
    "length",
    "attribute",
    "flipped",
    "token_prob_counterfactual",
)

RECORD_SCHEMA_DOC = """\
index            int      position in the corpus
id, group        str?     from the corpus
prompt           str      (a chat row: its messages as "role: content" lines, for display)
messages         [{role, content}]? a chat row's conversation before the assistant's reply
                          (its prompt in the model's chat template); the observed string is the
                          reply, ended by the end-of-turn token
continuation_given bool   an observed continuation was given (else sampled)
truncated        bool     the given continuation was cut to max_new_tokens
seed             int      the string's seed, from (study seed, index); with batch_size > 1
                          the seed of its batch, from (study seed, first index, batch_size)
fingerprint      str      sha256 of its own inputs, the result settings and the models
batch_fingerprint str     sha256 of everything the record depends on, its batch-mates
                          included (the resume check; see pyro_lmscm.study.fingerprint)
error            str?     why the string was skipped (then the fields below are absent)
log_prob_observed float   log p(factual | prompt) from the abduction guide
exact            {prob_unchanged, first_divergence, expected_first_divergence,
                  token_prob_unchanged}: exact, from exact_counterfactual; first_divergence
                  has n + 1 entries (the last is P(unchanged)); expected_first_divergence is
                  the expected number of leading observed tokens kept (n if unchanged);
                  token_prob_unchanged[t] = q(w_t | w_<t); bounds: {prob_unchanged_gumbel,
                  prob_unchanged_stable_low, _stable_high, _any_low, _any_high, and the same
                  five expected_first_divergence_*}: Gumbel-max and the exact ranges over
                  counterfactually stable mechanisms and over all mechanisms
                  (ExactCounterfactual.bounds()); with exact_only also the most
                  probable counterfactual: mode_ids, mode_text, mode_tokens, mode_log_prob,
                  mode_changed, mode_token_edit_distance, mode_normalized_token_edit_distance,
                  mode_char_edit_distance, mode_normalized_char_edit_distance
attribution      {by, parts, exact, num_permutations, num_passes, prob_unchanged,
                  prob_unchanged_empty, expected_first_divergence,
                  expected_first_divergence_empty, shapley, shapley_se, prob_unchanged_alone,
                  prob_unchanged_without, shapley_first_divergence, shapley_first_divergence_se,
                  first_divergence_alone, first_divergence_without}: only with the attribution
                  option (pyro_lmscm.inference.attribute, by="layer"); the per-part values are
                  lists aligned with parts; shapley is of log P(unchanged); non-finite values null
factual          {ids, text, tokens, token_log_prob_factual, token_log_prob_intervened,
                  log_prob_factual, log_prob_intervened, length, attribute}
counterfactual   [draw]   one per posterior draw (none with exact_only; nor interventional)
interventional   [draw]   one per fresh-noise draw of the intervened model
draw             {ids, text, tokens, token_log_prob_factual, token_log_prob_intervened,
                  log_prob_factual, log_prob_intervened, changed, first_divergence,
                  token_edit_distance, normalized_token_edit_distance, char_edit_distance,
                  common_prefix, length, attribute, flipped, token_prob_counterfactual}
                  token_prob_counterfactual[t] = exact q(s_t | s_<t) of the draw's tokens
                  under the counterfactual distribution (null for interventional draws);
                  with draw_scores off, the token_log_prob_*, log_prob_* and
                  token_prob_counterfactual fields of every draw are null
"""


def _check_record(record: Any, where: str) -> None:
    """A stored record is an object with a non-negative integer ``index``.

    :raises StudyError: naming ``where`` (the file and line), for anything else.
    """
    if not isinstance(record, dict):
        raise StudyError(
            f"{where} is not a record: expected an object with an `index`, got {record!r:.80}; the file was "
            "edited or corrupted. Delete that line to resume."
        )
    index = record.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise StudyError(
            f"{where}: the record's `index` must be a non-negative integer, got {index!r:.80}; the file was "
            "edited or corrupted. Delete that line to resume."
        )


def check_complete(record: dict[str, Any], where: str) -> None:
    """A record that a report can read: a ``prompt`` and either an ``error`` or the
    ``factual`` string and lists of ``counterfactual`` and ``interventional`` draws.

    :raises StudyError: naming ``where`` and the field.
    """
    def bad(field: str, expected: str) -> StudyError:
        return StudyError(
            f"{where}: record {record['index']} has no valid `{field}` ({expected}, got {record.get(field)!r:.60}); "
            "the file was edited or corrupted, or it is not a study's."
        )

    if not isinstance(record.get("prompt"), str):
        raise bad("prompt", "a string")
    if record.get("error") is not None:
        if not isinstance(record["error"], str):
            raise bad("error", "a string")
        return
    if not isinstance(record.get("factual"), dict):
        raise bad("factual", "an object")
    for field in ("counterfactual", "interventional"):
        draws = record.get(field)
        if not isinstance(draws, list) or not all(isinstance(draw, dict) for draw in draws):
            raise bad(field, "a list of draw objects")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class RecordStore:
    """Where the records of a study go; subclasses decide the format."""

    path: Path

    def done(self) -> set[int]:
        """The indices already stored."""
        return {record["index"] for record in self.load()}

    def append(self, record: dict[str, Any]) -> None:  # pragma: no cover - abstract
        """Store one record durably before returning."""
        raise NotImplementedError

    def load(self) -> list[dict[str, Any]]:  # pragma: no cover - abstract
        """All stored records, sorted by index (the first record of an index wins)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def remove(self, indices: Iterable[int]) -> None:  # pragma: no cover - abstract
        """Delete the records of ``indices`` durably (to recompute them)."""
        raise NotImplementedError

    @staticmethod
    def _unique_sorted(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        by_index: dict[int, dict[str, Any]] = {}
        for record in records:
            by_index.setdefault(int(record["index"]), record)
        return [by_index[i] for i in sorted(by_index)]


class JSONLStore(RecordStore):
    """Records as JSON lines in ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle: Any = None

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline
        out = []
        for number, line in enumerate(complete, start=1):
            if line.strip():
                try:
                    out.append(line.decode("utf-8"))
                except UnicodeDecodeError as error:
                    raise StudyError(
                        f"{self.path}: line {number} is not UTF-8 text (byte {error.start}: {error.reason}); the file "
                        "was edited or corrupted. Delete that line to resume."
                    ) from None
        if tail.strip():  # a last line without its newline: check whether it is whole
            try:
                json.loads(tail.decode("utf-8"))
            except (ValueError, RecursionError):
                return out  # cut short by a crash: ignore it
            out.append(tail.decode("utf-8"))
        return out

    def load(self) -> list[dict[str, Any]]:
        records = []
        lines = self._lines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:  # (an int over 4300 digits is a ValueError)
                raise StudyError(
                    f"{self.path}: line {number} of {len(lines)} is not valid JSON ({error}); the "
                    "file was edited or corrupted. Delete that line to resume."
                ) from error
            _check_record(record, f"{self.path}: line {number} of {len(lines)}")
            records.append(record)
        return self._unique_sorted(records)

    def _repair(self) -> None:
        """Cut a partial last line (a crash mid-write) so the next record starts a line."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        tail = data[keep:]
        try:
            json.loads(tail.decode("utf-8"))
        except (ValueError, RecursionError):
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())
        else:  # whole record, only the newline is missing
            with open(self.path, "ab") as handle:
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair()
            self._handle = open(self.path, "ab")
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        self._handle.write(line.encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self, indices: Iterable[int]) -> None:
        drop = set(indices)
        if not drop or not self.path.is_file():
            return
        self.close()
        lines = self._lines()
        keep = []
        for number, line in enumerate(lines, start=1):
            record = json.loads(line)
            _check_record(record, f"{self.path}: line {number} of {len(lines)}")
            if record["index"] not in drop:
                keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as handle:  # written aside and renamed: a crash keeps one whole file
            handle.write("".join(line + "\n" for line in keep).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)


def _parquet_schema() -> Any:
    import pyarrow as pa

    tokens = [
        ("ids", pa.list_(pa.int64())),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("token_log_prob_factual", pa.list_(pa.float64())),
        ("token_log_prob_intervened", pa.list_(pa.float64())),
        ("log_prob_factual", pa.float64()),
        ("log_prob_intervened", pa.float64()),
    ]
    draw = pa.struct(
        tokens
        + [
            ("changed", pa.bool_()),
            ("first_divergence", pa.int64()),
            ("token_edit_distance", pa.int64()),
            ("normalized_token_edit_distance", pa.float64()),
            ("char_edit_distance", pa.int64()),
            ("common_prefix", pa.int64()),
            ("length", pa.int64()),
            ("attribute", pa.string()),
            ("flipped", pa.bool_()),
            ("token_prob_counterfactual", pa.list_(pa.float64())),
        ]
    )
    exact = pa.struct(
        [
            ("prob_unchanged", pa.float64()),
            ("first_divergence", pa.list_(pa.float64())),
            ("expected_first_divergence", pa.float64()),
            ("token_prob_unchanged", pa.list_(pa.float64())),
            ("bounds", pa.struct([(key, pa.float64()) for key in BOUNDS_KEYS])),
        ]
    )
    factual = pa.struct(tokens + [("length", pa.int64()), ("attribute", pa.string())])
    attribution = pa.struct(
        [
            ("by", pa.string()),
            ("parts", pa.list_(pa.string())),
            ("exact", pa.bool_()),
            ("num_permutations", pa.int64()),
            ("num_passes", pa.int64()),
            ("prob_unchanged", pa.float64()),
            ("prob_unchanged_empty", pa.float64()),
            ("expected_first_divergence", pa.float64()),
            ("expected_first_divergence_empty", pa.float64()),
        ]
        + [(name, pa.list_(pa.float64())) for name in ATTRIBUTION_VALUES]
    )
    return pa.schema(
        [
            ("index", pa.int64()),
            ("id", pa.string()),
            ("group", pa.string()),
            ("prompt", pa.string()),
            ("continuation_given", pa.bool_()),
            ("truncated", pa.bool_()),
            ("seed", pa.int64()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("fingerprint", pa.string()),
            ("batch_fingerprint", pa.string()),
            ("error", pa.string()),
            ("log_prob_observed", pa.float64()),
            ("exact", exact),
            ("attribution", attribution),
            ("factual", factual),
            ("counterfactual", pa.list_(draw)),
            ("interventional", pa.list_(draw)),
        ]
    )


class ParquetStore(RecordStore):
    """Records as one Parquet part file each under the folder ``path`` (needs ``pyarrow``)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError as error:
            raise StudyError(
                "format='parquet' needs pyarrow: pip install 'pyro-lmscm[parquet]' (or use format='jsonl')."
            ) from error
        self.path = Path(path)
        self._schema = _parquet_schema()

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def done(self) -> set[int]:
        indices = set()
        for part in self._parts():
            index = part.stem.split("-", 1)[1]
            if not (index.isascii() and index.isdigit()):
                raise StudyError(f"{part}: not a record part (part-<index>.parquet); remove it to resume.")
            indices.add(int(index))
        return indices

    def load(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        records = []
        for part in self._parts():
            try:
                rows = pq.read_table(part, schema=self._schema).to_pylist()
            except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
                raise StudyError(
                    f"{part}: not a readable record part ({type(error).__name__}: {error}); the file was edited or "
                    "corrupted. Delete it to resume."
                ) from None
            for row in rows:
                _check_record(row, str(part))
            records.extend(rows)
        return self._unique_sorted(_drop_absent(r) for r in records)

    def append(self, record: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".tmp-*"):  # left by a crash mid-write
            stale.unlink(missing_ok=True)
        target = self.path / f"part-{int(record['index']):09d}.parquet"
        tmp = self.path / f".tmp-{target.name}"
        table = pa.Table.from_pylist([record], schema=self._schema)
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(self.path)

    def remove(self, indices: Iterable[int]) -> None:
        for index in set(indices):
            (self.path / f"part-{int(index):09d}.parquet").unlink(missing_ok=True)
        if self.path.is_dir():
            _fsync_dir(self.path)


#: Record fields that only some studies write (chat rows, the attribution option).
_OPTIONAL_FIELDS = ("messages", "attribution")


def _drop_absent(record: dict[str, Any]) -> dict[str, Any]:
    """Parquet fills every schema column; drop those an error record never had, and the
    optional fields a record did not have."""
    if record.get("error") is not None:
        return {k: v for k, v in record.items() if v is not None or k in ("id", "group")}
    return {k: v for k, v in record.items() if v is not None or k not in _OPTIONAL_FIELDS}


def open_store(output_dir: str | Path, format: str = "jsonl") -> RecordStore:
    """The record store of a study folder: ``records.jsonl`` or ``records.parquet/``.

    :raises StudyError: for an unknown format, or ``"parquet"`` without pyarrow.
    """
    output_dir = Path(output_dir)
    if format == "jsonl":
        return JSONLStore(output_dir / "records.jsonl")
    if format == "parquet":
        return ParquetStore(output_dir / "records.parquet")
    raise StudyError(f"unknown record format {format!r}; use 'jsonl' or 'parquet'.")
