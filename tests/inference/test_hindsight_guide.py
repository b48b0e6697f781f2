from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Importance, Trace_ELBO
from scipy import stats

from pyro_lmscm import (
    HindsightGumbelGuide,
    LanguageModelSCM,
    Mechanism,
    ModelSwap,
    counterfactual,
)
from pyro_lmscm.errors import AbductionError, InferenceError, InterventionError, ObservationError
from pyro_lmscm.inference import GumbelMaxPosterior, noise_trace
from pyro_lmscm.interventions.ops import as_do_data
from pyro_lmscm.models import Decoding, noise_site
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3, 4])

DECODINGS = {
    "plain": Decoding(),
    "temperature": Decoding(temperature=0.6),
    "top-k": Decoding(top_k=4),
    "top-p": Decoding(top_p=0.8),
}


def log_prob_by_hand(lm, decoding, prompt, observed):
    """log p(observed | prompt) from the HF model's logits, independently of the guide."""
    with torch.no_grad():
        logits = lm.model(torch.cat([prompt, observed])[None]).logits[0].float()
    logits = decoding(logits[len(prompt) - 1 : -1])
    log_p = logits.log_softmax(-1).gather(-1, observed[:, None])[:, 0]
    ends = (observed == 1).nonzero()
    length = int(ends[0]) + 1 if len(ends) else len(observed)  # padding after the end is certain
    return float(log_p[:length].sum())


def random_string_in_support(lm, decoding, prompt, length, generator):
    """Uniformly random tokens, each drawn from the decoding support of its prefix."""
    ids = prompt.clone()
    for _ in range(length):
        support = torch.isfinite(decoding(lm.logits(ids)[-1])) & (torch.arange(lm.vocab_size) != 1)
        choices = torch.nonzero(support).flatten()
        ids = torch.cat([ids, choices[torch.randint(len(choices), (1,), generator=generator)]])
    return ids[len(prompt) :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decoding", list(DECODINGS), ids=list(DECODINGS))
@pytest.mark.parametrize("source", ["sampled", "random"])
def test_null_intervention_replay_reproduces_observation(dtype, decoding, source):
    lm = tiny_llama(seed=0, dtype=dtype)
    scm = LanguageModelSCM(lm, max_new_tokens=12, decoding=DECODINGS[decoding])
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        if source == "sampled":
            observed = None
        else:
            observed = random_string_in_support(lm, scm.decoding, PROMPT, 12, generator)
        result = counterfactual(scm, PROMPT, observed, {}, num_samples=64, seed=i)
        n = len(result.factual_ids)
        assert torch.equal(result.counterfactual_ids[:, :n], result.factual_ids.expand(64, n))
        assert bool((result.counterfactual_ids[:, n:] == lm.pad_token_id).all()) or n == 12


def _rejection_noise(scm, prompt, observed, num_draws):
    """Brute force posterior: prior noise of the draws whose factual string is `observed`."""
    with pyro.plate("draws", num_draws, dim=-1):
        trace = poutine.trace(scm.model).get_trace(prompt)
    factual = trace.nodes["_RETURN"]["value"]
    keep = (factual == observed).all(-1)
    return {noise_site(t): trace.nodes[noise_site(t)]["value"][keep] for t in range(len(observed))}


def _rejection_counterfactuals(scm, prompt, observed, num_draws):
    """Brute force: prior noise, keep draws whose factual string is `observed`, replay them."""
    noise = _rejection_noise(scm, prompt, observed, num_draws)
    intervened = poutine.do(scm.model, data={"mechanism": torch.tensor(1)})
    return poutine.condition(intervened, data=noise)(prompt)


def _chi2_pvalue(a, b):
    """Two-sample chi-square test on whole strings; categories with < 10 counts are pooled."""
    rows = [tuple(r) for r in a.tolist()], [tuple(r) for r in b.tolist()]
    keys = sorted(set(rows[0]) | set(rows[1]))
    table = torch.tensor([[r.count(k) for k in keys] for r in rows], dtype=torch.float64)
    big = table.sum(0) >= 10
    table = torch.cat([table[:, big], table[:, ~big].sum(1, keepdim=True)], 1)
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table.numpy()).pvalue


def _traced_guide_counterfactuals(scm, prompt, observed, num_draws, margin):
    """The guide as a Pyro guide: its sites traced under a plate, replayed through `do`."""
    guide = HindsightGumbelGuide(scm, observed, margin=margin)
    with pyro.plate("draws", num_draws, dim=-1):
        guide_trace = poutine.trace(guide).get_trace(prompt)
        intervened = poutine.do(scm.model, data=as_do_data(scm, {"mechanism": "other"}))
        return poutine.replay(intervened, trace=guide_trace)(prompt)


def _guide_messenger_counterfactuals(scm, prompt, observed, num_draws, margin):
    """The guide as Pyro's GuideMessenger around the intervened model, the plate outside it:
    each u_t drawn from the posterior when the model reaches it."""
    guide = HindsightGumbelGuide(scm, observed, margin=margin)
    intervened = poutine.do(scm.model, data=as_do_data(scm, {"mechanism": "other"}))
    with pyro.plate("draws", num_draws, dim=-1), guide:
        return intervened(prompt)


def _vocab6_problem():
    """A vocabulary of 6, 3 steps, a model swap, and the most likely string of 3 ordinary
    tokens as the observation (so that rejection sampling is efficient)."""
    lm = tiny_llama(vocab_size=6, seed=5, logit_scale=15.0, with_tokenizer=False)
    other = tiny_llama(vocab_size=6, seed=6, logit_scale=15.0, with_tokenizer=False)
    scm = LanguageModelSCM(lm, max_new_tokens=3, mechanisms={"other": ModelSwap(other)})
    prompt = torch.tensor([2, 3])
    candidates = torch.cartesian_prod(*[torch.arange(2, 6)] * 3)
    log_probs = [log_prob_by_hand(lm, scm.decoding, prompt, c) for c in candidates]
    return scm, prompt, candidates[int(torch.tensor(log_probs).argmax())]


@pytest.mark.parametrize("path", ["counterfactual", "traced-guide", "guide-messenger"])
@pytest.mark.parametrize("margin", [0.0, 1e-3], ids=["exact", "small-margin"])
def test_counterfactual_distribution_matches_brute_force(margin, path):
    scm, prompt, observed = _vocab6_problem()
    reference = _rejection_counterfactuals(scm, prompt, observed, 150_000)
    assert len(reference) > 5000
    result = counterfactual(
        scm, prompt, observed, {"mechanism": "other"}, num_samples=len(reference), seed=1, margin=margin, baseline=True
    )
    if path == "counterfactual":  # PosteriorNoiseMessenger, each step drawn when decoded
        draws = result.counterfactual_ids
    else:
        pyro.set_rng_seed(2)
        paths = {"traced-guide": _traced_guide_counterfactuals, "guide-messenger": _guide_messenger_counterfactuals}
        draws = paths[path](scm, prompt, observed, len(reference), margin)
    p_guide = _chi2_pvalue(draws, reference)
    p_baseline = _chi2_pvalue(result.interventional_ids, reference)
    assert p_guide > 1e-3, p_guide
    assert p_baseline < 1e-6, p_baseline  # fresh noise is not the counterfactual


def test_guide_messenger_draws_the_exact_posterior_noise():
    """`with guide: scm.model(prompt)` (Pyro's GuideMessenger, the plate inside it): the noise
    it draws has the law of rejection sampling (prior noise of the draws whose factual string
    is the observation), two-sample KS per step and token, p > 1e-3; prior noise, the
    baseline, fails at each observed token (p < 1e-6). The same draws come back from
    `guide.get_traces()`, with the prior in the model trace, and `guide(prompt)` returns
    samples of the same law."""
    scm, prompt, observed = _vocab6_problem()
    reference = _rejection_noise(scm, prompt, observed, 150_000)
    num_draws = len(reference["u_0"])
    assert num_draws > 5000
    guide = HindsightGumbelGuide(scm, observed)
    anchor = guide.anchor(prompt)
    pyro.set_rng_seed(3)
    with guide.anchored(anchor), guide, pyro.plate("draws", num_draws, dim=-1):
        tokens = scm.model(prompt)
    assert torch.equal(tokens, observed.expand(num_draws, 3))
    model_trace, guide_trace = guide.get_traces()
    assert isinstance(guide_trace.nodes["u_0"]["fn"], GumbelMaxPosterior)
    assert not isinstance(model_trace.nodes["u_0"]["fn"], GumbelMaxPosterior)  # the prior
    with pyro.plate("draws", num_draws, dim=-1):
        called = guide(prompt)  # the Pyro way: the guide runs its model (the noise) under itself
    assert sorted(called) == ["u_0", "u_1", "u_2"]
    prior = torch.distributions.Gumbel(0.0, 1.0).sample((num_draws, scm.vocab_size))
    for t in range(3):
        for v in range(scm.vocab_size):
            expected = reference[f"u_{t}"][:, v].numpy()
            for draws in (guide_trace.nodes[f"u_{t}"]["value"], called[f"u_{t}"]):
                assert draws.shape == (num_draws, scm.vocab_size)
                assert stats.ks_2samp(draws[:, v].numpy(), expected).pvalue > 1e-3, (t, v)
            if v == int(observed[t]):
                assert stats.ks_2samp(prior[:, v].numpy(), expected).pvalue < 1e-6, (t, v)


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_tensors_in(v) for v in value)
    if isinstance(value, dict):
        return any(_tensors_in(v) for v in value.values())
    return False


def test_each_run_abducts_for_its_own_prompt_and_leaves_no_logits(lm):
    """No memo: runs for two prompts each draw the posterior of their own prompt (the replay
    through that prompt's anchor gives the observation back; the other prompt's noise, the
    baseline, does not), and after the runs the guide holds no tensor but its observation
    and the observation's active steps, made once from it (and Pyro's trace of the last run)."""
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    observed = torch.tensor([5, 9, 14, 7])
    guide = HindsightGumbelGuide(scm, observed)
    prompts = torch.tensor([2, 3, 4]), torch.tensor([6, 2, 8])
    traces = []
    for prompt in prompts:
        with pyro.plate("draws", 50, dim=-1):
            traces.append(poutine.trace(guide).get_trace(prompt))
    with pyro.plate("draws", 50, dim=-1), guide:
        scm.model(prompts[1])
    runs = [guide.trace.nodes[noise_site(t)]["value"] for t in range(4)]
    held = {name for name, value in vars(guide).items() if name != "trace" and _tensors_in(value)}
    assert held == {"observed_ids", "_observed_active"}
    assert torch.equal(guide._observed_active, guide.step_is_active(observed))
    for i, prompt in enumerate(prompts):
        with pyro.plate("draws", 50, dim=-1), guide.anchored(prompt):
            own = poutine.replay(scm.model, trace=traces[i])(prompt)
            other = poutine.replay(scm.model, trace=traces[1 - i])(prompt)
        assert torch.equal(own, observed.expand(50, 4))
        assert not bool((other == observed).all(-1).all())
    with pyro.plate("draws", 50, dim=-1), guide.anchored(prompts[1]):
        replayed = poutine.condition(scm.model, data={noise_site(t): runs[t] for t in range(4)})(prompts[1])
    assert torch.equal(replayed, observed.expand(50, 4))


def test_anchor_is_checked_and_reused(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    guide = HindsightGumbelGuide(scm, torch.tensor([5, 9]))
    anchor = guide.anchor(PROMPT)
    assert guide.anchor(anchor) is anchor
    assert torch.equal(guide.decoded_logits(anchor), guide.decoded_logits(PROMPT))
    assert torch.equal(guide.log_prob_observed(anchor), guide.log_prob_observed(PROMPT))
    with pytest.raises(InferenceError, match="another observation"):
        HindsightGumbelGuide(scm, torch.tensor([5, 8])).decoded_logits(anchor)
    with pytest.raises(InferenceError, match="no prompt"):
        with guide:  # a model without the SCM's prompt site
            pyro.sample("u_0", dist.Gumbel(torch.zeros(28), 1.0).to_event(1))


@pytest.mark.parametrize("decoding", list(DECODINGS), ids=list(DECODINGS))
def test_importance_weights_are_constant_log_probability(lm, decoding):
    scm = LanguageModelSCM(lm, max_new_tokens=6, decoding=DECODINGS[decoding])
    observed = poutine.trace(scm.model).get_trace(PROMPT).nodes["_RETURN"]["value"]
    guide = HindsightGumbelGuide(scm, observed, margin=0.0)
    conditioned = poutine.condition(scm.model, data=scm.observations(observed))
    posterior = Importance(conditioned, guide=guide, num_samples=20).run(PROMPT)
    log_weights = torch.stack(posterior.log_weights)
    expected = log_prob_by_hand(lm, scm.decoding, PROMPT, observed)
    torch.testing.assert_close(log_weights, torch.full_like(log_weights, expected), atol=1e-4, rtol=0)
    loss = Trace_ELBO().loss(conditioned, guide, PROMPT)
    assert abs(loss + expected) < 1e-4
    # baseline, the prior as proposal: weight log p(w | u) is 0 or -inf, never log p(w)
    for _ in range(20):
        trace = poutine.trace(conditioned).get_trace(PROMPT)
        weight = sum(trace.nodes[f"w_{t}"]["fn"].log_prob(observed[t]) for t in range(len(observed)))
        assert float(weight) in (0.0, float("-inf"))


def test_margin_weights_are_log_probability_of_winning_by_margin(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    observed = torch.tensor([5, 6, 7])
    guide = HindsightGumbelGuide(scm, observed, margin=0.1)
    conditioned = poutine.condition(scm.model, data=scm.observations(observed))
    log_weights = torch.stack(Importance(conditioned, guide=guide, num_samples=10).run(PROMPT).log_weights)
    exact = log_prob_by_hand(lm, scm.decoding, PROMPT, observed)
    assert float(log_weights.std()) < 1e-4  # float32 cancellation of sums of ~100 terms
    assert exact - 3 * guide.margin - 1e-5 <= float(log_weights[0]) < exact - 1e-3
    logits = scm.decoding(lm.logits(torch.cat([PROMPT, observed[:-1]]))[len(PROMPT) - 1 :])
    shifted = logits - 0.1 * torch.nn.functional.one_hot(observed, lm.vocab_size)
    by_hand = float(shifted.log_softmax(-1).gather(-1, observed[:, None]).sum())
    assert abs(float(log_weights[0]) - by_hand) < 1e-4


class _Boost(Mechanism):
    """Adds `boost` to the logit of the observed token at each step (a test mechanism)."""

    def __init__(self, lm, prompt_length, observed, boost):
        self.lm, self.prompt_length, self.observed, self.boost = lm, prompt_length, observed, boost

    def activate(self, lm):
        return nullcontext(self)

    def _boosted(self, logits, cache):
        t = cache.get_seq_length() - self.prompt_length
        if t < len(self.observed):
            logits = logits.clone()
            logits[:, self.observed[t]] += self.boost
        return logits

    def prefill(self, input_ids, max_length=None):
        logits, cache = self.lm.prefill(input_ids, max_length)
        return self._boosted(logits, cache), cache

    def step(self, tokens, cache):
        logits, cache = self.lm.step(tokens, cache)
        return self._boosted(logits, cache), cache


@pytest.mark.parametrize("decoding", list(DECODINGS), ids=list(DECODINGS))
def test_counterfactual_stability(lm, decoding):
    """Raising only the observed token's logit never changes the counterfactual string."""
    observed = torch.tensor([5, 9, 14, 7, 3, 11])
    for boost, changes in [(2.0, False), (-3.0, True)]:
        scm = LanguageModelSCM(
            lm, max_new_tokens=6, decoding=DECODINGS[decoding],
            mechanisms={"boost": _Boost(lm, len(PROMPT), observed, boost)},
        )
        if decoding in ("top-k", "top-p"):
            observed_here = counterfactual(scm, PROMPT, None, {}, seed=5).factual_ids
            scm.mechanisms[1].observed = observed_here
        else:
            observed_here = observed
        result = counterfactual(scm, PROMPT, observed_here, {"mechanism": "boost"}, num_samples=200, seed=0)
        n = len(observed_here)
        unchanged = (result.counterfactual_ids[:, :n] == observed_here).all(-1)
        if changes:  # the baseline mechanism must fail the same check
            assert not bool(unchanged.all())
        else:
            assert bool(unchanged.all())


def test_do_on_a_token(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=6)
    observed = torch.tensor([5, 9, 14, 7, 3, 11])
    result = counterfactual(scm, PROMPT, observed, {"w_2": 20}, num_samples=50, seed=0)
    assert bool((result.counterfactual_ids[:, :2] == observed[:2]).all())
    assert bool((result.counterfactual_ids[:, 2] == 20).all())
    # the suffix is a counterfactual: it varies across posterior draws only through the noise
    assert result.counterfactual_ids[:, 3:].unique(dim=0).shape[0] >= 1


def test_do_on_the_prompt_replays_noise_through_the_new_prompt(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=5)
    observed = torch.tensor([5, 9, 14, 7, 3])
    guide = HindsightGumbelGuide(scm, observed)
    new_prompt = torch.tensor([2, 6, 7])
    with pyro.plate("draws", 10, dim=-1):
        guide_trace = poutine.trace(guide).get_trace(PROMPT)
        cf = poutine.replay(poutine.do(scm.model, data={"prompt": new_prompt}), trace=guide_trace)(PROMPT)
        noise = {noise_site(t): guide_trace.nodes[noise_site(t)]["value"] for t in range(5)}
        by_hand = poutine.condition(scm.model, data=noise)(new_prompt)
    assert torch.equal(cf, by_hand)


def test_guide_composes_with_plate(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    guide = HindsightGumbelGuide(scm, torch.tensor([5, 9]))
    with pyro.plate("draws", 30, dim=-1):
        trace = poutine.trace(guide).get_trace(PROMPT)
    u0 = trace.nodes["u_0"]["value"]
    assert u0.shape == (30, lm.vocab_size)
    assert u0.unique(dim=0).shape[0] == 30
    assert trace.nodes["u_3"]["value"].shape == (30, lm.vocab_size)  # prior beyond the observation


def test_sample_noise_has_the_law_of_the_traced_sites(lm):
    """One vectorised draw of every site: posterior at the observed steps (same law as the
    traced guide's sites, two-sample KS per coordinate), Gumbel(0, 1) prior after them; a
    baseline of prior noise fails the same test."""
    scm = LanguageModelSCM(lm, max_new_tokens=5)
    observed = torch.tensor([5, 9, 14])
    guide = HindsightGumbelGuide(scm, observed)
    pyro.set_rng_seed(0)
    u = guide.sample_noise(PROMPT, (4000,))
    assert u.shape == (4000, 5, lm.vocab_size)
    logits = guide.decoded_logits(PROMPT)
    assert torch.equal((logits + u[:, :3]).argmax(-1), observed.expand(4000, 3))
    with pyro.plate("draws", 4000, dim=-1):
        trace = poutine.trace(guide).get_trace(PROMPT)
    prior = torch.distributions.Gumbel(0.0, 1.0).sample((4000, lm.vocab_size))
    for t, v in [(0, 5), (0, 0), (2, 14), (2, 3)]:
        traced = trace.nodes[noise_site(t)]["value"][:, v].numpy()
        assert stats.ks_2samp(u[:, t, v].numpy(), traced).pvalue > 1e-3, (t, v)
        if v == int(observed[t]):  # the winner's noise is far from the prior
            assert stats.ks_2samp(prior[:, v].numpy(), traced).pvalue < 1e-6, (t, v)
    for t in (3, 4):
        assert stats.kstest(u[:, t].flatten().numpy(), "gumbel_r").pvalue > 1e-3
    batched = HindsightGumbelGuide(scm, torch.tensor([[5, 9, 1], [5, 9, 14]]))
    assert batched.sample_noise(PROMPT, (7,)).shape == (7, 2, 5, lm.vocab_size)


def test_noise_trace_checks_the_shape(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=5)
    with pytest.raises(ValueError, match=r"\(\.\.\., 5, 28\)"):
        noise_trace(scm, torch.zeros(3, 4, lm.vocab_size))
    named = LanguageModelSCM(lm, max_new_tokens=2, name="lm")
    assert list(noise_trace(named, torch.zeros(3, 2, lm.vocab_size)).nodes) == ["lm/u_0", "lm/u_1"]


def test_batched_observations_with_padding(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=5)
    observed = torch.tensor([[5, 9, 1, 0, 0], [5, 9, 14, 7, 3]])
    guide = HindsightGumbelGuide(scm, observed)
    with pyro.plate("draws", 20, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(PROMPT)
        replayed = poutine.replay(scm.model, trace=guide_trace)(PROMPT)
    assert torch.equal(replayed, observed.expand(20, 2, 5))


@pytest.mark.parametrize(
    "observed, error, match",
    [
        (torch.tensor([], dtype=torch.long), ObservationError, "empty"),
        (torch.tensor([5, 99]), ObservationError, "outside the vocabulary"),
        (torch.tensor([5] * 7), ObservationError, "max_new_tokens=6"),
        (torch.tensor([5.0, 6.0]), ObservationError, "integer"),
    ],
)
def test_bad_observations(lm, observed, error, match):
    scm = LanguageModelSCM(lm, max_new_tokens=6)
    with pytest.raises(error, match=match):
        counterfactual(scm, PROMPT, observed)


def test_zero_probability_observation(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4, decoding=Decoding(top_k=1))
    greedy = counterfactual(scm, PROMPT, None).factual_ids
    bad = greedy.clone()
    bad[1] = (greedy[1] + 1) % lm.vocab_size
    with pytest.raises(AbductionError, match="step 1 .*probability zero"):
        counterfactual(scm, PROMPT, bad)


def test_observation_too_long_for_the_context(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=10)
    with pytest.raises(ObservationError, match="context of 128"):
        counterfactual(scm, torch.full((125,), 3), torch.tensor([5]))


@pytest.mark.parametrize(
    "intervention, match",
    [
        ({"nope": 1}, "unknown site 'nope'"),
        ({"mechanism": "steered"}, "unknown mechanism 'steered'"),
        ({"u_0": torch.zeros(28)}, "noise site"),
        ({"w_9": 3}, "does not exist"),
        ({"w_1": 999}, r"\[0, 28\)"),
    ],
)
def test_bad_interventions(lm, intervention, match):
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    with pytest.raises(InterventionError, match=match):
        counterfactual(scm, PROMPT, torch.tensor([5, 6]), intervention)


def test_abduction_on_the_sampler_logits(lm):
    """A token the sampler emitted is abducted on the logits that sampled it: with top-k = 1
    and logits that make a non-greedy token the winner, the teacher-forced pass finds the
    observation impossible (baseline) while the recorded logits reproduce it."""
    scm = LanguageModelSCM(lm, max_new_tokens=3, decoding=Decoding(top_k=1))
    greedy = counterfactual(scm, PROMPT, None).factual_ids
    observed = (greedy + 1) % lm.vocab_size
    observed[observed == 1] = 2  # no end of sequence
    with pytest.raises(AbductionError):
        counterfactual(scm, PROMPT, observed)
    raw = torch.zeros(3, lm.vocab_size)
    raw[torch.arange(3), observed] = 5.0
    guide = HindsightGumbelGuide(scm, observed, raw_logits=raw)
    with pyro.plate("draws", 10, dim=-1):
        guide_trace = poutine.trace(guide).get_trace(PROMPT)
        with guide.anchored(PROMPT):  # the replay evaluates the factual model to the recorded logits
            replayed = poutine.replay(scm.model, trace=guide_trace)(PROMPT)
    assert torch.equal(replayed, observed.expand(10, 3))
    with pytest.raises(ObservationError, match="raw_logits"):
        HindsightGumbelGuide(scm, observed, raw_logits=raw[:2])
    # logits of another dtype than floating were used as numbers (bool: 0 and 1), silently
    for dtype in (torch.bool, torch.long, torch.complex64):
        with pytest.raises(ObservationError, match=f"floating tensor .* got a {dtype} tensor"):
            HindsightGumbelGuide(scm, observed, raw_logits=raw.to(dtype))


def test_sampled_observation_is_abducted_on_recorded_logits(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=5, decoding=Decoding(top_k=3))
    with scm.record_logits() as steps:
        tokens = scm.model(PROMPT)
    assert len(steps) == 5 and steps[0].shape == (lm.vocab_size,)
    assert vars(scm).keys() == vars(LanguageModelSCM(lm, max_new_tokens=5)).keys()  # nothing left on the SCM
    assert bool((torch.isfinite(scm.decoding(torch.stack(steps))).gather(-1, tokens[:, None])).all())
