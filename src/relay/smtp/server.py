"""The SMTP protocol: aiosmtpd's ``SMTP`` subclass with our commands, limits and the
per-connection state.

One module because aiosmtpd's ``SMTP`` subclass is one class: the commands it overrides
share the per-connection state; under 500 lines for that reason (DATA is read in
``data.py``, the memory budget kept in ``budget.py``).

Thin on purpose: it speaks SMTP, enforces protocol limits, refuses relay tricks at RCPT
and hands the rest to the aiosmtpd hooks (``handler.py``), which mirror RCPT downstream
and hand each DATA to ``Pipeline.process``. It never blocks the loop and never decides
about content.

Per-connection state lives here, on our own protocol subclass, never as extra attributes
on aiosmtpd's Session or Envelope. The hooks change it only through the public methods
below, named for what they do to the transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, syntax

from relay.config import Settings
from relay.contracts import Decider, Observer, Transaction, Transport
from relay.pipeline.process import Pipeline
from relay.reply import (
    DATA_TIMEOUT,
    IDLE_TIMEOUT,
    INTERNAL_ERROR,
    NO_ROOM_AT_MAIL,
    NO_ROOM_FOR_DATA,
    SHUTTING_DOWN,
    TOO_MANY_CONNECTIONS,
    Reply,
    with_enhanced_status,
)
from relay.smtp.budget import DataHold
from relay.smtp.data import DataEnd, read_data
from relay.smtp.logsafe import printable
from relay.smtp.paths import (
    NEEDS_SMTPUTF8,
    SYNTAX_MAIL,
    SYNTAX_RCPT,
    UNKNOWN_PARAMETER,
    PathArgument,
    check_mail,
    parse_argument,
)
from relay.smtp.relaycontrol import RelayControl, ip_in
from relay.smtp.sessions import Sessions
from relay.smtp.smuggling import DataLines
from relay.smtp.xforward import parse_xforward

log = logging.getLogger("relay.smtp.server")

# Session limits (Postfix smtpd_hard_error_limit, smtpd_junk_command_limit): a client that
# only earns errors, or only chats, is cut off instead of being answered a thousand times.
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many junk commands, closing connection")
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELP", "EHLO", "HELO"})
# RFC 3207 4.2: STARTTLS is an ESMTP extension (EHLO first) and is never offered again
# once TLS is up; a client that sends it anyway gets 503.
STARTTLS_BEFORE_EHLO = "503 5.5.1 Error: send EHLO first"
STARTTLS_AGAIN = "503 5.5.1 Error: TLS already active"
# aiosmtpd's words for its two refusals; the budget's is ours.
DATA_REFUSALS = {
    DataEnd.TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
    DataEnd.TOO_MUCH: "552 Error: Too much mail data",
    DataEnd.NO_ROOM: NO_ROOM_FOR_DATA.line,
}


# Name prefixes aiosmtpd looks up by introspection when it builds a connection: commands
# and AUTH mechanisms on the protocol, hooks (and AUTH mechanisms) on the handler.
INTROSPECTED = ("smtp_", "auth_", "handle_")


_NAMES: dict[type, tuple[str, ...]] = {}  # a memo of class facts, never other state


def introspected_names(cls: type) -> tuple[str, ...]:
    """The names of ``cls`` that aiosmtpd looks up by introspection (``INTROSPECTED``),
    listed once per class for ``__dir__`` (``RelaySMTP.__dir__`` says why)."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(n for n in dir(cls) if n.startswith(INTROSPECTED))
    return names


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
    """aiosmtpd protocol with our limits and per-connection transaction state.

    ``handler`` is the aiosmtpd hook object (``relay.smtp.handler.Handler``); it is passed
    in by ``listen.start_server`` so that this module does not import the hooks that use it.
    """

    def __init__(self, deps: SmtpDeps, handler: object) -> None:
        s = deps.settings.smtp
        self.line_length_limit = s.max_line_length + 2  # + CRLF; longer lines get 500
        super().__init__(
            handler,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,  # RFC 6531; lines are decoded as UTF-8 (surrogateescape)
            decode_data=False,
            hostname=s.hostname,
            ident="relay ESMTP",
            timeout=s.command_timeout,
            tls_context=deps.tls_context,
            require_starttls=False,
            # The running loop, which aiosmtpd would look up itself under a
            # warnings.catch_warnings block: 1.3 us of a connection's set-up (issue 17).
            loop=asyncio.get_running_loop(),
        )
        self.deps = deps
        self.transaction: Transaction | None = None
        self.decider: Decider | None = None
        self.refused_rcpts = 0
        self.attempted_rcpts = 0
        self.busy = False  # inside MAIL..end of DATA
        self._admitted = False
        self._data_timer: asyncio.TimerHandle | None = None
        self.data_lines = DataLines()  # bare line ends and smuggling seen in this DATA
        self.data_hold = DataHold(deps.sessions.data_budget)  # what this transaction reserved
        self.xforward: dict[str, str] = {}  # original client as told by a trusted proxy
        self.smtputf8 = False  # the transaction's MAIL carried SMTPUTF8
        self._plain_replies = False  # EHLO/HELO lines carry no enhanced status (RFC 2034)
        self.errors = 0  # 4xx/5xx replies since the session began or last delivered
        self.junk_commands = 0  # NOOP/RSET/VRFY/HELP/EHLO/HELO, counted the same way
        self._last_code = 0  # the code of the last reply pushed
        self._held: list[bytes] = []  # lines of a multi-line reply not yet written
        # aiosmtpd dispatches through this table: the junk commands are counted on the way
        # in, whichever method (ours or aiosmtpd's) answers them.
        self._smtp_methods = {
            name: _junk_counted(method.__func__).__get__(self) if name in JUNK_COMMANDS else method
            for name, method in self._smtp_methods.items()
        }

    def __dir__(self) -> list[str]:
        """Only the names aiosmtpd introspects. Its ``SMTP.__init__`` builds the command and
        AUTH tables from ``inspect.getmembers(self)`` and ``dir(self)`` on every
        connection, which walked all ~250 attributes of the protocol: 0.06 ms of a
        connection's 0.15 ms set-up (issue 17). The ``smtp_*`` and ``auth_*`` names it
        keeps come from the class alone, so they are listed once per class."""
        return list(introspected_names(type(self)))

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
        self.stop_data_timer()
        self.abort_transaction()
        super().connection_lost(exc)

    def close_with(self, reply: Reply) -> None:
        """Send ``reply`` and close the connection (idle timeout, drain, DATA timeout)."""
        if self.transport is not None and not self.transport.is_closing():
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(reply.line.encode() + b"\r\n")
            self.deps.observer.smtp_reply(reply.code)
            self.transport.close()

    def hang_up(self, reply: Reply, why: str) -> None:
        """A session limit was hit: say ``reply``, close, and stop reading commands (a
        pipelined rest is never acted on)."""
        log.info(
            "closing session peer=%s helo=%s: %s",
            self._socket_ip() or "-",
            printable(self.session.host_name or "-") if self.session else "-",
            why,
        )
        self.close_with(reply)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def push(self, status: AnyStr) -> None:
        """One reply line. The lines of a multi-line reply (EHLO's six or seven) are held
        and written with its last line: one write and one send() instead of one each."""
        if self.transport is None or self.transport.is_closing():
            self._held.clear()
            return  # hung up: nothing more is said
        final = len(status) < 4 or status[3:4] not in ("-", b"-")
        code = 0
        with contextlib.suppress(ValueError):
            code = int(status[:3])
            if final:  # a reply, not a line, is counted
                self.deps.observer.smtp_reply(code)
        if isinstance(status, str) and not self._plain_replies:
            status = with_enhanced_status(status)
        if not final:
            self._held.append(self._encoded(status))
            return
        if self._held:
            lines = [*self._held, self._encoded(status)]
            self._held.clear()
            await super().push(b"\r\n".join(lines))
        else:
            await super().push(status)
        self._last_code = code
        if code >= 400 and code != 421:
            self.errors += 1
            if self.errors >= self.deps.settings.smtp.max_errors:
                self.hang_up(TOO_MANY_ERRORS, f"{self.errors} errors")

    def _encoded(self, line: str | bytes) -> bytes:
        if isinstance(line, bytes):
            return line
        return line.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")

    async def handle_exception(self, error: Exception) -> str:
        """A bug or an unexpected library error: 451, the transaction dropped, never
        ``500 Error: (SomeException)`` and never a downstream connection left open."""
        log.error(
            "session error peer=%s: %s",
            self._socket_ip() or "-",
            type(error).__name__,
            exc_info=error,
        )
        self.abort_transaction()
        self.envelope = self._create_envelope()  # the transaction is over, as after RSET
        return INTERNAL_ERROR.line

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: say 421 before closing an idle connection (aiosmtpd just closes).
        self.close_with(IDLE_TIMEOUT)

    # --- the transaction, as the hooks drive it -------------------------------------------

    def begin_transaction(self, *, smtputf8: bool, size: int) -> Reply | None:
        """MAIL accepted: the policy in force now is the one this transaction finishes
        under, and the session counts as busy until the end of DATA. A large declared
        ``size`` (SIZE=) is reserved in the memory budget now, or the MAIL is refused."""
        if not self.data_hold.declare(size):
            self._no_room(f"SIZE={size}")
            return NO_ROOM_AT_MAIL
        self.smtputf8 = smtputf8
        self.decider = self.deps.pipeline.policy.current
        self.busy = True
        return None

    async def downstream(self, mail_from: str, options: Sequence[str]) -> Transaction:
        """The transaction's downstream, opened at the first RCPT that reaches it."""
        if self.transaction is None:
            self.transaction = await self.deps.transport.begin(mail_from, options, self.xforward)
        return self.transaction

    def refuse_recipient(self, reply: Reply) -> str:
        """Count a refused RCPT (a fact for the policy) and give its reply line."""
        self.refused_rcpts += 1
        return reply.line

    def take_transaction(self) -> tuple[Transaction | None, Decider | None]:
        """End of DATA: the downstream transaction and the policy captured at MAIL, handed
        over to the pipeline; the session no longer holds them."""
        txn, self.transaction = self.transaction, None
        decider, self.decider = self.decider, None
        return txn, decider

    def end_transaction(self) -> None:
        """DATA answered: not busy any more, XFORWARD attributes forgotten (they last one
        transaction), and the connection closed if the process is draining."""
        self.busy = False
        self.data_hold.release()
        self.forget_xforward()
        if self.deps.sessions.draining:
            asyncio.get_running_loop().call_soon(self.close_with, SHUTTING_DOWN)

    def abort_transaction(self) -> None:
        """Drop the transaction (new MAIL, RSET, error, lost connection); its downstream
        connection is reset in the background."""
        txn, self.transaction = self.transaction, None
        self.busy = False
        self.data_hold.release()
        self.decider = None
        self.smtputf8 = False
        if txn is not None:
            task = asyncio.get_running_loop().create_task(txn.abort())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    def stop_data_timer(self) -> None:
        """Reading DATA is over (or the connection is): its timeout no longer applies."""
        if self._data_timer is not None:
            self._data_timer.cancel()
            self._data_timer = None

    def _more_room(self) -> int | None:
        """The DATA outgrew what it reserved: room for the largest message, or None."""
        ceiling = self.data_hold.grow()
        if ceiling is None:
            self._no_room(f"over {self.data_hold.ceiling} bytes of DATA")
        return ceiling

    def _no_room(self, what: str) -> None:
        budget = self.deps.sessions.data_budget
        log.info(
            "large message refused, no room: peer=%s %s, %d of %d bytes reserved",
            self._socket_ip() or "-",
            what,
            budget.held,
            budget.limit,
        )

    def _data_timed_out(self) -> None:
        log.info("data phase timed out peer=%s", self.session.peer if self.session else "-")
        self.close_with(DATA_TIMEOUT)

    # --- who the client is ----------------------------------------------------------------

    def _socket_ip(self) -> str:
        peer: Any = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return ""

    def client_ip(self) -> str:
        """The client relay control and facts judge: XFORWARD's ADDR when a trusted proxy
        (Postfix smtpd_proxy_filter) sent it, else the socket peer."""
        return self.xforward.get("ADDR") or self._socket_ip()

    def may_xforward(self) -> bool:
        """Whether the socket peer is a proxy trusted to send XFORWARD."""
        return ip_in(self._socket_ip(), self.deps.settings.smtp.xforward_hosts)

    def forget_xforward(self) -> None:
        """Back to judging the socket peer (EHLO, RSET, end of a transaction)."""
        self.xforward.clear()

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
        refusal = check_mail(
            parsed, esmtp=bool(self.session.extended_smtp), size_limit=self.data_size_limit
        )
        if refusal is not None:
            await self.push(refusal.line)
            return
        status = await self._call_handler_hook("MAIL", parsed.path, list(parsed.options()))
        await self.push(status)

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
            judged = self.deps.control.check(parsed.path, self.client_ip())
            refusal = judged if isinstance(judged, Reply) else None
        if refusal is not None or not isinstance(parsed, PathArgument):
            await self.push(self.refuse_recipient(refusal or SYNTAX_RCPT))
            return
        status = await self._call_handler_hook("RCPT", parsed.path, [])
        await self.push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with our reader (``data.py``): one buffer instead of a list of
        lines, the memory budget for large messages, a refused rest skipped in blocks."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        loop = asyncio.get_running_loop()
        self._data_timer = loop.call_later(
            self.deps.settings.smtp.data_timeout, self._data_timed_out
        )
        self.data_lines.reset()
        self._last_code = 0
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            read = await read_data(
                self._reader,
                line_limit=self.line_length_limit,
                size_limit=self.deps.settings.smtp.max_message_size,
                ceiling=self.data_hold.ceiling,
                grow=self._more_room,
                watch=self.data_lines,
            )
        except asyncio.CancelledError:
            self._writer.close()  # the connection went during DATA (as aiosmtpd does)
            raise
        finally:
            self.stop_data_timer()  # reading is over; delivery has its own timeout
        if read.end is not DataEnd.OK:
            self.abort_transaction()
            self.end_transaction()
            self.envelope = self._create_envelope()  # as after RSET
            await self.push(DATA_REFUSALS[read.end])
            return
        self.envelope.original_content = self.envelope.content = read.data
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()  # as after RSET
        await self.push(status)
        if 200 <= self._last_code < 300:  # a message accepted: the client is a mailer
            self.errors = 0
            self.junk_commands = 0

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207: once, after EHLO. aiosmtpd would start a nested handshake inside TLS
        and accept STARTTLS before EHLO."""
        if self.tls_context is not None:
            if self._tls_protocol is not None:
                await self.push(STARTTLS_AGAIN)
                return
            if self.session is None or not self.session.extended_smtp:
                await self.push(STARTTLS_BEFORE_EHLO)
                return
        await super().smtp_STARTTLS(arg)

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


_BACKGROUND: set[asyncio.Task[None]] = set()  # keeps fire-and-forget aborts referenced


@functools.cache
def _junk_counted(
    command: Callable[[RelaySMTP, str | None], Awaitable[None]],
) -> Callable[[RelaySMTP, str | None], Awaitable[None]]:
    """The junk ``command`` (a function of the class, ours or aiosmtpd's) behind the junk
    command limit. Wrapped once per function and bound per connection: wrapping on every
    connection cost more than the binding. ``wraps`` keeps aiosmtpd's HELP text on it."""

    @functools.wraps(command)
    async def counted(self: RelaySMTP, arg: str | None) -> None:
        self.junk_commands += 1
        if self.junk_commands > self.deps.settings.smtp.max_junk_commands:
            self.hang_up(TOO_MANY_JUNK, f"{self.junk_commands} junk commands")
            return
        await command(self, arg)

    return counted
