"""Sphinx configuration of the pyro-lmscm documentation site.

Build (offline, warnings as errors; the tutorials are executed during the build):

    .venv/bin/pip install -e ".[docs]"
    .venv/bin/python -m sphinx -W -b html docs docs/_build/html

``PYRO_LMSCM_DOCS_EXECUTION=cache`` re-executes a tutorial only when its code changed
(myst-nb's jupyter-cache in ``docs/_build/.jupyter_cache``); the default, ``force``, runs
every tutorial on every build, so a change of the library cannot leave stale outputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import apigen  # noqa: E402

project = "pyro-lmscm"
author = "the pyro-lmscm authors"
copyright = "2026, the pyro-lmscm authors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "cli_reference",
    "myst_nb",
]

# Pages: MyST markdown; tutorials are MyST notebooks (jupytext's text format), executed.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "_ext", "results", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# myst-nb: execute the tutorials at build time; an error in a cell fails the build.
nb_execution_mode = os.environ.get("PYRO_LMSCM_DOCS_EXECUTION", "force")
nb_execution_timeout = 600  # seconds per cell
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# API reference: autodoc from the packages' __all__ (docs/_ext/apigen.py writes the pages).
apigen.write_pages(HERE / "api" / "generated")
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = False
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Offline: no intersphinx, nothing fetched at build time. MathJax is a script reference in
# the HTML (loaded by the browser when a page is read), not a build-time fetch.
html_theme = "furo"
html_title = "pyro-lmscm"
html_static_path: list[str] = []
html_show_sourcelink = False
pygments_style = "friendly"
