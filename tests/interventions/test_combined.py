"""Mechanisms made of parts: Combined, and the parts and sub-mechanisms of weight edits, MEMIT and adapters."""

from __future__ import annotations

import itertools

import pytest
import torch

from pyro_lmscm.errors import MechanismError
from pyro_lmscm.interventions import ActivationSteering, Combined, LoRAAdapter, MemitEdit, ModelSwap, WeightDelta
from pyro_lmscm.models import Factual
from pyro_lmscm.testing import assert_restored, by_hand, snapshot, tiny_llama

IDS = torch.tensor([2, 3, 4, 5, 6, 7])
DOWN = "model.layers.{}.mlp.down_proj.weight"


def subsets(parts):
    return [list(c) for size in range(len(parts) + 1) for c in itertools.combinations(parts, size)]


def test_combined_steering_equals_the_hand_written_forward():
    lm = tiny_llama(seed=0)
    v0, v1 = torch.ones(32), torch.linspace(-1, 1, 32)
    steer = Combined([ActivationSteering(v0, layer=0, alpha=0.5), ActivationSteering(v1, layer=1, alpha=0.5, start=2)])
    assert steer.parts() == ["layer 0", "layer 1"]

    def edit(layer_edits):
        model = lm.model
        positions = torch.arange(IDS.shape[-1])[None]
        with torch.no_grad():
            hidden = model.model.embed_tokens(IDS[None])
            rotary = model.model.rotary_emb(hidden, positions)
            for i, block in enumerate(model.model.layers):
                hidden = block(hidden, position_ids=positions, position_embeddings=rotary)
                if i in layer_edits:
                    hidden = layer_edits[i](hidden, positions[..., None])
            return model.lm_head(model.model.norm(hidden))[0]

    expected = edit({0: lambda h, p: h + 0.5 * v0, 1: lambda h, p: torch.where(p >= 2, h + 0.5 * v1, h)})
    with steer.activate(lm) as f:
        assert torch.allclose(f.logits(IDS), expected, atol=1e-5)
    alone = by_hand(lm, IDS, 1, lambda h, p: torch.where(p >= 2, h + 0.5 * v1, h))
    with steer.restricted(["layer 1"]).activate(lm) as f:  # layer 1 alone
        assert torch.allclose(f.logits(IDS), alone, atol=1e-5)
    assert isinstance(steer.restricted([]), Factual) and steer.restricted(steer.parts()) is steer


@pytest.mark.parametrize("fail", [False, True], ids=["clean-exit", "exception"])
def test_every_sub_mechanism_restores_the_model_bit_for_bit(fail):
    from peft import LoraConfig

    lm = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(0)
    deltas = {DOWN.format(i): torch.randn(32, 64, generator=g) for i in range(2)}
    deltas["lm_head.weight"] = torch.randn(lm.model.lm_head.weight.shape, generator=g)
    mechanisms = [
        WeightDelta(deltas),
        MemitEdit({k: v for k, v in deltas.items() if "layers" in k}, [0, 1], []),
        Combined({"steer": Combined([ActivationSteering(torch.ones(32), layer=i) for i in range(2)]),
                  "edit": WeightDelta(deltas)}),
        LoRAAdapter.from_config(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
    ]
    state = snapshot(lm.model)
    factual = lm.logits(IDS)
    for mechanism in mechanisms:
        for chosen in subsets(mechanism.parts()):
            sub = mechanism.restricted(chosen)
            with pytest.raises(RuntimeError) if fail else torch.no_grad():
                with sub.activate(lm) as f:
                    changed = f.logits(IDS)
                    if fail:
                        raise RuntimeError("boom")
            assert_restored(lm.model, state)
            if chosen and not fail:
                assert not torch.equal(changed, factual), (mechanism, chosen)
    assert torch.equal(lm.logits(IDS), factual)


def test_parts_of_each_mechanism():
    lm = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(0)
    deltas = {DOWN.format(1): torch.randn(32, 64, generator=g), "model.layers.1.self_attn.q_proj.weight":
              torch.randn(32, 32, generator=g), DOWN.format(0): torch.randn(32, 64, generator=g),
              "lm_head.weight": torch.zeros(lm.model.lm_head.weight.shape)}
    edit = WeightDelta(deltas)
    assert edit.parts() == ["layer 1", "layer 0", "lm_head.weight"]
    assert set(edit.restricted(["layer 1"]).deltas) == {DOWN.format(1), "model.layers.1.self_attn.q_proj.weight"}
    memit = MemitEdit({DOWN.format(i): deltas[DOWN.format(i)] for i in (0, 1)}, [0, 1], [])
    sub = memit.restricted(["layer 1"])
    assert isinstance(sub, MemitEdit) and sub.layers == [1] and list(sub.deltas) == [DOWN.format(1)]
    assert ModelSwap(tiny_llama(seed=1)).parts() == ["whole"]
    nested = Combined({"steer": Combined([ActivationSteering(torch.ones(32), layer=i) for i in range(2)]),
                       "edit": ActivationSteering(torch.ones(32), layer=0)})
    assert nested.parts() == ["steer/layer 0", "steer/layer 1", "edit"]
    assert nested.restricted(["steer/layer 1"]).layer == 1


def test_indivisible_and_unknown_parts():
    lm = tiny_llama(seed=0)
    steer = ActivationSteering(torch.ones(32), layer=0)
    assert steer.parts() == ["whole"] and steer.restricted(["whole"]) is steer
    with pytest.raises(MechanismError, match="no part 'layer 0'"):
        steer.restricted(["layer 0"])

    class TwoHalves(ActivationSteering):  # claims parts but cannot build them
        def parts(self):
            return ["a", "b"]

    with pytest.raises(MechanismError, match="indivisible"):
        TwoHalves(torch.ones(32), layer=0).restricted(["a"])
    with pytest.raises(MechanismError, match="acts on every position"):
        WeightDelta({DOWN.format(0): torch.zeros(32, 64)}).acting_from(3)
    assert steer.acting_from(4).start == 4 and steer.start == 0
    with pytest.raises(MechanismError, match="same parameters"):
        ModelSwap(tiny_llama(seed=0)).as_weight_delta(lm)
    with pytest.raises(MechanismError, match="other parameters"):
        ModelSwap(tiny_llama(seed=0, num_hidden_layers=3)).as_weight_delta(lm)


def test_model_swap_as_weight_delta_reproduces_the_other_model():
    lm, other = tiny_llama(seed=0), tiny_llama(seed=1)
    edit = ModelSwap(other).as_weight_delta(lm)
    state = snapshot(lm.model)
    with edit.activate(lm) as f:
        assert all(torch.equal(p, other.model.get_parameter(n)) for n, p in f.model.named_parameters())
        assert torch.equal(f.logits(IDS), other.logits(IDS))
    assert_restored(lm.model, state)
    assert "layer 0" in edit.parts() and "layer 1" in edit.parts()


def test_spec_steering_at_several_layers_is_one_part_per_layer(monkeypatch):
    from pyro_lmscm.interventions import spec

    calls = []

    def fake(lm, direction, layer=None, alpha=1.0):  # gender_steering needs SmolLM2's tokenizer
        calls.append((direction, layer, alpha))
        return ActivationSteering(torch.ones(32), layer=layer, alpha=alpha)

    monkeypatch.setattr(spec, "gender_steering", fake)
    parsed = spec.parse_intervention("steer=female:0.5:0,1", tiny_llama(seed=0))
    steer = parsed.mechanisms["steer"]
    assert isinstance(steer, Combined) and steer.parts() == ["layer 0", "layer 1"]
    assert calls == [("female", 0, 0.5), ("female", 1, 0.5)] and parsed.intervention == {"mechanism": "steer"}
    single = spec.parse_intervention("steer=female:0.5:1", tiny_llama(seed=0)).mechanisms["steer"]
    assert isinstance(single, ActivationSteering) and single.layer == 1
