"""Reading a labelled corpus: a split file (TSV), or one Maildir / mbox / directory per label.

Each message becomes a CorpusMessage with its exact bytes, digest and time. Messages that
cannot be read or parsed become Unreadable entries, which the report counts and lists:
nothing is dropped silently. Order is corpus time, then file order. A message's time is
its own (``header_time``: the newest Received date, else the Date header); one with
neither keeps the time of the message before it in file order (the first such: 0, the
epoch), so a corpus always replays the same way, whatever day it is.
"""

from __future__ import annotations

import csv
import hashlib
import ipaddress
import mailbox
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Literal

from relay.errors import RelayError
from relay.message import (
    Envelope,
    Message,
    Peer,
    header_time,
    split_header_block,
    strip_mbox_from,
    to_crlf,
)

Label = Literal["ham", "spam"]
LABELS: tuple[Label, ...] = ("ham", "spam")
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


class CorpusError(RelayError):
    """The corpus description (labels file, directories) is unusable."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where one message comes from: a file, or a key inside a Maildir / mbox."""

    id: str  # stable, human-readable: relative path, or "<box>#<key>"
    label: Label
    path: Path
    key: str | None = None  # mailbox key (Maildir / mbox); None for a plain file


@dataclass(frozen=True, slots=True)
class CorpusMessage:
    id: str
    label: Label
    digest: str  # sha256 of the raw bytes as read
    raw: bytes
    time: float  # corpus time (header_time), used to order stateful facts
    index: int  # position in file order
    envelope: Envelope
    peer: Peer

    def to_message(self) -> Message:
        """The Message as the relay would have seen it, rebuilt from the stored headers."""
        return Message(
            raw=to_crlf(strip_mbox_from(self.raw)),
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


def sources_from_labels(corpus: Path, labels: Path, subset: str | None) -> list[Source]:
    """Sources listed in a split file: relative_path, label (ham|spam), optional set."""
    out: list[Source] = []
    try:
        with labels.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
    except OSError as exc:
        raise CorpusError(f"{labels}: cannot read labels: {exc.strerror}") from None
    for lineno, row in enumerate(rows, 1):
        if not row or row[0].startswith("#"):
            continue
        if lineno == 1 and row[0] == "relative_path":
            continue
        if len(row) < 2 or row[1] not in LABELS:
            raise CorpusError(f"{labels}:{lineno}: expected relative_path<TAB>ham|spam[<TAB>set]")
        if subset is not None and (len(row) < 3 or row[2] != subset):
            continue
        label: Label = "ham" if row[1] == "ham" else "spam"
        out.append(Source(id=row[0], label=label, path=corpus / row[0]))
    return out


def sources_from_box(path: Path, label: Label) -> list[Source]:
    """A Maildir (cur/ new/), an mbox file, or a directory of message files."""
    if path.is_dir() and (path / "cur").is_dir():
        box = mailbox.Maildir(path, factory=None, create=False)
        return [
            Source(id=f"{path.name}#{key}", label=label, path=path, key=key)
            for key in sorted(box.keys())
        ]
    if path.is_file():
        mbox = mailbox.mbox(path, factory=None, create=False)
        try:
            keys = list(mbox.keys())
        finally:
            mbox.close()
        return [Source(id=f"{path.name}#{k}", label=label, path=path, key=str(k)) for k in keys]
    if path.is_dir():
        return [
            Source(id=f"{path.name}/{p.relative_to(path)}", label=label, path=p)
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "cmds" and not p.name.startswith(".")
        ]
    raise CorpusError(f"{path}: not a Maildir, mbox file or directory")


def _read_boxes(sources: Sequence[Source]) -> Iterator[tuple[Source, bytes | str]]:
    """Raw bytes of each source, or the reason it could not be read."""
    open_boxes: dict[Path, mailbox.Mailbox[mailbox.Message]] = {}
    try:
        for src in sources:
            try:
                if src.key is None:
                    yield src, src.path.read_bytes()
                    continue
                box = open_boxes.get(src.path)
                if box is None:
                    box = (
                        mailbox.Maildir(src.path, factory=None, create=False)
                        if src.path.is_dir()
                        else mailbox.mbox(src.path, factory=None, create=False)
                    )
                    open_boxes[src.path] = box
                key: str | int = int(src.key) if isinstance(box, mailbox.mbox) else src.key
                yield src, box.get_bytes(key)  # type: ignore[arg-type]
            except (OSError, KeyError) as exc:
                yield src, f"cannot read: {getattr(exc, 'strerror', None) or exc}"
    finally:
        for box in open_boxes.values():
            box.close()


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


def load_corpus(sources: Sequence[Source], description: str) -> Corpus:
    """Read every source; order readable messages by their time, then file order."""
    staged: list[tuple[float | None, int, Source, bytes, EmailMessage]] = []
    unreadable: list[Unreadable] = []
    for index, (src, data) in enumerate(_read_boxes(sources)):
        if isinstance(data, str):
            unreadable.append(Unreadable(src.id, src.label, data))
            continue
        problem = parse_problem(data)
        if problem is not None:
            unreadable.append(Unreadable(src.id, src.label, problem))
            continue
        headers = _headers(data)
        staged.append((header_time(headers.raw_items()), index, src, data, headers))
    messages: list[CorpusMessage] = []
    last = 0.0
    for date, index, src, data, headers in staged:
        last = date if date is not None else last
        messages.append(
            CorpusMessage(
                id=src.id,
                label=src.label,
                digest=hashlib.sha256(data).hexdigest(),
                raw=data,
                time=last,
                index=index,
                envelope=_envelope(data, headers),
                peer=_peer(headers),
            )
        )
    messages.sort(key=lambda m: (m.time, m.index))
    return Corpus(tuple(messages), tuple(unreadable), description)


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
