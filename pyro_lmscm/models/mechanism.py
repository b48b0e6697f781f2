r"""The interface of a causal mechanism.

A mechanism is the structural function :math:`f` of the SCM that maps a prefix to
next-token logits, :math:`\ell_t = f(\text{prompt}, w_{<t})`. Mechanism 0 of every
:class:`~pyro_lmscm.models.LanguageModelSCM` is the unmodified language model
(:class:`Factual`); the other mechanisms (model swaps, steering, weight edits, adapters)
live in :mod:`pyro_lmscm.interventions`.

A mechanism is *activated* around each forward call of the language model:
``with mechanism.activate(lm) as f: f.step(...)``. Mechanisms that change the Hugging Face
module (forward hooks, weight deltas, adapters) apply the change in ``__enter__`` and undo
it in ``__exit__``, also when an exception occurs, so that several mechanisms can share one
module inside the same batch.

A mechanism may be made of *parts* (:meth:`Mechanism.parts`): the layers a weight edit
changes, the layers a multi-layer steering edits. :meth:`Mechanism.restricted` builds the
sub-mechanism of a subset of them, which :func:`~pyro_lmscm.inference.attribute` uses to
split an intervention's effect. A mechanism that edits the residual stream at given
positions can also be made to act only from a position on (:meth:`Mechanism.acting_from`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager, Iterable

from ..errors import MechanismError

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["WHOLE", "Factual", "Mechanism"]

#: The name of the one part of an indivisible mechanism.
WHOLE = "whole"


class Mechanism(ABC):
    """A way of computing next-token logits from the factual language model."""

    def check(self, lm: HFLanguageModel) -> None:
        """Check that this mechanism can stand in for ``lm``.

        :raises MechanismError: if it cannot (for example, another vocabulary).
        """

    @abstractmethod
    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        """A context in which the returned language model computes this mechanism's logits."""

    def parts(self) -> list[str]:
        """The names of this mechanism's parts, in order: e.g. ``["layer 4", "layer 5"]`` for a
        weight edit of two layers. An indivisible mechanism has the one part :data:`WHOLE`."""
        return [WHOLE]

    def restricted(self, parts: Iterable[str]) -> Mechanism:
        """The sub-mechanism made of ``parts`` alone (a subset of :meth:`parts`): the factual
        model (:class:`Factual`) for none, this mechanism itself for all of them. Like every
        mechanism it restores the model bit for bit, also when interrupted.

        :raises MechanismError: for a name not in :meth:`parts`, or a proper subset of an
            indivisible mechanism.
        """
        known = self.parts()
        if isinstance(parts, str):
            parts = [parts]
        chosen = set(parts)
        unknown = sorted(chosen - set(known))
        if unknown:
            raise MechanismError(f"{type(self).__name__}: no part {unknown[0]!r}; its parts are {known}.")
        if not chosen:
            return Factual()
        if len(chosen) == len(known):
            return self
        return self._restricted([part for part in known if part in chosen])

    def _restricted(self, parts: list[str]) -> Mechanism:
        """The sub-mechanism of a proper, non-empty subset ``parts`` (in :meth:`parts` order)."""
        raise MechanismError(f"{type(self).__name__} is indivisible: it has no sub-mechanisms of {parts}.")

    def acting_from(self, position: int) -> Mechanism:
        """This mechanism acting only at absolute token positions ``>= position`` (and where it
        acted before), so that the logits of the steps before ``position - L + 1`` (prompt length
        ``L``) are the factual ones.

        :raises MechanismError: if the mechanism cannot be limited to positions (a weight edit
            changes the computation at every position).
        """
        raise MechanismError(
            f"{type(self).__name__} acts on every position (e.g. through the weights), so it cannot be made to act "
            "from a step on; only mechanisms that edit the residual stream at given positions (ActivationSteering, "
            "AffineSteering, a Combined of those) can."
        )


class Factual(Mechanism):
    """The unmodified language model, mechanism 0 of every SCM."""

    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        return nullcontext(lm)

    def __repr__(self) -> str:
        return "Factual()"
