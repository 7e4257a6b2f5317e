"""The benchmark scripts are not run by the test suite (their figures are timings), but what they import from
llm_book must exist: a module split that moves a function must update them too."""
import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def llm_book_imports(path: Path) -> list[tuple[str, str]]:
    "(module, name) for every `from llm_book... import name` in the script."
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_book")
            for alias in node.names]


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 5


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_exist(path):
    missing = [f"{module}.{name}" for module, name in llm_book_imports(path)
               if not hasattr(importlib.import_module(module), name)]
    assert not missing, f"{path.name} imports names llm_book no longer has: {missing}"
