import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from pyro_lmscm.cli import app
from pyro_lmscm.testing import tiny_llama

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def test_counterfactual_json_null_intervention_reproduces(tiny_folder):
    result = _run("counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                  "said he went home", "--samples", "3", "--max-new-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["factual_text"] == "said he went home"
    n = len(out["factual_ids"])
    assert all(row[:n] == out["factual_ids"] for row in out["counterfactual_ids"])


def test_counterfactual_forced_token(tiny_folder):
    result = _run("counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                  "said he went home", "--intervention", 'w_1="she"', "--samples", "2",
                  "--max-new-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert all(text.split()[:2] == ["said", "she"] for text in out["counterfactual_texts"])


def test_counterfactual_table_output(tiny_folder):
    result = _run("counterfactual", "--model", tiny_folder, "--prompt", "the man", "--generate",
                  "--samples", "2", "--max-new-tokens", "5", "--top-k", "5")
    assert result.exit_code == 0, result.output
    assert "counterfactual #1" in result.stdout and "draws changed" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "said he", "--intervention", "nope=1"], "unknown intervention key 'nope'"),
        (["--text", "said unknownword"], "round trip"),
        (["--text", "said he", "--top-k", "0"], "top_k"),
        ([], "exactly one of --text"),
    ],
)
def test_errors_are_one_line(tiny_folder, args, message):
    result = _run("counterfactual", "--model", tiny_folder, "--prompt", "the man", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_models_lists_the_embedded_model():
    result = _run("models")
    assert result.exit_code == 0, result.output
    assert "smollm2-135m-instruct" in result.stdout


def test_compare_inference_command(tmp_path):
    plot = tmp_path / "compare.png"
    result = _run("compare-inference", "--tiny", "--num-samples", "32", "--max-new-tokens", "2",
                  "--methods", "exact,importance", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert "| exact" in result.stdout and plot.read_bytes()[:4] == b"\x89PNG"


def test_compare_inference_with_too_few_draws_is_one_line(tmp_path):
    result = _run("compare-inference", "--tiny", "--num-samples", "8", "--max-new-tokens", "2",
                  "--methods", "exact", "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and "raise --num-samples" in result.output


def test_text_null_intervention_reports_no_change_and_stops_at_the_observation(tiny_folder):
    """With --text the counterfactual covers the observed span (its default length), and the
    null intervention changes no draw."""
    result = _run("counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                  "said he went home", "--samples", "3", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert all(row == out["factual_ids"] for row in out["counterfactual_ids"])
    table = _run("counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                 "said he went home", "--samples", "3", "--max-new-tokens", "8")
    assert table.exit_code == 0, table.output
    assert "│ counterfactual │ 0/3 " in table.stdout  # continuing past the observation is no change
    forced = _run("counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                  "said he went home", "--samples", "3", "--intervention", 'w_1="she"')
    assert "│ counterfactual │ 3/3 " in forced.stdout  # the baseline: a real change is counted


NOISY_DRIVER = textwrap.dedent("""
    import sys, warnings
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    original = AutoModelForCausalLM.from_pretrained.__func__

    def noisy(cls, *args, **kwargs):  # a third-party call that warns, logs and draws a bar
        warnings.warn("third-party deprecation", FutureWarning)
        hf_logging.get_logger("transformers.fake").warning("third-party log line")
        for _ in hf_logging.tqdm(range(3), desc="third-party bar"):
            pass
        return original(cls, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(noisy)
    from pyro_lmscm.cli import app
    app(prog_name="pyro-lmscm")
""")


def test_cli_is_quiet_unless_verbose(tiny_folder, tmp_path):
    driver = tmp_path / "noisy.py"
    driver.write_text(NOISY_DRIVER)
    args = ["counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text", "said he", "--samples", "2"]
    noise = ("third-party deprecation", "third-party log line", "third-party bar")
    quiet = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "counterfactual #1" in quiet.stdout
    assert not any(line in quiet.stderr for line in noise), quiet.stderr
    assert "Warning" not in quiet.stderr and "Loading weights" not in quiet.stderr, quiet.stderr
    verbose = subprocess.run(
        [sys.executable, str(driver), "--verbose", *args], capture_output=True, text=True, timeout=300
    )
    assert verbose.returncode == 0, verbose.stderr
    assert all(line in verbose.stderr for line in noise), verbose.stderr


@pytest.mark.slow
def test_emoji_and_null_intervention_on_smollm2():
    """The acceptance run: every draw reproduces the observation, and the emoji (four
    byte-level tokens) prints whole in every row."""
    result = _run("counterfactual", "--prompt", "The nurse said that", "--text", " she was 😴 tired.",
                  "--samples", "4")
    assert result.exit_code == 0, result.output
    assert "│ counterfactual │ 0/4 " in result.stdout
    # factual, the 3 shown draws and the most probable counterfactual
    assert result.stdout.count("😴") == 5 and "\ufffd" not in result.stdout
    assert "exact P(unchanged) = 1;" in result.stdout


def test_exact_probabilities_in_the_output(tiny_folder):
    """The null intervention: P(unchanged) = 1 and the observation is the most probable
    counterfactual; a forced token: P(unchanged) = 0 and the mode carries the forced token."""
    args = ["counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text", "said he went home",
            "--samples", "2", "--json"]
    null = json.loads(_run(*args).stdout)["exact"]
    assert null["prob_unchanged"] == 1.0 and null["first_divergence"][-1] == 1.0
    assert null["mode_text"] == "said he went home" and null["mode_log_prob"] == 0.0
    forced = json.loads(_run(*args, "--intervention", 'w_1="she"').stdout)["exact"]
    assert forced["prob_unchanged"] == 0.0 and forced["first_divergence"][1] == 1.0
    assert forced["mode_text"].split()[:2] == ["said", "she"]
    table = _run(*args[:-1])
    assert "exact P(unchanged) = 1;" in table.stdout and "most probable counterfactual" in table.stdout


def test_the_counterfactual_command_prints_the_bounds_over_mechanisms(tiny_folder):
    """--json carries bounds() of the observation (the SCM's value inside the stable interval,
    the stable one inside the other's); the table prints them; the null intervention gives 1
    for every mechanism."""
    args = ["counterfactual", "--model", tiny_folder, "--prompt", "the man", "--generate", "--max-new-tokens", "4",
            "--samples", "2"]
    null = json.loads(_run(*args, "--json").stdout)["exact"]["bounds"]
    names = ("model", "gumbel", "stable_low", "any_low", "any_high")
    assert {null[f"prob_unchanged_{name}"] for name in names} == {1.0}
    changed = json.loads(_run(*args, "--intervention", "prompt=the woman", "--json").stdout)["exact"]
    bounds = changed["bounds"]
    for query in ("prob_unchanged", "expected_first_divergence"):
        value, stable = bounds[f"{query}_model"], (bounds[f"{query}_stable_low"], bounds[f"{query}_stable_high"])
        assert bounds[f"{query}_any_low"] <= stable[0] <= value <= stable[1] <= bounds[f"{query}_any_high"]
    assert bounds["prob_unchanged_model"] == changed["prob_unchanged"]
    assert bounds["prob_unchanged_stable_high"] < 1.0  # (the intervention matters)
    table = " ".join(_run(*args, "--intervention", "prompt=the woman").stdout.split())
    expected = (f"over mechanisms P(unchanged) {bounds['prob_unchanged_model']:.2g} (stable mechanisms "
                f"{bounds['prob_unchanged_stable_low']:.2g}–{bounds['prob_unchanged_stable_high']:.2g}; any mechanism "
                f"{bounds['prob_unchanged_any_low']:.2g}–{bounds['prob_unchanged_any_high']:.2g}); "
                f"E[first divergence] {bounds['expected_first_divergence_model']:.2g} (stable")
    assert expected in table, table
    assert "P(unchanged) 1 (stable mechanisms 1–1; any mechanism 1–1)" in " ".join(_run(*args).stdout.split())


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_counterfactual_command_computes_in_compute_scope(tiny_folder, linear_calls, native):
    """All the model work of ``counterfactual --dtype bfloat16`` (the draws and the exact
    queries with their beam search) runs in ``compute_scope``: linears of 8 rows or more in
    float32 where the CPU has no native bfloat16 GEMM, in bfloat16 where it has one (the
    baseline), and all in a heap_allocations scope."""
    import torch

    linear_calls.native(native)
    # 2 + 9 tokens: the exact queries' teacher-forced passes have 8 rows or more too
    text = "said he went home and the old doctor smiled"
    result = _run("counterfactual", "--model", tiny_folder, "--dtype", "bfloat16", "--prompt", "the man", "--text",
                  text, "--intervention", 'w_1="she"', "--samples", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exact"]["prob_unchanged"] == 0.0
    wide = {dtype for rows, dtype, _ in linear_calls if rows >= 8}
    assert wide == ({torch.bfloat16} if native else {torch.float32})
    assert linear_calls.all_in_heap_scope()


def test_compare_mechanisms_command(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the man said he\nthe old doctor walked\n")
    result = _run("compare-mechanisms", "--tiny", "--corpus", str(corpus), "--intervention", "prompt=the woman said",
                  "--max-new-tokens", "3", "--samples", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["noise"] for r in rows] == ["GumbelMax()", "InverseCDF(order='probability')",
                                          "InverseCDF(order='vocabulary')"]
    assert all(r["strings"] == 2 and 0 <= r["prob_unchanged"] <= 1 for r in rows)
    bad = _run("compare-mechanisms", "--tiny", "--corpus", str(tmp_path / "missing.txt"))
    assert bad.exit_code == 2 and "does not exist" in " ".join(bad.output.split())


@pytest.fixture(scope="module")
def edited_folder(tmp_path_factory):
    """The tiny model with small changes to the MLPs of both layers: a model swap split per layer."""
    import torch

    path = tmp_path_factory.mktemp("edited")
    lm = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(2):
            weight = lm.model.get_parameter(f"model.layers.{i}.mlp.down_proj.weight")
            weight.add_(0.05 * torch.randn(32, 64, generator=g))
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def test_attribute_command(tiny_folder, edited_folder, tmp_path):
    import math

    from pyro_lmscm import LanguageModelSCM
    from pyro_lmscm.inference import exact_counterfactual
    from pyro_lmscm.interventions import ModelSwap
    from pyro_lmscm.loading import load_lm

    args = ["attribute", "--model", tiny_folder, "--prompt", "the man", "--text", "said he went home",
            "--intervention", f"model={edited_folder}"]
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["parts"] == ["layer 0", "layer 1"] and out["exact"] and out["num_passes"] == 4
    assert abs(sum(out["shapley"].values()) - math.log(out["prob_unchanged"])) < 1e-9
    lm, other = load_lm(tiny_folder), load_lm(edited_folder)  # the whole: P(unchanged) of the swap itself
    scm = LanguageModelSCM(lm, 4, mechanisms={"model": ModelSwap(other)})
    exact = exact_counterfactual(scm, lm.encode("the man"), lm.encode("said he went home"), {"mechanism": "model"})
    assert abs(out["prob_unchanged"] - exact.prob_unchanged()) < 1e-6
    table = _run(*args, "--plot", str(tmp_path / "parts.png"))
    assert table.exit_code == 0, table.output
    assert (tmp_path / "parts.png").read_bytes()[:4] == b"\x89PNG"
    assert "layer 1" in table.stdout and "Shapley values add up to" in table.stdout
    refused = _run(*args, "--by", "step")
    assert refused.exit_code == 2 and "acts on every position" in " ".join(refused.output.split())
