"""Rung 1: the language model as a structural causal model, and decoding."""

from .anchor import FactualAnchor
from .decoding import Decoding, Temperature, TopK, TopP
from .distributions import IntegerDelta
from .exclude_tokens_messenger import ExcludeTokensMessenger
from .factual_anchor_messenger import FactualAnchorMessenger
from .mechanism import Factual, Mechanism
from .noise import GumbelMax, InverseCDF, NoiseModel
from .record_logits_messenger import RecordLogitsMessenger
from .scm import FACTUAL, LanguageModelSCM
from .sites import MECHANISM, PROMPT, exclude_key, noise_site, parse_step_site, token_site

__all__ = [
    "FACTUAL",
    "MECHANISM",
    "PROMPT",
    "Decoding",
    "ExcludeTokensMessenger",
    "FactualAnchor",
    "FactualAnchorMessenger",
    "Factual",
    "GumbelMax",
    "IntegerDelta",
    "InverseCDF",
    "LanguageModelSCM",
    "Mechanism",
    "NoiseModel",
    "RecordLogitsMessenger",
    "Temperature",
    "TopK",
    "TopP",
    "exclude_key",
    "noise_site",
    "parse_step_site",
    "token_site",
]
