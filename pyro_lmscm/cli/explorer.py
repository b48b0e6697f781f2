"""``pyro-lmscm app``: the interactive explorer in the browser (the extra ``pyro-lmscm[app]``)."""

from __future__ import annotations

from typing import Optional

import typer

from ..validation import MAX_THREADS
from .app import app, device_option, dtype_option, err_console, model_option, one_line_errors

__all__ = ["app_command"]


@app.command("app")
def app_command(
    model: str = model_option(),
    host: str = typer.Option("127.0.0.1", help="Address to serve on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, min=0, max=65535, help="Port (0: a free one)."),
    dtype: str = dtype_option(),
    device: Optional[str] = device_option(),
    threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="Torch CPU threads."),
) -> None:
    """Serve the counterfactual explorer: type or sample a string, pick an intervention
    (steering, ROME, prompt, a token, a second model) and see the aligned counterfactuals
    with exact probabilities."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry, no version check
    with one_line_errors():
        from ..explorer.ui import check_address

        check_address(host, port)  # before the model loads
        try:
            import gradio  # noqa: F401
        except ImportError:
            err_console.print("error: the explorer needs Gradio: pip install -e '.[app]' (or 'pyro-lmscm[app]').")
            raise typer.Exit(1) from None
        import torch

        from ..explorer import Explorer
        from ..explorer.ui import serve
        from ..loading import load_lm

        if threads is not None:
            torch.set_num_threads(threads)
        lm = load_lm(model, dtype=dtype, device=device, progress=True)
        serve(Explorer(lm), model_name=model, host=host, port=port)
