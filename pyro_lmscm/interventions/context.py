r"""Bring your own intervention: any context manager that changes the model while it is open.

Researchers build interventions with other tools: forward hooks written by hand,
``steering_vectors.SteeringVector.apply(model, multiplier=...)``, a peft adapter switched on
and off, pyvene or repeng. :class:`ContextMechanism` makes any of them a
:class:`~pyro_lmscm.models.Mechanism` without re-expressing it: ``factory(hf_model)``
returns a context manager that changes ``hf_model`` while it is open and undoes the change
on exit. :class:`HookMechanism` does the same for bare forward hooks
(``{module_name: hook}``), and :func:`steering_vector_mechanism` for a trained
``SteeringVector``.

As every mechanism, it is entered only around the forward calls of its own rows
(:class:`~pyro_lmscm.models.incremental.MechanismBatch` runs each mechanism around its
group's prefill and steps), so the factual rows of the same batch never see it.

**The model must be as it was after each exit.** A context that forgets a hook, swaps a
module's parameter or leaves a weight edited would make every later call (the factual
world included) depend on history. The mechanism therefore records the model's state
before each entry and compares it after each exit:

* forward, backward and state-dict hooks of every module, and torch's global module hooks;
* the parameter and buffer objects, their storage (``data_ptr``), in-place version
  counters and ``requires_grad`` flags; ``module.training``; a ``forward`` set on an
  instance; each module's children;
* the values of the parameters and buffers, bit for bit: all of them once (by a blake2b
  digest per tensor) when the mechanism is checked against the model
  (:meth:`ContextMechanism.check`, which the SCM calls when it is built) and at the first
  activation on a model; afterwards those whose version counter moved (a tensor once seen
  to change in place is copied before each entry and compared with ``torch.equal``).

A write through ``tensor.data`` moves no version counter, so after the first
activation only the check of the first exit sees such a write; contexts that edit weights
should use ``torch.no_grad()`` and in-place ops (as peft and :class:`WeightDelta` do).

What it finds is put back, in one :func:`~pyro_lmscm.atomic.restore_atomically`
step that an interrupt cannot split (hooks, children, replaced tensors, flags, the guarded
weights; an unguarded weight edited in place cannot be, and the error says so), and then refused
with a :class:`~pyro_lmscm.errors.MechanismError` naming what changed. The context's own
``__exit__`` runs once, inside the same atomic restore, so Ctrl-C during it is held until
the model is whole again. An ``__exit__`` that raises is compared all the same: a change
it left is refused (the :class:`~pyro_lmscm.errors.MechanismError` chained from its error),
else its error is raised.
"""

from __future__ import annotations

import hashlib
import operator
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping

import torch
from torch import nn

from ..atomic import restore_atomically, sigint_deferred
from ..errors import MechanismError
from ..models.mechanism import Mechanism

if TYPE_CHECKING:
    from ..lm import HFLanguageModel

__all__ = ["ContextMechanism", "HookMechanism", "steering_vector_mechanism"]

#: The hook dictionaries of an ``nn.Module`` that a context may add to (those that exist in
#: the installed torch are read).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
#: torch's hooks on every module (``torch.nn.modules.module.register_module_forward_hook``).
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
#: transformers installs output-capturing hooks on a model once, at the first forward call
#: that asks for hidden states; they are the model's, not the context's.
_TRANSFORMERS_CAPTURE = "transformers.utils.output_capturing"


def _hook_dicts(model: nn.Module) -> list[tuple[str, dict[Any, Any]]]:
    """``(where, dict)`` for every hook dictionary of ``model``'s modules and torch's global
    ones, and each module's dictionary of children (``_modules``)."""
    from torch.nn.modules import module as torch_module

    out = [(f"torch.nn.modules.module.{name}", getattr(torch_module, name)) for name in _GLOBAL_HOOK_DICTS
           if isinstance(getattr(torch_module, name, None), dict)]
    for name, module in model.named_modules(remove_duplicate=False):
        for attribute in (*_HOOK_DICTS, "_modules"):
            hooks = vars(module).get(attribute)
            if isinstance(hooks, dict):
                out.append((f"{name or '<model>'}.{attribute}", hooks))
    return out


def _is_transformers_capture(hook: Any) -> bool:
    return getattr(hook, "__module__", None) == _TRANSFORMERS_CAPTURE


def _digest(tensor: torch.Tensor) -> bytes:
    """A blake2b digest of the bytes of ``tensor`` (any dtype, any device)."""
    flat = tensor.detach().reshape(-1).contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    data = flat.view(torch.uint8).numpy().data if flat.numel() else b""
    return hashlib.blake2b(data, digest_size=20).digest()


def _version(tensor: torch.Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # an inference-mode tensor has no version counter
        return -1


@dataclass
class _Slot:
    """A parameter or buffer as it was: its owner, the tensor object, a view of its storage
    and the flags and counter that move when it is changed."""

    name: str
    owner: nn.Module
    kind: str  # "_parameters" or "_buffers"
    key: str
    tensor: torch.Tensor
    storage: torch.Tensor  # `tensor.detach()`: the same storage, kept alive
    data_ptr: int
    version: int
    requires_grad: bool


@dataclass
class _State:
    """What a context may change on a model, recorded before entering it, as flat lists
    that :func:`_unchanged` compares with C-level ``map`` calls only (so that the restore
    step runs few Python lines an interrupt could land on)."""

    hooks: list[tuple[str, dict[Any, Any], list[tuple[Any, Any]]]]
    slots: list[_Slot]
    modules: list[tuple[str, nn.Module]]
    training: list[bool]
    forwards: list[Any]  # `vars(module).get("forward")` of each module
    guarded: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> copy of the value
    # the same, flat
    dicts: list[dict[Any, Any]] = field(default_factory=list)
    items: list[list[tuple[Any, Any]]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    pointers: list[int] = field(default_factory=list)
    flags: list[bool] = field(default_factory=list)
    module_list: list[nn.Module] = field(default_factory=list)


_TRAINING = operator.attrgetter("training")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _unchanged(state: _State) -> bool:
    """Whether the hooks, children, tensors, flags and ``forward`` attributes are as recorded."""
    try:
        return bool(
            list(map(list, map(dict.items, state.dicts))) == state.items
            and all(map(operator.is_, map(dict.get, state.tables, state.keys), state.tensors))
            and list(map(torch.Tensor.data_ptr, state.tensors)) == state.pointers
            and list(map(_REQUIRES_GRAD, state.tensors)) == state.flags
            and list(map(_TRAINING, state.module_list)) == state.training
            and all(map(operator.is_, map(dict.get, map(vars, state.module_list), repeat("forward")), state.forwards))
        )
    except RuntimeError:  # a tensor in a dict compared with `==`: it was replaced
        return False


def _slots(model: nn.Module) -> list[_Slot]:
    slots = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for key, tensor in vars(module)[kind].items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                name = f"{module_name}.{key}" if module_name else key
                slots.append(
                    _Slot(name, module, kind, key, tensor, tensor.detach(), tensor.data_ptr(), _version(tensor),
                          bool(tensor.requires_grad))
                )
    return slots


def _record(model: nn.Module) -> _State:
    modules = list(model.named_modules())
    hooks = [(where, hooks, list(hooks.items())) for where, hooks in _hook_dicts(model)]
    slots = _slots(model)
    return _State(
        hooks=hooks,
        slots=slots,
        modules=modules,
        training=[m.training for _, m in modules],
        forwards=[vars(m).get("forward") for _, m in modules],
        dicts=[h for _, h, _ in hooks],
        items=[items for _, _, items in hooks],
        tables=[vars(slot.owner)[slot.kind] for slot in slots],
        keys=[slot.key for slot in slots],
        tensors=[slot.tensor for slot in slots],
        pointers=[slot.data_ptr for slot in slots],
        flags=[slot.requires_grad for slot in slots],
        module_list=[m for _, m in modules],
    )


class ContextMechanism(Mechanism):
    r"""A mechanism given by a context manager that changes the model while it is open:

    .. math::

        \ell_t = f_{\theta}^{\,c}(\text{prompt}, w_{<t}),

    the logits of ``lm.model`` computed inside ``c = factory(lm.model)``. ``factory`` is
    called anew at each activation (around each forward call of this mechanism's rows); the
    value its context yields is ignored.

    Examples of ``factory``: ``lambda m: vector.apply(m, multiplier=2.0)`` (steering-vectors,
    see :func:`steering_vector_mechanism`), a generator function decorated with
    :func:`contextlib.contextmanager` that registers hooks and removes them in ``finally``,
    ``lambda m: m.disable_adapter()`` on a peft model.

    After each exit the model is compared with its state before the entry (module
    docstring); a change is put back where it can be and refused with a
    :class:`~pyro_lmscm.errors.MechanismError`.

    :param factory: ``hf_model -> context manager``.
    :param name: a name for messages and ``repr`` (default the factory's ``__qualname__``).
    :raises MechanismError: if ``factory`` is not callable; :meth:`check` and :meth:`activate`
        if it does not return a context manager or if its context leaves the model changed.

    >>> import contextlib
    >>> from pyro_lmscm.interventions import ContextMechanism
    >>> @contextlib.contextmanager
    ... def shifted(model):  # add 0.5 to the output of decoder layer 1
    ...     handle = model.model.layers[1].register_forward_hook(lambda m, args, out: out + 0.5)
    ...     try:
    ...         yield
    ...     finally:
    ...         handle.remove()
    >>> shift = ContextMechanism(shifted)
    >>> ids = torch.tensor([[2, 3, 4]])
    >>> with shift.activate(tiny_lm) as f:
    ...     edited = f.logits(ids)
    >>> bool((edited != tiny_lm.logits(ids)).any()), len(tiny_lm.model.model.layers[1]._forward_hooks)
    (True, 0)
    """

    def __init__(self, factory: Callable[[nn.Module], ContextManager[Any]], name: str | None = None) -> None:
        if not callable(factory):
            raise MechanismError(
                f"ContextMechanism: `factory` must be a callable hf_model -> context manager, got "
                f"{type(factory).__name__} {factory!r:.80}."
            )
        if name is not None and not isinstance(name, str):
            raise MechanismError(f"ContextMechanism: `name` must be a str, got {type(name).__name__}.")
        self.factory = factory
        self.name = name or getattr(factory, "__qualname__", type(factory).__name__)
        # per model (weakly held): a digest of every parameter and buffer with the version
        # counter and storage it was taken at, and the names of the tensors this context
        # edits in place
        self._digests: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[int, int, bytes]]] = (
            weakref.WeakKeyDictionary()
        )
        self._guarded: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()

    def check(self, lm: HFLanguageModel) -> None:
        """Run the context once on ``lm.model`` (entered and left, no forward pass) and
        compare every parameter and buffer bit for bit, and the hooks, flags and module
        tree, with their state before.

        :raises MechanismError: if the factory does not return a context manager or its
            context leaves the model changed.
        """
        model = lm.model
        self._digests.pop(model, None)  # a full comparison, from fresh digests
        with self._applied(model, full=True):
            pass

    def activate(self, lm: HFLanguageModel) -> ContextManager[HFLanguageModel]:
        return self._activated(lm)

    @contextmanager
    def _activated(self, lm: HFLanguageModel) -> Iterator[HFLanguageModel]:
        with self._applied(lm.model, full=lm.model not in self._digests):
            yield lm

    def _fresh_digests(
        self, model: nn.Module, slots: list[_Slot], guarded: set[str]
    ) -> dict[str, tuple[int, int, bytes]]:
        """Digests of the tensors not guarded by a copy, retaken for those changed (version
        moved, storage replaced) since they were taken."""
        digests = self._digests.setdefault(model, {})
        for slot in slots:
            if slot.name in guarded:
                continue
            known = digests.get(slot.name)
            if known is None or known[0] != slot.version or known[1] != slot.data_ptr:
                digests[slot.name] = (slot.version, slot.data_ptr, _digest(slot.tensor))
        return digests

    @contextmanager
    def _applied(self, model: nn.Module, full: bool) -> Iterator[None]:
        state = _record(model)
        guarded = self._guarded.setdefault(model, set())
        digests = self._fresh_digests(model, state.slots, guarded)
        state.guarded = {s.name: s.tensor.detach().clone() for s in state.slots if s.name in guarded}
        problems: list[str] = []
        context: Any = None
        entered = False
        left = [False]
        error: BaseException | None = None

        def leave() -> None:  # the context's own exit, run once
            if entered and not left[0]:
                left[0] = True
                context.__exit__(type(error) if error is not None else None, error,
                                 error.__traceback__ if error is not None else None)

        def repair() -> None:  # idempotent: reruns from the start if interrupted
            problems[:] = _repair(state)
            problems.extend(_restore_guarded(state))

        try:
            with sigint_deferred():
                context = self.factory(model)
                if isinstance(context, type) or not (hasattr(context, "__enter__") and hasattr(context, "__exit__")):
                    kind = f"the class {context.__qualname__}" if isinstance(context, type) else type(context).__name__
                    raise MechanismError(
                        f"ContextMechanism({self.name}): the factory returned {kind}, "
                        "not a context manager; return one (an instance), e.g. `vector.apply(model)` or a "
                        "@contextlib.contextmanager generator."
                    )
                context.__enter__()
                entered = True
            yield
        except BaseException as raised:
            error = raised
            raise
        finally:
            failed: Exception | None = None
            try:
                restore_atomically(leave, repair)
            except Exception as raised:  # the context's own __exit__ failed: its edits are compared all the same
                failed = raised
            problems.extend(self._compare_values(state, digests, guarded, full))
            if problems:
                raise MechanismError(
                    f"ContextMechanism({self.name}): the context left the model changed on exit"
                    + (f" (its __exit__ raised {type(failed).__name__}: {failed})" if failed is not None else "")
                    + ": " + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
                    + ". A context must undo every change it makes (remove its hooks, restore its weights)."
                ) from failed
            if failed is not None:
                raise failed

    def _compare_values(
        self, state: _State, digests: dict[str, tuple[int, int, bytes]], guarded: set[str], full: bool
    ) -> list[str]:
        """Tensors not guarded by a copy, edited in place and not restored: compared by
        digest, all of them when ``full``, else those whose version counter moved (which
        are guarded from the next entry on)."""
        problems = []
        for slot in state.slots:
            if slot.name in state.guarded:
                continue
            version = _version(slot.tensor)
            if not full and version == slot.version:
                continue
            if _digest(slot.tensor) != digests[slot.name][2]:
                problems.append(f"{slot.name} was edited in place and not restored (NOT put back: reload the model)")
            else:
                digests[slot.name] = (version, slot.data_ptr, digests[slot.name][2])
            if version != slot.version:
                guarded.add(slot.name)  # edited in place by this context: copied before the next entry
        return problems

    def __repr__(self) -> str:
        return f"ContextMechanism({self.name})"


def _repair(state: _State) -> list[str]:
    """Put back the hooks, replaced tensors, flags and ``forward`` attributes of ``state``;
    the changes found, in words (idempotent)."""
    if _unchanged(state):
        return []
    problems = []
    for where, hooks, items in state.hooks:
        current = list(hooks.items())
        if current == items:
            continue
        before = {k for k, _ in items}
        model_own = [(k, v) for k, v in current if k not in before and _is_transformers_capture(v)]
        if current != items + model_own:
            added = [k for k, v in current if k not in before and not _is_transformers_capture(v)]
            removed = before - {k for k, _ in current}
            if where.endswith("._modules"):
                problems.append(f"{where}: children added, removed or replaced (put back)")
            else:
                problems.append(f"{where}: {len(added)} hook(s) left registered, {len(removed)} removed (put back)")
            hooks.clear()
            hooks.update(items + model_own)
    for slot in state.slots:
        table = vars(slot.owner)[slot.kind]
        if table.get(slot.key) is not slot.tensor:
            problems.append(f"{slot.name} was replaced by another tensor (put back)")
            table[slot.key] = slot.tensor
        if slot.tensor.data_ptr() != slot.data_ptr:
            problems.append(f"{slot.name}.data was reassigned (put back)")
            with torch.no_grad():
                slot.tensor.data = slot.storage
        if slot.tensor.requires_grad != slot.requires_grad:
            problems.append(f"{slot.name}.requires_grad was changed (put back)")
            slot.tensor.requires_grad_(slot.requires_grad)
    for (name, module), training, forward in zip(state.modules, state.training, state.forwards):
        if module.training != training:
            problems.append(f"{name or '<model>'}.training was changed (put back)")
            module.training = training
        now = vars(module).get("forward")
        if now is not forward:
            problems.append(f"{name or '<model>'}.forward was replaced (put back)")
            if forward is None:
                vars(module).pop("forward", None)
            else:
                vars(module)["forward"] = forward
    return problems


def _restore_guarded(state: _State) -> list[str]:
    """Copy back the tensors guarded by a copy that differ from it (idempotent)."""
    guarded = [s for s in state.slots if s.name in state.guarded] if state.guarded else []
    changed = [s for s in guarded if not torch.equal(s.tensor, state.guarded[s.name])]
    if changed:
        with torch.no_grad():
            torch._foreach_copy_([s.tensor.detach() for s in changed], [state.guarded[s.name] for s in changed])
    return [f"{s.name} was edited in place and not restored (put back)" for s in changed]


def _submodule(model: nn.Module, name: str, owner: str) -> nn.Module:
    if not isinstance(name, str):
        raise MechanismError(f"{owner}: module names are strings, got {type(name).__name__} {name!r}.")
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    parent, _, leaf = name.rpartition(".")
    close = [n for n, _ in model.named_modules() if n.endswith("." + leaf) or n == leaf][:3]
    hint = f" Modules ending in {leaf!r}: {close}." if close else ""
    try:
        named = model.get_submodule(parent).named_children()
        children = [f"{parent}.{child}" if parent else child for child, _ in named]
    except AttributeError:
        children = []
    if children and not close:
        more = " ..." if len(children) > 3 else ""
        hint = f" {parent or 'The model'} has {len(children)} children: {children[:3]}{more}."
    raise MechanismError(f"{owner}: the model has no module {name!r}.{hint or ' See `lm.model.named_modules()`.'}")


class HookMechanism(ContextMechanism):
    r"""Bare forward hooks as a mechanism: while it is active, ``hooks[name]`` is a forward
    hook on the module ``name`` of ``lm.model`` (``hook(module, args, output)``, returning
    the new output or ``None``; see ``torch.nn.Module.register_forward_hook``), and
    :math:`\ell_t` are the logits of the hooked model. The hooks are removed on exit and
    the model checked as for :class:`ContextMechanism`.

    :param hooks: module name (as in ``lm.model.named_modules()``, e.g.
        ``"model.layers.1"``) to a hook, or to a list of hooks registered in order.
    :raises MechanismError: for an empty mapping or a hook that is not callable;
        :meth:`check` (and the first activation) for an unknown module name.

    >>> from pyro_lmscm.interventions import HookMechanism
    >>> hooked = HookMechanism({"model.layers.1": lambda module, args, out: out + 0.5})
    >>> hooked.check(tiny_lm)
    >>> HookMechanism({"model.layer.1": print}).check(tiny_lm)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pyro_lmscm.errors.MechanismError: HookMechanism: the model has no module 'model.layer.1'. Modules ending in '1': ...
    """

    def __init__(self, hooks: Mapping[str, Callable[..., Any] | list[Callable[..., Any]]]) -> None:
        if not isinstance(hooks, Mapping) or not hooks:
            raise MechanismError(
                "HookMechanism: `hooks` must be a non-empty mapping {module_name: hook}, got "
                f"{type(hooks).__name__} {hooks!r:.80}."
            )
        self.hooks: dict[str, list[Callable[..., Any]]] = {}
        for name, value in hooks.items():
            if not isinstance(name, str):
                raise MechanismError(f"HookMechanism: module names are strings, got {type(name).__name__} {name!r}.")
            listed = list(value) if isinstance(value, (list, tuple)) else [value]
            for hook in listed:
                if not callable(hook):
                    raise MechanismError(
                        f"HookMechanism: the hook of {name!r} must be callable (module, args, output), "
                        f"got {type(hook).__name__} {hook!r:.80}."
                    )
            self.hooks[name] = listed
        super().__init__(self._registered, name=f"hooks on {sorted(self.hooks)}")

    def check(self, lm: HFLanguageModel) -> None:
        for name in self.hooks:
            _submodule(lm.model, name, "HookMechanism")
        super().check(lm)

    @contextmanager
    def _registered(self, model: nn.Module) -> Iterator[None]:
        modules = [(_submodule(model, name, "HookMechanism"), hooks) for name, hooks in self.hooks.items()]
        with ExitStack() as stack:
            for module, hooks in modules:
                for hook in hooks:
                    stack.callback(module.register_forward_hook(hook).remove)
            yield

    def __repr__(self) -> str:
        return f"HookMechanism({ {name: len(hooks) for name, hooks in self.hooks.items()} })"


def steering_vector_mechanism(vector: Any, multiplier: float = 1.0, **apply_kwargs: Any) -> ContextMechanism:
    r"""A trained ``steering_vectors.SteeringVector`` as a mechanism (the optional extra
    ``pip install 'pyro-lmscm[steering]'``): while active,
    ``vector.apply(lm.model, multiplier=multiplier, **apply_kwargs)`` adds
    :math:`\alpha v_L` (:math:`\alpha` = ``multiplier``) to the output of each decoder layer
    :math:`L` the vector has, at every position.

    steering-vectors selects positions by their index *within one forward call*
    (``min_token_index``, ``token_indices``); in KV-cached decoding each step is one token
    at index 0, so anything but every position (the default) steers other tokens than in
    a teacher-forced pass, and is refused here.
    :class:`~pyro_lmscm.interventions.ActivationSteering` counts absolute positions
    (``start``) instead.

    :param vector: a ``steering_vectors.SteeringVector``.
    :param multiplier: :math:`\alpha`.
    :param apply_kwargs: other keywords of ``SteeringVector.apply`` (``layer_config``, ``operator``).
    :raises MechanismError: for another kind of ``vector``, a non-finite ``multiplier``, or
        ``min_token_index`` / ``token_indices``.
    """
    from ..validation import as_real, is_integer

    if not callable(getattr(vector, "apply", None)) or not isinstance(getattr(vector, "layer_activations", None), dict):
        raise MechanismError(
            f"steering_vector_mechanism: `vector` must be a steering_vectors.SteeringVector, got "
            f"{type(vector).__name__}."
        )
    alpha = as_real(multiplier, "multiplier", error=MechanismError, owner="steering_vector_mechanism")
    positional = sorted({"min_token_index", "token_indices"} & set(apply_kwargs))
    # every position: no token_indices (a list, slice or tensor of them), and a first index of 0
    first = apply_kwargs.get("min_token_index")
    if apply_kwargs.get("token_indices") is not None or not (first is None or (is_integer(first) and int(first) == 0)):
        raise MechanismError(
            f"steering_vector_mechanism: {positional} count positions within one forward call, which differ "
            "between cached decoding and a teacher-forced pass; steer every position, or use "
            "ActivationSteering(start=...) for absolute positions."
        )
    layers = sorted(vector.layer_activations)

    def apply(model: nn.Module) -> ContextManager[Any]:
        return vector.apply(model, multiplier=alpha, **apply_kwargs)

    return ContextMechanism(apply, name=f"SteeringVector(layers={layers}, multiplier={alpha:g})")
