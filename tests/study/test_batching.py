"""Studies in batches of strings (batch_size) and exact-only studies.

* a batched record is reproducible: resumed mid-batch, cut by a limit, or on Ray, it equals
  the uninterrupted run's bit for bit (test_runner and test_ray_backend run them batched);
* another batch size gives other draws of the same distributions (a statistical test, with
  a baseline that fails it);
* an exact-only record holds the exact metrics of its factual string, computed here again
  independently (teacher-forced), and no draws.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_lmscm.inference import exact_counterfactual, most_probable
from pyro_lmscm.metrics import trim_after_end
from pyro_lmscm.study import CorpusItem, StudyWorker, run_study
from pyro_lmscm.study.summary import summarize
from pyro_lmscm.study.worker import MODE_BEAMS, batch_seed


def test_a_batch_resumed_midway_equals_the_uninterrupted_run(make_config, tmp_path):
    full = run_study(make_config(output=str(tmp_path / "full"), batch_size=4)).records
    assert {r["seed"] for r in full[:4]} == {batch_seed(0, 0, 4)} and full[4]["seed"] == batch_seed(0, 4, 4)
    part = make_config(output=str(tmp_path / "part"), batch_size=4, limit=6)  # the limit cuts the second batch
    assert run_study(part).records == full[:6]
    records = part.output_dir / "records.jsonl"
    lines = [line for line in records.read_text().splitlines() if json.loads(line)["index"] != 1]
    records.write_text("\n".join(lines) + "\n")  # as if killed after storing 0, 2 and 3 of the first batch
    resumed = run_study(make_config(output=str(tmp_path / "part"), batch_size=4))
    assert resumed.computed == 4 and resumed.skipped == 5
    assert resumed.records == full


def test_one_bad_string_costs_only_its_own_record(make_config):
    worker = StudyWorker(make_config(top_k=1, batch_size=3))
    items = [
        CorpusItem(0, "the man said", None), CorpusItem(1, "the man", "she she she"), CorpusItem(2, "the city", None)
    ]
    records = worker.process_many(items)
    assert records[1]["error"].startswith("AbductionError") and "counterfactual" not in records[1]
    assert records[0]["error"] is None and records[2]["error"] is None
    zebra = worker.process_many([CorpusItem(3, "the zebra", None), CorpusItem(4, "the city", None)])
    assert zebra[0]["error"].startswith("TokenizationError") and zebra[1]["error"] is None


def _first_tokens(config):
    """Counts of the factual strings' first tokens, and of the counterfactuals' first tokens."""
    records = run_study(config).records
    factual = np.bincount([r["factual"]["ids"][0] for r in records], minlength=64)
    cf = np.bincount([d["ids"][0] for r in records for d in r["counterfactual"]], minlength=64)
    return factual, cf


def _homogeneity(a, b):
    seen = (a + b) > 0
    return stats.chi2_contingency(np.stack([a[seen], b[seen]]))[1]


def test_another_batch_size_gives_the_same_distributions(make_config, tmp_path):
    """Batches of 1 and of 8 over 160 copies of one prompt: the first tokens of the factual
    strings and of their counterfactuals agree (chi-square homogeneity, p > 1e-3); a study
    whose factual model is the other tiny model fails the same test."""
    corpus = tmp_path / "copies.txt"
    corpus.write_text("the man said\n" * 160)
    common = dict(corpus=str(corpus), num_samples=2, max_new_tokens=4, attribute=None)
    one, cf_one = _first_tokens(make_config(output=str(tmp_path / "b1"), batch_size=1, **common))
    eight, cf_eight = _first_tokens(make_config(output=str(tmp_path / "b8"), batch_size=8, **common))
    assert _homogeneity(one, eight) > 1e-3 and _homogeneity(cf_one, cf_eight) > 1e-3
    config = make_config(output=str(tmp_path / "other"), batch_size=8, **common)
    other_model = config.intervention.removeprefix("model=")
    other, _ = _first_tokens(config.replace(model=other_model, intervention=f"model={config.model}"))
    assert _homogeneity(one, other) < 1e-6  # another factual model fails


@pytest.mark.parametrize("top_k", [None, 5])
def test_exact_only_records_hold_the_exact_metrics_of_their_string(make_config, tmp_path, top_k):
    config = make_config(output=str(tmp_path / "exact"), exact_only=True, batch_size=4, top_k=top_k)
    result = run_study(config)
    worker = StudyWorker(config)
    for record in result.records:
        if record.get("error") is not None:
            continue
        assert record["counterfactual"] == [] and record["interventional"] == []
        exact_fields = record["exact"]
        lm = worker.lm
        prompt, factual = lm.encode(record["prompt"]), torch.tensor(record["factual"]["ids"])
        exact = exact_counterfactual(worker.scm, prompt, factual, worker.intervention)  # teacher-forced, alone
        assert exact_fields["prob_unchanged"] == pytest.approx(exact.prob_unchanged(), abs=1e-6)
        law = exact.first_divergence().tolist()
        assert exact_fields["first_divergence"] == pytest.approx(law, abs=1e-6)
        mode = torch.tensor(exact_fields["mode_ids"])
        assert exact_fields["mode_log_prob"] == pytest.approx(float(exact.log_prob(mode[None])), abs=1e-4)
        horizon = worker.scm.max_new_tokens if factual[-1] in lm.eos_token_ids else len(factual)
        alone = most_probable([exact], MODE_BEAMS, lengths=[horizon])[0][0]
        assert exact_fields["mode_ids"] == trim_after_end(alone, lm.eos_token_ids)
        assert exact_fields["mode_changed"] == float(exact_fields["mode_ids"] != record["factual"]["ids"])
        assert exact_fields["mode_text"] == lm.decode(mode)
    assert result.files == {} or "summary_md" in result.files


def test_exact_only_study_report(make_config, tmp_path):
    result = run_study(make_config(output=str(tmp_path / "report"), exact_only=True, report=True, limit=4))
    summary = result.summary_markdown
    assert "exact P(unchanged)" in summary and "most probable counterfactual differs" in summary
    assert (tmp_path / "report" / "report.html").is_file()


SCORE_FIELDS = ("token_log_prob_factual", "token_log_prob_intervened", "log_prob_factual", "log_prob_intervened")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_draws_not_scored_are_the_same_draws_with_null_scores(make_config, tmp_path, batch_size):
    """draw_scores=False: every record equals the scored study's with the draws' scores and
    exact token probabilities nulled (draws, distances, the factual string's scores and the
    exact metrics the same numbers); the summary counts no scored draw, and the report renders."""
    full = run_study(make_config(output=str(tmp_path / "full"), batch_size=batch_size)).records
    lean_config = make_config(output=str(tmp_path / "lean"), batch_size=batch_size, draw_scores=False, report=True)
    lean = run_study(lean_config)
    assert len(lean.records) == len(full) and any(r["counterfactual"] for r in full)
    for scored, record in zip(full, lean.records):
        expected, record = json.loads(json.dumps(scored)), dict(record)
        assert expected.pop("fingerprint") != record.pop("fingerprint")  # records of another result
        assert expected.pop("batch_fingerprint") != record.pop("batch_fingerprint")
        if "factual" in expected:  # scored in a batch of other rows: equal up to float32 rounding
            expected["factual"], record["factual"] = dict(expected["factual"]), dict(record["factual"])
            for field in SCORE_FIELDS:
                got, want = record["factual"].pop(field), expected["factual"].pop(field)
                assert got == pytest.approx(want, abs=1e-4, rel=1e-5) and got is not None
        for kind in ("counterfactual", "interventional"):
            for draw in expected.get(kind, []):
                assert draw["log_prob_intervened"] is not None  # the scored study did score it
                draw.update(dict.fromkeys(SCORE_FIELDS), token_prob_counterfactual=None)
        assert record == expected
    rows = {(row.metric, row.kind): row for row in summarize(lean.records, bootstrap=10)}
    for metric in (*SCORE_FIELDS[2:], "outside_factual_support"):
        assert rows[(metric, "counterfactual")].n == 0 and rows[(metric, "interventional")].n == 0
    assert rows[("changed", "counterfactual")].n > 0
    assert (tmp_path / "lean" / "report.html").is_file() and "log p under the intervened model" in lean.summary_markdown


@pytest.mark.parametrize("batch_size", [1, 4])
def test_draw_scores_equal_teacher_forced_ones(make_config, tmp_path, batch_size):
    """The draws' scores under the intervention and their exact token probabilities, recorded
    while decoding, and the factual string's scores, against independent teacher-forced
    passes of each string alone: the scorer and the exact chain (float32, to 1e-4). The
    draws' scores under the factual model must differ from those under the intervention."""
    from pyro_lmscm.inference import token_log_probs

    config = make_config(output=str(tmp_path / f"scores{batch_size}"), batch_size=batch_size)
    result = run_study(config)
    worker = StudyWorker(config)
    lm, checked, differs = worker.lm, 0, 0
    for record in result.records:
        if record.get("error") is not None:
            continue
        prompt, factual = lm.encode(record["prompt"]), torch.tensor(record["factual"]["ids"])
        exact = exact_counterfactual(worker.scm, prompt, factual, worker.intervention)
        data = exact.intervention
        fields = record["factual"]  # from the abduction's logits and the exact metrics' pass
        assert fields["token_log_prob_factual"] == pytest.approx(
            token_log_probs(worker.scm, prompt, factual[None])[0].tolist(), abs=1e-4)
        assert fields["token_log_prob_intervened"] == pytest.approx(
            token_log_probs(worker.scm, prompt, factual[None], data)[0].tolist(), abs=1e-4)
        for kind in ("counterfactual", "interventional"):
            for draw in record[kind]:
                ids = torch.tensor(draw["ids"])[None]
                alone = token_log_probs(worker.scm, prompt, ids, data)[0].tolist()
                assert draw["token_log_prob_intervened"] == pytest.approx(alone, abs=1e-4)
                assert draw["log_prob_intervened"] == pytest.approx(sum(alone), abs=1e-4)
                factual_scores = token_log_probs(worker.scm, prompt, ids)[0].tolist()
                assert draw["token_log_prob_factual"] == pytest.approx(factual_scores, abs=1e-4)
                differs += draw["token_log_prob_factual"] != pytest.approx(alone, abs=1e-2)
                if kind == "counterfactual":
                    probs = exact.token_log_probs(ids)[0].exp().tolist()
                    assert draw["token_prob_counterfactual"] == pytest.approx(probs, abs=1e-4)
                checked += 1
    assert checked >= 20 and differs >= checked // 2
