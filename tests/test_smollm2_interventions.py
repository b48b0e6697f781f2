"""Slow: real interventions on the embedded SmolLM2-135M-Instruct (issue 3's acceptance)."""

import re

import pytest
import torch

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.interventions import rome_edit
from pyro_lmscm.interventions.gender import gender_steering
from pyro_lmscm.loading import load_lm
from pyro_lmscm.metrics import first_divergence, trim_after_end
from pyro_lmscm.models import Decoding
from pyro_lmscm.testing import assert_restored, snapshot

pytestmark = pytest.mark.slow

MALE = re.compile(r"\b(he|him|his|himself|man|boy|father|brother)\b", re.I)
FEMALE = re.compile(r"\b(she|her|hers|herself|woman|girl|mother|sister)\b", re.I)


@pytest.fixture(scope="module")
def lm():
    return load_lm("smollm2-135m-instruct", dtype="float32", progress=False)


def _divergences(result):
    factual = trim_after_end(result.factual_ids, result.scm.lm.eos_token_ids)
    out = []
    for row in result.counterfactual_ids:
        d = first_divergence(factual, trim_after_end(row, result.scm.lm.eos_token_ids))
        out.append(len(factual) if d is None else d)  # never: the whole string
    return out


def test_female_steering_flips_gendered_words_and_spares_neutral_text(lm, all_threads, capsys):
    snap = snapshot(lm.model)
    steer = gender_steering(lm, "female")
    scm = LanguageModelSCM(lm, 24, Decoding(top_k=50), mechanisms={"female": steer})
    male = counterfactual(scm, lm.encode("My brother is a doctor. Every morning, he"), None,
                          {"mechanism": "female"}, num_samples=8, seed=0)
    assert MALE.search(male.factual_text) and not FEMALE.search(male.factual_text)
    n_male = len(MALE.findall(male.factual_text))
    lost_male = sum(len(MALE.findall(t)) < n_male for t in male.counterfactual_texts)
    flipped = sum(bool(FEMALE.search(t)) and len(MALE.findall(t)) < n_male for t in male.counterfactual_texts)
    neutral = counterfactual(scm, lm.encode("The weather in the mountains was"), None,
                             {"mechanism": "female"}, num_samples=8, seed=0)
    male_div, neutral_div = _divergences(male), _divergences(neutral)
    with capsys.disabled():
        print(f"\nsteering: {lost_male}/8 male-subject counterfactuals lost male words, {flipped}/8 "
              "also gained female words; "
              f"first divergence male {male_div} vs neutral {neutral_div} "
              f"(neutral length {len(neutral.factual_ids)})")
    assert lost_male >= 6 and flipped >= 4  # measured: 5/8 gained female words
    assert sum(neutral_div) / 8 > sum(male_div) / 8  # the neutral string diverges later (or never)
    assert_restored(lm.model, snap)


def test_rank_one_edit_rewrites_the_fact_and_reports_side_effects(lm, all_threads, capsys):
    snap = snapshot(lm.model)
    prompt = "The Eiffel Tower is located in the city of"
    edit = rome_edit(lm, prompt, "The Eiffel Tower", " Rome", layer=6)
    greedy = LanguageModelSCM(lm, 4, Decoding(top_k=1), mechanisms={"rome": edit})
    fact = counterfactual(greedy, lm.encode(prompt), None, {"mechanism": "rome"}, seed=0)
    assert "Paris" in fact.factual_text and "Rome" in fact.counterfactual_texts[0]
    scm = LanguageModelSCM(lm, 24, Decoding(top_k=50), mechanisms={"rome": edit})
    unrelated = counterfactual(scm, lm.encode("My favourite food is pasta because"), None,
                               {"mechanism": "rome"}, num_samples=8, seed=0)
    changed = sum(d < len(unrelated.factual_ids) for d in _divergences(unrelated))
    with capsys.disabled():
        print(f"\nROME: {fact.factual_text!r} -> {fact.counterfactual_texts[0]!r}; unrelated sentence "
              f"changed in {changed}/8 draws, first divergences {_divergences(unrelated)}")
    assert_restored(lm.model, snap)


def test_memit_writes_both_facts_and_spares_unrelated_ones(lm, all_threads, capsys):
    """MEMIT, two facts in one batch: the Louvre is in Rome (also in a paraphrase), koalas
    are native to New Zealand; unrelated facts complete greedily as before the edit."""
    from pyro_lmscm.interventions.memit import memit_edit

    snap = snapshot(lm.model)

    def greedy(f, text, n=3):
        ids = lm.encode(text)
        start = ids.shape[0]
        for _ in range(n):
            ids = torch.cat([ids, f.logits(ids)[-1].argmax()[None]])
        return lm.decode(ids[start:])

    edited = ["The Louvre is located in the city of", "The Louvre museum is in", "Koalas are native to"]
    unrelated = ["The Eiffel Tower is located in", "The capital of Germany is",
                 "The Colosseum is located in the city of", "Kangaroos are native to"]
    before = {p: greedy(lm, p) for p in edited + unrelated}
    edit = memit_edit(lm, [("The Louvre is located in the city of", "The Louvre", " Rome"),
                           ("Koalas are native to", "Koalas", " New Zealand")])
    assert edit.layers == [4, 5, 6, 7, 8]
    with edit.activate(lm) as f:
        after = {p: greedy(f, p) for p in edited + unrelated}
    with capsys.disabled():
        print("\nMEMIT: " + "; ".join(f"{p!r}: {before[p]!r} -> {after[p]!r}" for p in edited + unrelated))
    assert "Paris" in before[edited[0]] and "Australia" in before[edited[2]]  # the facts the edit changes
    assert after[edited[0]].startswith(" Rome") and after[edited[1]].startswith(" Rome")
    assert after[edited[2]].startswith(" New Zealand")
    assert all(after[p] == before[p] for p in unrelated), (before, after)
    assert_restored(lm.model, snap)
