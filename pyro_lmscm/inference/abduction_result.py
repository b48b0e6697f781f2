"""``AbductionResult``: the noise draws of one abduction, with their weights, diagnostics
and the counterfactual and interventional distributions they give."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InferenceError
from ..interventions.ops import as_do_data, intervene
from ..models.sites import noise_site
from ..seeding import seeded
from ..validation import as_int, has_integer_dtype
from .distribution import CounterfactualDistribution
from .prediction import noise_handler, predict
from .statistics import consistent_draws, kish_ess, log_prior, noise_statistics

if TYPE_CHECKING:
    from ..interventions.ops import Intervention
    from ..models.anchor import FactualAnchor
    from ..models.scm import LanguageModelSCM

__all__ = ["AbductionResult"]


@dataclass
class AbductionResult:
    r"""Posterior noise draws of one abduction method, and what follows from them.

    :ivar method: the method's label.
    :ivar prompt_ids: ``(L,)``.
    :ivar observed_ids: ``(n,)``.
    :ivar noise: ``{"u_t": (N, V)}`` for every step :math:`t < T` (prior beyond the
        observation); in the model the sites are ``scm.site("u_t")``.
    :ivar log_weights: the method's own log importance weights ``(N,)``, ``None`` for
        unweighted draws.
    :ivar log_proposal: ``(N,)`` log density (up to a constant) of the draws' noise at the
        observed steps under the distribution the method samples from (for NUTS: the
        unnormalised relaxed posterior).
    :ivar logits: the decoded factual logits of the observed steps, ``(n_a, V)``.
    :ivar wall_time_s: seconds the abduction took (teacher-forced pass included).
    :ivar diagnostics: method-specific, e.g. ``"elbo_loss"`` per SVI step.
    :ivar num_chains: the draws are this many consecutive chains.
    :ivar autocorrelated: the draws are MCMC chains, in order.
    :ivar anchor: the factual logits of the abduction, whose handler scope every replay
        enters (see :mod:`pyro_lmscm.models.anchor`).
    """

    scm: LanguageModelSCM = field(repr=False)
    method: str
    prompt_ids: torch.Tensor
    observed_ids: torch.Tensor
    noise: dict[str, torch.Tensor] = field(repr=False)
    log_weights: torch.Tensor | None = field(repr=False)
    log_proposal: torch.Tensor = field(repr=False)
    logits: torch.Tensor = field(repr=False)
    wall_time_s: float
    diagnostics: dict[str, Any] = field(default_factory=dict, repr=False)
    num_chains: int = 1
    autocorrelated: bool = False
    anchor: FactualAnchor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._replays: dict[str, torch.Tensor] = {}

    @property
    def num_samples(self) -> int:
        return self.noise[noise_site(0)].shape[0]

    @property
    def num_active(self) -> int:
        """:math:`n_a`: observed steps up to and including the first end of sequence."""
        return self.logits.shape[0]

    @cached_property
    def consistent(self) -> torch.Tensor:
        """Bool ``(N,)``: the draw's argmax at every observed step is the observed token
        (checked on the teacher-forced logits, without replaying the model)."""
        return consistent_draws(self.logits, self.observed_ids, self.noise)

    @property
    def log_weights_to_exact(self) -> torch.Tensor:
        r"""Log importance weights of the draws against the exact posterior,
        :math:`\log p(u) + \log \mathbb{1}[\text{consistent}] - \log q(u)` (float64, up to a
        constant): constant for exact draws, the indicator for prior draws."""
        log_w = log_prior(self.noise, self.num_active).double().cpu() - self.log_proposal.double().cpu()
        return torch.where(self.consistent, log_w, float("-inf"))

    @property
    def ess(self) -> float:
        """Kish's effective sample size of the method's own weights (``N`` if unweighted)."""
        return kish_ess(self.log_weights, self.num_samples)

    @property
    def exact_ess(self) -> float:
        """Kish's effective sample size of :attr:`log_weights_to_exact`: how many exact
        posterior draws the method's draws are worth after reweighting (``N`` for exact
        draws, the number of consistent draws for prior ones)."""
        return kish_ess(self.log_weights_to_exact)

    def noise_statistics(self) -> dict[str, torch.Tensor]:
        """See :func:`noise_statistics`."""
        return noise_statistics(self.logits, self.observed_ids, self.noise)

    def replay(
        self, intervention: Intervention | None = None, rows: torch.Tensor | None = None, batch_size: int = 256
    ) -> torch.Tensor:
        """Prediction: run the (intervened) SCM on the noise draws.

        :param intervention: as :func:`~pyro_lmscm.counterfactual`; ``None`` replays the
            factual model.
        :param rows: replay only these draws (indices); default all.
        :param batch_size: draws per batched model run.
        :returns: ids ``(N, T)``, or ``(len(rows), T)``.
        :raises InferenceError: for ``rows`` that are no indices of draws or a bad ``batch_size``.
        """
        batch_size = as_int(batch_size, "batch_size", minimum=1)
        data = as_do_data(self.scm, intervention, self.observed_ids)
        if rows is None:
            rows = torch.arange(self.num_samples)
        else:
            try:
                rows = torch.as_tensor(rows).cpu()
            except (TypeError, ValueError, RuntimeError) as failure:
                raise InferenceError(f"`rows` must be indices of draws, got {rows!r:.80} ({failure}).") from None
            if rows.dim() != 1 or not has_integer_dtype(rows) or bool(((rows < 0) | (rows >= self.num_samples)).any()):
                raise InferenceError(
                    f"`rows` must be a 1-d tensor of indices in [0, {self.num_samples}), got {rows.tolist()!r:.80}."
                )
            rows = rows.long()
        key = repr((sorted((k, v.tolist()) for k, v in data.items()), rows.tolist()))
        if key not in self._replays:
            intervened = intervene(self.scm, data)
            out = []
            for chunk in rows.split(batch_size):
                noise = torch.stack([self.noise[noise_site(t)][chunk.to(self.noise[noise_site(t)].device)]
                                     for t in range(self.scm.max_new_tokens)], dim=-2)
                out.append(predict(self.scm, intervened, self.prompt_ids, len(chunk),
                                   lambda start, stop: noise_handler(self.scm, noise[start:stop]), anchor=self.anchor))
            self._replays[key] = torch.cat(out)
        return self._replays[key]

    @property
    def reproduces(self) -> torch.Tensor:
        """Bool ``(N,)``: the factual replay gives back the observed string.

        The replay evaluates the factual model on the abducted path with the logits of the
        abduction (:attr:`anchor`), so this equals :attr:`consistent`; here it is computed
        by running the model."""
        n = self.observed_ids.shape[-1]
        return (self.replay()[:, :n] == self.observed_ids).all(-1).cpu()

    @property
    def reproduction_rate(self) -> float:
        """Fraction of draws whose factual replay gives back the observed string."""
        return float(self.reproduces.double().mean())

    def counterfactual(self, intervention: Intervention | None = None) -> CounterfactualDistribution:
        """The counterfactual distribution: replay the intervened model on these draws, with
        the method's weights if any (draws of weight zero are left out: they change nothing).

        :raises InferenceError: if every draw has weight zero.
        """
        rows = None
        log_weights = self.log_weights
        if log_weights is not None:
            rows = torch.nonzero(torch.isfinite(log_weights)).flatten()
            if len(rows) == 0:
                raise InferenceError(
                    f"{self.method}: none of the {self.num_samples} draws reproduces the observation "
                    "(every weight is zero). Draw more samples or use method='exact'."
                )
            log_weights = log_weights[rows]
        stats = self.noise_statistics()
        if rows is not None:
            stats = {name: value[rows] for name, value in stats.items()}
        return CounterfactualDistribution(
            self.scm,
            self.prompt_ids,
            self.observed_ids,
            self.replay(intervention, rows),
            intervention=as_do_data(self.scm, intervention, self.observed_ids),
            kind="counterfactual",
            log_weights=log_weights,
            noise_stats=stats,
            num_chains=self.num_chains if rows is None else 1,
            autocorrelated=self.autocorrelated and rows is None,
            method=self.method,
        )

    def interventional(
        self, intervention: Intervention | None = None, num_samples: int | None = None, seed: int | None = None
    ) -> CounterfactualDistribution:
        """The interventional baseline: the intervened model on fresh prior noise."""
        num_samples = self.num_samples if num_samples is None else num_samples
        as_int(num_samples, "num_samples", minimum=1)
        data = as_do_data(self.scm, intervention, self.observed_ids)
        intervened = intervene(self.scm, data)
        with seeded(seed):  # the model's own prior noise
            ids = predict(self.scm, intervened, self.prompt_ids, num_samples, lambda start, stop: nullcontext(),
                          anchor=self.anchor)
        return CounterfactualDistribution(
            self.scm,
            self.prompt_ids,
            self.observed_ids,
            ids,
            intervention=data,
            kind="interventional",
            method="prior",
        )

    def to_arviz(self, intervention: Intervention | None = None, **kwargs: Any) -> Any:
        """ArviZ export of :meth:`counterfactual` (see :func:`pyro_lmscm.inference.arviz.to_inference_data`)."""
        return self.counterfactual(intervention).to_arviz(**kwargs)
