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
   prefix, per-token and total log-probabilities under the factual and the intervened
   mechanism (:func:`~pyro_lmscm.inference.scoring.ragged_token_log_probs`), and the attribute check.

Everything random in step 1 and 2 is seeded by :func:`string_seed` of the study seed and
the string's index alone, and each string runs in its own batches, so a record does not
depend on sharding, batching, resuming or which worker ran it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from ..errors import LMSCMError
from ..inference.scoring import ragged_token_log_probs
from ..metrics import (
    char_edit_distance,
    common_prefix_length,
    first_divergence,
    normalized_token_edit_distance,
    token_edit_distance,
    trim_after_end,
)
from .attribute import make_attribute
from .config import StudyConfig
from .corpus import CorpusItem

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["EOS_MARK", "StudyWorker", "string_seed", "torch_threads"]

#: How an end-of-sequence token is shown among a record's ``tokens``.
EOS_MARK = "⏎"


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


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class StudyWorker:
    """Holds one model and processes corpus items into records.

    :param config: the study config (a :class:`StudyConfig` or its :meth:`~StudyConfig.to_dict`;
        a dict keeps Ray actors free of anything but plain data).
    :param lm: an already loaded model to use instead of loading ``config.model``.
    """

    def __init__(self, config: StudyConfig | Mapping[str, Any], lm: HFLanguageModel | None = None) -> None:
        from ..interventions.ops import check_intervention
        from ..interventions.spec import parse_intervention
        from ..models import Decoding, LanguageModelSCM

        self.config = config if isinstance(config, StudyConfig) else StudyConfig.from_mapping(config)
        if lm is None:
            from ..loading import load_lm

            lm = load_lm(self.config.model, dtype=self.config.dtype, progress=False)
        self.lm = lm
        spec = parse_intervention(self.config.intervention, lm)
        decoding = Decoding(self.config.temperature, self.config.top_k, self.config.top_p)
        self.scm = LanguageModelSCM(lm, self.config.max_new_tokens, decoding, mechanisms=spec.mechanisms)
        self.intervention = spec.intervention
        check_intervention(self.scm, spec.intervention)  # now, not per string
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

    def _draw(
        self,
        factual: list[int],
        factual_text: str,
        factual_label: str | None,
        ids: list[int],
        scores: tuple[list[float], float, list[float], float],
    ) -> dict[str, Any]:
        text = self.lm.decode(ids)
        label = self._label(text)
        divergence = first_divergence(factual, ids)
        token_f, total_f, token_i, total_i = scores
        flipped = None
        if self.attribute is not None and factual_label is not None and label is not None:
            flipped = self.attribute.flipped(factual_label, label)
        return {
            "ids": ids,
            "text": text,
            "tokens": self._tokens(ids),
            "token_log_prob_factual": [_finite(x) for x in token_f],
            "token_log_prob_intervened": [_finite(x) for x in token_i],
            "log_prob_factual": _finite(total_f),
            "log_prob_intervened": _finite(total_i),
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

    def _exact(self, exact: Any, result: Any) -> dict[str, Any]:
        """The exact metrics of a string (:class:`~pyro_lmscm.inference.ExactCounterfactual`):
        P(unchanged), the first-divergence distribution and its mean, the probability of
        keeping each observed token, and each counterfactual draw's per-token probabilities
        (one teacher-forced pass over its distinct draws)."""
        from ..inference.exact import expected_first_divergence, first_divergence_law

        log_stay = exact.observed_token_log_probs()  # one pass: the law of the first divergence too
        divergence = first_divergence_law(log_stay)  # (n + 1,), the last entry P(unchanged)
        unique, inverse = torch.unique(result.counterfactual_ids, dim=0, return_inverse=True)  # repeats are common
        draws = exact.token_log_probs(unique).exp()[inverse]
        return {
            "summary": {
                "prob_unchanged": float(divergence[-1]),
                "first_divergence": [float(p) for p in divergence],
                "expected_first_divergence": expected_first_divergence(divergence),
                "token_prob_unchanged": [float(p) for p in log_stay.exp()],
            },
            "draws": [[float(p) for p in row] for row in draws],
        }

    # -- the work ----------------------------------------------------------------------

    def process(self, item: CorpusItem | Mapping[str, Any]) -> dict[str, Any]:
        """The record of one corpus item (see :mod:`pyro_lmscm.study.records`).

        A string the SCM refuses (a continuation outside the decoding support, a text that
        does not survive tokenization, a prompt too long for the context) gives a record
        with an ``error`` message instead of draws.
        """
        from ..inference import counterfactual, exact_counterfactual

        if not isinstance(item, CorpusItem):
            item = CorpusItem(**item)
        config = self.config
        seed = string_seed(config.seed, item.index)
        record: dict[str, Any] = {
            "index": item.index,
            "id": item.id,
            "group": item.group,
            "prompt": item.prompt,
            "continuation_given": item.continuation is not None,
            "truncated": False,
            "seed": seed,
            "error": None,
        }
        try:
            prompt = self.lm.encode(item.prompt)
            observed = None
            if item.continuation is not None:
                observed = self.lm.encode(item.continuation)
                if len(observed) > config.max_new_tokens:
                    observed = observed[: config.max_new_tokens]
                    record["truncated"] = True
            result = counterfactual(
                self.scm, prompt, observed, self.intervention, num_samples=config.num_samples, seed=seed,
                baseline=True,
            )
            exact = exact_counterfactual(self.scm, prompt, result.factual_ids, self.intervention)
            exact_fields = self._exact(exact, result)
        except LMSCMError as error:
            record["error"] = f"{type(error).__name__}: {error}"
            return record
        eos = self.lm.eos_token_ids
        factual = trim_after_end(result.factual_ids, eos)
        # A factual string without an end of sequence is only observed up to its length:
        # the draws are compared over the same horizon.
        horizon = config.max_new_tokens if factual[-1] in eos else len(factual)
        cf_rows = [trim_after_end(row, eos)[:horizon] for row in result.counterfactual_ids]
        assert result.interventional_ids is not None  # baseline=True
        int_rows = [trim_after_end(row, eos)[:horizon] for row in result.interventional_ids]
        rows = [factual, *cf_rows, *int_rows]
        token_f, total_f = ragged_token_log_probs(self.scm, prompt, rows)
        token_i, total_i = ragged_token_log_probs(self.scm, prompt, rows, result.intervention)
        scores = list(zip(token_f, total_f, token_i, total_i))
        factual_text = self.lm.decode(factual)
        factual_label = self._label(factual_text)
        record["log_prob_observed"] = _finite(result.log_prob_factual)
        record["factual"] = {
            "ids": factual,
            "text": factual_text,
            "tokens": self._tokens(factual),
            "token_log_prob_factual": [_finite(x) for x in token_f[0]],
            "token_log_prob_intervened": [_finite(x) for x in token_i[0]],
            "log_prob_factual": _finite(total_f[0]),
            "log_prob_intervened": _finite(total_i[0]),
            "length": len(factual),
            "attribute": factual_label,
        }
        record["exact"] = exact_fields["summary"]
        k = len(cf_rows)
        record["counterfactual"] = [
            {
                **self._draw(factual, factual_text, factual_label, ids, scores[1 + j]),
                "token_prob_counterfactual": exact_fields["draws"][j][: len(ids)],
            }
            for j, ids in enumerate(cf_rows)
        ]
        record["interventional"] = [
            {
                **self._draw(factual, factual_text, factual_label, ids, scores[1 + k + j]),
                "token_prob_counterfactual": None,  # fresh noise: not a counterfactual of the string
            }
            for j, ids in enumerate(int_rows)
        ]
        return record

    def process_many(self, items: Sequence[CorpusItem | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`process` each item, in order."""
        with torch_threads(self.config.threads):
            return [self.process(item) for item in items]
