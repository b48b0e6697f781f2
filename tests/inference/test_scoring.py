import pytest
import torch

from pyro_lmscm import LanguageModelSCM, ModelSwap
from pyro_lmscm.inference.scoring import ragged_token_log_probs as token_log_probs
from pyro_lmscm.inference.scoring import string_log_prob
from pyro_lmscm.interventions import as_do_data
from pyro_lmscm.models import Decoding


@pytest.mark.parametrize("intervention", [None, {"mechanism": "swap"}, {"w_1": 7}, {"prompt": [2, 9, 4]}])
@pytest.mark.parametrize("top_k", [None, 5])
def test_sums_equal_string_log_prob(lm, other_lm, intervention, top_k):
    scm = LanguageModelSCM(lm, 5, Decoding(top_k=top_k), mechanisms={"swap": ModelSwap(other_lm)})
    prompt = torch.tensor([2, 3, 4])
    rows = [[5, 7, 1], [5, 6, 7, 8, 9], [9]]
    per_token, totals = token_log_probs(scm, prompt, rows, as_do_data(scm, intervention))
    assert [len(p) for p in per_token] == [3, 5, 1]
    for row, tokens, total in zip(rows, per_token, totals):
        expected = float(string_log_prob(scm, prompt, torch.tensor(row), intervention))
        assert total == pytest.approx(expected, rel=1e-5, abs=1e-5) or total == expected == float("-inf")
        assert sum(tokens) == pytest.approx(total, rel=1e-5, abs=1e-5) or total == float("-inf")


def test_forced_token_is_a_point_mass(lm):
    scm = LanguageModelSCM(lm, 4)
    per_token, _ = token_log_probs(scm, torch.tensor([2, 3]), [[5, 7], [5, 8]], as_do_data(scm, {"w_1": 7}))
    assert per_token[0][1] == 0.0 and per_token[1][1] == float("-inf")


def test_rows_do_not_depend_on_their_batch(lm):
    scm = LanguageModelSCM(lm, 6)
    prompt = torch.tensor([2, 3])
    alone, _ = token_log_probs(scm, prompt, [[5, 6, 1]])
    together, _ = token_log_probs(scm, prompt, [[5, 6, 1], [9, 9, 9, 9, 9, 9]])
    assert alone[0] == pytest.approx(together[0], abs=1e-6)


@pytest.mark.parametrize("intervention", [None, {"mechanism": "swap"}, {"w_1": 7}, {"prompt": [2, 9, 4]}])
def test_one_prompt_per_row_equals_each_prompt_alone(lm, other_lm, intervention):
    """Rows of three prompts of three lengths (left-padded) in batches of two that cut across
    prompts: each row scores as it does with its own prompt alone, and not as with another."""
    from pyro_lmscm.errors import ObservationError

    scm = LanguageModelSCM(lm, 5, mechanisms={"swap": ModelSwap(other_lm)})
    data = as_do_data(scm, intervention)
    prompts = [torch.tensor([2, 3, 4]), torch.tensor([6]), torch.tensor([8, 2, 9, 3, 1])]
    rows = [[5, 7, 1], [5, 6, 7, 8, 9], [9], [5, 7, 1], [4, 4]]
    owners = [0, 0, 1, 1, 2]
    per_token, totals = token_log_probs(scm, [prompts[i] for i in owners], rows, data, batch_size=2)
    for row, owner, tokens, total in zip(rows, owners, per_token, totals):
        alone_tokens, alone_total = token_log_probs(scm, prompts[owner], [row], data)
        assert tokens == pytest.approx(alone_tokens[0], abs=1e-5) and total == pytest.approx(alone_total[0], abs=1e-5)
    if intervention is None:  # the same row under another prompt scores otherwise
        assert totals[0] != pytest.approx(totals[3], abs=1e-3)
    with pytest.raises(ObservationError, match="one prompt per row"):
        token_log_probs(scm, prompts[:2], rows)
    from pyro_lmscm.inference.scoring import token_log_probs as tensor_scores
    from pyro_lmscm.lm import left_pad

    with pytest.raises(ObservationError, match="one row per string"):
        tensor_scores(scm, left_pad(prompts), torch.tensor([[5, 7], [5, 8]]))  # 3 prompts, 2 strings
