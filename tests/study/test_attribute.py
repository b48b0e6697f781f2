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


@pytest.mark.parametrize(
    "words, match",
    [
        ("he him", "`source_words` must be a list of words"),  # was split into its letters: 'h', 'e', ' ', ...
        ([1, 2], "holds 1"),  # was AttributeError: 'int' object has no attribute 'lower'
        ([True], "holds True"),  # YAML `[yes]`
        (["New York"], "holds 'New York'"),  # could never match: texts are split into words of a-z
        (["mr."], "holds 'mr.'"),
        (["café"], "holds 'café'"),
    ],
)
def test_word_lists_that_cannot_match_are_refused(words, match):
    """Before: the str "he him" became the one-letter words 'h', 'e', ' ', 'i', 'm', which match
    no ordinary text, so every text was labelled 'none' (never eligible); ints a raw
    AttributeError; "New York", "mr." and "café" entries that can never match a text."""
    spec = {"name": "x", "source_words": words, "target_words": ["she"]}
    with pytest.raises(StudyError, match=match):
        make_attribute(spec)
    with pytest.raises(StudyError, match=match.replace("source", "target")):
        make_attribute({"name": "x", "source_words": ["he"], "target_words": words})


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "x", "function": 3, "target": "a"}, "`function` must be"),  # was AttributeError (partition)
        ({"name": "x", "function": f"{__name__}:shouting", "target": None}, "`target` must be a label"),
    ],
)
def test_bad_callable_attributes(spec, match):
    with pytest.raises(StudyError, match=match):
        make_attribute(spec, allow_code=True)


def test_a_callable_target_is_compared_as_the_labels_are():
    """A YAML ``target: 0`` is the int 0; labels are ``str(function(text))``, so before, no draw
    could ever flip (``"0" != 0``)."""
    check = make_attribute({"name": "count", "function": f"{__name__}:exclamations", "target": 0,
                            "source": 1}, allow_code=True)
    assert check.flipped(check.label("stop!"), check.label("stop")) is True
    assert check.flipped(check.label("stop"), check.label("stop")) is None


def exclamations(text: str) -> int:
    """A user check returning an int label, for test_a_callable_target_is_compared_as_the_labels_are."""
    return text.count("!")
