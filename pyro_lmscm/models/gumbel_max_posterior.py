r"""The exact posterior of Gumbel-max noise given the argmax (hindsight Gumbel sampling)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints

from ..errors import InferenceError

__all__ = [
    "GumbelMaxPosterior",
    "gumbel_log_density",
    "perturbed_rows",
    "standard_exponential",
    "standard_gumbel",
]


def gumbel_log_density(u: torch.Tensor) -> torch.Tensor:
    r"""Elementwise :math:`\log p(u) = -u - e^{-u}` of a standard Gumbel(0, 1) (Pyro's
    ``dist.Gumbel(0, 1).log_prob``)."""
    return dist.Gumbel(u.new_zeros(()), u.new_ones(()), validate_args=False).log_prob(u)


#: Variates per block in :func:`standard_exponential`: each block has its own NumPy
#: generator (a 2 MB float64 scratch), so blocks can be drawn on several threads.
_BLOCK = 1 << 18

_POOL: tuple[ThreadPoolExecutor, int] | None = None  # (pool, its number of workers)


def standard_exponential(
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Draws :math:`E \sim \mathrm{Exp}(1)` of the given shape, from torch's generator (or
    ``generator``);
    with ``out`` (a contiguous tensor), into ``out`` (``shape``, ``dtype`` and ``device``
    are then its own).

    On the CPU, ``Tensor.exponential_`` draws one variate at a time (about 30 ns each,
    measured with torch 2.13), which made the :math:`O(T \cdot V)` abduction noise cost as
    much as the forward pass. There the variates come from NumPy's ziggurat sampler in
    float64 (exact tails, about 5 ns each), in blocks of :data:`_BLOCK` with one generator
    per block, spawned from one draw of torch's global generator: ``torch.manual_seed`` /
    ``pyro.set_rng_seed`` keep every result reproducible, and blocks run on
    ``torch.get_num_threads()`` threads (NumPy releases the GIL) with the same result for
    any thread count. Other devices use ``exponential_``.
    """
    if out is not None:
        if not out.is_contiguous():
            raise InferenceError("`out` must be contiguous.")
        if out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float64):
            return out.exponential_(generator=generator)
        shape, dtype, device = out.shape, out.dtype, out.device
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device).exponential_(generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if out is None:
        out = torch.empty(shape, dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    flat = out.view(-1).numpy()
    starts = range(0, flat.size, _BLOCK)
    seeds = np.random.SeedSequence(seed).spawn(len(starts)) if len(starts) > 1 else [seed]

    def fill(block: int) -> None:
        start = starts[block]
        rng = np.random.Generator(np.random.PCG64(seeds[block]))
        # float64 draws: NumPy's float32 ziggurat returns exactly 0 with probability 2^-23
        flat[start : start + _BLOCK] = rng.standard_exponential(min(_BLOCK, flat.size - start))

    threads = min(torch.get_num_threads(), len(starts))
    if threads > 1:
        global _POOL
        if _POOL is None or _POOL[1] < threads:
            _POOL = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyro_lmscm_rng"), threads)
        list(_POOL[0].map(fill, range(len(starts))))
    else:
        for block in range(len(starts)):
            fill(block)
    return out.to(dtype)


def standard_gumbel(
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Draws :math:`u = -\log E \sim \mathrm{Gumbel}(0, 1)`, see :func:`standard_exponential`."""
    return standard_exponential(shape, dtype, device, out=out, generator=generator).log_().neg_()


def _distinct(x: torch.Tensor, event_dim: int) -> torch.Tensor:
    """``x`` with every broadcast (stride-0) batch dim narrowed to size 1."""
    for dim in range(x.dim() - event_dim):
        if x.stride(dim) == 0 and x.shape[dim] > 1:
            x = x.narrow(dim, 0, 1)
    return x


#: Entries of the scratch that :func:`perturbed_rows` reuses for each block of rows on the
#: CPU (512 KB of float32, two rows of a 49152-token vocabulary): a step's ``logits + u`` is
#: never made whole there.
_SCRATCH = 1 << 17


def perturbed_rows(logits: torch.Tensor, u: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    r"""The perturbed logits :math:`\ell + u` of each row, a block of rows at a time:
    ``(rows, block)``, where ``block`` is ``(logits + u)`` seen as rows ``(N, V)`` (the
    broadcast batch flattened in order) at ``rows``. Every block is written into one scratch
    of about :data:`_SCRATCH` entries, which the next block overwrites: read a block before
    asking for the next.

    A step's reductions of :math:`\ell + u` (its argmax, its maximum, the rounding check)
    need it one row at a time. On the CPU, making it whole would add an ``(N, V)`` block to
    every step, a few megabytes each time, allocated from and freed to the C heap once per
    step. On other devices (whose caching allocators keep freed blocks for reuse, and where
    each block is a kernel launch) the scratch holds every row: one block.
    """
    shape = torch.broadcast_shapes(logits.shape, u.shape)
    width, batch = shape[-1], shape[:-1]
    rows = batch.numel()
    if rows == 0 or width == 0:
        yield slice(0, rows), (logits + u).reshape(rows, width)
        return
    (left, left_index), (right, right_index) = _own_rows(logits, batch), _own_rows(u, batch)
    step = max(1, min(rows, _SCRATCH // width)) if u.device.type == "cpu" else rows
    scratch = torch.empty((step, width), dtype=torch.result_type(logits, u), device=u.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = scratch[: stop - start]
        torch.add(_take(left, left_index, start, stop), _take(right, right_index, start, stop), out=block)
        yield slice(start, stop), block


def _take(flat: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the broadcast batch from ``flat``, its own rows (:func:`_own_rows`)."""
    if len(flat) == 1:
        return flat  # (broadcast by the add)
    return flat[start:stop] if index is None else flat[index[start:stop]]


def _own_rows(x: torch.Tensor, batch: torch.Size) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x``'s own rows ``(n, V)``, without the rows that broadcasting to ``batch + (V,)``
    repeats, and which of them each row of the broadcast batch is (``None``: row ``i`` is
    row ``i``; one own row serves every row)."""
    x = _distinct(x.reshape((1,) * (len(batch) + 1 - x.dim()) + x.shape), 1)
    flat = x.reshape(-1, x.shape[-1])
    if x.shape[:-1] == batch or len(flat) == 1:
        return flat, None
    return flat, torch.arange(len(flat), device=x.device).view(x.shape[:-1]).expand(batch).reshape(-1)


def _break_rounding_ties(logits: torch.Tensor, u: torch.Tensor, k: torch.Tensor, active: torch.Tensor) -> None:
    """Make token ``k`` (shape ``(..., 1)``) win ``logits + u`` strictly in floating point,
    editing ``u`` in place.

    In exact arithmetic the observed token wins almost surely; rounding ``l + u`` can
    turn a near-tie into a tie or a loss (measured: 2 draws in 10^4 at logits of 3e4,
    far rarer at LM scales). There the noises that now beat it are lowered until the
    observed token wins by one unit in the last place. The check is two passes over V,
    made on blocks of rows (:func:`perturbed_rows`), so that its scratch stays small next
    to ``u``.
    """
    logits, k = logits.expand(u.shape), k.expand(u.shape[:-1] + (1,))
    if u.dim() == 1:
        logits, u, k, active = logits[None], u[None], k[None], active.expand(())[None]
    index = k.reshape(-1, 1)
    wrong_rows = []
    for rows, perturbed in perturbed_rows(logits, u):
        winner = perturbed.gather(-1, index[rows]).squeeze(-1)
        wrong_rows.append(perturbed.scatter_(-1, index[rows], float("-inf")).amax(-1) >= winner)
    wrong = torch.cat(wrong_rows).view(u.shape[:-1]) & active
    if not bool(wrong.any()):
        return
    value = k.squeeze(-1)
    for row in torch.nonzero(wrong).tolist():
        position = tuple(row)
        ell, noise, token = logits[position], u[position], int(value[position])
        winner = ell[token] + noise[token]
        ulp = winner - torch.nextafter(winner, winner.new_tensor(float("-inf")))
        for attempt in range(64):
            beaten = ell + noise >= winner
            beaten[token] = False
            if not bool(beaten.any()):
                break
            noise[beaten] = (winner - ulp * 2.0**attempt) - ell[beaten]


class GumbelMaxPosterior(TorchDistribution):
    r"""Posterior of :math:`u \sim \mathrm{Gumbel}(0, 1)^V` given that token :math:`k`
    wins the Gumbel-max race on the decoded logits :math:`\ell`:

    .. math::

        q(u) = p(u \mid \arg\max_v\,(\ell_v + u_v) = k)
             = \frac{\prod_v \mathrm{Gumbel}(u_v; 0, 1)\;
                     \mathbb{1}[\ell_k + u_k \geq \max_{v \neq k} (\ell_v + u_v) + \delta]}
                    {\mathrm{softmax}(\ell')_k},
        \qquad \ell'_v = \ell_v - \delta\,\mathbb{1}[v = k].

    With margin :math:`\delta = 0` this is the exact posterior. A small :math:`\delta > 0`
    conditions on *winning by at least* :math:`\delta`: it removes the near-ties whose
    outcome floating-point noise decides (a KV-cached replay computes logits that differ
    from a teacher-forced pass in the last bits), and stays exact for that event.

    Sampling is top-down (Oberst & Sontag 2019; Ravfogel et al. 2024, Prop. 3.1), with
    :math:`G_v = \ell_v + u_v`:

    .. math::

        M &\sim \mathrm{Gumbel}(\log \textstyle\sum_v e^{\ell'_v}), \qquad G_k = M + \delta, \\
        G_v &\sim \mathrm{Gumbel}(\ell_v) \text{ truncated to } (-\infty, M]
              \quad (v \neq k,\ \ell_v > -\infty), \\
        u_v &\sim \mathrm{Gumbel}(0, 1) \quad (\ell_v = -\infty: \text{ outside the decoding support}),

    with the truncated draw :math:`G = -\log(e^{-M} + e^{-g})`, :math:`g \sim
    \mathrm{Gumbel}(\ell_v)`, written directly as :math:`u_v = G_v - \ell_v =
    -\log(E_v + e^{\ell_v - M})` with :math:`E_v \sim \mathrm{Exp}(1)`: stable for any logit
    magnitude (:math:`\ell_v - M` is bounded above by :math:`M`'s own draw), and equal to
    the prior :math:`-\log E_v` where :math:`\ell_v = -\infty`.

    Where ``active`` is false the distribution is the prior :math:`\mathrm{Gumbel}(0,1)^V`
    (steps after the end of an observation).

    :param logits: decoded logits :math:`\ell`, shape ``batch_shape + (V,)``, float.
    :param value: the observed token :math:`k`, integer, shape ``batch_shape``.
    :param margin: :math:`\delta \geq 0`.
    :param active: bool, shape ``batch_shape``, default all true.

    References

    [1] M. Oberst, D. Sontag (2019), "Counterfactual Off-Policy Evaluation with
        Gumbel-Max Structural Causal Models".
    [2] S. Ravfogel, A. Svete, V. Snæbjarnarson, R. Cotterell (2024), "Gumbel
        Counterfactual Generation From Language Models", arXiv:2411.07180.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        logits: torch.Tensor,
        value: torch.Tensor,
        margin: float = 0.0,
        active: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if active is None:
            active = torch.ones(value.shape, dtype=torch.bool, device=value.device)
        batch_shape = logits.shape[:-1]
        if value.shape != batch_shape or active.shape != batch_shape:  # torch.broadcast_shapes is slow
            batch_shape = torch.broadcast_shapes(batch_shape, value.shape, active.shape)
        event_shape = logits.shape[-1:]
        self.logits = logits.expand(batch_shape + event_shape)
        self.value = value.expand(batch_shape)
        self.active = active.expand(batch_shape)
        self.margin = float(margin)
        super().__init__(batch_shape, event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):  # type: ignore[override]
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(GumbelMaxPosterior, _instance)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        new.value = self.value.expand(batch_shape)
        new.active = self.active.expand(batch_shape)
        new.margin = self.margin
        super(GumbelMaxPosterior, new).__init__(batch_shape, self.event_shape, validate_args=False)
        return new

    def _shifted_logits(self, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """:math:`\\ell'`: the observed token's logit lowered by the margin."""
        if self.margin == 0.0:
            return logits
        return logits - self.margin * torch.nn.functional.one_hot(value, logits.shape[-1]).to(logits.dtype)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple[int, ...] | list[int] = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        logits = self.logits.expand(shape)
        value = self.value.expand(shape[:-1])
        active = self.active.expand(shape[:-1])
        k = value.unsqueeze(-1)
        # per distinct row (a plate only expands): s = exp(l - c), c = max l, and
        # Z' = sum_v exp(l'_v - c), so that logsumexp(l') = c + log Z'
        base, base_value = _distinct(self.logits, 1), _distinct(self.value, 0)
        rows = torch.broadcast_shapes(base.shape[:-1], base_value.shape)
        base = base.expand(rows + self.event_shape)
        c = base.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, 0.0)
        scaled = torch.sub(base, c).exp_()
        z = scaled.sum(-1, keepdim=True)
        if self.margin != 0.0:
            z = z - scaled.gather(-1, base_value.expand(rows).unsqueeze(-1)) * -math.expm1(-self.margin)
        # one exponential draw per coordinate, E_v, and one per row, E', for
        # M = c + log Z' - log E'. Then u_v = G_v - l_v, G_v = -log(e^{-M} + e^{-g_v}), g_v = l_v - log E_v:
        #   u_v = -log(E_v + exp(l_v - M)) = -log(E_v + s_v E' / Z'),
        # three passes over V. l_v = -inf gives u_v = -log E_v, the prior, as required
        # outside the support; s_v E' / Z' <= E' never overflows.
        size = shape.numel()
        draws = standard_exponential((size + size // shape[-1],), logits.dtype, logits.device)
        top_draw = draws[size:].view(shape[:-1] + (1,))
        u = draws[:size].view(shape).addcmul_(scaled.expand(shape), top_draw / z).log_().neg_()
        top = c + z.log() - top_draw.log()  # M, shape (..., 1)
        u.scatter_(-1, k, top + self.margin - logits.gather(-1, k))
        _break_rounding_ties(logits, u, k, active)
        if not bool(active.all()):
            u = torch.where(active.unsqueeze(-1), u, standard_gumbel(shape, u.dtype, u.device))
        return u

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        prior = gumbel_log_density(u).sum(-1)
        shape = torch.broadcast_shapes(u.shape, self.logits.shape)
        logits = self.logits.expand(shape)
        value = self.value.expand(shape[:-1])
        k = value.unsqueeze(-1)
        shifted = self._shifted_logits(logits, value)
        log_evidence = shifted.log_softmax(-1).gather(-1, k).squeeze(-1)
        g = logits + u.expand(shape)
        g_k = g.gather(-1, k).squeeze(-1)
        others = g.scatter(-1, k, float("-inf")).amax(-1)
        tolerance = 1e-5 * (1.0 + g_k.abs())
        consistent = g_k - self.margin >= others - tolerance
        posterior = torch.where(consistent, prior - log_evidence, float("-inf"))
        return torch.where(self.active.expand(shape[:-1]), posterior, prior)

    def __repr__(self) -> str:
        return (
            f"GumbelMaxPosterior(batch_shape={tuple(self.batch_shape)}, "
            f"vocab={self.event_shape[0]}, margin={self.margin})"
        )
