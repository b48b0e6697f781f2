r"""How much of a counterfactual is the noise model? Exact bounds over mechanisms.

A language model fixes the law of its strings, not the structural mechanism behind them:
many mechanisms :math:`w_t = f(P_t, u_t)` give the same next-token laws and different
counterfactuals. This module bounds the counterfactual probability of keeping an observed
token, and of keeping an observed string, over two classes of mechanisms, given the two
teacher-forced passes that the exact queries use (:class:`~pyro_lmscm.inference.ExactCounterfactual`).

One step. Let :math:`p` be the factual decoded law at an observed step, :math:`q` the
intervened law at the observed prefix, :math:`k` the observed token (:math:`p_k > 0`: the
abduction forbids anything else) and :math:`r_i = q_i / p_i` (:math:`+\infty` where only
:math:`q_i > 0`; tokens impossible on both sides take no part). A mechanism couples
:math:`K \sim p` and :math:`J \sim q` (the same noise on both sides); the keep probability is
:math:`a = P(J = k \mid K = k) = \pi_{kk} / p_k`.

.. math::

    \textbf{any mechanism:}\quad
    a \in \Big[\frac{\max(0,\ q_k - \sum_{i \neq k} p_i)}{p_k},\ \min\big(1, \frac{q_k}{p_k}\big)\Big]
    \quad (\{1\} \text{ if } q = p),

    \textbf{counterfactually stable:}\quad
    a \in \Big[\frac{\max(0,\ q_k - \sum_{i \in L} (p_i - q_i),\ p_k - \sum_{j \in G} (q_j - p_j))}{p_k},\
    \min\big(1, \frac{q_k}{p_k}\big)\Big],

with :math:`L = \{i : r_i < r_k\}` and :math:`G = \{j : r_j > r_k\}`.

*Derivation.* Any coupling: :math:`\pi_{kk} \le \min(p_k, q_k)`, and
:math:`\pi_{kk} = q_k - P(J = k, K \neq k) \ge q_k - P(K \neq k)` (Fréchet); the maximal
coupling and the one that sends every :math:`K \neq k` it can to :math:`J = k` attain the two
ends. A mechanism :math:`f(P, u)` of the decoded law gives :math:`J = K` when :math:`q = p`,
so there the keep probability is 1 for every mechanism (at the anchored steps before a token
intervention, for instance). Counterfactual stability (Oberst & Sontag 2019) lets mass move
from :math:`K = i` to :math:`J = j \neq i` only if :math:`r_j > r_i` strictly; tied ratios
exchange nothing. Then :math:`J \in L` implies :math:`K \in L` (a token of :math:`L` receives
only from smaller ratios), so exactly :math:`\sum_L (p_i - q_i)` leaves :math:`L`, and
:math:`k` receives at most that: :math:`\pi_{kk} \ge q_k - \sum_L (p_i - q_i)`. Symmetrically
:math:`K \in G` implies :math:`J \in G`, :math:`G` receives exactly :math:`\sum_G (q_j - p_j)`
from outside, and :math:`k` sends at most that: :math:`\pi_{kk} \ge p_k - \sum_G (q_j - p_j)`.
The two differ only through the tokens tied with :math:`k` (:math:`E`), by
:math:`(r_k - 1) \sum_E p_j`: each tied token :math:`j` must itself absorb (if
:math:`r_k > 1`) or shed (if :math:`r_k < 1`) :math:`|q_j - p_j|`, which the first form
ignores. The larger of the two is attained (an LP over the coupling,
``tests/inference/test_bounds.py``, agrees to :math:`10^{-9}`, ties included; without the
second form, e.g. under ``do`` "anything but :math:`x_t`", where every other token's ratio is
:math:`1 / (1 - p_x)`, the bound would be loose). The maximal coupling is stable (mass moves
from :math:`r < 1` to :math:`r > 1`), so the upper end is that of any mechanism.

Gumbel-max is stable: its keep probability
:math:`1 / \sum_m \max(p_m, q_m p_k / q_k)` (:func:`~pyro_lmscm.models.gumbel_max_counterfactual.stay_log_prob`)
lies in the stable interval. The inverse-CDF mechanism (:class:`~pyro_lmscm.models.InverseCDF`)
is a coupling, so it lies in the "any" interval, but it is not stable, in either order: with
:math:`p` uniform on 3 tokens and :math:`q = \mathrm{softmax}(0, 0, 1)`, observing token 1 it
keeps it with probability :math:`0.273` (vocabulary order), below the stable lower end
:math:`q_1 / p_1 = 0.636` (no token's ratio is below :math:`r_1`); with :math:`p = (0.4, 0.35,
0.25)`, :math:`q = (0.3, 0.45, 0.25)` in probability order, :math:`K = 1` moves to
:math:`J = 0` though :math:`r_0 < r_1`.

Ties. Ratios whose relative difference is below
:math:`\tau = 2 U \epsilon\, (2 S + |\log p_k| + \min(S, |\log q_k|))` are tied
(:math:`U =` :data:`~pyro_lmscm.models.gumbel_max_counterfactual.TIE_ULPS`,
:math:`S =` :data:`TIE_SPAN`): a softmax entry :math:`e^{x}` rounds by :math:`\epsilon |x|`
relative, so tied ratios of tokens within :math:`S` nats of the top of either side stay
within :math:`\tau`, and the others carry less than :math:`V e^{-S}` in all. The bounds are
computed in linear space: their absolute error is about :math:`\epsilon / p_k` (an observed
token whose probability underflows, below :math:`10^{-308}`, gets the interval
:math:`[0, 1]`).

A string. Given the observation the noise is independent across steps and a mechanism acts
step by step, so each observed step's keep probability :math:`a_t` can be chosen in its
interval independently of the others (exactly so when no two steps share a pair of laws,
which holds generically; always a valid bound). With :math:`D` the first step where the
counterfactual differs (:math:`n` if it does not),

.. math::

    P(\text{unchanged}) = \prod_{t < n} a_t, \qquad
    E[D] = \sum_{t < n} \prod_{s \le t} a_s, \qquad
    P(D \le t) = 1 - \prod_{s \le t} a_s,

each monotone in every :math:`a_s`: their bounds are their values at the low and the high ends
of the steps' intervals. Steps where every mechanism agrees (a forced token ``do(w_t = x)``:
1 or 0; after an observed end of sequence: the pad) have an interval of one point.

A candidate string. The probability that the counterfactual is a candidate :math:`s` (not
only the observation) is a product over steps too: at an observed step :math:`t` it is
:math:`P(J_t = s_t \mid K_t = w_t) = \pi_{t, w_t s_t} / p_{t, w_t}` for the coupling of the
factual law :math:`p_t` at the observed prefix and the intervened law :math:`q_t` at the
candidate's prefix :math:`s_{<t}` (after the candidate leaves the observation, a law no query
of the observation sees), and past the observation :math:`q_t(s_t)` for every mechanism (the
noise there is the prior). Over all mechanisms one cell :math:`\pi_{kj}`, :math:`j \neq k`, of
a coupling ranges over the Fréchet interval

.. math::

    a \in \Big[\frac{\max(0,\ p_k + q_j - 1)}{p_k},\ \frac{\min(p_k, q_j)}{p_k}\Big]
    \quad (\{0\} \text{ if } q = p),

both ends attained (the coupling that puts the most, or the least, mass on one cell), and the
steps' cells can be chosen independently as above: :func:`any_step_bounds`,
:meth:`~pyro_lmscm.inference.ExactCounterfactual.log_prob_bounds`. Over counterfactually stable
mechanisms the range of an off-diagonal cell is another linear program (mass may reach
:math:`j` from :math:`k` only through the ratio order, and the other tokens' flows constrain it
at both ends); we have no closed form for it that we have checked against the LP, so candidate
strings get the "any mechanism" range only.

References

[1] M. Oberst, D. Sontag (2019), "Counterfactual Off-Policy Evaluation with Gumbel-Max
    Structural Causal Models", ICML.
[2] M. Haugh, R. Singal (2022), "Counterfactual Analysis in Dynamic Latent State Models",
    arXiv:2205.13832.
[3] S. Beckers (2025), arXiv:2509.22297.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..errors import AbductionError, InferenceError, ObservationError
from ..models.gumbel_max_counterfactual import TIE_ULPS, stay_log_prob
from ..models.noise import GumbelMax
from ..validation import has_integer_dtype, is_integer

if TYPE_CHECKING:
    from ..models.noise import NoiseModel

__all__ = [
    "CLASSES",
    "any_step_bounds",
    "TIE_SPAN",
    "CounterfactualBounds",
    "expected_first_divergence_of",
    "first_divergence_cdf_of",
    "keep_bounds",
    "observed_keep_bounds",
    "prob_unchanged_of",
]

#: The keys of a :class:`CounterfactualBounds` table: ``"model"`` the SCM's own noise model,
#: ``"gumbel"`` Gumbel-max (the same as ``"model"`` under the default ``GumbelMax()``), then the
#: intervals ``(low, high)`` over counterfactually stable mechanisms and over all mechanisms.
CLASSES = ("model", "gumbel", "stable", "any")

_EPSILON = float(np.finfo(np.float64).eps)

#: Tokens more than this many nats below the top of both laws (:math:`e^{-64} \\approx 1.6
#: \\times 10^{-28}`) may fall on either side of a tie: the tie tolerance covers the rounding
#: of the others' ratios.
TIE_SPAN = 64.0


def keep_bounds(
    factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r"""The keep probability :math:`P(J = k \mid K = k)` of one step, over counterfactually
    stable mechanisms and over all mechanisms (the module docstring's intervals).

    :param factual_logits: decoded factual logits (or log-probabilities) ``(..., V)``; ``-inf``
        outside the decoding's support.
    :param counterfactual_logits: decoded intervened logits ``(..., V)``, broadcastable.
    :param observed: the observed tokens ``(...)``.
    :returns: ``{"stable": (low, high), "any": (low, high)}``, each ``(...)`` float64.
    :raises AbductionError: if an observed token has factual probability zero.
    :raises InferenceError: naming the argument, for logits that are not real tensors of one
        vocabulary with broadcastable rows, hold NaN or :math:`+\infty`, or (intervened) rule
        out every token.
    :raises ObservationError: for observed tokens that are not integer ids in ``[0, V)`` of
        the rows' shape.

    ``do`` "anything but token 2": stable mechanisms must keep token 1 (tied ratios exchange
    nothing), others need not.

    >>> p, q = torch.tensor([0.5, 0.3, 0.2]).log(), torch.tensor([0.5, 0.3, 0.0]).log()
    >>> [(round(float(lo), 3), round(float(hi), 3)) for lo, hi in keep_bounds(p, q, torch.tensor(1)).values()]
    [(1.0, 1.0), (0.0, 1.0)]
    """
    factual_logits, counterfactual_logits, (observed,) = _checked_step(
        "keep_bounds", factual_logits, counterfactual_logits, observed=observed
    )
    log_low, log_high = _log_keep_bounds(factual_logits, counterfactual_logits, observed)
    return {name: (low.exp(), log_high.exp()) for name, low in log_low.items()}


def _checked_step(
    owner: str, factual_logits: Any, counterfactual_logits: Any, **tokens: Any
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The arguments of one step's bounds (:func:`keep_bounds`, :func:`any_step_bounds`),
    checked: two real logit tensors ``(..., V)`` with broadcastable rows, no NaN or
    :math:`+\\infty` (a law of neither), an intervened row with some token possible; ``tokens``
    (by argument name) integer ids in ``[0, V)`` that expand to the rows' shape.

    :raises InferenceError: naming the logits argument.
    :raises ObservationError: naming the token argument.
    """
    checked = []
    for name, logits in (("factual_logits", factual_logits), ("counterfactual_logits", counterfactual_logits)):
        if not _is_real_tensor(logits) or logits.dim() == 0 or logits.shape[-1] == 0:
            raise InferenceError(f"{owner}(): `{name}` must be a real tensor (..., V), V >= 1, got {_kind(logits)}.")
        if bool((torch.isnan(logits) | (logits == math.inf)).any()):
            raise InferenceError(f"{owner}(): `{name}` holds NaN or +inf entries: no law of the next token.")
        checked.append(logits)
    factual, counterfactual = checked
    vocab = factual.shape[-1]
    try:
        rows = torch.broadcast_shapes(factual.shape, counterfactual.shape)
    except RuntimeError:
        rows = None
    if rows is None or counterfactual.shape[-1] != vocab:
        raise InferenceError(f"{owner}(): `factual_logits` {tuple(factual.shape)} and `counterfactual_logits` "
                             f"{tuple(counterfactual.shape)} must have one vocabulary and broadcastable rows.")
    if not bool((counterfactual > -math.inf).any(-1).all()):
        raise InferenceError(f"{owner}(): a row of `counterfactual_logits` is -inf everywhere: no token is possible.")
    ids = []
    for name, value in tokens.items():
        if is_integer(value) and not isinstance(value, torch.Tensor):
            value = torch.tensor(int(value))
        if not isinstance(value, torch.Tensor) or not has_integer_dtype(value):
            raise ObservationError(f"{owner}(): `{name}` must be an integer tensor of token ids, got {_kind(value)}.")
        try:
            value.expand(rows[:-1])
        except RuntimeError:
            raise ObservationError(f"{owner}(): `{name}` {tuple(value.shape)} must have the rows' shape "
                                   f"{tuple(rows[:-1])}.") from None
        if value.numel() and not (0 <= int(value.min()) and int(value.max()) < vocab):
            raise ObservationError(f"{owner}(): `{name}` must hold token ids in [0, {vocab}), got "
                                   f"{int(value.min())} .. {int(value.max())}.")
        ids.append(value)
    return factual, counterfactual, ids


def _log_keep_bounds(
    factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`keep_bounds` in log space: ``({"stable": log low, "any": log low}, log high)``
    (the high end is the same for both classes). In linear space, a handful of passes over
    the rows: the ratio comparisons as :math:`q_i \\lessgtr p_i r_k (1 \\mp \\tau)`."""
    factual, counterfactual = torch.broadcast_tensors(factual_logits.double(), counterfactual_logits.double())
    k = observed.to(factual.device).long().expand(factual.shape[:-1])[..., None]
    if bool((factual.gather(-1, k) == -math.inf).any()):
        raise AbductionError("an observed token has factual probability zero: no mechanism produces it.")
    p, q = factual.softmax(-1), counterfactual.softmax(-1)
    p_k, q_k = p.gather(-1, k), q.gather(-1, k)
    r_k = q_k / p_k  # (p_k = 0 only by underflow, below 1e-308: those rows get (0, 1) below)
    log_p_k, log_q_k = p_k.log(), q_k.log()
    tolerance = (2 * TIE_SPAN - log_p_k - log_q_k.clamp(min=-TIE_SPAN)).mul_(2 * TIE_ULPS * _EPSILON * r_k)
    difference = p - q
    below = q < p * (r_k - tolerance)  # L: r_i < r_k (0 < 0 is false: tokens of neither side)
    shed = torch.where(below, difference, 0.0).sum(-1, keepdim=True)  # what leaves L
    above = q > p * (r_k + tolerance)  # G: r_j > r_k (r_j = inf where only q_j > 0)
    absorbed = torch.where(above, difference, 0.0).sum(-1, keepdim=True).neg_()  # what enters G
    log_high = torch.clamp(log_q_k - log_p_k, max=0.0)
    stable = torch.maximum(q_k - shed, p_k - absorbed).clamp_(min=0.0) / p_k
    frechet = (q_k - (1.0 - p_k)).clamp_(min=0.0) / p_k  # P(K != k) = 1 - p_k: absolute error eps
    log_stable = torch.minimum(stable.log(), log_high)
    log_any = torch.minimum(frechet.log(), log_stable)
    # q = p: every mechanism gives J = K. Only rows with nothing below or above r_k can be equal.
    for row in torch.nonzero(((shed == 0) & (absorbed == 0)).reshape(-1)).reshape(-1).tolist():
        flat = (p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]))
        if torch.equal(flat[0][row], flat[1][row]):
            for tensor in (log_stable, log_any, log_high):
                tensor.view(-1)[row] = 0.0
    underflow = p_k == 0
    if bool(underflow.any()):
        log_stable, log_any = log_stable.masked_fill(underflow, -math.inf), log_any.masked_fill(underflow, -math.inf)
        log_high = log_high.masked_fill(underflow, 0.0)
    return {"stable": log_stable[..., 0], "any": log_any[..., 0]}, log_high[..., 0]


def any_step_bounds(
    factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor, token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The range of :math:`P(J = j \mid K = k)` of one step over all mechanisms (the module
    docstring's Fréchet interval; for :math:`j = k` the "any" interval of :func:`keep_bounds`).

    :param factual_logits: decoded factual logits ``(..., V)``.
    :param counterfactual_logits: decoded intervened logits ``(..., V)``, broadcastable.
    :param observed: the observed tokens :math:`k` ``(...)``.
    :param token: the counterfactual tokens :math:`j` ``(...)``.
    :returns: ``(low, high)`` log-probabilities, each ``(...)`` float64.
    :raises AbductionError: if an observed token has factual probability zero.
    :raises InferenceError: as :func:`keep_bounds`.
    :raises ObservationError: as :func:`keep_bounds`, for ``observed`` or ``token``.

    >>> p, q = torch.tensor([0.5, 0.3, 0.2]).log(), torch.tensor([0.2, 0.3, 0.5]).log()
    >>> [round(float(x.exp()), 3) for x in any_step_bounds(p, q, torch.tensor(0), torch.tensor(2))]
    [0.0, 1.0]
    """
    factual_logits, counterfactual_logits, (observed, token) = _checked_step(
        "any_step_bounds", factual_logits, counterfactual_logits, observed=observed, token=token
    )
    log_low, log_high = _log_keep_bounds(factual_logits, counterfactual_logits, observed)
    factual, counterfactual = torch.broadcast_tensors(factual_logits.double(), counterfactual_logits.double())
    k = observed.to(factual.device).long().expand(factual.shape[:-1])[..., None]
    j = token.to(factual.device).long().expand(factual.shape[:-1])[..., None]
    p, q = factual.softmax(-1), counterfactual.softmax(-1)
    p_k, q_j = p.gather(-1, k)[..., 0], q.gather(-1, j)[..., 0]
    low = (p_k + q_j - 1.0).clamp(min=0.0) / p_k
    high = torch.minimum(p_k, q_j) / p_k
    same = (p == q).all(-1)  # a mechanism of the law gives J = K: nothing moves
    low, high = low.masked_fill(same, 0.0), high.masked_fill(same, 0.0)
    keep = (j == k)[..., 0]
    return torch.where(keep, log_low["any"], low.log()), torch.where(keep, log_high, high.log())


def prob_unchanged_of(keep: torch.Tensor) -> float:
    """:math:`\\prod_t a_t` of keep probabilities ``(n,)``.

    :raises InferenceError: for ``keep`` not a real tensor ``(n,)`` of probabilities in ``[0, 1]``.
    """
    return _prob_unchanged(_log_keep(keep, "prob_unchanged_of"))


def expected_first_divergence_of(keep: torch.Tensor) -> float:
    r""":math:`E[D] = \sum_{t < n} \prod_{s \le t} a_s` of keep probabilities ``(n,)``.

    :raises InferenceError: as :func:`prob_unchanged_of`.
    """
    return _expected_first_divergence(_log_keep(keep, "expected_first_divergence_of"))


def first_divergence_cdf_of(keep: torch.Tensor) -> torch.Tensor:
    r"""``(n + 1,)`` float64: :math:`P(D \le t) = 1 - \prod_{s \le t} a_s` for :math:`t < n`, and 1
    at :math:`t = n`, of keep probabilities ``(n,)``.

    :raises InferenceError: as :func:`prob_unchanged_of`.
    """
    return _first_divergence_cdf(_log_keep(keep, "first_divergence_cdf_of"))


def _is_real_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype != torch.bool and not value.is_complex()


def _kind(value: Any) -> str:
    """What a bad argument is, for a message: a tensor's shape and dtype, else its type."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, {value.dtype}"
    return type(value).__name__


def _log_keep(keep: Any, owner: str) -> torch.Tensor:
    """``log keep`` (float64) of checked keep probabilities: a real tensor ``(n,)`` in ``[0, 1]``.

    :raises InferenceError: naming ``keep``.
    """
    if not _is_real_tensor(keep) or keep.dim() != 1:
        raise InferenceError(f"{owner}(): `keep` must be a real tensor (n,) of probabilities, got {_kind(keep)}.")
    keep = keep.double()
    if not bool(((keep >= 0) & (keep <= 1)).all()):  # (NaN fails both)
        raise InferenceError(f"{owner}(): `keep` must hold probabilities in [0, 1], got {keep.tolist()!r:.120}.")
    return keep.log()


def _prob_unchanged(log_keep: torch.Tensor) -> float:
    return float(log_keep.sum().exp())


def _expected_first_divergence(log_keep: torch.Tensor) -> float:
    return float(torch.cumsum(log_keep, 0).exp().sum())


def _first_divergence_cdf(log_keep: torch.Tensor) -> torch.Tensor:
    survive = torch.cumsum(log_keep, 0)
    return torch.cat([-torch.expm1(survive), survive.new_ones(1)])


def _same(a: Any, b: Any) -> bool:
    """Equal values: tensors element for element (with their dtype and shape), tuples and
    dicts member for member, anything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        both = isinstance(a, dict) and isinstance(b, dict)
        return both and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@dataclass(frozen=True, eq=False)
class CounterfactualBounds:
    r"""The counterfactual's keep probabilities under the SCM's noise model, under
    Gumbel-max, and their exact ranges over counterfactually stable mechanisms and over all
    mechanisms (the module docstring), with the whole-string queries they give.

    Every table is a dict with the keys :data:`CLASSES`: ``"model"`` (the SCM's own noise
    model: what :meth:`~pyro_lmscm.inference.ExactCounterfactual.prob_unchanged` gives),
    ``"gumbel"`` (Gumbel-max, the same as ``"model"`` under ``GumbelMax()``), each a value,
    and ``"stable"`` and ``"any"``, each an interval ``(low, high)``.

    :ivar tokens: the observed tokens ``(n,)``.
    :ivar log_keep: log keep probabilities: ``"model"`` and ``"gumbel"`` ``(n,)``,
        ``"stable"`` and ``"any"`` pairs ``((n,), (n,))``, float64.
    :ivar noise: the SCM's noise model, in words.
    """

    tokens: torch.Tensor
    log_keep: dict[str, Any]
    noise: str = "GumbelMax()"

    def __eq__(self, other: object) -> bool:
        """The same bounds: equal tokens, log keep probabilities (element for element) and noise model."""
        if not isinstance(other, CounterfactualBounds):
            return NotImplemented
        return self.noise == other.noise and _same(self.tokens, other.tokens) and _same(self.log_keep, other.log_keep)

    __hash__ = None  # type: ignore[assignment]  # (mutable tensors inside)

    def _apply(self, function: Any) -> dict[str, Any]:
        """``function`` of each class's log keep probabilities (of each end of an interval)."""
        out: dict[str, Any] = {}
        for name in CLASSES:
            value = self.log_keep[name]
            out[name] = tuple(function(v) for v in value) if isinstance(value, tuple) else function(value)
        return out

    @property
    def keep(self) -> dict[str, Any]:
        """Per observed step, :math:`a_t = P(\\text{keep } w_t \\mid \\text{kept } w_{<t})`, ``(n,)``."""
        return self._apply(torch.exp)

    @property
    def prob_unchanged(self) -> dict[str, Any]:
        """P(the counterfactual's first ``n`` tokens are the observation's)."""
        return self._apply(_prob_unchanged)

    @property
    def expected_first_divergence(self) -> dict[str, Any]:
        """E[the number of leading observed tokens kept]."""
        return self._apply(_expected_first_divergence)

    @property
    def first_divergence_cdf(self) -> dict[str, Any]:
        """P(first divergence <= t), ``(n + 1,)``; an interval's low end comes from the high
        keep probabilities."""
        cdf = self._apply(_first_divergence_cdf)
        return {name: (v[1], v[0]) if isinstance(v, tuple) else v for name, v in cdf.items()}

    def summary(self) -> dict[str, float]:
        """The whole-string numbers as one flat dict: ``prob_unchanged_model``,
        ``prob_unchanged_stable_low``, ..., ``expected_first_divergence_any_high``."""
        out: dict[str, float] = {}
        for query in ("prob_unchanged", "expected_first_divergence"):
            for name, value in getattr(self, query).items():
                if isinstance(value, tuple):
                    out[f"{query}_{name}_low"], out[f"{query}_{name}_high"] = value
                else:
                    out[f"{query}_{name}"] = value
        return out

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame``, one row per observed step: ``step``, ``token``, the keep
        probabilities (``keep_model``, ``keep_gumbel``, ``keep_stable_low``, ...) and the
        first-divergence CDF at the step (``cdf_model``, ...); the whole-string numbers
        (:meth:`summary`) in ``DataFrame.attrs``. pandas is optional
        (``pip install 'pyro-lmscm[pandas]'``).

        :raises InferenceError: without pandas.
        """
        try:
            import pandas as pd
        except ImportError as error:
            raise InferenceError("to_pandas() needs pandas: pip install 'pyro-lmscm[pandas]'.") from error
        n = self.tokens.shape[-1]
        columns: dict[str, Any] = {"step": list(range(n)), "token": self.tokens.tolist()}
        for prefix, table in (("keep", self.keep), ("cdf", self.first_divergence_cdf)):
            for name, value in table.items():
                if isinstance(value, tuple):
                    columns[f"{prefix}_{name}_low"] = value[0][:n].tolist()
                    columns[f"{prefix}_{name}_high"] = value[1][:n].tolist()
                else:
                    columns[f"{prefix}_{name}"] = value[:n].tolist()
        frame = pd.DataFrame(columns)
        frame.attrs.update(self.summary())
        return frame


def observed_keep_bounds(
    noise: NoiseModel,
    log_q: torch.Tensor,
    factual_logits: torch.Tensor,
    counterfactual_logits: torch.Tensor,
    tokens: torch.Tensor,
    steps: Sequence[int],
) -> CounterfactualBounds:
    r"""A :class:`CounterfactualBounds` of an observed string from the passes of the exact
    queries.

    :param noise: the SCM's noise model.
    :param log_q: ``(n,)`` the SCM's log keep probabilities of the observed tokens
        (:meth:`~pyro_lmscm.inference.ExactCounterfactual.observed_token_log_probs`); at the
        steps not in ``steps`` every mechanism gives them.
    :param factual_logits: the decoded factual logits ``(n, V)``.
    :param counterfactual_logits: the decoded intervened logits on the observation ``(n, V)``.
    :param tokens: the observation ``(n,)``.
    :param steps: the steps whose keep probability depends on the mechanism: the abducted
        steps without a forced token.
    """
    log_q = log_q.double().cpu()
    steps = list(steps)
    gumbel = log_q
    stable_low, any_low, high = log_q, log_q, log_q
    if steps:
        factual, counterfactual, observed = factual_logits, counterfactual_logits, tokens
        if steps != list(range(log_q.shape[-1])):  # (all steps, as a rule: no copy of the rows)
            factual, counterfactual, observed = factual[steps], counterfactual[steps], observed[steps]
        if not isinstance(noise, GumbelMax):
            gumbel = log_q.index_put((torch.tensor(steps),), stay_log_prob(factual, counterfactual, observed).cpu())
        low, top = _log_keep_bounds(factual, counterfactual, observed)
        index = (torch.tensor(steps),)
        stable_low, any_low = log_q.index_put(index, low["stable"].cpu()), log_q.index_put(index, low["any"].cpu())
        high = log_q.index_put(index, top.cpu())
    log_keep = {"model": log_q, "gumbel": gumbel, "stable": (stable_low, high), "any": (any_low, high)}
    return CounterfactualBounds(tokens.cpu(), log_keep, repr(noise))
