r"""Which matrix kernels a bfloat16 model runs on this CPU.

Process policy, not part of the model: only entry points (the study, the command line, the
explorer, the benchmarks) enter these scopes, through :func:`pyro_lmscm.runtime.compute_scope`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any, ContextManager

import torch

from ..atomic import reversible

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["FLOAT32_COPY_BUDGET", "bf16_kernels", "bf16_linears_in_float32", "native_bf16_gemm"]


#: Bytes of float32 weight copies that :func:`bf16_linears_in_float32` keeps (1 GiB).
FLOAT32_COPY_BUDGET = 1 << 30


def native_bf16_gemm() -> bool:
    """Whether torch multiplies bfloat16 matrices on this CPU with oneDNN's kernels (AVX-512,
    AVX512-BF16, AMX, or Arm's BF16), rather than with its reference kernel.

    On an x86 CPU with AVX2 alone (``torch.__config__.show()``: "CPU capability usage: AVX2")
    the reference kernel runs a bfloat16 ``linear`` at about 15 GFLOP/s, its cost linear in
    the rows (measured on a 2-core AMD EPYC: 446 ms for 128 rows of one SmolLM2 layer plus its
    head, against 80 ms in float32); :func:`bf16_linears_in_float32` works around it.
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if probe is None else bool(probe())


def bf16_linears_in_float32(
    model: "torch.nn.Module", min_rows: int = 8, copy_budget: int = FLOAT32_COPY_BUDGET
) -> ContextManager[None]:
    """Within the scope, each bfloat16 ``nn.Linear`` of ``model`` called on the CPU with at
    least ``min_rows`` rows runs as a float32 GEMM on exact float32 copies of its input,
    weight and bias, and rounds its output back to bfloat16.

    For CPUs without native bfloat16 GEMM kernels (:func:`native_bf16_gemm` is false), where it
    is 2-7x faster from 16 rows on. The arithmetic is the reference kernel's: products of
    bfloat16 numbers summed in float32, the output rounded to bfloat16; only the order of the
    sums differs, as between batch sizes on CPUs whose kernels round with the batch. Rows
    fewer than ``min_rows`` (a decoding step of one string) keep the native kernel: there,
    reading float32 weights (twice the bytes) costs more than the reference kernel's
    arithmetic (measured on 1 and 4 rows: 3.6 and 15 ms native, 10.6 and 23 ms in float32).

    The scope sets ``forward`` on each such module (only where the class's is
    ``nn.Linear.forward``; hooks run as before) and removes it on exit, atomically. A module
    whose ``forward`` is already set (by an enclosing scope, or by accelerate's hooks) is left
    alone, so a nested scope changes nothing and the enclosing one keeps its copies. The float32
    copy of a weight is made on first use and kept while the weight's version counter stands
    still: every in-place edit through torch (``copy_``, ``add_``, as the weight-edit
    mechanisms make) bumps it, and the next call copies the edited weight. An edit through
    ``.data`` bumps nothing; make none inside the scope. The copies are kept up to
    ``copy_budget`` bytes (:data:`FLOAT32_COPY_BUDGET`; SmolLM2-135M needs 540 MB, twice its
    bfloat16 weights) and go with the scope; a weight beyond the budget is copied for each
    call and freed after it, so a large model takes one weight's copy at a time, not twice its
    memory. Calls that need a gradient keep the native kernel.

    >>> layer = torch.nn.Linear(8, 4, dtype=torch.bfloat16)
    >>> x = torch.randn(16, 8).bfloat16()
    >>> with torch.no_grad(), bf16_linears_in_float32(layer):
    ...     y = layer(x)
    >>> in_float32 = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    >>> y.dtype, bool((y == in_float32.bfloat16()).all())
    (torch.bfloat16, True)
    >>> "forward" in vars(layer)
    False
    """
    copies: dict[int, tuple[Any, int, torch.Tensor]] = {}
    kept = [0]  # bytes of the copies kept

    def float32(weight: torch.Tensor) -> torch.Tensor:
        entry = copies.get(id(weight))
        if entry is not None and entry[0]() is weight and entry[1] == weight._version:
            return entry[2]
        copy = weight.detach().float()
        if entry is not None:  # a stale copy (an edited weight, or another tensor at a reused id)
            kept[0] -= entry[2].nbytes
            del copies[id(weight)]
        if kept[0] + copy.nbytes <= copy_budget:
            copies[id(weight)] = (weakref.ref(weight), weight._version, copy)
            kept[0] += copy.nbytes
        return copy

    def patched(module: torch.nn.Linear) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            weight, bias = module.weight, module.bias
            if (
                x.dtype == torch.bfloat16
                and weight.dtype == torch.bfloat16
                and x.device.type == "cpu"
                and x.numel() >= min_rows * max(x.shape[-1], 1)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            ):
                bias32 = None if bias is None else bias.detach().float()
                return torch.nn.functional.linear(x.float(), float32(weight), bias32).to(torch.bfloat16)
            return torch.nn.functional.linear(x, weight, bias)

        return forward

    linears = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
        and type(module).forward is torch.nn.Linear.forward
        and "forward" not in vars(module)
        and module.weight.dtype == torch.bfloat16
    ]

    def restore() -> None:  # idempotent
        for module in linears:
            vars(module).pop("forward", None)

    def apply() -> None:
        for module in linears:
            module.forward = patched(module)  # type: ignore[method-assign]

    return reversible(apply, restore, copies.clear)  # the forwards removed atomically, then the copies freed


def bf16_kernels(lm: "HFLanguageModel") -> ContextManager[None]:
    """The scope in which ``lm`` runs fastest on this CPU: :func:`bf16_linears_in_float32` for a
    bfloat16 model on a CPU without native bfloat16 GEMM kernels, else a no-op. The study
    worker runs its batches in it."""
    if lm.dtype == torch.bfloat16 and lm.device.type == "cpu" and not native_bf16_gemm():
        return bf16_linears_in_float32(lm.model)
    return contextlib.nullcontext()
