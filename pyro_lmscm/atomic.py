"""Interrupt-safe changes of shared state: the restores of every mechanism (weight deltas,
forward hooks, adapters) and of the float32-copy scope cannot be split by Ctrl-C.

A base-level module: it imports nothing of the package but :mod:`pyro_lmscm.errors`, so the
language-model wrapper and every rung can use it.
"""

from __future__ import annotations

import _signal  # the C module: signal.signal is Python code, which could itself be interrupted
import signal
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

if TYPE_CHECKING:
    from torch import nn

__all__ = ["forward_hook", "restore_atomically", "sigint_deferred"]

#: How often a restore step is retried after a KeyboardInterrupt raised inside it.
_RESTORE_ATTEMPTS = 100
_MAIN_THREAD = threading.main_thread().ident


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) inside the block and deliver it when the block ends, so that a
    model is never left half edited or half restored. Only the main thread receives signals;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if received:
            if callable(previous):
                previous(*received[0])  # Python's default handler raises KeyboardInterrupt
            elif previous != signal.SIG_IGN:
                signal.raise_signal(signal.SIGINT)


def restore_atomically(*steps: Callable[[], Any]) -> None:
    """Run every (idempotent) restore step to completion, whatever interrupts it.

    SIGINT is held meanwhile and delivered afterwards; a ``KeyboardInterrupt`` raised inside
    a step all the same (by another library's signal handler, or a test's tracer) makes the
    step run again from its start. Other exceptions do not stop the later steps. The first
    exception is raised again once every step has finished. Between the steps this function
    calls only C functions (``_signal.signal``, ``get_ident``, torch's grad-mode switches), so
    nothing of Python's can be interrupted there but its own lines.

    Torch's grad mode is set back after every attempt: an interrupt inside ``torch.no_grad``'s
    own ``__exit__`` (a step decorated with it) would otherwise leave gradients off for the
    caller, and the step's rerun would keep them off.
    """
    pending: BaseException | None = None
    received: list[Any] = []
    grad = torch.is_grad_enabled()
    deferring = threading.get_ident() == _MAIN_THREAD
    if deferring:
        previous = _signal.signal(_signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
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
        if deferring:
            _signal.signal(_signal.SIGINT, previous if previous is not None else _signal.default_int_handler)
    if received and pending is None:
        pending = KeyboardInterrupt()
    if pending is not None:
        raise pending


@contextmanager
def forward_hook(module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> Iterator[None]:
    """Register a forward hook on ``module`` while the context is open; registering and
    removing it cannot be split by Ctrl-C."""
    with sigint_deferred():
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        restore_atomically(handle.remove)
