"""``RecordLogitsMessenger``: collect the raw logits of every step of an SCM's model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pyro.poutine.messenger import Messenger

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from .scm import LanguageModelSCM

__all__ = ["RecordLogitsMessenger"]


class RecordLogitsMessenger(Messenger):
    """Within the context, the raw logits of each step of ``scm.model`` (shape
    ``batch_shape + (V,)``, after any anchor) are appended to :attr:`steps`, e.g. to abduct a
    sampled string on the very logits that sampled it (a teacher-forced pass rounds
    differently). Entering returns the list.

    >>> from pyro_lmscm.models import RecordLogitsMessenger
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3)
    >>> with RecordLogitsMessenger(scm) as steps:
    ...     _ = scm.model(torch.tensor([2, 3]))
    >>> len(steps), tuple(steps[0].shape)
    (3, (28,))
    """

    def __init__(self, scm: LanguageModelSCM) -> None:
        super().__init__()
        self.scm = scm
        self.steps: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:  # type: ignore[override]
        super().__enter__()
        return self.steps

    def _pyro_post_lmscm_step_logits(self, msg: Message) -> None:
        if msg["args"][0] is self.scm:
            self.steps.append(msg["value"])  # type: ignore[arg-type]
