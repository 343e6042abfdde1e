"""Whose Authentication-Results field is this? The authserv-id a field claims, read the
ways a lax reader may read it (RFC 2047 words decoded, case, trailing dots, comments,
IDN A-labels), so a forger cannot slip our id past us in another spelling.

One module for every place that recognises our own fields: the stamp that strips forged
ones (pipeline/authresults.py) and feedback that credits senders only from ours
(feedback/reputation.py). See pipeline/authresults.py's docstring for the variants.
"""

from __future__ import annotations

import re

from relay.idn import to_alabel
from relay.message import decode_header_value

_ID_TOKEN = re.compile(r"[^\s;()\"]+")  # an authserv-id ends at blanks, ';' or a comment
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)\s+(?==\?[^?\s]+\?[BbQq]\?)")


def _skip_cfws(text: str, i: int) -> int:
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "(":
            depth = 0
            while i < len(text):
                if text[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
        else:
            break
    return i


def _claimed_id(text: str) -> str:
    """The authserv-id at the start of a field value, as written (quotes removed)."""
    i = _skip_cfws(text, 0)
    if i < len(text) and text[i] == '"':
        out: list[str] = []
        i += 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            out.append(text[i])
            i += 1
        return "".join(out).strip()
    match = _ID_TOKEN.match(text, i)
    return match.group(0) if match else ""


def _canonical(name: str) -> str:
    """A domain name for comparison: no surrounding blanks or trailing dots, lower case,
    the A-label form when it is non-ASCII (as written when it is no valid name)."""
    name = name.strip().rstrip(".").lower()
    if name.isascii():
        return name
    try:
        return to_alabel(name)
    except ValueError:
        return name


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded in place, as a lax reader shows them: no blank added
    around a word, the blanks between two adjacent words dropped (RFC 2047 6.2)."""
    text = _BETWEEN_WORDS.sub("", text)
    return _ENCODED_WORD.sub(lambda m: decode_header_value(m.group(0)), text)


def _readings(value: str) -> set[str]:
    """The ways a reader may see a field value: raw, words decoded in place, the stdlib's."""
    readings = {value}
    if "=?" in value:
        readings |= {_decode_words(value), decode_header_value(value)}
    return readings


def is_ours(value: str, authserv_id: str) -> bool:
    """Whether an Authentication-Results value (everything after the colon, raw or
    unfolded) claims ``authserv_id`` in any reading (see the module docstring)."""
    ours = _canonical(authserv_id)
    return bool(ours) and any(_canonical(_claimed_id(text)) == ours for text in _readings(value))


def authserv_id_of(field: bytes) -> str:
    """The authserv-id an Authentication-Results field claims as written (lower-cased,
    RFC 2047 not decoded), or ""."""
    _name, _, rest = field.decode("utf-8", "replace").partition(":")
    return _claimed_id(rest).lower()
