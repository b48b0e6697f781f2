r"""The one scorer: log-probabilities of token strings under the SCM, factual or intervened.

.. math::

    \log p_m(w_t \mid \text{prompt}, w_{<t}) =
        \log \mathrm{softmax}\big(g(f_m(\text{prompt}, w_{<t}))\big)_{w_t}, \qquad t < n_\text{end},

where :math:`f_m` is the mechanism (0 = factual; the intervention's otherwise), the prompt
is the intervened one under a ``prompt`` intervention, :math:`g` is ``scm.decoding`` and
:math:`n_\text{end}` is the position just after the first end-of-sequence token (or the
string's length): once a string has ended every later token is certain, as in the SCM. A
``w_t`` intervention makes step :math:`t` a point mass (``0`` or :math:`-\infty`).

:func:`token_log_probs` keeps the terms per token (the study report shows them on hover),
:func:`string_log_prob` sums them, and :class:`~pyro_lmscm.inference.HindsightGumbelGuide`
scores its observation with :func:`gathered_log_probs` on the logits it already has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..atomic import locked
from ..errors import ObservationError
from ..interventions.ops import as_do_data, forced_tokens, world, world_inputs
from ..lm import left_pad
from ..models.sites import PROMPT
from ..models.teacher_forcing import decoded_steps
from ..validation import as_int

if TYPE_CHECKING:
    from ..interventions.ops import Intervention
    from ..models.scm import LanguageModelSCM

__all__ = ["LOGSUMEXP_ROWS", "gathered_log_probs", "ragged_token_log_probs", "string_log_prob", "token_log_probs"]


#: Rows of the vocabulary per call of ``logsumexp`` in :func:`gathered_log_probs` on the CPU: a few
#: rows stay in the cache between its passes (maximum, difference, exponential, sum); 1,024
#: rows of V = 49,152 in float32 took 83 ms at once and 25 ms in blocks of 16 (2 threads).
LOGSUMEXP_ROWS = 16


def gathered_log_probs(decoded_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathrm{softmax}(\ell_t)_{w_t} = \ell_{t, w_t} - \log \sum_v e^{\ell_{t, v}}` for
    decoded logits ``(..., n, V)`` and ids ``(..., n)`` (no log-softmax over ``V`` is written out;
    the log-sum-exp of a contiguous tensor on the CPU runs :data:`LOGSUMEXP_ROWS` rows at a time)."""
    gathered = decoded_logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    rows = decoded_logits.numel() // max(1, decoded_logits.shape[-1])
    if decoded_logits.device.type != "cpu" or not decoded_logits.is_contiguous() or rows <= LOGSUMEXP_ROWS:
        return gathered - decoded_logits.logsumexp(-1)
    flat = decoded_logits.view(rows, decoded_logits.shape[-1])
    total = flat.new_empty(rows)
    for start in range(0, rows, LOGSUMEXP_ROWS):
        torch.logsumexp(flat[start : start + LOGSUMEXP_ROWS], -1, out=total[start : start + LOGSUMEXP_ROWS])
    return gathered - total.view(decoded_logits.shape[:-1])


@locked
@torch.no_grad()
def token_log_probs(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    ids: torch.Tensor,
    intervention: Intervention | None = None,
    lengths: torch.Tensor | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    r"""Per-token log-probabilities of continuation strings, ``0`` where a string has ended.

    Per batch of ``batch_size`` strings, one pass of the mechanism's distinct prompts
    (``with mechanism.activate(lm) as f: f.prefill(...)``) and one teacher-forced pass of the
    strings on their prompts' cache (``f.extend(...)``); then each string's steps go through
    the SCM's effectful operations in the intervention's world
    (:func:`~pyro_lmscm.models.teacher_forcing.decoded_steps` inside
    :func:`~pyro_lmscm.interventions.ops.world`), so an exclusion or a Messenger of the
    intervention acts as it does when the strings are decoded, one string at a time.

    :param scm: the SCM.
    :param prompt: prompt ids ``(L,)`` of every string, or ``(B, L)``: one prompt per string
        of ``ids`` ``(B, n)``, left-padded with :data:`~pyro_lmscm.lm.LEFT_PAD`
        (:func:`~pyro_lmscm.lm.left_pad`). A ``prompt`` intervention replaces each.
    :param ids: continuation ids ``(..., n)`` with ``n <= scm.max_new_tokens``.
    :param intervention: ``None`` (factual), or as :func:`~pyro_lmscm.counterfactual`.
    :param lengths: how many tokens of each string count, shape ``ids.shape[:-1]``; default:
        up to and including the first end of sequence.
    :param batch_size: strings per forward pass.
    :returns: float32 ``(..., n)``; :math:`-\infty` for a token outside the decoding support.
    :raises ObservationError: on malformed ids or prompt.
    :raises InterventionError: on a bad intervention.
    """
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    data = as_do_data(scm, intervention)
    prompt = scm.check_prompt(prompt)  # (L,), or (B, L) left-padded
    if scm.site(PROMPT) in data:
        prompt = scm.check_prompt(data[scm.site(PROMPT)], single=True)
    ids = scm.lm.check_ids(ids, "ids")
    if ids.dim() == 0 or ids.shape[-1] == 0:
        raise ObservationError("`ids` must hold at least one token id, shape (..., n).")
    n = ids.shape[-1]
    if n > scm.max_new_tokens:
        raise ObservationError(f"`ids` has {n} tokens but the SCM has max_new_tokens={scm.max_new_tokens}.")
    if prompt.dim() > 2 or (prompt.dim() == 2 and (ids.dim() != 2 or prompt.shape[0] != ids.shape[0])):
        raise ObservationError(
            f"`prompt` must have shape (L,) or one row per string of `ids` (B, n), got prompt "
            f"{tuple(prompt.shape)} and ids {tuple(ids.shape)}."
        )
    scm.check_prompt(prompt, num_steps=n)
    flat = ids.reshape(-1, n)
    if lengths is None:
        counted = ~scm.ended_before(flat)
    else:
        counted = torch.arange(n, device=flat.device) < torch.as_tensor(lengths, device=flat.device).reshape(-1, 1)
    _, mechanism = world_inputs(scm, data, prompt)
    chunks = []
    with scm.mechanisms[mechanism].activate(scm.lm) as f, world(scm, data):
        for start in range(0, flat.shape[0], batch_size):
            rows = flat[start : start + batch_size]
            heads = prompt.expand(rows.shape[0], -1) if prompt.dim() == 1 else prompt[start : start + batch_size]
            # each distinct prompt once, then the strings teacher-forced on its cache
            first, cache = f.prefill(heads)
            raw = first[:, None]
            if n > 1:
                rest, _ = f.extend(rows[:, :-1], cache, float32=False)
                raw = torch.cat([first.to(rest.dtype)[:, None], rest], 1)  # (bfloat16 -> float32 -> back: exact)
            for i in range(rows.shape[0]):  # decoded one string at a time: (n, V) in float32, not (batch, n, V)
                decoded = decoded_steps(scm, raw[i], heads[i], mechanism, rows[i])
                chunks.append(gathered_log_probs(decoded, rows[i]))
    log_p = torch.stack(chunks)
    for t, token in forced_tokens(scm, data).items():
        if t < n:
            log_p[:, t] = torch.where(flat[:, t] == token, 0.0, float("-inf"))
    return torch.where(counted, log_p, 0.0).reshape(ids.shape)


@locked
def string_log_prob(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    ids: torch.Tensor,
    intervention: Intervention | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    r"""Log-probability of continuation strings: :func:`token_log_probs` summed over tokens.

    :returns: float32 tensor of shape ``ids.shape[:-1]``; :math:`-\infty` for a string
        outside the decoding support.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> prompt = torch.tensor([2, 3])
    >>> log_p = string_log_prob(scm, prompt, torch.tensor([[5, 1, 0, 0], [5, 1, 7, 7]]))
    >>> bool(log_p[0] == log_p[1])  # nothing after the end of sequence counts
    True
    """
    return token_log_probs(scm, prompt, ids, intervention, batch_size=batch_size).sum(-1)


@locked
def ragged_token_log_probs(
    scm: LanguageModelSCM,
    prompt: torch.Tensor | Sequence[torch.Tensor],
    rows: Sequence[Sequence[int]],
    intervention: Intervention | None = None,
    batch_size: int = 32,
) -> tuple[list[list[float]], list[float]]:
    """:func:`token_log_probs` of strings of different lengths, as lists.

    The rows run as teacher-forced batches of ``batch_size`` (right-padded; causal attention
    keeps the padding from touching earlier positions; the prompts left-padded), so the
    numbers depend only on the rows and their batches, never on how a study shards its corpus.

    :param prompt: prompt ids ``(L,)`` of every row, or one prompt per row.
    :param rows: token strings, each already cut after its first end-of-sequence token,
        each of length ``1..scm.max_new_tokens``.
    :returns: ``(per_token, totals)``: per row a list of floats (``-inf`` outside the
        decoding support) and their sum.
    :raises ObservationError: on malformed rows or prompts, or not one prompt per row.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> per_token, totals = ragged_token_log_probs(scm, torch.tensor([2, 3]), [[5, 1], [5, 6, 7]])
    >>> [len(p) for p in per_token], per_token[0][0] == per_token[1][0]
    ([2, 3], True)
    """
    if not (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
        prompts = list(prompt)
        if len(prompts) != len(rows):
            raise ObservationError(f"one prompt per row: got {len(prompts)} prompts for {len(rows)} rows.")
        prompt = left_pad([scm.check_prompt(p, single=True).cpu() for p in prompts])
    lengths = [len(row) for row in rows]
    if not lengths or min(lengths) == 0:
        raise ObservationError("`rows` must hold at least one string, each of at least one token.")
    n = max(lengths)
    pad = scm.lm.pad_token_id
    ids = torch.tensor([list(row) + [pad] * (n - len(row)) for row in rows], dtype=torch.long)
    log_p = token_log_probs(scm, prompt, ids, intervention, lengths=torch.tensor(lengths), batch_size=batch_size)
    return [log_p[i, : lengths[i]].tolist() for i in range(len(rows))], log_p.sum(-1).tolist()
