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


# -- preallocate: a KV cache whose memory is allocated once ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_length", [16, 9], ids=["enough", "too short: grows"])
def test_a_preallocated_cache_decodes_bit_for_bit_as_a_growing_one(lm, lm_bf16, dtype, max_length):
    """Left-padded prompts (one repeated, so ``prefill`` reorders its cache), rows that leave
    (``reorder_cache``) and rows repeated (a beam search's ``select``): every step's logits equal
    those of the growing ``DynamicCache`` (the independent path) bit for bit. With ``max_length``
    too short for the 9 + 7 positions the buffers grow and the logits still agree."""
    from pyro_lmscm.lm import left_pad

    model = lm if dtype == torch.float32 else lm_bf16
    generator = torch.Generator().manual_seed(5)
    prompts = left_pad([torch.randint(2, model.vocab_size, (n,), generator=generator) for n in (9, 4)] * 2)
    tokens = torch.randint(2, model.vocab_size, (7, 4), generator=generator)
    keep = [torch.arange(4)] * 3 + [torch.tensor([0, 2, 3])] + [torch.tensor([2, 0, 0, 1])] + [torch.arange(4)] * 2

    def decode(length):
        logits, cache = model.prefill(prompts, length)
        out = [logits]
        rows = torch.arange(4)
        for t in range(7):
            if t:
                cache.reorder_cache(keep[t])
                rows = rows[keep[t]]
            logits, cache = model.step(tokens[t, : rows.numel()], cache)
            out.append(logits)
        return out, cache

    grown, grown_cache = decode(None)
    preallocated, cache = decode(max_length)
    assert all(torch.equal(a, b) for a, b in zip(grown, preallocated))
    layer = cache.cache.layers[0]
    assert type(layer).__name__ == "PreallocatedLayer" and type(grown_cache.cache.layers[0]).__name__ == "DynamicLayer"
    assert layer.keys.shape[-2] == 16 and layer.key_buffer.shape[-2] == (16 if max_length == 16 else 18)


def test_a_preallocated_cache_lives_in_one_block_for_all_layers(lm):
    """Memory by design: ``prefill`` gives every layer's keys and values slices of one
    allocation ``(layers, 2, n, heads, capacity, head_dim)``, and a reorder (a batch that grows
    from one prompt to its draws, rows that leave) copies them into one new allocation, not two
    per layer (a block of tens of megabytes is mapped on its own and given back whole).
    Baseline: the growing ``DynamicCache``, whose layers each hold their own allocations."""
    ids = torch.randint(2, lm.vocab_size, (1, 5))
    n_layers = len(lm.model.model.layers)

    def storages(cache):
        return {t.untyped_storage().data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)}

    _, cache = lm.prefill(ids, 9)
    layer = cache.layers[0]
    block = layer.key_buffer.untyped_storage()
    assert storages(cache) == {block.data_ptr()}
    assert block.nbytes() == n_layers * 2 * layer.key_buffer.numel() * layer.key_buffer.element_size()
    cache.reorder_cache(torch.zeros(6, dtype=torch.long))  # one prompt -> six draws
    grown = cache.layers[0].key_buffer.untyped_storage()
    assert storages(cache) == {grown.data_ptr()} and grown.data_ptr() != block.data_ptr()
    assert grown.nbytes() == 6 * block.nbytes() and cache.layers[0].keys.shape[0] == 6
    _, growing = lm.prefill(ids, None)
    assert len(storages(growing)) == 2 * n_layers
    growing.reorder_cache(torch.zeros(6, dtype=torch.long))
    keep = torch.tensor([True, False, True, False, False, True])
    for c in (cache, growing):  # rows that leave (a mask), then rows repeated; logits as the growing cache's
        c.batch_select_indices(keep)
        c.batch_repeat_interleave(2)
    assert len(storages(cache)) == 1 and cache.layers[-1].keys.shape[:3] == (6, layer.keys.shape[1], 5)
    tokens = torch.arange(6) + 2
    assert torch.equal(lm.step(tokens, cache)[0], lm.step(tokens, growing)[0])
    before = cache.layers[0].keys.clone()
    cache.layers[0].reorder_cache(torch.tensor([1, 0]))  # a layer alone: its own block, rows reordered
    assert torch.equal(cache.layers[0].keys, before[[1, 0]])


def test_a_preallocated_cache_writes_each_step_in_place(lm):
    """Memory by design: between two reorders a step allocates no cache memory (every layer's
    keys stay a view of the buffer allocated at ``prefill``). Baseline: the growing cache,
    whose keys move to a new allocation at every step."""
    ids = torch.randint(2, lm.vocab_size, (3, 5))

    def addresses(max_length):
        _, cache = lm.prefill(ids, max_length)
        seen = []
        for t in range(4):
            _, cache = lm.step(ids[:, t], cache)
            seen.append([layer.keys.untyped_storage().data_ptr() for layer in cache.layers])
        return seen

    preallocated = addresses(9)
    assert all(step == preallocated[0] for step in preallocated) and len(preallocated[0]) == len(lm.model.model.layers)
    grown = addresses(None)  # (torch.cat writes each layer's new keys while the old ones live)
    assert all(a != b for before, after in zip(grown, grown[1:]) for a, b in zip(before, after))
