"""The SMTP layer: aiosmtpd protocol with limits, relay control and the DATA hand-off.

Thin on purpose: it speaks SMTP, enforces protocol limits, refuses relay tricks at RCPT,
mirrors the downstream's RCPT answers, and hands each DATA to ``Pipeline.process``. It
never blocks the loop and never decides about content.

Per-connection state lives on our own protocol subclass (``RelaySMTP``), never as extra
attributes on aiosmtpd's Session or Envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import Settings
from relay.contracts import Decider, Observer, Transaction, Transport
from relay.message import Envelope as MsgEnvelope
from relay.message import Message, Peer, to_crlf
from relay.pipeline.process import Pipeline
from relay.reply import (
    DATA_TIMEOUT,
    IDLE_TIMEOUT,
    INTERNAL_ERROR,
    NUL_IN_DATA,
    SHUTTING_DOWN,
    SMUGGLING,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_RCPTS,
    Reply,
    with_enhanced_status,
)
from relay.smtp.paths import (
    NEEDS_SMTPUTF8,
    SYNTAX_MAIL,
    SYNTAX_RCPT,
    UNKNOWN_PARAMETER,
    PathArgument,
    check_sender,
    parse_argument,
)
from relay.smtp.relaycontrol import RelayControl, ip_in

log = logging.getLogger("relay.smtp.server")

# A lone dot delimited by anything but CRLF on both sides: the SMTP smuggling shapes
# (<LF>.<LF>, <LF>.<CR><LF>, <CR><LF>.<LF>, <CR>.<CR>, <CR><LF>.<CR>, <CR>.<CR><LF>,
# <LF>.<CR> ...). aiosmtpd >= 1.4.6 only ends DATA on <CR><LF>.<CR><LF>, but a downstream
# that is laxer could split the message there, so such input is refused outright.
# Checked on the raw lines as read (before dot-unstuffing hides a leading dot); each line
# read during DATA ends in CRLF, so a line that starts with "." + CR/LF is <CRLF>.<CR|LF>.
_SMUGGLE = re.compile(rb"(?:^|\r|\n)\.(?:\r|\n)")
_END_OF_DATA = b".\r\n"


def bare_line_end(raw_line: bytes) -> bool:
    """Whether a CRLF-terminated line holds a CR or LF before its final CRLF (rare)."""
    end = len(raw_line) - 2
    return raw_line.find(b"\n", 0, end) >= 0 or raw_line.find(b"\r", 0, end) >= 0


def smuggling_suspect(raw_line: bytes) -> bool:
    """Whether one raw DATA line (as read, CRLF-terminated) carries a smuggling shape."""
    return raw_line != _END_OF_DATA and _SMUGGLE.search(raw_line) is not None


@dataclass
class Sessions:
    """Open connections of this process: the connection limit and the drain on shutdown."""

    limit: int
    open: set[RelaySMTP] = field(default_factory=set)
    draining: bool = False

    async def drain(self, grace: float) -> None:
        """Close idle sessions now; give sessions inside a transaction ``grace`` seconds."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.open and loop.time() < deadline:
            for sess in list(self.open):
                if not sess.busy:
                    sess.close_with(SHUTTING_DOWN)
            await asyncio.sleep(0.05)
        for sess in list(self.open):
            sess.close_with(SHUTTING_DOWN)


@dataclass(frozen=True, slots=True)
class SmtpDeps:
    """What every connection needs; built once by app.py."""

    settings: Settings
    pipeline: Pipeline
    transport: Transport
    control: RelayControl
    sessions: Sessions
    observer: Observer
    tls_context: ssl.SSLContext | None = None


class RelaySMTP(SMTP):
    """aiosmtpd protocol with our limits and per-connection transaction state."""

    def __init__(self, deps: SmtpDeps) -> None:
        s = deps.settings.smtp
        self.line_length_limit = s.max_line_length + 2  # + CRLF; longer lines get 500
        super().__init__(
            _Handler(),
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,  # RFC 6531; lines are decoded as UTF-8 (surrogateescape)
            decode_data=False,
            hostname=s.hostname,
            ident="relay ESMTP",
            timeout=s.command_timeout,
            tls_context=deps.tls_context,
            require_starttls=False,
        )
        self.deps = deps
        self.transaction: Transaction | None = None
        self.decider: Decider | None = None
        self.refused_rcpts = 0
        self.attempted_rcpts = 0
        self.busy = False  # inside MAIL..end of DATA
        self._admitted = False
        self._data_timer: asyncio.TimerHandle | None = None
        self.smuggling_seen = False
        self.bare_line_ends = False  # a DATA line held a bare CR or LF: normalise
        self._watching = False
        self.xforward: dict[str, str] = {}  # original client as told by a trusted proxy
        self.smtputf8 = False  # the transaction's MAIL carried SMTPUTF8
        self._plain_replies = False  # EHLO/HELO lines carry no enhanced status (RFC 2034)

    # --- connection lifecycle -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted:  # STARTTLS: the same session on its TLS transport, counted once
            super().connection_made(transport)
            return
        sessions = self.deps.sessions
        if sessions.draining or len(sessions.open) >= sessions.limit:
            reply = SHUTTING_DOWN if sessions.draining else TOO_MANY_CONNECTIONS
            self.deps.observer.connection_refused()
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(reply.line.encode() + b"\r\n")
            transport.close()
            return
        self._admitted = True
        sessions.open.add(self)
        self.deps.observer.connection_opened()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.deps.sessions.open.discard(self)
        self.deps.observer.connection_closed()
        self._cancel_data_timer()
        self._abort_transaction()
        super().connection_lost(exc)

    def close_with(self, reply: Reply) -> None:
        if self.transport is not None and not self.transport.is_closing():
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(reply.line.encode() + b"\r\n")
            self.deps.observer.smtp_reply(reply.code)
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        with contextlib.suppress(ValueError):
            self.deps.observer.smtp_reply(int(status[:3]))
        if isinstance(status, str) and not self._plain_replies:
            status = with_enhanced_status(status)
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        """A bug or an unexpected library error: 451, the transaction dropped, never
        ``500 Error: (SomeException)`` and never a downstream connection left open."""
        log.error(
            "session error peer=%s: %s",
            self._socket_ip() or "-",
            type(error).__name__,
            exc_info=error,
        )
        self._abort_transaction()
        self.envelope = self._create_envelope()  # the transaction is over, as after RSET
        return INTERNAL_ERROR.line

    # --- transaction state ----------------------------------------------------------------

    def _abort_transaction(self) -> None:
        txn, self.transaction = self.transaction, None
        self.busy = False
        self.decider = None
        self.smtputf8 = False
        if txn is not None:
            task = asyncio.get_running_loop().create_task(txn.abort())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    def _cancel_data_timer(self) -> None:
        if self._data_timer is not None:
            self._data_timer.cancel()
            self._data_timer = None

    def _data_timed_out(self) -> None:
        log.info("data phase timed out peer=%s", self.session.peer if self.session else "-")
        self.close_with(DATA_TIMEOUT)

    # --- commands -----------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True  # the EHLO lines are keywords, not statuses (RFC 2034)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL parsed by smtppath (strict RFC 5321/6531), not by aiosmtpd's lax parser."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = parse_argument(arg, "FROM", SYNTAX_MAIL)
        if isinstance(parsed, Reply):
            await self.push(parsed.line)
            return
        refusal = self._mail_refusal(parsed)
        if refusal is not None:
            await self.push(refusal.line)
            return
        status = await self._call_handler_hook("MAIL", parsed.path, list(parsed.options()))
        await self.push(status)

    def _mail_refusal(self, parsed: PathArgument) -> Reply | None:
        assert self.session is not None
        if parsed.params and not self.session.extended_smtp:
            return SYNTAX_MAIL  # parameters need EHLO (RFC 5321 4.1.1.11)
        for key, value in parsed.params:
            if key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", "BODY is one of 7BIT, 8BITMIME")
            elif key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return Reply(501, "5.5.4", "SIZE takes a number")
                if self.data_size_limit and int(value) > self.data_size_limit:
                    return Reply(552, "5.3.4", "Message size exceeds fixed limit")
            elif key == "SMTPUTF8":
                if value is not None:
                    return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
            else:
                return UNKNOWN_PARAMETER
        if not parsed.ascii and not parsed.has("SMTPUTF8"):
            return NEEDS_SMTPUTF8
        return check_sender(parsed.path)

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT parsed by smtppath; relay tricks judged on the path as sent."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        self.attempted_rcpts += 1
        parsed = parse_argument(arg, "TO", SYNTAX_RCPT)
        if isinstance(parsed, Reply):
            refusal: Reply | None = parsed
        elif parsed.params:
            refusal = UNKNOWN_PARAMETER  # no RCPT extension (DSN) is offered
        elif not parsed.ascii and not self.smtputf8:
            refusal = NEEDS_SMTPUTF8
        else:
            judged = self.deps.control.check(parsed.path, self._client_ip())
            refusal = judged if isinstance(judged, Reply) else None
        if refusal is not None or not isinstance(parsed, PathArgument):
            self.refused_rcpts += 1
            await self.push((refusal or SYNTAX_RCPT).line)
            return
        status = await self._call_handler_hook("RCPT", parsed.path, [])
        await self.push(status)

    async def smtp_DATA(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.rcpt_tos and not arg:
            loop = asyncio.get_running_loop()
            self._data_timer = loop.call_later(
                self.deps.settings.smtp.data_timeout, self._data_timed_out
            )
        self.smuggling_seen = False
        self.bare_line_ends = False
        self._watch_data_lines()
        try:
            await super().smtp_DATA(arg)
        finally:
            self._cancel_data_timer()

    def _watch_data_lines(self) -> None:
        """Inspect each raw line aiosmtpd reads, before its dot-unstuffing changes it.

        aiosmtpd's DATA loop is not a public hook, so the connection's own reader is wrapped
        once; the wrapper only looks at lines and returns them unchanged.
        """
        if self._watching:
            return
        self._watching = True
        reader = self._reader
        read_line = reader.readuntil

        async def readuntil(separator: bytes = b"\n") -> bytes:
            line = await read_line(separator)
            # Every shape needs a bare CR or LF, so the regex runs only on such lines.
            if separator == b"\r\n" and bare_line_end(line):
                self.bare_line_ends = True
                self.smuggling_seen = self.smuggling_seen or smuggling_suspect(line)
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign,assignment]

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: say 421 before closing an idle connection (aiosmtpd just closes).
        self.close_with(IDLE_TIMEOUT)

    def _socket_ip(self) -> str:
        peer: Any = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return ""

    def _client_ip(self) -> str:
        """The client relay control and facts judge: XFORWARD's ADDR when a trusted proxy
        (Postfix smtpd_proxy_filter) sent it, else the socket peer."""
        return self.xforward.get("ADDR") or self._socket_ip()

    def may_xforward(self) -> bool:
        return ip_in(self._socket_ip(), self.deps.settings.smtp.xforward_hosts)

    async def smtp_XFORWARD(self, arg: str) -> None:
        """Postfix XFORWARD (XFORWARD_README): original client attributes from a proxy."""
        if not self.may_xforward():
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if self.envelope is not None and self.envelope.mail_from:
            await self.push("503 5.5.1 Error: XFORWARD not allowed in a mail transaction")
            return
        try:
            self.xforward.update(parse_xforward(arg))
        except ValueError as exc:
            await self.push(f"501 5.5.4 Syntax: {exc}")
            return
        await self.push("250 2.0.0 Ok")

    async def smtp_AUTH(self, arg: str) -> None:
        # No authenticator is configured: outbound relaying is granted by network only.
        await self.push("502 5.5.1 AUTH not supported")


_BACKGROUND: set[asyncio.Task[None]] = set()


def _mail_options(options: Sequence[str]) -> list[str]:
    """ESMTP MAIL parameters passed on to the downstream (SIZE, BODY, SMTPUTF8)."""
    return [o for o in options if o.upper().split("=", 1)[0] in ("SIZE", "BODY", "SMTPUTF8")]


class _Handler:
    """aiosmtpd hooks; all state is on the RelaySMTP instance passed as ``server``."""

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        server.xforward.clear()
        # AUTH is not offered (no authenticator); XFORWARD only to trusted proxies.
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        # aiosmtpd reads pipelined commands in order from its stream and answers each in
        # turn (RCPT answers mirrored from the downstream included), so PIPELINING holds.
        out[len(out) - 1 : len(out) - 1] = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        if server.may_xforward():
            out.insert(len(out) - 1, "250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")
        return out

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        server._abort_transaction()
        # aiosmtpd's convention: "<>" stands for the null reverse-path, so that the
        # envelope's mail_from is truthy once MAIL was accepted.
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(mail_options)
        server.smtputf8 = envelope.smtp_utf8 = "SMTPUTF8" in mail_options
        # The policy in force now is the one this transaction finishes under.
        server.decider = server.deps.pipeline.policy.current
        server.busy = True
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= server.deps.settings.smtp.max_recipients:
            server.refused_rcpts += 1
            return TOO_MANY_RCPTS.line
        if server.transaction is None:
            server.transaction = await server.deps.transport.begin(
                reverse_path(envelope), _mail_options(envelope.mail_options), server.xforward
            )
        reply = await server.transaction.add_recipient(address)
        if not reply.ok:
            server.refused_rcpts += 1
            return reply.line
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        server._abort_transaction()
        server.xforward.clear()
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        server._cancel_data_timer()  # reading is over; delivery has its own timeout
        txn, server.transaction = server.transaction, None
        decider, server.decider = server.decider, None
        try:
            raw = envelope.original_content or b""
            refusal = SMUGGLING if server.smuggling_seen else None
            if refusal is None and b"\0" in raw:
                refusal = NUL_IN_DATA
            if refusal is not None:
                if txn is not None:
                    await txn.abort()
                return refusal.line
            if txn is None:
                return INTERNAL_ERROR.line
            message = _build_message(server, session, envelope, raw)
            reply = await server.deps.pipeline.process(message, txn, decider)
            return reply.line
        finally:
            server.busy = False
            server.xforward.clear()  # XFORWARD attributes last one transaction
            if server.deps.sessions.draining:
                loop = asyncio.get_running_loop()
                loop.call_soon(server.close_with, SHUTTING_DOWN)


XFORWARD_ATTRIBUTES = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"})
_UNAVAILABLE = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})


def _xtext_decode(text: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def parse_xforward(arg: str) -> dict[str, str]:
    """``NAME=x ADDR=y ...`` -> attributes; unavailable values are dropped."""
    attrs: dict[str, str] = {}
    items = arg.split()
    if not items or len(items) > len(XFORWARD_ATTRIBUTES):
        raise ValueError("XFORWARD attribute=value ...")
    for item in items:
        name, sep, value = item.partition("=")
        name = name.upper()
        if not sep or name not in XFORWARD_ATTRIBUTES:
            raise ValueError(f"unknown XFORWARD attribute {name[:20]!r}")
        value = _xtext_decode(value)
        if value.upper() in _UNAVAILABLE or not value:
            continue
        if any(c.isspace() or not c.isprintable() for c in value) or len(value) > 255:
            raise ValueError(f"bad XFORWARD value for {name}")
        if name == "ADDR":
            value = value.removeprefix("IPv6:").removeprefix("ipv6:")
            try:
                value = str(ipaddress.ip_address(value))
            except ValueError:
                raise ValueError("XFORWARD ADDR is not an IP address") from None
        attrs[name] = value
    return attrs


def reverse_path(envelope: Envelope) -> str:
    """The envelope sender, "" for the null sender (aiosmtpd reports it as "<>")."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


def _build_message(server: RelaySMTP, session: Session, envelope: Envelope, raw: bytes) -> Message:
    peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
    xf = server.xforward
    helo = xf.get("HELO") or session.host_name or None
    port = (
        int(xf["PORT"]) if xf.get("PORT", "").isdigit() else (int(peer[1]) if len(peer) > 1 else 0)
    )
    tls = None
    if session.ssl is not None:
        ssl_object = session.ssl.get("ssl_object")
        tls = str(ssl_object.version()) if ssl_object is not None else "TLS"
    return Message(
        raw=to_crlf(raw) if server.bare_line_ends else raw,
        received_at=time.time(),  # the arrival time: the SMTP layer is the clock here
        envelope=MsgEnvelope(
            mail_from=reverse_path(envelope),
            rcpt_to=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            smtputf8=server.smtputf8,
        ),
        peer=Peer(
            ip=server._client_ip(),
            port=port,
            helo=helo,
            rcpt_attempted=server.attempted_rcpts,
            rcpt_refused=server.refused_rcpts,
            tls_version=tls,
            esmtp=bool(session.extended_smtp),
        ),
    )


LISTEN_BACKLOG = 1024


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """STARTTLS context: TLS 1.2+ with the library's default (modern) ciphers."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; SO_REUSEPORT lets worker processes share the port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_server(deps: SmtpDeps, sock: socket.socket) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return RelaySMTP(deps)

    # asyncio re-listens on a passed socket with its own default backlog (100) unless told.
    return await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
