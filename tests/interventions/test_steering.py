import pytest
import torch
from torch import nn

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import MechanismError
from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.interventions import ActivationSteering
from pyro_lmscm.testing import (
    assert_restored,
    assert_rows_match_separate_runs,
    by_hand,
    snapshot,
    tiny_llama,
)

PROMPT = torch.tensor([2, 3, 4])
CONTINUATION = torch.tensor([5, 9, 14, 7, 3, 11])


# ------------------------------------------------------------------ tests


@pytest.fixture
def vector():
    return torch.randn(32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("start", [0, 2, 5])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_matches_the_hand_written_forward(lm, vector, layer, start):
    steer = ActivationSteering(vector, layer=layer, alpha=0.7, start=start)
    ids = torch.cat([PROMPT, CONTINUATION])
    with steer.activate(lm) as f:
        logits = f.logits(ids)
    expected = by_hand(lm, ids, layer % 2, lambda h, pos: h + 0.7 * vector * (pos >= start))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # positions before `start` are exactly the factual ones, later ones are not
    factual = lm.logits(ids)
    assert torch.equal(logits[:start], factual[:start])
    assert not torch.allclose(logits[start:], factual[start:], atol=1e-3)


@pytest.mark.parametrize("start", [0, 2, 4, 6])
def test_kv_cached_decoding_equals_teacher_forcing(lm, vector, start):
    """With a cache, a step's single token sits at absolute position L + t, as in one pass."""
    steer = ActivationSteering(vector, layer=0, alpha=2.0, start=start)
    with steer.activate(lm) as f:
        logits, cache = f.prefill(PROMPT[None])
        cached = [logits[0]]
        for token in CONTINUATION[:-1]:
            logits, cache = f.step(token[None], cache)
            cached.append(logits[0])
        teacher_forced = f.logits(torch.cat([PROMPT, CONTINUATION[:-1]]))[len(PROMPT) - 1 :]
    torch.testing.assert_close(torch.stack(cached), teacher_forced, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        teacher_forced, lm.logits(torch.cat([PROMPT, CONTINUATION[:-1]]))[len(PROMPT) - 1 :]
    )


@pytest.mark.parametrize("fail", [False, True], ids=["clean-exit", "exception"])
def test_restores_the_model_exactly(lm, vector, fail):
    state = snapshot(lm.model)
    steer = ActivationSteering(vector, layer=1, alpha=5.0, start=1)
    with pytest.raises(RuntimeError) if fail else torch.no_grad():
        with steer.activate(lm) as f:
            f.logits(torch.cat([PROMPT, CONTINUATION]))
            assert lm.model.model.layers[1]._forward_hooks
            if fail:
                raise RuntimeError("boom")
    assert_restored(lm.model, state)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
def test_alpha_zero_reproduces_the_observation(lm, lm_bf16, vector, dtype):
    """The hook computes in float32, or in the model's dtype if wider, and casts back: with
    alpha = 0 the hidden states are unchanged (a float64 model's were rounded to float32, so its
    exact P(unchanged) was below 1). Layer 0: the last layer's output goes through the final
    norm, which rounds to float32 in any dtype and would hide the rounding."""
    lm = {"fp32": lm, "bf16": lm_bf16, "fp64": tiny_llama(seed=0, dtype=torch.float64)}[dtype]
    ids = torch.cat([PROMPT, CONTINUATION])
    with torch.no_grad(), ActivationSteering(vector, 0, alpha=0.0).activate(lm) as f:  # (the model's own dtype)
        assert torch.equal(f.model(ids[None]).logits, lm.model(ids[None]).logits)
    scm = LanguageModelSCM(
        lm, max_new_tokens=6, mechanisms={"steer": ActivationSteering(vector, 0, alpha=0.0)}
    )
    observed = counterfactual(scm, PROMPT, None, {}, seed=1).factual_ids
    assert exact_counterfactual(scm, PROMPT, observed, {"mechanism": "steer"}).prob_unchanged() == 1.0
    result = counterfactual(scm, PROMPT, observed, {"mechanism": "steer"}, num_samples=20, seed=0)
    n = len(observed)
    assert torch.equal(result.counterfactual_ids[:, :n], observed.expand(20, n))


def test_strong_steering_changes_counterfactuals(lm):
    steer = ActivationSteering.from_contrastive(
        lm, ["she", "the woman", "her"], ["he", "the man", "his"], 1, alpha=30.0
    )
    scm = LanguageModelSCM(lm, max_new_tokens=6, mechanisms={"steer": steer})
    null = counterfactual(scm, PROMPT, CONTINUATION, {}, num_samples=20, seed=0)
    steered = counterfactual(scm, PROMPT, CONTINUATION, {"mechanism": "steer"}, num_samples=20, seed=0)
    assert torch.equal(null.counterfactual_ids, CONTINUATION.expand(20, 6))
    changed = (steered.counterfactual_ids != CONTINUATION).any(-1)
    assert float(changed.float().mean()) > 0.5


@pytest.mark.parametrize("mechanisms", [[0, 1], [1, 0], [0, 1, 2, 1, 0]])
def test_mixed_batch_rows_match_separate_runs(lm, vector, mechanisms):
    scm = LanguageModelSCM(
        lm,
        max_new_tokens=6,
        mechanisms={
            "steer": ActivationSteering(vector, layer=1, alpha=3.0),
            "late": ActivationSteering(-vector, layer=0, alpha=3.0, start=len(PROMPT) + 2),
        },
    )
    state = snapshot(lm.model)
    assert_rows_match_separate_runs(scm, PROMPT, mechanisms)
    assert_restored(lm.model, state)


def test_from_contrastive_is_a_difference_of_last_token_means(lm):
    positive = [torch.tensor([2, 6, 7]), torch.tensor([8])]
    negative = [torch.tensor([5, 9]), torch.tensor([2, 3, 10, 11]), torch.tensor([4])]

    def last(ids):
        return by_hand(lm, ids, 0)[-1]

    expected = torch.stack([last(x) for x in positive]).mean(0) - torch.stack(
        [last(x) for x in negative]
    ).mean(0)
    steer = ActivationSteering.from_contrastive(lm, positive, negative, layer=0, alpha=2.0, start=1)
    torch.testing.assert_close(steer.vector, expected, atol=1e-6, rtol=1e-5)
    assert (steer.layer, steer.alpha, steer.start) == (0, 2.0, 1)
    # text and ids give the same vector
    as_text = ActivationSteering.from_contrastive(lm, ["she", "her"], ["he", "his"], layer=0)
    as_ids = ActivationSteering.from_contrastive(
        lm, [lm.encode("she"), lm.encode("her")], [lm.encode("he"), lm.encode("his")], layer=0
    )
    assert torch.equal(as_text.vector, as_ids.vector)


class _TupleLayer(nn.Module):
    """A decoder layer returning a tuple, as older transformers versions do."""

    def forward(self, hidden, position_ids=None):
        return hidden * 2, "attention weights"


class _ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_TupleLayer()])

    def forward(self, hidden, **kwargs):
        return self.model.layers[0](hidden, **kwargs)


class _ToyLM:
    def __init__(self):
        self.model = _ToyModel()


def test_tuple_outputs_and_explicit_positions():
    toy = _ToyLM()
    hidden = torch.zeros(1, 4, 3)
    steer = ActivationSteering(torch.ones(3), layer=0, alpha=1.5, start=5)
    with steer.activate(toy):  # a step of 4 tokens after a cache of 3
        out, extra = toy.model(hidden, position_ids=torch.tensor([[3, 4, 5, 6]]))
    assert extra == "attention weights"
    assert out[0, :, 0].tolist() == [0.0, 0.0, 1.5, 1.5]
    # without positions, only start=0 is well defined
    with ActivationSteering(torch.ones(3), layer=0).activate(toy):
        assert toy.model(hidden)[0].sum() == 1.0 * 12
    with pytest.raises(MechanismError, match="position_ids"):
        with steer.activate(toy):
            toy.model(hidden)
    assert not toy.model.model.layers[0]._forward_hooks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vector=torch.ones(2, 32), layer=0), r"shape \(d,\)"),
        (dict(vector=torch.ones(32, dtype=torch.long), layer=0), "floating"),
        (dict(vector=torch.full((32,), float("nan")), layer=0), "non-finite"),
        (dict(vector=torch.ones(32), layer=0.5), "`layer` must be an integer"),
        (dict(vector=torch.ones(32), layer=0, start=-1), "`start` must be an integer >= 0"),
        (dict(vector=torch.ones(32), layer=0, alpha=float("inf")), "`alpha` must be a finite number"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MechanismError, match=match):
        ActivationSteering(**kwargs)


@pytest.mark.parametrize(
    "steer, match",
    [
        (ActivationSteering(torch.ones(32), layer=2), r"2 decoder layers; pass an index in \[-2, 2\)"),
        (ActivationSteering(torch.ones(16), layer=0), "dimension 16 but the model's hidden size is 32"),
    ],
)
def test_check_against_the_model(lm, steer, match):
    with pytest.raises(MechanismError, match=match):
        LanguageModelSCM(lm, max_new_tokens=3, mechanisms={"steer": steer})


def test_from_contrastive_needs_prompts(lm):
    with pytest.raises(MechanismError, match="positive_prompts"):
        ActivationSteering.from_contrastive(lm, [], ["he"], layer=0)
    with pytest.raises(MechanismError, match="negative_prompts"):
        ActivationSteering.from_contrastive(lm, ["she"], "he", layer=0)
