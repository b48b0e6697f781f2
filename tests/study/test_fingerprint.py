"""Resumes by batch: a record depends on its batch-mates (the noise of a batch of strings
is drawn by one generator), so its resume fingerprint covers the whole batch, and a resumed
study equals a fresh run of its final corpus and config, record for record, or is refused.

Every scenario runs a study, changes the corpus or the config (or cuts the records file),
resumes, and compares the result with a fresh run of the final corpus and config into
another folder: whole records, fingerprints included (a record holds no timings).
"""

from __future__ import annotations

import json

import pytest

from pyro_lmscm.study import StudyError, run_study
from pyro_lmscm.study.corpus import CorpusItem
from pyro_lmscm.study.fingerprint import batch_fingerprints, study_inputs

#: Twelve prompts over the tiny vocabulary, in two groups.
PROMPTS = [
    "# group: a",
    "the man said he",
    "the old doctor walked",
    "his story",
    "the woman said she",
    "the young nurse smiled",
    "her day",
    "# group: b",
    "the city",
    "the old city was",
    "the doctor went home",
    "the nurse said",
    "a man went to work",
    "the young woman smiled",
]

#: Strings per batch in these studies: 10 strings are the batches 0-3, 4-7 and 8-9.
BATCH = 4


def _first(n: int) -> list[str]:
    """The lines of the first ``n`` prompts of :data:`PROMPTS`."""
    lines, count = [], 0
    for line in PROMPTS:
        if not line.startswith("#"):
            if count == n:
                break
            count += 1
        lines.append(line)
    return lines


def _replace(lines: list[str], old: str, new: str) -> list[str]:
    assert old in lines
    return [new if line == old else line for line in lines]


@pytest.fixture
def study(make_config, tmp_path):
    """Run a study of the given corpus lines into one folder (resumed from call to call), or
    with ``fresh=True`` into a new folder; returns the result and the indices stored."""
    counter = iter(range(1000))

    def run(lines: list[str], fresh: bool = False, **overrides):
        name = f"fresh{next(counter)}" if fresh else "resumed"
        corpus = tmp_path / f"{name}.txt"
        corpus.write_text("\n".join(lines) + "\n")
        fields = dict(output=str(tmp_path / name), batch_size=BATCH)
        fields.update(overrides)
        stored: list[int] = []
        result = run_study(make_config(corpus=str(corpus), **fields), on_record=lambda r: stored.append(r["index"]))
        return result, stored

    return run


def _cut_records(folder, keep: int) -> None:
    """Keep the first ``keep`` lines of the records file and add a line cut short, as a
    crash after storing ``keep`` records leaves it."""
    path = folder / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:keep]) + '{"index": 9, "prompt": "the ol')


# -- the fingerprints ---------------------------------------------------------------------


def test_a_record_fingerprint_covers_its_batch_and_nothing_else(make_config, tmp_path):
    """Changing one item's prompt, continuation, id or group changes the fingerprints of its
    batch (batch_size 4: items 4-7) and of no other record; so do the batch size, a result
    setting and the corpus growing into the last batch."""
    config = make_config(batch_size=BATCH)
    inputs = study_inputs(config)
    items = [CorpusItem(i, f"the man said {i}") for i in range(10)]
    base = batch_fingerprints(items, config, inputs)
    assert len(set(base.values())) == 10  # one per record
    for change in ({"prompt": "her day"}, {"continuation": "she"}, {"id": "x"}, {"group": "g"}):
        edited = [CorpusItem(**{**item.to_dict(), **change}) if item.index == 5 else item for item in items]
        new = batch_fingerprints(edited, config, inputs)
        assert [i for i in base if new[i] != base[i]] == [4, 5, 6, 7], change
    grown = batch_fingerprints(items + [CorpusItem(10, "the city")], config, inputs)
    assert [i for i in base if grown[i] != base[i]] == [8, 9]
    assert all(v != base[i] for i, v in batch_fingerprints(items, make_config(batch_size=5), inputs).items())
    assert all(v != base[i] for i, v in batch_fingerprints(items, config.replace(seed=3), inputs).items())
    assert all(v != base[i] for i, v in batch_fingerprints(items, config, {"model": "other"}).items())
    alone = batch_fingerprints(items, make_config(batch_size=1), inputs)
    edited = [CorpusItem(5, "her day") if item.index == 5 else item for item in items]
    assert [i for i, v in batch_fingerprints(edited, make_config(batch_size=1), inputs).items() if v != alone[i]] == [5]


# -- the corpus changes -------------------------------------------------------------------


@pytest.mark.parametrize("format", ["jsonl", "parquet"])
def test_a_grown_corpus_recomputes_its_last_batch(study, format):
    """10 strings, then 12: the batch 8-9 becomes 8-11, so records 8 and 9 are recomputed
    with it (the old code kept them)."""
    if format == "parquet":
        pytest.importorskip("pyarrow")
    run_ten, _ = study(_first(10), format=format)
    resumed, stored = study(_first(12), format=format)
    fresh, _ = study(_first(12), fresh=True)
    assert resumed.records == fresh.records
    assert run_ten.records[:8] == fresh.records[:8] and run_ten.records[8:] != fresh.records[8:10]
    assert sorted(stored) == [8, 9, 10, 11] and resumed.recomputed == 2 and resumed.skipped == 8


def test_a_shrunk_corpus_recomputes_its_last_batch(study):
    study(_first(12))
    resumed, stored = study(_first(10))
    fresh, _ = study(_first(10), fresh=True)
    assert resumed.records == fresh.records
    assert sorted(stored) == [8, 9] and resumed.recomputed == 2


def test_a_corpus_grown_within_a_limit_recomputes_the_batch_the_limit_cut(study):
    """limit 10 of 11 strings runs the batch 8-10 and stores 8 and 9; with a twelfth string
    that batch is 8-11, and 8 and 9 are recomputed."""
    study(_first(11), limit=10)
    resumed, stored = study(_first(12), limit=10)
    fresh, _ = study(_first(12), fresh=True, limit=10)
    assert resumed.records == fresh.records and sorted(stored) == [8, 9]


@pytest.mark.parametrize("batch_size", [1, BATCH])
def test_an_edited_prompt_is_refused_and_force_recompute_recomputes_its_batch(study, batch_size):
    study(_first(10), batch_size=batch_size)
    edited = _replace(_first(10), "the young nurse smiled", "the young nurse said she was home")
    with pytest.raises(StudyError, match=r"1 stored records were made from other inputs .*record 4 now has prompt"):
        study(edited, batch_size=batch_size)
    resumed, stored = study(edited, batch_size=batch_size, force_recompute=True)
    fresh, _ = study(edited, fresh=True, batch_size=batch_size)
    assert resumed.records == fresh.records
    assert sorted(stored) == ([4] if batch_size == 1 else [4, 5, 6, 7])  # its whole batch
    assert study(edited, batch_size=batch_size)[0].computed == 0  # consistent again: a plain resume


def test_a_given_continuation_is_refused_and_force_recompute_recomputes_its_batch(study):
    """Item 5 gets an observed continuation: it leaves the part of its batch that samples
    its factual strings, whose noise then falls to the others differently."""
    study(_first(10))
    edited = _replace(_first(10), "her day", "her day\twas a story")
    with pytest.raises(StudyError, match=r"1 stored records .*record 5 now has prompt 'her day' and continuation"):
        study(edited)
    resumed, stored = study(edited, force_recompute=True)
    fresh, _ = study(edited, fresh=True)
    assert resumed.records == fresh.records and sorted(stored) == [4, 5, 6, 7]


def test_an_edited_group_or_id_is_refused_and_force_recompute_recomputes_its_batch(study):
    """A record holds its item's group and id: the old fingerprint covered neither, and the
    record kept the old group."""
    study(_first(10))
    edited = _replace(_first(10), "# group: b", "# group: c")  # items 6-9
    with pytest.raises(StudyError, match=r"4 stored records were made from other inputs .* group 'c'"):
        study(edited)
    resumed, stored = study(edited, force_recompute=True)
    fresh, _ = study(edited, fresh=True)
    assert resumed.records == fresh.records and {r["group"] for r in resumed.records[6:]} == {"c"}
    assert sorted(stored) == list(range(4, 10))


# -- the config changes -------------------------------------------------------------------


def test_a_changed_batch_size_is_refused_and_force_recompute_recomputes_everything(study):
    study(_first(10))
    with pytest.raises(StudyError, match=r"batch_size: 4 -> 3"):
        study(_first(10), batch_size=3)
    resumed, stored = study(_first(10), batch_size=3, force_recompute=True)
    fresh, _ = study(_first(10), fresh=True, batch_size=3)
    assert resumed.records == fresh.records and sorted(stored) == list(range(10))


# -- interrupted runs ---------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 6, 9])
def test_an_interrupted_run_resumes_to_the_fresh_run(study, tmp_path, keep):
    """Records cut after ``keep`` lines (mid-batch for 1, 6 and 9) and a partial line."""
    study(_first(10))
    _cut_records(tmp_path / "resumed", keep)
    resumed, stored = study(_first(10))
    fresh, _ = study(_first(10), fresh=True)
    assert resumed.records == fresh.records
    assert sorted(stored) == list(range(keep, 10)) and resumed.skipped == keep and resumed.recomputed == 0


def test_an_interrupted_run_resumed_with_a_grown_corpus(study, tmp_path):
    """Killed after record 8 of 10, resumed with 12 strings: record 8 was drawn in the batch
    8-9 and is recomputed in the batch 8-11."""
    study(_first(10))
    _cut_records(tmp_path / "resumed", 9)
    resumed, stored = study(_first(12))
    fresh, _ = study(_first(12), fresh=True)
    assert resumed.records == fresh.records and sorted(stored) == [8, 9, 10, 11]


# -- records of an older version ----------------------------------------------------------


def _strip_batch_fingerprints(folder) -> None:
    path = folder / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    stripped = [{k: v for k, v in record.items() if k != "batch_fingerprint"} for record in records]
    path.write_text("".join(json.dumps(record) + "\n" for record in stripped))


def test_records_of_an_older_version_are_refused_in_batches_and_kept_alone(study, tmp_path):
    """Records without a batch fingerprint (an older pyro-lmscm): in batches of one their own
    fingerprint decides, and they resume; in batches of 4 nothing shows whether their
    batch-mates changed, so the resume is refused, and force_recompute recomputes them."""
    alone, _ = study(_first(10), batch_size=1, output=str(tmp_path / "alone"))
    _strip_batch_fingerprints(tmp_path / "alone")
    again, _ = study(_first(10), batch_size=1, output=str(tmp_path / "alone"))
    assert again.computed == 0 and [r.get("batch_fingerprint") for r in again.records] == [None] * 10

    study(_first(10))
    _strip_batch_fingerprints(tmp_path / "resumed")
    with pytest.raises(StudyError, match=r"10 stored records .* older .* batch-mates.*--force-recompute"):
        study(_first(10))
    resumed, stored = study(_first(10), force_recompute=True)
    fresh, _ = study(_first(10), fresh=True)
    assert resumed.records == fresh.records and sorted(stored) == list(range(10))
