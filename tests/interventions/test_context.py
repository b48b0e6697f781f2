"""ContextMechanism and HookMechanism: any context manager (or bare forward hook) as a mechanism.

The oracle is a ModelSwap to a deep copy of the model with the same hook left on for good:
the context must give the same exact P(unchanged) and the same sampled counterfactuals, and
the model must be bit-identical afterwards. A context that leaves the model changed is
refused and, where it can be, put back.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import MechanismError
from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.interventions import ContextMechanism, HookMechanism, ModelSwap, steering_vector_mechanism
from pyro_lmscm.lm import HFLanguageModel
from pyro_lmscm.testing import assert_restored, assert_rows_match_separate_runs, snapshot, tiny_llama

PROMPT = torch.tensor([2, 3, 4])
OBSERVED = torch.tensor([5, 9, 14, 7, 3, 11])
SHIFT = torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _add_shift(module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    shifted = hidden + 0.8 * SHIFT.to(hidden.dtype)
    return (shifted, *output[1:]) if isinstance(output, tuple) else shifted


@contextlib.contextmanager
def _shifted(model):
    handle = model.model.layers[1].register_forward_hook(_add_shift)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def lm64():
    return tiny_llama(seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def swapped(lm64):
    """The oracle: a copy of the model with the hook left on for good."""
    other = copy.deepcopy(lm64.model)
    other.model.layers[1].register_forward_hook(_add_shift)
    return ModelSwap(HFLanguageModel(other, lm64.tokenizer))


@pytest.mark.parametrize("kind", ["context", "hook"])
def test_equals_a_model_swap_to_a_hooked_copy(lm64, swapped, kind):
    """Exact P(unchanged), first-divergence law and sampled counterfactuals agree with the
    hooked copy to 1e-9 (float64 tiny model), and the model is bit-identical afterwards."""
    state = snapshot(lm64.model)
    mechanism = ContextMechanism(_shifted) if kind == "context" else HookMechanism({"model.layers.1": _add_shift})
    scm = LanguageModelSCM(lm64, max_new_tokens=6, mechanisms={"mine": mechanism, "swap": swapped})
    mine = exact_counterfactual(scm, PROMPT, OBSERVED, {"mechanism": "mine"})
    oracle = exact_counterfactual(scm, PROMPT, OBSERVED, {"mechanism": "swap"})
    assert 0.0 < oracle.prob_unchanged() < 0.999  # the shift matters
    assert abs(mine.prob_unchanged() - oracle.prob_unchanged()) < 1e-9
    torch.testing.assert_close(mine.first_divergence(), oracle.first_divergence(), atol=1e-9, rtol=0)
    a = counterfactual(scm, PROMPT, OBSERVED, {"mechanism": "mine"}, num_samples=16, seed=0)
    b = counterfactual(scm, PROMPT, OBSERVED, {"mechanism": "swap"}, num_samples=16, seed=0)
    assert torch.equal(a.counterfactual_ids, b.counterfactual_ids)
    assert not bool((a.counterfactual_ids == OBSERVED).all(-1).all())  # some draws changed
    assert_restored(lm64.model, state)


def test_runs_only_around_its_own_rows(lm):
    """A batch mixing the factual model and the context gives, per row, the separate runs."""
    scm = LanguageModelSCM(lm, max_new_tokens=5, mechanisms={"mine": ContextMechanism(_shifted)})
    state = snapshot(lm.model)
    assert_rows_match_separate_runs(scm, PROMPT, [0, 1, 1, 0, 1])
    assert_restored(lm.model, state)


def test_hook_mechanism_equals_the_context(lm):
    ids = torch.cat([PROMPT, OBSERVED])
    with ContextMechanism(_shifted).activate(lm) as f:
        context = f.logits(ids)
    with HookMechanism({"model.layers.1": [_add_shift]}).activate(lm) as f:
        hooked = f.logits(ids)
    assert torch.equal(context, hooked) and not torch.equal(context, lm.logits(ids))


def test_bad_arguments_are_typed(lm):
    with pytest.raises(MechanismError, match="factory"):
        ContextMechanism("not callable")  # type: ignore[arg-type]
    with pytest.raises(MechanismError, match="not a context manager"):
        ContextMechanism(lambda model: 3).check(lm)
    # a class, not an instance (it has __enter__ and __exit__, unbound): was a bare TypeError
    with pytest.raises(MechanismError, match="the class nullcontext, not a context manager"):
        ContextMechanism(lambda model: contextlib.nullcontext).check(lm)
    before = snapshot(lm.model)
    with ContextMechanism(lambda model: contextlib.nullcontext()).activate(lm) as f:  # the baseline: an instance
        assert torch.equal(f.logits(PROMPT), lm.logits(PROMPT))
    assert_restored(lm.model, before)
    with pytest.raises(MechanismError, match="non-empty mapping"):
        HookMechanism({})
    with pytest.raises(MechanismError, match="must be callable"):
        HookMechanism({"model.layers.1": 3})  # type: ignore[dict-item]
    with pytest.raises(MechanismError, match="no module 'model.layers.7'.*'model.layers.1'"):
        HookMechanism({"model.layers.7": _add_shift}).check(lm)
    with pytest.raises(MechanismError, match="no module 'nope'"):
        with HookMechanism({"nope": _add_shift}).activate(lm):
            pass


# ------------------------------------------------------------------ contexts that leave the model changed


@contextlib.contextmanager
def _leaves_hook(model):
    model.model.layers[0].register_forward_hook(_add_shift)
    yield


@contextlib.contextmanager
def _leaves_data(model):
    weight = model.model.layers[0].mlp.down_proj.weight
    weight.data = weight.data + 1.0
    yield


@contextlib.contextmanager
def _leaves_flag(model):
    model.lm_head.weight.requires_grad_(False)
    model.train()
    yield


@contextlib.contextmanager
def _leaves_child(model):
    model.model.layers[0].mlp = torch.nn.Identity()
    yield


@pytest.mark.parametrize(
    "factory, match",
    [
        (_leaves_hook, r"model.layers.0._forward_hooks: 1 hook\(s\) left registered"),
        (_leaves_data, r"down_proj.weight.data was reassigned \(put back\)"),
        (_leaves_flag, r"lm_head.weight.requires_grad was changed.*training was changed"),
        (_leaves_child, r"model.layers.0._modules: children added, removed or replaced \(put back\)"),
    ],
    ids=["hook", "data", "flags", "child"],
)
@pytest.mark.parametrize("where", ["check", "activate"])
def test_a_context_that_leaves_the_model_changed_is_refused_and_put_back(factory, match, where):
    lm = tiny_llama(seed=0)
    state = snapshot(lm.model)
    flags = [p.requires_grad for p in lm.model.parameters()], [m.training for m in lm.model.modules()]
    mechanism = ContextMechanism(factory)
    with pytest.raises(MechanismError, match=match):
        if where == "check":
            mechanism.check(lm)
        else:
            with mechanism.activate(lm) as f:
                f.logits(PROMPT)
    assert_restored(lm.model, state)
    assert flags == ([p.requires_grad for p in lm.model.parameters()], [m.training for m in lm.model.modules()])


def _edit_in_place(weight, undo, exit_error=None):
    """A context factory that adds 0.5 to ``weight`` in place, puts it back on exit while
    ``undo[0]``, then raises ``RuntimeError(exit_error)`` if given."""

    @contextlib.contextmanager
    def edit(model):
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.5)
        yield
        if undo[0]:
            with torch.no_grad():
                weight.copy_(saved)
        if exit_error is not None:
            raise RuntimeError(exit_error)

    return edit


def test_an_in_place_edit_not_undone_is_refused():
    """Caught bit for bit at the check (by digest: nothing to put it back from), then, once
    the tensor is known to be edited in place, from a copy taken before each entry, and put
    back."""
    lm = tiny_llama(seed=0)
    name = "model.layers.1.self_attn.q_proj.weight"
    state = snapshot(lm.model)
    undo = [True]
    edit = _edit_in_place(lm.model.get_parameter(name), undo)
    mechanism = ContextMechanism(edit)
    mechanism.check(lm)  # a proper undo passes, and marks the tensor as edited in place
    with mechanism.activate(lm) as f:
        f.logits(PROMPT)
    assert_restored(lm.model, state)
    undo[0] = False
    with pytest.raises(MechanismError, match=f"{name} was edited in place and not restored \\(put back\\)"):
        with mechanism.activate(lm) as f:
            f.logits(PROMPT)
    assert_restored(lm.model, state)
    # a fresh mechanism has no copy: the check finds the change by digest and says it is not put back
    with pytest.raises(MechanismError, match="NOT put back"):
        ContextMechanism(edit).check(lm)
    lm.model.load_state_dict(state[0])


def test_a_write_through_data_is_caught_at_the_check():
    """``tensor.data.add_`` moves no version counter: the check's digest of every tensor sees it."""
    lm = tiny_llama(seed=0)
    state = snapshot(lm.model)

    @contextlib.contextmanager
    def sneaky(model):
        model.lm_head.weight.data.mul_(2.0)
        yield

    with pytest.raises(MechanismError, match="lm_head.weight was edited in place"):
        ContextMechanism(sneaky).check(lm)
    lm.model.load_state_dict(state[0])


def test_an_exception_inside_is_raised_and_the_model_restored(lm):
    state = snapshot(lm.model)
    exits = []

    @contextlib.contextmanager
    def hooked(model):
        handle = model.model.layers[1].register_forward_hook(_add_shift)
        try:
            yield
        except RuntimeError as error:
            exits.append(str(error))
            raise
        finally:
            handle.remove()

    with pytest.raises(RuntimeError, match="boom"):
        with ContextMechanism(hooked).activate(lm) as f:
            f.logits(PROMPT)
            assert lm.model.model.layers[1]._forward_hooks
            raise RuntimeError("boom")
    assert exits == ["boom"]  # the context saw the exception
    assert_restored(lm.model, state)


@pytest.mark.parametrize("checked", [False, True], ids=["first-activation", "after-check"])
def test_an_exit_that_raises_before_undoing_its_edit_is_still_compared(checked):
    """A context whose own ``__exit__`` raises before it restores the weight it edited in
    place: the edit is found and named (a MechanismError chained from the exit's error), and
    put back where a copy exists; it is not taken as the model's new state. The baseline: an
    exit that raises after a full undo gives the context's own error, the model intact."""
    lm = tiny_llama(seed=0)
    name = "model.layers.1.self_attn.q_proj.weight"
    state = snapshot(lm.model)
    undo = [True]
    edit = _edit_in_place(lm.model.get_parameter(name), undo, exit_error="exit failed")
    with pytest.raises(RuntimeError, match="exit failed"):  # the baseline: undone, then raises
        with ContextMechanism(edit).activate(lm) as f:
            f.logits(PROMPT)
    assert_restored(lm.model, state)
    mechanism = ContextMechanism(edit)
    if checked:  # marks the tensor as edited in place: copied before each entry
        with pytest.raises(RuntimeError, match="exit failed"):
            mechanism.check(lm)
    undo[0] = False
    found = f"RuntimeError: exit failed.*{name} was edited in place and not restored "
    with pytest.raises(MechanismError, match=found + (r"\(put back\)" if checked else r"\(NOT put back")) as caught:
        with mechanism.activate(lm) as f:
            f.logits(PROMPT)
    assert isinstance(caught.value.__cause__, RuntimeError)
    if not checked:  # nothing to put it back from; once reloaded, the next entry is guarded by a copy
        lm.model.load_state_dict(state[0])
        with pytest.raises(MechanismError, match=found + r"\(put back\)"):
            with mechanism.activate(lm) as f:
                f.logits(PROMPT)
    assert_restored(lm.model, state)


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x captures hidden states by replacing the layers' `forward` for good, which "
    "ContextMechanism reports as the context's change (a known false refusal there; issue 38)",
)
def test_transformers_capture_hooks_are_not_the_context(lm):
    """transformers installs output-capturing hooks once, at the first call that asks for
    hidden states; if that call runs inside the context they are kept and not refused."""
    fresh = tiny_llama(seed=0)

    @contextlib.contextmanager
    def reads_hidden_states(model):
        model(input_ids=PROMPT[None], output_hidden_states=True)
        yield

    ContextMechanism(reads_hidden_states).check(fresh)  # no error
    with ContextMechanism(reads_hidden_states).activate(fresh) as f:
        f.logits(PROMPT)


# ------------------------------------------------------------------ steering-vectors


class _FakeSteeringVector:
    """What steering_vector_mechanism reads of a steering_vectors.SteeringVector."""

    layer_activations = {1: SHIFT.float()}

    def apply(self, model, multiplier=1.0, **kwargs):
        return contextlib.nullcontext()


@pytest.mark.parametrize(
    "positions",
    [{"token_indices": torch.tensor([0, 1])}, {"token_indices": [0]}, {"token_indices": torch.tensor([0])},
     {"token_indices": slice(0, None)}, {"min_token_index": 3}, {"min_token_index": torch.tensor([1, 2])},
     {"min_token_index": "0"}],
    ids=["tensor", "list", "one-element-tensor", "slice", "min-3", "min-tensor", "min-str"],
)
def test_steering_vector_positions_are_refused_by_type_too(positions):
    """steering-vectors takes token_indices as a list, slice or tensor; any of them (and a first
    index other than 0) is a MechanismError, not the bare RuntimeError that a tensor of several
    indices raised when asked for its truth value. The baseline: every position (None, or a
    first index of 0, also as a 0-d tensor) is accepted."""
    with pytest.raises(MechanismError, match="count positions within one forward call"):
        steering_vector_mechanism(_FakeSteeringVector(), **positions)
    for every in ({}, {"min_token_index": 0}, {"min_token_index": torch.tensor(0)}, {"token_indices": None}):
        assert isinstance(steering_vector_mechanism(_FakeSteeringVector(), **every), ContextMechanism)


def test_a_steering_vector_equals_activation_steering(lm):
    """steering_vector_mechanism(SteeringVector) adds multiplier * v at the layer, as
    ActivationSteering does with the same vector: same logits, same exact P(unchanged)."""
    steering_vectors = pytest.importorskip("steering_vectors")
    from pyro_lmscm.interventions import ActivationSteering, steering_vector_mechanism

    vector = steering_vectors.SteeringVector({1: SHIFT.float()})
    ids = torch.cat([PROMPT, OBSERVED])
    state = snapshot(lm.model)
    theirs = steering_vector_mechanism(vector, multiplier=0.8)
    ours = ActivationSteering(SHIFT, layer=1, alpha=0.8)
    with theirs.activate(lm) as f:
        a = f.logits(ids)
    with ours.activate(lm) as f:
        b = f.logits(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, lm.logits(ids), atol=1e-3)
    scm = LanguageModelSCM(lm, max_new_tokens=6, mechanisms={"theirs": theirs, "ours": ours})
    p_theirs = exact_counterfactual(scm, PROMPT, OBSERVED, {"mechanism": "theirs"}).prob_unchanged()
    p_ours = exact_counterfactual(scm, PROMPT, OBSERVED, {"mechanism": "ours"}).prob_unchanged()
    assert abs(p_theirs - p_ours) < 1e-4 and p_ours < 0.999
    assert_restored(lm.model, state)
    with pytest.raises(MechanismError, match="min_token_index"):
        steering_vector_mechanism(vector, min_token_index=3)
    with pytest.raises(MechanismError, match="SteeringVector"):
        steering_vector_mechanism(SHIFT)


def test_train_steering_vector_is_the_difference_of_means(lm):
    """steering-vectors' mean of pairwise differences at the last token equals the
    hand-written difference of means (ActivationSteering.from_contrastive) on the same
    prompts and layer; the baseline, another layer's vector, does not."""
    steering_vectors = pytest.importorskip("steering_vectors")
    from pyro_lmscm.interventions import ActivationSteering

    female = ["the woman said she", "her nurse smiled", "the old woman walked home"]
    male = ["the man said he", "his doctor smiled", "the old man walked home"]
    trained = steering_vectors.train_steering_vector(lm.model, lm.tokenizer, list(zip(female, male)), layers=[0, 1])
    for layer in (0, 1):
        ours = ActivationSteering.from_contrastive(lm, female, male, layer=layer).vector.double()
        theirs = trained.layer_activations[layer].double()
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    other = ActivationSteering.from_contrastive(lm, female, male, layer=0).vector.double()
    assert not torch.allclose(trained.layer_activations[1].double(), other, atol=1e-3)
