r"""Exact abduction of discrete upstream variables together with the language model's noise.

A larger causal model decides the prompt from upstream variables :math:`z` (a persona, a
gender, a topic), then the language model writes :math:`w`. Given an observed string the
joint posterior factorises,

.. math::

    p(z, u \mid w^{\text{obs}}) = p(z \mid w^{\text{obs}})\; p(u \mid z, w^{\text{obs}}),

where :math:`p(z \mid w^{\text{obs}}) \propto p(z)\, p(w^{\text{obs}} \mid \text{prompt}(z))`
is exact by enumeration over :math:`z` in the *collapsed* SCM (no noise sites; the string's
likelihood is a product of softmax probabilities), and :math:`p(u \mid z, w^{\text{obs}})` is
the hindsight Gumbel posterior (:class:`HindsightGumbelGuide`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import TraceEnum_ELBO, infer_discrete

from ..errors import InferenceError, ObservationError
from ..models.distributions import IntegerDelta
from ..models.sites import PROMPT, token_site
from .hindsight_guide import HindsightGumbelGuide

if TYPE_CHECKING:
    from ..models.scm import LanguageModelSCM

__all__ = ["UpstreamHindsightGuide", "upstream_marginals"]


def _conditioned(model: Callable, scm: LanguageModelSCM, observed: torch.Tensor) -> Callable:
    """``model`` conditioned on all ``max_new_tokens`` tokens, its discrete latents enumerated.

    An observation that ended early is padded as the model pads it; one that is shorter
    than ``max_new_tokens`` without ending would leave tokens latent, and enumerating a
    token means one LM batch row per vocabulary entry, so it is refused.
    """
    observed = scm.check_observed(observed)
    missing = scm.max_new_tokens - observed.shape[-1]
    if missing:
        if not bool(scm.finished_after(observed)[..., -1].all()):
            raise ObservationError(
                f"the observation has {observed.shape[-1]} tokens, no end-of-sequence token, and the "
                f"SCM writes max_new_tokens={scm.max_new_tokens}: the rest would be latent. Build the "
                "SCM with max_new_tokens equal to the observed length."
            )
        pad = observed.new_full((*observed.shape[:-1], missing), scm.lm.pad_token_id)
        observed = torch.cat([observed, pad], dim=-1)
    tokens = {scm.site(token_site(t)) for t in range(scm.max_new_tokens)}

    def config(msg: dict) -> dict:
        """Enumerate the discrete latent sites (upstream, downstream), never the tokens."""
        if msg["is_observed"] or msg["name"] in tokens or not msg["fn"].has_enumerate_support:
            return {}
        return {"enumerate": "parallel"}

    configured = poutine.infer_config(model, config)  # type: ignore[arg-type]  # a plain dict is an InferDict
    return poutine.condition(configured, data=scm.observations(observed))


def upstream_marginals(
    collapsed_model: Callable,
    scm: LanguageModelSCM,
    observed: torch.Tensor,
    sites: Sequence[str],
    *args: Any,
    max_plate_nesting: int = 0,
    **kwargs: Any,
) -> dict[str, dist.Distribution]:
    r"""Exact posterior marginals :math:`p(z_s \mid w^{\text{obs}})` of discrete upstream sites.

    :param collapsed_model: the larger model, built on ``scm`` in collapsed mode.
    :param scm: the collapsed SCM (its site names locate the observation).
    :param observed: observed continuation ids ``(n,)``.
    :param sites: names of the discrete upstream sample sites.
    :param max_plate_nesting: the model's plate nesting.
    :returns: ``{site: Categorical or Bernoulli-like posterior}`` from
        ``TraceEnum_ELBO.compute_marginals``. A Bernoulli value of posterior probability
        0 (the observation is impossible under it, e.g. outside a top-k) has the log
        probability of the largest finite float below zero, not :math:`-\infty`: torch's
        ``Bernoulli.log_prob`` is NaN at infinite logits.
    """
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    model = _conditioned(collapsed_model, scm, observed)
    marginals = elbo.compute_marginals(model, lambda *a, **k: None, *args, **kwargs)
    out = {}
    for name in sites:
        marginal = marginals[name]
        if isinstance(marginal, dist.Bernoulli) and not bool(torch.isfinite(marginal.logits).all()):
            largest = torch.finfo(marginal.logits.dtype).max  # log_prob is -x z + ..., NaN at x z = inf 0
            marginal = dist.Bernoulli(logits=marginal.logits.clamp(-largest, largest))
        out[name] = marginal
    return out


class UpstreamHindsightGuide:
    r"""A guide for a larger model: draws discrete upstream sites jointly from
    :math:`p(z \mid w^{\text{obs}})` (``infer_discrete`` on the collapsed model), then the
    LM noise from :math:`p(u \mid z, w^{\text{obs}})` with :class:`HindsightGumbelGuide`.

    :param collapsed_model: the larger model built on a collapsed SCM.
    :param collapsed_scm: that SCM (``collapsed=True``).
    :param scm: the same SCM with noise sites (``collapsed=False``, same ``name``).
    :param observed: observed continuation ids ``(n,)``.
    :param sites: names of the discrete upstream sample sites to draw.
    :param max_plate_nesting: the model's plate nesting.
    """

    def __init__(
        self,
        collapsed_model: Callable,
        collapsed_scm: LanguageModelSCM,
        scm: LanguageModelSCM,
        observed: torch.Tensor,
        sites: Sequence[str],
        max_plate_nesting: int = 0,
    ) -> None:
        if not collapsed_scm.collapsed or scm.collapsed or collapsed_scm.name != scm.name:
            raise InferenceError(
                "UpstreamHindsightGuide needs a collapsed SCM and a non-collapsed SCM with the same name."
            )
        self.sampler = infer_discrete(
            _conditioned(collapsed_model, collapsed_scm, observed),
            first_available_dim=-1 - max_plate_nesting,
            temperature=1,
        )
        self.scm = scm
        self.observed = observed
        self.sites = list(sites)
        self.noise_guide = HindsightGumbelGuide(scm, observed)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        with poutine.block():  # the enumerated run is not part of this guide's trace
            trace = poutine.trace(self.sampler).get_trace(*args, **kwargs)
        for name in self.sites:
            value = trace.nodes[name]["value"]
            point = dist.Delta if value.is_floating_point() else IntegerDelta
            pyro.sample(name, point(value, event_dim=trace.nodes[name]["fn"].event_dim))
        self.noise_guide(trace.nodes[self.scm.site(PROMPT)]["value"])
