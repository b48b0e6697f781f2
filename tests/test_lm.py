import pytest
import torch

from pyro_lmscm.errors import ObservationError, TokenizationError


def test_teacher_forced_matches_incremental(lm):
    ids = torch.randint(0, lm.vocab_size, (3, 7))
    full = lm.logits(ids)
    assert full.shape == (3, 7, lm.vocab_size) and full.dtype == torch.float32
    logits, cache = lm.prefill(ids[:, :4])
    torch.testing.assert_close(logits, full[:, 3], atol=1e-5, rtol=1e-5)
    for i in range(4, 7):
        logits, cache = lm.step(ids[:, i], cache)
        torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=1e-5)


def test_extend_on_a_shared_prefill_matches_one_teacher_forced_pass(lm):
    """The scorer's path: the distinct prompts of a left-padded batch (one repeated) run once in
    ``prefill``, then the continuations in one ``extend``; the logits must equal those of one
    teacher-forced pass of prompt + continuation (an independent computation), row by row,
    and the model must have seen each distinct prompt once. The baseline, ``extend`` without
    the padded prompts' positions (positions counted from the padded length), must fail."""
    from pyro_lmscm.lm import LEFT_PAD, left_pad

    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, lm.vocab_size, (n,), generator=generator) for n in (3, 5, 3)]
    prompts.append(prompts[0])  # a draw of the same string: the same prompt
    heads = left_pad(prompts)
    rows = torch.randint(2, lm.vocab_size, (4, 6), generator=generator)
    seen = []
    hook = lm.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                              with_kwargs=True)
    try:
        first, cache = lm.prefill(heads)
        rest, _ = lm.extend(rows, cache)
    finally:
        hook.remove()
    assert seen == [torch.Size([3, 5]), torch.Size([4, 6])]  # three distinct prompts, then all four rows
    assert first.shape == (4, lm.vocab_size) and rest.shape == (4, 6, lm.vocab_size)
    for i, prompt in enumerate(prompts):
        full = lm.logits(torch.cat([prompt, rows[i]]))[len(prompt) - 1 :]
        torch.testing.assert_close(first[i], full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rest[i], full[1:], atol=1e-5, rtol=1e-5)
    # baseline: positions that ignore the left padding
    first, cache = lm.prefill(heads)
    wrong = lm.model(input_ids=rows, **{lm._cache_keyword: cache.cache}, attention_mask=torch.cat(
        [cache.mask, cache.mask.new_ones(4, 6)], -1), use_cache=True).logits
    full = lm.logits(torch.cat([prompts[0], rows[0]]))[len(prompts[0]) :]
    assert heads[0, 0] == LEFT_PAD and not torch.allclose(wrong[0], full, atol=1e-5, rtol=1e-5)


def test_leading_batch_shape_is_flattened_and_restored(lm):
    ids = torch.randint(0, lm.vocab_size, (2, 3, 5))
    out = lm.logits(ids)
    assert out.shape == (2, 3, 5, lm.vocab_size)
    torch.testing.assert_close(out[1, 2], lm.logits(ids[1, 2]), atol=1e-5, rtol=1e-5)
    assert lm.logits(ids, logits_to_keep=2).shape == (2, 3, 2, lm.vocab_size)


def test_encode_decode_round_trip(lm):
    ids = lm.encode("the woman said she went home")
    assert lm.decode(ids) == "the woman said she went home"
    # decoding stops at the end of sequence
    assert lm.decode(torch.cat([ids[:2], torch.tensor([1, 5])])) == "the woman"


def test_encode_refuses_text_that_does_not_round_trip(lm):
    with pytest.raises(TokenizationError, match="round trip"):
        lm.encode("the  unknownword")


def test_check_ids(lm):
    with pytest.raises(ObservationError, match="outside the vocabulary"):
        lm.check_ids(torch.tensor([0, lm.vocab_size]))
    with pytest.raises(ObservationError, match="integer"):
        lm.check_ids(torch.tensor([0.0, 1.0]))


def test_special_ids(lm):
    assert lm.eos_token_ids == [1] and lm.pad_token_id == 0 and lm.max_length == 128


@pytest.fixture(scope="module")
def byte_level_lm():
    """A tiny model with a byte-level BPE tokenizer trained in code: characters outside its
    small training text are split into several byte tokens, as in SmolLM2 or GPT-2."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from pyro_lmscm.lm import HFLanguageModel
    from pyro_lmscm.testing import tiny_llama

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["she was tired and the nurse said so"] * 10, vocab_size=300, min_frequency=1)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    return HFLanguageModel(tiny_llama(with_tokenizer=False).model, tokenizer)


@pytest.mark.parametrize("text", [" she was 😴 tired.", " cafe\u0301 ole\u0301", " 日本語 and 🇫🇷", "plain ascii"])
def test_token_texts_cut_at_character_boundaries(byte_level_lm, text):
    tokenizer = byte_level_lm.tokenizer
    ids = tokenizer(text)["input_ids"]
    pieces = byte_level_lm.token_texts(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # every piece is the text its tokens add: prefixes decode to the joined pieces
    for end in range(1, len(ids) + 1):
        if pieces[end - 1]:
            assert tokenizer.decode(ids[:end]) == "".join(pieces[:end])
    if not text.isascii():  # baseline: decoding one token at a time breaks these characters
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


# -- bf16_linears_in_float32: float32 GEMMs for bfloat16 linears on CPUs without bf16 kernels ----


def _float32_gemm(x, weight, bias=None):
    """The independent computation: the exact float32 images of the bf16 operands, one float32
    GEMM, rounded to bfloat16."""
    out = x.double().float() @ weight.double().float().T
    return (out if bias is None else out + bias.float()).bfloat16()


def test_bf16_linears_run_as_float32_gemms_from_min_rows_and_natively_below(monkeypatch):
    """Which kernel runs is seen by the dtype ``F.linear`` receives (the native kernel and the
    float32 GEMM may agree bit for bit on some CPUs); the baseline is the call outside the
    scope, which receives bfloat16 whatever the rows."""
    from pyro_lmscm.lm import bf16_linears_in_float32

    seen: list[torch.dtype] = []
    linear = torch.nn.functional.linear

    def spy(x, *args):
        seen.append(x.dtype)
        return linear(x, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    for rows in (1, 7, 8, 40):
        x = torch.randn(rows, 64).bfloat16()
        seen.clear()
        native = layer(x)
        assert seen == [torch.bfloat16]
        seen.clear()
        with torch.no_grad(), bf16_linears_in_float32(layer, min_rows=8):
            inside = layer(x)
        assert inside.dtype == torch.bfloat16
        if rows >= 8:  # one float32 GEMM, bit for bit the independent float32 computation
            assert seen == [torch.float32]
            assert torch.equal(inside, _float32_gemm(x, layer.weight, layer.bias))
        else:  # the native kernel, bit for bit
            assert seen == [torch.bfloat16]
            assert torch.equal(inside, native)
    assert "forward" not in vars(layer)
    # nested in another scope it patches nothing; the enclosing one stays in force after it
    with torch.no_grad(), bf16_linears_in_float32(layer, min_rows=8):
        outer = vars(layer)["forward"]
        with bf16_linears_in_float32(layer, min_rows=1000):
            assert vars(layer)["forward"] is outer
        seen.clear()
        layer(torch.randn(8, 64).bfloat16())
        assert seen == [torch.float32]
    # a leading batch shape counts its rows: (2, 4) rows of 64 reach min_rows = 8
    x = torch.randn(2, 4, 64).bfloat16()
    with torch.no_grad(), bf16_linears_in_float32(layer, min_rows=8):
        assert torch.equal(layer(x), _float32_gemm(x, layer.weight, layer.bias))


@pytest.mark.parametrize("copy_budget", [1 << 30, 1000], ids=["kept", "over the budget: copied per call"])
def test_an_in_place_weight_edit_inside_the_scope_is_seen(copy_budget):
    """The float32 copy follows the weight's version: after ``copy_`` under no_grad (what
    WeightDelta and ROME do) the next call uses the edited weight. Baseline: the output of
    before the edit, which a copy kept regardless of the version would give again. A weight
    over the budget (16 x 32 x 4 bytes > 1000) gives the same bits, copied for each call."""
    from pyro_lmscm.lm import bf16_linears_in_float32

    torch.manual_seed(1)
    layer = torch.nn.Linear(32, 16, bias=False, dtype=torch.bfloat16)
    x = torch.randn(12, 32).bfloat16()
    with torch.no_grad(), bf16_linears_in_float32(layer, copy_budget=copy_budget):
        before = layer(x)
        layer.weight.copy_(layer.weight * -2)
        after = layer(x)
    assert torch.equal(after, _float32_gemm(x, layer.weight))
    assert not torch.equal(after, before)


def test_calls_needing_a_gradient_keep_the_native_kernel():
    from pyro_lmscm.lm import bf16_linears_in_float32

    torch.manual_seed(2)
    layer = torch.nn.Linear(32, 16, dtype=torch.bfloat16)
    x = torch.randn(12, 32).bfloat16()
    with bf16_linears_in_float32(layer):
        out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    out.float().sum().backward()
    assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)


def test_the_scope_leaves_the_model_as_it_was_even_on_error(lm_bf16):
    from pyro_lmscm.lm import bf16_linears_in_float32

    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9, 10]])
    before = lm_bf16.logits(ids)
    with pytest.raises(RuntimeError, match="inside"):
        with bf16_linears_in_float32(lm_bf16.model):
            assert sum("forward" in vars(m) for m in lm_bf16.model.modules()) == 15  # 2 x 7 + the head
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in lm_bf16.model.modules())
    assert torch.equal(lm_bf16.logits(ids), before)


def test_bf16_kernels_choose_float32_gemms_only_for_bf16_on_a_cpu_without_native_kernels(lm, lm_bf16, monkeypatch):
    import contextlib

    from pyro_lmscm import lm as lm_module

    monkeypatch.setattr(lm_module, "native_bf16_gemm", lambda: False)
    assert not isinstance(lm_module.bf16_kernels(lm_bf16), contextlib.nullcontext)
    assert isinstance(lm_module.bf16_kernels(lm), contextlib.nullcontext)  # float32
    monkeypatch.setattr(lm_module, "native_bf16_gemm", lambda: True)
    assert isinstance(lm_module.bf16_kernels(lm_bf16), contextlib.nullcontext)


_HEAP_PROBE = """
import json, resource, torch
from pyro_lmscm.lm import heap_allocations, release_freed_memory

def faults(repeats=12):  # minor page faults of each allocation of a 64 MiB tensor, written then freed
    out = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(16 * 2**20).fill_(1.0)
        del block
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

def resident():  # MiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 2**20

outside = faults()
base = resident()
with heap_allocations():
    inside = faults()
    with heap_allocations():
        pass
    nested = faults()
    blocks = [torch.empty(16 * 2**20).fill_(1.0) for _ in range(4)]
    del blocks
    release_freed_memory()  # (a decoding run's periodic trim: the scope keeps the memory)
    kept = resident() - base
print(json.dumps([outside, inside, nested, kept, resident() - base]))
"""


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="glibc's allocator")
def test_heap_allocations_reuse_freed_memory_inside_the_scope_and_give_it_back_on_exit():
    """In a fresh process (whose heap no earlier test has grown): a 64 MiB tensor is 16,384
    pages. Outside the scope (the baseline) glibc maps each allocation afresh, so every one
    faults in all its pages; inside, the blocks come from the heap and a freed one is reused:
    after the first few (measured: one to three, while the heap grows), none faults, also after
    a nested scope's exit. Inside,
    256 MiB freed stays resident (kept for reuse, also through ``release_freed_memory``, which
    the decoding runs call); the outermost exit gives it back."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True)
    outside, inside, nested, kept, after = json.loads(out.stdout)
    pages = 16 * 2**20 * 4 // 4096
    assert all(f > pages // 2 for f in outside)
    assert all(f < pages // 100 for f in inside[4:]) and all(f < pages // 100 for f in nested)
    assert kept > 200 and after < 50


def test_heap_allocations_without_glibc_do_nothing(monkeypatch):
    from pyro_lmscm import lm as lm_module

    monkeypatch.setattr(lm_module, "_glibc", lambda: None)
    with lm_module.heap_allocations():
        assert lm_module._HEAP_SCOPES == [0]
    assert lm_module.release_freed_memory() is None
