r"""Exact attribution of an intervention's effect on one observed string to its parts and steps.

An intervention's mechanism may be made of parts (:meth:`~pyro_lmscm.models.Mechanism.parts`:
the layers of a weight edit, of a multi-layer steering, of a LoRA adapter or of a model
swap's weight difference). For a subset :math:`S` of the parts, its sub-mechanism
(:meth:`~pyro_lmscm.models.Mechanism.restricted`) gives an exact counterfactual of the
observed string, and two values:

.. math::

    v(S) = \log P\big(w'_{<n} = w_{<n} \mid \text{do}(f = f_S), w\big), \qquad
    e(S) = \mathbb{E}\big[D \mid \text{do}(f = f_S), w\big],

where :math:`w` is the observation (``n`` tokens), :math:`w'` the counterfactual, :math:`f_S`
the sub-mechanism and :math:`D` the first step where :math:`w'` differs from :math:`w`
(:math:`n` if it never does). The rest of the intervention (a prompt swap, forced or
excluded tokens, its Messengers) is part of every world, so :math:`v(\emptyset)` is the
value of that rest alone: :math:`\log 1 = 0` (and :math:`e(\emptyset) = n`) when the
intervention is the mechanism alone. The Shapley value of part :math:`i` among :math:`k`

.. math::

    \phi_i = \sum_{S \subseteq N \setminus \{i\}} \frac{|S|!\,(k - |S| - 1)!}{k!}
        \big(v(S \cup \{i\}) - v(S)\big), \qquad \sum_i \phi_i = v(N) - v(\emptyset),

is computed over all :math:`2^k` subsets up to ``max_exact_parts`` parts, and above that
estimated from ``num_permutations`` seeded random orders (each order's increments add up to
:math:`v(N) - v(\emptyset)` too, so the estimates do as well), with standard errors.

``by="step"``: the mechanism acting only from step :math:`s` on
(:meth:`~pyro_lmscm.models.Mechanism.acting_from`). The logits of step :math:`t` are computed
at the position :math:`L + t - 1` of prompt + string (prompt length :math:`L`) from the
positions before it, so the mechanism edits the positions :math:`\geq L + s - 1` for
:math:`s \geq 1`, and every position it edits for :math:`s = 0` (the whole intervention).
An edit at earlier positions would reach the later steps through the KV cache, so replacing
the logits of the steps before :math:`s` by the factual ones is not the same thing. Weight
edits act at every position and are refused.

Cost: one teacher-forced pass of the factual model, then one of the intervened model per
evaluated subset (or step); :attr:`Attribution.num_passes` counts them.

References

[1] L. S. Shapley (1953), "A value for n-person games". [2] S. Castro, D. Gómez, J. Tejada
    (2009), "Polynomial calculation of the Shapley value based on sampling".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .. import seeding
from ..errors import InferenceError
from ..interventions.model_swap import ModelSwap
from ..interventions.ops import Action, as_do_data, world_inputs
from ..models.mechanism import Factual, Mechanism
from ..models.scm import LanguageModelSCM, as_scm
from ..models.sites import MECHANISM
from ..validation import MAX_SEED, as_entries, as_int, as_real
from .exact import (
    ExactCounterfactual,
    _intervened_pass,
    expected_first_divergence,
    first_divergence_law,
    observed_token_log_probs,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..interventions.ops import Intervention

__all__ = ["Attribution", "StepAttribution", "attribute", "attributions"]

#: ``by=`` values of :func:`attribute`.
BY = ("layer", "step")
#: The name of the sub-mechanism in the SCM of each evaluated subset.
_SUB = "__attribute_part"


@dataclass
class Attribution:
    r"""The exact attribution of an intervention's effect on one string to its parts
    (:func:`attribute` with ``by="layer"``). Values are per part name.

    :ivar parts: the parts, in the mechanism's order.
    :ivar prob_unchanged: P(unchanged) under the whole intervention; ``prob_unchanged_empty``
        with no part (1 when the intervention is the mechanism alone).
    :ivar prob_unchanged_alone: with that part alone (and the rest of the intervention).
    :ivar prob_unchanged_without: with every part but that one.
    :ivar shapley: Shapley values of log P(unchanged); they add up to
        ``log(prob_unchanged) - log(prob_unchanged_empty)``. Infinite or nan if a subset
        has P(unchanged) = 0.
    :ivar shapley_se: their standard errors (0 when exact).
    :ivar expected_first_divergence: the same for E[first divergence], as are
        ``expected_first_divergence_empty``, ``first_divergence_alone``,
        ``first_divergence_without``, ``shapley_first_divergence`` and
        ``shapley_first_divergence_se``.
    :ivar exact: Shapley values over all subsets (else a permutation estimate).
    :ivar num_permutations: the number of random orders of the estimate (``None`` if exact).
    :ivar num_passes: teacher-forced passes made: one factual, one per evaluated subset.
    """

    parts: list[str]
    prob_unchanged: float
    prob_unchanged_empty: float
    expected_first_divergence: float
    expected_first_divergence_empty: float
    prob_unchanged_alone: dict[str, float]
    prob_unchanged_without: dict[str, float]
    first_divergence_alone: dict[str, float]
    first_divergence_without: dict[str, float]
    shapley: dict[str, float]
    shapley_se: dict[str, float]
    shapley_first_divergence: dict[str, float]
    shapley_first_divergence_se: dict[str, float]
    exact: bool
    num_permutations: int | None
    num_passes: int
    by: str = "layer"

    def to_pandas(self) -> pd.DataFrame:
        """One row per part: P(unchanged) alone / without, the Shapley values of log P(unchanged)
        and of E[first divergence] with their standard errors."""
        import pandas as pd

        return pd.DataFrame(
            {
                "prob_unchanged_alone": self.prob_unchanged_alone,
                "prob_unchanged_without": self.prob_unchanged_without,
                "shapley_log_prob_unchanged": self.shapley,
                "shapley_log_prob_unchanged_se": self.shapley_se,
                "first_divergence_alone": self.first_divergence_alone,
                "first_divergence_without": self.first_divergence_without,
                "shapley_first_divergence": self.shapley_first_divergence,
                "shapley_first_divergence_se": self.shapley_first_divergence_se,
            },
            index=pd.Index(self.parts, name="part"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready; infinities as ``None``)."""
        return _plain(self.__dict__)

    def plot(self) -> Figure:
        """Bars of the Shapley values per part (log P(unchanged) left, E[first divergence]
        right), with two standard errors when estimated; matplotlib's object API, no pyplot state."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(4 + 0.5 * len(self.parts), 3.5), layout="constrained")
        axes = figure.subplots(1, 2)
        for ax, values, errors, label in (
            (axes[0], self.shapley, self.shapley_se, "Shapley value of log P(unchanged)"),
            (axes[1], self.shapley_first_divergence, self.shapley_first_divergence_se, "Shapley value of E[D]"),
        ):
            heights = [values[p] if math.isfinite(values[p]) else 0.0 for p in self.parts]
            ax.bar(self.parts, heights, yerr=None if self.exact else [2 * errors[p] for p in self.parts])
            ax.axhline(0.0, color="black", linewidth=0.5)
            ax.set_title(label, fontsize=9)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        return figure


@dataclass
class StepAttribution:
    r"""The intervention's mechanism acting only from step :math:`s` on
    (:func:`attribute` with ``by="step"``), for :math:`s = 0, \dots, n`: :math:`s = 0` is the whole
    intervention, :math:`s = n` none of the mechanism (the rest of the intervention alone).

    :ivar steps: ``0 .. n - 1``.
    :ivar prompt_length: :math:`L`; from step :math:`s \geq 1` on, positions :math:`\geq L + s - 1` are edited.
    :ivar prob_unchanged_from: P(unchanged) when acting from step ``s`` on, ``s = 0 .. n``.
    :ivar first_divergence_from: E[first divergence] likewise.
    :ivar effect: per step :math:`s < n`, :math:`\log P_s - \log P_{s+1}`: what acting at step
        :math:`s` adds to acting from :math:`s + 1` on; the effects add up to
        :math:`\log P_0 - \log P_n`.
    :ivar effect_first_divergence: the same for E[first divergence].
    :ivar first_step_that_matters: the earliest step whose effect on log P(unchanged) exceeds
        ``tol`` in absolute value (``None`` if none does): acting before it changes nothing.
    :ivar last_step_that_matters: the latest such step: acting only after it changes nothing.
    :ivar num_passes: teacher-forced passes made.
    """

    steps: list[int]
    prompt_length: int
    prob_unchanged_from: dict[int, float]
    first_divergence_from: dict[int, float]
    effect: dict[int, float]
    effect_first_divergence: dict[int, float]
    first_step_that_matters: int | None
    last_step_that_matters: int | None
    num_passes: int
    by: str = "step"

    def to_pandas(self) -> pd.DataFrame:
        """One row per step ``s``: P(unchanged) and E[first divergence] acting from ``s`` on, and the step's effects."""
        import pandas as pd

        return pd.DataFrame(
            {
                "prob_unchanged_from": {s: self.prob_unchanged_from[s] for s in self.steps},
                "first_divergence_from": {s: self.first_divergence_from[s] for s in self.steps},
                "effect_log_prob_unchanged": self.effect,
                "effect_first_divergence": self.effect_first_divergence,
            },
            index=pd.Index(self.steps, name="step"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready; infinities as ``None``)."""
        return _plain(self.__dict__)

    def plot(self) -> Figure:
        """P(unchanged) when acting from step s on (left) and each step's effect on log P(unchanged)
        (right); matplotlib's object API, no pyplot state."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(9, 3.5), layout="constrained")
        left, right = figure.subplots(1, 2)
        left.plot(list(self.prob_unchanged_from), list(self.prob_unchanged_from.values()), marker="o")
        left.set_xlabel("acting from step s")
        left.set_title("P(unchanged)", fontsize=9)
        right.bar(self.steps, [v if math.isfinite(v) else 0.0 for v in self.effect.values()])
        right.set_xlabel("step s")
        right.set_title("log P(from s) - log P(from s + 1)", fontsize=9)
        return figure


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sub_scm(scm: LanguageModelSCM, mechanism: Mechanism) -> LanguageModelSCM:
    """``scm`` with ``mechanism`` as its one intervened mechanism (:data:`_SUB`)."""
    return LanguageModelSCM(
        scm.lm, scm.max_new_tokens, scm.decoding, {_SUB: mechanism}, scm.name, scm.collapsed, scm.noise
    )


@dataclass
class _Worlds:
    """Evaluates sub-mechanisms of one string's intervention: one teacher-forced pass each,
    on the factual logits computed once."""

    scm: LanguageModelSCM
    prompt: torch.Tensor
    observed: torch.Tensor
    rest: Action
    raw: torch.Tensor
    passes: int = 1  # the factual pass
    cache: dict[Any, tuple[float, float]] = field(default_factory=dict)
    abducted: ExactCounterfactual | None = None  # the abduction, shared by every world of the string

    def value(self, key: Any, build: Callable[[], Mechanism]) -> tuple[float, float]:
        """(log P(unchanged), E[first divergence]) with the mechanism ``build()`` and the rest of
        the intervention, cached under ``key``."""
        if key not in self.cache:
            exact = self.exact(build())
            self.record(key, None if exact is None else exact.observed_token_log_probs())
        return self.cache[key]

    def exact(self, mechanism: Mechanism, scm: LanguageModelSCM | None = None) -> ExactCounterfactual | None:
        """The exact counterfactual of the string with ``mechanism`` and the rest of the
        intervention (``None`` for the null intervention, which needs no pass); ``scm``: the
        SCM of ``mechanism`` (:func:`_sub_scm`), if built already (strings of one batch share it)."""
        if isinstance(mechanism, Factual):
            if not self.rest and not self.rest.messengers:
                return None
            scm, data = self.scm, self.rest
        else:
            scm = _sub_scm(self.scm, mechanism) if scm is None else scm
            site = scm.site(MECHANISM)
            data = Action({**self.rest, site: torch.tensor(1, device=self.scm.lm.device)}, self.rest.messengers)
        if self.abducted is None:
            self.abducted = ExactCounterfactual(scm, self.prompt, self.observed, data, raw_logits=self.raw)
            return self.abducted
        return self.abducted._under(scm, data)

    def record(self, key: Any, log_q: torch.Tensor | None) -> None:
        """Cache the values of ``key`` from the log-probabilities of keeping each observed
        token (``None``: the null intervention, unchanged with probability 1)."""
        if log_q is None:
            self.cache[key] = 0.0, float(self.observed.shape[-1])
        else:
            self.passes += 1
            self.cache[key] = float(log_q.sum()), expected_first_divergence(first_divergence_law(log_q))


def _shapley_weights(k: int) -> list[float]:
    """``w[s] = s! (k - s - 1)! / k!``, the weight of a coalition of size ``s``."""
    return [math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)]


def _difference(a: float, b: float) -> float:
    """``a - b``, with ``-inf - -inf`` as 0 (both subsets leave the string unchanged with probability 0)."""
    return 0.0 if a == b else a - b


def _exact_shapley(k: int, value: Callable[[frozenset[int]], tuple[float, float]]) -> list[list[float]]:
    """Per value (log P, E[D]) and part, the Shapley value over all subsets."""
    weights = _shapley_weights(k)
    out = [[0.0] * k, [0.0] * k]
    for size in range(k):
        for subset in combinations(range(k), size):
            base = value(frozenset(subset))
            for i in set(range(k)) - set(subset):
                added = value(frozenset(subset) | {i})
                for j in range(2):
                    out[j][i] += weights[size] * _difference(added[j], base[j])
    return out


def _orders(k: int, num_permutations: int, seed: int) -> list[list[int]]:
    """The seeded random orders of the parts of the permutation estimate."""
    generator = seeding.generator(seed)
    return [torch.randperm(k, generator=generator).tolist() for _ in range(num_permutations)]


def _subsets(k: int, exact: bool, orders: list[list[int]]) -> list[frozenset[int]]:
    """Every subset that :func:`_by_part` evaluates: all ``2^k`` if ``exact``, else the
    whole, the empty set, each part alone and without it, and the prefixes of ``orders``."""
    if exact:
        return [frozenset(c) for size in range(k + 1) for c in combinations(range(k), size)]
    everything = frozenset(range(k))
    out = dict.fromkeys([everything, frozenset(), *(frozenset({i}) for i in range(k)),
                         *(everything - {i} for i in range(k))])
    for order in orders:
        out.update(dict.fromkeys(frozenset(order[:j]) for j in range(1, k + 1)))
    return list(out)


def _sampled_shapley(
    k: int, value: Callable[[frozenset[int]], tuple[float, float]], num_permutations: int, seed: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Per value and part, the mean increment over seeded random orders and its standard error."""
    increments = torch.zeros(2, num_permutations, k, dtype=torch.float64)
    for m, order in enumerate(_orders(k, num_permutations, seed)):
        chosen: frozenset[int] = frozenset()
        previous = value(chosen)
        for i in order:
            chosen = chosen | {i}
            current = value(chosen)
            for j in range(2):
                increments[j, m, i] = _difference(current[j], previous[j])
            previous = current
    means = increments.mean(1)
    if num_permutations > 1:
        errors = increments.std(1) / math.sqrt(num_permutations)
    else:
        errors = torch.full_like(means, math.nan)
    return means.tolist(), errors.tolist()


def attribute(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    observed: torch.Tensor,
    intervention: Intervention,
    by: str = "layer",
    max_exact_parts: int = 12,
    num_permutations: int = 64,
    seed: int = 0,
    raw_logits: torch.Tensor | None = None,
    tol: float = 1e-9,
) -> Attribution | StepAttribution:
    r"""Attribute the effect of ``intervention`` on the observed string to the parts of its
    mechanism (``by="layer"``) or to the steps where it acts (``by="step"``); see the module
    docstring for the definitions.

    :param scm: the SCM.
    :param prompt: prompt ids ``(L,)``.
    :param observed: the observed continuation ``(n,)``.
    :param intervention: as :func:`~pyro_lmscm.inference.exact_counterfactual`; it must select
        a mechanism (``{"mechanism": "steer"}``). A :class:`~pyro_lmscm.interventions.ModelSwap`
        is split as its weight difference (:meth:`~pyro_lmscm.interventions.ModelSwap.as_weight_delta`).
    :param by: ``"layer"`` (the mechanism's parts) or ``"step"``.
    :param max_exact_parts: exact Shapley values up to this many parts (:math:`2^k` passes).
    :param num_permutations: above it, the number of random orders (at most :math:`k` passes each).
    :param seed: the seed of the orders.
    :param raw_logits: the raw factual logits ``(n, V)`` of the observed steps, if known (as
        :func:`~pyro_lmscm.inference.exact_counterfactual`); else one pass computes them.
    :param tol: ``by="step"``: the least absolute effect on log P(unchanged) that matters, a
        finite number ``>= 0``.
    :returns: an :class:`Attribution` or, for ``by="step"``, a :class:`StepAttribution`.
    :raises InferenceError: for an ``scm`` that is no :class:`~pyro_lmscm.LanguageModelSCM`,
        an unknown ``by``, an intervention that selects no mechanism, bad counts or a bad ``tol``.
    :raises MechanismError: for ``by="step"`` with a mechanism that acts at every position
        (a weight edit, an adapter, a model swap).

    >>> import math
    >>> from pyro_lmscm.inference import attribute
    >>> from pyro_lmscm.interventions import ActivationSteering, Combined
    >>> steer = Combined([ActivationSteering(torch.ones(32), layer=0), ActivationSteering(torch.ones(32), layer=1)])
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3, mechanisms={"steer": steer})
    >>> result = attribute(scm, torch.tensor([2, 3]), torch.tensor([7, 3, 9]), {"mechanism": "steer"})
    >>> total = sum(result.shapley.values())
    >>> abs(total - math.log(result.prob_unchanged)) < 1e-9, result.num_passes
    (True, 4)
    """
    _check_options(scm, by, max_exact_parts, num_permutations, seed, tol, "attribute")
    worlds, mechanism = _worlds(scm, prompt, observed, intervention, raw_logits, "attribute")
    return _attribution(worlds, mechanism, by, int(max_exact_parts), int(num_permutations), int(seed), tol)


def attributions(
    scm: LanguageModelSCM,
    prompts: Sequence[torch.Tensor],
    observed: Sequence[torch.Tensor],
    intervention: Intervention,
    by: str = "layer",
    max_exact_parts: int = 12,
    num_permutations: int = 64,
    seed: int = 0,
    raw_logits: Sequence[torch.Tensor] | None = None,
    tol: float = 1e-9,
    batch_size: int = 16,
) -> list[Attribution | StepAttribution]:
    r""":func:`attribute` of several strings under one intervention, one result each, with the
    teacher-forced passes batched across the strings: the factual pass of ``batch_size``
    strings at a time (left-padded), then, for each subset of parts, its sub-mechanism built
    once and run on ``batch_size`` observations at a time
    (:func:`~pyro_lmscm.inference.exact.observed_token_log_probs`) instead of one pass per
    string and subset. Each result's ``num_passes`` counts the passes its string took part in.

    The values are those of :func:`attribute` of each string up to the float rounding of a
    left-padded batch (as a study's batched exact metrics: about ``1e-6`` relative in float32);
    with ``batch_size=1`` they are the same numbers. ``by="step"`` evaluates each string's
    steps in passes of its own (its positions depend on its prompt's length).

    :param prompts: ``S`` prompts ``(L_i,)``.
    :param observed: ``S`` observed continuations ``(n_i,)`` (lengths may differ).
    :param intervention: as :func:`attribute`, for every string.
    :param raw_logits: per string, as :func:`attribute`; else computed in batched passes.
    :param batch_size: strings per teacher-forced pass.
    :raises InferenceError: as :func:`attribute`, for ``prompts``, ``observed`` or ``raw_logits``
        that are not sequences, lists of other lengths or a bad ``batch_size``.

    >>> from pyro_lmscm.inference import attributions
    >>> from pyro_lmscm.interventions import ActivationSteering, Combined
    >>> steer = Combined([ActivationSteering(torch.ones(32), layer=0), ActivationSteering(torch.ones(32), layer=1)])
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3, mechanisms={"steer": steer})
    >>> prompts, observed = [torch.tensor([2, 3]), torch.tensor([5])], [torch.tensor([7, 3, 9]), torch.tensor([4, 4])]
    >>> results = attributions(scm, prompts, observed, {"mechanism": "steer"}, batch_size=1)
    >>> alone = attribute(scm, prompts[1], observed[1], {"mechanism": "steer"})
    >>> results[1].shapley == alone.shapley, [r.num_passes for r in results]
    (True, [4, 4])
    """
    _check_options(scm, by, max_exact_parts, num_permutations, seed, tol, "attributions")
    batch_size = as_int(batch_size, "batch_size", minimum=1, error=InferenceError)
    prompts = as_entries(prompts, "prompts", "attributions()")
    observed = as_entries(observed, "observed", "attributions()")
    raw_logits = None if raw_logits is None else as_entries(raw_logits, "raw_logits", "attributions()")
    if len(prompts) != len(observed) or (raw_logits is not None and len(raw_logits) != len(prompts)):
        raise InferenceError(
            f"attributions(): `prompts` ({len(prompts)}), `observed` ({len(observed)})"
            + ("" if raw_logits is None else f" and `raw_logits` ({len(raw_logits)})")
            + " must have one entry per string."
        )
    if not prompts:
        return []
    checked = [
        (scm.check_prompt(p, single=True), scm.check_observed(o, single=True)) for p, o in zip(prompts, observed)
    ]
    computed = raw_logits is None  # then each string takes part in a factual pass here
    if raw_logits is None:
        raw_logits = _factual_logits(scm, checked, batch_size)
    first, mechanism = _worlds(scm, *checked[0], intervention, raw_logits[0], "attributions", factual_pass=computed)
    made = [(first, mechanism)] + [
        _worlds(scm, p, o, intervention, raw, "attributions", mechanism, factual_pass=computed)
        for (p, o), raw in zip(checked[1:], raw_logits[1:])
    ]
    if by == "layer":
        k = len(mechanism.parts())
        exact = k <= max_exact_parts
        orders = [] if exact else _orders(k, num_permutations, seed)
        _prefill([w for w, _ in made], mechanism, _subsets(k, exact, orders), batch_size)
    return [_attribution(w, m, by, int(max_exact_parts), int(num_permutations), int(seed), tol) for w, m in made]


def _check_options(
    scm: Any, by: str, max_exact_parts: int, num_permutations: int, seed: int, tol: float, owner: str
) -> None:
    as_scm(scm, f"{owner}()")
    if by not in BY:
        raise InferenceError(f"{owner}(): `by` must be one of {BY}, got {by!r}.")
    as_int(max_exact_parts, "max_exact_parts", minimum=0, error=InferenceError)
    as_int(num_permutations, "num_permutations", minimum=1, error=InferenceError)
    as_int(seed, "seed", minimum=0, maximum=MAX_SEED, error=InferenceError)
    as_real(tol, "tol", minimum=0.0, error=InferenceError, owner=f"{owner}()")


def _worlds(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    observed: torch.Tensor,
    intervention: Intervention,
    raw_logits: torch.Tensor | None,
    owner: str,
    mechanism: Mechanism | None = None,
    factual_pass: bool | None = None,
) -> tuple[_Worlds, Mechanism]:
    """One string's :class:`_Worlds` and the mechanism whose parts take the credit (given:
    that of another string of the same intervention); ``factual_pass``: whether the string's
    factual logits count as a pass of this call (default: when computed here)."""
    prompt = scm.check_prompt(prompt, single=True)
    observed = scm.check_observed(observed, single=True)
    action = as_do_data(scm, intervention, observed)
    site = scm.site(MECHANISM)
    index = int(action.get(site, torch.tensor(0)))
    if index == 0:
        raise InferenceError(
            f"{owner}(): the intervention selects no mechanism, so there are no parts to attribute its effect to; "
            "select one, e.g. {'mechanism': 'steer'}."
        )
    if mechanism is None:
        mechanism = scm.mechanisms[index]
        if isinstance(mechanism, ModelSwap):
            mechanism = mechanism.as_weight_delta(scm.lm)
    rest = Action({key: value for key, value in action.items() if key != site}, getattr(action, "messengers", ()))
    if factual_pass is None:
        factual_pass = raw_logits is None
    if raw_logits is None:
        raw_logits = _factual_logits(scm, [(prompt, observed)], 1)[0]
    return _Worlds(scm, prompt, observed, rest, raw_logits, passes=int(factual_pass)), mechanism


@torch.no_grad()
def _factual_logits(
    scm: LanguageModelSCM, strings: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int
) -> list[torch.Tensor]:
    """The raw factual logits ``(n_i, V)`` of each string's observed steps, as the abduction
    computes them (:meth:`~pyro_lmscm.inference.HindsightGumbelGuide.decoded_logits`), from
    left-padded teacher-forced passes of ``batch_size`` strings at a time."""
    out: list[torch.Tensor] = []
    for start in range(0, len(strings), batch_size):
        chunk = strings[start : start + batch_size]
        logits, keep = _intervened_pass(scm, 0, chunk)
        out.extend(row[keep - o.shape[-1] :] for row, (_, o) in zip(logits, chunk))
    return out


def _prefill(worlds: list[_Worlds], mechanism: Mechanism, subsets: list[frozenset[int]], batch_size: int) -> None:
    """Evaluate ``subsets`` of ``mechanism``'s parts for every string, each subset's
    sub-mechanism built once and run teacher-forced on ``batch_size`` strings at a time."""
    parts = mechanism.parts()
    for subset in subsets:
        sub = mechanism.restricted([parts[i] for i in sorted(subset)])
        scm = None if isinstance(sub, Factual) else _sub_scm(worlds[0].scm, sub)
        exacts = [(w, w.exact(sub, scm)) for w in worlds if subset not in w.cache]
        for w, exact in exacts:
            if exact is None:
                w.record(subset, None)
        pending = [(w, e) for w, e in exacts if e is not None]
        if pending:
            log_qs = observed_token_log_probs([e for _, e in pending], batch_size)
            for (w, _), log_q in zip(pending, log_qs):
                w.record(subset, log_q)


def _attribution(
    worlds: _Worlds, mechanism: Mechanism, by: str, max_exact_parts: int, num_permutations: int, seed: int, tol: float
) -> Attribution | StepAttribution:
    if by == "step":
        return _by_step(worlds, mechanism, world_inputs(worlds.scm, worlds.rest, worlds.prompt)[0].shape[-1], tol)
    return _by_part(worlds, mechanism, max_exact_parts, num_permutations, seed)


def _by_part(
    worlds: _Worlds, mechanism: Mechanism, max_exact_parts: int, num_permutations: int, seed: int
) -> Attribution:
    parts = mechanism.parts()
    k = len(parts)

    def value(subset: frozenset[int]) -> tuple[float, float]:
        return worlds.value(subset, lambda: mechanism.restricted([parts[i] for i in sorted(subset)]))

    everything = frozenset(range(k))
    whole, empty = value(everything), value(frozenset())
    alone = {part: value(frozenset({i})) for i, part in enumerate(parts)}
    without = {part: value(everything - {i}) for i, part in enumerate(parts)}
    exact = k <= max_exact_parts
    if exact:
        shapley = _exact_shapley(k, value)
        errors = [[0.0] * k, [0.0] * k]
    else:
        shapley, errors = _sampled_shapley(k, value, num_permutations, seed)
    return Attribution(
        parts=parts,
        prob_unchanged=math.exp(whole[0]),
        prob_unchanged_empty=math.exp(empty[0]),
        expected_first_divergence=whole[1],
        expected_first_divergence_empty=empty[1],
        prob_unchanged_alone={part: math.exp(v[0]) for part, v in alone.items()},
        prob_unchanged_without={part: math.exp(v[0]) for part, v in without.items()},
        first_divergence_alone={part: v[1] for part, v in alone.items()},
        first_divergence_without={part: v[1] for part, v in without.items()},
        shapley=dict(zip(parts, shapley[0])),
        shapley_se=dict(zip(parts, errors[0])),
        shapley_first_divergence=dict(zip(parts, shapley[1])),
        shapley_first_divergence_se=dict(zip(parts, errors[1])),
        exact=exact,
        num_permutations=None if exact else num_permutations,
        num_passes=worlds.passes,
    )


def _by_step(worlds: _Worlds, mechanism: Mechanism, prompt_length: int, tol: float) -> StepAttribution:
    n = worlds.observed.shape[-1]
    mechanism.acting_from(prompt_length)  # refuse a weight edit before any pass
    values = {0: worlds.value(("from", 0), lambda: mechanism)}
    for s in range(1, n):

        def acting(s: int = s) -> Mechanism:
            return mechanism.acting_from(prompt_length + s - 1)

        values[s] = worlds.value(("from", s), acting)
    values[n] = worlds.value(("from", n), Factual)
    effect = {s: _difference(values[s][0], values[s + 1][0]) for s in range(n)}
    mattering = [s for s in range(n) if not abs(effect[s]) <= tol]  # nan matters
    return StepAttribution(
        steps=list(range(n)),
        prompt_length=prompt_length,
        prob_unchanged_from={s: math.exp(v[0]) for s, v in values.items()},
        first_divergence_from={s: v[1] for s, v in values.items()},
        effect=effect,
        effect_first_divergence={s: values[s][1] - values[s + 1][1] for s in range(n)},
        first_step_that_matters=mattering[0] if mattering else None,
        last_step_that_matters=mattering[-1] if mattering else None,
        num_passes=worlds.passes,
    )
