"""Client text made safe for a log line.

Anything a client wrote (a command word, a HELO name, an address) may hold ESC, a bare CR,
U+2028 or a right-to-left override; written raw into a log it could forge a line or
repaint a terminal. ``printable`` escapes every non-printable character the way ``repr``
does and truncates, so a log line that quotes a client is still one honest line.
"""

from __future__ import annotations

DEFAULT_LIMIT = 40


def printable(text: str | bytes, limit: int | None = DEFAULT_LIMIT) -> str:
    """``text`` with control, format and separator characters (and backslash) escaped
    repr-style (``\\x1b``, ``\\r``, ``\\u202e``, ``\\udcff`` for an undecodable byte), cut
    to ``limit`` characters of the original and marked ``...`` when cut."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    out = "".join(_escape(ch) for ch in text)
    return out + "..." if cut else out


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    return ch if ch.isprintable() else repr(ch)[1:-1]
