"""The notebooks open ready to run: each names the `python3` kernel, and that kernel is this environment's Python."""
import json
import sys
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parent.parent / "nbs"
NOTEBOOKS = sorted(NBS.glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 30, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_names_the_python3_kernel(path):
    "Without `kernelspec` metadata JupyterLab asks the reader to pick a kernel when the notebook opens."
    spec = json.loads(path.read_text(encoding="utf-8"))["metadata"].get("kernelspec")
    assert spec is not None, f"{path.name} has no kernelspec: JupyterLab would show 'Select Kernel'"
    assert spec["name"] == "python3" and spec["language"] == "python", spec


def test_python3_kernel_runs_this_environment():
    "The kernel JupyterLab starts for `python3` is this environment's interpreter, so `import llm_book` works there."
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        outputs = []
        reply = client.execute_interactive(
            "import sys, llm_book; print(sys.prefix)", timeout=60,
            output_hook=lambda msg: outputs.append(msg["content"].get("text", "")))
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "".join(outputs).strip() == sys.prefix
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
