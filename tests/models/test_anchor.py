import pyro
import pyro.poutine as poutine
import torch

from pyro_lmscm import LanguageModelSCM, ModelSwap
from pyro_lmscm.models.anchor import FactualAnchor

PROMPT = torch.tensor([2, 3, 4])


def _forcing_anchor(lm, observed, prompt=PROMPT):
    """An anchor whose logits make the observed tokens certain."""
    logits = torch.full((len(observed), lm.vocab_size), -30.0)
    logits[torch.arange(len(observed)), observed] = 30.0
    return FactualAnchor(prompt, observed, logits)


def test_anchored_logits_are_used_on_the_factual_path_only(lm, other_lm):
    scm = LanguageModelSCM(lm, max_new_tokens=6, mechanisms={"other": ModelSwap(other_lm)})
    observed = torch.tensor([20, 21, 22, 23])
    with scm.anchored(_forcing_anchor(lm, observed)), pyro.plate("draws", 50, dim=-1):
        factual = scm.model(PROMPT)
        swapped = poutine.do(scm.model, data={"mechanism": torch.tensor(1)})(PROMPT)
        other_prompt = scm.model(torch.tensor([2, 3, 5]))
    assert bool((factual[:, :4] == observed).all())
    assert not bool((swapped[:, :4] == observed).all(-1).any())
    assert not bool((other_prompt[:, :4] == observed).all(-1).any())
    with pyro.plate("draws", 50, dim=-1):  # outside the handler's scope
        unanchored = scm.model(PROMPT)
    assert not bool((unanchored[:, :4] == observed).all(-1).any())  # baseline


def test_leaving_the_path_releases_the_anchor(lm):
    scm = LanguageModelSCM(lm, max_new_tokens=6)
    observed = torch.tensor([20, 21, 22, 23])
    with scm.anchored(_forcing_anchor(lm, observed)), pyro.plate("draws", 50, dim=-1):
        tokens = poutine.do(scm.model, data={"w_1": torch.tensor(5)})(PROMPT)
    assert bool((tokens[:, 0] == 20).all()) and bool((tokens[:, 1] == 5).all())
    assert not bool((tokens[:, 2] == 22).all())  # off the path, the model's own logits


def test_mismatched_shapes_disable_the_anchor(lm):
    anchor = _forcing_anchor(lm, torch.tensor([20, 21]))
    assert anchor.start(torch.tensor([2, 3]), torch.tensor(0)) is None  # prompt length
    observed = torch.tensor([[20, 21], [20, 22], [20, 23]])
    batched = FactualAnchor(PROMPT, observed, torch.zeros(3, 2, lm.vocab_size))
    assert batched.start(PROMPT.expand(4, 3), torch.tensor(0)) is None  # batch (4,) vs (3,)


def test_the_anchor_is_scoped_to_its_scm(lm):
    """Two SCMs in one program: the handler anchors only the SCM it was made for."""
    first, second = LanguageModelSCM(lm, max_new_tokens=6, name="a"), LanguageModelSCM(lm, max_new_tokens=6, name="b")
    observed = torch.tensor([20, 21, 22, 23])
    with first.anchored(_forcing_anchor(lm, observed)), pyro.plate("draws", 50, dim=-1):
        anchored, free = first.model(PROMPT), second.model(PROMPT)
    assert bool((anchored[:, :4] == observed).all())
    assert not bool((free[:, :4] == observed).all(-1).any())


def test_logits_on_the_path_are_the_anchors_own_rows_without_a_copy(lm):
    """Where every row is on the path, a step's raw logits are the anchor's row of that step,
    broadcast: its storage, no ``(rows, V)`` copy; with some rows off the path, the mix of
    both (``torch.where``); past the anchor, ``raw``."""
    observed = torch.tensor([20, 21, 22])
    anchor = _forcing_anchor(lm, observed)
    raw = torch.randn(5, lm.vocab_size)
    every = anchor.logits_at(1, raw, torch.ones(5, dtype=torch.bool))
    assert torch.equal(every, anchor.logits[1].expand(5, -1))
    assert every.untyped_storage().data_ptr() == anchor.logits.untyped_storage().data_ptr()
    some = torch.tensor([True, False, True, True, False])
    mixed = anchor.logits_at(1, raw, some)
    assert torch.equal(mixed[some], anchor.logits[1].expand(3, -1)) and torch.equal(mixed[~some], raw[~some])
    assert mixed.untyped_storage().data_ptr() != anchor.logits.untyped_storage().data_ptr()
    assert anchor.logits_at(3, raw, torch.ones(5, dtype=torch.bool)) is raw
    half = anchor.logits_at(1, raw.double(), torch.ones(5, dtype=torch.bool))  # other dtype: where's promotion
    assert half.dtype == torch.float64 and torch.equal(half, anchor.logits[1].double().expand(5, -1))
