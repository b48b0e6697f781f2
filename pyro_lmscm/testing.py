"""Tiny random-init language models built in code, for tests, doctests and offline demos.

They have the module paths of SmolLM2 (``LlamaForCausalLM``: ``model.layers[i].mlp.down_proj``
etc.), run in milliseconds and are deterministic under a seed. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
from typing import IO, Any, Iterator, Sequence

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger

from .lm import HFLanguageModel
from .models.sites import noise_site
from .seeding import seeded

__all__ = [
    "TINY_WORDS",
    "BoostTokens",
    "assert_restored",
    "assert_rows_match_separate_runs",
    "by_hand",
    "chi_square_pvalue",
    "hooks",
    "served_app",
    "snapshot",
    "tiny_llama",
    "tiny_tokenizer",
]

#: The word vocabulary of :func:`tiny_tokenizer` after the special tokens.
TINY_WORDS = (
    "the man woman he she his her said went home to work city old young doctor nurse "
    "was and a story day night walked smiled"
).split()

_SPECIAL = ["<pad>", "</s>", "<s>"]


def tiny_tokenizer():
    """A whitespace word-level ``PreTrainedTokenizerFast`` over :data:`TINY_WORDS`.

    Ids: ``<pad>`` 0, ``</s>`` 1 (end of sequence), ``<s>`` 2, then the words.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIAL + list(TINY_WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def tiny_llama(
    vocab_size: int = len(_SPECIAL) + len(TINY_WORDS),
    seed: int = 0,
    logit_scale: float = 20.0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool | None = None,
) -> HFLanguageModel:
    r"""A random-init ``LlamaForCausalLM`` wrapped as an :class:`HFLanguageModel`.

    The output head is multiplied by ``logit_scale`` so that next-token distributions are
    far from uniform (logit standard deviation :math:`\approx 0.1 \times` ``logit_scale``).
    Token 1 is the end of sequence, 0 the padding.

    :param with_tokenizer: attach :func:`tiny_tokenizer` (default: when the vocabulary
        has its size).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    with seeded(seed):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model = model.to(dtype)  # type: ignore[arg-type]  # transformers types `to` narrowly
    if with_tokenizer is None:
        with_tokenizer = vocab_size == len(_SPECIAL) + len(TINY_WORDS)
    return HFLanguageModel(model, tiny_tokenizer() if with_tokenizer else None)


# Checks shared by the mechanism tests: a mechanism must leave the model as it found it,
# and rows of a batch that mixes mechanisms must equal separate runs.


def hooks(model):
    return {
        name: (
            list(m._forward_hooks),
            list(m._forward_pre_hooks),
            list(getattr(m, "_forward_hooks_with_kwargs", {})),
        )
        for name, m in model.named_modules()
    }


def snapshot(model):
    """Parameters and buffers, and the forward hooks of every module (transformers installs
    its own output-capturing hooks once `output_hidden_states=True` is used)."""
    return {k: v.clone() for k, v in model.state_dict().items()}, hooks(model)


def assert_restored(model, snap):
    state, before = snap
    current = model.state_dict()
    assert current.keys() == state.keys()
    assert all(torch.equal(current[k], v) for k, v in state.items())
    assert hooks(model) == before


def assert_rows_match_separate_runs(scm, prompt, mechanisms):
    """A batch mixing mechanisms gives, per row, the result of running that mechanism alone."""
    index = torch.tensor(mechanisms)
    trace = poutine.trace(poutine.do(scm.model, data={"mechanism": index})).get_trace(prompt)
    batched = trace.nodes["_RETURN"]["value"]
    assert batched.shape == (len(mechanisms), scm.max_new_tokens)
    noise = {noise_site(t): trace.nodes[noise_site(t)]["value"] for t in range(scm.max_new_tokens)}
    for row, m in enumerate(mechanisms):
        single = {k: v[row] if v.dim() == 2 else v for k, v in noise.items()}
        alone = poutine.condition(poutine.do(scm.model, data={"mechanism": torch.tensor(m)}), data=single)
        assert alone(prompt).tolist() == batched[row].tolist(), (row, m)
    return batched


def by_hand(lm, ids, layer, edit=None):
    """Teacher-forced logits with ``edit(hidden, positions)`` applied after decoder layer ``layer``,
    running the Llama layers one by one (no hooks); without ``edit``, that layer's output ``(L, d)``."""
    model = lm.model
    positions = torch.arange(ids.shape[-1])[None]
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids[None])
        rotary = model.model.rotary_emb(hidden, positions)
        for i, block in enumerate(model.model.layers):
            hidden = block(hidden, position_ids=positions, position_embeddings=rotary)
            if i == layer:
                if edit is None:
                    return hidden[0]
                hidden = edit(hidden, positions[..., None])
        return model.lm_head(model.model.norm(hidden))[0]


def chi_square_pvalue(counts: Any, probs: Any) -> float:
    """The p-value of Pearson's chi-square test of ``counts`` against the law ``probs``, bins
    with an expected count below 5 pooled into one; 0 if a count falls where the law has no
    mass (scipy, of the test extra)."""
    import numpy as np
    from scipy import stats

    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    if counts[probs <= 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


class BoostTokens(Messenger):
    """A user's own intervention, as the tests write one: add ``boost`` to the decoded logits of
    ``tokens`` at every step of ``scm`` (a Messenger on the effectful ``step_decoded``)."""

    def __init__(self, scm: Any, tokens: Sequence[int], boost: float) -> None:
        super().__init__()
        self.scm, self.tokens, self.boost = scm, torch.tensor(list(tokens)), float(boost)

    def _pyro_lmscm_step_decoded(self, msg: Any) -> None:
        scm, t, logits = msg["args"]
        if scm is not self.scm:
            return
        current = msg["value"] if msg["value"] is not None else logits
        boosted = current.clone()
        boosted[..., self.tokens.to(current.device)] += self.boost
        msg["value"] = boosted


@contextlib.contextmanager
def served_app(*args: str, log: IO[str] | None = None, seconds: float = 600.0) -> Iterator[str]:
    """``pyro-lmscm app ARGS`` in a process of its own on a free port of 127.0.0.1 (for browser
    tests, benchmarks and screenshots): yields its url once it answers HTTP 200, and stops the
    process on exit.

    :param args: the arguments of ``pyro-lmscm app`` (not ``--port``).
    :param log: where the app's output goes (default: discarded).
    :param seconds: how long to wait for it.
    :raises RuntimeError: if the app exits or does not answer within ``seconds``.
    """
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from pyro_lmscm.cli import main; main()", "app", *args, "--port", str(port)]
    process = subprocess.Popen(
        command, stdout=log if log is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start within {seconds:.0f} s (exit status {process.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
