import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from pyro_lmscm.cli.study import study_command

ROOT = Path(__file__).resolve().parents[2]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("study")(study_command)


@app.command("other")
def _other() -> None:  # a second command, so that "study" stays a subcommand
    pass


def _flags(tiny_folders, corpus_file, out):
    return [
        "study", "--corpus", str(corpus_file), "-o", str(out), "--model", str(tiny_folders[0]),
        "--intervention", f"model={tiny_folders[1]}", "--samples", "2", "--max-new-tokens", "5",
        "--bootstrap", "100", "--no-progress",
    ]


def test_flags_run_resume_and_report_only(tiny_folders, corpus_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, _flags(tiny_folders, corpus_file, out) + ["--limit", "4"])
    assert result.exit_code == 0, result.output
    assert "4 strings computed, 0 resumed" in result.output and "| changed (share of draws) |" in result.output
    result = runner.invoke(app, _flags(tiny_folders, corpus_file, out))
    assert result.exit_code == 0 and "5 strings computed, 4 resumed" in result.output
    (out / "report.html").unlink()
    result = runner.invoke(app, ["study", "--report-only", "-o", str(out)])
    assert result.exit_code == 0 and (out / "report.html").is_file()


def test_no_draw_scores_flag(tiny_folders, corpus_file, tmp_path):
    """--no-draw-scores leaves the draws unscored, is a result setting (the scored folder does
    not resume unscored), and the scored study still scores them."""
    runner, out = CliRunner(), tmp_path / "out"
    result = runner.invoke(app, _flags(tiny_folders, corpus_file, out) + ["--limit", "2", "--no-draw-scores"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    draws = [d for r in records for d in r["counterfactual"] + r["interventional"]]
    assert draws and all(d["log_prob_factual"] is None and d["token_prob_counterfactual"] is None for d in draws)
    assert all(r["factual"]["log_prob_factual"] is not None for r in records)
    assert json.loads((out / "study.json").read_text())["result_settings"]["draw_scores"] is False
    result = runner.invoke(app, _flags(tiny_folders, corpus_file, out) + ["--limit", "2"])
    assert result.exit_code != 0 and "draw_scores" in result.output
    scored = tmp_path / "scored"
    assert runner.invoke(app, _flags(tiny_folders, corpus_file, scored) + ["--limit", "2"]).exit_code == 0
    records = [json.loads(line) for line in (scored / "records.jsonl").read_text().splitlines()]
    assert all(d["token_prob_counterfactual"] is not None for r in records for d in r["counterfactual"])


def test_config_file_with_overrides(tiny_folders, corpus_file, tmp_path):
    config = tmp_path / "study.json"
    config.write_text(json.dumps({
        "corpus": corpus_file.name, "model": str(tiny_folders[0]), "intervention": "w_0=5",
        "num_samples": 2, "max_new_tokens": 4, "attribute": None, "report": False, "progress": False,
    }))
    result = CliRunner().invoke(app, ["study", str(config), "-o", str(tmp_path / "o"), "--limit", "2", "--top-k", "0"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "o" / "records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert all(d["ids"][0] == 5 for r in records for d in r["counterfactual"])
    meta = json.loads((tmp_path / "o" / "study.json").read_text())
    assert meta["result_settings"]["top_k"] is None


def test_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["study"])
    assert result.exit_code == 2 and "give a config file, --demo, or --corpus" in result.output
    result = CliRunner().invoke(app, ["study", "--corpus", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_example_runs_tiny(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo_study.py"), "--tiny", "--output", str(tmp_path / "o")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "counterfactual" in result.stdout and (tmp_path / "o" / "report.html").is_file()


def test_paper_prints_each_rows_bounds(tiny_folders, tmp_path, monkeypatch):
    """``study --paper`` prints each row's mean P(unchanged) with its ranges over mechanisms (the
    rows and corpus swapped for tiny ones: the paper's edits need SmolLM2's vocabulary)."""
    from pyro_lmscm.study import paper

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the man said\nshe walked to\nthe old doctor\n")
    real = paper.run_paper_study

    def tiny(output, **kwargs):
        rows = [paper.PaperRow("swap", "another model", f"model={tiny_folders[1]}")]
        return real(output, rows=rows, corpus=corpus, **{**kwargs, "max_new_tokens": 4, "top_k": None})

    monkeypatch.setattr(paper, "run_paper_study", tiny)
    result = CliRunner().invoke(app, [
        "study", "--paper", "-o", str(tmp_path / "paper"), "--model", str(tiny_folders[0]), "--samples", "2",
        "--bootstrap", "50", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "another model: 3 strings" in result.output
    assert "(stable mechanisms " in result.output and "; any mechanism " in result.output
    assert "mean P(unchanged):" in result.output
