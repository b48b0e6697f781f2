"""The Python blocks of the plain documentation pages (docs/, not the tutorials, which myst-nb
executes when the site is built) name nothing they do not define or say where it comes from,
and those that need no downloaded model run as written on a tiny one.

A page's blocks share one namespace, in order, as in the README's test (tests/test_readme.py);
the names in ``CONTEXT`` are those a page says come from another page (``scm``, ``prompt`` and
``observed`` of the user guide). The tiny model stands in for SmolLM2 there: a steering vector
at layer 1 plays the guide's mechanism ``"female"``.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"

_spec = importlib.util.spec_from_file_location("_readme_checks", Path(__file__).with_name("test_readme.py"))
assert _spec is not None and _spec.loader is not None
_readme_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_readme_checks)
undefined_names = _readme_checks.undefined_names

#: Names a page takes from another page, as its text says.
CONTEXT = {
    "guide/exact.md": {"scm", "prompt", "observed"},
    "performance.md": {"scm", "prompt", "observed"},
    "own_intervention.md": {"scm", "prompt", "observed"},
    "architecture.md": {"scm", "prompt", "observed"},
}

#: (page, block index): the blocks that run on the tiny model, each in a fresh namespace
#: holding ``scm``, ``prompt``, ``observed`` and ``result`` (the user guide's first block).
TINY_BLOCKS = [
    ("guide/python.md", 1),
    ("guide/exact.md", 0),
    ("performance.md", 0),
    ("own_intervention.md", 0),
    ("architecture.md", 0),
]


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order, dedented (a
    block may sit inside a list item)."""
    return [
        textwrap.dedent(body)
        for indent, body in re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
    ]


def plain_pages() -> list[str]:
    """The markdown pages that the docs build does not execute (no notebook header)."""
    pages = []
    for path in sorted(DOCS.rglob("*.md")):
        relative = path.relative_to(DOCS).as_posix()
        if relative.startswith("_build/") or "kernelspec:" in path.read_text(encoding="utf-8")[:500]:
            continue
        pages.append(relative)
    return pages


def page_blocks(page: str) -> list[str]:
    return python_blocks((DOCS / page).read_text(encoding="utf-8"))


def test_plain_pages_found():
    pages = plain_pages()
    assert "architecture.md" in pages and "guide/python.md" in pages
    assert not any(page.startswith("tutorials/") for page in pages)
    assert len(page_blocks("guide/python.md")) == 2 and len(page_blocks("performance.md")) == 1  # indented


@pytest.mark.parametrize("page", plain_pages())
def test_page_names_defined(page):
    blocks = page_blocks(page)
    context = "\n".join(f"{name} = None" for name in sorted(CONTEXT.get(page, ())))
    assert undefined_names([context, *blocks]) == []


def test_undefined_name_in_a_page_is_caught():
    # the baseline: docs/guide/exact.md before this test, `candidates` never bound
    block = "exact = exact_counterfactual(scm, prompt, observed, {})\nexact.log_prob(candidates)\n"
    context = "from pyro_lmscm import exact_counterfactual\nscm = prompt = observed = None\n"
    assert undefined_names([context, block]) == ["candidates"]


@pytest.fixture(scope="module")
def tiny_context() -> dict:
    from pyro_lmscm import ActivationSteering, LanguageModelSCM, counterfactual
    from pyro_lmscm.testing import tiny_llama

    lm = tiny_llama()
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    scm = LanguageModelSCM(lm, max_new_tokens=12, mechanisms={"female": ActivationSteering(vector, layer=1)})
    prompt = lm.encode("the man was a doctor and he")
    result = counterfactual(scm, prompt, None, {"mechanism": "female"}, num_samples=8, seed=0, baseline=True)
    assert len(result.factual_ids) == 12  # the horizon of 8 in performance.md fits
    return {"scm": scm, "prompt": prompt, "observed": result.factual_ids, "result": result}


@pytest.mark.parametrize("page, index", TINY_BLOCKS)
def test_block_runs_on_a_tiny_model(page, index, tiny_context, capsys):
    namespace = {"__name__": "__docs__", **tiny_context}
    exec(compile(page_blocks(page)[index], f"docs/{page} python block {index + 1}", "exec"), namespace)
    if page == "guide/exact.md":
        assert namespace["candidates"].shape == (2, 12) and 0.0 <= namespace["exact"].prob_unchanged() <= 1.0
    elif page == "performance.md":
        assert len(capsys.readouterr().out.splitlines()) == 5  # k = 5 strings printed
    elif page in ("own_intervention.md", "architecture.md"):
        assert namespace["result"].counterfactual_ids.shape == (64, 12)
