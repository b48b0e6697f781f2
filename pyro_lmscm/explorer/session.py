"""What the explorer computes for one request, independent of the user interface.

:class:`Explorer` holds one language model and the mechanisms built for it so far (a steering
vector or a ROME edit is computed once per setting, then reused). :meth:`Explorer.run` takes
an :class:`ExploreRequest` -- a prompt, an observed continuation (or none: sample one), an
intervention spec (the mapping of :func:`~pyro_lmscm.interventions.spec.parse_intervention`)
and settings -- and returns an :class:`Exploration`: the factual string, the sampled
counterfactuals with the exact conditional probability of each of their tokens, the exact
P(unchanged) with its bounds over other mechanisms
(:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`), the law of the first divergence,
the most probable counterfactual, the attribution of the effect to the mechanism's parts
(:func:`~pyro_lmscm.inference.attribute`) and, on request, the interventional baseline.
Everything goes through the library's one path: :func:`~pyro_lmscm.counterfactual`,
:func:`~pyro_lmscm.inference.exact_counterfactual` and :func:`~pyro_lmscm.inference.attribute`.

The prompt is text, or a chat (a list of ``{"role", "content"}`` messages, e.g. a system
prompt and a user turn): the observed string is then the assistant's reply, ended by the
end-of-turn token (:meth:`~pyro_lmscm.lm.HFLanguageModel.encode_reply`), and the intervention
may edit the conversation (``{"system": TEXT}``, ``{"user": TEXT}``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Union

import torch

from ..defaults import DEFAULTS
from ..errors import DecodingError, InferenceError, InterventionError, LMSCMError, ObservationError
from ..interventions.spec import describe
from ..metrics import first_divergence, trim_after_end
from ..validation import as_bool, as_int, as_lm, as_seed

if TYPE_CHECKING:
    from ..inference.attribute import Attribution
    from ..inference.bounds import CounterfactualBounds
    from ..lm import HFLanguageModel
    from ..models.mechanism import Mechanism

__all__ = ["ExploreRequest", "Exploration", "Explorer", "WorldRow"]

#: The most posterior draws one request may ask for.
MAX_DRAWS = 256

#: Attribution to the mechanism's parts: exact Shapley values over all subsets up to this many
#: parts (2^k teacher-forced passes), else a permutation estimate over
#: :data:`ATTRIBUTE_PERMUTATIONS` seeded orders (at most k passes each), with standard errors.
ATTRIBUTE_MAX_EXACT_PARTS = 8
ATTRIBUTE_PERMUTATIONS = 8

#: progress callback: (fraction done, what is running)
Progress = Callable[[float, str], None]

#: A prompt: text, or chat messages ``[{"role": ..., "content": ...}, ...]``.
Prompt = Union[str, Sequence[Mapping[str, Any]]]


@dataclass
class ExploreRequest:
    """One run of the explorer.

    :ivar prompt: the prompt text (non-empty), or chat messages (a system prompt, a user
        turn, ...): the observation is then the assistant's reply.
    :ivar observed: the observed continuation (the assistant's reply for a chat); ``None`` or
        ``""`` samples one from the factual model (seeded by ``seed``).
    :ivar observed_ids: the observation's token ids, when the caller holds them (a sampled
        string whose text may not re-encode to the same ids); they win over ``observed``.
    :ivar intervention: a spec mapping (``{"steer": "female:1.0"}``, ``{"exclude_3":
        "factual"}``, ``{"rome": {...}}``, ``{"prompt": "..."}``, ``{"model": PATH}``; for a
        chat ``{"system": "..."}`` or ``{"user": "..."}``).
    :ivar num_samples: posterior draws.
    :ivar max_new_tokens: steps of the SCM; ``None``: the observation's length
        (:data:`~pyro_lmscm.defaults.DEFAULTS` ``.max_new_tokens`` when one is sampled).
    :ivar top_k: the decoding's top-k (``None``: none).
    :ivar baseline: also the interventional baseline (fresh noise, same intervened model).
    :ivar num_beams: beams of the search for the most probable counterfactual.
    :ivar attribute: also attribute the effect to the parts of the selected mechanism
        (:func:`~pyro_lmscm.inference.attribute`, ``by="layer"``).
    """

    prompt: Prompt
    observed: str | None = None
    observed_ids: list[int] | None = None
    intervention: Mapping[str, Any] = field(default_factory=dict)
    num_samples: int = DEFAULTS.num_samples
    seed: int = DEFAULTS.seed
    max_new_tokens: int | None = None
    top_k: int | None = DEFAULTS.top_k
    baseline: bool = False
    num_beams: int = 4
    attribute: bool = True

    def __post_init__(self) -> None:
        owner = "ExploreRequest"
        if not isinstance(self.prompt, str):
            from ..lm import check_messages, is_messages

            if not isinstance(self.prompt, (list, tuple)) or not self.prompt or not is_messages(self.prompt):
                raise ObservationError(
                    f"{owner}: `prompt` must be a str or a list of chat messages [{{'role': ..., 'content': ...}}], "
                    f"got {type(self.prompt).__name__} {self.prompt!r:.80}."
                )
            check_messages(self.prompt)  # a ChatError naming the message and field
        if self.observed is not None and not isinstance(self.observed, str):
            raise ObservationError(
                f"{owner}: `observed` must be a str or None, got {type(self.observed).__name__} {self.observed!r:.80}."
            )
        if not isinstance(self.intervention, Mapping):
            raise InterventionError(
                f"{owner}: `intervention` must be a spec mapping such as {{'steer': 'female:1.0'}} or {{'w_0': 3}}, "
                f"got {type(self.intervention).__name__} {self.intervention!r:.80}; a spec string parses with "
                "pyro_lmscm.interventions.spec.read_spec."
            )
        as_int(self.num_samples, "num_samples", minimum=1, maximum=MAX_DRAWS, error=InferenceError, owner=owner)
        as_seed(self.seed, error=InferenceError)
        if self.max_new_tokens is not None:  # None: the observation's length; 0 is no length
            as_int(self.max_new_tokens, "max_new_tokens", minimum=1, error=InferenceError, owner=owner)
        if self.top_k is not None:
            as_int(self.top_k, "top_k", minimum=1, error=DecodingError, owner=owner)
        as_bool(self.baseline, "baseline", owner=owner)
        as_int(self.num_beams, "num_beams", minimum=1, error=InferenceError, owner=owner)
        as_bool(self.attribute, "attribute", owner=owner)

    @property
    def chat(self) -> bool:
        """Whether the prompt is a chat (the observation is the assistant's reply)."""
        return not isinstance(self.prompt, str)


@dataclass
class WorldRow:
    """One string of a world, aligned step by step with the factual string.

    :ivar ids: its tokens (cut after the end of sequence).
    :ivar tokens: their texts, cut at character boundaries (``HFLanguageModel.token_texts``).
    :ivar probs: the exact conditional probability q(s_t | s_<t) of each token under the
        counterfactual distribution, or ``None`` (the interventional baseline).
    :ivar count: how many draws gave this string.
    :ivar first_divergence: the first step where it differs from the factual string
        (``None``: it does not, over the observed span).
    :ivar log_prob: log of its exact counterfactual probability, where known.
    """

    ids: list[int]
    tokens: list[str]
    probs: list[float] | None
    count: int = 1
    first_divergence: int | None = None
    log_prob: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class Exploration:
    """What :meth:`Explorer.run` found (see the module docstring).

    :ivar prob_unchanged: exact P(counterfactual = factual over the observed span), or
        ``None`` with :attr:`exact_error` when the exact queries do not apply.
    :ivar first_divergence: exact P(first divergence at step t) for t < n, then
        P(unchanged) last.
    :ivar expected_first_divergence: its mean (the unchanged string counts as n).
    :ivar bounds: the same queries over counterfactually stable mechanisms and over all
        mechanisms (:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`).
    :ivar attribution: the effect attributed to the mechanism's parts, where it has several.
    :ivar attribution_note: why there is no attribution (no mechanism, one indivisible part, ...).
    :ivar pending: what :meth:`Explorer.stream` has still to compute (``None``: nothing).
    """

    prompt_ids: list[int]
    factual: WorldRow
    counterfactuals: list[WorldRow]
    num_samples: int
    interventional: list[WorldRow] | None
    mode: WorldRow | None
    prob_unchanged: float | None
    first_divergence: list[float] | None
    expected_first_divergence: float | None
    exact_error: str | None
    description: str
    bounds: CounterfactualBounds | None = None
    attribution: Attribution | None = None
    attribution_note: str | None = None
    pending: str | None = None


def _first_divergence(factual: list[int], ids: list[int]) -> int | None:
    """The first step where ``ids`` differs from ``factual`` over the factual span (``None``:
    it does not; going on past the factual string is no change)."""
    return first_divergence(factual, ids[: len(factual)])


class Explorer:
    """The explorer's computations on one language model (see the module docstring).

    :param lm: the factual language model.
    """

    def __init__(self, lm: HFLanguageModel) -> None:
        self.lm = as_lm(lm, owner="Explorer")
        self._mechanisms: dict[tuple[str, str], Mechanism] = {}

    def token_texts(self, ids: list[int]) -> list[str]:
        """Texts of ``ids`` for display; an end of sequence shows as ``⏎``."""
        eos = self.lm.eos_token_ids
        pieces = self.lm.token_texts([i for i in ids if i not in eos]) if ids else []
        out, k = [], 0
        for i in ids:
            if i in eos:
                out.append("⏎")
            else:
                out.append(pieces[k])
                k += 1
        return out

    def _spec(self, intervention: Mapping[str, Any], messages: Any = None):
        """:func:`parse_intervention` of ``intervention``, with mechanisms built once per
        setting (computing a steering vector or a ROME edit takes seconds)."""
        from ..interventions.spec import parse_intervention

        return parse_intervention(intervention, self.lm, messages=messages, cache=self._mechanisms)

    def sample(
        self,
        prompt: Prompt,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        seed: int = DEFAULTS.seed,
        top_k: int | None = DEFAULTS.top_k,
    ) -> list[int]:
        """A continuation of ``prompt`` (text, or chat messages: an assistant reply) sampled
        from the factual model."""
        from .. import LanguageModelSCM
        from ..inference.counterfactual import sample_factual
        from ..models import Decoding
        from ..runtime import compute_scope
        from ..seeding import seeded

        prompt_ids = self._prompt(prompt)
        scm = LanguageModelSCM(self.lm, as_int(max_new_tokens, "max_new_tokens", minimum=1), Decoding(top_k=top_k))
        with seeded(seed), compute_scope(self.lm):
            return sample_factual(scm, prompt_ids)[0].tolist()

    def _prompt(self, prompt: Prompt) -> torch.Tensor:
        if isinstance(prompt, str) and not prompt.strip():
            raise ObservationError("the prompt is empty: type a prompt for the model to continue.")
        if not isinstance(prompt, str):
            if not any(isinstance(m, Mapping) and str(m.get("content", "")).strip() for m in prompt):
                raise ObservationError("the chat is empty: type a user turn for the assistant to answer.")
        return self.lm.encode(prompt)

    def run(self, request: ExploreRequest, progress: Progress | None = None) -> Exploration:
        """Abduction, action, prediction and the exact queries for ``request``: the last
        snapshot of :meth:`stream`.

        :raises LMSCMError: on bad input (an empty prompt, a force of several tokens, a
            model folder that does not exist, ...).
        """
        *_, last = self.stream(request, progress)
        return last

    def stream(self, request: ExploreRequest, progress: Progress | None = None) -> Iterator[Exploration]:
        """:meth:`run` in three snapshots, as soon as each is known: the sampled
        counterfactuals (seconds), then with the exact probabilities, then with the most
        probable counterfactual (a beam search, the slowest part). :attr:`Exploration.pending`
        says what is still to come.

        :raises LMSCMError: on bad input, before the first snapshot.
        """
        from .. import LanguageModelSCM, counterfactual
        from ..inference import exact_counterfactual
        from ..inference.exact import expected_first_divergence
        from ..models import Decoding
        from ..runtime import compute_scope

        report = progress or (lambda fraction, what: None)
        if not isinstance(request, ExploreRequest):
            raise ObservationError(f"Explorer.run takes an ExploreRequest, got {type(request).__name__}.")
        request = replace(request)  # checked again: its fields may have been set since
        prompt_ids = self._prompt(request.prompt)
        given = request.observed_ids
        observed: torch.Tensor | None
        if given is not None and not (isinstance(given, (list, tuple)) and not given):
            observed = self.lm.check_ids(given, "observed_ids")
            if observed.dim() != 1 or not observed.numel():
                raise ObservationError(
                    f"`observed_ids` must be one non-empty sequence of token ids, got shape {tuple(observed.shape)}."
                )
        elif request.observed and request.observed.strip():
            observed = self.lm.encode_reply(request.observed) if request.chat else self.lm.encode(request.observed)
        else:
            observed = None
        num_samples, num_beams = int(request.num_samples), int(request.num_beams)  # checked by ExploreRequest
        if request.max_new_tokens is not None:
            steps = int(request.max_new_tokens)
        else:
            steps = int(observed.shape[-1]) if observed is not None else DEFAULTS.max_new_tokens
        # each computing block in compute_scope, left before each snapshot is yielded (the
        # generator may wait there for the page, and the model's linears are patched inside)
        with compute_scope(self.lm):
            report(0.05, "building the intervention")
            spec = self._spec(request.intervention, messages=request.prompt if request.chat else None)
            scm = LanguageModelSCM(self.lm, steps, Decoding(top_k=request.top_k), mechanisms=spec.mechanisms)
            report(0.2, f"abducting the noise and replaying {num_samples} draws")
            result = counterfactual(
                scm, prompt_ids, observed, spec.intervention, num_samples=num_samples, seed=request.seed,
                baseline=request.baseline,
            )
        factual_ids = result.factual_ids.tolist()
        eos = self.lm.eos_token_ids
        counts = Counter(tuple(trim_after_end(row, eos)) for row in result.counterfactual_ids.tolist())
        unique = [list(ids) for ids in sorted(counts, key=lambda ids: (-counts[ids], ids))]
        interventional = None
        if result.interventional_ids is not None:
            base = Counter(tuple(trim_after_end(row, eos)) for row in result.interventional_ids.tolist())
            interventional = [
                self._row(list(ids), factual_ids, count=base[ids])
                for ids in sorted(base, key=lambda ids: (-base[ids], ids))
            ]
        snapshot = Exploration(
            prompt_ids=prompt_ids.tolist(),
            factual=WorldRow(factual_ids, self.token_texts(factual_ids), None),
            counterfactuals=[self._row(ids, factual_ids, count=counts[tuple(ids)]) for ids in unique],
            num_samples=num_samples,
            interventional=interventional,
            mode=None,
            prob_unchanged=None,
            first_divergence=None,
            expected_first_divergence=None,
            exact_error=None,
            description=describe(request.intervention),  # (interventions.spec: the one rendering)
            pending="the exact probabilities",
        )
        yield snapshot
        report(0.5, "exact probabilities")
        try:
            with compute_scope(self.lm):
                exact = exact_counterfactual(scm, prompt_ids, result.factual_ids, result.intervention)
                law = exact.first_divergence()
                bounds = exact.bounds()
                padded = result.counterfactual_ids.new_full((len(unique), steps), self.lm.pad_token_id)
                for i, ids in enumerate(unique):
                    padded[i, : len(ids)] = torch.tensor(ids)
                token_log = exact.token_log_probs(padded)  # (unique, steps): 0 after the end
            parts = self._parts(spec, request.attribute)
            snapshot = replace(
                snapshot,
                counterfactuals=[
                    self._row(ids, factual_ids, token_log[i], counts[tuple(ids)]) for i, ids in enumerate(unique)
                ],
                prob_unchanged=float(law[-1]),
                first_divergence=law.tolist(),
                expected_first_divergence=expected_first_divergence(law),
                bounds=bounds,
                attribution_note=parts if isinstance(parts, str) else None,
                pending="the most probable counterfactual",
            )
            yield snapshot
            report(0.7, "the most probable counterfactual")
            with compute_scope(self.lm):
                mode_ids, mode_log_prob = exact.mode(num_beams=num_beams)
                mode = self._row(mode_ids.tolist(), factual_ids, exact.token_log_probs(mode_ids)[0])
            snapshot = replace(snapshot, mode=replace(mode, log_prob=mode_log_prob), pending=None)
            if isinstance(parts, str):
                yield snapshot
            else:
                what = f"{parts} parts" if parts else "layers"
                yield replace(snapshot, pending=f"the attribution to the mechanism's {what}")
                report(0.85, f"attributing the effect to the mechanism's {what}")
                yield self._attribute(snapshot, scm, prompt_ids, result)
        except LMSCMError as error:  # e.g. an observation outside the top-k support
            yield replace(snapshot, exact_error=str(error), pending=None)
        report(1.0, "done")

    def _parts(self, spec: Any, wanted: bool) -> int | str:
        """How many parts the selected mechanism has (a :class:`~pyro_lmscm.interventions.ModelSwap`
        is split later, as its weight difference), or why it has none to attribute to."""
        from ..interventions.model_swap import ModelSwap
        from ..models.sites import MECHANISM

        if not wanted:
            return "attribution to the mechanism's parts is off (Settings)."
        name = spec.intervention.get(MECHANISM)
        if name is None:
            return "the intervention selects no mechanism, so there are no parts to attribute its effect to."
        mechanism = spec.mechanisms[name]
        if isinstance(mechanism, ModelSwap):
            return 0  # its layers, known once the weight difference is computed
        parts = mechanism.parts()
        if len(parts) == 1:
            return (f"the mechanism {type(mechanism).__name__} is one indivisible part, so its whole effect is its "
                    "only part's.")
        return len(parts)

    def _attribute(self, snapshot: Exploration, scm: Any, prompt_ids: torch.Tensor, result: Any) -> Exploration:
        """``snapshot`` with the attribution of the effect to the mechanism's parts (or the
        reason why there is none: e.g. two models of different architectures)."""
        from ..inference import attribute
        from ..inference.attribute import Attribution
        from ..runtime import compute_scope

        try:
            with compute_scope(self.lm):
                attribution = attribute(
                    scm, prompt_ids, result.factual_ids, result.intervention, by="layer",
                    max_exact_parts=ATTRIBUTE_MAX_EXACT_PARTS, num_permutations=ATTRIBUTE_PERMUTATIONS,
                )
        except LMSCMError as error:
            return replace(snapshot, attribution_note=f"no attribution to parts: {error}", pending=None)
        assert isinstance(attribution, Attribution)  # by="layer"
        if len(attribution.parts) == 1:
            return replace(snapshot, attribution_note="the mechanism is one indivisible part.", pending=None)
        return replace(snapshot, attribution=attribution, pending=None)

    def _row(self, ids: list[int], factual_ids: list[int], token_log: torch.Tensor | None = None,
             count: int = 1) -> WorldRow:
        """The row of the string ``ids`` (cut after its end), with its exact token
        log-probabilities ``token_log`` ``(T,)`` where known."""
        ids = trim_after_end(ids, self.lm.eos_token_ids)
        return WorldRow(
            ids, self.token_texts(ids),
            None if token_log is None else token_log[: len(ids)].exp().tolist(), count,
            _first_divergence(factual_ids, ids),
            None if token_log is None else float(token_log.sum()),
        )
