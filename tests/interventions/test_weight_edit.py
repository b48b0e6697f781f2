import copy

import pytest
import torch

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import MechanismError
from pyro_lmscm.interventions import WeightDelta
from pyro_lmscm.lm import HFLanguageModel
from pyro_lmscm.testing import (
    assert_restored,
    assert_rows_match_separate_runs,
    snapshot,
    tiny_llama,
)

PROMPT = torch.tensor([2, 3, 4])
CONTINUATION = torch.tensor([5, 9, 14, 7, 3, 11])
DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.1.self_attn.q_proj.weight"
NORM = "model.norm.weight"


# ------------------------------------------------------------------ tests


def random_deltas(lm, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(lm.model.named_parameters())
    return {name: scale * torch.randn(params[name].shape, generator=g) for name in (DOWN, Q, NORM)}


def test_matches_a_hand_edited_copy(lm):
    deltas = random_deltas(lm, 0.05)
    edited = copy.deepcopy(lm.model)
    with torch.no_grad():
        for name, delta in deltas.items():
            edited.get_parameter(name).add_(delta)
    expected = HFLanguageModel(edited)
    ids = torch.cat([PROMPT, CONTINUATION])
    with WeightDelta(deltas).activate(lm) as f:
        assert torch.equal(f.logits(ids), expected.logits(ids))
        logits, cache = f.prefill(PROMPT[None])
        assert torch.equal(logits, expected.prefill(PROMPT[None])[0])
    assert not torch.equal(lm.logits(ids), expected.logits(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fail", [False, True], ids=["clean-exit", "exception"])
def test_restores_parameters_bit_exactly(dtype, fail):
    """Copy-back, not subtraction: x + d - d != x in floating point, above all in bf16."""
    lm = tiny_llama(seed=0, dtype=dtype)
    deltas = random_deltas(lm, 1e-3)
    state = snapshot(lm.model)
    drift = {name: lm.model.get_parameter(name) + d.to(dtype) - d.to(dtype) for name, d in deltas.items()}
    assert any(not torch.equal(drift[n], state[0][n]) for n in deltas)  # subtracting would not restore
    with pytest.raises(RuntimeError) if fail else torch.no_grad():
        with WeightDelta(deltas).activate(lm) as f:
            assert not torch.equal(f.model.get_parameter(DOWN), state[0][DOWN])
            f.logits(PROMPT)
            if fail:
                raise RuntimeError("boom")
    assert_restored(lm.model, state)


def test_nested_and_repeated_activations_restore(lm):
    a, b = WeightDelta({DOWN: torch.ones(32, 64)}), WeightDelta({DOWN: 2 * torch.ones(32, 64)})
    original = lm.model.get_parameter(DOWN).clone()
    state = snapshot(lm.model)
    with a.activate(lm):
        with b.activate(lm):
            assert torch.equal(lm.model.get_parameter(DOWN), original + 1 + 2)
        assert torch.equal(lm.model.get_parameter(DOWN), original + 1)
    for _ in range(3):
        with a.activate(lm):
            pass
    assert_restored(lm.model, state)


def test_zero_delta_reproduces_and_a_large_delta_changes_counterfactuals(lm):
    scm = LanguageModelSCM(
        lm,
        max_new_tokens=6,
        mechanisms={
            "zero": WeightDelta({DOWN: torch.zeros(32, 64)}),
            "big": WeightDelta(random_deltas(lm, 0.5)),
        },
    )
    same = counterfactual(scm, PROMPT, CONTINUATION, {"mechanism": "zero"}, num_samples=20, seed=0)
    assert torch.equal(same.counterfactual_ids, CONTINUATION.expand(20, 6))
    moved = counterfactual(scm, PROMPT, CONTINUATION, {"mechanism": "big"}, num_samples=20, seed=0)
    assert float((moved.counterfactual_ids != CONTINUATION).any(-1).float().mean()) > 0.5


def test_mixed_batch_rows_match_separate_runs(lm):
    scm = LanguageModelSCM(
        lm,
        max_new_tokens=6,
        mechanisms={
            "a": WeightDelta(random_deltas(lm, 0.3, seed=1)),
            "b": WeightDelta(random_deltas(lm, 0.3, seed=2)),
        },
    )
    state = snapshot(lm.model)
    assert_rows_match_separate_runs(scm, PROMPT, [0, 1])
    assert_rows_match_separate_runs(scm, PROMPT, [2, 1, 0, 1])
    assert_restored(lm.model, state)


@pytest.mark.parametrize(
    "deltas, match",
    [
        ({}, "non-empty mapping"),
        ({DOWN: torch.ones(32, 64, dtype=torch.long)}, "must be floating"),
        ({DOWN: torch.full((32, 64), float("nan"))}, "non-finite"),
        ({3: torch.ones(2)}, "names must be strings"),
    ],
)
def test_bad_deltas(deltas, match):
    with pytest.raises(MechanismError, match=match):
        WeightDelta(deltas)


@pytest.mark.parametrize(
    "deltas, match",
    [
        (
            {"model.layers.0.mlp.up_proj.weights": torch.ones(64, 32)},
            "no parameter 'model.layers.0.mlp.up_proj.weights'",
        ),
        ({DOWN: torch.ones(64, 32)}, r"shape \(64, 32\) but the parameter has \(32, 64\)"),
    ],
)
def test_check_against_the_model(lm, deltas, match):
    with pytest.raises(MechanismError, match=match):
        LanguageModelSCM(lm, max_new_tokens=3, mechanisms={"edit": WeightDelta(deltas)})


def test_tied_parameters_are_named_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    lm = HFLanguageModel(LlamaForCausalLM(config))
    assert lm.model.get_parameter("lm_head.weight") is lm.model.get_parameter("model.embed_tokens.weight")
    edit = WeightDelta({"lm_head.weight": torch.ones(10, 8), "model.embed_tokens.weight": torch.ones(10, 8)})
    with pytest.raises(MechanismError, match="one \\(tied\\) parameter"):
        edit.check(lm)


def test_inside_float32_gemms_the_edit_and_its_restore_are_both_seen():
    """``bf16_linears_in_float32`` keeps float32 copies of the weights; a WeightDelta activated
    and restored inside the scope (``copy_`` in, ``_foreach_copy_`` out) must change the
    logits and then give back those of before, bit for bit, as a hand-edited copy does. The
    baseline: the edited logits differ from the unedited ones, which copies kept regardless
    of the weights' versions would return for both."""
    from pyro_lmscm.runtime import bf16_linears_in_float32

    lm = tiny_llama(seed=0, dtype=torch.bfloat16)
    deltas = random_deltas(lm, 0.05)
    edited = copy.deepcopy(lm.model)
    with torch.no_grad():
        for name, delta in deltas.items():
            parameter = edited.get_parameter(name)
            parameter.copy_(parameter.float() + delta)
    ids = torch.cat([PROMPT, CONTINUATION])[None].expand(2, -1)  # 2 x 9 = 18 rows: float32 GEMMs
    with bf16_linears_in_float32(edited):
        expected = HFLanguageModel(edited).logits(ids)
    with bf16_linears_in_float32(lm.model):
        before = lm.logits(ids)
        with WeightDelta(deltas).activate(lm) as f:
            during = f.logits(ids)
        after = lm.logits(ids)
    assert torch.equal(during, expected) and not torch.equal(during, before)
    assert torch.equal(after, before)
