"""Scores recorded while the draws are decoded (``scores=True``, ``TokenScoreMessenger``)
against independent teacher-forced computations: the scorer's ``token_log_probs`` of the
draws under the intervention and the exact chain's ``ExactCounterfactual.token_log_probs``."""

import pyro
import pytest
import torch

from pyro_lmscm import LanguageModelSCM, ModelSwap
from pyro_lmscm.errors import InferenceError
from pyro_lmscm.inference import TokenScoreMessenger, counterfactual, counterfactuals, token_log_probs
from pyro_lmscm.models import Decoding

INTERVENTIONS = [{}, {"mechanism": "swap"}, {"w_1": 7}, {"prompt": [2, 9, 4]}, {"exclude_0": "factual"}]


def _scm(lm, other_lm, top_k=None, steps=6):
    return LanguageModelSCM(lm, steps, Decoding(top_k=top_k), mechanisms={"swap": ModelSwap(other_lm)})


def _close(recorded, expected, atol):
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(recorded))
    torch.testing.assert_close(recorded[finite].double(), expected[finite].double(), atol=atol, rtol=0)


@pytest.mark.parametrize("intervention", INTERVENTIONS)
@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("deterministic", [False, True])
def test_recorded_scores_equal_teacher_forced_ones(lm, other_lm, intervention, top_k, deterministic):
    scm = _scm(lm, other_lm, top_k)
    prompt = torch.tensor([2, 3, 4])
    result = counterfactual(
        scm, prompt, None, intervention, num_samples=6, seed=3, baseline=True, scores=True, deterministic=deterministic
    )
    data = result.intervention
    _close(result.counterfactual_scores, token_log_probs(scm, prompt, result.counterfactual_ids, data), 1e-5)
    _close(result.interventional_scores, token_log_probs(scm, prompt, result.interventional_ids, data), 1e-5)
    _close(result.counterfactual_log_q, result.exact.token_log_probs(result.counterfactual_ids), 1e-5)
    # the same draws as without the handler: it only reads the messages
    plain = counterfactual(
        scm, prompt, None, intervention, num_samples=6, seed=3, baseline=True, deterministic=deterministic
    )
    assert torch.equal(plain.counterfactual_ids, result.counterfactual_ids)
    assert torch.equal(plain.interventional_ids, result.interventional_ids)
    assert plain.counterfactual_scores is None and plain.exact is None


def test_the_comparisons_can_fail(lm, other_lm):
    """The baselines: the draws' scores under the factual model are not the recorded ones
    under the swap, and the exact chain is not the intervened model's own probability."""
    scm = _scm(lm, other_lm)
    prompt = torch.tensor([2, 3, 4])
    result = counterfactual(scm, prompt, None, {"mechanism": "swap"}, num_samples=6, seed=3, scores=True)
    factual = token_log_probs(scm, prompt, result.counterfactual_ids)
    assert (result.counterfactual_scores - factual).abs().max() > 0.1
    assert (result.counterfactual_log_q - result.counterfactual_scores.double()).abs().max() > 0.1


@pytest.mark.parametrize("intervention", [{"mechanism": "swap"}, {"w_1": 7}])
def test_a_batch_of_strings_scores_each_as_alone(lm, other_lm, intervention):
    """Prompts of three lengths (left-padded), sampled and observed strings."""
    scm = _scm(lm, other_lm, steps=5)
    prompts = [torch.tensor([2, 3, 4]), torch.tensor([6]), torch.tensor([8, 2, 9, 3, 1])]
    given = [torch.tensor([5, 7, 1, 0, 0]), torch.tensor([9, 9, 9, 9, 9]), torch.tensor([4, 4, 6, 1, 0])]
    for observed in (None, given):
        results = counterfactuals(
            scm, prompts, observed, intervention, num_samples=4, seed=0, baseline=True, scores=True
        )
        for result in results:
            data = result.intervention
            ids = result.counterfactual_ids
            _close(result.counterfactual_scores, token_log_probs(scm, result.prompt_ids, ids, data), 1e-5)
            baseline = result.interventional_ids
            _close(result.interventional_scores, token_log_probs(scm, result.prompt_ids, baseline, data), 1e-5)
            _close(result.counterfactual_log_q, result.exact.token_log_probs(ids), 1e-5)


def test_one_exact_per_string(lm, other_lm):
    scm = _scm(lm, other_lm)
    exact = counterfactual(scm, torch.tensor([2, 3]), None, {}, seed=0, scores=True).exact
    with pytest.raises(InferenceError, match="2 strings in the batch but 1 exact"):
        with pyro.plate("strings", 2, dim=-2), pyro.plate("rows", 3, dim=-1), TokenScoreMessenger(scm, {}, [exact]):
            scm.model(torch.tensor([[[2, 3]], [[4, 5]]]))
