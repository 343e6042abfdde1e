"""Message: the one object that flows through the pipeline.

Built once per DATA (or once per file in `relay scan` and the lab). It keeps the exact
raw bytes, because DKIM verification needs them and because headers we add are prepended
to the raw bytes instead of re-serialising the message (which would break downstream
DKIM). The parsed form is computed lazily, once, on first use.

Over 300 lines on purpose: the one header splitter (``split_fields``, byte-exact, used
by DKIM and the header scan too) and the one header decoder live beside the object they
parse, so nobody is tempted to write a second one.

Time is explicit: whoever builds a Message gives its ``received_at``. The SMTP layer gives
the arrival time; file readers give the message's own time (``header_time``) or one the
caller was told, and never the wall clock.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC
from email import policy as email_policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message as MimeMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar, overload

from relay.errors import MessageTimeError

_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ':'


_T = TypeVar("_T")


class cached_attribute(Generic[_T]):
    """``functools.cached_property`` without its lock. On Python 3.11 that lock is one per
    property, shared by every instance: while a thread parses a large message, the event
    loop's first ``.parsed`` of any other message waited for it (a loop stall as long as
    the parse). The values here are pure functions of a frozen message, so two threads
    computing one at once merely compute it twice (Python 3.12 dropped the lock too)."""

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> cached_attribute[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object, owner: type | None = None) -> _T | cached_attribute[_T]:
        if instance is None:
            return self
        cache: dict[str, Any] = instance.__dict__
        try:
            value: _T = cache[self.name]
        except KeyError:
            value = cache[self.name] = self.func(instance)
        return value


def new_queue_id() -> str:
    """A short id, sortable by time, unique enough to correlate one message's log lines."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class Peer:
    """The SMTP client as seen at T0: address, HELO and TLS."""

    ip: str
    port: int = 0
    helo: str | None = None
    tls_version: str | None = None
    esmtp: bool = True
    # RCPT commands of this session so far and how many we refused (filled by smtp.py;
    # 0 attempted means "not recorded", e.g. stored mail): invalid_rcpt_ratio reads them.
    rcpt_attempted: int = 0
    rcpt_refused: int = 0
    # The client logged in at the MTA in front (milter {auth_authen}); the login itself
    # is not kept: a fact needs only whether there was one.
    authenticated: bool = False


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope; ``mail_from`` is "" for the null sender."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    mail_options: tuple[str, ...] = ()
    smtputf8: bool = False


def starts_with_continuation(raw: bytes) -> bool:
    """Whether the first line starts with a blank: a continuation of no field (RFC 5322
    2.2.3), which would join any field put above it."""
    return raw[:1] in (b" ", b"\t")


def to_crlf(data: bytes) -> bytes:
    """Normalise every line ending (LF, CR, CRLF) to CRLF, as SMTP carries it."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data  # every CR and LF is in a CRLF already (mail off the wire): 3x faster
    return _LINE_END.sub(b"\r\n", data)


def strip_mbox_from(data: bytes) -> bytes:
    """Drop a leading mbox envelope line (``From addr date``), which is not a header."""
    if data.startswith(b"From "):
        end = data.find(b"\n")
        return b"" if end < 0 else data[end + 1 :]
    return data


def split_header_block(raw: bytes) -> tuple[bytes, bytes]:
    """Split raw bytes into (header fields with their line ends, blank line + body)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = raw.find(sep)
        if idx >= 0:
            cut = idx + len(sep) // 2
            return raw[:cut], raw[cut:]
    return raw, b""


# A field name as RFC 5322 (ftext), the stdlib parser and dkimpy read it: printable ASCII
# up to the first colon. A line starting with anything else is not a field.
_FTEXT = bytes(range(0x21, 0x7F))  # deleted by translate: a name is all ftext if nothing is left
_FOLD = re.compile(r"\r?\n(?=[ \t])")

Fields = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class HeaderSplit:
    """A header block split into fields by ``split_fields``."""

    fields: Fields  # (name as written, value: everything after the colon, CRLFs kept)
    problem: str  # the first line that is not part of a field ("" when none)
    end: int  # offset in the block where the fields end (a line that is no field)


def split_fields(header_block: bytes) -> HeaderSplit:
    """The one header splitter: the fields of a header block, byte-exact.

    Each field is (name, value) with the name exactly as written before the first colon
    and the value everything after it, continuation lines and CRLFs included, so
    ``name + b":" + value`` is the field's bytes (dkimpy's ``rfc822_parse`` answer, which
    auth/dkimparse.py relies on; tests/test_auth_dkimparse.py compares). A line ends at
    LF (CRLF, or a bare LF in a file not yet made CRLF), its line end kept in the value;
    a lone CR is part of its line, as dkimpy reads it.

    Never raises. Where the stdlib parser (and so most mail readers) sees a line that is
    no field, it ends the header: so does this (``end``, ``problem``). An mbox ``From ``
    line is skipped; so is a continuation line before the first field (``problem`` says
    so). DKIM treats any problem as a malformed message, as dkimpy does.
    """
    lines = header_block.splitlines(keepends=True)
    ends = header_block.count(b"\n") + (not header_block.endswith(b"\n"))
    if len(lines) > ends:  # a lone CR, which splitlines takes
        lines = [line + b"\n" for line in header_block.split(b"\n")]  # for a line end
        lines[-1] = lines[-1][:-1]
        if not lines[-1]:
            lines.pop()
    names, values, problem, end = _split_lines(lines, check=False)
    if b"".join(names).translate(None, _FTEXT):  # a name that is not ftext: not a field
        names, values, problem, end = _split_lines(lines, check=True)
    return HeaderSplit(
        list(zip(names, values, strict=True)), problem, len(header_block) if end < 0 else end
    )


def _split_lines(lines: list[bytes], check: bool) -> tuple[list[bytes], list[bytes], str, int]:
    """Names, values, problem and end offset (-1: all lines) of ``split_fields``.
    Checking each name costs a fifth of the split, so the caller checks all names at
    once and only then asks for ``check``."""
    names: list[bytes] = []
    values: list[bytes] = []
    problem = ""
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if values:
                values[-1] += line
            elif not problem:
                problem = "continuation line before the first field"
            continue
        colon = line.find(b":")
        if colon > 0 and not (check and line[:colon].translate(None, _FTEXT)):
            names.append(line[:colon])
            values.append(line[colon + 1 :])
        elif not line.startswith(b"From "):  # an mbox separator line is skipped
            if line not in (b"\r\n", b"\n"):
                problem = problem or "a line that is not a header field"
            index = next(i for i, seen in enumerate(lines) if seen is line)
            return names, values, problem, sum(map(len, lines[:index]))
    return names, values, problem, -1


def decode_8bit(raw: bytes) -> str:
    """The one fallback for bytes of no declared charset (8-bit header bytes, bodies
    labelled us-ascii or with a bogus charset): UTF-8 when they are valid UTF-8, else
    Windows-1252 (what mail labelled Latin-1 or nothing almost always is; its five
    unassigned bytes become U+FFFD)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # an 8-bit byte read with surrogateescape


def undo_surrogates(text: str) -> str:
    """Text read with ``surrogateescape`` (8-bit header bytes) decoded by ``decode_8bit``."""
    # ASCII (nearly every header value) holds no surrogate: no per-character scan.
    if not text.isascii() and _ESCAPED_BYTE.search(text):
        return decode_8bit(text.encode("utf-8", "surrogateescape"))
    return text


def decode_header_value(value: object) -> str:
    """The one header decoder: a raw header value as text, unfolded, RFC 2047 words
    decoded, 8-bit bytes by ``decode_8bit``; broken encodings fall back to the raw text."""
    text = undo_surrogates(value if isinstance(value, str) else str(value))
    text = _FOLD.sub("", text)
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (HeaderParseError, UnicodeError, LookupError, ValueError):
        return text


def format_header(name: str, value: str) -> bytes:
    """One header field as CRLF-terminated bytes; refuses anything that could inject lines.

    ``value`` may already be folded with CRLF followed by a space or tab.
    """
    if not _HEADER_NAME.fullmatch(name):  # "$" would let a final newline through
        raise ValueError(f"invalid header name {name!r}")
    lines = value.split("\r\n")
    for i, line in enumerate(lines):
        if "\r" in line or "\n" in line or (i and line[:1] not in (" ", "\t")):
            raise ValueError(f"header {name} value would inject a line")
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def parse_header_fields(header_block: bytes) -> tuple[tuple[str, str], ...]:
    """(name, raw value) of every field of a header block, in order (``split_fields``);
    the value as the stdlib's compat32 ``raw_items`` gives it: leading blanks and the
    final line end dropped, folding kept, 8-bit bytes as surrogates. Never raises."""
    return _field_texts(split_fields(header_block))


def _field_texts(split: HeaderSplit) -> tuple[tuple[str, str], ...]:
    return tuple(
        (
            name.decode("ascii"),
            value.lstrip(b" \t").rstrip(b"\r\n").decode("ascii", "surrogateescape"),
        )
        for name, value in split.fields
    )


def _date_value(text: str) -> float | None:
    try:
        when = parsedate_to_datetime(text.strip())
        if when.tzinfo is None:  # "-0000": UTC, the sender's zone unknown (RFC 5322 3.3)
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):  # garbage: no date
        return None


def header_time(fields: Iterable[tuple[str, object]]) -> float | None:
    """A stored message's own time from its header fields (name, raw value), in order.

    The date of the newest (topmost) Received field that carries one, which is when the
    receiving site took the message; else the Date field, which the sender wrote; else
    None. Never raises: a garbled date counts as absent.
    """
    date: float | None = None
    for name, value in fields:
        key = name.strip().lower()
        if key == "received":
            _, semicolon, stamp = str(value).rpartition(";")
            when = _date_value(stamp) if semicolon else None
            if when is not None:
                return when
        elif key == "date" and date is None:
            date = _date_value(str(value))
    return date


def _single_part(
    raw: bytes, head: bytes | None = None, split: HeaderSplit | None = None
) -> MimeMessage | None:
    """What the stdlib parser makes of a plain single-part message, built without it: the
    fields from ``split_fields`` as its compat32 policy stores them (``set_raw``), the body
    as the payload. 15 us instead of 35 for a 4 KB message (issue 17). None, and the parser
    is asked, for anything the two might read differently: a line end that is not CRLF in
    the header, a line that is no field, an mbox ``From `` line, no blank line before the
    body, or a multipart or message/* type (the parser reads those parts too).
    tests/test_message.py compares the two on every test message. ``head`` and ``split``:
    the message's header block and its ``split_fields``, when the caller has them."""
    if raw.startswith((b"\r\n", b"From ")):
        return None
    if head is None:
        head = split_header_block(raw)[0]
    rest = raw[len(head) :]
    crlf = head.count(b"\r\n")
    if (
        not rest.startswith(b"\r\n")
        or head.count(b"\r") != crlf
        or head.count(b"\n") != crlf
        or b"\nFrom " in head
    ):
        return None
    if split is None:
        split = split_fields(head)
    if split.problem or split.end != len(head):
        return None
    msg = MimeMessage(policy=email_policy.compat32)
    for name, text in _field_texts(split):  # compat32's header_source_parse, on bytes
        msg.set_raw(name, text)
    if msg.get_content_maintype() in ("multipart", "message"):
        return None
    msg.set_payload(rest[2:].decode("ascii", "surrogateescape"))
    return msg


@dataclass(frozen=True)
class Message:
    """Raw bytes plus envelope and peer; ``parsed`` is built lazily, once.

    ``received_at`` (Unix seconds) has no default: a default would be the wall clock, and
    a stored message replayed in the lab or scanned years later would then be judged as
    arriving today (opt-out dates, state windows)."""

    raw: bytes
    envelope: Envelope
    peer: Peer
    queue_id: str = field(default_factory=new_queue_id)
    received_at: float = field(kw_only=True)

    @classmethod
    def from_file_bytes(
        cls,
        data: bytes,
        *,
        received_at: float | None = None,
        mail_from: str = "",
        rcpt_to: Iterable[str] = (),
        peer: Peer | None = None,
        queue_id: str | None = None,
    ) -> Message:
        """A Message from a stored file (``.eml``, corpus, quarantine): mbox line dropped,
        line ends made CRLF as they would be on the wire.

        ``received_at`` is the time when the caller knows it (an option, a stored record);
        otherwise the message's own (``header_time``). A file with neither a Received nor
        a Date giving one is a MessageTimeError: the caller must say which time it means.
        """
        raw = to_crlf(strip_mbox_from(data))
        if received_at is None:
            received_at = header_time(parse_header_fields(split_header_block(raw)[0]))
            if received_at is None:
                raise MessageTimeError(
                    "message has no Received or Date field with a usable date; give its time"
                )
        return cls(
            raw=raw,
            envelope=Envelope(mail_from=mail_from, rcpt_to=tuple(rcpt_to)),
            peer=peer or Peer(ip="127.0.0.1"),
            queue_id=queue_id or new_queue_id(),
            received_at=received_at,
        )

    @property
    def size(self) -> int:
        return len(self.raw)

    @cached_attribute
    def parsed(self) -> MimeMessage:
        """The parsed MIME structure (stdlib ``email``, compat32 policy); never raises.

        compat32 keeps header values as text and parses no structured header: the modern
        policy's header parser took over a second on one corpus spam and raises on some
        malformed fields, and this runs on the event loop. Values are decoded by
        ``headers()`` instead, once per message.
        """
        # The header as split once for the header facts and the stamps (cached_attribute
        # takes no lock, so a thread parsing here holds up nothing on the loop).
        built = _single_part(self.raw, self.header_block, self.header_split)
        if built is not None:
            return built
        return BytesParser(policy=email_policy.compat32).parsebytes(self.raw)

    @cached_attribute
    def header_block(self) -> bytes:
        return split_header_block(self.raw)[0]

    @cached_attribute
    def header_split(self) -> HeaderSplit:
        """The header block split into fields (``split_fields``), once per message: the
        header facts, the DKIM header scan and the first stamp read it (on the loop)."""
        return split_fields(self.header_block)

    @cached_attribute
    def body(self) -> bytes:
        """Bytes after the blank line that ends the header block."""
        rest = split_header_block(self.raw)[1]
        for blank in (b"\r\n", b"\n"):
            if rest.startswith(blank):
                return rest[len(blank) :]
        return rest

    @cached_attribute
    def header_fields(self) -> tuple[tuple[str, str], ...]:
        """(name, raw value) of every header field, in order; parses the header block only,
        so reading headers costs the same for a 25 MB message as for a short one."""
        return _field_texts(self.header_split)

    @cached_attribute
    def _decoded_headers(self) -> dict[str, list[str]]:
        fields: dict[str, list[str]] = {}
        for name, value in self.header_fields:
            fields.setdefault(name.lower(), []).append(decode_header_value(value))
        return fields

    def header(self, name: str) -> str | None:
        """First value of header ``name``, unfolded and decoded, or None; never raises."""
        values = self._decoded_headers.get(name.lower())
        return values[0] if values else None

    def headers(self, name: str) -> list[str]:
        """Every value of header ``name``, unfolded and decoded; never raises."""
        return list(self._decoded_headers.get(name.lower(), ()))

    def with_prepended(self, headers: Iterable[tuple[str, str]]) -> Message:
        """A new Message with ``headers`` prepended to the raw bytes (in the given order).

        ValueError when the message starts with a blank: that line would continue the last
        field we add (a sender could append to our Authentication-Results); the SMTP layer
        refuses such DATA before it gets here."""
        prefix = b"".join(format_header(name, value) for name, value in headers)
        if not prefix:
            return self
        if starts_with_continuation(self.raw):
            raise ValueError("message starts with a continuation line")
        return replace(self, raw=prefix + self.raw)

    def without_headers(self, drop: Callable[[str, bytes], bool]) -> Message:
        """A new Message without the header fields for which ``drop(name, field)`` is true.

        ``name`` is lower-cased; ``field`` is the whole raw field with continuation lines.
        Only the header block is touched; the body bytes stay exactly as they were.
        """
        head = self.header_block
        rest = self.raw[len(head) :]
        split = self.header_split
        kept: list[bytes] = []
        changed = False
        for name, value in split.fields:
            fld = name + b":" + value
            if drop(name.decode("ascii").lower(), fld):
                changed = True
                continue
            kept.append(fld)
        if not changed:
            return self
        kept.append(head[split.end :])  # from a line that is no field on, kept as it is
        return replace(self, raw=b"".join(kept) + rest)
