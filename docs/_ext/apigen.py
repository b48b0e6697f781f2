"""Write the API reference pages from the packages' ``__all__`` at build time.

Every public name of :data:`PACKAGES` gets an entry: classes, functions and data through
autodoc; a module through ``automodule``; a name that a later package in :data:`PACKAGES`
also exports (a re-export such as ``pyro_lmscm.counterfactual``) gets a short entry in the
re-exporting package that links to its full entry, so no object is described twice.
``tests/test_docs.py`` checks that each name has an anchor in the built HTML.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

#: The packages whose ``__all__`` the reference documents, each on its own page.
PACKAGES = ("pyro_lmscm", "pyro_lmscm.inference", "pyro_lmscm.interventions", "pyro_lmscm.study")

_TITLES = {
    "pyro_lmscm": "pyro_lmscm: the top-level API",
    "pyro_lmscm.inference": "pyro_lmscm.inference: abduction, counterfactuals, exact probabilities (rung 3)",
    "pyro_lmscm.interventions": "pyro_lmscm.interventions: mechanisms and intervention specs (rung 2)",
    "pyro_lmscm.study": "pyro_lmscm.study: corpus studies",
}


def public_names(package: str) -> list[str]:
    """The names of ``package.__all__``, in their order."""
    return list(importlib.import_module(package).__all__)


def _home(package: str, name: str) -> str | None:
    """The other package of :data:`PACKAGES` that documents ``name`` in full, if any: the
    subpackage that exports the same object (the top level only re-exports)."""
    if package != "pyro_lmscm":
        return None
    top = importlib.import_module(package)
    obj = getattr(top, name)
    module_name = getattr(obj, "__module__", None)
    if inspect.isclass(obj) and module_name in {f"{package}.{n}" for n in top.__all__}:
        return module_name  # documented with its module (pyro_lmscm.errors)
    for other in PACKAGES[1:]:
        module = importlib.import_module(other)
        if name in module.__all__ and getattr(module, name) is obj:
            return other
    return None


def _directive(obj: object) -> str:
    if inspect.ismodule(obj):
        return "automodule"
    if inspect.isclass(obj):
        return "autoclass"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or callable(obj) and hasattr(obj, "__wrapped__"):
        return "autofunction"
    return "autodata"


def _data_doc(package: str, name: str, obj: object) -> list[str]:
    """The ``#:`` comment of a public constant or type alias, from the module of ``package``
    that assigns it (autodoc would look only in ``package`` itself, where it is imported),
    and its value when short."""
    from sphinx.pycode import ModuleAnalyzer

    doc: list[str] = []
    for module_name in sorted(m for m in sys.modules if m == package or m.startswith(package + ".")):
        module = sys.modules[module_name]
        if getattr(module, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except Exception:  # a module without source
            continue
        if ("", name) in docs:
            doc = [line for line in docs[("", name)] if line.strip() or doc]
            break
    value = repr(obj)
    if len(value) <= 100:
        doc += ["", f"Value: ``{value}``"]
    return doc or [f"The constant ``{name}``."]


def _role(obj: object) -> str:
    if inspect.ismodule(obj):
        return "mod"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "func"
    return "data"


def page(package: str) -> str:
    """The reST source of ``package``'s reference page."""
    module = importlib.import_module(package)
    title = _TITLES[package]
    lines = [title, "=" * len(title), "", f".. automodule:: {package}", "   :no-members:", ""]
    lines += [f".. currentmodule:: {package}", ""]
    lines += [".. autosummary::", "   :nosignatures:", ""]
    # autosummary reads __doc__, which for a constant is its type's docstring: classes,
    # functions and modules only
    lines += [f"   {name}" for name in module.__all__ if _directive(getattr(module, name)) != "autodata"]
    lines.append("")
    for name in module.__all__:
        obj = getattr(module, name)
        home = _home(package, name)
        if home is not None:
            kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "data"
            lines += [f".. py:{kind}:: {name}", "", f"   Re-exported from :{_role(obj)}:`{home}.{name}`.", ""]
        elif inspect.ismodule(obj):
            lines += [f".. automodule:: {obj.__name__}", "   :members:", "", f".. currentmodule:: {package}", ""]
        elif inspect.isclass(obj):
            lines += [f".. autoclass:: {name}", "   :members:", "   :show-inheritance:", ""]
        elif _directive(obj) == "autofunction":
            lines += [f".. autofunction:: {name}", ""]
        else:
            lines += [f".. py:data:: {name}", "", *(f"   {line}" for line in _data_doc(package, name, obj)), ""]
    return "\n".join(lines)


def write_pages(out: Path) -> list[Path]:
    """Write one page per package into ``out`` (only where the text changed, so Sphinx
    does not reread unchanged pages) and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for package in PACKAGES:
        path = out / f"{package}.rst"
        text = page(package)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths.append(path)
    return paths
