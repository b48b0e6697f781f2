r"""Decoding as deterministic functions of the logits.

A decoding configuration is a map :math:`g` from raw next-token logits to decoded logits;
the sampler of the SCM is the Gumbel-max rule applied to :math:`g(\ell)`:

.. math::

    w = \arg\max_v \left[ g(\ell)_v + u_v \right], \qquad u \sim \mathrm{Gumbel}(0, 1)^V,

which samples :math:`w \sim \mathrm{Categorical}(\mathrm{softmax}(g(\ell)))`. Tokens
removed by top-k or top-p get :math:`g(\ell)_v = -\infty` and can never be emitted: they
are outside the *support*. The sampler and the abduction guide call the same
:class:`Decoding` object, so they cannot disagree about the support.

Each transform follows ``transformers``' ``*LogitsWarper`` classes: ``__init__`` checks and
stores the setting, ``__call__`` maps logits of shape ``(..., vocab)`` to a **new** tensor.

References

[1] Hugging Face ``transformers``, ``generation/logits_process.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..defaults import DEFAULTS
from ..errors import DecodingError, MechanismError
from ..validation import as_int, is_real

__all__ = ["Decoding", "Temperature", "TopK", "TopP", "check_logits"]


def check_logits(raw: torch.Tensor, where: str) -> torch.Tensor:
    """Return raw logits unchanged, or refuse NaN and :math:`+\\infty` entries, which
    ``argmax`` would turn into token 0 and abduction into a bogus "outside the support"
    error. (:math:`-\\infty` is a legitimate logit: a token the model rules out.)

    :param where: what produced them, for the message.
    :raises MechanismError: naming ``where``, on a non-finite entry.
    """
    if raw.numel() == 0 or bool(raw.amax() < float("inf")):  # (amax is NaN if any entry is)
        return raw
    bad = torch.isnan(raw) | (raw == float("inf"))
    if bool(bad.any()):
        rows = int(bad.any(-1).sum())
        raise MechanismError(
            f"{where} gave NaN or +inf logits ({int(bad.sum())} entries in {rows} rows); the "
            "model or a mechanism is numerically broken (too strong a steering alpha, an "
            "overflowing float16 model?), so no token can be sampled or abducted there."
        )
    return raw


class Temperature:
    r"""Divide the logits by a temperature: :math:`g(\ell) = \ell / \tau`.

    :param temperature: :math:`\tau > 0`. Greedy decoding (:math:`\tau \to 0`) is
        deterministic and has no exogenous noise to abduct; use a small positive value.
    :raises DecodingError: if ``temperature`` is not a finite positive number.
    """

    def __init__(self, temperature: float) -> None:
        if not is_real(temperature) or not (0.0 < float(temperature) < float("inf")):
            raise DecodingError(
                f"`temperature` must be a finite float > 0, got {temperature!r}. Greedy decoding "
                "(temperature 0) has no noise to abduct; use a small positive temperature instead."
            )
        self.temperature = float(temperature)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits / self.temperature
        if self.temperature < 1.0 and out.numel() and not bool(out.abs().amax() < float("inf")):
            _check_overflow(logits, out, self.temperature)
        return out

    def __repr__(self) -> str:
        return f"Temperature({self.temperature})"


def _check_overflow(logits: torch.Tensor, out: torch.Tensor, temperature: float) -> None:
    """Refuse finite logits that ``/ temperature`` made infinite: a +inf is an argmax of
    token 0 and a -inf a token ruled out, neither of which the model said.

    :raises DecodingError: naming the temperature and the smallest one that fits.
    """
    overflow = torch.isinf(out) & torch.isfinite(logits)
    if bool(overflow.any()):
        largest = float(logits[overflow].abs().amax())
        fits = largest / torch.finfo(out.dtype).max
        raise DecodingError(
            f"`temperature`={temperature:g} is too small: a logit of {largest:.3g} divided by it "
            f"overflows {out.dtype} to infinity; use a temperature above {fits:.3g}."
        )


class TopK:
    r"""Keep the :math:`k` largest logits, set the others to :math:`-\infty`.

    Ties at the :math:`k`-th value are all kept, as in ``TopKLogitsWarper``.

    :param top_k: :math:`k \geq 1`.
    :raises DecodingError: if ``top_k`` is not a positive integer.
    """

    def __init__(self, top_k: int) -> None:
        self.top_k = as_int(top_k, "top_k", minimum=1, error=DecodingError)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    def support(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`__call__` of rows ``(N, V)`` at the ``2k + 1`` largest logits of each row
        alone: ``(columns, values)``, both ``(N, min(2k + 1, V))``, the values those of
        :meth:`__call__` there (``-inf`` below the :math:`k`-th); every other column is
        ``-inf`` in :meth:`__call__`. ``None`` when more than ``2k`` tokens of a row reach its
        :math:`k`-th value (ties; e.g. a row of equal logits), which only the whole row holds."""
        k = min(self.top_k, logits.size(-1))
        values, columns = torch.topk(logits, min(2 * k + 1, logits.size(-1)), dim=-1)
        kth = values[..., k - 1 : k]
        if values.shape[-1] < logits.size(-1) and not bool((values[..., -1:] < kth).all()):
            return None  # (a nan compares False too)
        return columns, values.masked_fill(values < kth, float("-inf"))

    def __repr__(self) -> str:
        return f"TopK({self.top_k})"


class TopP:
    r"""Nucleus filtering: keep the smallest set of most likely tokens whose probability
    sums to at least :math:`p`, set the others to :math:`-\infty`.

    With tokens sorted by increasing probability :math:`\pi_{(1)} \leq \dots \leq \pi_{(V)}`,
    token :math:`(j)` is removed iff :math:`\sum_{i \leq j} \pi_{(i)} \leq 1 - p`; the most
    likely token is always kept (``TopPLogitsWarper``).

    :param top_p: :math:`p \in (0, 1]`.
    :raises DecodingError: if ``top_p`` is outside :math:`(0, 1]`.
    """

    def __init__(self, top_p: float) -> None:
        if not is_real(top_p) or not (0.0 < float(top_p) <= 1.0):
            raise DecodingError(f"`top_p` must be a float in (0, 1], got {top_p!r}.")
        self.top_p = float(top_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.top_p >= 1.0:
            return logits
        sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1.0 - self.top_p)
        sorted_remove[..., -1] = False
        remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
        return logits.masked_fill(remove, float("-inf"))

    def __repr__(self) -> str:
        return f"TopP({self.top_p})"


class Decoding:
    r"""A decoding configuration :math:`g = g_{\text{top-p}} \circ g_{\text{top-k}} \circ
    g_{\tau}`, applied in that order (as ``model.generate`` does).

    :param temperature: softmax temperature :math:`\tau > 0`.
    :param top_k: keep the ``top_k`` most likely tokens (``None``: all).
    :param top_p: nucleus mass (``None`` or ``1.0``: all).
    :raises DecodingError: on invalid settings.

    >>> import torch
    >>> g = Decoding(temperature=0.5, top_k=2)
    >>> g(torch.tensor([1.0, 3.0, 2.0]))
    tensor([-inf, 6., 4.])
    """

    def __init__(
        self,
        temperature: float = DEFAULTS.temperature,
        top_k: int | None = DEFAULTS.top_k,
        top_p: float | None = DEFAULTS.top_p,
    ) -> None:
        scale = Temperature(temperature)  # each validates its value
        keep_k = None if top_k is None else TopK(top_k)
        keep_p = None if top_p is None else TopP(top_p)
        self.transforms: Sequence = tuple(
            t for t in (None if scale.temperature == 1.0 else scale, keep_k, keep_p) if t is not None
        )
        self.temperature = scale.temperature
        self.top_k = None if keep_k is None else keep_k.top_k
        self.top_p = None if keep_p is None else keep_p.top_p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Decode raw logits of shape ``(..., vocab)``; returns a new float32 tensor."""
        out = logits.float()
        for transform in self.transforms:
            out = transform(out)
        return out

    def support(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decoded logits of rows ``(N, vocab)`` on a few columns that hold their whole
        support: ``(columns, values)`` ``(N, W)`` (:meth:`TopK.support`: ``W = 2 top_k + 1``),
        ``values`` those of :meth:`__call__` at ``columns`` (float32, ``-inf`` for a column
        outside the support) and ``-inf`` in :meth:`__call__` at every other column: no row
        of ``vocab`` decoded values is made. ``None`` without top-k or with top-p (whose
        support only a sort of the whole row gives), or where :meth:`TopK.support` is."""
        top_k = next((t for t in self.transforms if isinstance(t, TopK)), None)
        if top_k is None or any(isinstance(t, TopP) and t.top_p < 1.0 for t in self.transforms):
            return None
        out = logits.float()
        for transform in self.transforms[: self.transforms.index(top_k)]:  # (the temperature)
            out = transform(out)
        return top_k.support(out)

    def __repr__(self) -> str:
        return f"Decoding(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p})"
