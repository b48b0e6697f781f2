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

:func:`string_log_prob` scores strings under the SCM, factual or intervened:

.. math::

    \log p_m(w_{0:n} \mid \text{prompt}) = \sum_{t < n_\text{end}}
        \log \mathrm{softmax}\big(g(f_m(\text{prompt}, w_{<t}))\big)_{w_t},

where :math:`f_m` is the mechanism, :math:`g` the decoding transform ``scm.decoding`` and
:math:`n_\text{end}` the position just after the first end-of-sequence token (or :math:`n`):
once the string has ended every later token is certain, as in the SCM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch
from rapidfuzz.distance import Levenshtein

from .errors import ObservationError
from .interventions.ops import as_do_data
from .models.sites import MECHANISM, PROMPT, parse_step_site
from .validation import as_int

if TYPE_CHECKING:
    from .interventions.ops import Intervention
    from .models.scm import LanguageModelSCM

__all__ = [
    "NO_DIVERGENCE",
    "TokenIds",
    "char_edit_distance",
    "common_prefix_length",
    "first_divergence",
    "normalized_char_edit_distance",
    "normalized_token_edit_distance",
    "string_log_prob",
    "token_edit_distance",
    "trim_after_end",
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
    return [int(i) for i in ids]


def trim_after_end(ids: TokenIds, eos_token_ids: Sequence[int]) -> list[int]:
    """The ids up to and including the first end-of-sequence id (all of them if none).

    >>> trim_after_end([5, 7, 1, 0, 0], eos_token_ids=[1])
    [5, 7, 1]
    """
    out = []
    for token in _as_list(ids):
        out.append(token)
        if token in eos_token_ids:
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


def string_log_prob(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    ids: torch.Tensor,
    intervention: Intervention | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    r"""Log-probability of continuation strings under the SCM, factual or intervened.

    One teacher-forced forward pass of the mechanism (``with mechanism.activate(lm) as f:
    f.logits(...)``) per batch of ``batch_size`` strings; the decoding transform is applied,
    and tokens after the first end-of-sequence id are ignored (see the module docstring).
    The intervention acts as in the SCM: ``"mechanism"`` picks :math:`f_m`, ``"prompt"``
    replaces the prompt, and ``"w_t"`` sets token :math:`t`, whose factor is then
    :math:`\log \mathbb{1}[w_t = v]` (``0`` or :math:`-\infty`).

    :param scm: the SCM.
    :param prompt: prompt ids ``(L,)``.
    :param ids: continuation ids ``(..., n)`` with ``n <= scm.max_new_tokens``.
    :param intervention: ``None`` (factual), or as :func:`~pyro_lmscm.counterfactual`.
    :param batch_size: strings per forward pass.
    :returns: float32 tensor of shape ``(...)``; :math:`-\infty` for a string outside the
        decoding support.
    :raises ObservationError: on malformed ids or prompt.
    :raises InterventionError: on a bad intervention.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> prompt = torch.tensor([2, 3])
    >>> log_p = string_log_prob(scm, prompt, torch.tensor([[5, 1, 0, 0], [5, 1, 7, 7]]))
    >>> bool(log_p[0] == log_p[1])  # nothing after the end of sequence counts
    True
    """
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    data = as_do_data(scm, intervention)
    prompt = data.get(scm.site(PROMPT), scm.check_prompt(prompt))
    if prompt.dim() != 1:
        raise ObservationError(f"`prompt` must have shape (L,), got {tuple(prompt.shape)}.")
    ids = scm.lm.check_ids(ids, "ids")
    if ids.dim() == 0 or ids.shape[-1] == 0:
        raise ObservationError("`ids` must hold at least one token id, shape (..., n).")
    n = ids.shape[-1]
    if n > scm.max_new_tokens:
        raise ObservationError(f"`ids` has {n} tokens but the SCM has max_new_tokens={scm.max_new_tokens}.")
    scm.check_prompt(prompt, num_steps=n)
    flat = ids.reshape(-1, n)
    ended = scm.finished_after(flat)
    counted = ~torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=-1)
    mechanism = int(data.get(scm.site(MECHANISM), torch.tensor(0)))
    chunks = []
    with scm.mechanisms[mechanism].activate(scm.lm) as f:
        for rows in flat.split(batch_size):
            inputs = torch.cat([prompt.expand(rows.shape[0], -1), rows[:, :-1]], dim=-1)
            logits = scm.decoding(f.logits(inputs, logits_to_keep=n))
            chunks.append(logits.log_softmax(-1).gather(-1, rows.unsqueeze(-1)).squeeze(-1))
    log_p = torch.cat(chunks) if chunks else flat.new_zeros(flat.shape, dtype=torch.float32)
    for name, value in data.items():
        parsed = parse_step_site(name[len(scm.site("")) :] if scm.name else name)
        if parsed is not None and parsed[1] < n:
            t = parsed[1]
            log_p[:, t] = torch.where(flat[:, t] == value, 0.0, float("-inf"))
    log_p = torch.where(counted, log_p, 0.0)
    return log_p.sum(-1).reshape(ids.shape[:-1])
