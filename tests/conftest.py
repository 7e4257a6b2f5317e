"""Shared pytest fixtures for llm_book's cross-notebook suites."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same random state."
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    "The tiny-shakespeare corpus that CI places beside the checkout (tests only; the product never reads it)."
    return (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
