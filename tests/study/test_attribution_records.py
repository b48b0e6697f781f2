"""The attribution option of a study (``attribution: layer``): records carry the exact
attribution of the effect to the parts of the intervention's mechanism, the summary its means
per part, and the option enters the resume fingerprint."""

import json

import numpy as np
import pytest
import torch

from pyro_lmscm.errors import StudyError
from pyro_lmscm.inference import attribute
from pyro_lmscm.study import StudyConfig, StudyWorker, read_corpus, run_study, summarize
from pyro_lmscm.study.records import ATTRIBUTION_VALUES
from pyro_lmscm.study.summary import ATTRIBUTION, ATTRIBUTION_COLUMNS, attribution_metric
from pyro_lmscm.testing import tiny_llama


@pytest.fixture(scope="module")
def lm64():
    return tiny_llama(seed=0, dtype=torch.float64)


@pytest.mark.parametrize("exact_only, batch_size", [(False, 1), (True, 4)])
def test_record_attribution_equals_attribute(make_config, corpus_file, lm64, exact_only, batch_size):
    config = make_config(exact_only=exact_only, batch_size=batch_size, num_samples=1, attribution="layer", limit=5)
    worker = StudyWorker(config, lm=lm64)
    records = worker.process_many(read_corpus(corpus_file)[:5])
    checked = 0
    for record in records:
        assert record["error"] is None, record["error"]
        found = attribute(
            worker.scm, worker.lm.encode(record["prompt"]), torch.tensor(record["factual"]["ids"]),
            worker.intervention, by="layer",
        )
        mine = record["attribution"]
        assert mine["parts"] == found.parts and mine["exact"] is True and mine["by"] == "layer"
        assert mine["num_passes"] == 2 ** len(found.parts) - 1  # the factual logits are the abduction's
        for name in ATTRIBUTION_VALUES:
            expected = [getattr(found, name)[part] for part in found.parts]
            assert mine[name] == pytest.approx(expected, abs=1e-9), name
        assert mine["prob_unchanged"] == pytest.approx(record["exact"]["prob_unchanged"], abs=1e-9)
        assert sum(mine["shapley"]) == pytest.approx(np.log(mine["prob_unchanged"]), abs=1e-9)
        checked += 1
    assert checked == 5
    assert json.loads(json.dumps(records)) == records  # JSON-ready


def test_summary_means_per_part_with_intervals(make_config, corpus_file):
    worker = StudyWorker(make_config(exact_only=True, attribution="layer"))
    records = worker.process_many(read_corpus(corpus_file))
    good = [r for r in records if r["error"] is None]
    parts = good[0]["attribution"]["parts"]
    rows = {row.metric: row for row in summarize(records, bootstrap=300) if row.kind == ATTRIBUTION}
    assert len(rows) == len(parts) * len(ATTRIBUTION_COLUMNS)
    for i, part in enumerate(parts):
        for name, _ in ATTRIBUTION_COLUMNS:
            values = np.array([r["attribution"][name][i] for r in good], dtype=float)
            row = rows[attribution_metric(name, part)]
            assert row.n == len(good) and row.mean == pytest.approx(values.mean(), abs=1e-12)
            assert values.min() - 1e-12 <= row.low <= row.mean <= row.high <= values.max() + 1e-12


def test_attribution_option_is_checked_and_fingerprinted(make_config):
    assert make_config(attribution="layer").result_settings()["attribution"] == make_config(
        attribution={"by": "layer"}
    ).result_settings()["attribution"] == {"by": "layer", "max_exact_parts": 12, "num_permutations": 64}
    assert "attribution" not in make_config().result_settings()
    assert make_config(attribution="layer").fingerprint() != make_config().fingerprint()
    assert make_config(attribution={"by": "layer", "num_permutations": 8}).fingerprint() != make_config(
        attribution="layer").fingerprint()
    with pytest.raises(StudyError, match="attribute --by step"):
        make_config(attribution="step")
    with pytest.raises(StudyError, match=r"unknown `attribution` keys \['function'\]"):
        make_config(attribution={"by": "layer", "function": "os.system"})
    with pytest.raises(StudyError, match="attribution.max_exact_parts"):
        make_config(attribution={"max_exact_parts": -1})
    with pytest.raises(StudyError, match="`attribution` must be 'layer' or a mapping"):
        make_config(attribution=3)
    with pytest.raises(StudyError, match="changes no mechanism"):
        StudyWorker(make_config(intervention="w_0=3", attribution="layer"))
    assert StudyConfig.from_mapping({**make_config().to_dict(), "attribution": "layer"}).attribution == "layer"


def test_resume_with_a_changed_attribution_recomputes(make_config):
    plain = make_config(exact_only=True, limit=4)
    first = run_study(plain)
    assert all("attribution" not in r for r in first.records)
    with pytest.raises(StudyError, match="attribution"):
        run_study(make_config(exact_only=True, limit=4, attribution="layer"))
    second = run_study(make_config(exact_only=True, limit=4, attribution="layer", force_recompute=True))
    assert second.computed == 4 and all(r["attribution"]["parts"] for r in second.records)
    assert [r["exact"] for r in second.records] == [r["exact"] for r in first.records]
    with pytest.raises(StudyError, match="attribution"):  # dropping it changes the records too
        run_study(plain)
    third = run_study(make_config(exact_only=True, limit=4, attribution="layer"))
    assert third.computed == 0


def test_parquet_records_keep_the_attribution_and_bounds(make_config):
    pytest.importorskip("pyarrow")
    from pyro_lmscm.study import load_study

    config = make_config(exact_only=True, limit=3, attribution="layer", format="parquet")
    first = run_study(config)
    _, loaded = load_study(config.output_dir)
    assert [r["attribution"] for r in loaded] == [r["attribution"] for r in first.records]
    assert [r["exact"]["bounds"] for r in loaded] == [r["exact"]["bounds"] for r in first.records]
