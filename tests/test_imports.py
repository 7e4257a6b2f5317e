"""The runtime never loads the teaching helpers, matplotlib or jinja2: importing a model or the 🤗 converter stays light."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llm_book"


def loaded_after(module: str, watched: tuple) -> set:
    "Which of `watched` are in `sys.modules` after importing `module` in a fresh interpreter."
    code = f"import sys, {module}; print(' '.join(m for m in {watched!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", ["llm_book.models.llama", "llm_book.hf"])
def test_runtime_import_loads_no_plotting_or_templates(module):
    assert loaded_after(module, ("matplotlib", "jinja2", "llm_book.teaching")) == set()


def runtime_modules() -> list:
    "Every module of the package outside `llm_book.teaching`, as (dotted name, path)."
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[1] == "teaching": continue
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def imported_names(module: str, path: Path) -> set:
    "The absolute names of every module that `path` imports, at any depth of its code (lazy imports too)."
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import): names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level: base = base[:len(base) - node.level + 1]
            else: base = []
            target = ".".join(base + ([node.module] if node.module else []))
            names.add(target)
            names |= {f"{target}.{alias.name}" for alias in node.names}   # `from llm_book import teaching`
    return names


def test_no_runtime_module_imports_teaching():
    modules = runtime_modules()
    assert len(modules) > 30 and any(name == "llm_book.hf" for name, _ in modules)
    offenders = {name for name, path in modules
                 if any(n == "llm_book.teaching" or n.startswith("llm_book.teaching.") for n in imported_names(name, path))}
    assert offenders == set()


def test_teaching_import_is_detected(tmp_path):
    "The scan above would see a runtime module importing the teaching helpers, relatively or absolutely."
    for source in ("from ..teaching.diagrams import plot_block_diagram", "import llm_book.teaching.diagrams",
                   "from llm_book import teaching"):
        path = tmp_path / "probe.py"
        path.write_text(source + "\n", encoding="utf-8")
        assert any(n.startswith("llm_book.teaching") for n in imported_names("llm_book.core.probe", path)), source
