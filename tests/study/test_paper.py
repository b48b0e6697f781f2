"""The paper comparison study, end to end in CI size on the tiny models (the full form on
SmolLM2 is `pyro-lmscm study --paper`; its table is in the README)."""

import json

import pytest

from pyro_lmscm.study.paper import PAPER_ROWS, PaperRow, corpus_path, louvre_check, run_paper_study

TINY_CORPUS = "the man said\nshe walked to\nthe old doctor\nhe went home\nthe young nurse\n"
TINY_LOUVRE = "she walked to the doctor\nthe doctor was\n"


@pytest.fixture
def rows(tiny_folders):
    return [
        PaperRow("memit", "MEMIT (tiny)", {"memit": {"requests": [
            {"subject": "the doctor", "prompt": "she walked to the doctor", "target": "home"}], "layers": [0, 1]}},
            louvre=True),
        PaperRow("rome", "ROME (tiny)", "rome=the doctor|she walked to the doctor|home|1"),
        PaperRow("swap", "another model", f"model={tiny_folders[1]}"),
        PaperRow("finetune", "LoRA fine-tune (tiny)",
                 {"finetune": {"texts": ["the old nurse walked home and smiled"] * 8, "steps": 3, "rank": 2}}),
    ]


def test_paper_study_end_to_end(tmp_path, tiny_folders, rows):
    corpus, louvre = tmp_path / "corpus.txt", tmp_path / "louvre.txt"
    corpus.write_text(TINY_CORPUS)
    louvre.write_text(TINY_LOUVRE)
    kwargs = dict(model=str(tiny_folders[0]), rows=rows, corpus=corpus, louvre_corpus=louvre, num_samples=3,
                  max_new_tokens=6, bootstrap=50, progress=False, top_k=None)
    result = run_paper_study(tmp_path / "out", **kwargs)
    assert [r.row.key for r in result.rows] == ["memit", "rome", "swap", "finetune"]
    for row in result.rows:
        assert row.strings == 5
        exact = row.get("prob_unchanged", "exact")
        sampled = row.get("identical", "counterfactual")
        assert 0.0 <= exact.low <= exact.mean <= exact.high <= 1.0 and exact.n == 5
        assert 0.0 <= sampled.mean <= 1.0 and sampled.n == 15
        bounds = {end: row.get(f"prob_unchanged_{end}", "exact") for end in ("gumbel", "stable_low", "stable_high",
                                                                           "any_low", "any_high")}
        assert all(b is not None and b.n == 5 and b.low <= b.mean <= b.high for b in bounds.values())
        assert bounds["any_low"].mean <= bounds["stable_low"].mean <= bounds["gumbel"].mean
        assert bounds["gumbel"].mean == pytest.approx(exact.mean, abs=1e-12)
        assert bounds["gumbel"].mean <= bounds["stable_high"].mean == bounds["any_high"].mean
        divergence = row.get("expected_first_divergence_stable_low", "exact")
        assert divergence is not None and divergence.n == 5
        for metric in ("normalized_char_edit_distance", "word_common_prefix"):
            for kind in ("counterfactual", "interventional"):
                assert 0.0 <= row.get(metric, kind).mean <= 1.0
    assert result.rows[0].louvre is not None and result.rows[0].louvre["n"] == 0  # no Paris in the tiny vocabulary
    assert result.rows[1].louvre is None
    for name in ("md", "csv", "png", "html"):
        assert result.files[name].is_file()
    markdown = result.files["md"].read_text()
    assert "MEMIT (tiny)" in markdown and "GPT2-XL MEMIT Koalas" in markdown and "Rome only" in markdown
    assert markdown.count("\n| ") >= 4 + 6 + 2 + 2 * (4 + 1)
    assert "mean P(unchanged):" in markdown and "| intervention | Gumbel-max | stable: low |" in markdown
    csv_text = result.files["csv"].read_text()
    assert "prob_unchanged_stable_low,exact" in csv_text and "expected_first_divergence_any_high,exact" in csv_text
    assert "mean E[first divergence]" in result.files["html"].read_text()
    # each row is a study of its own, resumable: a second run computes nothing
    again = run_paper_study(tmp_path / "out", **kwargs)
    assert [r.get("prob_unchanged", "exact").mean for r in again.rows] == [
        r.get("prob_unchanged", "exact").mean for r in result.rows
    ]
    records = [json.loads(line) for line in (tmp_path / "out" / "swap" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 5


def test_louvre_check_counts():
    def record(factual, *draws):
        return {"factual": {"text": factual}, "counterfactual": [{"text": d} for d in draws]}

    records = [
        record(" is in Paris.", " is in Rome.", " is in Paris.", " Rome and Paris", " London"),
        record(" is big.", " Rome"),  # no Paris in the factual string: not counted
        {"error": "TokenizationError", "factual": {"text": "Paris"}},
    ]
    check = louvre_check(records)
    assert check == {"n": 1, "draws": 4, "rome_only": 0.25, "paris_only": 0.25, "both": 0.25, "neither": 0.25}


def test_builtin_corpora_and_rows():
    lines = corpus_path().read_text().splitlines()
    assert len(lines) == 200 and all(len(line.split()) == 5 for line in lines) and len(set(lines)) == 200
    forbidden = ("paris", "rome", "louvre", "koala", "australia", "zealand")
    assert not any(word in line.lower() for line in lines for word in forbidden)
    louvre = corpus_path("paper_louvre").read_text().splitlines()
    assert len(louvre) == 30 and all("Louvre" in line for line in louvre)
    assert [r.key for r in PAPER_ROWS] == ["memit-louvre", "memit-koalas", "rome-louvre", "steer-gender",
                                            "mimic-gender", "lora-finetune"]
