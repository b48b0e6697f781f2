r"""Activation steering: add a vector to the residual stream of one decoder layer.

The residual-stream edits of this module and :mod:`~pyro_lmscm.interventions.affine_steering`
share one forward hook on the output of decoder layer :math:`L`
(``model.model.layers[L]`` for Llama-style models). The hook is registered when the
mechanism is activated and removed when the context exits, also on an exception, so the
factual mechanism running in the same batch never sees it.

Positions are *absolute*: the position of a token in prompt + continuation, read from the
``position_ids`` the model passes to its layers. In incremental decoding with a KV cache
the single token of a step sits at the cache length, so an edit limited to positions
:math:`\geq s` acts on the same tokens whether the string is decoded step by step or
teacher-forced in one pass.

References

[1] Turner et al., *Steering Language Models With Activation Engineering* (2023),
    arXiv:2308.10248.
[2] Rimsky et al., *Steering Llama 2 via Contrastive Activation Addition* (2024),
    arXiv:2312.06681.
[3] Li et al., *Inference-Time Intervention* (2023), arXiv:2306.03341.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import MechanismError
from ..validation import as_lm
from .internals import (
    _as_ids,
    _check_int,
    _check_real,
    _check_vector,
    _layer_hidden_states,
    _ResidualStreamEdit,
    _resolve_layer,
)
from .ops import TextOrIds

if TYPE_CHECKING:

    from ..lm import HFLanguageModel

__all__ = ["ActivationSteering"]



class ActivationSteering(_ResidualStreamEdit):
    r"""Add a steering vector to the residual stream after decoder layer :math:`L`:

    .. math::

        h_{L,i} \;\mapsto\; h_{L,i} + \alpha\, v \qquad \text{for every absolute position } i \geq s,

    where :math:`h_{L,i} \in \mathbb{R}^d` is the output of decoder layer :math:`L` (``layer``)
    at position :math:`i` of prompt + continuation, :math:`v` is ``vector``, :math:`\alpha`
    is ``alpha`` and :math:`s` is ``start``. The next-token logits of the mechanism are those
    of the model with this edit, :math:`\ell_t = f_{\theta, L, \alpha v}(\text{prompt}, w_{<t})`.
    With :math:`\alpha = 0` the mechanism is the factual model.

    :param vector: :math:`v`, shape ``(d,)`` with :math:`d` the hidden size.
    :param layer: :math:`L`, index of the decoder layer (negative counts from the end).
    :param alpha: :math:`\alpha`, the steering strength.
    :param start: :math:`s \geq 0`; positions before it (e.g. the prompt) are not edited.
    :raises MechanismError: on a bad vector, layer, strength or start.

    >>> from pyro_lmscm.interventions import ActivationSteering
    >>> steer = ActivationSteering(torch.ones(32), layer=1, alpha=0.0)
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4, mechanisms={"steer": steer})
    >>> steered = {"mechanism": "steer"}
    >>> result = counterfactual(scm, torch.tensor([2, 3]), intervention=steered, num_samples=3, seed=0)
    >>> bool((result.counterfactual_ids[:, : len(result.factual_ids)] == result.factual_ids).all())
    True
    """

    def __init__(self, vector: torch.Tensor, layer: int, alpha: float = 1.0, start: int = 0) -> None:
        super().__init__(layer, start)
        self.vector = _check_vector(vector, "vector", "ActivationSteering").float()
        self.alpha = _check_real(alpha, "alpha", "ActivationSteering")

    @property
    def dim(self) -> int:
        return self.vector.shape[0]

    def edit(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.alpha * self.vector.to(hidden.device, hidden.dtype)

    @classmethod
    def from_contrastive(
        cls,
        lm: HFLanguageModel,
        positive_prompts: Sequence[TextOrIds],
        negative_prompts: Sequence[TextOrIds],
        layer: int,
        alpha: float = 1.0,
        start: int = 0,
    ) -> ActivationSteering:
        r"""The steering vector as a difference of means at the last token (CAA / ITI style):

        .. math::

            v = \frac{1}{|P|} \sum_{x \in P} h_L(x)_{-1} \;-\; \frac{1}{|N|} \sum_{x \in N} h_L(x)_{-1},

        where :math:`h_L(x)_{-1}` is the output of decoder layer :math:`L` at the last token of
        prompt :math:`x`, :math:`P` is ``positive_prompts`` and :math:`N` is ``negative_prompts``.

        :param lm: the factual language model.
        :param positive_prompts: texts or token id tensors ``(L_i,)``, at least one.
        :param negative_prompts: as ``positive_prompts``.
        :param layer: :math:`L`.
        :param alpha: the steering strength of the returned mechanism.
        :param start: its first edited position.
        :raises MechanismError: on an empty list or a bad layer.
        :raises TokenizationError: for text that does not round-trip through the tokenizer.
        """
        as_lm(lm, owner="ActivationSteering.from_contrastive")
        layer_index = _resolve_layer(
            lm.model, _check_int(layer, "layer", "ActivationSteering"), "ActivationSteering"
        )
        means = []
        for name, prompts in (("positive_prompts", positive_prompts), ("negative_prompts", negative_prompts)):
            if isinstance(prompts, (str, torch.Tensor)) or len(prompts) == 0:
                raise MechanismError(
                    f"ActivationSteering.from_contrastive: `{name}` must be a non-empty list of texts "
                    "or token id tensors."
                )
            ids = [_as_ids(lm, p, f"{name}[{i}]") for i, p in enumerate(prompts)]
            hidden = _layer_hidden_states(lm, layer_index, ids)
            means.append(torch.stack([h[-1] for h in hidden]).mean(0))
        return cls((means[0] - means[1]).cpu(), layer, alpha=alpha, start=start)

    def __repr__(self) -> str:
        return (
            f"ActivationSteering(layer={self.layer}, alpha={self.alpha}, start={self.start}, "
            f"|v|={float(self.vector.norm()):.4g})"
        )
