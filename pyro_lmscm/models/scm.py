r"""A language model as a structural causal model (SCM) over Gumbel-max sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pyro
import pyro.distributions as dist
import torch

from ..atomic import locked
from ..errors import DecodingError, InferenceError, LMSCMError, MechanismError, ObservationError
from ..reporting import report as report_progress
from ..validation import as_bool, as_int, as_lm
from .anchor import FactualAnchor
from .decoding import Decoding, check_logits
from .distributions import IntegerDelta
from .factual_anchor_messenger import FactualAnchorMessenger
from .incremental import MechanismBatch
from .mechanism import Factual, Mechanism
from .noise import GumbelMax, NoiseModel
from .ops import step_decoded, step_logits
from .record_logits_messenger import RecordLogitsMessenger
from .sites import MECHANISM, PROMPT, noise_site, token_site

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["FACTUAL", "LanguageModelSCM", "as_scm"]

FACTUAL = "factual"


class LanguageModelSCM:
    r"""A causal language model as a structural causal model (by default a Gumbel-max SCM).

    For steps :math:`t = 0, \dots, T-1`:

    .. math::

        \ell_t &= f_m(\text{prompt}, w_{<t}), \\
        u_t &\sim \mathrm{Gumbel}(0, 1)^V, \\
        w_t &= \arg\max_v \left[ g(\ell_t)_v + u_{t,v} \right],

    or, with another ``noise`` model (:mod:`pyro_lmscm.models.noise`), its prior for
    :math:`u_t` and its structural function :math:`w_t = h(g(\ell_t), u_t)`;
    where :math:`f_m` is the mechanism with index :math:`m` (0: the language model ``lm``,
    :math:`k \geq 1`: the ``k``-th of ``mechanisms``), :math:`g` is the decoding transform
    ``decoding``, :math:`V` is the vocabulary size and :math:`T` is ``max_new_tokens``.
    Once a row has emitted an end-of-sequence token, later steps emit
    ``lm.pad_token_id`` without calling the LM, but every site is still sampled, so the
    site structure is fixed.

    :meth:`model` is the Pyro model with sites ``"prompt"``, ``"mechanism"``,
    ``"u_{t}"`` and ``"w_{t}"`` (see :mod:`pyro_lmscm.models.sites`). Any of them may carry
    leading batch dims (plates, ChiRho worlds); they broadcast.

    Each step's raw logits pass through the effectful :func:`~pyro_lmscm.models.ops.step_logits`,
    so that handlers can act on them: inside :meth:`anchored` (entered by abduction and
    prediction) the factual mechanism is memoised on the abducted path, so a replay evaluates
    :math:`f_0` there to the very same numbers as abduction did (see
    :mod:`pyro_lmscm.models.anchor`). The SCM itself holds no state that inference changes.

    :param lm: the factual language model.
    :param max_new_tokens: :math:`T \geq 1`.
    :param decoding: the decoding transform :math:`g`.
    :param mechanisms: named alternative mechanisms, indices ``1, 2, ...`` in order.
    :param name: prefix of every site, ``"{name}/w_3"``, to use the SCM as a sub-model of a
        larger Pyro model (or of several SCMs).
    :param collapsed: marginalise the noise: :math:`w_t \sim \mathrm{Categorical}(
        \mathrm{softmax}(g(\ell_t)))` with no ``u_t`` sites, so that conditioning on an
        observed string gives its exact likelihood and discrete upstream variables can be
        enumerated (``TraceEnum_ELBO``). It is the same distribution over strings; use the
        non-collapsed SCM for abduction and counterfactuals.
    :param noise: the noise model of every step, :class:`~pyro_lmscm.models.GumbelMax`
        (default) or e.g. :class:`~pyro_lmscm.models.InverseCDF`; every noise model gives the
        same distribution over strings and its own counterfactuals.
    :raises MechanismError: if a mechanism is incompatible with ``lm`` or a name is taken.

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> prompt = torch.tensor([1, 2, 3])
    >>> w = scm.model(prompt)
    >>> trace = poutine.trace(scm.model).get_trace(prompt)
    >>> [name for name, site in trace.nodes.items() if site["type"] == "sample"][:4]
    ['prompt', 'mechanism', 'u_0', 'w_0']
    """

    def __init__(
        self,
        lm: HFLanguageModel,
        max_new_tokens: int,
        decoding: Decoding | None = None,
        mechanisms: Mapping[str, Mechanism] | None = None,
        name: str | None = None,
        collapsed: bool = False,
        noise: NoiseModel | None = None,
    ) -> None:
        as_lm(lm)
        max_new_tokens = as_int(max_new_tokens, "max_new_tokens", minimum=1, error=DecodingError)
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        if decoding is not None and not isinstance(decoding, Decoding):
            raise DecodingError(
                f"`decoding` must be a Decoding, e.g. Decoding(top_k=50), got {type(decoding).__name__} "
                f"{decoding!r:.80}."
            )
        self.decoding = decoding if decoding is not None else Decoding()
        if mechanisms is not None and not isinstance(mechanisms, Mapping):
            raise MechanismError(
                f"`mechanisms` must be a mapping from names to Mechanisms, got {type(mechanisms).__name__}."
            )
        mechanisms = dict(mechanisms or {})
        if FACTUAL in mechanisms:
            raise MechanismError(f"the mechanism name {FACTUAL!r} is reserved for index 0.")
        for key, mechanism in mechanisms.items():
            if not isinstance(mechanism, Mechanism):
                raise MechanismError(
                    f"mechanism {key!r} must be a pyro_lmscm Mechanism, got {type(mechanism).__name__}."
                )
            mechanism.check(lm)
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise MechanismError(f"`name` must be a non-empty string without '/', got {name!r}.")
        self.name = name
        self.collapsed = as_bool(collapsed, "collapsed", error=MechanismError)
        noise = GumbelMax() if noise is None else noise
        if not isinstance(noise, NoiseModel):
            raise MechanismError(f"`noise` must be a pyro_lmscm NoiseModel, got {type(noise).__name__}.")
        self.noise = noise
        self.mechanism_names: list[str] = [FACTUAL, *mechanisms]
        self.mechanisms: list[Mechanism] = [Factual(), *mechanisms.values()]

    def with_noise(self, noise: NoiseModel) -> LanguageModelSCM:
        """The same SCM (model, decoding, mechanisms, name) with another noise model: the same
        distribution over strings, other counterfactuals."""
        mechanisms = dict(zip(self.mechanism_names[1:], self.mechanisms[1:]))
        return LanguageModelSCM(
            self.lm, self.max_new_tokens, self.decoding, mechanisms, self.name, self.collapsed, noise=noise
        )

    def record_logits(self) -> RecordLogitsMessenger:
        """A handler: within it, the raw logits of each step of :meth:`model` are appended to
        the list that entering it returns (shape ``batch_shape + (V,)``), e.g. to abduct on
        the very logits that sampled a string (a teacher-forced pass rounds differently).
        See :class:`~pyro_lmscm.models.RecordLogitsMessenger`."""
        return RecordLogitsMessenger(self)

    def anchored(self, anchor: FactualAnchor) -> FactualAnchorMessenger:
        """A handler: within it, the factual mechanism returns ``anchor``'s logits on the
        anchored path (see :class:`~pyro_lmscm.models.FactualAnchorMessenger`)."""
        return FactualAnchorMessenger(self, anchor)

    def site(self, base: str) -> str:
        """The name of site ``base`` in this SCM: ``"{name}/{base}"``, or ``base`` without a name."""
        return f"{self.name}/{base}" if self.name else base

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def mechanism_index(self, name: str | int) -> int:
        """Index of the mechanism ``name`` (``"factual"`` is 0); an index is checked and returned.

        :raises MechanismError: for an unknown name or index.
        """
        if isinstance(name, int) and not isinstance(name, bool):
            if 0 <= name < len(self.mechanisms):
                return name
        elif isinstance(name, str) and name in self.mechanism_names:
            return self.mechanism_names.index(name)
        raise MechanismError(f"unknown mechanism {name!r}; known: {self.mechanism_names}.")

    def check_prompt(
        self, prompt_ids: torch.Tensor, num_steps: int | None = None, single: bool = False
    ) -> torch.Tensor:
        """Check prompt ids of shape ``(..., L)`` (``(L,)`` with ``single``) and that
        ``L + num_steps`` fits the context. A batch of prompts of different lengths is
        left-padded with :data:`~pyro_lmscm.lm.LEFT_PAD` (:func:`~pyro_lmscm.lm.left_pad`).

        :raises ObservationError: if empty, not integer, out of the vocabulary, too long, or
            not one string with ``single``.
        """
        prompt_ids = self.lm.check_ids(prompt_ids, "prompt", left_padded=not single)
        if single and prompt_ids.dim() != 1:
            raise ObservationError(f"`prompt` must have shape (L,), got {tuple(prompt_ids.shape)}.")
        if prompt_ids.dim() == 0 or prompt_ids.shape[-1] == 0:
            raise ObservationError("`prompt` must hold at least one token id, shape (..., L).")
        total = prompt_ids.shape[-1] + (self.max_new_tokens if num_steps is None else num_steps)
        if self.lm.max_length is not None and total > self.lm.max_length:
            raise ObservationError(
                f"prompt of {prompt_ids.shape[-1]} tokens plus {total - prompt_ids.shape[-1]} new "
                f"tokens exceeds the model's context of {self.lm.max_length} tokens."
            )
        return prompt_ids

    def check_observed(self, observed_ids: torch.Tensor, single: bool = False) -> torch.Tensor:
        """Check observed continuation ids of shape ``(..., n)`` with ``1 <= n <= T``.

        After an end-of-sequence token only ``pad_token_id`` may follow (the model emits
        nothing else there).

        :returns: the ids as ``torch.long``.
        :raises ObservationError: if empty, not integer, out of the vocabulary, longer than
            ``max_new_tokens`` or with tokens other than padding after the end.
        """
        observed_ids = self.lm.check_ids(observed_ids, "observed")
        if single and observed_ids.dim() != 1:
            raise ObservationError(f"`observed` must have shape (n,), got {tuple(observed_ids.shape)}.")
        if observed_ids.dim() == 0 or observed_ids.shape[-1] == 0:
            raise ObservationError("the observation is empty; pass at least one token id, shape (..., n).")
        n = observed_ids.shape[-1]
        if n > self.max_new_tokens:
            raise ObservationError(
                f"the observation has {n} tokens but the SCM has max_new_tokens={self.max_new_tokens}."
            )
        if bool((self.ended_before(observed_ids) & (observed_ids != self.lm.pad_token_id)).any()):
            raise ObservationError(
                "the observation has tokens other than the pad id "
                f"{self.lm.pad_token_id} after an end-of-sequence token; the model cannot emit those."
            )
        return observed_ids

    def is_end(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of shape ``ids.shape``: is the token an end-of-sequence token. The one
        definition of the end of a string; :meth:`finished_after` and :meth:`ended_before`
        build on it, and a step-by-step run updates ``finished | is_end(w_t)``."""
        eos = self.lm.eos_token_ids
        if not eos:
            return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        return ids == eos[0] if len(eos) == 1 else torch.isin(ids, torch.tensor(eos, device=ids.device))

    def finished_after(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of shape ``ids.shape``: has an end-of-sequence token occurred at or before ``t``."""
        return self.is_end(ids).cummax(dim=-1).values

    def ended_before(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of shape ``ids.shape``: has an end-of-sequence token occurred before ``t``
        (the model only pads there; its steps are no longer generated)."""
        ended = self.finished_after(ids)
        return torch.cat([torch.zeros_like(ended[..., :1]), ended[..., :-1]], dim=-1)

    def observations(self, observed_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The data dict ``{"w_t": observed_ids[..., t]}`` for ``pyro.condition``.

        :param observed_ids: observed continuation ids, shape ``(..., n)``.
        """
        observed_ids = self.check_observed(observed_ids)
        return {self.site(token_site(t)): observed_ids[..., t] for t in range(observed_ids.shape[-1])}

    @locked  # a run of the model is one turn: its sample sites meet no other thread's handlers
    def model(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The Pyro model of the SCM.

        :param prompt_ids: prompt ids, shape ``(..., L)``.
        :returns: the emitted ids, shape ``batch_shape + (T,)``.
        """
        prompt_ids = self.check_prompt(prompt_ids)
        device = prompt_ids.device
        # observed point masses, as pyro.deterministic: not latent, but do() can replace them
        point: Any = {"_deterministic": True}  # an InferDict key that Pyro's TypedDict does not list
        prompt = pyro.sample(
            self.site(PROMPT), IntegerDelta(prompt_ids, event_dim=1), obs=prompt_ids, infer=point
        )
        factual = torch.tensor(0, device=device)
        mechanism = pyro.sample(self.site(MECHANISM), IntegerDelta(factual), obs=factual, infer={**point})
        prompt = self.check_prompt(prompt)
        mechanism = torch.as_tensor(mechanism, device=device).long()

        # (the last token is emitted, never appended: T - 1 positions after the prompt)
        batch = MechanismBatch(self.lm, self.mechanisms, prompt, mechanism, max_tokens=self.max_new_tokens - 1)
        pad = torch.tensor(self.lm.pad_token_id, device=device)
        vocab = self.vocab_size
        noise = self.noise.prior(vocab, device)
        expanded = noise  # noise.expand(batch shape), rebuilt only when the batch grows
        finished = torch.zeros(batch.batch_shape, dtype=torch.bool, device=device)
        pad_logits = torch.full((vocab,), float("-inf"), device=device).index_fill(0, pad.reshape(1), 0.0)
        tokens: list[torch.Tensor] = []
        for t in range(self.max_new_tokens):
            raw = check_logits(batch.logits(), f"step {t} ('{self.site(token_site(t))}')")
            raw = step_logits(self, t, raw, prompt, mechanism, tokens, name=self.site(f"__logits_{t}"))
            logits = step_decoded(self, t, self.decoding(raw), name=self.site(f"__decoded_{t}"))
            if self.collapsed:
                logits = torch.where(finished.unsqueeze(-1), pad_logits, logits)
                w = pyro.sample(self.site(token_site(t)), dist.Categorical(logits=logits))
            else:
                if expanded.batch_shape != logits.shape[:-1]:
                    expanded = noise.expand(logits.shape[:-1])
                u = pyro.sample(self.site(noise_site(t)), expanded)
                w = torch.where(finished, pad, self.noise.structural(logits, u))
                w = pyro.sample(self.site(token_site(t)), IntegerDelta(w))
            w = self._check_token(w, t, device)
            report_progress("decoding (tokens)", 1, self.max_new_tokens)
            tokens.append(w)
            finished = finished | self.is_end(w)
            if t + 1 < self.max_new_tokens:
                if bool(finished.all()):
                    continue
                batch.advance(w, ~finished)
        return torch.stack(torch.broadcast_tensors(*tokens), dim=-1)

    def _check_token(self, w: torch.Tensor, t: int, device: torch.device) -> torch.Tensor:
        w = torch.as_tensor(w, device=device)
        if w.is_floating_point() or (w.numel() and (int(w.min()) < 0 or int(w.max()) >= self.vocab_size)):
            raise ObservationError(
                f"site {token_site(t)!r} has value {w.flatten()[:5].tolist()}, expected token ids "
                f"in [0, {self.vocab_size})."
            )
        return w.long()

    def __repr__(self) -> str:
        return (
            f"LanguageModelSCM({self.lm!r}, max_new_tokens={self.max_new_tokens}, "
            f"decoding={self.decoding!r}, mechanisms={self.mechanism_names[1:]}, noise={self.noise!r})"
        )


def as_scm(value: Any, owner: str = "", error: type[LMSCMError] = InferenceError) -> LanguageModelSCM:
    """``value`` if it is a :class:`LanguageModelSCM`, checked where it is passed rather than at
    its first use (an ``AttributeError`` deep inside, e.g. for an ``HFLanguageModel``).

    :raises error: naming ``scm`` (after ``owner``).
    """
    if isinstance(value, LanguageModelSCM):
        return value
    prefix = f"{owner}: " if owner else ""
    hint = " (build one: LanguageModelSCM(lm, max_new_tokens))" if hasattr(value, "check_ids") else ""
    raise error(f"{prefix}`scm` must be a LanguageModelSCM{hint}, got {type(value).__name__}.")
