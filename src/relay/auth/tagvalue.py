"""DKIM tag lists (RFC 6376 section 3.2: ``tag=value`` pairs separated by semicolons), for
the header scan and DMARC records, which run in every relay worker.

Why not ``dkim.util``: importing it loads the whole dkimpy package and PyNaCl, which only
the verification children need (auth/wire.py; 8 MiB a worker, issue 17). The verdicts must
not differ from the children's, so this parser accepts and refuses exactly what dkimpy's
does, including its leniency on tag names (only the first character must be a letter):
tests/test_auth_tagvalue.py compares the two on hostile and 20,000 random lists.
"""

from __future__ import annotations

import re

from relay.errors import RelayError

_NAME_START = re.compile(rb"[A-Za-z]")


class TagListError(RelayError):
    """Not a tag list: a part without ``=``, a name not starting with a letter, or a tag
    named twice (``duplicate``). The message names the reason only, never the header."""

    def __init__(self, reason: str, *, duplicate: bool = False) -> None:
        super().__init__(reason)
        self.duplicate = duplicate


def parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """Tags of a tag list whose folding whitespace is already unfolded; one trailing
    semicolon is allowed, names and values lose their surrounding whitespace."""
    parts = tag_list.strip().split(b";")
    if parts[-1] == b"":
        del parts[-1]
    tags: dict[bytes, bytes] = {}
    for part in parts:
        name, equals, value = part.partition(b"=")
        name = name.strip()
        if not equals or _NAME_START.match(name) is None:
            raise TagListError("a part of the tag list is not tag=value")
        if name in tags:
            raise TagListError("a tag is named twice", duplicate=True)
        tags[name] = value.strip()
    return tags
