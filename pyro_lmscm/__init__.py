"""pyro-lmscm: language models as structural causal models in Pyro.

Given an observed string and a language model, ask what this very string would have
been had the model been different: Gumbel-max counterfactuals (Ravfogel et al. 2024).
"""

from . import errors, metrics
from .errors import LMSCMError
from .inference import (
    CounterfactualDistribution,
    CounterfactualResult,
    ExactCounterfactual,
    HindsightGumbelGuide,
    PosteriorNoiseMessenger,
    UpstreamHindsightGuide,
    abduct,
    compare_abduction,
    counterfactual,
    counterfactuals,
    exact_counterfactual,
)
from .interventions import (
    ActivationSteering,
    AffineSteering,
    LoRAAdapter,
    ModelSwap,
    RankOneEdit,
    WeightDelta,
    rome_edit,
)
from .lm import HFLanguageModel
from .loading import load_lm
from .models import Decoding, GumbelMax, InverseCDF, LanguageModelSCM, Mechanism, NoiseModel

__version__ = "0.1.0"

__all__ = [
    "ActivationSteering",
    "AffineSteering",
    "CounterfactualDistribution",
    "CounterfactualResult",
    "Decoding",
    "ExactCounterfactual",
    "GumbelMax",
    "HFLanguageModel",
    "HindsightGumbelGuide",
    "InverseCDF",
    "LMSCMError",
    "LanguageModelSCM",
    "LoRAAdapter",
    "Mechanism",
    "ModelSwap",
    "NoiseModel",
    "PosteriorNoiseMessenger",
    "RankOneEdit",
    "UpstreamHindsightGuide",
    "WeightDelta",
    "abduct",
    "compare_abduction",
    "counterfactual",
    "counterfactuals",
    "errors",
    "exact_counterfactual",
    "load_lm",
    "metrics",
    "rome_edit",
]
