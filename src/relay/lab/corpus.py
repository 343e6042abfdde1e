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
The bytes are read and hashed, so the digest is the one of the bytes now, except for the
members of an uncompressed tar with a ``digests`` index (cache.StatIndex): an archive
whose size, mtime_ns, inode and device are unchanged is trusted, like git's index, and
its members' digests are read back (``--rehash`` hashes every message again). Bytes read
later (``raw()``) are still checked against the digest.
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


class DigestIndex(Protocol):
    """Digests of tar members by archive stat and span (cache.StatIndex)."""

    def get(
        self, file: str, stat: str, spans: Sequence[tuple[int, int]]
    ) -> Mapping[tuple[int, int], str]: ...

    def put(self, file: str, stat: str, rows: Sequence[tuple[int, int, str]]) -> None: ...


def stat_key(path: Path) -> tuple[str, str] | None:
    """(the file's resolved path, its size, mtime_ns, inode and device) or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}"


def _spanned(src: Source) -> bool:
    return src.span is not None and src.error is None and src.data is None


def _read_with_values(
    sources: Sequence[Source],
    index: HeaderIndex | None,
    digests: DigestIndex | None = None,
    trust_stat: bool = True,
) -> Iterator[tuple[int, Source, bytes | str | None, str, list[Any]]]:
    """(position, source, bytes or why not, digest, header values) in file order. With
    ``digests`` and ``trust_stat``, a tar member whose archive has the size, mtime and
    inode recorded gets its digest from the index and its bytes are not read (None),
    unless its header values are not indexed either."""
    version = index_version() if index is not None else ""
    stats: dict[Path, tuple[str, str] | None] = {}

    def where(src: Source) -> tuple[str, str] | None:
        if digests is None or not _spanned(src):
            return None
        if src.path not in stats:
            stats[src.path] = stat_key(src.path)
        return stats[src.path]

    for start in range(0, len(sources), INDEX_BATCH):
        part = sources[start : start + INDEX_BATCH]
        known: dict[int, str] = {}  # position in part -> digest from the stat index
        if digests is not None and trust_stat:
            by_file: dict[tuple[str, str], list[int]] = {}
            for i, src in enumerate(part):
                key = where(src)
                if key is not None:
                    by_file.setdefault(key, []).append(i)
            for (file, stat), positions in by_file.items():
                spans = [span for i in positions if (span := part[i].span) is not None]
                found = digests.get(file, stat, spans)
                for i in positions:
                    span = part[i].span
                    if span is not None and span in found:
                        known[i] = found[span]
        unread = [src for i, src in enumerate(part) if i not in known]
        read_back = iter(read(unread))
        rows: list[tuple[int, Source, bytes | str | None, str]] = []
        fresh_stat: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        for i, src in enumerate(part):
            if i in known:
                rows.append((start + i, src, None, known[i]))
                continue
            _, data = next(read_back)
            digest = "" if isinstance(data, str) else hashlib.sha256(data).hexdigest()
            key = where(src)
            if key is not None and src.span is not None and digest:
                fresh_stat.setdefault(key, []).append((*src.span, digest))
            rows.append((start + i, src, data, digest))
        if digests is not None:
            for (file, stat), stat_rows in fresh_stat.items():
                digests.put(file, stat, stat_rows)
        yield from _with_values(rows, index, version)


def _with_values(
    batch: Sequence[tuple[int, Source, bytes | str | None, str]],
    index: HeaderIndex | None,
    version: str,
) -> Iterator[tuple[int, Source, bytes | str | None, str, list[Any]]]:
    digests = [d for _, _, data, d in batch if not isinstance(data, str)]
    found = dict(index.get(digests, version)) if index is not None and digests else {}
    fresh: list[tuple[str, Any]] = []
    for position, src, data, digest in batch:
        if isinstance(data, str):
            yield position, src, data, "", []
            continue
        values = found.get(digest)
        if values is None:
            if data is None:  # digest from the stat index, header values not indexed
                [(_, data)] = read([src])
                if isinstance(data, str):
                    yield position, src, data, "", []
                    continue
            values = found[digest] = header_values(data)
            fresh.append((digest, values))
        yield position, src, data, digest, values
    if index is not None and fresh:
        index.put(fresh, version)


def load_corpus(
    sources: Sequence[Source],
    description: str,
    index: HeaderIndex | None = None,
    digests: DigestIndex | None = None,
    trust_stat: bool = True,
) -> Corpus:
    """Read every source; order readable messages by their time, then file order. Bytes
    that can be read again are let go as soon as their message's values are taken;
    ``index`` keeps the header values by digest between runs; ``digests`` the digests of
    tar members by the archive's stat (``trust_stat=False``: hash them all again)."""
    staged: list[tuple[float | None, CorpusMessage]] = []
    unreadable: list[Unreadable] = []
    for index_, src, data, digest, values in _read_with_values(sources, index, digests, trust_stat):
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


def _where(src: Source, data: bytes | None) -> Source:
    """``src`` holding ``data`` only when it cannot be read again alone (``data`` None:
    not read, a tar member whose digest the stat index gave)."""
    if src.rereadable or data is None:
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
