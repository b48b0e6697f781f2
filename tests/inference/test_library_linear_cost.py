"""The library's own work per token does not grow with the string length (issue 40, item 3).

On a tiny model the library's per-step overheads are what a profile shows: the factual anchor
used to walk the whole prefix at every step (:math:`O(T^2)` over a string), and each
teacher-forced step of beam search and of the exact sampler rebuilt the list of the tokens so
far. Wall-clock time is no test on a shared machine; these count work instead:

* the Python function calls of :mod:`pyro_lmscm` itself (``sys.setprofile``) per token of the
  four queries of ``benchmarks/bench_scaling.py`` (counterfactual draws, the exact
  probabilities, the beam search, the exact sampler), which must not grow from a short string
  to a long one (the quadratic walk made them grow 1.2-1.7x from T = 12 to T = 48);
* the tokens the anchor follows: at most one per anchored step (a run's walk goes on from its
  previous step), where the walk from the prompt followed ``t`` tokens at step ``t``;
* the columns a teacher-forced step at ``t`` reads from its strings: a constant number, not
  ``t``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import pyro_lmscm
from pyro_lmscm import LanguageModelSCM, ModelSwap, counterfactual, exact_counterfactual
from pyro_lmscm.models import FactualAnchor
from pyro_lmscm.models.ops import STEP_LOGITS, TokenColumns
from pyro_lmscm.models.teacher_forcing import decoded_steps
from pyro_lmscm.testing import tiny_llama

PROMPT = torch.tensor([2, 3, 14, 4])
ROOT = os.path.dirname(pyro_lmscm.__file__)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(seed=0, logit_scale=2.0), tiny_llama(seed=1, logit_scale=2.0)


def _observed(lm, T):
    """A fixed string of ``T`` tokens without an end of sequence (ids 3..V-1)."""
    return torch.randint(3, lm.vocab_size, (T,), generator=torch.Generator().manual_seed(0))


def _queries(models, T, intervention):
    lm, other = models
    scm = LanguageModelSCM(lm, T, mechanisms={"other": ModelSwap(other)})
    observed = _observed(lm, T)
    exact = exact_counterfactual(scm, PROMPT, observed, intervention)  # (built outside the count)

    def probabilities():
        fresh = exact_counterfactual(scm, PROMPT, observed, intervention)
        fresh.prob_unchanged()
        fresh.first_divergence()

    return scm, {
        "counterfactual": lambda: counterfactual(scm, PROMPT, observed, intervention, num_samples=2, seed=0),
        "exact probabilities": probabilities,
        "mode": lambda: exact.mode(num_beams=2),
        "sample": lambda: exact.sample(2, seed=0),
    }


def _library_calls(run) -> int:
    """The Python function calls of pyro_lmscm's own code while ``run()`` runs."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(ROOT):
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(previous)
    return calls


@pytest.mark.parametrize("intervention", [{}, {"mechanism": "other"}], ids=["null (anchored)", "model swap"])
def test_the_library_calls_per_token_do_not_grow_with_the_length(models, intervention):
    short, long = 12, 48
    per_token = {}
    for T in (short, long):
        for name, run in _queries(models, T, intervention)[1].items():
            per_token[name, T] = _library_calls(run) / T
    for name in ("counterfactual", "exact probabilities", "mode", "sample"):
        # linear: a fixed cost spread over more tokens (ratio <= 1); the prefix walk gave 1.2-1.7
        assert per_token[name, long] <= 1.05 * per_token[name, short], (name, per_token)


class _Counter:
    """Counts the anchor's token follows and the anchored step messages of one SCM."""

    def __init__(self, monkeypatch, scm):
        self.follows = 0
        self.steps = 0
        follow, follow_prefix = FactualAnchor.follow, FactualAnchor.follow_prefix

        def counted_follow(anchor, t, w, on_path):
            self.follows += 1
            return follow(anchor, t, w, on_path)

        def counted_prefix(anchor, prefix, on_path):
            self.follows += 1
            return follow_prefix(anchor, prefix, on_path)

        monkeypatch.setattr(FactualAnchor, "follow", counted_follow)
        monkeypatch.setattr(FactualAnchor, "follow_prefix", counted_prefix)
        from pyro.poutine.messenger import Messenger

        counter = self

        class Steps(Messenger):
            def _pyro_lmscm_step_logits(self, msg):
                assert msg["type"] == STEP_LOGITS
                if msg["args"][0] is scm and msg["args"][1] > 0:
                    counter.steps += 1

        self.messenger = Steps()


@pytest.mark.parametrize("query", ["counterfactual", "exact probabilities", "mode", "sample"])
def test_the_anchor_follows_at_most_one_token_per_step(models, monkeypatch, query):
    """Every query of a null intervention (each of its rows on the anchored path): the anchor
    follows at most one token per step message after the first (a plain walk from the prompt
    followed ``t`` at step ``t``: 66 per 11 steps of a 12-token string)."""
    T = 12
    scm, queries = _queries(models, T, {})
    counter = _Counter(monkeypatch, scm)
    with counter.messenger:
        queries[query]()
    assert counter.steps >= T - 1
    assert counter.follows <= counter.steps


@pytest.mark.parametrize("t", [3, 30])
def test_a_teacher_forced_step_reads_its_strings_a_fixed_number_of_times(models, t):
    """``decoded_steps`` of one step at ``t`` (as beam search and the exact sampler run it),
    inside the factual anchor: the strings' tensor is indexed the same number of times at any
    ``t`` (once for the anchor's whole prefix), where a list of the ``t`` columns so far was
    built before."""
    lm = models[0]
    scm = LanguageModelSCM(lm, 40)
    observed = _observed(lm, 40)
    anchor = FactualAnchor(PROMPT, observed, torch.zeros(40, lm.vocab_size))
    strings = observed[: t + 1].expand(3, -1).clone()
    reads = []

    class Counted(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__:
                reads.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    raw = torch.zeros(3, 1, lm.vocab_size)
    with scm.anchored(anchor):
        decoded = decoded_steps(scm, raw, PROMPT, 0, strings.as_subclass(Counted), start=t)
    assert decoded.shape == (3, 1, lm.vocab_size)
    assert 1 <= len(reads) <= 2, len(reads)


def test_token_columns_are_the_columns_so_far():
    ids = torch.arange(12).reshape(3, 4)
    columns = TokenColumns(ids, 2)
    assert len(columns) == 2 and torch.equal(columns[1], ids[:, 1]) and torch.equal(columns[-1], ids[:, 1])
    assert [c.tolist() for c in columns] == [ids[:, 0].tolist(), ids[:, 1].tolist()]
    assert [c.tolist() for c in columns[:1]] == [ids[:, 0].tolist()]
    assert torch.equal(columns.prefix(2), ids[:, :2])
    with pytest.raises(IndexError):
        columns[2]
    columns.grow()
    columns.grow()
    assert len(columns) == 4 and torch.equal(columns[3], ids[:, 3])
    with pytest.raises(IndexError):
        columns.grow()
    with pytest.raises(IndexError):
        TokenColumns(ids, 5)
