import json

import pytest

from pyro_lmscm.study import JSONLStore, ParquetStore, StudyError, open_store

RECORDS = [
    {"index": 2, "prompt": "b", "factual": {"ids": [1, 2], "log_prob_factual": None}, "x": 0.1 + 0.2},
    {"index": 0, "prompt": "a", "factual": {"ids": [3], "log_prob_factual": -1.5}, "x": -0.0},
]


def test_jsonl_round_trip_sorted_and_exact(tmp_path):
    store = JSONLStore(tmp_path / "r.jsonl")
    for record in RECORDS:
        store.append(record)
    store.close()
    assert store.load() == sorted(RECORDS, key=lambda r: r["index"])
    assert store.done() == {0, 2}


def test_jsonl_ignores_and_repairs_a_cut_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    whole = json.dumps(RECORDS[0]) + "\n"
    path.write_text(whole + json.dumps(RECORDS[1])[:17])  # a crash mid-write
    store = JSONLStore(path)
    assert [r["index"] for r in store.load()] == [2]
    store.append(RECORDS[1])  # cuts the partial line first
    store.close()
    assert path.read_text() == whole + json.dumps(RECORDS[1]) + "\n"
    assert [r["index"] for r in store.load()] == [0, 2]


def test_jsonl_keeps_a_whole_last_line_without_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(RECORDS[0]))
    store = JSONLStore(path)
    assert store.done() == {2}
    store.append(RECORDS[1])
    store.close()
    assert store.done() == {0, 2}


def test_jsonl_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"index": 0}\n{oops\n{"index": 1}\n')
    with pytest.raises(StudyError, match="line 2"):
        JSONLStore(path).load()


def test_jsonl_refuses_nan(tmp_path):
    store = JSONLStore(tmp_path / "r.jsonl")
    with pytest.raises(ValueError):
        store.append({"index": 0, "x": float("nan")})
    store.close()


def test_open_store_formats(tmp_path):
    assert isinstance(open_store(tmp_path, "jsonl"), JSONLStore)
    with pytest.raises(StudyError, match="unknown record format"):
        open_store(tmp_path, "csv")


def test_parquet_store_matches_jsonl(tmp_path, make_config):
    pytest.importorskip("pyarrow")
    from pyro_lmscm.study import run_study

    records = run_study(make_config(limit=3, output=str(tmp_path / "j"))).records
    unscored = run_study(make_config(limit=2, output=str(tmp_path / "u"), draw_scores=False)).records  # null lists
    parquet = ParquetStore(tmp_path / "p")
    for record in records:
        parquet.append(record)
    parquet.append({**records[0], "index": 7, "error": "AbductionError: x", "factual": None})
    loaded = parquet.load()
    assert loaded[:3] == records
    assert loaded[3]["error"] == "AbductionError: x" and "factual" not in loaded[3]
    assert parquet.done() == {0, 1, 2, 7}
    assert not list((tmp_path / "p").glob(".tmp-*"))
    other = ParquetStore(tmp_path / "q")
    for record in unscored:
        other.append(record)
    assert other.load() == unscored and unscored[0]["counterfactual"][0]["token_log_prob_factual"] is None
