"""Interrupt-safe changes of shared state: the restores of every mechanism (weight deltas,
forward hooks, adapters) and of the float32-copy scope cannot be split by Ctrl-C.

A base-level module: it imports nothing of the package but :mod:`pyro_lmscm.errors`, so the
language-model wrapper and every rung can use it.
"""

from __future__ import annotations

import _signal  # the C module: signal.signal is Python code, which could itself be interrupted
import functools
import threading
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "COMPUTE_LOCK",
    "ComputeLock",
    "forward_hook",
    "locked",
    "release_plate",
    "restore_atomically",
    "reversible",
    "sigint_deferred",
]

#: How often a restore step is retried after a KeyboardInterrupt raised inside it.
_RESTORE_ATTEMPTS = 100
_MAIN_THREAD = threading.main_thread().ident


class _Deferring:
    """The SIGINT handler of a deferring region outside a compute scope: it records the signal;
    ``previous`` is the handler it replaced."""

    __slots__ = ("previous", "received")

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.received: list[Any] = []

    def __call__(self, signum: int, frame: Any) -> None:
        self.received.append((signum, frame))


class _ScopeHandler:
    """The SIGINT handler of an outermost compute scope (main thread). It acts as the handler
    it replaced (``previous``; the default one raises KeyboardInterrupt) except inside a
    deferring region or a frame of this module's functions, where it holds the signal until
    the region ends, the next :func:`_flush` or the scope's end: so no restore is skipped at
    a function's entry, where Python checks for signals."""

    __slots__ = ("previous", "held", "deferring")

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.held: list[Any] = []
        self.deferring = 0

    def __call__(self, signum: int, frame: Any) -> None:
        if self.deferring or (frame is not None and frame.f_globals is _GLOBALS):
            self.held.append((signum, frame))
            return
        _forward(self.previous, signum, frame)


def _forward(previous: Any, signum: int, frame: Any) -> None:
    """Deliver a SIGINT as the handler ``previous`` would."""
    if previous is None or previous == _signal.default_int_handler:
        raise KeyboardInterrupt
    if callable(previous):
        previous(signum, frame)
    elif previous == _signal.SIG_DFL:
        _signal.raise_signal(_signal.SIGINT)


def _defer() -> Any:
    """Hold SIGINT from here to :func:`_undefer` (main thread only; elsewhere ``None``): inside a
    compute scope its handler holds it, else a :class:`_Deferring` handler is installed."""
    if threading.get_ident() != _MAIN_THREAD:
        return None
    current = _signal.getsignal(_signal.SIGINT)
    if isinstance(current, _ScopeHandler):
        current.deferring += 1
        return current
    handler = _Deferring(current)
    _signal.signal(_signal.SIGINT, handler)
    return handler


def _undefer(token: Any) -> tuple[Any, int, Any] | None:
    """End the region :func:`_defer` began; returns ``(handler, signum, frame)`` of a SIGINT
    held meanwhile (deliver it with ``_forward(*held)``), or ``None``."""
    if isinstance(token, _ScopeHandler):
        token.deferring -= 1
        if token.deferring == 0 and token.held:
            signum, frame = token.held[0]
            token.held.clear()
            return token.previous, signum, frame
        return None
    if isinstance(token, _Deferring):
        _signal.signal(_signal.SIGINT, token.previous)
        if token.received:
            return (token.previous, *token.received[0])
    return None


def _flush() -> None:
    """Deliver a SIGINT that the scope's handler holds (received in a frame of this module)."""
    current = _signal.getsignal(_signal.SIGINT) if threading.get_ident() == _MAIN_THREAD else None
    if isinstance(current, _ScopeHandler) and current.held and not current.deferring:
        signum, frame = current.held[0]
        current.held.clear()
        _forward(current.previous, signum, frame)


class sigint_deferred:  # noqa: N801 - used as a function, like contextlib's helpers
    """Hold SIGINT (Ctrl-C) inside the block and deliver it when the block ends, so that a
    model is never left half edited or half restored. Only the main thread receives signals;
    elsewhere this does nothing.

    A SIGINT held back is raised (as the previous handler would) from ``__exit__``: put the
    ``try``/``finally`` that undoes the block's change *around* the block, not after it.
    """

    def __enter__(self) -> None:
        self._token = _defer()

    def __exit__(self, *exc: Any) -> None:
        held = _undefer(self._token)
        if held is not None:
            _forward(*held)


def restore_atomically(*steps: Callable[[], Any]) -> None:
    """Run every (idempotent) restore step to completion, whatever interrupts it.

    SIGINT is held meanwhile and delivered afterwards; a ``KeyboardInterrupt`` raised inside
    a step all the same (by another library's signal handler, or a test's tracer) makes the
    step run again from its start. Other exceptions do not stop the later steps. The first
    exception is raised again once every step has finished. The deferring handler is
    installed by the first statement (inside a compute scope, the scope's handler holds a
    SIGINT at this function's entry), and besides the steps this function calls only C
    functions (``_signal.signal``, ``get_ident``, torch's grad-mode switches).

    Torch's grad mode is set back after every attempt: an interrupt inside ``torch.no_grad``'s
    own ``__exit__`` (a step decorated with it) would otherwise leave gradients off for the
    caller, and the step's rerun would keep them off.
    """
    token = _defer()
    held = None
    pending: BaseException | None = None
    grad = torch.is_grad_enabled()
    try:
        for step in steps:
            for _ in range(_RESTORE_ATTEMPTS):
                try:
                    step()
                    break
                except KeyboardInterrupt as error:
                    pending = pending or error
                except BaseException as error:  # noqa: BLE001 - raised again below
                    pending = pending or error
                    break
                finally:
                    torch._C._set_grad_enabled(grad)
    finally:
        held = _undefer(token)
    if pending is not None:
        raise pending
    if held is not None:
        _forward(*held)


_local = threading.local()


def _pending() -> list[_Undo]:
    """This thread's changes not restored yet, oldest first."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        pending = _local.pending = []
    return pending


class _Undo:
    """The restore of one change, registered before the change starts; it runs once."""

    __slots__ = ("steps", "done")

    def __init__(self, steps: tuple[Callable[[], Any], ...]) -> None:
        self.steps = steps
        self.done = False

    def run(self) -> None:
        try:
            if not self.done:
                restore_atomically(*self.steps)
        finally:
            self.done = True
            pending = _pending()
            if self in pending:
                pending.remove(self)


class reversible:  # noqa: N801 - used as a function, like contextlib's helpers
    """A change of shared state (a model's weights, hooks, flags) while the context is open;
    the context yields ``value``.

    ``apply()`` runs on entry with SIGINT held; on exit (also on an exception, also one in
    ``apply``) every step of ``restore`` runs to completion (:func:`restore_atomically`).
    ``restore`` must be right after *any* prefix of ``apply`` (record what you change before
    you change it) and idempotent. The context holds :data:`COMPUTE_LOCK`, so no other thread
    computes while the change is on.

    The restore is registered with this thread's outermost :data:`COMPUTE_LOCK` scope before
    ``apply`` starts: should an interrupt land where no ``__exit__`` is due yet (in
    contextlib's or ``ExitStack``'s plumbing around this context), the scope's exit restores
    it all the same.
    """

    def __init__(self, apply: Callable[[], Any], *restore: Callable[[], Any], value: Any = None) -> None:
        self._apply, self._restore, self._value = apply, restore, value

    def __enter__(self) -> Any:
        COMPUTE_LOCK.__enter__()  # first: inside the scope its handler holds a SIGINT in this frame
        undo = None
        try:
            token = _defer()
            held = None
            try:
                undo = self._undo = _Undo(self._restore)
                _pending().append(undo)
                self._apply()
            finally:
                held = _undefer(token)
            if held is not None:
                _forward(*held)
            return self._value
        except BaseException as error:
            try:
                if undo is not None:
                    undo.run()
            finally:
                COMPUTE_LOCK.__exit__(type(error), error, error.__traceback__)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self._undo.run()
        finally:
            COMPUTE_LOCK.__exit__(*exc)


def _remove_hook(module: nn.Module, hook: Callable[..., Any]) -> None:
    """Remove every registration of ``hook`` (by identity) from ``module``'s forward hooks."""
    keys = [key for key, value in list(module._forward_hooks.items()) if value is hook]
    for key in keys:
        module._forward_hooks.pop(key, None)
        getattr(module, "_forward_hooks_with_kwargs", {}).pop(key, None)
        getattr(module, "_forward_hooks_always_called", {}).pop(key, None)


def forward_hook(
    module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False, value: Any = None
) -> reversible:
    """Register a forward hook on ``module`` while the context is open (the context yields
    ``value``); registering and removing it cannot be split by Ctrl-C. The hook is removed by
    identity, so an interrupt inside ``register_forward_hook``, before it returns its handle,
    leaves nothing behind either."""
    return reversible(
        lambda: module.register_forward_hook(hook, with_kwargs=with_kwargs),
        lambda: _remove_hook(module, hook),
        value=value,
    )


class _Scope:
    """A thread's compute scopes: how deep, and what its outermost one saved on entry."""

    def __init__(self) -> None:
        self.depth = 0
        self.saved: tuple[int, bool, Any, Any] | None = None


def _scope() -> _Scope:
    scope = getattr(_local, "scope", None)
    if scope is None:
        scope = _local.scope = _Scope()
    return scope


class ComputeLock:
    """The lock of the process's computations on language models, and the scope that cleans
    up after an interrupt.

    One re-entrant lock for the whole process, not one per model: besides each model's weights
    and hooks (which the mechanisms change in place), Pyro's handler stack, torch's global
    random generator (which Pyro's samples use) and the SIGINT handler are the process's.
    Every mechanism's activation (:class:`reversible`), every forward call of
    :class:`~pyro_lmscm.lm.HFLanguageModel`, every seeded region
    (:func:`~pyro_lmscm.seeding.seeded`, so every ``counterfactual()``) and every
    :func:`~pyro_lmscm.lm.compute_scope` holds it, so threads sharing a model take turns:
    each computation sees the model as no other thread's mechanism leaves it.

    A thread's outermost scope installs (in the main thread) a SIGINT handler that acts as the
    one it replaces except inside this module's functions, where it holds the signal; on exit
    (also on an exception) it puts back what an interrupt may have left behind: the restores
    registered inside it and not run (:class:`reversible`), Pyro's handlers pushed inside it
    (it pushes an empty ``Messenger`` on entry and exits it with the exception, which pops
    everything pushed after it), torch's grad mode (on an exception) and the SIGINT handler.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> ComputeLock:
        scope = _scope()
        main = threading.get_ident() == _MAIN_THREAD
        entered = False
        try:
            token = _defer()
            held = None
            try:
                while not self._lock.acquire(timeout=0.05 if main else -1):
                    if isinstance(token, _Deferring) and token.received:  # Ctrl-C while another thread computes
                        break
                else:
                    entered = True
                    scope.depth += 1  # first: __exit__ undoes exactly this
                    if scope.depth == 1:
                        from pyro.poutine.messenger import Messenger

                        outer = Messenger()
                        base = token.previous if isinstance(token, _Deferring) else None
                        scope.saved = (len(_pending()), torch.is_grad_enabled(), base, outer)
                        restore_atomically(outer.__enter__)  # pushes it once, whatever interrupts it
            finally:
                if entered and scope.depth == 1 and isinstance(token, _Deferring):
                    # the scope's handler replaces the deferring one; it holds what that one got
                    handler = _ScopeHandler(token.previous)
                    _signal.signal(_signal.SIGINT, handler)
                    held = (token.previous, *token.received[0]) if token.received else None
                else:
                    held = _undefer(token)
            if held is not None:
                _forward(*held)
            return self
        except BaseException as error:
            if entered:
                self.__exit__(type(error), error, error.__traceback__)
            raise

    def __exit__(self, *exc: Any) -> None:
        scope = _scope()
        try:
            saved = scope.saved
            if scope.depth == 1 and saved is not None:
                try:
                    restore_atomically(lambda: _clean_up(saved, exc))
                finally:
                    if exc[0] is not None:  # after restore_atomically, which sets back the mode it found
                        torch._C._set_grad_enabled(saved[1])
        finally:
            scope.depth -= 1
            self._lock.release()
            if scope.depth == 0:
                _leave_scope(scope)
            else:
                _flush()

    def owner(self) -> str | None:
        """The name of the thread that holds the lock now, if any (for messages)."""
        owner = getattr(self._lock, "_owner", None)
        for thread in threading.enumerate():
            if thread.ident == owner:
                return thread.name
        return None


def _clean_up(saved: tuple[int, bool, Any, Any], exc: tuple[Any, ...]) -> None:
    """What the outermost scope's exit puts back (idempotent: it may run again if interrupted)."""
    mark, _, _, outer = saved
    pending = _pending()
    while len(pending) > mark:
        pending[-1].run()  # removes itself
    outer.__exit__(*(exc if exc[0] is not None else (KeyboardInterrupt, None, None)))  # pops what leaked


def _leave_scope(scope: _Scope) -> None:
    """Put back the SIGINT handler of before the outermost scope, then deliver a SIGINT it held."""
    saved, scope.saved = scope.saved, None
    if saved is None or saved[2] is None or threading.get_ident() != _MAIN_THREAD:
        return
    current = _signal.getsignal(_signal.SIGINT)
    _signal.signal(_signal.SIGINT, saved[2])
    if isinstance(current, _ScopeHandler) and current.held:
        _forward(saved[2], *current.held[0])


#: The lock of every computation on a language model in this process (see :class:`ComputeLock`).
COMPUTE_LOCK = ComputeLock()


def locked(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function`` inside :data:`COMPUTE_LOCK`: one turn of the process's computations,
    cleaned up after an interrupt (the entry points ``counterfactual()``, the exact queries and
    the scorer). Put it above ``@torch.no_grad()``, so that the scope covers its grad switch."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with COMPUTE_LOCK:
            return function(*args, **kwargs)

    return wrapper


def release_plate(plate: Any) -> None:
    """Free the dimension of the vectorized ``pyro.plate`` if it still holds it (idempotent):
    a plate whose ``__enter__`` was interrupted after Pyro allocated its dimension is never
    exited, and every later plate of its name raises ``ValueError: duplicate plate``."""
    try:
        plate.__exit__(KeyboardInterrupt, None, None)
    except (AssertionError, IndexError):
        pass  # it holds no dimension: exited already, or never allocated


_GLOBALS = globals()
