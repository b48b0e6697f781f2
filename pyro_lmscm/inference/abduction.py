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

import time
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch

from ..errors import InferenceError
from ..models.noise import GumbelMax
from ..models.sites import noise_site
from ..seeding import seeded
from ..validation import as_int
from .abduction_result import AbductionResult
from .hindsight_guide import HindsightGumbelGuide
from .methods import (
    METHODS,
    AbductionMethod,
    Exact,
    Importance,
    Prior,
    RelaxedNUTS,
    RelaxedSVI,
    _Problem,
    make_method,
)
from .prediction import check_outside_plates
from .relaxed import NUTS_MAX_VOCAB, RelaxedGumbelMaxModel, relaxed_site
from .statistics import active_steps, kish_ess, noise_statistics

if TYPE_CHECKING:
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
    "active_steps",
    "kish_ess",
    "make_method",
    "noise_statistics",
    "relaxed_site",
]


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
    :raises InferenceError: for an unknown method or option, a bad setting, NUTS above its
        vocabulary limit, or a call inside a caller's ``pyro.plate``.
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
    as_int(num_samples, "num_samples", minimum=1)
    if not isinstance(scm.noise, GumbelMax):  # the relaxations and statistics are of Gumbel noise
        raise InferenceError(
            f"abduct() compares abduction methods of Gumbel-max noise; the SCM's noise is {scm.noise!r}. "
            "counterfactual() and exact_counterfactual() draw its exact posterior."
        )
    method = make_method(method, **options)
    check_outside_plates("abduct()")
    prompt = scm.check_prompt(prompt, single=True)
    observed = scm.check_observed(observed, single=True)
    if isinstance(method, RelaxedNUTS):
        method.check(scm)
    with seeded(seed):
        start = time.perf_counter()
        anchor = HindsightGumbelGuide(scm, observed).anchor(prompt)  # one teacher-forced pass
        guide = HindsightGumbelGuide(scm, observed, raw_logits=anchor.logits)  # runs on these logits
        logits = guide.decoded_logits(anchor)
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
