r"""The Gumbel-max posterior with the argmax relaxed to a tempered softmax (Concrete /
Gumbel-softmax), the model that the relaxed abduction methods fit."""

from __future__ import annotations

from typing import Mapping

import pyro
import pyro.distributions as dist
import torch

from ..errors import InferenceError
from ..models.sites import noise_site, token_site
from ..validation import as_real, has_integer_dtype

__all__ = ["NUTS_MAX_VOCAB", "RELAXED_PREFIX", "RelaxedGumbelMaxModel", "relaxed_site"]


#: Prefix of the relaxed likelihood factor sites, ``"__relaxed_w_<t>"``.
RELAXED_PREFIX = "__relaxed"
#: ``"relaxed-nuts"`` refuses larger vocabularies by default: HMC in :math:`n V` dimensions.
NUTS_MAX_VOCAB = 64


def relaxed_site(t: int) -> str:
    """Name of the relaxed likelihood factor of step ``t``, e.g. ``"__relaxed_w_3"``."""
    return f"{RELAXED_PREFIX}_{token_site(t)}"


class RelaxedGumbelMaxModel:
    r"""The Gumbel-max posterior with the argmax relaxed to a tempered softmax:

    .. math::

        p_\tau(u \mid k) \propto \prod_{t < n_a} \mathrm{Gumbel}(u_t; 0, 1)^V\,
            \mathrm{softmax}\big((\ell_t + u_t)/\tau\big)_{k_t},

    a Pyro model with sites ``"u_t"`` (:math:`t < n_a`) and factors ``"__relaxed_w_t"``.
    As :math:`\tau \to 0` the softmax tends to :math:`\mathbb{1}[\arg\max_v(\ell_{t,v} +
    u_{t,v}) = k_t]` and :math:`p_\tau` to the exact posterior.

    :param logits: decoded factual logits :math:`\ell`, ``(n_a, V)``.
    :param observed: observed ids :math:`k`, ``(n_a,)``.
    :param temperature: the relaxation temperature :math:`\tau > 0` (not the decoding one).
    :raises InferenceError: for logits that are no ``(n_a, V)`` float tensor, observed ids
        that are not ``n_a`` ids in the vocabulary, or an observed token of logit :math:`-\infty`.

    >>> logits = torch.tensor([[0.0, 1.0, -1.0]])
    >>> u_wins, u_loses = {"u_0": torch.tensor([0.0, 0.0, 5.0])}, {"u_0": torch.tensor([0.0, 0.0, 0.0])}
    >>> sharp = RelaxedGumbelMaxModel(logits, torch.tensor([2]), temperature=0.01)
    >>> [round(float(sharp.log_likelihood(u).exp()), 3) for u in (u_wins, u_loses)]
    [1.0, 0.0]
    """

    def __init__(self, logits: torch.Tensor, observed: torch.Tensor, temperature: float) -> None:
        as_real(temperature, "temperature", minimum=0.0, exclusive=True)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
            raise InferenceError(
                f"`logits` must be a float tensor of shape (n_a, V), got {type(logits).__name__} "
                f"{tuple(getattr(logits, 'shape', ()))}."
            )
        if (
            not isinstance(observed, torch.Tensor)
            or observed.shape != logits.shape[:1]
            or not has_integer_dtype(observed)
            or bool(((observed < 0) | (observed >= logits.shape[-1])).any())
        ):
            raise InferenceError(
                f"`observed` must be {logits.shape[0]} token ids in [0, {logits.shape[-1]}), one per row of "
                f"`logits`, got {observed!r:.80}."
            )
        chosen = logits.detach().gather(-1, observed.to(logits.device).long()[:, None])
        if not bool(torch.isfinite(chosen).all()):
            raise InferenceError("an observed token has logit -inf (or a non-finite one): it has probability zero.")
        self.logits = logits.detach()
        self.observed = observed
        self.temperature = float(temperature)
        vocab = logits.shape[-1]
        zeros = torch.zeros(vocab, device=logits.device)
        self.prior = dist.Gumbel(zeros, torch.ones_like(zeros)).to_event(1)

    def step_log_likelihood(self, t: int, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \mathrm{softmax}((\ell_t + u_t)/\tau)_{k_t}`, shape ``u.shape[:-1]``."""
        scaled = (self.logits[t] + u) / self.temperature
        return scaled.log_softmax(-1)[..., int(self.observed[t])]

    def log_likelihood(self, noise: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the relaxed factors for noise ``{"u_t": (..., V)}``."""
        steps = range(len(self.observed))
        return sum(self.step_log_likelihood(t, noise[noise_site(t)]) for t in steps)  # type: ignore[return-value]

    def __call__(self) -> None:
        for t in range(len(self.observed)):
            u = pyro.sample(noise_site(t), self.prior)
            pyro.factor(relaxed_site(t), self.step_log_likelihood(t, u))


# -- methods ---------------------------------------------------------------------------------
