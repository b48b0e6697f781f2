"""``counterfactual(..., chunk_size=...)``: posterior draws processed in chunks."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import InferenceError

PROMPT = torch.tensor([2, 3, 4])


@pytest.fixture
def scm(lm):
    return LanguageModelSCM(lm, max_new_tokens=8)


def _same(a, b):
    assert torch.equal(a.counterfactual_ids, b.counterfactual_ids)
    assert (a.interventional_ids is None) == (b.interventional_ids is None)
    if a.interventional_ids is not None:
        assert torch.equal(a.interventional_ids, b.interventional_ids)
    assert a.noise_stats.keys() == b.noise_stats.keys()
    for key in a.noise_stats:
        assert torch.equal(a.noise_stats[key], b.noise_stats[key])


@pytest.mark.parametrize("chunk_size", [None, 5, 7, 100])
def test_shapes_and_null_replay_in_every_chunk(scm, chunk_size):
    result = counterfactual(scm, PROMPT, None, {}, num_samples=12, seed=0, chunk_size=chunk_size, baseline=True)
    n = len(result.factual_ids)
    assert result.counterfactual_ids.shape == result.interventional_ids.shape == (12, 8)
    assert torch.equal(result.counterfactual_ids[:, :n], result.factual_ids.expand(12, n))
    for value in result.noise_stats.values():
        assert value.shape[0] == 12


def test_reproducible_and_one_chunk_equals_none(scm):
    observed = torch.tensor([5, 9, 3, 7])

    def run(chunk, baseline=True):
        return counterfactual(
            scm, PROMPT, observed, {"prompt": [2, 9, 4]}, num_samples=10, seed=3, chunk_size=chunk, baseline=baseline
        )

    _same(run(None), run(10))
    _same(run(None), run(64))
    _same(run(4), run(4))
    _same(run(4, baseline=False), run(4, baseline=False))
    chunked, whole = run(4), run(None)
    assert not torch.equal(chunked.interventional_ids, whole.interventional_ids)  # other draws, same law


def test_chunks_draw_from_the_same_distribution(scm):
    observed = torch.tensor([5, 9, 3, 7])
    intervention = {"prompt": [2, 9, 4]}
    whole = counterfactual(scm, PROMPT, observed, intervention, num_samples=600, seed=0, baseline=True)
    chunked = counterfactual(scm, PROMPT, observed, intervention, num_samples=600, seed=1, chunk_size=64, baseline=True)
    for key in whole.noise_stats:
        for t in range(whole.noise_stats[key].shape[-1]):
            a, b = whole.noise_stats[key][:, t].numpy(), chunked.noise_stats[key][:, t].numpy()
            assert stats.ks_2samp(a, b).pvalue > 1e-3, (key, t)
    for ids in ("counterfactual_ids", "interventional_ids"):
        a, b = getattr(whole, ids)[:, 0], getattr(chunked, ids)[:, 0]
        counts = torch.stack([torch.bincount(a, minlength=28), torch.bincount(b, minlength=28)])
        counts = counts[:, counts.sum(0) > 0]
        if counts.shape[1] > 1:
            assert stats.chi2_contingency(counts.numpy()).pvalue > 1e-3, ids


def test_interventional_baseline_is_the_intervened_model_on_fresh_noise(scm):
    """The baseline rows run in the same batch as the counterfactuals, on prior noise:
    their first token has the law of the intervened model's first token."""
    intervention = {"prompt": [2, 9, 4]}
    result = counterfactual(
        scm, PROMPT, torch.tensor([5, 9]), intervention, num_samples=2000, seed=0, chunk_size=500, baseline=True
    )
    with pyro.plate("draws", 2000, dim=-1):
        direct = poutine.do(scm.model, data={"prompt": torch.tensor([2, 9, 4])})(PROMPT)
    counts = torch.stack(
        [torch.bincount(result.interventional_ids[:, 0], minlength=28), torch.bincount(direct[:, 0], minlength=28)]
    )
    counts = counts[:, counts.sum(0) > 0]
    assert stats.chi2_contingency(counts.numpy()).pvalue > 1e-3


def test_baseline_is_opt_in_and_leaves_the_counterfactuals_unchanged(scm):
    """Without ``baseline`` only the counterfactual rows are decoded: the same draws (the
    baseline's noise is drawn after the posterior's), and no interventional result."""
    observed, intervention = torch.tensor([5, 9, 3, 7]), {"prompt": [2, 9, 4]}
    alone = counterfactual(scm, PROMPT, observed, intervention, num_samples=50, seed=2)
    paired = counterfactual(scm, PROMPT, observed, intervention, num_samples=50, seed=2, baseline=True)
    assert torch.equal(alone.counterfactual_ids, paired.counterfactual_ids)
    assert not torch.equal(paired.counterfactual_ids, paired.interventional_ids)
    assert alone.interventional_ids is None
    with pytest.raises(InferenceError, match="baseline=True"):
        alone.interventional
    with pytest.raises(InferenceError, match="baseline=True"):
        alone.interventional_texts
    assert sorted(alone.to_arviz().groups()) == ["constant_data", "posterior"]


def test_named_scm(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=6, name="lm")
    result = counterfactual(scm, PROMPT, None, {}, num_samples=7, seed=0, chunk_size=3)
    n = len(result.factual_ids)
    assert torch.equal(result.counterfactual_ids[:, :n], result.factual_ids.expand(7, n))


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, True])
def test_bad_chunk_size(scm, chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        counterfactual(scm, PROMPT, None, {}, num_samples=4, chunk_size=chunk_size)


def test_automatic_chunks_follow_the_memory_budget_and_equal_explicit_ones(scm, monkeypatch):
    import importlib

    from pyro_lmscm.inference import auto_chunk_size
    from pyro_lmscm.inference.budget import MIN_CHUNK_ROWS

    cf_module = importlib.import_module("pyro_lmscm.inference.counterfactual")  # the module, not the function
    module_counterfactual = cf_module.counterfactual

    observed = torch.tensor([5, 9, 3, 7])
    per_row = scm.lm.cache_bytes_per_token() * (len(PROMPT) + scm.max_new_tokens) + 8 * scm.vocab_size * 4
    monkeypatch.setitem(cf_module.AUTO_CHUNK_BYTES, "cpu", 11 * per_row + 1)
    assert auto_chunk_size(scm, len(PROMPT)) == 11
    assert auto_chunk_size(scm, len(PROMPT), baseline=True) == 5  # two rows per draw
    monkeypatch.setitem(cf_module.AUTO_CHUNK_BYTES, "cpu", 1)
    assert auto_chunk_size(scm, len(PROMPT)) == MIN_CHUNK_ROWS  # a floor of rows, whatever the budget
    assert auto_chunk_size(scm, len(PROMPT), baseline=True) == MIN_CHUNK_ROWS // 2

    monkeypatch.setitem(cf_module.AUTO_CHUNK_BYTES, "cpu", 11 * per_row + 1)
    args = (scm, PROMPT, observed, {"prompt": [2, 9, 4]})
    automatic = module_counterfactual(*args, num_samples=25, seed=3)
    # 25 draws in as few chunks of at most 11 as fit, of one size: 9 + 9 + 7, not 11 + 11 + 3
    assert auto_chunk_size(scm, len(PROMPT), num_samples=25) == 9
    _same(automatic, module_counterfactual(*args, num_samples=25, seed=3, chunk_size=9))
    uneven = module_counterfactual(*args, num_samples=25, seed=3, chunk_size=11)
    assert not torch.equal(automatic.counterfactual_ids, uneven.counterfactual_ids)
    whole = module_counterfactual(*args, num_samples=25, seed=3, chunk_size=25)
    assert not torch.equal(automatic.counterfactual_ids, whole.counterfactual_ids)  # other draws, same generator
    assert auto_chunk_size(scm, len(PROMPT), budget=12 * per_row) == 12  # a caller's own budget (the study's)


@pytest.mark.parametrize("fits", range(1, 25))
def test_even_chunks_are_the_fewest_and_the_smallest_that_fit(fits):
    """:func:`even_chunk_size` against brute force: of the chunk sizes within ``fits`` that split
    ``n`` draws into the fewest chunks, the smallest (the chunks closest to one size)."""
    from pyro_lmscm.inference.budget import even_chunk_size

    def chunks(n, size):
        return -(-n // size)

    for n in range(1, 121):
        oracle = min(s for s in range(1, fits + 1) if chunks(n, s) == chunks(n, fits))
        assert even_chunk_size(fits, n) == oracle, (fits, n)


def test_smollm2_fp32_at_64_steps_decodes_in_chunks_within_the_memory_budget():
    """The automatic chunk of ``counterfactual(num_samples=64)`` on SmolLM2 fp32 at T = 64 (the
    memory target of issue 34: its 64-row KV cache alone is 209 MB) from the model config alone:
    a chunk's KV cache and step tensors fit :data:`AUTO_CHUNK_BYTES`, so 64 draws run in 4 chunks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyro_lmscm.inference import auto_chunk_size
    from pyro_lmscm.inference.counterfactual import AUTO_CHUNK_BYTES
    from pyro_lmscm.lm import HFLanguageModel

    config = LlamaConfig(  # SmolLM2-135M's shapes, without its weights (meta device)
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    lm = HFLanguageModel(model)
    assert lm.cache_bytes_per_token() == 2 * 30 * 3 * 64 * 4  # 46 KB per row and position
    scm = LanguageModelSCM(lm, max_new_tokens=64)
    size = auto_chunk_size(scm, 8, budget=AUTO_CHUNK_BYTES["cpu"])
    cache = size * (8 + 64) * lm.cache_bytes_per_token()
    assert 12 <= size <= 20 and cache <= AUTO_CHUNK_BYTES["cpu"] < 64 * (8 + 64) * lm.cache_bytes_per_token()
    # the 64 draws run in chunks of one size (4 x 16, not 17 + 17 + 17 + 13), and 16 in one chunk
    cpu = AUTO_CHUNK_BYTES["cpu"]
    assert auto_chunk_size(scm, 8, budget=cpu, num_samples=64) == 16
    assert auto_chunk_size(scm, 8, budget=cpu, num_samples=16) == 16
    # at T = 512 the budget holds 3 rows; the floor keeps 8 in one run (4 draws: one run, not 3 + 1)
    long = LanguageModelSCM(lm, max_new_tokens=512)
    assert AUTO_CHUNK_BYTES["cpu"] // ((8 + 512) * lm.cache_bytes_per_token()) == 3
    assert auto_chunk_size(long, 8, budget=AUTO_CHUNK_BYTES["cpu"]) == 8


@pytest.mark.parametrize(
    "observed, intervention, flags",
    [
        (None, {}, dict(baseline=True)),
        (torch.tensor([5, 9, 3, 7]), {"prompt": [2, 9, 4]}, dict(scores=True, baseline=True)),
        (torch.tensor([5, 9, 3, 7]), {"exclude_1": "factual"}, dict(chunk_size=4)),
        (None, {"w_2": 6}, dict(scores=True, chunk_size=3)),
    ],
)
def test_counterfactual_is_a_batch_of_one_of_counterfactuals(scm, observed, intervention, flags):
    """One core: ``counterfactual()`` gives what ``counterfactuals()`` gives for a list of one
    string, bit for bit (ids, noise statistics, scores, the factual string and its logits)."""
    from pyro_lmscm.inference import counterfactuals

    one = counterfactual(scm, PROMPT, observed, intervention, num_samples=9, seed=4, **flags)
    [batch] = counterfactuals(
        scm, [PROMPT], None if observed is None else [observed], intervention, num_samples=9, seed=4, **flags
    )
    other = counterfactual(scm, PROMPT, observed, intervention, num_samples=9, seed=5, **flags)
    _same(one, batch)
    for name in ("factual_ids", "counterfactual_scores", "interventional_scores", "counterfactual_log_q",
                 "factual_logits"):
        a, b = getattr(one, name), getattr(batch, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert one.log_prob_factual == batch.log_prob_factual and one.noise_stats
    assert not torch.equal(one.counterfactual_ids, other.counterfactual_ids)  # the seed matters


def test_a_decoding_step_of_a_null_counterfactual_makes_two_blocks_of_rows_by_vocabulary(scm, monkeypatch):
    """Per step, the only new ``(rows, V)`` tensors are the LM head's logits and the noise
    (``rows * (V + 1)`` draws, with the rows' top draws):
    the anchored logits are the anchor's own rows (a view), and ``logits + u`` (the argmax,
    the rounding check, the statistics) is reduced a block of rows at a time. Each such
    tensor is a block of megabytes on the heap at LM vocabularies (3 MB at 16 rows of
    SmolLM2); six per step let the heap grow by one most steps (issue 34)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from pyro_lmscm.models import gumbel_max_posterior

    rows, vocab = 16, scm.vocab_size
    monkeypatch.setattr(gumbel_max_posterior, "_SCRATCH", vocab)  # a row, as at SmolLM2's vocabulary
    made = []

    class CountNew(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr()
                for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)
            }
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and rows * vocab <= t.numel() <= rows * (vocab + 1):
                    if t.untyped_storage().data_ptr() not in inputs:
                        made.append(str(func))
            return out

    counterfactual(scm, PROMPT, None, {}, num_samples=2, seed=0)
    with CountNew():
        result = counterfactual(scm, PROMPT, None, {}, num_samples=rows, seed=0)
    steps = result.counterfactual_ids.shape[-1]
    assert result.factual_ids.shape[-1] == steps == 8  # every step anchored, every step 16 rows
    assert len(made) <= 2 * steps, sorted(made)
