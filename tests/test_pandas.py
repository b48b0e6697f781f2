"""pandas exports: CounterfactualDistribution.to_pandas, AbductionComparison.to_pandas and
study.load_records round-trip the counts, probabilities and records."""

import pytest
import torch

from pyro_lmscm import LanguageModelSCM, ModelSwap, abduct, counterfactual
from pyro_lmscm.inference import compare_abduction
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3, 4])


@pytest.fixture(scope="module")
def scm():
    return LanguageModelSCM(tiny_llama(seed=0), 4, mechanisms={"other": ModelSwap(tiny_llama(seed=1))})


def test_counterfactual_distribution_round_trips_counts_and_probabilities(scm):
    dist = counterfactual(scm, PROMPT, None, {"mechanism": "other"}, num_samples=300, seed=0).counterfactual
    frame = dist.to_pandas()
    counts = dist.counts()
    assert {tuple(ids): int(c) for ids, c in zip(frame["ids"], frame["count"])} == counts
    probabilities = dist.probabilities()
    for ids, p in zip(frame["ids"], frame["probability"]):
        assert p == pytest.approx(probabilities[tuple(ids)], abs=1e-15)
    assert frame["count"].sum() == 300 and frame["probability"].sum() == pytest.approx(1.0, abs=1e-12)
    assert list(frame["probability"]) == sorted(frame["probability"], reverse=True)
    changed = {tuple(ids): c for ids, c in zip(frame["ids"], frame["changed"])}
    assert all(changed[s] == float(s != dist.factual) for s in counts)
    assert "text" in frame.columns and frame["text"].map(type).eq(str).all()


def test_weighted_draws_keep_their_weights(scm):
    observed = counterfactual(scm, PROMPT, None, {}, seed=1).factual_ids[:1]
    result = abduct(scm, PROMPT, observed, "importance", num_samples=400, seed=0)
    assert 0 < int((result.log_weights > -float("inf")).sum()) < 400  # really weighted
    dist = result.counterfactual({"mechanism": "other"})
    frame = dist.to_pandas()
    assert frame["count"].sum() == int((dist.weights > 0).sum())
    assert frame["probability"].sum() == pytest.approx(1.0, abs=1e-12)
    assert dict(zip(map(tuple, frame["ids"]), frame["probability"])) == pytest.approx(dist.probabilities())


def test_abduction_comparison_to_pandas(scm):
    comparison = compare_abduction(scm, PROMPT, None, {"mechanism": "other"}, methods=["exact", "importance"],
                                   num_samples=64, seed=0)
    frame = comparison.to_pandas()
    rows = comparison.to_dicts()
    assert list(frame.columns) == list(rows[0]) and len(frame) == len(rows) == 2
    for got, want in zip(frame.to_dict("records"), rows):
        for key, value in want.items():
            assert got[key] == value or (value != value and got[key] != got[key]), key  # NaN == NaN
