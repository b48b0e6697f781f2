import pytest

from pyro_lmscm.study import CorpusItem, StudyWorker, read_corpus, string_seed
from pyro_lmscm.study.records import DRAW_FIELDS


@pytest.fixture
def worker(make_config):
    return StudyWorker(make_config())


def test_record_fields(worker, corpus_file):
    item = read_corpus(corpus_file)[0]
    record = worker.process(item)
    assert record["index"] == 0 and record["group"] == "men" and record["seed"] == string_seed(0, 0)
    assert record["error"] is None and not record["continuation_given"]
    assert len(record["counterfactual"]) == len(record["interventional"]) == 3
    factual = record["factual"]
    assert len(factual["tokens"]) == len(factual["ids"]) == len(factual["token_log_prob_factual"]) == factual["length"]
    for draw in record["counterfactual"] + record["interventional"]:
        assert tuple(draw) == DRAW_FIELDS
        assert draw["changed"] == (draw["ids"] != factual["ids"])
        assert draw["common_prefix"] == (draw["first_divergence"] if draw["changed"] else len(draw["ids"]))
        assert 0.0 <= draw["normalized_token_edit_distance"] <= 1.0
        assert draw["flipped"] is None or factual["attribute"] in ("male", "both")


def test_a_record_depends_only_on_seed_and_index(worker, make_config, corpus_file):
    items = read_corpus(corpus_file)
    forward = [worker.process(item) for item in items]
    backward = [worker.process(item) for item in reversed(items)][::-1]
    assert forward == backward  # order (sharding, resuming) does not matter
    fresh = StudyWorker(make_config(threads=2, shard_size=1)).process(items[4])
    assert fresh == forward[4]  # nor does a new worker
    other_seed = StudyWorker(make_config(seed=1)).process(items[4])
    assert other_seed["factual"]["ids"] != forward[4]["factual"]["ids"] or other_seed["seed"] != forward[4]["seed"]


def test_null_intervention_changes_nothing(make_config, corpus_file):
    worker = StudyWorker(make_config(intervention=""))
    for item in read_corpus(corpus_file):
        record = worker.process(item)
        assert not any(draw["changed"] for draw in record["counterfactual"])
        assert all(draw["first_divergence"] is None for draw in record["counterfactual"])
        logp = record["factual"]["log_prob_factual"]
        assert all(d["log_prob_factual"] == d["log_prob_intervened"] == logp for d in record["counterfactual"])


def test_observed_continuation_is_kept_and_cut(make_config):
    worker = StudyWorker(make_config(max_new_tokens=3))
    record = worker.process(CorpusItem(0, "the story", "day night was home"))
    assert record["continuation_given"] and record["truncated"]
    assert record["factual"]["text"] == "day night was"


def test_impossible_string_gives_an_error_record(make_config):
    worker = StudyWorker(make_config(top_k=1))
    record = worker.process(CorpusItem(3, "the man", "she she she"))
    assert record["error"].startswith("AbductionError") and "counterfactual" not in record
    record = worker.process(CorpusItem(4, "the zebra", None))  # not in the tiny vocabulary
    assert record["error"].startswith("TokenizationError")


def test_the_worker_runs_its_batches_with_heap_allocations(make_config, corpus_file, linear_calls):
    """``process_many`` runs in ``compute_scope``, hence in ``heap_allocations`` (large tensors
    reuse freed memory): every model call happens inside a heap scope, and the scope is closed
    afterwards (glibc has its defaults back)."""
    from pyro_lmscm.runtime import heap

    if heap._glibc() is None:
        pytest.skip("no glibc: heap_allocations is a no-op")
    worker = StudyWorker(make_config(batch_size=2))
    records = worker.process_many(read_corpus(corpus_file)[:2])
    assert all(record["error"] is None for record in records)
    assert linear_calls and linear_calls.all_in_heap_scope() and heap._HEAP_SCOPES[0] == 0


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_study_multiplies_in_float32_on_a_cpu_without_bf16_kernels(
    make_config, corpus_file, linear_calls, native
):
    """The worker runs its batches in ``bf16_kernels``: where the CPU has no native bfloat16
    GEMM, the model's linears of 8 rows or more receive float32 inputs; where it has one
    (the baseline), every linear receives bfloat16."""
    import torch

    linear_calls.native(native)
    worker = StudyWorker(make_config(dtype="bfloat16", batch_size=4))
    linear_calls.clear()  # the calls of process_many alone
    records = worker.process_many(read_corpus(corpus_file)[:4])
    assert all(record["error"] is None for record in records)
    seen = {dtype for _, dtype, _ in linear_calls}
    assert seen == ({torch.bfloat16} if native else {torch.bfloat16, torch.float32})
    assert not any("forward" in vars(m) for m in worker.lm.model.modules())
