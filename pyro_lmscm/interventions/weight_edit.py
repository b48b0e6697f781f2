r"""Weight edits: parameter deltas applied in place while the mechanism is active."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ContextManager, Mapping

import torch

from ..atomic import reversible
from ..errors import MechanismError
from ..models.mechanism import Mechanism

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["WeightDelta", "part_of"]

#: The decoder-layer index in a parameter or module name (Llama ``model.layers.3.``, GPT-2 ``transformer.h.3.``).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")


def part_of(name: str) -> str:
    """The part a parameter or module belongs to: ``"layer 3"`` for anything inside decoder
    layer 3, else its own name (``"lm_head.weight"``, ``"model.norm.weight"``)."""
    match = _LAYER.search(name)
    return f"layer {match.group(1)}" if match else name


def _parameter(lm: HFLanguageModel, name: str, owner: str) -> torch.nn.Parameter:
    try:
        return lm.model.get_parameter(name)
    except AttributeError:
        pass
    leaf = name.rsplit(".", 1)[-1]
    close = [n for n, _ in lm.model.named_parameters() if n.endswith("." + leaf)][:3]
    hint = f" Names ending in {leaf!r}: {close}." if close else " See `lm.model.named_parameters()`."
    raise MechanismError(f"{owner}: the model has no parameter {name!r}.{hint}")


class WeightDelta(Mechanism):
    r"""Add fixed deltas to some parameters of the factual model:

    .. math::

        \ell_t = f_{\theta + \Delta}(\text{prompt}, w_{<t}), \qquad
        (\theta + \Delta)_n = \theta_n + \Delta_n \text{ for each } n \in \text{deltas},

    where :math:`\theta` are the parameters of ``lm.model`` and :math:`\Delta_n` is
    ``deltas[n]``; parameters not named are unchanged.

    The deltas are added in place when the mechanism is activated, and the original values
    are *copied back* on exit (also on an exception), so the factual model is restored
    bit-exactly (subtracting the delta again would not be, in floating point). The sum
    :math:`\theta_n + \Delta_n` is computed in the wider of the two dtypes and rounded once
    to the parameter's dtype.

    :param deltas: parameter name (as in ``lm.model.named_parameters()``, e.g.
        ``"model.layers.0.mlp.down_proj.weight"``) to a floating tensor of the parameter's shape.
    :raises MechanismError: for an empty mapping, a non-string name or a non-floating or
        non-finite delta; :meth:`check` also for an unknown name, a wrong shape, or two
        names of one (tied) parameter.

    >>> from pyro_lmscm.interventions import WeightDelta
    >>> name = "model.layers.0.mlp.down_proj.weight"
    >>> edit = WeightDelta({name: torch.ones(32, 64)})
    >>> before = tiny_lm.model.get_parameter(name).clone()
    >>> with edit.activate(tiny_lm) as f:
    ...     changed = torch.equal(f.model.get_parameter(name), before + 1)
    >>> changed, torch.equal(tiny_lm.model.get_parameter(name), before)
    (True, True)
    """

    def __init__(self, deltas: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(deltas, Mapping) or len(deltas) == 0:
            raise MechanismError(
                f"WeightDelta: `deltas` must be a non-empty mapping from parameter names to tensors, "
                f"got {type(deltas).__name__} of length {len(deltas) if hasattr(deltas, '__len__') else '?'}."
            )
        self.deltas: dict[str, torch.Tensor] = {}
        for name, delta in deltas.items():
            if not isinstance(name, str):
                raise MechanismError(f"WeightDelta: parameter names must be strings, got {name!r}.")
            try:
                delta = torch.as_tensor(delta)
            except (TypeError, ValueError, RuntimeError) as failure:
                raise MechanismError(
                    f"WeightDelta: the delta of {name!r} must be a floating tensor, got {type(delta).__name__} "
                    f"{delta!r:.80} ({failure})."
                ) from None
            if not delta.is_floating_point():
                raise MechanismError(
                    f"WeightDelta: the delta of {name!r} must be floating, got {delta.dtype}."
                )
            if not bool(torch.isfinite(delta).all()):
                raise MechanismError(
                    f"WeightDelta: the delta of {name!r} has non-finite entries (nan or inf)."
                )
            self.deltas[name] = delta.detach()

    def check(self, lm: HFLanguageModel) -> None:
        seen: dict[int, str] = {}
        for name, delta in self.deltas.items():
            parameter = _parameter(lm, name, "WeightDelta")
            if parameter.shape != delta.shape:
                raise MechanismError(
                    f"WeightDelta: the delta of {name!r} has shape {tuple(delta.shape)} but the "
                    f"parameter has {tuple(parameter.shape)}."
                )
            if id(parameter) in seen:
                raise MechanismError(
                    f"WeightDelta: {name!r} and {seen[id(parameter)]!r} are one (tied) parameter; "
                    "give its delta once."
                )
            seen[id(parameter)] = name

    def parts(self) -> list[str]:
        """One part per edited decoder layer (``"layer 3"``: all its deltas), and one per
        other parameter (its name), in the order of ``deltas``."""
        return list(dict.fromkeys(part_of(name) for name in self.deltas))

    def _restricted(self, parts: list[str]) -> WeightDelta:
        return self._with_deltas({name: d for name, d in self.deltas.items() if part_of(name) in parts})

    def _with_deltas(self, deltas: dict[str, torch.Tensor]) -> WeightDelta:
        """A weight edit of ``deltas`` (a subset of this one's), as :meth:`restricted` builds it."""
        return WeightDelta(deltas)

    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        parameters: list[torch.Tensor] = [_parameter(lm, name, "WeightDelta") for name in self.deltas]
        saved: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # one entry: appended at once

        def apply() -> None:
            with torch.no_grad():
                originals = [parameter.detach().clone() for parameter in parameters]
                saved.append((parameters, originals))  # before any parameter changes
                for parameter, original, delta in zip(parameters, originals, self.deltas.values()):
                    wide = torch.promote_types(parameter.dtype, delta.dtype)
                    parameter.copy_(original.to(wide) + delta.to(device=original.device, dtype=wide))

        def restore() -> None:  # one call for every parameter: nothing in between to interrupt
            with torch.no_grad():
                for targets, originals in saved:
                    torch._foreach_copy_(targets, originals)

        return reversible(apply, restore, value=lm)

    def __repr__(self) -> str:
        shapes = {name: tuple(delta.shape) for name, delta in self.deltas.items()}
        return f"{type(self).__name__}({shapes})"
