import itertools
import random

import pyro
import pytest
import torch

from pyro_lmscm import LanguageModelSCM, ModelSwap
from pyro_lmscm.errors import InterventionError, ObservationError
from pyro_lmscm.inference.scoring import string_log_prob
from pyro_lmscm.metrics import (
    NO_DIVERGENCE,
    char_edit_distance,
    common_prefix_length,
    first_divergence,
    normalized_char_edit_distance,
    normalized_token_edit_distance,
    token_edit_distance,
    trim_after_end,
)
from pyro_lmscm.models import Decoding
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3, 4])


def levenshtein_by_hand(a, b):
    """Wagner-Fischer dynamic programme."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_token_edit_distance_matches_dynamic_programme():
    rng = random.Random(0)
    hamming_agrees = True
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(8))]
        b = [rng.randrange(4) for _ in range(rng.randrange(8))]
        expected = levenshtein_by_hand(a, b)
        assert token_edit_distance(a, b) == expected
        assert token_edit_distance(torch.tensor(a, dtype=torch.long), b) == expected
        longest = max(len(a), len(b))
        assert normalized_token_edit_distance(a, b) == pytest.approx(expected / longest if longest else 0.0)
        # baseline: position-wise mismatches plus the length gap is not the edit distance
        hamming = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        hamming_agrees &= hamming == expected
    assert not hamming_agrees


def test_token_ids_beyond_characters():
    # ids above any character code, and shifted strings: one deletion plus one insertion
    a, b = [49_000, 5, 6, 7], [5, 6, 7, 49_001]
    assert token_edit_distance(a, b) == 2
    assert token_edit_distance(a, a) == 0
    assert token_edit_distance([], [1, 2]) == 2


def test_char_edit_distance():
    assert char_edit_distance("kitten", "sitting") == 3
    assert char_edit_distance("", "abc") == 3
    assert normalized_char_edit_distance("abcd", "abxd") == pytest.approx(0.25)
    with pytest.raises(ObservationError, match="token_edit_distance"):
        char_edit_distance([1, 2], "ab")
    with pytest.raises(ObservationError, match="char_edit_distance"):
        token_edit_distance("ab", [1])


@pytest.mark.parametrize(
    "a, b, prefix, divergence",
    [
        ([5, 6, 7], [5, 6, 7], 3, None),
        ([5, 6, 7], [5, 9, 7], 1, 1),
        ([5, 6], [5, 6, 1], 2, 2),
        ([5, 6, 1], [5, 6], 2, 2),
        ([8], [5], 0, 0),
        ([], [], 0, None),
    ],
)
def test_prefix_and_divergence(a, b, prefix, divergence):
    assert common_prefix_length(a, b) == prefix == common_prefix_length(b, a)
    assert first_divergence(a, b) == divergence == first_divergence(b, a)
    # the divergence is where the strings first differ: equal before it, different at it
    if divergence is not None:
        assert a[:divergence] == b[:divergence]
        assert a[divergence:divergence + 1] != b[divergence:divergence + 1]
    assert NO_DIVERGENCE == -1


def test_trim_after_end():
    assert trim_after_end(torch.tensor([5, 1, 0, 0]), [1]) == [5, 1]
    assert trim_after_end([5, 6], [1]) == [5, 6]
    assert trim_after_end([5, 7, 6], [7, 1]) == [5, 7]


def log_prob_by_hand(lm, decoding, prompt, ids):
    """One teacher-forced HF forward pass, independent of the SCM machinery."""
    with torch.no_grad():
        logits = lm.model(torch.cat([prompt, ids])[None]).logits[0].float()
    logits = decoding(logits[len(prompt) - 1 : -1])
    log_p = logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    ends = torch.isin(ids, torch.tensor(lm.eos_token_ids)).nonzero()
    length = int(ends[0]) + 1 if len(ends) else len(ids)
    return float(log_p[:length].sum())


@pytest.mark.parametrize(
    "decoding", [Decoding(), Decoding(temperature=0.7), Decoding(top_k=5)], ids=["plain", "temp", "top-k"]
)
def test_string_log_prob_matches_a_forward_pass_by_hand(lm, other_lm, decoding):
    scm = LanguageModelSCM(lm, max_new_tokens=6, decoding=decoding, mechanisms={"other": ModelSwap(other_lm)})
    with pyro.plate("draws", 5, dim=-1):
        ids = scm.model(PROMPT)  # in the factual decoding support
    if decoding.top_k is None:
        ids[1, 2] = 1  # an end of sequence, followed by junk that must not count
    factual = string_log_prob(scm, PROMPT, ids)
    swapped = string_log_prob(scm, PROMPT, ids, {"mechanism": "other"})
    new_prompt = torch.tensor([2, 9])
    reprompted = string_log_prob(scm, PROMPT, ids, {"prompt": new_prompt})
    assert factual.shape == (5,)
    for i in range(5):
        for got, model, prompt in [(factual, lm, PROMPT), (swapped, other_lm, PROMPT), (reprompted, lm, new_prompt)]:
            expected = log_prob_by_hand(model, decoding, prompt, ids[i])
            torch.testing.assert_close(float(got[i]), expected, rtol=0, atol=1e-4)
    assert bool(torch.isfinite(factual).all()) and not torch.equal(factual, swapped)
    # batch shapes pass through, chunking does not change the numbers
    batched = string_log_prob(scm, PROMPT, ids.reshape(5, 1, 6), batch_size=2)
    torch.testing.assert_close(batched, factual.reshape(5, 1), rtol=0, atol=1e-5)


def test_string_log_prob_sums_to_one_over_all_strings():
    """Over every distinct string of up to T tokens (ending at the first end of sequence), the
    probabilities sum to one; counting every padded row instead (no stop at the end) does not."""
    lm = tiny_llama(vocab_size=5, seed=3, logit_scale=5.0, with_tokenizer=False)
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    rows = torch.tensor(list(itertools.product(range(5), repeat=3)))
    ended = scm.finished_after(rows)
    after_end = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=-1)
    canonical = ~(after_end & (rows != lm.pad_token_id)).any(-1)
    log_p = string_log_prob(scm, torch.tensor([2, 3]), rows)
    assert float(log_p[canonical].exp().sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(log_p.exp().sum()) > 1.05


def test_string_log_prob_under_a_token_intervention(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=4)
    ids = torch.tensor([[5, 9, 7, 8], [5, 6, 7, 8]])
    log_p = string_log_prob(scm, PROMPT, ids, {"w_1": 9})
    assert float(log_p[1]) == float("-inf")  # do(w_1 = 9) cannot emit 6 there
    expected = log_prob_by_hand(lm, scm.decoding, PROMPT, ids[0]) - log_prob_by_hand(
        lm, scm.decoding, PROMPT, ids[0, :2]
    ) + log_prob_by_hand(lm, scm.decoding, PROMPT, ids[0, :1])
    torch.testing.assert_close(float(log_p[0]), expected, rtol=0, atol=1e-4)


def test_string_log_prob_outside_top_k_support_is_minus_infinity(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=2, decoding=Decoding(top_k=1))
    greedy = scm.model(PROMPT)
    other = greedy.clone()
    other[0] = (greedy[0] + 1) % lm.vocab_size
    log_p = string_log_prob(scm, PROMPT, torch.stack([greedy, other]))
    assert float(log_p[0]) == 0.0 and float(log_p[1]) == float("-inf")


@pytest.mark.parametrize(
    "ids, intervention, error, match",
    [
        (torch.tensor([5, 99]), None, ObservationError, "outside the vocabulary"),
        (torch.tensor([5.0]), None, ObservationError, "integer"),
        (torch.tensor([5] * 7), None, ObservationError, "max_new_tokens=6"),
        (torch.tensor([5]), {"nope": 1}, InterventionError, "unknown site"),
    ],
)
def test_string_log_prob_bad_input(lm, ids, intervention, error, match):
    scm = LanguageModelSCM(lm, max_new_tokens=6)
    with pytest.raises(error, match=match):
        string_log_prob(scm, PROMPT, ids, intervention)
