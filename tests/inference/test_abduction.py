import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from pyro_lmscm import HindsightGumbelGuide, LanguageModelSCM, ModelSwap
from pyro_lmscm.errors import InferenceError, LMSCMError
from pyro_lmscm.inference import (
    METHODS,
    NUTS_MAX_VOCAB,
    RelaxedGumbelMaxModel,
    RelaxedSVI,
    abduct,
    kish_ess,
    make_method,
)
from pyro_lmscm.models import noise_site
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3, 4])


def sampled_string(scm, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return scm.model(PROMPT)


@pytest.fixture(scope="module")
def six():
    lm = tiny_llama(vocab_size=6, seed=5, logit_scale=15.0, with_tokenizer=False)
    return LanguageModelSCM(lm, max_new_tokens=3)


def test_exact_draws_reproduce_with_full_effective_sample_size(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=6)
    observed = sampled_string(scm, 0)
    result = abduct(scm, PROMPT, observed, "exact", num_samples=300, seed=0)
    assert sorted(result.noise) == [noise_site(t) for t in range(6)]
    assert all(u.shape == (300, lm.vocab_size) for u in result.noise.values())
    assert result.reproduction_rate == 1.0  # by replaying the model
    assert torch.equal(result.reproduces, result.consistent)
    assert result.ess == 300.0
    # weights against the exact posterior are constant: ESS = N up to float32 rounding
    assert result.exact_ess == pytest.approx(300.0, rel=1e-6)
    assert float(result.log_weights_to_exact.std()) < 1e-3


def test_exact_observed_noise_has_its_closed_form(lm):
    r"""u_{t,k} = M_t - l_{t,k} with M_t ~ Gumbel(logsumexp l_t): a KS test per step passes for
    exact draws and fails for prior draws (no abduction)."""
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    observed = torch.tensor([5, 9, 14, 7])
    logits = HindsightGumbelGuide(scm, observed).decoded_logits(PROMPT)
    exact = abduct(scm, PROMPT, observed, "exact", num_samples=2000, seed=0).noise_statistics()
    prior = abduct(scm, PROMPT, observed, "prior", num_samples=2000, seed=0).noise_statistics()
    for t in range(4):
        loc = float(logits[t].logsumexp(-1) - logits[t, observed[t]])
        assert stats.kstest(exact["observed_noise"][:, t].numpy(), stats.gumbel_r(loc=loc).cdf).pvalue > 1e-3
        assert stats.kstest(prior["observed_noise"][:, t].numpy(), stats.gumbel_r(loc=loc).cdf).pvalue < 1e-6
        # the top Gumbel is Gumbel(logsumexp l_t) under both: the max is independent of the argmax
        top = stats.gumbel_r(loc=float(logits[t].logsumexp(-1))).cdf
        assert stats.kstest(exact["top_gumbel"][:, t].numpy(), top).pvalue > 1e-3


def test_importance_ess_falls_with_string_length(lm):
    """Kish's ESS of the indicator weights is the number of accepted prior draws, about
    N p(observed), which falls geometrically with the length; exact abduction keeps ESS = N."""
    scm = LanguageModelSCM(lm, max_new_tokens=8)
    observed = sampled_string(scm, 3)
    num_samples = 3000
    importance, exact = [], []
    for n in (1, 2, 4, 8):
        prefix = observed[:n]
        result = abduct(scm, PROMPT, prefix, "importance", num_samples=num_samples, seed=n)
        p = float(HindsightGumbelGuide(scm, prefix).log_prob_observed(PROMPT).exp())
        expected, sd = num_samples * p, (num_samples * p * (1 - p)) ** 0.5
        assert abs(result.ess - expected) < 4 * sd + 1, (n, result.ess, expected)
        assert result.ess == pytest.approx(float(result.consistent.sum())) == result.exact_ess
        importance.append(result.ess)
        exact.append(abduct(scm, PROMPT, prefix, "exact", num_samples=num_samples, seed=n).ess)
    assert importance[0] > importance[1] > importance[2] > importance[3]
    assert importance[3] < 0.05 * importance[0]
    # baseline: the exact method's ESS does not fall
    assert not (exact[0] > exact[1] > exact[2] > exact[3])
    assert exact == [num_samples] * 4


def test_relaxed_svi_reproduction_rises_as_temperature_falls(lm):
    """Measured by replaying the model on the draws. Baseline: the unfitted guide
    (num_steps=0) does not depend on the temperature, so its rate does not rise."""
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    observed = sampled_string(scm, 0)
    temperatures = (1.0, 0.1, 0.01)

    def rates(num_steps):
        return [
            abduct(
                scm, PROMPT, observed, "relaxed-svi", num_samples=400, seed=0,
                temperature=tau, num_steps=num_steps, num_particles=4,
            ).reproduction_rate
            for tau in temperatures
        ]

    fitted = rates(150)
    assert fitted[0] < fitted[1] < fitted[2], fitted
    assert fitted[2] - fitted[0] > 0.4 and fitted[2] > 0.8, fitted
    unfitted = rates(0)
    assert not (unfitted[0] < unfitted[1] < unfitted[2]), unfitted
    assert max(unfitted) < 0.5


def test_relaxed_svi_guides_and_their_weights(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    observed = sampled_string(scm, 0)
    for guide, rank in [("normal", None), ("lowrank", 3)]:
        result = abduct(
            scm, PROMPT, observed, "relaxed-svi", num_samples=200, seed=0,
            guide=guide, rank=rank, num_steps=100, temperature=0.05,
        )
        assert result.method.startswith("relaxed-svi τ=0.05")
        assert len(result.diagnostics["elbo_loss"]) == 100
        assert bool(torch.isfinite(result.log_proposal).all())
        assert result.ess == 200.0  # unweighted draws
        # against the exact posterior the Gaussian draws are worth far fewer
        assert 0.0 < result.exact_ess < 0.5 * result.reproduction_rate * 200
    # the fit does not touch the global parameter store
    assert len(pyro.get_param_store()) == 0


def test_relaxed_nuts_on_a_tiny_vocabulary(six):
    observed = sampled_string(six, 1)
    settings = dict(warmup_steps=30, temperature=0.1, max_tree_depth=4)
    result = abduct(six, PROMPT, observed, "relaxed-nuts", num_samples=40, seed=0, **settings)
    assert all(u.shape == (40, 6) for u in result.noise.values())
    assert result.method == "relaxed-nuts τ=0.1"
    assert torch.equal(result.reproduces, result.consistent)
    assert 0.0 < result.exact_ess <= 40.0
    assert make_method("relaxed-nuts", temperature=3.0).label == "relaxed-nuts τ=3"


def test_relaxed_nuts_refuses_a_large_vocabulary(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    with pytest.raises(InferenceError, match="vocab_size=28 exceeds max_vocab=16.*relaxed-svi"):
        abduct(scm, PROMPT, torch.tensor([5]), "relaxed-nuts", max_vocab=16)
    big = LanguageModelSCM(tiny_llama(vocab_size=NUTS_MAX_VOCAB + 1, with_tokenizer=False), max_new_tokens=2)
    with pytest.raises(InferenceError, match=f"exceeds max_vocab={NUTS_MAX_VOCAB}"):
        abduct(big, PROMPT, torch.tensor([5]), "relaxed-nuts")


def test_relaxed_likelihood_tends_to_the_indicator():
    torch.manual_seed(0)
    logits = torch.randn(3, 10) * 2
    observed = torch.tensor([1, 4, 7])
    noise = {noise_site(t): torch.distributions.Gumbel(0.0, 1.0).sample((500, 10)) for t in range(3)}
    wins = torch.ones(500, dtype=torch.bool)
    gaps = []
    for t in range(3):
        g = logits[t] + noise[noise_site(t)]
        wins &= g.argmax(-1) == observed[t]
        gaps.append((g[:, observed[t]] - g.scatter(-1, observed[t].expand(500, 1), -1e9).amax(-1)).abs())
    clear = torch.stack(gaps).amin(0) > 0.05  # leave out near-ties
    errors = []
    for tau in (1.0, 0.1, 0.001):
        likelihood = RelaxedGumbelMaxModel(logits, observed, tau).log_likelihood(noise).exp()
        errors.append(float((likelihood - wins.float())[clear].abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6, errors


@pytest.mark.parametrize(
    "logits, observed, match",
    [
        (torch.zeros(1, 3), torch.tensor([0, 1]), "`observed`"),  # was an IndexError at the call
        (torch.zeros(1, 3), torch.tensor([5]), "`observed`"),  # an IndexError
        (torch.zeros(3), torch.tensor([0]), "`logits`"),  # was taken: step 0 read one scalar logit
        ([[0.0, 1.0]], torch.tensor([0]), "`logits`"),  # an AttributeError
        (torch.tensor([[float("-inf"), 0.0]]), torch.tensor([0]), "-inf"),  # likelihood -inf for every u
    ],
)
def test_relaxed_model_refuses_malformed_logits_and_observations(logits, observed, match):
    with pytest.raises(InferenceError, match=match):
        RelaxedGumbelMaxModel(logits, observed, 0.1)
    # the baseline: well-formed (1, 3) logits and one observed id are taken
    assert RelaxedGumbelMaxModel(torch.zeros(1, 3), torch.tensor([2]), 0.1).observed.tolist() == [2]


def test_seeds(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    observed = torch.tensor([5, 9])
    for method in ("exact", "importance", "prior"):
        a = abduct(scm, PROMPT, observed, method, num_samples=5, seed=1)
        b = abduct(scm, PROMPT, observed, method, num_samples=5, seed=1)
        c = abduct(scm, PROMPT, observed, method, num_samples=5, seed=2)
        assert all(torch.equal(a.noise[k], b.noise[k]) for k in a.noise)
        assert not torch.equal(a.noise["u_0"], c.noise["u_0"])


def test_prediction_is_the_intervened_model_on_the_noise(lm, other_lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4, mechanisms={"other": ModelSwap(other_lm)})
    observed = sampled_string(scm, 0)
    result = abduct(scm, PROMPT, observed, "exact", num_samples=20, seed=0)
    cf = result.counterfactual({"mechanism": "other"})
    with pyro.plate("draws", 20, dim=-1):
        intervened = poutine.do(scm.model, data={"mechanism": torch.tensor(1)})
        by_hand = poutine.condition(intervened, data=result.noise)(PROMPT)
    assert torch.equal(cf.ids, by_hand)
    assert cf.noise_stats["observed_noise"].shape == (20, 4)
    baseline = result.interventional({"mechanism": "other"}, seed=0)
    assert baseline.kind == "interventional" and baseline.num_samples == 20


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"rows": [10]}, "`rows`"),  # was an IndexError deep in the replay
        ({"rows": [0.5]}, "`rows`"),  # was truncated to row 0
        ({"rows": "0"}, "`rows`"),  # was a TypeError
        ({"batch_size": 0}, "`batch_size`"),  # was a RuntimeError from split
    ],
)
def test_replay_refuses_bad_rows_and_batch_sizes(lm, arguments, match):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    result = abduct(scm, PROMPT, sampled_string(scm, 0), "exact", num_samples=4, seed=0)
    with pytest.raises(InferenceError, match=match):
        result.replay(**arguments)
    # the baseline: rows that are draws replay those draws, in any batch size
    assert torch.equal(result.replay(rows=[3, 1], batch_size=1), result.replay()[[3, 1]])


def test_importance_counterfactual_keeps_only_weighted_draws(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    observed = sampled_string(scm, 0)[:1]
    result = abduct(scm, PROMPT, observed, "importance", num_samples=200, seed=0)
    accepted = int(result.consistent.sum())
    assert 0 < accepted < 200
    cf = result.counterfactual({"prompt": [2, 9]})
    assert cf.num_samples == accepted and cf.ess == accepted
    impossible = abduct(scm, PROMPT, sampled_string(scm, 0), "importance", num_samples=3, seed=0)
    if not bool(impossible.consistent.any()):
        with pytest.raises(InferenceError, match="none of the 3 draws"):
            impossible.counterfactual({})


def test_kish_ess():
    assert kish_ess(None, 7) == 7.0
    assert kish_ess(torch.zeros(5)) == pytest.approx(5.0)
    # a list is log weights (was an AttributeError); NaN and +inf gave NaN, a matrix a ValueError
    assert kish_ess([0.0, math.log(3.0)]) == pytest.approx(16 / 10)
    for bad in (torch.tensor([0.0, float("nan")]), torch.tensor([float("inf"), 0.0]), torch.zeros(2, 3), "w"):
        with pytest.raises(InferenceError, match="`log_weights`"):
            kish_ess(bad)
    assert kish_ess(torch.tensor([0.0, float("-inf")])) == pytest.approx(1.0)
    assert kish_ess(torch.full((3,), float("-inf"))) == 0.0


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("mcmc", {}, "unknown abduction method 'mcmc'"),
        ("exact", {"temperature": 0.1}, "unknown \\['temperature'\\]"),
        ("relaxed-svi", {"temperature": 0.0}, "`temperature` must be a finite number > 0"),
        ("relaxed-svi", {"guide": "flow"}, "`guide`"),
        ("relaxed-svi", {"rank": 2}, "lowrank"),
        ("relaxed-svi", {"num_steps": -1}, "`num_steps`"),
        ("relaxed-nuts", {"max_tree_depth": 0}, "`max_tree_depth`"),
        ("exact", {"margin": -1.0}, "`margin`"),
    ],
)
def test_bad_settings(lm, method, options, match):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    with pytest.raises(InferenceError, match=match) as info:
        abduct(scm, PROMPT, torch.tensor([5]), method, **options)
    assert isinstance(info.value, (LMSCMError, ValueError))


def test_methods_and_num_samples(lm):
    assert set(METHODS) == {"exact", "importance", "relaxed-svi", "relaxed-nuts", "prior"}
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    with pytest.raises(InferenceError, match="`num_samples`"):
        abduct(scm, PROMPT, torch.tensor([5]), num_samples=0)
    ready = RelaxedSVI(temperature=0.2)
    assert make_method(ready) is ready
    with pytest.raises(InferenceError, match="ready method"):
        make_method(ready, num_steps=3)


def test_a_named_scm(lm, other_lm):
    """Site names carry the SCM's prefix ("story/u_0"); draws and predictions are the same."""
    mechanisms = {"other": ModelSwap(other_lm)}
    plain = LanguageModelSCM(lm, max_new_tokens=4, mechanisms=mechanisms)
    named = LanguageModelSCM(lm, max_new_tokens=4, mechanisms=mechanisms, name="story")
    observed = sampled_string(plain, 0)
    results = [abduct(scm, PROMPT, observed, "exact", num_samples=30, seed=0) for scm in (plain, named)]
    assert all(torch.equal(results[0].noise[k], results[1].noise[k]) for k in results[0].noise)
    assert results[1].reproduction_rate == 1.0
    a, b = (result.counterfactual({"mechanism": "other"}) for result in results)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.statistic("log_prob_intervened"), b.statistic("log_prob_intervened"))
