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

from typing import TYPE_CHECKING, Sequence

import torch
from pyro.poutine.runtime import effectful

if TYPE_CHECKING:
    from .scm import LanguageModelSCM

__all__ = ["STEP_DECODED", "STEP_LOGITS", "step_decoded", "step_logits"]

#: The message type of :func:`step_logits`.
STEP_LOGITS = "lmscm_step_logits"
#: The message type of :func:`step_decoded`.
STEP_DECODED = "lmscm_step_decoded"


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


def _step_decoded(scm: LanguageModelSCM, t: int, logits: torch.Tensor) -> torch.Tensor:
    r"""The decoded logits of step ``t`` of ``scm``, to which the noise :math:`u_t` is added:
    ``logits``, unless a handler says otherwise.

    :param logits: the decoded logits, shape ``batch_shape + (V,)``.
    """
    return logits


step_decoded = effectful(_step_decoded, type=STEP_DECODED)
