"""Edges of the public API found by an adversarial audit: each test failed before its fix
(a raw ``TypeError``/``AttributeError`` from deep inside, or a silently wrong answer)."""

from __future__ import annotations

import re

import pytest
import torch

from pyro_lmscm import Decoding, LanguageModelSCM, counterfactual
from pyro_lmscm.errors import DecodingError, InferenceError, LMSCMError, MechanismError
from pyro_lmscm.testing import tiny_llama

LM = tiny_llama(seed=0)
PROMPT = torch.tensor([2, 3, 4])
OBSERVED = torch.tensor([5, 6, 7])


def _scm(**kwargs) -> LanguageModelSCM:
    return LanguageModelSCM(LM, max_new_tokens=5, **kwargs)


# -- a temperature so small that logits / temperature overflow float32 -------------------------


@pytest.mark.parametrize("temperature", [1e-38, 1e-45])
@pytest.mark.parametrize("observed", [OBSERVED, None], ids=["observed", "sampled"])
def test_an_overflowing_temperature_is_a_decoding_error(temperature, observed):
    """Before: 1e-38 gave a null counterfactual of all pad tokens, not the observation (the
    scaled logits were +inf and the argmax picked token 0); 1e-45 an AbductionError blaming
    the model for a -inf logit (and, with nothing observed, an "observed token")."""
    scm = _scm(decoding=Decoding(temperature=temperature))
    with pytest.raises(DecodingError, match=r"`temperature`=1e-\d+ is too small") as info:
        counterfactual(scm, PROMPT, observed, {}, num_samples=2, seed=0)
    assert isinstance(info.value, LMSCMError)


def test_a_small_temperature_that_fits_float32_still_reproduces_the_observation():
    """The baseline: 1e-30 scales these logits (|l| < 100) to below float32's 3.4e38, and
    the null counterfactual is the observation."""
    scm = _scm(decoding=Decoding(temperature=1e-30))
    result = counterfactual(scm, PROMPT, OBSERVED, {}, num_samples=2, seed=0)
    assert bool((result.counterfactual_ids[:, :3] == OBSERVED).all())


# -- decoding settings: numbers, not bools --------------------------------------------------------


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_decoding_refuses_a_bool(field):
    """Before: Decoding(temperature=True) and Decoding(top_p=True) decoded as 1.0."""
    with pytest.raises(DecodingError, match=f"`{field}`"):
        Decoding(**{field: True})


def test_decoding_takes_numpy_floats():
    """Before: np.float32(0.9) was refused as "must be a float" (only Python floats passed)."""
    np = pytest.importorskip("numpy")
    decoding = Decoding(temperature=np.float32(0.5), top_p=np.float32(0.9))
    assert (decoding.temperature, decoding.top_p) == (0.5, pytest.approx(0.9))
    assert type(decoding.temperature) is float and type(decoding.top_p) is float
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert torch.equal(decoding(logits), Decoding(temperature=0.5, top_p=float(np.float32(0.9)))(logits))


# -- on/off switches are bools: "no" is true in Python -------------------------------------------


def test_collapsed_no_is_refused_not_read_as_true():
    """Before: LanguageModelSCM(collapsed="no") built a collapsed SCM (bool("no") is True)."""
    with pytest.raises(MechanismError, match="`collapsed` must be True or False, got 'no'"):
        _scm(collapsed="no")
    assert _scm(collapsed=True).collapsed is True and _scm().collapsed is False  # the baseline


def test_replay_factual_no_is_refused_before_anything_runs():
    """Before: compare_abduction(replay_factual="no") replayed the factual model."""
    from pyro_lmscm import compare_abduction

    with pytest.raises(InferenceError, match="`replay_factual` must be True or False, got 'no'"):
        compare_abduction(_scm(), PROMPT, OBSERVED, {}, methods=["exact"], num_samples=2, replay_factual="no")


def test_autocorrelated_no_is_refused():
    from pyro_lmscm import CounterfactualDistribution

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 9, 8]])
    with pytest.raises(InferenceError, match="`autocorrelated` must be True or False, got 'no'"):
        CounterfactualDistribution(_scm(), PROMPT, OBSERVED, ids, autocorrelated="no")
    assert CounterfactualDistribution(_scm(), PROMPT, OBSERVED, ids, autocorrelated=True).autocorrelated is True


# -- every argument that takes a language model checks that it is one ----------------------------


def _lm_takers():
    from pyro_lmscm import ActivationSteering, AffineSteering, ModelSwap, rome_edit
    from pyro_lmscm.explorer.session import Explorer
    from pyro_lmscm.interventions.finetune import lora_finetune
    from pyro_lmscm.interventions.memit import memit_edit
    from pyro_lmscm.interventions.spec import parse_intervention

    return {
        "ModelSwap": (lambda lm: ModelSwap(lm), "ModelSwap: `other`"),
        "ActivationSteering.from_contrastive": (
            lambda lm: ActivationSteering.from_contrastive(lm, ["the man"], ["the woman"], layer=0),
            "ActivationSteering.from_contrastive: `lm`"),
        "AffineSteering.from_contrastive": (
            lambda lm: AffineSteering.from_contrastive(lm, ["the man"], ["the woman"], layer=0),
            "AffineSteering.from_contrastive: `lm`"),
        "rome_edit": (lambda lm: rome_edit(lm, "the man said", "man", "she", layer=0), "rome_edit: `lm`"),
        "memit_edit": (lambda lm: memit_edit(lm, [("the man said", "man", "she")]), "memit_edit: `lm`"),
        "parse_intervention": (lambda lm: parse_intervention("w_0=3", lm), "parse_intervention: `lm`"),
        "Explorer": (lambda lm: Explorer(lm), "Explorer: `lm`"),
        "lora_finetune": (lambda lm: lora_finetune(lm, ["the man said"], steps=1), "lora_finetune: `lm`"),
    }


@pytest.mark.parametrize("taker", list(_lm_takers()))
@pytest.mark.parametrize("bad", [None, "smollm2-135m-instruct", LM.model], ids=["None", "str", "bare HF model"])
def test_a_language_model_argument_refuses_anything_else(taker, bad):
    """Before: AttributeError ('NoneType' object has no attribute 'vocab_size' / 'model',
    'LlamaForCausalLM' object has no attribute 'encode'), at construction or, for
    ModelSwap and the Explorer, only at their first use."""
    call, fragment = _lm_takers()[taker]
    with pytest.raises(MechanismError, match="must be an HFLanguageModel") as info:
        call(bad)
    assert fragment in str(info.value)
    if bad is LM.model:
        assert "wrap it: HFLanguageModel(model, tokenizer)" in str(info.value)


@pytest.mark.parametrize("bad", [None, "gpt2", torch.nn.Linear(2, 2)], ids=["None", "str", "a Linear"])
def test_hf_language_model_refuses_what_is_no_causal_lm(bad):
    """Before: AttributeError ('NoneType' object has no attribute 'eval', 'Linear' object has
    no attribute 'config')."""
    from pyro_lmscm import HFLanguageModel

    with pytest.raises(MechanismError, match="HFLanguageModel: `model` must be a transformers model"):
        HFLanguageModel(bad)


def test_hf_language_model_refuses_a_tokenizer_that_is_no_tokenizer():
    """Before: HFLanguageModel(model, "gpt2") was accepted, to fail at the first encode."""
    from pyro_lmscm import HFLanguageModel
    from pyro_lmscm.errors import TokenizationError

    with pytest.raises(TokenizationError, match="HFLanguageModel: `tokenizer` must be a transformers tokenizer"):
        HFLanguageModel(LM.model, "gpt2")
    assert HFLanguageModel(LM.model, LM.tokenizer).encode("the man").tolist() == LM.encode("the man").tolist()


# -- compare_abduction checks its own arguments, before anything runs ----------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(options={"exact": 5}), "`options['exact']` must be a mapping of abduct() options, got int 5"),
        (dict(options=[("exact", {})]), "`options` must be a mapping from method names to options"),
        (dict(seed=None), "`seed` must be an integer >= 0"),
        (dict(reference_samples=0), "`reference_samples` must be a positive integer, got 0"),
        (dict(num_samples=0), "`num_samples` must be a positive integer, got 0"),
        (dict(methods="exact"), "`methods` must be a list of method names or AbductionMethod objects, got str"),
        (dict(scm=None), "`scm` must be a LanguageModelSCM"),
    ],
)
def test_compare_abduction_names_its_bad_argument(kwargs, fragment):
    """Before: options={"exact": 5} and seed=None raised TypeError, reference_samples=0 was
    blamed on `num_samples`, and methods="exact" on an unknown method 'e'."""
    from pyro_lmscm import compare_abduction

    call = dict(scm=_scm(), methods=["exact"], num_samples=2)
    call.update(kwargs)
    with pytest.raises(InferenceError) as info:
        compare_abduction(call.pop("scm"), PROMPT, OBSERVED, {}, **call)
    assert fragment in str(info.value), str(info.value)


def test_compare_abduction_takes_the_largest_seed():
    """Before: seed=2**64 - 1 ran the reference, then refused the methods' seed + 2 + i."""
    from pyro_lmscm import compare_abduction

    table = compare_abduction(_scm(), PROMPT, OBSERVED, {}, methods=["exact", "prior"], num_samples=2, seed=2**64 - 1)
    assert [row.method for row in table.rows] == ["exact", "prior"]


# -- containers and tensors of the wrong kind ---------------------------------------------------


@pytest.mark.parametrize(
    "prompts, observed, fragment",
    [
        (None, None, "`prompts` must be a non-empty list"),
        ((p for p in [PROMPT]), None, "`prompts` must be a non-empty list"),
        (5, None, "`prompts` must be a non-empty list"),
        ([PROMPT], "said", "`observed` must be None or a list of 1 observations"),
        ([PROMPT], 5, "`observed` must be None or a list of 1 observations"),
    ],
    ids=["None", "a generator", "an int", "observed str", "observed int"],
)
def test_counterfactuals_refuses_what_is_no_list(prompts, observed, fragment):
    """Before: TypeError "object of type 'generator' has no len()" (and for None, 5); an
    observed str was counted by its characters ("1 prompts but 5 observations")."""
    from pyro_lmscm import counterfactuals

    with pytest.raises(InferenceError, match=fragment):
        counterfactuals(_scm(), prompts, observed, num_samples=1, seed=0)
    assert len(counterfactuals(_scm(), (PROMPT,), (OBSERVED,), num_samples=1, seed=0)) == 1  # a tuple is a list


@pytest.mark.parametrize("raw_logits", ["x", [[0.0] * 28] * 3], ids=["str", "a nested list"])
def test_raw_logits_must_be_a_tensor(raw_logits):
    """Before: AttributeError "'str' object has no attribute 'shape'"."""
    from pyro_lmscm import exact_counterfactual
    from pyro_lmscm.errors import ObservationError

    with pytest.raises(ObservationError, match=r"`raw_logits` must be a floating tensor of shape \(\.\.\., 3, 28\)"):
        exact_counterfactual(_scm(), PROMPT, OBSERVED, {}, raw_logits=raw_logits)


@pytest.mark.parametrize("delta", ["x", None, {"a": 1}], ids=["str", "None", "dict"])
def test_a_weight_delta_must_be_numbers(delta):
    """Before: TypeError "new(): invalid data type 'str'" (and for None, a dict)."""
    from pyro_lmscm import WeightDelta

    name = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(MechanismError, match=f"WeightDelta: the delta of '{name}' must be a floating tensor"):
        WeightDelta({name: delta})


# -- path arguments -------------------------------------------------------------------------------


def _path_takers():
    from pyro_lmscm.study import StudyConfig, load_study
    from pyro_lmscm.study.corpus import read_corpus

    return {
        "StudyConfig.from_file": (StudyConfig.from_file, "study config file"),
        "load_study": (load_study, "`output_dir`"),
        "read_corpus": (read_corpus, "corpus file"),
    }


@pytest.mark.parametrize("taker", list(_path_takers()))
@pytest.mark.parametrize("bad", [None, 5, ["a.yaml"]], ids=["None", "int", "list"])
def test_a_path_argument_refuses_what_is_no_path(taker, bad):
    """Before: TypeError "expected str, bytes or os.PathLike object, not NoneType" from pathlib."""
    from pyro_lmscm.errors import StudyError

    call, fragment = _path_takers()[taker]
    with pytest.raises(StudyError, match="must be a path") as info:
        call(bad)
    assert fragment in str(info.value)


# -- the exact queries check their token arguments --------------------------------------------------


@pytest.fixture(scope="module")
def exact():
    from pyro_lmscm import exact_counterfactual

    return exact_counterfactual(_scm(), PROMPT, OBSERVED, {"w_1": 3})


@pytest.mark.parametrize(
    "query, fragment",
    [
        (lambda e: e.next_token_probs([99]), "`prefix` has ids outside the vocabulary [0, 28): [99]"),
        (lambda e: e.next_token_probs("the"), "`prefix` is a str"),
        (lambda e: e.next_token_probs([5.7]), "`prefix` must hold integer token ids"),
        (lambda e: e.prob_unchanged("x"), "`relabel` is a str"),
        (lambda e: e.first_divergence(torch.arange(28) + 0.5), "`relabel` must hold integer token ids"),
    ],
    ids=["prefix out of vocabulary", "prefix str", "prefix float", "relabel str", "relabel float"],
)
def test_exact_queries_check_their_token_arguments(exact, query, fragment):
    """Before: next_token_probs([99]) an IndexError from the embedding, a str prefix or
    relabel a TypeError, and a float prefix or relabel was truncated to integers silently."""
    from pyro_lmscm.errors import ObservationError

    with pytest.raises(ObservationError) as info:
        query(exact)
    assert fragment in str(info.value), str(info.value)


def test_an_empty_prefix_is_the_first_step(exact):
    """The baseline: [] and None are the empty prefix, (1, t) a prefix of t tokens."""
    first = exact.next_token_probs(None)
    assert torch.equal(exact.next_token_probs([]), first)
    assert torch.equal(exact.next_token_probs(torch.tensor([[5]])), exact.next_token_probs([5]))
    assert float(first.sum()) == pytest.approx(1.0)


def test_an_empty_list_of_ids_is_called_empty():
    """Before: counterfactual(scm, [], ...) said "`prompt` must hold integer token ids, got dtype
    torch.float32" (torch.as_tensor([]) is float)."""
    from pyro_lmscm.errors import ObservationError

    with pytest.raises(ObservationError, match="`prompt` must hold at least one token id"):
        counterfactual(_scm(), [], OBSERVED, {}, num_samples=1, seed=0)
    with pytest.raises(ObservationError, match="the observation is empty"):
        counterfactual(_scm(), PROMPT, [], {}, num_samples=1, seed=0)


# -- metrics take token ids: integers, not truncated floats ------------------------------------------


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda m: m.token_edit_distance([1.5], [1]), "`a` must hold integer token ids, got 1.5"),
        (lambda m: m.token_edit_distance(None, [1]), "`a` must be token ids (a list or a 1-D integer tensor)"),
        (lambda m: m.first_divergence([1], None), "`b` must be token ids"),
        (lambda m: m.common_prefix_length([1, True], [1, 1]), "`a` must hold integer token ids, got True"),
        (lambda m: m.trim_after_end([1, 2, 3], "x"), "`eos_token_ids` is a str"),
        (lambda m: m.trim_after_end([1, 2, 3], [2.5]), "`eos_token_ids` must hold integer token ids, got 2.5"),
    ],
    ids=["float", "None", "None b", "bool", "eos str", "eos float"],
)
def test_token_metrics_refuse_what_is_no_token_ids(call, fragment):
    """Before: token_edit_distance([1.5], [1]) was 0 (int() truncated 1.5 to 1), None a
    TypeError (not iterable), an eos str a TypeError from `in`."""
    from pyro_lmscm import metrics
    from pyro_lmscm.errors import ObservationError

    with pytest.raises(ObservationError) as info:
        call(metrics)
    assert fragment in str(info.value), str(info.value)


def test_token_metrics_take_numpy_and_tensor_ids():
    np = pytest.importorskip("numpy")
    from pyro_lmscm import metrics

    assert metrics.token_edit_distance(np.array([5, 6, 7]), torch.tensor([5, 7])) == 1
    assert metrics.trim_after_end((5, 7, 1, 0), eos_token_ids={1}) == [5, 7, 1]


@pytest.mark.parametrize("permutation", ["x", torch.arange(28) + 0.5], ids=["str", "floats"])
def test_inverse_cdf_permutation_must_be_integer_ids(permutation):
    """Before: a str was a TypeError; floats were truncated to a permutation silently."""
    from pyro_lmscm import InverseCDF

    with pytest.raises(InferenceError, match=r"InverseCDF\(permutation=...\) must be a permutation of range\(V\)"):
        InverseCDF(permutation=permutation)


# -- seeds in range everywhere ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**64], ids=["negative", "2**64"])
def test_attribute_refuses_a_seed_torch_refuses(seed):
    """Before: attribute(seed=-1) was accepted (checked as any integer); with more parts than
    max_exact_parts, torch.Generator.manual_seed then raised a RuntimeError."""
    from pyro_lmscm import ActivationSteering
    from pyro_lmscm.inference import attribute

    scm = _scm(mechanisms={"steer": ActivationSteering(torch.ones(32), layer=0)})
    with pytest.raises(InferenceError, match="`seed` must be an integer >= 0 and <= 18446744073709551615"):
        attribute(scm, PROMPT, OBSERVED, {"mechanism": "steer"}, seed=seed)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(scm=None), "`scm` must be a LanguageModelSCM, got NoneType"),
        (dict(log_weights="x"), "`log_weights` must be a tensor of shape (1,), got 'x'"),
        (dict(noise_stats=5), "`noise_stats` must be a mapping from names to tensors, got int"),
    ],
)
def test_counterfactual_distribution_names_its_bad_argument(kwargs, fragment):
    """Before: AttributeError ('NoneType' object has no attribute 'check_prompt', 'int' object
    has no attribute 'items') and TypeError (new(): invalid data type 'str')."""
    from pyro_lmscm import CounterfactualDistribution

    call = dict(scm=_scm(), prompt_ids=PROMPT, factual_ids=OBSERVED, ids=torch.tensor([[5, 6, 7]]))
    call.update(kwargs)
    with pytest.raises(LMSCMError) as info:
        CounterfactualDistribution(**call)
    assert fragment in str(info.value), str(info.value)


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["no such host!", "203.0.113.7"], ids=["unresolvable", "not this machine's"])
def test_app_refuses_a_host_it_cannot_serve_on_before_loading(tmp_path, host):
    """Before: socket.gaierror / OSError tracebacks (exit 1) after the model had loaded.
    (203.0.113.7 is TEST-NET-3, never a local address.) The model folder does not exist:
    the host is checked first."""
    from typer.testing import CliRunner

    from pyro_lmscm.cli import app

    result = CliRunner().invoke(app, ["app", "--model", str(tmp_path / "nope"), "--host", host, "--port", "0"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot serve on --host"), result.output
    assert "Traceback" not in result.output


# -- torch threads: a count libgomp can allocate ---------------------------------------------------


def test_a_study_refuses_a_thread_count_past_the_limit():
    """Before: StudyConfig(threads=10**9) was accepted, and run_study's torch.set_num_threads
    then aborted the process (libgomp: out of memory allocating 216000001344 bytes)."""
    from pyro_lmscm.errors import StudyError
    from pyro_lmscm.study import StudyConfig
    from pyro_lmscm.validation import MAX_THREADS

    with pytest.raises(StudyError, match=f"`threads` must be an integer >= 1 and <= {MAX_THREADS}, got 1000000000"):
        StudyConfig(corpus="demo", threads=10**9)
    assert StudyConfig(corpus="demo", threads=MAX_THREADS).threads == MAX_THREADS  # the baseline


@pytest.mark.parametrize("command", ["compare-mechanisms", "compare-inference", "study", "app"])
def test_the_cli_refuses_a_thread_count_past_the_limit(command):
    """Before: --threads 1000000000 aborted the process in torch.set_num_threads (run in a
    child process, so that the baseline cannot take the test run down with it)."""
    import subprocess
    import sys

    args = [command, "--threads", "1000000000"]
    code = f"import sys; from pyro_lmscm.cli import app; sys.argv = ['pyro-lmscm', *{args!r}]; app()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Invalid value for '--threads'" in done.stderr and "1024" in done.stderr, done.stderr[-2000:]


# -- a caller's pyro.plate around a call that draws its own plate ---------------------------------


def _plated_calls():
    from pyro_lmscm import abduct, compare_abduction, counterfactuals

    return {
        "counterfactual()": lambda: counterfactual(_scm(), PROMPT, OBSERVED, {"w_1": 9}, num_samples=2, seed=0),
        "counterfactual(observed=None)": lambda: counterfactual(_scm(), PROMPT, None, {}, num_samples=2, seed=0),
        "counterfactuals()": lambda: counterfactuals(_scm(), [PROMPT], [OBSERVED], {"w_1": 9}, num_samples=2, seed=0),
        "abduct()": lambda: abduct(_scm(), PROMPT, OBSERVED, num_samples=2, seed=0),
        "compare_abduction()": lambda: compare_abduction(_scm(), PROMPT, OBSERVED, {}, methods=["exact"],
                                                         num_samples=2, seed=0),
    }


@pytest.mark.parametrize("dim", [-1, -2, None])
@pytest.mark.parametrize("name", list(_plated_calls()))
def test_a_call_inside_a_callers_plate_is_an_inference_error(name, dim):
    """Before: Pyro's "plates '__draws' and 'data' collide at dim=-1" (a ValueError), or, for
    a plate at another dim and nothing observed, torch's "stack expects each tensor to be
    equal size": the draws are the call's own plate. The Pyro stack is left as it was."""
    import pyro
    from pyro.poutine.runtime import get_plates

    call = _plated_calls()[name]
    with pyro.plate("data", 3, dim=dim):
        with pytest.raises(InferenceError, match=r"runs inside pyro.plate 'data' \(size 3, dim -[12]\)") as info:
            call()
        assert [frame.name for frame in get_plates()] == ["data"]
    assert str(info.value).startswith(name.split("(")[0])
    assert get_plates() == ()
    call()  # the baseline: outside the plate the same call runs


def test_exact_queries_run_inside_a_callers_plate():
    """No plate of draws: exact_counterfactual() is unaffected by a plate around it."""
    import pyro

    from pyro_lmscm import exact_counterfactual

    outside = exact_counterfactual(_scm(), PROMPT, OBSERVED, {"w_1": 9}).first_divergence()
    with pyro.plate("data", 3):
        inside = exact_counterfactual(_scm(), PROMPT, OBSERVED, {"w_1": 9}).first_divergence()
    assert torch.equal(inside, outside)


# -- do(prompt=...) is one string, as the `prompt` argument ------------------------------------


@pytest.mark.parametrize("shape", [(1, 2), (2, 2), (3, 2), (1, 1, 2)])
def test_a_do_prompt_is_one_string(shape):
    """Before: a (1, L) or (num_samples, L) prompt was taken (a batch of prompts, against the
    `prompt` argument's (L,)), and any other batch raised Pyro's "Shape mismatch inside
    plate('__draws')" or torch's expand error."""
    from pyro_lmscm.errors import InterventionError

    value = torch.tensor([2, 9]).expand(*shape)
    message = f"do(prompt=...): `prompt` must have shape (L,), got {tuple(shape)}."
    with pytest.raises(InterventionError, match=re.escape(message)):
        counterfactual(_scm(), PROMPT, OBSERVED, {"prompt": value}, num_samples=2, seed=0)
    result = counterfactual(_scm(), PROMPT, OBSERVED, {"prompt": torch.tensor([2, 9])}, num_samples=2, seed=0)
    assert result.counterfactual_ids.shape == (2, 5)  # the baseline: one string
