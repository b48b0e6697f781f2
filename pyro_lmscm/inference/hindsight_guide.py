r"""Exact abduction: a guide that samples the Gumbel noise from its posterior."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import TorchDistribution

from ..errors import AbductionError, InferenceError, ObservationError
from ..models.anchor import FactualAnchor
from ..models.decoding import check_logits
from ..models.factual_anchor_messenger import FactualAnchorMessenger
from ..models.sites import noise_site, parse_step_site
from ..validation import as_real
from .scoring import gathered_log_probs

if TYPE_CHECKING:
    from ..models.scm import LanguageModelSCM

__all__ = ["HindsightGumbelGuide", "noise_trace"]

def _observed_ids(observations: torch.Tensor | Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Observed ids ``(..., n)`` from a tensor or a ``{"w_t": ...}`` data dict."""
    if not isinstance(observations, Mapping):
        return torch.as_tensor(observations)
    steps: dict[int, torch.Tensor] = {}
    for name, value in observations.items():
        parsed = parse_step_site(name[len(prefix):]) if name.startswith(prefix) else None
        if parsed is None or parsed[0] != "w":
            raise ObservationError(f"observation site {name!r} is not a token site 'w_<t>'.")
        steps[parsed[1]] = torch.as_tensor(value)
    if not steps or sorted(steps) != list(range(len(steps))):
        raise ObservationError(
            f"observed token sites must be w_0..w_(n-1) with none missing, got {sorted(steps)}."
        )
    return torch.stack(torch.broadcast_tensors(*(steps[t] for t in range(len(steps)))), dim=-1)


def noise_trace(scm: LanguageModelSCM, noise: torch.Tensor) -> poutine.Trace:
    r"""A trace holding noise values for ``poutine.replay``: site ``u_t`` (with the SCM's
    name prefix) gets ``noise[..., t, :]``.

    :param noise: ``(..., T) + event`` (``(..., T, V)`` for Gumbel-max), e.g.
        :meth:`HindsightGumbelGuide.sample_noise`; replay it under a plate whose size is its
        leading dimension.
    :raises InferenceError: if the shape does not match ``scm.max_new_tokens`` and the vocabulary.
    """
    event = tuple(scm.noise.event_shape(scm.vocab_size))
    step_dim = -1 - len(event)
    if noise.dim() < 1 + len(event) or tuple(noise.shape[step_dim:]) != (scm.max_new_tokens, *event):
        raise InferenceError(
            f"`noise` must have shape (..., {', '.join(map(str, (scm.max_new_tokens, *event)))}) "
            f"(max_new_tokens, then one step's noise of {scm.noise!r}), got {tuple(noise.shape)}."
        )
    trace = poutine.Trace()
    for t in range(scm.max_new_tokens):
        name = scm.site(noise_site(t))
        value = noise.select(step_dim, t)
        trace.add_node(name, name=name, type="sample", is_observed=False, value=value, infer={})
    return trace


class HindsightGumbelGuide:
    r"""A guide that samples every :math:`u_t` of a
    :class:`~pyro_lmscm.models.LanguageModelSCM` from its exact posterior given an
    observed continuation :math:`w^{\text{obs}}_{0:n}` of the prompt.

    One teacher-forced forward pass of the factual mechanism gives the decoded logits
    :math:`\ell_t = g(f_0(\text{prompt}, w^{\text{obs}}_{<t}))`. Given the observation the
    :math:`u_t` are independent across steps, each distributed as
    :class:`~pyro_lmscm.inference.GumbelMaxPosterior` ``(ℓ_t, w^obs_t)``; steps
    :math:`t \geq n` (and steps after an observed end of sequence) get the prior. Hence

    .. math::

        \log q(u) = \log p(u) - \sum_{t < n} \log \mathrm{softmax}(\ell'_t)_{w^{\text{obs}}_t},

    so importance weights :math:`p(w^{\text{obs}}, u) / q(u)` are constant and equal
    :math:`p(w^{\text{obs}} \mid \text{prompt})` (with ``margin=0``; for :math:`\delta > 0`
    the probability of winning every step by :math:`\delta`).

    The guide has the model's signature, so it composes with ``poutine.trace``,
    ``poutine.replay``, ``pyro.plate`` (vectorised posterior draws), ``pyro.infer.Importance``
    and ``Trace_ELBO``. To replay its noise through the SCM bit-exactly, replay inside
    :meth:`anchored` (prediction on the logits the noise was drawn for). For prediction
    without ``T`` traced sites, :class:`~pyro_lmscm.inference.PosteriorNoiseMessenger` draws
    each step's posterior when the model reaches it.

    :param scm: the SCM.
    :param observations: observed ids, shape ``(..., n)``, or the dict of
        :meth:`LanguageModelSCM.observations`.
    :param margin: winning margin :math:`\delta \geq 0` in raw logit units (divided by the
        temperature). ``0`` (default) is the exact posterior. A replay inside
        :meth:`anchored` reuses the guide's logits on the observed path, so no margin is
        needed to reproduce the observation; a margin of about the
        rounding gap (1e-4 in float32, 1 in bfloat16) guards replays through another copy
        of the model.
    :param raw_logits: optional raw factual logits ``(..., n, V)`` of the observed steps,
        used instead of the teacher-forced pass: pass the logits that sampled the
        observation (:meth:`LanguageModelSCM.record_logits`), so that a token sampled at the
        edge of a top-k / top-p support is never outside it at abduction.
    :raises ObservationError: on a malformed observation.
    :raises AbductionError: (when called) if an observed token is outside the decoding
        support, i.e. the observation has probability zero.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=5)
    >>> prompt, observed = torch.tensor([1, 2]), torch.tensor([7, 3, 3, 9])
    >>> guide = HindsightGumbelGuide(scm, observed)
    >>> guide_trace = poutine.trace(guide).get_trace(prompt)
    >>> with guide.anchored(prompt):
    ...     replayed = poutine.replay(scm.model, trace=guide_trace)(prompt)
    >>> replayed[:4].tolist()
    [7, 3, 3, 9]
    """

    def __init__(
        self,
        scm: LanguageModelSCM,
        observations: torch.Tensor | Mapping[str, torch.Tensor],
        margin: float = 0.0,
        raw_logits: torch.Tensor | None = None,
    ) -> None:
        self.scm = scm
        if scm.collapsed:
            raise InferenceError(
                "HindsightGumbelGuide needs the SCM's noise sites; build it with collapsed=False "
                "(a collapsed SCM marginalises the noise)."
            )
        self.observed_ids = scm.check_observed(_observed_ids(observations, scm.site("")))
        self.margin = as_real(margin, "margin", minimum=0.0) / float(scm.decoding.temperature)
        self._cache: tuple[torch.Tensor, torch.Tensor, FactualAnchor] | None = None
        n, vocab = self.observed_ids.shape[-1], scm.vocab_size
        if raw_logits is not None and tuple(raw_logits.shape[-2:]) != (n, vocab):
            raise ObservationError(
                f"`raw_logits` must have shape (..., {n}, {vocab}) for {n} observed tokens, "
                f"got {tuple(raw_logits.shape)}."
            )
        self.raw_logits = raw_logits

    def decoded_logits(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        r"""Decoded factual logits :math:`\ell_t` at the observed steps, shape ``(..., n, V)``.

        One teacher-forced forward pass over ``prompt + observed[:-1]`` (or ``raw_logits``
        when given); cached for the last prompt.

        :raises AbductionError: if an observed token has :math:`\ell_{t,k} = -\infty`.
        """
        prompt_ids = self.scm.check_prompt(prompt_ids)
        if self._cache is not None and torch.equal(self._cache[0], prompt_ids):
            return self._cache[1]
        observed = self.observed_ids
        n = observed.shape[-1]
        batch_shape = torch.broadcast_shapes(prompt_ids.shape[:-1], observed.shape[:-1])
        inputs = torch.cat(
            [
                prompt_ids.expand(*batch_shape, prompt_ids.shape[-1]),
                observed.expand(*batch_shape, n)[..., :-1],
            ],
            dim=-1,
        )
        raw = self.raw_logits if self.raw_logits is not None else self.scm.lm.logits(inputs, logits_to_keep=n)
        check_logits(raw, "the factual model on the observed string")
        logits = self.scm.decoding(raw)
        self._check_support(logits, observed.expand(*batch_shape, n))
        self._cache = (prompt_ids, logits, FactualAnchor(prompt_ids, observed, raw))
        return logits

    def anchor(self, prompt_ids: torch.Tensor) -> FactualAnchor:
        """The raw factual logits of the observed steps that the posterior is drawn for."""
        self.decoded_logits(prompt_ids)
        assert self._cache is not None
        return self._cache[2]

    def anchored(self, prompt_ids: torch.Tensor) -> FactualAnchorMessenger:
        """A handler: within it, ``scm.model`` evaluates the factual mechanism on the observed
        path to the logits of this guide (:class:`~pyro_lmscm.models.FactualAnchorMessenger`),
        so that a replay of the guide's noise reproduces the observation exactly, whatever the
        rounding of KV-cached steps. ``counterfactual()`` enters it itself."""
        return self.scm.anchored(self.anchor(prompt_ids))

    def _check_support(self, logits: torch.Tensor, observed: torch.Tensor) -> None:
        observed_logit = logits.gather(-1, observed.unsqueeze(-1)).squeeze(-1)
        impossible = ~torch.isfinite(observed_logit) & self.step_is_active(observed)
        if bool(impossible.any()):
            index = torch.nonzero(impossible)[0].tolist()
            t = index[-1]
            raise AbductionError(
                f"the observed token {int(observed[tuple(index)])} at step {t} (site 'w_{t}') is "
                f"outside the support of {self.scm.decoding!r}: the observation has probability "
                "zero. Widen top_k / top_p or observe another string."
            )

    def step_is_active(self, observed: torch.Tensor) -> torch.Tensor:
        """Steps whose token is still generated (not padding after an end of sequence)."""
        ended = self.scm.finished_after(observed)
        return ~torch.cat([torch.zeros_like(ended[..., :1]), ended[..., :-1]], dim=-1)

    def log_prob_observed(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(w^{\text{obs}} \mid \text{prompt})` under the decoding, shape ``(...)``."""
        logits = self.decoded_logits(prompt_ids)
        observed = self.observed_ids.expand(logits.shape[:-1])
        log_p = gathered_log_probs(logits, observed)
        return torch.where(self.step_is_active(observed), log_p, 0.0).sum(-1)

    @torch.no_grad()
    def sample_noise(
        self, prompt_ids: torch.Tensor, sample_shape: torch.Size | tuple[int, ...] = torch.Size()
    ) -> torch.Tensor:
        r"""Every noise site at once: :math:`u_{0:T}` stacked along dim −2, shape
        ``sample_shape + batch_shape + (T, V)``, where ``batch_shape`` is that of the
        observation (and prompt) and :math:`T` is ``scm.max_new_tokens``.

        The law is that of the guide's sites traced under a plate of ``sample_shape``
        (``poutine.trace(pyro.plate(...)(guide))``): the posterior at the observed steps,
        the prior :math:`\mathrm{Gumbel}(0, 1)^V` after them. It is one vectorised draw and
        no Pyro site, for callers that replay the noise themselves
        (:func:`~pyro_lmscm.counterfactual` does, through :func:`noise_trace`): on a small
        model the :math:`T` traced sites cost more than the forward pass.

        >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=5)
        >>> guide = HindsightGumbelGuide(scm, torch.tensor([7, 3, 3]))
        >>> u = guide.sample_noise(torch.tensor([1, 2]), (4,))
        >>> tuple(u.shape)
        (4, 5, 28)
        >>> from pyro_lmscm.inference import noise_trace
        >>> replayed = poutine.replay(scm.model, trace=noise_trace(scm, u[0]))(torch.tensor([1, 2]))
        >>> replayed[:3].tolist()
        [7, 3, 3]
        """
        posterior = self._joint_posterior(prompt_ids)
        u = posterior.sample(sample_shape)
        event = posterior.event_shape
        step_dim = -1 - len(event)
        rest = self.scm.max_new_tokens - posterior.batch_shape[-1]
        if rest > 0:
            shape = u.shape[: u.dim() + step_dim] + torch.Size([rest]) + event
            u = torch.cat([u, self.scm.noise.sample_prior(shape, u.device).to(u.dtype)], dim=step_dim)
        return u

    def _joint_posterior(self, prompt_ids: torch.Tensor) -> TorchDistribution:
        """The posterior of every observed step at once, batch shape ``(..., n)``."""
        logits = self.decoded_logits(prompt_ids)
        observed = self.observed_ids.expand(logits.shape[:-1])
        return self.scm.noise.posterior(logits, observed, margin=self.margin, active=self.step_is_active(observed))

    def __call__(self, prompt_ids: torch.Tensor) -> None:
        prompt_ids = self.scm.check_prompt(prompt_ids)
        logits = self.decoded_logits(prompt_ids)
        observed = self.observed_ids.expand(logits.shape[:-1])
        active = self.step_is_active(observed)
        noise = self.scm.noise
        prior = noise.prior(self.scm.vocab_size, logits.device)
        for t in range(self.scm.max_new_tokens):
            if t < observed.shape[-1]:
                posterior = noise.posterior(
                    logits[..., t, :], observed[..., t], margin=self.margin, active=active[..., t]
                )
                pyro.sample(self.scm.site(noise_site(t)), posterior)
            else:
                pyro.sample(self.scm.site(noise_site(t)), prior.expand(logits.shape[:-2]))
