"""The effectful operations of the SCM that handlers may intercept (as ``pyro.sample`` is one).

:func:`step_logits` is called by :meth:`LanguageModelSCM.model` once per step with the raw
logits its mechanisms computed. Outside any handler it returns them unchanged; handlers
replace them (:class:`~pyro_lmscm.models.FactualAnchorMessenger`, the memoised factual
logits on an abducted path) or record them (:class:`~pyro_lmscm.models.RecordLogitsMessenger`).
Their message has type ``"lmscm_step_logits"`` and ``args = (scm, t, raw, prompt, mechanism,
tokens)``; a Messenger handles it in ``_pyro_lmscm_step_logits`` /
``_pyro_post_lmscm_step_logits``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from pyro.poutine.runtime import effectful

if TYPE_CHECKING:
    from .scm import LanguageModelSCM

__all__ = ["STEP_LOGITS", "step_logits"]

#: The message type of :func:`step_logits`.
STEP_LOGITS = "lmscm_step_logits"


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
    :param tokens: the tokens emitted so far, ``w_0 .. w_{t-1}``.
    """
    return raw


step_logits = effectful(_step_logits, type=STEP_LOGITS)
