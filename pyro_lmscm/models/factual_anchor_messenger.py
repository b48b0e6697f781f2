"""``FactualAnchorMessenger``: inside its scope, the factual mechanism on an abducted path
returns the logits that abduction used (see :mod:`pyro_lmscm.models.anchor`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyro.poutine.messenger import Messenger

from .anchor import FactualAnchor

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from .scm import LanguageModelSCM

__all__ = ["FactualAnchorMessenger"]


class FactualAnchorMessenger(Messenger):
    r"""Memoise the factual mechanism of ``scm`` on the prefixes of an observation.

    Within the context, at step :math:`t < n`, every row of ``scm.model`` that runs
    mechanism 0 on the anchored prompt and has emitted exactly :math:`w^{\text{obs}}_{<t}`
    gets the anchored raw logits :math:`\ell^{\text{obs}}_t`; other rows, steps and SCMs
    are untouched. The handler keeps no state between model runs (a row's place on the path
    is read from the tokens it emitted), and nothing is left on the SCM when it exits.

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

    def _pyro_lmscm_step_logits(self, msg: Message) -> None:
        scm, t, raw, prompt, mechanism, tokens = msg["args"]
        anchor = self.anchor
        if scm is not self.scm or t >= anchor.length:
            return
        on_path = anchor.start(prompt, mechanism)
        if on_path is None:
            return
        for s, w in enumerate(tokens[:t]):
            on_path = anchor.follow(s, w, on_path)
        if not bool(on_path.any()):
            return
        msg["value"] = anchor.logits_at(t, msg["value"] if msg["value"] is not None else raw, on_path)
        msg["done"] = True

    def __repr__(self) -> str:
        return f"FactualAnchorMessenger(observed of length {self.anchor.length})"


