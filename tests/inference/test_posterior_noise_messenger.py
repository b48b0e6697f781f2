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


def test_baseline_rows_draw_prior_noise_from_their_generator_with_plates_inside_or_outside(lm):
    """`num_posterior_rows=3` of 5: the first rows get the posterior (the same draws as a run
    without baseline rows), the others the prior from the baseline generator (the same
    draws whatever the seed of torch's generator); the plate may be inside or outside the
    handler. The traced sites' log densities are the posterior's on the first rows and the
    prior's on the others."""
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    guide = HindsightGumbelGuide(scm, OBSERVED)
    anchor = guide.anchor(PROMPT)

    def run(rows, seed, generator_seed, outside):
        pyro.set_rng_seed(seed)
        generator = torch.Generator().manual_seed(generator_seed)
        posterior_rows = 3 if rows > 3 else None
        handler = PosteriorNoiseMessenger(guide, anchor, posterior_rows, baseline_generator=generator)
        plate = pyro.plate("rows", rows, dim=-1)
        with (plate if outside else handler), (handler if outside else plate):
            return poutine.trace(scm.model).get_trace(PROMPT), handler

    for outside in (False, True):
        (trace, handler), (alone, _) = run(5, 0, 7, outside), run(3, 0, 7, outside)
        (reseeded, _) = run(5, 1, 7, outside)
        for t in range(4):
            u = trace.nodes[f"u_{t}"]["value"]
            assert u.shape == (5, lm.vocab_size)
            assert torch.equal(u[:3], alone.nodes[f"u_{t}"]["value"])  # the posterior rows
            assert torch.equal(u[3:], reseeded.nodes[f"u_{t}"]["value"][3:])  # the baseline generator's
            assert not torch.equal(u[:3], reseeded.nodes[f"u_{t}"]["value"][:3])  # torch's generator
        assert handler.noise_statistics()["observed_noise"].shape == (3, 3)
        trace.compute_log_prob()
        logits = guide.decoded_logits(anchor)
        for t in range(3):
            u, log_prob = trace.nodes[f"u_{t}"]["value"], trace.nodes[f"u_{t}"]["log_prob"]
            posterior = GumbelMaxPosterior(logits[t], OBSERVED[t])
            torch.testing.assert_close(log_prob[:3], posterior.log_prob(u[:3]))
            torch.testing.assert_close(log_prob[3:], scm.noise.log_density(u[3:]))
            assert bool((posterior.log_prob(u[3:]) == float("-inf")).any())  # baseline rows are not posterior draws


def test_a_prompt_or_its_anchor_give_the_same_draws(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    guide = HindsightGumbelGuide(scm, OBSERVED)
    draws = []
    for source in (PROMPT, guide.anchor(PROMPT)):
        pyro.set_rng_seed(0)
        with PosteriorNoiseMessenger(guide, source), pyro.plate("rows", 6, dim=-1):
            draws.append(scm.model(PROMPT))
    assert torch.equal(draws[0], draws[1])


def test_no_private_pyro_stack_in_the_package():
    """Handlers supply values through the message (``msg["fn"]``, Pyro's GuideMessenger
    protocol), never by reading Pyro's private handler stack or calling another
    Messenger's hooks."""
    import pathlib

    import pyro_lmscm

    root = pathlib.Path(pyro_lmscm.__file__).parent
    sources = {path: path.read_text(encoding="utf-8") for path in root.rglob("*.py")}
    assert len(sources) > 20
    for forbidden in ("_PYRO_STACK", "BroadcastMessenger._pyro_sample", "Messenger._process_message"):
        assert [str(path) for path, text in sources.items() if forbidden in text] == [], forbidden
