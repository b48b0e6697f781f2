"""What would the assistant have said had the system prompt been different?

A chat model's reply is a string like any other: we sample the assistant's reply to one
conversation once (a fixed seed), abduct its exact Gumbel noise, and replay that noise with
another system prompt. For each edit we print the exact probability that the reply stays the
same word for word, the expected number of leading reply tokens kept (E[first divergence]),
the range of P(unchanged) over all counterfactually stable mechanisms and over all mechanisms
(:meth:`~pyro_lmscm.inference.ExactCounterfactual.bounds`), and one counterfactual reply.
The null intervention (the same system prompt) reproduces the reply exactly.

The conversation is encoded with the model's chat template (``lm.encode(messages)``); the
prompt intervention is another list of messages (``{"prompt": messages}``, what
``system=...`` of :func:`~pyro_lmscm.interventions.spec.parse_intervention` builds). The
reply ends with the end-of-turn token, ``<|im_end|>`` for SmolLM2.

    python examples/chat_system_prompt.py            # SmolLM2-135M-Instruct, CPU (a few minutes)
    python examples/chat_system_prompt.py --tiny     # a tiny random model with a toy template, seconds
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from pyro_lmscm import LanguageModelSCM
from pyro_lmscm.inference import counterfactual, exact_counterfactual
from pyro_lmscm.models import Decoding

SYSTEM = "You are a helpful assistant."
USER = "What should I cook for dinner tonight?"
#: (label, system prompt); None: no system message (SmolLM2's template then adds its own default).
EDITS = [
    ("the same system prompt (null)", SYSTEM),
    ("no final period", "You are a helpful assistant"),
    ("answer in one sentence", "You are a helpful assistant. Answer in one sentence."),
    ("a French chef", "You are a French chef."),
    ("a pirate", "You are a pirate."),
    ("no system message", None),
]

TINY_TEMPLATE = (  # roles as words of the tiny vocabulary (as tests/test_chat.py)
    "{% set names = {'system': 'the', 'user': 'man', 'assistant': 'woman'} %}"
    "{% for message in messages %}<s> {{ names[message['role']] }} {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> woman{% endif %}"
)
TINY_EDITS = [("the same system prompt (null)", "he was old"), ("another", "she was young"), ("none", None)]


def messages_with(system: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]


def load(tiny: bool):
    if tiny:
        from pyro_lmscm.lm import HFLanguageModel
        from pyro_lmscm.testing import tiny_llama

        lm = tiny_llama(seed=0)
        tokenizer = copy.deepcopy(lm.tokenizer)
        tokenizer.chat_template = TINY_TEMPLATE
        return HFLanguageModel(lm.model, tokenizer), "the man said", TINY_EDITS
    from pyro_lmscm.loading import load_lm

    return load_lm("smollm2-135m-instruct", progress=False), USER, EDITS


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    lm, user, edits = load(args.tiny)
    factual = messages_with(edits[0][1], user)
    prompt = lm.encode(factual)
    scm = LanguageModelSCM(lm, args.max_new_tokens, Decoding(temperature=args.temperature, top_k=args.top_k))
    start = time.perf_counter()
    # the reply, sampled once from the factual model; its null counterfactuals reproduce it
    sampled = counterfactual(scm, prompt, None, {"prompt": factual}, num_samples=args.samples, seed=args.seed)
    reply = sampled.factual_ids
    reproduced = all(row[: len(reply)].tolist() == reply.tolist() for row in sampled.counterfactual_ids)
    print(f"system: {edits[0][1]!r}\nuser:   {user!r}\nreply ({len(reply)} tokens, seed {args.seed}): "
          f"{lm.decode(reply)!r}")
    print(f"null intervention: {args.samples} of {args.samples} counterfactual replies identical: {reproduced}\n")
    if not reproduced:
        raise SystemExit("the null intervention did not reproduce the reply")
    rows = []
    for label, system in edits:
        other = {"prompt": messages_with(system, user)}
        exact = exact_counterfactual(scm, prompt, reply, other, raw_logits=sampled.factual_logits)
        bounds = exact.bounds()
        cf = counterfactual(scm, prompt, reply, other, num_samples=1, seed=args.seed + 1)
        text = lm.decode([t for t in cf.counterfactual_ids[0].tolist() if t not in lm.eos_token_ids])
        rows.append((label, system, bounds, text))
    print("| system prompt | P(unchanged) | stable mechanisms | any mechanism | E[first divergence] "
          f"(of {len(reply)}) | stable | any | one counterfactual reply |")
    print("|---|---|---|---|---|---|---|---|")
    for label, system, b, text in rows:
        pu, efd = b.prob_unchanged, b.expected_first_divergence
        shown = "(none)" if system is None else repr(system)
        print(f"| {label}: {shown} | {pu['gumbel']:.3g} | {pu['stable'][0]:.3g}–{pu['stable'][1]:.3g} "
              f"| {pu['any'][0]:.3g}–{pu['any'][1]:.3g} | {efd['gumbel']:.2f} | {efd['stable'][0]:.2f}–"
              f"{efd['stable'][1]:.2f} | {efd['any'][0]:.2f}–{efd['any'][1]:.2f} | {text!r} |")
    null = rows[0][2].prob_unchanged
    if null["gumbel"] != 1.0 or null["stable"] != (1.0, 1.0):
        raise SystemExit(f"the null intervention's P(unchanged) is not exactly 1: {null}")
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (seconds)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--samples", type=int, default=4, help="null counterfactuals that must reproduce the reply")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    main(parser.parse_args())
