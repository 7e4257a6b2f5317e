"""Shared pytest fixtures for llm_book's cross-notebook suites."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same random state."
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    "The tiny-shakespeare corpus (public domain, 1.1 MB), committed in `data/` (tests and benchmarks read it)."
    return (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
