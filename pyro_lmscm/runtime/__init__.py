r"""Process policy: how this process runs the model's arithmetic, apart from what it computes.

The model (:mod:`pyro_lmscm.lm` and the rungs ``models``, ``interventions``, ``inference``)
says what is computed; this package says which CPU kernels compute it
(:mod:`~pyro_lmscm.runtime.kernels`) and where the C allocator keeps freed memory
(:mod:`~pyro_lmscm.runtime.heap`). Neither changes a result beyond the rounding of float32
sums. Only entry points enter these scopes (the study worker and runner, the command line,
the explorer, the benchmarks), through :func:`compute_scope`; a library user may too:
``with compute_scope(lm): counterfactuals(...)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..atomic import chained
from .heap import heap_allocations, release_freed_memory
from .kernels import FLOAT32_COPY_BUDGET, bf16_kernels, bf16_linears_in_float32, native_bf16_gemm

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = [
    "FLOAT32_COPY_BUDGET",
    "bf16_kernels",
    "bf16_linears_in_float32",
    "compute_scope",
    "heap_allocations",
    "native_bf16_gemm",
    "release_freed_memory",
]


def compute_scope(lm: "HFLanguageModel") -> chained:
    """The scope in which every entry point runs its work on ``lm`` (the study worker and
    runner, each command of the command line, the explorer, the benchmarks):
    :func:`bf16_kernels` (float32 GEMMs for a bfloat16 model on a CPU without native bfloat16
    kernels) and :func:`heap_allocations` (large tensors reuse freed heap memory). Both nest, so
    a caller's scope around many calls keeps one set of float32 weight copies and one heap. Hold
    it only while computing: inside it, the model's linears are patched and glibc's setting is
    the process's (the explorer leaves it at each snapshot it yields). It holds the process's
    compute lock (:data:`pyro_lmscm.atomic.COMPUTE_LOCK`), so other threads wait meanwhile.

    Not a generator: a Ctrl-C between a generator's ``yield`` and its caller's ``with`` (where
    Python checks for signals, on the return of ``next``) would leave the generator suspended,
    its scopes entered and the lock held until it is garbage-collected. The two scopes are
    entered together (:class:`~pyro_lmscm.atomic.chained`), atomically against SIGINT."""
    return chained(None, lambda _: bf16_kernels(lm), lambda _: heap_allocations())
