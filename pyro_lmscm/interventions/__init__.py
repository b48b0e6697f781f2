"""Rung 2: causal mechanisms that stand in for the factual language model."""

from .adapter import LoRAAdapter
from .affine_steering import AffineSteering
from .combined import Combined
from .context import ContextMechanism, HookMechanism, steering_vector_mechanism
from .memit import EditRequest, MemitEdit, memit_edit
from .model_swap import ModelSwap
from .ops import Action, Intervention, InterventionValue, TextOrIds, as_do_data, world
from .rome import GENERIC_SENTENCES, RankOneEdit, rome_edit
from .steering import ActivationSteering
from .weight_edit import WeightDelta

__all__ = [
    "GENERIC_SENTENCES",
    "Action",
    "ActivationSteering",
    "AffineSteering",
    "Combined",
    "ContextMechanism",
    "EditRequest",
    "HookMechanism",
    "Intervention",
    "InterventionValue",
    "LoRAAdapter",
    "MemitEdit",
    "ModelSwap",
    "RankOneEdit",
    "TextOrIds",
    "WeightDelta",
    "as_do_data",
    "memit_edit",
    "rome_edit",
    "world",
    "steering_vector_mechanism",
]
