"""MechanismBatch: finished rows leave the KV cache; the LM only runs rows still generating."""

import pyro
import pyro.poutine as poutine
import torch

from pyro_lmscm import LanguageModelSCM
from pyro_lmscm.models import noise_site

PROMPT = torch.tensor([2, 3, 4])


def _noise_ending_row_r_at_step_r_plus_1(vocab, rows, steps):
    """Prior-like noise, except that row r emits the end of sequence (id 1) at step r + 1."""
    noise = {}
    for t in range(steps):
        u = torch.distributions.Gumbel(0.0, 1.0).sample((rows, vocab))
        u[:, 1] = -1e4  # no end of sequence ...
        for r in range(rows):
            if t == r + 1:
                u[r, 1] = 1e4  # ... except row r at step r + 1
        noise[noise_site(t)] = u
    return noise


def test_finished_rows_leave_the_batch_and_the_tokens_do_not_change(lm, monkeypatch):
    scm = LanguageModelSCM(lm, max_new_tokens=8)
    rows = 5
    noise = _noise_ending_row_r_at_step_r_plus_1(lm.vocab_size, rows, 8)
    widths = []
    step = lm.step
    monkeypatch.setattr(lm, "step", lambda tokens, cache: widths.append(len(tokens)) or step(tokens, cache))
    with pyro.plate("rows", rows, dim=-1):
        batched = poutine.condition(scm.model, data=noise)(PROMPT)
    # the decoding step after step t runs the rows that have not ended at steps 1..t
    assert widths == [5, 4, 3, 2, 1]
    for r in range(rows):
        alone = poutine.condition(scm.model, data={k: v[r] for k, v in noise.items()})(PROMPT)
        assert batched[r].tolist() == alone.tolist()
        assert int(batched[r, r + 1]) == 1 and bool((batched[r, r + 2 :] == lm.pad_token_id).all())


def test_distinct_prompts_keep_their_rows_and_left_padding_equals_each_alone(lm):
    """Prompts given in an order that torch.unique re-sorts (a regression: the rows came
    back sorted), of one length and left-padded to one: each row's logits are its own."""
    from pyro_lmscm.lm import left_pad
    from pyro_lmscm.models.incremental import MechanismBatch

    scm = LanguageModelSCM(lm, max_new_tokens=3)
    for prompts in ([[9, 3, 4], [2, 3, 4], [5, 1, 7]], [[9, 3, 4], [2], [5, 7]]):
        batch = MechanismBatch(lm, scm.mechanisms, left_pad(prompts), torch.tensor(0))
        tokens = torch.tensor([6, 6, 6])
        first = batch.logits()
        batch.advance(tokens, torch.ones(3, dtype=torch.bool))
        for i, prompt in enumerate(prompts):
            alone = lm.logits(torch.tensor([*prompt, 6]))
            torch.testing.assert_close(first[i], alone[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.logits()[i], alone[-1], atol=1e-5, rtol=1e-5)
