import pytest
import torch

from pyro_lmscm import LanguageModelSCM, counterfactual
from pyro_lmscm.errors import MechanismError
from pyro_lmscm.interventions import AffineSteering
from pyro_lmscm.testing import (
    assert_restored,
    assert_rows_match_separate_runs,
    by_hand,
    snapshot,
    tiny_llama,
)

PROMPT = torch.tensor([2, 3, 4])
CONTINUATION = torch.tensor([5, 9, 14, 7, 3, 11])
SOURCE = ["the man said he went home", "his old story", "he walked to work and smiled", "the young man"]
TARGET = ["the woman said she went home", "her old story", "she walked to work and smiled", "the young woman"]


def random_cov(d, generator, scale=1.0):
    m = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return scale * (m @ m.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


# ------------------------------------------------------------------ the map


def test_map_sends_the_source_moments_to_the_target_moments():
    """Algebraically exact: A S_s A = S_t, so the empirical moments move exactly."""
    g = torch.Generator().manual_seed(0)
    d = 8
    x = torch.randn(300, d, generator=g, dtype=torch.float64) @ random_cov(d, g).T + 2.0
    target_mean = torch.randn(d, generator=g, dtype=torch.float64)
    target_cov = random_cov(d, g, scale=3.0)
    mimic = AffineSteering(0, x.mean(0), target_mean, torch.cov(x.T), target_cov)
    y = mimic.transport(x)
    torch.testing.assert_close(y.mean(0), target_mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), target_cov, atol=1e-10, rtol=0)
    # A is symmetric positive definite (the optimal-transport map is the gradient of a convex function)
    torch.testing.assert_close(mimic.matrix, mimic.matrix.T)
    assert float(torch.linalg.eigvalsh(mimic.matrix)[0]) > 0


def test_map_of_gaussian_samples_is_the_target_gaussian():
    g = torch.Generator().manual_seed(1)
    d = 4
    source_mean, target_mean = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64)
    source_cov, target_cov = random_cov(d, g), random_cov(d, g, scale=2.0)
    mimic = AffineSteering(0, source_mean, target_mean, source_cov, target_cov)
    x = torch.distributions.MultivariateNormal(source_mean, source_cov).sample((200_000,))
    y = mimic.transport(x)
    torch.testing.assert_close(y.mean(0), target_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), target_cov, atol=0.05, rtol=0.03)


def test_map_is_the_identity_when_source_equals_target(lm):
    g = torch.Generator().manual_seed(2)
    d = 32
    mean, cov = torch.randn(d, generator=g, dtype=torch.float64), random_cov(d, g)
    mimic = AffineSteering(1, mean, mean, cov, cov)
    torch.testing.assert_close(mimic.matrix, torch.eye(d, dtype=torch.float64), atol=1e-9, rtol=0)
    x = torch.randn(10, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mimic.transport(x), x, atol=1e-9, rtol=0)
    ids = torch.cat([PROMPT, CONTINUATION])
    with mimic.activate(lm) as f:
        torch.testing.assert_close(f.logits(ids), lm.logits(ids), atol=1e-4, rtol=0)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_zero_is_the_model_in_its_dtype(dtype):
    """With alpha = 0 the edit is the identity, bit for bit, in float32 and in float64 (whose
    hidden states the hook once rounded to float32); alpha = 1 in float64 is the map applied in
    float64 (an oracle written here), not in float32."""
    lm = tiny_llama(seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    d = 32
    source, target = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    source_cov, target_cov = random_cov(d, g), random_cov(d, g, scale=2.0)
    mimic = AffineSteering(0, source, target, source_cov, target_cov, alpha=0.0)  # (see test_steering's)
    ids = torch.cat([PROMPT, CONTINUATION])
    with torch.no_grad(), mimic.activate(lm) as f:  # (the model's own dtype, not the wrapper's float32)
        assert torch.equal(f.model(ids[None]).logits, lm.model(ids[None]).logits)
    if dtype == torch.float64:
        full = AffineSteering(0, source, target, source_cov, target_cov, alpha=1.0)
        hidden = torch.randn(5, d, generator=g, dtype=torch.float64)
        oracle = (hidden - source) @ full.matrix.T + target
        torch.testing.assert_close(full.edit(hidden), oracle, atol=1e-12, rtol=0)

@pytest.mark.parametrize("start", [0, 4])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_hook_matches_the_hand_written_forward(lm, alpha, start):
    mimic = AffineSteering.from_contrastive(lm, SOURCE, TARGET, layer=0, alpha=alpha, start=start)
    ids = torch.cat([PROMPT, CONTINUATION])
    with mimic.activate(lm) as f:
        logits = f.logits(ids)

    def edit(h, pos):
        moved = h + alpha * (mimic.transport(h.double()).float() - h)
        return torch.where(pos >= start, moved, h)

    torch.testing.assert_close(logits, by_hand(lm, ids, 0, edit), atol=1e-4, rtol=1e-4)
    assert torch.equal(logits[:start], lm.logits(ids)[:start])


def test_from_contrastive_estimates_shrunk_moments(lm):
    source = [torch.tensor([2, 5, 6, 7]), torch.tensor([3, 8, 9])]
    target = [torch.tensor([2, 10, 11]), torch.tensor([12, 13, 14, 15, 16])]
    start, shrinkage = 1, 0.3

    def states(prompts):
        return torch.cat([by_hand(lm, p, 1)[start:] for p in prompts])

    def moments(h):
        h = h.double()
        s = torch.cov(h.T)
        return h.mean(0), (1 - shrinkage) * s + shrinkage * torch.trace(s) / 32 * torch.eye(
            32, dtype=torch.float64
        )

    mimic = AffineSteering.from_contrastive(lm, source, target, layer=-1, start=start, shrinkage=shrinkage)
    (source_mean, source_cov), (target_mean, target_cov) = moments(states(source)), moments(states(target))
    expected = AffineSteering(1, source_mean, target_mean, source_cov, target_cov)
    torch.testing.assert_close(mimic.source_mean, expected.source_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mimic.target_mean, expected.target_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mimic.matrix, expected.matrix, atol=1e-4, rtol=1e-4)
    assert (mimic.layer, mimic.start) == (-1, 1)


@pytest.mark.parametrize("start", [0, 2, 5])
def test_kv_cached_decoding_equals_teacher_forcing(lm, start):
    mimic = AffineSteering.from_contrastive(lm, SOURCE, TARGET, layer=0, start=start)
    with mimic.activate(lm) as f:
        logits, cache = f.prefill(PROMPT[None])
        cached = [logits[0]]
        for token in CONTINUATION[:-1]:
            logits, cache = f.step(token[None], cache)
            cached.append(logits[0])
        teacher_forced = f.logits(torch.cat([PROMPT, CONTINUATION[:-1]]))[len(PROMPT) - 1 :]
    torch.testing.assert_close(torch.stack(cached), teacher_forced, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ as a mechanism


@pytest.mark.parametrize("fail", [False, True], ids=["clean-exit", "exception"])
def test_restores_the_model_exactly(lm, fail):
    mimic = AffineSteering.from_contrastive(lm, SOURCE, TARGET, layer=1)
    state = snapshot(lm.model)
    with pytest.raises(RuntimeError) if fail else torch.no_grad():
        with mimic.activate(lm) as f:
            f.logits(PROMPT)
            if fail:
                raise RuntimeError("boom")
    assert_restored(lm.model, state)


def test_alpha_zero_reproduces_and_the_full_map_changes_counterfactuals(lm):
    zero = AffineSteering.from_contrastive(lm, SOURCE, TARGET, layer=0, alpha=0.0)
    full = AffineSteering.from_contrastive(lm, SOURCE, TARGET, layer=0, shrinkage=0.5)
    scm = LanguageModelSCM(lm, max_new_tokens=6, mechanisms={"zero": zero, "full": full})
    same = counterfactual(scm, PROMPT, CONTINUATION, {"mechanism": "zero"}, num_samples=20, seed=0)
    assert torch.equal(same.counterfactual_ids, CONTINUATION.expand(20, 6))
    moved = counterfactual(scm, PROMPT, CONTINUATION, {"mechanism": "full"}, num_samples=20, seed=0)
    assert float((moved.counterfactual_ids != CONTINUATION).any(-1).float().mean()) > 0.5


def test_mixed_batch_rows_match_separate_runs(lm):
    scm = LanguageModelSCM(
        lm,
        max_new_tokens=6,
        mechanisms={
            "to-target": AffineSteering.from_contrastive(lm, SOURCE, TARGET, layer=0),
            "to-source": AffineSteering.from_contrastive(lm, TARGET, SOURCE, layer=1, start=4),
        },
    )
    state = snapshot(lm.model)
    assert_rows_match_separate_runs(scm, PROMPT, [0, 1, 2, 0])
    assert_rows_match_separate_runs(scm, PROMPT, [2, 0])
    assert_restored(lm.model, state)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(3), torch.zeros(4), torch.eye(3), torch.eye(3)), r"`target_mean` has shape \(4,\)"),
        (
            (torch.zeros(3), torch.zeros(3), torch.eye(4), torch.eye(3)),
            r"`source_cov` must have shape \(3, 3\)",
        ),
        ((torch.zeros(3), torch.zeros(3), torch.zeros(3, 3), torch.eye(3)), "positive definite.*shrinkage"),
        ((torch.zeros(3), torch.zeros(3), torch.eye(3), -torch.eye(3)), "positive semi-definite"),
        ((torch.zeros(3), torch.zeros(3), torch.triu(torch.ones(3, 3)), torch.eye(3)), "symmetric"),
        ((torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.eye(3), torch.eye(3)), "floating"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(MechanismError, match=match):
        AffineSteering(0, *args)


def test_bad_estimation_settings(lm):
    with pytest.raises(MechanismError, match="shrinkage"):
        AffineSteering.from_contrastive(lm, SOURCE, TARGET, layer=0, shrinkage=0.0)
    with pytest.raises(MechanismError, match="at least 2"):
        AffineSteering.from_contrastive(lm, ["she"], TARGET, layer=0)
    with pytest.raises(MechanismError, match="source_texts"):
        AffineSteering.from_contrastive(lm, [], TARGET, layer=0)
    with pytest.raises(MechanismError, match="hidden size is 32"):
        LanguageModelSCM(
            lm,
            3,
            mechanisms={"m": AffineSteering(0, torch.zeros(3), torch.zeros(3), torch.eye(3), torch.eye(3))},
        )
