"""pyro_lmscm.atomic: the windows an interrupt used to find, and threads sharing one model.

Interrupts: each test below reproduces one window of issue 35 (a SIGINT held back and
re-raised before the ``try`` that removes a fresh hook; Pyro's plate ``__draws`` left
allocated by an interrupt inside its ``__enter__``; the library's SIGINT handler left
installed; autograd left off). The random-point harness is in
``tests/interventions/test_restore.py``.

Threads: 2-4 threads run ``counterfactual()`` (a ``WeightDelta`` and a steering mechanism,
with the exact scores) and ``exact_counterfactual()`` on one tiny model, and every result is
compared with the single-threaded result of the same seed; the weights must be intact after.
The baseline: the same threads with the compute lock switched off give wrong results or
corrupted weights.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest
import torch
from pyro.poutine import runtime

from pyro_lmscm import LanguageModelSCM, atomic, counterfactual
from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.interventions import ActivationSteering, WeightDelta
from pyro_lmscm.testing import hooks, tiny_llama

PROMPT = torch.tensor([2, 3, 4])


def _clean(lm, weights) -> bool:
    state = lm.model.state_dict()
    return (
        all(torch.equal(state[k], v) for k, v in weights.items())
        and not any(any(h) for h in hooks(lm.model).values())
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        and torch.is_grad_enabled()
        and runtime._PYRO_STACK == []
        and not any(runtime._DIM_ALLOCATOR._stack)
        and not atomic.COMPUTE_LOCK._lock._is_owned()
        and not atomic._pending()
    )


def _scm(lm) -> LanguageModelSCM:
    torch.manual_seed(0)
    names = ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    edit = WeightDelta({n: torch.randn_like(lm.model.get_parameter(n)) for n in names})
    steer = ActivationSteering(torch.randn(32), layer=1, alpha=4.0)
    return LanguageModelSCM(lm, max_new_tokens=3, mechanisms={"edit": edit, "steer": steer})


def test_a_sigint_during_hook_registration_leaves_no_hook(monkeypatch):
    """The SIGINT that arrives while a steering hook is registered is raised once the hook is
    on: the removal must already be due (it was not: the hook stayed on the factual model)."""
    lm = tiny_llama(seed=0)
    layer = lm.model.model.layers[1]
    register = type(layer).register_forward_hook

    def register_then_sigint(self, *args, **kwargs):
        handle = register(self, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # held until registration is over
        return handle

    monkeypatch.setattr(type(layer), "register_forward_hook", register_then_sigint)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        with ActivationSteering(torch.ones(32), layer=1).activate(lm) as f:
            f.logits(PROMPT[None])
    monkeypatch.undo()
    assert _clean(lm, weights)


def test_an_interrupt_inside_the_plates_enter_leaves_no_plate(monkeypatch):
    """KeyboardInterrupt right after Pyro allocated the dimension of ``__draws`` (inside its
    ``__enter__``, so no ``__exit__`` is due): the next call used to raise ``duplicate plate
    '__draws'``; now it equals a clean run."""
    lm = tiny_llama(seed=0)
    scm = _scm(lm)
    clean = counterfactual(scm, PROMPT, None, {"mechanism": "edit"}, num_samples=2, seed=1).counterfactual_ids
    allocate = runtime._DimAllocator.allocate

    def allocate_then_interrupt(self, name, dim):
        allocated = allocate(self, name, dim)
        if name == "__draws":
            raise KeyboardInterrupt
        return allocated

    monkeypatch.setattr(runtime._DimAllocator, "allocate", allocate_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        counterfactual(scm, PROMPT, None, {"mechanism": "edit"}, num_samples=2, seed=1)
    monkeypatch.undo()
    assert not any(runtime._DIM_ALLOCATOR._stack) and runtime._PYRO_STACK == []
    again = counterfactual(scm, PROMPT, None, {"mechanism": "edit"}, num_samples=2, seed=1).counterfactual_ids
    assert torch.equal(again, clean)


def test_a_sigint_before_exit_stack_records_the_exit_is_unwound_by_the_scope(monkeypatch):
    """A SIGINT raised at the start of ``ExitStack._push_cm_exit`` (a frame's start is where
    Python checks for one) after ``enter_context`` entered a steering hook: the context is on
    and no exit is due. The compute scope around it (here ``with COMPUTE_LOCK``, as in every
    ``counterfactual()``) closes the level it left open on exit: the hook is removed, the lock
    released, Pyro's stack empty (before, the level leaked: the lock stayed held, the scope's
    clean-up never ran, and the hook stayed on). A late exit of the lost level does nothing."""
    import contextlib

    lm = tiny_llama(seed=0)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    push = contextlib.ExitStack._push_cm_exit

    def sigint_at_push(self, *args):
        signal.raise_signal(signal.SIGINT)  # delivered here, in contextlib's frame
        return push(self, *args)

    monkeypatch.setattr(contextlib.ExitStack, "_push_cm_exit", sigint_at_push)
    context = ActivationSteering(torch.ones(32), layer=1).activate(lm)
    with pytest.raises(KeyboardInterrupt):
        with atomic.COMPUTE_LOCK, contextlib.ExitStack() as stack:
            stack.enter_context(context)
    monkeypatch.undo()
    assert _clean(lm, weights) and atomic._scope().depth == 0
    context.__exit__(None, None, None)  # e.g. a finaliser, late: a stale level
    assert _clean(lm, weights) and atomic._scope().depth == 0
    with atomic.COMPUTE_LOCK:
        assert atomic._scope().depth == 1


def test_a_generator_finalised_after_its_scope_ended_changes_nothing():
    """A generator suspended inside a mechanism's activation (a Ctrl-C between its ``yield``
    and its caller's ``with``) is closed after the scope around it ended, while another scope
    is open: its late exit must neither restore nor release anything of the new scope (it
    used to decrement the new scope's depth and release its lock)."""
    lm = tiny_llama(seed=0)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    steering = ActivationSteering(torch.ones(32), layer=1)

    def suspended():
        with steering.activate(lm):
            yield

    with atomic.COMPUTE_LOCK:
        generator = suspended()
        next(generator)
    assert _clean(lm, weights)
    edit = WeightDelta({"lm_head.weight": torch.ones_like(lm.model.get_parameter("lm_head.weight"))})
    with edit.activate(lm):
        generator.close()  # the late exit, inside another scope
        assert atomic._scope().depth == 1 and atomic.COMPUTE_LOCK._lock._is_owned()
        assert not torch.equal(lm.model.get_parameter("lm_head.weight"), weights["lm_head.weight"])
    assert _clean(lm, weights) and atomic._scope().depth == 0


def test_compute_scope_and_heap_allocations_are_no_generators():
    """Both are entered and left atomically (a generator would be left suspended, its scope
    open, by a Ctrl-C on the return of ``next``)."""
    import inspect

    from pyro_lmscm.runtime import compute_scope, heap_allocations

    lm = tiny_llama(seed=0)
    scope = compute_scope(lm)
    assert isinstance(scope, atomic.reversible) and isinstance(heap_allocations(), atomic.reversible)
    assert not inspect.isgenerator(getattr(scope, "gen", None))
    with scope:
        assert atomic._scope().depth >= 1
    assert atomic._scope().depth == 0 and not atomic.COMPUTE_LOCK._lock._is_owned()


def test_a_held_sigint_is_delivered_once_and_the_handler_put_back():
    """A SIGINT inside a reversible change's activation is delivered when the activation is
    over (after the change is undone), and the process's handler is Python's again: a later
    Ctrl-C interrupts (it did nothing while the library's handler was left installed)."""
    lm = tiny_llama(seed=0)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    name = "model.layers.0.mlp.down_proj.weight"

    def apply():
        lm.model.get_parameter(name).data.add_(1.0)
        signal.raise_signal(signal.SIGINT)

    saved = lm.model.get_parameter(name).detach().clone()
    with pytest.raises(KeyboardInterrupt):
        with atomic.reversible(apply, lambda: lm.model.get_parameter(name).data.copy_(saved)):
            pytest.fail("the block ran although the SIGINT came during activation")
    assert _clean(lm, weights)
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_grad_mode_is_restored_after_an_interrupt_inside_no_grad(monkeypatch):
    """KeyboardInterrupt inside ``torch.no_grad().__enter__`` after gradients were switched
    off (no ``__exit__`` is due): the compute scope of ``counterfactual()`` switches them on."""
    lm = tiny_llama(seed=0)
    scm = _scm(lm)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    enter = torch.no_grad.__enter__
    calls = [0]

    def enter_then_interrupt(self):
        enter(self)
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch.no_grad, "__enter__", enter_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        counterfactual(scm, PROMPT, None, {"mechanism": "steer"}, num_samples=2, seed=1)
    monkeypatch.undo()
    assert _clean(lm, weights)


# --- threads -------------------------------------------------------------------------------

QUERIES = [("edit", seed) for seed in range(4)] + [("steer", seed) for seed in range(4)]


def _query(scm, mechanism: str, seed: int) -> tuple[Any, ...]:
    """A counterfactual (with its exact scores) and an exact query of its factual string."""
    result = counterfactual(scm, PROMPT, None, {"mechanism": mechanism}, num_samples=2, seed=seed, scores=True)
    exact = exact_counterfactual(scm, PROMPT, result.factual_ids, {"mechanism": mechanism})
    return (
        result.factual_ids.tolist(),
        result.counterfactual_ids.tolist(),
        result.counterfactual_log_q.tolist(),
        exact.prob_unchanged(),
        exact.first_divergence().tolist(),
    )


def run_threads(threads: int, iterations: int, lock: bool = True) -> dict[str, Any]:
    """``threads`` threads x ``iterations`` queries on one model; counts of wrong results
    (against the single-threaded ones), errors by type and corrupted weights."""
    lm = tiny_llama(seed=0)
    scm = _scm(lm)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    expected = {query: _query(scm, *query) for query in QUERIES}
    wrong, errors = [0], {}
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        for i in range(iterations):
            query = QUERIES[(index * 3 + i) % len(QUERIES)]
            try:
                if _query(scm, *query) != expected[query]:
                    wrong[0] += 1
            except Exception as error:  # noqa: BLE001 - counted: only typed refusals may appear
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1

    saved = atomic.COMPUTE_LOCK._lock
    if not lock:  # the baseline: nothing serialises the threads
        atomic.COMPUTE_LOCK._lock = _NoLock()
    try:
        pool = [threading.Thread(target=work, args=(i,), name=f"worker-{i}") for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        atomic.COMPUTE_LOCK._lock = saved
    state = lm.model.state_dict()
    corrupted = sum(not torch.equal(state[k], v) for k, v in weights.items())
    return {"threads": threads, "iterations": iterations, "wrong": wrong[0], "errors": errors,
            "corrupted_weights": corrupted, "hooks_left": sum(bool(h[0]) for h in hooks(lm.model).values())}


class _NoLock:
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass

    def _is_owned(self) -> bool:
        return False


def test_two_threads_on_one_model_give_the_single_threaded_results():
    report = run_threads(2, 8)
    print(report)
    assert report == {"threads": 2, "iterations": 8, "wrong": 0, "errors": {}, "corrupted_weights": 0,
                      "hooks_left": 0}


@pytest.mark.slow
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_threads_x_200_iterations_on_one_model(threads):
    report = run_threads(threads, 200)
    print(report)
    assert report["wrong"] == 0 and report["errors"] == {} and report["corrupted_weights"] == 0, report


@pytest.mark.slow
def test_without_the_lock_threads_are_wrong():
    """Baseline: the same threads with the compute lock switched off."""
    report = run_threads(3, 30, lock=False)
    print(report)
    assert report["wrong"] + sum(report["errors"].values()) + report["corrupted_weights"] > 0, report


def test_two_explorer_sessions_at_once_leave_no_rome_edit():
    """Two threads run one Explorer with a ROME edit at once: each gets the single-threaded
    exploration and the weights are intact after (the probe found the edit left in them)."""
    from pyro_lmscm.explorer.session import Explorer, ExploreRequest

    lm = tiny_llama(seed=0)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    explorer = Explorer(lm)
    rome = {"rome": {"subject": "she", "prompt": "she walked to the doctor", "target": "home", "layer": 1}}
    requests = [ExploreRequest("she walked to", None, intervention=rome, num_samples=4, max_new_tokens=4,
                               seed=seed, num_beams=2) for seed in range(2)]
    expected = [explorer.run(request) for request in requests]
    results: dict[int, Any] = {}

    def work(i: int) -> None:
        results[i] = [explorer.run(requests[(i + k) % 2]) for k in range(3)]

    pool = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for i in range(2):
        assert results[i] == [expected[(i + k) % 2] for k in range(3)]
    assert _clean(lm, weights)
