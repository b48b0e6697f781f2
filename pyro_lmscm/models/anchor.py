r"""Memoised factual logits along an observed path.

A structural function must be a *function*: the same prefix must always give the same
logits. Numerically it is not: a teacher-forced pass, a KV-cached step and another batch
size round differently (measured on SmolLM2-135M: up to 5e-5 in float32 and 0.9 in
bfloat16). The abduction guide samples noise from a teacher-forced pass; if a replay
recomputed those logits along another path, a near-tie could flip an observed token.

:class:`FactualAnchor` memoises :math:`f_0` on the observed prefixes: while a row runs the
factual mechanism (index 0) on the anchored prompt and has emitted exactly the observed
tokens so far, its logits *are* the anchored ones,

.. math::

    \ell_t = \begin{cases}
        \ell^{\text{obs}}_t & m = 0,\ \text{prompt} = \text{prompt}^{\text{obs}},\
                              w_{<t} = w^{\text{obs}}_{<t},\ t < n, \\
        f_m(\text{prompt}, w_{<t}) & \text{otherwise,}
    \end{cases}

which is the same function up to rounding, evaluated once per prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FactualAnchor"]


@dataclass(frozen=True)
class FactualAnchor:
    """Raw factual logits at the observed prefixes.

    :param prompt_ids: ``(..., L)``.
    :param observed_ids: ``(..., n)``, broadcastable with ``prompt_ids.shape[:-1]``.
    :param logits: raw (undecoded) logits ``(..., n, V)``; ``[..., t, :]`` follows
        ``prompt + observed[..., :t]``.
    """

    prompt_ids: torch.Tensor
    observed_ids: torch.Tensor
    logits: torch.Tensor

    @property
    def length(self) -> int:
        return self.observed_ids.shape[-1]

    def start(self, prompt: torch.Tensor, mechanism: torch.Tensor) -> torch.Tensor | None:
        """Rows that start on the anchored path, or ``None`` if none can.

        :param prompt: the model's prompt ids ``(..., L)``.
        :param mechanism: the model's mechanism indices.
        """
        if prompt.shape[-1] != self.prompt_ids.shape[-1]:
            return None
        try:
            on_path = (prompt == self.prompt_ids).all(-1) & (mechanism == 0)
            torch.broadcast_shapes(on_path.shape, self.observed_ids.shape[:-1])
        except RuntimeError:
            return None
        return on_path

    def logits_at(self, t: int, raw: torch.Tensor, on_path: torch.Tensor) -> torch.Tensor:
        """Raw logits of step ``t``: the anchored ones on the path, ``raw`` elsewhere."""
        if t >= self.length:
            return raw
        anchored = self.logits[..., t, :]
        if anchored.dtype == raw.dtype and anchored.device == raw.device and bool(on_path.all()):  # a view
            return anchored.expand(torch.broadcast_shapes(on_path.shape + (1,), anchored.shape, raw.shape))
        return torch.where(on_path.unsqueeze(-1), anchored, raw)

    def follow(self, t: int, w: torch.Tensor, on_path: torch.Tensor) -> torch.Tensor:
        """Rows still on the path after emitting ``w`` at step ``t``."""
        if t >= self.length:
            return torch.zeros_like(on_path)
        return on_path & (w == self.observed_ids[..., t])

    def follow_prefix(self, prefix: torch.Tensor, on_path: torch.Tensor) -> torch.Tensor:
        """Rows still on the path after emitting ``prefix`` ``(..., t)`` at steps ``0 .. t - 1``,
        ``t >= 1``: :meth:`follow` of each of its tokens in turn, in one comparison."""
        t = prefix.shape[-1]
        if t > self.length:
            return torch.zeros(torch.broadcast_shapes(on_path.shape, prefix.shape[:-1]), dtype=torch.bool,
                               device=on_path.device)
        return on_path & (prefix == self.observed_ids[..., :t]).all(-1)
