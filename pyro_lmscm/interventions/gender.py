r"""A ready gender-steering mechanism: the direction "female minus male" from contrastive prompts.

The paper's running example (Ravfogel et al. 2024, Sec. 5) steers a model's gender
representation and asks how a man's story would have read had the model been steered.
:func:`gender_steering` builds an :class:`~pyro_lmscm.interventions.ActivationSteering`
from :data:`FEMALE_PROMPTS` and :data:`MALE_PROMPTS`, minimal pairs that differ only in
the gendered words (difference of means at the last token, as in CAA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MechanismError
from .affine_steering import AffineSteering
from .steering import ActivationSteering

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["FEMALE_PROMPTS", "MALE_PROMPTS", "gender_mimic", "gender_steering"]

#: Prompts about women, each the minimal pair of the same line of :data:`MALE_PROMPTS`.
FEMALE_PROMPTS = (
    "The woman said that she",
    "My mother told me that she",
    "The girl thought that she",
    "Her sister knew that she",
    "The queen announced that she",
    "My aunt said that she",
    "The actress felt that she",
    "The nurse said that she",
)
#: Prompts about men.
MALE_PROMPTS = (
    "The man said that he",
    "My father told me that he",
    "The boy thought that he",
    "His brother knew that he",
    "The king announced that he",
    "My uncle said that he",
    "The actor felt that he",
    "The doctor said that he",
)


def _contrast(
    lm: HFLanguageModel, direction: str, layer: int | None, owner: str
) -> tuple[int, list[str], list[str]]:
    """The layer (default a third of the depth) and the prompts toward ``direction``, then
    away from it."""
    if direction not in ("female", "male"):
        raise MechanismError(f"{owner}: `direction` must be 'female' or 'male', got {direction!r}.")
    if layer is None:
        layer = lm.model.config.num_hidden_layers // 3
    toward, away = (FEMALE_PROMPTS, MALE_PROMPTS) if direction == "female" else (MALE_PROMPTS, FEMALE_PROMPTS)
    return layer, list(toward), list(away)


def gender_steering(
    lm: HFLanguageModel,
    direction: str = "female",
    layer: int | None = None,
    alpha: float = 1.0,
    start: int = 0,
) -> ActivationSteering:
    r"""Steer toward ``direction``: :math:`h_L \mapsto h_L \pm \alpha\,\Delta_L`, with
    :math:`\Delta_L = \bar h^{\text{female}}_L - \bar h^{\text{male}}_L`.

    :param lm: the factual language model (the prompts need its tokenizer).
    :param direction: ``"female"`` (plus sign) or ``"male"`` (minus sign).
    :param layer: decoder layer :math:`L`; default a third of the depth (layer 10 of
        SmolLM2's 30, where :math:`\alpha = 1` turns "he/his" into "she/her" without
        breaking fluency in our trials; :math:`\alpha = 2` already degrades the text).
    :param alpha: :math:`\alpha`.
    :param start: first absolute position that is steered.
    :raises MechanismError: for another ``direction``.
    """
    layer, positive, negative = _contrast(lm, direction, layer, "gender_steering")
    return ActivationSteering.from_contrastive(lm, positive, negative, layer=layer, alpha=alpha, start=start)


def gender_mimic(
    lm: HFLanguageModel,
    direction: str = "female",
    layer: int | None = None,
    alpha: float = 1.0,
    start: int = 0,
    shrinkage: float = 0.1,
) -> AffineSteering:
    r"""MiMiC toward ``direction`` (Singh et al. 2024): the affine map of
    :class:`~pyro_lmscm.interventions.AffineSteering` that transports the Gaussian of
    decoder layer :math:`L`'s hidden states on the source-gender prompts onto that of the
    target gender (mean and covariance), estimated on the same contrastive prompts as
    :func:`gender_steering`, which only moves the mean.

    :param direction: ``"female"`` (male → female prompts) or ``"male"``.
    :param layer, alpha, start: as :func:`gender_steering`.
    :param shrinkage: of the covariances (see :meth:`AffineSteering.from_contrastive`).
    :raises MechanismError: for another ``direction``.
    """
    layer, target, source = _contrast(lm, direction, layer, "gender_mimic")
    return AffineSteering.from_contrastive(
        lm, source, target, layer=layer, alpha=alpha, start=start, shrinkage=shrinkage
    )
