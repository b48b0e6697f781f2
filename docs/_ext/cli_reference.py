"""Sphinx extension: the ``pyro-lmscm`` command-line reference, generated from the typer app.

typer (0.22 and newer) carries its own copy of click, which sphinx-click does not accept, so
this walks the click command that ``typer.main.get_command`` builds and writes one section
per command: its help text and a table of its arguments and options. Directive:
``.. pyro-lmscm-cli::`` (docs/api/cli.md).
"""

from __future__ import annotations

import inspect
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _escape(text: str) -> str:
    """``text`` as literal reST inline text: every markup character backslash-escaped."""
    return "".join("\\" + c if c in "\\*`|_[]<>:" else c for c in str(text))


def _cell(text: str) -> str:
    return _escape(" ".join(str(text).split()))


def _type_name(param: Any) -> str:
    kind = getattr(param, "type", None)  # click's own parameters
    if kind is not None:
        return _cell(getattr(kind, "name", kind)).lower()
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return _cell(getattr(annotation, "__name__", annotation or "")).lower()


def _param_row(param: Any) -> str | None:
    if getattr(param, "hidden", False):
        return None
    names = ", ".join(f"``{opt}``" for opt in [*param.opts, *getattr(param, "secondary_opts", [])])
    if param.param_type_name == "argument":
        names = f"``{(param.metavar or param.name).upper()}`` (argument)"
    kind = "flag" if getattr(param, "is_flag", False) else _type_name(param)
    default = param.default
    if callable(default) or default is None or default in ((), "") or getattr(param, "is_flag", False) and not default:
        default_text = ""
    else:
        default_text = f"``{' '.join(str(default).split())}``"
    help_text = _cell(getattr(param, "help", "") or "")
    if param.required:
        help_text = f"(required) {help_text}"
    return f"   * - {names}\n     - {kind}\n     - {default_text}\n     - {help_text}"


def command_rst(command: Any, prog: str, level: int = 0) -> list[str]:
    """reST lines for ``command`` (a click command of typer's click) and its subcommands."""
    marks = "=-~^"
    title = f"``{prog}``"
    lines = [title, marks[min(level, 3)] * len(title), ""]
    help_text = inspect.cleandoc(command.help or "")
    lines += [_escape(line) for line in help_text.splitlines()]
    usage = f"{prog} [OPTIONS]" + (" COMMAND" if hasattr(command, "commands") else "")
    lines += ["", ".. code-block:: text", "", f"   {usage}", ""]
    rows = [row for row in (_param_row(p) for p in command.params) if row]
    if rows:
        lines += [".. list-table::", "   :header-rows: 1", "   :widths: 30 10 15 45", "",
                  "   * - option\n     - type\n     - default\n     - meaning", *rows, ""]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if getattr(sub, "hidden", False):
            continue
        lines += command_rst(sub, f"{prog} {name}", level + 1)
    return lines


class CLIReference(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        import typer

        from pyro_lmscm.cli import app

        lines = [line for text in command_rst(typer.main.get_command(app), "pyro-lmscm") for line in text.split("\n")]
        container = nodes.section()
        self.state.nested_parse(StringList(lines, source="pyro_lmscm.cli"), self.content_offset, container,
                                match_titles=True)
        return container.children


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("pyro-lmscm-cli", CLIReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
