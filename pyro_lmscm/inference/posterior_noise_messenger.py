r"""``PosteriorNoiseMessenger``: the exact posterior noise of each step, drawn when the model reaches it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from pyro.distributions import TorchDistribution
from pyro.poutine.messenger import Messenger

from ..models.sites import noise_site
from .statistics import active_steps

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from ..models.anchor import FactualAnchor
    from ..models.noise import NoiseModel
    from .hindsight_guide import HindsightGumbelGuide

__all__ = ["PosteriorNoiseMessenger"]


class _StepNoise(TorchDistribution):
    r"""One step's noise for the rows of a prediction: the posterior (``None``: the prior) on
    the first ``num_posterior_rows`` rows, and fresh prior noise from ``generator`` on the
    others (all rows get the posterior with ``num_posterior_rows=None``). The rows are the
    flattened batch, or the last batch dim with ``rows_last``. Its batch shape is that of
    the site; plates outside the handler expand it as any distribution.

    Draws use torch's generator for the posterior rows and ``generator`` for the prior
    rows, so that the posterior rows' draws are the same with and without the others.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        noise: NoiseModel,
        posterior: TorchDistribution | None,
        batch_shape: torch.Size,
        event_shape: torch.Size,
        device: torch.device,
        num_posterior_rows: int | None,
        generator: torch.Generator | None,
        rows_last: bool,
    ) -> None:
        self.noise = noise
        self.posterior = posterior
        self.device = device
        self.num_posterior_rows = num_posterior_rows
        self.generator = generator
        self.rows_last = rows_last
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=False)

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> _StepNoise:  # type: ignore[override]
        return _StepNoise(
            self.noise, self.posterior, torch.Size(batch_shape), self.event_shape, self.device,
            self.num_posterior_rows, self.generator, self.rows_last,
        )

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        if sample_shape:  # independent draws, one at a time
            draws = [self.sample() for _ in range(math.prod(sample_shape))]
            return torch.stack(draws).reshape(self._extended_shape(torch.Size(sample_shape)))
        noise, posterior, event, device = self.noise, self.posterior, self.event_shape, self.device
        batch = self.batch_shape
        size = self.num_posterior_rows
        if size is None:
            if posterior is None:
                return noise.sample_prior(batch + event, device)
            return posterior.expand(batch).sample()
        value = torch.empty(batch + event, dtype=noise.dtype, device=device)
        rows = value if self.rows_last else value.view(-1, *event)
        lead, total = rows.shape[: -1 - len(event)], rows.shape[-1 - len(event)]
        first = (Ellipsis, slice(0, size)) + (slice(None),) * len(event)
        rest = (Ellipsis, slice(size, None)) + (slice(None),) * len(event)
        if size > 0:
            if posterior is None:
                rows[first] = noise.sample_prior(lead + (size,) + event, device)
            else:
                rows[first] = posterior.expand(lead + (size,)).sample()
        if size < total:
            rows[rest] = noise.sample_prior(lead + (total - size,) + event, device, generator=self.generator)
        return value

    def posterior_rows(self) -> torch.Tensor:
        """Bool ``batch_shape``: the rows that get the posterior."""
        size, batch = self.num_posterior_rows, self.batch_shape
        if size is None:
            return torch.ones(batch, dtype=torch.bool, device=self.device)
        if self.rows_last:
            index = torch.arange(batch[-1], device=self.device)
        else:
            index = torch.arange(batch.numel(), device=self.device).reshape(batch)
        return (index < size).expand(batch)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        prior = self.noise.log_density(value)
        if self.posterior is None:
            return prior.expand(torch.broadcast_shapes(prior.shape, self.batch_shape))
        posterior = self.posterior.expand(self.batch_shape).log_prob(value)
        return torch.where(self.posterior_rows(), posterior, prior)


class PosteriorNoiseMessenger(Messenger):
    r"""Supply the noise sites of ``guide.scm`` from the exact posterior, one step at a time.

    At site ``u_t`` with :math:`t < n` (the observed steps; after an observed end of sequence
    the posterior is the prior) the handler sets the site's distribution ``msg["fn"]`` to
    the noise model's exact posterior (:meth:`HindsightGumbelGuide.step_posterior`; for
    Gumbel-max :class:`GumbelMaxPosterior` ``(ℓ_t, w^obs_t)``), for the site's batch shape,
    as Pyro's ``GuideMessenger`` does with ``get_posterior``; the site then draws from it
    (plates outside the handler expand it first). Later steps keep the prior. Given the
    observation the steps are independent, so this is the law of
    :class:`HindsightGumbelGuide` traced under the same plate, but it keeps no trace: it
    holds one step's noise, :math:`O(N V)`, instead of all of them, :math:`O(N T V)`. Steps
    :math:`t \geq n` get prior draws (:meth:`~pyro_lmscm.models.NoiseModel.sample_prior`;
    for Gumbel-max the fast sampler :func:`~pyro_lmscm.models.gumbel_max_posterior.standard_gumbel`).

    :param guide: the exact abduction (its observation, margin and noise model).
    :param prompt_ids: the prompt the guide abducts for, or better its
        :meth:`HindsightGumbelGuide.anchor` (a prompt costs one teacher-forced pass).
    :param num_posterior_rows: if given, only the first rows of the (flattened) batch get the
        posterior (along the last batch dim for a batch of observations ``(S, 1, n)``); the
        others get fresh prior noise (the interventional baseline decoded in the same batch),
        drawn from ``baseline_generator`` (default: torch's), so that the posterior rows'
        draws are the same with and without them.

    :ivar statistics: per drawn step, the noise model's statistics of the posterior rows
        (:meth:`~pyro_lmscm.models.NoiseModel.noise_statistics`; for Gumbel-max
        ``observed_noise`` :math:`u_{t,k_t}` and ``top_gumbel``
        :math:`\max_v(\ell_{t,v} + u_{t,v})`, each ``(rows,)``).

    >>> from pyro_lmscm.inference import PosteriorNoiseMessenger
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=5)
    >>> prompt, observed = torch.tensor([2, 3]), torch.tensor([7, 3, 3])
    >>> guide = HindsightGumbelGuide(scm, observed)
    >>> anchor = guide.anchor(prompt)  # one teacher-forced pass, held by the caller
    >>> with pyro.plate("draws", 4, dim=-1), guide.anchored(anchor), PosteriorNoiseMessenger(guide, anchor):
    ...     tokens = scm.model(prompt)
    >>> bool((tokens[:, :3] == observed).all())
    True
    """

    def __init__(
        self,
        guide: HindsightGumbelGuide,
        prompt_ids: torch.Tensor | FactualAnchor,
        num_posterior_rows: int | None = None,
        baseline_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.guide = guide
        self.scm = guide.scm
        self.logits = guide.decoded_logits(prompt_ids)
        self.observed = guide.observed_ids.expand(self.logits.shape[:-1])
        self.num_active = active_steps(self.scm, guide.observed_ids) if guide.observed_ids.dim() == 1 else None
        self.sites = {self.scm.site(noise_site(t)): t for t in range(self.scm.max_new_tokens)}
        self.num_posterior_rows = num_posterior_rows
        self.baseline_generator = baseline_generator
        self.statistics: list[dict[str, torch.Tensor]] = []
        self._supplied: dict[str, TorchDistribution] = {}  # site -> the posterior this handler set, until drawn

    def _pyro_sample(self, msg: Message) -> None:
        t = self.sites.get(msg["name"])  # type: ignore[arg-type]
        if t is None or msg["done"] or msg["is_observed"]:
            return
        prior: Any = msg["fn"]  # the model's prior of u_t, expanded by the plates inside this handler
        posterior = self.guide.step_posterior(t, self.logits) if t < self.observed.shape[-1] else None
        if posterior is not None:
            self._supplied[msg["name"]] = posterior  # type: ignore[index]
        msg["fn"] = _StepNoise(
            self.scm.noise, posterior, prior.batch_shape, prior.event_shape, self.logits.device,
            self.num_posterior_rows, self.baseline_generator, rows_last=self.observed.dim() > 1,
        )

    def _pyro_post_sample(self, msg: Message) -> None:
        posterior = self._supplied.pop(msg["name"], None)  # type: ignore[arg-type]
        fn = msg["fn"]
        if posterior is None or not isinstance(fn, _StepNoise) or fn.posterior is not posterior:
            return  # not drawn from this handler's posterior
        t = self.sites[msg["name"]]  # type: ignore[index]
        size = self.num_posterior_rows
        if self.num_active is not None and t < self.num_active and size != 0:
            value = msg["value"]
            assert isinstance(value, torch.Tensor)
            drawn = value.reshape(-1, *fn.event_shape)[: size if size is not None else None]
            stats = self.scm.noise.noise_statistics(self.logits[t], int(self.observed[t]), drawn)
            if stats:
                self.statistics.append(stats)

    def noise_statistics(self) -> dict[str, torch.Tensor]:
        """The noise model's per-draw statistics of the steps drawn, each ``(rows, n_a)``
        (one prediction run with a one-dimensional observation); for Gumbel-max
        ``observed_noise`` and ``top_gumbel``."""
        if not self.statistics:
            return {}
        return {key: torch.stack([s[key] for s in self.statistics], -1) for key in self.statistics[0]}
