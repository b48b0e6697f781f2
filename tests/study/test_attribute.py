import pytest

from pyro_lmscm.study import (
    CallableAttribute,
    StudyError,
    WordListAttribute,
    make_attribute,
)


def shouting(text: str) -> str:
    """A user-supplied check for test_callable_attribute."""
    return "loud" if "!" in text else "calm"


@pytest.mark.parametrize(
    "text, label",
    [
        ("He left his keys.", "male"),
        ("SHE smiled", "female"),
        ("The man and his wife", "both"),
        ("The weather was mild; theme parks hereby shut.", "none"),  # whole words only
    ],
)
def test_gender_labels(text, label):
    assert make_attribute("gender").label(text) == label


def test_flips_need_an_eligible_factual():
    check = make_attribute("gender")
    assert check.flipped("male", "female") is True
    assert check.flipped("both", "female") is True
    assert check.flipped("male", "both") is False
    assert check.flipped("none", "female") is None  # nothing to flip
    reverse = make_attribute("gender:male")
    assert reverse.flipped("female", "male") is True and reverse.flipped("male", "female") is None


def test_word_list_mapping():
    check = make_attribute({"name": "tense", "source_words": ["was"], "target_words": ["is"]})
    assert isinstance(check, WordListAttribute)
    assert check.label("it was") == "source" and check.flipped("source", "target") is True


def test_callable_attribute():
    check = make_attribute({"name": "tone", "function": f"{__name__}:shouting", "target": "loud"}, allow_code=True)
    assert isinstance(check, CallableAttribute)
    assert check.label("stop!") == "loud" and check.flipped("calm", "loud") is True
    assert check.flipped("loud", "loud") is None


@pytest.mark.parametrize(
    "spec, match",
    [
        ("colour", "unknown attribute"),
        ({"name": "x", "source_words": ["a"]}, "target_words"),
        ({"name": "x", "function": "no.such.module:f", "target": "a"}, "cannot import"),
        ({"name": "x", "source_words": ["a"], "target_words": ["b"], "target_label": "both"}, "labels"),
    ],
)
def test_bad_attributes(spec, match):
    with pytest.raises(StudyError, match=match):
        make_attribute(spec, allow_code=True)
    assert make_attribute(None) is None


def test_code_in_a_config_is_opt_in(tmp_path):
    """A config that names a function (here os:system, which would run every text through the
    shell) is refused unless code is allowed: as a mapping, in a StudyConfig and from a file."""
    from pyro_lmscm.study import StudyConfig

    spec = {"name": "shell", "function": "os:system", "target": "0"}
    with pytest.raises(StudyError, match="opt-in: pass --allow-code"):
        make_attribute(spec)
    with pytest.raises(StudyError, match="'os:system'"):
        StudyConfig(corpus="demo", attribute=spec)
    config = tmp_path / "study.yaml"
    config.write_text("corpus: demo\nattribute: {name: shell, function: 'os:system', target: '0'}\n")
    with pytest.raises(StudyError, match="pass --allow-code"):
        StudyConfig.from_file(config)
    assert StudyConfig.from_file(config, allow_code=True).allow_code is True
    assert isinstance(make_attribute(spec, allow_code=True), CallableAttribute)
    assert isinstance(make_attribute("gender"), WordListAttribute)  # word lists stay data
