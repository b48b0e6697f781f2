r"""One model, many strings: the per-string work of a study.

A :class:`StudyWorker` holds one language model, the SCM with the study's intervention and
the attribute check. :meth:`StudyWorker.process` turns one corpus item into one record:

1. the factual string: the given continuation (cut to ``max_new_tokens``) or a sample from
   the factual model;
2. :func:`~pyro_lmscm.counterfactual`: ``num_samples`` posterior draws of the noise,
   replayed through the intervened model (counterfactuals), and as many fresh-noise
   draws of the intervened model (the interventional baseline);
3. per draw (cut to the factual string's length when that has no end of sequence: the
   observation says nothing beyond it): changed or not, first divergence, token and character edit distances, common
   prefix, per-token and total log-probabilities under the factual mechanism
   (:func:`~pyro_lmscm.inference.scoring.ragged_token_log_probs`) and under the intervened one
   (recorded while the draw was decoded, :class:`~pyro_lmscm.inference.TokenScoreMessenger`),
   the exact per-token counterfactual probabilities, and the attribute check.

With ``batch_size=1`` everything random in step 1 and 2 is seeded by :func:`string_seed`
of the study seed and the string's index alone, and each string runs in its own batches.
With ``batch_size=B > 1`` (:meth:`StudyWorker.process_group`) the strings run in blocks of
``B`` consecutive corpus indices, each block as one batch seeded by :func:`batch_seed` of
the study seed, its first index and ``B``: the factual strings of the block are sampled in
one decoding run, the counterfactuals and baselines of all its strings are decoded in
another (:func:`~pyro_lmscm.inference.counterfactuals`, prompts left-padded), and the exact
metrics and scores of all its strings run in shared teacher-forced passes, each distinct
(string, row) scored once (:meth:`StudyWorker._complete`, as for one string). The runner
and the Ray backend cut work only at block boundaries, so in both cases a record does not
depend on sharding, resuming or which worker ran it; it does depend on ``batch_size``
(another grouping draws other, equally distributed noise, and bfloat16 may round with
the batch).

Every record's exact metrics carry their bounds over mechanisms (:data:`BOUNDS_KEYS`,
:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`), from the same teacher-forced pass
as P(unchanged) (:func:`~pyro_lmscm.inference.exact.observed_bounds`).

With ``exact_only`` a record holds the exact metrics alone (no draws): P(unchanged), the
first-divergence law and its mean, their bounds, and the most probable counterfactual
(:func:`~pyro_lmscm.inference.most_probable`, :data:`MODE_BEAMS` beams) with its
log-probability and its edit distances to the factual string.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from pyro.poutine.messenger import Messenger

from ..errors import LMSCMError
from ..inference.scoring import ragged_token_log_probs
from ..metrics import (
    char_edit_distance,
    common_prefix_length,
    first_divergence,
    normalized_char_edit_distance,
    normalized_token_edit_distance,
    token_edit_distance,
    trim_after_end,
)
from ..runtime import compute_scope
from .attribute import make_attribute
from .config import StudyConfig, StudyError
from .corpus import CorpusItem
from .records import ATTRIBUTION_VALUES, BOUNDS_KEYS

if TYPE_CHECKING:
    from ..inference.bounds import CounterfactualBounds
    from ..lm import HFLanguageModel
    from ..models.scm import LanguageModelSCM

__all__ = [
    "EOS_MARK", "MODE_BEAMS", "SEED_POLICY", "STUDY_CHUNK_BYTES", "StudyWorker", "batch_seed", "string_seed",
    "torch_threads",
]

#: How an end-of-sequence token is shown among a record's ``tokens``.
EOS_MARK = "⏎"


#: Beams of the search for the most probable counterfactual of an ``exact_only`` study.
MODE_BEAMS = 4

#: The name of how records are seeded (:func:`string_seed`, :func:`batch_seed`, the seeds of
#: the parts of a batch and of a string run alone); a record's resume fingerprint covers it
#: (:func:`~pyro_lmscm.study.fingerprint.batch_fingerprints`). Change it with any of them.
SEED_POLICY = "sha256-string-and-batch-seeds/1"

#: The memory that one decoding run of a batch's draws may hold on the CPU
#: (:func:`~pyro_lmscm.inference.auto_chunk_size` ``(budget=...)``), more than a single call's
#: :data:`~pyro_lmscm.inference.budget.AUTO_CHUNK_BYTES`: a study trades memory for strings per minute.
#: 512 MiB is about 200 rows of SmolLM2 bfloat16 at T = 32, so a batch of 16 strings x (4
#: counterfactuals + 4 baselines) decodes as one run of 128 rows, 0.37-0.50 s per string against
#: 0.57-0.74 s in four runs of 32 rows (2 cores, bfloat16). The draws of a seeded batch depend on
#: its chunks, so a change here changes records (and belongs in :data:`SEED_POLICY`).
STUDY_CHUNK_BYTES = 512 * 2**20


def batch_seed(seed: int, start: int, batch_size: int) -> int:
    """The seed of the batch of strings that starts at corpus index ``start``, in a study
    seeded ``seed`` with ``batch_size`` strings per batch: 63 bits of a SHA-256 hash.

    >>> batch_seed(0, 16, 16) == batch_seed(0, 16, 16) != batch_seed(0, 16, 8)
    True
    """
    digest = hashlib.sha256(f"pyro-lmscm-study-batch:{int(seed)}:{int(start)}:{int(batch_size)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def string_seed(seed: int, index: int) -> int:
    """The seed of string ``index`` in a study seeded ``seed``: 63 bits of a SHA-256 hash.

    >>> string_seed(0, 3) == string_seed(0, 3) != string_seed(0, 4)
    True
    """
    digest = hashlib.sha256(f"pyro-lmscm-study:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``; restore the old count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _header(item: CorpusItem, seed: int) -> dict[str, Any]:
    """The fields of a record before its results (an ``error`` record has only these; a chat
    row's also its ``messages``)."""
    chat = {} if item.messages is None else {"messages": [dict(m) for m in item.messages]}
    return {
        "index": item.index,
        "id": item.id,
        "group": item.group,
        "prompt": item.prompt,
        "continuation_given": item.continuation is not None,
        "truncated": False,
        "seed": seed,
        "error": None,
        **chat,
    }


def _error_text(error: LMSCMError) -> str:
    return f"{type(error).__name__}: {error}"


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _stay_fields(bounds: CounterfactualBounds) -> dict[str, Any]:
    """The exact metrics of a record from the bounds of its observation (whose ``"model"``
    entry holds the log-probabilities ``(n,)`` of keeping each observed token): P(unchanged),
    the first-divergence law, its mean, the per-token probabilities and the bounds over
    mechanisms (:data:`BOUNDS_KEYS`)."""
    from ..inference.exact import expected_first_divergence, first_divergence_law

    log_stay = bounds.log_keep["model"]
    divergence = first_divergence_law(log_stay)  # (n + 1,), the last entry P(unchanged)
    summary = bounds.summary()
    return {
        "prob_unchanged": float(divergence[-1]),
        "first_divergence": [float(p) for p in divergence],
        "expected_first_divergence": expected_first_divergence(divergence),
        "token_prob_unchanged": [float(p) for p in log_stay.exp()],
        "bounds": {key: float(summary[key]) for key in BOUNDS_KEYS},
    }


def _attribution_fields(found: Any) -> dict[str, Any]:
    """A record's ``attribution`` from an :class:`~pyro_lmscm.inference.attribute.Attribution`:
    the per-part values as lists aligned with ``parts``, non-finite numbers as ``None``."""
    parts = list(found.parts)
    return {
        "by": found.by,
        "parts": parts,
        "exact": bool(found.exact),
        "num_permutations": found.num_permutations,
        "num_passes": int(found.num_passes),
        **{
            key: _finite(getattr(found, key))
            for key in ("prob_unchanged", "prob_unchanged_empty", "expected_first_divergence",
                        "expected_first_divergence_empty")
        },
        **{name: [_finite(getattr(found, name)[part]) for part in parts] for name in ATTRIBUTION_VALUES},
    }


#: Builds one of the user's Messengers for the study's SCM (see :func:`~pyro_lmscm.study.run_study`).
MessengerFactory = Callable[["LanguageModelSCM"], Messenger]


def check_messengers(messengers: Any, config: StudyConfig) -> dict[str, MessengerFactory]:
    """``messengers`` of :func:`~pyro_lmscm.study.run_study` checked: a mapping of names to
    callables, for a local run.

    :raises StudyError: naming the bad entry, or for a study on Ray.
    """
    if messengers is None:
        return {}
    if not isinstance(messengers, Mapping):
        raise StudyError(
            f"`messengers` must map names to factories factory(scm) -> Messenger, got {type(messengers).__name__}."
        )
    for name, factory in messengers.items():
        if not isinstance(name, str) or not name or not callable(factory):
            raise StudyError(f"`messengers`: {name!r} must be a non-empty name mapped to a callable factory(scm).")
    if messengers and config.ray:
        raise StudyError("`messengers` run in this process only; they cannot be sent to Ray workers (ray=False).")
    return dict(messengers)


def build_messengers(messengers: Mapping[str, MessengerFactory], scm: LanguageModelSCM) -> list[Messenger]:
    """Each factory called on ``scm``.

    :raises StudyError: for a factory that does not return a Pyro Messenger.
    """
    built = []
    for name, factory in messengers.items():
        messenger = factory(scm)
        if not isinstance(messenger, Messenger):
            raise StudyError(f"`messengers`: {name!r} returned {type(messenger).__name__}, not a Pyro Messenger.")
        built.append(messenger)
    return built


class StudyWorker:
    """Holds one model and processes corpus items into records.

    :param config: the study config (a :class:`StudyConfig` or its :meth:`~StudyConfig.to_dict`;
        a dict keeps Ray actors free of anything but plain data).
    :param lm: an already loaded model to use instead of loading ``config.model``.
    :param messengers: factories of the user's own Messengers, added to the intervention
        (see :func:`~pyro_lmscm.study.run_study`).
    :param allow_code: with a dict ``config``, the :attr:`StudyConfig.allow_code` of the
        caller (a dict, like a config file, cannot set it).
    """

    def __init__(
        self,
        config: StudyConfig | Mapping[str, Any],
        lm: HFLanguageModel | None = None,
        messengers: Mapping[str, MessengerFactory] | None = None,
        *,
        allow_code: bool = False,
    ) -> None:
        from ..interventions.ops import check_intervention
        from ..interventions.spec import parse_intervention
        from ..models import Decoding, LanguageModelSCM

        if isinstance(config, StudyConfig):
            self.config = config
        else:
            self.config = StudyConfig.from_mapping(config, allow_code=allow_code)
        if lm is None:
            from ..loading import load_lm

            lm = load_lm(self.config.model, dtype=self.config.dtype, device=self.config.device, progress=False)
        self.lm = lm
        from ..interventions.spec import CHAT_KEYS, read_spec

        data = self.config.intervention
        data = dict(data) if isinstance(data, Mapping) else dict(read_spec(data))
        #: the spec with its chat edits (system=, user=): each chat row's prompt intervention is
        #: its own conversation edited (:meth:`intervention_for`); ``None`` without chat edits
        self._chat_spec: dict[str, Any] | None = data if any(key in data for key in CHAT_KEYS) else None
        self._mechanism_cache: dict[Any, Any] = {}  # built once, shared by the rows' specs
        shared = {key: value for key, value in data.items() if key not in CHAT_KEYS}
        spec = parse_intervention(shared, lm, cache=self._mechanism_cache)
        decoding = Decoding(self.config.temperature, self.config.top_k, self.config.top_p)
        self.scm = LanguageModelSCM(lm, self.config.max_new_tokens, decoding, mechanisms=spec.mechanisms)
        self._messengers = build_messengers(messengers, self.scm) if messengers else []
        self.intervention: Any = spec.intervention
        if self._messengers:
            self.intervention = [spec.intervention, *self._messengers]
        check_intervention(self.scm, self.intervention)  # now, not per string
        self.attribution = self.config.attribution_options()
        if self.attribution is not None and len(self.scm.mechanisms) < 2:
            raise StudyError(
                f"StudyConfig: `attribution` attributes the effect of the intervention's mechanism to its parts, but "
                f"the intervention {self.config.intervention!r:.80} changes no mechanism (a prompt or token "
                "intervention); drop `attribution` or intervene on the model (steer=, memit=, model=, ...)."
            )
        self.attribute = make_attribute(self.config.attribute, allow_code=self.config.allow_code)

    # -- helpers -----------------------------------------------------------------------

    def _tokens(self, ids: Sequence[int]) -> list[str]:
        # cut at character boundaries: a token inside a multi-token character gets "" and
        # the token that completes it the whole character
        eos = self.lm.eos_token_ids
        pieces = self.lm.token_texts(ids)
        return [EOS_MARK if token in eos else piece for token, piece in zip(ids, pieces)]

    def _label(self, text: str) -> str | None:
        return self.attribute.label(text) if self.attribute is not None else None

    def _scored(
        self, ids: list[int], text: str, scores: tuple[list[float], float, list[float], float] | None
    ) -> dict[str, Any]:
        """The leading fields of a scored string (the factual one or a draw): its ids, text and
        tokens, and its per-token and total log-probabilities under both mechanisms (all
        null for a draw not scored, ``draw_scores=False``)."""
        head = {"ids": ids, "text": text, "tokens": self._tokens(ids)}
        if scores is None:
            return {**head, **dict.fromkeys(
                ("token_log_prob_factual", "token_log_prob_intervened", "log_prob_factual", "log_prob_intervened")
            )}
        token_f, total_f, token_i, total_i = scores
        return {
            **head,
            "token_log_prob_factual": [_finite(x) for x in token_f],
            "token_log_prob_intervened": [_finite(x) for x in token_i],
            "log_prob_factual": _finite(total_f),
            "log_prob_intervened": _finite(total_i),
        }

    def _draw(
        self,
        factual: list[int],
        factual_text: str,
        factual_label: str | None,
        ids: list[int],
        scores: tuple[list[float], float, list[float], float] | None,
    ) -> dict[str, Any]:
        text = self.lm.decode(ids)
        label = self._label(text)
        divergence = first_divergence(factual, ids)
        flipped = None
        if self.attribute is not None and factual_label is not None and label is not None:
            flipped = self.attribute.flipped(factual_label, label)
        return {
            **self._scored(ids, text, scores),
            "changed": divergence is not None,
            "first_divergence": divergence,
            "token_edit_distance": token_edit_distance(factual, ids),
            "normalized_token_edit_distance": normalized_token_edit_distance(factual, ids),
            "char_edit_distance": char_edit_distance(factual_text, text),
            "common_prefix": common_prefix_length(factual, ids),
            "length": len(ids),
            "attribute": label,
            "flipped": flipped,
        }

    def intervention_for(self, item: CorpusItem) -> Any:
        """The intervention of ``item``: the study's, or, with chat edits (``system=``,
        ``user=``), the prompt intervention of the item's own conversation edited, with the
        study's mechanism and Messengers.

        :raises InterventionError: for chat edits of a row whose prompt is text.
        """
        from ..interventions.spec import parse_intervention

        if self._chat_spec is None:
            return self.intervention
        messages = None if item.messages is None else [dict(m) for m in item.messages]
        spec = parse_intervention(self._chat_spec, self.lm, messages=messages, cache=self._mechanism_cache)
        return [spec.intervention, *self._messengers] if self._messengers else spec.intervention

    def check_chat(self, items: Sequence[CorpusItem]) -> None:
        """Refuse, before any string runs, a corpus of chat rows for a model without a chat
        template, and an intervention with chat edits (``system=``, ``user=``) for a corpus
        with text rows (each would be an error record).

        :raises StudyError: naming the model and the first chat row, or the intervention's
            chat edits and the first text row.
        """
        text = next((item for item in items if item.messages is None), None)
        if self._chat_spec is not None and text is not None:
            from ..interventions.spec import CHAT_KEYS

            edits = "/".join(key for key in CHAT_KEYS if key in self._chat_spec)
            raise StudyError(
                f"`intervention` edits a chat prompt ({edits}=), but the corpus has text rows (`prompt`, first "
                f"at index {text.index}), which have no conversation to edit; give every row as chat "
                "`messages`, or use another intervention."
            )
        chat = next((item for item in items if item.messages is not None), None)
        if chat is not None and not getattr(self.lm.tokenizer, "chat_template", None):
            raise StudyError(
                f"the corpus has chat rows (`messages`, first at index {chat.index}), but the model "
                f"{self.config.model!r} has no chat template to put a conversation in; use a chat model "
                "(e.g. smollm2-135m-instruct) or give the rows as text `prompt`s."
            )

    def _attributed(self, record: dict[str, Any], result: Any, exact: Any, intervention: Any) -> dict[str, Any]:
        """``record`` with its ``attribution`` (with :attr:`StudyConfig.attribution`): the exact
        attribution of the intervention's effect on the observed string to the parts of its
        mechanism (:func:`~pyro_lmscm.inference.attribute`, on the abduction's factual logits),
        a permutation estimate seeded by :func:`string_seed` (not by the batch)."""
        if self.attribution is None:
            return record
        from ..inference import attribute

        options = self.attribution
        found = attribute(
            self.scm, exact.prompt_ids, exact.observed_ids, intervention, by=options["by"],
            max_exact_parts=options["max_exact_parts"], num_permutations=options["num_permutations"],
            seed=string_seed(self.config.seed, record["index"]), raw_logits=result.factual_logits,
        )
        record["attribution"] = _attribution_fields(found)
        return record

    # -- the work ----------------------------------------------------------------------

    def _start(self, item: CorpusItem, seed: int) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]:
        """A record's header, and the prompt and given observation (cut to ``max_new_tokens``).

        :raises LMSCMError: for a text that does not survive tokenization.
        """
        record = _header(item, seed)
        chat = item.messages is not None
        prompt = self.lm.encode([dict(m) for m in item.messages] if chat else item.prompt)  # type: ignore[union-attr]
        observed = None
        if item.continuation is not None:  # a chat row's reply ends with the end-of-turn token
            observed = self.lm.encode_reply(item.continuation) if chat else self.lm.encode(item.continuation)
            if len(observed) > self.config.max_new_tokens:
                observed = observed[: self.config.max_new_tokens]
                record["truncated"] = True
        return record, prompt, observed

    def process(self, item: CorpusItem | Mapping[str, Any]) -> dict[str, Any]:
        """The record of one corpus item (see :mod:`pyro_lmscm.study.records`), alone: what
        ``batch_size=1`` runs.

        A string the SCM refuses (a continuation outside the decoding support, a text that
        does not survive tokenization, a prompt too long for the context) gives a record
        with an ``error`` message instead of draws.
        """
        from ..inference import counterfactual

        if not isinstance(item, CorpusItem):
            item = CorpusItem(**item)
        config = self.config
        seed = string_seed(config.seed, item.index)
        try:
            record, prompt, observed = self._start(item, seed)
        except LMSCMError as error:
            return {**_header(item, seed), "error": _error_text(error)}
        try:
            intervention = self.intervention_for(item)
            result = counterfactual(
                self.scm, prompt, observed, intervention, num_samples=config.num_samples, seed=seed,
                baseline=True, scores=config.draw_scores,
            )
            return self._complete([record], [result], [self._exact(result, intervention)], intervention)[0]
        except LMSCMError as error:
            record["error"] = _error_text(error)
            return record

    def _exact(self, result: Any, intervention: Any) -> Any:
        """The exact counterfactual of a :class:`~pyro_lmscm.inference.CounterfactualResult`:
        the one it was scored with, else one on the logits its abduction used."""
        from ..inference import exact_counterfactual

        if result.exact is not None:
            return result.exact
        return exact_counterfactual(
            self.scm, result.prompt_ids, result.factual_ids, intervention, raw_logits=result.factual_logits
        )

    def _complete(
        self, records: list[dict[str, Any]], results: list[Any], exacts: list[Any], intervention: Any
    ) -> list[dict[str, Any]]:
        """Fill the records of a batch of strings from their counterfactual results and exact
        distributions (:class:`~pyro_lmscm.inference.ExactCounterfactual`), each quantity for all
        strings together: P(unchanged), the first-divergence law, the probability of keeping
        each observed token and the factual strings' scores under both mechanisms, from one
        teacher-forced pass of the intervened mechanism on the observations and the abduction's
        logits (:func:`~pyro_lmscm.inference.exact.observed_log_probs`), and the scores of the
        distinct counterfactual and interventional strings under the factual mechanism
        (:func:`~pyro_lmscm.inference.scoring.ragged_token_log_probs`), in shared
        teacher-forced passes. The draws' scores under the intervened mechanism and the
        counterfactual draws' exact per-token probabilities were recorded while they were
        decoded (``counterfactuals(scores=True)``, :class:`~pyro_lmscm.inference.TokenScoreMessenger`);
        a draw equal to the factual string takes the factual string's scores and probabilities
        of keeping each token. With ``draw_scores=False`` the factual strings' scores alone.
        The strings of a batch share the intervention
        (:func:`~pyro_lmscm.inference.counterfactuals` refuses one that depends on the observation).

        :raises LMSCMError: from the exact metrics or the scorer.
        """
        from ..inference.exact import observed_bounds

        config = self.config
        eos = self.lm.eos_token_ids
        # per string: the bounds (with the stays), and the factual string's scores under both mechanisms
        observed = observed_bounds(exacts)
        strings: list[tuple[list[int], list[list[int]], list[list[int]]]] = []
        prompts: list[torch.Tensor] = []
        rows: list[list[int]] = []
        where: dict[tuple[int, tuple[int, ...]], int] = {}  # (string, draw) -> its position in `rows`
        # the intervened scores of a draw: recorded while it was decoded, the first of equal draws
        recorded: dict[tuple[int, tuple[int, ...]], list[float]] = {}
        for i, result in enumerate(results):
            factual = trim_after_end(result.factual_ids, eos)
            # A factual string without an end of sequence is only observed up to its length:
            # the draws are compared over the same horizon.
            horizon = config.max_new_tokens if factual[-1] in eos else len(factual)
            cf_rows = [trim_after_end(row, eos)[:horizon] for row in result.counterfactual_ids]
            assert result.interventional_ids is not None  # baseline=True
            int_rows = [trim_after_end(row, eos)[:horizon] for row in result.interventional_ids]
            strings.append((factual, cf_rows, int_rows))
            if not config.draw_scores:
                continue
            for row in (*cf_rows, *int_rows):
                if row != factual and where.setdefault((i, tuple(row)), len(rows)) == len(rows):
                    prompts.append(result.prompt_ids)
                    rows.append(row)
            assert result.counterfactual_scores is not None and result.interventional_scores is not None
            drawn = torch.cat([result.counterfactual_scores, result.interventional_scores])
            for row, log_p in zip((*cf_rows, *int_rows), drawn.tolist()):
                recorded.setdefault((i, tuple(row)), log_p[: len(row)])
        # the draws under the factual mechanism; under the intervened one they were recorded
        token_f, total_f = ragged_token_log_probs(self.scm, prompts, rows) if rows else ([], [])
        for i, (record, result, (factual, cf_rows, int_rows)) in enumerate(zip(records, results, strings)):
            def scores(
                row: list[int], i: int = i, draw: bool = True
            ) -> tuple[list[float], float, list[float], float] | None:
                if draw and not config.draw_scores:
                    return None  # (even a draw equal to the factual string)
                if row == strings[i][0]:  # the factual string (or a draw equal to it)
                    _, on_factual, on_intervened = observed[i]
                    kept_f, kept_i = on_factual[: len(row)].tolist(), on_intervened[: len(row)].tolist()
                    return kept_f, math.fsum(kept_f), kept_i, math.fsum(kept_i)
                at = where[(i, tuple(row))]
                log_p = recorded[(i, tuple(row))]
                return token_f[at], total_f[at], log_p, math.fsum(log_p)

            factual_text = self.lm.decode(factual)
            factual_label = self._label(factual_text)
            record["log_prob_observed"] = _finite(result.log_prob_factual)
            record["factual"] = {
                **self._scored(factual, factual_text, scores(factual, draw=False)),
                "length": len(factual),
                "attribute": factual_label,
            }
            record["exact"] = _stay_fields(observed[i][0])
            self._attributed(record, result, exacts[i], intervention)
            log_q = result.counterfactual_log_q  # None: not scored
            record["counterfactual"] = [
                {
                    **self._draw(factual, factual_text, factual_label, ids, scores(ids)),
                    "token_prob_counterfactual": None if log_q is None else (
                        # an unchanged draw: the probabilities of keeping each observed token
                        record["exact"]["token_prob_unchanged"][: len(ids)] if ids == factual
                        else [math.exp(q) for q in log_q[j][: len(ids)].tolist()]
                    ),
                }
                for j, ids in enumerate(cf_rows)
            ]
            record["interventional"] = [
                {
                    **self._draw(factual, factual_text, factual_label, ids, scores(ids)),
                    "token_prob_counterfactual": None,  # fresh noise: not a counterfactual of the string
                }
                for ids in int_rows
            ]
        return records

    def _exact_only(
        self, record: dict[str, Any], result: Any, bounds: CounterfactualBounds, mode: tuple[torch.Tensor, float]
    ) -> dict[str, Any]:
        """Fill ``record`` with the exact metrics alone (``exact_only``): no draws; ``bounds``
        is :meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`."""
        eos = self.lm.eos_token_ids
        factual = trim_after_end(result.factual_ids, eos)
        factual_text = self.lm.decode(factual)
        mode_ids = trim_after_end(mode[0], eos)  # the mode over the observed horizon
        mode_text = self.lm.decode(mode_ids)
        record["log_prob_observed"] = _finite(result.log_prob_factual)
        unscored = [math.nan] * len(factual)  # not scored (no draws to compare): null fields
        record["factual"] = {
            **self._scored(factual, factual_text, (unscored, result.log_prob_factual, unscored, math.nan)),
            "length": len(factual),
            "attribute": self._label(factual_text),
        }
        record["exact"] = {
            **_stay_fields(bounds),
            "mode_ids": mode_ids,
            "mode_text": mode_text,
            "mode_tokens": self._tokens(mode_ids),
            "mode_log_prob": _finite(mode[1]),
            "mode_changed": float(first_divergence(factual, mode_ids) is not None),
            "mode_token_edit_distance": token_edit_distance(factual, mode_ids),
            "mode_normalized_token_edit_distance": normalized_token_edit_distance(factual, mode_ids),
            "mode_char_edit_distance": char_edit_distance(factual_text, mode_text),
            "mode_normalized_char_edit_distance": normalized_char_edit_distance(factual_text, mode_text),
        }
        record["counterfactual"] = []
        record["interventional"] = []
        return record

    # -- batches of strings ----------------------------------------------------------------

    def process_group(self, items: Sequence[CorpusItem | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The records of one batch of strings (``batch_size`` consecutive corpus indices),
        computed together: the factual strings sampled in one decoding run and the
        counterfactuals of all strings decoded in another
        (:func:`~pyro_lmscm.inference.counterfactuals`), the most probable counterfactuals
        (``exact_only``) in one beam search (:func:`~pyro_lmscm.inference.most_probable`).

        Strings with a given continuation batch by its length (one observed horizon per
        batch). The batch is seeded by :func:`batch_seed` of the study seed, its first index
        and ``batch_size``; a batch that the SCM refuses as a whole (one string outside the
        decoding support, an intervention that depends on the observation) runs string by
        string, so one bad string only costs its own record.
        """
        corpus_items = [item if isinstance(item, CorpusItem) else CorpusItem(**item) for item in items]
        config = self.config
        seed = batch_seed(config.seed, corpus_items[0].index, config.batch_size)
        records: dict[int, dict[str, Any]] = {}
        parts: dict[int | None, list[tuple[CorpusItem, dict[str, Any], torch.Tensor, torch.Tensor | None]]] = {}
        for item in corpus_items:
            try:
                record, prompt, observed = self._start(item, seed)
            except LMSCMError as error:
                records[item.index] = {**_header(item, seed), "error": _error_text(error)}
                continue
            parts.setdefault(None if observed is None else len(observed), []).append((item, record, prompt, observed))
        for key in sorted(parts, key=lambda k: -1 if k is None else k):
            part_seed = seed if key is None else batch_seed(seed, key, config.batch_size)
            if self._chat_spec is not None:  # each string its own prompt intervention: each alone
                done = [r for p in parts[key] for r in self._run_part([p], batch_seed(part_seed, p[0].index, 1))]
            else:
                done = self._run_part(parts[key], part_seed)
            for record in done:
                records[record["index"]] = record
        return [records[item.index] for item in corpus_items]

    def _run_part(
        self, part: list[tuple[CorpusItem, dict[str, Any], torch.Tensor, torch.Tensor | None]], seed: int
    ) -> list[dict[str, Any]]:
        from ..inference import auto_chunk_size, counterfactuals, most_probable
        from ..inference.exact import observed_bounds

        config = self.config
        try:
            # (with chat edits, parts have one string: the intervention is its own)
            intervention = self.intervention_for(part[0][0]) if len(part) == 1 else self.intervention
            observed = None if part[0][3] is None else [p[3] for p in part if p[3] is not None]
            budget = STUDY_CHUNK_BYTES if self.lm.device.type == "cpu" else None
            longest = max(len(p[2]) for p in part)
            results = counterfactuals(
                self.scm, [p[2] for p in part], observed, intervention,
                num_samples=0 if config.exact_only else config.num_samples, seed=seed,
                baseline=not config.exact_only, scores=config.draw_scores and not config.exact_only,
                chunk_size=max(1, auto_chunk_size(self.scm, longest, not config.exact_only, budget) // len(part)),
            )
            exacts = [self._exact(r, intervention) for r in results]
            if config.exact_only:
                eos = self.lm.eos_token_ids
                horizons = [
                    config.max_new_tokens if int(r.factual_ids[-1]) in eos else len(r.factual_ids) for r in results
                ]
                modes = most_probable(exacts, MODE_BEAMS, lengths=horizons)
                bounds = [b for b, _, _ in observed_bounds(exacts)]  # with the stays: one pass
                return [
                    self._attributed(self._exact_only(p[1], r, b, m), r, e, intervention)
                    for p, r, b, m, e in zip(part, results, bounds, modes, exacts)
                ]
            return self._complete([p[1] for p in part], results, exacts, intervention)
        except LMSCMError as error:
            if len(part) == 1:
                record = part[0][1]
                header = _header(part[0][0], seed)
                for key in [key for key in record if key not in header]:
                    del record[key]  # anything _complete had filled in
                record["error"] = _error_text(error)
                return [record]
            # one string spoils the batch: each alone, with its own seed
            return [record for p in part for record in self._run_part([p], batch_seed(seed, p[0].index, 1))]

    def process_many(self, items: Sequence[CorpusItem | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The records of ``items`` in order: :meth:`process` each with ``batch_size=1``,
        else :meth:`process_group` per block of ``batch_size`` consecutive indices (the
        caller passes whole blocks, so a record does not depend on sharding or resuming).
        They run in :func:`~pyro_lmscm.runtime.compute_scope`: a bfloat16 model on a CPU without
        native bfloat16 GEMM kernels multiplies in float32 from 8 rows on, and large tensors
        reuse freed memory instead of faulting in fresh pages."""
        corpus_items = [item if isinstance(item, CorpusItem) else CorpusItem(**item) for item in items]
        size = self.config.batch_size
        with torch_threads(self.config.threads), compute_scope(self.lm):
            if size == 1 and not self.config.exact_only:
                return [self.process(item) for item in corpus_items]
            return [
                record
                for _, block in itertools.groupby(corpus_items, key=lambda item: item.index // size)
                for record in self.process_group(list(block))
            ]
