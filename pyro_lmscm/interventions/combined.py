r"""Several mechanisms at once: e.g. activation steering or MiMiC at several layers, one part each."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ContextManager, Mapping, Sequence

from ..atomic import _remove_hook, chained, reversible
from ..errors import MechanismError
from ..models.mechanism import WHOLE, Factual, Mechanism
from .internals import _decoder_layers, _ResidualStreamEdit, _resolve_layer

if TYPE_CHECKING:
    from torch import nn

    from ..lm import HFLanguageModel

__all__ = ["Combined"]


def _default_names(members: Sequence[Mechanism]) -> list[str]:
    """``"layer L"`` for members with distinct ``layer`` attributes (steering), else ``"0"``, ``"1"``, ..."""
    layers = [getattr(member, "layer", None) for member in members]
    if all(isinstance(layer, int) for layer in layers) and len(set(layers)) == len(layers):
        return [f"layer {layer}" for layer in layers]
    return [str(i) for i in range(len(members))]


class Combined(Mechanism):
    r"""Several mechanisms active together, entered in order (each on the model the previous
    one returns) and undone in reverse order:

    .. math::

        \ell_t = f_{\theta; m_1 \circ \dots \circ m_k}(\text{prompt}, w_{<t}),

    e.g. :class:`~pyro_lmscm.interventions.ActivationSteering` at layers 2, 5 and 8, or weight
    edits and steering together. Its parts are the members (named by ``members``' keys; a
    member with several parts contributes ``"name/part"`` for each), so
    :func:`~pyro_lmscm.inference.attribute` splits the effect per layer. Steering and MiMiC
    members (residual-stream edits) register their hooks together and remove them in one
    restore that an interrupt cannot split; other members each undo their own change
    atomically, in reverse order, as one context (:class:`~pyro_lmscm.atomic.chained`, which
    runs every exit even when one raises).

    :param members: name to mechanism, or a list (named ``"layer L"`` when every member has a
        distinct ``layer``, as steering does, else by position).
    :raises MechanismError: for no member, a member that is not a mechanism, a ``/`` in a name.

    >>> from pyro_lmscm.interventions import ActivationSteering, Combined
    >>> steer = Combined([ActivationSteering(torch.ones(32), layer=0), ActivationSteering(torch.ones(32), layer=1)])
    >>> steer.parts(), steer.restricted(["layer 1"])
    (['layer 0', 'layer 1'], ActivationSteering(layer=1, alpha=1.0, start=0, |v|=5.657))
    """

    def __init__(self, members: Mapping[str, Mechanism] | Sequence[Mechanism]) -> None:
        if isinstance(members, Mapping):
            named = dict(members)
        elif isinstance(members, (list, tuple)):
            named = dict(zip(_default_names(members), members))
        else:
            raise MechanismError(f"Combined: `members` must be a mapping or a list of mechanisms, got {members!r:.80}.")
        if not named:
            raise MechanismError("Combined: `members` is empty; give at least one mechanism.")
        for name, member in named.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise MechanismError(f"Combined: member names are non-empty strings without '/', got {name!r}.")
            if not isinstance(member, Mechanism):
                raise MechanismError(f"Combined: member {name!r} is {type(member).__name__}, not a Mechanism.")
        self.members: dict[str, Mechanism] = named

    def check(self, lm: HFLanguageModel) -> None:
        for member in self.members.values():
            member.check(lm)

    def _member_parts(self) -> list[tuple[str, str, str]]:
        """(part name, member name, the member's part)."""
        out = []
        for name, member in self.members.items():
            parts = member.parts()
            if parts == [WHOLE]:
                out.append((name, name, WHOLE))
            else:
                out.extend((f"{name}/{part}", name, part) for part in parts)
        return out

    def parts(self) -> list[str]:
        return [part for part, _, _ in self._member_parts()]

    def _restricted(self, parts: list[str]) -> Mechanism:
        chosen: dict[str, list[str]] = {}
        for part, name, inner in self._member_parts():
            if part in parts:
                chosen.setdefault(name, []).append(inner)
        members = {name: self.members[name].restricted(inner) for name, inner in chosen.items()}
        members = {name: member for name, member in members.items() if not isinstance(member, Factual)}
        if len(members) == 1:
            return next(iter(members.values()))
        return Combined(members)

    def acting_from(self, position: int) -> Combined:
        return Combined({name: member.acting_from(position) for name, member in self.members.items()})

    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        if all(isinstance(member, _ResidualStreamEdit) for member in self.members.values()):
            return self._hooked(lm)
        return self._entered(lm)

    def _hooked(self, lm: HFLanguageModel) -> reversible:
        """Residual-stream edits (steering, MiMiC): every member's hook registered in one
        :class:`~pyro_lmscm.atomic.reversible` change (Ctrl-C held) and removed in one restore
        (by identity, so a registration split by an interrupt leaves nothing either)."""
        registered: list[tuple[nn.Module, Any]] = []

        def apply() -> None:
            for member in self.members.values():
                assert isinstance(member, _ResidualStreamEdit)  # activate() chose this path for these alone
                layer = _decoder_layers(lm.model)[_resolve_layer(lm.model, member.layer, type(member).__name__)]
                hook = member._hook  # one bound method: removed by identity
                registered.append((layer, hook))  # before the registration: the restore finds it
                layer.register_forward_hook(hook, with_kwargs=True)

        def restore() -> None:  # idempotent
            for layer, hook in reversed(registered):
                _remove_hook(layer, hook)

        return reversible(apply, restore, value=lm)

    def _entered(self, lm: HFLanguageModel) -> chained:
        """Other members: each entered in turn and exited in reverse order, as one context
        (:class:`~pyro_lmscm.atomic.chained`: no ``ExitStack`` window, Ctrl-C held while
        entering); each member undoes its own change atomically."""
        return chained(lm, *(functools.partial(_activate, member) for member in self.members.values()))

    def __repr__(self) -> str:
        return f"Combined({self.members!r})"


def _activate(member: Mechanism, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
    return member.activate(lm)
