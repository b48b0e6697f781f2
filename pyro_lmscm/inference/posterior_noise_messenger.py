r"""``PosteriorNoiseMessenger``: the exact posterior noise of each step, drawn when the model reaches it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.indep_messenger import CondIndepStackFrame, IndepMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

from ..models.sites import noise_site
from .statistics import active_steps

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from .hindsight_guide import HindsightGumbelGuide

__all__ = ["PosteriorNoiseMessenger"]


def _broadcast(msg: Message) -> None:
    """Expand ``msg["fn"]`` to the batch shape of every plate on the stack, as ``pyro.plate``
    does, whether the plates were entered inside this handler (they have already expanded
    it) or outside it (they run after it)."""
    frames = tuple(
        CondIndepStackFrame(m.name, m.dim, m.size, m.counter)
        for m in _PYRO_STACK
        if isinstance(m, IndepMessenger) and m.dim is not None
    )
    probe: Any = dict(msg, cond_indep_stack=frames, done=False)
    BroadcastMessenger._pyro_sample(probe)
    msg["fn"] = probe["fn"]


class PosteriorNoiseMessenger(Messenger):
    r"""Supply the noise sites of ``guide.scm`` from the exact posterior, one step at a time.

    At site ``u_t`` with :math:`t < n` (the observed steps; after an observed end of sequence
    the posterior is the prior) the handler draws :math:`u_t` from the noise model's exact
    posterior (:meth:`~pyro_lmscm.models.NoiseModel.posterior`; for Gumbel-max
    :class:`GumbelMaxPosterior` ``(ℓ_t, w^obs_t)``) for the site's batch shape, in the way
    Pyro's ``GuideMessenger.get_posterior`` supplies a
    posterior per site. Later steps keep the prior. Given the observation the steps are
    independent, so this is the law of :class:`HindsightGumbelGuide` traced under the same
    plate, but it holds one step's noise, :math:`O(N V)`, instead of all of them,
    :math:`O(N T V)`. Steps :math:`t \geq n` get prior draws
    (:meth:`~pyro_lmscm.models.NoiseModel.sample_prior`; for Gumbel-max the fast sampler
    :func:`~pyro_lmscm.models.gumbel_max_posterior.standard_gumbel`).

    :param guide: the exact abduction (its decoded logits and observation).
    :param prompt_ids: the prompt the guide abducts for.
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
    >>> with pyro.plate("draws", 4, dim=-1), guide.anchored(prompt), PosteriorNoiseMessenger(guide, prompt):
    ...     tokens = scm.model(prompt)
    >>> bool((tokens[:, :3] == observed).all())
    True
    """

    def __init__(
        self,
        guide: HindsightGumbelGuide,
        prompt_ids: torch.Tensor,
        num_posterior_rows: int | None = None,
        baseline_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.scm = guide.scm
        self.margin = guide.margin
        self.logits = guide.decoded_logits(prompt_ids)
        self.observed = guide.observed_ids.expand(self.logits.shape[:-1])
        self.active = guide.step_is_active(self.observed)
        self.num_active = active_steps(self.scm, guide.observed_ids) if guide.observed_ids.dim() == 1 else None
        self.sites = {self.scm.site(noise_site(t)): t for t in range(self.scm.max_new_tokens)}
        self.num_posterior_rows = num_posterior_rows
        self.baseline_generator = baseline_generator
        self.statistics: list[dict[str, torch.Tensor]] = []

    def _pyro_sample(self, msg: Message) -> None:
        t = self.sites.get(msg["name"])  # type: ignore[arg-type]
        if t is None or msg["done"] or msg["is_observed"]:
            return
        _broadcast(msg)
        fn: Any = msg["fn"]
        noise = self.scm.noise
        event = fn.event_shape
        shape = fn.batch_shape + event
        device = self.logits.device
        posterior = None
        if t < self.observed.shape[-1]:
            posterior = noise.posterior(
                self.logits[..., t, :], self.observed[..., t], margin=self.margin, active=self.active[..., t]
            )
        size = self.num_posterior_rows
        if size is None:
            if posterior is None:
                value = noise.sample_prior(shape, device)
            else:
                value = posterior.expand(fn.batch_shape).sample()
        else:  # posterior rows first, then prior rows from their own generator
            value = torch.empty(shape, dtype=noise.dtype, device=device)
            # the rows are the flattened batch, or the last batch dim for a batch of observations
            rows = value if self.observed.dim() > 1 else value.view(-1, *event)
            lead, total = rows.shape[: -1 - len(event)], rows.shape[-1 - len(event)]
            first = (Ellipsis, slice(0, size)) + (slice(None),) * len(event)
            rest = (Ellipsis, slice(size, None)) + (slice(None),) * len(event)
            if size > 0:
                if posterior is None:
                    rows[first] = noise.sample_prior(lead + (size,) + event, device)
                else:
                    rows[first] = posterior.expand(lead + (size,)).sample()
            if size < total:
                rows[rest] = noise.sample_prior(
                    lead + (total - size,) + event, device, generator=self.baseline_generator
                )
        if posterior is not None:
            if self.num_active is not None and t < self.num_active and size != 0:
                drawn = value.reshape(-1, *event)[: size if size is not None else None]
                stats = noise.noise_statistics(self.logits[t], int(self.observed[t]), drawn)
                if stats:
                    self.statistics.append(stats)
        msg["value"] = value
        msg["done"] = True

    def noise_statistics(self) -> dict[str, torch.Tensor]:
        """The noise model's per-draw statistics of the steps drawn, each ``(rows, n_a)``
        (one prediction run with a one-dimensional observation); for Gumbel-max
        ``observed_noise`` and ``top_gumbel``."""
        if not self.statistics:
            return {}
        return {key: torch.stack([s[key] for s in self.statistics], -1) for key in self.statistics[0]}
