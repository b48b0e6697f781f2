"""Had the model been nudged toward a few words at every step, what would this very string have been?

A user's own structural change, written the Pyro way: a ``Messenger`` that handles the
SCM's effectful ``step_decoded`` (the decoded logits of each step, to which the Gumbel noise
is added) and adds a bonus to a word list. Passed as the intervention, it acts on the
intervened world alone (the factual string and its abduction are untouched) and means the
same thing in every query: the sampled counterfactuals, their scores, the exact
probabilities and the most probable counterfactual all run the same effectful operations
(Ravfogel et al. 2024, arXiv:2411.07180; Oberst & Sontag 2019).

    python examples/own_messenger.py            # SmolLM2-135M-Instruct, CPU
    python examples/own_messenger.py --tiny     # a tiny random model, seconds
"""

from __future__ import annotations

import argparse

import torch
from pyro.poutine.messenger import Messenger

from pyro_lmscm import LanguageModelSCM, counterfactual, exact_counterfactual
from pyro_lmscm.models import Decoding

WORDS = (" she", " her", " She", " Her", " woman")


class BoostWords(Messenger):
    r"""Add ``bonus`` to the decoded logits of ``tokens`` at every step of ``scm``:
    :math:`\tilde\ell_t = g(\ell_t) + b \cdot 1[v \in \text{tokens}]`.

    Rules of a step Messenger: act only on your SCM's messages (``msg["args"][0]``), start
    from ``msg["value"]`` when an inner handler already set it, write a new tensor (never edit
    in place) and index from the right (rows may carry plate and world dims).
    """

    def __init__(self, scm: LanguageModelSCM, tokens: list[int], bonus: float) -> None:
        super().__init__()
        self.scm, self.tokens, self.bonus = scm, torch.tensor(tokens), float(bonus)

    def _pyro_lmscm_step_decoded(self, msg) -> None:
        scm, t, logits = msg["args"]
        if scm is not self.scm:
            return
        current = msg["value"] if msg["value"] is not None else logits
        boosted = current.clone()
        boosted[..., self.tokens.to(current.device)] += self.bonus
        msg["value"] = boosted


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.tiny:
        from pyro_lmscm.testing import tiny_llama

        lm = tiny_llama(seed=3)
        prompt = lm.encode("the doctor said")
        words = ["she", "her", "woman"]  # the tiny tokenizer's words
    else:
        from pyro_lmscm.loading import load_lm

        lm = load_lm("smollm2-135m-instruct")
        prompt = lm.encode("My brother is a doctor. Every morning, he")
        words = list(WORDS)
    tokens = sorted({ids[0] for ids in (lm.encode(w).tolist() for w in words) if len(ids) == 1})
    scm = LanguageModelSCM(lm, max_new_tokens=args.max_new_tokens, decoding=Decoding(top_k=50))
    boost = BoostWords(scm, tokens, args.bonus)
    result = counterfactual(scm, prompt, None, boost, num_samples=args.samples, seed=0)
    exact = exact_counterfactual(scm, prompt, result.factual_ids, boost, raw_logits=result.factual_logits)
    print("factual       ", repr(result.factual_text))
    for i, text in enumerate(result.counterfactual_texts):
        print(f"counterfactual {i}", repr(text))
    print(f"P(unchanged) = {exact.prob_unchanged():.4f}")
    mode, log_p = exact.mode()
    print(f"most probable counterfactual ({log_p:.2f} nats):", repr(lm.decode(mode)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--bonus", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    main(parser.parse_args())
