import csv
import math

import numpy as np
import pytest

from pyro_lmscm.study import METRICS, draw_rows, run_study, summarize, summary_markdown


def _record(index, cf, it, group="g"):
    def draws(values):
        return [{"changed": v > 0, "first_divergence": 0 if v > 0 else None, "normalized_token_edit_distance": v,
                 "log_prob_factual": None if v > 0.9 else -1.0, "flipped": None} for v in values]

    return {"index": index, "group": group, "error": None, "counterfactual": draws(cf), "interventional": draws(it)}


def test_means_intervals_and_paired_difference():
    records = [
        _record(0, [0.0, 0.2], [0.5, 0.5]), _record(1, [0.4, 0.4], [1.0, 0.8]), _record(2, [0.1, 0.1], [0.6, 0.6])
    ]
    rows = {(r.metric, r.kind): r for r in summarize(records, bootstrap=500, seed=0)}
    cf = rows["normalized_token_edit_distance", "counterfactual"]
    it = rows["normalized_token_edit_distance", "interventional"]
    diff = rows["normalized_token_edit_distance", "difference"]
    assert cf.mean == pytest.approx(0.2) and it.mean == pytest.approx(4.0 / 6) and cf.n == it.n == 6
    assert diff.mean == pytest.approx(cf.mean - it.mean)
    for row in (cf, it, diff):
        assert row.low <= row.mean <= row.high
    assert diff.high < 0  # every string's counterfactual is closer
    changed = rows["changed", "counterfactual"]
    assert changed.mean == pytest.approx(5 / 6)
    divergence = rows["first_divergence", "counterfactual"]
    assert divergence.n == 5  # only changed draws count
    outside = rows["outside_factual_support", "interventional"]
    assert outside.mean == pytest.approx(1 / 6)
    assert rows["log_prob_factual", "interventional"].n == 5
    flipped = rows["flipped", "counterfactual"]
    assert flipped.n == 0 and math.isnan(flipped.mean)
    # the same seed gives the same intervals
    again = {(r.metric, r.kind): r for r in summarize(records, bootstrap=500, seed=0)}
    assert repr(again) == repr(rows)  # (nan != nan)


def test_cluster_bootstrap_resamples_strings():
    # two strings, each with identical draws: the interval spans the two string means
    records = [_record(0, [0.0] * 4, [0.0] * 4), _record(1, [1.0] * 4, [1.0] * 4)]
    row = next(r for r in summarize(records, bootstrap=2000) if r.metric == "normalized_token_edit_distance")
    assert row.low == 0.0 and row.high == 1.0


def test_errors_are_left_out_and_markdown():
    records = [_record(0, [0.1], [0.9]), {"index": 1, "error": "AbductionError: x"}]
    rows = summarize(records, bootstrap=50)
    assert len(rows) == 3 * len(METRICS)
    text = summary_markdown(rows)
    assert text.startswith("| metric | counterfactual | interventional | CF − interventional |")
    assert "| normalised token edit distance | 0.100 [0.100, 0.100] | 0.900 [0.900, 0.900] |" in text
    assert summarize([records[1]]) == []
    assert [row["index"] for row in draw_rows(records)] == [0, 0]


def test_write_report_files(make_config):
    result = run_study(make_config(report=True))
    files = result.files
    assert set(files) >= {"summary_md", "summary_csv", "draws_csv", "html", "edit_distance_png", "divergence_png"}
    for name in ("edit_distance_png", "divergence_png"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = files["summary_md"].read_text()
    assert "By group:" in summary and "| women | changed (share of draws) |" in summary
    with open(files["summary_csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert {row["group"] for row in rows} == {"all", "men", "women", "neither"}
    assert {row["kind"] for row in rows} == {"counterfactual", "interventional", "difference", "exact"}
    with open(files["draws_csv"]) as handle:
        draws = list(csv.DictReader(handle))
    assert len(draws) == 9 * 2 * 3
    values = np.array([float(d["normalized_token_edit_distance"]) for d in draws if d["kind"] == "counterfactual"])
    cf = next(r for r in rows if r["metric"] == "normalized_token_edit_distance" and r["group"] == "all"
              and r["kind"] == "counterfactual")
    assert float(cf["mean"]) == pytest.approx(values.mean())


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(make_config):
    from pyro_lmscm.study import write_report

    config = make_config(limit=2)
    result = run_study(config)
    records = result.records
    payloads = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)"]
    for record in records:
        record["group"] = "=HYPERLINK(\"http://evil\")"
        for kind in ("counterfactual", "interventional"):
            for draw, text in zip(record[kind], payloads * 3):
                draw["text"] = text
    files = write_report(result.output_dir, records, config)
    with open(files["draws_csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    texts = {row["text"] for row in rows}
    assert texts and all(text.startswith("'") for text in texts), texts
    assert {text[1:] for text in texts} <= set(payloads)
    assert all(row["group"] == "'=HYPERLINK(\"http://evil\")" for row in rows)
    assert any(float(row["log_prob_factual"]) < 0 for row in rows if row["log_prob_factual"])  # numbers stay numbers
    with open(files["summary_csv"], newline="", encoding="utf-8") as handle:
        assert all(not row["group"].startswith("=") for row in csv.DictReader(handle))
