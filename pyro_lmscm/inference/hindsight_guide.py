r"""Exact abduction: a guide that samples the Gumbel noise from its posterior."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.guide import GuideMessenger

from ..errors import AbductionError, InferenceError, ObservationError
from ..models.anchor import FactualAnchor
from ..models.decoding import Decoding, check_logits
from ..models.factual_anchor_messenger import FactualAnchorMessenger
from ..models.sites import PROMPT, noise_site, parse_step_site
from ..models.teacher_forcing import decoded_steps
from ..validation import as_real
from .scoring import gathered_log_probs

if TYPE_CHECKING:
    from pyro.distributions import TorchDistribution

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


class _NoisePrior:
    """The exogenous part of an SCM, the model of :class:`HindsightGumbelGuide`: every noise
    site ``u_t`` under its prior, batch shape that of the prompt and the observation. (The
    endogenous sites ``w_t`` are functions of the noise, so a guide of the noise is a guide
    of the whole SCM.)"""

    def __init__(self, scm: LanguageModelSCM, batch_shape: torch.Size) -> None:
        self.scm = scm
        self.batch_shape = batch_shape

    def __call__(self, prompt_ids: torch.Tensor) -> None:
        scm = self.scm
        prompt_ids = scm.check_prompt(prompt_ids)
        batch_shape = torch.broadcast_shapes(prompt_ids.shape[:-1], self.batch_shape)
        prior = scm.noise.prior(scm.vocab_size, scm.lm.device).expand(batch_shape)
        for t in range(scm.max_new_tokens):
            pyro.sample(scm.site(noise_site(t)), prior)

    def __repr__(self) -> str:
        return f"_NoisePrior({self.scm!r}, batch_shape={tuple(self.batch_shape)})"


class HindsightGumbelGuide(GuideMessenger):
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

    It is an effect-based guide, Pyro's :class:`~pyro.poutine.guide.GuideMessenger`: at each
    site ``u_t`` :meth:`get_posterior` gives the posterior for the site's prior, and the site
    draws from it (``msg["fn"]``); other sites keep the model's law. Two ways to use it:

    * ``with guide: scm.model(prompt)`` (any model that runs the SCM, intervened or not):
      each step's posterior is drawn when the model reaches it, for the factual prompt of
      the run (its ``prompt`` site). Run an intervened model inside it for counterfactual
      draws. ``guide.get_traces()`` then gives the model and guide traces.
    * ``guide(prompt)`` runs the guide's own model, the SCM's noise sites under their priors
      (the tokens are functions of the noise), so it has the model's signature and its trace
      holds the noise sites alone: it composes with ``poutine.trace``, ``poutine.replay``,
      ``pyro.plate`` (vectorised posterior draws), ``pyro.infer.Importance``, ``Trace_ELBO``
      (which runs a ``GuideMessenger`` through its own model) and ChiRho's handlers. It
      returns the drawn values by site name.

    Each run (a call, or a ``with`` block) makes one teacher-forced pass for its prompt, or
    none with ``raw_logits``; the guide keeps no logits between runs. The other methods take
    the prompt or the :class:`~pyro_lmscm.models.FactualAnchor` that :meth:`anchor`
    returned for it: hold the anchor to make the pass once. To replay the guide's noise
    through the SCM bit-exactly, replay inside :meth:`anchored` (prediction on the logits
    the noise was drawn for). For prediction with :math:`O(NV)` noise at a time,
    :class:`~pyro_lmscm.inference.PosteriorNoiseMessenger` supplies each step's posterior
    without keeping a trace.

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
        edge of a top-k / top-p support is never outside it at abduction, or the logits of an
        anchor already computed.
    :raises ObservationError: on a malformed observation.
    :raises AbductionError: (when called) if an observed token is outside the decoding
        support, i.e. the observation has probability zero.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=5)
    >>> prompt, observed = torch.tensor([1, 2]), torch.tensor([7, 3, 3, 9])
    >>> guide = HindsightGumbelGuide(scm, observed)
    >>> guide_trace = poutine.trace(guide).get_trace(prompt)
    >>> anchor = guide.anchor(prompt)  # the factual logits, held by the caller
    >>> with guide.anchored(anchor):
    ...     replayed = poutine.replay(scm.model, trace=guide_trace)(prompt)
    >>> replayed[:4].tolist()
    [7, 3, 3, 9]
    >>> with pyro.plate("draws", 3, dim=-1), guide.anchored(anchor), guide:  # as a GuideMessenger
    ...     tokens = scm.model(prompt)
    >>> tokens[:, :4].tolist()
    [[7, 3, 3, 9], [7, 3, 3, 9], [7, 3, 3, 9]]
    """

    def __init__(
        self,
        scm: LanguageModelSCM,
        observations: torch.Tensor | Mapping[str, torch.Tensor],
        margin: float = 0.0,
        raw_logits: torch.Tensor | None = None,
    ) -> None:
        if scm.collapsed:
            raise InferenceError(
                "HindsightGumbelGuide needs the SCM's noise sites; build it with collapsed=False "
                "(a collapsed SCM marginalises the noise)."
            )
        observed_ids = scm.check_observed(_observed_ids(observations, scm.site("")))
        n, vocab = observed_ids.shape[-1], scm.vocab_size
        if raw_logits is not None and not (isinstance(raw_logits, torch.Tensor) and raw_logits.is_floating_point()):
            kind = f"a {raw_logits.dtype} tensor" if isinstance(raw_logits, torch.Tensor) else type(raw_logits).__name__
            raise ObservationError(
                f"`raw_logits` must be a floating tensor of shape (..., {n}, {vocab}) for {n} observed "
                f"tokens, got {kind}."
            )
        if raw_logits is not None and tuple(raw_logits.shape[-2:]) != (n, vocab):
            raise ObservationError(
                f"`raw_logits` must have shape (..., {n}, {vocab}) for {n} observed tokens, "
                f"got {tuple(raw_logits.shape)}."
            )
        super().__init__(_NoisePrior(scm, observed_ids.shape[:-1]))
        self.scm = scm
        self.observed_ids = observed_ids
        # (once: a step's posterior reads its column, not the whole string's ends at every step)
        self._observed_active = self.step_is_active(observed_ids)
        self.margin = as_real(margin, "margin", minimum=0.0) / float(scm.decoding.temperature)
        self.raw_logits = raw_logits
        self._steps = {scm.site(noise_site(t)): t for t in range(scm.max_new_tokens)}
        self._run_logits: torch.Tensor | None = None  # the decoded logits of the current run only

    def _factual(self, prompt_ids: torch.Tensor | FactualAnchor) -> tuple[FactualAnchor, torch.Tensor]:
        """The anchor (computed for a prompt, checked for an anchor) and its decoded logits."""
        observed = self.observed_ids
        n = observed.shape[-1]
        if isinstance(prompt_ids, FactualAnchor):
            anchor = prompt_ids
            if anchor.observed_ids.shape != observed.shape or not torch.equal(anchor.observed_ids, observed):
                raise InferenceError(
                    "the anchor is for another observation than this guide's: make it with this "
                    "guide's anchor(prompt)."
                )
            raw = anchor.logits
        else:
            prompt_ids = self.scm.check_prompt(prompt_ids)
            batch_shape = torch.broadcast_shapes(prompt_ids.shape[:-1], observed.shape[:-1])
            if self.raw_logits is not None:
                raw = self.raw_logits
            else:
                inputs = torch.cat(
                    [
                        prompt_ids.expand(*batch_shape, prompt_ids.shape[-1]),
                        observed.expand(*batch_shape, n)[..., :-1],
                    ],
                    dim=-1,
                )
                raw = self.scm.lm.logits(inputs, logits_to_keep=n)
            check_logits(raw, "the factual model on the observed string")
            anchor = FactualAnchor(prompt_ids, observed, raw)
        # the factual steps through the SCM's effectful operations, as a decoding run has them
        tokens = observed.expand(*raw.shape[:-2], n)
        logits = decoded_steps(self.scm, raw, anchor.prompt_ids, 0, tokens)
        self._check_support(logits, tokens, raw)
        return anchor, logits

    def anchor(self, prompt_ids: torch.Tensor | FactualAnchor) -> FactualAnchor:
        """The raw factual logits of the observed steps that the posterior is drawn for.

        One teacher-forced forward pass over ``prompt + observed[:-1]`` (or ``raw_logits``
        when given) per call, nothing cached: hold the result and pass it to the methods
        that take a prompt. An anchor is checked (its observation must be this guide's) and
        returned.

        :raises AbductionError: if an observed token has :math:`\\ell_{t,k} = -\\infty`.
        """
        return self._factual(prompt_ids)[0]

    def decoded_logits(self, prompt_ids: torch.Tensor | FactualAnchor) -> torch.Tensor:
        r"""Decoded factual logits :math:`\ell_t` at the observed steps, shape ``(..., n, V)``.

        :param prompt_ids: the prompt ``(..., L)`` (one teacher-forced pass) or its
            :meth:`anchor`.
        :raises AbductionError: if an observed token has :math:`\ell_{t,k} = -\infty`.
        """
        return self._factual(prompt_ids)[1]

    def anchored(self, prompt_ids: torch.Tensor | FactualAnchor) -> FactualAnchorMessenger:
        """A handler: within it, ``scm.model`` evaluates the factual mechanism on the observed
        path to the logits of this guide (:class:`~pyro_lmscm.models.FactualAnchorMessenger`),
        so that a replay of the guide's noise reproduces the observation exactly, whatever the
        rounding of KV-cached steps. ``counterfactual()`` enters it itself.

        :param prompt_ids: the prompt ``(..., L)`` (one teacher-forced pass) or its :meth:`anchor`.
        """
        return self.scm.anchored(self.anchor(prompt_ids))

    def _check_support(self, logits: torch.Tensor, observed: torch.Tensor, raw: torch.Tensor) -> None:
        observed_logit = logits.gather(-1, observed.unsqueeze(-1)).squeeze(-1)
        impossible = ~torch.isfinite(observed_logit) & self.step_is_active(observed)
        if bool(impossible.any()):
            index = torch.nonzero(impossible)[0].tolist()
            t, token = index[-1], int(observed[tuple(index)])
            row = raw.expand(*observed.shape, raw.shape[-1])[tuple(index)]
            try:
                text = repr(self.scm.lm.token_texts([token])[0])
            except Exception:  # noqa: BLE001 - no tokenizer: the id alone
                text = "?"
            raise AbductionError(
                f"the observed token {text} (id {token}) at step {t} (site 'w_{t}') is outside the support of "
                f"{self.scm.decoding!r}: the observation has probability zero. "
                f"{admitting_setting(self.scm.decoding, row, token)}"
            )

    def step_is_active(self, observed: torch.Tensor) -> torch.Tensor:
        """Steps whose token is still generated (not padding after an end of sequence)."""
        return ~self.scm.ended_before(observed)

    def log_prob_observed(self, prompt_ids: torch.Tensor | FactualAnchor) -> torch.Tensor:
        r""":math:`\log p(w^{\text{obs}} \mid \text{prompt})` under the decoding, shape ``(...)``.

        :param prompt_ids: the prompt ``(..., L)`` (one teacher-forced pass) or its :meth:`anchor`.
        """
        logits = self.decoded_logits(prompt_ids)
        observed = self.observed_ids.expand(logits.shape[:-1])
        log_p = gathered_log_probs(logits, observed)
        return torch.where(self.step_is_active(observed), log_p, 0.0).sum(-1)

    def step_posterior(self, t: int, logits: torch.Tensor) -> TorchDistribution:
        r"""The exact posterior of :math:`u_t` at an observed step :math:`t < n`, batch shape
        ``logits.shape[:-2]``: the noise model's posterior given :math:`w^{\text{obs}}_t`
        (the prior after an observed end of sequence).

        :param logits: the decoded factual logits ``(..., n, V)`` (:meth:`decoded_logits`).
        """
        batch = logits.shape[:-2]
        observed, active = self.observed_ids[..., t].expand(batch), self._observed_active[..., t].expand(batch)
        return self.scm.noise.posterior(logits[..., t, :], observed, margin=self.margin, active=active)

    def get_posterior(self, name: str, prior: TorchDistribution) -> TorchDistribution:  # type: ignore[override]
        """The posterior of site ``name`` given its prior (Pyro's ``GuideMessenger``
        protocol): :meth:`step_posterior` at the observed noise sites of this SCM, the prior
        at its later noise sites and at every other site.

        :raises InferenceError: if the posterior's batch shape does not fit in the site's
            (a batch of observations run on a prompt without that batch dim).
        """
        t = self._steps.get(name)
        if t is None or t >= self.observed_ids.shape[-1]:
            return prior
        posterior = self.step_posterior(t, self._logits_of_run())
        if torch.broadcast_shapes(posterior.batch_shape, prior.batch_shape) != prior.batch_shape:
            raise InferenceError(
                f"site {name!r} has batch shape {tuple(prior.batch_shape)} but the posterior has "
                f"{tuple(posterior.batch_shape)}: give the prompt the observation's batch dims."
            )
        return posterior

    def _logits_of_run(self) -> torch.Tensor:
        """The decoded factual logits for the prompt of the current run, computed at its first
        observed noise site and dropped when the run's scope exits. The run may be an
        intervened world's (its exclusions and Messengers in scope): the factual pass is
        blocked from every handler of the run, as the factual world never sees them."""
        if self._run_logits is None:
            with poutine.block():
                self._run_logits = self.decoded_logits(self._prompt_of_run())
        return self._run_logits

    def _prompt_of_run(self) -> torch.Tensor:
        """The factual prompt of the run: the SCM's ``prompt`` site when the model ran it
        (under ``do`` on the prompt that site keeps the factual value), else the argument of
        ``guide(prompt)``."""
        site = self.trace.nodes.get(self.scm.site(PROMPT))
        if site is not None and site["type"] == "sample":
            return torch.as_tensor(site["value"])
        args_kwargs: Any = getattr(self, "args_kwargs", None)  # set by GuideMessenger.__call__
        if args_kwargs is not None:
            args, kwargs = args_kwargs
            if args:
                return args[0]
            if "prompt_ids" in kwargs:
                return kwargs["prompt_ids"]
        raise InferenceError(
            f"HindsightGumbelGuide found no prompt for site {noise_site(0)!r}: call guide(prompt), or "
            f"run a model that samples the SCM's {self.scm.site(PROMPT)!r} site inside `with guide:`."
        )

    def __enter__(self) -> HindsightGumbelGuide:
        self._run_logits = None
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        self._run_logits = None
        super().__exit__(*args)

    @torch.no_grad()
    def sample_noise(
        self, prompt_ids: torch.Tensor | FactualAnchor, sample_shape: torch.Size | tuple[int, ...] = torch.Size()
    ) -> torch.Tensor:
        r"""Every noise site at once: :math:`u_{0:T}` stacked along dim −2, shape
        ``sample_shape + batch_shape + (T, V)``, where ``batch_shape`` is that of the
        observation (and prompt) and :math:`T` is ``scm.max_new_tokens``.

        The law is that of the guide's sites traced under a plate of ``sample_shape``
        (``poutine.trace(pyro.plate(...)(guide))``): the posterior at the observed steps,
        the prior :math:`\mathrm{Gumbel}(0, 1)^V` after them. It is one vectorised draw and
        no Pyro site, for callers that replay the noise themselves (through
        :func:`noise_trace`): on a small model the :math:`T` traced sites cost more than the
        forward pass.

        :param prompt_ids: the prompt ``(..., L)`` (one teacher-forced pass) or its :meth:`anchor`.

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

    def _joint_posterior(self, prompt_ids: torch.Tensor | FactualAnchor) -> TorchDistribution:
        """The posterior of every observed step at once, batch shape ``(..., n)``."""
        logits = self.decoded_logits(prompt_ids)
        observed = self.observed_ids.expand(logits.shape[:-1])
        return self.scm.noise.posterior(logits, observed, margin=self.margin, active=self.step_is_active(observed))


def admitting_setting(decoding: Decoding, raw: torch.Tensor, token: int) -> str:
    """The decoding setting that would admit ``token`` at a step of raw logits ``raw`` ``(V,)``,
    as advice: the top-k from the token's rank (``1 +`` the tokens of higher logit), the
    top-p from the probability of the tokens above it (``TopP`` keeps a token iff the mass
    strictly above it is below ``top_p``)."""
    scaled = raw.float() / float(decoding.temperature)
    value = scaled[token]
    if not bool(torch.isfinite(value)):
        return "The model itself gives it probability zero (a -inf logit): no decoding setting admits it."
    advice = []
    top_k = decoding.top_k
    if top_k is not None:
        rank = int((scaled > value).sum()) + 1
        if rank > top_k:
            advice.append(f"raise top_k to at least {rank} (its rank)")
            top_k = rank
    if decoding.top_p is not None and decoding.top_p < 1.0:
        if top_k is not None:
            kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        kept = scaled
        above = float(kept.softmax(-1)[kept > value].sum())
        if above >= decoding.top_p:
            advice.append(f"raise top_p above {above:.4g} (the probability of the tokens ranked above it)")
    hint = " and ".join(advice) if advice else "widen top_k / top_p"
    return f"To admit it, {hint}, or drop top_k / top_p: the default, the full softmax, admits every string."
