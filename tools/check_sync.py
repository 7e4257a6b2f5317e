"""Fail if `nbdev_export` would change llm_book/, `nbdev_clean` would change nbs/, or README.md is stale.

nbdev projects keep the notebooks (the source) and the package (generated) in step this way. We compare
file contents before and after running the two commands, so the check also works on a dirty tree.
"""
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def snapshot(folder: str) -> dict:
    "Map each file under `folder` (no caches) to the sha256 of its bytes."
    out = {}
    for path in sorted((ROOT / folder).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and ".ipynb_checkpoints" not in path.parts:
            out[str(path.relative_to(ROOT))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changed(before: dict, after: dict) -> list:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def main() -> int:
    failures = []
    for folder, command in [("llm_book", "nbdev_export"), ("nbs", "nbdev_clean")]:
        before = snapshot(folder)
        subprocess.run([str(BIN / command)], cwd=ROOT, check=True)
        diff = changed(before, snapshot(folder))
        if diff:
            failures.append(f"`{command}` changed {len(diff)} file(s) in {folder}/: " + ", ".join(diff[:20]))
    readme_tool = ROOT / "tools" / "make_readme.py"
    if readme_tool.exists():
        result = subprocess.run([sys.executable, "-m", "tools.make_readme", "--check"], cwd=ROOT)
        if result.returncode != 0:
            failures.append("README.md is not the rendering of nbs/index.ipynb: run `make readme`")
    for failure in failures:
        print("OUT OF SYNC:", failure, file=sys.stderr)
    if failures:
        print("Commit the result of `make export clean-nbs readme` so notebooks and package agree.", file=sys.stderr)
        return 1
    print("in sync: nbdev_export and nbdev_clean change nothing; README.md matches nbs/index.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
