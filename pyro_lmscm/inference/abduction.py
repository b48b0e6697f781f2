r"""Abduction behind one interface: draws of the Gumbel noise given an observed string.

Given the prompt and an observed continuation :math:`k_{0:n}` the factual decoded logits
:math:`\ell_t = g(f_0(\text{prompt}, k_{<t}))` are fixed (one teacher-forced pass), and the
posterior of the noise of the observed steps factorises over steps:

.. math::

    p(u \mid k) \propto \prod_{t < n} \mathrm{Gumbel}(u_t; 0, 1)^V \;
        \mathbb{1}\big[\arg\max_v (\ell_{t,v} + u_{t,v}) = k_t\big].

The methods of :func:`abduct` draw from it, or from an approximation:

* ``"exact"`` -- :class:`~pyro_lmscm.inference.HindsightGumbelGuide` (top-down Gumbel sampling);
* ``"importance"`` -- the prior as proposal, weights :math:`\mathbb{1}[\cdot]`; its effective
  sample size is :math:`N\, p(k \mid \text{prompt})` in expectation, which falls
  geometrically with the string length;
* ``"relaxed-svi"`` -- the indicator replaced by the Concrete (Gumbel-softmax) likelihood
  :math:`\mathrm{softmax}((\ell_t + u_t)/\tau)_{k_t}` (:class:`RelaxedGumbelMaxModel`),
  fitted with Pyro's SVI and an ``AutoNormal`` or low-rank guide; since :math:`\ell_t` does
  not depend on :math:`u`, the loop makes no language-model calls;
* ``"relaxed-nuts"`` -- ``pyro.infer.NUTS`` on the relaxed model, for tiny vocabularies only;
* ``"prior"`` -- no abduction at all (fresh noise), the baseline every method must beat.

Steps after the observation (and after an observed end of sequence) get prior noise under
every method. As :math:`\tau \to 0` the relaxed likelihood tends to the indicator, so the
relaxed posterior tends to the exact one.

References

[1] S. Ravfogel, A. Svete, V. Snæbjarnarson, R. Cotterell (2024), "Gumbel Counterfactual
    Generation From Language Models", arXiv:2411.07180.
[2] C. J. Maddison, A. Mnih, Y. W. Teh (2017), "The Concrete Distribution"; E. Jang, S. Gu,
    B. Poole (2017), "Categorical Reparameterization with Gumbel-Softmax".
[3] M. D. Hoffman, A. Gelman (2014), "The No-U-Turn Sampler".
"""

from __future__ import annotations

import inspect
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ..errors import InferenceError, ObservationError
from ..interventions.ops import as_do_data
from ..models.sites import noise_site, token_site
from ..seeding import seeded
from ..validation import as_int, as_real
from .distribution import CounterfactualDistribution
from .gumbel_max_posterior import gumbel_log_density
from .hindsight_guide import HindsightGumbelGuide
from .prediction import DRAWS, noise_handler, predict

if TYPE_CHECKING:
    from ..interventions.ops import Intervention
    from ..models.anchor import FactualAnchor
    from ..models.scm import LanguageModelSCM

__all__ = [
    "METHODS",
    "NUTS_MAX_VOCAB",
    "AbductionMethod",
    "AbductionResult",
    "Exact",
    "Importance",
    "Prior",
    "RelaxedGumbelMaxModel",
    "RelaxedNUTS",
    "RelaxedSVI",
    "abduct",
    "kish_ess",
    "make_method",
    "noise_statistics",
    "relaxed_site",
]

#: Prefix of the relaxed likelihood factor sites, ``"__relaxed_w_<t>"``.
RELAXED_PREFIX = "__relaxed"
#: ``"relaxed-nuts"`` refuses larger vocabularies by default: HMC in :math:`n V` dimensions.
NUTS_MAX_VOCAB = 64


def relaxed_site(t: int) -> str:
    """Name of the relaxed likelihood factor of step ``t``, e.g. ``"__relaxed_w_3"``."""
    return f"{RELAXED_PREFIX}_{token_site(t)}"


def active_steps(scm: LanguageModelSCM, observed: torch.Tensor) -> int:
    """Number of observed steps that the model generates: up to and including the first end."""
    ended = scm.finished_after(observed)
    return int((~ended).sum()) + (1 if bool(ended.any()) else 0)


def kish_ess(log_weights: torch.Tensor | None, num_samples: int | None = None) -> float:
    r"""Kish's effective sample size :math:`(\sum_i w_i)^2 / \sum_i w_i^2` of log weights;
    ``num_samples`` for ``None`` (uniform weights), ``0.0`` when every weight is zero."""
    if log_weights is None:
        if num_samples is None:
            raise ValueError("`num_samples` is needed for uniform weights.")
        return float(num_samples)
    log_weights = log_weights.double()
    if not bool(torch.isfinite(log_weights).any()):
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0)))


def noise_statistics(
    logits: torch.Tensor, observed: torch.Tensor, noise: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    r"""Per-draw scalars of the noise at the observed steps :math:`t < n_a`:

    * ``"observed_noise"``: :math:`u_{t, k_t}`, the noise of the observed token;
    * ``"top_gumbel"``: :math:`M_t = \max_v (\ell_{t,v} + u_{t,v})`, the winning perturbed logit.

    Under the exact posterior :math:`M_t \sim \mathrm{Gumbel}(\log\sum_v e^{\ell'_{t,v}})`
    (as under the prior: the max is independent of the argmax), and
    :math:`u_{t,k_t} = M_t + \delta - \ell_{t,k_t}`.

    :param logits: decoded factual logits :math:`\ell` at the observed steps, ``(n, V)``.
    :param observed: the observed ids :math:`k`, ``(n,)``; only the first :math:`n_a`
        (up to the first end of sequence) are used.
    :param noise: ``{"u_t": (N, V)}`` for every :math:`t < n_a`.
    :returns: ``{"observed_noise": (N, n_a), "top_gumbel": (N, n_a)}``, float32 on the CPU.
    """
    num_active = logits.shape[0]
    observed_noise, top = [], []
    for t in range(num_active):
        u = noise[noise_site(t)].detach().float().to(logits.device)
        observed_noise.append(u[..., int(observed[t])])
        top.append((logits[t] + u).amax(-1))
    return {
        "observed_noise": torch.stack(observed_noise, -1).cpu(),
        "top_gumbel": torch.stack(top, -1).cpu(),
    }


class RelaxedGumbelMaxModel:
    r"""The Gumbel-max posterior with the argmax relaxed to a tempered softmax:

    .. math::

        p_\tau(u \mid k) \propto \prod_{t < n_a} \mathrm{Gumbel}(u_t; 0, 1)^V\,
            \mathrm{softmax}\big((\ell_t + u_t)/\tau\big)_{k_t},

    a Pyro model with sites ``"u_t"`` (:math:`t < n_a`) and factors ``"__relaxed_w_t"``.
    As :math:`\tau \to 0` the softmax tends to :math:`\mathbb{1}[\arg\max_v(\ell_{t,v} +
    u_{t,v}) = k_t]` and :math:`p_\tau` to the exact posterior.

    :param logits: decoded factual logits :math:`\ell`, ``(n_a, V)``.
    :param observed: observed ids :math:`k`, ``(n_a,)``.
    :param temperature: the relaxation temperature :math:`\tau > 0` (not the decoding one).

    >>> logits = torch.tensor([[0.0, 1.0, -1.0]])
    >>> u_wins, u_loses = {"u_0": torch.tensor([0.0, 0.0, 5.0])}, {"u_0": torch.tensor([0.0, 0.0, 0.0])}
    >>> sharp = RelaxedGumbelMaxModel(logits, torch.tensor([2]), temperature=0.01)
    >>> [round(float(sharp.log_likelihood(u).exp()), 3) for u in (u_wins, u_loses)]
    [1.0, 0.0]
    """

    def __init__(self, logits: torch.Tensor, observed: torch.Tensor, temperature: float) -> None:
        _check_positive_float("temperature", temperature)
        self.logits = logits.detach()
        self.observed = observed
        self.temperature = float(temperature)
        vocab = logits.shape[-1]
        zeros = torch.zeros(vocab, device=logits.device)
        self.prior = dist.Gumbel(zeros, torch.ones_like(zeros)).to_event(1)

    def step_log_likelihood(self, t: int, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \mathrm{softmax}((\ell_t + u_t)/\tau)_{k_t}`, shape ``u.shape[:-1]``."""
        scaled = (self.logits[t] + u) / self.temperature
        return scaled.log_softmax(-1)[..., int(self.observed[t])]

    def log_likelihood(self, noise: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the relaxed factors for noise ``{"u_t": (..., V)}``."""
        steps = range(len(self.observed))
        return sum(self.step_log_likelihood(t, noise[noise_site(t)]) for t in steps)  # type: ignore[return-value]

    def __call__(self) -> None:
        for t in range(len(self.observed)):
            u = pyro.sample(noise_site(t), self.prior)
            pyro.factor(relaxed_site(t), self.step_log_likelihood(t, u))


# -- methods ---------------------------------------------------------------------------------


@dataclass
class _Problem:
    """What every method sees: the SCM, prompt, observation, and factual logits of the active steps."""

    scm: LanguageModelSCM
    prompt: torch.Tensor
    observed: torch.Tensor  # (n,)
    logits: torch.Tensor  # (n_a, V)
    guide: HindsightGumbelGuide  # margin 0, its teacher-forced pass cached

    @property
    def num_active(self) -> int:
        return self.logits.shape[0]

    def prior_draws(self, num_samples: int) -> dict[str, torch.Tensor]:
        noise = dist.Gumbel(torch.zeros(()), torch.ones(()))
        shape = (num_samples, self.scm.vocab_size)
        return {noise_site(t): noise.sample(shape).to(self.logits.device) for t in range(self.num_active)}


@dataclass
class _Draws:
    noise: dict[str, torch.Tensor]  # u_t for the active steps, (N, V)
    log_proposal: torch.Tensor  # (N,)
    log_weights: torch.Tensor | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    num_chains: int = 1
    autocorrelated: bool = False


def _check_positive_float(name: str, value: Any) -> None:
    as_real(value, name, minimum=0.0, exclusive=True)


def _check_int(name: str, value: Any, minimum: int) -> None:
    as_int(value, name, minimum=minimum)


def _log_prior(noise: Mapping[str, torch.Tensor], num_active: int) -> torch.Tensor:
    steps = range(num_active)
    return sum(gumbel_log_density(noise[noise_site(t)]).sum(-1) for t in steps)  # type: ignore[return-value]


class AbductionMethod(ABC):
    """A way of drawing the noise of the observed steps; see :func:`abduct`."""

    #: the name :func:`abduct` accepts.
    name: ClassVar[str]

    @property
    def label(self) -> str:
        """The name with the settings that matter, for tables and plots."""
        return self.name

    @abstractmethod
    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        """Draw the noise of the active steps and its log density under this method."""

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({settings})"


class Exact(AbductionMethod):
    r"""Exact posterior draws from :class:`~pyro_lmscm.inference.HindsightGumbelGuide`.

    :param margin: the guide's winning margin :math:`\delta \geq 0` (0: exact).
    """

    name = "exact"

    def __init__(self, margin: float = 0.0) -> None:
        self.margin = as_real(margin, "margin", minimum=0.0)

    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        guide = problem.guide
        if self.margin != guide.margin:
            guide = HindsightGumbelGuide(problem.scm, problem.observed, margin=self.margin)
        sites = [noise_site(t) for t in range(problem.num_active)]
        names = {problem.scm.site(name): name for name in sites}  # the SCM's name prefix
        with pyro.plate(DRAWS, num_samples, dim=-1):
            trace = poutine.trace(guide).get_trace(problem.prompt)
        trace.compute_log_prob(lambda name, site: name in names)
        noise = {base: torch.as_tensor(trace.nodes[name]["value"]) for name, base in names.items()}
        log_q = sum(trace.nodes[name]["log_prob"] for name in names)
        return _Draws(noise, torch.as_tensor(log_q).expand(num_samples), diagnostics={"margin": guide.margin})


class Prior(AbductionMethod):
    """No abduction: fresh prior noise (the interventional baseline)."""

    name = "prior"

    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        noise = problem.prior_draws(num_samples)
        return _Draws(noise, _log_prior(noise, problem.num_active))


class Importance(AbductionMethod):
    r"""The prior as proposal with the indicator likelihood: weight
    :math:`\mathbb{1}[\text{the draw reproduces } k]`. The expected effective sample size is
    :math:`N\,p(k \mid \text{prompt})`."""

    name = "importance"

    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        noise = problem.prior_draws(num_samples)
        consistent = _consistent(problem.logits, problem.observed, noise)
        log_weights = torch.where(consistent, 0.0, float("-inf")).double()
        return _Draws(noise, _log_prior(noise, problem.num_active), log_weights=log_weights)


class RelaxedSVI(AbductionMethod):
    r"""Stochastic variational inference on :class:`RelaxedGumbelMaxModel`.

    :param temperature: relaxation temperature :math:`\tau > 0`.
    :param num_steps: SVI steps (``0`` keeps the initial guide: a baseline).
    :param learning_rate: Adam's learning rate.
    :param guide: ``"normal"`` (``AutoNormal``, mean field) or ``"lowrank"``
        (``AutoLowRankMultivariateNormal``).
    :param rank: rank of the low-rank guide (default: Pyro's).
    :param num_particles: ELBO particles per step (vectorised).
    """

    name = "relaxed-svi"

    def __init__(
        self,
        temperature: float = 0.05,
        num_steps: int = 300,
        learning_rate: float = 0.05,
        guide: str = "normal",
        rank: int | None = None,
        num_particles: int = 4,
    ) -> None:
        _check_positive_float("temperature", temperature)
        _check_int("num_steps", num_steps, 0)
        _check_positive_float("learning_rate", learning_rate)
        if guide not in ("normal", "lowrank"):
            raise InferenceError(f'`guide` must be "normal" or "lowrank", got {guide!r}.')
        if rank is not None:
            _check_int("rank", rank, 1)
            if guide != "lowrank":
                raise InferenceError('`rank` applies only to guide="lowrank".')
        _check_int("num_particles", num_particles, 1)
        self.temperature = float(temperature)
        self.num_steps = num_steps
        self.learning_rate = float(learning_rate)
        self.guide = guide
        self.rank = rank
        self.num_particles = num_particles

    @property
    def label(self) -> str:
        return f"{self.name} τ={self.temperature:g}" + (" lowrank" if self.guide == "lowrank" else "")

    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
        from pyro.optim import Adam  # type: ignore[attr-defined]  # generated from torch.optim

        model = RelaxedGumbelMaxModel(problem.logits, problem.observed[: problem.num_active], self.temperature)
        with pyro.get_param_store().scope(), pyro.validation_enabled(False):
            guide: AutoNormal | AutoLowRankMultivariateNormal
            if self.guide == "normal":
                guide = AutoNormal(model)
            else:
                guide = AutoLowRankMultivariateNormal(model, rank=self.rank)
            elbo = Trace_ELBO(num_particles=self.num_particles, vectorize_particles=True, max_plate_nesting=0)
            svi = SVI(model, guide, Adam({"lr": self.learning_rate}), elbo)
            losses = [svi.step() for _ in range(self.num_steps)]
            with torch.no_grad(), pyro.plate(DRAWS, num_samples, dim=-1):
                trace = poutine.trace(guide).get_trace()
            trace.compute_log_prob()
            log_q = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")
        sites = [noise_site(t) for t in range(problem.num_active)]
        noise = {name: torch.as_tensor(trace.nodes[name]["value"]).detach() for name in sites}
        return _Draws(noise, torch.as_tensor(log_q).detach().expand(num_samples), diagnostics={"elbo_loss": losses})


class RelaxedNUTS(AbductionMethod):
    r"""The No-U-Turn sampler on :class:`RelaxedGumbelMaxModel`, one chain.

    It explores :math:`n_a V` dimensions, so it refuses vocabularies larger than
    ``max_vocab``; the relaxed posterior sharpens as :math:`\tau \to 0`, which slows HMC.

    :param temperature: relaxation temperature :math:`\tau > 0`.
    :param warmup_steps: adaptation steps (default: ``num_samples``).
    :param max_tree_depth: NUTS's maximal tree depth.
    :param max_vocab: the largest vocabulary accepted.
    """

    name = "relaxed-nuts"

    def __init__(
        self,
        temperature: float = 0.1,
        warmup_steps: int | None = None,
        max_tree_depth: int = 6,
        max_vocab: int = NUTS_MAX_VOCAB,
    ) -> None:
        _check_positive_float("temperature", temperature)
        if warmup_steps is not None:
            _check_int("warmup_steps", warmup_steps, 0)
        _check_int("max_tree_depth", max_tree_depth, 1)
        _check_int("max_vocab", max_vocab, 2)
        self.temperature = float(temperature)
        self.warmup_steps = warmup_steps
        self.max_tree_depth = max_tree_depth
        self.max_vocab = max_vocab

    @property
    def label(self) -> str:
        return f"{self.name} τ={self.temperature:g}"

    def check(self, scm: LanguageModelSCM) -> None:
        """:raises InferenceError: if the vocabulary is larger than ``max_vocab``."""
        if scm.vocab_size > self.max_vocab:
            raise InferenceError(
                f"relaxed-nuts runs HMC over all {scm.vocab_size} noise coordinates of every observed "
                f"step; vocab_size={scm.vocab_size} exceeds max_vocab={self.max_vocab}. Use "
                "method='relaxed-svi' (no language-model calls in its loop) or 'exact' for this model."
            )

    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        from pyro.infer import MCMC, NUTS

        self.check(problem.scm)
        model = RelaxedGumbelMaxModel(problem.logits, problem.observed[: problem.num_active], self.temperature)
        warmup = num_samples if self.warmup_steps is None else self.warmup_steps
        kernel = NUTS(model, max_tree_depth=self.max_tree_depth)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1, disable_progbar=True)
        with pyro.validation_enabled(False):
            mcmc.run()
        noise = {name: value.detach() for name, value in mcmc.get_samples().items()}
        log_density = _log_prior(noise, problem.num_active) + model.log_likelihood(noise)
        diagnostics = {"step_size": float(kernel.step_size), "warmup_steps": warmup}
        return _Draws(noise, log_density.detach(), diagnostics=diagnostics, autocorrelated=True)


_METHODS: dict[str, type[AbductionMethod]] = {
    cls.name: cls for cls in (Exact, Importance, RelaxedSVI, RelaxedNUTS, Prior)
}
#: The names :func:`abduct` accepts.
METHODS = tuple(_METHODS)


def make_method(method: str | AbductionMethod, **options: Any) -> AbductionMethod:
    """An :class:`AbductionMethod` from its name and options (or the instance itself).

    :raises InferenceError: for an unknown name or option, or a bad setting.
    """
    if isinstance(method, AbductionMethod):
        if options:
            raise InferenceError(f"options {sorted(options)} given with a ready method {method!r}.")
        return method
    if method not in _METHODS:
        raise InferenceError(f"unknown abduction method {method!r}; known: {METHODS}.")
    cls = _METHODS[method]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InferenceError(f"method {method!r} takes the options {accepted}, got unknown {unknown}.")
    return cls(**options)


def _consistent(logits: torch.Tensor, observed: torch.Tensor, noise: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""Bool ``(N,)``: :math:`\arg\max_v (\ell_{t,v} + u_{t,v}) = k_t` at every active step,
    computed as the SCM computes it (``torch.argmax``, first index on a tie)."""
    ok: torch.Tensor | None = None
    for t in range(logits.shape[0]):
        step = torch.argmax(logits[t] + noise[noise_site(t)].to(logits.device), dim=-1) == observed[t]
        ok = step if ok is None else ok & step
    assert ok is not None
    return ok.cpu()


# -- results ---------------------------------------------------------------------------------


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
        return _consistent(self.logits, self.observed_ids, self.noise)

    @property
    def log_weights_to_exact(self) -> torch.Tensor:
        r"""Log importance weights of the draws against the exact posterior,
        :math:`\log p(u) + \log \mathbb{1}[\text{consistent}] - \log q(u)` (float64, up to a
        constant): constant for exact draws, the indicator for prior draws."""
        log_prior = _log_prior(self.noise, self.num_active).double().cpu()
        log_w = log_prior - self.log_proposal.double().cpu()
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
        """
        data = as_do_data(self.scm, intervention)
        rows = torch.arange(self.num_samples) if rows is None else torch.as_tensor(rows).long().cpu()
        key = repr((sorted((k, v.tolist()) for k, v in data.items()), rows.tolist()))
        if key not in self._replays:
            intervened = poutine.do(self.scm.model, data=data)  # type: ignore[arg-type]
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
            intervention=as_do_data(self.scm, intervention),
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
        _check_int("num_samples", num_samples, 1)
        data = as_do_data(self.scm, intervention)
        intervened = poutine.do(self.scm.model, data=data)  # type: ignore[arg-type]
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


def abduct(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    observed: torch.Tensor,
    method: str | AbductionMethod = "exact",
    num_samples: int = 100,
    *,
    seed: int | None = None,
    **options: Any,
) -> AbductionResult:
    r"""Draw the noise :math:`u` given that ``prompt`` was continued by ``observed``.

    :param scm: the SCM.
    :param prompt: prompt ids ``(L,)``.
    :param observed: observed continuation ids ``(n,)``.
    :param method: one of :data:`METHODS` or an :class:`AbductionMethod`.
    :param num_samples: :math:`N`, the number of draws (for ``"importance"``: of proposals).
    :param seed: seeds torch's generator for this call only.
    :param options: settings of the method (see :class:`Exact`, :class:`RelaxedSVI`,
        :class:`RelaxedNUTS`), e.g. ``temperature=0.05``.
    :returns: :class:`AbductionResult` with ``noise`` ``{"u_t": (N, V)}`` for every step.
    :raises InferenceError: for an unknown method or option, a bad setting, or NUTS above
        its vocabulary limit.
    :raises ObservationError, AbductionError: for a malformed or impossible observation.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> prompt, observed = torch.tensor([2, 3]), torch.tensor([7, 3, 9])
    >>> exact = abduct(scm, prompt, observed, "exact", num_samples=50, seed=0)
    >>> exact.reproduction_rate, exact.ess
    (1.0, 50.0)
    >>> relaxed = abduct(scm, prompt, observed, "relaxed-svi", num_samples=50, seed=0, num_steps=50)
    >>> sorted(relaxed.noise) == sorted(exact.noise) == ["u_0", "u_1", "u_2", "u_3"]
    True
    """
    _check_int("num_samples", num_samples, 1)
    method = make_method(method, **options)
    prompt = scm.check_prompt(prompt)
    if prompt.dim() != 1:
        raise ObservationError(f"`prompt` must have shape (L,), got {tuple(prompt.shape)}.")
    observed = scm.check_observed(observed)
    if observed.dim() != 1:
        raise ObservationError(f"`observed` must have shape (n,), got {tuple(observed.shape)}.")
    if isinstance(method, RelaxedNUTS):
        method.check(scm)
    with seeded(seed):
        start = time.perf_counter()
        guide = HindsightGumbelGuide(scm, observed)
        logits = guide.decoded_logits(prompt)
        anchor = guide.anchor(prompt)
        problem = _Problem(scm, prompt, observed, logits[: active_steps(scm, observed)], guide)
        draws = method.draw(problem, num_samples)
        wall_time = time.perf_counter() - start
        noise = {name: value.detach() for name, value in draws.noise.items()}
        prior = dist.Gumbel(torch.zeros(()), torch.ones(()))
        for t in range(problem.num_active, scm.max_new_tokens):
            noise[noise_site(t)] = prior.sample((num_samples, scm.vocab_size)).to(scm.lm.device)
    return AbductionResult(
        scm=scm,
        method=method.label,
        prompt_ids=prompt,
        observed_ids=observed,
        noise={noise_site(t): noise[noise_site(t)] for t in range(scm.max_new_tokens)},
        log_weights=draws.log_weights,
        log_proposal=draws.log_proposal,
        logits=problem.logits,
        wall_time_s=wall_time,
        diagnostics=draws.diagnostics,
        num_chains=draws.num_chains,
        autocorrelated=draws.autocorrelated,
        anchor=anchor,
    )
