import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pyro_lmscm.errors import DecodingError
from pyro_lmscm.models import Decoding


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 1, 5])
@pytest.mark.parametrize("top_p", [None, 0.5, 0.9])
def test_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 3, 50) * 3
    expected = logits.reshape(-1, 50).clone()
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    for warper in warpers:
        expected = warper(None, expected)
    out = Decoding(temperature, top_k, top_p)(logits)
    assert out.shape == logits.shape
    assert torch.equal(torch.isinf(out), torch.isinf(expected.reshape(logits.shape)))
    finite = torch.isfinite(out)
    torch.testing.assert_close(out[finite], expected.reshape(logits.shape)[finite])


def test_does_not_modify_input_and_upcasts():
    logits = torch.randn(10, dtype=torch.bfloat16)
    before = logits.clone()
    out = Decoding(temperature=0.7, top_k=3)(logits)
    assert torch.equal(logits, before)
    assert out.dtype == torch.float32
    assert int(torch.isfinite(out).sum()) == 3


def test_top_p_keeps_most_likely_token():
    logits = torch.tensor([10.0, 0.0, -1.0])
    out = Decoding(top_p=0.01)(logits)
    assert torch.isfinite(out).tolist() == [True, False, False]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"temperature": float("inf")},
        {"top_k": 0},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ],
)
def test_bad_settings_raise_typed_error(kwargs):
    with pytest.raises(DecodingError, match=next(iter(kwargs))):
        Decoding(**kwargs)
    with pytest.raises(ValueError):
        Decoding(**kwargs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_the_support_holds_the_decoded_logits_of_every_possible_token(temperature, top_k):
    """``Decoding.support`` gives a few columns per row and the decoded logits there: they must
    equal ``Decoding.__call__`` at those columns bit for bit, and every column left out must be
    ``-inf`` there. Logits on a grid of 24 values tie often (a bfloat16 model's do), so the k-th
    value is tied in many rows; a row where more than 2k tokens reach the k-th value must be
    refused (``None``), and only such a row (its 2k + 1 largest cannot tell). The baseline, the k
    largest logits alone, misses tied tokens."""
    generator = torch.Generator().manual_seed(top_k)
    logits = torch.randint(0, 24, (300, 40), generator=generator).float() / 4
    logits[::7, :5] = -float("inf")  # (a model may rule tokens out)
    decoding = Decoding(temperature, top_k)
    refused = kept = missed = 0
    for row in logits:
        decoded = decoding(row[None])
        found = decoding.support(row[None])
        kth = torch.topk(row, top_k).values[-1]
        if found is None:  # only where the ties run past 2k tokens
            assert int((row >= kth).sum()) > 2 * top_k
            refused += 1
            continue
        columns, values = found
        assert columns.shape == values.shape == (1, 2 * top_k + 1)
        assert torch.equal(values, decoded.gather(-1, columns))
        outside = torch.ones_like(decoded, dtype=torch.bool).scatter_(-1, columns, False)
        assert bool((decoded[outside] == -float("inf")).all())
        kept += 1
        naive = torch.topk(row, top_k).indices  # the baseline
        missed += int(torch.isfinite(decoded).sum()) > int(torch.isfinite(decoded[0, naive]).sum())
    assert kept and missed  # ties at the k-th value, held by the support and missed by the baseline
    assert refused or top_k > 1  # (k = 1: some maximum of a row ties three tokens)
    assert Decoding(temperature, top_k, top_p=0.9).support(logits) is None  # top-p needs the whole row
    assert Decoding(temperature).support(logits) is None
    assert Decoding(temperature, top_k, top_p=1.0).support(logits[:1]) is not None or refused  # (top-p 1 keeps all)
    tied = torch.ones(2, 40)  # every token ties the k-th value
    assert decoding.support(tied) is None
    wide = Decoding(temperature, 30)  # 2k beyond the vocabulary: every column
    columns, values = wide.support(tied)
    assert columns.shape == (2, 40) and torch.equal(values, wide(tied).gather(-1, columns))
