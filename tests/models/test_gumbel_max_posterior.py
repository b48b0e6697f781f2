import math

import pytest
import torch
from scipy import stats

from pyro_lmscm.inference import GumbelMaxPosterior


def _prior_rejection(logits, k, n):
    """Prior draws u ~ Gumbel(0,1)^V kept when argmax(logits + u) == k."""
    kept = []
    while sum(len(x) for x in kept) < n:
        u = torch.distributions.Gumbel(0.0, 1.0).sample((20 * n, logits.shape[-1]))
        kept.append(u[torch.argmax(logits + u, -1) == k])
    return torch.cat(kept)[:n]


@pytest.mark.parametrize("k", [0, 2])
def test_samples_match_rejection_sampling(k):
    torch.manual_seed(0)
    logits = torch.tensor([1.5, 0.2, -0.7, float("-inf"), 0.0])
    posterior = GumbelMaxPosterior(logits, torch.tensor(k)).sample((4000,))
    reference = _prior_rejection(logits, k, 4000)
    assert bool((torch.argmax(logits + posterior, -1) == k).all())
    for v in range(5):
        p = stats.ks_2samp(posterior[:, v].numpy(), reference[:, v].numpy()).pvalue
        assert p > 1e-3, (v, p)
    # baseline: the prior is not the posterior (fails the same test on the observed coordinate)
    prior = torch.distributions.Gumbel(0.0, 1.0).sample((4000, 5))
    assert stats.ks_2samp(prior[:, k].numpy(), reference[:, k].numpy()).pvalue < 1e-6


def test_log_prob_is_prior_minus_log_evidence():
    logits = torch.randn(3, 6) * 2
    k = torch.tensor([0, 3, 5])
    d = GumbelMaxPosterior(logits, k)
    u = d.sample()
    expected = (-(u + torch.exp(-u))).sum(-1) - logits.log_softmax(-1).gather(-1, k[:, None])[:, 0]
    torch.testing.assert_close(d.log_prob(u), expected)
    # noise under which k does not win is impossible
    assert bool(torch.isneginf(d.log_prob(torch.zeros(3, 6) - 50 * torch.nn.functional.one_hot(k, 6))).all())


def test_log_prob_normalises():
    """Monte Carlo: E_prior[q(u) / p(u)] = 1 (q is a density)."""
    torch.manual_seed(1)
    logits = torch.tensor([0.3, -1.0, 2.0])
    d = GumbelMaxPosterior(logits, torch.tensor(1))
    u = torch.distributions.Gumbel(0.0, 1.0).sample((200_000, 3))
    prior = (-(u + torch.exp(-u))).sum(-1)
    ratio = (d.log_prob(u) - prior).exp()
    assert abs(float(ratio.mean()) - 1.0) < 0.03


def test_stable_for_huge_logits():
    logits = torch.tensor([1e4, -1e4, 3e4, 2e4])
    u = GumbelMaxPosterior(logits, torch.tensor(1)).sample((100,))
    assert bool(torch.isfinite(u).all())
    assert bool((torch.argmax(logits + u, -1) == 1).all())


@pytest.mark.parametrize("block", [None, 1], ids=["one-block", "row-blocks"])
def test_observed_token_wins_in_floating_point(block, monkeypatch):
    """At logits of 3e4, rounding of l + u flips about 2 in 10^4 draws before the fix-up;
    with it the observed token wins every draw, also when the check runs block by block,
    and in the unbatched case. Without the fix-up (baseline) some draws lose."""
    from pyro_lmscm.models import gumbel_max_posterior

    if block is not None:
        monkeypatch.setattr(gumbel_max_posterior, "_SCRATCH", block)
    logits = torch.tensor([[3e4, 3e4 - 0.01, -3e4], [3e4, 3e4 + 0.01, 2e4]])
    value = torch.tensor([1, 0])
    torch.manual_seed(0)
    u = GumbelMaxPosterior(logits, value).sample((20000,))
    assert bool((torch.argmax(logits + u, -1) == value).all())
    single = GumbelMaxPosterior(logits[0], value[0]).sample()
    assert int(torch.argmax(logits[0] + single)) == 1
    monkeypatch.setattr(gumbel_max_posterior, "_break_rounding_ties", lambda *args: None)
    torch.manual_seed(0)
    raw = GumbelMaxPosterior(logits, value).sample((20000,))
    assert not bool((torch.argmax(logits + raw, -1) == value).all())


def test_margin_conditions_on_winning_by_delta():
    logits = torch.zeros(4)
    d = GumbelMaxPosterior(logits, torch.tensor(2), margin=0.5)
    u = d.sample((5000,))
    g = logits + u
    gap = g[:, 2] - torch.cat([g[:, :2], g[:, 3:]], -1).amax(-1)
    assert float(gap.min()) >= 0.5 - 1e-4
    shifted = torch.tensor([0.0, 0.0, -0.5, 0.0])
    torch.testing.assert_close(
        d.log_prob(u[:3]), (-(u[:3] + torch.exp(-u[:3]))).sum(-1) - shifted.log_softmax(-1)[2]
    )
    assert math.isclose(float(shifted.log_softmax(-1)[2].exp()), math.exp(-0.5) / (3 + math.exp(-0.5)), rel_tol=1e-6)


def test_expand_and_inactive_rows_are_prior():
    d = GumbelMaxPosterior(torch.randn(5), torch.tensor(1), active=torch.tensor(False))
    assert d.expand((7,)).batch_shape == (7,)
    u = d.expand((20000,)).sample()
    # with the observed token inactive its coordinate is plain Gumbel(0, 1): mean = Euler's gamma
    assert abs(float(u[:, 1].mean()) - 0.5772) < 0.03


def test_standard_exponential_is_seeded_by_torch_and_independent_of_threads():
    from pyro_lmscm.models.gumbel_max_posterior import _BLOCK, standard_exponential

    draws = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            draws.append(standard_exponential((3, _BLOCK), dtype=torch.float64))  # three blocks
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1])
    assert float(draws[0].min()) > 0.0
    sample = draws[0].flatten()[:20000].numpy()
    assert stats.kstest(sample, "expon").pvalue > 1e-3
    assert stats.kstest(1.1 * sample, "expon").pvalue < 1e-6  # baseline: Exp with mean 1.1 fails


_SHAPES = {
    "one row": ((7,), (7,)),
    "shared logits": ((7,), (4, 7)),
    "rows": ((4, 7), (4, 7)),
    "shared noise": ((4, 7), (7,)),
    "broadcast both": ((3, 1, 7), (2, 7)),
    "a plate over rows": ((2, 7), (5, 2, 7)),
    "no rows": ((4, 7), (0, 4, 7)),
}


@pytest.mark.parametrize("scratch", [1, 15, 1 << 16], ids=["a row a block", "two rows a block", "one block"])
@pytest.mark.parametrize("shapes", _SHAPES.values(), ids=_SHAPES.keys())
def test_perturbed_rows_are_the_rows_of_the_sum_in_one_reused_scratch(shapes, scratch, monkeypatch):
    """Each block is ``(logits + u)`` flattened to rows, at its rows, bit for bit (against
    the whole sum), the blocks cover every row once and in order, and all share one scratch
    of at most ``_SCRATCH`` entries (or one row)."""
    from pyro_lmscm.models import gumbel_max_posterior
    from pyro_lmscm.models.gumbel_max_posterior import perturbed_rows

    monkeypatch.setattr(gumbel_max_posterior, "_SCRATCH", scratch)
    torch.manual_seed(0)
    logits, u = torch.randn(shapes[0]), torch.randn(shapes[1])
    whole = (logits + u).reshape(-1, 7)
    seen, storages, covered = torch.full_like(whole, float("nan")), set(), []
    for rows, block in perturbed_rows(logits, u):
        assert block.shape == (rows.stop - rows.start, 7)
        assert block.numel() <= max(scratch, 7) or len(whole) == 0
        seen[rows] = block
        covered.extend(range(rows.start, rows.stop))
        storages.add(block.untyped_storage().data_ptr())
    assert torch.equal(seen, whole)
    assert covered == list(range(len(whole)))
    assert len(storages) == 1


def test_perturbed_rows_read_broadcast_and_strided_operands_without_copying_them_whole(monkeypatch):
    """Logits expanded over a plate, and noise that is a transposed view: the same rows."""
    from pyro_lmscm.models import gumbel_max_posterior
    from pyro_lmscm.models.gumbel_max_posterior import perturbed_rows

    monkeypatch.setattr(gumbel_max_posterior, "_SCRATCH", 10)
    torch.manual_seed(1)
    logits = torch.randn(3, 5).expand(4, 3, 5)
    u = torch.randn(5, 3, 4).permute(2, 1, 0)  # (4, 3, 5), not contiguous
    blocks = [(rows, block.clone()) for rows, block in perturbed_rows(logits, u)]
    assert len(blocks) == 6  # 12 rows, two per block
    assert torch.equal(torch.cat([b for _, b in blocks]), (logits + u).reshape(12, 5))


@pytest.mark.parametrize("scratch", [1, 1 << 16])
def test_gumbel_max_structural_and_statistics_are_those_of_the_whole_sum(scratch, monkeypatch):
    """``structural`` is ``argmax(logits + u)`` and ``top_gumbel`` its maximum, however the
    rows are blocked; ties (a row of equal scores) go to the first token, as ``argmax``'s."""
    from pyro_lmscm.models import GumbelMax, gumbel_max_posterior

    monkeypatch.setattr(gumbel_max_posterior, "_SCRATCH", scratch)
    torch.manual_seed(2)
    noise = GumbelMax()
    logits = torch.randn(6, 9)
    u = torch.randn(5, 6, 9)
    u[0, 0] = -logits[0]  # a row of ties
    assert torch.equal(noise.structural(logits, u), torch.argmax(logits + u, -1))
    assert int(noise.structural(logits, u)[0, 0]) == 0
    assert torch.equal(noise.structural(logits[0], u[:, 0]), torch.argmax(logits[0] + u[:, 0], -1))
    drawn = torch.randn(4, 9)
    stats_ = noise.noise_statistics(logits[1], 3, drawn)
    assert torch.equal(stats_["top_gumbel"], (logits[1] + drawn).amax(-1))
    assert torch.equal(stats_["observed_noise"], drawn[:, 3])


def test_perturbed_rows_off_the_cpu_are_one_block():
    """On another device (here the meta device) the scratch holds every row: one block, one
    launch per reduction, as the CPU's whole sum was."""
    from pyro_lmscm.models.gumbel_max_posterior import perturbed_rows

    logits, u = torch.empty(49152, device="meta"), torch.empty(16, 49152, device="meta")
    blocks = list(perturbed_rows(logits, u))
    assert [(rows, block.shape) for rows, block in blocks] == [(slice(0, 16), (16, 49152))]
    on_cpu = list(perturbed_rows(torch.zeros(49152), torch.zeros(16, 49152)))
    assert len(on_cpu) == 8  # the baseline: two rows a block
