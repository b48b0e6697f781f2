"""``FactualAnchorMessenger``: inside its scope, the factual mechanism on an abducted path
returns the logits that abduction used (see :mod:`pyro_lmscm.models.anchor`)."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Sequence

import torch
from pyro.poutine.messenger import Messenger

from .anchor import FactualAnchor
from .ops import TokenColumns

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from .scm import LanguageModelSCM

__all__ = ["FactualAnchorMessenger"]

_MAX_WALKS = 64


class _Walk:
    """Where one run's rows stand on the anchored path: ``on_path`` after following its
    first ``count`` tokens (``last``: see :func:`_last`)."""

    def __init__(
        self, tokens: Sequence[torch.Tensor], prompt: torch.Tensor, mechanism: torch.Tensor, on_path: torch.Tensor
    ) -> None:
        self.tokens = tokens
        self.prompt = prompt
        self.mechanism = mechanism
        self.on_path = on_path
        self.count = 0
        self.last: object = None


def _last(tokens: Sequence[torch.Tensor], count: int) -> object:
    """What a walk remembers of the ``count`` tokens it followed: the last token tensor of a
    list, the one tensor of a :class:`~pyro_lmscm.models.ops.TokenColumns`."""
    return tokens.ids if isinstance(tokens, TokenColumns) else tokens[count - 1]


class FactualAnchorMessenger(Messenger):
    r"""Memoise the factual mechanism of ``scm`` on the prefixes of an observation.

    Within the context, at step :math:`t < n`, every row of ``scm.model`` that runs
    mechanism 0 on the anchored prompt and has emitted exactly :math:`w^{\text{obs}}_{<t}`
    gets the anchored raw logits :math:`\ell^{\text{obs}}_t`; other rows, steps and SCMs
    are untouched. A row's place on the path is read from the tokens it emitted, followed
    once per token: the handler remembers, for each run in its scope (each list of emitted
    tokens), the rows still on the path, so a step costs the same at any :math:`t`. It
    forgets them when it exits, and nothing is left on the SCM.

    :param scm: the SCM whose model is anchored (other SCMs in the same program are not).
    :param anchor: the prompt, the observation and its raw factual logits.

    >>> from pyro_lmscm.models import FactualAnchor, FactualAnchorMessenger
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3)
    >>> prompt, observed = torch.tensor([2, 3]), torch.tensor([9, 9])
    >>> certain = torch.full((2, tiny_lm.vocab_size), -50.0).index_fill(-1, torch.tensor(9), 50.0)
    >>> with FactualAnchorMessenger(scm, FactualAnchor(prompt, observed, certain)):
    ...     tokens = scm.model(prompt)
    >>> tokens[:2].tolist()
    [9, 9]
    """

    def __init__(self, scm: LanguageModelSCM, anchor: FactualAnchor) -> None:
        super().__init__()
        self.scm = scm
        self.anchor = anchor
        # where each run stands on the path: id(tokens) -> _Walk (see _on_path)
        self._walks: dict[int, _Walk] = {}

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._walks.clear()
        super().__exit__(exc_type, exc_value, traceback)

    def _pyro_lmscm_step_logits(self, msg: Message) -> None:
        scm, t, raw, prompt, mechanism, tokens = msg["args"]
        anchor = self.anchor
        if scm is not self.scm or t >= anchor.length:
            return
        on_path = self._on_path(t, prompt, mechanism, tokens)
        if on_path is None or not bool(on_path.any()):
            return
        msg["value"] = anchor.logits_at(t, msg["value"] if msg["value"] is not None else raw, on_path)
        msg["done"] = True

    def _on_path(
        self, t: int, prompt: torch.Tensor, mechanism: torch.Tensor, tokens: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        """The rows on the path after ``tokens[:t]``, ``None`` if none started on it.

        A run grows its sequence ``tokens`` by one token per step (the decoding loop appends
        to a list, :func:`~pyro_lmscm.models.teacher_forcing.decoded_steps` grows a
        :class:`~pyro_lmscm.models.ops.TokenColumns`), so the rows of step ``t`` are those of
        the run's previous step followed by the tokens since: each token is followed once per
        run, not once per later step (which cost :math:`O(T^2)` over a string of ``T``
        tokens). A sequence that is not the one seen before, a prompt or a mechanism that is
        another object, a step before the last one seen, or a list whose last followed token
        is not the very tensor followed, starts the walk again from the prompt, which gives
        the same rows; a :class:`~pyro_lmscm.models.ops.TokenColumns` (a teacher-forced step
        of beam search or of the exact sampler starts one at its step) is then followed in
        one tensor operation (:meth:`~pyro_lmscm.models.FactualAnchor.follow_prefix`)."""
        anchor = self.anchor
        columns = tokens if isinstance(tokens, TokenColumns) else None
        walk = self._walks.get(id(tokens))
        if (
            walk is None
            or walk.tokens is not tokens
            or walk.prompt is not prompt
            or walk.mechanism is not mechanism
            or walk.count > t
            or len(tokens) < walk.count
            or (walk.count and _last(tokens, walk.count) is not walk.last)
        ):
            on_path = anchor.start(prompt, mechanism)
            if on_path is None:
                return None
            if len(self._walks) >= _MAX_WALKS:  # (runs that ended without a word: forget them)
                self._walks.clear()
            walk = self._walks[id(tokens)] = _Walk(tokens, prompt, mechanism, on_path)
            if columns is not None and t > 0:  # the prefix in one tensor: followed at once
                walk.on_path = anchor.follow_prefix(columns.prefix(t), on_path)
                walk.count, walk.last = t, columns.ids
        for s in range(walk.count, t):
            w = tokens[s]
            walk.on_path = anchor.follow(s, w, walk.on_path)
            walk.last = w if columns is None else columns.ids
        walk.count = max(walk.count, t)
        return walk.on_path

    def __repr__(self) -> str:
        return f"FactualAnchorMessenger(observed of length {self.anchor.length})"


