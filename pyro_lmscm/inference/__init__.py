"""Rung 3: abduction of the exogenous noise and counterfactual queries."""

from ..models.gumbel_max_counterfactual import step_counterfactual_log_probs
from ..models.gumbel_max_posterior import GumbelMaxPosterior, gumbel_log_density
from .abduction import (
    METHODS,
    NUTS_MAX_VOCAB,
    AbductionMethod,
    AbductionResult,
    Exact,
    Importance,
    Prior,
    RelaxedGumbelMaxModel,
    RelaxedNUTS,
    RelaxedSVI,
    abduct,
    kish_ess,
    make_method,
    noise_statistics,
)
from .attribute import Attribution, StepAttribution, attribute, attributions
from .bounds import CounterfactualBounds, keep_bounds
from .compare import (
    AbductionComparison,
    ComparisonRow,
    compare_abduction,
    ks_statistic,
    plot_comparison,
)
from .compare_mechanisms import MechanismRow, compare_mechanisms, mechanisms_markdown
from .counterfactual import CounterfactualResult, auto_chunk_size, counterfactual, counterfactuals
from .distribution import STATISTICS, CounterfactualDistribution, Estimate
from .exact import (
    ExactCounterfactual,
    counterfactual_token_log_probs,
    exact_counterfactual,
    most_probable,
    top_k_counterfactuals,
)
from .hindsight_guide import HindsightGumbelGuide, noise_trace
from .posterior_noise_messenger import PosteriorNoiseMessenger
from .prediction import DRAWS, noise_handler, predict
from .scoring import string_log_prob, token_log_probs
from .token_score_messenger import TokenScoreMessenger
from .upstream import UpstreamHindsightGuide, upstream_marginals

__all__ = [
    "Attribution",
    "StepAttribution",
    "attribute",
    "attributions",
    "DRAWS",
    "CounterfactualBounds",
    "keep_bounds",
    "ExactCounterfactual",
    "counterfactual_token_log_probs",
    "exact_counterfactual",
    "most_probable",
    "top_k_counterfactuals",
    "step_counterfactual_log_probs",
    "PosteriorNoiseMessenger",
    "TokenScoreMessenger",
    "METHODS",
    "NUTS_MAX_VOCAB",
    "STATISTICS",
    "AbductionComparison",
    "AbductionMethod",
    "AbductionResult",
    "ComparisonRow",
    "CounterfactualDistribution",
    "CounterfactualResult",
    "Estimate",
    "Exact",
    "GumbelMaxPosterior",
    "HindsightGumbelGuide",
    "MechanismRow",
    "Importance",
    "Prior",
    "RelaxedGumbelMaxModel",
    "RelaxedNUTS",
    "RelaxedSVI",
    "UpstreamHindsightGuide",
    "abduct",
    "auto_chunk_size",
    "compare_abduction",
    "compare_mechanisms",
    "counterfactual",
    "counterfactuals",
    "gumbel_log_density",
    "kish_ess",
    "ks_statistic",
    "make_method",
    "mechanisms_markdown",
    "noise_trace",
    "plot_comparison",
    "noise_handler",
    "predict",
    "string_log_prob",
    "token_log_probs",
    "upstream_marginals",
    "noise_statistics",
]
