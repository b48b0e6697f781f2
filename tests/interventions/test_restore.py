"""An interrupt cannot leave the model edited: KeyboardInterrupt at every line of every restore path.

Every mechanism that changes the HF module (weight deltas, ROME, LoRA flags, steering and
ROME's forward hooks) undoes its change through ``restore_atomically``, and so does the
``bf16_linears_in_float32`` scope (the ``forward`` it sets on each linear). The harness below
runs each scenario once to list the line events inside those restore steps (our code, and
torch's and peft's Python code they call), then reruns it once per event (at most
:data:`MAX_RESTORE_POINTS`, evenly spaced) with a ``sys.settrace`` tracer that raises
``KeyboardInterrupt`` exactly there. After each run the
parameters, buffers and ``requires_grad`` flags must be bit-identical, no hook may be left,
every peft layer must be as it was, torch's grad mode must be the caller's, and the
interrupt must still reach the caller.

The baseline: the same harness on the restore loop of before (one ``copy_`` per parameter in
a plain loop) finds corrupted states.

The second harness (below) interrupts at random *bytecodes* of activation, restore and whole
``counterfactual()`` calls, and with real SIGINTs; its slow test drives 5,500 points.
"""

from __future__ import annotations

import contextlib
import dis
import gc
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import pytest
import torch

from pyro_lmscm import atomic
from pyro_lmscm.interventions import (
    ActivationSteering,
    AffineSteering,
    Combined,
    ContextMechanism,
    HookMechanism,
    LoRAAdapter,
    WeightDelta,
    rome_edit,
)
from pyro_lmscm.runtime import bf16_linears_in_float32
from pyro_lmscm.testing import TINY_WORDS, hooks, snapshot, tiny_llama

IDS = torch.tensor([[2, 3, 4, 5, 6]])
WRAPPER = atomic.restore_atomically.__code__
KERNEL = vars(atomic)


@contextlib.contextmanager
def _collected_first() -> Any:
    """Collect the garbage of earlier runs, then keep the collector off for the traced run.

    An interrupted run can leave a user's context-manager generator suspended in a reference
    cycle (the interrupt landed before its ``__exit__`` resumed it; the restore put the model
    back all the same). Were that cycle collected in a later run, the generator's finaliser
    would run its ``finally`` under the tracer, and an interrupt injected there is swallowed by
    CPython ("Exception ignored in: <generator ...>"): the point would be spent where neither
    the scenario nor the library could see it, at a time that depends on the allocator.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _frozen_heap() -> Any:
    """Move every object alive now to the collector's permanent generation (``gc.freeze``)
    for a harness's many runs: each run's :func:`_collected_first` then scans only the objects
    made since (about 0.04 ms, against 180 ms over the 420,000 objects of torch, transformers
    and peft)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _gc_callback(frame: Any) -> bool:
    """Whether ``frame`` is a garbage-collector callback's (e.g. hypothesis's timing callback,
    registered once a hypothesis test ran in this process): gc may call it between any two
    opcodes, and an exception raised in it is "ignored" by CPython, not raised."""
    return any(
        callback.__code__ is frame.f_code for callback in gc.callbacks if hasattr(callback, "__code__")
    )


def _run_traced(scenario: Callable[[], Any], wrapper: Any, inject_at: int | None, collect: bool = True) -> int:
    """Run ``scenario`` counting the line events under ``wrapper`` (in the frames it calls,
    not in its own); raise KeyboardInterrupt at event number ``inject_at``. Returns the number
    of events seen. ``collect=False`` leaves the garbage collector as it is (the baseline of
    :func:`test_a_collection_inside_a_restore_spends_no_point`)."""
    seen = 0
    inside = 0  # calls of `wrapper` running now: entered at its call event, left at its return

    def local(frame, event, arg):
        nonlocal seen
        if event == "line":
            if seen == inject_at:
                seen += 1
                raise KeyboardInterrupt(f"injected at {frame.f_code.co_filename}:{frame.f_lineno}")
            seen += 1
        return local

    def leave(frame, event, arg):  # the wrapper's own frame: only its return counts
        nonlocal inside
        if event == "return":
            inside -= 1
        return leave

    def tracer(frame, event, arg):
        nonlocal inside
        if frame.f_code is wrapper:
            inside += 1
            return leave
        # the frames of pyro_lmscm.atomic are the primitive (as C code is): not interrupted here;
        # nor is a gc callback's frame (CPython swallows an exception raised there, so neither the
        # scenario nor the library could see it)
        return local if inside and frame.f_globals is not KERNEL and not _gc_callback(frame) else None

    with _collected_first() if collect else contextlib.nullcontext():
        sys.settrace(tracer)
        try:
            scenario()
        finally:
            sys.settrace(None)
    return seen


def _state(lm) -> tuple[Any, list[bool], list[Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = [p.requires_grad for p in lm.model.parameters()]
    layers = [
        (m.disable_adapters, list(m.active_adapters)) for m in lm.model.modules() if isinstance(m, BaseTunerLayer)
    ]
    layers.append([name for name, m in lm.model.named_modules() if "forward" in vars(m)])  # set by a scope
    layers.append(torch.is_grad_enabled())  # thread state: an interrupt inside torch.no_grad's exit left it off
    return snapshot(lm.model), flags, layers


def _equal(a, b) -> bool:
    (state_a, hooks_a), flags_a, layers_a = a
    (state_b, hooks_b), flags_b, layers_b = b
    same = state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    return same and hooks_a == hooks_b and flags_a == flags_b and layers_a == layers_b


#: At most this many restore points per scenario in the fast suite (LoRA's restore runs 1,544
#: lines of peft: every 6th is tried; the slow test draws random points among all of them).
MAX_RESTORE_POINTS = 300


def _harness(lm, scenario: Callable[[], Any], wrapper: Any = WRAPPER, collect: bool = True) -> tuple[int, int]:
    """(restore points tried, corrupted states) for ``scenario``."""
    with _frozen_heap():
        return _harness_runs(lm, scenario, wrapper, collect)


def _harness_runs(lm, scenario: Callable[[], Any], wrapper: Any, collect: bool) -> tuple[int, int]:
    before = _state(lm)
    total = _run_traced(scenario, wrapper, inject_at=None, collect=collect)
    assert _equal(_state(lm), before)
    corrupted = 0
    points = range(0, total, -(-total // MAX_RESTORE_POINTS))
    for k in points:
        with pytest.raises(KeyboardInterrupt, match="injected at"):
            _run_traced(scenario, wrapper, inject_at=k, collect=collect)
        if not _equal(_state(lm), before):
            corrupted += 1
            lm.model.load_state_dict(before[0][0])  # repair, so later points are tried cleanly
    return len(points), corrupted


def _scenarios() -> dict[str, Callable[[], tuple[Any, Callable[[], Any]]]]:
    from peft import LoraConfig

    def weight_delta():
        lm = tiny_llama(seed=0)
        names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
        edit = WeightDelta({n: torch.randn_like(lm.model.get_parameter(n)) for n in names})
        return lm, lambda: _forward(edit, lm)

    def steering():
        lm = tiny_llama(seed=0)
        return lm, lambda: _forward(ActivationSteering(torch.ones(32), layer=1, alpha=0.5), lm)

    def affine():
        lm = tiny_llama(seed=0)
        eye = torch.eye(32, dtype=torch.float64)
        zeros, ones = torch.zeros(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
        mimic = AffineSteering(1, zeros, ones, eye, 2 * eye)
        return lm, lambda: _forward(mimic, lm)

    def lora():
        lm = tiny_llama(seed=0)
        config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        adapter = LoRAAdapter.from_config(lm, config)
        return lm, lambda: _forward(adapter, lm)

    def rome():
        lm = tiny_llama(seed=0)
        texts = [" ".join(TINY_WORDS[i : i + 6]) for i in range(0, 18, 3)]
        return lm, lambda: _forward(
            rome_edit(lm, "she walked to the doctor", "the doctor", "home", layer=1, cov_texts=texts, num_steps=2), lm
        )

    def combined():  # steering at two layers and MiMiC at a third, undone as one
        lm = tiny_llama(seed=0, num_hidden_layers=3)
        eye = torch.eye(32, dtype=torch.float64)
        zeros, ones = torch.zeros(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
        members = [ActivationSteering(torch.ones(32), layer=1, alpha=0.5), ActivationSteering(torch.ones(32), layer=0),
                   AffineSteering(2, zeros, ones, eye, 2 * eye)]
        mechanism = Combined(members)
        return lm, lambda: _forward(mechanism, lm)

    def sub_adapter():  # a LoRA adapter switched on in one of its layers (LoRAAdapter.restricted)
        lm = tiny_llama(seed=0)
        config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        adapter = LoRAAdapter.from_config(lm, config).restricted(["layer 1"])
        return lm, lambda: _forward(adapter, lm)

    def context():
        lm = tiny_llama(seed=0)
        return lm, _user_context(lm)

    def hooks():
        lm = tiny_llama(seed=0)
        hooks = {"model.layers.0": lambda m, a, out: out, "lm_head": lambda m, a, out: out}
        return lm, lambda: _forward(HookMechanism(hooks), lm)

    def float32_gemms():  # not a mechanism, but a scope that sets `forward` on the model's linears
        lm = tiny_llama(seed=0, dtype=torch.bfloat16)

        def scenario():
            with torch.no_grad(), bf16_linears_in_float32(lm.model, min_rows=1):
                lm.logits(IDS)

        return lm, scenario

    return {"WeightDelta": weight_delta, "ActivationSteering": steering, "AffineSteering": affine,
            "LoRAAdapter": lora, "rome_edit": rome, "bf16_linears_in_float32": float32_gemms,
            "Combined": combined, "LoRAAdapter.restricted": sub_adapter,
            "ContextMechanism": context, "HookMechanism": hooks}


def _user_context(lm, collect: bool = False) -> Callable[[], Any]:
    """A scenario of a user's context: two hooks, removed in its own ``finally``. With
    ``collect``, a garbage collection runs there first, inside the restore window (as the
    allocator may start one at any allocation there)."""

    @contextlib.contextmanager
    def hooked(model):
        handles = [model.model.layers[i].register_forward_hook(lambda m, a, out: out) for i in (0, 1)]
        try:
            yield
        finally:
            if collect:
                gc.collect()
            for handle in handles:
                handle.remove()

    return lambda: _forward(ContextMechanism(hooked), lm)


def _forward(mechanism, lm) -> None:
    with mechanism.activate(lm) as f:
        f.logits(IDS)


TRIED: dict[str, int] = {}


@pytest.mark.parametrize("name", list(_scenarios()))
def test_interrupt_at_every_restore_line_leaves_the_model_intact(name):
    lm, scenario = _scenarios()[name]()
    total, corrupted = _harness(lm, scenario)
    TRIED[name] = total
    print(f"{name}: {total} interrupted restore points tried, {corrupted} corrupted")
    assert total > 0 and corrupted == 0




def test_a_collection_inside_a_restore_spends_no_point():
    """A point interrupted before contextlib resumes the user's generator leaves it suspended in
    a reference cycle; collected during a later point, its ``finally`` ran under the tracer and
    took that point's interrupt, which CPython swallows ("Exception ignored in: <generator>"):
    the harness then failed with DID NOT RAISE, at a time set by the allocator (seen once in CI).
    The harness collects before each run and keeps the collector off during it; the baseline
    (below) fails here every time."""
    lm = tiny_llama(seed=0)
    total, corrupted = _harness(lm, _user_context(lm, collect=True))
    assert total > 0 and corrupted == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_baseline_harness_spends_points_in_a_collection():
    """The harness without its collections, and with no automatic collection between runs
    either (which, depending on the allocation counts of the installed releases, may or may not
    have finalised the suspended generators before the next restore window): the generators
    left by points 11-16 are finalised by the user's ``gc.collect()`` in a later point's
    window, under the tracer, and that point's interrupt is swallowed."""
    lm = tiny_llama(seed=0)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
            _harness(lm, _user_context(lm, collect=True), collect=False)
    finally:
        if enabled:
            gc.enable()


def test_the_harness_finds_the_old_restore_loop_unsafe():
    """Baseline: restoring parameter by parameter in a plain loop (what WeightDelta did) is
    left half done by an interrupt between two iterations."""
    lm = tiny_llama(seed=0)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    parameters = [lm.model.get_parameter(n) for n in names]

    def run_once(step):  # no retry, no deferral
        step()

    def scenario():
        saved = [(p, p.detach().clone()) for p in parameters]
        with torch.no_grad():
            for p in parameters:
                p.add_(1.0)
            try:
                lm.logits(IDS)
            finally:

                def restore():
                    for parameter, original in reversed(saved):
                        parameter.copy_(original)

                run_once(restore)

    total, corrupted = _harness(lm, scenario, wrapper=run_once.__code__)
    assert total >= 3 and corrupted >= 2  # interrupted after the first and after the second copy


# --- KeyboardInterrupt at random bytecodes of activation, restore and counterfactual() ------
#
# The harness below traces every frame with `frame.f_trace_opcodes` and raises
# KeyboardInterrupt at the k-th opcode event, for k drawn at random over the events of a clean
# run: inside a mechanism's activation and restore (hook registration, weight deltas, ROME and
# MEMIT edits, LoRA adapters, steering, MiMiC, the float32-copy scope) and anywhere inside a
# `counterfactual()` call (Pyro's handlers and plates, the SCM, transformers' forward). The
# frames of `pyro_lmscm.atomic` are the primitive (as C code is) and are not interrupted, nor
# is the scenario's own frame (the caller's `with` statement). After
# every point: the weights are bit-identical, no hook is left, the SIGINT handler, torch's grad
# mode, Pyro's handler stack and dim allocator, the compute lock and the journal of pending
# restores are as before, and a following `counterfactual()` equals the clean run.

ORIGINAL_SIGINT = signal.getsignal(signal.SIGINT)


#: Files whose frames are traced opcode by opcode (the code that changes shared state: ours,
#: Pyro's handlers and plates, contextlib, torch's hooks, grad mode and generators, peft's
#: layers); other frames (transformers' and torch's forward code) line by line, which is
#: what makes thousands of points affordable.
OPCODE_FILES = ("pyro_lmscm", "/pyro/", "contextlib", "torch/nn/modules/module.py", "torch/utils/hooks.py",
                "torch/autograd/grad_mode.py", "torch/random.py", "torch/utils/_contextlib.py", "/peft/")


_BEFORE_WITH = dis.opmap.get("BEFORE_WITH", dis.opmap.get("SETUP_WITH", -1))


def _after_enter(frame: Any) -> bool:
    """Whether ``frame`` stands at the opcode just after a ``with`` statement called
    ``__enter__``, before the block's exception handler covers it: CPython checks for signals
    only when a frame starts, on backward jumps and on calls, never there, so a real SIGINT
    cannot land at this point and only a tracer could raise (and the ``with`` would never call
    ``__exit__``)."""
    code, offset = frame.f_code.co_code, frame.f_lasti
    return offset >= 2 and code[offset - 2] == _BEFORE_WITH


def _opcode_run(scenario: Callable[[], Any], inject_at: int | None) -> tuple[int, str | None]:
    """Run ``scenario`` tracing every frame outside pyro_lmscm.atomic (opcode events in
    :data:`OPCODE_FILES`, line events elsewhere); raise KeyboardInterrupt at event
    ``inject_at``. Returns (events seen, where it was raised or None)."""
    seen = 0
    where: list[str] = []

    def local(frame, event, arg):
        nonlocal seen
        if where:
            return None
        if event == "opcode" and _after_enter(frame):
            return local  # no signal can arrive here (see _after_enter)
        if event == "opcode" or (event == "line" and not frame.f_trace_opcodes):
            if seen == inject_at:
                where.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                sys.settrace(None)
                raise KeyboardInterrupt(f"injected at {where[0]}")
            seen += 1
        return local

    def tracer(frame, event, arg):
        # the scenario's own frame is the caller's: CPython checks no signal between a `with`
        # body's last opcode and the call of `__exit__`, so only a tracer could raise there
        if where or frame.f_globals is KERNEL or frame.f_code is scenario.__code__ or _gc_callback(frame):
            return None
        filename = frame.f_code.co_filename
        frame.f_trace_opcodes = any(part in filename for part in OPCODE_FILES)
        return local

    with _collected_first():
        sys.settrace(tracer)
        try:
            scenario()
        finally:
            sys.settrace(None)
    return seen, (where[0] if where else None)


def _clean_state(lm) -> dict[str, Any]:
    """Everything an interrupt could leave behind, as comparable values."""
    from pyro.poutine import runtime

    return {
        "weights": {k: v.clone() for k, v in lm.model.state_dict().items()},
        "hooks": hooks(lm.model),
        "forwards": [name for name, m in lm.model.named_modules() if "forward" in vars(m)],
        "flags": [p.requires_grad for p in lm.model.parameters()],
        "sigint": signal.getsignal(signal.SIGINT),
        "grad": torch.is_grad_enabled(),
        "pyro_stack": list(runtime._PYRO_STACK),
        "dims": [d for d in runtime._DIM_ALLOCATOR._stack if d is not None],
        "lock_owned": atomic.COMPUTE_LOCK._lock._is_owned(),
        "scope_depth": atomic._scope().depth,
        "pending": len(atomic._pending()),
    }


def _differences(lm, before: dict[str, Any]) -> list[str]:
    after = _clean_state(lm)
    bad = [key for key in before if key != "weights" and after[key] != before[key]]
    weights_a, weights_b = after["weights"], before["weights"]
    if weights_a.keys() != weights_b.keys() or not all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a):
        bad.append("weights")
    return bad


def _interrupt_scenarios() -> dict[str, Callable[[], tuple[Any, Callable[[], Any], Callable[[], Any] | None]]]:
    """name -> () -> (lm, scenario, following call whose result must equal a clean run's)."""
    from peft import LoraConfig

    from pyro_lmscm import LanguageModelSCM, counterfactual
    from pyro_lmscm.interventions import ModelSwap, memit_edit

    texts = [" ".join(TINY_WORDS[i : i + 6]) for i in range(0, 18, 3)]
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]

    def mechanism_of(lm, name):
        eye = torch.eye(32, dtype=torch.float64)
        zeros, ones = torch.zeros(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
        factories = {
            "WeightDelta": lambda: WeightDelta({n: torch.randn_like(lm.model.get_parameter(n)) for n in names}),
            "ActivationSteering": lambda: ActivationSteering(torch.ones(32), layer=1, alpha=2.0),
            "AffineSteering": lambda: AffineSteering(1, zeros, ones, eye, 4 * eye),
            "LoRAAdapter": lambda: LoRAAdapter.from_config(
                lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            ),
            "rome_edit": lambda: rome_edit(lm, "she walked to the doctor", "the doctor", "home", layer=1,
                                           cov_texts=texts, num_steps=2),
            "memit_edit": lambda: memit_edit(lm, [("she walked to the doctor", "the doctor", "home")],
                                             layers=[0, 1], cov_texts=texts, num_steps=2),
            "ModelSwap": lambda: ModelSwap(tiny_llama(seed=1)),
        }
        return factories[name]()

    def activation(name):
        def make():
            torch.manual_seed(0)
            lm = tiny_llama(seed=0)
            mechanism = mechanism_of(lm, name)

            def scenario():  # activation and restore only: the forward pass is counterfactual()'s
                with mechanism.activate(lm):
                    pass

            return lm, scenario, None

        return make

    def float32_scope():
        lm = tiny_llama(seed=0, dtype=torch.bfloat16)

        def scenario():  # (no torch.no_grad() of the caller's here: its own exit is not ours to guard)
            with bf16_linears_in_float32(lm.model, min_rows=1):
                lm.logits(IDS[:, :2])

        return lm, scenario, None

    def computing_rome():  # the edit's own computation: hooks on the model while it optimises
        lm = tiny_llama(seed=0)
        return lm, lambda: rome_edit(lm, "she walked", "she", "home", layer=1, cov_texts=texts[:2],
                                     num_steps=1), None

    def counterfactual_of(name):
        def make():
            torch.manual_seed(0)
            lm = tiny_llama(seed=0)
            scm = LanguageModelSCM(lm, max_new_tokens=2, mechanisms={name: mechanism_of(lm, name)})

            def call():
                result = counterfactual(scm, torch.tensor([2, 3]), None, {"mechanism": name}, num_samples=2, seed=7)
                return result.factual_ids.tolist(), result.counterfactual_ids.tolist()

            return lm, call, call

        return make

    scenarios: dict[str, Any] = {f"activate {n}": activation(n) for n in
                                 ["WeightDelta", "ActivationSteering", "AffineSteering", "LoRAAdapter",
                                  "rome_edit", "memit_edit", "ModelSwap"]}
    scenarios["bf16_linears_in_float32"] = float32_scope
    scenarios["computing rome_edit"] = computing_rome
    for n in ["WeightDelta", "ActivationSteering", "AffineSteering", "LoRAAdapter", "rome_edit", "ModelSwap"]:
        scenarios[f"counterfactual {n}"] = counterfactual_of(n)
    return scenarios


def _repair(lm, before: dict[str, Any]) -> None:
    """Put everything back after a corrupted point, so that each point is tried cleanly."""
    from pyro.poutine import runtime

    lm.model.load_state_dict(before["weights"])
    for parameter, flag in zip(lm.model.parameters(), before["flags"]):  # (a point that left them is counted)
        parameter.requires_grad_(flag)
    torch.set_grad_enabled(before["grad"])
    signal.signal(signal.SIGINT, ORIGINAL_SIGINT)
    del runtime._PYRO_STACK[:]
    runtime._DIM_ALLOCATOR._stack.clear()
    while atomic.COMPUTE_LOCK._lock._is_owned():
        atomic.COMPUTE_LOCK._lock.release()
    scope = atomic._scope()
    scope.marks.clear()
    scope.anonymous.clear()
    scope.saved = None
    scope.epoch += 1  # the tokens of the levels dropped here are stale
    atomic._pending().clear()


def _checked(lm, before: dict[str, Any], kinds: dict[str, int]) -> bool:
    """After one interrupt point: whether the state differs from ``before`` (each difference
    counted in ``kinds``, then repaired, so that the next point is tried cleanly)."""
    bad = _differences(lm, before)
    for key in bad:
        kinds[key] = kinds.get(key, 0) + 1
    if bad:
        _repair(lm, before)
    return bool(bad)


def _follow_is_wrong(follow: Callable[[], Any], clean: Any) -> bool:
    """Whether the following call fails or differs from the clean run."""
    try:
        return bool(follow() != clean)
    except Exception:  # noqa: BLE001 - counted
        return True


def random_interrupt_points(name: str, points: int, seed: int = 0, check_every: int = 10) -> dict[str, Any]:
    """Inject ``points`` KeyboardInterrupts at random opcodes of scenario ``name``; returns the
    counts (points, corrupted states and their kinds, failed or wrong following calls)."""
    lm, scenario, follow = _interrupt_scenarios()[name]()
    with _frozen_heap():
        return _random_points(name, lm, scenario, follow, points, seed, check_every)


def _random_points(name: str, lm: Any, scenario: Callable[[], Any], follow: Callable[[], Any] | None,
                   points: int, seed: int, check_every: int) -> dict[str, Any]:
    import random

    clean = follow() if follow is not None else None
    before = _clean_state(lm)
    total, _ = _opcode_run(scenario, None)
    assert not _differences(lm, before), _differences(lm, before)
    rng = random.Random(seed)
    corrupted, kinds, wrong, not_raised, where = 0, {}, 0, 0, []
    for i in range(points):
        k = rng.randrange(total)
        try:
            _, at = _opcode_run(scenario, k)
            not_raised += 1  # caught inside (a library may catch it): the state must still be clean
        except KeyboardInterrupt as error:
            at = str(error)
        if _checked(lm, before, kinds):
            corrupted += 1
            where.append(f"{k}: {at}")
        if follow is not None and (i % check_every == 0 or i == points - 1):
            wrong += _follow_is_wrong(follow, clean)
    return {"scenario": name, "opcodes": total, "points": points, "corrupted": corrupted, "kinds": kinds,
            "where": where, "wrong_following_calls": wrong, "not_raised": not_raised}


@pytest.mark.parametrize("name", list(_interrupt_scenarios()))
def test_random_interrupt_points_leave_no_trace(name):
    """A few random bytecode-level interrupt points per scenario in the fast suite; the
    thousands run in the slow test below."""
    report = random_interrupt_points(name, points=2 if name.startswith("counterfactual") else 5, check_every=2)
    print(report)
    assert report["corrupted"] == 0 and report["wrong_following_calls"] == 0, report


def real_sigint_points(name: str, points: int, seed: int = 0, check_every: int = 10) -> dict[str, Any]:
    """Send ``points`` real SIGINTs (``os.kill`` from a timer thread) at random times within a
    run of scenario ``name``; counts as :func:`random_interrupt_points`.

    The collector is off in each window (:func:`_collected_first`): a SIGINT that lands in a
    collection runs its handler inside a ``gc.callbacks`` entry (hypothesis registers one in
    every process that ran a property test) or a cyclic finaliser, where CPython swallows the
    KeyboardInterrupt ("Exception ignored in: <function gc_callback>"): a signal spent where
    neither the scenario nor the library could see it, at a time set by the allocator."""
    with _frozen_heap():
        return _real_sigint_runs(name, points, seed, check_every)


def _real_sigint_runs(name: str, points: int, seed: int, check_every: int) -> dict[str, Any]:
    import random

    lm, scenario, follow = _interrupt_scenarios()[name]()
    clean = follow() if follow is not None else None
    before = _clean_state(lm)
    start = time.perf_counter()
    scenario()
    duration = time.perf_counter() - start
    rng = random.Random(seed)
    corrupted, kinds, wrong, interrupted = 0, {}, 0, 0
    for i in range(points):
        timer = threading.Timer(rng.uniform(0.0, 1.1 * duration), os.kill, (os.getpid(), signal.SIGINT))
        try:
            with _collected_first():
                timer.start()
                try:
                    scenario()
                finally:
                    timer.join()
                time.sleep(0.005)  # a SIGINT that came after the scenario is handled here
        except KeyboardInterrupt:
            interrupted += 1
        corrupted += _checked(lm, before, kinds)
        if follow is not None and (i % check_every == 0 or i == points - 1):
            wrong += _follow_is_wrong(follow, clean)
    return {"scenario": name, "points": points, "interrupted": interrupted, "corrupted": corrupted,
            "kinds": kinds, "wrong_following_calls": wrong}


class _WindowTimer:
    """A stand-in for ``threading.Timer`` that sends no signal and marks the window between
    its ``start`` and ``join``, where the real one's SIGINT may land."""

    open = False

    def __init__(self, *args: Any) -> None:
        pass

    def start(self) -> None:
        _WindowTimer.open = True

    def join(self) -> None:
        _WindowTimer.open = False


@pytest.mark.parametrize("collector_off", [True, False], ids=["harness", "baseline-collector-on"])
def test_no_collection_runs_in_a_real_sigint_window(monkeypatch, collector_off):
    """A SIGINT that lands in a collection runs inside a ``gc.callbacks`` entry, where CPython
    swallows the KeyboardInterrupt ("Exception ignored in: <function gc_callback>", hypothesis's
    callback; seen once in CI): so no collection may run in a window. With a collection due at
    every allocation (threshold 1, so that what is rare is certain), the harness's windows see
    none; the baseline, the same runs with the collector left on, sees some."""
    collections: list[str] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if _WindowTimer.open:
            collections.append(phase)

    monkeypatch.setattr(threading, "Timer", _WindowTimer)
    if not collector_off:
        monkeypatch.setattr(sys.modules[__name__], "_collected_first", contextlib.nullcontext)
    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    try:
        real_sigint_points("counterfactual ActivationSteering", points=3)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(callback)
        _WindowTimer.open = False
    assert (collections == []) == collector_off, collections[:4]


@pytest.mark.parametrize("name", ["activate WeightDelta", "counterfactual ActivationSteering"])
def test_real_sigints_leave_no_trace(name):
    report = real_sigint_points(name, points=4, check_every=2)
    print(report)
    assert report["corrupted"] == 0 and report["wrong_following_calls"] == 0, report


#: Random interrupt points per scenario in the slow test: 9 activation scenarios x 400 and
#: 6 counterfactual() scenarios x 250 bytecode points, plus 400 real SIGINTs: 5,500 in all.
SLOW_POINTS = {"activate": 400, "bf16": 400, "computing": 400, "counterfactual": 250}
SLOW_SIGINTS = {"activate WeightDelta": 100, "activate LoRAAdapter": 100, "counterfactual WeightDelta": 100,
                "counterfactual ActivationSteering": 100}


@pytest.mark.slow
# an interrupt injected into a finalizer (a `__del__` of transformers' objects, run when its
# last reference goes; the cyclic collector is off during each run, _collected_first) is
# "ignored" by CPython, as a real Ctrl-C there would be: pytest reports it as unraisable;
# what it may leave behind is what the state checks below look at
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_thousands_of_random_interrupt_points():
    reports = []
    for name in _interrupt_scenarios():
        reports.append(random_interrupt_points(name, SLOW_POINTS[name.split()[0].split("_")[0]], seed=1))
    for name, points in SLOW_SIGINTS.items():
        reports.append(real_sigint_points(name, points, seed=1))
    for report in reports:
        print(report)
    total = sum(report["points"] for report in reports)
    print(f"{total} interrupt points")
    assert total >= 5000
    assert all(r["corrupted"] == 0 and r["wrong_following_calls"] == 0 for r in reports), reports
