"""Private helpers shared by the mechanisms (hooks on decoder layers for :mod:`.steering`,
:mod:`.affine_steering` and :mod:`.rome`), as ChiRho's ``internals.py``. The interrupt-safe
restores they all use live in :mod:`pyro_lmscm.atomic`."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch

from ..atomic import forward_hook
from ..errors import MechanismError
from ..models.mechanism import Mechanism
from ..validation import as_int, as_real
from .ops import TextOrIds

if TYPE_CHECKING:
    from torch import nn

    from ..lm import HFLanguageModel

def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Hugging Face causal LM (also under a peft wrapper)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for owner in (decoder, getattr(model, "model", None), getattr(model, "transformer", None)):
        for name in ("layers", "h"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList):
                return layers
    raise MechanismError(
        f"cannot find the decoder layers of {type(model).__name__}: expected "
        "`model.model.layers` (Llama, SmolLM2, Qwen, ...) or `model.transformer.h` (GPT-2)."
    )


def _resolve_layer(model: nn.Module, layer: int, owner: str) -> int:
    """``layer`` as a non-negative index into the decoder layers (negative counts from the end)."""
    n = len(_decoder_layers(model))
    if not -n <= layer < n:
        raise MechanismError(
            f"{owner}: `layer` is {layer} but the model has {n} decoder layers; pass an index in [{-n}, {n})."
        )
    return layer % n


def _hidden_size(model: Any) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text_config, "hidden_size", None)
    if size is None:
        size = model.get_input_embeddings().weight.shape[-1]
    return int(size)


def _check_int(value: Any, name: str, owner: str, minimum: int | None = None) -> int:
    return as_int(value, name, minimum=minimum, error=MechanismError, owner=owner)


def _check_real(value: Any, name: str, owner: str) -> float:
    return as_real(value, name, error=MechanismError, owner=owner)


def _check_vector(value: Any, name: str, owner: str, dim: int = 1) -> torch.Tensor:
    """A finite floating tensor with ``dim`` dimensions, detached, as float64 on the CPU."""
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point() or tensor.dim() != dim:
        shape = "(d,)" if dim == 1 else "(d, d)"
        raise MechanismError(
            f"{owner}: `{name}` must be a floating tensor of shape {shape}, got dtype "
            f"{tensor.dtype} and shape {tuple(tensor.shape)}."
        )
    if not bool(torch.isfinite(tensor).all()):
        raise MechanismError(f"{owner}: `{name}` has non-finite entries (nan or inf).")
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def _as_ids(lm: HFLanguageModel, prompt: TextOrIds, what: str) -> torch.Tensor:
    """Token ids ``(L,)`` of a prompt given as text or ids."""
    ids = lm.encode(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt)
    ids = lm.check_ids(ids, what)
    if ids.dim() != 1 or ids.numel() == 0:
        raise MechanismError(
            f"`{what}` must be non-empty token ids of shape (L,), got shape {tuple(ids.shape)}."
        )
    return ids


def _split_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The hidden states in a layer's output (a tensor or a tuple starting with one)."""
    if isinstance(output, torch.Tensor):
        return output, lambda new: new
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda new: (new, *output[1:])
    raise MechanismError(
        f"a decoder layer returned {type(output).__name__}; expected a tensor or a tuple "
        "whose first entry is the hidden states."
    )


def _absolute_positions(kwargs: dict[str, Any], owner: str) -> torch.Tensor:
    """Absolute positions of the tokens of this forward call, shape ``(batch or 1, seq)``."""
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        return position_ids
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1:
        return cache_position[None]
    raise MechanismError(
        f"{owner}: the decoder layer was called without `position_ids` or `cache_position`, so "
        "the absolute token positions are unknown; use `start=0` (edit every position)."
    )


def _layer_output_hook(layer: nn.Module, hook: Callable[..., Any], value: Any = None) -> ContextManager[Any]:
    """Register ``hook(module, args, kwargs, output)`` on ``layer`` while the context is open
    (removed also on an exception); the context yields ``value``."""
    return forward_hook(layer, hook, with_kwargs=True, value=value)


class _StopForward(Exception):
    """Raised by a capturing hook to skip the layers after the one it reads."""


@torch.no_grad()
def _layer_hidden_states(
    lm: HFLanguageModel, layer: int, prompts: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The output hidden states of decoder layer ``layer`` for each prompt, each ``(L_i, d)`` float32.

    Prompts of equal length run as one batch; the forward pass stops after ``layer``.
    """
    module = _decoder_layers(lm.model)[layer]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(ids.shape[-1], []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        captured.append(_split_output(output)[0].detach().float())
        raise _StopForward

    with _layer_output_hook(module, capture):
        for indices in by_length.values():
            captured.clear()
            batch = torch.stack([prompts[i] for i in indices]).to(lm.device)
            try:
                lm.model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            for row, i in enumerate(indices):
                out[i] = captured[0][row]
    return [h for h in out if h is not None]  # all filled


class _ResidualStreamEdit(Mechanism):
    r"""Base of the mechanisms that replace the output :math:`h_{L,i}` of decoder layer
    :math:`L` at absolute positions :math:`i \geq s` by :math:`\phi(h_{L,i})`.

    Subclasses define :math:`\phi` in :meth:`edit`, in the dtype of the hidden states they
    get: float32, or the model's dtype where it is wider (float64). A bfloat16 or float16
    model's hidden states are edited in float32 and rounded back; a float64 model's are not
    rounded to float32, so that an edit that is the identity leaves them unchanged.
    """

    def __init__(self, layer: int, start: int = 0) -> None:
        owner = type(self).__name__
        self.layer = _check_int(layer, "layer", owner)
        self.start = _check_int(start, "start", owner, minimum=0)

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def edit(self, hidden: torch.Tensor) -> torch.Tensor:
        r""":math:`\phi`, applied to hidden states of shape ``(..., d)``; returns a new tensor."""
        raise NotImplementedError

    def check(self, lm: HFLanguageModel) -> None:
        owner = type(self).__name__
        _resolve_layer(lm.model, self.layer, owner)
        size = _hidden_size(lm.model)
        if self.dim != size:
            raise MechanismError(
                f"{owner}: the edit has dimension {self.dim} but the model's hidden size is {size}; "
                "estimate it on this model (from_contrastive)."
            )

    def _hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        hidden, rebuild = _split_output(output)
        edited = self.edit(hidden.to(torch.promote_types(hidden.dtype, torch.float32))).to(hidden.dtype)
        if self.start > 0:
            positions = _absolute_positions(kwargs, type(self).__name__).to(hidden.device)
            edited = torch.where((positions >= self.start)[..., None], edited, hidden)
        return rebuild(edited)

    def acting_from(self, position: int) -> _ResidualStreamEdit:
        """The same edit at absolute positions ``>= max(start, position)`` alone: a copy with
        that ``start`` (the edit itself is shared)."""
        position = _check_int(position, "position", type(self).__name__, minimum=0)
        edit = copy.copy(self)
        edit.start = max(self.start, position)
        return edit

    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        layer = _decoder_layers(lm.model)[_resolve_layer(lm.model, self.layer, type(self).__name__)]
        return _layer_output_hook(layer, self._hook, lm)
