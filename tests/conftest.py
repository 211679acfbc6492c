"""Shared, generic test helpers."""
from __future__ import annotations

from pathlib import Path

import pytest

#: read-only development inputs (real weights and images), next to the project; absent in a user's clone
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (the lab's real weights and images); skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    return SHARED
