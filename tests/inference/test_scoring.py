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
