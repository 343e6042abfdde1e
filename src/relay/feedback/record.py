"""The stored value of one feedback report, and how a message becomes one.

An entry is keyed by the sha256 of the message body (after the header/body split, line
ends CRLF), so a copy that gained Received, X-Spam-* or Authentication-Results fields on
the way is the same entry. What is kept is the least a later model update needs: the
label, who said so (a keyed hash), when and through what, the hashed feature vector and
the domains reputation needs. The body only when ``[feedback] keep_bodies`` asks for it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Literal

from relay.classifier.features import FEATURE_VERSION, META_FEATURES, WORD_FEATURES, Extractor
from relay.errors import FeedbackRefused
from relay.message import (
    Message,
    split_fields,
    split_header_block,
    strip_mbox_from,
    to_crlf,
)

Label = Literal["spam", "ham"]
LABELS: tuple[Label, ...] = ("spam", "ham")
# The vector's layout: words block then meta block, as selection.vectoriser(chars=False)
# lays them out; a model trained on stored vectors checks this string first.
VECTOR_LAYOUT = f"words{WORD_FEATURES.bit_length() - 1}+meta{META_FEATURES.bit_length() - 1}"
_MAX_COUNT = 0xFFFF  # counts are stored as uint16; a token seen more often saturates


@dataclass(frozen=True, slots=True)
class Domains:
    """Plain domains (never addresses): the From domain's registrable domain, DKIM d=
    domains as signed (unverified: reputation checks them again later), link sites."""

    sender: str
    dkim: tuple[str, ...]
    links: tuple[str, ...]

    def encode(self) -> str:
        return json.dumps({"from": self.sender, "dkim": self.dkim, "links": self.links})

    @classmethod
    def decode(cls, text: str) -> Domains:
        data: dict[str, Any] = json.loads(text)
        return cls(str(data["from"]), tuple(data["dkim"]), tuple(data["links"]))


@dataclass(frozen=True, slots=True)
class FeedbackEntry:
    digest: str  # sha256 hex of the CRLF body: the entry's key
    label: Label
    source: str  # cli, imapsieve, http, quarantine-release
    reporter: str  # keyed hash (StateStore.hashed), never the name itself
    at: float  # Unix seconds of the report
    feature_version: int
    vector: bytes  # encode_vector(); layout VECTOR_LAYOUT
    domains: Domains
    body: bytes | None = None  # the raw message, only with keep_bodies


def body_digest(raw: bytes) -> str:
    """The entry key; raises FeedbackRefused when the message is no message."""
    msg = to_crlf(strip_mbox_from(raw))
    head, rest = split_header_block(msg)
    split = split_fields(head)
    if not split.fields or split.problem:
        raise FeedbackRefused(
            "unparsable", "not a mail message: it must start with header fields (Name: value)"
        )
    if not rest.startswith(b"\r\n"):
        raise FeedbackRefused("unparsable", "not a mail message: no blank line ends the header")
    body = rest[2:]
    if not body.strip():
        raise FeedbackRefused("unparsable", "the message has no body to learn from")
    return hashlib.sha256(body).hexdigest()


def encode_vector(indices: list[int], counts: list[float]) -> bytes:
    """uint32 count, then uint32 indices (ascending), then uint16 counts, little-endian."""
    n = len(indices)
    capped = [min(int(c), _MAX_COUNT) for c in counts]
    return struct.pack(f"<I{n}I{n}H", n, *indices, *capped)


def decode_vector(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    (n,) = struct.unpack_from("<I", data)
    values = struct.unpack_from(f"<{n}I{n}H", data, 4)
    return tuple(values[:n]), tuple(values[n:])


class EntryMaker:
    """Turns reported bytes into entries; build one per process (it holds the suffix
    list and the hashing vectoriser)."""

    def __init__(self) -> None:
        import numpy as np

        # here: selection loads numpy, which a relay worker only needs once feedback comes
        from relay.classifier.selection import vectoriser

        self._np = np
        self._extractor = Extractor()
        self._hasher = vectoriser(chars=False).fit(np.array([["", ""]], dtype=object))

    def make(
        self, raw: bytes, *, label: Label, source: str, reporter: str, at: float, keep_body: bool
    ) -> FeedbackEntry:
        digest = body_digest(raw)
        message = Message.from_file_bytes(raw, received_at=at)
        features = self._extractor.extract(message)
        row = self._np.array([features.row()], dtype=object)
        matrix = self._hasher.transform(row).tocsr()
        matrix.sort_indices()
        vector = encode_vector(matrix.indices.tolist(), matrix.data.tolist())
        links = sorted(
            {t[len("url:site_") :] for t in features.meta.split() if t.startswith("url:site_")}
        )
        domains = Domains(features.sender_site, _dkim_domains(message.header_block), tuple(links))
        return FeedbackEntry(
            digest=digest,
            label=label,
            source=source,
            reporter=reporter,
            at=at,
            feature_version=FEATURE_VERSION,
            vector=vector,
            domains=domains,
            body=message.raw if keep_body else None,
        )


def _dkim_domains(head: bytes) -> tuple[str, ...]:
    found: set[str] = set()
    for name, value in split_fields(head).fields[:64]:
        if name.strip().lower() != b"dkim-signature":
            continue
        text = value.decode("ascii", "replace")
        for tag in text.split(";"):
            key, _, tag_value = tag.partition("=")
            if key.strip().lower() == "d":
                domain = "".join(tag_value.split()).lower().strip(".")
                if domain and "@" not in domain:
                    found.add(domain)
    return tuple(sorted(found))[:8]


__all__ = [
    "LABELS",
    "VECTOR_LAYOUT",
    "Domains",
    "EntryMaker",
    "FeedbackEntry",
    "Label",
    "body_digest",
    "decode_vector",
    "encode_vector",
]
