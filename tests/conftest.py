"""Shared fixtures. Real parts live in tests/support/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The project's sibling ``shared/`` folder (CI puts it there), or $RELAY_SHARED."""
    return Path(os.environ.get("RELAY_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask: files 0644 unless created otherwise
    try:
        yield
    finally:
        os.umask(old)
