"""Durable file writes: what makes "250 only after the bytes are safe" true on disk, and
what keeps a key, a quarantine entry or a model registry pointer whole after a crash.
Standard library only, so every layer may use it."""

from __future__ import annotations

import os
from pathlib import Path


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never overwrite), write all of ``data`` and fsync it. Blocking."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a crash. Blocking."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: written under a temporary name, fsynced,
    renamed over it, the directory fsynced. Blocking."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
