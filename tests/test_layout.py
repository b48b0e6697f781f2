"""The layout: no import cycle between the package's modules, and the rungs of the ladder
(models < interventions < inference) never import upward."""

from __future__ import annotations

import ast
from pathlib import Path

import pyro_lmscm

PACKAGE = Path(pyro_lmscm.__file__).resolve().parent
RUNGS = {"models": 1, "interventions": 2, "inference": 3}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that a module imports, at its top or deferred inside a
    function (not under TYPE_CHECKING)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node.body)  # a deferred import is an import all the same
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("pyro_lmscm"):
                    for alias in node.names:  # `from . import commands` names a module
                        candidate = f"{target}.{alias.name}"
                        found.add(candidate if _exists(candidate) else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("pyro_lmscm"))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                handlers = [h for handler in getattr(node, "handlers", []) for h in handler.body]
                visit(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []) + handlers)

    visit(ast.parse(path.read_text()).body)
    found.discard(module)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_no_import_cycle():
    graph = _graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_lower_rungs_do_not_import_higher_ones():
    def rung(module: str) -> int:
        parts = module.split(".")
        return RUNGS.get(parts[1], 0) if len(parts) > 1 else 0

    upward = [(a, b) for a, targets in _graph().items() for b in targets if rung(a) and rung(b) > rung(a)]
    assert not upward, upward


def test_the_check_sees_imports():
    """Baseline: the graph has the edges it must have (a check that sees nothing passes anything)."""
    graph = _graph()
    assert "pyro_lmscm.inference.prediction" in graph["pyro_lmscm.inference.counterfactual"]
    assert "pyro_lmscm.errors" in graph["pyro_lmscm.models.scm"]
    assert "pyro_lmscm.cli.commands" in graph["pyro_lmscm.cli"]
