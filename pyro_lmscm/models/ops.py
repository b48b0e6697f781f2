"""The effectful operations of the SCM that handlers may intercept (as ``pyro.sample`` is one).

:func:`step_logits` is called by :meth:`LanguageModelSCM.model` once per step with the raw
logits its mechanisms computed. Outside any handler it returns them unchanged; handlers
replace them (:class:`~pyro_lmscm.models.FactualAnchorMessenger`, the memoised factual
logits on an abducted path) or record them (:class:`~pyro_lmscm.models.RecordLogitsMessenger`).
Their message has type ``"lmscm_step_logits"`` and ``args = (scm, t, raw, prompt, mechanism,
tokens)``; a Messenger handles it in ``_pyro_lmscm_step_logits`` /
``_pyro_post_lmscm_step_logits``.

:func:`step_decoded` is called next with the decoded logits (after temperature, top-k,
top-p), the scores that the noise is added to. Outside any handler it returns them
unchanged; :class:`~pyro_lmscm.models.ExcludeTokensMessenger` masks a token there. Its
message has type ``"lmscm_step_decoded"`` and ``args = (scm, t, logits)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, overload

import torch
from pyro.poutine.runtime import effectful

if TYPE_CHECKING:
    from .scm import LanguageModelSCM

__all__ = ["STEP_DECODED", "STEP_LOGITS", "TokenColumns", "step_decoded", "step_logits"]

#: The message type of :func:`step_logits`.
STEP_LOGITS = "lmscm_step_logits"
#: The message type of :func:`step_decoded`.
STEP_DECODED = "lmscm_step_decoded"


class TokenColumns(Sequence[torch.Tensor]):
    """The first ``len(self)`` tokens of strings held in one tensor, as the sequence of
    tokens that :func:`step_logits` takes: item ``s`` is ``ids[..., s]``, made when asked
    for. A teacher-forced pass
    (:func:`~pyro_lmscm.models.teacher_forcing.decoded_steps`) passes one at every step,
    grown by one token per step (:meth:`grow`), so that a step costs the same at any
    ``t``, where a list of the columns so far would be rebuilt each call; a handler that
    follows the prefix may read it whole from :meth:`prefix` (one tensor operation).

    :param ids: token ids ``batch_shape + (k,)``, not modified while the sequence is in use.
    :param length: how many of its columns are the tokens so far, ``0 <= length <= k``.
    """

    def __init__(self, ids: torch.Tensor, length: int) -> None:
        if not 0 <= length <= ids.shape[-1]:
            raise IndexError(f"TokenColumns: length {length} outside 0..{ids.shape[-1]}")
        self.ids = ids
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self.ids[..., s] for s in range(*index.indices(self._length))]
        if not -self._length <= index < self._length:
            raise IndexError(f"token {index} of {self._length}")
        return self.ids[..., index % self._length]

    def prefix(self, t: int) -> torch.Tensor:
        """The first ``t <= len(self)`` tokens, ``batch_shape + (t,)`` (a view)."""
        if not 0 <= t <= self._length:
            raise IndexError(f"TokenColumns.prefix: {t} outside 0..{self._length}")
        return self.ids[..., :t]

    def grow(self) -> None:
        """One more token: the next column of ``ids``."""
        if self._length >= self.ids.shape[-1]:
            raise IndexError(f"TokenColumns.grow: all {self._length} tokens are in")
        self._length += 1

    def __repr__(self) -> str:
        return f"TokenColumns({self._length} of {tuple(self.ids.shape)})"


def _step_logits(
    scm: LanguageModelSCM,
    t: int,
    raw: torch.Tensor,
    prompt: torch.Tensor,
    mechanism: torch.Tensor,
    tokens: Sequence[torch.Tensor],
) -> torch.Tensor:
    r"""The raw logits :math:`\ell_t` of step ``t`` of ``scm``: ``raw``, unless a handler says otherwise.

    :param raw: what the mechanisms computed, shape ``batch_shape + (V,)``.
    :param prompt: the model's prompt ids ``(..., L)``.
    :param mechanism: the model's mechanism indices.
    :param tokens: the tokens emitted so far, ``w_0 .. w_{t-1}``: within one run, the same
        sequence at every step, grown by one token per step (a list appended to, or a
        :class:`TokenColumns`), so that a handler may follow it token by token, as
        :class:`~pyro_lmscm.models.FactualAnchorMessenger` does.
    """
    return raw


step_logits = effectful(_step_logits, type=STEP_LOGITS)


def _step_decoded(scm: LanguageModelSCM, t: int, logits: torch.Tensor) -> torch.Tensor:
    r"""The decoded logits of step ``t`` of ``scm``, to which the noise :math:`u_t` is added:
    ``logits``, unless a handler says otherwise.

    :param logits: the decoded logits, shape ``batch_shape + (V,)``.
    """
    return logits


step_decoded = effectful(_step_decoded, type=STEP_DECODED)
