r"""LoRA adapters (via ``peft``) as mechanisms, enabled only while the mechanism is active.

``peft`` adds adapters to a model *in place*: :func:`peft.inject_adapter_in_model`
(which :meth:`LoRAAdapter.from_config` calls), ``get_peft_model`` and transformers'
``model.add_adapter`` / ``load_adapter`` all replace each targeted ``nn.Linear`` by a
``peft`` layer that holds the original module as ``base_layer``; nothing is copied. Two
consequences:

* the factual model and the adapter share one module, so the adapter must be *off*
  whenever the factual mechanism runs: :class:`LoRAAdapter` disables the adapter layers
  when it is built and enables its adapter only inside :meth:`LoRAAdapter.activate`. A
  disabled ``peft`` LoRA layer returns ``base_layer(x)`` and nothing else, so the factual
  logits are bit-identical to those of the model before injection;
* in ``named_parameters()`` and ``state_dict()`` the weights of targeted modules gain
  ``.base_layer``: ``model.layers.0.self_attn.q_proj.weight`` is listed as
  ``model.layers.0.self_attn.q_proj.base_layer.weight``. Module paths
  (``model.model.layers[i].mlp.down_proj``) are unchanged and the ``peft`` layer's
  ``weight`` property returns the base weight, so ``model.get_parameter`` still resolves
  the old name: :class:`~pyro_lmscm.HFLanguageModel`, :class:`ActivationSteering`,
  :class:`AffineSteering`, :class:`WeightDelta` and :func:`rome_edit` work as before. A
  ``PeftModel`` (from ``get_peft_model``) wraps the same module and adds the prefix
  ``base_model.model.`` to every name; ``HFLanguageModel(peft_model)`` works too.

Uses ``peft``, a dependency of this package.

References

[1] Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models* (ICLR 2022),
    arXiv:2106.09685.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any, ContextManager, Mapping

import torch

from ..atomic import restore_atomically, reversible
from ..errors import MechanismError
from ..models.mechanism import Mechanism
from ..validation import as_lm
from .weight_edit import part_of

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

    from ..lm import HFLanguageModel

__all__ = ["LoRAAdapter"]


def _tuner_layer_class() -> type:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise MechanismError(
            "LoRAAdapter needs the optional dependency `peft`; install it with "
            "`pip install pyro-lmscm[peft]`."
        ) from error
    return BaseTunerLayer


def _tuner_layers(model: nn.Module) -> list[Any]:
    layer_class = _tuner_layer_class()
    return [module for module in model.modules() if isinstance(module, layer_class)]


def _adapters_of(layer: Any) -> set[str]:
    names: set[str] = set()
    for attribute in layer.adapter_layer_names:
        container = getattr(layer, attribute, None)
        if isinstance(container, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
            names.update(container.keys())
    return names


def _adapter_parameters(layer: Any) -> list[torch.nn.Parameter]:
    parameters: list[torch.nn.Parameter] = []
    for attribute in layer.adapter_layer_names:
        container = getattr(layer, attribute, None)
        if isinstance(container, torch.nn.ModuleDict):
            parameters.extend(p for module in container.values() for p in module.parameters())
        elif isinstance(container, torch.nn.ParameterDict):
            parameters.extend(container.values())
    return parameters


def _is_on(layer: Any) -> bool:
    """Does this peft layer change the base layer's output right now?"""
    return not layer.disable_adapters and bool(set(layer.active_adapters) & _adapters_of(layer))


class LoRAAdapter(Mechanism):
    r"""The factual model with a LoRA adapter switched on:

    .. math::

        \ell_t = f_{\theta'}(\text{prompt}, w_{<t}), \qquad
        W'_n = W_n + \frac{a}{r}\, B_n A_n \text{ for each adapted weight } W_n,

    where :math:`\theta` are the parameters of ``lm.model``, :math:`A_n \in \mathbb{R}^{r \times d_{in}}`,
    :math:`B_n \in \mathbb{R}^{d_{out} \times r}` are the adapter's low-rank factors for the
    targeted module :math:`n`, :math:`r` is the rank and :math:`a` is ``lora_alpha`` of the
    adapter's ``LoraConfig`` (any ``peft`` tuner layer works the same way).

    The adapter must live inside ``lm.model`` (injected in place, see the module docstring).
    Building a :class:`LoRAAdapter` disables every ``peft`` layer of ``model`` (so that the
    model itself is the base model, the factual mechanism) and puts them in eval mode;
    :meth:`activate` enables only adapter ``adapter_name`` and restores the previous state
    on exit, also on an exception (``requires_grad`` flags included).

    :param model: the module holding the adapter: ``lm.model`` after ``inject_adapter_in_model``
        or ``model.add_adapter``, or a ``PeftModel`` wrapping it.
    :param adapter_name: the adapter to switch on.
    :raises MechanismError: if ``peft`` is missing, ``model`` has no adapter ``adapter_name``,
        or it is merged into the base weights.

    >>> from peft import LoraConfig
    >>> from pyro_lmscm.interventions import LoRAAdapter
    >>> from pyro_lmscm.testing import tiny_llama
    >>> lm = tiny_llama()
    >>> ids = torch.tensor([2, 3, 4])
    >>> before = lm.logits(ids)
    >>> config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    >>> adapter = LoRAAdapter.from_config(lm, config)
    >>> with adapter.activate(lm) as f:
    ...     adapted = f.logits(ids)
    >>> torch.equal(lm.logits(ids), before), torch.equal(adapted, before)
    (True, False)
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        if not isinstance(adapter_name, str):
            raise MechanismError(f"LoRAAdapter: `adapter_name` must be a string, got {adapter_name!r}.")
        layers = _tuner_layers(model)
        available = sorted(set().union(*(_adapters_of(layer) for layer in layers))) if layers else []
        if adapter_name not in available:
            raise MechanismError(
                f"LoRAAdapter: {type(model).__name__} has no adapter {adapter_name!r}; it has "
                f"{available}. Inject one with LoRAAdapter.from_config(lm, LoraConfig(...))."
            )
        self.model = model
        self.adapter_name = adapter_name
        self._layers = [layer for layer in layers if adapter_name in _adapters_of(layer)]
        names = {id(module): name for name, module in model.named_modules()}
        #: the module name of each adapted layer, as in ``model.named_modules()``
        self._names = [names[id(layer)] for layer in self._layers]
        self._check_not_merged(layers)
        for layer in layers:
            layer.enable_adapters(False)
            layer.eval()

    @classmethod
    def from_config(
        cls,
        lm: HFLanguageModel,
        config: LoraConfig,
        adapter_name: str = "default",
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> LoRAAdapter:
        r"""Inject a new adapter into ``lm.model`` in place and wrap it.

        ``peft`` freezes the base parameters when it injects (``requires_grad=False``); their
        previous flags are restored here.

        :param lm: the factual language model.
        :param config: a ``peft.LoraConfig`` (``target_modules`` e.g. ``["q_proj", "v_proj"]``).
        :param adapter_name: the new adapter's name.
        :param state_dict: optional adapter weights, as saved by ``get_peft_model_state_dict``
            (names without the adapter name, e.g. ``"model.layers.0.self_attn.q_proj.lora_A.weight"``).
        :raises MechanismError: if the name is taken, or the weights do not fit.
        """
        as_lm(lm, owner="LoRAAdapter.from_config")
        _tuner_layer_class()
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        taken = set().union(*(_adapters_of(layer) for layer in _tuner_layers(lm.model)))
        if adapter_name in taken:
            raise MechanismError(
                f"LoRAAdapter.from_config: lm.model already has an adapter {adapter_name!r}; "
                f"use LoRAAdapter(lm.model, {adapter_name!r}) or another name."
            )
        flags = [(p, p.requires_grad) for p in lm.model.parameters()]
        try:
            with warnings.catch_warnings():
                # several adapters in one model is the point here (one mechanism each)
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(config, lm.model, adapter_name=adapter_name)
        except ValueError as error:
            raise MechanismError(
                f"LoRAAdapter.from_config: peft could not inject {config!r}: {error}"
            ) from error
        finally:
            restore_atomically(lambda: [parameter.requires_grad_(flag) for parameter, flag in flags])
        if state_dict is not None:
            result = set_peft_model_state_dict(lm.model, dict(state_dict), adapter_name=adapter_name)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise MechanismError(
                    f"LoRAAdapter.from_config: `state_dict` has keys that match no adapter weight: "
                    f"{unexpected[:3]}."
                )
        return cls(lm.model, adapter_name)

    def _check_not_merged(self, layers: list[Any]) -> None:
        merged = [layer for layer in layers if layer.merged]
        if merged:
            raise MechanismError(
                f"LoRAAdapter: adapters {sorted(set(merged[0].merged_adapters))} are merged into the "
                "base weights, so the factual model would include them; unmerge them first "
                "(peft_model.unmerge_adapter())."
            )

    def check(self, lm: HFLanguageModel) -> None:
        modules = {id(module) for module in lm.model.modules()}
        if any(id(layer) not in modules for layer in self._layers):
            raise MechanismError(
                f"LoRAAdapter: adapter {self.adapter_name!r} lives in another model than the factual "
                "model; inject it into lm.model (LoRAAdapter.from_config(lm, config)), or wrap a "
                "separately loaded fine-tuned model in ModelSwap."
            )
        layers = _tuner_layers(lm.model)
        self._check_not_merged(layers)
        on = [layer for layer in layers if _is_on(layer)]
        if on:
            raise MechanismError(
                f"LoRAAdapter: adapters {on[0].active_adapters} of lm.model are enabled, so the "
                "factual mechanism would not be the base model; disable them "
                "(peft_model.base_model.disable_adapter_layers() or model.disable_adapters())."
            )

    def parts(self) -> list[str]:
        """One part per adapted decoder layer (``"layer 3"``: every adapted module in it), and
        one per adapted module outside the decoder layers (its name)."""
        return list(dict.fromkeys(part_of(name) for name in self._names))

    def _restricted(self, parts: list[str]) -> LoRAAdapter:
        """The adapter switched on in the modules of ``parts`` alone (the others stay off)."""
        keep = [i for i, name in enumerate(self._names) if part_of(name) in parts]
        adapter = copy.copy(self)
        adapter._layers = [self._layers[i] for i in keep]
        adapter._names = [self._names[i] for i in keep]
        return adapter

    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        saved: list[list[tuple[Any, list[str], bool, list[tuple[torch.nn.Parameter, bool]]]]] = []

        def apply() -> None:
            state = [
                (layer, list(layer.active_adapters), layer.disable_adapters,
                 [(p, p.requires_grad) for p in _adapter_parameters(layer)])
                for layer in self._layers
            ]
            saved.append(state)  # every layer's state, before any layer changes
            for layer in self._layers:
                layer.set_adapter(self.adapter_name)
                layer.enable_adapters(True)

        def restore() -> None:  # idempotent: run again from the start if interrupted
            for state in saved:
                for layer, active, disabled, flags in reversed(state):
                    layer.set_adapter(active)
                    layer.enable_adapters(not disabled)
                    for parameter, flag in flags:
                        parameter.requires_grad_(flag)

        return reversible(apply, restore, value=lm)

    def __repr__(self) -> str:
        return f"LoRAAdapter({self.adapter_name!r}, layers={len(self._layers)})"
