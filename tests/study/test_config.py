import json

import pytest

from pyro_lmscm.study import (
    RESULT_FIELDS,
    StudyConfig,
    StudyError,
    demo_config,
    read_corpus,
)


def test_yaml_and_json_give_the_same_config(tmp_path, corpus_file):
    settings = {"corpus": "corpus.txt", "num_samples": 2,
                "intervention": {"steer": {"direction": "female"}}}
    (tmp_path / "a.json").write_text(json.dumps(settings))
    yaml_text = "corpus: corpus.txt\nnum_samples: 2\nintervention:\n  steer: {direction: female}\n"
    (tmp_path / "a.yaml").write_text(yaml_text)
    from_json = StudyConfig.from_file(tmp_path / "a.json")
    from_yaml = StudyConfig.from_file(tmp_path / "a.yaml")
    assert from_json == from_yaml
    assert from_json.corpus_path == corpus_file  # relative to the config file's folder
    assert from_json.fingerprint() == from_yaml.fingerprint()


def test_overrides_and_fingerprint(tmp_path, corpus_file):
    (tmp_path / "a.yaml").write_text("corpus: corpus.txt\nseed: 1\n")
    config = StudyConfig.from_file(tmp_path / "a.yaml", seed=5, num_samples=None)
    assert config.seed == 5 and config.num_samples == 4
    assert set(config.result_settings()) == {*RESULT_FIELDS, "batch_size"}
    # execution settings do not change the fingerprint, result settings do
    assert config.replace(threads=2, ray=True, format="parquet", device="cpu").fingerprint() == config.fingerprint()
    assert config.replace(seed=6).fingerprint() != config.fingerprint()
    assert config.replace(batch_size=4).fingerprint() != config.fingerprint()
    assert config.replace(exact_only=True).fingerprint() != config.fingerprint()
    assert (config.batch_size, StudyConfig(corpus="demo", exact_only=True).batch_size) == (16, 64)
    # one string at a time has the settings of the studies from before batches (they resume)
    assert set(config.replace(batch_size=1).result_settings()) == set(RESULT_FIELDS)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"batch_size": -1}, "batch_size"),
        ({"exact_only": "yes"}, "exact_only"),
        ({"device": 3}, "device"),
        ({"format": "csv"}, "format"),
        ({"seed": -1}, "seed"),
        ({"confidence": 1.5}, "confidence"),
        ({"intervention": 3}, "intervention"),
        ({"name": "a/b"}, "name"),
        ({"bootstrap": 10**14}, r"`bootstrap` must be an integer >= 1 and <= 100000"),  # 1.4 PiB at the report
    ],
)
def test_bad_values_name_the_field(bad, match):
    with pytest.raises(StudyError, match=match):
        StudyConfig(corpus="x.txt", **bad)


def test_unknown_key_lists_known_keys(tmp_path):
    (tmp_path / "a.yaml").write_text("corpus: c.txt\nnum_sample: 3\n")
    with pytest.raises(StudyError, match="num_sample.*known keys"):
        StudyConfig.from_file(tmp_path / "a.yaml")
    with pytest.raises(StudyError, match="does not exist"):
        StudyConfig.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="corpus"):  # StudyError is a ValueError
        StudyConfig.from_mapping({"seed": 1})


def test_demo_config_and_corpus():
    config = demo_config()
    assert config.name == "demo" and config.num_samples == 4 and config.model == "smollm2-135m-instruct"
    items = read_corpus(config.corpus_path)
    groups = [item.group for item in items]
    assert len(items) == 50
    assert {g: groups.count(g) for g in set(groups)} == {"men": 17, "women": 17, "neither": 16}
    assert all(item.continuation is None for item in items)
    assert len({item.prompt for item in items}) == 50
    assert StudyConfig(corpus="demo").corpus_path == config.corpus_path


_LAUGHS = "x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8)
)  # 10**8 values in eight lines


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("twice.yaml", "corpus: c.txt\nseed: 1\nseed: 2\n", "'seed' is given twice"),
        ("twice.json", '{"corpus": "c.txt", "seed": 1, "seed": 2}', "'seed' is given twice"),
        ("nested.yaml", "corpus: c.txt\nattribution: {by: layer, by: step}\n", "'by' is given twice"),
        ("itself.yaml", "corpus: c.txt\nintervention: &a {w_0: *a}\n", "holds itself"),
        ("laughs.yaml", "corpus: c.txt\nintervention:\n  " + _LAUGHS.replace("\n", "\n  "), "1,000,000 values"),
    ],
)
def test_data_file_tricks_are_refused_naming_the_file(tmp_path, name, text, match):
    """A key given twice (YAML and JSON keep the last one silently), a config that holds
    itself through a YAML alias (a bare ValueError from the settings hash) or stands for 10**8
    values (minutes of hashing) are StudyErrors naming the file, as is the same in an
    intervention file. The baseline: a merge key may be overridden, and aliases that expand
    to a few values are read."""
    from pyro_lmscm.errors import InterventionError
    from pyro_lmscm.interventions.spec import read_spec

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StudyError, match=f"(?s){name}'.*{match}"):
        StudyConfig.from_file(path)
    spec = tmp_path / f"spec{path.suffix}"
    spec.write_text(text)
    with pytest.raises(InterventionError, match=f"(?s){spec.name}'.*{match}"):
        read_spec(str(spec))
    (tmp_path / "ok.yaml").write_text(
        "corpus: c.txt\nattribution: &opts {by: layer, max_exact_parts: 3}\n"
        "intervention: {w_0: &t 3, w_1: *t}\n<<: {seed: 1, num_samples: 3}\nseed: 2\n"
    )
    config = StudyConfig.from_file(tmp_path / "ok.yaml")
    assert (config.seed, config.num_samples, config.intervention) == (2, 3, {"w_0": 3, "w_1": 3})
