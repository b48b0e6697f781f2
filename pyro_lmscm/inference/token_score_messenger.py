r"""``TokenScoreMessenger``: score the tokens that a run of the SCM emits, on the logits it drew them from."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from pyro.poutine.messenger import Messenger

from ..errors import InferenceError
from ..interventions.ops import forced_tokens
from ..models.sites import token_site
from .exact import chain_token_log_probs
from .scoring import gathered_log_probs

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from ..models.scm import LanguageModelSCM
    from .exact import ExactCounterfactual

__all__ = ["TokenScoreMessenger"]


class TokenScoreMessenger(Messenger):
    r"""Within the context, record per step of ``scm.model`` and per row of its batch:

    * :attr:`log_probs`: :math:`\log p_m(w_t \mid \text{prompt}, w_{<t})`, the emitted token's
      log-probability under the decoded logits that the step drew it from (after every
      handler: the factual anchor, an exclusion), by the scorer's formula
      :func:`~pyro_lmscm.inference.scoring.gathered_log_probs`; ``0`` once the row has ended and
      under ``do(w_t = x)``. It is what :func:`~pyro_lmscm.inference.token_log_probs` computes
      teacher-forced, without a second pass of the model (up to the rounding of another batch).
    * :attr:`log_q` (with ``exacts``, for the posterior rows): :math:`\log q(w_t \mid w_{<t})`,
      the exact counterfactual chain of the row's string
      (:meth:`~pyro_lmscm.inference.ExactCounterfactual.token_log_probs`) on the same logits,
      once per distinct prefix of a string's rows, the strings of a step in one call
      (:func:`~pyro_lmscm.inference.exact.chain_token_log_probs`).

    The handler only reads the messages (nothing is replaced), so the run draws the same
    tokens with and without it.

    :param scm: the SCM whose model is scored (other SCMs in the same program are not).
    :param data: the ``poutine.do`` data the model runs under (its forced tokens).
    :param exacts: the exact counterfactuals of the rows' strings: one for a batch of rows
        ``(rows,)``, or one per string for a batch of observations ``(S, rows)``.
    :param posterior_rows: the first rows along the last batch dim that are posterior draws
        (the others, e.g. a fresh-noise baseline, get no :attr:`log_q`); default all.

    :ivar log_probs: per step, ``batch_shape`` float32.
    :ivar log_q: per step, ``batch_shape[:-1] + (posterior_rows,)`` float64.

    >>> from pyro_lmscm.inference import TokenScoreMessenger, token_log_probs
    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> prompt = torch.tensor([2, 3])
    >>> with pyro.plate("rows", 3), TokenScoreMessenger(scm, {}) as scorer:
    ...     ids = scm.model(prompt)
    >>> torch.allclose(scorer.token_log_probs(), token_log_probs(scm, prompt, ids), atol=1e-5)
    True
    """

    def __init__(
        self,
        scm: LanguageModelSCM,
        data: Mapping[str, torch.Tensor],
        exacts: Sequence[ExactCounterfactual] | None = None,
        posterior_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.scm = scm
        self.forced = forced_tokens(scm, data)
        self.exacts = None if exacts is None else list(exacts)
        self.posterior_rows = posterior_rows
        self.sites = {scm.site(token_site(t)): t for t in range(scm.max_new_tokens)}
        self._decoded: torch.Tensor | None = None
        self._tokens: list[torch.Tensor] = []
        self._finished: torch.Tensor | None = None  # has the row emitted an end of sequence
        self.log_probs: list[torch.Tensor] = []
        self.log_q: list[torch.Tensor] = []

    def __enter__(self) -> TokenScoreMessenger:  # type: ignore[override]
        super().__enter__()
        return self

    def token_log_probs(self) -> torch.Tensor:
        """:attr:`log_probs` stacked: ``batch_shape + (T,)``."""
        return torch.stack(torch.broadcast_tensors(*self.log_probs), -1)

    def chain_log_probs(self) -> torch.Tensor:
        """:attr:`log_q` stacked: ``batch_shape[:-1] + (posterior_rows, T)``."""
        return torch.stack(torch.broadcast_tensors(*self.log_q), -1)

    def _pyro_post_lmscm_step_decoded(self, msg: Message) -> None:
        if msg["args"][0] is self.scm:
            self._decoded = msg["value"]  # type: ignore[assignment]

    def _pyro_post_sample(self, msg: Message) -> None:
        t = self.sites.get(msg["name"])  # type: ignore[arg-type]
        decoded = self._decoded
        if t is None or decoded is None:
            return
        self._decoded = None
        w = torch.as_tensor(msg["value"]).long()
        shape = torch.broadcast_shapes(w.shape, decoded.shape[:-1])
        w = w.expand(shape)
        if t in self.forced:  # poutine.do gave this site its natural value; the model emits x
            w = torch.full(shape, self.forced[t], dtype=torch.long, device=w.device)
        ended = torch.zeros(shape, dtype=torch.bool, device=w.device)
        if self._finished is not None:
            ended = self._finished.expand(shape)
        logits = decoded.expand(*shape, decoded.shape[-1])
        log_p = torch.zeros(shape, device=w.device) if t in self.forced else gathered_log_probs(logits, w)
        self.log_probs.append(torch.where(ended, 0.0, log_p).float())
        self._tokens.append(w)
        self._finished = ended | self.scm.is_end(w)
        if self.exacts is not None:
            self.log_q.append(self._chain(t, logits, ended))

    def _chain(self, t: int, logits: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """``log q(w_t | w_<t)`` of the posterior rows at step ``t``: one evaluation of the
        string's chain per distinct prefix ``w_<=t`` (rows on one path share their logits)."""
        assert self.exacts is not None
        shape = ended.shape
        rows = shape[-1] if self.posterior_rows is None else self.posterior_rows
        count = math.prod(shape[:-1])
        if count != len(self.exacts):
            raise InferenceError(f"{count} strings in the batch but {len(self.exacts)} exact counterfactuals.")
        out = torch.empty(count, rows, dtype=torch.float64)
        if rows == 0:
            return out.reshape(*shape[:-1], rows)
        history = torch.stack([tok.expand(shape) for tok in self._tokens], -1)[..., :rows, :]
        strings = history.reshape(count, rows, history.shape[-1]).cpu()
        logits = logits[..., :rows, :].reshape(count, rows, -1)
        ended = ended[..., :rows].reshape(count, rows).cpu()
        picked, owners, inverses = [], [], []
        for i in range(count):  # rows of one string on one path: one evaluation
            unique, inverse = torch.unique(strings[i], dim=0, return_inverse=True)
            first = torch.full((unique.shape[0],), rows).scatter_reduce(0, inverse, torch.arange(rows), "amin")
            picked.append(first + i * rows)
            owners.append(torch.full_like(first, i))
            inverses.append(inverse)
        flat = torch.cat(picked)
        log_q = chain_token_log_probs(
            self.exacts,
            torch.cat(owners),
            logits[(flat // rows).to(logits.device), (flat % rows).to(logits.device), None].double().cpu(),
            ended.reshape(-1)[flat, None],
            strings.reshape(count * rows, -1)[flat, -1:],
            start=t,
        )[:, 0]
        offsets = torch.tensor([0] + [p.shape[0] for p in picked]).cumsum(0)
        for i in range(count):
            out[i] = log_q[offsets[i] : offsets[i + 1]][inverses[i]]
        return out.reshape(*shape[:-1], rows)
