"""The README's Python blocks run as written (issue 40): each ```python block of README.md is
executed, in order, in one fresh namespace, on the embedded SmolLM2, with no undefined
names."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def undefined_names(blocks: list[str]) -> list[str]:
    """Names the blocks load that neither they (earlier, in order) nor the builtins bind: a
    static check that finds a `NameError` without running anything."""
    bound = set(dir(builtins))
    missing = []
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
                missing.append(node.id)
    return missing


def test_python_blocks_found_and_names_defined():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block"
    assert undefined_names(blocks) == []


def test_undefined_name_check_catches_a_name_error():
    # the baseline: issue 40's snippet, `exact.log_prob(candidates)` with `candidates` unbound
    assert undefined_names(["exact = 1\nexact.log_prob(candidates)\n"]) == ["candidates"]


@pytest.mark.slow
def test_readme_python_blocks_run(capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "tensor(" in printed  # the exact first-divergence law was printed
    result = namespace["result"]
    assert len(result.counterfactual_texts) == 4 and len(result.interventional_texts) == 4
    assert 0.0 <= namespace["exact"].prob_unchanged() <= 1.0
