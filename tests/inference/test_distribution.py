import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_lmscm import LanguageModelSCM, ModelSwap, counterfactual
from pyro_lmscm.errors import InferenceError, ObservationError
from pyro_lmscm.inference import CounterfactualDistribution, Estimate
from pyro_lmscm.inference.scoring import string_log_prob
from pyro_lmscm.metrics import (
    common_prefix_length,
    first_divergence,
    normalized_token_edit_distance,
    token_edit_distance,
)
from pyro_lmscm.models import noise_site
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3, 4])


@pytest.fixture(scope="module")
def six():
    """A vocabulary-6 SCM with a model swap, small enough for rejection sampling."""
    lm = tiny_llama(vocab_size=6, seed=5, logit_scale=15.0, with_tokenizer=False)
    other = tiny_llama(vocab_size=6, seed=6, logit_scale=15.0, with_tokenizer=False)
    return LanguageModelSCM(lm, max_new_tokens=3, mechanisms={"other": ModelSwap(other)})


def rejection_counterfactual(scm, prompt, num_draws):
    """Brute force: prior noise, keep the draws whose factual string is the most frequent
    one, replay the swapped model on them."""
    with pyro.plate("draws", num_draws, dim=-1):
        trace = poutine.trace(scm.model).get_trace(prompt)
    factual = trace.nodes["_RETURN"]["value"]
    strings, counts = factual.unique(dim=0, return_counts=True)
    observed = strings[counts.argmax()]
    keep = (factual == observed).all(-1)
    noise = {noise_site(t): trace.nodes[noise_site(t)]["value"][keep] for t in range(scm.max_new_tokens)}
    data = {"mechanism": torch.tensor(1)}
    with pyro.plate("kept", int(keep.sum()), dim=-1):
        ids = poutine.condition(poutine.do(scm.model, data=data), data=noise)(prompt)
    return observed, CounterfactualDistribution(scm, prompt, observed, ids, data)


def test_probability_agrees_with_rejection_sampling(six):
    """Within 3 standard errors of brute force on every event; the interventional baseline
    (fresh noise) is more than 3 standard errors away on every event."""
    prompt = torch.tensor([2, 3])
    observed, reference = rejection_counterfactual(six, prompt, 60_000)
    assert observed.tolist() == [2, 1, 0]  # an end of sequence, then padding
    assert reference.num_samples > 10_000
    result = counterfactual(six, prompt, observed, {"mechanism": "other"}, num_samples=4000, seed=1, baseline=True)
    events = {
        "changed": "changed",
        "same first token": lambda s: s[0] == int(observed[0]),
        "contains 4": lambda s: 4 in s,
        "ends": lambda s: 1 in s,
    }
    for name, event in events.items():
        exact, brute = result.counterfactual.probability(event), reference.probability(event)
        baseline = result.interventional.probability(event)
        assert 0.0 < brute.value < 1.0, name
        assert abs((exact - brute).value) < 3 * (exact - brute).stderr, (name, exact, brute)
        assert abs((baseline - brute).value) > 3 * (baseline - brute).stderr, (name, baseline, brute)


def test_standard_error_is_calibrated(six):
    """Across independent repetitions the estimates scatter by their standard error; the
    standard deviation of one draw (no square root of N) is far too wide."""
    prompt = torch.tensor([2, 3])
    observed = torch.tensor([2, 1, 0])
    swap = {"mechanism": "other"}
    results = [counterfactual(six, prompt, observed, swap, num_samples=100, seed=seed) for seed in range(40)]
    estimates = [result.counterfactual.probability(lambda s: s[0] == 2) for result in results]
    values = torch.tensor([e.value for e in estimates], dtype=torch.float64)
    mean_se = sum(e.stderr for e in estimates) / len(estimates)
    ratio = float(values.std()) / mean_se
    assert 0.7 < ratio < 1.4, ratio  # the sd of 40 estimates is within ~±25% at 2.5 sigma
    assert not 0.7 < float(values.std()) / (mean_se * math.sqrt(100)) < 1.4


def test_weighted_estimates_by_hand(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    ids = torch.tensor([[5, 6, 7], [5, 6, 8], [9, 1, 0], [5, 6, 7]])
    log_weights = torch.tensor([0.0, math.log(3.0), float("-inf"), math.log(2.0)])
    cf = CounterfactualDistribution(scm, PROMPT, torch.tensor([5, 6, 7]), ids, log_weights=log_weights)
    w = torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=torch.float64) / 6
    torch.testing.assert_close(cf.weights, w)
    assert cf.ess == pytest.approx(1 / float((w**2).sum()))
    p = cf.probability("changed")
    f = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert p.value == pytest.approx(0.5)
    assert p.stderr == pytest.approx(float((w**2 * (f - 0.5) ** 2).sum().sqrt()))
    assert cf.counts() == {(5, 6, 7): 2, (5, 6, 8): 1}  # the draw of weight zero is left out
    assert cf.probabilities() == pytest.approx({(5, 6, 7): 0.5, (5, 6, 8): 0.5})
    # unweighted: the binomial standard error
    plain = CounterfactualDistribution(scm, PROMPT, torch.tensor([5, 6, 7]), ids)
    p = plain.probability("changed")
    assert p.value == 0.5 and p.stderr == pytest.approx(math.sqrt(0.25 / 4))
    assert plain.ess == 4.0


def test_named_statistics_match_the_metrics(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=5, mechanisms={"other": ModelSwap(tiny_llama(seed=1))})
    result = counterfactual(scm, PROMPT, None, {"mechanism": "other"}, num_samples=60, seed=0)
    cf = result.counterfactual
    factual = cf.factual
    strings = cf.strings
    assert len(strings) == 60
    by_hand = {
        "changed": [float(s != factual) for s in strings],
        "edit_distance": [token_edit_distance(s, factual) for s in strings],
        "normalized_edit_distance": [normalized_token_edit_distance(s, factual) for s in strings],
        "first_divergence": [-1 if s == factual else first_divergence(s, factual) for s in strings],
        "common_prefix": [common_prefix_length(s, factual) for s in strings],
        "length": [len(s) for s in strings],
    }
    for name, values in by_hand.items():
        torch.testing.assert_close(cf.statistic(name), torch.tensor(values, dtype=torch.float64), msg=name)
    assert cf.statistic("edit_distance").unique().numel() > 1  # the check is not vacuous
    log_p = string_log_prob(scm, PROMPT, cf.ids[:, : cf.window], {"mechanism": "other"})
    torch.testing.assert_close(cf.statistic("log_prob_intervened"), log_p.double(), atol=1e-5, rtol=0)
    log_p = string_log_prob(scm, PROMPT, cf.ids[:, : cf.window])
    torch.testing.assert_close(cf.statistic("log_prob_factual"), log_p.double(), atol=1e-5, rtol=0)
    # "contains word" on texts equals the same event on ids
    she = int(lm.encode("she")[0])
    on_text = cf.probability(lambda text: "she" in text.split(), on="text")
    on_ids = cf.probability(lambda s: she in s[: len(s) - (s[-1] in lm.eos_token_ids)])
    assert on_text == on_ids
    # precomputed per-draw values, and expectations of indicators are probabilities
    assert cf.expectation(cf.statistic("changed")) == cf.probability("changed")
    assert cf.expectation("edit_distance").value == pytest.approx(float(cf.statistic("edit_distance").mean()))


def test_counterfactual_versus_interventional_with_uncertainty(lm):
    """The shared noise keeps a counterfactual string closer to the factual one than a fresh
    sample is; the difference is many standard errors. Null intervention: exactly zero."""
    scm = LanguageModelSCM(lm, max_new_tokens=5, mechanisms={"other": ModelSwap(tiny_llama(seed=1))})
    result = counterfactual(scm, PROMPT, None, {"mechanism": "other"}, num_samples=300, seed=0, baseline=True)
    difference = result.interventional.expectation("edit_distance") - result.counterfactual.expectation("edit_distance")
    assert difference.value > 4 * difference.stderr
    null = counterfactual(scm, PROMPT, result.factual_ids, {}, num_samples=100, seed=0, baseline=True)
    assert null.counterfactual.expectation("edit_distance") == Estimate(0.0, 0.0)
    assert null.interventional.expectation("edit_distance").value > 0


def test_counts_probabilities_and_total_variation(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    result = counterfactual(scm, PROMPT, None, {"prompt": [2, 9]}, num_samples=200, seed=0, baseline=True)
    cf, iv = result.counterfactual, result.interventional
    counts = cf.counts()
    assert sum(counts.values()) == 200
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert sum(cf.probabilities().values()) == pytest.approx(1.0)
    first = cf.probabilities(key=lambda s: s[:1])
    assert sum(first.values()) == pytest.approx(1.0)
    assert cf.total_variation(cf) == 0.0
    assert cf.total_variation(iv) == pytest.approx(iv.total_variation(cf))
    assert 0.0 < cf.total_variation(iv, key=lambda s: s[:1]) <= cf.total_variation(iv) <= 1.0
    assert sum(cf.text_counts().values()) == 200
    a = CounterfactualDistribution(scm, PROMPT, torch.tensor([5, 6, 7, 8]), torch.tensor([[5, 6, 7, 8]] * 2))
    b = CounterfactualDistribution(scm, PROMPT, torch.tensor([5, 6, 7, 8]), torch.tensor([[5, 6, 7, 9]] * 3))
    assert a.total_variation(b) == 1.0 and a.total_variation(b, key=lambda s: s[:1]) == 0.0


def test_window_of_a_prefix_observation(lm):
    """An observed prefix without end of sequence is compared over its own length: under the
    null intervention nothing changes there, though later tokens vary."""
    scm = LanguageModelSCM(lm, max_new_tokens=6)
    observed = torch.tensor([5, 9])
    result = counterfactual(scm, PROMPT, observed, {}, num_samples=100, seed=0)
    cf = result.counterfactual
    assert cf.window == 2
    assert set(cf.strings) == {(5, 9)}
    assert cf.probability("changed") == Estimate(0.0, 0.0)
    assert result.counterfactual_ids[:, 2:].unique(dim=0).shape[0] > 1
    # a full observation that ends is compared over all T tokens
    ended = counterfactual(scm, PROMPT, torch.tensor([5, 1]), {}, num_samples=10, seed=0).counterfactual
    assert ended.window == 6 and set(ended.strings) == {(5, 1)}


def test_noise_statistics_are_attached(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=5)
    result = counterfactual(
        scm, PROMPT, torch.tensor([5, 9, 1]), {"prompt": [2, 9]}, num_samples=30, seed=0, baseline=True
    )
    stats = result.counterfactual.noise_stats
    assert set(stats) == {"observed_noise", "top_gumbel"}
    assert stats["observed_noise"].shape == (30, 3)
    assert result.interventional.noise_stats == {}
    assert result.counterfactual.kind == "counterfactual" and result.interventional.kind == "interventional"
    assert result.counterfactual is result.counterfactual  # cached with its statistics


def test_estimate_arithmetic():
    a, b = Estimate(0.5, 0.03), Estimate(0.2, 0.04)
    assert (a - b).value == pytest.approx(0.3) and (a - b).stderr == pytest.approx(0.05)
    assert (a + b).stderr == pytest.approx(0.05)
    assert float(a) == 0.5
    assert str(a) == "0.5 ± 0.03"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ids": torch.tensor([5, 6])}, ObservationError, r"shape \(N, T\)"),
        ({"ids": torch.tensor([[5, 99]])}, ObservationError, "outside the vocabulary"),
        ({"kind": "factual"}, InferenceError, "kind"),
        ({"log_weights": torch.full((2,), float("-inf"))}, InferenceError, "weight zero"),
        ({"log_weights": torch.zeros(3)}, InferenceError, r"shape \(2,\)"),
        ({"log_weights": torch.tensor([0.0, float("nan")])}, InferenceError, "NaN"),
        ({"num_chains": 3}, InferenceError, "num_chains"),
        ({"noise_stats": {"observed_noise": torch.zeros(3, 2)}}, InferenceError, "observed_noise"),
        ({"noise_stats": {"observed_noise": "x"}}, InferenceError, "observed_noise"),  # was a TypeError
        ({"intervention": 5}, InferenceError, "`intervention`"),  # was a TypeError
        # draws shorter than the observation: every draw was "changed", [5, 6] too
        ({"ids": torch.tensor([[5, 6], [5, 8]])}, ObservationError, "fewer than the 3"),
    ],
)
def test_bad_input(lm, kwargs, error, match):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    arguments = {"ids": torch.tensor([[5, 6, 7], [5, 6, 8]])} | kwargs
    with pytest.raises(error, match=match):
        CounterfactualDistribution(scm, PROMPT, torch.tensor([5, 6, 7]), **arguments)


def test_bad_statistics(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    cf = CounterfactualDistribution(scm, PROMPT, torch.tensor([5, 6, 7]), torch.tensor([[5, 6, 7], [5, 6, 8]]))
    with pytest.raises(InferenceError, match="unknown statistic 'nope'"):
        cf.expectation("nope")
    with pytest.raises(InferenceError, match='"ids" or "text"'):
        cf.expectation(len, on="tokens")
    with pytest.raises(InferenceError, match=r"shape \(2,\)"):
        cf.expectation(torch.zeros(3))
    with pytest.raises(InferenceError, match="`other`"):  # was an AttributeError
        cf.total_variation(cf.probabilities())
    assert cf.total_variation(cf) == 0.0  # the baseline: another distribution is taken
    with pytest.raises(InferenceError, match="must return a number"):  # was a ValueError
        cf.expectation(lambda s: "abc")
    with pytest.raises(InferenceError, match="hashable"):  # was a TypeError
        cf.probabilities(key=list)
    assert cf.probabilities(key=tuple) == cf.probabilities()  # the baseline: a hashable key
