"""Exact attribution to parts and steps, against exact counterfactuals of sub-mechanisms built by hand."""

from __future__ import annotations

import copy
import itertools
import math
from contextlib import ExitStack, contextmanager

import pytest
import torch

from pyro_lmscm import LanguageModelSCM
from pyro_lmscm.errors import InferenceError, MechanismError
from pyro_lmscm.inference import attribute, exact_counterfactual
from pyro_lmscm.inference.exact import expected_first_divergence
from pyro_lmscm.interventions import ActivationSteering, Combined, LoRAAdapter, ModelSwap, WeightDelta
from pyro_lmscm.interventions.internals import forward_hook
from pyro_lmscm.lm import HFLanguageModel
from pyro_lmscm.models import Mechanism
from pyro_lmscm.models.ops import STEP_LOGITS
from pyro_lmscm.seeding import seeded
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3, 4])
T = 6
DOWN = "model.layers.{}.mlp.down_proj.weight"
TOL = 1e-9


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(dtype=torch.float64, num_hidden_layers=3)


@pytest.fixture(scope="module")
def observed(lm):
    with seeded(0):
        return LanguageModelSCM(lm, max_new_tokens=T).model(PROMPT)


def layer_deltas(lm, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {DOWN.format(i): scale * torch.randn(32, 64, generator=g, dtype=torch.float64) for i in range(3)}


def steering_vectors(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, generator=g) for _ in range(3)]


def exact_of(lm, mechanism, observed):
    """(P(unchanged), E[first divergence]) of an SCM holding ``mechanism`` alone, selected."""
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"m": mechanism})
    exact = exact_counterfactual(scm, PROMPT, observed, {"mechanism": "m"})
    return exact.prob_unchanged(), expected_first_divergence(exact.first_divergence())


class HandSteering(Mechanism):
    """Steering written out by hand: ``v_L`` added after layer ``L`` at sequence index
    ``>= from_index`` of a teacher-forced pass (one string, no cache), in float32 or the
    model's dtype if wider (this file's float64), as the steering mechanisms compute."""

    def __init__(self, vectors, alpha, from_index=0):
        self.vectors, self.alpha, self.from_index = vectors, alpha, from_index

    @contextmanager
    def _hooks(self, lm, layers):
        with ExitStack() as stack:
            for layer, vector in layers.items():
                def hook(module, args, output, vector=vector):
                    hidden = output[0] if isinstance(output, tuple) else output
                    edited = hidden.clone()
                    tail = hidden[:, self.from_index :]
                    wide = torch.promote_types(hidden.dtype, torch.float32)
                    edited[:, self.from_index :] = (tail.to(wide) + self.alpha * vector.to(wide)).to(hidden.dtype)
                    return (edited, *output[1:]) if isinstance(output, tuple) else edited

                stack.enter_context(forward_hook(lm.model.model.layers[layer], hook))
            yield lm

    def activate(self, lm):
        return self._hooks(lm, self.vectors)


def hand_weight_delta(deltas, layers):
    return WeightDelta({DOWN.format(i): deltas[DOWN.format(i)] for i in layers})


# ------------------------------------------------------------------ by layer: weight edits


def test_alone_and_without_equal_hand_built_sub_mechanisms(lm, observed):
    deltas = layer_deltas(lm)
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"edit": WeightDelta(deltas)})
    result = attribute(scm, PROMPT, observed, {"mechanism": "edit"})
    assert result.parts == ["layer 0", "layer 1", "layer 2"]
    assert result.exact and result.num_passes == 1 + 7  # factual + every non-empty subset; the empty one is free
    for i, part in enumerate(result.parts):
        alone = exact_of(lm, hand_weight_delta(deltas, [i]), observed)
        without = exact_of(lm, hand_weight_delta(deltas, [j for j in range(3) if j != i]), observed)
        assert abs(result.prob_unchanged_alone[part] - alone[0]) < TOL
        assert abs(result.first_divergence_alone[part] - alone[1]) < TOL
        assert abs(result.prob_unchanged_without[part] - without[0]) < TOL
        assert abs(result.first_divergence_without[part] - without[1]) < TOL
    whole = exact_of(lm, WeightDelta(deltas), observed)
    assert abs(result.prob_unchanged - whole[0]) < TOL
    assert 0.05 < result.prob_unchanged < 0.95  # a case where the parts matter
    assert result.prob_unchanged_empty == 1.0 and result.expected_first_divergence_empty == T


def test_shapley_values_add_up_and_equal_brute_force_over_orderings(lm, observed):
    deltas = layer_deltas(lm)
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"edit": WeightDelta(deltas)})
    result = attribute(scm, PROMPT, observed, {"mechanism": "edit"})
    # log P(unchanged) of the empty set is log 1 = 0: the values add up to log P of the whole
    assert abs(sum(result.shapley.values()) - math.log(result.prob_unchanged)) < TOL
    assert abs(sum(result.shapley_first_divergence.values()) - (result.expected_first_divergence - T)) < TOL
    # brute force: every ordering of the three layers, each subset's value from a hand-built edit
    values = {}
    for size in range(4):
        for subset in itertools.combinations(range(3), size):
            if subset:
                p, e = exact_of(lm, hand_weight_delta(deltas, subset), observed)
                values[frozenset(subset)] = (math.log(p), e)
            else:
                values[frozenset()] = (0.0, float(T))
    for j, (shapley, name) in enumerate([(result.shapley, "log P"), (result.shapley_first_divergence, "E[D]")]):
        for i in range(3):
            increments = []
            for order in itertools.permutations(range(3)):
                before = frozenset(order[: order.index(i)])
                increments.append(values[before | {i}][j] - values[before][j])
            assert abs(shapley[f"layer {i}"] - sum(increments) / 6) < TOL, (name, i)
    # the parts interact: the Shapley values are not the lone effects
    lone = {f"layer {i}": values[frozenset({i})][0] for i in range(3)}
    assert max(abs(result.shapley[p] - lone[p]) for p in lone) > 1e-3


def test_permutation_estimate_adds_up_and_is_within_its_errors(lm, observed):
    deltas = layer_deltas(lm)
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"edit": WeightDelta(deltas)})
    exact = attribute(scm, PROMPT, observed, {"mechanism": "edit"})
    sampled = attribute(scm, PROMPT, observed, {"mechanism": "edit"}, max_exact_parts=2, num_permutations=200, seed=3)
    assert not sampled.exact and sampled.num_permutations == 200
    assert sampled.num_passes <= 8  # every subset evaluated once (cached)
    assert abs(sum(sampled.shapley.values()) - math.log(sampled.prob_unchanged)) < TOL  # each order telescopes
    for part in exact.parts:
        assert sampled.shapley_se[part] > 0
        assert abs(sampled.shapley[part] - exact.shapley[part]) < 4 * sampled.shapley_se[part]
    again = attribute(scm, PROMPT, observed, {"mechanism": "edit"}, max_exact_parts=2, num_permutations=200, seed=3)
    assert again.shapley == sampled.shapley  # seeded


def test_model_swap_is_split_as_its_weight_difference(lm, observed):
    other = copy.deepcopy(lm.model)
    with torch.no_grad():
        for name, delta in layer_deltas(lm, seed=5).items():
            other.get_parameter(name).add_(delta)
    swap = ModelSwap(HFLanguageModel(other))
    assert swap.parts() == ["whole"]  # a swap itself is indivisible
    delta = swap.as_weight_delta(lm)
    assert delta.parts() == ["layer 0", "layer 1", "layer 2"]
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"swap": swap})
    result = attribute(scm, PROMPT, observed, {"mechanism": "swap"})
    assert abs(result.prob_unchanged - exact_of(lm, swap, observed)[0]) < TOL  # the edit reproduces the swap
    assert abs(sum(result.shapley.values()) - math.log(result.prob_unchanged)) < TOL


def test_lora_parts_alone_equal_a_hand_enabled_adapter():
    from peft import LoraConfig

    lm = tiny_llama(dtype=torch.float64, num_hidden_layers=2)
    adapter = LoRAAdapter.from_config(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with seeded(0):
        observed = LanguageModelSCM(lm, max_new_tokens=T).model(PROMPT)

    class OneLayer(Mechanism):  # the adapter's modules of one layer switched on by hand
        def __init__(self, layer):
            self.layer = layer

        @contextmanager
        def _on(self, lm):
            modules = [m for n, m in lm.model.named_modules() if f"layers.{self.layer}." in n and hasattr(m, "lora_A")]
            try:
                for m in modules:
                    m.enable_adapters(True)
                yield lm
            finally:
                for m in modules:
                    m.enable_adapters(False)

        def activate(self, lm):
            return self._on(lm)

    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"lora": adapter})
    result = attribute(scm, PROMPT, observed, {"mechanism": "lora"})
    assert result.parts == ["layer 0", "layer 1"]
    for i, part in enumerate(result.parts):
        assert abs(result.prob_unchanged_alone[part] - exact_of(lm, OneLayer(i), observed)[0]) < TOL
        assert abs(result.prob_unchanged_without[part] - exact_of(lm, OneLayer(1 - i), observed)[0]) < TOL


# ------------------------------------------------------------------ by layer and by step: steering


def test_steering_layers_alone_equal_hand_written_hooks(lm, observed):
    vectors = steering_vectors()
    steer = Combined([ActivationSteering(v, layer=i, alpha=0.1) for i, v in enumerate(vectors)])
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"steer": steer})
    result = attribute(scm, PROMPT, observed, {"mechanism": "steer"})
    assert result.parts == ["layer 0", "layer 1", "layer 2"]
    for i, part in enumerate(result.parts):
        alone = exact_of(lm, HandSteering({i: vectors[i]}, 0.1), observed)
        without = exact_of(lm, HandSteering({j: vectors[j] for j in range(3) if j != i}, 0.1), observed)
        assert abs(result.prob_unchanged_alone[part] - alone[0]) < TOL
        assert abs(result.prob_unchanged_without[part] - without[0]) < TOL
    assert abs(sum(result.shapley.values()) - math.log(result.prob_unchanged)) < TOL


def test_acting_from_a_step_equals_a_hand_written_hook_from_that_position(lm, observed):
    vectors = steering_vectors()
    steer = Combined([ActivationSteering(v, layer=i, alpha=0.1) for i, v in enumerate(vectors)])
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"steer": steer})
    result = attribute(scm, PROMPT, observed, {"mechanism": "steer"}, by="step")
    L = PROMPT.shape[-1]
    assert result.steps == list(range(T)) and result.prompt_length == L
    everywhere = {i: v for i, v in enumerate(vectors)}
    assert abs(result.prob_unchanged_from[0] - exact_of(lm, HandSteering(everywhere, 0.1), observed)[0]) < TOL
    for s in range(1, T):
        hand = exact_of(lm, HandSteering(everywhere, 0.1, from_index=L + s - 1), observed)
        assert abs(result.prob_unchanged_from[s] - hand[0]) < TOL, s
        assert abs(result.first_divergence_from[s] - hand[1]) < TOL, s
    assert result.prob_unchanged_from[T] == 1.0
    log_p = math.log(result.prob_unchanged_from[0])
    assert abs(sum(result.effect.values()) - log_p) < TOL  # the steps' effects add up
    ended = int((observed == 1).nonzero()[0])  # after the end of sequence nothing can change
    assert result.prob_unchanged_from[ended + 1] == 1.0
    assert result.last_step_that_matters == ended and result.first_step_that_matters == 0
    assert result.num_passes == 1 + T
    assert result.to_pandas().loc[2, "prob_unchanged_from"] == result.prob_unchanged_from[2]
    assert len(result.plot().axes) == 2


def test_factual_logits_before_the_step_are_not_acting_from_it(lm, observed):
    """Baseline: keeping the steering everywhere and replacing the logits of the steps before
    ``s`` by the factual ones (a Messenger on step_logits) is another intervention: the
    steered earlier positions still reach the later steps through the cache."""
    from pyro.poutine.messenger import Messenger

    vectors = steering_vectors()
    steer = Combined([ActivationSteering(v, layer=i, alpha=0.1) for i, v in enumerate(vectors)])
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"steer": steer})
    result = attribute(scm, PROMPT, observed, {"mechanism": "steer"}, by="step")
    s = 2
    factual = lm.logits(torch.cat([PROMPT, observed[:-1]]), logits_to_keep=T)

    class FactualBefore(Messenger):
        def _process_message(self, msg):
            if msg["type"] == STEP_LOGITS and msg["args"][1] < s:
                msg["value"] = factual[msg["args"][1]].expand_as(msg["args"][2])
                msg["done"] = True

    wrong = exact_counterfactual(scm, PROMPT, observed, [{"mechanism": "steer"}, FactualBefore()]).prob_unchanged()
    assert abs(math.log(wrong) - math.log(result.prob_unchanged_from[s])) > 0.1  # 1.3e-4 against 1.8e-4


def test_weight_edits_cannot_act_from_a_step(lm, observed):
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"edit": WeightDelta(layer_deltas(lm))})
    with pytest.raises(MechanismError, match="acts on every position"):
        attribute(scm, PROMPT, observed, {"mechanism": "edit"}, by="step")


def test_bad_input(lm, observed):
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"edit": WeightDelta(layer_deltas(lm))})
    with pytest.raises(InferenceError, match="selects no mechanism"):
        attribute(scm, PROMPT, observed, {})
    with pytest.raises(InferenceError, match="`by`"):
        attribute(scm, PROMPT, observed, {"mechanism": "edit"}, by="head")
    with pytest.raises(MechanismError, match="no part 'layer 7'"):
        WeightDelta(layer_deltas(lm)).restricted(["layer 7"])


def test_to_pandas_and_json(lm, observed):
    import json

    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"edit": WeightDelta(layer_deltas(lm))})
    result = attribute(scm, PROMPT, observed, {"mechanism": "edit"})
    frame = result.to_pandas()
    assert list(frame.index) == result.parts
    assert frame.loc["layer 1", "shapley_log_prob_unchanged"] == result.shapley["layer 1"]
    assert json.loads(json.dumps(result.to_dict()))["shapley"] == result.shapley
    assert [t.get_text() for t in result.plot().axes[0].get_xticklabels()] == result.parts


def test_the_rest_of_the_intervention_is_in_every_world(lm, observed):
    """A Messenger besides the mechanism acts in every subset's world, the empty one included:
    the Shapley values add up to log P(whole) - log P(Messenger alone), not to log P(whole)."""
    from pyro.poutine.messenger import Messenger

    from pyro_lmscm.models.ops import STEP_DECODED

    class Boost(Messenger):  # a bonus for token 5 at every step of the intervened world
        def _postprocess_message(self, msg):
            if msg["type"] == STEP_DECODED:
                boosted = msg["value"].clone()
                boosted[..., 5] += 1.0
                msg["value"] = boosted

    boost = Boost()
    deltas = layer_deltas(lm)
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"edit": WeightDelta(deltas)})
    result = attribute(scm, PROMPT, observed, [{"mechanism": "edit"}, boost])
    empty = exact_counterfactual(scm, PROMPT, observed, boost).prob_unchanged()
    assert abs(result.prob_unchanged_empty - empty) < TOL and empty < 1 - 1e-3
    assert result.num_passes == 1 + 8  # the empty subset now takes a pass too
    for i, part in enumerate(result.parts):
        hand = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"m": hand_weight_delta(deltas, [i])})
        alone = exact_counterfactual(hand, PROMPT, observed, [{"mechanism": "m"}, boost]).prob_unchanged()
        assert abs(result.prob_unchanged_alone[part] - alone) < TOL
    total = math.log(result.prob_unchanged) - math.log(empty)
    assert abs(sum(result.shapley.values()) - total) < TOL
    assert abs(total - math.log(result.prob_unchanged)) > 1e-3  # baseline: adding up to log P(whole) fails


# -- attributions(): many strings, the passes batched across them ------------------------------------------


class _Forwards:
    """Counts the model's forward calls."""

    def __init__(self, lm):
        self.calls = 0
        self.handle = lm.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _strings(lm, observed):
    """Three strings: prompts and observations of different lengths (a batch needs padding)."""
    scm = LanguageModelSCM(lm, max_new_tokens=T)
    prompts = [PROMPT, torch.tensor([5, 9]), torch.tensor([7, 1, 8, 2, 6])]
    with seeded(4):
        others = [scm.model(p)[:n] for p, n in zip(prompts[1:], (4, 5))]
    return prompts, [observed, *others]


@pytest.mark.parametrize("case", ["weight edit", "sampled", "with a Messenger", "by step"])
def test_attributions_of_many_strings_are_attribute_of_each(lm, observed, case):
    """Each string's result of :func:`attributions` equals :func:`attribute` of that string:
    the same numbers with ``batch_size=1``; to 1e-9 (float64) in one left-padded batch, whose
    passes are one per subset for all strings (``2^3 = 8`` calls, not ``8 x 3``)."""
    from pyro.poutine.messenger import Messenger

    from pyro_lmscm.inference import attributions
    from pyro_lmscm.models.ops import STEP_DECODED

    class Boost(Messenger):
        def _postprocess_message(self, msg):
            if msg["type"] == STEP_DECODED:
                boosted = msg["value"].clone()
                boosted[..., 5] += 1.0
                msg["value"] = boosted

    prompts, strings = _strings(lm, observed)
    options: dict = {}
    intervention: object = {"mechanism": "m"}
    mechanism: Mechanism = WeightDelta(layer_deltas(lm))
    if case == "sampled":
        options = {"max_exact_parts": 2, "num_permutations": 5, "seed": 3}
    elif case == "with a Messenger":
        intervention = [{"mechanism": "m"}, Boost()]
    elif case == "by step":
        mechanism = Combined([ActivationSteering(v, layer=i) for i, v in enumerate(steering_vectors())])
        options = {"by": "step"}
    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"m": mechanism})
    alone = [attribute(scm, p, o, intervention, **options).to_dict() for p, o in zip(prompts, strings)]
    one_by_one = attributions(scm, prompts, strings, intervention, batch_size=1, **options)
    assert [r.to_dict() for r in one_by_one] == alone
    with _Forwards(lm) as forwards:
        batched = attributions(scm, prompts, strings, intervention, batch_size=3, **options)
    for result, expected in zip(batched, alone):
        got = result.to_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, dict):
                assert got[key].keys() == value.keys()
                for part, x in value.items():
                    assert x is None and got[key][part] is None or abs(got[key][part] - x) < TOL, (key, part)
            elif isinstance(value, float):
                assert abs(got[key] - value) < TOL, key
            else:
                assert got[key] == value, key
    if case == "weight edit":
        assert forwards.calls == 1 + 7  # the factual pass, then one per non-empty subset, for all three strings
        assert [r.num_passes for r in batched] == [1 + 7] * 3
    if case == "by step":  # each string's steps take passes of their own
        assert forwards.calls == 1 + sum(len(o) for o in strings)


def test_attributions_bad_input(lm, observed):
    from pyro_lmscm.inference import attributions

    scm = LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"m": WeightDelta(layer_deltas(lm))})
    with pytest.raises(InferenceError, match="one entry per string"):
        attributions(scm, [PROMPT, PROMPT], [observed], {"mechanism": "m"})
    with pytest.raises(InferenceError, match="batch_size"):
        attributions(scm, [PROMPT], [observed], {"mechanism": "m"}, batch_size=0)
    with pytest.raises(InferenceError, match="selects no mechanism"):
        attributions(scm, [PROMPT], [observed], {})
    assert attributions(scm, [], [], {"mechanism": "m"}) == []


def _steered(lm):
    steer = Combined([ActivationSteering(v, layer=i, alpha=0.1) for i, v in enumerate(steering_vectors())])
    return LanguageModelSCM(lm, max_new_tokens=T, mechanisms={"steer": steer})


@pytest.mark.parametrize("tol", ["1e-9", math.nan, -1.0, math.inf, None])
@pytest.mark.parametrize("by", ["layer", "step"])
def test_a_bad_tol_is_refused_naming_it(lm, observed, tol, by):
    """Before: a raw TypeError for a str under by="step" (and nothing under by="layer"), and
    NaN, a negative or None silently taken: NaN and -1 made every step "matter"."""
    from pyro_lmscm.inference import attributions

    scm = _steered(lm)
    with pytest.raises(InferenceError, match="`tol`"):
        attribute(scm, PROMPT, observed, {"mechanism": "steer"}, by=by, tol=tol)
    with pytest.raises(InferenceError, match="`tol`"):
        attributions(scm, [PROMPT], [observed], {"mechanism": "steer"}, by=by, tol=tol)


def test_tol_zero_is_a_threshold(lm, observed):
    """The baseline of the refusal: 0 is a valid ``tol`` (every nonzero effect matters)."""
    result = attribute(_steered(lm), PROMPT, observed, {"mechanism": "steer"}, by="step", tol=0)
    assert result.first_step_that_matters == 0


@pytest.mark.parametrize("owner", ["attribute", "attributions", "exact_counterfactual"])
def test_an_scm_that_is_no_scm_is_refused(lm, observed, owner):
    """Before: AttributeError: 'HFLanguageModel' object has no attribute 'check_prompt' (the
    language model passed where its SCM goes), from each of the three."""
    from pyro_lmscm.inference import attributions

    call = {
        "attribute": lambda: attribute(lm, PROMPT, observed, {"mechanism": "steer"}),
        "attributions": lambda: attributions(lm, [PROMPT], [observed], {"mechanism": "steer"}),
        "exact_counterfactual": lambda: exact_counterfactual(lm, PROMPT, observed, {"mechanism": "steer"}),
    }[owner]
    with pytest.raises(InferenceError, match=f"{owner}\\(\\): `scm` must be a LanguageModelSCM \\(build one"):
        call()


@pytest.mark.parametrize("name", ["prompts", "observed", "raw_logits"])
@pytest.mark.parametrize("value", [None, 3, "ab"])
def test_attributions_of_no_sequence_are_refused_naming_the_argument(lm, observed, name, value):
    """Before: TypeError ('NoneType' / 'int' object is not iterable), or a str split into letters."""
    from pyro_lmscm.inference import attributions

    arguments = {"prompts": [PROMPT], "observed": [observed], "raw_logits": None, name: value}
    if name == "raw_logits" and value is None:
        return  # (None: computed)
    with pytest.raises(InferenceError, match=f"`{name}` must be a sequence"):
        attributions(_steered(lm), arguments["prompts"], arguments["observed"], {"mechanism": "steer"},
                     raw_logits=arguments["raw_logits"])


def test_raw_logits_of_a_batch_are_refused_for_one_string(lm, observed):
    """``raw_logits`` ``(1, n, V)`` passed the guide's ``(..., n, V)`` check and then failed as an
    IndexError inside the exact counterfactual; now an ObservationError naming it, for
    attribute() and exact_counterfactual() alike. ``(n, V)`` gives the values of no raw_logits."""
    from pyro_lmscm.errors import ObservationError

    scm = _steered(lm)
    raw = lm.logits(torch.cat([PROMPT, observed[:-1]]), logits_to_keep=T)
    with pytest.raises(ObservationError, match="`raw_logits` must have shape \\(n, V\\)"):
        attribute(scm, PROMPT, observed, {"mechanism": "steer"}, raw_logits=raw[None])
    with pytest.raises(ObservationError, match="`raw_logits` must have shape \\(n, V\\)"):
        exact_counterfactual(scm, PROMPT, observed, {"mechanism": "steer"}, raw_logits=raw[None])
    given = attribute(scm, PROMPT, observed, {"mechanism": "steer"}, raw_logits=raw)
    assert abs(given.prob_unchanged - attribute(scm, PROMPT, observed, {"mechanism": "steer"}).prob_unchanged) < TOL
