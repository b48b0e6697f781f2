"""Point masses on integer values (token ids, mechanism indices)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost

__all__ = ["IntegerDelta"]


class IntegerDelta(dist.Delta):
    r"""A :class:`~pyro.distributions.Delta` whose value is an integer tensor.

    .. math::

        \log p(x) = \begin{cases} 0 & x = v \\ -\infty & x \neq v \end{cases}

    Pyro's ``Delta`` computes ``log_prob`` in the dtype of the value, which fails for
    ``torch.long``; this subclass computes it in the default floating dtype, so
    ``pyro.condition`` and ``poutine.do`` on token sites give real ``0`` / ``-inf``
    likelihoods.

    :param v: the integer value (any shape; the rightmost ``event_dim`` dims are the event).
    :param event_dim: number of rightmost dims of ``v`` that form one event.
    """

    support = dist.constraints.integer  # type: ignore[assignment]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v.expand(self.shape())
        log_prob = (x == v).to(torch.get_default_dtype()).log()
        log_prob = sum_rightmost(log_prob, self.event_dim)
        return log_prob + self.log_density
