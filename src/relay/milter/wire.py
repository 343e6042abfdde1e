"""The Sendmail milter wire protocol (version 6, as Postfix and Sendmail speak it): packets
in, frozen commands out; our replies as packets.

A packet is a 4-byte big-endian length, then that many bytes: a command letter and its
data. Strings are NUL-terminated. Every decoding error is one ``MilterProtocolError``
(checked, never an ``assert``), so a malformed, truncated or oversized packet closes the
session with a clear reason. Values stay bytes: header values and body chunks must reach
the pipeline byte-exact (DKIM hashes them), and macro values may be UTF-8 (SMTPUTF8 paths,
logins), so they are decoded with surrogateescape, never refused.

Why our own codec (measured, docs/milter.md): kilter.protocol 0.6.0 raised six different
exception types on 20,000 mutated packets (AssertionError among them, which ``python -O``
turns into silent acceptance) and decodes macro values as ASCII, so a {mail_addr} in
UTF-8 fails the session; purepythonmilter 0.0.1 decodes header values as UTF-8 with
backslash escapes, so a message could not be rebuilt byte-exact; pymilter wraps the C
libmilter with one thread per session and would need a bridge into the event loop for
every callback. The protocol is 15 small commands; this module is the whole of it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from relay.errors import RelayError

# Body chunks are at most 65535 bytes (libmilter's MILTER_CHUNK_SIZE; we never negotiate
# the larger SMFIP_MDS_* sizes); the command letter makes 65536. Other packets (a long
# header, macros) are allowed more, still bounded.
MAX_BODY_PACKET = 65536
MAX_PACKET = 1024 * 1024
VERSION = 6


class MilterProtocolError(RelayError):
    """A packet that breaks the protocol; the session is closed."""


class Stage(IntEnum):
    """Macro stages (SMFIM_*), for the macro lists we ask for at negotiation."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


class Actions(IntFlag):
    """What the filter may do to a message (SMFIF_*)."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class Proto(IntFlag):
    """Protocol steps the filter does not want, or wants without a reply (SMFIP_*)."""

    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


# --- commands from the MTA -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptNeg:
    version: int
    actions: Actions
    protocol: Proto


@dataclass(frozen=True, slots=True)
class Macros:
    command: bytes  # the command letter they belong to
    values: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (unix socket), "U" (unknown)
    port: int
    address: str


@dataclass(frozen=True, slots=True)
class Helo:
    name: str


@dataclass(frozen=True, slots=True)
class MailFrom:
    address: str  # as the MTA sent it, angle brackets included
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RcptTo:
    address: str
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Header:
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Body:
    chunk: bytes


@dataclass(frozen=True, slots=True)
class Simple:
    """A command without data: DATA, end of headers, end of message, abort, quit,
    quit-but-keep-the-connection; or UNKNOWN (its data ignored)."""

    command: bytes


Command = OptNeg | Macros | Connect | Helo | MailFrom | RcptTo | Header | Body | Simple

DATA, EOH, EOM, ABORT, QUIT, QUIT_NC, UNKNOWN = b"T", b"N", b"E", b"A", b"Q", b"K", b"U"
_SIMPLE = frozenset({DATA, EOH, EOM, ABORT, QUIT, QUIT_NC})


def packet_size(header: bytes) -> int:
    """The length a 4-byte packet header announces; refuses empty and oversized ones."""
    (size,) = struct.unpack("!I", header)
    if size == 0:
        raise MilterProtocolError("empty packet")
    if size > MAX_PACKET:
        raise MilterProtocolError(f"packet of {size} bytes exceeds {MAX_PACKET}")
    return int(size)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _strings(data: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings filling ``data`` exactly."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: string not NUL-terminated")
    return data[:-1].split(b"\0")


def decode(packet: bytes) -> Command:
    """One packet's payload (command letter + data) as a command."""
    cmd, data = packet[:1], packet[1:]
    if cmd == b"B":
        if len(packet) > MAX_BODY_PACKET:
            raise MilterProtocolError(f"body chunk of {len(data)} bytes exceeds 65535")
        return Body(data)
    if cmd == b"L":
        parts = _strings(data, "header")
        if len(parts) != 2 or not parts[0]:
            raise MilterProtocolError("header: expected a name and a value")
        return Header(parts[0], parts[1])
    if cmd in _SIMPLE:
        if data:
            raise MilterProtocolError(f"command {cmd!r} carries unexpected data")
        return Simple(cmd)
    if cmd == UNKNOWN:
        return Simple(cmd)
    if cmd == b"O":
        if len(data) < 12:
            raise MilterProtocolError("option negotiation: truncated")
        version, actions, protocol = struct.unpack("!III", data[:12])
        return OptNeg(version, Actions(actions), Proto(protocol))
    if cmd == b"D":
        if not data:
            raise MilterProtocolError("macros: no command letter")
        pairs = _strings(data[1:], "macros") if len(data) > 1 else []
        if len(pairs) % 2:
            raise MilterProtocolError("macros: a name without a value")
        values = tuple((_text(pairs[i]), _text(pairs[i + 1])) for i in range(0, len(pairs), 2))
        return Macros(data[:1], values)
    if cmd == b"C":
        return _connect(data)
    if cmd == b"H":
        parts = _strings(data, "helo")
        if len(parts) != 1:
            raise MilterProtocolError("helo: expected one string")
        return Helo(_text(parts[0]))
    if cmd in (b"M", b"R"):
        parts = _strings(data, "envelope")
        if not parts[0]:
            raise MilterProtocolError("envelope: empty address")
        address, args = _text(parts[0]), tuple(_text(p) for p in parts[1:])
        return MailFrom(address, args) if cmd == b"M" else RcptTo(address, args)
    raise MilterProtocolError(f"unknown command {cmd!r}")


def _connect(data: bytes) -> Connect:
    name, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise MilterProtocolError("connect: truncated")
    family = rest[:1].decode("latin-1")
    if family == "U":
        if len(rest) != 1:
            raise MilterProtocolError("connect: data after the unknown family")
        return Connect(_text(name), family, 0, "")
    if family not in ("4", "6", "L") or len(rest) < 4:
        raise MilterProtocolError(f"connect: bad address family {family!r}")
    (port,) = struct.unpack("!H", rest[1:3])
    parts = _strings(rest[3:], "connect")
    if len(parts) != 1:
        raise MilterProtocolError("connect: expected one address")
    return Connect(_text(name), family, int(port), _text(parts[0]))


# --- replies to the MTA ----------------------------------------------------------------


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def optneg_reply(
    actions: Actions, protocol: Proto, macros: dict[Stage, str] | None = None
) -> bytes:
    """Our side of the negotiation, with the macro lists we want per stage."""
    data = struct.pack("!III", VERSION, int(actions), int(protocol))
    for stage, names in (macros or {}).items():
        data += struct.pack("!I", int(stage)) + names.encode("ascii") + b"\0"
    return packet(b"O", data)


CONTINUE = packet(b"c")
ACCEPT = packet(b"a")
DISCARD = packet(b"d")
TEMPFAIL = packet(b"t")
REJECT = packet(b"r")


def reply_code(code: int, status: str, text: str) -> bytes:
    """An SMTP reply of our choosing (SMFIR_REPLYCODE). Only printable ASCII goes on the
    wire; Postfix would refuse a reply with line breaks, and "%" is doubled because
    libmilter-based MTAs read the text as a format string."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text).replace("%", "%%")
    line = f"{code} {status} {clean}".rstrip()
    return packet(b"y", line.encode("ascii") + b"\0")


def _header_data(name: str, value: bytes) -> bytes:
    return name.encode("ascii") + b"\0" + value + b"\0"


def insert_header(index: int, name: str, value: bytes) -> bytes:
    """SMFIR_INSHEADER: ``value`` as it goes after the colon (our leading space kept, as
    negotiated with SMFIP_HDR_LEADSPC), continuation lines joined by LF."""
    return packet(b"i", struct.pack("!I", index) + _header_data(name, value))


def change_header(index: int, name: str, value: bytes) -> bytes:
    """SMFIR_CHGHEADER: the ``index``-th field called ``name``; an empty value deletes it."""
    return packet(b"m", struct.pack("!I", index) + _header_data(name, value))


def quarantine(reason: str) -> bytes:
    clean = "".join(c if " " <= c <= "~" else "?" for c in reason)
    return packet(b"q", clean.encode("ascii") + b"\0")
