r"""Teacher-forced steps through the SCM's effectful operations.

A teacher-forced pass computes the raw logits of many steps of given strings at once (one
forward pass), where :meth:`~pyro_lmscm.models.LanguageModelSCM.model` computes them step by
step. :func:`decoded_steps` then gives those logits the meaning the model gives them: each
step goes through :func:`~pyro_lmscm.models.ops.step_logits` and
:func:`~pyro_lmscm.models.ops.step_decoded` with the very arguments the decoding loop passes,
so every handler in scope (the factual anchor, an exclusion, a user's own Messenger) acts on a
teacher-forced pass exactly as on a decoding run. Abduction, the exact queries, the scorer
and beam search all take their decoded logits from here; none of them re-derives a
handler's effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .ops import TokenColumns, step_decoded, step_logits

if TYPE_CHECKING:
    from .scm import LanguageModelSCM

__all__ = ["decoded_steps"]


def decoded_steps(
    scm: LanguageModelSCM,
    raw: torch.Tensor,
    prompt: torch.Tensor,
    mechanism: torch.Tensor | int,
    tokens: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    r"""The decoded logits of teacher-forced steps ``start .. start + m - 1``, as the SCM evaluates them.

    For each step :math:`t`, ``step_decoded(scm, t, g(step_logits(scm, t, raw_t, prompt,
    mechanism, w_{<t})))``, where :math:`g` is ``scm.decoding`` and :math:`w_{<t}` are the
    first :math:`t` tokens of ``tokens``: the handlers in scope act as they do in
    :meth:`~pyro_lmscm.models.LanguageModelSCM.model`.

    :param raw: raw logits ``batch_shape + (m, V)`` of the steps (step ``start + i`` at
        ``[..., i, :]``), from a teacher-forced pass of ``mechanism`` on ``prompt`` and
        ``tokens``.
    :param prompt: the prompt ids the pass ran on, ``(..., L)`` (broadcastable with
        ``batch_shape``).
    :param mechanism: the mechanism index the pass ran (a tensor broadcastable with
        ``batch_shape``, or an int).
    :param tokens: the strings ``batch_shape + (k,)`` with ``k >= start + m - 1``: step ``t``
        follows ``tokens[..., :t]``.
    :param start: the first step.
    :returns: ``batch_shape + (m, V)``, in ``raw``'s dtype or wider (what the decoding gives).

    >>> from pyro_lmscm.models import ExcludeTokensMessenger
    >>> from pyro_lmscm.models.teacher_forcing import decoded_steps
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3)
    >>> raw, tokens = torch.zeros(1, 3, tiny_lm.vocab_size), torch.tensor([[4, 5, 6]])
    >>> with ExcludeTokensMessenger(scm, {1: 5}):
    ...     decoded = decoded_steps(scm, raw, torch.tensor([2, 3]), 0, tokens)
    >>> bool(torch.isneginf(decoded[0, 1, 5])), bool(torch.isneginf(decoded[0, 0, 5]))
    (True, False)
    """
    mechanism = torch.as_tensor(mechanism, device=raw.device).long()
    prefix = TokenColumns(tokens, start)  # (no list of the t columns so far: a step costs the same at any t)
    out = []
    for i in range(raw.shape[-2]):
        t = start + i
        logits = step_logits(scm, t, raw[..., i, :], prompt, mechanism, prefix, name=scm.site(f"__logits_{t}"))
        out.append(step_decoded(scm, t, scm.decoding(logits), name=scm.site(f"__decoded_{t}")))
        if i + 1 < raw.shape[-2]:
            prefix.grow()
    return torch.stack(out, dim=-2)
