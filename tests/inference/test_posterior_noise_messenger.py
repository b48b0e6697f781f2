"""The handlers own the effects: lazily drawn posterior noise has the guide's law, and
abduction, replay and counterfactual() leave nothing on the SCM or on a distribution."""

from __future__ import annotations

import copy

import pyro
import pyro.poutine as poutine
import torch
from scipy import stats

from pyro_lmscm import HindsightGumbelGuide, LanguageModelSCM, counterfactual
from pyro_lmscm.inference import GumbelMaxPosterior, PosteriorNoiseMessenger, abduct
from pyro_lmscm.interventions import ActivationSteering
from pyro_lmscm.models import Decoding

PROMPT = torch.tensor([2, 3, 4])
OBSERVED = torch.tensor([7, 3, 3])


def _site_values(model, *handlers, n=4000):
    with pyro.plate("draws", n, dim=-1):
        for handler in handlers:
            model = handler(model)
        trace = poutine.trace(model).get_trace(PROMPT)
    return {name: site["value"] for name, site in trace.nodes.items() if name.startswith("u_")}


def test_lazy_noise_has_the_law_of_the_traced_guide(lm):
    """Two-sample KS of the observed token's noise and of a losing token's noise, at each
    observed step and one step after: the handler's draws against the traced guide's
    (p > 0.001), and the prior as the baseline that must fail at the observed steps."""
    torch.manual_seed(0)
    scm = LanguageModelSCM(lm, max_new_tokens=4, decoding=Decoding(temperature=1.5))
    guide = HindsightGumbelGuide(scm, OBSERVED)
    lazy = _site_values(scm.model, lambda m: PosteriorNoiseMessenger(guide, PROMPT)(m))
    traced = _site_values(guide)
    prior = _site_values(scm.model)
    with PosteriorNoiseMessenger(guide, PROMPT), pyro.plate("rows", 4000, dim=-1):
        trace = poutine.trace(scm.model).get_trace(PROMPT)
    outside = {name: site["value"] for name, site in trace.nodes.items() if name.startswith("u_")}
    for draws in (lazy, outside):  # inside or outside the plate: one independent draw per row
        assert all(value.shape == (4000, lm.vocab_size) for value in draws.values())
        assert len(torch.unique(draws["u_0"][:, 0])) > 3990
    for t in range(4):
        for token in (int(OBSERVED[min(t, 2)]), 0):
            a, b, c = (d[f"u_{t}"][:, token].numpy() for d in (lazy, traced, prior))
            assert stats.ks_2samp(a, b).pvalue > 1e-3, (t, token)
            if t < 3 and token != 0:
                assert stats.ks_2samp(a, c).pvalue < 1e-6, (t, token)  # the baseline fails
    with PosteriorNoiseMessenger(guide, PROMPT), guide.anchored(PROMPT), pyro.plate("draws", 200, dim=-1):
        tokens = scm.model(PROMPT)
    assert bool((tokens[:, :3] == OBSERVED).all())


def _state(obj):
    """Every attribute, with tensors and containers copied, to compare by value and identity."""
    return {name: (id(value), copy.deepcopy(value) if isinstance(value, torch.Tensor) else repr(value))
            for name, value in vars(obj).items()}


def _equal(a, b):
    if a.keys() != b.keys():
        return False
    for name in a:
        (ida, va), (idb, vb) = a[name], b[name]
        if ida != idb:
            return False
        if isinstance(va, torch.Tensor) and not torch.equal(va, vb):
            return False
        if not isinstance(va, torch.Tensor) and va != vb:
            return False
    return True


def test_inference_leaves_no_state_on_the_scm_or_a_distribution(lm):
    steer = ActivationSteering(torch.ones(32), layer=0, alpha=0.5)
    scm = LanguageModelSCM(lm, max_new_tokens=5, decoding=Decoding(top_k=20), mechanisms={"steer": steer})
    before = _state(scm)
    counterfactual(scm, PROMPT, None, {"mechanism": "steer"}, num_samples=3, seed=0, baseline=True)
    counterfactual(scm, PROMPT, OBSERVED, {"w_1": 5}, num_samples=3, seed=0, deterministic=True)
    result = abduct(scm, PROMPT, OBSERVED, "exact", num_samples=4, seed=0)
    result.counterfactual({"mechanism": "steer"})
    result.interventional({"mechanism": "steer"}, seed=0)
    guide = HindsightGumbelGuide(scm, OBSERVED)
    with pyro.plate("draws", 3, dim=-1):
        trace = poutine.trace(guide).get_trace(PROMPT)
        with guide.anchored(PROMPT):
            poutine.replay(scm.model, trace=trace)(PROMPT)
    assert _equal(_state(scm), before)
    posterior = trace.nodes["u_0"]["fn"]
    snapshot = _state(posterior)
    posterior.sample((5,))
    posterior.log_prob(posterior.sample())
    assert isinstance(posterior, GumbelMaxPosterior) and _equal(_state(posterior), snapshot)


def test_factual_sampling_does_not_depend_on_an_earlier_abduction(lm):
    """Sampling after abducting a string with the same prompt equals sampling on a fresh SCM
    (before, the guide left its anchor on the SCM, and the memoised logits fed later runs)."""
    fresh = counterfactual(LanguageModelSCM(lm, max_new_tokens=5), PROMPT, None, {}, seed=3).factual_ids
    scm = LanguageModelSCM(lm, max_new_tokens=5)
    counterfactual(scm, PROMPT, OBSERVED, {}, num_samples=2, seed=0)
    assert torch.equal(counterfactual(scm, PROMPT, None, {}, seed=3).factual_ids, fresh)
