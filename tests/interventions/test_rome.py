import random

import pytest
import torch

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import MechanismError
from pyro_lmscm.interventions import (
    GENERIC_SENTENCES,
    RankOneEdit,
    WeightDelta,
    rome_edit,
)
from pyro_lmscm.testing import (
    TINY_WORDS,
    assert_restored,
    assert_rows_match_separate_runs,
    snapshot,
)

PROMPT_TEXT = "she walked to the doctor"
SUBJECT = "the doctor"
DOWN = "model.layers.1.mlp.down_proj.weight"
UNRELATED = [
    "the man said",
    "she went to",
    "the nurse was",
    "his old city",
    "a young woman",
    "the story",
    "he smiled and",
    "night and day",
]
# The tiny random model's MLP outputs are ~30x smaller than the change needed, so ROME's
# defaults (lr 0.5, weight decay 0.5, clamp 4 |v0|, made for real models) are relaxed here.
TINY = dict(lr=0.05, clamp_norm_factor=100.0, weight_decay=0.01, num_steps=60)


def cov_texts():
    rng = random.Random(0)
    return [" ".join(rng.choices(TINY_WORDS, k=8)) for _ in range(40)]


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def edit(lm):
    return rome_edit(lm, PROMPT_TEXT, SUBJECT, "home", layer=1, cov_texts=cov_texts(), **TINY)


def next_token_probs(lm, text, mechanism=None):
    ids = lm.encode(text)
    if mechanism is None:
        return lm.logits(ids)[-1].softmax(-1)
    with mechanism.activate(lm) as f:
        return f.logits(ids)[-1].softmax(-1)


def total_variation(p, q):
    return 0.5 * float((p - q).abs().sum())


def test_the_edit_rewrites_the_fact_and_leaves_other_prompts_mostly_alone(lm, edit):
    home = int(lm.encode("home")[0])
    before, after = next_token_probs(lm, PROMPT_TEXT), next_token_probs(lm, PROMPT_TEXT, edit)
    assert float(before[home]) < 0.01
    assert int(after.argmax()) == home and float(after[home]) > 0.9
    assert isinstance(edit, WeightDelta) and list(edit.deltas) == [DOWN]
    assert edit.losses[-1] < edit.losses[0]
    changes = [total_variation(next_token_probs(lm, t), next_token_probs(lm, t, edit)) for t in UNRELATED]
    assert sum(changes) / len(changes) < 0.2
    # the subject in another context is edited too (the key is the subject's, not the prompt's)
    assert (
        total_variation(
            next_token_probs(lm, "he said the doctor"), next_token_probs(lm, "he said the doctor", edit)
        )
        > 0.5
    )


def test_the_key_covariance_makes_the_edit_more_specific(lm, edit):
    """C^{-1} k* instead of k* itself: less change on other keys (for this seed and sample)."""
    plain = rome_edit(lm, PROMPT_TEXT, SUBJECT, "home", layer=1, cov_texts=cov_texts(), cov_ridge=1e6, **TINY)

    def mean_change(mechanism):
        changes = [
            total_variation(next_token_probs(lm, t), next_token_probs(lm, t, mechanism)) for t in UNRELATED
        ]
        return sum(changes) / len(changes)

    assert mean_change(edit) < 0.75 * mean_change(plain)


def test_delta_is_the_rank_one_formula_by_hand(lm, edit):
    module = lm.model.model.layers[1].mlp.down_proj
    weight = module.weight.detach().double()
    keys = []
    handle = module.register_forward_hook(lambda m, args, out: keys.append(args[0][0].detach().double()))
    try:
        for text in cov_texts():
            lm.logits(torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"]))
    finally:
        handle.remove()
    keys = torch.cat(keys)
    moment = keys.T @ keys / len(keys)
    moment = moment + 0.1 * torch.trace(moment) / 64 * torch.eye(64, dtype=torch.float64)
    k, v = edit.key.double(), edit.value.double()
    inverse = torch.linalg.solve(moment, k)
    expected = torch.outer(v - weight @ k, inverse) / (inverse @ k)
    torch.testing.assert_close(edit.deltas[DOWN].double(), expected, atol=1e-5, rtol=1e-4)
    assert int(torch.linalg.matrix_rank(edit.deltas[DOWN])) == 1
    # (W + dW) k* = v*, and keys C-orthogonal to k* are untouched
    torch.testing.assert_close((weight + edit.deltas[DOWN].double()) @ k, v, atol=1e-5, rtol=1e-4)
    other = keys[0] - (keys[0] @ inverse) / (k @ inverse) * k
    assert float((edit.deltas[DOWN].double() @ other).abs().max()) < 1e-6
    # the key is the down_proj input at the subject's last token ("doctor")
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0][0, 4].detach()))
    try:
        lm.logits(lm.encode(PROMPT_TEXT))
    finally:
        handle.remove()
    torch.testing.assert_close(edit.key, seen[0])


def test_ids_and_text_give_the_same_edit(lm):
    kwargs = dict(layer=1, cov_texts=cov_texts()[:5], num_steps=3, lr=0.05)
    from_text = rome_edit(lm, PROMPT_TEXT, SUBJECT, "home", **kwargs)
    from_ids = rome_edit(lm, lm.encode(PROMPT_TEXT), lm.encode(SUBJECT), lm.encode("home"), **kwargs)
    assert torch.equal(from_text.deltas[DOWN], from_ids.deltas[DOWN])


def test_context_prefixes_average_the_key(lm):
    prefixes = ["the man said", "night and day"]
    edit = rome_edit(
        lm,
        PROMPT_TEXT,
        SUBJECT,
        "home",
        layer=0,
        cov_texts=cov_texts()[:5],
        num_steps=0,
        context_prefixes=prefixes,
    )
    module = lm.model.model.layers[0].mlp.down_proj
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0][0, -1].detach()))
    try:
        for text in [PROMPT_TEXT] + [f"{p} {PROMPT_TEXT}" for p in prefixes]:
            lm.logits(lm.encode(text))
    finally:
        handle.remove()
    torch.testing.assert_close(edit.key, torch.stack(seen).mean(0))
    assert edit.losses == []  # no steps: v* = v0, a pure "re-averaging" edit


@pytest.mark.parametrize("fail", [False, True], ids=["clean-exit", "exception"])
def test_restores_the_model_bit_exactly(lm, edit, fail):
    state = snapshot(lm.model)
    with pytest.raises(RuntimeError) if fail else torch.no_grad():
        with edit.activate(lm) as f:
            f.logits(lm.encode(PROMPT_TEXT))
            if fail:
                raise RuntimeError("boom")
    assert_restored(lm.model, state)


def test_counterfactuals_under_the_edit(lm, edit):
    zero = RankOneEdit(DOWN, torch.zeros(32), edit.key_direction)
    scm = LanguageModelSCM(lm, max_new_tokens=5, mechanisms={"rome": edit, "zero": zero})
    prompt = lm.encode(PROMPT_TEXT)
    observed = counterfactual(scm, prompt, None, {}, seed=3).factual_ids
    same = counterfactual(scm, prompt, observed, {"mechanism": "zero"}, num_samples=20, seed=0)
    assert torch.equal(same.counterfactual_ids[:, : len(observed)], observed.expand(20, len(observed)))
    edited = counterfactual(scm, prompt, observed, {"mechanism": "rome"}, num_samples=200, seed=0)
    home = int(lm.encode("home")[0])
    assert float((edited.counterfactual_ids[:, 0] == home).float().mean()) > 0.8
    state = snapshot(lm.model)
    assert_rows_match_separate_runs(scm, prompt, [0, 1, 2, 1])
    assert_restored(lm.model, state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="she walked home", subject="the doctor"), "does not occur in the prompt"),
        (dict(prompt=torch.tensor([2, 3]), subject=torch.tensor([4])), "do not occur in the prompt ids"),
        (dict(layer=5), "2 decoder layers"),
        (dict(module="mlp.up"), "no submodule 'mlp.up'"),
        (dict(module="mlp.act_fn"), "only torch.nn.Linear"),
        (dict(lr=0.0), "need lr > 0"),
        (dict(cov_texts=[]), "`cov_texts` must be a non-empty list"),
        (dict(cov_ridge=0.0, cov_texts=["the man"]), "singular"),
    ],
)
def test_bad_arguments(lm, kwargs, match):
    arguments = dict(
        prompt=PROMPT_TEXT, subject=SUBJECT, target="home", layer=1, cov_texts=cov_texts()[:3], num_steps=1
    )
    arguments.update(kwargs)
    with pytest.raises(MechanismError, match=match):
        rome_edit(lm, **arguments)


def test_generic_sentences():
    assert 30 <= len(GENERIC_SENTENCES) <= 50
    assert len(set(GENERIC_SENTENCES)) == len(GENERIC_SENTENCES)


def test_rome_spec_equals_rome_edit(lm):
    """`rome=SUBJECT|PROMPT|TARGET|LAYER` (and its mapping form) builds the same edit as
    rome_edit with the defaults, selected as the mechanism."""
    from pyro_lmscm.errors import InterventionError
    from pyro_lmscm.interventions.spec import parse_intervention

    direct = rome_edit(lm, PROMPT_TEXT, SUBJECT, "home", layer=1)
    for spec in (
        f"rome={SUBJECT}|{PROMPT_TEXT}|home|1",
        {"rome": {"subject": SUBJECT, "prompt": PROMPT_TEXT, "target": "home", "layer": 1}},
    ):
        parsed = parse_intervention(spec, lm)
        assert parsed.intervention == {"mechanism": "rome"}
        (name, delta), = parsed.mechanisms["rome"].deltas.items()
        assert name == DOWN and torch.equal(delta, direct.deltas[DOWN])
    default = parse_intervention(f"rome={SUBJECT}|{PROMPT_TEXT}|home", lm).mechanisms["rome"]
    assert list(default.deltas) == ["model.layers.0.mlp.down_proj.weight"]  # a fifth of the depth (2 // 5)
    for bad, message in [
        ("rome=a|b", "SUBJECT|PROMPT|TARGET"),
        (f"rome={SUBJECT}|{PROMPT_TEXT}|home|7", "layer"),
        ({"rome": {"subject": SUBJECT, "prompt": PROMPT_TEXT}}, "give subject, prompt, target"),
        (f"rome=|{PROMPT_TEXT}|home", "non-empty"),
    ]:
        with pytest.raises(InterventionError, match=message):
            parse_intervention(bad, lm)
