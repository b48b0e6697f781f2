"""The layout: no import cycle between the package's modules, no import from a lower level to a
higher one, and the process policy (:mod:`pyro_lmscm.runtime`) entered by entry points only.

Levels, low to high: the base modules (``defaults``, ``errors``, ``lm``, ``loading``, ``metrics``, ``reporting``,
``seeding``, ``validation``) < ``models`` (rung 1) < ``interventions`` (rung 2) < ``inference`` (rung 3) <
the entry points (``study``, ``explorer``, ``cli``), the test harness ``testing`` and the package's
own ``__init__`` (the public API, from which entry points take names). ``runtime`` stands apart: it
may import base modules, and only the entry points may import it.

An import of ``a.b.c`` also runs the ``__init__`` of its package ``a.b``; the graph has that edge
too (an import loop through a package ``__init__`` is a loop all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pyro_lmscm

PACKAGE = Path(pyro_lmscm.__file__).resolve().parent
ROOT = PACKAGE.name
BASE = {"atomic", "defaults", "errors", "lm", "loading", "metrics", "reporting", "seeding", "validation"}
LEVELS = {**dict.fromkeys(BASE, 0), "models": 1, "interventions": 2, "inference": 3,
          "study": 4, "explorer": 4, "cli": 4, "testing": 4}
ENTRY_POINTS = {"study", "explorer", "cli"}
RUNTIME = "runtime"
# edges from the runtime to a rung that are allowed (none: its restore helper is the base-level atomic)
ALLOWED: set[tuple[str, str]] = set()


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
                if target.split(".")[0] == ROOT:
                    for alias in node.names:  # `from . import commands` names a module
                        candidate = f"{target}.{alias.name}"
                        found.add(candidate if _exists(candidate) else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == ROOT)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                handlers = [h for handler in getattr(node, "handlers", []) for h in handler.body]
                visit(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []) + handlers)

    visit(ast.parse(path.read_text()).body)
    for target in list(found):  # importing a.b.c runs a.b's __init__ (the root's is the public API)
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(2, len(parts)))
    found.discard(module)
    if path.name != "__init__.py":  # a module's own package is already being imported
        found.discard(package)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _top(module: str) -> str | None:
    """The top-level module or subpackage of ``module``; ``None`` for the root package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _level(module: str) -> int:
    top = _top(module)
    return LEVELS["study"] if top is None else LEVELS[top]


def test_every_module_has_a_place():
    """A new top-level module or subpackage must be given its level here."""
    unplaced = sorted({_top(m) for m in _graph()} - set(LEVELS) - {RUNTIME, None})
    assert not unplaced, unplaced


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


def test_no_module_imports_a_higher_level():
    """Base modules import no rung, and a rung no higher rung nor an entry point; package
    ``__init__`` edges included."""
    upward = [
        (a, b) for a, targets in _graph().items() for b in targets
        if RUNTIME not in (_top(a), _top(b)) and _level(b) > _level(a)
    ]
    assert not upward, upward


def test_only_entry_points_import_the_runtime_and_it_imports_only_base_modules():
    graph = _graph()
    importers = [
        (a, b) for a, targets in graph.items() for b in targets
        if _top(b) == RUNTIME and _top(a) not in ENTRY_POINTS | {RUNTIME}
    ]
    assert not importers, importers
    reaches = [
        (a, b) for a, targets in graph.items() if _top(a) == RUNTIME for b in targets
        if _top(b) != RUNTIME and _level(b) > 0 and (a, b) not in ALLOWED
        and not any(b == allowed.rsplit(".", 1)[0] for source, allowed in ALLOWED if source == a)
    ]
    assert not reaches, reaches


def test_the_check_sees_imports():
    """Baseline: the graph has the edges it must have (a check that sees nothing passes anything)."""
    graph = _graph()
    assert f"{ROOT}.inference.prediction" in graph[f"{ROOT}.inference.counterfactual"]
    assert f"{ROOT}.errors" in graph[f"{ROOT}.models.scm"]
    assert f"{ROOT}.cli.commands" in graph[f"{ROOT}.cli"]
    assert f"{ROOT}.runtime" in graph[f"{ROOT}.study.worker"]  # an entry point enters the runtime
    assert f"{ROOT}.lm" in graph[f"{ROOT}.loading"]  # a deferred import between base modules
    # the implicit edge to a package's __init__: study.worker imports inference.scoring, which runs it
    assert f"{ROOT}.inference" in graph[f"{ROOT}.study.worker"]
    levels = {_level(m) for m in graph if _top(m) != RUNTIME}
    assert levels == {0, 1, 2, 3, 4}
