"""What the library prints, and to whom: progress reports and third-party output.

**Progress.** Library loops (decoding steps, beam-search steps, the exact sampler,
comparisons, studies) call :func:`report` with a task name, how far they advanced and the
total; without a listener that is a no-op, so the Python API prints nothing. An entry point
that wants a progress bar (the command line's rich bar on a terminal) installs a callback
with :func:`progress_to` for the duration of its work. The listener is held in a
:class:`contextvars.ContextVar`, so threads and other contexts do not see each other's.

>>> seen = []
>>> with progress_to(lambda task, advance, total: seen.append((task, advance, total))):
...     report("decoding", 1, 4)
>>> report("decoding", 1, 4)  # no listener: nothing happens
>>> seen
[('decoding', 1, 4)]

**Third-party output.** ``transformers``' log lines and "Loading weights" bar, the hub's
download bars and third-party warnings are silenced around the library's own calls into
them (model loading, :func:`quiet_third_party`), unless the caller asks for them
(``verbose=True``, the command line's ``--verbose``: :func:`verbose_output`). Nothing is
changed for good: each scope restores what it found.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Callable, Iterator, Optional

from .errors import LMSCMWarning

__all__ = [
    "ProgressCallback",
    "is_verbose",
    "listening",
    "progress_to",
    "quiet_third_party",
    "report",
    "verbose_output",
]

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


_VERBOSE: contextvars.ContextVar[bool] = contextvars.ContextVar("pyro_lmscm_verbose", default=False)


def is_verbose() -> bool:
    """Whether third-party output is wanted here (inside :func:`verbose_output`)."""
    return _VERBOSE.get()


@contextlib.contextmanager
def verbose_output(verbose: bool = True) -> Iterator[None]:
    """Inside the block, :func:`quiet_third_party` lets third-party output through (``verbose``)."""
    token = _VERBOSE.set(bool(verbose))
    try:
        yield
    finally:
        _VERBOSE.reset(token)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside the block, third-party warnings, ``transformers`` log lines below errors and
    progress bars (``transformers``' "Loading weights", the hub's downloads) are silenced;
    our own :class:`~pyro_lmscm.errors.LMSCMWarning` still shows. Everything is restored on
    exit. A no-op inside :func:`verbose_output`."""
    if is_verbose():
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", LMSCMWarning)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        disable_progress_bars()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            if not hub_bars_off:
                enable_progress_bars()
