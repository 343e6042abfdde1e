"""A small asyncio SMTP load client that times every message.

smtp-source reports only how long the whole run took; this client records each message's
latency (connect or MAIL FROM .. the 250 after the final dot) and every error by kind.
It speaks plain SMTP without pipelining, like smtp-source, and sends the same bytes.

Two session shapes:
- ``reuse=False``: one connection per message (greeting, EHLO, MAIL, RCPT, DATA, QUIT),
  latency measured from connect;
- ``reuse=True``: every session connects first and all stay open together (so
  ``peak_open`` proves the server held that many), then each sends its share of messages
  over its one connection; latency measured from MAIL FROM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass

REPLY_TIMEOUT = 60.0


class SmtpReplyError(Exception):
    def __init__(self, stage: str, code: int) -> None:
        super().__init__(f"{stage} {code}")
        self.key = f"{stage} {code}"


def data_payload(message: bytes) -> bytes:
    """The DATA payload: CRLF lines, dot-stuffed, with the terminating dot line."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


@dataclass(frozen=True, slots=True)
class LoadResult:
    messages: int
    sessions: int
    reuse: bool
    ok: int
    errors: dict[str, int]
    elapsed: float
    latencies: tuple[float, ...]
    peak_open: int

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def msgs_per_s(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> int:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if len(line) < 4:
                raise ConnectionError("connection closed")
            if line[3:4] != b"-":
                return int(line[:3])

    async def command(self, data: bytes, stage: str, expect: int) -> None:
        self.writer.write(data)
        code = await self.reply()
        if code != expect:
            raise SmtpReplyError(stage, code)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class _Load:
    def __init__(self, port: int, payload: bytes, sender: str, rcpt: str, helo: str) -> None:
        self.port = port
        self.payload = payload
        self.mail = f"MAIL FROM:<{sender}>\r\n".encode()
        self.rcpt = f"RCPT TO:<{rcpt}>\r\n".encode()
        self.ehlo = f"EHLO {helo}\r\n".encode()
        self.remaining = 0
        self.open = 0
        self.peak_open = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def take(self) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    async def connect(self) -> _Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), REPLY_TIMEOUT
        )
        conn = _Connection(reader, writer)
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            code = await conn.reply()
            if code != 220:
                raise SmtpReplyError("greeting", code)
            await conn.command(self.ehlo, "EHLO", 250)
        except BaseException:
            await self.disconnect(conn)
            raise
        return conn

    async def disconnect(self, conn: _Connection) -> None:
        self.open -= 1
        await conn.close()

    async def transaction(self, conn: _Connection) -> None:
        await conn.command(self.mail, "MAIL", 250)
        await conn.command(self.rcpt, "RCPT", 250)
        await conn.command(b"DATA\r\n", "DATA", 354)
        await conn.command(self.payload, "end-of-data", 250)

    def failed(self, exc: BaseException) -> None:
        key = exc.key if isinstance(exc, SmtpReplyError) else type(exc).__name__
        self.errors[key] += 1

    async def one_shot_session(self) -> None:
        while self.take():
            start = time.perf_counter()
            try:
                conn = await self.connect()
            except (OSError, TimeoutError, SmtpReplyError) as exc:
                self.failed(exc)
                continue
            try:
                await self.transaction(conn)
                self.latencies.append(time.perf_counter() - start)
                with contextlib.suppress(OSError, TimeoutError, SmtpReplyError):
                    await conn.command(b"QUIT\r\n", "QUIT", 221)
            except (OSError, TimeoutError, SmtpReplyError) as exc:
                self.failed(exc)
            finally:
                await self.disconnect(conn)

    async def reused_session(self, conn: _Connection | None, start_gate: asyncio.Event) -> None:
        await start_gate.wait()
        while self.take():
            try:
                if conn is None:
                    conn = await self.connect()
                start = time.perf_counter()
                await self.transaction(conn)
                self.latencies.append(time.perf_counter() - start)
            except (OSError, TimeoutError, SmtpReplyError) as exc:
                self.failed(exc)
                if conn is not None:
                    await self.disconnect(conn)
                    conn = None
        if conn is not None:
            with contextlib.suppress(OSError, TimeoutError, SmtpReplyError):
                await conn.command(b"QUIT\r\n", "QUIT", 221)
            await self.disconnect(conn)


async def drive(
    port: int,
    message: bytes,
    *,
    messages: int,
    sessions: int,
    reuse: bool,
    sender: str = "from@bench.test",
    rcpt: str = "to@example.org",
    helo: str = "mail.bench.test",
) -> LoadResult:
    """Send ``messages`` copies of ``message`` over ``sessions`` concurrent sessions."""
    load = _Load(port, data_payload(message), sender, rcpt, helo)
    load.remaining = messages
    start = time.perf_counter()
    if reuse:
        opened = await asyncio.gather(
            *(load.connect() for _ in range(sessions)), return_exceptions=True
        )
        conns: list[_Connection | None] = []
        for item in opened:
            if isinstance(item, BaseException):
                if not isinstance(item, OSError | TimeoutError | SmtpReplyError):
                    raise item
                load.failed(item)
                conns.append(None)
            else:
                conns.append(item)
        gate = asyncio.Event()
        start = time.perf_counter()  # throughput counts from when every session is open
        tasks = [asyncio.create_task(load.reused_session(c, gate)) for c in conns]
        gate.set()
        await asyncio.gather(*tasks)
    else:
        await asyncio.gather(*(load.one_shot_session() for _ in range(sessions)))
    elapsed = time.perf_counter() - start
    return LoadResult(
        messages=messages,
        sessions=sessions,
        reuse=reuse,
        ok=len(load.latencies),
        errors=dict(load.errors),
        elapsed=elapsed,
        latencies=tuple(load.latencies),
        peak_open=load.peak_open,
    )
