r"""A distribution over counterfactual (or interventional) strings, given as draws."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping, Union

import torch

from ..errors import InferenceError, ObservationError
from ..interventions.ops import Action
from ..metrics import (
    NO_DIVERGENCE,
    char_edit_distance,
    common_prefix_length,
    first_divergence,
    normalized_token_edit_distance,
    token_edit_distance,
    trim_after_end,
)
from ..validation import as_bool, is_integer
from .scoring import string_log_prob
from .statistics import as_log_weights

if TYPE_CHECKING:
    from arviz import InferenceData

    from ..models.scm import LanguageModelSCM

__all__ = ["KINDS", "STATISTICS", "CounterfactualDistribution", "Estimate", "Statistic"]

#: What the draws are: strings replayed on posterior noise, or on fresh prior noise.
KINDS = ("counterfactual", "interventional")

#: Per-draw statistics known by name, each comparing a draw with the factual string:
#: ``changed`` (0/1), ``edit_distance`` (tokens), ``normalized_edit_distance``,
#: ``char_edit_distance`` (needs a tokenizer), ``first_divergence`` (``-1`` if unchanged),
#: ``common_prefix``, ``length`` (tokens, end of sequence included), ``log_prob_factual``
#: (under the factual model and prompt) and ``log_prob_intervened`` (under the intervention).
STATISTICS = (
    "changed",
    "edit_distance",
    "normalized_edit_distance",
    "char_edit_distance",
    "first_divergence",
    "common_prefix",
    "length",
    "log_prob_factual",
    "log_prob_intervened",
)

#: A statistic: a name from :data:`STATISTICS`, a function of one string (its id tuple,
#: or its text with ``on="text"``), or precomputed per-draw values of shape ``(N,)``.
Statistic = Union[str, Callable[[Any], Any], torch.Tensor]


@dataclass(frozen=True)
class Estimate:
    r"""A Monte Carlo estimate and its standard error.

    Differences of estimates from *independent* draws (e.g. counterfactual minus
    interventional, whose noises are independent) add variances:
    :math:`\mathrm{se}(a - b) = \sqrt{\mathrm{se}_a^2 + \mathrm{se}_b^2}`.

    >>> print(Estimate(0.5, 0.03) - Estimate(0.2, 0.04))
    0.3 ± 0.05
    """

    value: float
    stderr: float

    def __float__(self) -> float:
        return self.value

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.value - other.value, math.hypot(self.stderr, other.stderr))

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.value + other.value, math.hypot(self.stderr, other.stderr))

    def __str__(self) -> str:
        return f"{self.value:.4g} ± {self.stderr:.2g}"


class CounterfactualDistribution:
    r"""The distribution of strings :math:`w' = \mathcal{M}_{\text{do}}(u)` over draws
    :math:`u^{(i)}` of the noise: posterior draws give the counterfactual distribution,
    prior draws the interventional one.

    Draws may carry self-normalised importance weights :math:`\bar\omega_i \propto
    e^{\text{log\_weights}_i}` (uniform by default). Then for a statistic :math:`f`

    .. math::

        \hat\mu = \sum_i \bar\omega_i f(w'^{(i)}), \qquad
        \widehat{\mathrm{se}} = \Big(\sum_i \bar\omega_i^2 \big(f(w'^{(i)}) - \hat\mu\big)^2\Big)^{1/2},
        \qquad \mathrm{ESS} = \Big(\sum_i \bar\omega_i^2\Big)^{-1},

    the delta-method standard error, which for uniform weights is the usual
    :math:`\hat\sigma / \sqrt{N}`. It assumes independent draws; for autocorrelated (MCMC)
    draws it is too small: use the ArviZ export (``az.mcse``).

    Strings are compared with the factual one over the *window* of tokens the observation
    covers: the first ``len(factual_ids)`` tokens when the observation is a prefix without
    end of sequence, else all ``T`` tokens. A string is its windowed ids up to and including
    the first end-of-sequence id.

    Statistics are computed once per distinct string (the log-probabilities with one batched
    forward pass) and cached.

    :param scm: the SCM.
    :param prompt_ids: the factual prompt ``(L,)``.
    :param factual_ids: the observed continuation ``(n,)``.
    :param ids: the draws ``(N, T)``, padded after the end of sequence.
    :param intervention: the ``poutine.do`` data that produced them (for
        ``log_prob_intervened``); ``None`` for no intervention.
    :param kind: one of :data:`KINDS`.
    :param log_weights: ``(N,)`` log importance weights, ``None`` for uniform.
    :param noise_stats: per-draw noise summaries, each ``(N, n_active)`` (see
        :func:`~pyro_lmscm.inference.noise_statistics`).
    :param num_chains: the draws are ``num_chains`` consecutive chains of equal length.
    :param autocorrelated: the draws are MCMC chains, in order (not independent).
    :param method: the name of the abduction method, for labels.
    :raises ObservationError: on malformed ids, or draws shorter than the observation.
    :raises InferenceError: on malformed weights, chains, noise summaries or intervention.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=5)
    >>> result = counterfactual(scm, torch.tensor([2, 3]), intervention={"prompt": [2, 9]},
    ...                         num_samples=200, seed=0, baseline=True)
    >>> def same_first_token(string):
    ...     return string[0] == int(result.factual_ids[0])
    >>> difference = (result.counterfactual.probability(same_first_token)
    ...               - result.interventional.probability(same_first_token))
    >>> difference.value > 3 * difference.stderr  # the shared noise keeps the first token
    True
    """

    def __init__(
        self,
        scm: LanguageModelSCM,
        prompt_ids: torch.Tensor,
        factual_ids: torch.Tensor,
        ids: torch.Tensor,
        intervention: Mapping[str, torch.Tensor] | None = None,
        kind: str = "counterfactual",
        log_weights: torch.Tensor | None = None,
        noise_stats: Mapping[str, torch.Tensor] | None = None,
        num_chains: int = 1,
        autocorrelated: bool = False,
        method: str | None = None,
    ) -> None:
        from ..models.scm import as_scm

        as_scm(scm)
        if kind not in KINDS:
            raise InferenceError(f"`kind` must be one of {KINDS}, got {kind!r}.")
        if noise_stats is not None and not isinstance(noise_stats, Mapping):
            raise InferenceError(
                f"`noise_stats` must be a mapping from names to tensors, got {type(noise_stats).__name__}."
            )
        if intervention is not None and not isinstance(intervention, Mapping):
            raise InferenceError(
                f"`intervention` must be the poutine.do data (a mapping from site names to values) or None, "
                f"got {type(intervention).__name__} {intervention!r:.80}."
            )
        self.scm = scm
        self.prompt_ids = scm.check_prompt(prompt_ids)
        self.factual_ids = scm.check_observed(factual_ids)
        if self.factual_ids.dim() != 1:
            raise ObservationError(f"`factual_ids` must have shape (n,), got {tuple(self.factual_ids.shape)}.")
        ids = scm.lm.check_ids(ids, "ids")
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ObservationError(f"`ids` must have shape (N, T) with N, T >= 1, got {tuple(ids.shape)}.")
        n = self.num_samples = ids.shape[0]
        self.ids = ids.masked_fill(scm.ended_before(ids), scm.lm.pad_token_id)
        self.intervention = intervention if isinstance(intervention, Action) else Action(intervention)
        self.kind = kind
        self.method = method
        if not is_integer(num_chains) or num_chains < 1 or n % num_chains:
            raise InferenceError(
                f"`num_chains` must be a positive integer dividing the {n} draws, got {num_chains!r}."
            )
        self.num_chains = num_chains
        self.autocorrelated = as_bool(autocorrelated, "autocorrelated")
        if log_weights is not None:
            log_weights = as_log_weights(log_weights, n)
            if not bool(torch.isfinite(log_weights).any()):
                raise InferenceError(
                    "every draw has weight zero (all `log_weights` are -inf): no draw is consistent "
                    "with the observation. Draw more samples or use the exact method."
                )
        self.log_weights = log_weights
        self.noise_stats = {}
        for name, value in (noise_stats or {}).items():
            try:
                value = self.noise_stats[name] = torch.as_tensor(value).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as failure:
                raise InferenceError(
                    f"noise statistic {name!r} must be a tensor of shape ({n}, steps), got {value!r:.80} ({failure})."
                ) from None
            if value.dim() != 2 or value.shape[0] != n:
                raise InferenceError(
                    f"noise statistic {name!r} must have shape ({n}, steps), got {tuple(value.shape)}."
                )
        factual = trim_after_end(self.factual_ids, scm.lm.eos_token_ids)
        self.factual: tuple[int, ...] = tuple(factual)
        if len(factual) > ids.shape[1]:
            raise ObservationError(
                f"`ids` have {ids.shape[1]} tokens a draw, fewer than the {len(factual)} of the observation "
                f"{self.factual} (up to its end): they cannot be compared with it."
            )
        ends = len(factual) < len(self.factual_ids) or factual[-1] in scm.lm.eos_token_ids
        self.window = ids.shape[1] if ends else min(len(factual), ids.shape[1])
        windowed = self.ids[:, : self.window]
        unique, inverse = torch.unique(windowed, dim=0, return_inverse=True)
        self._unique_rows = unique
        self._inverse = inverse.cpu()
        self._unique_strings = [tuple(trim_after_end(row, scm.lm.eos_token_ids)) for row in unique]
        self._cache: dict[str, torch.Tensor] = {}

    # -- the draws -------------------------------------------------------------------------

    @property
    def strings(self) -> list[tuple[int, ...]]:
        """Each draw's string: windowed ids up to and including the end of sequence."""
        return [self._unique_strings[i] for i in self._inverse.tolist()]

    @property
    def texts(self) -> list[str]:
        """Each draw's text (needs the model's tokenizer)."""
        texts = self._unique_texts()
        return [texts[i] for i in self._inverse.tolist()]

    @property
    def factual_text(self) -> str:
        return self.scm.lm.decode(torch.tensor(self.factual, dtype=torch.long))

    def _unique_texts(self) -> list[str]:
        return [self.scm.lm.decode(torch.tensor(s, dtype=torch.long)) for s in self._unique_strings]

    @property
    def weights(self) -> torch.Tensor:
        r"""Self-normalised weights :math:`\bar\omega`, float64 ``(N,)``."""
        if self.log_weights is None:
            return torch.full((self.num_samples,), 1.0 / self.num_samples, dtype=torch.float64)
        return torch.softmax(self.log_weights, dim=0)

    @property
    def ess(self) -> float:
        r"""Kish's effective sample size :math:`(\sum_i \bar\omega_i^2)^{-1}`; ``N`` if unweighted."""
        return float(1.0 / (self.weights**2).sum())

    def counts(self) -> dict[tuple[int, ...], int]:
        """Distinct strings and how many draws (with non-zero weight) gave each, most frequent first."""
        positive = (self.weights > 0).to(torch.long)
        per_string = torch.zeros(len(self._unique_strings), dtype=torch.long).index_add_(0, self._inverse, positive)
        order = sorted(range(len(per_string)), key=lambda i: (-int(per_string[i]), self._unique_strings[i]))
        return {self._unique_strings[i]: int(per_string[i]) for i in order if per_string[i] > 0}

    def text_counts(self) -> dict[str, int]:
        """As :meth:`counts`, keyed by text (distinct ids with equal texts are merged)."""
        texts = self._unique_texts()
        index = {s: i for i, s in enumerate(self._unique_strings)}
        out: dict[str, int] = {}
        for string, count in self.counts().items():
            out[texts[index[string]]] = out.get(texts[index[string]], 0) + count
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def probabilities(self, key: Callable[[tuple[int, ...]], Hashable] | None = None) -> dict[Hashable, float]:
        """The weighted distribution of ``key(string)`` (default: the string itself).

        ``key=lambda s: s[:1]`` gives the distribution of the first token.

        :raises InferenceError: if ``key`` returns an unhashable value (such as a list).
        """
        mass = torch.zeros(len(self._unique_strings), dtype=torch.float64).index_add_(0, self._inverse, self.weights)
        out: dict[Hashable, float] = {}
        for string, p in zip(self._unique_strings, mass.tolist()):
            if p > 0:
                k = string if key is None else key(string)
                if not isinstance(k, Hashable):
                    raise InferenceError(f"`key` must return a hashable value, got {k!r:.80} ({type(k).__name__}).")
                out[k] = out.get(k, 0.0) + p
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def total_variation(
        self, other: CounterfactualDistribution, key: Callable[[tuple[int, ...]], Hashable] | None = None
    ) -> float:
        r""":math:`\frac12 \sum_s |p(s) - q(s)|` between the two distributions of ``key(string)``.

        Between two finite samples this is biased upwards (it is positive even for two
        samples of one distribution); compare it with the same quantity for two exact samples.

        :raises InferenceError: if ``other`` is no :class:`CounterfactualDistribution`.
        """
        if not isinstance(other, CounterfactualDistribution):
            raise InferenceError(
                f"total_variation(): `other` must be a CounterfactualDistribution, got {type(other).__name__}."
            )
        p, q = self.probabilities(key), other.probabilities(key)
        return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))

    # -- statistics --------------------------------------------------------------------------

    def statistic(self, fn: Statistic, on: str = "ids") -> torch.Tensor:
        """Per-draw values ``(N,)`` (float64) of a statistic.

        :param fn: a name from :data:`STATISTICS`, a function of one string (its id tuple, or
            its text with ``on="text"``) returning a number or bool, or per-draw values ``(N,)``.
        :param on: ``"ids"`` or ``"text"``; what a function receives.
        :raises InferenceError: for an unknown name, a bad ``on``, values of the wrong shape or a
            function that returns no number.
        """
        if isinstance(fn, torch.Tensor):
            values = fn.detach().to(dtype=torch.float64, device="cpu")
            if values.shape != (self.num_samples,):
                raise InferenceError(
                    f"per-draw values must have shape ({self.num_samples},), got {tuple(values.shape)}."
                )
            return values
        if isinstance(fn, str):
            return self._named(fn)[self._inverse]
        if not callable(fn):
            raise InferenceError(f"a statistic must be a name, a function or a tensor, got {type(fn).__name__}.")
        if on == "ids":
            inputs: list[Any] = list(self._unique_strings)
        elif on == "text":
            inputs = self._unique_texts()
        else:
            raise InferenceError(f'`on` must be "ids" or "text", got {on!r}.')
        numbers = []
        for x in inputs:
            value = fn(x)
            try:
                numbers.append(float(value))
            except (TypeError, ValueError):
                raise InferenceError(
                    f"a statistic function must return a number or bool, got {value!r:.80} "
                    f"({type(value).__name__}) for {x!r:.80}."
                ) from None
        return torch.tensor(numbers, dtype=torch.float64)[self._inverse]

    def _named(self, name: str) -> torch.Tensor:
        """Values of a named statistic, one per distinct string."""
        if name in self._cache:
            return self._cache[name]
        factual = self.factual
        strings = self._unique_strings
        if name == "changed":
            values = [float(s != factual) for s in strings]
        elif name == "edit_distance":
            values = [float(token_edit_distance(s, factual)) for s in strings]
        elif name == "normalized_edit_distance":
            values = [normalized_token_edit_distance(s, factual) for s in strings]
        elif name == "char_edit_distance":
            factual_text = self.factual_text
            values = [float(char_edit_distance(t, factual_text)) for t in self._unique_texts()]
        elif name == "first_divergence":
            divergences = (first_divergence(s, factual) for s in strings)
            values = [float(NO_DIVERGENCE if d is None else d) for d in divergences]
        elif name == "common_prefix":
            values = [float(common_prefix_length(s, factual)) for s in strings]
        elif name == "length":
            values = [float(len(s)) for s in strings]
        elif name in ("log_prob_factual", "log_prob_intervened"):
            intervention = self.intervention if name == "log_prob_intervened" else None
            log_p = string_log_prob(self.scm, self.prompt_ids, self._unique_rows, intervention)
            values = log_p.double().cpu().tolist()
        else:
            raise InferenceError(f"unknown statistic {name!r}; known: {STATISTICS}, or pass a function.")
        self._cache[name] = torch.tensor(values, dtype=torch.float64)
        return self._cache[name]

    def expectation(self, fn: Statistic, on: str = "ids") -> Estimate:
        r"""The weighted mean of a statistic and its standard error (see the class docstring).

        :param fn: see :meth:`statistic`.
        :param on: see :meth:`statistic`.
        """
        values = self.statistic(fn, on)
        weights = self.weights
        support = weights > 0  # draws of weight zero may hold anything, even -inf
        values, weights = values[support], weights[support]
        mean = float((weights * values).sum())
        if not math.isfinite(mean):
            return Estimate(mean, float("nan"))
        stderr = float((weights**2 * (values - mean) ** 2).sum().sqrt())
        return Estimate(mean, stderr)

    def probability(self, event: Callable[[Any], bool] | str | torch.Tensor, on: str = "ids") -> Estimate:
        """The probability of an event and its standard error.

        :param event: a function of one string (id tuple, or text with ``on="text"``)
            returning a bool, a 0/1 statistic name such as ``"changed"``, or per-draw bools.

        >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=5)
        >>> result = counterfactual(scm, torch.tensor([2, 3]), intervention={}, num_samples=50, seed=0)
        >>> print(result.counterfactual.probability("changed"))  # the null intervention
        0 ± 0
        """
        if isinstance(event, torch.Tensor):
            event = event.to(torch.bool).to(torch.float64)
        return self.expectation(event, on)

    def per_draw(self, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Named statistics for every draw, ``{name: (N,)}``, plus the noise summaries ``(N, steps)``.

        :param names: default: every name of :data:`STATISTICS` that applies (the
            character distance only with a tokenizer).
        """
        if names is None:
            names = tuple(n for n in STATISTICS if n != "char_edit_distance" or self.scm.lm.tokenizer is not None)
        out = {name: self.statistic(name) for name in names}
        out.update(self.noise_stats)
        return out

    def to_pandas(self, names: tuple[str, ...] | None = None) -> Any:
        """A ``pandas.DataFrame`` with one row per distinct string (most probable first):
        ``text`` (with a tokenizer), ``ids``, ``count`` (draws of non-zero weight),
        ``probability`` (the weighted mass) and the named per-draw statistics, which are
        functions of the string (:data:`STATISTICS`, or ``names``). pandas is an optional
        dependency (``pip install 'pyro-lmscm[pandas]'``).

        :raises InferenceError: without pandas.
        """
        try:
            import pandas as pd
        except ImportError as error:
            raise InferenceError("to_pandas() needs pandas: pip install 'pyro-lmscm[pandas]'.") from error
        if names is None:
            names = tuple(n for n in STATISTICS if n != "char_edit_distance" or self.scm.lm.tokenizer is not None)
        positive = (self.weights > 0).to(torch.long)
        count = torch.zeros(len(self._unique_strings), dtype=torch.long).index_add_(0, self._inverse, positive)
        mass = torch.zeros(len(self._unique_strings), dtype=torch.float64).index_add_(0, self._inverse, self.weights)
        columns: dict[str, Any] = {}
        if self.scm.lm.tokenizer is not None:
            columns["text"] = self._unique_texts()
        columns["ids"] = [list(s) for s in self._unique_strings]
        columns["count"] = count.tolist()
        columns["probability"] = mass.tolist()
        for name in names:
            columns[name] = self._named(name).tolist()
        frame = pd.DataFrame(columns)
        frame = frame[frame["count"] > 0].sort_values(["probability", "count"], ascending=False, kind="stable")
        return frame.reset_index(drop=True)

    def to_arviz(self, **kwargs: Any) -> InferenceData:
        """Export the per-draw statistics to ArviZ; see :func:`pyro_lmscm.inference.arviz.to_inference_data`."""
        from .arviz import to_inference_data

        return to_inference_data(self, **kwargs)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        weighted = "" if self.log_weights is None else f", ess={self.ess:.1f}"
        method = "" if self.method is None else f", method={self.method!r}"
        return (
            f"CounterfactualDistribution(kind={self.kind!r}{method}, num_samples={self.num_samples}"
            f"{weighted}, distinct={len(self.counts())})"
        )
