"""The exclusion intervention "anything but this token at step t" (``exclude_<t>``)."""

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import InterventionError
from pyro_lmscm.inference import string_log_prob
from pyro_lmscm.interventions.ops import as_do_data
from pyro_lmscm.interventions.spec import parse_intervention
from pyro_lmscm.models import Decoding

PROMPT = torch.tensor([2, 3, 4])


@pytest.fixture
def scm(lm):
    return LanguageModelSCM(lm, max_new_tokens=5, decoding=Decoding(top_k=8))


def test_the_step_changes_the_earlier_steps_do_not(scm):
    observed = counterfactual(scm, PROMPT, None, {}, seed=2).factual_ids
    result = counterfactual(scm, PROMPT, observed, {"exclude_2": "factual"}, num_samples=300, seed=0)
    ids = result.counterfactual_ids
    assert torch.equal(ids[:, :2], observed[:2].expand(300, 2))
    assert bool((ids[:, 2] != observed[2]).all())


def test_a_sampled_observation_is_excluded_at_its_own_token(scm):
    result = counterfactual(scm, PROMPT, None, {"exclude_1": "factual"}, num_samples=100, seed=3)
    factual = result.factual_ids
    assert result.intervention[scm.site("exclude_1")] == factual[1]
    assert bool((result.counterfactual_ids[:, 1] != factual[1]).all())
    assert torch.equal(result.counterfactual_ids[:, 0], factual[0].expand(100))


def test_the_marginal_at_the_step_is_the_decoded_distribution_without_the_token(scm):
    """The runner-up of the same noise: chi-square against the renormalised decoded law
    (p > 1e-3); the law with the token kept fails (the token is never drawn)."""
    observed = counterfactual(scm, PROMPT, None, {}, seed=4).factual_ids
    k = int(observed[0])
    result = counterfactual(scm, PROMPT, observed, {"exclude_0": "factual"}, num_samples=6000, seed=1)
    with torch.no_grad():
        decoded = scm.decoding(scm.lm.logits(PROMPT[None], logits_to_keep=1)[0, -1]).double()
    kept = decoded.softmax(-1).numpy()
    without = decoded.clone()
    without[k] = -float("inf")
    expected = without.softmax(-1).numpy()
    counts = np.bincount(result.counterfactual_ids[:, 0].numpy(), minlength=scm.vocab_size)
    support = expected > 0
    assert stats.chisquare(counts[support], 6000 * expected[support]).pvalue > 1e-3
    assert counts[k] == 0 and 6000 * kept[k] > 30  # the law with the token would draw it often


def test_the_later_steps_share_the_noise(scm):
    """Not a fresh draw after step t: with a null change at t (excluding a token outside the
    support), every draw is the observation."""
    observed = counterfactual(scm, PROMPT, None, {}, seed=2).factual_ids
    with torch.no_grad():
        decoded = scm.decoding(scm.lm.logits(PROMPT[None], logits_to_keep=1)[0, -1])
    outside = int(torch.nonzero(torch.isneginf(decoded))[0, 0])
    result = counterfactual(scm, PROMPT, observed, {"exclude_0": outside}, num_samples=50, seed=0)
    assert torch.equal(result.counterfactual_ids[:, : len(observed)], observed.expand(50, -1))


def test_scoring_masks_the_excluded_token(scm):
    observed = counterfactual(scm, PROMPT, None, {}, seed=2).factual_ids
    assert float(string_log_prob(scm, PROMPT, observed, {"exclude_1": int(observed[1])})) == -float("inf")
    other = observed.clone()
    other[1] = (int(observed[1]) + 1) % scm.vocab_size
    plain = string_log_prob(scm, PROMPT, other[:2])
    excluded = string_log_prob(scm, PROMPT, other[:2], {"exclude_1": int(observed[1])})
    assert float(excluded) >= float(plain)  # renormalised without the excluded token


def test_bad_exclusions_are_typed_errors(lm, scm):
    greedy = LanguageModelSCM(lm, max_new_tokens=3, decoding=Decoding(top_k=1))
    observed = counterfactual(greedy, PROMPT, None, {}, seed=0).factual_ids
    with pytest.raises(InterventionError, match="allows no token but"):
        counterfactual(greedy, PROMPT, observed, {"exclude_0": "factual"}, seed=0)
    with pytest.raises(InterventionError, match="both forced"):
        as_do_data(scm, {"w_1": 3, "exclude_1": 4})
    with pytest.raises(InterventionError, match="no observation"):
        as_do_data(scm, {"exclude_1": "factual"})
    with pytest.raises(InterventionError, match="has 2 tokens"):
        as_do_data(scm, {"exclude_3": "factual"}, torch.tensor([5, 6]))
    with pytest.raises(InterventionError, match="not canonical"):
        as_do_data(scm, {"exclude_01": 3})
    with pytest.raises(InterventionError, match="does not exist"):
        as_do_data(scm, {"exclude_9": 3})
    with pytest.raises(InterventionError, match="token id or 'factual'"):
        as_do_data(scm, {"exclude_1": "she"})


def test_spec_and_config_spelling(lm):
    spec = parse_intervention("exclude=1,3", lm)
    assert spec.intervention == {"exclude_1": "factual", "exclude_3": "factual"}
    spec = parse_intervention({"exclude_2": "factual", "exclude_0": '"she"'}, lm)
    assert spec.intervention == {"exclude_2": "factual", "exclude_0": int(lm.encode("she")[0])}
    with pytest.raises(InterventionError, match="non-negative integers"):
        parse_intervention("exclude=two", lm)
