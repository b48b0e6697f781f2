r"""Export counterfactual draws to ArviZ (the only module of the package that imports ArviZ).

Each draw becomes a set of scalars: the statistics of
:data:`~pyro_lmscm.inference.distribution.STATISTICS` (``changed``, ``edit_distance``,
``first_divergence`` with ``-1`` for an unchanged string, log-probabilities, ...) and, per
observed step (dim ``"step"``), the noise summaries ``top_gumbel`` and ``observed_noise``
(see :func:`~pyro_lmscm.inference.noise_statistics`). Then ``az.summary``, ``az.ess`` and
the plots apply.

Groups: ``posterior`` holds the draws of the distribution exported (counterfactual strings
replay *posterior* noise); ``prior`` holds an optional baseline (the interventional
strings replay *prior* noise); ``constant_data`` holds the prompt and the factual ids.

The conversion is two steps: :func:`draws_to_dict` builds plain NumPy arrays shaped
``(chain, draw, ...)`` with their dims, independent of the ArviZ version, and a converter
per ArviZ major version turns them into its data structure. ArviZ 0.x
(``InferenceData``) is implemented; add ArviZ 1.x (``xarray.DataTree`` via
``arviz_base.from_dict``) to :data:`CONVERTERS`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

with warnings.catch_warnings():
    # ArviZ 0.2x announces its 1.0 refactor with a FutureWarning on import.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

from .. import seeding
from ..errors import InferenceError, UnsupportedVersionError
from ..validation import MAX_SEED, as_int, is_integer

if TYPE_CHECKING:
    from .distribution import CounterfactualDistribution

__all__ = ["CONVERTERS", "draws_to_dict", "to_inference_data"]

STEP_DIM = "step"
_INTEGER_STATISTICS = ("changed", "edit_distance", "first_divergence", "common_prefix", "length")


def _chains(num_draws: int, chains: int | None, native: int | None) -> int:
    if chains is not None:
        if not is_integer(chains) or chains < 1 or num_draws % chains:
            raise InferenceError(f"`chains` must be a positive integer dividing {num_draws} draws, got {chains!r}.")
        return chains
    if native is not None:
        return native
    # independent draws: equal pseudo-chains make r_hat defined (and close to 1)
    return next(c for c in (4, 2, 1) if num_draws % c == 0 and num_draws // c >= 4 or c == 1)


def _check_distribution(value: Any, name: str) -> None:
    """:raises InferenceError: naming ``name`` if ``value`` is no counterfactual distribution
    (told by its per-draw statistics: the distribution module imports this one)."""
    if not callable(getattr(value, "per_draw", None)) or not hasattr(value, "num_samples"):
        raise InferenceError(f"`{name}` must be a CounterfactualDistribution, got {type(value).__name__}.")


def _unweighted(distribution: CounterfactualDistribution, seed: int) -> torch.Tensor:
    """Indices of draws that represent the weighted distribution without weights.

    Draws of equal positive weight (and zero weight elsewhere, e.g. importance sampling with
    an indicator likelihood) are kept as they are; otherwise systematic resampling.
    """
    weights = distribution.weights
    positive = torch.nonzero(weights > 0).flatten()
    if bool(torch.allclose(weights[positive], weights[positive][:1].expand(len(positive)), rtol=1e-9, atol=0)):
        return positive
    generator = seeding.generator(seed)
    n = distribution.num_samples
    points = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    cumulative = weights.cumsum(0)
    return torch.searchsorted(cumulative, points.clamp(max=float(cumulative[-1]) * (1 - 1e-12)), right=True)


def draws_to_dict(
    distribution: CounterfactualDistribution,
    names: tuple[str, ...] | None = None,
    chains: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, Any]]:
    """Per-draw statistics as NumPy arrays ``(chain, draw, ...)``, for any ArviZ version.

    Weighted draws are made unweighted first (see the module docstring), since ArviZ
    summaries take no weights.

    :param distribution: the draws.
    :param names: statistics to export (default: all that apply).
    :param chains: split the draws into this many chains; default: the distribution's own
        chains for MCMC draws, else 4 or 2 equal pseudo-chains of independent draws when they
        divide the number of draws (so that ``r_hat`` is defined).
    :param seed: for the resampling of weighted draws.
    :returns: ``(variables, dims, coords)``.
    :raises InferenceError: for a ``distribution`` that is no
        :class:`~pyro_lmscm.inference.CounterfactualDistribution`, ``names`` that are no tuple
        of names, or a bad ``chains`` or ``seed``.
    """
    _check_distribution(distribution, "distribution")
    if names is not None and (isinstance(names, str) or not isinstance(names, Sequence)):
        raise InferenceError(f"`names` must be a tuple of statistic names, e.g. ('changed',), got {names!r:.80}.")
    seed = as_int(seed, "seed", minimum=0, maximum=MAX_SEED)
    values = distribution.per_draw(None if names is None else tuple(names))
    index = torch.arange(distribution.num_samples)
    native = distribution.num_chains if distribution.autocorrelated else None
    if distribution.log_weights is not None:
        index = _unweighted(distribution, seed)
        native = None
    num_chains = _chains(len(index), chains, native)
    variables: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    for name, value in values.items():
        array = value[index].numpy()
        if array.dtype == np.float64 and name in _INTEGER_STATISTICS:
            array = array.astype(np.int64)
        variables[name] = array.reshape(num_chains, -1, *array.shape[1:])
        if array.ndim == 2:
            dims[name] = [STEP_DIM]
    steps = next((v.shape[1] for v in values.values() if v.dim() == 2), 0)
    coords: dict[str, Any] = {STEP_DIM: np.arange(steps)} if steps else {}
    return variables, dims, coords


def _from_dict_v0(
    posterior: tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, Any]],
    prior: tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, Any]] | None,
    constant_data: dict[str, np.ndarray],
    attrs: dict[str, Any],
) -> Any:
    variables, dims, coords = posterior
    dims = dict(dims)
    coords = dict(coords)
    prior_variables = None
    if prior is not None:
        prior_variables, prior_dims, prior_coords = prior
        dims.update(prior_dims)
        coords.update(prior_coords)
    for name, value in constant_data.items():
        dims[name] = [f"{name}_token"]
        coords[f"{name}_token"] = np.arange(len(value))
    idata = az.from_dict(
        posterior=variables,
        prior=prior_variables,
        constant_data=constant_data,
        coords=coords,
        dims=dims,
        attrs=attrs,
    )
    idata.posterior.attrs.update(attrs)
    return idata


#: ArviZ major version -> converter from :func:`draws_to_dict` output to its data structure.
CONVERTERS: dict[int, Callable[..., Any]] = {0: _from_dict_v0}


def to_inference_data(
    distribution: CounterfactualDistribution,
    baseline: CounterfactualDistribution | None = None,
    names: tuple[str, ...] | None = None,
    chains: int | None = None,
    seed: int = 0,
) -> az.InferenceData:
    """Per-draw scalars of ``distribution`` (group ``posterior``) and of an optional
    ``baseline`` (group ``prior``) as an ArviZ ``InferenceData``.

    :param distribution: the counterfactual draws.
    :param baseline: e.g. the interventional draws; noise summaries are exported only for
        ``distribution``.
    :param names: see :func:`draws_to_dict`.
    :param chains: see :func:`draws_to_dict`.
    :param seed: see :func:`draws_to_dict`.
    :raises NotImplementedError: for an ArviZ major version without a converter.
    :raises InferenceError: as :func:`draws_to_dict`, also for the ``baseline``.

    >>> from pyro_lmscm.inference.arviz import to_inference_data
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> result = counterfactual(scm, torch.tensor([2, 3]), intervention={"prompt": [2, 9]},
    ...                         num_samples=40, seed=0, baseline=True)
    >>> idata = to_inference_data(result.counterfactual, baseline=result.interventional)
    >>> idata.posterior["edit_distance"].shape, sorted(idata.groups())
    ((4, 10), ['constant_data', 'posterior', 'prior'])
    """
    major = int(az.__version__.split(".")[0])
    if major not in CONVERTERS:
        raise UnsupportedVersionError(
            f"no converter for ArviZ {az.__version__}; pyro_lmscm supports ArviZ "
            f"{sorted(CONVERTERS)}.x (install 'arviz<1') or add one to CONVERTERS."
        )
    if baseline is not None:
        _check_distribution(baseline, "baseline")
    posterior = draws_to_dict(distribution, names, chains, seed)
    prior = None
    if baseline is not None:
        baseline_names = tuple(n for n in posterior[0] if n not in distribution.noise_stats)
        prior = draws_to_dict(baseline, baseline_names, chains, seed)
    constant_data = {
        "prompt_ids": distribution.prompt_ids.cpu().numpy(),
        "factual_ids": distribution.factual_ids.cpu().numpy(),
    }
    attrs = {
        "kind": distribution.kind,
        "method": distribution.method or "",
        "intervention": repr({k: v.tolist() for k, v in distribution.intervention.items()}),
        "num_draws": distribution.num_samples,
        "ess_kish": distribution.ess,
        "window": distribution.window,
    }
    return CONVERTERS[major](posterior, prior, constant_data, attrs)
