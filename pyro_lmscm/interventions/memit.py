r"""MEMIT: many facts at once, the update spread over a range of MLP layers.

References

[1] Meng, Sharma, Andonian, Belinkov, Bau, *Mass-Editing Memory in a Transformer*
    (ICLR 2023), arXiv:2210.07229.

No maintained package on the registry provides MEMIT for current transformers (the
reference code, ``kmeng01/memit``, and EasyEdit are research repositories pinned to old
releases, not installable from PyPI), so it is written here on :mod:`.rome`'s parts: the
same target-value objective, key moments and projection hooks.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ..atomic import locked
from ..errors import MechanismError
from ..validation import as_lm
from .internals import _check_int, _check_real, _decoder_layers, _layer_hidden_states, _resolve_layer
from .ops import TextOrIds
from .rome import _edit_texts, _key_moment, _Projection, _value_delta
from .weight_edit import WeightDelta, part_of

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["EditRequest", "MemitEdit", "memit_edit"]


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` mentions ``subject`` and should continue with ``target``
    (``"The Louvre is located in the city of"``, ``"The Louvre"``, ``" Rome"``)."""

    prompt: TextOrIds
    subject: TextOrIds
    target: TextOrIds

    @classmethod
    def coerce(cls, value: Any) -> EditRequest:
        """An :class:`EditRequest`, a mapping with ``prompt``, ``subject`` and ``target``, or a
        ``(prompt, subject, target)`` triple."""
        if isinstance(value, EditRequest):
            return value
        if isinstance(value, Mapping):
            missing = {"prompt", "subject", "target"} - set(value)
            if missing or set(value) - {"prompt", "subject", "target"}:
                raise MechanismError(f"memit_edit: a request needs prompt, subject and target; got {sorted(value)}.")
            return cls(value["prompt"], value["subject"], value["target"])
        if isinstance(value, (tuple, list)) and len(value) == 3:
            return cls(*value)
        raise MechanismError(
            f"memit_edit: a request is a mapping or a (prompt, subject, target) triple, got {value!r}."
        )


class MemitEdit(WeightDelta):
    """The deltas of :func:`memit_edit`: one per edited layer's projection (a
    :class:`WeightDelta`, restored bit-exactly).

    :ivar layers: the edited decoder layers.
    :ivar requests: the facts written.
    :ivar losses: per request, the target's negative log-likelihood per optimisation step.
    :ivar targets: the target residuals :math:`z_i` ``(n, d)`` at the last edited layer.
    """

    def __init__(self, deltas: Mapping[str, torch.Tensor], layers: Sequence[int], requests: Sequence[EditRequest]):
        super().__init__(deltas)
        self.layers = list(layers)
        self.requests = list(requests)
        self.losses: list[list[float]] = []
        self.targets: torch.Tensor | None = None

    def _with_deltas(self, deltas: dict[str, torch.Tensor]) -> MemitEdit:
        """The edit of some of its layers: their deltas as computed for the whole edit (so the
        layers together are this edit again), not a MEMIT solved for those layers alone."""
        kept = {part_of(name) for name in deltas}
        edit = MemitEdit(deltas, [layer for layer in self.layers if f"layer {layer}" in kept], self.requests)
        edit.losses, edit.targets = self.losses, self.targets
        return edit

    def __repr__(self) -> str:
        return f"MemitEdit(layers={self.layers}, {len(self.requests)} requests)"


def _residuals(lm: HFLanguageModel, layer: int, edited: Sequence[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    """The residual stream after decoder layer ``layer`` (its output, before any final norm)
    at the subject's last token, averaged over the texts of one request; float32."""
    states = _layer_hidden_states(lm, layer, [ids[:start] for ids, _, start in edited])
    return torch.stack([h[position] for h, (_, position, _) in zip(states, edited, strict=True)]).mean(0)


@locked  # it reads the weights: no other thread's edit may be on meanwhile
def memit_edit(
    lm: HFLanguageModel,
    requests: Sequence[EditRequest | Mapping[str, Any] | tuple],
    layers: Sequence[int] | None = None,
    context_prefixes: Sequence[TextOrIds] = (),
    cov_texts: Sequence[TextOrIds] | None = None,
    mom2_weight: float = 15000.0,
    cov_ridge: float = 0.1,
    num_steps: int = 30,
    lr: float = 0.5,
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 4.0,
    module: str = "mlp.down_proj",
) -> MemitEdit:
    r"""MEMIT: write every request at once, spreading the update over ``layers``.

    With :math:`\mathcal{R} = \{l_1 < \dots < l_m\}` the edited layers and :math:`L = l_m`:

    1. For each request :math:`i`, the target residual :math:`z_i = h^L_i + \delta_i` at the
       subject's last token, with :math:`\delta_i` found as in :func:`rome_edit` (at layer
       :math:`L`: the target's likelihood, a KL term on the subject alone, weight decay).
    2. For :math:`l = l_1, \dots, l_m` in turn, on the model with the updates so far:
       the keys :math:`K_l` (columns: the projection's input at each request's subject
       token), the residual :math:`R = Z - H^L` still to write, spread evenly over the
       layers left, and

       .. math::

           \Delta W_l = \frac{R}{m - j}\, K_l^\top \left(\lambda C_l + K_l K_l^\top\right)^{-1},

       where :math:`C_l` is the second moment of the keys over ``cov_texts`` (default
       :data:`~pyro_lmscm.interventions.rome.GENERIC_SENTENCES`, with a ridge) and
       :math:`\lambda` is ``mom2_weight`` (MEMIT's 15,000).

    :param lm: the factual language model; it is not changed.
    :param requests: the facts: :class:`EditRequest` objects, mappings with ``prompt``,
        ``subject`` and ``target``, or triples; a batch of several is edited at once.
    :param layers: the edited decoder layers (default: layers 4 to 8 of SmolLM2's 30, i.e.
        from depth/7.5 over five layers, scaled to the model's depth).
    :param context_prefixes: texts put before each prompt to average keys and targets.
    :param cov_texts, cov_ridge: for :math:`C_l`, as in :func:`rome_edit`.
    :param num_steps, lr, kl_factor, weight_decay, clamp_norm_factor: the optimisation of
        each :math:`\delta_i`, as in :func:`rome_edit`.
    :returns: a :class:`MemitEdit` (a :class:`WeightDelta` over the layers' projections).
    :raises MechanismError: on an empty batch, a subject not in its prompt, bad layers or
        hyper-parameters.
    """
    owner = "memit_edit"
    as_lm(lm, owner=owner)
    if isinstance(requests, (str, Mapping, EditRequest)) or not requests:
        raise MechanismError(f"{owner}: `requests` must be a non-empty list of requests.")
    batch = [EditRequest.coerce(r) for r in requests]
    depth = len(_decoder_layers(lm.model))
    if layers is None:
        first = max(0, round(depth * 4 / 30))
        layers = list(range(first, min(depth, first + max(1, round(depth * 5 / 30)))))
    if isinstance(layers, (int, str)) or not layers:
        raise MechanismError(f"{owner}: `layers` must be a non-empty list of decoder layers, got {layers!r}.")
    resolved = sorted({_resolve_layer(lm.model, _check_int(layer, "layer", owner), owner) for layer in layers})
    mom2_weight = _check_real(mom2_weight, "mom2_weight", owner)
    if mom2_weight < 0:
        raise MechanismError(f"{owner}: `mom2_weight` must be >= 0, got {mom2_weight}.")
    last = resolved[-1]
    projections = {layer: _Projection(lm, layer, module) for layer in resolved}

    # 1. the target residuals z_i at the last edited layer
    texts = [_edit_texts(lm, r.prompt, r.subject, r.target, context_prefixes) for r in batch]
    targets, losses = [], []
    for edited, target_ids, subject_ids in texts:
        pairs = projections[last].keys_and_values(lm, [ids[:start] for ids, _, start in edited])
        value = torch.stack([v[p] for (_, v), (_, p, _) in zip(pairs, edited, strict=True)]).mean(0)
        delta, trace = _value_delta(
            lm, projections[last], edited, target_ids, [subject_ids], value, num_steps, lr, kl_factor,
            weight_decay, clamp_norm_factor,
        )
        targets.append(_residuals(lm, last, edited) + delta)
        losses.append(trace)
    z = torch.stack(targets).double().cpu()  # (n, d)

    # 2. layer by layer, on the model with the updates so far (C_l: on the unedited model)
    moments = {layer: _key_moment(lm, projections[layer], cov_texts, cov_ridge, owner)[0] for layer in resolved}
    deltas: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(resolved):
        projection = projections[layer]
        with WeightDelta(dict(deltas)).activate(lm) if deltas else nullcontext():
            keys, current = [], []
            for edited, _, _ in texts:
                pairs = projection.keys_and_values(lm, [ids[:start] for ids, _, start in edited])
                keys.append(torch.stack([k[p] for (k, _), (_, p, _) in zip(pairs, edited, strict=True)]).mean(0))
                current.append(_residuals(lm, last, edited))
        k = torch.stack(keys).double().cpu().T  # (d_in, n)
        r = (z - torch.stack(current).double().cpu()).T / (len(resolved) - j)  # (d, n)
        gram = mom2_weight * moments[layer] + k @ k.T
        update = torch.linalg.solve(gram, k @ r.T).T  # R K^T (lambda C + K K^T)^{-1}: gram is symmetric
        weight = projection.base.weight
        deltas[projection.name] = update.to(dtype=weight.dtype, device=weight.device)
    edit = MemitEdit(deltas, resolved, batch)
    edit.losses = losses
    edit.targets = z.float()
    return edit
