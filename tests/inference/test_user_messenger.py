"""A user's own Pyro Messenger as the intervention: it acts on the intervened world alone, and
identically in sampling (the KV-cached decoding run), the scorer, the draws' scores and the
exact probabilities, since all of them run the same effectful operations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_lmscm import LanguageModelSCM, counterfactual, exact_counterfactual
from pyro_lmscm.errors import InterventionError
from pyro_lmscm.inference import counterfactuals, token_log_probs
from pyro_lmscm.inference.exact import most_probable
from pyro_lmscm.models import Decoding
from pyro_lmscm.testing import BoostTokens, chi_square_pvalue, tiny_llama


def _first_divergences(draws, observed):
    n = observed.shape[-1]
    differ = draws[:, :n] != observed
    return torch.where(differ.any(-1), differ.long().argmax(-1), n)


@pytest.fixture(scope="module")
def setting():
    lm = tiny_llama(seed=3, vocab_size=12, logit_scale=3.0, with_tokenizer=False)
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    prompt = torch.tensor([2, 5, 7])
    observed = counterfactual(scm, prompt, None, {}, num_samples=1, seed=11).factual_ids
    return scm, prompt, observed


@pytest.mark.parametrize("decoding", [None, Decoding(top_k=6, temperature=0.8)])
def test_sampled_first_divergence_matches_the_exact_law_under_the_messenger(setting, decoding):
    scm, prompt, observed = setting
    if decoding is not None:
        scm = LanguageModelSCM(scm.lm, scm.max_new_tokens, decoding=decoding)
        observed = counterfactual(scm, prompt, None, {}, num_samples=1, seed=11).factual_ids
    boost = BoostTokens(scm, [3, 4, 6, 8], 2.5)
    result = counterfactual(scm, prompt, observed, boost, num_samples=3000, seed=0)
    assert torch.equal(result.factual_ids, observed)  # the factual world is untouched
    counts = np.bincount(_first_divergences(result.counterfactual_ids, observed), minlength=len(observed) + 1)
    law = exact_counterfactual(scm, prompt, observed, boost).first_divergence().numpy()
    assert chi_square_pvalue(counts, law) > 1e-3
    # the baseline: the exact law without the Messenger (the null intervention) fails the test
    without = exact_counterfactual(scm, prompt, observed, {}).first_divergence().numpy()
    assert chi_square_pvalue(counts, without) < 1e-6


def test_sampled_strings_match_the_exact_log_prob_and_the_scores(setting):
    scm, prompt, observed = setting
    boost = BoostTokens(scm, [3, 4, 6, 8], 2.5)
    result = counterfactual(scm, prompt, observed, [boost], num_samples=3000, seed=1, scores=True)
    draws = result.counterfactual_ids
    unique, counts = torch.unique(draws, dim=0, return_counts=True)
    exact = exact_counterfactual(scm, prompt, observed, boost)

    def p_value(law):
        """Bins: each string with an expected count of 5 or more under ``law`` (nearly surely
        drawn), and all other strings together."""
        probs = law.log_prob(unique).exp().numpy()
        big = probs * len(draws) >= 5
        observed_counts = np.append(counts.numpy()[big], counts.numpy()[~big].sum())
        return chi_square_pvalue(observed_counts, np.append(probs[big], max(0.0, 1.0 - probs[big].sum())))

    assert p_value(exact) > 1e-3
    assert p_value(exact_counterfactual(scm, prompt, observed, {})) < 1e-6  # the law without the Messenger
    # the scores recorded while decoding equal the teacher-forced exact chain and scorer
    torch.testing.assert_close(result.counterfactual_log_q, exact.token_log_probs(draws), atol=1e-5, rtol=0)
    scored = token_log_probs(scm, prompt, draws, boost)
    torch.testing.assert_close(result.counterfactual_scores, scored, atol=1e-5, rtol=0)
    assert not torch.allclose(scored, token_log_probs(scm, prompt, draws, {}), atol=1e-3)


def test_the_factual_string_is_sampled_without_the_messenger(setting):
    scm, prompt, _ = setting
    boost = BoostTokens(scm, [3, 4, 6, 8], 6.0)
    plain = [counterfactual(scm, prompt, None, {}, num_samples=1, seed=s).factual_ids for s in range(6)]
    boosted = [counterfactual(scm, prompt, None, boost, num_samples=1, seed=s).factual_ids for s in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(plain, boosted))
    # the baseline: the Messenger wrapped around the whole call changes the factual world too
    with boost:
        wrapped = [counterfactual(scm, prompt, None, {}, num_samples=1, seed=s).factual_ids for s in range(6)]
    assert not all(torch.equal(a, b) for a, b in zip(plain, wrapped))


def test_a_messenger_mixes_with_do_data_and_exclusions(setting):
    scm, prompt, observed = setting
    boost = BoostTokens(scm, [3, 4, 6, 8], 2.5)
    mixed = [{"w_2": 9}, boost, {"exclude_0": "factual"}]
    exact = exact_counterfactual(scm, prompt, observed, mixed)
    result = counterfactual(scm, prompt, observed, mixed, num_samples=400, seed=0, scores=True)
    assert bool((result.counterfactual_ids[:, 2] == 9).all())
    assert bool((result.counterfactual_ids[:, 0] != observed[0]).all())
    torch.testing.assert_close(
        result.counterfactual_log_q, exact.token_log_probs(result.counterfactual_ids), atol=1e-5, rtol=0
    )
    assert exact.next_token_probs()[observed[0]] == 0.0
    # the most probable counterfactual runs the Messenger in beam search too: brute force
    mode, log_p = most_probable([exact], num_beams=12**4)[0]
    assert log_p == pytest.approx(float(exact.log_prob(mode)), abs=1e-5)


def test_counterfactuals_batch_takes_a_messenger(setting):
    scm, prompt, observed = setting
    boost = BoostTokens(scm, [3, 4, 6, 8], 2.5)
    batch = counterfactuals(scm, [prompt, prompt[1:]], None, boost, num_samples=3, seed=0, scores=True)
    for result in batch:
        exact = result.exact
        assert exact is not None and exact.intervention.messengers == (boost,)
        torch.testing.assert_close(
            result.counterfactual_log_q, exact.token_log_probs(result.counterfactual_ids), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "bad, match",
    [
        ([{"w_0": 3}, object()], r"intervention\[1\] must be a mapping"),
        ("mechanism=steer", "a Pyro Messenger, or a list"),
        ([{"w_0": 3}, {"w_0": 4}], "given twice"),
    ],
)
def test_bad_mixed_interventions_are_typed(setting, bad, match):
    scm, prompt, observed = setting
    with pytest.raises(InterventionError, match=match):
        exact_counterfactual(scm, prompt, observed, bad)


def test_the_same_messenger_twice_is_refused(setting):
    scm, prompt, observed = setting
    boost = BoostTokens(scm, [3], 1.0)
    with pytest.raises(InterventionError, match="twice"):
        counterfactual(scm, prompt, observed, [boost, boost], num_samples=1, seed=0)


def test_a_messenger_already_active_around_the_call_is_refused(setting):
    """The intervention's Messenger entered around the call as well would act on the factual
    world too (and Pyro cannot install one instance twice): a typed error, the Pyro stack
    as it was. The baseline: the same calls without the surrounding ``with`` run."""
    from pyro.poutine.runtime import _PYRO_STACK

    scm, prompt, observed = setting
    boost = BoostTokens(scm, [3, 4, 6, 8], 2.5)
    calls = {
        "counterfactual": lambda: counterfactual(scm, prompt, observed, boost, num_samples=2, seed=0),
        "exact": lambda: exact_counterfactual(scm, prompt, observed, [{"w_3": 5}, boost]).prob_unchanged(),
        "scores": lambda: token_log_probs(scm, prompt, observed[None], boost),
    }
    for name, call in calls.items():
        call()  # the baseline
        with boost:
            with pytest.raises(InterventionError, match="active already"):
                call()
            assert _PYRO_STACK == [boost], name
        assert _PYRO_STACK == [], name
        call()
