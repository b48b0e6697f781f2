r"""How much a counterfactual depends on the causal mechanism behind the sampler.

Every :class:`~pyro_lmscm.models.NoiseModel` gives the same distribution over strings; their
counterfactuals differ. :func:`compare_mechanisms` abducts the same observations under each
and reports, per noise model, the exact P(unchanged), the exact expected first divergence,
the normalised token edit distance of sampled counterfactuals, and how much the expected
first divergence moves when the vocabulary is relabelled (a noise model that reads token ids can tell; one
that does not, cannot).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import InferenceError, LMSCMError
from ..interventions.ops import check_intervention
from ..models.noise import GumbelMax, InverseCDF
from ..models.scm import as_scm
from ..reporting import report as report_progress
from ..seeding import seeded
from ..validation import as_entries, as_int
from .counterfactual import counterfactual, sample_factual
from .exact import exact_counterfactual, expected_first_divergence

if TYPE_CHECKING:
    from ..interventions.ops import Intervention
    from ..models.noise import NoiseModel
    from ..models.scm import LanguageModelSCM

__all__ = ["DEFAULT_NOISE_MODELS", "MechanismRow", "compare_mechanisms", "mechanisms_markdown"]

#: The noise models compared by default.
DEFAULT_NOISE_MODELS: tuple[NoiseModel, ...] = (
    GumbelMax(),
    InverseCDF("probability"),
    InverseCDF("vocabulary"),
)


@dataclass
class MechanismRow:
    """The comparison's row of one noise model (means over the strings compared).

    :ivar prob_unchanged: exact P(counterfactual = observation).
    :ivar expected_first_divergence: exact expected number of leading tokens kept (n if unchanged).
    :ivar edit_distance: normalised token edit distance of ``num_samples`` sampled
        counterfactual strings per observation to it (each string up to its end of sequence,
        over the window of :class:`~pyro_lmscm.inference.CounterfactualDistribution`: its
        ``"normalized_edit_distance"``).
    :ivar relabel_shift: mean over strings of the absolute change of E[first divergence] when
        the vocabulary is relabelled by a random permutation (tokens); ``relabel_shift_max``
        its maximum.
    :ivar strings: strings compared (those every noise model could abduct).
    """

    noise: str
    prob_unchanged: float
    expected_first_divergence: float
    edit_distance: float
    relabel_shift: float
    relabel_shift_max: float
    strings: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def compare_mechanisms(
    scm: LanguageModelSCM,
    prompts: Sequence[torch.Tensor],
    intervention: Intervention | None,
    observed: Sequence[torch.Tensor | None] | None = None,
    noise_models: Sequence[NoiseModel] = DEFAULT_NOISE_MODELS,
    num_samples: int = 8,
    seed: int = 0,
) -> list[MechanismRow]:
    """Compare noise models on the same observations under one intervention.

    :param scm: the SCM (its own noise model is replaced by each of ``noise_models``).
    :param prompts: prompt ids, one ``(L,)`` per string (a list, or the rows of ``(S, L)``).
    :param intervention: as :func:`~pyro_lmscm.counterfactual`.
    :param observed: observed continuations (``None`` entries, or no list, are sampled once
        from the factual model; every noise model gives the same law of strings, so they
        all abduct that one string).
    :param num_samples: sampled counterfactuals per string and noise model (edit distance).
    :param seed: seeds the sampled observations, the draws and the relabelling permutation.
    :returns: one row per noise model, in order.
    :raises InferenceError: with no noise model or no prompt, for ``prompts``, ``observed``
        or ``noise_models`` that are no lists, or an ``scm`` that is no SCM.
    :raises InterventionError: for a bad intervention (before anything runs; a string that
        one noise model cannot abduct is left out of every row instead).
    """
    scm = as_scm(scm, "compare_mechanisms()")
    num_samples = as_int(num_samples, "num_samples", minimum=1)
    seed = as_int(seed, "seed", minimum=0)
    prompts = as_entries(prompts, "prompts", "compare_mechanisms()")
    observed = None if observed is None else as_entries(observed, "observed", "compare_mechanisms()")
    noise_models = as_entries(noise_models, "noise_models", "compare_mechanisms()", entry="noise model")
    if not noise_models:
        raise InferenceError("compare_mechanisms needs at least one noise model.")
    if not prompts:
        raise InferenceError("compare_mechanisms needs at least one prompt.")
    check_intervention(scm, intervention)
    observed = observed if observed is not None else [None] * len(prompts)
    if len(observed) != len(prompts):
        raise InferenceError(f"{len(prompts)} prompts but {len(observed)} observations.")
    with seeded(seed):
        relabel = torch.randperm(scm.vocab_size)
    strings: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, (prompt, given) in enumerate(zip(prompts, observed)):
        prompt = scm.check_prompt(prompt, single=True)
        if given is None:
            with seeded(seed + i):
                given, _ = sample_factual(scm, prompt)
        strings.append((prompt, scm.check_observed(given, single=True)))
    per_model: list[list[tuple[float, float, float, float]]] = []
    usable = [True] * len(strings)
    for noise in noise_models:
        variant = scm.with_noise(noise)
        results = []
        for i, (prompt, obs) in enumerate(strings):
            report_progress("noise models x strings", 1, len(noise_models) * len(strings))
            try:
                exact = exact_counterfactual(variant, prompt, obs, intervention)
                divergence = exact.first_divergence()
                unchanged = float(divergence[-1])
                expected = expected_first_divergence(divergence)
                shift = abs(expected_first_divergence(exact.first_divergence(relabel)) - expected)
                draws = counterfactual(variant, prompt, obs, intervention, num_samples=num_samples, seed=seed + i)
                # strings up to their end of sequence, over the observation's window
                distance = draws.counterfactual.expectation("normalized_edit_distance").value
                results.append((unchanged, expected, distance, shift))
            except LMSCMError:  # e.g. a token below float64's resolution under one mechanism
                usable[i] = False
                results.append((float("nan"),) * 4)
        per_model.append(results)
    rows = []
    for noise, results in zip(noise_models, per_model):
        kept = [r for r, ok in zip(results, usable) if ok]
        rows.append(
            MechanismRow(
                noise=repr(noise),
                prob_unchanged=_mean([r[0] for r in kept]),
                expected_first_divergence=_mean([r[1] for r in kept]),
                edit_distance=_mean([r[2] for r in kept]),
                relabel_shift=_mean([r[3] for r in kept]),
                relabel_shift_max=max((r[3] for r in kept), default=float("nan")),
                strings=len(kept),
            )
        )
    return rows


def mechanisms_markdown(rows: Sequence[MechanismRow]) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| noise model | exact P(unchanged) | exact E[first divergence] | edit distance (sampled) "
        "| E[first divergence] shift under relabelling (mean / max) | strings |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.noise} | {row.prob_unchanged:.4f} | {row.expected_first_divergence:.2f} | "
            f"{row.edit_distance:.3f} | {row.relabel_shift:.2e} / {row.relabel_shift_max:.2e} | {row.strings} |"
        )
    return "\n".join(lines) + "\n"
