"""MEMIT: several facts at once over several layers, on the tiny model (the SmolLM2
acceptance is in tests/test_smollm2_interventions.py)."""

import math
import random

import pytest
import torch

from pyro_lmscm.errors import InterventionError, MechanismError
from pyro_lmscm.interventions.memit import EditRequest, MemitEdit, memit_edit
from pyro_lmscm.interventions.spec import parse_intervention
from pyro_lmscm.testing import TINY_WORDS, assert_restored, snapshot

# as in test_rome.py: the tiny random model needs a change ~30x its MLP outputs
TINY = dict(lr=0.05, clamp_norm_factor=100.0, weight_decay=0.01, num_steps=60)
PRIOR = 1.0  # MEMIT's mom2_weight of 15,000 is for real models; the tiny one needs a weaker prior


def cov_texts():
    rng = random.Random(0)
    return [" ".join(rng.choices(TINY_WORDS, k=8)) for _ in range(40)]


TINY["cov_texts"] = cov_texts()
REQUESTS = [("she walked to the doctor", "the doctor", "home"), ("the man went to the city", "the city", "night")]
UNRELATED = ["the nurse was", "a young woman", "his story and", "he smiled and"]


def _next(lm, text):
    return int(lm.logits(lm.encode(text))[-1].argmax())


@pytest.fixture(scope="module")
def edit(lm):
    return memit_edit(lm, REQUESTS, layers=[0, 1], mom2_weight=PRIOR, **TINY)


def test_writes_every_fact_of_the_batch_and_restores(lm, edit):
    before = snapshot(lm.model)
    targets = [lm.encode(target).item() for _, _, target in REQUESTS]
    assert [_next(lm, prompt) for prompt, _, _ in REQUESTS] != targets  # baseline: not already true
    assert isinstance(edit, MemitEdit) and edit.layers == [0, 1] and len(edit.requests) == 2
    assert sorted(edit.deltas) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    with edit.activate(lm) as f:
        assert [int(f.logits(lm.encode(p))[-1].argmax()) for p, _, _ in REQUESTS] == targets
    assert_restored(lm.model, before)  # bit-exact


def test_the_last_layer_writes_the_target_residuals(lm):
    """With a negligible prior (mom2_weight -> 0) and one layer, the least-squares update
    reaches each request's target residual z_i exactly: (W + dW) k_i = W k_i + r_i; with
    MEMIT's prior weight it only goes part of the way (the baseline that must fail)."""
    def gap(mom2_weight):
        edit = memit_edit(lm, REQUESTS, layers=[0], mom2_weight=mom2_weight, **TINY)
        reached = []
        with edit.activate(lm), torch.no_grad():
            for prompt, subject, _ in REQUESTS:
                ids = lm.encode(prompt)
                end = len(lm.encode(prompt[: prompt.index(subject) + len(subject)])) - 1
                out = lm.model(input_ids=ids[None], output_hidden_states=True)
                reached.append(out.hidden_states[1][0, end].float())  # after layer 0: not yet normed
        return float((torch.stack(reached) - edit.targets).norm() / edit.targets.norm())

    assert gap(1e-8) < 1e-4
    assert gap(15000.0) > 1e-2


def test_unrelated_prompts_move_less_than_the_edited_ones(lm, edit):
    def shift(prompts):
        with torch.no_grad():
            before = [lm.logits(lm.encode(p))[-1].log_softmax(-1) for p in prompts]
            with edit.activate(lm) as f:
                after = [f.logits(lm.encode(p))[-1].log_softmax(-1) for p in prompts]
        return sum(float((b.exp() * (b - a)).sum()) for b, a in zip(before, after)) / len(prompts)

    assert shift(UNRELATED) < 0.25 * shift([p for p, _, _ in REQUESTS])


def test_spec_builds_the_same_edit(lm):
    spec = parse_intervention({"memit": {"requests": [dict(zip(("prompt", "subject", "target"), r)) for r in REQUESTS],
                                         "layers": [0, 1]}}, lm)
    assert spec.intervention == {"mechanism": "memit"}
    built = spec.mechanisms["memit"]
    direct = memit_edit(lm, REQUESTS, layers=[0, 1])
    assert built.deltas.keys() == direct.deltas.keys()
    assert all(torch.equal(built.deltas[k], direct.deltas[k]) for k in direct.deltas)
    one = parse_intervention(
        "memit=the doctor|she walked to the doctor|home&the city|the man went to the city|night", lm
    )
    assert len(one.mechanisms["memit"].requests) == 2


@pytest.mark.parametrize(
    "requests, layers, message",
    [
        ([], None, "non-empty list"),
        ([("she walked home", "the doctor", "home")], None, "does not occur"),
        ([("she walked to the doctor", "the doctor")], None, "triple"),
        ([EditRequest("she walked to the doctor", "the doctor", "home")], [5], "layer"),
        ([EditRequest("she walked to the doctor", "the doctor", "home")], [], "layers"),
    ],
)
def test_bad_input(lm, requests, layers, message):
    before = snapshot(lm.model)
    with pytest.raises(MechanismError, match=message):
        memit_edit(lm, requests, layers=layers)
    assert_restored(lm.model, before)


def test_bad_spec(lm):
    for bad in ("memit=a|b", "memit=&", {"memit": {"layers": [0]}}):
        with pytest.raises(InterventionError):
            parse_intervention(bad, lm)


def test_attribution_over_the_edited_layers(lm, edit):
    """One part per edited layer; each alone is the hand-built weight edit of that layer's delta."""
    from pyro_lmscm import LanguageModelSCM
    from pyro_lmscm.inference import attribute, exact_counterfactual
    from pyro_lmscm.interventions import WeightDelta

    assert edit.parts() == ["layer 0", "layer 1"]
    sub = edit.restricted(["layer 1"])
    assert isinstance(sub, MemitEdit) and sub.layers == [1] and sub.requests == edit.requests
    prompt, observed = lm.encode("she walked to the doctor"), lm.encode("home and the nurse")
    scm = LanguageModelSCM(lm, 4, mechanisms={"memit": edit})
    result = attribute(scm, prompt, observed, {"mechanism": "memit"})
    for i, part in enumerate(result.parts):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        hand = LanguageModelSCM(lm, 4, mechanisms={"m": WeightDelta({name: edit.deltas[name]})})
        alone = exact_counterfactual(hand, prompt, observed, {"mechanism": "m"}).prob_unchanged()
        assert abs(result.prob_unchanged_alone[part] - alone) < 1e-9
    assert 0.01 < result.prob_unchanged < 0.99  # the edit can change this string (0.56)
    assert abs(sum(result.shapley.values()) - math.log(result.prob_unchanged)) < 1e-9
