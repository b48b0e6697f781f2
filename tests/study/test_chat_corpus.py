"""Chat corpora: JSONL rows with ``messages`` (the observed string is the assistant's reply,
given or sampled), system-prompt and user-turn interventions per row, typed errors for bad
rows and for a model without a chat template, and the resume fingerprint of the messages."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pyro_lmscm.errors import StudyError
from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.lm import HFLanguageModel
from pyro_lmscm.study import StudyConfig, StudyWorker, read_corpus, run_study
from pyro_lmscm.study.fingerprint import batch_fingerprints, record_fingerprint
from pyro_lmscm.testing import tiny_llama

# roles as words of the tiny vocabulary, so that every token is a real one (as tests/test_chat.py)
TEMPLATE = (
    "{% set names = {'system': 'the', 'user': 'man', 'assistant': 'woman', 'tool': 'city', 'developer': 'old'} %}"
    "{% for message in messages %}<s> {{ names[message['role']] }} {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> woman{% endif %}"
)
ROWS = [
    {"messages": [{"role": "system", "content": "he was old"}, {"role": "user", "content": "the man said"}],
     "id": "given", "reply": "she went home"},
    {"messages": [{"role": "system", "content": "he was old"}, {"role": "user", "content": "the doctor walked"}]},
    {"messages": [{"role": "user", "content": "her story"}], "group": "no system"},
    {"messages": [{"role": "system", "content": "the city"}, {"role": "user", "content": "the nurse smiled"}],
     "observed": "the day was"},
]


@pytest.fixture(scope="module")
def chat_lm():
    lm = tiny_llama(seed=0)
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.chat_template = TEMPLATE
    return HFLanguageModel(lm.model, tokenizer)


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def chat_corpus(tmp_path):
    return _write(tmp_path / "chat.jsonl", ROWS)


def test_chat_rows_are_read(chat_corpus):
    items = read_corpus(chat_corpus)
    assert [item.continuation for item in items] == ["she went home", None, None, "the day was"]
    assert items[0].messages == tuple(ROWS[0]["messages"]) and items[0].id == "given"
    assert items[0].prompt == "system: he was old\nuser: the man said" and items[2].group == "no system"
    assert items[0].to_dict()["messages"] == ROWS[0]["messages"]


@pytest.mark.parametrize("row, match", [
    ({"messages": [{"role": "usr", "content": "hi"}]}, r"line 2: `messages`: messages\[0\]\[\"role\"\] is 'usr'"),
    ({"messages": [{"role": "user"}]}, r"line 2: `messages`: messages\[0\] has no 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\['content'\] must be a str"),
    ({"messages": "hello"}, "line 2: `messages`: chat messages must be a list"),
    ({"messages": []}, "must not be empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"messages\[1\] is the assistant's"),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, r"`messages\[0\]` has keys \['name'\]"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "the"}, "either `prompt`"),
    ({"messages": [{"role": "user", "content": "a"}], "reply": "b", "observed": "c"}, "reply once"),
    ({"messages": [{"role": "user", "content": "a"}], "reply": 3}, r"`reply` \(the assistant's reply\) must be"),
])
def test_bad_chat_rows_are_typed_errors_naming_the_line_and_field(tmp_path, row, match):
    path = _write(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(StudyError, match=match) as caught:
        read_corpus(path)
    assert "bad.jsonl, line 2" in str(caught.value)


def test_a_model_without_a_chat_template_is_refused(make_config, chat_corpus):
    config = make_config(corpus=str(chat_corpus), intervention="")
    with pytest.raises(StudyError, match="no chat template"):
        run_study(config)
    assert not (config.output_dir / "records.jsonl").exists()


@pytest.mark.parametrize("ray", [False, True], ids=["local", "ray"])
def test_chat_edits_of_a_corpus_with_text_rows_are_refused(make_config, chat_corpus, chat_lm, tmp_path, ray):
    """system=/user= edit a row's conversation: a text row has none, so a corpus with one is
    refused before any string runs (it ran to a table of error records), naming the
    intervention and the first text row. The baseline: the chat rows alone run."""
    if ray:
        pytest.importorskip("ray")
    mixed = _write(tmp_path / "mixed.jsonl", [*ROWS[:2], {"prompt": "the man said"}, ROWS[2]])
    options = dict(intervention="system=the city was old", attribute=None, batch_size=2, limit=3)
    if ray:  # the actors load the model from a folder
        folder = tmp_path / "chat-model"
        chat_lm.model.save_pretrained(folder)
        chat_lm.tokenizer.save_pretrained(folder)
        options.update(model=str(folder), ray=True, num_workers=1)
    lm = None if ray else chat_lm
    config = make_config(corpus=str(mixed), **options)
    with pytest.raises(StudyError, match=r"`intervention` edits a chat prompt \(system=\).*first at index 2"):
        run_study(config, lm=lm)
    assert not (config.output_dir / "records.jsonl").exists()
    result = run_study(make_config(corpus=str(chat_corpus), **options), lm=lm)
    assert result.computed == 3 and all(record["error"] is None for record in result.records)


def test_a_model_without_a_chat_template_is_refused_on_ray(make_config, chat_corpus):
    """As in a local run, before any string runs: not a study of error records. The
    baseline: a text corpus on the same model runs on Ray."""
    pytest.importorskip("ray")
    config = make_config(corpus=str(chat_corpus), intervention="", ray=True, num_workers=1, batch_size=2)
    with pytest.raises(StudyError, match="no chat template"):
        run_study(config)
    assert not (config.output_dir / "records.jsonl").exists()
    assert run_study(make_config(intervention="", ray=True, num_workers=1, batch_size=2, limit=2,
                                 output=str(config.output_dir.parent / "text"))).computed == 2


@pytest.mark.parametrize("batch_size, exact_only", [(1, False), (4, False), (4, True)])
def test_system_prompt_counterfactual_and_its_null(make_config, chat_corpus, chat_lm, batch_size, exact_only):
    """``system=`` with each row's own system prompt is the null intervention: P(unchanged) 1 and
    every counterfactual draw is the reply. Another system prompt is each row's own conversation
    edited: its exact P(unchanged) equals exact_counterfactual with that prompt."""
    common = dict(corpus=str(chat_corpus), batch_size=batch_size, exact_only=exact_only, attribute=None)
    items = read_corpus(chat_corpus)
    null = StudyWorker(make_config(intervention="system=he was old", **common), lm=chat_lm).process_many(items[:2])
    for record in null:
        assert record["error"] is None, record["error"]
        assert record["exact"]["prob_unchanged"] == 1.0 and record["messages"]
        assert all(draw["ids"] == record["factual"]["ids"] for draw in record["counterfactual"])
    given = null[0]["factual"]
    assert given["text"] == "she went home" and given["ids"][-1] == 1  # the reply and the end of turn
    worker = StudyWorker(make_config(intervention="system=the city was old", **common), lm=chat_lm)
    records = worker.process_many(items)
    for record, item in zip(records, items):
        assert record["error"] is None, record["error"]
        edited = [{"role": "system", "content": "the city was old"}] + [
            m for m in item.messages if m["role"] != "system"
        ]
        exact = exact_counterfactual(
            worker.scm, chat_lm.encode(list(item.messages)), torch.tensor(record["factual"]["ids"]),
            {"prompt": chat_lm.encode(edited)},
        )
        assert record["exact"]["prob_unchanged"] == pytest.approx(exact.prob_unchanged(), abs=1e-6)
    assert any(record["exact"]["prob_unchanged"] < 0.99 for record in records)


def test_a_chat_edit_of_a_text_row_is_an_error_record(make_config, corpus_file, chat_lm):
    worker = StudyWorker(make_config(intervention="system=he was old", corpus=str(corpus_file)), lm=chat_lm)
    record = worker.process_many(read_corpus(corpus_file)[:1])[0]
    assert "InterventionError" in record["error"] and "system=" in record["error"]


def test_user_turn_intervention_and_resume(make_config, chat_corpus, chat_lm, tmp_path):
    config = make_config(corpus=str(chat_corpus), intervention={"user": "the woman said"}, attribute=None)
    first = run_study(config, lm=chat_lm)
    assert first.computed == 4 and all(r["error"] is None for r in first.records)
    again = run_study(config, lm=chat_lm)
    assert again.computed == 0 and again.records == first.records
    # another system message in one row: its record (with its batch) must be recomputed
    rows = copy.deepcopy(ROWS)
    rows[3]["messages"][0]["content"] = "the night"
    _write(chat_corpus, rows)
    with pytest.raises(StudyError, match="other inputs"):
        run_study(config, lm=chat_lm)


def test_fingerprints_cover_the_messages(make_config, chat_corpus, tmp_path):
    config = make_config(corpus=str(chat_corpus))
    items = read_corpus(chat_corpus)
    rows = copy.deepcopy(ROWS)
    rows[1]["messages"][0]["content"] = "she was old"
    changed = read_corpus(_write(tmp_path / "changed.jsonl", rows))
    assert items[1].prompt != changed[1].prompt  # (the display text changes too, but not alone:)
    same_text = [item.__class__(**{**item.to_dict(), "prompt": "x"}) for item in items]
    other = [item.__class__(**{**item.to_dict(), "prompt": "x", "messages": changed[item.index].messages})
             for item in items]
    assert record_fingerprint(same_text[1], config, {}) != record_fingerprint(other[1], config, {})
    assert record_fingerprint(same_text[0], config, {}) == record_fingerprint(other[0], config, {})
    assert batch_fingerprints(same_text, config, {})[0] != batch_fingerprints(other, config, {})[0]


@pytest.mark.slow
def test_smollm2_system_prompt_study_end_to_end(tmp_path, all_threads):
    """A system-prompt counterfactual study on SmolLM2-Instruct: a sampled and a given reply
    (ended by <|im_end|>); the same system prompt as the intervention reproduces every reply
    exactly (P(unchanged) 1, every draw the reply), another one changes some."""
    from pyro_lmscm.loading import load_lm

    lm = load_lm("smollm2-135m-instruct")
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    system = "You are a helpful assistant."
    rows = [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]},
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "What is 2+2?"}],
         "reply": "2+2 equals 4."},
    ]
    corpus = _write(tmp_path / "chat.jsonl", rows)
    common = dict(corpus=str(corpus), model="smollm2-135m-instruct", num_samples=3, max_new_tokens=12,
                  attribute=None, progress=False, report=True, batch_size=1)
    null = run_study(StudyConfig(output=str(tmp_path / "null"), intervention=f"system={system}", **common), lm=lm)
    for record in null.records:
        assert record["error"] is None, record["error"]
        assert record["exact"]["prob_unchanged"] == 1.0
        assert all(draw["ids"] == record["factual"]["ids"] for draw in record["counterfactual"])
    assert null.records[1]["factual"]["text"] == "2+2 equals 4." and null.records[1]["factual"]["ids"][-1] == im_end
    pirate = run_study(
        StudyConfig(output=str(tmp_path / "pirate"), intervention="system=You are a pirate.", **common), lm=lm
    )
    assert all(record["error"] is None for record in pirate.records)
    assert [r["factual"]["ids"] for r in pirate.records] == [r["factual"]["ids"] for r in null.records]
    assert min(record["exact"]["prob_unchanged"] for record in pirate.records) < 1.0
    assert "system: You are a helpful assistant." in pirate.files["html"].read_text()
