"""Reading reported messages: one file, a Maildir (cur/ and new/), an mbox, or stdin.

Yields ``(name, bytes)`` for each message, or ``(name, FeedbackRefused)`` for one that is
refused before it is parsed (too big, unreadable), so one bad message never hides the
others. Size is checked before a message is read whole where the format allows it.
"""

from __future__ import annotations

import mailbox
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from relay.errors import FeedbackRefused

Item = tuple[str, bytes | FeedbackRefused]


def too_large(size: int, limit: int) -> FeedbackRefused:
    return FeedbackRefused(
        "too_large", f"message of {size} bytes is over [feedback] max_message_size ({limit})"
    )


def read_stdin(stream: BinaryIO, limit: int) -> Item:
    """Exactly one message from a stream (an imapsieve pipe): read at most limit+1 bytes."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        return "-", too_large(len(data), limit)
    return "-", data


def is_maildir(path: Path) -> bool:
    return path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir()


def is_mbox(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(5) == b"From "


def read_paths(paths: list[Path], limit: int) -> Iterator[Item]:
    for path in paths:
        yield from read_path(path, limit)


def read_path(path: Path, limit: int) -> Iterator[Item]:
    name = str(path)
    try:
        if is_maildir(path):
            yield from _maildir(path, limit)
        elif path.is_dir():
            yield name, FeedbackRefused("unreadable", "a directory that is no Maildir (cur/, new/)")
        elif is_mbox(path):
            yield from _mbox(path, limit)
        else:
            yield _file(path, limit)
    except OSError as exc:
        yield name, FeedbackRefused("unreadable", f"cannot read: {exc.strerror or exc}")


def _file(path: Path, limit: int) -> Item:
    size = path.stat().st_size
    if size > limit:
        return str(path), too_large(size, limit)
    return str(path), path.read_bytes()


def _maildir(path: Path, limit: int) -> Iterator[Item]:
    # The files themselves (not mailbox.Maildir): a refusal then names the file.
    for sub in ("new", "cur"):
        for file in sorted((path / sub).iterdir()):
            if not file.name.startswith(".") and file.is_file():
                yield _file(file, limit)


def _mbox(path: Path, limit: int) -> Iterator[Item]:
    box = mailbox.mbox(path, create=False)
    try:
        for number, key in enumerate(box.keys(), start=1):
            data = box.get_bytes(key, from_=False)
            if len(data) > limit:
                yield f"{path}#{number}", too_large(len(data), limit)
            else:
                yield f"{path}#{number}", data
    finally:
        box.close()
