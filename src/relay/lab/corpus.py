"""A labelled corpus as the lab replays it. Listing and reading the messages (a split
file, Maildir, mbox, directory or tar archive) is relay/corpus.py's, shared with training.

Each message becomes a CorpusMessage with its digest, time and where its exact bytes are:
a file or a member of an uncompressed tar is read again when a pass needs it (``raw()``,
checked against the digest), so the driver holds no message bytes between passes; a
Maildir, mbox or compressed archive has no cheap way back to one message, so those
messages keep their bytes. Messages that
cannot be read or parsed become Unreadable entries, which the report counts and lists:
nothing is dropped silently. Order is corpus time, then file order. A message's time is
its own (``header_time``: the newest Received date, else the Date header); one with
neither keeps the time of the message before it in file order (the first such: 0, the
epoch), so a corpus always replays the same way, whatever day it is.

What a message's header gives the lab (its time, envelope and client, or why it is not a
message) depends only on its bytes: with an ``index`` (the lab's cache, cache.CorpusIndex)
it is stored by digest and read back in later runs instead of parsing every header again.
The bytes are still read and hashed, so the digest is always the one of the bytes now.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Any, Protocol

from relay.corpus import Item, Label, read, read_labels, read_source
from relay.errors import CorpusError
from relay.message import (
    Envelope,
    Message,
    Peer,
    header_time,
    split_header_block,
    strip_mbox_from,
    to_crlf,
)

MAX_RCPTS = 100  # as many as the relay accepts by default

_RECEIVED_FROM = re.compile(r"^\s*from\s+([^\s()]+)", re.IGNORECASE)
_BRACKET_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
_TLS_HINT = re.compile(r"\bwith\s+E?SMTPS|\(using\s+TLS|\bversion=TLS", re.IGNORECASE)
# Addresses of the receiving site itself (fetchmail, content filters, internal relays).
_INTERNAL = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.168.0.0/16", "::/128", "::1/128", "fc00::/7", "fe80::/10",
    )
)  # fmt: skip
_HEADER_LINE = re.compile(rb"^[!-9;-~]+:", re.MULTILINE)


# The one corpus reader (relay/corpus.py) lists and reads the messages; this module
# turns them into CorpusMessages. The old names stay for the lab's callers.
Source = Item
sources_from_labels = read_labels
sources_from_box = read_source


def holding(id: str, label: Label, raw: bytes) -> Item:
    """A source that is its bytes (a message shipped to a worker, a test's message)."""
    return Item(id, label, Path(id), key=id, data=raw)


@dataclass(frozen=True, slots=True)
class CorpusMessage:
    id: str
    label: Label
    digest: str  # sha256 of the raw bytes as read
    # Where the bytes are (``data`` set only when they cannot be read again); not part of
    # equality: the same message shipped to a worker holds its bytes instead.
    source: Item = field(compare=False)
    time: float  # corpus time (header_time), used to order stateful facts
    index: int  # position in file order
    envelope: Envelope
    peer: Peer

    def raw(self) -> bytes:
        """The exact bytes, read again from the corpus unless held: read them once per
        pass. CorpusError naming the file when they are gone or changed since the lab
        read them (cached facts belong to the digest, not to whatever is there now)."""
        if self.source.data is not None:
            return self.source.data
        [(_, data)] = read([self.source])
        if isinstance(data, str):
            raise CorpusError(self.source.describe(f"{self.source.path}: {data} (during the run)"))
        found = hashlib.sha256(data).hexdigest()
        if found != self.digest:
            raise CorpusError(
                self.source.describe(
                    f"{self.source.path} changed during the run "
                    f"(sha256 {self.digest[:12]}… when listed, {found[:12]}… now)"
                )
            )
        return data

    def to_message(self) -> Message:
        """The Message as the relay would have seen it, rebuilt from the stored headers."""
        return Message(
            raw=to_crlf(strip_mbox_from(self.raw())),
            envelope=self.envelope,
            peer=self.peer,
            queue_id=self.digest[:16],
            received_at=self.time,
        )


@dataclass(frozen=True, slots=True)
class Unreadable:
    id: str
    label: Label
    reason: str


@dataclass(frozen=True, slots=True)
class Corpus:
    messages: tuple[CorpusMessage, ...]  # in corpus time order
    unreadable: tuple[Unreadable, ...]
    description: str

    def order_digest(self) -> str:
        """Identifies the sequence of messages and their times: stateful facts (windows
        over ``received_at``) are only valid for one."""
        h = hashlib.sha256()
        for m in self.messages:
            h.update(f"{m.digest}@{m.time!r}".encode())
        return h.hexdigest()[:16]


def parse_problem(raw: bytes) -> str | None:
    """Why bytes are not a message at all (then the lab lists them), or None."""
    if not raw.strip():
        return "empty file"
    head = split_header_block(strip_mbox_from(raw))[0]
    if not _HEADER_LINE.search(head):
        return "no header fields"
    return None


def _headers(raw: bytes) -> EmailMessage:
    head = split_header_block(strip_mbox_from(raw))[0]
    return BytesHeaderParser(policy=compat32).parsebytes(head)


class HeaderIndex(Protocol):
    """Stored header values by message digest (cache.CorpusIndex)."""

    def get(self, digests: Sequence[str], version: str) -> Mapping[str, Any]: ...

    def put(self, rows: Sequence[tuple[str, Any]], version: str) -> None: ...


INDEX_BATCH = 500  # messages looked up in the index at once (their bytes held meanwhile)


def index_version() -> str:
    """The source of the code that derives the indexed values: this module and
    relay/message.py (header_time, split_header_block); a change to either re-parses."""
    here = Path(__file__)
    h = hashlib.sha256()
    for f in (here, here.parents[1] / "message.py"):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def header_values(data: bytes) -> list[Any]:
    """[problem] for bytes that are not a message, else [None, time or None, envelope,
    peer] as JSON values: everything load_corpus takes from a message's header."""
    problem = parse_problem(data)
    if problem is not None:
        return [problem]
    headers = _headers(data)
    e = _envelope(data, headers)
    envelope = [e.mail_from, list(e.rcpt_to), list(e.mail_options), e.smtputf8]
    return [None, header_time(headers.raw_items()), envelope, dataclasses.asdict(_peer(headers))]


def _from_values(values: Sequence[Any]) -> tuple[float | None, Envelope, Peer]:
    _, when, (mail_from, rcpt_to, options, smtputf8), peer = values
    envelope = Envelope(mail_from, tuple(rcpt_to), tuple(options), smtputf8)
    return when, envelope, Peer(**peer)


def _read_with_values(
    sources: Sequence[Source], index: HeaderIndex | None
) -> Iterator[tuple[int, Source, bytes | str, str, list[Any]]]:
    """(position, source, bytes or why not, digest, header values) in file order."""
    version = index_version() if index is not None else ""
    batch: list[tuple[int, Source, bytes | str, str]] = []

    def flush() -> Iterator[tuple[int, Source, bytes | str, str, list[Any]]]:
        digests = [d for _, _, data, d in batch if not isinstance(data, str)]
        found = dict(index.get(digests, version)) if index is not None and digests else {}
        fresh: list[tuple[str, Any]] = []
        for position, src, data, digest in batch:
            if isinstance(data, str):
                yield position, src, data, "", []
                continue
            values = found.get(digest)
            if values is None:
                values = found[digest] = header_values(data)
                fresh.append((digest, values))
            yield position, src, data, digest, values
        if index is not None and fresh:
            index.put(fresh, version)
        batch.clear()

    for position, (src, data) in enumerate(read(sources)):
        digest = "" if isinstance(data, str) else hashlib.sha256(data).hexdigest()
        batch.append((position, src, data, digest))
        if len(batch) >= INDEX_BATCH:
            yield from flush()
    yield from flush()


def load_corpus(
    sources: Sequence[Source], description: str, index: HeaderIndex | None = None
) -> Corpus:
    """Read every source; order readable messages by their time, then file order. Bytes
    that can be read again are let go as soon as their message's values are taken;
    ``index`` keeps the header values by digest between runs."""
    staged: list[tuple[float | None, CorpusMessage]] = []
    unreadable: list[Unreadable] = []
    for index_, src, data, digest, values in _read_with_values(sources, index):
        if isinstance(data, str):
            unreadable.append(Unreadable(src.id, src.label, data))
            continue
        if values[0] is not None:
            unreadable.append(Unreadable(src.id, src.label, values[0]))
            continue
        when, envelope, peer = _from_values(values)
        message = CorpusMessage(
            id=src.id,
            label=src.label,
            digest=digest,
            source=_where(src, data),
            time=0.0,  # set below, once every earlier message's time is known
            index=index_,
            envelope=envelope,
            peer=peer,
        )
        staged.append((when, message))
    messages: list[CorpusMessage] = []
    last = 0.0
    for date, message in staged:
        last = date if date is not None else last
        messages.append(dataclasses.replace(message, time=last))
    messages.sort(key=lambda m: (m.time, m.index))
    return Corpus(tuple(messages), tuple(unreadable), description)


def _where(src: Source, data: bytes) -> Source:
    """``src`` holding ``data`` only when it cannot be read again alone."""
    if src.rereadable:
        return src if src.data is None else dataclasses.replace(src, data=None)
    return src if src.data is not None else dataclasses.replace(src, data=data)


def _values(headers: EmailMessage, name: str) -> list[str]:
    return [str(v) for v in headers.get_all(name) or []]


def _envelope(data: bytes, headers: EmailMessage) -> Envelope:
    """MAIL FROM from the mbox line or Return-Path (else From); RCPT TO from Delivered-To
    or X-Original-To (else To and Cc), as the receiving relay would have seen them."""
    mail_from = ""
    if data.startswith(b"From "):
        first = data.split(b"\n", 1)[0].decode("latin-1").split()
        if len(first) > 1 and "@" in first[1]:
            mail_from = first[1]
    for name in ("Return-Path", "From"):
        if not mail_from and headers.get(name) is not None:
            mail_from = parseaddr(str(headers.get(name)))[1]
    rcpts: tuple[str, ...] = ()
    for name in ("Delivered-To", "X-Original-To"):
        value = headers.get(name)
        if not rcpts and value is not None and "@" in str(value):
            rcpts = (parseaddr(str(value))[1],)
    if not rcpts:
        found = [a for _, a in getaddresses(_values(headers, "To") + _values(headers, "Cc"))]
        rcpts = tuple(dict.fromkeys(a for a in found if "@" in a))[:MAX_RCPTS]
    return Envelope(mail_from=mail_from, rcpt_to=rcpts or ("postmaster@localhost",))


def _peer(headers: EmailMessage) -> Peer:
    """The first hop from outside the receiving site recorded in Received (the newest
    field naming a non-internal address), as the relay would have seen it: its address,
    HELO and whether the hop used TLS."""
    for value in _values(headers, "Received"):
        for ip_text in _BRACKET_IP.findall(value):
            try:
                ip = ipaddress.ip_address(ip_text)
            except ValueError:
                continue
            if any(ip in net for net in _INTERNAL if net.version == ip.version):
                continue
            match = _RECEIVED_FROM.match(value)
            tls = "TLS" if _TLS_HINT.search(value) else None
            return Peer(ip=str(ip), helo=match.group(1) if match else None, tls_version=tls)
    return Peer(ip="127.0.0.1")
