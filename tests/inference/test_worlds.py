"""The SCM under ChiRho's multi-world counterfactual handlers."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

pytest.importorskip("chirho")
from chirho.counterfactual.handlers import (  # noqa: E402
    MultiWorldCounterfactual,
    TwinWorldCounterfactual,
)
from chirho.interventional.handlers import do  # noqa: E402
from chirho.observational.handlers import condition  # noqa: E402

from pyro_lmscm import HindsightGumbelGuide, LanguageModelSCM, ModelSwap  # noqa: E402
from pyro_lmscm.inference.worlds import gather_worlds  # noqa: E402

PROMPT = torch.tensor([2, 3, 4])
OBSERVED = torch.tensor([5, 9, 14, 7, 3, 11])
DRAWS = 8


@pytest.fixture
def scm(lm, other_lm):
    return LanguageModelSCM(lm, max_new_tokens=6, mechanisms={"other": ModelSwap(other_lm)})


def _guide_trace(scm, prompt=PROMPT):
    guide = HindsightGumbelGuide(scm, OBSERVED)
    with pyro.plate("draws", DRAWS, dim=-1):
        return poutine.trace(guide).get_trace(prompt)


def _plain_replay(scm, guide_trace, data, model=None, *args):
    model = model or scm.model
    with pyro.plate("draws", DRAWS, dim=-1):
        return poutine.replay(poutine.do(model, data=data), trace=guide_trace)(*(args or (PROMPT,)))


@pytest.mark.parametrize("handler", [MultiWorldCounterfactual, TwinWorldCounterfactual])
@pytest.mark.parametrize(
    "site, value",
    [("mechanism", torch.tensor(1)), ("w_2", torch.tensor(20)), ("prompt", torch.tensor([2, 6, 7]))],
)
def test_worlds_equal_observation_and_plain_pyro_replay(scm, handler, site, value):
    guide_trace = _guide_trace(scm)
    model = condition(do(scm.model, actions={site: value}), data=scm.observations(OBSERVED))
    with handler(first_available_dim=-2), pyro.plate("draws", DRAWS, dim=-1):
        tokens = poutine.replay(model, trace=guide_trace)(PROMPT)
        worlds = gather_worlds(tokens)
    name = site if handler is MultiWorldCounterfactual else "__fresh_split__"  # twin: one shared dim
    assert set(worlds) == {((name, 0),), ((name, 1),)}
    assert torch.equal(worlds[((name, 0),)], OBSERVED.expand(DRAWS, 6))
    expected = _plain_replay(scm, guide_trace, {site: value})
    assert torch.equal(worlds[((name, 1),)], expected)
    if site != "w_2":  # the intervened world really differs for some draw (else the test is empty)
        assert not torch.equal(expected, OBSERVED.expand(DRAWS, 6))


def test_do_on_an_upstream_variable(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=6, name="lm")
    prompts = torch.stack([lm.encode("the man said he"), lm.encode("the woman said she")])

    def story():
        gender = pyro.sample("gender", dist.Bernoulli(0.5))
        return scm.model(prompts[gender.long()])

    guide = HindsightGumbelGuide(scm, OBSERVED)
    with pyro.plate("draws", DRAWS, dim=-1):
        guide_trace = poutine.trace(guide).get_trace(prompts[0])
    data = {"gender": torch.tensor(0.0), **scm.observations(OBSERVED)}
    model = condition(do(story, actions={"gender": torch.tensor(1.0)}), data=data)
    with MultiWorldCounterfactual(first_available_dim=-2), pyro.plate("draws", DRAWS, dim=-1):
        worlds = gather_worlds(poutine.replay(model, trace=guide_trace)())
    assert torch.equal(worlds[(("gender", 0),)], OBSERVED.expand(DRAWS, 6))
    with pyro.plate("draws", DRAWS, dim=-1):
        by_hand = poutine.replay(scm.model, trace=guide_trace)(prompts[1])
    assert torch.equal(worlds[(("gender", 1),)], by_hand)


def test_noise_is_shared_by_all_worlds(scm):
    guide_trace = _guide_trace(scm)
    model = do(scm.model, actions={"mechanism": torch.tensor(1)})
    with MultiWorldCounterfactual(first_available_dim=-2), pyro.plate("draws", DRAWS, dim=-1):
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(PROMPT)
        for t in range(6):
            worlds = gather_worlds(trace.nodes[f"u_{t}"]["value"])  # vocab is the event dim
            for noise in worlds.values():
                assert torch.equal(noise, guide_trace.nodes[f"u_{t}"]["value"])
