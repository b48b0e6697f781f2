r"""A thin wrapper over a Hugging Face causal language model.

:class:`HFLanguageModel` works on token ids. It computes

* teacher-forced logits :math:`\ell_{1:L} = f_\theta(x_{1:L})` for a whole batch of
  sequences in one forward pass (:meth:`HFLanguageModel.logits`), and
* incremental next-token logits with a KV cache (:meth:`HFLanguageModel.prefill`,
  :meth:`HFLanguageModel.step`).

Prompts of different lengths batch left-padded with :data:`LEFT_PAD` (``-1``, never a token
id): every method then passes transformers the attention mask and the position ids that
``generate`` builds for left padding, so each row's positions count from its own first
token (a steering mechanism's ``start`` means the same position in every row), and the
padding is never attended to.

Any leading batch shape ``(...,)`` of the inputs is flattened into the Hugging Face batch
and restored on the outputs, so Pyro plates and ChiRho world dimensions pass through.
Logits are returned in float32 whatever the model's dtype.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .atomic import COMPUTE_LOCK
from .errors import ChatError, MechanismError, ObservationError, TokenizationError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CHAT_ROLES",
    "LEFT_PAD",
    "HFLanguageModel",
    "PaddedCache",
    "cache_keyword",
    "check_messages",
    "is_messages",
    "left_pad",
    "preallocate",
]

#: The id that left-pads a batch of prompts of different lengths (not a token).
LEFT_PAD = -1


#: The roles a chat message may have.
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def is_messages(value: Any) -> bool:
    """Whether ``value`` is meant as chat messages: a list or tuple whose first item is a
    mapping (not yet checked: :func:`check_messages`)."""
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], Mapping)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` checked as a conversation: a non-empty list of mappings, each with a
    ``role`` in :data:`CHAT_ROLES` and a ``content`` string (other keys are kept for the
    template), the last one not the assistant's.

    :returns: the messages as a list of dicts.
    :raises ChatError: naming the bad message index and field.

    >>> check_messages([{"role": "user", "content": "Hi"}])
    [{'role': 'user', 'content': 'Hi'}]
    >>> check_messages([{"role": "usr", "content": "Hi"}])
    Traceback (most recent call last):
    ...
    pyro_lmscm.errors.ChatError: messages[0]["role"] is 'usr'; expected one of system, user, assistant, tool, developer.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatError(
            f"chat messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__} {messages!r:.80}."
        )
    if not messages:
        raise ChatError("chat messages must not be empty; give at least one {'role': 'user', 'content': ...}.")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}.")
        for key in ("role", "content"):
            if key not in message:
                raise ChatError(f"messages[{i}] has no {key!r}; each message needs 'role' and 'content'.")
            if not isinstance(message[key], str):
                raise ChatError(
                    f"messages[{i}][{key!r}] must be a str, got {type(message[key]).__name__} {message[key]!r:.60}."
                )
        if message["role"] not in CHAT_ROLES:
            raise ChatError(
                f"messages[{i}][\"role\"] is {message['role']!r}; expected one of {', '.join(CHAT_ROLES)}."
            )
        out.append(dict(message))
    if out[-1]["role"] == "assistant":
        raise ChatError(
            f"messages[{len(out) - 1}] is the assistant's, but the prompt ends where the assistant's reply "
            "begins: pass that reply as the observation (HFLanguageModel.encode_reply), not as a message."
        )
    return out


def left_pad(rows: Sequence[torch.Tensor | Sequence[int]]) -> torch.Tensor:
    """Token strings of different lengths as one ``(len(rows), max length)`` tensor,
    left-padded with :data:`LEFT_PAD`.

    >>> left_pad([[5, 6], [7]]).tolist()
    [[5, 6], [-1, 7]]
    """
    tensors = [torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in rows]
    length = max((t.shape[0] for t in tensors), default=0)
    out = torch.full((len(tensors), length), LEFT_PAD, dtype=torch.long)
    for i, t in enumerate(tensors):
        if t.shape[0]:
            out[i, length - t.shape[0] :] = t
    return out


def _padding(input_ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``input_ids`` with :data:`LEFT_PAD` replaced by a real id, and the ``attention_mask``
    and ``position_ids`` of a left-padded batch (none without padding)."""
    if input_ids.numel() == 0 or not bool((input_ids < 0).any()):
        return input_ids, {}
    mask = input_ids >= 0
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.where(mask, input_ids, pad_id), {"attention_mask": mask.long(), "position_ids": positions}


class PaddedCache:
    """A KV cache of a left-padded batch with its attention mask ``(n, length)``: what
    :meth:`HFLanguageModel.prefill` returns for padded prompts and
    :meth:`HFLanguageModel.step` extends. ``reorder_cache`` selects rows of both, as
    transformers' caches do."""

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)
        self.mask = self.mask[index.to(self.mask.device)]


@functools.cache
def _preallocated_layer() -> Any:
    """The class of :func:`preallocate`'s layers (made on first use: transformers loads late)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):  # type: ignore[misc, valid-type]
        """A ``DynamicLayer`` whose keys and values are views ``[:, :, :length]`` of buffers
        ``(batch, heads, capacity, head_dim)`` allocated once: :meth:`update` writes the new
        positions in place instead of concatenating. Everything else in transformers reads
        ``keys``/``values`` as it reads a ``DynamicLayer``'s (the length is their dim -2)."""

        def _buffers(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            self.key_buffer, self.value_buffer = keys, values
            length = 0 if self.keys is None else self.keys.shape[-2]
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def update(  # type: ignore[override]
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            length = 0 if self.keys is None else self.keys.shape[-2]
            end = length + key_states.shape[-2]
            if end > self.key_buffer.shape[-2]:  # more than announced: grow (twice, to stay amortised)
                capacity = max(end, 2 * self.key_buffer.shape[-2])
                _rebuffer([self], None, capacity)
            self.key_buffer[:, :, length:end] = key_states
            self.value_buffer[:, :, length:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        # (a PreallocatedCache reorders all its layers at once; these serve a layer alone)
        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            _rebuffer([self], beam_idx)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            _rebuffer([self], indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            _rebuffer([self], _repeated_rows([self], repeats))

        def reset(self) -> None:
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]

    return PreallocatedLayer


def _rebuffer(layers: list[Any], rows: torch.Tensor | None, capacity: int | None = None) -> None:
    """Give the preallocated ``layers`` new buffers in **one** allocation for all of them, a
    block ``(layers, 2, n, heads, capacity, head_dim)`` whose slices are each layer's keys and
    values: row ``i`` of the new buffers is row ``rows[i]`` of the old ones (``None``: every
    row, in order; a bool mask: the rows it keeps), their first positions the layer's, and
    ``capacity`` positions (default: the old buffers').

    One block rather than two buffers per layer: a chunk of draws opens and reorders its cache
    a few times, and blocks of a megabyte each, freed while others live, leave holes in the C
    heap; a block of tens of megabytes is mapped from the operating system on its own (glibc
    maps every block above its largest mmap threshold, 32 MiB) and given back whole when the
    chunk ends. Layers whose buffers differ in dtype or shape are blocks of their own, and
    keys and values of other shapes (other head counts or widths) two blocks."""
    if rows is not None:
        rows = rows.to(layers[0].key_buffer.device)
        if rows.dtype == torch.bool:  # (a mask of the rows kept, as batch_select_indices may get)
            rows = torch.nonzero(rows).flatten()
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for layer in layers:
        keys, values = layer.key_buffer, layer.value_buffer
        groups.setdefault((keys.shape[1::2], values.shape[1::2], keys.dtype, keys.device), []).append(layer)
    for (key_shape, value_shape, _, _), group in groups.items():
        first = group[0].key_buffer
        n = first.shape[0] if rows is None else rows.numel()
        size = first.shape[-2] if capacity is None else capacity
        if key_shape == value_shape:
            block = first.new_empty((len(group), 2, n, key_shape[0], size, key_shape[1]))
            keys, values = block[:, 0], block[:, 1]
        else:
            keys = first.new_empty((len(group), n, key_shape[0], size, key_shape[1]))
            values = first.new_empty((len(group), n, value_shape[0], size, value_shape[1]))
        for layer, new_keys, new_values in zip(group, keys, values):
            length = 0 if layer.keys is None else layer.keys.shape[-2]
            for old, new in ((layer.key_buffer, new_keys), (layer.value_buffer, new_values)):
                if rows is None:
                    new[:, :, :length] = old[:, :, :length]
                else:
                    torch.index_select(old[:, :, :length], 0, rows, out=new[:, :, :length])
            layer._buffers(new_keys, new_values)


def _repeated_rows(layers: list[Any], repeats: int) -> torch.Tensor | None:
    """The rows of ``batch_repeat_interleave(repeats)``: each row of ``layers`` ``repeats``
    times in a row (``None`` without layers)."""
    if not layers:
        return None
    buffer = layers[0].key_buffer
    return torch.arange(buffer.shape[0], device=buffer.device).repeat_interleave(repeats)


@functools.cache
def _preallocated_cache(cache_class: Any) -> Any:
    """A subclass of ``cache_class`` whose reorders (a batch that grows, rows that leave, a
    beam search) give all its preallocated layers new buffers in one block (:func:`_rebuffer`);
    its other layers reorder as ``cache_class``'s do."""
    layer_class = _preallocated_layer()

    class PreallocatedCache(cache_class):  # type: ignore[misc, valid-type]
        def _select(self, rows: torch.Tensor | None, method: str, *args: Any) -> None:
            """``rows`` of every preallocated layer in one block; the other layers' own ``method``."""
            mine = [layer for layer in self.layers if isinstance(layer, layer_class)]
            if mine and rows is not None:
                _rebuffer(mine, rows)
            for layer in self.layers:
                if not isinstance(layer, layer_class):
                    getattr(layer, method)(*args)

        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            self._select(beam_idx, "reorder_cache", beam_idx)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._select(indices, "batch_select_indices", indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            mine = [layer for layer in self.layers if isinstance(layer, layer_class)]
            self._select(_repeated_rows(mine, repeats), "batch_repeat_interleave", repeats)

    PreallocatedCache.__name__ = PreallocatedCache.__qualname__ = f"Preallocated{cache_class.__name__}"
    return PreallocatedCache


def preallocate(cache: Any, max_length: int) -> Any:
    r"""Give each full-attention layer of a transformers ``DynamicCache`` buffers of
    ``max_length`` positions, allocated once, and return the cache.

    A ``DynamicCache`` grows by one ``torch.cat`` per layer and token: each step allocates
    the whole cache anew and frees the old one, a block a little larger each time, which
    the C allocator cannot reuse and so keeps resident. Here each layer's keys and values
    become views ``[:, :, :length]`` of buffers ``(batch, heads, max_length, head_dim)``,
    slices of one block for all layers (:func:`_rebuffer`); a step writes its position in
    place, and attention reads the same ``length`` positions as before. Reordering the rows
    (``reorder_cache``: rows that finish, a batch that grows) copies the block once, into one
    new block. A layer of any other kind (a sliding window, a linear attention state) is left
    as it is, and a layer asked for more than ``max_length`` positions grows, so this only
    ever changes where the cache lives.

    :param cache: what the model returned under ``use_cache=True``.
    :param max_length: the positions the cache will hold: its prefix and every token
        appended later.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return cache
    layer_class = _preallocated_layer()
    mine = []
    for i, layer in enumerate(layers):
        keys, values = layer.keys, layer.values
        if type(layer) is not DynamicLayer or keys is None or values is None or keys.dim() != 4:
            continue
        new = layer_class.__new__(layer_class)
        new.__dict__.update(layer.__dict__)
        new.key_buffer, new.value_buffer = keys, values  # (the block is allocated below)
        layers[i] = new
        mine.append(new)
    if not mine:
        return cache
    _rebuffer(mine, None, max(max_length, *(layer.keys.shape[-2] for layer in mine)))
    preallocated = _preallocated_cache(type(cache))  # type: ignore[arg-type]  # classes hash
    new_cache = preallocated.__new__(preallocated)
    new_cache.__dict__.update(cache.__dict__)
    return new_cache


@functools.lru_cache(maxsize=None)
def cache_keyword(model_class: Any) -> str:
    """The keyword under which ``model_class.forward`` takes (and returns) its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is deprecated,
    to be removed in 5.40); older releases only know ``past_key_values``. Decided once per
    class from the signature of ``forward`` (``inspect.signature`` follows the
    ``functools.wraps`` of transformers' deprecation decorators), never by catching warnings.

    >>> cache_keyword(type(tiny_lm.model)) in ("cache", "past_key_values")
    True
    """
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _check_model(model: Any, tokenizer: Any) -> None:
    """Refuse what is no causal language model (it needs ``config`` and an output head) and a
    tokenizer that is none, here rather than at the first forward pass or encode.

    :raises MechanismError: for the model; :raises TokenizationError: for the tokenizer.
    """
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")
            and callable(getattr(model, "get_output_embeddings", None))):
        raise MechanismError(
            "HFLanguageModel: `model` must be a transformers model with a language-model head (e.g. "
            f"AutoModelForCausalLM.from_pretrained(...), or pyro_lmscm.load_lm), got {type(model).__name__}."
        )
    if tokenizer is not None and not (callable(getattr(tokenizer, "encode", None))
                                      and callable(getattr(tokenizer, "decode", None))):
        raise TokenizationError(
            "HFLanguageModel: `tokenizer` must be a transformers tokenizer (AutoTokenizer.from_pretrained(...)) "
            f"or None, got {type(tokenizer).__name__} {tokenizer!r:.80}."
        )


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class HFLanguageModel:
    r"""A Hugging Face causal LM seen as a function from token ids to logits.

    :param model: a ``transformers`` causal LM (``AutoModelForCausalLM``); put in eval mode.
    :param tokenizer: its tokenizer, optional; only needed for the text conveniences
        :meth:`encode` and :meth:`decode`.

    :ivar vocab_size: :math:`V`, the size of the logits' last dimension.
    :ivar eos_token_ids: the ids that end a sequence (may be empty).
    :ivar pad_token_id: the id emitted after the end of a sequence.
    :ivar max_length: the model's context length (``max_position_embeddings``), or ``None``.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        _check_model(model, tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        head = model.get_output_embeddings()
        self.vocab_size: int = int(
            head.weight.shape[0] if head is not None else text_config.vocab_size
        )
        generation_config = getattr(model, "generation_config", None)
        eos = _as_list(getattr(generation_config, "eos_token_id", None))
        eos = eos or _as_list(getattr(text_config, "eos_token_id", None))
        if not eos and tokenizer is not None:
            eos = _as_list(tokenizer.eos_token_id)
        self.eos_token_ids: list[int] = [e for e in eos if 0 <= e < self.vocab_size]
        pad = getattr(generation_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(text_config, "pad_token_id", None)
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        if pad is None or not 0 <= int(pad) < self.vocab_size:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id: int = int(pad)
        max_length = getattr(text_config, "max_position_embeddings", None)
        self.max_length: int | None = int(max_length) if max_length else None
        # a PeftModel forwards ``**kwargs`` to the model it wraps: ask that model's class
        get_base_model = getattr(model, "get_base_model", None)
        base = get_base_model() if callable(get_base_model) else model
        self._cache_keyword: str = cache_keyword(type(base))  # type: ignore[arg-type]  # classes hash
        self._text_config = text_config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lock(self) -> Any:
        """The lock that every computation on this model holds (mechanism activations, forward
        calls, seeded regions such as ``counterfactual()``): :data:`pyro_lmscm.atomic.COMPUTE_LOCK`,
        one for the process, since Pyro's handler stack and torch's global generator are the
        process's too. ``with lm.lock:`` makes a block of several calls one turn."""
        return COMPUTE_LOCK

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache that one token of one row holds (keys and values of every
        layer), from the model config; an estimate of ``2 * layers * hidden_size`` where
        the config does not name its key-value heads."""
        config = self._text_config
        layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 1)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or self.vocab_size)
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
        head_dim = int(getattr(config, "head_dim", 0) or max(1, hidden // heads))
        kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
        return 2 * layers * kv_heads * head_dim * self.dtype.itemsize

    def check_ids(
        self, ids: torch.Tensor | Sequence[int], what: str = "input_ids", left_padded: bool = False
    ) -> torch.Tensor:
        """Check that ``ids`` are integer token ids in ``[0, vocab_size)``.

        :param left_padded: also accept rows left-padded with :data:`LEFT_PAD` (each with at
            least one token, and no padding after its first token).

        :returns: ``ids`` as a ``torch.long`` tensor on the model's device.
        :raises ObservationError: on a wrong dtype or an id outside the vocabulary.
        """
        if isinstance(ids, str):
            raise ObservationError(
                f"`{what}` is a str; pass token ids (encode text with HFLanguageModel.encode)."
            )
        given = ids
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ObservationError(f"`{what}` must hold integer token ids, got {ids!r:.80}: {error}") from error
        if ids.numel() == 0 and not isinstance(given, torch.Tensor):
            ids = ids.long()  # an empty list holds no ids, not floats (torch.as_tensor([]) is float32)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ObservationError(f"`{what}` must hold integer token ids, got dtype {ids.dtype}.")
        if ids.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few torch ops take them
            ids = ids.to(torch.float64)  # exact below 2**53; anything larger is out of range
        padding = None
        if left_padded and ids.dim() >= 2 and ids.numel() and bool((ids == LEFT_PAD).any()):
            padding = ids == LEFT_PAD
            started = (~padding).long().cummax(-1).values.bool()
            if bool((padding & started).any()) or not bool(started[..., -1].all()):
                raise ObservationError(
                    f"`{what}` is padded with {LEFT_PAD} other than on the left of each row, or has an empty row."
                )
            ids = torch.where(padding, 0, ids)
        if ids.numel() and (float(ids.min()) < 0 or float(ids.max()) >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)].flatten()[:5].tolist()
            raise ObservationError(
                f"`{what}` has ids outside the vocabulary [0, {self.vocab_size}): {bad}."
            )
        if padding is not None:
            ids = torch.where(padding, LEFT_PAD, ids)
        return ids.to(device=self.device, dtype=torch.long)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, logits_to_keep: int = 0, float32: bool = True) -> torch.Tensor:
        r"""Teacher-forced logits of every position, in one forward pass.

        :param input_ids: token ids of shape ``(..., L)``, possibly left-padded
            (:data:`LEFT_PAD`; the logits at padded positions are meaningless).
        :param logits_to_keep: if positive, only the last ``logits_to_keep`` positions.
        :param float32: convert the logits to float32; ``False`` keeps the model's dtype (a
            caller that converts a few rows at a time never holds all of them in float32).
        :returns: logits (float32, or the model's dtype) of shape ``(..., L', V)`` with ``L' = L``
            or ``logits_to_keep``; ``[..., i, :]`` predicts the token after position ``i``.
        """
        batch_shape, length = input_ids.shape[:-1], input_ids.shape[-1]
        flat, padding = _padding(input_ids.reshape(-1, length).to(self.device), self.pad_token_id)
        with COMPUTE_LOCK:  # no other thread's mechanism is on meanwhile
            out = self.model(input_ids=flat, use_cache=False, logits_to_keep=logits_to_keep, **padding)
        logits = out.logits.float() if float32 else out.logits
        return logits.reshape(*batch_shape, logits.shape[-2], logits.shape[-1])

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_length: int | None = None) -> tuple[torch.Tensor, Any]:
        """Run the prompts ``input_ids`` of shape ``(n, L)`` and open a KV cache; each distinct
        prompt runs once (a study's draws of one string share its prompt), its logits and cache
        repeated for its rows.

        :param input_ids: prompt ids, possibly left-padded (:data:`LEFT_PAD`).
        :param max_length: the positions the cache will hold (``L`` and the tokens that
            :meth:`step` will append): its memory is then allocated here, once
            (:func:`preallocate`); ``None`` lets it grow with each step.
        :returns: the next-token logits ``(n, V)`` (float32) and the cache (a
            :class:`PaddedCache` for padded prompts).
        """
        unique, inverse = torch.unique(input_ids.to(self.device), dim=0, return_inverse=True)
        ids, padding = _padding(unique, self.pad_token_id)
        with COMPUTE_LOCK:
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **padding)
        cache = out[self._cache_keyword]
        if max_length is not None:
            cache = preallocate(cache, max_length)
        if padding:
            cache = PaddedCache(cache, padding["attention_mask"])
        logits = out.logits[:, -1].float()
        if not torch.equal(inverse, torch.arange(inverse.numel(), device=inverse.device)):
            logits = logits[inverse]  # unique() sorts: distinct prompts come back reordered
            cache.reorder_cache(inverse)
        return logits, cache

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, past_key_values: Any) -> tuple[torch.Tensor, Any]:
        """Append one token per row, ``tokens`` of shape ``(n,)``, to the cached prefixes.

        :returns: the next-token logits ``(n, V)`` (float32) and the updated cache.
        """
        logits, cache = self.extend(tokens[:, None], past_key_values)
        return logits[:, -1], cache

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, past_key_values: Any, float32: bool = True) -> tuple[torch.Tensor, Any]:
        """Append ``k`` tokens per row, ``tokens`` of shape ``(n, k)``, to the cached prefixes
        in one pass (a teacher-forced pass after a shared :meth:`prefill`).

        :param float32: as :meth:`logits`.
        :returns: the logits ``(n, k, V)`` after each appended token and the updated cache.
        """
        padding: dict[str, torch.Tensor] = {}
        padded = past_key_values if isinstance(past_key_values, PaddedCache) else None
        if padded is not None:
            k = tokens.shape[-1]
            mask = torch.cat([padded.mask, padded.mask.new_ones(padded.mask.shape[0], k)], -1)
            positions = mask.sum(-1, keepdim=True) - k + torch.arange(k, device=mask.device)
            padding = {"attention_mask": mask, "position_ids": positions}
            past_key_values = padded.cache
        with COMPUTE_LOCK:
            out = self.model(
                input_ids=tokens.to(self.device),
                use_cache=True,
                **{self._cache_keyword: past_key_values},
                **padding,
            )
        cache = out[self._cache_keyword]
        if padded is not None:
            cache = PaddedCache(cache, padding["attention_mask"])
        return (out.logits.float() if float32 else out.logits), cache

    def encode(self, text: str | Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Token ids of ``text`` (no special tokens), checked to decode back to ``text``; or,
        for a list of chat messages ``[{"role": ..., "content": ...}, ...]``, the ids of the
        conversation in the tokenizer's chat template with the assistant's turn opened
        (``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``), the
        prompt of an assistant reply (:meth:`encode_reply`).

        Roles are those of :data:`CHAT_ROLES`; the last message may not be the
        assistant's (its reply is the observation).

        :raises TokenizationError: without a tokenizer, for a lone surrogate, or if the ids do
            not round-trip.
        :raises ChatError: for anything but text that is not well-formed messages (naming the
            message and field), or a tokenizer without a chat template.

        >>> tiny_lm.encode("the man said").tolist()
        [3, 4, 10]
        """
        if not isinstance(text, str):
            return self._encode_chat(text)
        tokenizer = self._require_tokenizer()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate, e.g. from a JSON "\\ud800" escape
            raise TokenizationError(
                f"text {text!r:.80} holds a lone surrogate {text[error.start]!r} at character {error.start}, "
                "which is no Unicode character and has no token; remove it."
            ) from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids)
        if decoded != text:
            raise TokenizationError(
                f"text {text!r} does not survive an encode/decode round trip (got {decoded!r}); "
                "pass token ids instead of text."
            )
        return torch.tensor(ids, dtype=torch.long)

    def encode_reply(self, text: str) -> torch.Tensor:
        """An assistant's reply as an observation: the ids of ``text`` followed by the
        end-of-turn token, so that the observed string ends where the turn ends. That token
        is the one the chat template writes right after an assistant's content (SmolLM2's
        ``<|im_end|>``, Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``) when it is one of
        :attr:`eos_token_ids`; else (no template, or one that writes none) the tokenizer's
        end of sequence when it is one of them, else the first of them.

        :raises TokenizationError: as :meth:`encode`, or when the model has no end of sequence.
        """
        ids = self.encode(text)
        if not self.eos_token_ids:
            raise TokenizationError("the model has no end-of-sequence token to end a reply with.")
        end = self._end_of_turn()
        if end is None:
            tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
            end = tokenizer_eos if tokenizer_eos in self.eos_token_ids else self.eos_token_ids[0]
        return torch.cat([ids, torch.tensor([end], dtype=torch.long)])

    def _end_of_turn(self) -> int | None:
        """The first token the chat template writes after an assistant's content, if it is
        one of :attr:`eos_token_ids` (``None`` without a template, or if it writes another)."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return None
        mark = "\u2063pyro-lmscm reply\u2063"  # text no template writes itself
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}], tokenize=False
            )
        except Exception:  # noqa: BLE001 - the template's own checks: no template-given token
            return None
        if not isinstance(text, str) or mark not in text:
            return None
        after = tokenizer(text[text.rindex(mark) + len(mark) :], add_special_tokens=False)["input_ids"]
        return int(after[0]) if after and int(after[0]) in self.eos_token_ids else None

    def _encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        tokenizer = self._require_tokenizer()
        checked = check_messages(messages)
        if not getattr(tokenizer, "chat_template", None):
            raise ChatError(
                f"the tokenizer of {type(self.model).__name__} has no chat template, so chat messages cannot "
                "be encoded; pass the prompt as text, or set `tokenizer.chat_template` (a Jinja template)."
            )
        try:  # transformers 4.x returns a list of ids; 5.x a BatchEncoding unless return_dict=False
            out = tokenizer.apply_chat_template(checked, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as error:  # the template's own checks (jinja2 errors, raise_exception)
            raise ChatError(f"the chat template refused the messages: {type(error).__name__}: {error}") from error
        if isinstance(out, Mapping):
            out = out["input_ids"]
        ids = torch.as_tensor(out, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ChatError("the chat template made an empty prompt of the messages.")
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of the ids up to (not including) the first end-of-sequence token."""
        tokenizer = self._require_tokenizer()
        ids = self._id_list(ids)
        for i, token in enumerate(ids):
            if token in self.eos_token_ids:
                ids = ids[:i]
                break
        return str(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_texts(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """The text of each token of ``ids``, aligned to character boundaries.

        Decoding one token at a time breaks characters that span several tokens (an emoji
        of four byte-level tokens, a decomposed accent) into ``"\\ufffd"`` pieces. Here the
        ids are decoded incrementally, as transformers' ``TextStreamer`` does: a token whose
        prefix does not yet end on a whole character gets ``""`` and its text goes to the
        token that completes the character. Joined, the pieces give ``decode(ids)`` (no end
        of sequence is trimmed: an end-of-sequence id gets its own token text).

        :param ids: token ids, shape ``(n,)``.
        :returns: ``n`` strings.

        >>> tiny_lm.token_texts(tiny_lm.encode("the man said"))
        ['the', ' man', ' said']
        """
        tokenizer = self._require_tokenizer()
        ids = self._id_list(ids)
        pieces: list[str] = []
        done = ""  # text of the ids up to the last whole character
        start = 0  # index of the first id not yet in `done`
        for end in range(1, len(ids) + 1):
            text = str(tokenizer.decode(ids[:end]))
            if text.endswith("\ufffd") and end < len(ids):
                pieces.append("")  # an incomplete character: wait for its next byte
                continue
            pieces.append(text[len(done) :] if text.startswith(done) else str(tokenizer.decode(ids[start:end])))
            done, start = text, end
        return pieces

    def _id_list(self, ids: torch.Tensor | Sequence[int]) -> list[int]:
        """``ids`` (any shape; empty is fine) as a flat list of non-negative integers. Not
        checked against the model's vocabulary: a tokenizer may know more ids than the model.

        :raises ObservationError: naming ``ids``, for text, fractions or negative ids.
        """
        if isinstance(ids, str):
            raise ObservationError("`ids` is a str; pass token ids (encode text with HFLanguageModel.encode).")
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ObservationError(f"`ids` must hold integer token ids, got {ids!r:.80}: {error}") from None
        if not tensor.numel():
            return []
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ObservationError(f"`ids` must hold integer token ids, got dtype {tensor.dtype}.")
        values = [int(i) for i in tensor.flatten().tolist()]
        if min(values) < 0:
            raise ObservationError(f"`ids` must be non-negative token ids, got {[v for v in values if v < 0][:5]}.")
        return values

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise TokenizationError(
                "this HFLanguageModel has no tokenizer; pass `tokenizer=` or work with token ids."
            )
        return self.tokenizer

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return f"HFLanguageModel({name}, vocab_size={self.vocab_size}, dtype={self.dtype})"
