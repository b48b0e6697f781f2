r"""Compare abduction methods against the exact posterior on one observation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ..errors import InferenceError
from ..interventions.ops import as_do_data, check_intervention
from ..reporting import report as report_progress
from ..seeding import seeded
from ..validation import MAX_SEED, as_int
from .abduction import (
    AbductionMethod,
    AbductionResult,
    Exact,
    Prior,
    abduct,
    kish_ess,
    make_method,
)
from .counterfactual import check_call, sample_factual
from .distribution import CounterfactualDistribution

if TYPE_CHECKING:
    from ..interventions.ops import Intervention
    from ..models.scm import LanguageModelSCM

__all__ = [
    "DEFAULT_METHODS",
    "MIN_DRAWS_TO_PLOT",
    "AbductionComparison",
    "ComparisonRow",
    "compare_abduction",
    "ks_statistic",
    "plot_comparison",
]

#: Methods compared by default; ``"prior"`` (no abduction) is the baseline row.
DEFAULT_METHODS = ("exact", "importance", "relaxed-svi", "relaxed-nuts", "prior")

_COLUMNS = {
    "method": "method",
    "num_draws": "draws",
    "reproduction_rate": "reproduces",
    "ess": "ESS",
    "tv_first_token": "TV first token",
    "tv_string": "TV string",
    "ks_noise": "KS noise",
    "wall_time_s": "wall s",
}


def _weighted_sample(values: Any, weights: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` flattened and their normalised weights, float64 on the CPU (for :func:`ks_statistic`).

    :raises InferenceError: naming ``name`` (or ``weights_<name>``) for a bad sample or weights.
    """
    try:
        sample = torch.as_tensor(values).detach().cpu()
        weight = None if weights is None else torch.as_tensor(weights).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as failure:
        raise InferenceError(f"ks_statistic(): `{name}` and its weights must be tensors ({failure}).") from None
    if sample.is_complex() or sample.dtype == torch.bool or sample.numel() == 0 or bool(sample.isnan().any()):
        raise InferenceError(
            f"ks_statistic(): `{name}` must hold at least one real number and no NaN, got {tuple(sample.shape)} "
            f"{sample.dtype}."
        )
    sample = sample.double().flatten()
    if weight is None:
        return sample, torch.full_like(sample, 1.0 / len(sample))
    real = not weight.is_complex() and weight.dtype != torch.bool
    weight = weight.double().flatten() if real else weight
    if (
        not real
        or weight.shape != sample.shape
        or not bool(torch.isfinite(weight).all() & (weight >= 0).all())
        or not float(weight.sum()) > 0
    ):
        raise InferenceError(
            f"ks_statistic(): `weights_{name}` must be {len(sample)} finite non-negative weights, not all zero, "
            f"got {weight.flatten()[:5].tolist()}{'...' if weight.numel() > 5 else ''} (shape {tuple(weight.shape)})."
        )
    return sample, weight / weight.sum()


def ks_statistic(
    a: torch.Tensor, b: torch.Tensor, weights_a: torch.Tensor | None = None, weights_b: torch.Tensor | None = None
) -> float:
    r"""Two-sample Kolmogorov-Smirnov statistic :math:`\sup_x |F_a(x) - F_b(x)|` between
    (optionally weighted) empirical CDFs.

    :param a: the first sample, any shape (flattened).
    :param b: the second sample.
    :param weights_a: non-negative weights of ``a``'s values (same number), ``None`` for uniform.
    :param weights_b: as ``weights_a``, of ``b``.
    :raises InferenceError: for an empty sample, values that are not real numbers or are NaN,
        or weights of another number, negative, not finite or all zero.

    >>> ks_statistic(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]))
    1.0
    """
    a, wa = _weighted_sample(a, weights_a, "a")
    b, wb = _weighted_sample(b, weights_b, "b")
    points = torch.cat([a, b]).sort().values

    def cdf(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        order = x.argsort()
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), w[order].cumsum(0)])
        return cumulative[torch.searchsorted(x[order], points, right=True)]

    return float((cdf(a, wa) - cdf(b, wb)).abs().max())


@dataclass(frozen=True)
class ComparisonRow:
    """One method's scores; see :func:`compare_abduction`. ``nan`` where undefined."""

    method: str
    num_draws: int
    reproduction_rate: float
    ess: float
    tv_first_token: float
    tv_string: float
    ks_noise: float
    wall_time_s: float


@dataclass
class AbductionComparison:
    """The result of :func:`compare_abduction`.

    :ivar rows: one :class:`ComparisonRow` per method, in the order given.
    :ivar results: the methods' :class:`AbductionResult`, by label.
    :ivar counterfactuals: their counterfactual distributions, by label (absent where no
        draw has weight).
    :ivar reference: the independent exact counterfactual distribution scored against.
    :ivar interventional: the interventional baseline (fresh noise; the ``prior`` row's
        counterfactual distribution when that row is present).
    """

    rows: list[ComparisonRow]
    results: dict[str, AbductionResult] = field(repr=False)
    counterfactuals: dict[str, CounterfactualDistribution] = field(repr=False)
    reference: CounterfactualDistribution = field(repr=False)
    interventional: CounterfactualDistribution = field(repr=False)

    def row(self, method: str) -> ComparisonRow:
        """The row of ``method`` (its label, or a unique label starting with it)."""
        matches = [r for r in self.rows if r.method == method] or [r for r in self.rows if r.method.startswith(method)]
        if len(matches) != 1:
            raise InferenceError(f"no unique row for {method!r}; rows: {[r.method for r in self.rows]}")
        return matches[0]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame``, one row per method (pandas is optional).

        :raises InferenceError: without pandas.
        """
        try:
            import pandas as pd
        except ImportError as error:
            raise InferenceError("to_pandas() needs pandas: pip install 'pyro-lmscm[pandas]'.") from error
        return pd.DataFrame(self.to_dicts())

    def to_markdown(self) -> str:
        """The table as GitHub markdown."""
        header = "| " + " | ".join(_COLUMNS.values()) + " |"
        align = "|" + "|".join(":---" if k == "method" else "---:" for k in _COLUMNS) + "|"
        lines = [header, align]
        for row in self.rows:
            cells = []
            for key in _COLUMNS:
                value = getattr(row, key)
                if isinstance(value, str):
                    cells.append(value)
                elif isinstance(value, int):
                    cells.append(str(value))
                elif math.isnan(value):
                    cells.append("–")
                elif key in ("ess", "wall_time_s"):
                    cells.append(f"{value:.1f}" if key == "ess" else f"{value:.2f}")
                else:
                    cells.append(f"{value:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_arviz(self, **kwargs: Any) -> dict[str, Any]:
        """Each method's counterfactual distribution as an ArviZ ``InferenceData``, by label."""
        return {label: cf.to_arviz(**kwargs) for label, cf in self.counterfactuals.items()}

    def __str__(self) -> str:
        return self.to_markdown()


def compare_abduction(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    observed: torch.Tensor | None,
    intervention: Intervention | None,
    methods: Sequence[str | AbductionMethod] = DEFAULT_METHODS,
    num_samples: int = 200,
    *,
    reference_samples: int | None = None,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    replay_factual: bool = False,
) -> AbductionComparison:
    r"""Score abduction methods against the exact posterior, one row per method.

    Columns:

    * ``reproduction_rate`` -- fraction of draws whose factual replay gives back the
      observed string (for ``importance`` and ``prior``: of the proposals). A replay
      evaluates the factual model on the observed path with the abduction's own logits
      (inside its anchor, :mod:`pyro_lmscm.models.anchor`), so it reproduces the string exactly
      when the Gumbel-max argmax on those logits does (:attr:`AbductionResult.consistent`);
      that check is used unless ``replay_factual=True`` runs the model;
    * ``ess`` -- Kish's effective sample size of the draws' importance weights against the
      exact posterior, :math:`p(u)\,\mathbb{1}[\text{consistent}] / q(u)`
      (:attr:`AbductionResult.exact_ess`): ``N`` for ``exact``, the number of consistent
      draws for ``importance``. For ``relaxed-nuts`` :math:`q` is the relaxed posterior and
      the autocorrelation of the chain is not counted (use its ArviZ export);
    * ``tv_first_token``, ``tv_string`` -- total variation distance of the method's
      counterfactual distribution (its own weights, none for the relaxed methods) to an
      independent exact one with ``reference_samples`` draws, on the first counterfactual
      token and on whole strings. Two exact samples are not at distance 0: the ``exact``
      row shows the Monte Carlo floor;
    * ``ks_noise`` -- the largest over observed steps of the two-sample
      Kolmogorov-Smirnov statistic of the observed-token noise :math:`u_{t,k_t}` against
      the exact reference;
    * ``wall_time_s`` -- seconds of abduction (prediction not included).

    :param scm: the SCM.
    :param prompt: prompt ids ``(L,)``.
    :param observed: observed continuation ``(n,)``; ``None`` samples one from the
        factual model (with ``seed``).
    :param intervention: as :func:`~pyro_lmscm.counterfactual`.
    :param methods: names of :data:`~pyro_lmscm.inference.abduction.METHODS` or
        :class:`~pyro_lmscm.inference.abduction.AbductionMethod` instances (e.g. two
        :class:`RelaxedSVI` with different temperatures); labels must differ.
    :param num_samples: draws per method.
    :param reference_samples: draws of the exact reference (default ``num_samples``).
    :param seed: seeds the observation, the reference and (offset by the row index) each method.
    :param options: per method name, options for :func:`abduct`, e.g.
        ``{"relaxed-svi": {"temperature": 0.05}}``.
    :param replay_factual: measure reproduction by replaying the factual model (``N T``
        more language-model steps per method) instead of the equivalent argmax check.
    :raises InferenceError: for an unknown method or option, repeated labels, NUTS on a
        large vocabulary, or a call inside a caller's ``pyro.plate`` (before anything runs).

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=3)
    >>> table = compare_abduction(scm, torch.tensor([2, 3]), None, {"prompt": [2, 9]},
    ...                           methods=["exact", "importance"], num_samples=100)
    >>> exact = table.row("exact")
    >>> exact.reproduction_rate, round(exact.ess, 3)  # ESS from computed weights: float32 rounding
    (1.0, 100.0)
    """
    check_call("compare_abduction()", scm, replay_factual=replay_factual)
    num_samples = as_int(num_samples, "num_samples", minimum=1)
    reference_samples = num_samples if reference_samples is None else as_int(
        reference_samples, "reference_samples", minimum=1
    )
    seed = as_int(seed, "seed", minimum=0, maximum=MAX_SEED)
    if isinstance(methods, (str, Mapping)) or not isinstance(methods, Sequence):
        raise InferenceError(
            f"`methods` must be a list of method names or AbductionMethod objects, got {type(methods).__name__} "
            f"{methods!r:.80}; e.g. ['exact', 'importance']."
        )
    if options is not None and not isinstance(options, Mapping):
        raise InferenceError(
            f"`options` must be a mapping from method names to options, got {type(options).__name__} {options!r:.80}; "
            "e.g. {'relaxed-svi': {'temperature': 0.05}}."
        )
    options = dict(options or {})
    for name, settings in options.items():
        if not isinstance(settings, Mapping):
            raise InferenceError(
                f"`options[{name!r}]` must be a mapping of abduct() options, got {type(settings).__name__} "
                f"{settings!r:.80}."
            )
    resolved = []
    for method in methods:
        settings = options.get(method, {}) if isinstance(method, str) else {}
        resolved.append(make_method(method, **settings))
    unused = sorted(set(options) - {m for m in methods if isinstance(m, str)}, key=repr)
    if unused:
        raise InferenceError(f"options given for methods not compared: {unused}.")
    labels = [m.label for m in resolved]
    if len(set(labels)) != len(labels):
        raise InferenceError(f"methods must have distinct labels, got {labels}.")
    for method in resolved:
        check = getattr(method, "check", None)
        if check is not None:
            check(scm)
    prompt = scm.check_prompt(prompt, single=True)
    if observed is None:
        check_intervention(scm, intervention)  # before a string is sampled
        with seeded(seed):
            observed, _ = sample_factual(scm, prompt)
    observed = scm.check_observed(observed, single=True)
    data = as_do_data(scm, intervention, observed)

    exact = abduct(scm, prompt, observed, Exact(), reference_samples, seed=seed)
    reference = exact.counterfactual(data)
    reference_noise = exact.noise_statistics()["observed_noise"]

    rows, results, counterfactuals = [], {}, {}
    interventional = None
    for i, method in enumerate(resolved):
        report_progress("inference methods", 1, len(resolved))
        result = abduct(scm, prompt, observed, method, num_samples, seed=(seed + 2 + i) % (MAX_SEED + 1))
        results[method.label] = result
        reproduces = result.reproduces if replay_factual else result.consistent
        tv_first = tv_string = ks = math.nan
        if result.log_weights is None or bool(torch.isfinite(result.log_weights).any()):
            cf = result.counterfactual(data)
            counterfactuals[method.label] = cf
            if isinstance(method, Prior) and interventional is None:
                interventional = CounterfactualDistribution(
                    scm, cf.prompt_ids, cf.factual_ids, cf.ids, cf.intervention, kind="interventional", method="prior"
                )
            tv_first = cf.total_variation(reference, key=lambda s: s[:1])
            tv_string = cf.total_variation(reference)
            noise = cf.noise_stats["observed_noise"]
            ks = max(
                ks_statistic(noise[:, t], reference_noise[:, t], weights_a=cf.weights)
                for t in range(noise.shape[1])
            )
        rows.append(
            ComparisonRow(
                method=method.label,
                num_draws=result.num_samples,
                reproduction_rate=float(reproduces.double().mean()),
                ess=kish_ess(result.log_weights_to_exact),
                tv_first_token=tv_first,
                tv_string=tv_string,
                ks_noise=ks,
                wall_time_s=result.wall_time_s,
            )
        )
    if interventional is None:
        interventional = exact.interventional(data, seed=(seed + 1) % (MAX_SEED + 1))
    return AbductionComparison(rows, results, counterfactuals, reference, interventional)



#: A method with fewer draws of positive weight is left out of :func:`plot_comparison`.
MIN_DRAWS_TO_PLOT = 20


def plot_comparison(comparison: AbductionComparison, path: str | Path, title: str) -> list[str]:
    """Save a PNG: left, the observed-token noise by method (ArviZ forest plot); right, the
    token edit distance of the exact counterfactuals against the interventional baseline
    (ArviZ density plot). Drawn on matplotlib's object API (no pyplot state, no backend set).

    :returns: the methods left out for having fewer than :data:`MIN_DRAWS_TO_PLOT` draws of
        positive weight.
    :raises InferenceError: if no method has enough draws.
    """
    from matplotlib.figure import Figure

    from .arviz import az

    datasets, labels, left_out = [], [], []
    for label, cf in comparison.counterfactuals.items():
        if cf.num_samples < MIN_DRAWS_TO_PLOT:
            left_out.append(label)
            continue
        datasets.append(cf.to_arviz(names=("changed",)))
        labels.append(label)
    if not datasets:
        raise InferenceError(
            f"nothing to plot: every method has fewer than {MIN_DRAWS_TO_PLOT} draws of positive "
            "weight; raise --num-samples."
        )
    figure = Figure(figsize=(13, 5.5))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    az.plot_forest(datasets, model_names=labels, var_names=["observed_noise"], combined=True, ax=left)
    legend = left.get_legend()  # ArviZ's legend (one per method, none for one), moved below
    if legend is not None:
        handles, names = legend.legend_handles, [text.get_text() for text in legend.get_texts()]
        left.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=9)
    left.set_title("Noise of the observed token $u_{t,k_t}$ by abduction method (94% HDI)")
    left.set_xlabel("$u_{t,k_t}$ (Gumbel noise of the observed token at step t)")
    reference = comparison.reference.to_arviz(baseline=comparison.interventional, names=("edit_distance",))
    az.plot_density(
        [reference["posterior"], reference["prior"]],
        data_labels=["counterfactual (exact)", "interventional (fresh noise)"],
        var_names=["edit_distance"],
        ax=[right],
    )
    right.set_title("Token edit distance to the factual string")
    right.set_xlabel("edit distance (tokens)")
    right.set_ylabel("density")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return left_out
