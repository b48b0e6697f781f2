r"""Noise models: the causal mechanism of one decoding step, :math:`w_t = f(\ell_t, u_t)`.

A sampler fixes the law of strings but not the structural causal model behind it: many
mechanisms give the same :math:`P(w_t \mid \ell_t)` and disagree on counterfactuals. A
:class:`NoiseModel` supplies the five things the package needs of one, and nothing in the
package asks which noise model it has:

1. :meth:`~NoiseModel.prior`, the law of :math:`u_t` (and :meth:`~NoiseModel.sample_prior`,
   a draw of it from a given generator);
2. :meth:`~NoiseModel.structural`, :math:`w_t = f(\ell_t, u_t)` on the decoded logits;
3. :meth:`~NoiseModel.posterior`, the exact law of :math:`u_t` given :math:`w_t = k`
   (the guide and :class:`~pyro_lmscm.inference.PosteriorNoiseMessenger` draw it);
4. :meth:`~NoiseModel.log_density`, :math:`\log p(u_t)`;
5. :meth:`~NoiseModel.counterfactual_log_probs`, the exact one-step law
   :math:`P(J = j \mid K = k; \ell, \ell')` (:func:`~pyro_lmscm.exact_counterfactual`).

Two families:

* :class:`GumbelMax` (the default): :math:`u_t \sim \mathrm{Gumbel}(0, 1)^V`,
  :math:`w_t = \arg\max(\ell_t + u_t)`; counterfactually stable (Oberst & Sontag 2019).
* :class:`InverseCDF`: :math:`u_t \sim \mathrm{Uniform}(0, 1)`, :math:`w_t` the first token
  whose cumulative probability exceeds :math:`u_t`, with tokens taken in vocabulary order
  (what ``torch.multinomial``-style samplers do) or sorted by probability (Chatzi et al.
  2024's "categorical" mechanism). Not counterfactually stable in vocabulary order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import pyro.distributions as dist
import torch

from ..errors import AbductionError, InferenceError
from ..validation import has_integer_dtype
from .gumbel_max_counterfactual import stay_log_prob, step_counterfactual_log_probs
from .gumbel_max_posterior import GumbelMaxPosterior, gumbel_log_density, perturbed_rows, standard_gumbel

__all__ = ["GumbelMax", "InPlaceGumbel", "InverseCDF", "InverseCDFPosterior", "NoiseModel"]


class NoiseModel(ABC):
    """The mechanism of one decoding step (see the module docstring).

    :ivar dtype: the floating dtype of :math:`u_t`.
    """

    dtype: torch.dtype = torch.float32

    #: Whether one step's counterfactual law (:meth:`counterfactual_log_probs`) depends only
    #: on the tokens possible on either side, whatever their ids: then it may run on those
    #: tokens alone, gathered in the order of their ids (a token impossible on both sides
    #: takes no part), as :func:`~pyro_lmscm.inference.most_probable` does under top-k or
    #: top-p decoding.
    compact_support: bool = False

    @abstractmethod
    def event_shape(self, vocab_size: int) -> torch.Size:
        """The shape of one step's noise :math:`u_t`."""

    @abstractmethod
    def prior(self, vocab_size: int, device: torch.device) -> dist.TorchDistribution:
        """The law of :math:`u_t`, batch shape ``()``."""

    @abstractmethod
    def sample_prior(
        self, shape: torch.Size, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Prior draws of shape ``shape`` (a batch shape + :meth:`event_shape`), from torch's
        generator or ``generator``."""

    @abstractmethod
    def structural(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """:math:`w = f(\\ell, u)` for decoded logits ``(..., V)`` and noise ``(...) + event``."""

    @abstractmethod
    def posterior(
        self, logits: torch.Tensor, observed: torch.Tensor, margin: float = 0.0, active: torch.Tensor | None = None
    ) -> dist.TorchDistribution:
        """The law of :math:`u` given :math:`f(\\ell, u) = k`, batch shape ``logits.shape[:-1]``;
        the prior where ``active`` is false.

        :raises AbductionError: if an observed token has probability zero.
        """

    @abstractmethod
    def log_density(self, u: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(u)`, summed over the event dimensions."""

    @abstractmethod
    def counterfactual_log_probs(
        self, factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
    ) -> torch.Tensor:
        """``(..., V)`` float64: :math:`\\log P(J = j \\mid K = k)` when the same posterior noise
        drives the decoded logits ``counterfactual_logits`` instead of ``factual_logits``.

        :raises AbductionError: if an observed token has factual probability zero.
        """

    def counterfactual_token_log_probs(
        self,
        factual_logits: torch.Tensor,
        counterfactual_logits: torch.Tensor,
        observed: torch.Tensor,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        """``(...)`` float64: :meth:`counterfactual_log_probs` at the tokens ``tokens`` ``(...)``
        alone (a path that never holds the whole law where one exists)."""
        full = self.counterfactual_log_probs(factual_logits, counterfactual_logits, observed)
        return full.gather(-1, tokens.to(full.device).long().expand(full.shape[:-1])[..., None]).squeeze(-1)

    def stay_log_prob(
        self, factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
    ) -> torch.Tensor:
        """``(...)``: :math:`\\log P(J = k \\mid K = k)` alone (a faster path where one exists)."""
        full = self.counterfactual_log_probs(factual_logits, counterfactual_logits, observed)
        return full.gather(-1, observed.to(full.device).long().expand(full.shape[:-1])[..., None]).squeeze(-1)

    def noise_statistics(self, logits: torch.Tensor, observed: int, drawn: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-draw summaries of one step's posterior noise ``drawn`` ``(rows,) + event`` for
        diagnostics (none by default)."""
        return {}


class InPlaceGumbel(dist.Gumbel):
    """Pyro's ``Gumbel``, each draw made in one buffer: the same uniforms (one ``torch.rand``)
    and the same floating-point steps as ``TransformedDistribution.rsample`` (the uniform's
    ``low + rand * (high - low)``, then ``log``, ``0 + (-1) x``, ``log``, ``loc + (-scale) x``),
    bit for bit, in place instead of a new tensor per step: the SCM draws one from the prior
    per step for every row it samples on the prior noise (64 rows of V = 49,152 float32: 12.6 MB
    each)."""

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        from torch.distributions.transforms import AffineTransform, ExpTransform

        base = self.base_dist
        tracked = torch.is_grad_enabled() and (self.loc.requires_grad or self.scale.requires_grad)
        if tracked or not isinstance(base, torch.distributions.Uniform):  # (in place would break autograd)
            return super().rsample(sample_shape)
        shape = self._extended_shape(torch.Size(sample_shape))
        x = torch.rand(shape, dtype=base.low.dtype, device=base.low.device)
        x.mul_(base.high - base.low).add_(base.low)
        for transform in self.transforms:
            if isinstance(transform.inv, ExpTransform):  # the inverse of exp: log
                x.log_()
            elif isinstance(transform, AffineTransform):
                x.mul_(transform.scale).add_(transform.loc)
            else:
                x = transform(x)
        return x

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class GumbelMax(NoiseModel):
    r""":math:`u_t \sim \mathrm{Gumbel}(0, 1)^V` and :math:`w_t = \arg\max_v (\ell_{t,v} + u_{t,v})`:
    the exact posterior is :class:`~pyro_lmscm.models.gumbel_max_posterior.GumbelMaxPosterior`
    (top-down truncated Gumbels), the one-step counterfactual law
    :func:`~pyro_lmscm.models.gumbel_max_counterfactual.step_counterfactual_log_probs`.
    The noise is exchangeable over the vocabulary, so no vocabulary order enters."""

    compact_support = True  # (the closed form compacts its rows itself)

    dtype = torch.float32

    def event_shape(self, vocab_size: int) -> torch.Size:
        return torch.Size([vocab_size])

    def prior(self, vocab_size: int, device: torch.device) -> dist.TorchDistribution:
        zeros = torch.zeros(vocab_size, device=device)
        return InPlaceGumbel(zeros, torch.ones_like(zeros)).to_event(1)

    def sample_prior(
        self, shape: torch.Size, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return standard_gumbel(shape, self.dtype, device, generator=generator)

    def structural(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(logits.shape, u.shape)
        winners = [perturbed.argmax(-1) for _, perturbed in perturbed_rows(logits, u)]
        return torch.cat(winners).view(shape[:-1])

    def posterior(
        self, logits: torch.Tensor, observed: torch.Tensor, margin: float = 0.0, active: torch.Tensor | None = None
    ) -> dist.TorchDistribution:
        return GumbelMaxPosterior(logits, observed, margin=margin, active=active)

    def log_density(self, u: torch.Tensor) -> torch.Tensor:
        return gumbel_log_density(u).sum(-1)

    def counterfactual_log_probs(
        self, factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
    ) -> torch.Tensor:
        return step_counterfactual_log_probs(factual_logits, counterfactual_logits, observed)

    def counterfactual_token_log_probs(
        self,
        factual_logits: torch.Tensor,
        counterfactual_logits: torch.Tensor,
        observed: torch.Tensor,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        return step_counterfactual_log_probs(factual_logits, counterfactual_logits, observed, tokens=tokens)

    def stay_log_prob(
        self, factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
    ) -> torch.Tensor:
        return stay_log_prob(factual_logits, counterfactual_logits, observed)

    def noise_statistics(self, logits: torch.Tensor, observed: int, drawn: torch.Tensor) -> dict[str, torch.Tensor]:
        # copies: a view of the noise column would keep the step's whole noise alive
        return {
            "observed_noise": drawn[:, observed].to(device="cpu", dtype=torch.float32, copy=True),
            "top_gumbel": torch.cat([p.amax(-1) for _, p in perturbed_rows(logits, drawn)]).float().cpu(),
        }

    def __repr__(self) -> str:
        return "GumbelMax()"



class InverseCDFPosterior(dist.Uniform):
    """:math:`\\mathrm{Uniform}[a, b)` on the observed token's interval, with draws kept
    strictly below :math:`b` (so that the structural function gives the token back)."""

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        value = super().sample(torch.Size(sample_shape))
        return torch.minimum(value, torch.nextafter(self.high, self.low).expand(value.shape))


def _permutation(value: Any) -> torch.Tensor:
    """``value`` as a ``(V,)`` long tensor holding each of ``range(V)`` once.

    :raises InferenceError: for anything else: no integer ids (floats would be truncated into
        a permutation silently), a repeat, a gap or no entries.
    """
    try:
        ids = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        ids = None
    integer = ids is not None and has_integer_dtype(ids)
    if ids is None or not integer or not ids.numel() or not torch.equal(
        ids.long().reshape(-1).sort().values, torch.arange(ids.numel())
    ):
        raise InferenceError(f"InverseCDF(permutation=...) must be a permutation of range(V), got {value!r:.80}.")
    return ids.long().reshape(-1)


class InverseCDF(NoiseModel):
    r""":math:`u_t \sim \mathrm{Uniform}(0, 1)` and :math:`w_t` the first token, in a fixed
    order, whose cumulative probability exceeds :math:`u_t`.

    Token :math:`j` owns the interval :math:`[c_{j^-}, c_j)` of the cumulative distribution
    in that order. The exact posterior given :math:`w_t = k` is uniform on :math:`k`'s
    interval, and the one-step counterfactual law is an overlap of intervals,
    :math:`P(J = j \mid K = k) = |I_k \cap I'_j| / |I_k|` (:math:`O(V)` after the sort).
    Probabilities and cumulative sums are float64; an interval narrower than float64's
    resolution near its cumulative value (a token of probability below about
    :math:`10^{-16}`) has zero width, and observing such a token is refused.

    :param order: ``"vocabulary"``: tokens in id order (or ``permutation``'s order), as
        ``torch.multinomial``-style samplers take them; ``"probability"``: sorted by
        decreasing probability, ties in id (or ``permutation``) order.
    :param permutation: the vocabulary order, a permutation of ``range(V)``; default the ids.
    """

    dtype = torch.float64

    def __init__(self, order: str = "vocabulary", permutation: torch.Tensor | None = None) -> None:
        if order not in ("vocabulary", "probability"):
            raise InferenceError(f"InverseCDF(order=...) is 'vocabulary' or 'probability', got {order!r}.")
        self.order = order
        if permutation is not None:
            permutation = _permutation(permutation)
        self.permutation = permutation

    def permuted(self, permutation: torch.Tensor) -> InverseCDF:
        """The same mechanism with the vocabulary taken in ``permutation``'s order."""
        return InverseCDF(self.order, permutation)

    def event_shape(self, vocab_size: int) -> torch.Size:
        return torch.Size()

    def prior(self, vocab_size: int, device: torch.device) -> dist.TorchDistribution:
        zero = torch.zeros((), dtype=self.dtype, device=device)
        return dist.Uniform(zero, torch.ones_like(zero))

    def sample_prior(
        self, shape: torch.Size, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.rand(shape, dtype=self.dtype, device=device, generator=generator)

    def _order(self, probs: torch.Tensor) -> torch.Tensor:
        """``(..., V)``: the tokens in the order their intervals are laid out."""
        vocab = probs.shape[-1]
        base = torch.arange(vocab, device=probs.device) if self.permutation is None else self.permutation
        if base.numel() != vocab:
            raise InferenceError(f"InverseCDF: the permutation has {base.numel()} entries for a vocabulary of {vocab}.")
        base = base.to(probs.device).expand(probs.shape)
        if self.order == "vocabulary":
            return base
        by_probability = torch.argsort(-probs.gather(-1, base), dim=-1, stable=True)
        return base.gather(-1, by_probability)

    def _laid_out(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, cumulative)``, each ``(..., V)``: the tokens in layout order and the
        float64 cumulative probability at the end of each one's interval."""
        probs = logits.double().softmax(-1)
        order = self._order(probs)
        return order, torch.cumsum(probs.gather(-1, order), -1)

    def intervals(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)``, each ``(..., V)`` float64, indexed by token: token ``j`` owns
        ``[low_j, high_j)``."""
        order, high_sorted = self._laid_out(logits)
        low_sorted = torch.cat([torch.zeros_like(high_sorted[..., :1]), high_sorted[..., :-1]], -1)
        low = torch.empty_like(low_sorted).scatter_(-1, order, low_sorted)
        high = torch.empty_like(high_sorted).scatter_(-1, order, high_sorted)
        return low, high

    def structural(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        order, cumulative = self._laid_out(logits)
        batch = torch.broadcast_shapes(cumulative.shape[:-1], u.shape)  # plates may widen u
        cumulative, order = cumulative.expand(batch + cumulative.shape[-1:]), order.expand(batch + order.shape[-1:])
        u = u.to(cumulative.dtype).expand(batch)
        position = torch.searchsorted(cumulative.contiguous(), u[..., None].contiguous(), right=True)
        last = cumulative.argmax(-1, keepdim=True)  # the last token of positive probability
        position = torch.minimum(position, last)  # u at or above a total rounded below 1
        return order.gather(-1, position).squeeze(-1)

    def posterior(
        self, logits: torch.Tensor, observed: torch.Tensor, margin: float = 0.0, active: torch.Tensor | None = None
    ) -> dist.TorchDistribution:
        if margin != 0.0:
            raise InferenceError("a margin applies to Gumbel-max noise; InverseCDF's posterior is exact without one.")
        low, high = self.intervals(logits)
        k = observed.to(low.device).long().expand(low.shape[:-1])[..., None]
        a, b = low.gather(-1, k).squeeze(-1), high.gather(-1, k).squeeze(-1)
        if active is not None:
            active = active.to(a.device).expand(a.shape)
            a, b = torch.where(active, a, 0.0), torch.where(active, b, 1.0)
        if bool((b <= a).any()):
            raise AbductionError(
                "an observed token has probability zero (or below float64's resolution of its interval) under "
                "the inverse-CDF mechanism: no noise produces it."
            )
        return InverseCDFPosterior(a, b, validate_args=False)

    def log_density(self, u: torch.Tensor) -> torch.Tensor:
        inside = (u >= 0) & (u < 1)
        return torch.where(inside, torch.zeros_like(u), torch.full_like(u, -math.inf))

    def counterfactual_log_probs(
        self, factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, observed: torch.Tensor
    ) -> torch.Tensor:
        low, high = self.intervals(factual_logits)
        low_cf, high_cf = self.intervals(counterfactual_logits)
        low, high, low_cf, high_cf = torch.broadcast_tensors(low, high, low_cf, high_cf)
        k = observed.to(low.device).long().expand(low.shape[:-1])[..., None]
        a, b = low.gather(-1, k), high.gather(-1, k)
        if bool((b <= a).any()):
            raise AbductionError("an observed token has factual probability zero: no noise produces it.")
        overlap = (torch.minimum(b, high_cf) - torch.maximum(a, low_cf)).clamp(min=0.0)
        return (overlap / (b - a)).log()

    def __repr__(self) -> str:
        permuted = "" if self.permutation is None else ", permutation=..."
        return f"InverseCDF(order={self.order!r}{permuted})"
