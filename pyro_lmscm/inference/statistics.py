"""Statistics of abduction draws: active steps, effective sample size, noise summaries,
log prior and the consistency check, shared by the methods, their result and prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from pyro.infer.importance import LogWeightsMixin

from ..errors import InferenceError
from ..models.gumbel_max_posterior import gumbel_log_density
from ..models.sites import noise_site

if TYPE_CHECKING:
    from ..models.scm import LanguageModelSCM

__all__ = ["active_steps", "as_log_weights", "consistent_draws", "kish_ess", "log_prior", "noise_statistics"]


def active_steps(scm: LanguageModelSCM, observed: torch.Tensor) -> int:
    """Number of observed steps that the model generates: up to and including the first end."""
    ended = scm.finished_after(observed)
    return int((~ended).sum()) + (1 if bool(ended.any()) else 0)


def as_log_weights(log_weights: Any, num_samples: int | None = None) -> torch.Tensor:
    r"""``log_weights`` as a float64 CPU tensor ``(N,)`` (``N = num_samples`` if given), holding
    no NaN or :math:`+\infty` (:math:`-\infty` is a weight of zero).

    :raises InferenceError: naming ``log_weights`` otherwise.
    """
    shape = "(N,)" if num_samples is None else f"({num_samples},)"
    try:
        log_w = torch.as_tensor(log_weights, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as failure:
        raise InferenceError(
            f"`log_weights` must be a tensor of shape {shape}, got {log_weights!r:.80} ({failure})."
        ) from None
    if log_w.dim() != 1 or (num_samples is not None and log_w.shape[0] != num_samples):
        raise InferenceError(f"`log_weights` must have shape {shape}, got {tuple(log_w.shape)}.")
    if bool(torch.isnan(log_w).any() | (log_w == float("inf")).any()):
        raise InferenceError(f"`log_weights` holds NaN or +inf: {log_w[~torch.isfinite(log_w)][:5].tolist()}.")
    return log_w


def kish_ess(log_weights: torch.Tensor | None, num_samples: int | None = None) -> float:
    r"""Kish's effective sample size :math:`(\sum_i w_i)^2 / \sum_i w_i^2` of log weights;
    ``num_samples`` for ``None`` (uniform weights), ``0.0`` when every weight is zero.

    :raises InferenceError: for log weights that are not ``(N,)`` real numbers, or hold NaN or
        :math:`+\infty`.
    """
    if log_weights is None:
        if num_samples is None:
            raise InferenceError("`num_samples` is needed for uniform weights.")
        return float(num_samples)
    log_w = as_log_weights(log_weights)
    weights = LogWeightsMixin()  # Pyro's own: exp(-logsumexp(2 log w_normalised))
    weights.log_weights = log_w
    if not bool(torch.isfinite(weights.log_weights).any()):
        return 0.0
    return float(weights.get_ESS())


def noise_statistics(
    logits: torch.Tensor, observed: torch.Tensor, noise: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    r"""Per-draw scalars of the noise at the observed steps :math:`t < n_a`:

    * ``"observed_noise"``: :math:`u_{t, k_t}`, the noise of the observed token;
    * ``"top_gumbel"``: :math:`M_t = \max_v (\ell_{t,v} + u_{t,v})`, the winning perturbed logit.

    Under the exact posterior :math:`M_t \sim \mathrm{Gumbel}(\log\sum_v e^{\ell'_{t,v}})`
    (as under the prior: the max is independent of the argmax), and
    :math:`u_{t,k_t} = M_t + \delta - \ell_{t,k_t}`.

    :param logits: decoded factual logits :math:`\ell` at the observed steps, ``(n, V)``.
    :param observed: the observed ids :math:`k`, ``(n,)``; only the first :math:`n_a`
        (up to the first end of sequence) are used.
    :param noise: ``{"u_t": (N, V)}`` for every :math:`t < n_a`.
    :returns: ``{"observed_noise": (N, n_a), "top_gumbel": (N, n_a)}``, float32 on the CPU.
    """
    num_active = logits.shape[0]
    observed_noise, top = [], []
    for t in range(num_active):
        u = noise[noise_site(t)].detach().float().to(logits.device)
        observed_noise.append(u[..., int(observed[t])])
        top.append((logits[t] + u).amax(-1))
    return {
        "observed_noise": torch.stack(observed_noise, -1).cpu(),
        "top_gumbel": torch.stack(top, -1).cpu(),
    }


def log_prior(noise: Mapping[str, torch.Tensor], num_active: int) -> torch.Tensor:
    steps = range(num_active)
    return sum(gumbel_log_density(noise[noise_site(t)]).sum(-1) for t in steps)  # type: ignore[return-value]


def consistent_draws(logits: torch.Tensor, observed: torch.Tensor, noise: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""Bool ``(N,)``: :math:`\arg\max_v (\ell_{t,v} + u_{t,v}) = k_t` at every active step,
    computed as the SCM computes it (``torch.argmax``, first index on a tie)."""
    ok: torch.Tensor | None = None
    for t in range(logits.shape[0]):
        step = torch.argmax(logits[t] + noise[noise_site(t)].to(logits.device), dim=-1) == observed[t]
        ok = step if ok is None else ok & step
    assert ok is not None
    return ok.cpu()


# -- results ---------------------------------------------------------------------------------
