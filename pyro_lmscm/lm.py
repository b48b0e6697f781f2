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

import contextlib
import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Sequence

import torch

from .atomic import COMPUTE_LOCK
from .errors import ObservationError, TokenizationError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "FLOAT32_COPY_BUDGET",
    "LEFT_PAD",
    "HFLanguageModel",
    "PaddedCache",
    "bf16_kernels",
    "bf16_linears_in_float32",
    "compute_scope",
    "heap_allocations",
    "left_pad",
    "native_bf16_gemm",
    "release_freed_memory",
]

#: The id that left-pads a batch of prompts of different lengths (not a token).
LEFT_PAD = -1


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
def _glibc() -> Any:
    """glibc, for ``malloc_trim`` and ``mallopt``, or ``None`` (another C library, another
    platform)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # musl and others have neither
    except (OSError, AttributeError):
        return None
    return libc


# glibc's mallopt() parameters and their defaults (malloc.h, malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_HEAP_SCOPES = [0]  # heap_allocations() scopes open in this process
_HEAP_LOCK = threading.Lock()


@contextlib.contextmanager
def heap_allocations() -> Iterator[None]:
    """A scope in which glibc serves every CPU allocation from its heap and keeps the freed
    blocks there for the next ones (``mallopt(M_MMAP_MAX, 0)``, a trim threshold of 2 GiB);
    on exit the defaults come back and the freed memory is given back (``malloc_trim``). A
    no-op without glibc.

    By default glibc maps each block above its mmap threshold (which adapts to the blocks
    freed, up to 32 MiB; 256 rows of SmolLM2's 49,152 logits are 50 MB in float32) from the
    operating system and unmaps it when freed, so every new tensor of that size first faults
    in and zeroes all its pages: a float32 -> float64 copy of 256 rows of V took 38 ms that
    way and 12 ms from the heap, and the exact-only study ran 20% faster (SmolLM2 bf16, 64
    strings, in-process A/B: 0.43 -> 0.34 s per string; 192 strings: 0.41 -> 0.34 s, at a
    peak 500 MB higher, 2.6 GB; the MC study 1.60 -> 1.44 s per string, peak 1.7 GB both).
    :func:`release_freed_memory` does nothing inside. Scopes nest (the outermost one
    restores); the setting is the process's, so it also holds for other threads while open.
    glibc keeps its mmap threshold fixed after a ``mallopt``: it no longer adapts to the sizes
    freed."""
    libc = _glibc()
    if libc is None:
        yield
        return
    with _HEAP_LOCK:
        _HEAP_SCOPES[0] += 1
        if _HEAP_SCOPES[0] == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _HEAP_LOCK:
            _HEAP_SCOPES[0] -= 1
            if _HEAP_SCOPES[0] == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Give the pages of freed CPU memory back to the operating system (glibc's
    ``malloc_trim(0)``; a no-op elsewhere).

    A KV cache that grows by one token per step frees a block of every size on its way;
    glibc keeps such blocks resident, so without this the peak resident memory of a long
    decoding run wanders between one and two times what it holds (measured on SmolLM2,
    64 draws of 64 tokens: 102 to 217 MB above the model; trimmed every 8 steps, 85 to
    96 MB). Nothing is moved and nothing live is touched. Inside :func:`heap_allocations`,
    which keeps freed memory for the next blocks, a no-op: that scope's exit trims.
    """
    libc = _glibc()
    if libc is not None and not _HEAP_SCOPES[0]:  # (a heap_allocations() scope keeps them until its exit)
        libc.malloc_trim(0)


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
    import weakref

    from .atomic import reversible

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


@contextlib.contextmanager
def compute_scope(lm: "HFLanguageModel") -> Iterator[None]:
    """The scope in which every entry point runs its work on ``lm`` (the study worker and
    runner, each command of the command line, the explorer, the benchmarks):
    :func:`bf16_kernels` (float32 GEMMs for a bfloat16 model on a CPU without native bfloat16
    kernels) and :func:`heap_allocations` (large tensors reuse freed heap memory). Both nest, so
    a caller's scope around many calls keeps one set of float32 weight copies and one heap. Hold
    it only while computing: inside it, the model's linears are patched and glibc's setting is
    the process's (the explorer leaves it at each snapshot it yields). It holds the process's
    compute lock (:data:`pyro_lmscm.atomic.COMPUTE_LOCK`), so other threads wait meanwhile."""
    with COMPUTE_LOCK, bf16_kernels(lm), heap_allocations():
        yield


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
    def lock(self) -> Any:
        """The lock that every computation on this model holds (mechanism activations, forward
        calls, seeded regions such as ``counterfactual()``): :data:`pyro_lmscm.atomic.COMPUTE_LOCK`,
        one for the process, since Pyro's handler stack and torch's global generator are the
        process's too. ``with lm.lock:`` makes a block of several calls one turn."""
        return COMPUTE_LOCK

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

    def check_ids(self, ids: torch.Tensor, what: str = "input_ids", left_padded: bool = False) -> torch.Tensor:
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
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ObservationError(f"`{what}` must hold integer token ids, got {ids!r:.80}: {error}") from error
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
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run the prompts ``input_ids`` of shape ``(n, L)`` and open a KV cache; each distinct
        prompt runs once (a study's draws of one string share its prompt), its logits and cache
        repeated for its rows.

        :param input_ids: prompt ids, possibly left-padded (:data:`LEFT_PAD`).
        :returns: the next-token logits ``(n, V)`` (float32) and the cache (a
            :class:`PaddedCache` for padded prompts).
        """
        unique, inverse = torch.unique(input_ids.to(self.device), dim=0, return_inverse=True)
        ids, padding = _padding(unique, self.pad_token_id)
        with COMPUTE_LOCK:
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **padding)
        cache = out[self._cache_keyword]
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
