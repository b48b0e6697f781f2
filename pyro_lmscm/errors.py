"""Library errors: one root, :class:`LMSCMError`, and one subclass per kind of bad input.

Each subclass also inherits the matching built-in exception, so ``except ValueError``
keeps working for callers who do not know this library.
"""

from __future__ import annotations

__all__ = [
    "AbductionError",
    "ChatError",
    "DecodingError",
    "InferenceError",
    "InterventionError",
    "LMSCMError",
    "LMSCMWarning",
    "MechanismError",
    "ModelLoadError",
    "ObservationError",
    "RemoteCodeError",
    "ServeError",
    "StudyError",
    "TokenizationError",
    "UnsupportedVersionError",
]


class LMSCMError(Exception):
    """Root of every error raised by :mod:`pyro_lmscm`."""


class ModelLoadError(LMSCMError, RuntimeError):
    """A model or tokenizer could not be fetched, verified or loaded."""


class RemoteCodeError(ModelLoadError):
    """A model folder needs code of its own to load (``trust_remote_code``), which pyro-lmscm
    never runs. Raised as itself wherever the folder was named (a model swap, a study config,
    the explorer), never wrapped in another error."""


class DecodingError(LMSCMError, ValueError):
    """Invalid decoding settings (temperature, top-k, top-p)."""


class ObservationError(LMSCMError, ValueError):
    """An observed or prompt token sequence is malformed: empty, out of the vocabulary,
    longer than ``max_new_tokens`` or than the model's context."""


class AbductionError(LMSCMError, ValueError):
    """The observation has probability zero under the model and decoding configuration,
    so the posterior over the exogenous noise does not exist."""


class MechanismError(LMSCMError, ValueError):
    """A causal mechanism is unknown or incompatible with the factual model
    (for example a different vocabulary)."""


class InterventionError(LMSCMError, ValueError):
    """An intervention names an unknown site or gives a value of the wrong kind."""


class TokenizationError(LMSCMError, ValueError):
    """Text could not be encoded to token ids that decode back to the same text."""


class ChatError(TokenizationError):
    """Chat messages are malformed (not a list of ``{"role", "content"}`` dicts with a known
    role and text content), or the model's tokenizer has no chat template."""


class InferenceError(LMSCMError, ValueError):
    """Invalid settings of an inference routine: an unknown abduction method or option, a
    non-positive sample count or temperature, a method that refuses the model (NUTS above
    its vocabulary limit), or draws that carry no weight."""


class StudyError(LMSCMError, ValueError):
    """A study cannot run as configured: a bad setting, an unreadable corpus, or an output
    folder that holds the results of another study."""


class ServeError(LMSCMError, ValueError):
    """The explorer cannot serve on the address given: a host that does not resolve or is not
    this machine's, or a port that is taken."""


class UnsupportedVersionError(LMSCMError, NotImplementedError):
    """An installed dependency has a version this package has no code for (e.g. ArviZ 1.x)."""


class LMSCMWarning(UserWarning):
    """Root of every warning issued by :mod:`pyro_lmscm`. The test suite turns it into an
    error wherever it is raised, and the quiet command line still shows it."""
