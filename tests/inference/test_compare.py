import math

import pytest
import torch
from scipy import stats

from pyro_lmscm import LanguageModelSCM, ModelSwap
from pyro_lmscm.errors import InferenceError
from pyro_lmscm.inference import Exact, RelaxedSVI, compare_abduction, ks_statistic
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3])
OPTIONS = {
    "relaxed-svi": {"num_steps": 150, "temperature": 0.05},
    "relaxed-nuts": {"warmup_steps": 50, "max_tree_depth": 4},
}


@pytest.fixture(scope="module")
def six():
    lm = tiny_llama(vocab_size=6, seed=5, logit_scale=15.0, with_tokenizer=False)
    other = tiny_llama(vocab_size=6, seed=6, logit_scale=15.0, with_tokenizer=False)
    return LanguageModelSCM(lm, max_new_tokens=3, mechanisms={"other": ModelSwap(other)})


@pytest.fixture(scope="module")
def table(six):
    return compare_abduction(
        six, PROMPT, torch.tensor([2, 5, 0]), {"mechanism": "other"}, num_samples=200, seed=0, options=OPTIONS
    )


def test_rows_and_markdown(table):
    labels = [row.method for row in table.rows]
    assert labels == ["exact", "importance", "relaxed-svi τ=0.05", "relaxed-nuts τ=0.1", "prior"]
    markdown = table.to_markdown()
    lines = markdown.splitlines()
    assert len(lines) == 2 + 5
    assert lines[0].startswith("| method | draws | reproduces | ESS | TV first token | TV string | KS noise |")
    assert all(line.count("|") == 9 for line in lines)
    assert str(table) == markdown
    assert set(table.to_arviz()) == set(labels)
    assert table.row("relaxed-svi").method == "relaxed-svi τ=0.05"
    for row in table.rows:
        assert row.num_draws == 200 and row.wall_time_s > 0
        assert 0.0 <= row.reproduction_rate <= 1.0 and 0.0 <= row.ess <= 200.0 + 1e-6
        for value in (row.tv_first_token, row.tv_string, row.ks_noise):
            assert math.isnan(value) or 0.0 <= value <= 1.0


def test_exact_row(table):
    exact = table.row("exact")
    assert exact.reproduction_rate == 1.0
    assert exact.ess == pytest.approx(200.0, rel=1e-6)


def test_importance_row_is_its_accepted_draws(table):
    row = table.row("importance")
    result = table.results["importance"]
    accepted = int(result.consistent.sum())
    assert row.reproduction_rate == accepted / 200
    assert row.ess == pytest.approx(accepted)
    assert 0 < accepted < 200  # p(observed) is neither 0 nor 1 here: the row is informative


def test_exact_is_close_to_the_reference_and_the_prior_is_not(table):
    """Two-sample KS at level 0.001 for 200 vs 200 draws rejects above 1.95 sqrt(2/200):
    exact draws pass, prior draws (no abduction) fail the same test; likewise the exact
    counterfactual distribution of strings is closer to the reference than the prior one."""
    critical = 1.95 * math.sqrt(2 / 200)
    exact, prior = table.row("exact"), table.row("prior")
    assert exact.ks_noise < critical < prior.ks_noise
    assert exact.tv_string < prior.tv_string
    assert prior.reproduction_rate == pytest.approx(table.row("importance").reproduction_rate, abs=0.1)


def test_relaxed_rows_are_computed(table):
    svi, nuts = table.row("relaxed-svi"), table.row("relaxed-nuts")
    for row, label in [(svi, "relaxed-svi τ=0.05"), (nuts, "relaxed-nuts τ=0.1")]:
        result = table.results[label]
        assert row.reproduction_rate == float(result.consistent.double().mean())
        assert row.ess == pytest.approx(result.exact_ess)
        assert not math.isnan(row.tv_string) and not math.isnan(row.ks_noise)
    assert len(table.results["relaxed-svi τ=0.05"].diagnostics["elbo_loss"]) == 150


def test_factual_replay_agrees_with_the_argmax_check(six):
    methods = ["exact", "importance", RelaxedSVI(temperature=0.3, num_steps=50)]
    arguments = dict(methods=methods, num_samples=100, seed=1)
    fast = compare_abduction(six, PROMPT, None, {}, **arguments)
    replayed = compare_abduction(six, PROMPT, None, {}, replay_factual=True, **arguments)
    rates = [row.reproduction_rate for row in fast.rows]
    assert rates == [row.reproduction_rate for row in replayed.rows]
    assert 0.0 < rates[2] < 1.0  # the relaxed draws sometimes fail to reproduce
    # the null intervention: exact counterfactuals are the factual string
    assert fast.counterfactuals["exact"].probability("changed").value == 0.0


def test_two_temperatures_in_one_table(six):
    table = compare_abduction(
        six, PROMPT, None, None,
        methods=[RelaxedSVI(temperature=1.0, num_steps=100), RelaxedSVI(temperature=0.02, num_steps=100)],
        num_samples=200, seed=0,
    )
    warm, cold = table.rows
    assert warm.method == "relaxed-svi τ=1" and cold.method == "relaxed-svi τ=0.02"
    assert cold.reproduction_rate > warm.reproduction_rate


def test_exact_guides_of_two_margins_are_two_rows(six):
    """The margin is in the label: two exact guides of different margins were refused as
    rows of one label ("exact"), and a table could not tell them apart."""
    table = compare_abduction(six, PROMPT, None, None, methods=[Exact(), Exact(margin=0.5)], num_samples=50, seed=0)
    assert [row.method for row in table.rows] == ["exact", "exact δ=0.5"]
    assert table.results["exact δ=0.5"].diagnostics["margin"] == 0.5


def test_settings_are_checked_before_anything_runs(six, lm):
    with pytest.raises(InferenceError, match="not compared: \\['relaxed-nuts'\\]"):
        compare_abduction(six, PROMPT, None, {}, methods=["exact"], options={"relaxed-nuts": {}})
    with pytest.raises(InferenceError, match="distinct labels"):
        compare_abduction(six, PROMPT, None, {}, methods=["exact", "exact"])
    scm = LanguageModelSCM(lm, max_new_tokens=2)
    with pytest.raises(InferenceError, match="max_vocab"):
        compare_abduction(
            scm, PROMPT, None, {}, methods=["exact", "relaxed-nuts"], options={"relaxed-nuts": {"max_vocab": 10}}
        )


def test_ks_statistic_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, generator=generator, dtype=torch.float64)
    b = torch.randn(200, generator=generator, dtype=torch.float64) + 0.3
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a.numpy(), b.numpy()).statistic)
    # integer weights are repeated draws
    weights = torch.randint(1, 4, (300,), generator=generator)
    repeated = a.repeat_interleave(weights)
    assert ks_statistic(a, b, weights_a=weights.double()) == pytest.approx(
        stats.ks_2samp(repeated.numpy(), b.numpy()).statistic
    )
    assert ks_statistic(a, a) == 0.0


@pytest.mark.parametrize(
    "arguments, name",
    [
        ((torch.tensor([]), torch.tensor([1.0])), "`a`"),  # was a ZeroDivisionError
        ((torch.tensor([1.0]), torch.tensor([float("nan"), 2.0])), "`b`"),  # was silently 0.5 or 0
        ((torch.tensor([1.0, 2.0]), torch.tensor([1.0]), torch.tensor([1.0])), "`weights_a`"),  # an IndexError
        ((torch.tensor([1.0, 2.0]), torch.tensor([1.0]), torch.tensor([1.0, -1.0])), "`weights_a`"),  # NaN
        ((torch.tensor([1.0, 2.0]), torch.tensor([1.0]), torch.tensor([0.0, 0.0])), "`weights_a`"),  # NaN
        ((torch.tensor([1.0, 2.0]), torch.tensor([1.0]), None, torch.tensor([float("inf")])), "`weights_b`"),
    ],
)
def test_ks_statistic_refuses_bad_samples_and_weights(arguments, name):
    with pytest.raises(InferenceError, match=name):
        ks_statistic(*arguments)


def test_ks_statistic_takes_lists_and_weights_of_zero():
    """Lists are samples (they were an AttributeError); a draw of weight zero is left out, as
    the weighted counterfactual distributions leave out inconsistent draws."""
    a, b = [0.0, 1.0, 5.0], [0.5, 2.0]
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic)
    assert ks_statistic(a, b, weights_a=[1.0, 1.0, 0.0]) == pytest.approx(stats.ks_2samp(a[:2], b).statistic)
