"""``ExcludeTokensMessenger``: "anything but this token at step t", an intervention on the
structural function of one step (the rest of the model, and the noise, are untouched)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from pyro.poutine.messenger import Messenger

from ..errors import InterventionError

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from .scm import LanguageModelSCM

__all__ = ["ExcludeTokensMessenger", "exclude_token"]


def exclude_token(logits: torch.Tensor, token: int, t: int) -> torch.Tensor:
    """``logits`` ``(..., V)`` with ``token`` set to :math:`-\\infty` (a copy).

    :raises InterventionError: if a row then has no token left in its support (the
        decoding, e.g. ``top_k=1``, allowed only ``token``).
    """
    masked = logits.index_fill(-1, torch.tensor([token], device=logits.device), float("-inf"))
    if bool(torch.isneginf(masked).all(-1).any()):
        raise InterventionError(
            f"exclude_{t}={token}: at step {t} the decoding allows no token but {token} (e.g. top_k=1), "
            "so nothing is left once it is excluded."
        )
    return masked


class ExcludeTokensMessenger(Messenger):
    r"""At step :math:`t`, exclude token :math:`x_t`: the structural function becomes
    :math:`w_t = \arg\max_{j \neq x_t} (\tilde\ell_{t,j} + u_{t,j})` on the decoded logits
    :math:`\tilde\ell_t`, for every row of ``scm.model``; other steps are untouched.

    With :math:`x_t` the observed token and the abducted noise, the counterfactual token at
    :math:`t` is the runner-up of the same noise: marginally a draw from the model's decoded
    distribution without :math:`x_t` (Chatzi et al.'s automatic intervention), but the later
    steps share the noise, so the whole string is a counterfactual.

    :param scm: the SCM whose model is intervened on.
    :param excluded: ``{t: x_t}``.

    >>> from pyro_lmscm.models import ExcludeTokensMessenger
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=2)
    >>> with ExcludeTokensMessenger(scm, {0: 5}):
    ...     tokens = scm.model(torch.tensor([2, 3]))
    >>> int(tokens[0]) != 5
    True
    """

    def __init__(self, scm: LanguageModelSCM, excluded: Mapping[int, int]) -> None:
        super().__init__()
        self.scm = scm
        self.excluded = dict(excluded)

    def _pyro_lmscm_step_decoded(self, msg: Message) -> None:
        scm, t, logits = msg["args"]
        if scm is not self.scm or t not in self.excluded:
            return
        current = msg["value"] if msg["value"] is not None else logits
        msg["value"] = exclude_token(current, self.excluded[t], t)
        msg["done"] = True

    def __repr__(self) -> str:
        return f"ExcludeTokensMessenger({self.excluded})"
