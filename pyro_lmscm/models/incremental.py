r"""Incremental decoding of a batch of prefixes under several mechanisms at once.

The rows of a batch may use different mechanisms (``"mechanism"`` may carry batch or
ChiRho world dims). Rows are grouped by mechanism; each group keeps its own KV cache and
is run inside its mechanism's context, so hooks or weight deltas of one mechanism never
leak into another group's forward pass.

The batch may grow while decoding: at step 0 the prompt is typically unbatched while the
noise ``u_0`` carries a plate of posterior draws. :meth:`MechanismBatch.advance` then
broadcasts the rows (and their caches) to the new batch shape without re-running the LM.
Rows that have finished (emitted an end of sequence) leave their group and its cache, so
the LM only ever runs on the rows still generating.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import MechanismError

if TYPE_CHECKING:
    from ..lm import HFLanguageModel
    from .mechanism import Mechanism

__all__ = ["MechanismBatch"]


class _Group:
    """The rows of the flattened batch that share one mechanism, with their KV cache."""

    def __init__(self, index: int, rows: torch.Tensor, logits: torch.Tensor, cache: Any) -> None:
        self.index = index
        self.rows = rows  # positions in the flattened batch, shape (n_group,)
        self.logits = logits  # next-token logits, shape (n_group, V)
        self.cache = cache


class MechanismBatch:
    r"""Next-token logits :math:`\ell = f_{m}(\text{prompt}, w_{<t})` for a batch of rows,
    each row :math:`r` with its own mechanism :math:`m_r`.

    :param lm: the factual language model.
    :param mechanisms: the SCM's mechanisms; ``mechanisms[m]`` is mechanism ``m``.
    :param prompt: prompt ids of shape ``(..., L)``.
    :param mechanism: mechanism indices, any shape broadcastable with ``prompt.shape[:-1]``.
    :param max_tokens: the most tokens :meth:`advance` will append: each group's KV cache
        then holds ``L + max_tokens`` positions, allocated once when it opens
        (:func:`~pyro_lmscm.lm.preallocate`), so decoding allocates no cache memory step by
        step; ``None`` lets the caches grow.
    :raises MechanismError: for an index outside ``[0, len(mechanisms))``.
    """

    def __init__(
        self,
        lm: HFLanguageModel,
        mechanisms: Sequence[Mechanism],
        prompt: torch.Tensor,
        mechanism: torch.Tensor,
        max_tokens: int | None = None,
    ) -> None:
        self.lm = lm
        self.mechanisms = mechanisms
        self.device = lm.device
        self.batch_shape = torch.broadcast_shapes(prompt.shape[:-1], mechanism.shape)
        length = prompt.shape[-1]
        prompts = prompt.expand(*self.batch_shape, length).reshape(-1, length)
        self.mechanism = mechanism.expand(self.batch_shape).reshape(-1).to(self.device)
        self.groups: list[_Group] = []
        for m in torch.unique(self.mechanism).tolist():
            if not 0 <= m < len(mechanisms):
                raise MechanismError(
                    f"site 'mechanism' has value {m}, but the SCM has mechanisms "
                    f"0..{len(mechanisms) - 1} (0 is the factual model)."
                )
            rows = torch.nonzero(self.mechanism == m).flatten()
            with mechanisms[m].activate(lm) as f:  # (each distinct prompt runs once)
                logits, cache = f.prefill(prompts[rows], None if max_tokens is None else length + max_tokens)
            self.groups.append(_Group(m, rows, logits, cache))

    def logits(self) -> torch.Tensor:
        """Raw next-token logits of every row, shape ``batch_shape + (V,)``, float32;
        zeros for rows that have finished."""
        total = self.mechanism.numel()
        if len(self.groups) == 1 and self.groups[0].rows.numel() == total:
            flat = self.groups[0].logits
        else:
            first = self.groups[0].logits
            flat = first.new_empty((total, first.shape[-1]))
            finished = torch.ones(total, dtype=torch.bool, device=flat.device)
            for group in self.groups:
                flat[group.rows] = group.logits
                finished[group.rows] = False
            flat[finished] = 0.0  # (only those rows: not a pass of zeros over the whole batch)
        return flat.reshape(*self.batch_shape, flat.shape[-1])

    def advance(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Append ``tokens`` to every row; run the LM only for groups with an active row.

        :param tokens: ids, shape broadcastable with ``batch_shape``; a larger shape grows
            the batch (rows are repeated, caches too).
        :param active: bool, broadcastable like ``tokens``; a row that is not active has
            finished for good: it leaves its group's KV cache, the LM never runs it again,
            and its logits are meaningless (the caller must ignore them).
        """
        new_shape = self.batch_shape
        if tokens.shape != new_shape or active.shape != new_shape:
            new_shape = torch.broadcast_shapes(self.batch_shape, tokens.shape, active.shape)
        if new_shape != self.batch_shape:
            self._grow(new_shape)
        tokens = tokens.expand(new_shape).reshape(-1).to(self.device)
        active = active.expand(new_shape).reshape(-1).to(self.device)
        for group in self.groups:
            group_active = active[group.rows]
            if not bool(group_active.any()):
                continue
            if not bool(group_active.all()):
                keep = torch.nonzero(group_active).flatten()
                group.rows, group.logits = group.rows[keep], group.logits[keep]
                group.cache.reorder_cache(keep)
            with self.mechanisms[group.index].activate(self.lm) as f:
                group.logits, group.cache = f.step(tokens[group.rows], group.cache)

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` of the flattened batch, in that order (a row may repeat):
        the batch becomes ``(len(index),)``, as a beam search reorders its beams."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device).reshape(-1)
        self._take(index, torch.Size([index.numel()]))

    def _grow(self, new_shape: torch.Size) -> None:
        """Broadcast the rows to ``new_shape``, repeating caches along the batch."""
        source = torch.arange(self.mechanism.numel(), device=self.device)
        self._take(source.reshape(self.batch_shape).expand(new_shape).reshape(-1), new_shape)

    def _take(self, source: torch.Tensor, new_shape: torch.Size) -> None:
        """Row ``i`` of the new batch ``new_shape`` (flattened) is old row ``source[i]``."""
        old_numel = self.mechanism.numel()
        # position of each old row inside its group; -1 for finished rows (in no group)
        position = torch.full((old_numel,), -1, dtype=torch.long, device=self.device)
        for group in self.groups:
            position[group.rows] = torch.arange(group.rows.numel(), device=self.device)
        self.mechanism = self.mechanism[source]
        for group in self.groups:
            rows = torch.nonzero((self.mechanism == group.index) & (position[source] >= 0)).flatten()
            select = position[source[rows]]
            group.rows = rows
            group.logits = group.logits[select]
            group.cache.reorder_cache(select)
        self.batch_shape = new_shape
