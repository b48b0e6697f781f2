"""Bounds on candidate strings over all mechanisms (``ExactCounterfactual.log_prob_bounds``):
one cell of a coupling against ``scipy.optimize.linprog``, and whole strings against a
linprog per step on a tiny model's laws."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from pyro_lmscm import LanguageModelSCM
from pyro_lmscm.inference import exact_counterfactual
from pyro_lmscm.inference.bounds import any_step_bounds
from pyro_lmscm.interventions import ModelSwap
from pyro_lmscm.testing import tiny_llama


def _lp_cell(p, q, k, j):
    """(min, max) of pi[k, j] / p_k over all couplings pi of p and q, by linprog."""
    V = len(p)
    a_eq = np.zeros((2 * V, V * V))
    for i in range(V):
        a_eq[i, i * V : (i + 1) * V] = 1.0
        a_eq[V + i, i::V] = 1.0
    c = np.zeros(V * V)
    c[k * V + j] = 1.0 / p[k]
    ends = []
    for sign in (1.0, -1.0):
        result = linprog(sign * c, A_eq=a_eq, b_eq=np.concatenate([p, q]), bounds=[(0, None)] * (V * V),
                         method="highs")
        assert result.status == 0, result.message
        ends.append(sign * result.fun)
    return tuple(ends)


def _law(rng, V):
    p = rng.dirichlet(np.ones(V) * rng.choice([0.3, 1.0, 5.0]))
    if rng.random() < 0.3:
        p[rng.choice(V, int(rng.integers(1, V)), replace=False)] = 0.0
        p /= p.sum()
    return p


def test_one_cell_equals_linprog():
    """600 random steps, V <= 10, with zeros (top-k / top-p supports) and ties: every cell
    (k observed with p_k > 0, any j) to 1e-9; a wrong formula (the stable keep bound used for
    every cell) fails the same comparison."""
    rng = np.random.default_rng(0)
    checked = wrong = 0
    for case in range(600):
        V = int(rng.integers(2, 11))
        p = _law(rng, V)
        q = _law(rng, V) if case % 3 else np.where(p > 0, p * rng.choice([0.5, 1.0, 2.0], V), 0.0)
        q = q / q.sum()
        k = int(rng.choice(np.flatnonzero(p > 0)))
        j = int(rng.integers(V))
        if torch.equal(torch.tensor(p).log().softmax(-1), torch.tensor(q).log().softmax(-1)):
            continue  # equal laws (to rounding): a mechanism of the law keeps K there; no LP fact (tested below)
        lp = _lp_cell(p, q, k, j)
        low, high = any_step_bounds(torch.tensor(p).log(), torch.tensor(q).log(), torch.tensor(k), torch.tensor(j))
        assert float(low.exp()) == pytest.approx(lp[0], abs=1e-9), (p, q, k, j)
        assert float(high.exp()) == pytest.approx(lp[1], abs=1e-9), (p, q, k, j)
        checked += 1
        wrong += abs(min(p[k], q[j]) - lp[1]) > 1e-6  # the unnormalised cell: a baseline that fails
    assert checked >= 550 and wrong > 100


def test_equal_laws_move_nothing():
    p = torch.tensor([0.5, 0.3, 0.2]).log()
    assert [float(x.exp()) for x in any_step_bounds(p, p, torch.tensor(0), torch.tensor(1))] == [0.0, 0.0]
    assert [float(x.exp()) for x in any_step_bounds(p, p, torch.tensor(0), torch.tensor(0))] == [1.0, 1.0]


@pytest.fixture(scope="module")
def exact():
    lm = tiny_llama(seed=0, dtype=torch.float64)
    scm = LanguageModelSCM(lm, max_new_tokens=5, mechanisms={"other": ModelSwap(tiny_llama(seed=1,
                                                                                           dtype=torch.float64))})
    return exact_counterfactual(scm, torch.tensor([2, 3, 4]), torch.tensor([7, 3, 9, 5]), {"mechanism": "other"})


def test_candidate_strings_equal_a_linprog_per_step(exact):
    """Candidates that leave the observation at each step, one longer than it: the bounds equal
    the product of per-step linprogs on the exact counterfactual's own laws (its factual laws at
    the observed prefixes, the intervened laws at the candidate's prefixes), and the Gumbel-max
    log_prob lies inside."""
    candidates = torch.tensor([[7, 3, 9, 5, 6], [7, 3, 8, 5, 6], [6, 3, 9, 5, 1], [7, 10, 11, 12, 1]])
    low, high = exact.log_prob_bounds(candidates)
    model = exact.log_prob(candidates)
    factual = exact._factual.softmax(-1).numpy()
    for b, row in enumerate(candidates):
        expected_low = expected_high = 0.0
        for t in range(5):
            q = exact.next_token_probs(row[:t]).numpy() if t >= 4 else None
            if t < 4:
                prefix = torch.cat([row[:t], row.new_zeros(1)])[None]
                q = exact._counterfactual_logits(prefix, t + 1)[0, t].double().softmax(-1).numpy()
                lp = _lp_cell(factual[t], q, int(exact.observed_ids[t]), int(row[t]))
                expected_low += np.log(lp[0]) if lp[0] > 0 else -np.inf
                expected_high += np.log(lp[1])
            else:  # past the observation: the prior noise, every mechanism alike
                expected_low += np.log(q[int(row[t])])
                expected_high += np.log(q[int(row[t])])
        assert float(high[b]) == pytest.approx(expected_high, abs=1e-9)
        assert float(low[b]) == pytest.approx(expected_low, abs=1e-9) or float(low[b]) == expected_low == -np.inf
        assert float(low[b]) <= float(model[b]) + 1e-12 and float(model[b]) <= float(high[b]) + 1e-12


def test_the_observation_gets_the_any_bounds_of_bounds(exact):
    low, high = exact.log_prob_bounds(exact.observed_ids)
    any_low, any_high = exact.bounds().prob_unchanged["any"]
    assert float(low.exp()[0]) == pytest.approx(any_low, abs=1e-12)
    assert float(high.exp()[0]) == pytest.approx(any_high, abs=1e-12)
