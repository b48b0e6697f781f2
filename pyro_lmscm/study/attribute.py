"""Target-attribute checks: did the intervention flip the attribute it aims at?

An attribute check labels a text (for example ``"male"``, ``"female"``, ``"both"`` or
``"none"`` by the gendered words it contains). For each counterfactual (or interventional)
draw the study records the label and whether it *flipped*: the factual text carries the
source attribute and the draw carries only the target one. Draws whose factual text does
not carry the source attribute are not eligible (``flipped`` is ``None``).

Two kinds:

* :class:`WordListAttribute`: whole-word, case-insensitive matching of two word lists;
  :data:`GENDER_WORDS` holds the built-in lists.
* :class:`CallableAttribute`: any importable function ``text -> label``, named
  ``"package.module:function"`` so that Ray workers can import it.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import StudyError

__all__ = [
    "GENDER_WORDS",
    "AttributeCheck",
    "CallableAttribute",
    "WordListAttribute",
    "make_attribute",
]

#: The built-in word lists of the ``"gender"`` check.
GENDER_WORDS: dict[str, tuple[str, ...]] = {
    "male": tuple((
        "he him his himself man men boy boys guy guys gentleman gentlemen father fathers dad "
        "son sons brother brothers husband husbands uncle uncles nephew grandfather grandson "
        "king kings prince mr sir boyfriend"
    ).split()),
    "female": tuple((
        "she her hers herself woman women girl girls lady ladies mother mothers mom mum "
        "daughter daughters sister sisters wife wives aunt aunts niece grandmother "
        "granddaughter queen queens princess mrs ms madam girlfriend"
    ).split()),
}

_WORD = re.compile(r"[a-z]+")

#: Label of a text with words of both lists, and of one with neither.
BOTH, NONE = "both", "none"


class AttributeCheck:
    """Base of the attribute checks: :meth:`label` a text, and say whether a draw flipped."""

    #: the attribute's name, e.g. ``"gender"``.
    name: str
    #: the label the intervention aims at.
    target: str

    def label(self, text: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def eligible(self, factual_label: str) -> bool:
        """Does the factual text carry the attribute that should flip?"""
        return factual_label != self.target

    def flipped(self, factual_label: str, label: str) -> bool | None:
        """``None`` if the factual text is not eligible, else whether ``label`` is the target."""
        if not self.eligible(factual_label):
            return None
        return label == self.target


@dataclass
class WordListAttribute(AttributeCheck):
    """Label a text by two word lists: ``source`` (e.g. male words), ``target`` (female).

    The label is ``source_label``, ``target_label``, ``"both"`` or ``"none"``. A draw has
    flipped when the factual text has source words and the draw only target words.

    >>> check = make_attribute("gender")
    >>> check.label("He said his sister was late."), check.label("She smiled.")
    ('both', 'female')
    >>> check.flipped(check.label("he left"), check.label("she left"))
    True
    """

    name: str
    source_label: str
    source_words: tuple[str, ...]
    target_label: str
    target_words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.source_label == self.target_label or {self.source_label, self.target_label} & {BOTH, NONE}:
            raise StudyError(
                f"attribute {self.name!r}: labels must differ and not be 'both' or 'none', got "
                f"{self.source_label!r} and {self.target_label!r}."
            )
        self.source_words = self._words("source_words", self.source_words)
        self.target_words = self._words("target_words", self.target_words)
        if not self.source_words or not self.target_words:
            raise StudyError(f"attribute {self.name!r}: both word lists must be non-empty.")
        self._source, self._target = set(self.source_words), set(self.target_words)

    def _words(self, field: str, words: Any) -> tuple[str, ...]:
        """``words`` lower-cased: a list of single words of the letters a-z, which is what
        :meth:`label` matches (a str would be its letters, "New York" or "café" never match).

        :raises StudyError: naming ``field`` and the first entry that is no such word.
        """
        if isinstance(words, (str, bytes)) or not isinstance(words, (list, tuple)):
            raise StudyError(f"attribute {self.name!r}: `{field}` must be a list of words, got {words!r:.80}.")
        for word in words:
            if not isinstance(word, str) or not _WORD.fullmatch(word.lower()):
                raise StudyError(
                    f"attribute {self.name!r}: `{field}` holds {word!r}, which is no single word of the letters "
                    "a-z: texts are matched word by word on those letters, so it could never match."
                )
        return tuple(word.lower() for word in words)

    @property
    def target(self) -> str:  # type: ignore[override]
        return self.target_label

    def label(self, text: str) -> str:
        words = set(_WORD.findall(text.lower()))
        source, target = bool(words & self._source), bool(words & self._target)
        if source and target:
            return BOTH
        if source:
            return self.source_label
        return self.target_label if target else NONE

    def eligible(self, factual_label: str) -> bool:
        return factual_label in (self.source_label, BOTH)


@dataclass
class CallableAttribute(AttributeCheck):
    """Label a text with an importable function ``"package.module:function"`` (``text -> label``).

    :param function: the import path of the function.
    :param target: the label the intervention aims at.
    :param source: if given, only factual texts with this label are eligible; otherwise
        every factual text whose label is not ``target``.
    """

    name: str
    function: str
    target: str  # type: ignore[assignment]
    source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.function, str):
            raise StudyError(f"attribute {self.name!r}: `function` must be 'package.module:function', "
                             f"got {self.function!r:.80}.")
        if self.target is None:
            raise StudyError(f"attribute {self.name!r}: `target` must be a label, got None.")
        # the labels are compared with str(function(text)): a YAML `target: 0` is the label '0'
        self.target = str(self.target)
        self.source = None if self.source is None else str(self.source)
        module, _, attr = self.function.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as error:
            raise StudyError(
                f"attribute {self.name!r}: cannot import {self.function!r} ({error}); write "
                "'package.module:function'."
            ) from error
        if not callable(fn):
            raise StudyError(f"attribute {self.name!r}: {self.function!r} is not callable.")
        self._fn: Callable[[str], Any] = fn

    def label(self, text: str) -> str:
        return str(self._fn(text))

    def eligible(self, factual_label: str) -> bool:
        if self.source is not None:
            return factual_label == self.source
        return factual_label != self.target


def check_code_allowed(spec: Any, allow_code: bool) -> None:
    """Refuse an attribute that names a function to run, unless ``allow_code``.

    :raises StudyError: naming the function and how to allow it.
    """
    if isinstance(spec, Mapping) and "function" in spec and not allow_code:
        raise StudyError(
            f"attribute {spec.get('name', 'attribute')!r} names the function {spec['function']!r}, which "
            "would be imported and run on every generated text. Code in a config is opt-in: pass --allow-code "
            "(or allow_code=True in Python; a config cannot set it) if you trust this config."
        )


def make_attribute(spec: str | Mapping[str, Any] | None, allow_code: bool = False) -> AttributeCheck | None:
    """Build an attribute check from a config value.

    A config reads as data (it is parsed with PyYAML's safe loader,
    :func:`~pyro_lmscm.validation.load_data_file`), so a mapping that names a function to
    import and run on every generated text is refused unless ``allow_code`` is true
    (``--allow-code``, or ``allow_code=True`` in Python; never a key of the config).

    * ``None``: no check;
    * ``"gender"`` (male to female words) or ``"gender:male"`` (female to male);
    * ``{"name": ..., "source_label": ..., "source_words": [...], "target_label": ...,
      "target_words": [...]}``: word lists;
    * ``{"name": ..., "function": "pkg.mod:fn", "target": LABEL, "source": LABEL}``: a function.

    :raises StudyError: on an unknown name or malformed mapping, or a function without
        ``allow_code``.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        name, _, target = spec.partition(":")
        if name != "gender" or target not in ("", "female", "male"):
            raise StudyError(
                f"unknown attribute {spec!r}; use 'gender', 'gender:male', or a mapping with word "
                "lists or a function."
            )
        target = target or "female"
        source = "male" if target == "female" else "female"
        return WordListAttribute("gender", source, GENDER_WORDS[source], target, GENDER_WORDS[target])
    if not isinstance(spec, Mapping):
        raise StudyError(f"`attribute` must be a name, a mapping or None, got {spec!r}.")
    options = dict(spec)
    name = str(options.pop("name", "attribute"))
    try:
        if "function" in options:
            check_code_allowed(spec, allow_code)
            return CallableAttribute(name=name, **options)
        return WordListAttribute(
            name=name,
            source_label=str(options.pop("source_label", "source")),
            source_words=options.pop("source_words"),
            target_label=str(options.pop("target_label", "target")),
            target_words=options.pop("target_words"),
            **options,
        )
    except (KeyError, TypeError) as error:
        raise StudyError(
            f"attribute {name!r}: bad mapping {spec!r} ({error}); give source_words and target_words "
            "(with optional source_label, target_label), or function and target."
        ) from error
