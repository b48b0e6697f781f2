import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyro_lmscm.errors import InterventionError, ModelLoadError
from pyro_lmscm.study import StudyConfig, StudyError, load_study, run_study
from pyro_lmscm.study import runner as runner_module


def test_run_and_resume_is_a_no_op(make_config):
    config = make_config()
    first = run_study(config)
    assert first.computed == 9 and first.skipped == 0 and len(first.records) == 9
    again = run_study(config)
    assert again.computed == 0 and again.skipped == 9
    assert again.records == first.records


def test_resume_after_a_partial_run_gives_the_same_records(make_config, tmp_path):
    full = run_study(make_config(output=str(tmp_path / "full"))).records
    partial = run_study(make_config(output=str(tmp_path / "part"), limit=4))
    assert partial.records == full[:4]
    resumed = run_study(make_config(output=str(tmp_path / "part")))
    assert resumed.computed == 5 and resumed.records == full


def test_a_different_study_in_the_same_folder_is_refused(make_config):
    run_study(make_config(limit=1))
    with pytest.raises(StudyError, match=r"num_samples: 3 -> 2"):
        run_study(make_config(num_samples=2))
    run_study(make_config(limit=2, threads=2, bootstrap=50))  # execution settings may change


@pytest.mark.parametrize("first, then", [("jsonl", "parquet"), ("parquet", "jsonl")])
def test_another_record_format_on_resume_is_refused(make_config, first, then):
    """A folder holds one record store: resuming with the other format, which would compute
    every record again beside the stored ones (two stores, one of them of older settings after
    a forced recompute), is refused naming the format, and nothing is written. The baseline:
    the same format resumes with nothing to compute."""
    pytest.importorskip("pyarrow")
    config = make_config(limit=3, format=first)
    run_study(config)
    files = sorted(path.name for path in config.output_dir.iterdir())
    with pytest.raises(StudyError, match=f"holds records in the '{first}' format.*format='{then}'"):
        run_study(make_config(limit=3, format=then))
    assert sorted(path.name for path in config.output_dir.iterdir()) == files
    assert run_study(make_config(limit=3, format=first)).computed == 0


def test_a_changed_corpus_is_refused(make_config, corpus_file):
    run_study(make_config(limit=2))
    corpus_file.write_text(corpus_file.read_text().replace("the man said he", "the man said"))
    with pytest.raises(StudyError, match="corpus changed"):
        run_study(make_config())


def test_threads_are_restored(make_config):
    import torch

    before = torch.get_num_threads()
    run_study(make_config(limit=1, threads=2))
    assert torch.get_num_threads() == before


def test_load_study(make_config):
    result = run_study(make_config(limit=2))
    config, records = load_study(result.output_dir)
    assert config.result_settings() == result.config.result_settings() and records == result.records
    with pytest.raises(StudyError, match="holds no study"):
        load_study(result.output_dir / "nothing")


SLOW_RUN = """
import sys, time
from pyro_lmscm.study import StudyConfig, run_study, worker

process, process_group = worker.StudyWorker.process, worker.StudyWorker.process_group

def slow(self, item):
    record = process(self, item)
    time.sleep(0.25)
    return record

def slow_group(self, items):
    records = process_group(self, items)
    time.sleep(0.25)
    return records

worker.StudyWorker.process = slow
worker.StudyWorker.process_group = slow_group
run_study(StudyConfig.from_file(sys.argv[1]))
"""


@pytest.mark.parametrize("batch_size", [1, 2])
def test_kill_and_resume_equals_an_uninterrupted_run(make_config, tmp_path, batch_size):
    """SIGKILL a study process midway, add a line cut short, rerun: the records are exact,
    string by string and in batches of two."""
    config = make_config(output=str(tmp_path / "killed"), batch_size=batch_size)
    (tmp_path / "study.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "slow_run.py").write_text(SLOW_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(tmp_path / "slow_run.py"), str(tmp_path / "study.json")], env=env)
    records = tmp_path / "killed" / "records.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if records.is_file() and records.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the study finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    stored = records.read_text().count("\n")
    assert 3 <= stored < 9
    with open(records, "a") as handle:
        handle.write('{"index": 8, "prompt": "the old ci')  # a write cut short by the crash
    resumed = run_study(config)
    assert resumed.skipped == stored and resumed.computed == 9 - stored
    uninterrupted = run_study(make_config(output=str(tmp_path / "straight"), batch_size=batch_size))
    assert resumed.records == uninterrupted.records
    assert [json.loads(line)["index"] for line in records.read_text().splitlines()] == list(range(9))


def test_progress_bar(make_config, capsys):
    run_study(make_config(limit=2, progress=True))
    assert "tiny" in capsys.readouterr().err


def test_records_are_written_one_by_one(make_config, monkeypatch):
    seen = []
    config = make_config(limit=3)
    path = config.output_dir / "records.jsonl"
    run_study(config, on_record=lambda r: seen.append(path.read_text().count("\n")))
    assert seen == [1, 2, 3]
    assert runner_module.META_FILE in os.listdir(config.output_dir)


def test_an_edited_continuation_is_refused_and_force_recompute_recomputes(make_config, corpus_file, tmp_path):
    run_study(make_config())
    text = corpus_file.read_text()
    assert "the story\tday night was" in text
    corpus_file.write_text(text.replace("the story\tday night was", "the story\tday was"))
    with pytest.raises(StudyError, match=r"1 stored records were made from other inputs .*continuation 'day was'"):
        run_study(make_config())
    again = run_study(make_config(force_recompute=True))
    # its whole batch: with the default batch_size (16) the 9 strings are one batch
    assert again.computed == 9 and again.recomputed == 9 and again.skipped == 0
    changed = [r for r in again.records if r["prompt"] == "the story"]
    assert changed[0]["factual"]["text"] == "day was"
    assert again.records == run_study(make_config(output=str(tmp_path / "fresh"))).records
    assert run_study(make_config()).computed == 0  # now consistent: a plain resume


def test_new_weights_at_the_same_path_are_refused(make_config, tiny_folders, tmp_path):
    import shutil

    from pyro_lmscm.testing import tiny_llama

    folder = tmp_path / "model"
    shutil.copytree(tiny_folders[0], folder)
    first = run_study(make_config(model=str(folder), limit=3))
    assert run_study(make_config(model=str(folder), limit=3)).computed == 0  # same content
    tiny_llama(seed=5).model.save_pretrained(folder)  # other weights, same path
    with pytest.raises(StudyError, match=r"holds the results of another study \(model: 'sha256:"):
        run_study(make_config(model=str(folder), limit=3))
    again = run_study(make_config(model=str(folder), limit=3, force_recompute=True))
    assert again.computed == 3 and again.records != first.records


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ({"intervention": "bogus=1"}, InterventionError, "bogus"),
        ({"dtype": "float99"}, ModelLoadError, "float99"),
        ({"attribute": 3}, StudyError, "attribute"),
    ],
    ids=["intervention", "dtype", "attribute"],
)
def test_a_bad_config_with_force_recompute_leaves_the_folder_as_it_was(make_config, bad, error, match):
    """force_recompute drops the stored records it recomputes; a config whose model, dtype,
    intervention or attribute check is bad is refused before that (and before study.json is
    rewritten). The baseline: the same folder with a good changed config is recomputed."""
    config = make_config(limit=3)
    run_study(config)
    files = {path.name: path.read_bytes() for path in config.output_dir.iterdir()}
    with pytest.raises(error, match=match):
        run_study(make_config(limit=3, force_recompute=True, **bad))
    assert {path.name: path.read_bytes() for path in config.output_dir.iterdir()} == files
    again = run_study(make_config(limit=3, force_recompute=True, num_samples=2))
    assert again.recomputed == 3 and again.computed == 3


def test_an_integer_temperature_and_its_float_are_one_study(make_config, tmp_path):
    """``temperature: 1`` in a YAML file and ``--temperature 1`` (a float) on a resume are the
    same study: resumed, not refused as a changed corpus. The baseline: another temperature
    is refused, naming it. A folder whose records were hashed with the integer (an older
    version kept it) is refused naming the temperature, not the corpus."""
    config = make_config(limit=3)
    fields = {**config.to_dict(), "temperature": 1, "top_p": 1}
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(fields))  # JSON is YAML
    first = run_study(StudyConfig.from_file(path))
    again = run_study(StudyConfig.from_file(path, temperature=1.0, top_p=1.0))
    assert again.computed == 0 and again.records == first.records
    with pytest.raises(StudyError, match=r"another study \(temperature: 1.0 -> 0.9\)"):
        run_study(StudyConfig.from_file(path, temperature=0.9))
    legacy = make_config(limit=3, output=str(tmp_path / "legacy"))
    legacy.temperature = 1  # as an older version stored it
    run_study(legacy)
    with pytest.raises(StudyError, match=r"another study \(temperature: 1 -> 1.0\)"):
        run_study(make_config(limit=3, output=str(tmp_path / "legacy"), temperature=1.0))


def test_a_bf16_study_makes_its_float32_copies_once_not_per_block(make_config, monkeypatch):
    """On a CPU without bf16 kernels the runner holds one ``bf16_linears_in_float32`` scope
    for the whole study; each block's own scope (``process_many``) nests in it and patches
    nothing. Counted: scopes entered on a model not yet patched. Baseline: the same study
    without the runner's scope, where each of the 3 blocks patches (and copies) anew."""
    import contextlib

    from pyro_lmscm.runtime import kernels

    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: False)
    fresh_scopes: list[bool] = []
    scope = kernels.bf16_linears_in_float32

    def counting(model, *args, **kwargs):
        fresh_scopes.append(not any("forward" in vars(m) for m in model.modules()))
        return scope(model, *args, **kwargs)

    monkeypatch.setattr(kernels, "bf16_linears_in_float32", counting)
    config = make_config(dtype="bfloat16", batch_size=2, limit=6)
    assert run_study(config).computed == 6
    assert fresh_scopes.count(True) == 1 and len(fresh_scopes) == 4  # the runner's + 3 nested

    fresh_scopes.clear()
    monkeypatch.setattr(runner_module, "compute_scope", lambda lm: contextlib.nullcontext())
    assert run_study(make_config(dtype="bfloat16", batch_size=2, limit=6, output=config.output + "-2")).computed == 6
    assert fresh_scopes.count(True) == 3
