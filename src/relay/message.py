"""Message: the one object that flows through the pipeline.

Built once per DATA (or once per file in `relay scan` and the lab). It keeps the exact
raw bytes, because DKIM verification needs them and because headers we add are prepended
to the raw bytes instead of re-serialising the message (which would break downstream
DKIM). The parsed form is computed lazily, once, on first use.

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
from functools import cached_property

from relay.errors import MessageTimeError

_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'


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


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope; ``mail_from`` is "" for the null sender."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    mail_options: tuple[str, ...] = ()
    smtputf8: bool = False


def to_crlf(data: bytes) -> bytes:
    """Normalise every line ending (LF, CR, CRLF) to CRLF, as SMTP carries it."""
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


def _unfold_fields(header_block: bytes) -> list[bytes]:
    """Header fields of a block, each with its continuation lines and line ends."""
    fields: list[bytes] = []
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


_FOLD = re.compile(r"\r?\n(?=[ \t])")


def decode_header_value(value: object) -> str:
    """A raw header value as text: unfolded, RFC 2047 words decoded, 8-bit bytes as UTF-8
    (or Latin-1 when that fails); broken encodings fall back to the raw text."""
    text = value if isinstance(value, str) else str(value)
    if any("\udc80" <= c <= "\udcff" for c in text):  # 8-bit bytes kept as surrogates
        raw = text.encode("ascii", "surrogateescape")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
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
    if not _HEADER_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}")
    lines = value.split("\r\n")
    for i, line in enumerate(lines):
        if "\r" in line or "\n" in line or (i and line[:1] not in (" ", "\t")):
            raise ValueError(f"header {name} value would inject a line")
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def parse_header_fields(header_block: bytes) -> tuple[tuple[str, str], ...]:
    """(name, raw value) of every field of a header block, in order; never raises."""
    head = BytesParser(policy=email_policy.compat32).parsebytes(header_block, headersonly=True)
    return tuple(head.raw_items())  # raw text: 8-bit bytes kept as surrogates


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

    @cached_property
    def parsed(self) -> MimeMessage:
        """The parsed MIME structure (stdlib ``email``, compat32 policy); never raises.

        compat32 keeps header values as text and parses no structured header: the modern
        policy's header parser took over a second on one corpus spam and raises on some
        malformed fields, and this runs on the event loop. Values are decoded by
        ``headers()`` instead, once per message.
        """
        msg = BytesParser(policy=email_policy.compat32).parsebytes(self.raw)
        return msg

    @cached_property
    def header_block(self) -> bytes:
        return split_header_block(self.raw)[0]

    @cached_property
    def body(self) -> bytes:
        """Bytes after the blank line that ends the header block."""
        rest = split_header_block(self.raw)[1]
        for blank in (b"\r\n", b"\n"):
            if rest.startswith(blank):
                return rest[len(blank) :]
        return rest

    @cached_property
    def header_fields(self) -> tuple[tuple[str, str], ...]:
        """(name, raw value) of every header field, in order; parses the header block only,
        so reading headers costs the same for a 25 MB message as for a short one."""
        return parse_header_fields(self.header_block)

    @cached_property
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
        """A new Message with ``headers`` prepended to the raw bytes (in the given order)."""
        prefix = b"".join(format_header(name, value) for name, value in headers)
        if not prefix:
            return self
        return replace(self, raw=prefix + self.raw)

    def without_headers(self, drop: Callable[[str, bytes], bool]) -> Message:
        """A new Message without the header fields for which ``drop(name, field)`` is true.

        ``name`` is lower-cased; ``field`` is the whole raw field with continuation lines.
        Only the header block is touched; the body bytes stay exactly as they were.
        """
        head, rest = split_header_block(self.raw)
        kept: list[bytes] = []
        changed = False
        for fld in _unfold_fields(head):
            name = fld.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            if b":" in fld and drop(name, fld):
                changed = True
                continue
            kept.append(fld)
        if not changed:
            return self
        return replace(self, raw=b"".join(kept) + rest)
