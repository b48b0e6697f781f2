"""Reading a corpus of prompts, optionally with observed continuations.

Three formats, by file suffix:

* ``.txt``: one prompt per line. A tab splits a line into prompt and continuation
  (``prompt<TAB>continuation``). Blank lines are skipped, and so are lines starting with
  ``#`` except ``# group: NAME``, which puts the lines below it in group ``NAME``.
* ``.jsonl``: one object per line with ``prompt`` and optionally ``continuation``, ``id``
  and ``group``; or, for a chat model, with ``messages`` instead of ``prompt``: the
  conversation before the assistant's reply, a list of ``{"role", "content"}`` objects
  (roles ``system``, ``user``, ``assistant``, ...; the last not the assistant's). The observed
  string is then the assistant's reply: ``reply`` (or ``observed``, or ``continuation``) gives
  it as text, ended by the end-of-turn token
  (:meth:`~pyro_lmscm.lm.HFLanguageModel.encode_reply`), or it is sampled. The prompt is the
  conversation in the model's chat template with the assistant's turn opened
  (:meth:`~pyro_lmscm.lm.HFLanguageModel.encode`); a model without one is refused.
* ``.csv``: a header row naming the same columns.

The prompt is taken as written (in ``.txt`` files surrounding spaces are stripped); a
continuation is kept verbatim, so its leading space survives (``" he smiled"``). Items
are numbered ``0, 1, ...`` in file order; a study seeds string ``i`` by ``(seed, i)``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..validation import as_path, unique_keys
from .config import StudyError

__all__ = ["CorpusItem", "read_corpus"]

_GROUP_DIRECTIVE = "# group:"
_COLUMNS = ("prompt", "continuation", "id", "group")


@dataclass(frozen=True)
class CorpusItem:
    """One string of a study.

    :param index: position in the corpus, from 0.
    :param prompt: the sentence beginning.
    :param continuation: the observed continuation, or ``None`` to sample one.
    :param id: an optional identifier from the corpus file.
    :param group: an optional group (e.g. ``"women"``) for breakdowns in the report.
    :param messages: a chat prompt: the conversation before the assistant's reply, a tuple of
        ``{"role", "content"}`` dicts (then ``prompt`` is only its text for display, one
        ``role: content`` line per message, and ``continuation`` the assistant's reply).
    """

    index: int
    prompt: str
    continuation: str | None = None
    id: str | None = None
    group: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.messages is not None and not isinstance(self.messages, tuple):  # from a record's plain list
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.messages is None:
            del out["messages"]  # (a text corpus: the fingerprints of older studies stay the same)
        else:
            out["messages"] = [dict(m) for m in self.messages]
        return out


#: The keys of a chat row's reply, the observed string (one of them at most).
_REPLY_KEYS = ("reply", "observed", "continuation")


def _messages(row: Mapping[str, Any], where: str) -> tuple[tuple[dict[str, str], ...], str, str | None]:
    """A chat row's messages (checked: role and content, no other key), their display text and
    the reply.

    :raises StudyError: naming ``where`` and the field.
    """
    from ..errors import ChatError
    from ..lm import check_messages

    if "prompt" in row:
        raise StudyError(f"{where}: give either `prompt` (text) or `messages` (a chat), not both.")
    try:
        messages = check_messages(row["messages"])
    except ChatError as error:
        raise StudyError(f"{where}: `messages`: {error}") from None
    for i, message in enumerate(messages):
        extra = sorted(set(message) - {"role", "content"}, key=str)
        if extra:
            raise StudyError(f"{where}: `messages[{i}]` has keys {extra}; a corpus message holds `role` and `content`.")
    given = [key for key in _REPLY_KEYS if row.get(key) not in (None, "")]
    if len(given) > 1:
        raise StudyError(f"{where}: give the assistant's reply once, as `reply`, not as {given}.")
    reply = row[given[0]] if given else None
    if reply is not None and not isinstance(reply, str):
        raise StudyError(f"{where}: `{given[0]}` (the assistant's reply) must be a string, got {reply!r:.80}.")
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return tuple({"role": m["role"], "content": m["content"]} for m in messages), text, reply


def _item(index: int, row: Mapping[str, Any], where: str) -> CorpusItem:
    messages = None
    if "messages" in row:
        messages, text, reply = _messages(row, where)
        row = {**{k: v for k, v in row.items() if k not in _REPLY_KEYS}, "prompt": text, "continuation": reply}
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise StudyError(f"{where}: `prompt` must be a non-empty string, got {prompt!r}.")
    continuation = row.get("continuation")
    if continuation is not None and not isinstance(continuation, str):
        raise StudyError(f"{where}: `continuation` must be a string, got {continuation!r}.")
    if continuation == "":
        continuation = None
    ident, group = row.get("id"), row.get("group")
    for key, value in (("prompt", prompt), ("continuation", continuation), ("id", ident), ("group", group)):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:  # a JSON "\ud800" escape: no character, no token
                raise StudyError(
                    f"{where}: `{key}` holds a lone surrogate {value[error.start]!r} at character {error.start}, "
                    "which is no Unicode character; remove it."
                ) from None
    return CorpusItem(
        index=index,
        prompt=prompt,
        continuation=continuation,
        id=None if ident in (None, "") else str(ident),
        group=None if group in (None, "") else str(group),
        messages=messages,
    )


def _read_txt(text: str, name: str) -> list[CorpusItem]:
    items: list[CorpusItem] = []
    group: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lower().startswith(_GROUP_DIRECTIVE):
            group = line[len(_GROUP_DIRECTIVE):].strip() or None
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, _, continuation = line.partition("\t")
        row = {"prompt": prompt.strip(), "continuation": continuation or None, "group": group}
        items.append(_item(len(items), row, f"{name}, line {number}"))
    return items


def _read_jsonl(text: str, name: str) -> list[CorpusItem]:
    items: list[CorpusItem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=unique_keys)
        except (ValueError, RecursionError) as error:  # nested too deep; an int over 4300 digits
            raise StudyError(f"{name}, line {number}: not valid JSON ({error}).") from None
        if not isinstance(row, Mapping):
            raise StudyError(f"{name}, line {number}: expected an object with a `prompt`, got {row!r}.")
        items.append(_item(len(items), row, f"{name}, line {number}"))
    return items


def _read_csv(text: str, name: str) -> list[CorpusItem]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise StudyError(
            f"{name}: the CSV header must name a `prompt` column (and optionally "
            f"{', '.join(_COLUMNS[1:])}), got {reader.fieldnames}."
        )
    return [_item(i, row, f"{name}, row {i + 2}") for i, row in enumerate(reader)]


def read_corpus(path: str | Path) -> list[CorpusItem]:
    """Read a ``.txt``, ``.jsonl`` or ``.csv`` corpus (see the module docstring).

    :param path: the corpus file.
    :returns: the items in file order, ``index`` ``0, 1, ...``.
    :raises StudyError: for a missing file, an unknown suffix, a malformed line or an
        empty corpus.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "corpus.txt"
    >>> _ = path.write_text("# group: men\\nThe man said that he\\n\\nThe cat\\t sat down.\\n")
    >>> [(item.index, item.prompt, item.continuation, item.group) for item in read_corpus(path)]
    [(0, 'The man said that he', None, 'men'), (1, 'The cat', ' sat down.', 'men')]
    """
    path = as_path(path, "corpus file", StudyError)
    if not path.exists():
        raise StudyError(f"corpus file {str(path)!r} does not exist.")
    if not path.is_file():
        raise StudyError(f"corpus file {str(path)!r} is not a file (a directory?); give a .txt, .jsonl or .csv file.")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise StudyError(f"corpus file {str(path)!r}: expected a .txt, .jsonl or .csv file.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StudyError(f"corpus file {str(path)!r} cannot be read: {error.strerror or error}.") from None
    try:
        text = data.decode("utf-8-sig")  # a byte order mark (spreadsheet CSVs) is no part of the header
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise StudyError(
            f"corpus file {str(path)!r}, line {line}: not UTF-8 text (byte {error.start}: {error.reason}); "
            "save the file as UTF-8."
        ) from None
    try:
        items = reader(text, path.name)
    except csv.Error as error:
        raise StudyError(f"corpus file {str(path)!r} is not valid CSV: {error}.") from None
    if not items:
        raise StudyError(f"corpus file {str(path)!r} holds no prompts.")
    return items
