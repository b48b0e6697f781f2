"""The abduction methods behind :func:`~pyro_lmscm.inference.abduct` (see
:mod:`pyro_lmscm.inference.abduction` for the mathematics): exact, prior, importance,
relaxed SVI and relaxed NUTS, one class each behind :class:`AbductionMethod`."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from ..errors import InferenceError
from ..models.sites import noise_site
from ..validation import as_int, as_real
from .hindsight_guide import HindsightGumbelGuide
from .prediction import DRAWS
from .relaxed import NUTS_MAX_VOCAB, RelaxedGumbelMaxModel
from .statistics import consistent_draws, log_prior

if TYPE_CHECKING:
    from ..models.scm import LanguageModelSCM

__all__ = ["METHODS", "AbductionMethod", "Exact", "Importance", "Prior", "RelaxedNUTS", "RelaxedSVI", "make_method"]


@dataclass
class _Problem:
    """What every method sees: the SCM, prompt, observation, and factual logits of the active steps."""

    scm: LanguageModelSCM
    prompt: torch.Tensor
    observed: torch.Tensor  # (n,)
    logits: torch.Tensor  # (n_a, V)
    guide: HindsightGumbelGuide  # margin 0, on the raw factual logits of the teacher-forced pass

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

    @property
    def label(self) -> str:
        return self.name + (f" δ={self.margin:g}" if self.margin else "")

    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        guide = problem.guide
        if self.margin != guide.margin:
            guide = HindsightGumbelGuide(problem.scm, problem.observed, margin=self.margin, raw_logits=guide.raw_logits)
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
        return _Draws(noise, log_prior(noise, problem.num_active))


class Importance(AbductionMethod):
    r"""The prior as proposal with the indicator likelihood: weight
    :math:`\mathbb{1}[\text{the draw reproduces } k]`. The expected effective sample size is
    :math:`N\,p(k \mid \text{prompt})`."""

    name = "importance"

    def draw(self, problem: _Problem, num_samples: int) -> _Draws:
        noise = problem.prior_draws(num_samples)
        consistent = consistent_draws(problem.logits, problem.observed, noise)
        log_weights = torch.where(consistent, 0.0, float("-inf")).double()
        return _Draws(noise, log_prior(noise, problem.num_active), log_weights=log_weights)


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
        as_real(temperature, "temperature", minimum=0.0, exclusive=True)
        as_int(num_steps, "num_steps", minimum=0)
        as_real(learning_rate, "learning_rate", minimum=0.0, exclusive=True)
        if guide not in ("normal", "lowrank"):
            raise InferenceError(f'`guide` must be "normal" or "lowrank", got {guide!r}.')
        if rank is not None:
            as_int(rank, "rank", minimum=1)
            if guide != "lowrank":
                raise InferenceError('`rank` applies only to guide="lowrank".')
        as_int(num_particles, "num_particles", minimum=1)
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
        as_real(temperature, "temperature", minimum=0.0, exclusive=True)
        if warmup_steps is not None:
            as_int(warmup_steps, "warmup_steps", minimum=0)
        as_int(max_tree_depth, "max_tree_depth", minimum=1)
        as_int(max_vocab, "max_vocab", minimum=2)
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
        log_density = log_prior(noise, problem.num_active) + model.log_likelihood(noise)
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
