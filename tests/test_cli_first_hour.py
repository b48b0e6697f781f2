"""Issue 40: devices, error messages, progress, the rendering of interventions and what the
command line says about its own output."""

import os

import pytest
import torch
import typer
from typer.testing import CliRunner

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.cli import app
from pyro_lmscm.errors import AbductionError, ModelLoadError
from pyro_lmscm.interventions.spec import _gender_options, describe, read_spec, render_spec
from pyro_lmscm.loading import check_device, load_lm
from pyro_lmscm.models import Decoding
from pyro_lmscm.reporting import progress_to, quiet_third_party, verbose_output
from pyro_lmscm.testing import tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    """Another tiny model with the same tokenizer (other weights): a ModelSwap to attribute."""
    path = tmp_path_factory.mktemp("other")
    lm = tiny_llama(seed=1)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def _loading_commands():
    """Every command with a --model option loads a model (found by introspection, so a new
    command cannot be missed)."""
    group = typer.main.get_command(app)
    return {name: cmd for name, cmd in group.commands.items()
            if any(p.name == "model" for p in cmd.params)}


#: the least arguments with which each command runs on the tiny folder (a corpus is written per test)
ARGS = {
    "demo": ["--text", "said he", "--samples", "1", "--max-new-tokens", "2"],
    "counterfactual": ["--prompt", "the man", "--text", "said he", "--samples", "1", "--json"],
    "attribute": ["--prompt", "the man", "--text", "said he", "--intervention", "model={other}", "--json"],
    "compare-mechanisms": ["--corpus", "{corpus}", "--intervention", "w_0=3", "--samples", "1",
                           "--max-new-tokens", "2", "--json"],
    "compare-inference": ["--prompt", "the man", "--counterfactual-prompt", "the woman", "--num-samples", "24",
                          "--max-new-tokens", "2", "--methods", "exact",
                          "--plot", "{out}/plot.png"],
    "study": ["--corpus", "{corpus}", "--intervention", "w_0=3", "--samples", "1", "--max-new-tokens", "2",
              "--attribute", "none", "--no-report", "-o", "{out}/study"],
    "app": [],
}


def _args(name, folder, tmp_path, out, other=""):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the man said\n")
    return [a.format(corpus=corpus, out=out, other=other or folder) for a in ARGS[name]] + ["--model", folder]


def test_every_model_loading_command_has_device_and_is_covered():
    commands = _loading_commands()
    assert set(commands) == set(ARGS), "a new model-loading command: add it to ARGS"
    for name, command in commands.items():
        assert any(p.name == "device" for p in command.params), name


# (app serves until stopped; demo's steering needs SmolLM2's vocabulary: both are in the bad-device test)
@pytest.mark.parametrize("name", sorted(set(ARGS) - {"app", "demo"}))
def test_every_model_loading_command_runs_with_device_cpu(name, tiny_folder, other_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(app, [name, *_args(name, tiny_folder, tmp_path, out, other_folder), "--device", "cpu"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7", "foo", "meta"]
                         + ([] if torch.cuda.is_available() else ["cuda"]))
@pytest.mark.parametrize("name", sorted(ARGS))
def test_a_bad_device_is_one_typed_line_and_writes_nothing(name, device, tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cwd = os.getcwd()
    os.chdir(out)  # a command that writes to the working directory would show here too
    try:
        result = runner.invoke(app, [name, *_args(name, tiny_folder, tmp_path, out), "--device", device])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and repr(device) in result.output and "Traceback" not in result.output
    assert list(out.iterdir()) == []
    with pytest.raises(ModelLoadError):
        check_device(device)


def test_abduction_error_names_the_token_text_and_the_setting_that_admits_it():
    lm = tiny_llama(seed=0)
    prompt, observed = lm.encode("the man"), lm.encode("said he went home")
    with pytest.raises(AbductionError) as info:
        counterfactual(LanguageModelSCM(lm, len(observed), Decoding(top_k=2)), prompt, observed, {}, num_samples=1)
    message = str(info.value)
    assert "'said'" in message and "step 0" in message
    k = int(message.split("raise top_k to at least ")[1].split()[0])
    # the advice is exact: top_k = k admits the observed token at step 0, k - 1 does not
    scm = LanguageModelSCM(lm, 1, Decoding(top_k=k))
    counterfactual(scm, prompt, observed[:1], {}, num_samples=1)
    with pytest.raises(AbductionError, match="step 0"):
        counterfactual(LanguageModelSCM(lm, 1, Decoding(top_k=k - 1)), prompt, observed[:1], {}, num_samples=1)
    with pytest.raises(AbductionError) as info:
        counterfactual(LanguageModelSCM(lm, 1, Decoding(top_p=0.3)), prompt, observed[:1], {}, num_samples=1)
    p = float(str(info.value).split("raise top_p above ")[1].split()[0])
    counterfactual(LanguageModelSCM(lm, 1, Decoding(top_p=min(1.0, p + 1e-3))), prompt, observed[:1], {},
                   num_samples=1)
    with pytest.raises(AbductionError):
        counterfactual(LanguageModelSCM(lm, 1, Decoding(top_p=p - 1e-3)), prompt, observed[:1], {}, num_samples=1)
    # the default decoding admits it
    counterfactual(LanguageModelSCM(lm, len(observed)), prompt, observed, {}, num_samples=1)


@pytest.mark.parametrize("spec", [
    "steer=female:1.0:10", 'w_3="she"', "exclude=3,5", "prompt=the woman said", "steer=male; w_0=3",
    "rome=The Louvre|The Louvre is located in| Rome|4", "memit=A|B| C&D|E| F", "model=some/folder", "",
])
def test_render_round_trip(spec):
    assert read_spec(render_spec(read_spec(spec))) == read_spec(spec)
    assert render_spec(spec) == render_spec(read_spec(spec))


def test_render_of_file_mappings_builds_the_same():
    mapping = {"steer": {"direction": "female", "alpha": 1.0, "layer": 10}, "w_3": "she",
               "rome": {"subject": "S", "prompt": "P", "target": " T"}}
    text = render_spec(mapping)
    assert text == 'steer=female:1.0:10; w_3="she"; rome=S|P| T'
    back = read_spec(text)
    assert _gender_options(back["steer"]) == mapping["steer"]
    assert describe({}) == "do(nothing)" and describe(mapping) == f"do({text})"


def test_load_lm_prints_nothing_unless_verbose(tiny_folder, capfd):
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    load_lm(tiny_folder, device="cpu")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before  # restored
    with verbose_output():
        with quiet_third_party():  # a no-op when verbose
            assert hf_logging.is_progress_bar_enabled() == before[1]


def test_progress_reports_reach_a_listener_and_nobody_by_default(capfd):
    lm = tiny_llama(seed=0)
    scm = LanguageModelSCM(lm, 3)
    seen = []
    with progress_to(lambda task, advance, total: seen.append((task, advance, total))):
        counterfactual(scm, lm.encode("the man"), lm.encode("said he"), {"w_0": 3}, num_samples=2)
    assert ("decoding (tokens)", 1, 3) in seen
    counterfactual(scm, lm.encode("the man"), lm.encode("said he"), {"w_0": 3}, num_samples=2)
    assert capfd.readouterr() == ("", "")


def test_cli_says_what_it_cuts_and_what_it_timed(tiny_folder):
    result = runner.invoke(app, ["counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                                 "said he went home", "--samples", "5", "--intervention", "w_1=3"])
    assert result.exit_code == 0, result.output
    assert "showing 3 of 5 counterfactuals and 2 of 5 interventional draws" in result.stdout
    assert "decoded and scored" in result.stdout
    assert 'do(w_1="3")' in result.stdout or "do(w_1=3)" in result.stdout


def test_json_shows_as_a_flag_and_models_reads_at_80_columns():
    result = runner.invoke(app, ["counterfactual", "--help"], terminal_width=100, env={"COLUMNS": "100"})
    line = next(line for line in result.stdout.splitlines() if "--json" in line)
    assert "<bool>" not in line and "BOOLEAN" not in line
    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    assert "Q4_1" in result.stdout and "float32" in result.stdout and "smollm2-135m-instruct" in result.stdout


def test_study_demo_report_only_needs_no_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["study", "--demo", "--report-only"])
    # no studies/demo here: the error names that folder rather than asking for --output
    assert result.exit_code == 2
    assert "--output" not in result.output.split("error:")[1].split("needs")[0]
    assert "demo" in result.output


def test_compare_mechanisms_rows_are_distinct(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the man said he\n")
    result = runner.invoke(app, ["compare-mechanisms", "--tiny", "--corpus", str(corpus), "--intervention",
                                 "w_0=3", "--max-new-tokens", "2", "--samples", "1"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") > 2]
    labels = [r for r in rows if r]
    assert labels[0] == "Gumbel-max" and "probability" in " ".join(labels) and "vocabulary" in " ".join(labels)


@pytest.mark.parametrize("quiet", [False, True])
def test_a_terminal_gets_a_progress_bar_unless_quiet(tiny_folder, monkeypatch, quiet):
    import io
    import sys

    from rich.console import Console

    cli_app = sys.modules["pyro_lmscm.cli.app"]  # (the package's `app` attribute is the Typer app)

    buffer = io.StringIO()
    monkeypatch.setattr(cli_app, "err_console", Console(file=buffer, force_terminal=True, width=100))
    result = runner.invoke(app, ["counterfactual", "--model", tiny_folder, "--prompt", "the man", "--text",
                                 "said he went home", "--samples", "2", "--json", *(["--quiet"] if quiet else [])])
    assert result.exit_code == 0, result.output
    assert ("decoding (tokens)" in buffer.getvalue()) is not quiet
    assert ("beam search (tokens)" in buffer.getvalue()) is not quiet
