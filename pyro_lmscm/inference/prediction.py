r"""Prediction, the third step of a counterfactual: run the (intervened) SCM on abducted noise.

There is one way to do it, :func:`predict`: the model runs under the plate ``"__draws"`` of
``rows`` draws, inside the factual anchor of the abduction, with its noise sites supplied by a
handler: :class:`~pyro_lmscm.inference.PosteriorNoiseMessenger` (exact posterior, drawn step
by step) or a replay of explicit noise (:func:`noise_handler`, for the draws of any abduction
method). ``counterfactual()`` and :class:`~pyro_lmscm.inference.AbductionResult` both use it.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import pyro
import pyro.poutine as poutine
import torch

from ..atomic import release_plate, reversible
from ..errors import InferenceError
from .hindsight_guide import noise_trace

if TYPE_CHECKING:
    from ..models.anchor import FactualAnchor
    from ..models.scm import LanguageModelSCM

__all__ = ["DRAWS", "check_outside_plates", "noise_handler", "predict"]

#: The plate of posterior draws, in every prediction.
DRAWS = "__draws"


def check_outside_plates(owner: str) -> None:
    """Refuse to run inside a caller's ``pyro.plate``: the draws are this call's own plate
    (``num_samples`` of them, :data:`DRAWS`), and the SCM's strings are batched by prompt,
    not by an enclosing plate.

    :raises InferenceError: naming ``owner`` and the enclosing plates.
    """
    from pyro.poutine.runtime import get_plates

    plates = get_plates()
    if plates:
        names = ", ".join(f"{frame.name!r} (size {frame.size}, dim {frame.dim})" for frame in plates)
        raise InferenceError(
            f"{owner} runs inside pyro.plate {names}: its posterior draws are its own plate "
            f"({DRAWS!r}, num_samples of them). Call it outside the plate; for several draws pass "
            "num_samples, for several observed strings use counterfactuals()."
        )


def noise_handler(scm: LanguageModelSCM, noise: torch.Tensor) -> ContextManager[None]:
    """A handler that replays the explicit noise ``(rows, T, V)`` at the SCM's noise sites."""
    return poutine.replay(trace=noise_trace(scm, noise))  # type: ignore[return-value]


def predict(
    scm: LanguageModelSCM,
    model: Callable[[torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    rows: int,
    noise: Callable[[int, int], ContextManager[Any]],
    anchor: FactualAnchor | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Run ``model`` (``scm.model``, intervened or not) for ``rows`` draws.

    :param noise: ``noise(start, stop)`` returns the handler that supplies the noise of rows
        ``start:stop`` (a fresh handler per call).
    :param anchor: the factual logits of the abduction: inside its scope the factual
        mechanism evaluates to them on the observed path, so a null replay is exact.
    :param deterministic: decode each row alone (a batch of one), so that a row's tokens do
        not depend on which rows share its batch. In float32 they never do here; in bfloat16,
        on CPUs whose matrix kernels round with the batch size (AVX-512 without AMX), the
        intervened rows' logits do (the factual rows are anchored), and a near-tie can flip a
        token. It costs one decoding run per row.
    :returns: ids ``(rows, T)``; for prompts ``(S, 1, L)`` of ``S`` strings (a batch of
        observations, :func:`~pyro_lmscm.inference.counterfactuals`), ``(S, rows, T)``.
    :raises InferenceError: inside a caller's ``pyro.plate`` (:func:`check_outside_plates`).
    """
    check_outside_plates("predict()")
    spans: Sequence[tuple[int, int]] = [(i, i + 1) for i in range(rows)] if deterministic else [(0, rows)]
    out = []
    with ExitStack() as stack:
        if anchor is not None:
            stack.enter_context(scm.anchored(anchor))
        for start, stop in spans:
            plate = pyro.plate(DRAWS, stop - start, dim=-1)
            # the plate's dimension is freed even if an interrupt splits its __enter__
            with noise(start, stop), reversible(lambda: None, functools.partial(release_plate, plate)):
                ids = plate(model)(prompt)
            out.append(ids.expand(*prompt.shape[:-2], stop - start, scm.max_new_tokens))
    return torch.cat(out, dim=-2) if len(out) > 1 else out[0]
