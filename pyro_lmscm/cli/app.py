"""The ``pyro-lmscm`` application: one typer app, the ``--verbose`` switch and the helpers
that every command shares: the options every command takes from
:data:`~pyro_lmscm.defaults.DEFAULTS` (model, dtype, device, decoding, draws), quiet
third-party output, a progress bar on a terminal, one-line errors."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from ..defaults import DEFAULTS
from ..errors import LMSCMError
from ..reporting import quiet_third_party, verbose_output

__all__ = [
    "app",
    "console",
    "device_option",
    "dtype_option",
    "err_console",
    "flag",
    "model_option",
    "one_line",
    "one_line_errors",
    "progress_bar",
    "quiet_third_party",
]

app = typer.Typer(
    help="Language models as structural causal models: what would this very string have been?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def flag(*declarations: str, help: str) -> Any:
    """A boolean switch, off by default, shown in ``--help`` without a value."""
    return typer.Option(False, *declarations, metavar="", help=help)


def model_option() -> Any:
    return typer.Option(DEFAULTS.model, help="Embedded model name, HF folder or hub id.")


def dtype_option() -> Any:
    return typer.Option(DEFAULTS.dtype, help="The model's dtype: float32, bfloat16, float16 or auto.")


def device_option() -> Any:
    return typer.Option(
        DEFAULTS.device, "--device", help="The model's device: cpu, cuda, cuda:N, mps or xpu (default: cuda if "
        "available, else cpu)."
    )


def quiet_option() -> Any:
    return flag("--quiet", "-q", help="No progress bar.")


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: bool = flag("--verbose", "-v", help="Show third-party warnings, log lines and progress bars."),
) -> None:
    """Language models as structural causal models: what would this very string have been?"""
    ctx.with_resource(verbose_output(verbose))
    ctx.with_resource(quiet_third_party())


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[None]:
    """Within the block, the library's progress (:mod:`pyro_lmscm.reporting`) shows as
    rich bars on stderr, one per task, when stderr is a terminal and not ``quiet``."""
    from ..reporting import progress_to

    if quiet or not err_console.is_terminal:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err_console, transient=True)
    tasks: dict[str, Any] = {}

    def show(task: str, advance: float, total: float | None) -> None:
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total)
        else:
            state = bar.tasks[tasks[task]]
            if state.total is not None and state.completed >= state.total:  # the task starts over
                bar.reset(tasks[task], total=total)
            elif total is not None and state.total != total:
                bar.update(tasks[task], total=total)
        bar.advance(tasks[task], advance)

    with bar, progress_to(show):
        yield


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
