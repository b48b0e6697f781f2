"""The ``pyro-lmscm`` command line (typer): ``demo``, ``counterfactual``, ``models``,
``compare-inference``, ``compare-mechanisms``, ``attribute``, ``study`` and ``app``. Only command-line code
lives here; each command calls the library."""

from __future__ import annotations

from . import attribute, commands, compare, explorer, mechanisms, study  # noqa: F401 - register the commands on `app`
from .app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()
