"""The SCM inside a larger Pyro model: upstream gender -> prompt -> text -> downstream verdict."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_lmscm import LanguageModelSCM
from pyro_lmscm.inference.upstream import UpstreamHindsightGuide, upstream_marginals

P_WOMAN = 0.4


def make_story(scm, lm):
    prompts = torch.stack([lm.encode("the man said he"), lm.encode("the woman said she")])
    she = lm.encode("she")[0]

    def story():
        gender = pyro.sample("gender", dist.Bernoulli(P_WOMAN))
        tokens = scm.model(prompts[gender.long()])
        says_she = (tokens == she).any(-1).float()
        return pyro.sample("verdict", dist.Bernoulli(0.1 + 0.8 * says_she))

    return story, prompts


def log_likelihood(lm, prompt, observed):
    with torch.no_grad():
        logits = lm.model(torch.cat([prompt, observed])[None]).logits[0, len(prompt) - 1 : -1]
    return float(logits.log_softmax(-1).gather(-1, observed[:, None]).sum())


def test_sites_are_prefixed(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=3, name="lm")
    story, _ = make_story(scm, lm)
    names = [n for n, site in poutine.trace(story).get_trace().nodes.items() if site["type"] == "sample"]
    assert names == ["gender", "lm/prompt", "lm/mechanism", "lm/u_0", "lm/w_0", "lm/u_1", "lm/w_1",
                     "lm/u_2", "lm/w_2", "verdict"]


def test_enumerated_upstream_posterior_matches_bayes_rule(lm):
    collapsed = LanguageModelSCM(lm, max_new_tokens=4, name="lm", collapsed=True)
    story, prompts = make_story(collapsed, lm)
    observed = lm.encode("she went home to")
    marginal = upstream_marginals(story, collapsed, observed, ["gender"])["gender"]
    joint = torch.tensor([
        torch.log(torch.tensor(1 - P_WOMAN)) + log_likelihood(lm, prompts[0], observed),
        torch.log(torch.tensor(P_WOMAN)) + log_likelihood(lm, prompts[1], observed),
    ], dtype=torch.float64)
    bayes = joint.softmax(0)
    enumerated = marginal.log_prob(torch.tensor([0.0, 1.0])).exp().double()
    assert torch.allclose(enumerated, bayes, atol=1e-5), (enumerated, bayes)
    # baseline: the prior is not the posterior here
    assert abs(float(bayes[1]) - P_WOMAN) > 1e-3


def test_a_value_that_cannot_write_the_observation_has_posterior_zero_not_nan():
    """Under top-k the observed first token is outside the k under one prompt: its value has
    posterior 0. Pyro's Bernoulli marginal has logits -inf there, whose log_prob is NaN for
    both values (it was returned as is). Oracle: Bayes' rule on the raw logits, top-k by hand."""
    from pyro_lmscm.models import Decoding
    from pyro_lmscm.testing import tiny_llama

    lm = tiny_llama(vocab_size=6, seed=5, logit_scale=6.0, with_tokenizer=False)
    scm = LanguageModelSCM(lm, max_new_tokens=3, decoding=Decoding(top_k=4), name="lm", collapsed=True)
    prompts, observed = torch.tensor([[2, 3], [2, 4]]), torch.tensor([0, 2, 5])

    def story():
        z = pyro.sample("z", dist.Bernoulli(0.3))
        return scm.model(prompts[z.long()])

    def log_likelihood(prompt):
        with torch.no_grad():
            logits = lm.model(torch.cat([prompt, observed])[None]).logits[0, len(prompt) - 1 : -1].double()
        kth = logits.topk(4, dim=-1).values[:, -1:]
        kept = logits.masked_fill(logits < kth, float("-inf"))
        return float(kept.log_softmax(-1).gather(-1, observed[:, None]).sum())

    bayes = torch.tensor([math.log(0.7) + log_likelihood(prompts[0]), math.log(0.3) + log_likelihood(prompts[1])])
    bayes = bayes.softmax(0)
    assert float(bayes[1]) == 0.0 and float(bayes[0]) == 1.0  # the case is the one meant
    marginal = upstream_marginals(story, scm, observed, ["z"])["z"]
    probabilities = marginal.log_prob(torch.tensor([0.0, 1.0])).exp()
    assert torch.equal(probabilities, bayes.float()), probabilities
    assert float(marginal.probs) == 0.0


def test_upstream_guide_draws_gender_from_its_posterior_and_reproduces_the_text(lm):
    collapsed = LanguageModelSCM(lm, max_new_tokens=4, name="lm", collapsed=True)
    scm = LanguageModelSCM(lm, max_new_tokens=4, name="lm")
    story, prompts = make_story(scm, lm)
    collapsed_story, _ = make_story(collapsed, lm)
    observed = lm.encode("went home to work")
    posterior = upstream_marginals(collapsed_story, collapsed, observed, ["gender"])["gender"]
    guide = UpstreamHindsightGuide(collapsed_story, collapsed, scm, observed, ["gender"])
    draws = []
    for _ in range(400):
        guide_trace = poutine.trace(guide).get_trace()
        replayed = poutine.trace(poutine.replay(story, trace=guide_trace)).get_trace()
        text = torch.stack([replayed.nodes[f"lm/w_{t}"]["value"] for t in range(4)])
        assert torch.equal(text, observed)
        draws.append(float(guide_trace.nodes["gender"]["value"]))
    p = float(posterior.probs)
    mean = sum(draws) / len(draws)
    assert abs(mean - p) < 4 * (p * (1 - p) / len(draws)) ** 0.5, (mean, p)


def test_collapsed_and_noise_models_give_the_same_string_distribution(lm):
    collapsed = LanguageModelSCM(lm, max_new_tokens=2, collapsed=True)
    scm = LanguageModelSCM(lm, max_new_tokens=2)
    prompt = torch.tensor([2, 3])
    with pyro.plate("draws", 20000, dim=-1):
        a = collapsed.model(prompt)[:, 0]
        b = scm.model(prompt)[:, 0]
    pa = torch.bincount(a, minlength=lm.vocab_size).double() / 20000
    pb = torch.bincount(b, minlength=lm.vocab_size).double() / 20000
    assert float((pa - pb).abs().sum()) / 2 < 0.03


def test_guide_refuses_a_collapsed_scm(lm):
    from pyro_lmscm import HindsightGumbelGuide

    with pytest.raises(ValueError, match="collapsed"):
        HindsightGumbelGuide(LanguageModelSCM(lm, 2, collapsed=True), torch.tensor([5]))


def test_unfinished_short_observation_is_refused(lm):
    from pyro_lmscm.errors import ObservationError

    collapsed = LanguageModelSCM(lm, max_new_tokens=5, name="lm", collapsed=True)
    story, _ = make_story(collapsed, lm)
    with pytest.raises(ObservationError, match="max_new_tokens equal to the observed length"):
        upstream_marginals(story, collapsed, lm.encode("went home"), ["gender"])


def test_observation_that_ended_is_padded(lm):
    collapsed = LanguageModelSCM(lm, max_new_tokens=5, name="lm", collapsed=True)
    story, prompts = make_story(collapsed, lm)
    observed = torch.tensor([lm.encode("went")[0], 1])  # then the end of sequence
    marginal = upstream_marginals(story, collapsed, observed, ["gender"])["gender"]
    joint = torch.tensor([
        torch.log(torch.tensor(1 - P_WOMAN)) + log_likelihood(lm, prompts[0], observed),
        torch.log(torch.tensor(P_WOMAN)) + log_likelihood(lm, prompts[1], observed),
    ], dtype=torch.float64)
    assert abs(float(marginal.probs) - float(joint.softmax(0)[1])) < 1e-5
