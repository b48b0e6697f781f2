r"""A thin wrapper over a Hugging Face causal language model.

:class:`HFLanguageModel` works on token ids. It computes

* teacher-forced logits :math:`\ell_{1:L} = f_\theta(x_{1:L})` for a whole batch of
  sequences in one forward pass (:meth:`HFLanguageModel.logits`), and
* incremental next-token logits with a KV cache (:meth:`HFLanguageModel.prefill`,
  :meth:`HFLanguageModel.step`).

Any leading batch shape ``(...,)`` of the inputs is flattened into the Hugging Face batch
and restored on the outputs, so Pyro plates and ChiRho world dimensions pass through.
Logits are returned in float32 whatever the model's dtype.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import ObservationError, TokenizationError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["HFLanguageModel", "release_freed_memory"]


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` (another C library, another platform)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def release_freed_memory() -> None:
    """Give the pages of freed CPU memory back to the operating system (glibc's
    ``malloc_trim(0)``; a no-op elsewhere).

    A KV cache that grows by one token per step frees a block of every size on its way;
    glibc keeps such blocks resident, so without this the peak resident memory of a long
    decoding run wanders between one and two times what it holds (measured on SmolLM2,
    64 draws of 64 tokens: 102 to 217 MB above the model; trimmed every 8 steps, 85 to
    96 MB). Nothing is moved and nothing live is touched.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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

    def check_ids(self, ids: torch.Tensor, what: str = "input_ids") -> torch.Tensor:
        """Check that ``ids`` are integer token ids in ``[0, vocab_size)``.

        :returns: ``ids`` as a ``torch.long`` tensor on the model's device.
        :raises ObservationError: on a wrong dtype or an id outside the vocabulary.
        """
        if isinstance(ids, str):
            raise ObservationError(
                f"`{what}` is a str; pass token ids (encode text with HFLanguageModel.encode)."
            )
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ObservationError(f"`{what}` must hold integer token ids, got {ids!r:.80}: {error}") from error
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ObservationError(f"`{what}` must hold integer token ids, got dtype {ids.dtype}.")
        if ids.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few torch ops take them
            ids = ids.to(torch.float64)  # exact below 2**53; anything larger is out of range
        if ids.numel() and (float(ids.min()) < 0 or float(ids.max()) >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)].flatten()[:5].tolist()
            raise ObservationError(
                f"`{what}` has ids outside the vocabulary [0, {self.vocab_size}): {bad}."
            )
        return ids.to(device=self.device, dtype=torch.long)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        r"""Teacher-forced logits of every position, in one forward pass.

        :param input_ids: token ids of shape ``(..., L)``.
        :param logits_to_keep: if positive, only the last ``logits_to_keep`` positions.
        :returns: float32 logits of shape ``(..., L', V)`` with ``L' = L`` or
            ``logits_to_keep``; ``[..., i, :]`` predicts the token after position ``i``.
        """
        batch_shape, length = input_ids.shape[:-1], input_ids.shape[-1]
        flat = input_ids.reshape(-1, length).to(self.device)
        out = self.model(input_ids=flat, use_cache=False, logits_to_keep=logits_to_keep)
        logits = out.logits.float()
        return logits.reshape(*batch_shape, logits.shape[-2], logits.shape[-1])

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run the prompts ``input_ids`` of shape ``(n, L)`` and open a KV cache.

        :returns: the next-token logits ``(n, V)`` (float32) and the cache.
        """
        out = self.model(input_ids=input_ids.to(self.device), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out[self._cache_keyword]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, past_key_values: Any) -> tuple[torch.Tensor, Any]:
        """Append one token per row, ``tokens`` of shape ``(n,)``, to the cached prefixes.

        :returns: the next-token logits ``(n, V)`` (float32) and the updated cache.
        """
        out = self.model(
            input_ids=tokens.to(self.device)[:, None],
            use_cache=True,
            **{self._cache_keyword: past_key_values},
        )
        return out.logits[:, -1].float(), out[self._cache_keyword]

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (no special tokens), checked to decode back to ``text``.

        :raises TokenizationError: without a tokenizer, or if the ids do not round-trip.
        """
        tokenizer = self._require_tokenizer()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids)
        if decoded != text:
            raise TokenizationError(
                f"text {text!r} does not survive an encode/decode round trip (got {decoded!r}); "
                "pass token ids instead of text."
            )
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of the ids up to (not including) the first end-of-sequence token."""
        tokenizer = self._require_tokenizer()
        ids = [int(i) for i in torch.as_tensor(ids).flatten().tolist()]
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
        ids = [int(i) for i in torch.as_tensor(ids).flatten().tolist()]
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

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise TokenizationError(
                "this HFLanguageModel has no tokenizer; pass `tokenizer=` or work with token ids."
            )
        return self.tokenizer

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return f"HFLanguageModel({name}, vocab_size={self.vocab_size}, dtype={self.dtype})"
