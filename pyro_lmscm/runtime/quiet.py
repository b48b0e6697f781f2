"""Third-party output: ``transformers``' log lines and "Loading weights" bar, the hub's
download bars and third-party warnings are silenced around the library's own calls into them
(model loading), unless the caller asks for them (``verbose=True``, the command line's
``--verbose``). Nothing is changed for good: each scope restores what it found."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator

from ..errors import LMSCMWarning

__all__ = ["is_verbose", "quiet_third_party", "verbose_output"]

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
