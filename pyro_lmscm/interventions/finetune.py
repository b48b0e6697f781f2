r"""A fine-tuning intervention: train a LoRA adapter (peft) on a small set of texts.

The embedded SmolLM2 is already instruction-tuned, so the paper's "base → instruct" pair
cannot be reproduced with it; a short LoRA fine-tune toward one register of English (the
built-in :data:`STYLE_TEXTS`, Victorian first-person narration written for this package)
stands in for it: a real training run whose effect on unrelated text is what a
counterfactual study measures.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Sequence

import torch

from ..atomic import restore_atomically
from ..errors import MechanismError
from ..seeding import seeded
from ..validation import as_lm
from .adapter import LoRAAdapter, _adapters_of, _tuner_layers
from .internals import _check_int, _check_real

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["STYLE_TEXTS", "lora_finetune", "style_texts"]


def style_texts(name: str = "victorian") -> list[str]:
    """The built-in fine-tuning texts ``data/style_<name>.txt``, one sentence per line."""
    path = resources.files("pyro_lmscm.interventions").joinpath(f"data/style_{name}.txt")
    if not path.is_file():
        raise MechanismError(f"lora_finetune: no built-in style {name!r} (there is 'victorian').")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


#: the name of the built-in register of :func:`style_texts`
STYLE_TEXTS = "victorian"


def lora_finetune(
    lm: HFLanguageModel,
    texts: Sequence[str] | None = None,
    steps: int = 60,
    rank: int = 8,
    lr: float = 1e-3,
    batch_size: int = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    adapter_name: str | None = None,
    seed: int = 0,
) -> LoRAAdapter:
    r"""Fine-tune a new LoRA adapter of ``lm`` on ``texts`` (next-token cross-entropy, AdamW)
    and return it as a :class:`LoRAAdapter` mechanism.

    The base weights are frozen and bit-identical afterwards (the adapter is off outside
    :meth:`LoRAAdapter.activate`); ``requires_grad`` flags and the train/eval mode are
    restored. Batches are drawn with ``seed`` (torch's generators are restored after), so a
    call is reproducible on a given machine. About a minute for the defaults on SmolLM2 on a
    2-core CPU.

    :param lm: the factual language model (needs a tokenizer for text).
    :param texts: the training texts; default the built-in register
        (:func:`style_texts`, 240 sentences).
    :param steps: optimisation steps.
    :param rank: the LoRA rank :math:`r` (``lora_alpha = 2 r``).
    :param lr: AdamW's learning rate.
    :param batch_size: texts per step (padded to the longest).
    :param target_modules: the adapted linear maps of every layer.
    :param adapter_name: the adapter's name inside ``lm.model`` (must be new; default
        ``"finetune"``, or ``"finetune_2"``, ... if taken).
    :param seed: the seed of the adapter's initialisation and of the batches.
    :returns: the adapter; ``adapter.losses`` holds the training loss per step.
    :raises MechanismError: on empty texts, no tokenizer, or bad hyper-parameters.
    """
    from peft import LoraConfig

    owner = "lora_finetune"
    as_lm(lm, owner=owner)
    steps = _check_int(steps, "steps", owner, minimum=1)
    rank = _check_int(rank, "rank", owner, minimum=1)
    batch_size = _check_int(batch_size, "batch_size", owner, minimum=1)
    lr = _check_real(lr, "lr", owner)
    if lr <= 0:
        raise MechanismError(f"{owner}: `lr` must be > 0, got {lr}.")
    texts = style_texts(STYLE_TEXTS) if texts is None else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise MechanismError(f"{owner}: `texts` must be a non-empty list of non-empty strings.")
    if lm.tokenizer is None:
        raise MechanismError(f"{owner}: the model has no tokenizer, so texts cannot be encoded.")
    encoded = [torch.tensor(lm.tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
    eos = lm.eos_token_ids[0] if lm.eos_token_ids else None
    if eos is not None:
        encoded = [torch.cat([ids, torch.tensor([eos])]) for ids in encoded]
    encoded = [ids for ids in encoded if ids.numel() >= 2]
    if not encoded:
        raise MechanismError(f"{owner}: every text is shorter than two tokens.")

    if adapter_name is None:
        taken = set().union(*(_adapters_of(layer) for layer in _tuner_layers(lm.model)))
        adapter_name = next(name for k in range(1, len(taken) + 2)
                            if (name := "finetune" if k == 1 else f"finetune_{k}") not in taken)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(target_modules))
    with seeded(seed, error=MechanismError):
        adapter = LoRAAdapter.from_config(lm, config, adapter_name=adapter_name)
        model = lm.model
        trainable = [p for n, p in model.named_parameters() if f".{adapter_name}." in n or n.endswith(adapter_name)]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        losses: list[float] = []
        try:
            with adapter.activate(lm):
                for parameter in model.parameters():
                    parameter.requires_grad_(False)
                for parameter in trainable:
                    parameter.requires_grad_(True)
                model.train()
                optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
                order = torch.randperm(len(encoded))
                cursor = 0
                for _ in range(steps):
                    if cursor + batch_size > len(order):
                        order, cursor = torch.randperm(len(encoded)), 0
                    batch = [encoded[int(i)] for i in order[cursor : cursor + batch_size]]
                    cursor += batch_size
                    width = max(ids.numel() for ids in batch)
                    input_ids = torch.full((len(batch), width), lm.pad_token_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, ids in enumerate(batch):
                        input_ids[row, : ids.numel()] = ids
                        mask[row, : ids.numel()] = 1
                    labels = input_ids.masked_fill(mask == 0, -100)
                    with torch.enable_grad():
                        out = model(
                            input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device),
                            labels=labels.to(lm.device), use_cache=False,
                        )
                        out.loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(out.loss.detach()))
        finally:

            def drop_gradients() -> None:
                for parameter in trainable:
                    parameter.grad = None

            restore_atomically(
                lambda: [p.requires_grad_(flag) for p, flag in flags], drop_gradients, lambda: model.train(was_training)
            )
    adapter.losses = losses  # type: ignore[attr-defined]
    return adapter
