"""study.load_records: the records of a study as a pandas DataFrame, one row per draw."""

import pytest

from pyro_lmscm.study import StudyError, load_records, run_study


@pytest.mark.parametrize("format", ["jsonl", "parquet"])
def test_load_records_has_one_row_per_draw(make_config, format):
    result = run_study(make_config(format=format))
    frame = load_records(result.output_dir)
    records = [r for r in result.records if r.get("error") is None]
    assert len(frame) == sum(len(r["counterfactual"]) + len(r["interventional"]) for r in records)
    for record in records:
        rows = frame[frame["index"] == record["index"]]
        cf = rows[rows["kind"] == "counterfactual"]
        assert list(cf["changed"]) == [d["changed"] for d in record["counterfactual"]]
        assert (rows["prob_unchanged"] == record["exact"]["prob_unchanged"]).all()
    with pytest.raises(StudyError, match="no study records"):
        load_records(result.output_dir / "nothing")
