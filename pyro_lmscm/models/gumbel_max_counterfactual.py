r"""The exact one-step counterfactual law of Gumbel-max noise, in closed form (the part of
:class:`~pyro_lmscm.models.GumbelMax` that :func:`~pyro_lmscm.exact_counterfactual` uses).

One step. Let :math:`p = \mathrm{softmax}(\ell)` be the factual decoded distribution,
:math:`q = \mathrm{softmax}(\ell')` the counterfactual one (the intervened mechanism at the
counterfactual prefix), :math:`k` the observed token and :math:`u \sim \mathrm{Gumbel}(0,1)^V`
the shared noise, conditioned on :math:`k = \arg\max(\ell + u)`. With
:math:`r_i = p_i / q_i` (:math:`+\infty` where :math:`q_i = 0`) and
:math:`H(\rho) = \sum_i \max(p_i, \rho q_i)`,

.. math::

    P(J = j \mid K = k) = q_j \int_{r_j}^{r_k} H(\rho)^{-2}\, d\rho \quad (j \neq k,\ 0 \text{ if } r_j \geq r_k),
    \qquad P(J = k \mid K = k) = \frac{1}{H(r_k)} = 1 - \sum_{j \neq k} P(J = j \mid K = k).

*Derivation.* With :math:`E_i = e^{-u_i} \sim \mathrm{Exp}(1)`, :math:`K = \arg\min_i E_i / p_i`
and :math:`J = \arg\min_i E_i / q_i`. Given :math:`a = E_k / p_k` and :math:`b = E_j / q_j`
every other :math:`E_i` must exceed :math:`\max(a p_i, b q_i)`; with :math:`\rho = b / a` the
exponent is :math:`a H(\rho)`, and integrating :math:`a` out is a Gamma integral, which gives
:math:`p_k q_j \int H^{-2}` for the joint and, divided by :math:`P(K = k) = p_k`, the first
formula. For :math:`j = k` every :math:`E_i` must exceed :math:`E_k \max(p_i / p_k, q_i / q_k)`,
which gives the second. Only tokens whose ratio :math:`q_j / p_j` beats the observed token's
can replace it (counterfactual stability, Oberst & Sontag 2019).

*Closed form.* :math:`H` is piecewise linear with breakpoints at the sorted :math:`r_i`; on a
segment :math:`[x, y]` the integral is :math:`(y - x) / (H(x) H(y))`. Sums of segments taken
from the :math:`r_k` end (a reversed ``logcumsumexp``) give every :math:`j` at once in
:math:`O(V \log V)` (under top-k or top-p decoding only the tokens possible on either side take
part: :math:`O(V + k \log k)`), in float64: in log space, so that logits of size :math:`10^4`
and probabilities far below :math:`10^{-300}` keep their precision, or in linear space where
every ratio lies within :data:`RATIO_SPAN` nats of one (the full softmax, as a rule), where
nothing over- or underflows. One token's :math:`P(J = j)` is one sum over the segments
between :math:`r_j` and :math:`r_k`, without the cumulative sums of the whole law. :math:`P(J = k)` is
:math:`1 - \sum_{j \neq k}` while that sum is below one half (exactly 1 when no token can
replace :math:`k`, e.g. under the null intervention) and :math:`1 / H(r_k)` otherwise, so a
small :math:`P(J = k)` is never a difference of nearly equal numbers.

References

[1] S. Ravfogel, A. Svete, V. Snæbjarnarson, R. Cotterell (2024), "Gumbel Counterfactual
    Generation From Language Models", arXiv:2411.07180.
[2] M. Oberst, D. Sontag (2019), "Counterfactual Off-Policy Evaluation with Gumbel-Max
    Structural Causal Models", ICML.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import AbductionError

__all__ = [
    "CACHE_ELEMENTS",
    "COMPACT_SHARE",
    "LINEAR_SPAN",
    "RATIO_SPAN",
    "TIE_ULPS",
    "step_counterfactual_log_probs",
    "stay_log_prob",
]

#: When every row has at most this share of the vocabulary possible on either side (top-k or
#: top-p decoding: 50 or 100 of 49,152 tokens), only those tokens are sorted and integrated.
COMPACT_SHARE = 0.25

#: The closed form runs on at most this many float64 entries (rows of V) at a time: on the
#: 2-core CPU, 128 rows of V = 49,152 took 1.17 s at once and 0.58 s in chunks of 8.
CACHE_ELEMENTS = 2**19


#: Log ratios :math:`\log p_i - \log q_i` that differ by less than this many float64 epsilons
#: of :math:`\max |\log p| + \max |\log q|` are below the rounding of the difference: the
#: sort counts them as tied (bfloat16 logits make many ratios equal up to that rounding).
TIE_ULPS = 16.0

_EPSILON = float(np.finfo(np.float64).eps)


#: A row whose finite entries span less than this many nats takes its cumulative sums in
#: linear space: no term underflows (:math:`e^{-600} \approx 10^{-261}`) and sums of positive
#: terms keep their relative precision; 45x faster than ``torch.logcumsumexp`` at V = 49,152.
LINEAR_SPAN = 600.0


#: A row whose log ratios :math:`\log r_i` are all finite and within this many nats of zero runs
#: in linear space (2x faster): :math:`H \geq \min(1, \rho) / 2 \geq e^{-200} / 2`, a product
#: of two :math:`H` stays below :math:`4 e^{400}` and the length of a segment between distinct
#: ratios above :math:`10^{-103}`, so no segment overflows or underflows; a probability too
#: small for a float64 only drops a term below :math:`e^{-400}` of :math:`H`.
RATIO_SPAN = 200.0


def _logcumsumexp(x: torch.Tensor) -> torch.Tensor:
    r"""``torch.logcumsumexp(x, -1)`` of rows ``(R, n)``: rows whose finite entries span less
    than :data:`LINEAR_SPAN` nats as :math:`m + \log \sum e^{x - m}` (the row's maximum
    :math:`m`), the others (and rows with ``+inf`` or ``nan``) with ``torch.logcumsumexp``."""
    top = x.amax(-1, keepdim=True)
    low = torch.where(x > -math.inf, x, math.inf).amin(-1, keepdim=True)
    linear = top - low < LINEAR_SPAN  # all -inf: -inf < SPAN; +inf or nan: False
    shift = torch.where(linear & (top > -math.inf), top, 0.0)
    out = shift + torch.exp(x - shift).cumsum(-1).log()
    slow = ~linear[:, 0]
    if bool(slow.any()):
        out[slow] = torch.logcumsumexp(x[slow], -1)
    return out


def _argsort(key: torch.Tensor, ties: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending order of each row of ``key`` ``(R, n)`` (float64, no ``nan``), where entries
    closer than ``ties`` ``(R, 1)`` (default 0) count as tied, and ``key`` in that order. On
    the CPU: each entry's float64 bits mapped to an int64 of the same order, their low bits
    replaced by the entry's index, and sorted by value (``torch.sort`` of int64 rows, which
    splits the rows across torch's own threads; in the study, between torch's kernels, numpy's
    sort on a thread pool of its own lost a core to torch's spinning OpenMP workers: 2.8
    against 2.3 ms per row of V = 49,152 on 2 threads); a row where two entries more than
    ``ties`` apart shared the kept bits (a relative gap below :math:`2^{-35}`) and came out of
    order is sorted again by ``argsort``. Tied entries may come in any order: tied ratios are
    breakpoints of zero length, whose segments contribute nothing."""
    if key.device.type != "cpu":
        order = key.argsort(dim=-1)
        return order, key.gather(-1, order)
    n = key.shape[-1]
    bits = max(1, (n - 1).bit_length())  # an index fits in the low `bits` bits
    raw = key.contiguous().view(torch.int64)
    flip = (raw >> 63) & 0x7FFF_FFFF_FFFF_FFFF  # negative floats: all bits but the sign flipped,
    packed = (raw ^ flip) & -(1 << bits)  # so that the int64 order is the float order (-0.0 < 0.0)
    packed |= torch.arange(n)
    order = packed.sort(dim=-1).values.bitwise_and_((1 << bits) - 1)
    ranked = key.gather(-1, order)
    later = ranked[:, 1:] if ties is None else ranked[:, 1:] + ties  # (finite ties: no inf - inf)
    unsorted = (later < ranked[:, :-1]).any(-1)
    if bool(unsorted.any()):
        order[unsorted] = torch.from_numpy(np.argsort(key[unsorted].numpy(), axis=-1))
        ranked[unsorted] = key[unsorted].gather(-1, order[unsorted])
    return order, ranked


def _stable(
    log_law: torch.Tensor, log_r: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """``log_law`` (``(R, V)``, or ``(R, 1)`` at ``tokens``) with :math:`-\\infty` for every token
    :math:`j \\neq k` whose log ratio :math:`\\log r_j` does not lie below the observed token's:
    counterfactual stability exactly, also where the sort took ratios within rounding of
    :math:`r_k` as tied (:data:`TIE_ULPS`) and put one on the wrong side of it."""
    log_r_k = log_r.gather(-1, k)
    if tokens is None:
        return torch.where(log_r < log_r_k, log_law, -math.inf).scatter_(-1, k, log_law.gather(-1, k))
    return torch.where((log_r.gather(-1, tokens) < log_r_k) | (tokens == k), log_law, -math.inf)


def _every_token_possible(log_p: torch.Tensor, log_q: torch.Tensor) -> bool:
    """Whether no entry of either side is :math:`-\\infty` (the full softmax): no mask of
    possible tokens is needed."""
    return bool(log_p.amin() > -math.inf) and bool(log_q.amin() > -math.inf)


def _position(order: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Where each row's token ``tokens`` ``(R, 1)`` sits in its row of ``order`` ``(R, n)``: ``(R, 1)``."""
    if order.device.type == "cpu":  # numpy finds the first True of a boolean row without a long copy
        found = np.argmax(order.numpy() == tokens.numpy(), axis=-1)
        return torch.from_numpy(found).reshape(-1, 1)
    return (order == tokens).long().argmax(-1, keepdim=True)


def _log_diff(log_y: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
    """:math:`\\log(y - x)` for :math:`y \\geq x \\geq 0` given in log space (``-inf`` when equal)."""
    out = log_y + torch.log1p(-torch.exp(log_x - log_y))
    return torch.where(log_y > log_x, out, torch.full_like(out, float("-inf")))


def step_counterfactual_log_probs(
    factual_logits: torch.Tensor,
    counterfactual_logits: torch.Tensor,
    observed: torch.Tensor,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`\log P(J = j \mid K = k)` for every token :math:`j`, exactly (float64).

    The rows run a few at a time (:data:`CACHE_ELEMENTS`), which stay in the CPU's cache.

    :param factual_logits: decoded factual logits :math:`\ell`, ``(..., V)``, with
        :math:`\ell_k > -\infty`.
    :param counterfactual_logits: decoded counterfactual logits :math:`\ell'`, ``(..., V)``.
    :param observed: the observed tokens :math:`k`, ``(...)``.
    :param tokens: if given, ``(...)``: only :math:`\log P(J = j \mid K = k)` of these tokens
        :math:`j`, gathered from each few rows of the law, which is never held whole (and
        :func:`stay_log_prob`, with no sort, where :math:`j = k`).
    :returns: ``(..., V)`` log-probabilities that sum to one over the last dimension, or
        ``(...)`` with ``tokens``.
    :raises AbductionError: if an observed token has factual probability zero.

    >>> from pyro_lmscm.models.gumbel_max_counterfactual import step_counterfactual_log_probs
    >>> logits = torch.tensor([1.0, 2.0, 0.5])
    >>> step_counterfactual_log_probs(logits, logits, torch.tensor(1)).exp().tolist()  # the null intervention
    [0.0, 1.0, 0.0]
    >>> step_counterfactual_log_probs(logits, logits, torch.tensor(1), tokens=torch.tensor(1)).item()
    0.0
    """
    factual, counterfactual = torch.broadcast_tensors(factual_logits.double(), counterfactual_logits.double())
    shape, vocab = factual.shape, factual.shape[-1]
    factual, counterfactual = factual.reshape(-1, vocab), counterfactual.reshape(-1, vocab)
    k = observed.reshape(-1).to(factual.device).long().expand(factual.shape[0]).reshape(-1, 1)
    j = None if tokens is None else torch.as_tensor(tokens).to(factual.device).long().expand(shape[:-1]).reshape(-1, 1)
    compact = _compacted(factual, counterfactual)
    if compact is not None:  # top-k / top-p decoding: the law on the possible tokens alone
        index, position, possible = compact
        if bool((position.gather(-1, k) < 0).any()):
            raise AbductionError("an observed token has factual probability zero: no noise produces it.")
        law = step_counterfactual_log_probs(
            _gathered(factual, index), _gathered(counterfactual, index), position.gather(-1, k)[:, 0],
            None if j is None else position.gather(-1, j).clamp(min=0)[:, 0],
        )
        if j is not None:  # a token impossible on both sides never comes
            return torch.where(possible.gather(-1, j)[:, 0], law, -math.inf).reshape(shape[:-1])
        out = law.new_full((law.shape[0], vocab + 1), -math.inf)  # column V: the padding's
        return out.scatter_(-1, torch.where(index >= 0, index, vocab), law)[:, :vocab].reshape(shape)
    out = factual.new_empty(factual.shape if j is None else (factual.shape[0], 1))
    rows = max(1, CACHE_ELEMENTS // vocab)
    for start in range(0, factual.shape[0], rows):
        part = slice(start, start + rows)
        log_p, log_q = factual[part].log_softmax(-1), counterfactual[part].log_softmax(-1)
        if bool((log_p.gather(-1, k[part]) == float("-inf")).any()):
            raise AbductionError("an observed token has factual probability zero: no noise produces it.")
        if j is None:
            out[part] = _law(log_p, log_q, k[part])
            continue
        chunk, k_part, j_part = out[part], k[part], j[part]
        stays = (j_part == k_part)[:, 0]  # the observed token needs no sort: P(J = k) = 1 / H(r_k)
        if bool(stays.any()):
            chunk[stays] = _stay(log_p[stays], log_q[stays], k_part[stays])
        if not bool(stays.all()):
            moved = ~stays
            chunk[moved] = _law(log_p[moved], log_q[moved], k_part[moved], j_part[moved])
    return out.reshape(shape if j is None else shape[:-1])


def _compacted(factual: torch.Tensor, counterfactual: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Rows ``(N, V)`` of decoded logits with at most :data:`COMPACT_SHARE` of the vocabulary
    possible on either side (top-k or top-p decoding): ``(index, position, possible)``, the
    possible tokens of each row ``(N, W)`` (``-1`` pads a row with fewer), each token's place
    among them ``(N, V)`` (``-1``: impossible) and the mask of possible tokens; ``None`` for
    rows with more. Tokens impossible on both sides take no part in the law (nor in a
    log-softmax), so it is the same on the ``W`` columns."""
    if factual.shape[-1] < 2 or bool(factual.amin() > -math.inf) or bool(counterfactual.amin() > -math.inf):
        return None  # (every token possible on one side at least: the full softmax)
    possible = (factual > -math.inf) | (counterfactual > -math.inf)
    counts = possible.sum(-1)
    width = int(counts.max())
    if width > COMPACT_SHARE * factual.shape[-1] or width == 0:
        return None
    position = torch.where(possible, possible.long().cumsum(-1) - 1, -1)
    return possible_columns(possible, width), position, possible


def possible_columns(possible: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, width)``: the ids of the true entries of each row of ``possible`` ``(N, V)``, by
    increasing id, ``-1`` after them (``width``: at least the most true entries of a row)."""
    counts = possible.sum(-1)
    row, column = possible.nonzero(as_tuple=True)
    place = torch.arange(row.numel(), device=possible.device) - (counts.cumsum(0) - counts)[row]
    index = torch.full((possible.shape[0], width), -1, dtype=torch.long, device=possible.device)
    index[row, place] = column
    return index


def _gathered(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``logits`` at ``index`` ``(N, W)``, ``-inf`` where it is ``-1``."""
    return torch.where(index >= 0, logits.gather(-1, index.clamp(min=0)), -math.inf)


def _law(log_p: torch.Tensor, log_q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`step_counterfactual_log_probs` of rows ``(R, V)`` of log-probabilities and the
    observed tokens ``(R, 1)``: ``(R, V)``, or ``(R, 1)`` at ``tokens`` ``(R, 1)``, which differ
    from the observed ones (:func:`_stay` gives those): one sum over the segments between
    :math:`r_j` and :math:`r_k`, without the law's cumulative sums. Rows with
    few possible tokens (top-k / top-p decoding) and rows with many take separate paths, so
    that one full row does not make all rows sort the whole vocabulary."""
    inf = float("inf")
    vocab = log_p.shape[-1]
    valid: torch.Tensor | None = None  # None: every token possible on both sides (the full softmax)
    if _every_token_possible(log_p, log_q):
        log_r = log_p - log_q
        compact = torch.zeros(log_p.shape[0], dtype=torch.bool, device=log_p.device)
        low, high = torch.aminmax(log_r, dim=-1)
        linear = (high <= RATIO_SPAN) & (low >= -RATIO_SPAN)
    else:
        valid = (log_p > -inf) | (log_q > -inf)  # tokens impossible on both sides take no part
        log_r = torch.where(valid, log_p - log_q, inf)  # q_i = 0 < p_i gives +inf, p_i = 0 < q_i gives -inf
        compact = valid.sum(-1) <= COMPACT_SHARE * vocab
        linear = ~compact & (log_r.abs().amax(-1) <= RATIO_SPAN)  # (inf and nan fail)
    for path in (compact, linear):
        if bool(path.any()) and not bool(path.all()):  # each kind of row on its own path
            out = torch.empty_like(log_p if tokens is None else k, dtype=log_p.dtype)
            for rows in (path, ~path):
                out[rows] = _law(log_p[rows], log_q[rows], k[rows], None if tokens is None else tokens[rows])
            return out
    size = vocab if valid is None else int(valid.sum(-1).max())
    if valid is not None and size <= COMPACT_SHARE * vocab:  # top-k / top-p decoding: sort only the possible tokens
        key = torch.where(valid, log_r.clamp(max=torch.finfo(log_r.dtype).max), inf)
        order = key.topk(size, dim=-1, largest=False, sorted=True).indices
        taken = valid.gather(-1, order)  # (a row with fewer possible tokens fills up with impossible ones)
        lr = torch.where(taken, log_r.gather(-1, order), inf)
        lp = torch.where(taken, log_p.gather(-1, order), -inf)
        lq = torch.where(taken, log_q.gather(-1, order), -inf)
    else:  # the whole vocabulary, the impossible tokens last (r = +inf, p = q = 0 already)
        ties = None
        if valid is None:  # log ratios closer than the rounding of log p - log q are tied
            ties = (log_p.amin(-1, keepdim=True) + log_q.amin(-1, keepdim=True)).neg_().mul_(TIE_ULPS * _EPSILON)
        order, lr = _argsort(log_r, ties)
        lp, lq = log_p.gather(-1, order), log_q.gather(-1, order)
    position_k = _position(order, k)  # (R, 1)
    steps = torch.arange(order.shape[-1] - 1, device=order.device)
    between = None
    if tokens is not None:  # the segments from r_j up to r_k (none where r_j >= r_k)
        between = (steps >= _position(order, tokens)) & (steps < position_k)
    # H at each breakpoint x_m = r_(m): sum of p over r_i > x_m, plus x_m times sum of q over r_i <= x_m;
    # segment m = [x_m, x_{m+1}]: (x_{m+1} - x_m) / (H(x_m) H(x_{m+1}))
    if bool(linear.all()):  # every ratio finite and within RATIO_SPAN: in linear space
        r, p = lr.exp(), lp.exp()
        # sum of p over r_i > x_m as the total less the cumulative sum: H >= sum of p = 1, so an
        # absolute rounding error of the difference is one relative to H
        h = p.cumsum(-1).neg_().add_(p.sum(-1, keepdim=True)).clamp_(min=0.0)
        h.addcmul_(r, lq.exp().cumsum_(-1))
        segment = (r[:, 1:] - r[:, :-1]).clamp_(min=0.0).div_(h[:, :-1] * h[:, 1:])
        if tokens is not None and between is not None:  # log q_j + log (the segments between): one masked sum, no law
            return _stable(log_q.gather(-1, tokens) + torch.where(between, segment, 0.0).sum(-1, keepdim=True).log(),
                           log_r, k, tokens)
        log_segment, log_h = segment.log(), h.log()
    else:  # in log space, with +inf ratios: the segment to +inf is 1 / (H(x_m) B_m)
        suffix = _logcumsumexp(lp.flip(-1)).flip(-1)  # sum over positions >= m
        log_a = torch.cat([suffix[:, 1:], torch.full_like(suffix[:, :1], -inf)], -1)  # > m
        log_b = _logcumsumexp(lq)  # <= m
        log_h = torch.logaddexp(log_a, torch.where(log_b > -inf, lr + log_b, -inf))
        x, y = lr[:, :-1], lr[:, 1:]
        finite = y < inf
        log_segment = torch.where(
            finite,
            _log_diff(torch.where(finite, y, 0.0), torch.where(finite, x, 0.0)) - log_h[:, :-1] - log_h[:, 1:],
            torch.where(x < inf, -log_h[:, :-1] - log_b[:, :-1], -inf),
        )
        log_segment = torch.where(torch.isnan(log_segment), -inf, log_segment)
        if tokens is not None and between is not None:
            log_between = torch.where(between, log_segment, -inf).logsumexp(-1, keepdim=True)
            return _stable(log_q.gather(-1, tokens) + log_between, log_r, k, tokens)
    # F(x_m) = sum of the segments from x_m up to r_k (cut at the position of k)
    log_segment = torch.where(steps < position_k, log_segment, -inf)
    log_f = _logcumsumexp(log_segment.flip(-1)).flip(-1)  # (R, V-1): from m to the end
    log_f = torch.cat([log_f, torch.full_like(log_f[:, :1], -inf)], -1)
    out = _stable(torch.full_like(log_p, -inf).scatter_(-1, order, lq + log_f), log_r, k)
    # P(J = k): 1 - (the others) while they are small (exact when they vanish, as under the
    # null intervention), else 1 / H(r_k), which keeps a small P(J = k) precise
    others = out.scatter(-1, k, -inf).logsumexp(-1, keepdim=True)
    log_stay = torch.where(
        others < math.log(0.5), torch.log1p(-others.exp().clamp(max=0.5)), -log_h.gather(-1, position_k)
    )
    return out.scatter_(-1, k, log_stay)


def stay_log_prob(
    factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
) -> torch.Tensor:
    r""":math:`\log P(J = k \mid K = k) = -\log H(r_k)` alone, in one pass over the vocabulary
    (no sort): exactly ``0`` when no token's ratio :math:`q_j / p_j` beats the observed
    token's, as under the null intervention. Shapes as :func:`step_counterfactual_log_probs`;
    returns ``(...)``.
    """
    factual, counterfactual = torch.broadcast_tensors(factual_logits.double(), counterfactual_logits.double())
    shape = factual.shape[:-1]
    k = observed.to(factual.device).long().expand(shape).reshape(-1, 1)
    factual, counterfactual = factual.reshape(-1, factual.shape[-1]), counterfactual.reshape(-1, factual.shape[-1])
    compact = _compacted(factual, counterfactual)
    if compact is not None and bool((compact[1].gather(-1, k) >= 0).all()):  # top-k / top-p decoding:
        index, position, _ = compact  # on the possible tokens alone
        factual, counterfactual, k = _gathered(factual, index), _gathered(counterfactual, index), position.gather(-1, k)
    log_p, log_q = factual.log_softmax(-1), counterfactual.log_softmax(-1)
    return _stay(log_p, log_q, k)[..., 0].reshape(shape)


def _stay(log_p: torch.Tensor, log_q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """:func:`stay_log_prob` of log-probabilities ``(..., V)`` and observed tokens ``(..., 1)``:
    ``(..., 1)``."""
    log_r_k = log_p.gather(-1, k) - log_q.gather(-1, k)  # (..., 1); +inf where q_k = 0
    if _every_token_possible(log_p, log_q):  # the full softmax
        replaceable = (log_p - log_q < log_r_k).any(-1, keepdim=True)  # some r_j < r_k
        scaled = log_q + log_r_k
    else:
        valid = (log_p > -math.inf) | (log_q > -math.inf)
        replaceable = (valid & (log_p - log_q < log_r_k)).any(-1, keepdim=True)
        scaled = torch.where(log_q > -math.inf, log_r_k + log_q, -math.inf)
    log_h = torch.maximum(log_p, scaled).logsumexp(-1, keepdim=True)
    return torch.where(replaceable, -log_h, torch.zeros_like(log_h))
