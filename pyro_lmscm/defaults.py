"""The one set of defaults that every entry point takes: the command line (``demo``,
``counterfactual``, ``study``, ``app``, ``compare-*``, ``attribute``), the explorer, study
configs and the Python API (:class:`~pyro_lmscm.models.Decoding`, :func:`~pyro_lmscm.loading.load_lm`).

The default decoding is the full softmax at temperature 1: it gives every token of the
vocabulary a positive probability, so any observed text can be abducted. Top-k and top-p are
opt-in; with them an observed token outside the kept set has probability zero, and
abduction refuses it (:class:`~pyro_lmscm.errors.AbductionError`, naming the setting that
would admit it).

>>> DEFAULTS.top_k is None and DEFAULTS.temperature == 1.0
True
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULTS", "Defaults"]


@dataclass(frozen=True)
class Defaults:
    """Default settings of every entry point.

    :ivar model: the model name (the embedded SmolLM2-135M-Instruct).
    :ivar dtype: the model's dtype (float32: the tables of the README were computed in it).
    :ivar device: the model's device; ``None``: CUDA when available, else the CPU.
    :ivar max_new_tokens: steps of a sampled continuation (an observed one sets its own length).
    :ivar temperature: the decoding temperature.
    :ivar top_k: the decoding's top-k; ``None``: the full vocabulary.
    :ivar top_p: the decoding's nucleus mass; ``None``: the full vocabulary.
    :ivar num_samples: posterior (counterfactual) draws.
    :ivar seed: the random seed.
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str | None = None
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 4
    seed: int = 0


#: The defaults in force (read them; never mutate).
DEFAULTS = Defaults()
