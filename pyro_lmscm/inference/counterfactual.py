r"""Counterfactual strings: abduction, action, prediction."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import pyro
import torch

from ..atomic import chained, locked
from ..errors import InferenceError
from ..interventions.ops import Action, Intervention, as_do_data, check_intervention, intervene
from ..lm import left_pad
from ..seeding import generator, seeded
from ..validation import as_bool, as_int, as_real
from .budget import AUTO_CHUNK_BYTES, MIN_CHUNK_ROWS, even_chunk_size
from .distribution import CounterfactualDistribution
from .exact import ExactCounterfactual
from .hindsight_guide import HindsightGumbelGuide
from .posterior_noise_messenger import PosteriorNoiseMessenger
from .prediction import check_outside_plates, predict
from .statistics import active_steps
from .token_score_messenger import TokenScoreMessenger

if TYPE_CHECKING:
    from arviz import InferenceData

    from ..models.anchor import FactualAnchor
    from ..models.scm import LanguageModelSCM

__all__ = [
    "AUTO_CHUNK_BYTES",
    "CounterfactualResult",
    "auto_chunk_size",
    "counterfactual",
    "counterfactuals",
]


@dataclass
class CounterfactualResult:
    """The factual string and, per posterior draw, its counterfactual and (with
    ``counterfactual(..., baseline=True)``) an interventional (fresh-noise) baseline.

    :ivar prompt_ids: ``(L,)``.
    :ivar factual_ids: ``(n,)``, the observed (or sampled) continuation.
    :ivar counterfactual_ids: ``(num_samples, T)``; padded after the end of sequence.
    :ivar interventional_ids: ``(num_samples, T)``, or ``None`` without a baseline.
    :ivar intervention: the ``poutine.do`` data that was applied.
    :ivar log_prob_factual: :math:`\\log p(\\text{factual} \\mid \\text{prompt})`.
    :ivar factual_logits: the raw factual logits ``(n, V)`` that sampled ``factual_ids``
        (when it was sampled, not observed): what the abduction used, for
        :func:`~pyro_lmscm.inference.exact_counterfactual` ``(raw_logits=...)``.
    :ivar noise_stats: per-draw summaries of the posterior noise at the observed steps,
        ``{"observed_noise": (num_samples, n_a), "top_gumbel": (num_samples, n_a)}``
        (see :func:`~pyro_lmscm.inference.noise_statistics`).
    :ivar exact: with ``scores=True``, the exact counterfactual distribution of the string
        (:class:`~pyro_lmscm.inference.ExactCounterfactual`, on the abduction's logits).
    :ivar counterfactual_scores: with ``scores=True``, ``(num_samples, T)`` float32: each
        counterfactual token's log-probability under the intervened mechanism, recorded while
        it was decoded (:class:`~pyro_lmscm.inference.TokenScoreMessenger`): what
        :func:`~pyro_lmscm.inference.token_log_probs` of the draws under the intervention
        gives, up to the rounding of another batch; ``0`` after a draw's end.
    :ivar interventional_scores: the same for the baseline's draws (with ``baseline=True``).
    :ivar counterfactual_log_q: with ``scores=True``, ``(num_samples, T)`` float64: each
        counterfactual token's exact log-probability under the counterfactual distribution
        given the draw's prefix, :math:`\\log q(s_t \\mid s_{<t})` (what
        :meth:`~pyro_lmscm.inference.ExactCounterfactual.token_log_probs` of the draws gives),
        on the same logits.
    """

    scm: LanguageModelSCM = field(repr=False)
    prompt_ids: torch.Tensor
    factual_ids: torch.Tensor
    counterfactual_ids: torch.Tensor
    interventional_ids: torch.Tensor | None
    intervention: dict[str, torch.Tensor]
    log_prob_factual: float
    noise_stats: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    factual_logits: torch.Tensor | None = field(default=None, repr=False)
    exact: ExactCounterfactual | None = field(default=None, repr=False)
    counterfactual_scores: torch.Tensor | None = field(default=None, repr=False)
    interventional_scores: torch.Tensor | None = field(default=None, repr=False)
    counterfactual_log_q: torch.Tensor | None = field(default=None, repr=False)

    def _texts(self, ids: torch.Tensor) -> list[str]:
        return [self.scm.lm.decode(row) for row in ids]

    @property
    def factual_text(self) -> str:
        return self.scm.lm.decode(self.factual_ids)

    @property
    def counterfactual_texts(self) -> list[str]:
        return self._texts(self.counterfactual_ids)

    @property
    def interventional_texts(self) -> list[str]:
        return self._texts(self._baseline_ids())

    @property
    def counterfactual(self) -> CounterfactualDistribution:
        """The counterfactual draws as a :class:`CounterfactualDistribution`."""
        return self._distribution(self.counterfactual_ids, "counterfactual", self.noise_stats)

    @property
    def interventional(self) -> CounterfactualDistribution:
        """The interventional (fresh-noise) baseline as a :class:`CounterfactualDistribution`.

        :raises InferenceError: if the result was computed without ``baseline=True``.
        """
        return self._distribution(self._baseline_ids(), "interventional", None)

    def _baseline_ids(self) -> torch.Tensor:
        if self.interventional_ids is None:
            raise InferenceError(
                "this result has no interventional baseline: call counterfactual(..., baseline=True)."
            )
        return self.interventional_ids

    def _distribution(
        self, ids: torch.Tensor, kind: str, noise_stats: dict[str, torch.Tensor] | None
    ) -> CounterfactualDistribution:
        cache = self.__dict__.setdefault("_distributions", {})
        if kind not in cache:
            cache[kind] = CounterfactualDistribution(
                self.scm, self.prompt_ids, self.factual_ids, ids, self.intervention,
                kind=kind, noise_stats=noise_stats, method="exact" if kind == "counterfactual" else "prior",
            )
        return cache[kind]

    def to_arviz(self, **kwargs: Any) -> InferenceData:
        """ArviZ export: the counterfactual draws as the ``posterior`` group and the
        interventional baseline, if computed, as the ``prior`` group (see
        :func:`pyro_lmscm.inference.arviz.to_inference_data`)."""
        baseline = None if self.interventional_ids is None else self.interventional
        return self.counterfactual.to_arviz(baseline=baseline, **kwargs)


def sample_factuals(
    scm: LanguageModelSCM, prompts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The prelude of every query on sampled strings: one string per prompt of ``prompts``
    ``(L,)`` or ``(S, L)`` (left-padded, :func:`~pyro_lmscm.lm.left_pad`) sampled from the
    factual model in one KV-cached run, the raw logits that sampled them, for the abduction (a
    teacher-forced pass rounds otherwise, and under top-k can rank the sampled token outside
    the k), and each string's length up to and including its end of sequence.

    :returns: ``(rows, raw_logits, lengths)``: ids ``(h,)`` or ``(S, h)`` padded after each end
        of sequence, logits ``(h, V)`` or ``(S, h, V)``, and ``S`` ints (one for one prompt);
        ``h`` is the longest length (the batch's observed horizon).
    """
    with scm.record_logits() as steps:
        sampled = scm.model(prompts)  # (..., T), padded after each end of sequence
    lengths = [active_steps(scm, row) for row in sampled.reshape(-1, sampled.shape[-1])]
    horizon = max(lengths)
    rows = scm.check_observed(sampled[..., :horizon])
    return rows, torch.stack(steps[:horizon], dim=-2), lengths


def sample_factual(scm: LanguageModelSCM, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_factuals` of one prompt ``(L,)``: a string ``(n,)`` (trimmed after its end
    of sequence) and the raw logits ``(n, V)`` that sampled it."""
    observed, raw_logits, _ = sample_factuals(scm, prompt)
    return scm.check_observed(observed, single=True), raw_logits


def _predict(
    scm: LanguageModelSCM,
    guide: HindsightGumbelGuide,
    anchor: FactualAnchor,
    intervened: Callable[[torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    size: int,
    baseline: torch.Generator | None,
    deterministic: bool,
    scorer: Callable[[int | None], TokenScoreMessenger] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], tuple[torch.Tensor, ...] | None]:
    """One chunk of ``size`` posterior draws: counterfactual ids ``(size, T)``,
    interventional ids ``(size, T)`` (``None`` without ``baseline``), the noise statistics
    and, with a ``scorer`` (``scorer(posterior_rows)`` makes a
    :class:`TokenScoreMessenger` per decoding run), the scores: the counterfactual and the
    baseline rows' token log-probabilities and the counterfactual rows' chain, each
    ``(..., size, T)``.

    Each step's posterior noise is drawn when the model reaches it
    (:class:`PosteriorNoiseMessenger`). With ``baseline`` the plate has ``2 size`` rows, the
    last ``size`` on fresh prior noise from the generator ``baseline``: one KV-cached
    decoding run for both.
    """
    handlers: list[PosteriorNoiseMessenger] = []
    scorers: list[TokenScoreMessenger] = []

    def noise(start: int, stop: int) -> ContextManager[Any]:
        posterior_rows = max(0, min(stop, size) - start) if baseline is not None else None
        handler = PosteriorNoiseMessenger(guide, anchor, posterior_rows, baseline_generator=baseline)
        if start < size:
            handlers.append(handler)
        if scorer is None:
            return handler
        scorers.append(scorer(posterior_rows))
        return _entered(handler, scorers[-1])

    rows = 2 * size if baseline is not None else size
    ids = predict(scm, intervened, prompt, rows, noise, anchor=anchor, deterministic=deterministic)
    parts = [h.noise_statistics() for h in handlers]
    stats = {key: torch.cat([part[key] for part in parts], -2) for key in parts[0]} if parts and parts[0] else {}
    scores = None
    if scorer is not None:
        lead = ids.shape[:-1]
        log_p = torch.cat([s.token_log_probs().expand(*lead[:-1], -1, ids.shape[-1]) for s in scorers], -2)
        log_q = torch.cat([s.chain_log_probs().expand(*lead[:-1], -1, ids.shape[-1]) for s in scorers], -2)
        scores = (log_p[..., :size, :], log_p[..., size:, :], log_q)
    return ids[..., :size, :], (ids[..., size:, :] if baseline is not None else None), stats, scores


def _entered(*handlers: ContextManager[Any]) -> chained:
    """All of ``handlers`` at once, the first outermost (entered atomically, not by a generator)."""
    return chained(None, *(functools.partial(_given, handler) for handler in handlers))


def _given(handler: ContextManager[Any], _: Any) -> ContextManager[Any]:
    return handler


def _baseline_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The generator of the baseline's prior noise: its own stream of ``seed``
    (:func:`~pyro_lmscm.seeding.generator`), so the posterior draws do not depend on whether it runs."""
    return generator(seed, "baseline", device)


def _available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (``MemAvailable`` on Linux), if known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None




def _working_bytes_per_row(scm: LanguageModelSCM, prompt_length: int) -> int:
    """Bytes one decoded row holds at its peak: its KV cache over prompt and ``T`` new
    tokens (the factual model's config; another model in a model swap may differ) and about
    eight float32 vectors of ``V`` per step (logits, decoded logits, noise, their sum)."""
    tokens = prompt_length + scm.max_new_tokens
    return scm.lm.cache_bytes_per_token() * tokens + 8 * scm.vocab_size * 4


def auto_chunk_size(
    scm: LanguageModelSCM,
    prompt_length: int,
    baseline: bool = False,
    budget: int | None = None,
    num_samples: int | None = None,
) -> int:
    """The number of posterior draws that ``counterfactual(chunk_size=None)`` decodes at once:
    as many as fit ``budget`` bytes (default :data:`AUTO_CHUNK_BYTES` of the model's device
    type), and at least :data:`~pyro_lmscm.inference.budget.MIN_CHUNK_ROWS` rows (half as
    many draws with ``baseline``). A draw holds its KV cache over the prompt and ``T`` new
    tokens (``scm.lm.cache_bytes_per_token()`` per position, from the model config) and about
    eight float32 vectors of ``V`` per step.

    With ``num_samples``, the draws of one call: the size that splits them into as few chunks
    as the budget allows, all of one size but the last, which is smaller by fewer draws than
    there are chunks (:func:`~pyro_lmscm.inference.budget.even_chunk_size`; 64 draws of
    SmolLM2 fp32 at T = 64 run as 4 x 16, not 17 + 17 + 17 + 13): a call's chunks then
    allocate blocks of the same sizes, which the C heap reuses, where a last, smaller chunk's
    blocks of other sizes left the freed ones in holes and made the peak wander
    (benchmarks/README.md, "Issue 34: chunks of one size").

    It depends only on the model's config and dtype, the device type, ``T``, the prompt
    length, ``baseline`` (each draw then decodes two rows) and ``num_samples``, never on the
    memory free at the time, so that a seeded call draws the same noise in the same chunks on
    every run.
    """
    if budget is None:
        budget = AUTO_CHUNK_BYTES.get(scm.lm.device.type, AUTO_CHUNK_BYTES["cuda"])
    rows = 2 if baseline else 1
    per_draw = _working_bytes_per_row(scm, prompt_length) * rows
    fits = max(MIN_CHUNK_ROWS // rows, budget // per_draw)
    return fits if num_samples is None else even_chunk_size(fits, num_samples)


def _check_memory(scm: LanguageModelSCM, num_samples: int, size: int, prompt_length: int, baseline: bool) -> None:
    """Refuse, before any allocation, a call whose results (ids and noise statistics of every
    draw) and one chunk's working memory would not fit in memory.

    :raises InferenceError: saying how many draws would fit.
    """
    rows = 2 if baseline else 1
    per_draw = scm.max_new_tokens * (8 * rows + 2 * 4)  # int64 ids per row, two float32 statistics
    working = size * rows * _working_bytes_per_row(scm, prompt_length)
    available = _available_bytes(scm.lm.device)
    if available is None or num_samples * per_draw + working <= available:
        return
    fits = max(0, available // 2 - working) // per_draw
    raise InferenceError(
        f"num_samples={num_samples} would hold about {num_samples * per_draw / 2**30:.1f} GiB of results "
        f"({num_samples} draws x {scm.max_new_tokens} steps of ids and noise statistics) plus "
        f"{working / 2**30:.1f} GiB for a chunk of {size} draws, more than the {available / 2**30:.1f} GiB "
        f"available; draw at most about {fits} samples per call, or pass a smaller chunk_size."
    )


def _sized(value: Any) -> bool:
    """Whether ``value`` is a collection with a length and items (a list, a tuple, an array),
    not a one-shot iterator, whose length is unknown."""
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def check_call(owner: str, scm: Any, **flags: Any) -> None:
    """The SCM and the on/off switches of a call: real bools, not ``"no"`` (which is true);
    and no caller's ``pyro.plate`` around it (:func:`~.prediction.check_outside_plates`).
    The entry check of :func:`counterfactual`, :func:`counterfactuals` and
    :func:`~pyro_lmscm.inference.compare.compare_abduction`.

    :raises InferenceError: naming the argument, or ``owner`` and the plates.
    """
    from ..models.scm import as_scm

    as_scm(scm)
    for name, value in flags.items():
        as_bool(value, name)
    check_outside_plates(owner)


@locked
def counterfactual(
    scm: LanguageModelSCM,
    prompt: torch.Tensor,
    observed: torch.Tensor | None = None,
    intervention: Intervention | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    margin: float = 0.0,
    chunk_size: int | None = None,
    baseline: bool = False,
    deterministic: bool = False,
    scores: bool = False,
) -> CounterfactualResult:
    r"""What would ``observed`` have been under ``intervention``?

    1. *Abduction*: one teacher-forced pass (or, for a sampled observation, the logits that
       sampled it) gives the factual logits, from which :class:`HindsightGumbelGuide` gives
       each step's exact posterior of the noise
       :math:`u_t \mid (\text{prompt}, \text{observed})`.
    2. *Action*: ``poutine.do(scm.model, data=...)`` run inside the intervention's handlers
       (:func:`~pyro_lmscm.interventions.ops.intervene`).
    3. *Prediction*: :func:`~pyro_lmscm.inference.prediction.predict` decodes the intervened
       model for ``num_samples`` rows under a plate, while
       :class:`~pyro_lmscm.inference.PosteriorNoiseMessenger` draws each :math:`u_t` from its
       posterior when the step is reached (no trace of the noise is kept).

    The cost is one teacher-forced forward pass (abduction), then KV-cached decoding runs of
    ``num_samples`` rows in all, in chunks (prediction), with each step's posterior noise
    drawn when that step is decoded: :math:`O(\text{chunk} \cdot V)` noise at a time.

    With ``baseline=True`` the result also holds the interventional (rung 2) baseline:
    the same intervened model on fresh prior noise, decoded in the same batched run as the
    counterfactuals (rows ``num_samples`` to ``2 num_samples`` of one decoding run). That is a
    second query, so it is off by default: on a CPU it costs what decoding twice the rows
    costs.

    :param scm: the SCM.
    :param prompt: prompt ids ``(L,)``.
    :param observed: observed continuation ids ``(n,)``; ``None`` samples one from the
        factual model first.
    :param intervention: e.g. ``{"mechanism": "steer"}``, ``{"prompt": ids}``,
        ``{"w_3": 42}``, ``{"exclude_3": "factual"}`` (anything but the observed token at
        step 3: the runner-up of the same noise there); ``None`` or ``{}`` is the null
        intervention.
    :param num_samples: number of posterior draws.
    :param seed: seeds torch's generator for this call only (the global state is restored).
    :param margin: see :class:`HindsightGumbelGuide`.
    :param chunk_size: decode the posterior draws in chunks of at most this many (each
        chunk: one KV-cached decoding run, its noise drawn step by step), so that peak
        memory stays bounded: a chunk holds a KV cache per row and a few float32 vectors of
        :math:`V` per row and step. ``None`` (the default) sizes the chunks automatically
        (:func:`auto_chunk_size`: about :data:`AUTO_CHUNK_BYTES` per chunk, a fixed budget
        per device type). With a ``seed`` the result is reproducible for a given
        ``chunk_size``: chunks draw the noise one after another from the same generator, so
        another ``chunk_size`` gives other (equally distributed) draws, and ``None`` equals
        ``chunk_size=auto_chunk_size(scm, len(prompt), baseline, num_samples=num_samples)``
        (chunks of one size).
    :param baseline: also decode the interventional baseline
        (:attr:`CounterfactualResult.interventional_ids`).
    :param deterministic: decode every draw alone (see :func:`~pyro_lmscm.inference.prediction.predict`), so that in
        bfloat16 a draw's counterfactual does not depend on the other draws of its batch;
        the noise, hence the distribution, is the same.
    :param scores: also score the draws while they are decoded
        (:class:`~pyro_lmscm.inference.TokenScoreMessenger`): their token log-probabilities
        under the intervention and the counterfactuals' exact chain
        (:attr:`CounterfactualResult.counterfactual_scores`, ``interventional_scores``,
        ``counterfactual_log_q``, ``exact``), without a teacher-forced pass of the draws.
    :raises ObservationError, AbductionError, InterventionError: on bad input.
    :raises InferenceError: for a bad setting, or a call inside a caller's ``pyro.plate``
        (the draws are the call's own plate).

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=6)
    >>> result = counterfactual(scm, torch.tensor([1, 2]), intervention={}, num_samples=3, seed=0)
    >>> bool((result.counterfactual_ids[:, : len(result.factual_ids)] == result.factual_ids).all())
    True
    """
    check_call("counterfactual()", scm, baseline=baseline, deterministic=deterministic, scores=scores)
    num_samples = as_int(num_samples, "num_samples", minimum=1)
    if chunk_size is not None:
        chunk_size = as_int(chunk_size, "chunk_size", minimum=1)
    margin = as_real(margin, "margin", minimum=0.0)
    prompt = scm.check_prompt(prompt, single=True)
    if observed is not None:
        observed = scm.check_observed(observed, single=True)
    return _counterfactuals(
        scm, [prompt], None if observed is None else [observed], intervention, num_samples, seed, margin,
        chunk_size, baseline, deterministic, scores,
    )[0]


def _scorer(
    scm: LanguageModelSCM, data: dict[str, torch.Tensor], exacts: list[ExactCounterfactual] | None
) -> Callable[[int | None], TokenScoreMessenger] | None:
    """The :class:`TokenScoreMessenger` factory of a prediction with ``scores`` (``exacts``
    given), else ``None``."""
    if exacts is None:
        return None
    return lambda posterior_rows: TokenScoreMessenger(scm, data, exacts, posterior_rows=posterior_rows)


def _row(value: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if value is None else value[i]


def _joined_scores(
    chunks: Sequence[tuple[torch.Tensor, ...] | None], baseline: bool
) -> dict[str, torch.Tensor | None]:
    """The chunks' scores (:func:`_predict`) joined along the draws: the result's fields."""
    if not chunks or chunks[0] is None:
        return {}
    parts = [chunk for chunk in chunks if chunk is not None]
    return {
        "counterfactual_scores": torch.cat([part[0] for part in parts], -2),
        "interventional_scores": torch.cat([part[1] for part in parts], -2) if baseline else None,
        "counterfactual_log_q": torch.cat([part[2] for part in parts], -2),
    }


#: The plate of the strings of :func:`counterfactuals` (outside the plate of draws).
STRINGS = "__strings"


def _same_data(datas: Sequence[dict[str, torch.Tensor]]) -> bool:
    first = datas[0] if isinstance(datas[0], Action) else Action(datas[0])
    return all(first.same(d) for d in datas[1:])


@locked
def counterfactuals(
    scm: LanguageModelSCM,
    prompts: Sequence[torch.Tensor],
    observed: Sequence[torch.Tensor] | None = None,
    intervention: Intervention | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    margin: float = 0.0,
    baseline: bool = False,
    scores: bool = False,
    chunk_size: int | None = None,
) -> list[CounterfactualResult]:
    r""":func:`counterfactual` of several strings at once, one :class:`CounterfactualResult` each.

    The strings run as one batch: their prompts left-padded
    (:func:`~pyro_lmscm.lm.left_pad`), the factual strings (with ``observed=None``) sampled
    in one KV-cached run of ``scm.model``, the abduction of all observations by one
    :class:`HindsightGumbelGuide` whose batch dim is the strings, and the counterfactuals
    and baselines of every string decoded in one run of the intervened model (``S x
    num_samples`` rows, or twice that with ``baseline``) under the plate of draws: the same
    handlers as :func:`counterfactual`, for ``S`` strings in one pass. On a CPU a decoding
    step of 64 rows costs about three of one row (SmolLM2), which is what batching gains.

    With a ``seed`` the results are reproducible for the same list of strings. Another
    grouping of the strings draws other noise (the generator runs through the group), and in
    bfloat16 rounds the logits differently with the batch, so it gives other, equally
    distributed, draws.

    :param prompts: ``S`` prompts ``(L_i,)``.
    :param num_samples: posterior draws per string; ``0`` only samples (or takes) the
        factual strings and abducts nothing.
    :param observed: ``S`` observations ``(n,)`` of one length (the batch holds one
        observed horizon), or ``None`` to sample each from the factual model (``T`` steps;
        a string ends at its end of sequence).
    :param intervention: one intervention for every string; it may not depend on the
        observation (``exclude_t="factual"`` does: use :func:`counterfactual`).
    :param scores: as :func:`counterfactual`, for every string.
    :param chunk_size: draws of each string decoded in one run (``S x chunk_size`` rows);
        ``None``: as many as fit :data:`AUTO_CHUNK_BYTES` for all ``S`` strings
        (:func:`auto_chunk_size` divided by ``S``), evened out over ``num_samples``
        (:func:`~pyro_lmscm.inference.budget.even_chunk_size`).
    :raises ObservationError, AbductionError, InterventionError, InferenceError: on bad input
        (InferenceError also for a call inside a caller's ``pyro.plate``).

    >>> scm = LanguageModelSCM(tiny_lm, max_new_tokens=4)
    >>> results = counterfactuals(scm, [torch.tensor([1, 2]), torch.tensor([3])], num_samples=2, seed=0)
    >>> [tuple(r.counterfactual_ids.shape) for r in results]
    [(2, 4), (2, 4)]
    """
    check_call("counterfactuals()", scm, baseline=baseline, scores=scores)
    num_samples = as_int(num_samples, "num_samples", minimum=0)
    if chunk_size is not None:
        chunk_size = as_int(chunk_size, "chunk_size", minimum=1)
    margin = as_real(margin, "margin", minimum=0.0)
    if isinstance(prompts, (torch.Tensor, str, bytes)) or not _sized(prompts) or not len(prompts):
        raise InferenceError(
            "`prompts` must be a non-empty list of prompts (L_i,); for one string use counterfactual(), "
            f"got {type(prompts).__name__}."
        )
    singles = [scm.check_prompt(prompt, single=True) for prompt in prompts]
    if observed is not None:
        if isinstance(observed, (str, bytes)) or not _sized(observed):
            raise InferenceError(
                f"`observed` must be None or a list of {len(singles)} observations (n,), got "
                f"{type(observed).__name__} {observed!r:.80}."
            )
        if len(observed) != len(singles):
            raise InferenceError(f"{len(singles)} prompts but {len(observed)} observations.")
        observed = [scm.check_observed(obs, single=True) for obs in observed]
        if len({obs.shape[-1] for obs in observed}) != 1:
            raise InferenceError(
                "the observations of one batch must have one length (one observed horizon); "
                f"got lengths {sorted({obs.shape[-1] for obs in observed})}. Batch them by length."
            )
    return _counterfactuals(
        scm, singles, observed, intervention, num_samples, seed, margin, chunk_size, baseline, False, scores
    )


def _counterfactuals(
    scm: LanguageModelSCM,
    singles: list[torch.Tensor],
    observed: list[torch.Tensor] | None,
    intervention: Intervention | None,
    num_samples: int,
    seed: int | None,
    margin: float,
    chunk_size: int | None,
    baseline: bool,
    deterministic: bool,
    scores: bool,
) -> list[CounterfactualResult]:
    """The one counterfactual core, of :func:`counterfactual` (a batch of one string) and
    :func:`counterfactuals`: sample (or take) the factual strings, abduct them in one guide,
    then decode the draws of every string in chunks of one intervened run each.

    :param singles: ``S`` checked prompts ``(L_i,)``.
    :param observed: ``S`` checked observations ``(n,)`` of one length, or ``None``.
    :param chunk_size: draws per string in one chunk; ``None``: :func:`auto_chunk_size` shared
        by the ``S`` strings.
    """
    S = len(singles)
    batch = scm.check_prompt(left_pad([p.cpu() for p in singles]).to(scm.lm.device))  # (S, L)
    if chunk_size is None:  # the budget's draws per string, in chunks of one size
        chunk_size = even_chunk_size(auto_chunk_size(scm, batch.shape[-1], baseline) // S, num_samples)
    size = max(1, min(chunk_size, num_samples))
    _check_memory(scm, S * num_samples, S * size, batch.shape[-1], baseline)
    if observed is not None:
        datas = [as_do_data(scm, intervention, obs) for obs in observed]
    else:
        check_intervention(scm, intervention)  # before a factual string is sampled
    # one string runs without the strings' dim, as one observation (n,): the guide then also
    # keeps the per-draw noise statistics
    alone = S == 1
    with seeded(seed):
        raw_logits = None
        if observed is None:
            rows, raw_logits, lengths = sample_factuals(scm, batch[0] if alone else batch)  # (S?, h), (S?, h, V)
            factual = [rows[: lengths[0]]] if alone else [rows[i, : lengths[i]] for i in range(S)]
            datas = [as_do_data(scm, intervention, obs) for obs in factual]
        else:
            lengths, factual = [obs.shape[-1] for obs in observed], observed
            rows = observed[0] if alone else torch.stack(observed)
        if not _same_data(datas):
            raise InferenceError(
                "the intervention depends on each observation (exclude_t='factual'); use counterfactual() per string."
            )
        if raw_logits is not None and not alone:
            raw_logits = raw_logits[:, None]  # (S, 1, h, V)
        guide = HindsightGumbelGuide(scm, rows if alone else rows[:, None], margin=margin, raw_logits=raw_logits)
        prompt = batch[0] if alone else batch[:, None]  # (S, 1, L): the draws are the last batch dim
        anchor = guide.anchor(prompt)  # the factual logits of the abduction, computed once
        # the strings are a plate (dim -2) outside the plate of draws: an intervened prompt
        # shared by the strings still gives every string its own rows
        intervened = intervene(scm, datas[0])
        if not alone:
            intervened = pyro.plate(STRINGS, S, dim=-2)(intervened)
        baseline_noise = _baseline_generator(seed, scm.lm.device) if baseline else None
        exacts = None
        if scores:
            raw = anchor.logits.reshape(S, *anchor.logits.shape[-2:])  # (S, n, V): the logits the abduction used
            exacts = [
                ExactCounterfactual(scm, singles[i], factual[i], datas[i], raw_logits=raw[i, : lengths[i]])
                for i in range(S)
            ]
        scorer = _scorer(scm, datas[0], exacts)
        chunks = [
            _predict(
                scm, guide, anchor, intervened, prompt, min(size, num_samples - start), baseline_noise, deterministic,
                scorer,
            )
            for start in range(0, num_samples, size)
        ]
        empty = torch.zeros(0, scm.max_new_tokens, dtype=torch.long, device=batch.device)
        empty = empty.expand(*(() if alone else (S,)), 0, scm.max_new_tokens)
        counterfactual_ids = torch.cat([empty, *[chunk[0] for chunk in chunks]], dim=-2)  # (S?, num_samples, T)
        baselines = [c[1] for c in chunks if c[1] is not None]
        interventional_ids = torch.cat([empty, *baselines], dim=-2) if baseline else None
        stats = [chunk[2] for chunk in chunks if chunk[2]]
        noise_stats = {key: torch.cat([part[key] for part in stats], -2) for key in stats[0]} if stats else {}
        log_prob = guide.log_prob_observed(anchor).reshape(S)
        scored = _joined_scores([chunk[3] for chunk in chunks], baseline)
        if alone:  # the strings' dim, of one
            counterfactual_ids = counterfactual_ids[None]
            interventional_ids = None if interventional_ids is None else interventional_ids[None]
            scored = {key: None if value is None else value[None] for key, value in scored.items()}
            noise_stats = {key: value[None] for key, value in noise_stats.items()}
            raw_logits = None if raw_logits is None else raw_logits[None, None]
    return [
        CounterfactualResult(
            scm=scm,
            prompt_ids=singles[i],
            factual_ids=factual[i],
            counterfactual_ids=counterfactual_ids[i],  # (num_samples, T)
            interventional_ids=_row(interventional_ids, i),
            intervention=datas[i],
            log_prob_factual=float(log_prob[i]),
            noise_stats={key: value[i] for key, value in noise_stats.items()},
            factual_logits=None if raw_logits is None else raw_logits[i, 0, : lengths[i]],
            exact=None if exacts is None else exacts[i],
            counterfactual_scores=_row(scored.get("counterfactual_scores"), i),
            interventional_scores=_row(scored.get("interventional_scores"), i),
            counterfactual_log_q=_row(scored.get("counterfactual_log_q"), i),
        )
        for i in range(S)
    ]
