"""Byte-exact SMTP on both sides of the relay, for the conformance tests.

- ``WireClient``: a raw client over an asyncio stream. It writes exactly the bytes it is
  given (pipelined or not) and reads whole, possibly multi-line, replies.
- ``WireDownstream``: a tiny ESMTP server that records every command line and every DATA
  byte exactly as it arrived, per connection, so tests can assert on the wire (the MAIL
  FROM path bytes, the SMTPUTF8 parameter, bare CR/LF or NUL in DATA) and on connection
  hygiene (no downstream transaction left open, no leaked connections). It advertises
  SMTPUTF8 or not, and can refuse chosen recipients with 550.

The downstream is strict where it matters for the assertions: a command ends at CRLF only
(so a bare CR or LF inside a command line is recorded as part of it) and DATA ends at
<CRLF>.<CRLF> only (so a lookalike in the relayed bytes stays visible in ``wire_data``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field

# --- client --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireReply:
    """One SMTP reply: its code and its text lines (without code and separator)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def last(self) -> str:
        """The last line as on the wire, e.g. ``550 5.1.1 No such user``."""
        return f"{self.code} {self.lines[-1]}".rstrip() if self.lines else str(self.code)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code the reply text starts with, if any."""
        m = re.match(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)", self.lines[-1] if self.lines else "")
        if m is None or m.group(1) != str(self.code)[0]:
            return None
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {line}" for line in self.lines)


class ConnectionClosed(AssertionError):
    """The peer closed the connection where a reply was expected."""


class WireClient:
    """A raw SMTP client: exact bytes out, whole replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: WireReply | None = None

    @classmethod
    async def connect(cls, port: int, timeout: float = 10) -> WireClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        client = cls(reader, writer)
        client.greeting = await client.reply(timeout)
        return client

    async def reply(self, timeout: float = 10) -> WireReply:
        """Read one whole reply; raises ConnectionClosed at EOF."""
        code: int | None = None
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionClosed(f"connection closed; partial reply {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit():
                raise AssertionError(f"not an SMTP reply line: {raw!r}")
            code = int(line[:3])
            lines.append(line[4:])
            if len(line) == 3 or line[3] != "-":
                return WireReply(code, tuple(lines))

    async def replies(self, n: int, timeout: float = 10) -> list[WireReply]:
        return [await self.reply(timeout) for _ in range(n)]

    async def replies_until_eof(self, timeout: float = 10) -> list[WireReply]:
        """Every reply until the server closes the connection (e.g. after QUIT)."""
        out: list[WireReply] = []
        while True:
            try:
                out.append(await self.reply(timeout))
            except ConnectionClosed:
                return out

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes, timeout: float = 10) -> WireReply:
        """Send one command line (CRLF is appended) and read its reply."""
        data = line if isinstance(line, bytes) else line.encode()
        return await self.exchange(data + b"\r\n", timeout)

    async def exchange(self, data: bytes, timeout: float = 10) -> WireReply:
        """Write ``data`` exactly as given (e.g. a message body with its end-of-data) and
        read one reply."""
        await self.write(data)
        return await self.reply(timeout)

    async def ehlo(self, name: str = "client.test") -> WireReply:
        reply = await self.cmd(f"EHLO {name}")
        assert reply.code == 250, f"EHLO refused: {reply}"
        return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# --- downstream ----------------------------------------------------------------------------


def path_of(line: bytes) -> bytes | None:
    """The bytes between the angle brackets of ``MAIL FROM:<...>`` / ``RCPT TO:<...>``,
    honouring quoted strings; None when there is no complete path."""
    start = line.find(b"<")
    if start < 0:
        return None
    quoted = escaped = False
    for i in range(start + 1, len(line)):
        ch = line[i : i + 1]
        if escaped:
            escaped = False
        elif ch == b"\\" and quoted:
            escaped = True
        elif ch == b'"':
            quoted = not quoted
        elif ch == b">" and not quoted:
            return line[start + 1 : i]
    return None


def params_of(line: bytes) -> list[bytes]:
    """The ESMTP parameters after the path, upper-cased keywords with their values."""
    path = path_of(line)
    if path is None:
        return []
    rest = line[line.find(b"<") + len(path) + 2 :]
    out = []
    for token in rest.split():
        key, eq, value = token.partition(b"=")
        out.append(key.upper() + eq + value)
    return out


def unstuff(wire: bytes) -> bytes:
    """RFC 5321 4.5.2: drop the leading dot of each CRLF-delimited line."""
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@dataclass
class WireTransaction:
    """One MAIL transaction as the downstream saw it."""

    mail: bytes  # the MAIL command line, exactly, without its CRLF
    rcpts: list[bytes] = field(default_factory=list)  # accepted RCPT lines
    refused: list[bytes] = field(default_factory=list)  # RCPT lines answered 550
    wire_data: bytes | None = None  # DATA bytes as received (dot-stuffed), final CRLF kept
    reset: bool = False  # ended by RSET (or QUIT) before DATA completed

    @property
    def mail_path(self) -> bytes | None:
        return path_of(self.mail)

    @property
    def mail_params(self) -> list[bytes]:
        return params_of(self.mail)

    @property
    def rcpt_paths(self) -> list[bytes | None]:
        return [path_of(line) for line in self.rcpts]

    @property
    def data(self) -> bytes | None:
        """The message content: ``wire_data`` dot-unstuffed."""
        return None if self.wire_data is None else unstuff(self.wire_data)

    @property
    def open(self) -> bool:
        """MAIL given, and neither a completed DATA nor RSET/QUIT since."""
        return self.wire_data is None and not self.reset


@dataclass
class WireConnection:
    lines: list[bytes] = field(default_factory=list)  # every command line, exactly
    transactions: list[WireTransaction] = field(default_factory=list)
    closed: bool = False

    @property
    def current(self) -> WireTransaction | None:
        if self.transactions and self.transactions[-1].open:
            return self.transactions[-1]
        return None

    @property
    def in_transaction(self) -> bool:
        return self.current is not None


class WireDownstream:
    """A recording ESMTP server on loopback (see the module docstring)."""

    def __init__(
        self,
        *,
        smtputf8: bool = True,
        refuse: Collection[bytes] = (),
        hostname: str = "sink.test",
    ) -> None:
        self.smtputf8 = smtputf8
        self.refuse = frozenset(refuse)  # RCPT paths (bytes between < >) answered 550
        self.hostname = hostname
        self.connections: list[WireConnection] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- views for assertions --------------------------------------------------------

    @property
    def transactions(self) -> list[WireTransaction]:
        return [t for c in self.connections for t in c.transactions]

    @property
    def messages(self) -> list[WireTransaction]:
        """Transactions whose DATA completed (what was delivered)."""
        return [t for t in self.transactions if t.wire_data is not None]

    @property
    def mail_lines(self) -> list[bytes]:
        return [t.mail for t in self.transactions]

    @property
    def all_lines(self) -> list[bytes]:
        return [line for c in self.connections for line in c.lines]

    @property
    def open_connections(self) -> list[WireConnection]:
        return [c for c in self.connections if not c.closed]

    @property
    def open_transactions(self) -> list[WireTransaction]:
        return [t for c in self.connections if not c.closed for t in c.transactions if t.open]

    def describe(self) -> str:
        out = []
        for i, c in enumerate(self.connections):
            state = "closed" if c.closed else ("IN TRANSACTION" if c.in_transaction else "idle")
            out.append(f"conn {i} [{state}]: {c.lines!r}")
        return "\n".join(out) or "(no downstream connections)"

    async def wait_until(
        self, predicate: Callable[[], bool], what: str, timeout: float = 5.0
    ) -> None:
        """Wait (event driven, no polling) until ``predicate`` holds; fail after timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except TimeoutError:
                raise AssertionError(
                    f"downstream never reached: {what}\n{self.describe()}"
                ) from None

    async def settled(self, max_idle: int, timeout: float = 5.0) -> None:
        """No downstream transaction is left open and at most ``max_idle`` (the relay's pool
        size) connections remain open: every session's downstream work was finished by
        DATA, RSET or closing the connection."""
        await self.wait_until(
            lambda: not self.open_transactions and len(self.open_connections) <= max_idle,
            f"no open transaction and at most {max_idle} open connection(s)",
            timeout,
        )

    async def all_closed(self, timeout: float = 5.0) -> None:
        await self.wait_until(lambda: not self.open_connections, "every connection closed", timeout)

    # --- server ------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and cut every connection still open (a leaked one included) by
        aborting its transport, so each handler ends by itself (no task cancellation)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in list(self._tasks):  # last resort only
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = WireConnection()
        self.connections.append(conn)
        try:
            await self._notify()
            await self._dialogue(conn, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            conn.closed = True  # a transaction cut off by closing is not left open
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._tasks.discard(task)
            await self._notify()

    async def _dialogue(
        self, conn: WireConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def say(*lines: str) -> None:
            for i, text in enumerate(lines):
                sep = " " if i == len(lines) - 1 else "-"
                writer.write(f"{text[:3]}{sep}{text[4:]}\r\n".encode())
            await writer.drain()

        await say(f"220 {self.hostname} ESMTP recorder")
        while True:
            raw = await reader.readuntil(b"\r\n")
            line = raw[:-2]
            conn.lines.append(line)
            verb = line.split(b" ", 1)[0].upper()
            txn = conn.current
            if verb in (b"EHLO", b"HELO"):
                if txn is not None:
                    txn.reset = True
                ext = ["250-PIPELINING", "250-8BITMIME", "250-ENHANCEDSTATUSCODES"]
                if self.smtputf8:
                    ext.append("250-SMTPUTF8")
                await say(f"250-{self.hostname}", *ext, "250 SIZE 52428800")
            elif verb == b"MAIL":
                if txn is not None:
                    await say("503 5.5.1 Error: nested MAIL command")
                elif not line.isascii() and not self.smtputf8:
                    await say("500 5.5.2 Error: 8-bit command without SMTPUTF8")
                elif path_of(line) is None:
                    await say("501 5.5.4 Syntax: MAIL FROM:<address>")
                else:
                    conn.transactions.append(WireTransaction(mail=line))
                    await say("250 2.1.0 Ok")
            elif verb == b"RCPT":
                path = path_of(line)
                if txn is None:
                    await say("503 5.5.1 Error: need MAIL command")
                elif not line.isascii() and not self.smtputf8:
                    await say("500 5.5.2 Error: 8-bit command without SMTPUTF8")
                elif path is None:
                    await say("501 5.5.4 Syntax: RCPT TO:<address>")
                elif path in self.refuse:
                    txn.refused.append(line)
                    await say("550 5.1.1 <recorder> Recipient address rejected: no such user")
                else:
                    txn.rcpts.append(line)
                    await say("250 2.1.5 Ok")
            elif verb == b"DATA":
                if txn is None or not txn.rcpts:
                    await say("503 5.5.1 Error: need RCPT command")
                    continue
                await say("354 End data with <CR><LF>.<CR><LF>")
                chunks: list[bytes] = []
                while True:
                    # Lines end at CRLF only: a bare CR or LF stays inside a "line", and
                    # only a line that is exactly ".\r\n" (after CRLF) ends the data.
                    piece = await reader.readuntil(b"\r\n")
                    if piece == b".\r\n":
                        break
                    chunks.append(piece)
                txn.wire_data = b"".join(chunks)
                await say("250 2.0.0 Ok: stored by recorder")
            elif verb == b"RSET":
                if txn is not None:
                    txn.reset = True
                await say("250 2.0.0 Ok")
            elif verb == b"NOOP":
                await say("250 2.0.0 Ok")
            elif verb == b"QUIT":
                if txn is not None:
                    txn.reset = True
                await say("221 2.0.0 Bye")
                return
            else:
                await say("502 5.5.2 Error: command not recognized")
            await self._notify()


@contextlib.asynccontextmanager
async def wire_downstream(
    *, smtputf8: bool = True, refuse: Collection[bytes] = ()
) -> AsyncIterator[WireDownstream]:
    down = WireDownstream(smtputf8=smtputf8, refuse=refuse)
    await down.start()
    try:
        yield down
    finally:
        await down.stop()
