"""The ``pyro-lmscm`` application: one typer app, the ``--verbose`` switch and the helpers
that every command shares (quiet third-party output, one-line errors)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import LMSCMError, LMSCMWarning

__all__ = ["app", "console", "err_console", "one_line", "one_line_errors", "quiet_third_party"]

app = typer.Typer(
    help="Language models as structural causal models: what would this very string have been?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Inside the block, third-party warnings, log lines below errors and progress bars
    (transformers' "Loading weights", the hub's downloads) are silenced; our own
    :class:`~pyro_lmscm.errors.LMSCMWarning` and rich progress still show. Everything is
    restored on exit."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    verbosity, bars, hub_bars_off = (
        hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    )
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


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show third-party warnings, log lines and progress bars."
    ),
) -> None:
    """Language models as structural causal models: what would this very string have been?"""
    if not verbose:
        ctx.with_resource(quiet_third_party())


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a YAML parser's message spans several), its
    brackets escaped so that rich prints them instead of reading markup."""
    return escape(" ".join(str(error).split()))


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Library errors become one red line and exit status 2, not a traceback."""
    try:
        yield
    except (LMSCMError, ValueError) as error:
        err_console.print(f"[bold red]error:[/] {one_line(error)}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
