r"""Affine steering (MiMiC): the Gaussian optimal-transport map between two concepts.

References

[1] Singh, Ravfogel, Herzig, Aharoni, Cotterell, Kumaraguru, *Representation Surgery:
    Theory and Practice of Affine Steering* (ICML 2024), arXiv:2402.09631.
[2] Ravfogel, Svete, Snæbjarnarson, Cotterell, *Gumbel Counterfactual Generation From
    Language Models* (2024), arXiv:2411.07180 (uses MiMiC for the gender intervention).
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

__all__ = ["AffineSteering"]


def _sym_power(matrix: torch.Tensor, power: float, eps: float = 0.0) -> torch.Tensor:
    """``matrix ** power`` for a symmetric positive semi-definite matrix (float64)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    eigenvalues = eigenvalues.clamp_min(eps)
    return (eigenvectors * eigenvalues.pow(power)) @ eigenvectors.T


def _check_cov(cov: torch.Tensor, name: str, dim: int, definite: bool) -> torch.Tensor:
    """A symmetric positive (semi-)definite ``(dim, dim)`` matrix, float64."""
    cov = _check_vector(cov, name, "AffineSteering", dim=2)
    if cov.shape != (dim, dim):
        raise MechanismError(
            f"AffineSteering: `{name}` must have shape ({dim}, {dim}), got {tuple(cov.shape)}."
        )
    scale = float(cov.abs().max())
    if not torch.allclose(cov, cov.T, rtol=1e-5, atol=1e-7 * scale):
        raise MechanismError(f"AffineSteering: `{name}` must be symmetric.")
    smallest = float(torch.linalg.eigvalsh((cov + cov.T) / 2)[0])
    if (smallest <= 0) if definite else (smallest < -1e-7 * scale):
        kind = "positive definite" if definite else "positive semi-definite"
        raise MechanismError(
            f"AffineSteering: `{name}` must be {kind} (its smallest eigenvalue is {smallest:.3g}); "
            "estimate it with shrinkage, e.g. from_contrastive(..., shrinkage=0.1)."
        )
    return cov


class AffineSteering(_ResidualStreamEdit):
    r"""MiMiC: move the hidden states of decoder layer :math:`L` from the source concept's
    distribution to the target concept's with the Gaussian optimal-transport map.

    .. math::

        T(h) &= \mu_t + A\,(h - \mu_s), \\
        A &= \Sigma_s^{-1/2} \left( \Sigma_s^{1/2}\, \Sigma_t\, \Sigma_s^{1/2} \right)^{1/2} \Sigma_s^{-1/2}, \\
        h_{L,i} &\mapsto h_{L,i} + \alpha \left( T(h_{L,i}) - h_{L,i} \right)
            \qquad \text{for every absolute position } i \geq s,

    where :math:`h_{L,i} \in \mathbb{R}^d` is the output of decoder layer :math:`L` (``layer``)
    at position :math:`i`; :math:`\mu_s, \Sigma_s` (``source_mean``, ``source_cov``) and
    :math:`\mu_t, \Sigma_t` (``target_mean``, ``target_cov``) are the means and covariances of
    the two concepts' hidden states; :math:`\alpha` is ``alpha`` (1: the full map, 0: the
    factual model) and :math:`s` is ``start``. :math:`A` is symmetric positive definite and
    :math:`A \Sigma_s A = \Sigma_t`: if :math:`h \sim \mathcal{N}(\mu_s, \Sigma_s)` then
    :math:`T(h) \sim \mathcal{N}(\mu_t, \Sigma_t)`, and :math:`T` is the map of least
    expected squared displacement that does so. When the two concepts agree, :math:`T` is
    the identity.

    :param layer: :math:`L`, index of the decoder layer (negative counts from the end).
    :param source_mean: :math:`\mu_s`, shape ``(d,)``.
    :param target_mean: :math:`\mu_t`, shape ``(d,)``.
    :param source_cov: :math:`\Sigma_s`, shape ``(d, d)``, symmetric positive definite.
    :param target_cov: :math:`\Sigma_t`, shape ``(d, d)``, symmetric positive semi-definite.
    :param alpha: :math:`\alpha`, interpolation towards the map.
    :param start: :math:`s \geq 0`; positions before it are not edited.
    :raises MechanismError: on bad shapes, a covariance that is not positive definite, or
        a bad layer, strength or start.

    >>> from pyro_lmscm.interventions import AffineSteering
    >>> d = 32
    >>> mimic = AffineSteering(1, torch.zeros(d), torch.ones(d), torch.eye(d), 4 * torch.eye(d))
    >>> mimic.transport(torch.zeros(d))[:3]  # mu_t + A (0 - mu_s) with A = 2 I
    tensor([1., 1., 1.])
    """

    def __init__(
        self,
        layer: int,
        source_mean: torch.Tensor,
        target_mean: torch.Tensor,
        source_cov: torch.Tensor,
        target_cov: torch.Tensor,
        alpha: float = 1.0,
        start: int = 0,
    ) -> None:
        super().__init__(layer, start)
        source_mean = _check_vector(source_mean, "source_mean", "AffineSteering")
        target_mean = _check_vector(target_mean, "target_mean", "AffineSteering")
        d = source_mean.shape[0]
        if target_mean.shape != (d,):
            raise MechanismError(
                f"AffineSteering: `target_mean` has shape {tuple(target_mean.shape)} but `source_mean` "
                f"has ({d},)."
            )
        source_cov = _check_cov(source_cov, "source_cov", d, definite=True)
        target_cov = _check_cov(target_cov, "target_cov", d, definite=False)
        self.alpha = _check_real(alpha, "alpha", "AffineSteering")
        root = _sym_power(source_cov, 0.5)
        inverse_root = _sym_power(source_cov, -0.5)
        middle = _sym_power(root @ target_cov @ root, 0.5)
        matrix = inverse_root @ middle @ inverse_root
        #: :math:`A`, float64 ``(d, d)``.
        self.matrix: torch.Tensor = (matrix + matrix.T) / 2
        self.source_mean = source_mean
        self.target_mean = target_mean
        # T(h) = A h + b with b = mu_t - A mu_s, per device and dtype of the hidden states the hook edits
        self._affine: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.source_mean.shape[0]

    def transport(self, hidden: torch.Tensor) -> torch.Tensor:
        r"""The map :math:`T(h) = \mu_t + A(h - \mu_s)` on hidden states of shape ``(..., d)``."""
        matrix = self.matrix.to(device=hidden.device, dtype=hidden.dtype)
        source = self.source_mean.to(device=hidden.device, dtype=hidden.dtype)
        target = self.target_mean.to(device=hidden.device, dtype=hidden.dtype)
        return target + (hidden - source) @ matrix.T

    def edit(self, hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.device, hidden.dtype)
        affine = self._affine.get(key)
        if affine is None:
            offset = self.target_mean - self.matrix @ self.source_mean
            affine = (self.matrix.T.to(hidden.device, hidden.dtype), offset.to(hidden.device, hidden.dtype))
            self._affine[key] = affine
        mapped = hidden @ affine[0] + affine[1]
        return hidden + self.alpha * (mapped - hidden)

    @classmethod
    def from_contrastive(
        cls,
        lm: HFLanguageModel,
        source_texts: Sequence[TextOrIds],
        target_texts: Sequence[TextOrIds],
        layer: int,
        alpha: float = 1.0,
        start: int = 0,
        shrinkage: float = 0.1,
    ) -> AffineSteering:
        r"""Estimate the map from hidden states of decoder layer :math:`L` on two sets of texts.

        Every position :math:`i \geq s` of every text contributes one sample :math:`h_{L,i}`
        (the positions the mechanism edits). The covariances are shrunk towards a scaled
        identity, so that few samples suffice:

        .. math::

            \hat\Sigma = (1 - \lambda)\, S + \lambda\, \frac{\operatorname{tr} S}{d}\, I,

        where :math:`S` is the sample covariance and :math:`\lambda` is ``shrinkage``.

        :param lm: the factual language model.
        :param source_texts: texts or token id tensors ``(L_i,)`` of the source concept.
        :param target_texts: texts or token id tensors of the target concept.
        :param layer: :math:`L`.
        :param alpha: :math:`\alpha` of the returned mechanism.
        :param start: :math:`s`, the first position used and edited.
        :param shrinkage: :math:`\lambda \in (0, 1]`.
        :raises MechanismError: on an empty list, texts shorter than ``start + 1`` tokens
            or a bad ``shrinkage``.
        """
        owner = "AffineSteering.from_contrastive"
        as_lm(lm, owner=owner)
        layer_index = _resolve_layer(lm.model, _check_int(layer, "layer", owner), owner)
        start = _check_int(start, "start", owner, minimum=0)
        shrinkage = _check_real(shrinkage, "shrinkage", owner)
        if not 0.0 < shrinkage <= 1.0:
            raise MechanismError(
                f"{owner}: `shrinkage` must be in (0, 1], got {shrinkage}; without shrinkage the "
                "covariance of fewer samples than dimensions is singular."
            )
        stats = []
        for name, texts in (("source_texts", source_texts), ("target_texts", target_texts)):
            if isinstance(texts, (str, torch.Tensor)) or len(texts) == 0:
                raise MechanismError(
                    f"{owner}: `{name}` must be a non-empty list of texts or token id tensors."
                )
            ids = [_as_ids(lm, text, f"{name}[{i}]") for i, text in enumerate(texts)]
            hidden = torch.cat([h[start:] for h in _layer_hidden_states(lm, layer_index, ids)]).double().cpu()
            if hidden.shape[0] < 2:
                raise MechanismError(
                    f"{owner}: `{name}` gives {hidden.shape[0]} hidden states at positions >= {start}; "
                    "need at least 2 (longer or more texts, or a smaller `start`)."
                )
            mean = hidden.mean(0)
            sample_cov = torch.cov(hidden.T, correction=1)
            d = sample_cov.shape[0]
            scale = torch.trace(sample_cov) / d
            cov = (1 - shrinkage) * sample_cov + shrinkage * scale * torch.eye(d, dtype=torch.float64)
            stats.append((mean, cov))
        (source_mean, source_cov), (target_mean, target_cov) = stats
        return cls(layer, source_mean, target_mean, source_cov, target_cov, alpha=alpha, start=start)

    def __repr__(self) -> str:
        return f"AffineSteering(layer={self.layer}, d={self.dim}, alpha={self.alpha}, start={self.start})"
