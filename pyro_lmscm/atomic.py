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
    "chained",
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

    The context is a level of this thread's :data:`COMPUTE_LOCK` scope, and its restore is
    registered with that level before ``apply`` starts: should an interrupt land where no
    ``__exit__`` is due yet (in contextlib's or ``ExitStack``'s plumbing around this context),
    the exit of the scope around it restores it all the same, and releases the lock as often.
    """

    def __init__(self, apply: Callable[[], Any], *restore: Callable[[], Any], value: Any = None) -> None:
        self._apply, self._restore, self._value = apply, restore, value

    def __enter__(self) -> Any:
        # first: inside the scope its handler holds a SIGINT in this frame; the entry's own token
        # (not the anonymous ``with COMPUTE_LOCK``) so that a lost exit is unwound by the scope around it
        self._token = COMPUTE_LOCK._enter()
        try:
            token = _defer()
            held = None
            try:
                _pending().append(_Undo(self._restore))
                self._apply()
            finally:
                held = _undefer(token)
            if held is not None:
                _forward(*held)
            return self._value
        except BaseException as error:
            # runs the restore registered above (and those of levels opened inside and left open)
            COMPUTE_LOCK._exit(self._token, type(error), error, error.__traceback__)
            raise

    def __exit__(self, *exc: Any) -> None:
        # the restore was registered right after this level opened: closing the level runs it,
        # after those of levels opened inside it and left open (newest first); a stale exit (a
        # generator finalised after the scope around it unwound it) does nothing
        COMPUTE_LOCK._exit(self._token, *exc)


class chained(reversible):  # noqa: N801 - used as a function, like contextlib's helpers
    """Contexts entered one after another as one context, and exited in reverse order: what
    ``ExitStack.enter_context`` in a loop does, without its windows. Each context is built by
    ``build(value)`` from the value the previous one gave (``value`` for the first); the
    context gives the last value.

    ``ExitStack`` records a context's exit only after its ``__enter__`` returned, in a Python
    call during which a SIGINT is raised (a frame's start checks for one): the context is then
    entered with no exit due. Here every entry runs with SIGINT held (a :class:`reversible`
    whose ``apply`` enters them), each context is recorded in the same frame as soon as its
    ``__enter__`` returns, and the exits run atomically (:func:`restore_atomically`), each once,
    newest first, also when one raises (the first exception is raised again after the others).
    The exits get the block's exception (a ``KeyboardInterrupt`` when the scope around runs
    them after an interrupt); what they return is ignored (no exception is suppressed). Not
    for contexts that switch torch's grad mode (the restore puts back the mode it found).
    """

    def __init__(self, value: Any, *builders: Callable[[Any], Any]) -> None:
        entered: list[tuple[Any, Any]] = []  # (context, its __exit__), oldest first
        self._exc: tuple[Any, Any, Any] = (KeyboardInterrupt, KeyboardInterrupt(), None)
        last = [value]

        def apply() -> None:
            for build in builders:
                context = build(last[0])
                enter, leave = type(context).__enter__, type(context).__exit__
                last[0] = enter(context)
                entered.append((context, leave))

        def restore() -> None:  # run again after a KeyboardInterrupt: the later exits run then
            first: BaseException | None = None
            while entered:
                context, leave = entered.pop()
                try:
                    leave(context, *self._exc)
                except KeyboardInterrupt:
                    raise
                except BaseException as error:  # noqa: BLE001 - raised again below
                    first = first or error
            if first is not None:
                raise first

        super().__init__(apply, restore)
        self._last = last

    def __enter__(self) -> Any:
        super().__enter__()
        return self._last[0]

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self._exc = exc  # type: ignore[assignment]
        else:
            self._exc = (None, None, None)
        super().__exit__(*exc)


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
    """A thread's compute scopes: per open entry (outermost first) the length of the journal of
    pending restores when it began; the levels entered by a plain ``with COMPUTE_LOCK``; what
    the outermost one saved on entry; which outermost scope this is (``epoch``: a token of an
    earlier one is stale)."""

    def __init__(self) -> None:
        self.marks: list[int] = []
        self.anonymous: list[int] = []
        self.saved: tuple[bool, Any, Any] | None = None  # grad mode, SIGINT handler, Pyro's outer Messenger
        self.epoch = 0

    @property
    def depth(self) -> int:
        return len(self.marks)


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
    :func:`~pyro_lmscm.runtime.compute_scope` holds it, so threads sharing a model take turns:
    each computation sees the model as no other thread's mechanism leaves it.

    A thread's outermost scope installs (in the main thread) a SIGINT handler that acts as the
    one it replaces except inside this module's functions, where it holds the signal; on exit
    (also on an exception) it puts back what an interrupt may have left behind: the restores
    registered inside it and not run (:class:`reversible`), Pyro's handlers pushed inside it
    (it pushes an empty ``Messenger`` on entry and exits it with the exception, which pops
    everything pushed after it), torch's grad mode (on an exception) and the SIGINT handler.

    Each entry is a level of the thread's scope. The exit of a level also closes every level
    opened inside it and still open (running the restores registered there, newest first,
    and releasing the lock as often): an entry whose exit never came (a context entered by
    contextlib's plumbing and interrupted before its exit was recorded) cannot keep the lock,
    the model's change or Pyro's handlers past the scope around it. An exit whose level was
    closed that way, or whose outermost scope ended, does nothing (a generator finalised late).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> ComputeLock:
        scope, _, level = self._enter()
        scope.anonymous.append(level)
        return self

    def __exit__(self, *exc: Any) -> None:
        scope = _scope()
        if not scope.anonymous:
            raise RuntimeError("COMPUTE_LOCK exited more often than entered")
        self._exit((scope, scope.epoch, scope.anonymous[-1]), *exc)

    def _enter(self) -> tuple[_Scope, int, int]:
        """Open a level of this thread's scope; returns its token for :meth:`_exit`."""
        scope = _scope()
        main = threading.get_ident() == _MAIN_THREAD
        level = 0
        try:
            token = _defer()
            held = None
            try:
                while not self._lock.acquire(timeout=0.05 if main else -1):
                    if isinstance(token, _Deferring) and token.received:  # Ctrl-C while another thread computes
                        break
                else:
                    if not scope.marks:
                        scope.epoch += 1
                        base = token.previous if isinstance(token, _Deferring) else None
                        scope.saved = (torch.is_grad_enabled(), base, None)
                    scope.marks.append(len(_pending()))
                    level = len(scope.marks)  # from here _exit undoes exactly this
                    if level == 1:
                        from pyro.poutine.messenger import Messenger

                        outer = Messenger()
                        scope.saved = (scope.saved[0], scope.saved[1], outer)  # type: ignore[index]
                        restore_atomically(outer.__enter__)  # pushes it once, whatever interrupts it
            finally:
                if level == 1 and isinstance(token, _Deferring):
                    # the scope's handler replaces the deferring one; it holds what that one got
                    handler = _ScopeHandler(token.previous)
                    _signal.signal(_signal.SIGINT, handler)
                    held = (token.previous, *token.received[0]) if token.received else None
                else:
                    held = _undefer(token)
            if held is not None:
                _forward(*held)
            return scope, scope.epoch, level
        except BaseException as error:
            if level:
                self._exit((scope, scope.epoch, level), type(error), error, error.__traceback__)
            raise

    @staticmethod
    def _is_open(token: tuple[_Scope, int, int]) -> bool:
        """Whether the level of ``token`` is open in this thread's scope now."""
        scope, epoch, level = token
        return scope is _scope() and epoch == scope.epoch and 0 < level <= len(scope.marks)

    def _exit(self, token: tuple[_Scope, int, int], *exc: Any) -> None:
        """Close the level of ``token`` and every level opened inside it (a stale token: nothing)."""
        if not self._is_open(token):
            return
        scope, _, level = token
        try:
            mark = scope.marks[level - 1]
            saved = scope.saved if level == 1 else None
            if saved is not None or len(_pending()) > mark:
                try:
                    restore_atomically(lambda: _clean_up(mark, saved, exc))
                finally:
                    if saved is not None and exc[0] is not None:  # after restore_atomically, which sets back the mode
                        torch._C._set_grad_enabled(saved[0])
        finally:
            while len(scope.marks) >= level:
                scope.marks.pop()
                self._lock.release()
            while scope.anonymous and scope.anonymous[-1] >= level:
                scope.anonymous.pop()
            if not scope.marks:
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


def _clean_up(mark: int, saved: tuple[bool, Any, Any] | None, exc: tuple[Any, ...]) -> None:
    """What a level's exit puts back (idempotent: it may run again if interrupted): the restores
    registered inside it and not run, newest first; for the outermost level, Pyro's handlers."""
    pending = _pending()
    first: BaseException | None = None
    while len(pending) > mark:
        try:
            pending[-1].run()  # removes itself
        except KeyboardInterrupt:
            raise  # restore_atomically runs this again: the older restores run then
        except BaseException as error:  # noqa: BLE001 - raised again below, after the others
            first = first or error
    if saved is not None and saved[2] is not None:  # pops what leaked
        saved[2].__exit__(*(exc if exc[0] is not None else (KeyboardInterrupt, None, None)))
    if first is not None:
        raise first


def _leave_scope(scope: _Scope) -> None:
    """Put back the SIGINT handler of before the outermost scope, then deliver a SIGINT it held."""
    saved, scope.saved = scope.saved, None
    if saved is None or saved[1] is None or threading.get_ident() != _MAIN_THREAD:
        return
    current = _signal.getsignal(_signal.SIGINT)
    _signal.signal(_signal.SIGINT, saved[1])
    if isinstance(current, _ScopeHandler) and current.held:
        _forward(saved[1], *current.held[0])


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
