import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")  # headless, before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402

from pyro_lmscm import LanguageModelSCM, ModelSwap, counterfactual  # noqa: E402
from pyro_lmscm.errors import InferenceError  # noqa: E402
from pyro_lmscm.inference import CounterfactualDistribution, abduct  # noqa: E402
from pyro_lmscm.inference import arviz as lmscm_arviz  # noqa: E402
from pyro_lmscm.inference.arviz import az, draws_to_dict, to_inference_data  # noqa: E402
from pyro_lmscm.testing import tiny_llama  # noqa: E402

PROMPT = torch.tensor([2, 3, 4])


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def result(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=5, mechanisms={"other": ModelSwap(tiny_llama(seed=1))})
    return counterfactual(scm, PROMPT, None, {"mechanism": "other"}, num_samples=400, seed=0, baseline=True)


def test_groups_variables_and_values(result):
    idata = result.to_arviz()
    assert sorted(idata.groups()) == ["constant_data", "posterior", "prior"]
    posterior = idata.posterior
    assert posterior.sizes["chain"] == 4 and posterior.sizes["draw"] == 100
    assert posterior["observed_noise"].dims == ("chain", "draw", "step")
    assert posterior.sizes["step"] == len(result.factual_ids)
    for name in ("changed", "edit_distance", "first_divergence", "log_prob_factual", "char_edit_distance"):
        values = posterior[name].values.reshape(-1)
        np.testing.assert_allclose(values, result.counterfactual.statistic(name).numpy(), err_msg=name)
    np.testing.assert_allclose(
        idata.prior["edit_distance"].values.reshape(-1), result.interventional.statistic("edit_distance").numpy()
    )
    assert "observed_noise" not in idata.prior  # fresh noise has no posterior summary
    np.testing.assert_array_equal(idata.constant_data["factual_ids"].values, result.factual_ids.numpy())
    assert idata.posterior.attrs["kind"] == "counterfactual"
    assert posterior["changed"].dtype == np.int64


def test_summary_and_ess_of_independent_draws(result):
    """Exact posterior draws are independent: az.ess is about N and r_hat about 1. The same
    draws in sorted order (a maximally autocorrelated 'chain') fail the same check."""
    idata = result.to_arviz()
    summary = az.summary(idata, var_names=["edit_distance", "observed_noise", "top_gumbel"])
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(summary.columns)
    ess = az.ess(idata, var_names=["observed_noise"])["observed_noise"].values
    assert np.all((ess > 0.75 * 400) & (ess < 1.35 * 400)), ess
    assert np.all(np.abs(summary["r_hat"].values - 1.0) < 0.05)
    cf = result.counterfactual
    ordered = {name: value.sort(dim=0).values for name, value in cf.noise_stats.items()}
    sorted_draws = CounterfactualDistribution(cf.scm, cf.prompt_ids, cf.factual_ids, cf.ids, noise_stats=ordered)
    ess_sorted = az.ess(to_inference_data(sorted_draws), var_names=["observed_noise"])["observed_noise"].values
    assert np.all(ess_sorted < 0.2 * 400), ess_sorted


def test_plots(result, tmp_path):
    idata = result.to_arviz()
    axes = az.plot_density(
        [idata.posterior, idata.prior],
        data_labels=["counterfactual", "interventional"],
        var_names=["edit_distance", "log_prob_factual"],
        shade=0.1,
    )
    figure = np.ravel(axes)[0].figure
    assert np.ravel(axes)[0].get_legend() is not None or figure.legends
    path = tmp_path / "density.png"
    figure.savefig(path)
    assert path.stat().st_size > 5000
    axes = az.plot_forest([idata, idata], model_names=["a", "b"], var_names=["top_gumbel"], combined=True)
    assert np.ravel(axes)[0].get_legend() is not None


# ArviZ 0.23 passes a dict to matplotlib 3.11's normalize_kwargs in these plots (upstream)
@pytest.mark.filterwarnings("ignore:Passing a dict or None as alias_mapping:DeprecationWarning")
def test_trace_and_posterior_plots(result):
    idata = result.to_arviz()
    az.plot_trace(idata, var_names=["observed_noise"])
    az.plot_posterior(idata, var_names=["edit_distance"])


def test_weighted_draws_are_made_unweighted(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    observed = torch.tensor([22])
    importance = abduct(scm, PROMPT, observed, "importance", num_samples=400, seed=0)
    cf = importance.counterfactual({"prompt": [2, 9]})
    idata = cf.to_arviz()
    accepted = int(importance.consistent.sum())
    assert idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"] == accepted
    assert idata.posterior.attrs["ess_kish"] == pytest.approx(accepted)
    # unequal weights: systematic resampling keeps the weighted mean (up to Monte Carlo error)
    generator = torch.Generator().manual_seed(0)
    log_weights = torch.randn(cf.num_samples, generator=generator, dtype=torch.float64)
    weighted = CounterfactualDistribution(
        scm, cf.prompt_ids, cf.factual_ids, cf.ids, cf.intervention, log_weights=log_weights, noise_stats=cf.noise_stats
    )
    variables, _, _ = draws_to_dict(weighted, ("edit_distance",))
    estimate = weighted.expectation("edit_distance")
    resampled = float(variables["edit_distance"].mean())
    assert abs(resampled - estimate.value) < 4 * estimate.stderr + 1e-9
    assert variables["observed_noise"].size == cf.num_samples


def test_chains(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3)
    result = counterfactual(scm, PROMPT, None, {}, num_samples=30, seed=0)
    assert result.to_arviz().posterior.sizes["chain"] == 2  # 30 draws: 2 pseudo-chains of 15
    assert result.to_arviz(chains=5).posterior.sizes["chain"] == 5
    with pytest.raises(InferenceError, match="`chains`"):
        result.to_arviz(chains=4)
    six = LanguageModelSCM(tiny_llama(vocab_size=6, seed=5, with_tokenizer=False), max_new_tokens=2)
    settings = dict(num_samples=20, seed=0, warmup_steps=10, max_tree_depth=3)
    nuts = abduct(six, PROMPT, torch.tensor([3]), "relaxed-nuts", **settings)
    idata = nuts.to_arviz({})
    assert idata.posterior.sizes["chain"] == nuts.num_chains == 1  # a real chain is kept in order
    assert "char_edit_distance" not in idata.posterior  # no tokenizer


def test_arviz_major_version_dispatch(result, monkeypatch):
    monkeypatch.setattr(lmscm_arviz.az, "__version__", "1.0.0")
    with pytest.raises(NotImplementedError, match="ArviZ 1.0.0"):
        result.to_arviz()


def test_log_weights_attr_is_finite(result):
    assert math.isfinite(result.to_arviz().posterior.attrs["ess_kish"])


def test_bad_arguments_are_typed_errors(result):
    """A baseline that is no distribution was an AttributeError, names given as one string
    were read letter by letter ("unknown statistic 'c'"), and a negative seed was taken
    (torch wraps it to 2**64 - 1)."""
    with pytest.raises(InferenceError, match="`baseline`"):
        result.counterfactual.to_arviz(baseline=5)
    with pytest.raises(InferenceError, match="`names`"):
        result.counterfactual.to_arviz(names="changed")
    with pytest.raises(InferenceError, match="`distribution`"):
        draws_to_dict(result.counterfactual_ids)
    with pytest.raises(InferenceError, match="`seed`"):
        result.counterfactual.to_arviz(seed=-1)
    # the baseline: the same arguments, well formed, are taken
    idata = result.counterfactual.to_arviz(baseline=result.interventional, names=("changed",), seed=2**64 - 1)
    assert "changed" in idata.prior
