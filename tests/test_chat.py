"""Chat prompts: ``encode(messages)`` is the chat template with the assistant's turn opened;
bad messages and template-less models are typed errors; a system-prompt counterfactual runs
in Python and the CLI, and its null intervention reproduces the reply exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.cli import app
from pyro_lmscm.errors import ChatError, InterventionError, TokenizationError
from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.interventions.ops import as_do_data
from pyro_lmscm.interventions.spec import parse_intervention
from pyro_lmscm.lm import HFLanguageModel
from pyro_lmscm.testing import tiny_llama

# roles as words of the tiny vocabulary, so that every token is a real one
TEMPLATE = (
    "{% set names = {'system': 'the', 'user': 'man', 'assistant': 'woman', 'tool': 'city', 'developer': 'old'} %}"
    "{% for message in messages %}<s> {{ names[message['role']] }} {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> woman{% endif %}"
)
MESSAGES = [{"role": "system", "content": "he was old"}, {"role": "user", "content": "the man said"}]
REPLY = "she went home"


@pytest.fixture(scope="module")
def chat_lm():
    lm = tiny_llama(seed=0)
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.chat_template = TEMPLATE
    return HFLanguageModel(lm.model, tokenizer)


def test_encode_messages_is_the_chat_template(chat_lm):
    """Against apply_chat_template and against the rendered text tokenized by hand."""
    ids = chat_lm.encode(MESSAGES)
    expected = chat_lm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert ids.tolist() == list(expected)
    text = "<s> the he was old </s> <s> man the man said </s> <s> woman"
    assert ids.tolist() == chat_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.dtype == torch.long and ids.dim() == 1


def test_encode_reply_ends_with_the_end_of_turn(chat_lm):
    reply = chat_lm.encode_reply(REPLY)
    assert reply[:-1].tolist() == chat_lm.encode(REPLY).tolist() and int(reply[-1]) == 1  # </s>


def test_the_reply_ends_with_the_token_the_template_ends_the_turn_with():
    """A model whose turns end with another token than the tokenizer's end of sequence (as
    Gemma's <end_of_turn> and Phi-3's <|end|>): the observation ends with the token the chat
    template writes after the assistant's content, so the prompt and the observation are
    exactly the template's conversation with the reply (the oracle: the template rendered with
    the reply as an assistant message). The baseline: the tokenizer's end of sequence, which
    encode_reply appended before, is not what the template writes."""
    lm = tiny_llama(seed=0)
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.chat_template = TEMPLATE.replace("{{ message['content'] }} </s>", "{{ message['content'] }} <s>")
    model = copy.deepcopy(lm.model)
    model.generation_config.eos_token_id = [1, 2]  # </s> and the end of turn <s>
    chat = HFLanguageModel(model, tokenizer)
    assert tokenizer.eos_token_id == 1 and chat.eos_token_ids == [1, 2]
    prompt, observed = chat.encode(MESSAGES), chat.encode_reply(REPLY)
    whole = tokenizer.apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": REPLY}], tokenize=True, return_dict=False
    )
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert prompt.tolist() + observed.tolist() == whole[: len(prompt) + len(observed)]
    assert observed.tolist() == chat.encode(REPLY).tolist() + [2]
    assert whole[len(prompt) + len(observed) - 1] != tokenizer.eos_token_id  # the baseline
    # a template that writes no end-of-sequence token after the reply: the tokenizer's, as before
    tokenizer.chat_template = TEMPLATE.replace("{{ message['content'] }} </s>", "{{ message['content'] }} man")
    assert HFLanguageModel(model, tokenizer).encode_reply(REPLY).tolist()[-1] == 1


@pytest.mark.parametrize(
    "messages, match",
    [
        ("the man said", None),  # text is not messages: encoded as text
        ({"role": "user", "content": "hi"}, r"must be a list"),
        ([], r"must not be empty"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"content": "a"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a str"),
        ([{"role": None, "content": "a"}], r"messages\[0\]\['role'\] must be a str"),
        ([{"role": "system", "content": "a"}, {"role": "robot", "content": "b"}], r'messages\[1\]\["role"\] is'),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], r"messages\[1\] is the assistant"),
    ],
)
def test_bad_messages_are_typed(chat_lm, messages, match):
    if match is None:
        assert chat_lm.encode(messages).tolist() == [3, 4, 10]
        return
    with pytest.raises(ChatError, match=match):
        chat_lm.encode(messages)


def test_a_model_without_a_chat_template_is_refused(lm):
    assert not getattr(lm.tokenizer, "chat_template", None)
    with pytest.raises(ChatError, match="has no chat template"):
        lm.encode(MESSAGES)
    with pytest.raises(TokenizationError, match="no tokenizer"):
        HFLanguageModel(lm.model, None).encode(MESSAGES)


def test_a_template_that_raises_is_typed(chat_lm):
    tokenizer = copy.deepcopy(chat_lm.tokenizer)
    tokenizer.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ChatError, match="only user turns"):
        HFLanguageModel(chat_lm.model, tokenizer).encode(MESSAGES)


def test_a_prompt_intervention_may_be_messages(chat_lm):
    scm = LanguageModelSCM(chat_lm, max_new_tokens=4)
    other = [{"role": "system", "content": "she was young"}, MESSAGES[1]]
    data = as_do_data(scm, {"prompt": other})
    assert data["prompt"].tolist() == chat_lm.encode(other).tolist()
    with pytest.raises(InterventionError, match=r"do\(prompt=...\).*messages\[0\]"):
        as_do_data(scm, {"prompt": [{"role": "nobody", "content": "x"}]})


def test_system_and_user_spec_keys(chat_lm):
    spec = parse_intervention("system=she was young", chat_lm, messages=MESSAGES)
    assert spec.intervention["prompt"].tolist() == chat_lm.encode(
        [{"role": "system", "content": "she was young"}, MESSAGES[1]]
    ).tolist()
    added = parse_intervention("system=she was young", chat_lm, messages=MESSAGES[1:])  # none before: put first
    assert added.intervention["prompt"].tolist() == spec.intervention["prompt"].tolist()
    removed = parse_intervention("system=", chat_lm, messages=MESSAGES)
    assert removed.intervention["prompt"].tolist() == chat_lm.encode(MESSAGES[1:]).tolist()
    user = parse_intervention({"user": "the woman said"}, chat_lm, messages=MESSAGES)
    assert user.intervention["prompt"].tolist() == chat_lm.encode(
        [MESSAGES[0], {"role": "user", "content": "the woman said"}]
    ).tolist()
    with pytest.raises(InterventionError, match="edits a chat prompt"):
        parse_intervention("system=she was young", chat_lm)
    with pytest.raises(InterventionError, match="not both"):
        parse_intervention({"system": "a", "prompt": "the man"}, chat_lm, messages=MESSAGES)
    with pytest.raises(InterventionError, match="user turn"):
        parse_intervention({"user": "a"}, chat_lm, messages=[{"role": "system", "content": "he"}])


def test_a_system_prompt_counterfactual_and_its_null_intervention(chat_lm):
    prompt = chat_lm.encode(MESSAGES)
    observed = chat_lm.encode_reply(REPLY)
    scm = LanguageModelSCM(chat_lm, max_new_tokens=len(observed))
    null = {"prompt": MESSAGES}
    same = counterfactual(scm, prompt, observed, null, num_samples=8, seed=0)
    assert all(row.tolist() == observed.tolist() for row in same.counterfactual_ids)
    assert exact_counterfactual(scm, prompt, observed, null).prob_unchanged() == 1.0
    other = {"prompt": [{"role": "system", "content": "she was young and old"}, MESSAGES[1]]}
    p = exact_counterfactual(scm, prompt, observed, other).prob_unchanged()
    assert 0.0 <= p < 1.0  # the baseline: another system prompt changes the reply's law


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, chat_lm):
    path = tmp_path_factory.mktemp("tiny-chat")
    chat_lm.model.save_pretrained(path)
    chat_lm.tokenizer.save_pretrained(path)
    return str(path)


def _run(*args):
    return CliRunner().invoke(app, list(args))


def test_cli_system_prompt_counterfactual(chat_folder, chat_lm, tmp_path):
    base = ["counterfactual", "--model", chat_folder, "--system", "he was old", "--user", "the man said",
            "--text", REPLY, "--samples", "4", "--json"]
    null = _run(*base, "--intervention", "system=he was old")
    assert null.exit_code == 0, null.output
    out = json.loads(null.stdout)
    assert out["prompt"] == MESSAGES
    assert out["factual_ids"] == chat_lm.encode_reply(REPLY).tolist()
    assert all(row == out["factual_ids"] for row in out["counterfactual_ids"])
    assert out["exact"]["prob_unchanged"] == 1.0
    changed = json.loads(_run(*base, "--intervention", "system=she was young and old").stdout)
    assert changed["exact"]["prob_unchanged"] < 1.0
    # the same conversation from a file
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(MESSAGES))
    from_file = _run("counterfactual", "--model", chat_folder, "--messages", str(path), "--text", REPLY,
                     "--samples", "4", "--json", "--intervention", "system=she was young and old")
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.stdout)["exact"] == changed["exact"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "the man", "--user", "the man said"], "exactly one of --prompt"),
        (["--system", "he"], "--system needs --user"),
        (["--prompt", "the man", "--intervention", "system=he"], "edits a chat prompt"),
        (["--messages", "missing.json"], "cannot read the file"),
        (["--messages", "twice.json"], "'content' is given twice"),
    ],
)
def test_cli_bad_chat_options(chat_folder, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "twice.json").write_text('[{"role": "user", "content": "the man", "content": "he said"}]')
    result = _run("counterfactual", "--model", chat_folder, "--text", REPLY, *args)
    assert result.exit_code == 2 and message in result.output


# ------------------------------------------------------------------ SmolLM2-Instruct


@pytest.mark.slow
def test_smollm2_chat_end_to_end(all_threads):
    """encode(messages) equals apply_chat_template; <|im_end|> ends the reply; a system-prompt
    counterfactual runs in Python and in the CLI, and its null intervention reproduces the
    sampled reply exactly."""
    from pyro_lmscm.loading import load_lm

    lm = load_lm("smollm2-135m-instruct")
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hi."}]
    ids = lm.encode(messages)
    expected = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids.tolist() == list(expected)
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in lm.eos_token_ids and int(lm.encode_reply("Hi")[-1]) == im_end
    scm = LanguageModelSCM(lm, max_new_tokens=12)
    sampled = counterfactual(scm, ids, None, {"prompt": messages}, num_samples=4, seed=0)
    observed = sampled.factual_ids
    assert all(row.tolist() == observed.tolist() for row in sampled.counterfactual_ids)
    other = [{"role": "system", "content": "You are terse."}, messages[1]]
    assert exact_counterfactual(scm, ids, observed, {"prompt": messages}).prob_unchanged() == 1.0
    assert exact_counterfactual(scm, ids, observed, {"prompt": other}).prob_unchanged() < 1.0
    result = _run("counterfactual", "--system", "You are a pirate.", "--user", "Say hi.", "--text", "Ahoy!",
                  "--samples", "3", "--json", "--intervention", "system=You are a pirate.")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["factual_ids"][-1] == im_end and out["exact"]["prob_unchanged"] == 1.0
    assert all(row == out["factual_ids"] for row in out["counterfactual_ids"])
