"""An interrupt cannot leave the model edited: KeyboardInterrupt at every line of every restore path.

Every mechanism that changes the HF module (weight deltas, ROME, LoRA flags, steering and
ROME's forward hooks) undoes its change through ``restore_atomically``, and so does the
``bf16_linears_in_float32`` scope (the ``forward`` it sets on each linear). The harness below
runs each scenario once to list the line events inside those restore steps (our code, and
torch's and peft's Python code they call), then reruns it once per event with a
``sys.settrace`` tracer that raises ``KeyboardInterrupt`` exactly there. After each run the
parameters, buffers and ``requires_grad`` flags must be bit-identical, no hook may be left,
every peft layer must be as it was, torch's grad mode must be the caller's, and the
interrupt must still reach the caller.

The baseline: the same harness on the restore loop of before (one ``copy_`` per parameter in
a plain loop) finds corrupted states.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import pytest
import torch

from pyro_lmscm import atomic
from pyro_lmscm.interventions import (
    ActivationSteering,
    AffineSteering,
    LoRAAdapter,
    WeightDelta,
    rome_edit,
)
from pyro_lmscm.lm import bf16_linears_in_float32
from pyro_lmscm.testing import TINY_WORDS, snapshot, tiny_llama

IDS = torch.tensor([[2, 3, 4, 5, 6]])
WRAPPER = atomic.restore_atomically.__code__


def _run_traced(scenario: Callable[[], Any], wrapper: Any, inject_at: int | None) -> int:
    """Run ``scenario`` counting the line events under ``wrapper`` (in the frames it calls,
    not in its own); raise KeyboardInterrupt at event number ``inject_at``. Returns the number
    of events seen."""
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
        return local if inside else None

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


def _harness(lm, scenario: Callable[[], Any], wrapper: Any = WRAPPER) -> tuple[int, int]:
    """(restore points tried, corrupted states) for ``scenario``."""
    before = _state(lm)
    total = _run_traced(scenario, wrapper, inject_at=None)
    assert _equal(_state(lm), before)
    corrupted = 0
    for k in range(total):
        with pytest.raises(KeyboardInterrupt, match="injected at"):
            _run_traced(scenario, wrapper, inject_at=k)
        if not _equal(_state(lm), before):
            corrupted += 1
            lm.model.load_state_dict(before[0][0])  # repair, so later points are tried cleanly
    return total, corrupted


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

    def float32_gemms():  # not a mechanism, but a scope that sets `forward` on the model's linears
        lm = tiny_llama(seed=0, dtype=torch.bfloat16)

        def scenario():
            with torch.no_grad(), bf16_linears_in_float32(lm.model, min_rows=1):
                lm.logits(IDS)

        return lm, scenario

    return {"WeightDelta": weight_delta, "ActivationSteering": steering, "AffineSteering": affine,
            "LoRAAdapter": lora, "rome_edit": rome, "bf16_linears_in_float32": float32_gemms}


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
