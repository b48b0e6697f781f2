"""The bounds over mechanisms in study records (``record["exact"]["bounds"]``), their summary
rows, the HTML report and the resume of records stored before records carried them."""

import json

import numpy as np
import pytest
import torch

from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.study import StudyWorker, read_corpus, run_study, summarize
from pyro_lmscm.study.records import BOUNDS_KEYS
from pyro_lmscm.study.summary import EXACT
from pyro_lmscm.testing import tiny_llama


@pytest.fixture(scope="module")
def lm64():
    """The factual tiny model in float64: the study's passes and a fresh exact_counterfactual
    agree to rounding (float32 differs by 1e-7 between a decoding run and a teacher-forced pass)."""
    return tiny_llama(seed=0, dtype=torch.float64)


@pytest.mark.parametrize("exact_only, batch_size", [(False, 1), (False, 4), (True, 4)])
def test_record_bounds_equal_exact_counterfactual_bounds(make_config, corpus_file, lm64, exact_only, batch_size):
    worker = StudyWorker(make_config(exact_only=exact_only, batch_size=batch_size, num_samples=2), lm=lm64)
    records = worker.process_many(read_corpus(corpus_file))
    checked = 0
    for record in records:
        if record["error"] is not None:
            continue
        exact = exact_counterfactual(
            worker.scm, worker.lm.encode(record["prompt"]), torch.tensor(record["factual"]["ids"]), worker.intervention
        )
        expected = exact.bounds().summary()
        bounds = record["exact"]["bounds"]
        assert set(bounds) == set(BOUNDS_KEYS)
        for key in BOUNDS_KEYS:
            assert bounds[key] == pytest.approx(expected[key], abs=1e-9), key
        for query in ("prob_unchanged", "expected_first_divergence"):
            assert bounds[f"{query}_gumbel"] == pytest.approx(record["exact"][query], abs=1e-12)  # GumbelMax()
            ends = ("gumbel", "stable_low", "stable_high", "any_low", "any_high")
            b = {end: bounds[f"{query}_{end}"] for end in ends}
            assert b["any_low"] - 1e-12 <= b["stable_low"] <= b["gumbel"] + 1e-12
            assert b["gumbel"] <= b["stable_high"] + 1e-12 and b["stable_high"] == b["any_high"]
        checked += 1
    assert checked >= 8


def test_null_intervention_bounds_are_one_point(make_config, corpus_file):
    worker = StudyWorker(make_config(intervention="", exact_only=True))
    for record in worker.process_many(read_corpus(corpus_file)):
        n = record["factual"]["length"]
        bounds = record["exact"]["bounds"]
        assert all(bounds[f"prob_unchanged_{end}"] == 1.0 for end in ("gumbel", "stable_low", "any_low", "any_high"))
        assert bounds["expected_first_divergence_any_low"] == n == bounds["expected_first_divergence_stable_high"]


def test_summary_carries_the_bounds_with_intervals(make_config, corpus_file):
    worker = StudyWorker(make_config(exact_only=True))
    records = worker.process_many(read_corpus(corpus_file))
    good = [r for r in records if r["error"] is None]
    rows = {row.metric: row for row in summarize(records, bootstrap=300) if row.kind == EXACT}
    widths = 0.0
    for key in BOUNDS_KEYS:
        values = np.array([r["exact"]["bounds"][key] for r in good])
        row = rows[key]
        assert row.n == len(good) and row.mean == pytest.approx(values.mean(), abs=1e-12)
        assert values.min() - 1e-12 <= row.low <= row.mean <= row.high <= values.max() + 1e-12
        widths += values.std()
    assert widths > 0  # the strings differ: the intervals are not points
    low, high = rows["prob_unchanged_stable_low"].mean, rows["prob_unchanged_stable_high"].mean
    assert rows["prob_unchanged_any_low"].mean <= low <= rows["prob_unchanged_gumbel"].mean <= high


def test_report_shows_bounds_and_a_resume_fills_missing_ones(make_config, tmp_path):
    config = make_config(exact_only=True, batch_size=4, report=True)
    first = run_study(config)
    html = first.files["html"].read_text()
    assert "stable mechanisms: low end" in html and 'title="P(unchanged) over all mechanisms"' in html
    assert "stable mechanisms: low end" in first.files["summary_md"].read_text()
    path = config.output_dir / "records.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for record in lines[:2]:  # as stored before records carried bounds
        del record["exact"]["bounds"]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    again = run_study(config)
    assert again.recomputed == 4 and again.computed == 4  # their batch, whole
    assert [r["exact"] for r in again.records] == [r["exact"] for r in first.records]
    third = run_study(config)
    assert third.computed == 0
