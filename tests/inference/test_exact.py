"""Exact counterfactual probabilities against independent computations: numerical quadrature
of the integral, brute-force rejection sampling, and the Monte Carlo ``counterfactual()``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pyro_lmscm import LanguageModelSCM, ModelSwap, counterfactual, exact_counterfactual
from pyro_lmscm.inference import step_counterfactual_log_probs
from pyro_lmscm.models import Decoding, InverseCDF
from pyro_lmscm.testing import tiny_llama

INF = float("inf")


def _quadrature(logits, counterfactual_logits, k):
    """P(J = j | K = k) by numerical integration of q_j * int_{r_j}^{r_k} H^-2 (scipy.quad)."""
    p = np.exp(logits - np.logaddexp.reduce(logits))
    q = np.exp(counterfactual_logits - np.logaddexp.reduce(counterfactual_logits))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(q > 0, p / q, np.inf)

    def h(rho):
        return np.maximum(p, rho * q).sum()

    out = np.zeros(len(p))
    for j in range(len(p)):
        if j == k or q[j] == 0 or not r[j] < r[k]:
            continue
        breaks = sorted({x for x in r if r[j] < x < r[k] and np.isfinite(x)})
        edges = [r[j], *breaks, r[k]]
        out[j] = q[j] * sum(integrate.quad(lambda x: h(x) ** -2, a, b, epsabs=1e-14, epsrel=1e-12)[0]
                            for a, b in zip(edges[:-1], edges[1:]))
    out[k] = 1.0 - out.sum()
    return out


def _cases():
    rng = np.random.default_rng(0)
    for case in range(6):
        logits, other = rng.normal(0, 2, 7), rng.normal(0, 2, 7)
        if case >= 2:
            logits[rng.choice(7, 2, replace=False)] = -INF  # -inf on either side
            other[rng.choice(7, 2, replace=False)] = -INF
        k = int(rng.choice(np.flatnonzero(np.isfinite(logits))))
        yield logits, other, k


@pytest.mark.parametrize("logits, other, k", list(_cases()))
def test_one_step_equals_quadrature(logits, other, k):
    exact = step_counterfactual_log_probs(torch.tensor(logits), torch.tensor(other), torch.tensor(k)).exp().numpy()
    np.testing.assert_allclose(exact, _quadrature(logits, other, k), atol=1e-9, rtol=0)
    assert exact.sum() == pytest.approx(1.0, abs=1e-12)


def _chi_square(counts, probs):
    """p-value of Pearson's test, bins with expected count < 5 pooled."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


def _top_k_steps():
    """Steps under top-k decoding on both sides: few tokens possible, different ones."""
    rng = np.random.default_rng(1)
    for case in range(6):
        logits, other = rng.normal(0, 2, 60), rng.normal(0, 2, 60)
        logits[np.argsort(logits)[: 60 - 4 - case % 3]] = -INF
        other[np.argsort(other)[: 60 - 3 - case]] = -INF
        if case % 2:
            other[np.isfinite(other) & np.isfinite(logits)] = logits[np.isfinite(other) & np.isfinite(logits)]  # ties
        k = int(rng.choice(np.flatnonzero(np.isfinite(logits))))
        yield logits, other, k


@pytest.mark.parametrize("logits, other, k", list(_top_k_steps()))
def test_the_compact_path_equals_quadrature_and_the_full_sort(logits, other, k, monkeypatch):
    from pyro_lmscm.models import gumbel_max_counterfactual as closed_form

    args = torch.tensor(logits), torch.tensor(other), torch.tensor(k)
    possible = int((np.isfinite(logits) | np.isfinite(other)).sum())
    assert possible <= closed_form.COMPACT_SHARE * 60  # the compact path runs
    compact = step_counterfactual_log_probs(*args)
    np.testing.assert_allclose(compact.exp().numpy(), _quadrature(logits, other, k), atol=1e-9, rtol=0)
    monkeypatch.setattr(closed_form, "COMPACT_SHARE", 0.0)  # the sort of the whole vocabulary
    torch.testing.assert_close(compact, step_counterfactual_log_probs(*args), atol=1e-12, rtol=1e-10)
    monkeypatch.undo()
    # rows with different numbers of possible tokens in one batch; the second is the null intervention
    rows = torch.stack([args[0], args[0]]), torch.stack([args[1], args[0]]), torch.tensor([k, k])
    both = step_counterfactual_log_probs(*rows)
    torch.testing.assert_close(both[0], compact)
    assert both[1].exp()[k] == 1.0
    # one token per row, on the possible tokens alone, against the law over the vocabulary
    from pyro_lmscm.models.gumbel_max_counterfactual import stay_log_prob

    tokens = torch.arange(60)
    one = step_counterfactual_log_probs(args[0].expand(60, -1), args[1].expand(60, -1), args[2], tokens=tokens)
    finite = torch.isfinite(compact)
    assert torch.equal(torch.isfinite(one), finite)
    torch.testing.assert_close(one[finite], compact[finite], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(stay_log_prob(*args), compact[k], atol=1e-12, rtol=1e-10)
    pair = step_counterfactual_log_probs(*rows, tokens=torch.tensor([int(tokens[finite][0]), k]))
    torch.testing.assert_close(pair, torch.stack([compact[finite][0], both[1][k]]))


@pytest.mark.parametrize("logits, other, k", list(_cases())[:4])
def test_one_step_matches_rejection_sampling(logits, other, k):
    rng = np.random.default_rng(1)
    u = rng.gumbel(size=(400_000, 7))
    kept = u[np.argmax(logits + u, -1) == k]
    counts = np.bincount(np.argmax(other + kept, -1), minlength=7)
    exact = step_counterfactual_log_probs(torch.tensor(logits), torch.tensor(other), torch.tensor(k)).exp().numpy()
    assert _chi_square(counts, exact) > 1e-3
    fresh = np.exp(other - np.logaddexp.reduce(other))  # the interventional distribution fails
    assert _chi_square(counts, fresh) < 1e-6


def test_one_step_properties():
    torch.manual_seed(0)
    logits, k = torch.randn(50) * 3, torch.tensor(7)
    null = step_counterfactual_log_probs(logits, logits, k).exp()
    assert null[7] == 1.0 and null.sum() == 1.0
    raised = logits.clone()
    raised[7] += 2.0
    assert step_counterfactual_log_probs(logits, raised, k).exp()[7] == 1.0  # only the observed token gains
    lowered = logits.clone()
    lowered[7] -= 2.0
    assert step_counterfactual_log_probs(logits, lowered, k).exp()[7] < 1.0
    other = torch.randn(50) * 3
    base = step_counterfactual_log_probs(logits, other, k)
    perm = torch.randperm(50)
    permuted = step_counterfactual_log_probs(logits[perm], other[perm], (perm == 7).nonzero()[0, 0])
    torch.testing.assert_close(permuted, base[perm], rtol=1e-12, atol=1e-12)
    # large logits and tiny probabilities keep their precision
    huge = step_counterfactual_log_probs(logits * 3e3, other * 3e3, k)
    assert torch.isfinite(huge.logsumexp(-1)) and abs(float(huge.logsumexp(-1))) < 1e-9


# -- whole strings on a tiny model (V = 10, T = 3) ---------------------------------------------

V, T = 10, 3
PROMPT = torch.tensor([2, 3, 4])
OBSERVED = torch.tensor([5, 7, 6])


@pytest.fixture(scope="module")
def models():
    return tiny_llama(vocab_size=V, seed=0, logit_scale=8.0), tiny_llama(vocab_size=V, seed=1, logit_scale=8.0)


CANDIDATES = torch.tensor(list(itertools.product(range(V), repeat=T)))


def _settings(models):
    lm, other = models
    swap = {"other": ModelSwap(other)}
    return {
        "model swap": (LanguageModelSCM(lm, T, mechanisms=swap), {"mechanism": "other"}),
        "temperature + top-k": (LanguageModelSCM(lm, T, Decoding(temperature=1.3, top_k=6), mechanisms=swap),
                                {"mechanism": "other"}),
        "top-p": (LanguageModelSCM(lm, T, Decoding(top_p=0.9), mechanisms=swap), {"mechanism": "other"}),
        "prompt": (LanguageModelSCM(lm, T), {"prompt": torch.tensor([2, 9, 4])}),
        "forced token": (LanguageModelSCM(lm, T, mechanisms=swap), {"mechanism": "other", "w_1": 8}),
        # anything but the observed token at step 1, the factual model otherwise
        "exclusion": (LanguageModelSCM(lm, T, Decoding(top_k=7)), {"exclude_1": "factual"}),
        # the multinomial-style mechanism: the sampler draws its posterior noise, not Gumbels
        "inverse-CDF": (LanguageModelSCM(lm, T, mechanisms=swap, noise=InverseCDF()), {"mechanism": "other"}),
    }


def _observed(scm):
    """An observation the decoding can produce (sampled from the factual model)."""
    return counterfactual(scm, PROMPT, None, {}, seed=3).factual_ids


@pytest.mark.parametrize(
    "setting", ["model swap", "temperature + top-k", "top-p", "prompt", "forced token", "exclusion", "inverse-CDF"]
)
def test_string_probabilities_sum_to_one_and_match_monte_carlo(models, setting):
    scm, intervention = _settings(models)[setting]
    observed = _observed(scm)
    exact = exact_counterfactual(scm, PROMPT, observed, intervention)
    log_p = exact.log_prob(CANDIDATES)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    mc = counterfactual(scm, PROMPT, observed, intervention, num_samples=20_000, seed=0, baseline=True)
    index = {tuple(c): i for i, c in enumerate(CANDIDATES.tolist())}
    counts = np.bincount([index[tuple(r)] for r in mc.counterfactual_ids.tolist()], minlength=len(CANDIDATES))
    assert _chi_square(counts, log_p.exp().numpy()) > 1e-3
    fresh = np.bincount([index[tuple(r)] for r in mc.interventional_ids.tolist()], minlength=len(CANDIDATES))
    assert _chi_square(fresh, log_p.exp().numpy()) < 1e-6  # the interventional baseline fails
    sampled = exact.sample(20_000, seed=1)
    drawn = np.bincount([index[tuple(r)] for r in sampled.tolist()], minlength=len(CANDIDATES))
    assert _chi_square(drawn, log_p.exp().numpy()) > 1e-3


def test_unchanged_divergence_and_mode(models):
    scm, intervention = _settings(models)["model swap"]
    observed = _observed(scm)
    null = exact_counterfactual(scm, PROMPT, observed, {})
    assert null.prob_unchanged() == 1.0 and null.first_divergence()[-1] == 1.0
    exact = exact_counterfactual(scm, PROMPT, observed, intervention)
    divergence = exact.first_divergence()
    assert divergence.shape == (len(observed) + 1,) and float(divergence.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(divergence[-1]) == pytest.approx(exact.prob_unchanged(), rel=1e-12)
    log_p = exact.log_prob(CANDIDATES)
    best, score = exact.mode(num_beams=V**T)
    assert torch.equal(best, CANDIDATES[log_p.argmax()])
    assert score == pytest.approx(float(log_p.max()), abs=1e-6)  # float32 logits in other batches
    torch.testing.assert_close(exact.next_token_probs(), exact.log_prob(CANDIDATES[:, :1].unique(dim=0)).exp())
    assert math.isclose(float(exact.next_token_probs(observed[:1]).sum()), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("logits, other, k", list(_cases()))
def test_the_one_pass_stay_probability_equals_the_sorted_one(logits, other, k):
    from pyro_lmscm.models.gumbel_max_counterfactual import stay_log_prob

    full = step_counterfactual_log_probs(torch.tensor(logits), torch.tensor(other), torch.tensor(k))
    stay = stay_log_prob(torch.tensor(logits), torch.tensor(other), torch.tensor(k))
    assert float(stay) == pytest.approx(float(full[k]), abs=1e-12)


def test_prob_unchanged_equals_the_candidate_probability(models):
    scm, intervention = _settings(models)["forced token"]
    observed = _observed(scm)
    exact = exact_counterfactual(scm, PROMPT, observed, intervention)
    assert exact.prob_unchanged() == pytest.approx(float(exact.log_prob(observed[None]).exp()), abs=1e-9)
    scm, intervention = _settings(models)["temperature + top-k"]
    exact = exact_counterfactual(scm, PROMPT, _observed(scm), intervention)
    assert exact.prob_unchanged() == pytest.approx(float(exact.log_prob(exact.observed_ids[None]).exp()), abs=1e-9)


@pytest.mark.parametrize("setting", ["model swap", "temperature + top-k", "top-p", "prompt", "exclusion"])
def test_string_probabilities_equal_a_chain_of_quadratures(models, setting):
    """Every one of the V^T candidates: the product over steps of the quadrature step law
    (to 1e-9). Both sides read the same float32 logits (the abduction's factual pass, the
    intervened mechanism's pass on the candidates): what is checked is the closed form and
    the chain, not the rounding of another batch."""
    scm, intervention = _settings(models)[setting]
    observed = _observed(scm)
    exact = exact_counterfactual(scm, PROMPT, observed, intervention)
    log_p = exact.log_prob(CANDIDATES).exp().numpy()
    factual = exact._factual.numpy()
    if setting == "exclusion":  # the intervened logits without the exclusion, masked here
        logits = exact_counterfactual(scm, PROMPT, observed, {})._counterfactual_logits(CANDIDATES, T).cpu().numpy()
        logits[:, 1, int(observed[1])] = -np.inf
    else:
        logits = exact._counterfactual_logits(CANDIDATES, T).cpu().numpy()  # (B, T, V)
    eos, pad = scm.lm.eos_token_ids, scm.lm.pad_token_id
    observed_ended = [any(int(w) in eos for w in observed[:t]) for t in range(T)]
    chain = np.ones(len(CANDIDATES))
    for b, candidate in enumerate(CANDIDATES.tolist()):
        for t in range(T):
            if any(token in eos for token in candidate[:t]):
                step = np.eye(V)[pad]
            elif t < len(observed) and not observed_ended[t]:
                step = _quadrature(factual[t], logits[b, t], int(observed[t]))
            else:
                step = np.exp(logits[b, t] - np.logaddexp.reduce(logits[b, t]))
            chain[b] *= step[candidate[t]]
    np.testing.assert_allclose(log_p, chain, atol=1e-9, rtol=0)


# -- several strings in one batch: counterfactuals() and most_probable() ---------------------

PROMPTS = [PROMPT, torch.tensor([6]), torch.tensor([8, 2, 9, 3, 1, 7])]  # three lengths: left padding


@pytest.mark.parametrize("setting", ["model swap", "temperature + top-k", "prompt", "forced token"])
def test_a_batch_of_strings_has_each_strings_exact_counterfactual_law(models, setting):
    """Each string of a left-padded batch: its counterfactual draws follow its own exact law
    (computed alone, teacher-forced), its baseline does not."""
    from pyro_lmscm import counterfactuals

    scm, intervention = _settings(models)[setting]
    observed = [counterfactual(scm, p, None, {}, seed=3 + i).factual_ids for i, p in enumerate(PROMPTS)]
    length = min(len(o) for o in observed)
    observed = [o[:length] for o in observed]  # one observed horizon per batch
    results = counterfactuals(scm, PROMPTS, observed, intervention, num_samples=20_000, seed=0, baseline=True)
    index = {tuple(c): i for i, c in enumerate(CANDIDATES.tolist())}
    for prompt, obs, result in zip(PROMPTS, observed, results):
        assert torch.equal(result.prompt_ids, prompt) and torch.equal(result.factual_ids, obs)
        exact = exact_counterfactual(scm, prompt, obs, intervention)
        p = exact.log_prob(CANDIDATES).exp().numpy()
        counts = np.bincount([index[tuple(r)] for r in result.counterfactual_ids.tolist()], minlength=len(p))
        assert _chi_square(counts, p) > 1e-3
        fresh = np.bincount([index[tuple(r)] for r in result.interventional_ids.tolist()], minlength=len(p))
        assert _chi_square(fresh, p) < 1e-6  # the interventional baseline fails
        alone = counterfactual(scm, prompt, obs, intervention, seed=0)
        assert result.log_prob_factual == pytest.approx(alone.log_prob_factual, abs=1e-5)


def test_a_batch_samples_each_factual_string_from_its_prompt(models):
    """Sampled factual strings (observed=None): string i follows p(. | prompt_i) (exact,
    from the scorer), and the null intervention gives it back in every draw."""
    from pyro_lmscm import counterfactuals
    from pyro_lmscm.inference.scoring import string_log_prob

    scm, _ = _settings(models)["model swap"]
    firsts = {i: [] for i in range(len(PROMPTS))}
    for seed in range(300):
        for i, result in enumerate(counterfactuals(scm, PROMPTS, None, {}, num_samples=2, seed=seed)):
            assert (result.counterfactual_ids[:, : len(result.factual_ids)] == result.factual_ids).all()
            firsts[i].append(int(result.factual_ids[0]))
    first_tokens = torch.arange(V)[:, None]
    for i, prompt in enumerate(PROMPTS):
        p = string_log_prob(scm, prompt, first_tokens).exp().numpy()
        counts = np.bincount(firsts[i], minlength=V)
        assert _chi_square(counts, p) > 1e-3
        other = string_log_prob(scm, PROMPTS[(i + 1) % 3], first_tokens).exp().numpy()
        assert _chi_square(counts, other) < 1e-6  # another prompt's law fails


def test_left_padded_logits_equal_each_prompt_alone(models):
    from pyro_lmscm.lm import left_pad

    lm, _ = models
    batch = lm.logits(left_pad(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batch[i, -len(prompt) :], lm.logits(prompt), atol=1e-5, rtol=1e-5)
    logits, cache = lm.prefill(left_pad(PROMPTS))
    token = torch.tensor([4, 4, 4])
    logits, cache = lm.step(token, cache)
    for i, prompt in enumerate(PROMPTS):
        alone = lm.logits(torch.cat([prompt, token[:1]]))[-1]
        torch.testing.assert_close(logits[i], alone, atol=1e-5, rtol=1e-5)


def test_bad_batches_are_refused(models):
    from pyro_lmscm import counterfactuals
    from pyro_lmscm.errors import InferenceError, ObservationError

    scm, intervention = _settings(models)["model swap"]
    with pytest.raises(InferenceError, match="one length"):
        counterfactuals(scm, PROMPTS[:2], [torch.tensor([5, 7]), torch.tensor([5])], intervention)
    with pytest.raises(InferenceError, match="non-empty list"):
        counterfactuals(scm, [], None, intervention)
    with pytest.raises(InferenceError, match="depends on each observation"):
        counterfactuals(scm, PROMPTS[:2], [torch.tensor([5, 7]), torch.tensor([5, 6])], {"exclude_1": "factual"})
    with pytest.raises(ObservationError, match="padded"):
        scm.check_prompt(torch.tensor([[2, -1, 3]]))  # padding inside a prompt


@pytest.mark.parametrize("setting", ["model swap", "temperature + top-k", "forced token"])
def test_most_probable_of_several_strings_equals_brute_force(models, setting):
    """One beam search over three strings of three prompt lengths: each string's mode is the
    argmax of its exact law over all V^T strings."""
    from pyro_lmscm.inference import most_probable

    scm, intervention = _settings(models)[setting]
    exacts = []
    for i, prompt in enumerate(PROMPTS):
        observed = counterfactual(scm, prompt, None, {}, seed=3 + i).factual_ids
        exacts.append(exact_counterfactual(scm, prompt, observed, intervention))
    modes = most_probable(exacts, num_beams=V**T)
    for exact, (best, score) in zip(exacts, modes):
        log_p = exact.log_prob(CANDIDATES)
        assert torch.equal(best, CANDIDATES[log_p.argmax()])
        assert score == pytest.approx(float(log_p.max()), abs=1e-5)  # cached vs teacher-forced rounding
        alone, alone_score = exact.mode(num_beams=V**T)
        assert torch.equal(alone, best) and alone_score == pytest.approx(score, abs=1e-5)
    greedy = most_probable(exacts, num_beams=1)  # a beam of one is a lower bound
    assert all(g[1] <= m[1] + 1e-6 for g, m in zip(greedy, modes))


@pytest.mark.parametrize("setting", ["temperature + top-k", "top-p", "forced token", "exclusion"])
def test_the_beams_on_the_possible_tokens_alone_equal_the_beams_on_the_vocabulary(models, setting, monkeypatch):
    """Under top-k or top-p decoding the beam search runs each step's chain on the tokens
    possible at that step alone, all strings in one call (BEAM_COMPACT_SHARE = 1 makes every
    decoding of the 10-token vocabulary count as such): every beam's string and score must be
    those of the chain over the whole vocabulary, one string at a time, a brute-force search
    included; and the compact path must really run (a beam of one on each path too). The
    second string is observed for one step only (but under the exclusion, which needs step 1
    observed): its later steps take the prior noise."""
    from pyro_lmscm.inference import exact as exact_module
    from pyro_lmscm.inference import most_probable

    scm, intervention = _settings(models)[setting]
    exacts = []
    for i, prompt in enumerate(PROMPTS):
        observed = counterfactual(scm, prompt, None, {}, seed=3 + i).factual_ids
        short = i == 1 and setting != "exclusion"  # (exclude_1='factual' needs step 1 observed)
        exacts.append(exact_counterfactual(scm, prompt, observed[: 1 if short else None], intervention))
    assert setting == "exclusion" or not exacts[1]._abducted(1)  # past its observation: the prior noise
    calls = []
    chain = exact_module.chain_log_probs
    monkeypatch.setattr(exact_module, "chain_log_probs", lambda *a, **kw: calls.append(a[-1] is not None
                        if len(a) == 6 else kw.get("columns") is not None) or chain(*a, **kw))
    wide = {beams: most_probable(exacts, num_beams=beams, lengths=[3, 2, 3]) for beams in (1, 3, V**T)}
    assert calls and not any(calls)  # (BEAM_COMPACT_SHARE of 10 tokens: at most 2 possible)
    monkeypatch.setattr(exact_module, "BEAM_COMPACT_SHARE", 1.0)
    calls.clear()
    for beams, expected in wide.items():
        got = most_probable(exacts, num_beams=beams, lengths=[3, 2, 3])
        for (ids, score), (wide_ids, wide_score) in zip(got, expected):
            assert torch.equal(ids, wide_ids) and score == pytest.approx(wide_score, abs=1e-12)
    assert calls and all(calls)
    for exact, (ids, score) in zip(exacts, got):  # the brute force, for the full-length strings
        if ids.shape[-1] == T:
            log_p = exact.log_prob(CANDIDATES)
            assert torch.equal(ids, CANDIDATES[log_p.argmax()]) and score == pytest.approx(float(log_p.max()), abs=1e-5)


@pytest.mark.parametrize("top_k", [2, 6])
@pytest.mark.parametrize("intervention", [{"mechanism": "other"}, {"mechanism": "other", "w_1": 8}])
def test_the_beams_from_the_decoded_support_alone_equal_the_beams_from_whole_rows(models, top_k, intervention,
                                                                                  monkeypatch):
    """Under top-k decoding a beam step takes each beam's counterfactual side from
    ``Decoding.support`` (a few columns) instead of its decoded row of V: every string and score
    must be bit for bit those of the decoded rows (``support`` made to refuse), on a vocabulary
    of 10 where 2k + 1 = 5 columns leave tokens out (k = 2) or hold all (k = 6), with a forced
    token (whose column joins the others); and the support must really have been used."""
    from pyro_lmscm.inference import exact as exact_module
    from pyro_lmscm.inference import most_probable

    lm, other = models
    scm = LanguageModelSCM(lm, T, Decoding(temperature=1.3, top_k=top_k), mechanisms={"other": ModelSwap(other)})
    exacts = []
    for i, prompt in enumerate(PROMPTS):
        observed = counterfactual(scm, prompt, None, {}, seed=3 + i).factual_ids
        exacts.append(exact_counterfactual(scm, prompt, observed[: 1 if i == 1 else None], intervention))
    monkeypatch.setattr(exact_module, "BEAM_COMPACT_SHARE", 1.0)
    found = []
    support = Decoding.support
    monkeypatch.setattr(Decoding, "support", lambda self, raw: found.append(support(self, raw)) or found[-1])
    fast = {beams: most_probable(exacts, num_beams=beams, lengths=[3, 2, 3]) for beams in (1, 3, V**T)}
    assert found and all(f is not None for f in found)
    monkeypatch.setattr(Decoding, "support", lambda self, raw: None)
    for beams, expected in fast.items():
        for (ids, score), (rows_ids, rows_score) in zip(most_probable(exacts, num_beams=beams, lengths=[3, 2, 3]),
                                                        expected):
            assert torch.equal(ids, rows_ids) and score == rows_score


@pytest.mark.parametrize("setting", ["model swap", "temperature + top-k", "prompt", "forced token", "exclusion"])
def test_observed_token_log_probs_of_several_strings_equal_each_alone(models, setting):
    from pyro_lmscm.inference.exact import observed_token_log_probs

    scm, intervention = _settings(models)[setting]
    exacts = []
    for i, prompt in enumerate(PROMPTS):
        observed = counterfactual(scm, prompt, None, {}, seed=3 + i).factual_ids
        exacts.append(exact_counterfactual(scm, prompt, observed, intervention))
    for exact, batched in zip(exacts, observed_token_log_probs(exacts, batch_size=2)):
        torch.testing.assert_close(batched.exp(), exact.observed_token_log_probs().exp(), atol=1e-6, rtol=1e-5)


def test_the_closed_form_in_chunks_of_rows_equals_it_at_once(monkeypatch):
    from pyro_lmscm.models import gumbel_max_counterfactual as closed_form

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 40, generator=generator) * 3
    other = logits + torch.randn(9, 40, generator=generator)
    other[::3, :30] = -INF  # rows with few possible tokens among rows with many
    logits[::3, :30] = -INF
    k = torch.tensor([35, 2, 7, 31, 0, 1, 39, 5, 9])
    whole = step_counterfactual_log_probs(logits, other, k)
    tokens = torch.tensor([36, 2, 3, 29, 0, 8, 39, 1, 9])  # observed (rows 1, 4, 6, 8), others, impossible (3)
    gathered = whole.gather(-1, tokens[:, None]).squeeze(-1)
    alone = step_counterfactual_log_probs(logits, other, k, tokens=tokens)
    # other tokens by one sum of segments, the observed token by the one-pass stay formula
    torch.testing.assert_close(alone.exp(), gathered.exp(), rtol=1e-12, atol=1e-14)
    assert torch.equal(alone.isinf(), gathered.isinf())  # the impossible token (3) and r_j >= r_k alike
    monkeypatch.setattr(closed_form, "CACHE_ELEMENTS", 2 * 40)  # two rows at a time
    assert torch.equal(step_counterfactual_log_probs(logits, other, k), whole)
    assert torch.equal(step_counterfactual_log_probs(logits, other, k, tokens=tokens), alone)
    assert torch.allclose(whole.exp().sum(-1), torch.ones(9, dtype=torch.float64), atol=1e-12)
    from pyro_lmscm.models import GumbelMax, InverseCDF

    for noise in (GumbelMax(), InverseCDF()):  # the noise models' one-token path (InverseCDF: the default)
        full = noise.counterfactual_log_probs(logits, other, k).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(noise.counterfactual_token_log_probs(logits, other, k, tokens).exp(), full.exp(),
                                   rtol=1e-12, atol=1e-14)


def test_the_linear_cumulative_sums_equal_torch_logcumsumexp():
    from pyro_lmscm.models import gumbel_max_counterfactual as closed_form

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 3000, generator=generator, dtype=torch.float64) * 40
    rows[1] *= 20  # spans thousands of nats: the exact path
    rows[2, ::3] = -INF  # impossible tokens
    rows[3] = -INF  # nothing possible
    rows[4, 5] = INF
    rows[5] = rows[5] / 40 - 1e4  # far below zero, a narrow span
    expected = torch.logcumsumexp(rows, -1)
    got = closed_form._logcumsumexp(rows)
    finite = expected.isfinite()
    assert torch.equal(got.isfinite(), finite) and torch.equal(got[~finite], expected[~finite])
    scale = max(1.0, float(expected[finite].abs().max()))
    torch.testing.assert_close(got[finite], expected[finite], rtol=0, atol=1e-9 * scale)
    assert float((got[0] - expected[0]).abs().max()) < 1e-10  # linear space: a relative error of 1e-10 at most
    # the naive linear sum underflows where the span is wide: the fallback is needed
    naive = rows[1].max() + torch.exp(rows[1] - rows[1].max()).cumsum(-1).log()
    assert not torch.isfinite(naive).all() and torch.isfinite(got[1]).all()


def test_the_packed_sort_orders_every_row_as_argsort_does(monkeypatch):
    """The closed form's sort packs each float64's order-preserving bits, less the low bits that
    hold the index: the sorted values must equal numpy's argsort's, for signs, zeros, infinities,
    exact ties and distinct values that share the kept bits (a row argsort sorts again)."""
    from pyro_lmscm.models import gumbel_max_counterfactual as closed_form

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 5000, generator=generator, dtype=torch.float64) * 30
    rows[1, ::7] = INF  # impossible tokens: +inf ratios
    rows[1, 3::11] = -INF
    rows[2, :2500] = rows[2, 2500:]  # exact ties
    rows[3, :2] = torch.tensor([0.0, -0.0])
    rows[4] = 1.0 + torch.arange(5000, dtype=torch.float64).flip(0) * 2.0**-50  # distinct, one packed key
    rows[5] = -rows[4].flip(0)  # (decreasing too: index order is the wrong one)
    calls = []
    argsort = np.argsort
    monkeypatch.setattr(closed_form.np, "argsort", lambda a, **kw: calls.append(a.shape) or argsort(a, **kw))
    order, ranked = closed_form._argsort(rows)
    assert torch.equal(order.sort(-1).values, torch.arange(5000).expand(6, -1))  # a permutation of each row
    expected = torch.from_numpy(np.sort(rows.numpy(), axis=-1))
    assert torch.equal(rows.gather(-1, order), expected) and torch.equal(ranked, expected)
    assert calls == [(2, 5000)]  # only the rows whose values share their packed keys were sorted again


def test_the_sort_on_two_threads_orders_each_row_as_on_one():
    """torch.sort splits the rows of the packed keys across torch's threads: every row must
    come out as numpy's sort of the whole array gives it, for an uneven split (5 rows on 2
    threads), and to the last index as on one thread (ties included: the packed keys are
    distinct)."""
    from pyro_lmscm.models import gumbel_max_counterfactual as closed_form

    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 3000, generator=generator, dtype=torch.float64) * 30
    rows[2, :1500] = rows[2, 1500:]  # exact ties
    expected = torch.from_numpy(np.sort(rows.numpy(), axis=-1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        order, ranked = closed_form._argsort(rows)
        torch.set_num_threads(1)
        alone, _ = closed_form._argsort(rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ranked, expected) and torch.equal(rows.gather(-1, order), expected)
    assert torch.equal(order.sort(-1).values, torch.arange(3000).expand(5, -1))  # a permutation of each row
    assert torch.equal(alone, order)


def test_ratios_tied_up_to_rounding_change_nothing_but_rounding(monkeypatch):
    """bfloat16 logits make many log ratios equal up to the rounding of log p - log q; the sort
    takes those within TIE_ULPS as tied. The law and the token probabilities must equal the ones
    of the exact sort (TIE_ULPS = 0) to rounding, and keep counterfactual stability exactly."""
    from pyro_lmscm.models import gumbel_max_counterfactual as closed_form

    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 4000, generator=generator) * 3).bfloat16().double()
    other = (logits + torch.randn(4, 4000, generator=generator).bfloat16().double()).bfloat16().double()
    k, tokens = logits.argmax(-1), other.argmax(-1)
    log_r = logits.log_softmax(-1) - other.log_softmax(-1)
    near = (log_r[:, :, None] - log_r[:, None, :200]).abs()
    assert bool(((near > 0) & (near < 1e-13)).any())  # ratios equal but for rounding
    tied = step_counterfactual_log_probs(logits, other, k), step_counterfactual_log_probs(logits, other, k, tokens)
    monkeypatch.setattr(closed_form, "TIE_ULPS", 0.0)
    exact = step_counterfactual_log_probs(logits, other, k), step_counterfactual_log_probs(logits, other, k, tokens)
    for got, expected in zip(tied, exact):  # (a ratio an ulp below k's may lose its 1e-19)
        torch.testing.assert_close(got.exp(), expected.exp(), rtol=1e-12, atol=1e-15)
    moved = tied[0].isfinite() != exact[0].isfinite()
    assert bool(((log_r - log_r.gather(-1, k[:, None])).abs()[moved] < 1e-13).all())
    # only a token whose ratio beats k's replaces it (without the stability mask, 18 tokens
    # tied with k got about 1e-19 from a ratio an ulp below theirs sorted between them and k)
    stable = log_r < log_r.gather(-1, k[:, None])
    assert bool((tied[0].exp()[~stable & (torch.arange(4000) != k[:, None])] == 0).all())


def test_the_linear_closed_form_equals_the_log_space_one(monkeypatch):
    """Rows whose log ratios stay within RATIO_SPAN run in linear space; they must give the
    log-space numbers, also near the bound (ratios of e^+-190) and for probabilities far
    below a float64's range; past the bound, linear space would overflow."""
    from pyro_lmscm.models import gumbel_max_counterfactual as closed_form

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=generator, dtype=torch.float64) * 3
    other = logits + torch.randn(6, 300, generator=generator, dtype=torch.float64) * 2
    other[1] = logits[1] + torch.linspace(-95, 95, 300, dtype=torch.float64)  # log ratios span +-190
    logits[2, :100] -= 900  # factual probabilities below e^-900 (0 as floats)
    other[2, :100] -= 900
    other[3] = logits[3]  # the null intervention: nothing moves
    k = torch.tensor([5, 150, 200, 7, 0, 299])
    tokens = torch.stack([row.argmax() for row in step_counterfactual_log_probs(logits, other, k)])
    tokens[4] = 1
    log_r = logits.log_softmax(-1) - other.log_softmax(-1)
    assert float(log_r.abs().amax()) <= closed_form.RATIO_SPAN < float(log_r[1].abs().amax()) + 20
    linear = step_counterfactual_log_probs(logits, other, k), step_counterfactual_log_probs(logits, other, k, tokens)
    monkeypatch.setattr(closed_form, "RATIO_SPAN", -1.0)  # every row in log space
    log_space = step_counterfactual_log_probs(logits, other, k), step_counterfactual_log_probs(logits, other, k, tokens)
    for got, expected in zip(linear, log_space):  # log-probabilities to 1e-9, tiny ones included
        finite = expected.isfinite()
        assert torch.equal(got.isfinite(), finite)
        torch.testing.assert_close(got[finite], expected[finite], rtol=0, atol=1e-9)
    tiny = log_space[0][2]
    assert bool(((tiny < -300) & tiny.isfinite()).any())  # probabilities below e^-300 took part
    assert linear[0][3].exp()[7] == 1.0
    monkeypatch.undo()
    # ratios of e^+-400 take the log-space path; forced into linear space, probabilities underflow
    wide = logits[:1], logits[:1] + torch.linspace(-200, 200, 300, dtype=torch.float64), k[:1]
    right = step_counterfactual_log_probs(*wide)
    assert torch.allclose(right.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)
    monkeypatch.setattr(closed_form, "RATIO_SPAN", math.inf)
    forced = step_counterfactual_log_probs(*wide)
    assert int(right.isfinite().sum()) > int(forced.isfinite().sum())


@pytest.mark.parametrize("setting", ["model swap", "temperature + top-k", "prompt", "forced token", "exclusion"])
def test_candidate_token_log_probs_of_several_strings_equal_the_chain_of_each(models, setting):
    """Candidates of three strings (three prompt lengths, 2-4 candidates of 1-3 tokens each)
    in left-padded passes of 3 rows that cut across strings: each token's log-probability is
    the chain's own next-token law after its prefix (one unpadded pass per prefix)."""
    from pyro_lmscm.errors import InferenceError
    from pyro_lmscm.inference import counterfactual_token_log_probs

    scm, intervention = _settings(models)[setting]
    exacts, candidates = [], []
    generator = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(PROMPTS):
        observed = counterfactual(scm, prompt, None, {}, seed=3 + i).factual_ids
        exacts.append(exact_counterfactual(scm, prompt, observed, intervention))
        candidates.append(torch.randint(0, V, (2 + i, 3 - i), generator=generator))
    batched = counterfactual_token_log_probs(exacts, candidates, batch_size=3)
    wrong = counterfactual_token_log_probs(exacts[::-1], candidates, batch_size=3)  # candidates of another string's law
    differs = False
    for exact, rows, log_q, other in zip(exacts, candidates, batched, wrong):
        assert log_q.shape == rows.shape and log_q.dtype == torch.float64
        chain = torch.tensor([
            [float(exact.next_token_probs(row[:t])[row[t]].log()) for t in range(rows.shape[-1])] for row in rows
        ], dtype=torch.float64)
        torch.testing.assert_close(log_q.exp(), chain.exp(), atol=1e-6, rtol=1e-5)
        differs |= not torch.allclose(other.exp(), chain.exp(), atol=1e-3)
    assert differs  # the baseline, each string's candidates under another string's law, fails
    with pytest.raises(InferenceError, match="one candidate tensor per string"):
        counterfactual_token_log_probs(exacts, candidates[:2])
