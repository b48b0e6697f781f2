r"""How far a counterfactual string is from the factual one, and how likely a string is.

Distances between token strings (sequences of ids) and between texts:

* :func:`token_edit_distance`, :func:`normalized_token_edit_distance`: Levenshtein distance
  (insertions, deletions, substitutions, each of cost 1) over token ids, computed by
  ``rapidfuzz.distance.Levenshtein``, which accepts any sequences of hashables;
* :func:`char_edit_distance`: the same over the characters of two texts;
* :func:`common_prefix_length` and :func:`first_divergence`.

**Divergence convention.** :func:`first_divergence` returns ``None`` for two equal strings
(there is no position at which they differ, and ``None`` cannot be averaged by mistake).
Per-draw numeric arrays (:class:`~pyro_lmscm.inference.CounterfactualDistribution`, the
ArviZ export) cannot hold ``None`` and use :data:`NO_DIVERGENCE` ``= -1`` instead; condition
on ``changed`` before averaging them. If one string is a proper prefix of the other, they
diverge at the length of the shorter one.

Log-probabilities of strings under the SCM live in :mod:`pyro_lmscm.inference.scoring`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence, Union

import torch
from rapidfuzz.distance import Levenshtein

from .errors import ObservationError
from .validation import is_integer

if TYPE_CHECKING:
    pass

__all__ = [
    "NO_DIVERGENCE",
    "TokenIds",
    "char_edit_distance",
    "common_prefix_length",
    "first_divergence",
    "normalized_char_edit_distance",
    "normalized_token_edit_distance",
    "token_edit_distance",
    "trim_after_end",
    "word_common_prefix",
]

#: A token string: a sequence of ids or a 1-D integer tensor.
TokenIds = Union[Sequence[int], torch.Tensor]

#: Stands for "no divergence" (equal strings) in per-draw numeric arrays.
NO_DIVERGENCE = -1


def _as_list(ids: TokenIds, what: str = "ids") -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point():
            raise ObservationError(
                f"`{what}` must be a 1-D integer tensor of token ids, got shape "
                f"{tuple(ids.shape)} and dtype {ids.dtype}."
            )
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, str):
        raise ObservationError(
            f"`{what}` is a str; token metrics take token ids. Use char_edit_distance for texts."
        )
    if not hasattr(ids, "__iter__") or isinstance(ids, (bytes, Mapping)):
        raise ObservationError(f"`{what}` must be token ids (a list or a 1-D integer tensor), got {ids!r:.80}.")
    out = []
    for token in ids:
        if not is_integer(token):  # int(1.5) would be 1, int(True) 1
            raise ObservationError(f"`{what}` must hold integer token ids, got {token!r:.80}.")
        out.append(int(token))
    return out


def trim_after_end(ids: TokenIds, eos_token_ids: Sequence[int]) -> list[int]:
    """The ids up to and including the first end-of-sequence id (all of them if none).

    >>> trim_after_end([5, 7, 1, 0, 0], eos_token_ids=[1])
    [5, 7, 1]
    """
    ends = set(_as_list(eos_token_ids, "eos_token_ids"))
    out = []
    for token in _as_list(ids):
        out.append(token)
        if token in ends:
            break
    return out


def token_edit_distance(a: TokenIds, b: TokenIds) -> int:
    """Levenshtein distance between two token strings (unit costs).

    >>> token_edit_distance([5, 6, 7], [5, 7])
    1
    """
    return int(Levenshtein.distance(_as_list(a, "a"), _as_list(b, "b")))


def normalized_token_edit_distance(a: TokenIds, b: TokenIds) -> float:
    r"""Levenshtein distance divided by the longer length, in :math:`[0, 1]`; ``0.0`` for two
    empty strings.

    >>> normalized_token_edit_distance([5, 6, 7, 8], [5, 7])
    0.5
    """
    return float(Levenshtein.normalized_distance(_as_list(a, "a"), _as_list(b, "b")))


def char_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the characters of two texts.

    >>> char_edit_distance("kitten", "sitting")
    3
    """
    if not isinstance(a, str) or not isinstance(b, str):
        raise ObservationError(
            f"char_edit_distance takes two str, got {type(a).__name__} and {type(b).__name__}; "
            "use token_edit_distance for token ids."
        )
    return int(Levenshtein.distance(a, b))


def normalized_char_edit_distance(a: str, b: str) -> float:
    """:func:`char_edit_distance` divided by the longer text's length, in :math:`[0, 1]`."""
    char_edit_distance(a, b)  # checks the types
    return float(Levenshtein.normalized_distance(a, b))


def common_prefix_length(a: TokenIds, b: TokenIds) -> int:
    """Length of the longest common prefix.

    >>> common_prefix_length([5, 6, 7], [5, 6, 9, 9])
    2
    """
    a, b = _as_list(a, "a"), _as_list(b, "b")
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def word_common_prefix(a: str, b: str) -> float:
    """The longest common prefix of the whitespace-separated words of two texts, as a
    fraction of ``a``'s words (1 if ``a`` has none): the paper's word-level prefix measure.

    >>> word_common_prefix("the cat sat down", "the cat ran off")
    0.5
    """
    char_edit_distance(a, b)  # checks the types
    words_a, words_b = a.split(), b.split()
    if not words_a:
        return 1.0
    n = 0
    for x, y in zip(words_a, words_b):
        if x != y:
            break
        n += 1
    return n / len(words_a)


def first_divergence(a: TokenIds, b: TokenIds) -> int | None:
    """The first position at which the strings differ, ``None`` if they are equal.

    A proper prefix diverges at its own length: one string goes on where the other stopped.

    >>> first_divergence([5, 6, 7], [5, 6, 9]), first_divergence([5, 6], [5, 6, 1])
    (2, 2)
    >>> first_divergence([5, 6], [5, 6]) is None
    True
    """
    a, b = _as_list(a, "a"), _as_list(b, "b")
    if a == b:
        return None
    return common_prefix_length(a, b)
