r"""Model swap: another language model over the same vocabulary as the mechanism."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager

import torch

from ..errors import MechanismError
from ..models.mechanism import Mechanism
from ..validation import as_lm
from .weight_edit import WeightDelta

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["ModelSwap"]


class ModelSwap(Mechanism):
    r"""Replace the factual model :math:`f_\theta` by another model :math:`f_{\theta'}`:
    :math:`\ell_t = f_{\theta'}(\text{prompt}, w_{<t})`, e.g. a base model versus its
    instruction-tuned version. The noise :math:`u_t` is shared, so the two models'
    strings are coupled token by token.

    :param other: the other language model; it must have the same vocabulary size.
    """

    def __init__(self, other: HFLanguageModel) -> None:
        self.other = as_lm(other, "other", "ModelSwap")

    def check(self, lm: HFLanguageModel) -> None:
        if self.other.vocab_size != lm.vocab_size:
            raise MechanismError(
                f"ModelSwap: the other model's vocabulary has {self.other.vocab_size} tokens but "
                f"the factual model's has {lm.vocab_size}; a swap needs the same tokenizer."
            )
        if self.other.device != lm.device:
            raise MechanismError(
                f"ModelSwap: the other model is on {self.other.device} but the factual model is "
                f"on {lm.device}; move both to one device."
            )

    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        return nullcontext(self.other)

    @torch.no_grad()
    def as_weight_delta(self, lm: HFLanguageModel) -> WeightDelta:
        r"""The swap as a weight edit of ``lm``, for two models of one architecture:
        :math:`\Delta_n = \theta'_n - \theta_n` for every parameter :math:`n` where they
        differ, computed in float64, so that :math:`\theta_n + \Delta_n` rounds back to
        :math:`\theta'_n` bit for bit (checked). Its parts are the decoder layers (and the
        other parameters, e.g. ``lm_head.weight``): "which layers of the other model change
        this string". A swap itself is one indivisible part (the other model runs whole).

        :param lm: the factual model, as in the SCM.
        :raises MechanismError: for models of other parameter names, shapes or dtypes, or if a
            parameter cannot be reached exactly by adding a delta; buffers that differ (e.g.
            rotary frequencies) also, since a weight edit does not change them.
        """
        owner = "ModelSwap.as_weight_delta"
        mine, theirs = dict(lm.model.named_parameters()), dict(self.other.model.named_parameters())
        if mine.keys() != theirs.keys():
            only = sorted(mine.keys() ^ theirs.keys())[:3]
            raise MechanismError(
                f"{owner}: the two models have other parameters (e.g. {only}); one architecture is needed."
            )
        deltas: dict[str, torch.Tensor] = {}
        for name, parameter in mine.items():
            other = theirs[name]
            if other.shape != parameter.shape or other.dtype != parameter.dtype:
                raise MechanismError(
                    f"{owner}: parameter {name!r} is {tuple(other.shape)} {other.dtype} in the other model but "
                    f"{tuple(parameter.shape)} {parameter.dtype} in the factual one."
                )
            other = other.to(parameter.device)
            if torch.equal(other, parameter):
                continue
            delta = other.double() - parameter.double()
            if not torch.equal((parameter.double() + delta).to(parameter.dtype), other):
                raise MechanismError(f"{owner}: {name!r} cannot be reached exactly by adding a float64 delta.")
            deltas[name] = delta
        buffers = dict(self.other.model.named_buffers())
        for name, buffer in lm.model.named_buffers():
            if name in buffers and not torch.equal(buffer, buffers[name].to(buffer.device)):
                raise MechanismError(
                    f"{owner}: buffer {name!r} differs between the models; a weight edit cannot change it."
                )
        if not deltas:
            raise MechanismError(f"{owner}: the two models have the same parameters; there is nothing to edit.")
        return WeightDelta(deltas)

    def __repr__(self) -> str:
        return f"ModelSwap({self.other!r})"
