"""The exact metrics of study records (``record["exact"]``, ``token_prob_counterfactual``),
their summary rows, and the exclusion intervention in a study config."""

import numpy as np
import pytest
from scipy import stats

from pyro_lmscm.study import StudyWorker, read_corpus, summarize
from pyro_lmscm.study.summary import EXACT


def test_null_intervention_is_unchanged_with_probability_one(make_config, corpus_file):
    worker = StudyWorker(make_config(intervention=""))
    for item in read_corpus(corpus_file):
        record = worker.process(item)
        exact, n = record["exact"], record["factual"]["length"]
        assert exact["prob_unchanged"] == 1.0 and exact["first_divergence"][-1] == 1.0
        assert len(exact["first_divergence"]) == n + 1 and exact["expected_first_divergence"] == n
        assert exact["token_prob_unchanged"] == [1.0] * n
        for draw in record["counterfactual"]:
            assert draw["token_prob_counterfactual"] == [1.0] * draw["length"]


def test_exact_prob_unchanged_matches_the_sampled_share_and_the_baseline_does_not(make_config, corpus_file):
    """Per string, the share of unchanged counterfactual draws (200 draws) is binomial with
    the exact P(unchanged): a two-sided binomial test, p > 1e-3 for every string. The
    interventional draws' share, tested against the same probabilities, must fail."""
    worker = StudyWorker(make_config(num_samples=200, seed=0))
    counterfactual_p, interventional_p, compared = [], [], 0
    for item in read_corpus(corpus_file):
        record = worker.process(item)
        if record["error"] is not None:
            continue
        p = record["exact"]["prob_unchanged"]
        assert abs(sum(record["exact"]["first_divergence"]) - 1.0) < 1e-9
        kept_cf = sum(not d["changed"] for d in record["counterfactual"])
        kept_int = sum(not d["changed"] for d in record["interventional"])
        counterfactual_p.append(stats.binomtest(kept_cf, 200, min(max(p, 1e-12), 1 - 1e-12)).pvalue)
        interventional_p.append(stats.binomtest(kept_int, 200, min(max(p, 1e-12), 1 - 1e-12)).pvalue)
        compared += 1
    assert compared >= 6
    assert min(counterfactual_p) > 1e-3, counterfactual_p
    assert min(interventional_p) < 1e-3, interventional_p


def test_the_summary_averages_the_exact_metrics_over_strings(make_config, corpus_file):
    worker = StudyWorker(make_config())
    records = [worker.process(item) for item in read_corpus(corpus_file)]
    good = [r for r in records if r["error"] is None]
    rows = {row.metric: row for row in summarize(records, bootstrap=300) if row.kind == EXACT}
    for key in ("prob_unchanged", "expected_first_divergence"):
        values = np.array([r["exact"][key] for r in good])
        assert rows[key].mean == pytest.approx(values.mean(), abs=1e-12) and rows[key].n == len(good)
        assert values.min() - 1e-12 <= rows[key].low <= rows[key].mean <= rows[key].high <= values.max() + 1e-12


def test_exclude_in_a_study_config_replaces_the_factual_token(make_config, corpus_file):
    worker = StudyWorker(make_config(intervention="exclude=1"))
    checked = 0
    for item in read_corpus(corpus_file):
        record = worker.process(item)
        assert record["error"] is None or "observation has 1 tokens" in record["error"], record["error"]
        if record["error"] is not None:
            continue
        checked += 1
        factual = record["factual"]["ids"]
        assert record["exact"]["prob_unchanged"] == 0.0
        assert record["exact"]["first_divergence"][1] == pytest.approx(1.0, abs=1e-12)
        for draw in record["counterfactual"]:
            assert draw["ids"][0] == factual[0] and draw["ids"][1] != factual[1]
    assert checked >= 7  # the sampled continuations as well as the given one
