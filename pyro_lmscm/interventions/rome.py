r"""ROME: rewrite one fact with a rank-one edit of an MLP output projection.

References

[1] Meng, Bau, Andonian, Belinkov, *Locating and Editing Factual Associations in GPT*
    (NeurIPS 2022), arXiv:2202.05262.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..atomic import forward_hook, locked
from ..errors import MechanismError
from ..validation import as_lm
from .internals import (
    _as_ids,
    _check_int,
    _check_real,
    _decoder_layers,
    _resolve_layer,
    _StopForward,
)
from .ops import TextOrIds
from .weight_edit import WeightDelta

if TYPE_CHECKING:
    from torch import nn

    from ..lm import HFLanguageModel

__all__ = ["GENERIC_SENTENCES", "RankOneEdit", "rome_edit"]

#: Generic English sentences for the second moment :math:`C` of the keys, when no
#: ``cov_texts`` are given. ROME uses 100,000 Wikipedia samples; a few dozen sentences
#: plus the ridge term are a rough but serviceable stand-in for small edits.
GENERIC_SENTENCES: tuple[str, ...] = (
    "The weather was cold and windy all morning.",
    "She opened the door and walked into the kitchen.",
    "The city council met on Tuesday to discuss the new budget.",
    "He has been working at the hospital for ten years.",
    "Most birds build their nests in the spring.",
    "The train to the capital leaves every hour.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "They spent the weekend hiking in the mountains.",
    "The museum is closed on Mondays.",
    "Our teacher asked us to read the first chapter.",
    "The company announced record profits last quarter.",
    "A small boat drifted slowly across the lake.",
    "The children played football in the park after school.",
    "I usually drink a cup of coffee before work.",
    "The novel was translated into more than twenty languages.",
    "Scientists discovered a new species of frog in the forest.",
    "The old bridge was replaced by a modern one.",
    "Please send me the report by Friday.",
    "The restaurant on the corner serves excellent soup.",
    "He forgot his umbrella and got wet in the rain.",
    "The river flows through three countries before reaching the sea.",
    "She plays the piano and sings in a choir.",
    "The election results were announced late at night.",
    "Farmers in the region grow wheat and corn.",
    "The library has thousands of books about history.",
    "My brother moved to a new apartment last month.",
    "The game ended in a draw after extra time.",
    "Doctors recommend at least seven hours of sleep.",
    "The painting was sold for a surprising amount of money.",
    "A strong earthquake shook the island yesterday.",
    "The students prepared a presentation about the solar system.",
    "He is known for his kindness and his sense of humor.",
    "The factory produces cars, trucks and buses.",
    "We watched the sunset from the top of the hill.",
    "The government introduced a new law on education.",
    "Her grandmother was born in a small village.",
    "The movie was longer than anyone expected.",
    "The airport is about twenty minutes from the city center.",
    "Many people visit the castle every summer.",
    "The recipe calls for two eggs and a cup of flour.",
)


class RankOneEdit(WeightDelta):
    r"""A rank-one delta of one weight matrix :math:`W` (shape ``(d_out, d_in)``):

    .. math::

        \Delta W = r\, q^\top, \qquad r = v^* - W k^*, \qquad
        q = \frac{C^{-1} k^*}{(C^{-1} k^*)^\top k^*},

    so that :math:`(W + \Delta W)\, k^* = v^*` and :math:`\Delta W k = 0` for every key
    :math:`k` with :math:`k^\top C^{-1} k^* = 0`. Here :math:`k^*` is the key (the input of the
    projection at the edited token), :math:`v^*` the value it should produce and :math:`C`
    the second moment of keys. :func:`rome_edit` computes all three; this class only applies
    the delta (a :class:`WeightDelta`).

    :param param_name: the name of :math:`W` in ``lm.model.named_parameters()``.
    :param value_change: :math:`r = v^* - W k^*`, shape ``(d_out,)``.
    :param key_direction: :math:`q`, shape ``(d_in,)``.
    :param key: optional :math:`k^*`, kept for inspection.
    :param value: optional :math:`v^*`, kept for inspection.
    :raises MechanismError: on non-vector or non-finite factors.
    """

    def __init__(
        self,
        param_name: str,
        value_change: torch.Tensor,
        key_direction: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
    ) -> None:
        value_change = torch.as_tensor(value_change).detach()
        key_direction = torch.as_tensor(key_direction).detach()
        if value_change.dim() != 1 or key_direction.dim() != 1:
            raise MechanismError(
                "RankOneEdit: `value_change` and `key_direction` must be vectors, got shapes "
                f"{tuple(value_change.shape)} and {tuple(key_direction.shape)}."
            )
        super().__init__({param_name: torch.outer(value_change, key_direction)})
        self.param_name = param_name
        self.value_change = value_change
        self.key_direction = key_direction
        self.key = key
        self.value = value
        #: per optimisation step of :func:`rome_edit`: the negative log-likelihood of the target.
        self.losses: list[float] = []

    def __repr__(self) -> str:
        return f"RankOneEdit({self.param_name!r}, |v* - W k*|={float(self.value_change.norm()):.4g})"


def _subject_end(lm: HFLanguageModel, prompt: TextOrIds, subject: TextOrIds) -> tuple[torch.Tensor, int]:
    """Prompt ids and the index of the subject's last token in them."""
    if isinstance(prompt, str) and isinstance(subject, str):
        at = prompt.find(subject)
        if at < 0 or not subject:
            raise MechanismError(
                f"rome_edit: the subject {subject!r} does not occur in the prompt {prompt!r}."
            )
        ids = _as_ids(lm, prompt, "prompt")
        head = _as_ids(lm, prompt[: at + len(subject)], "prompt")
        if head.shape[0] > ids.shape[0] or not torch.equal(ids[: head.shape[0]], head):
            raise MechanismError(
                f"rome_edit: the prompt {prompt!r} does not tokenize as (text up to the subject) + "
                "rest, so the subject's last token is ambiguous; pass `prompt` and `subject` as ids."
            )
        return ids, head.shape[0] - 1
    ids = _as_ids(lm, prompt, "prompt")
    subject_ids = _as_ids(lm, subject, "subject")
    n = subject_ids.shape[0]
    for start in range(ids.shape[0] - n + 1):
        if torch.equal(ids[start : start + n], subject_ids):
            return ids, start + n - 1
    raise MechanismError(
        f"rome_edit: the subject ids {subject_ids.tolist()} do not occur in the prompt ids {ids.tolist()}."
    )


def _sample_ids(lm: HFLanguageModel, text: TextOrIds, what: str) -> torch.Tensor:
    """Ids of a covariance sample; text is tokenized without the round-trip check of ``encode``."""
    if isinstance(text, str):
        if lm.tokenizer is None:
            raise MechanismError(
                f"rome_edit: `{what}` is text but the model has no tokenizer; pass token ids."
            )
        ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(text)
    ids = lm.check_ids(ids, what)
    if ids.dim() != 1 or ids.numel() == 0:
        raise MechanismError(f"rome_edit: `{what}` must be non-empty token ids of shape (L,).")
    return ids


class _Projection:
    """The edited linear map of decoder layer ``layer``: its module, weight and name."""

    def __init__(self, lm: HFLanguageModel, layer: int, module: str) -> None:
        block = _decoder_layers(lm.model)[layer]
        try:
            self.module: nn.Module = block.get_submodule(module)
        except AttributeError:
            raise MechanismError(
                f"rome_edit: decoder layer {layer} has no submodule {module!r} (Llama-style models "
                "have 'mlp.down_proj')."
            ) from None
        get_base_layer = getattr(self.module, "get_base_layer", None)
        base = get_base_layer() if callable(get_base_layer) else self.module  # under a peft adapter
        if not isinstance(base, torch.nn.Linear):
            raise MechanismError(
                f"rome_edit: {module!r} is a {type(base).__name__}; only torch.nn.Linear projections "
                "(weight of shape (d_out, d_in)) are supported."
            )
        self.base = base
        names = {id(p): n for n, p in lm.model.named_parameters()}
        self.name = names[id(base.weight)]

    def keys_and_values(
        self, lm: HFLanguageModel, prompts: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Inputs ``(L_i, d_in)`` and outputs ``(L_i, d_out)`` of the projection on each prompt,
        float32. Prompts of equal length run as one batch; the forward pass stops at the projection."""
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(ids.shape[-1], []).append(i)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            seen.append((args[0].detach().float(), output.detach().float()))
            raise _StopForward

        with forward_hook(self.module, record), torch.no_grad():
            for indices in by_length.values():
                seen.clear()
                try:
                    lm.model(
                        input_ids=torch.stack([prompts[i] for i in indices]).to(lm.device),
                        use_cache=False,
                    )
                except _StopForward:
                    pass
                keys, values = seen[0]
                for row, i in enumerate(indices):
                    out[i] = (keys[row], values[row])
        return [out[i] for i in range(len(prompts))]


def _log_probs_with_delta(
    lm: HFLanguageModel, projection: _Projection, ids: torch.Tensor, position: int, delta: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities ``(L, V)`` when ``delta`` is added to the projection's output at ``position``."""
    onehot = torch.zeros(ids.shape[0], 1, device=lm.device)
    onehot[position] = 1.0

    def add(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + (onehot * delta).to(output.dtype)

    with forward_hook(projection.module, add):
        logits = lm.model(input_ids=ids[None].to(lm.device), use_cache=False).logits[0]
    return logits.float().log_softmax(-1)


def _edit_texts(
    lm: HFLanguageModel, prompt: TextOrIds, subject: TextOrIds, target: TextOrIds, context_prefixes: Sequence[TextOrIds]
) -> tuple[list[tuple[torch.Tensor, int, int]], torch.Tensor, torch.Tensor]:
    """The texts of one edit request: ``prompt`` and each context prefix + ``prompt``, each
    continued by the target but its last token, as (ids, the subject's last token, the
    start of the target); the target's ids; the subject's ids."""
    prompt_ids, subject_end = _subject_end(lm, prompt, subject)
    target_ids = _as_ids(lm, target, "target")
    subject_ids = _as_ids(lm, subject, "subject")
    contexts = [
        torch.cat([_as_ids(lm, p, f"context_prefixes[{i}]"), prompt_ids])
        for i, p in enumerate(context_prefixes)
    ]
    edited = [
        (torch.cat([x, target_ids[:-1]]), x.shape[0] - prompt_ids.shape[0] + subject_end, x.shape[0])
        for x in [prompt_ids, *contexts]
    ]
    return edited, target_ids, subject_ids


def _key_moment(
    lm: HFLanguageModel, projection: _Projection, cov_texts: Sequence[TextOrIds] | None, cov_ridge: float, owner: str
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The second moment of the projection's keys over ``cov_texts`` (default
    :data:`GENERIC_SENTENCES`), with a ridge of ``cov_ridge`` times its mean eigenvalue:
    :math:`C` ``(d_in, d_in)`` float64 on the CPU, and its Cholesky factor."""
    samples = GENERIC_SENTENCES if cov_texts is None else cov_texts
    if isinstance(samples, (str, torch.Tensor)) or len(samples) == 0:
        raise MechanismError(f"{owner}: `cov_texts` must be a non-empty list of texts or token id tensors.")
    sample_ids = [_sample_ids(lm, text, f"cov_texts[{i}]") for i, text in enumerate(samples)]
    keys = torch.cat([k for k, _ in projection.keys_and_values(lm, sample_ids)]).double().cpu()
    moment = keys.T @ keys / keys.shape[0]
    d_in = moment.shape[0]
    moment = moment + cov_ridge * torch.trace(moment) / d_in * torch.eye(d_in, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(moment)
    if int(info) != 0:
        raise MechanismError(
            f"{owner}: the second moment of the keys is singular ({keys.shape[0]} samples in "
            f"{d_in} dimensions); raise `cov_ridge` above 0 or pass more `cov_texts`."
        )
    return moment, factor


def _value_delta(
    lm: HFLanguageModel,
    projection: _Projection,
    edited: Sequence[tuple[torch.Tensor, int, int]],
    target_ids: torch.Tensor,
    kl: Sequence[torch.Tensor],
    value: torch.Tensor,
    num_steps: int,
    lr: float,
    kl_factor: float,
    weight_decay: float,
    clamp_norm_factor: float,
) -> tuple[torch.Tensor, list[float]]:
    r"""The change :math:`\delta` of the projection's output at the edited token that makes
    the model continue each text of ``edited`` (ids, edited position, start of the target)
    with ``target_ids``, with the KL term on ``kl`` and the weight decay relative to
    ``value`` (:func:`rome_edit`'s objective); and the target's negative log-likelihood per
    step."""
    with torch.no_grad():
        kl_reference = [
            _log_probs_with_delta(lm, projection, y, y.shape[0] - 1, torch.zeros_like(value))[-1] for y in kl
        ]
    delta = torch.zeros_like(value, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm_factor * float(value.norm())
    losses: list[float] = []
    for _ in range(num_steps):
        with torch.enable_grad():
            nll = torch.zeros((), device=lm.device)
            for ids, position, target_start in edited:
                log_probs = _log_probs_with_delta(lm, projection, ids, position, delta)
                steps = log_probs[target_start - 1 :]
                nll = nll - steps.gather(-1, target_ids.to(lm.device)[:, None]).mean() / len(edited)
            divergence = torch.zeros((), device=lm.device)
            for y, reference in zip(kl, kl_reference, strict=True):
                log_probs = _log_probs_with_delta(lm, projection, y, y.shape[0] - 1, delta)[-1]
                divergence = divergence + (reference.exp() * (reference - log_probs)).sum() / len(kl)
            decay = delta.pow(2).sum() / value.pow(2).sum().clamp_min(1e-12)
            loss = nll + kl_factor * divergence + weight_decay * decay
            (grad,) = torch.autograd.grad(loss, [delta])
        losses.append(float(nll.detach()))
        if losses[-1] < 5e-2:
            break
        delta.grad = grad
        optimizer.step()
        with torch.no_grad():
            norm = float(delta.norm())
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    return delta.detach(), losses


@locked  # it reads the weights: no other thread's edit may be on meanwhile
def rome_edit(
    lm: HFLanguageModel,
    prompt: TextOrIds,
    subject: TextOrIds,
    target: TextOrIds,
    layer: int,
    context_prefixes: Sequence[TextOrIds] = (),
    kl_prompts: Sequence[TextOrIds] | None = None,
    cov_texts: Sequence[TextOrIds] | None = None,
    num_steps: int = 30,
    lr: float = 0.5,
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 4.0,
    cov_ridge: float = 0.1,
    module: str = "mlp.down_proj",
) -> RankOneEdit:
    r"""ROME: a rank-one edit of ``mlp.down_proj`` of decoder layer :math:`L` so that the
    model completes ``prompt`` (which mentions ``subject``) with ``target``.

    .. math::

        k^* &= \frac{1}{|X|} \sum_{x \in X} k(x)_{j(x)}, \qquad
        v_0 = \frac{1}{|X|} \sum_{x \in X} W k(x)_{j(x)}, \qquad
        C = \frac{1}{N} \sum_{n=1}^{N} k_n k_n^\top + \lambda \frac{\operatorname{tr}}{d_{in}} I, \\
        \delta &= \arg\min_{\delta} \; \frac{1}{|X|} \sum_{x \in X} -\frac{1}{|o|}
            \log p_{\delta}(o \mid x)
            + \beta\, \frac{1}{|K|} \sum_{y \in K}
                \mathrm{KL}\!\left(p(\cdot \mid y) \,\|\, p_{\delta}(\cdot \mid y)\right)
            + \gamma\, \frac{\lVert \delta \rVert^2}{\lVert v_0 \rVert^2}, \\
        v^* &= v_0 + \delta, \qquad
        \Delta W = \frac{(v^* - W k^*)\,(C^{-1} k^*)^\top}{(C^{-1} k^*)^\top k^*},

    where :math:`W` is the weight of ``module`` in layer :math:`L` (``layer``) and :math:`k(x)_j`
    its input (the *key*) at token :math:`j` of text :math:`x`; :math:`X` holds ``prompt`` and
    ``context_prefixes`` + ``prompt``, :math:`j(x)` is the subject's last token in :math:`x`;
    :math:`p_\delta` is the model with :math:`\delta` added to the projection's output at that
    token; :math:`o` is ``target``; :math:`K` is ``kl_prompts`` (default: the subject alone),
    edited at their last token; the :math:`k_n` are the keys at all tokens of ``cov_texts``
    (default :data:`GENERIC_SENTENCES`), :math:`\lambda` is ``cov_ridge``, :math:`\operatorname{tr}`
    is the trace of the sample moment, :math:`\beta` is ``kl_factor`` and :math:`\gamma` is
    ``weight_decay``. :math:`\delta` is found by ``num_steps`` steps of Adam (learning rate
    ``lr``), its norm clamped to ``clamp_norm_factor`` :math:`\lVert v_0 \rVert`; the loop
    stops early once the target's negative log-likelihood is below 0.05.

    :param lm: the factual language model; it is not changed.
    :param prompt: the relation prompt containing the subject, e.g. ``"The Eiffel Tower is in"``
        (text or ids).
    :param subject: e.g. ``"The Eiffel Tower"``; text if ``prompt`` is text, else ids.
    :param target: the new object, e.g. ``" Rome"`` (mind the leading space of BPE tokenizers).
    :param layer: :math:`L`.
    :param context_prefixes: texts or ids put before the prompt to average the key over contexts.
    :param kl_prompts: prompts ending with the subject whose next-token distribution should stay.
    :param cov_texts: texts (tokenized without the round-trip check) or ids for :math:`C`.
    :returns: a :class:`RankOneEdit` (a :class:`WeightDelta`); its ``losses`` record the
        optimisation, its ``key`` and ``value`` are :math:`k^*` and :math:`v^*`.
    :raises MechanismError: if the subject is not in the prompt, on a bad layer or module,
        or on bad hyper-parameters.

    The defaults of ``lr``, ``weight_decay`` and ``clamp_norm_factor`` are ROME's, for real
    models (they rewrite "The Eiffel Tower is located in the city of" to " Rome" in
    SmolLM2-135M at layer 5). The tiny random test model needs a change ~30 times the norm
    of its MLP outputs, hence the settings below.

    >>> from pyro_lmscm.interventions import rome_edit
    >>> edit = rome_edit(tiny_lm, "she walked to the doctor", "the doctor", "home", layer=1,
    ...                  cov_texts=["the man went home", "she walked to work", "his old story"],
    ...                  lr=0.05, weight_decay=0.01, clamp_norm_factor=100.0)
    >>> ids = tiny_lm.encode("she walked to the doctor")
    >>> tiny_lm.decode(tiny_lm.logits(ids)[-1].argmax())
    'doctor'
    >>> with edit.activate(tiny_lm) as f:
    ...     tiny_lm.decode(f.logits(ids)[-1].argmax())
    'home'
    """
    owner = "rome_edit"
    as_lm(lm, owner=owner)
    layer_index = _resolve_layer(lm.model, _check_int(layer, "layer", owner), owner)
    num_steps = _check_int(num_steps, "num_steps", owner, minimum=0)
    lr, kl_factor, weight_decay, clamp_norm_factor, cov_ridge = (
        _check_real(value, name, owner)
        for name, value in (
            ("lr", lr),
            ("kl_factor", kl_factor),
            ("weight_decay", weight_decay),
            ("clamp_norm_factor", clamp_norm_factor),
            ("cov_ridge", cov_ridge),
        )
    )
    if min(lr, clamp_norm_factor) <= 0 or min(kl_factor, weight_decay, cov_ridge) < 0:
        raise MechanismError(
            f"{owner}: need lr > 0, clamp_norm_factor > 0 and kl_factor, weight_decay, cov_ridge >= 0; "
            f"got {lr}, {clamp_norm_factor}, {kl_factor}, {weight_decay}, {cov_ridge}."
        )
    projection = _Projection(lm, layer_index, module)
    edited, target_ids, subject_ids = _edit_texts(lm, prompt, subject, target, context_prefixes)
    if kl_prompts is None:
        kl = [subject_ids]
    else:
        kl = [_as_ids(lm, p, f"kl_prompts[{i}]") for i, p in enumerate(kl_prompts)]

    # k* and v0: the key and value at the subject's last token, averaged over contexts
    pairs = projection.keys_and_values(lm, [ids[:target_start] for ids, _, target_start in edited])
    key = torch.stack([k[position] for (k, _), (_, position, _) in zip(pairs, edited, strict=True)]).mean(0)
    value = torch.stack([v[position] for (_, v), (_, position, _) in zip(pairs, edited, strict=True)]).mean(0)

    # C: second moment of keys over the sample texts, with a ridge
    factor = _key_moment(lm, projection, cov_texts, cov_ridge, owner)[1]

    # v* = v0 + delta by gradient descent
    delta, losses = _value_delta(
        lm, projection, edited, target_ids, kl, value, num_steps, lr, kl_factor, weight_decay, clamp_norm_factor
    )

    with torch.no_grad():
        target_value = (value + delta).detach()
        current = projection.base(key.to(device=lm.device, dtype=projection.base.weight.dtype)).float()
        inverse_key = torch.cholesky_solve(key.double().cpu()[:, None], factor)[:, 0]
        key_direction = inverse_key / (inverse_key @ key.double().cpu())
        value_change = (target_value - current).double().cpu()
    edit = RankOneEdit(
        projection.name, value_change.float(), key_direction.float(), key=key.cpu(), value=target_value.cpu()
    )
    edit.losses = losses
    return edit
