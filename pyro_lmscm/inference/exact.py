r"""Exact counterfactual probabilities of the SCM, in closed form.

One step: the noise model's law :math:`P(J = j \mid K = k)`
(:meth:`~pyro_lmscm.models.NoiseModel.counterfactual_log_probs`) with the same posterior noise on the factual decoded
logits :math:`\ell` and the counterfactual ones :math:`\ell'`; for Gumbel-max in closed form,
:math:`q_j \int_{r_j}^{r_k} H(\rho)^{-2} d\rho`, derived in
:mod:`pyro_lmscm.models.gumbel_max_counterfactual`; for the inverse-CDF mechanism an overlap
of intervals (:class:`~pyro_lmscm.models.InverseCDF`).

A string. Given the observation the noise is independent across steps, so the
counterfactual is a chain: :math:`q(s_t \mid s_{<t}) = P(J = s_t \mid K = w_t; \ell_t,
\ell'_t(s_{<t}))` at an observed step, :math:`\mathrm{softmax}(\ell'_t(s_{<t}))` past the
observation (or after an observed end of sequence: the noise there is the prior), the pad
token after the counterfactual's own end of sequence, and a point mass under
``do(w_t = x)``. :class:`ExactCounterfactual` evaluates it.

References

[1] S. Ravfogel, A. Svete, V. Snæbjarnarson, R. Cotterell (2024), "Gumbel Counterfactual
    Generation From Language Models", arXiv:2411.07180.
[2] M. Oberst, D. Sontag (2019), "Counterfactual Off-Policy Evaluation with Gumbel-Max
    Structural Causal Models", ICML.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..atomic import locked
from ..errors import AbductionError, InferenceError, ObservationError
from ..interventions.ops import Action, as_do_data, excluded_tokens, forced_tokens, world, world_inputs
from ..lm import left_pad
from ..models.incremental import MechanismBatch
from ..models.scm import as_scm
from ..models.teacher_forcing import decoded_steps
from ..reporting import report as report_progress
from ..seeding import seeded
from ..validation import as_int
from .bounds import CounterfactualBounds, any_step_bounds, observed_keep_bounds
from .budget import AUTO_CHUNK_BYTES, MIN_CHUNK_ROWS, even_chunk_size
from .hindsight_guide import HindsightGumbelGuide
from .scoring import gathered_log_probs

if TYPE_CHECKING:
    from ..interventions.ops import Intervention
    from ..models.scm import LanguageModelSCM

__all__ = [
    "BEAM_COMPACT_SHARE",
    "ExactCounterfactual",
    "counterfactual_token_log_probs",
    "exact_counterfactual",
    "expected_first_divergence",
    "first_divergence_law",
    "most_probable",
    "observed_bounds",
    "observed_token_log_probs",
    "top_k_counterfactuals",
]


def first_divergence_law(log_q: torch.Tensor) -> torch.Tensor:
    """``(n + 1,)``: P(first differing step = t) from the log-probabilities ``(n,)`` of
    keeping each observed token given the observed prefix; the last entry is P(unchanged)."""
    survive = torch.cat([log_q.new_zeros(1), torch.cumsum(log_q, 0)])  # log P(same up to t)
    leave = survive[:-1] + torch.log1p(-torch.exp(log_q).clamp(max=1.0))
    return torch.cat([leave, survive[-1:]]).exp()


def expected_first_divergence(divergence: torch.Tensor) -> float:
    """The mean of a :func:`first_divergence_law` ``(n + 1,)``: the expected number of leading
    observed tokens kept (``n`` if unchanged)."""
    return float((torch.arange(divergence.shape[0], dtype=divergence.dtype) * divergence).sum())


class ExactCounterfactual:
    r"""The exact counterfactual distribution of an observed string under an intervention.

    Built by :func:`exact_counterfactual`. The factual logits :math:`\ell_t` at the observed
    prefixes come from the abduction's teacher-forced pass; each query runs the intervened
    mechanism teacher-forced on its candidate strings.

    :ivar scm: the SCM.
    :ivar prompt_ids: the factual prompt ``(L,)``.
    :ivar observed_ids: the observation ``(n,)``.
    :ivar intervention: the ``poutine.do`` data.
    """

    def __init__(
        self,
        scm: LanguageModelSCM,
        prompt: torch.Tensor,
        observed: torch.Tensor,
        data: dict,
        raw_logits: torch.Tensor | None = None,
    ) -> None:
        self.prompt_ids = prompt
        self.observed_ids = observed
        if isinstance(raw_logits, torch.Tensor) and raw_logits.dim() != 2:  # (the guide takes a batch (..., n, V))
            raise ObservationError(
                f"`raw_logits` must have shape (n, V) of the one observed string, got {tuple(raw_logits.shape)}."
            )
        guide = HindsightGumbelGuide(scm, observed, raw_logits=raw_logits)
        self._anchor = guide.anchor(prompt)  # the abduction's raw factual logits on the observed path
        self._factual = guide.decoded_logits(self._anchor).double()  # (n, V)
        self._active = guide.step_is_active(observed)  # (n,): steps whose noise is abducted
        self._intervene(scm, data)

    def _intervene(self, scm: LanguageModelSCM, data: dict) -> None:
        """Set the intervened world: ``scm`` and the ``poutine.do`` data."""
        self.scm = scm
        self.intervention = data if isinstance(data, Action) else Action(data)
        self._prompt, self._mechanism = world_inputs(scm, data, self.prompt_ids)
        self._forced = forced_tokens(scm, data)
        self._excluded = excluded_tokens(scm, data)

    def _under(self, scm: LanguageModelSCM, data: dict) -> ExactCounterfactual:
        """The exact counterfactual of the same observation under the intervention ``data`` of
        ``scm``, an SCM with this one's factual world (the same language model, decoding,
        noise and horizon; other intervened mechanisms), sharing this one's abduction (its
        factual logits) instead of redoing it.

        :raises InferenceError: for an SCM with another factual world.
        """
        mine = self.scm
        if (scm.lm is not mine.lm or scm.decoding != mine.decoding or scm.noise is not mine.noise
                or scm.max_new_tokens != mine.max_new_tokens or scm.collapsed != mine.collapsed):
            raise InferenceError("ExactCounterfactual: another intervention's SCM must share the factual world.")
        out = copy.copy(self)
        out._intervene(scm, data)
        return out

    # -- the chain q(s_t | s_<t) ------------------------------------------------------------

    @torch.no_grad()
    def _counterfactual_logits(self, prefixes: torch.Tensor, length: int) -> torch.Tensor:
        """Decoded intervened logits ``(B, length, V)`` at steps ``0..length-1`` of the
        candidates ``prefixes`` ``(B, >= length - 1)``."""
        rows = prefixes.shape[0]
        inputs = torch.cat([self._prompt.expand(rows, -1), prefixes[:, : length - 1].to(self._prompt.device)], -1)
        with self.scm.mechanisms[self._mechanism].activate(self.scm.lm) as f:
            return self._decoded(prefixes, f.logits(inputs, logits_to_keep=length))

    def _decoded(self, prefixes: torch.Tensor, raw: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The raw intervened logits ``(B, m, V)`` at steps ``start .. start + m - 1`` of the
        candidates ``prefixes`` (``(B, >= start + m - 1)``) made what the SCM evaluates
        (float64): the teacher-forced steps through the SCM's effectful operations
        (:func:`~pyro_lmscm.models.teacher_forcing.decoded_steps`) inside the factual anchor
        of the abduction and the handlers of the intervened world
        (:func:`~pyro_lmscm.interventions.ops.world`), as a decoding run has them."""
        with self.scm.anchored(self._anchor), world(self.scm, self.intervention):
            decoded = decoded_steps(self.scm, raw, self._prompt, self._mechanism, prefixes.to(raw.device), start)
        return decoded.double()

    def _anchored(self, t: int) -> bool:
        """Whether the factual anchor can act at step ``t``: the factual mechanism and prompt
        (a token intervention), an observed step."""
        return self._mechanism == 0 and t < self.observed_ids.shape[-1] and torch.equal(self._prompt, self.prompt_ids)

    def _decodes_alone(self, t: int) -> bool:
        """Whether no handler of this query can act at step ``t`` (no anchor, no exclusion, no
        Messenger of the intervention), so that the decoding alone gives the logits: a fast
        path of beam search, never another meaning."""
        return not self._anchored(t) and t not in self._excluded and not self.intervention.messengers

    def _abducted(self, t: int) -> bool:
        """Whether step ``t``'s noise is abducted (an observed step before the observed end)."""
        return t < self.observed_ids.shape[-1] and bool(self._active[t])

    def _chain_log_probs(
        self, logits: torch.Tensor, ended: torch.Tensor, start: int = 0, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, m, V)`` log q(. | s_<t) at steps ``start .. start + m - 1``, given the
        counterfactual logits ``(B, m, V)`` there and whether each candidate has already
        ended ``(B, m)``; with ``tokens`` ``(B, m)`` only log q(tokens | s_<t), ``(B, m)``,
        without holding the law over V (:func:`chain_token_log_probs`). The observed steps of
        the candidates not yet ended are computed in one batched call (an ended candidate only
        pads)."""
        if tokens is not None:
            owners = torch.zeros(logits.shape[0], dtype=torch.long)
            return chain_token_log_probs([self], owners, logits, ended, tokens, start)
        return chain_log_probs([self], torch.zeros(logits.shape[0], dtype=torch.long), logits, ended, start)

    def _step_log_probs(self, t: int, logits: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """``(B, V)``: :meth:`_chain_log_probs` at the one step ``t``."""
        return self._chain_log_probs(logits[:, None], ended[:, None], start=t)[:, 0]

    def _ended_before(self, candidates: torch.Tensor) -> torch.Tensor:
        """``(B, m)``: the candidate emitted an end of sequence before step ``t``."""
        return self.scm.ended_before(candidates.cpu())

    def token_log_probs(self, candidates: torch.Tensor) -> torch.Tensor:
        """``(B, m)`` float64: :math:`\\log q(s_t \\mid s_{<t})` of each candidate's tokens;
        :func:`counterfactual_token_log_probs` of this string alone.

        :param candidates: token ids ``(B, m)`` (or ``(m,)``), ``1 <= m <= T``.
        """
        return counterfactual_token_log_probs([self], [candidates])[0]

    def _candidate_log_q(self, candidates: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """:meth:`token_log_probs` of checked ``candidates`` ``(B, m)`` given the raw intervened
        logits ``(B, m, V)`` of their steps."""
        logits = self._decoded(candidates.to(raw.device), raw).cpu()
        return self._chain_log_probs(logits, self._ended_before(candidates), tokens=candidates)

    def log_prob(self, candidates: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float64: log P(the counterfactual's first ``m`` tokens = candidate); one
        teacher-forced pass of the intervened mechanism for the batch."""
        return self.token_log_probs(candidates).sum(-1)

    def log_prob_bounds(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The range of :meth:`log_prob` over all mechanisms with this SCM's next-token laws:
        ``(low, high)``, each ``(B,)`` float64; the product of each abducted step's Fréchet
        interval (:func:`~pyro_lmscm.inference.bounds.any_step_bounds`), the other steps as in
        :meth:`log_prob` (every mechanism agrees there). Over counterfactually stable
        mechanisms no closed form is offered (:mod:`~pyro_lmscm.inference.bounds`). Two
        teacher-forced passes of the intervened mechanism.

        :param candidates: token ids ``(B, m)`` (or ``(m,)``), ``1 <= m <= T``.
        """
        log_q = self.token_log_probs(candidates)  # (B, m), checks the candidates
        rows = torch.as_tensor(candidates).long().cpu().reshape(-1, log_q.shape[-1])
        m = rows.shape[-1]
        logits = self._counterfactual_logits(rows, m).cpu()
        ended = self._ended_before(rows)
        low, high = log_q.clone(), log_q.clone()
        for t in self._noisy_steps():
            going = ~ended[:, t] if t < m else torch.zeros(0, dtype=torch.bool)
            if not bool(going.any()):
                continue
            step_low, step_high = any_step_bounds(
                self._factual[t].cpu(), logits[going, t], self.observed_ids[t].cpu(), rows[going, t]
            )
            low[going, t], high[going, t] = step_low, step_high
        return low.sum(-1), high.sum(-1)

    def next_token_probs(self, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``(V,)`` float64: q(. | prefix), the counterfactual's next token after ``prefix``."""
        prefix = torch.zeros(0, dtype=torch.long) if prefix is None else self.scm.lm.check_ids(prefix, "prefix")
        prefix = prefix.cpu().reshape(-1)
        t = prefix.shape[-1]
        if t >= self.scm.max_new_tokens:
            raise ObservationError(f"the prefix has {t} tokens; the SCM stops after {self.scm.max_new_tokens}.")
        padded = torch.cat([prefix, prefix.new_zeros(1)])[None]
        logits = self._counterfactual_logits(padded, t + 1).cpu()[:, t]
        return self._step_log_probs(t, logits, self._ended_before(padded)[:, t]).exp()[0]

    def observed_token_log_probs(self, relabel: torch.Tensor | None = None) -> torch.Tensor:
        """``(n,)`` float64: log q(w_t | w_<t), the log-probability that the counterfactual
        keeps each observed token given the observed prefix; one teacher-forced pass, and at
        the abducted steps the noise model's ``stay_log_prob`` (for Gumbel-max one pass over
        V, no sort).

        :param relabel: as in :meth:`prob_unchanged`.
        """
        return self._observed_log_q(self._relabel(relabel))

    def _observed_log_q(self, relabel: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`observed_token_log_probs` with a checked ``relabel`` (a permutation): the
        abducted steps are computed with token ``relabel[i]`` renamed ``i``, the same model
        under another vocabulary order. ``logits``: the intervened logits on the
        observation, ``(1, n, V)``, if already computed (:func:`observed_token_log_probs`)."""
        observed = self.observed_ids.cpu()[None]
        n = observed.shape[-1]
        logits = self._counterfactual_logits(observed, n).cpu() if logits is None else logits
        log_q = self._observed_scores(logits, self._forced)
        active = self._noisy_steps()
        if active:
            factual, counterfactual, tokens = self._factual[active], logits[0, active], observed[0, active]
            if relabel is not None:
                new_id = torch.empty_like(relabel).scatter_(0, relabel, torch.arange(relabel.numel()))
                factual, counterfactual, tokens = factual[:, relabel], counterfactual[:, relabel], new_id[tokens]
            log_q[active] = self.scm.noise.stay_log_prob(factual, counterfactual, tokens)
        return log_q

    def _noisy_steps(self) -> list[int]:
        """The observed steps whose token the abducted noise decides: before the observed end
        and not forced by ``do(w_t = x)``."""
        return [t for t in range(self.observed_ids.shape[-1]) if bool(self._active[t]) and t not in self._forced]

    def _observed_scores(self, logits: torch.Tensor, forced: dict[int, int]) -> torch.Tensor:
        """``(n,)`` float64: the observation's per-token log-probabilities given decoded logits
        on it ``(1, n, V)`` (the intervened ones with the intervention's ``forced`` tokens, or
        the abduction's with none), as the scorer (:func:`~pyro_lmscm.inference.token_log_probs`)
        defines them: ``0`` after the end of sequence, and under ``do(w_t = x)`` ``0`` or
        :math:`-\\infty`."""
        observed = self.observed_ids.cpu()[None]
        log_p = gathered_log_probs(logits, observed)[0]
        ended = self._ended_before(observed)[0]
        log_p = torch.where(ended, torch.where(observed[0] == self.scm.lm.pad_token_id, 0.0, -math.inf), log_p)
        for t, value in forced.items():
            if t < observed.shape[-1]:
                log_p[t] = 0.0 if int(observed[0, t]) == value else -math.inf
        return log_p

    def prob_unchanged(self, relabel: torch.Tensor | None = None) -> float:
        """P(counterfactual[:n] = observed[:n]): one pass of the intervened model on the
        observation and one pass over the vocabulary per step.

        :param relabel: a permutation of the vocabulary: the probability when token
            ``relabel[i]`` is renamed ``i`` (the language model is the same; only a noise
            model that reads token ids, such as ``InverseCDF(order="vocabulary")``, can tell).
        """
        return float(self._observed_log_q(self._relabel(relabel)).sum().exp())

    def bounds(self) -> CounterfactualBounds:
        """How much of :meth:`prob_unchanged` is the noise model: the keep probabilities of the
        observed tokens, P(unchanged), E[first divergence] and the first-divergence CDF under
        this SCM's noise model (``"model"``), under Gumbel-max (``"gumbel"``), and their exact
        ranges over counterfactually stable mechanisms (``"stable"``) and over all mechanisms
        (``"any"``) (:mod:`~pyro_lmscm.inference.bounds`); the same pass as :meth:`prob_unchanged`.

        >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3)
        >>> exact = exact_counterfactual(scm, torch.tensor([2, 3]), torch.tensor([7, 3, 9]), {})
        >>> exact.bounds().prob_unchanged
        {'model': 1.0, 'gumbel': 1.0, 'stable': (1.0, 1.0), 'any': (1.0, 1.0)}
        """
        observed = self.observed_ids.cpu()
        return self._bounds(self._counterfactual_logits(observed[None], observed.shape[-1]).cpu())

    def _bounds(self, logits: torch.Tensor) -> CounterfactualBounds:
        """:meth:`bounds` given the decoded intervened logits on the observation ``(1, n, V)``."""
        log_q = self._observed_log_q(logits=logits)
        observed = self.observed_ids.cpu()
        return observed_keep_bounds(self.scm.noise, log_q, self._factual, logits[0], observed, self._noisy_steps())

    def _relabel(self, relabel: torch.Tensor | None) -> torch.Tensor | None:
        if relabel is None:
            return None
        relabel = self.scm.lm.check_ids(relabel, "relabel").cpu()
        if not torch.equal(relabel.sort().values, torch.arange(self.scm.vocab_size)):
            raise ObservationError(f"`relabel` must be a permutation of range({self.scm.vocab_size}).")
        return relabel

    def first_divergence(self, relabel: torch.Tensor | None = None) -> torch.Tensor:
        """``(n + 1,)`` float64: entry ``t < n`` is P(the first step where the counterfactual
        differs from the observation is ``t``); the last entry is P(unchanged).

        :param relabel: as in :meth:`prob_unchanged`.
        """
        return first_divergence_law(self.observed_token_log_probs(relabel))

    def sample(self, num_samples: int, seed: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
        r"""``(num_samples, T)`` ancestral samples of the counterfactual string from the chain
        :math:`s_t \sim q(\cdot \mid s_{<t})`, each step drawn by the SCM's own mechanism
        rather than from its closed-form law (:meth:`_step_sample`):

        .. math::

            u_t \sim p(u_t \mid f(\ell_t, u_t) = w_t), \qquad s_t = f(\ell'_t(s_{<t}), u_t)

        at an abducted step (an observed step before the observed end, the row not ended), with
        :math:`f` the noise model's :meth:`~pyro_lmscm.models.NoiseModel.structural` function,
        :math:`p(u_t \mid \cdot)` its exact :meth:`~pyro_lmscm.models.NoiseModel.posterior`
        (margin 0), :math:`\ell_t` the factual decoded logits of the abduction and
        :math:`\ell'_t` the intervened decoded logits of the row's prefix; :math:`u_t` from the
        prior past the observation (or after its end); the pad token after the row's own end
        of sequence; and the token ``x`` of ``do(w_t = x)``: the cases of
        :func:`chain_log_probs`. Given the observation the noise of step :math:`t` is
        independent of the other steps' noise, hence of :math:`s_{<t}`, so one fresh posterior
        draw per row and step has the law of the closed form :meth:`next_token_probs`, which
        is by definition the law of :math:`f(\ell'_t, u_t)` under that posterior (for every
        noise model, decoding transform, exclusion, prompt and mechanism). The draw costs
        :math:`O(V)` per row and step, as the draws of :func:`~pyro_lmscm.counterfactual` do:
        for Gumbel-max noise a few passes over the vocabulary and no sort (its closed form
        sorts each row), for the inverse-CDF mechanism in vocabulary order a cumulative sum
        (ordered by probability it sorts each row, as its closed form does). Every other
        query (:meth:`log_prob`, :meth:`next_token_probs`, :meth:`first_divergence`,
        :meth:`mode`, ...) keeps the closed form.

        The rows decode KV-cached, as :func:`~pyro_lmscm.counterfactual` does: one
        :class:`~pyro_lmscm.models.incremental.MechanismBatch` of the intervened mechanism per
        chunk of rows (its cache allocated once), one cached step per row and token, each
        step's raw logits given their meaning by the SCM's effectful operations inside the
        factual anchor and the intervened world (:meth:`_decoded`), as a teacher-forced pass
        has them. The time is linear in ``T`` up to the attention over the prefix, the memory
        linear in ``T``; the logits round like a cached decoding run, not like a
        teacher-forced pass (up to float rounding; on the abducted path of the factual
        mechanism they are the anchored ones).

        :param num_samples: the number of strings.
        :param seed: seeds the draws (:func:`~pyro_lmscm.seeding.seeded`); ``None`` draws fresh.
        :param chunk_size: rows decoded at once (default: as many as fit
            :data:`~pyro_lmscm.inference.budget.AUTO_CHUNK_BYTES` with their cache and
            a step's float64 logits and noise, a number that depends only on the model and ``T``,
            so a seeded call draws the same strings on every run; ``num_samples`` then run in as
            few chunks as fit, of one size: :func:`~pyro_lmscm.inference.budget.even_chunk_size`).
        :returns: token ids ``(num_samples, T)``.
        """
        num_samples = as_int(num_samples, "num_samples", minimum=1)
        if chunk_size is None:  # the budget's rows, in chunks of one size (as counterfactual's)
            size = even_chunk_size(self._sample_chunk_size(), num_samples)
        else:
            size = as_int(chunk_size, "chunk_size", minimum=1)
        with seeded(seed):
            chunks = [self._sample_rows(min(size, num_samples - start)) for start in range(0, num_samples, size)]
        return torch.cat(chunks)

    def _sample_chunk_size(self) -> int:
        """The rows :meth:`sample` decodes at once by default: the KV cache of prompt and
        ``T`` tokens and about eight float64 vectors of ``V`` (the decoded logits and their
        decoding's temporaries, the posterior noise and its working memory, logits plus noise)
        per row, within the device's :data:`~pyro_lmscm.inference.budget.AUTO_CHUNK_BYTES`
        (the closed-form law with its sort took about sixteen), and at least
        :data:`~pyro_lmscm.inference.budget.MIN_CHUNK_ROWS` rows."""
        scm = self.scm
        budget = AUTO_CHUNK_BYTES.get(scm.lm.device.type, AUTO_CHUNK_BYTES["cuda"])
        tokens = self._prompt.shape[-1] + scm.max_new_tokens
        per_row = scm.lm.cache_bytes_per_token() * tokens + 8 * 8 * scm.vocab_size
        return max(MIN_CHUNK_ROWS, budget // per_row)

    @torch.no_grad()
    def _sample_rows(self, rows: int) -> torch.Tensor:
        """``(rows, T)`` draws of :meth:`sample` from one KV-cached run of the intervened
        mechanism (the torch generator as :meth:`sample` left it)."""
        scm, T = self.scm, self.scm.max_new_tokens
        device = scm.lm.device
        mechanism = torch.tensor(self._mechanism, device=device)
        batch = MechanismBatch(scm.lm, scm.mechanisms, self._prompt.to(device), mechanism, max_tokens=T - 1)
        ids = torch.zeros(rows, T, dtype=torch.long)
        ended = torch.zeros(rows, dtype=torch.bool)  # an end of sequence before step t
        for t in range(T):
            raw = batch.logits().expand(rows, -1)  # (the prompt's one row before the first step)
            logits = self._decoded(ids, raw[:, None], start=t).cpu()[:, 0]
            ids[:, t] = self._step_sample(t, logits, ended)
            report_progress("exact sampling (tokens)", 1, T)
            ended = ended | scm.is_end(ids[:, t])
            if t + 1 < T and not bool(ended.all()):  # an ended row only pads: it leaves the cache
                batch.advance(ids[:, t].to(device), (~ended).to(device))
        return ids

    def _step_sample(self, t: int, logits: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """``(B,)``: one draw of :math:`s_t \\sim q(\\cdot \\mid s_{<t})` per row by the noise
        model (see :meth:`sample`), given the counterfactual decoded logits ``(B, V)`` at step
        ``t`` and whether each row has already ended ``(B,)``: the tokens certain there
        (:func:`_certain_tokens`), else the structural function of the logits and fresh noise,
        from the posterior at the abducted steps of the rows not ended
        (:func:`_posterior_steps`), from the prior elsewhere; drawn from torch's global
        generator (which :meth:`sample` seeds)."""
        noise, rows = self.scm.noise, logits.shape[0]
        owners, steps = torch.zeros(rows, dtype=torch.long), range(t, t + 1)
        tokens = _certain_tokens([self], owners, ended[:, None], steps)[:, 0]
        drawn = tokens < 0
        if not bool(drawn.any()):
            return tokens
        going, factual, observed = _posterior_steps([self], owners, ended[:, None], steps)
        going = going[:, 0]  # (an ended row is certain: never going)
        if bool(going.any()):
            u = noise.posterior(factual.to(logits.device), observed.to(logits.device)).sample()
            tokens[going] = noise.structural(logits[going], u).to(tokens.device)
        prior = drawn & ~going  # past the observation (or its end): the prior noise
        if bool(prior.any()):
            shape = torch.Size([int(prior.sum())]) + noise.event_shape(logits.shape[-1])
            tokens[prior] = noise.structural(logits[prior], noise.sample_prior(shape, logits.device)).to(tokens.device)
        return tokens

    def mode(self, num_beams: int = 4) -> tuple[torch.Tensor, float]:
        """The most probable counterfactual string ``(T,)`` and its log-probability, by beam
        search on the chain (exact for ``num_beams >= V^T``; a strong lower bound otherwise);
        :func:`most_probable` of this string alone.

        Over a long horizon the mode can be degenerate: the single most probable string of a
        language model is often a repetition loop (a phrase repeated to the end), although
        almost no sampled string looks like it, because the mode maximises the probability
        of one string, not how typical it is. :meth:`most_probable` gives the ``k`` most
        probable strings over a shorter ``horizon``; :meth:`sample` gives typical ones."""
        return most_probable([self], num_beams)[0]

    def most_probable(
        self, k: int = 1, horizon: int | None = None, num_beams: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most probable counterfactual strings over the first ``horizon`` tokens
        and their log-probabilities, by one beam search (:func:`top_k_counterfactuals` of
        this string alone).

        The mode of a long string can be degenerate (a repetition loop; see :meth:`mode`):
        look at the few most probable continuations over a horizon of a few tokens past the
        first divergence instead.

        :param k: how many strings, ``1 <= k``.
        :param horizon: the number of leading tokens (default ``T``).
        :param num_beams: the beams kept at each step (default ``max(k, 4)``; at least ``k``).
        :returns: ids ``(k', horizon)`` by decreasing probability and their log-probabilities
            ``(k',)`` float64, ``k' = k`` unless fewer strings are possible.
        """
        lengths = None if horizon is None else [horizon]
        return top_k_counterfactuals([self], k, num_beams=num_beams, lengths=lengths)[0]

    def _check(self, candidates: torch.Tensor) -> torch.Tensor:
        candidates = self.scm.lm.check_ids(candidates, "candidates").cpu()
        if candidates.dim() == 1:
            candidates = candidates[None]
        if candidates.dim() != 2 or not 1 <= candidates.shape[-1] <= self.scm.max_new_tokens:
            raise ObservationError(
                f"`candidates` must have shape (B, m) with 1 <= m <= {self.scm.max_new_tokens}, "
                f"got {tuple(candidates.shape)}."
            )
        return candidates


def _certain_tokens(
    exacts: Sequence[ExactCounterfactual], owners: torch.Tensor, ended: torch.Tensor, steps: range
) -> torch.Tensor:
    """``(B, m)``: the token that candidates ``(B, m)`` of ``exacts[owners]`` take for certain
    at ``steps``, ``-1`` where the noise decides: after the candidate's end of sequence the SCM
    pads, unless ``do(w_t = x)`` says otherwise (as in the SCM: the forced token then, ended
    or not)."""
    certain = torch.where(ended, exacts[0].scm.lm.pad_token_id, -1)
    for o, exact in enumerate(exacts):
        mine = owners == o
        for i, t in enumerate(steps):
            if t in exact._forced:
                certain[mine, i] = exact._forced[t]
    return certain


def _posterior_steps(
    exacts: Sequence[ExactCounterfactual],
    owners: torch.Tensor,
    ended: torch.Tensor,
    steps: range,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the posterior noise applies to candidates ``(B, m)`` of ``exacts[owners]`` at
    ``steps`` (an abducted step, the candidate not ended): the mask, and there the factual
    decoded logits ``(G, V)`` and observed tokens ``(G,)`` of each candidate's string; with
    ``columns`` ``(B, m, W)`` (see :func:`chain_log_probs`) the factual logits at those tokens
    ``(G, W)`` and the observed tokens' places among them.

    :raises AbductionError: for an observed token outside ``columns`` (it is possible on the
        factual side, so ``columns`` misses a token possible on either side).
    """
    abducted = torch.tensor([[exact._abducted(t) for t in steps] for exact in exacts]).reshape(len(exacts), -1)
    going = abducted[owners] & ~ended
    row, step = going.nonzero(as_tuple=True)
    at = [(int(owners[b]), steps[i]) for b, i in zip(row.tolist(), step.tolist())]
    if not at:
        return going, torch.empty(0), torch.empty(0, dtype=torch.long)
    observed = torch.stack([exacts[o].observed_ids[t].cpu() for o, t in at])
    if columns is None:
        return going, torch.stack([exacts[o]._factual[t] for o, t in at]), observed
    tokens = columns[row, step]  # (G, W)
    rows_of: dict[tuple[int, int], list[int]] = {}
    for g, key in enumerate(at):
        rows_of.setdefault(key, []).append(g)
    gathered = torch.empty(tokens.shape, dtype=torch.float64)
    for (o, t), rows in rows_of.items():  # each (string, step) once, at its rows' tokens alone
        mine = torch.tensor(rows)
        gathered[mine] = exacts[o]._factual[t].cpu()[tokens[mine].clamp(min=0)].double()
    gathered = torch.where(tokens >= 0, gathered, -math.inf)
    found = tokens == observed[:, None]
    if not bool(found.any(-1).all()):
        raise AbductionError("chain_log_probs(): `columns` misses an observed token.")
    return going, gathered, found.long().argmax(-1)


def chain_log_probs(
    exacts: Sequence[ExactCounterfactual],
    owners: torch.Tensor,
    logits: torch.Tensor,
    ended: torch.Tensor,
    start: int = 0,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, m, V)`` float64: log q(. | s_<t) at steps ``start .. start + m - 1`` of candidates
    of several strings, row ``b`` a candidate of ``exacts[owners[b]]``, given its
    counterfactual logits ``(B, m, V)`` there and whether it has already ended ``(B, m)``
    (:meth:`ExactCounterfactual.next_token_probs` from the logits). The abducted steps of the
    candidates not yet ended, of every string, take one call of the noise model's law; the
    others the prior (an ended candidate only pads).

    With ``columns`` ``(B, m, W)``, token ids (``-1`` pads a row), the logits ``(B, m, W)`` are
    those of these tokens alone and so is the result: for a noise model with
    :attr:`~pyro_lmscm.models.NoiseModel.compact_support`, whose law needs only the tokens
    possible on either side, where each row of ``columns`` lists, by increasing id, every
    token possible on the counterfactual side or (at an abducted step) the factual one, the
    pad token after the candidate's end and the token of a ``do(w_t = x)``; the others have
    probability zero. :func:`most_probable` runs its steps so under top-k or top-p decoding."""
    scm = exacts[0].scm
    steps = range(start, start + logits.shape[1])
    owners = owners.cpu()
    going, factual, observed = _posterior_steps(exacts, owners, ended, steps, columns)
    prior = ~going  # past the observation (or its end): the prior noise
    log_q = logits.log_softmax(-1) if bool(prior.all()) else torch.empty_like(logits)
    if bool(going.any()):
        if bool(prior.any()):
            log_q[prior] = logits[prior].log_softmax(-1)
        log_q[going] = scm.noise.counterfactual_log_probs(factual, logits[going], observed)

    certain = _certain_tokens(exacts, owners, ended, steps)  # the pad token, or the token of do(w_t = x)
    fixed = certain >= 0
    if bool(fixed.any()):
        if columns is None:
            mass = torch.full_like(log_q, -math.inf).scatter_(-1, certain.clamp(min=0)[..., None], 0.0)
        else:
            mass = torch.where(columns == certain[..., None], 0.0, -math.inf).to(log_q.dtype)
        log_q = torch.where(fixed[..., None], mass, log_q)
    return log_q


def chain_token_log_probs(
    exacts: Sequence[ExactCounterfactual],
    owners: torch.Tensor,
    logits: torch.Tensor,
    ended: torch.Tensor,
    tokens: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """``(B, m)`` float64: log q(tokens | s_<t) at steps ``start .. start + m - 1`` of
    candidates of several strings, row ``b`` a candidate of ``exacts[owners[b]]``, given its
    counterfactual logits ``(B, m, V)`` there and whether it has already ended ``(B, m)``
    (:meth:`ExactCounterfactual.token_log_probs` from the logits, without holding the law over
    V). The abducted steps of the candidates not yet ended, of every string, take one call of
    the noise model's closed form; the others the prior (an ended candidate only pads)."""
    scm = exacts[0].scm
    steps = range(start, start + tokens.shape[1])
    owners = owners.cpu()
    going, factual, observed = _posterior_steps(exacts, owners, ended, steps)
    if not bool(going.any()):
        log_q = gathered_log_probs(logits, tokens)
    else:
        log_q = torch.zeros(tokens.shape, dtype=logits.dtype)
        prior = ~going  # past the observation (or its end): the prior noise
        if bool(prior.any()):
            log_q[prior] = gathered_log_probs(logits[prior], tokens[prior])
        log_q[going] = scm.noise.counterfactual_token_log_probs(factual, logits[going], observed, tokens[going])
    certain = _certain_tokens(exacts, owners, ended, steps)  # the pad token, or the token of do(w_t = x)
    mass = torch.where(tokens == certain, 0.0, -math.inf).to(log_q.dtype)
    return torch.where(certain >= 0, mass, log_q)


def _shared(exacts: Sequence[ExactCounterfactual], owner: str) -> tuple[LanguageModelSCM, int]:
    """The SCM and the mechanism index that every one of ``exacts`` shares.

    :raises InferenceError: for an empty list, or strings of other SCMs or mechanisms.
    """
    if not exacts:
        raise InferenceError(f"{owner}() needs at least one ExactCounterfactual.")
    scm, mechanism = exacts[0].scm, exacts[0]._mechanism
    if any(e.scm is not scm or e._mechanism != mechanism for e in exacts):
        raise InferenceError(f"{owner}(): every ExactCounterfactual must share the SCM and the mechanism.")
    return scm, mechanism


def _intervened_pass(
    scm: LanguageModelSCM, mechanism: int, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, int]:
    """The raw logits of mechanism ``mechanism`` (0: the factual one) on strings
    ``(prompt (L,), ids (m,))``, each after its prompt: one teacher-forced pass, left-padded, of
    the last ``keep`` steps (``keep``: the longest ``m``); row ``i``'s steps are ``[keep - m_i:]``."""
    inputs = left_pad([torch.cat([prompt.cpu(), ids.cpu()[:-1]]) for prompt, ids in pairs])
    keep = max(ids.shape[-1] for _, ids in pairs)
    with scm.mechanisms[mechanism].activate(scm.lm) as f:
        return f.logits(inputs.to(scm.lm.device), logits_to_keep=keep), keep


@locked
@torch.no_grad()
def observed_token_log_probs(exacts: Sequence[ExactCounterfactual], batch_size: int = 16) -> list[torch.Tensor]:
    """:meth:`ExactCounterfactual.observed_token_log_probs` of many strings, the intervened
    mechanism run teacher-forced on ``batch_size`` observations at a time (left-padded)
    instead of one pass each. The strings must share the SCM and the mechanism.

    :raises InferenceError: for strings of other SCMs or mechanisms.
    """
    return [exact._observed_log_q(logits=logits) for exact, logits in _observed_logits(exacts, batch_size)]


@locked
@torch.no_grad()
def observed_log_probs(
    exacts: Sequence[ExactCounterfactual], batch_size: int = 16
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per string, three ``(n,)`` float64 tensors over its observation, from the passes of
    :func:`observed_token_log_probs`: the log-probabilities of keeping each observed token,
    and the observation's per-token log-probabilities under the factual mechanism (on the
    abduction's logits) and under the intervened one, as the scorer
    (:func:`~pyro_lmscm.inference.token_log_probs`) defines them.

    :raises InferenceError: for strings of other SCMs or mechanisms.
    """
    return [
        (
            exact._observed_log_q(logits=logits),
            exact._observed_scores(exact._factual[None], {}),
            exact._observed_scores(logits, exact._forced),
        )
        for exact, logits in _observed_logits(exacts, batch_size)
    ]


@locked
@torch.no_grad()
def observed_bounds(
    exacts: Sequence[ExactCounterfactual], batch_size: int = 16
) -> list[tuple[CounterfactualBounds, torch.Tensor, torch.Tensor]]:
    """Per string, :meth:`ExactCounterfactual.bounds` (whose ``log_keep["model"]`` is
    :meth:`~ExactCounterfactual.observed_token_log_probs`) and the observation's per-token
    log-probabilities under the factual and the intervened mechanism, as
    :func:`observed_log_probs` gives them: all from the same teacher-forced passes of
    ``batch_size`` observations at a time (a study's exact metrics and bounds in one pass).

    :raises InferenceError: for strings of other SCMs or mechanisms.
    """
    return [
        (exact._bounds(logits), exact._observed_scores(exact._factual[None], {}),
         exact._observed_scores(logits, exact._forced))
        for exact, logits in _observed_logits(exacts, batch_size)
    ]


def _observed_logits(
    exacts: Sequence[ExactCounterfactual], batch_size: int
) -> Iterator[tuple[ExactCounterfactual, torch.Tensor]]:
    """Each of ``exacts`` with the decoded intervened logits on its observation ``(1, n, V)``,
    from teacher-forced passes of ``batch_size`` observations at a time (left-padded)."""
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    if not exacts:
        return
    scm, mechanism = _shared(exacts, "observed_token_log_probs")
    for start in range(0, len(exacts), batch_size):
        chunk = exacts[start : start + batch_size]
        raw, keep = _intervened_pass(scm, mechanism, [(e._prompt, e.observed_ids) for e in chunk])
        for row, exact in zip(raw, chunk):
            n = exact.observed_ids.shape[-1]
            yield exact, exact._decoded(exact.observed_ids.to(row.device)[None], row[keep - n :][None]).cpu()


@locked
@torch.no_grad()
def counterfactual_token_log_probs(
    exacts: Sequence[ExactCounterfactual], candidates: Sequence[torch.Tensor], batch_size: int = 16
) -> list[torch.Tensor]:
    """:meth:`ExactCounterfactual.token_log_probs` of candidate strings of many exact
    counterfactuals, ``candidates[i]`` (``(B_i, m_i)`` or ``(m_i,)``) those of ``exacts[i]``:
    the intervened mechanism runs teacher-forced on ``batch_size`` candidates at a time, across
    strings (left-padded), instead of one pass per string. The strings must share the SCM and
    the mechanism.

    :returns: per string ``(B_i, m_i)`` float64.
    :raises ObservationError: for malformed candidates.
    :raises InferenceError: for strings of other SCMs or mechanisms, or not one candidate
        tensor per string.
    """
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    if len(candidates) != len(exacts):
        raise InferenceError(
            f"counterfactual_token_log_probs(): one candidate tensor per string, got {len(candidates)} "
            f"for {len(exacts)} strings."
        )
    if not exacts:
        return []
    scm, mechanism = _shared(exacts, "counterfactual_token_log_probs")
    checked = [exact._check(c) for exact, c in zip(exacts, candidates)]
    flat = [(i, row) for i, c in enumerate(checked) for row in range(c.shape[0])]
    out: list[list[torch.Tensor]] = [[] for _ in exacts]
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        raw, keep = _intervened_pass(scm, mechanism, [(exacts[i]._prompt, checked[i][row]) for i, row in chunk])
        for i in dict.fromkeys(i for i, _ in chunk):  # the rows of each string in this chunk, together
            taken = [j for j, (owner, _) in enumerate(chunk) if owner == i]
            rows = checked[i][[chunk[j][1] for j in taken]]
            out[i].append(exacts[i]._candidate_log_q(rows, raw[taken, keep - rows.shape[-1] :]))
    return [torch.cat(parts) for parts in out]


#: A beam search step runs on the tokens possible at the step alone (:func:`most_probable`)
#: when no beam has more than this share of the vocabulary possible on either side: top-k or
#: top-p decoding (50 or 100 of 49,152 tokens), as the closed form compacts its rows.
BEAM_COMPACT_SHARE = 0.25


def _beam_step_log_probs(
    exacts: Sequence[ExactCounterfactual],
    live: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]],
    raw: torch.Tensor,
    t: int,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The chain at step ``t`` of the beams of the strings ``live`` (per string: its index in
    ``exacts``, its first row in ``raw``, its beams ``(r, t + 1)`` (the last column a
    placeholder) and whether each has ended ``(r,)``), given the raw intervened logits of
    every row ``raw`` ``(R, V)``: per string ``(columns, log q)``. Under top-k or top-p
    decoding (no row with more than :data:`BEAM_COMPACT_SHARE` of the vocabulary possible)
    and a noise model with ``compact_support``, the beams of every string take one
    :func:`chain_log_probs` on the tokens possible at their step alone
    (:func:`_beam_supports`): ``columns`` ``(r, W)`` those tokens (``-1`` pads), ``log q``
    ``(r, W)`` (SmolLM2, top-k 50, 64 strings of 4 beams: 0.50 -> 0.40 s per string of an
    exact-only study); else each string one call over the vocabulary: ``(None, (r, V))``,
    which on a few rows stays in the CPU's cache (the whole vocabulary of all strings in one
    call measured 1.6x slower)."""
    scm = exacts[0].scm
    supports, decoded = _beam_supports(exacts, live, raw, t) if scm.noise.compact_support else (None, None)
    if supports is not None:
        columns = [c for c, _ in supports]
        owners = torch.cat([torch.full((c.shape[0],), n) for n, c in enumerate(columns)])
        ended = torch.cat([ended for *_, ended in live])
        law = chain_log_probs(
            [exacts[i] for i, *_ in live], owners, torch.cat([v for _, v in supports])[:, None], ended[:, None], t,
            torch.cat(columns)[:, None],
        )[:, 0]
        return list(zip(columns, law.split([c.shape[0] for c in columns])))
    if decoded is None:
        decoded = [_beam_logits(exacts[i], raw, first, beams, t) for i, first, beams, _ in live]
    return [(None, exacts[i]._step_log_probs(t, rows, ended)) for (i, _, _, ended), rows in zip(live, decoded)]


def _beam_logits(
    exact: ExactCounterfactual, raw: torch.Tensor, first: int, beams: torch.Tensor, t: int
) -> torch.Tensor:
    """The decoded logits ``(r, V)`` (float64, on the CPU) of one string's beams ``(r, t + 1)``
    at step ``t``, from the raw logits of all rows ``raw`` and the string's first row."""
    return exact._decoded(beams, raw[first : first + beams.shape[0], None], start=t).cpu()[:, 0]


def _beam_supports(
    exacts: Sequence[ExactCounterfactual], live: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]],
    raw: torch.Tensor, t: int,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, list[torch.Tensor] | None]:
    """Per string of ``live`` (as :func:`_beam_step_log_probs`): the tokens possible at step
    ``t`` on either side ``(r, W)`` (by increasing id, ``-1`` pads; as
    :func:`~pyro_lmscm.models.gumbel_max_counterfactual.possible_columns`), the decoded
    counterfactual logits there ``(r, W)`` (float64, ``-inf`` where only the factual side
    has it); ``None`` where a row has more than :data:`BEAM_COMPACT_SHARE` of the vocabulary
    possible, with each string's decoded rows ``(r, V)`` if they were made. A beam's tokens:
    its counterfactual support, the factual support at an abducted step, the token of a
    ``do(w_t = x)``; an ended beam the pad token alone (its logits are those of no prefix: 0
    there). Where every string's :meth:`~ExactCounterfactual._decoded` is the decoding alone
    at ``t`` and :meth:`~pyro_lmscm.models.Decoding.support` holds (top-k), the
    counterfactual side comes from its few columns, with no row of V decoded logits (cProfile
    of 64 SmolLM2 strings, 4 beams: 2.3 s for the steps' decoded rows and supports before,
    1.0 s after); else from each string's decoded rows."""
    from ..models.gumbel_max_counterfactual import possible_columns

    scm = exacts[0].scm
    vocab, pad = scm.vocab_size, scm.lm.pad_token_id
    ended = torch.cat([ended for *_, ended in live])
    rows = torch.cat([torch.arange(first, first + beams.shape[0]) for _, first, beams, _ in live])
    side = None  # the counterfactual side of every row: (ids, decoded logits) (R, K), -1 / -inf pad
    if all(exacts[i]._decodes_alone(t) for i, *_ in live):
        going = rows[~ended]
        support = scm.decoding.support(raw if going.numel() == raw.shape[0] else raw[going.to(raw.device)])
        if support is not None:
            ids = torch.full((rows.numel(), support[0].shape[-1]), -1, dtype=torch.long)
            values = torch.full(ids.shape, -math.inf, dtype=torch.float64)
            ids[~ended], values[~ended] = support[0].cpu(), support[1].cpu().double()
            side = (torch.where(values > -math.inf, ids, -1), values)
    decoded = None
    if side is None:
        decoded = [_beam_logits(exacts[i], raw, first, beams, t) for i, first, beams, _ in live]
        every = torch.cat(decoded)
        possible = (every > -math.inf) & ~ended[:, None]
        width = int(possible.sum(-1).max())
        if width > BEAM_COMPACT_SHARE * vocab:
            return None, decoded
        ids = possible_columns(possible, width)
        side = (ids, torch.where(ids >= 0, every.gather(-1, ids.clamp(min=0)), -math.inf))
    # the other tokens of each row: the factual support (abducted), the pad (ended), the forced token
    counts = [beams.shape[0] for _, _, beams, _ in live]
    owner = torch.repeat_interleave(torch.arange(len(live)), torch.tensor(counts))
    abducted = [n for n, (i, *_) in enumerate(live) if exacts[i]._abducted(t)]
    factual = torch.full((len(live), 0), -1, dtype=torch.long)
    if abducted:
        possible = torch.stack([exacts[live[n][0]]._factual[t] for n in abducted]).cpu() > -math.inf
        factual = torch.full((len(live), int(possible.sum(-1).max())), -1, dtype=torch.long)
        factual[abducted] = possible_columns(possible, factual.shape[-1])
    forced = torch.tensor([exacts[i]._forced.get(t, -1) for i, *_ in live])
    extra_ids = torch.cat(
        [torch.where(ended[:, None], -1, factual[owner]), torch.where(ended, pad, -1)[:, None], forced[owner, None]], -1
    )
    key = torch.cat([side[0], extra_ids], -1)
    key = torch.where(key >= 0, key, vocab).sort(-1).values
    key[:, 1:][key[:, 1:] == key[:, :-1]] = vocab  # each token once
    key = key.sort(-1).values
    width = int((key < vocab).sum(-1).max())
    if width > BEAM_COMPACT_SHARE * vocab:
        return None, decoded
    key = key[:, :width].contiguous()
    columns = torch.where(key < vocab, key, -1)
    ids, values = side
    found = ids >= 0  # each in its row of `key`; the others to a spare column
    place = torch.where(found, torch.searchsorted(key, ids.clamp(min=0)), width)
    logits = torch.full((columns.shape[0], width + 1), -math.inf, dtype=torch.float64)
    logits = logits.scatter_(-1, place, torch.where(found, values, -math.inf))[:, :width]
    logits[ended] = torch.where(columns[ended] >= 0, 0.0, -math.inf).double()
    return list(zip(columns.split(counts), logits.split(counts))), decoded


@locked
@torch.no_grad()
def most_probable(
    exacts: Sequence[ExactCounterfactual], num_beams: int = 4, lengths: Sequence[int] | None = None
) -> list[tuple[torch.Tensor, float]]:
    r"""The most probable counterfactual string ``(T,)`` of each exact counterfactual and its
    log-probability, by one beam search of ``num_beams`` beams per string over all of them.

    The beams of every string decode together in one KV-cached run of the intervened
    mechanism (:class:`~pyro_lmscm.models.incremental.MechanismBatch`, the prompts
    left-padded), reordered after each step as the beams are chosen; each step scores the
    beams of a string with its own chain :math:`q(s_t \mid s_{<t})`. The strings must share
    the SCM and the mechanism. A beam's log-probability sums the chain over the logits of the
    cached run, which round like a teacher-forced pass only up to float rounding.

    The mode of a long string can be degenerate (a repetition loop, see
    :meth:`ExactCounterfactual.mode`); :func:`top_k_counterfactuals` gives the ``k`` most
    probable strings over a horizon.

    :param lengths: per string, the number of leading tokens whose most probable value is
        sought (default ``T``): the mode of the marginal of the first ``lengths[i]`` tokens,
        e.g. over the horizon of an observation without an end of sequence.
    :returns: per string ``(ids (lengths[i],), log-probability)``.
    :raises InferenceError: for an empty list, or strings of other SCMs or mechanisms.
    """
    return [(ids[0], float(scores[0])) for ids, scores in _beam_search(exacts, num_beams, lengths, "most_probable")]


@locked
@torch.no_grad()
def top_k_counterfactuals(
    exacts: Sequence[ExactCounterfactual],
    k: int,
    num_beams: int | None = None,
    lengths: Sequence[int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    r"""The ``k`` most probable counterfactual strings of each exact counterfactual over its
    first ``lengths[i]`` tokens (a horizon), by the beam search of :func:`most_probable`: the
    ``k`` best of its final beams. Each is a lower bound of the true ``k``-th most probable
    string's log-probability (exact for ``num_beams >= V^{horizon}``).

    The mode of a long string can be degenerate: the most probable string of a language model
    over many tokens is often a repetition loop, far from every typical draw (the probability
    of one string is not its typicality). The few most probable strings over a horizon of a
    few tokens show where the probability mass goes;
    :meth:`ExactCounterfactual.sample` gives typical strings.

    :param k: how many strings per exact counterfactual, ``1 <= k <= num_beams``.
    :param num_beams: the beams kept at each step (default ``max(k, 4)``).
    :param lengths: per string, the horizon (default ``T``).
    :returns: per string ``(ids (k', lengths[i]), log-probabilities (k',) float64)`` by
        decreasing probability, ``k' <= k`` where fewer strings are possible.
    :raises InferenceError: for ``num_beams < k``, an empty list, strings of other SCMs or
        mechanisms, or bad ``lengths``.

    >>> from pyro_lmscm.inference import top_k_counterfactuals
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3)
    >>> exact = exact_counterfactual(scm, torch.tensor([2, 3]), torch.tensor([7, 3, 9]), {})
    >>> [(ids.tolist(), log_p.exp().tolist()) for ids, log_p in top_k_counterfactuals([exact], k=2)]
    [([[7, 3, 9]], [1.0])]
    """
    k = as_int(k, "k", minimum=1)
    num_beams = max(k, 4) if num_beams is None else as_int(num_beams, "num_beams", minimum=1)
    if num_beams < k:
        raise InferenceError(f"top_k_counterfactuals(): num_beams={num_beams} keeps fewer than k={k} strings.")
    return [(ids[:k], scores[:k]) for ids, scores in _beam_search(exacts, num_beams, lengths, "top_k_counterfactuals")]


def _beam_search(
    exacts: Sequence[ExactCounterfactual], num_beams: int, lengths: Sequence[int] | None, owner: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The beam search of :func:`most_probable`: per string its final beams ``(B, lengths[i])``
    and their log-probabilities ``(B,)`` (float64), by decreasing log-probability."""
    num_beams = as_int(num_beams, "num_beams", minimum=1)
    scm, mechanism = _shared(exacts, owner)
    T = scm.max_new_tokens
    steps = [T] * len(exacts) if lengths is None else [as_int(n, "lengths", minimum=1) for n in lengths]
    if len(steps) != len(exacts) or max(steps) > T:
        raise InferenceError(f"{owner}(): `lengths` needs one length in 1..{T} per string, got {lengths!r}.")
    device = scm.lm.device
    prompts = left_pad([e._prompt.cpu() for e in exacts]).to(device)
    batch = MechanismBatch(scm.lm, scm.mechanisms, prompts, torch.tensor(mechanism, device=device), max(steps) - 1)
    S = len(exacts)
    beams = [torch.zeros(1, 0, dtype=torch.long) for _ in exacts]
    scores = [torch.zeros(1, dtype=torch.float64) for _ in exacts]
    for t in range(max(steps)):
        report_progress("beam search (tokens)", 1, max(steps))
        raw = batch.logits().reshape(-1, scm.vocab_size)
        parents: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * S
        tokens: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * S
        live: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (string, first row, beams, ended)
        start = 0
        for i, exact in enumerate(exacts):
            rows = beams[i].shape[0]
            if t >= steps[i]:  # this string is done: its rows idle until the others are
                parents[i] = torch.arange(start, start + rows)
                tokens[i] = torch.full((rows,), scm.lm.pad_token_id)
            else:
                padded = torch.cat([beams[i], beams[i].new_zeros(rows, 1)], -1)
                live.append((i, start, padded, exact._ended_before(padded)[:, t]))
            start += rows
        for (i, first, _, _), (columns, log_q) in zip(live, _beam_step_log_probs(exacts, live, raw, t)):
            total = (scores[i][:, None] + log_q).reshape(-1)
            best = total.topk(min(num_beams, int(torch.isfinite(total).sum())), sorted=True)
            parent = best.indices // log_q.shape[-1]
            token = best.indices % log_q.shape[-1] if columns is None else columns.reshape(-1)[best.indices]
            beams[i], scores[i] = torch.cat([beams[i][parent], token[:, None]], -1), best.values
            parents[i], tokens[i] = parent + first, token
        if t + 1 < max(steps):
            batch.select(torch.cat(parents))
            done = torch.cat([scm.is_end(b).any(-1) | (t + 1 >= n) for b, n in zip(beams, steps)])
            active = ~done
            if bool(active.any()):
                batch.advance(torch.cat(tokens).to(device), active.to(device))
    return list(zip(beams, scores))


@locked
def exact_counterfactual(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    observed: torch.Tensor,
    intervention: Intervention | None = None,
    raw_logits: torch.Tensor | None = None,
) -> ExactCounterfactual:
    r"""The exact counterfactual distribution of ``observed`` under ``intervention``.

    :param scm: the SCM.
    :param prompt: prompt ids ``(L,)``.
    :param observed: the observed continuation ``(n,)``.
    :param intervention: as :func:`~pyro_lmscm.counterfactual`.
    :param raw_logits: the raw factual logits ``(n, V)`` of the observed steps, if known
        (those that sampled the string, :attr:`CounterfactualResult.factual_logits`);
        by default one teacher-forced pass computes them. In bfloat16 a teacher-forced pass
        rounds otherwise than the sampling run, and under top-k can rank the sampled token
        outside the k.
    :raises ObservationError, AbductionError, InterventionError: on bad input.
    :raises InferenceError: for an ``scm`` that is no :class:`~pyro_lmscm.LanguageModelSCM`.

    >>> from pyro_lmscm.inference import exact_counterfactual
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3)
    >>> exact = exact_counterfactual(scm, torch.tensor([2, 3]), torch.tensor([7, 3, 9]), {})
    >>> exact.prob_unchanged()
    1.0
    """
    scm = as_scm(scm, "exact_counterfactual()")
    prompt = scm.check_prompt(prompt, single=True)
    observed = scm.check_observed(observed, single=True)
    return ExactCounterfactual(scm, prompt, observed, as_do_data(scm, intervention, observed), raw_logits=raw_logits)
