"""lora_finetune: a LoRA adapter trained with peft on a small set of texts."""

import random

import pytest
import torch

from pyro_lmscm.errors import MechanismError
from pyro_lmscm.interventions.adapter import LoRAAdapter
from pyro_lmscm.interventions.finetune import lora_finetune, style_texts
from pyro_lmscm.testing import assert_restored, snapshot, tiny_llama


def _register(seed, n):
    """Sentences of one 'register' of the tiny vocabulary: the old nurse walked home and smiled."""
    rng = random.Random(seed)
    return [
        f"the {rng.choice(['old', 'young'])} {rng.choice(['nurse', 'doctor', 'woman'])} "
        f"{rng.choice(['walked', 'went'])} {rng.choice(['home', 'to work', 'to the city'])} and smiled"
        for _ in range(n)
    ]


def _nll(f, lm, texts):
    total = 0.0
    for text in texts:
        ids = lm.encode(text)
        log_probs = f.logits(ids)[:-1].log_softmax(-1)
        total -= float(log_probs.gather(-1, ids[1:, None]).sum()) / (ids.shape[0] - 1)
    return total / len(texts)


def test_training_lowers_the_held_out_loss_and_leaves_the_base_as_it_was():
    lm = tiny_llama(seed=0)
    snap = snapshot(lm.model)
    flags = [p.requires_grad for p in lm.model.parameters()]
    held_out = _register(1, 20)
    base = _nll(lm, lm, held_out)
    adapter = lora_finetune(lm, _register(0, 64), steps=40, rank=4, lr=1e-2, batch_size=8, seed=0)
    assert isinstance(adapter, LoRAAdapter)
    assert sum(adapter.losses[-5:]) / 5 < 0.7 * sum(adapter.losses[:5]) / 5
    with adapter.activate(lm) as f:
        tuned = _nll(f, lm, held_out)
    assert tuned < 0.7 * base, (tuned, base)  # the base model (the baseline) is far worse
    # the factual model is unchanged: its logits, and (after the adapter) every base weight
    assert _nll(lm, lm, held_out) == base
    state = {k.replace(".base_layer", ""): v for k, v in lm.model.state_dict().items() if "lora_" not in k}
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], v) for k, v in snap[0].items())
    assert [p.requires_grad for n, p in lm.model.named_parameters() if "lora_" not in n] == flags
    assert all(p.grad is None for p in lm.model.parameters())


def test_reproducible_for_a_seed():
    def weights(seed):
        lm = tiny_llama(seed=0)
        lora_finetune(lm, _register(0, 16), steps=3, rank=2, seed=seed)
        return {k: v for k, v in lm.model.state_dict().items() if "lora_" in k}

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_builtin_register():
    texts = style_texts()
    assert len(texts) == 240 and all(t.endswith((".", "!", "?")) for t in texts)
    with pytest.raises(MechanismError, match="no built-in style"):
        style_texts("pirate")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(texts=[]), "non-empty"),
        (dict(texts=["the man", ""]), "non-empty"),
        (dict(texts=["the man"], steps=0), "steps"),
        (dict(texts=["the man"], lr=-1.0), "lr"),
    ],
)
def test_bad_input(kwargs, message):
    lm = tiny_llama(seed=0)
    snap = snapshot(lm.model)
    with pytest.raises(MechanismError, match=message):
        lora_finetune(lm, **kwargs)
    assert_restored(lm.model, snap)
