"""Progress of long work, reported to whoever listens: nobody by default.

Library loops (decoding steps, beam-search steps, the exact sampler, comparisons, studies)
call :func:`report` with a task name, how far they advanced and the total; without a
listener that is a no-op, so the Python API prints nothing. An entry point that wants a
progress bar (the command line's rich bar on a terminal) installs a callback with
:func:`progress_to` for the duration of its work. The listener is held in a
:class:`contextvars.ContextVar`, so threads and other contexts do not see each other's.

>>> seen = []
>>> with progress_to(lambda task, advance, total: seen.append((task, advance, total))):
...     report("decoding", 1, 4)
>>> report("decoding", 1, 4)  # no listener: nothing happens
>>> seen
[('decoding', 1, 4)]
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

__all__ = ["ProgressCallback", "listening", "progress_to", "report"]

#: ``callback(task, advance, total)``: ``task`` names the work ("decoding"), ``advance`` is how
#: many units were done since the last call, ``total`` how many units the task has (``None``:
#: unknown). A task that has reached its total and advances again has started over.
ProgressCallback = Callable[[str, float, Optional[float]], None]

_LISTENER: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar(
    "pyro_lmscm_progress", default=None
)


def report(task: str, advance: float = 1, total: float | None = None) -> None:
    """Tell the listener (if any) that ``task`` advanced by ``advance`` of ``total`` units."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(task, advance, total)


def listening() -> bool:
    """Whether a listener is installed here (:func:`progress_to`)."""
    return _LISTENER.get() is not None


@contextlib.contextmanager
def progress_to(callback: ProgressCallback | None) -> Iterator[None]:
    """Within the block, :func:`report` calls ``callback`` (``None``: nobody)."""
    token = _LISTENER.set(callback)
    try:
        yield
    finally:
        _LISTENER.reset(token)
