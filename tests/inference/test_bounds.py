"""Bounds over mechanisms against an independent oracle: a linear program over the coupling
(``scipy.optimize.linprog``) for one step, brute force over the box's vertices for strings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from pyro_lmscm import LanguageModelSCM, ModelSwap, counterfactual, exact_counterfactual
from pyro_lmscm.errors import AbductionError, InferenceError, ObservationError
from pyro_lmscm.inference.bounds import (
    any_step_bounds,
    expected_first_divergence_of,
    first_divergence_cdf_of,
    keep_bounds,
    observed_keep_bounds,
    prob_unchanged_of,
)
from pyro_lmscm.models import Decoding, GumbelMax, InverseCDF
from pyro_lmscm.testing import tiny_llama

TIE = 1e-12  # the oracle's ties: log ratios this close (the cases keep others 1e-6 apart)


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(x)


def _log_ratios(p, q):
    """log q_i - log p_i: +inf where only q_i > 0, -inf where only p_i > 0, nan where neither."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _log(q) - _log(p)


def _lp_keep(p, q, k, stable):
    """(min, max) of pi[k, k] / p_k over the couplings pi of p and q, by linprog; ``stable``:
    pi[i, j] = 0 for i != j unless ratio_j > ratio_i (Oberst & Sontag), tied ratios
    (within TIE) counting as equal."""
    V = len(p)
    r = _log_ratios(p, q)
    allowed = np.outer(p > 0, q > 0)
    if stable:
        for i, j in itertools.product(range(V), repeat=2):
            if i != j and allowed[i, j]:
                tied = r[i] == r[j] or abs(r[i] - r[j]) <= TIE
                allowed[i, j] = bool(r[j] > r[i]) and not tied
    a_eq = np.zeros((2 * V, V * V))
    for i in range(V):
        a_eq[i, i * V : (i + 1) * V] = 1.0  # row sums: p
        a_eq[V + i, i::V] = 1.0  # column sums: q
    bounds = [(0, None) if allowed.reshape(-1)[m] else (0, 0) for m in range(V * V)]
    c = np.zeros(V * V)
    c[k * V + k] = 1.0 / p[k]
    ends = []
    for sign in (1.0, -1.0):
        result = linprog(sign * c, A_eq=a_eq, b_eq=np.concatenate([p, q]), bounds=bounds, method="highs")
        assert result.status == 0, result.message
        ends.append(sign * result.fun)
    return tuple(ends)


def _case(rng, kind):
    """A random step (p, q, k), V <= 10: ``kind`` "free" (independent laws), "tied" (q = p
    times a few levels: tied ratios, tokens dropped and added, as top-k / top-p and exclusions
    make them)."""
    while True:
        V = int(rng.integers(2, 11))
        p = rng.dirichlet(np.ones(V))
        if rng.random() < 0.4:
            p[rng.choice(V, int(rng.integers(1, V)), replace=False)] = 0.0
        if kind == "free":
            q = rng.dirichlet(np.ones(V))
            if rng.random() < 0.4:
                q[rng.choice(V, int(rng.integers(1, V)), replace=False)] = 0.0
        else:
            q = p * rng.choice([0.0, 0.5, 1.0, 2.0, 3.0], V)
            added = np.flatnonzero(p == 0)
            if added.size and rng.random() < 0.5:
                q[rng.choice(added)] = rng.random()
        if p.sum() == 0 or q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        if np.array_equal(p, q):
            continue
        r = _log_ratios(p, q)
        finite = np.unique(r[np.isfinite(r)])
        gaps = np.diff(finite)
        if np.any((gaps > TIE) & (gaps < 1e-6)):  # ratios neither tied nor apart: draw again
            continue
        k = int(rng.choice(np.flatnonzero(p > 0)))
        return p, q, k


def _cases(seed, count):
    rng = np.random.default_rng(seed)
    return [_case(rng, "free" if i % 3 == 0 else "tied") for i in range(count)]


def _bounds(p, q, k):
    out = keep_bounds(torch.tensor(_log(p)), torch.tensor(_log(q)), torch.tensor(k))
    return {name: (float(lo), float(hi)) for name, (lo, hi) in out.items()}


def _one_sided(p, q, k):
    """The issue's stable lower end, max(0, q_k - sum over r_i < r_k of (p_i - q_i)) / p_k,
    without the tied tokens' share."""
    r = _log_ratios(p, q)
    lower = np.array([i != k and bool(r[i] < r[k]) and abs(r[i] - r[k]) > TIE for i in range(len(p))])
    return max(0.0, q[k] - (p[lower] - q[lower]).sum()) / p[k]


@pytest.mark.parametrize("seed", range(4))
def test_one_step_bounds_equal_the_linear_program(seed):
    """300 random steps (V <= 10, zeros on either side, ties), both classes, to 1e-9; the
    issue's one-sided stable lower end fails the same comparison where k has tied tokens."""
    one_sided_wrong = 0
    for p, q, k in _cases(seed, 75):
        ours = _bounds(p, q, k)
        for name, stable in (("stable", True), ("any", False)):
            np.testing.assert_allclose(ours[name], _lp_keep(p, q, k, stable), atol=1e-9, rtol=0,
                                       err_msg=f"{name}: p={p.tolist()}, q={q.tolist()}, k={k}")
        one_sided_wrong += abs(_one_sided(p, q, k) - ours["stable"][0]) > 1e-6
    assert one_sided_wrong > 0


def test_a_step_whose_laws_are_equal_keeps_its_token_under_every_mechanism():
    """q = p: a mechanism of the decoded law gives J = K (keep 1), though a coupling of p with
    itself need not (Frechet: max(0, 2 p_k - 1) / p_k)."""
    p = np.array([0.5, 0.3, 0.2])
    assert _bounds(p, p, 1) == {"stable": (1.0, 1.0), "any": (1.0, 1.0)}
    assert _lp_keep(p, p, 1, stable=False)[0] == pytest.approx(0.0, abs=1e-12)


def test_an_observed_token_of_probability_zero_is_refused():
    with pytest.raises(AbductionError, match="probability zero"):
        keep_bounds(torch.tensor([0.0, -math.inf]), torch.tensor([0.0, 0.0]), torch.tensor(1))


_P, _Q = torch.tensor([0.5, 0.3, 0.2]).log(), torch.tensor([0.2, 0.3, 0.5]).log()
_BAD_STEPS = {  # (arguments, error, the argument the message names); each a raw torch error or a silent answer before
    "observed out of the vocabulary": ((_P, _Q, torch.tensor(5)), ObservationError, "`observed`"),
    "observed negative": ((_P, _Q, torch.tensor(-1)), ObservationError, "`observed`"),
    "observed float (was truncated)": ((_P, _Q, torch.tensor(1.7)), ObservationError, "`observed`"),
    "observed bool": ((_P, _Q, torch.tensor(True)), ObservationError, "`observed`"),
    "observed of another shape": ((_P, _Q, torch.tensor([0, 1])), ObservationError, "`observed`"),
    "vocabularies differ": ((_P, _Q[:2], torch.tensor(1)), InferenceError, "`counterfactual_logits`"),
    "NaN logits (were NaN bounds)": ((torch.tensor([0.0, math.nan, 0.0]), _Q, torch.tensor(0)), InferenceError,
                                     "`factual_logits`"),
    "+inf logits": ((_P, torch.tensor([0.0, math.inf, 0.0]), torch.tensor(0)), InferenceError,
                    "`counterfactual_logits`"),
    "no possible intervened token": ((_P, torch.full((3,), -math.inf), torch.tensor(0)), InferenceError,
                                     "`counterfactual_logits`"),
    "a list": (([0.0, 1.0], [0.0, 1.0], torch.tensor(0)), InferenceError, "`factual_logits`"),
    "no vocabulary axis": ((torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0)), InferenceError,
                           "`factual_logits`"),
}


@pytest.mark.parametrize("case", list(_BAD_STEPS))
def test_bad_step_arguments_are_refused_naming_the_argument(case):
    """Each case raised a raw RuntimeError / AttributeError / IndexError, or returned bounds
    (NaN ones, or those of a truncated token id), before the check."""
    arguments, error, name = _BAD_STEPS[case]
    with pytest.raises(error, match=name):
        keep_bounds(*arguments)


def test_bad_candidate_token_is_refused():
    with pytest.raises(ObservationError, match="`token`"):
        any_step_bounds(_P, _Q, torch.tensor(0), torch.tensor(7))
    low, high = any_step_bounds(_P, _Q, 0, 2)  # plain ints are ids too
    assert (float(low.exp()), float(high.exp())) == pytest.approx((0.0, 1.0), abs=1e-6)


@pytest.mark.parametrize("helper", [prob_unchanged_of, expected_first_divergence_of, first_divergence_cdf_of])
@pytest.mark.parametrize("keep", [[1.5, 0.5], [-0.5, 0.5], [math.nan, 0.5], [[0.5, 0.5]]])
def test_keep_probabilities_outside_the_unit_interval_are_refused(helper, keep):
    """Before: 0.75, nan, or a raw RuntimeError (a (1, n) tensor)."""
    with pytest.raises(InferenceError, match="`keep`"):
        helper(torch.tensor(keep))


def test_a_token_the_intervention_makes_impossible_is_never_kept():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.6, 0.0, 0.4])
    assert _bounds(p, q, 1) == {"stable": (0.0, 0.0), "any": (0.0, 0.0)}


def test_excluding_another_token_keeps_the_observed_one_under_stable_mechanisms():
    """do "anything but token 2": every other ratio is 1 / (1 - p_2), computed with rounding in
    log space; tied, so no stable mechanism moves the observed token (the LP agrees)."""
    logits = torch.tensor([1.3, -0.2, 0.7, 2.1, -1.5], dtype=torch.float64)
    excluded = logits.clone()
    excluded[2] = -math.inf
    out = keep_bounds(logits, excluded, torch.tensor(3))
    p, q = logits.softmax(-1).numpy(), excluded.softmax(-1).numpy()
    assert tuple(map(float, out["stable"])) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert _lp_keep(p, q, 3, stable=True) == pytest.approx((1.0, 1.0), abs=1e-9)
    assert float(out["any"][0]) == pytest.approx(_lp_keep(p, q, 3, stable=False)[0], abs=1e-9)
    assert float(out["any"][0]) < 0.9


def test_rows_in_a_batch_equal_each_alone():
    cases = [c for c in _cases(7, 40) if len(c[0]) == 6][:8]
    p = torch.tensor(_log(np.stack([c[0] for c in cases])))
    q = torch.tensor(_log(np.stack([c[1] for c in cases])))
    batch = keep_bounds(p, q, torch.tensor([c[2] for c in cases]))
    for i, (pi, qi, k) in enumerate(cases):
        alone = _bounds(pi, qi, k)
        for name in ("stable", "any"):
            assert (float(batch[name][0][i]), float(batch[name][1][i])) == pytest.approx(alone[name], abs=1e-15)


# -- strings --------------------------------------------------------------------------------------


def _law(a):
    """P(D = d), d = 0..n, of keep probabilities a: written out, as the oracle."""
    n = len(a)
    return np.array([np.prod(a[:d]) * (1 - a[d]) for d in range(n)] + [np.prod(a)])


def _string(rng, n):
    """n steps of one vocabulary size, as stacked log-probability rows."""
    V = int(rng.integers(3, 8))
    steps = []
    while len(steps) < n:
        p, q, k = _case(rng, "free" if rng.random() < 0.4 else "tied")
        if len(p) == V:
            steps.append((p, q, k))
    factual = torch.tensor(_log(np.stack([s[0] for s in steps])))
    counterfactual = torch.tensor(_log(np.stack([s[1] for s in steps])))
    return steps, factual, counterfactual, torch.tensor([s[2] for s in steps])


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_string_bounds_are_products_and_vertices_of_the_box(n):
    """P(unchanged) bounds are the products of the LP step bounds; E[first divergence] and the
    first-divergence CDF bounds are the min and max over all 2^n vertices of the LP box (to
    1e-9); the Gumbel-max values are those of its stay probabilities."""
    rng = np.random.default_rng(n)
    for _ in range(3):
        steps, factual, counterfactual, tokens = _string(rng, n)
        gumbel = GumbelMax().stay_log_prob(factual, counterfactual, tokens)
        out = observed_keep_bounds(GumbelMax(), gumbel, factual, counterfactual, tokens, range(n))
        for name, stable in (("stable", True), ("any", False)):
            box = np.array([_lp_keep(p, q, k, stable) for p, q, k in steps])  # (n, 2)
            assert out.prob_unchanged[name] == pytest.approx(tuple(np.prod(box, 0)), abs=1e-9)
            laws = [_law(box[np.arange(n), list(vertex)]) for vertex in itertools.product((0, 1), repeat=n)]
            means = [float(law @ np.arange(n + 1)) for law in laws]
            assert out.expected_first_divergence[name] == pytest.approx((min(means), max(means)), abs=1e-9)
            cdfs = np.stack([np.cumsum(law) for law in laws])
            low, high = out.first_divergence_cdf[name]
            np.testing.assert_allclose(low.numpy(), cdfs.min(0), atol=1e-9, rtol=0)
            np.testing.assert_allclose(high.numpy(), cdfs.max(0), atol=1e-9, rtol=0)
            np.testing.assert_allclose(out.keep[name][0].numpy(), box[:, 0], atol=1e-9, rtol=0)
        a = gumbel.exp().numpy()
        assert out.prob_unchanged["gumbel"] == pytest.approx(float(np.prod(a)), rel=1e-12)
        assert out.expected_first_divergence["model"] == pytest.approx(float(_law(a) @ np.arange(n + 1)), abs=1e-12)
        np.testing.assert_allclose(out.first_divergence_cdf["gumbel"].numpy(), np.cumsum(_law(a)), atol=1e-12)


def test_the_whole_string_helpers_of_plain_keep_probabilities():
    a = torch.tensor([0.9, 0.5, 0.0, 0.7], dtype=torch.float64)
    assert prob_unchanged_of(a) == 0.0
    assert expected_first_divergence_of(a) == pytest.approx(0.9 + 0.45)
    expected = torch.tensor([0.1, 0.55, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(first_divergence_cdf_of(a), expected)


# -- noise models inside the bounds (hypothesis) --------------------------------------------------

_logit = st.floats(-6, 6, allow_nan=False, width=32)


@st.composite
def _steps(draw):
    """Decoded logit rows (factual, intervened) of V <= 10 tokens and an observed token: the
    intervened row independent of the factual one, or the factual one shifted by a few levels
    (tied ratios); -inf masks on either side (top-k, top-p, exclusions)."""
    V = draw(st.integers(2, 10))
    factual = np.array(draw(st.lists(_logit, min_size=V, max_size=V)), dtype=np.float64)
    if draw(st.booleans()):
        other = np.array(draw(st.lists(_logit, min_size=V, max_size=V)), dtype=np.float64)
    else:
        other = factual + np.array(draw(st.lists(st.sampled_from([0.0, 0.5, -1.0]), min_size=V, max_size=V)))
    for row in (factual, other):
        masked = draw(st.lists(st.integers(0, V - 1), max_size=V - 1, unique=True))
        row[masked] = -np.inf
    k = draw(st.sampled_from(np.flatnonzero(np.isfinite(factual)).tolist()))
    if not np.isfinite(other).any():
        other[k] = 0.0
    return torch.tensor(factual), torch.tensor(other), torch.tensor(k)


def _within(value, interval, tolerance=1e-9):
    low, high = (float(x) for x in interval)
    return low - tolerance <= float(value) <= high + tolerance


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_steps())
def test_gumbel_max_is_inside_the_stable_bounds_and_inverse_cdf_inside_any(step):
    factual, other, k = step
    out = keep_bounds(factual, other, k)
    assert float(out["any"][0]) <= float(out["stable"][0]) <= float(out["stable"][1]) <= 1.0
    assert float(out["any"][1]) == float(out["stable"][1])
    assert _within(GumbelMax().stay_log_prob(factual, other, k).exp(), out["stable"])
    for order in ("vocabulary", "probability"):
        assert _within(InverseCDF(order).stay_log_prob(factual, other, k).exp(), out["any"])


def test_inverse_cdf_is_not_counterfactually_stable_in_either_order():
    """The README's example (vocabulary order): p uniform on 3 tokens, q = softmax(0, 0, 1);
    observing token 1 it keeps it with probability 0.273, below every stable mechanism's
    q_1 / p_1 = 0.636. Probability order: p = (0.4, 0.35, 0.25), q = (0.3, 0.45, 0.25),
    token 1 (ratio 9/7) is kept only while its interval overlaps its new one, and sends the
    rest to token 0 (ratio 3/4): 1/7 against the stable 1."""
    factual, other = torch.zeros(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    stable = keep_bounds(factual, other, torch.tensor(1))["stable"]
    keep = float(InverseCDF("vocabulary").stay_log_prob(factual, other, torch.tensor(1)).exp())
    assert keep == pytest.approx(6 / (2 + math.e) - 1, abs=1e-12)  # [1/3, 2/3) meets [1, 2) / (2 + e)
    assert float(stable[0]) == pytest.approx(3 / (2 + math.e), abs=1e-12) and keep < float(stable[0]) - 0.3
    p = torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64).log()
    q = torch.tensor([0.3, 0.45, 0.25], dtype=torch.float64).log()
    stable = keep_bounds(p, q, torch.tensor(1))["stable"]
    keep = float(InverseCDF("probability").stay_log_prob(p, q, torch.tensor(1)).exp())
    assert keep == pytest.approx(0.05 / 0.35, abs=1e-12) and float(stable[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(GumbelMax().stay_log_prob(p, q, torch.tensor(1)).exp()) == pytest.approx(1.0, abs=1e-12)


# -- ExactCounterfactual.bounds() on tiny models ---------------------------------------------------

V, T = 10, 4
PROMPT = torch.tensor([2, 3, 4])


@pytest.fixture(scope="module")
def models():
    return tiny_llama(vocab_size=V, seed=0, logit_scale=8.0), tiny_llama(vocab_size=V, seed=1, logit_scale=8.0)


def _setting(models, name):
    """(scm, intervention, observation): the intervention may name the observation's tokens."""
    lm, other = models
    swap = {"other": ModelSwap(other)}
    decoding = {"temperature + top-k": Decoding(temperature=1.3, top_k=6), "top-p": Decoding(top_p=0.9)}.get(name)
    noise = InverseCDF("vocabulary") if name == "inverse-cdf" else GumbelMax()
    scm = LanguageModelSCM(lm, T, decoding, mechanisms=swap, noise=noise)
    observed = counterfactual(scm.with_noise(GumbelMax()), PROMPT, None, {}, seed=3).factual_ids  # (6, 7, 2, 1)
    if name == "ended":  # an end of sequence at step 1, padding after it
        observed = torch.tensor([int(observed[0]), 1, 0, 0])
    factual = exact_counterfactual(scm, PROMPT, observed, {})._factual.softmax(-1)
    interventions = {
        "prompt": lambda: {"prompt": torch.tensor([2, 9, 4])},
        "forced token": lambda: {"mechanism": "other", "w_1": (int(observed[1]) + 1) % V},
        "forced, kept": lambda: {"mechanism": "other", "w_2": int(observed[2])},
        # anything but the most probable other token at step 1: the rest keep tied ratios
        "exclusion": lambda: {"exclude_1": int(factual[1].scatter(0, observed[1:2], 0.0).argmax())},
        "exclusion, observed": lambda: {"exclude_2": "factual"},
    }
    intervention = interventions.get(name, lambda: {"mechanism": "other"})()
    return scm, intervention, observed


SETTINGS = ["model swap", "temperature + top-k", "top-p", "prompt", "forced token", "forced, kept", "exclusion",
            "exclusion, observed", "inverse-cdf", "ended"]


def _oracle_box(scm, exact, intervention):
    """Per observed step, the LP's (low, high) of each class, from the abduction's factual
    logits and the intervened pass on the observation (the exclusion masked here, on the
    null intervention's logits); steps that every mechanism decides written out by hand."""
    observed = exact.observed_ids
    n = len(observed)
    if any(key.startswith("exclude_") for key in intervention):
        logits = exact_counterfactual(scm, PROMPT, observed, {})._counterfactual_logits(observed[None], n)[0]
        for key, value in intervention.items():
            t = int(key.split("_")[1])
            logits[t, int(observed[t]) if value == "factual" else value] = -math.inf
    else:
        logits = exact._counterfactual_logits(observed[None], n)[0]
    p_rows, q_rows = exact._factual.softmax(-1).numpy(), logits.double().softmax(-1).numpy()
    box = {"stable": [], "any": []}
    for t in range(n):
        k = int(observed[t])
        if any(int(w) in scm.lm.eos_token_ids for w in observed[:t]):
            ends = (1.0, 1.0) if k == scm.lm.pad_token_id else (0.0, 0.0)
            box["stable"].append(ends), box["any"].append(ends)
        elif f"w_{t}" in intervention:
            ends = (1.0, 1.0) if intervention[f"w_{t}"] == k else (0.0, 0.0)
            box["stable"].append(ends), box["any"].append(ends)
        elif np.array_equal(p_rows[t], q_rows[t]):  # the factual anchor: every mechanism keeps k
            box["stable"].append((1.0, 1.0)), box["any"].append((1.0, 1.0))
        else:
            box["stable"].append(_lp_keep(p_rows[t], q_rows[t], k, stable=True))
            box["any"].append(_lp_keep(p_rows[t], q_rows[t], k, stable=False))
    return {name: np.array(ends) for name, ends in box.items()}


@pytest.mark.parametrize("setting", SETTINGS)
def test_bounds_of_an_exact_counterfactual_equal_the_linear_program(models, setting):
    """bounds(): per-step intervals equal the LP on the passes' laws, the whole-string ones
    their products (to 1e-9); "model" equals prob_unchanged() and first_divergence(), "gumbel"
    a Gumbel-max SCM's; each lies in its class's interval."""
    scm, intervention, observed = _setting(models, setting)
    exact = exact_counterfactual(scm, PROMPT, observed, intervention)
    out = exact.bounds()
    box = _oracle_box(scm, exact, intervention)
    for name in ("stable", "any"):
        np.testing.assert_allclose(torch.stack(out.keep[name], -1).numpy(), box[name], atol=1e-9, rtol=0)
        assert out.prob_unchanged[name] == pytest.approx(tuple(np.prod(box[name], 0)), abs=1e-9)
    assert out.prob_unchanged["model"] == exact.prob_unchanged()
    law = exact.first_divergence()
    mean = float(law @ torch.arange(len(law), dtype=law.dtype))
    assert out.expected_first_divergence["model"] == pytest.approx(mean, abs=1e-12)
    torch.testing.assert_close(out.first_divergence_cdf["model"], law.cumsum(0), atol=1e-12, rtol=0)
    gumbel = exact_counterfactual(scm.with_noise(GumbelMax()), PROMPT, observed, intervention)
    assert out.prob_unchanged["gumbel"] == pytest.approx(gumbel.prob_unchanged(), abs=1e-12)
    for query in ("prob_unchanged", "expected_first_divergence"):
        table = getattr(out, query)
        assert _within(table["gumbel"], table["stable"]) and _within(table["model"], table["any"])
        assert table["any"][0] <= table["stable"][0] <= table["stable"][1] <= table["any"][1]
    if setting == "inverse-cdf":  # not counterfactually stable: below every stable mechanism here
        assert out.expected_first_divergence["model"] < out.expected_first_divergence["stable"][0] - 0.05
    if setting == "exclusion":  # tied ratios: no stable mechanism changes the string
        assert out.prob_unchanged["stable"] == pytest.approx((1.0, 1.0), abs=1e-12)
        assert out.prob_unchanged["any"][0] < 0.99


def test_bounds_to_pandas(models):
    scm, intervention, observed = _setting(models, "model swap")
    out = exact_counterfactual(scm, PROMPT, observed, intervention).bounds()
    frame = out.to_pandas()
    assert list(frame["token"]) == observed.tolist() and len(frame) == len(observed)
    assert {"keep_model", "keep_gumbel", "keep_stable_low", "keep_any_high", "cdf_stable_low"} <= set(frame.columns)
    np.testing.assert_allclose(frame["keep_stable_high"], out.keep["stable"][1].numpy())
    assert frame.attrs["prob_unchanged_any_low"] == out.prob_unchanged["any"][0]
    assert frame.attrs["expected_first_divergence_model"] == out.expected_first_divergence["model"]


def test_an_observed_token_whose_probability_underflows_gets_the_whole_interval():
    """p_k = e^-800 is below float64's range: the intervals are [0, 1], still bounds."""
    factual, other = torch.tensor([0.0, -800.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0]).double()
    out = keep_bounds(factual, other, torch.tensor(1))
    assert [tuple(map(float, ends)) for ends in out.values()] == [(0.0, 1.0), (0.0, 1.0)]
