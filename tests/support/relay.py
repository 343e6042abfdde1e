"""Real parts for end-to-end tests: the relay in-process on a loopback port, and a real
aiosmtpd downstream ("sink") that can be told to misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.app import Runtime, lifespan
from relay.config import Settings, settings_from_mapping
from relay.contracts import Observer
from tests.support.ports import free_port as free_port  # re-exported
from tests.support.ports import free_ports as free_ports


async def wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = 15) -> None:
    """Wait until a `relay serve` process accepts connections on ``port``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        assert proc.poll() is None, "relay exited early"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise AssertionError("relay did not start listening")


def make_settings(tmp: Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Test settings: loopback, Maildir in tmp, no model/policy/metrics unless asked."""
    base: dict[str, dict[str, Any]] = {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "relay.test", "drain_timeout": 2},
        "relay": {"domains": ["example.org"], "networks": []},
        "delivery": {"mode": "maildir", "maildir": str(tmp / "maildir"), "timeout": 5},
        "model": {"enabled": False},
        "policy": {"path": ""},
        "metrics": {"enabled": False},
        "auth": {"enabled": False},
        "state": {"path": str(tmp / "state.sqlite3")},
        "quarantine": {"path": str(tmp / "quarantine")},
        "security": {"key_file": str(tmp / "relay.key")},
    }
    for section, values in (overrides or {}).items():
        base.setdefault(section, {}).update(values)
    return settings_from_mapping(base, "<test>")


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings, observer: Observer | None = None
) -> AsyncIterator[Runtime]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    try:
        async with lifespan(settings, sock=sock, observer=observer) as runtime:
            yield runtime
    finally:
        sock.close()  # only matters when start-up failed before the server took it


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass
class Sink:
    """Downstream behaviour: mode is one of accept, tempfail, reject, drop, hang."""

    mode: str = "accept"
    refuse: frozenset[str] = frozenset()
    defer: frozenset[str] = frozenset()
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    xforward: bool = False  # offer XFORWARD like a Postfix re-injection smtpd
    xforwards: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 No such user here"
        if address in self.defer:
            return "450 4.2.1 Mailbox busy"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.mode == "tempfail":
            return "451 4.3.0 Try later"
        if self.mode == "reject":
            return "554 5.6.0 Content refused downstream"
        if self.mode == "drop":
            assert server.transport is not None
            server.transport.close()
            return "421 closing"
        if self.mode == "hang":
            await asyncio.sleep(3600)
        self.messages.append(
            Received(
                envelope.mail_from or "", tuple(envelope.rcpt_tos), envelope.original_content or b""
            )
        )
        return "250 2.0.0 Ok: stored"


class _XforwardSMTP(SMTP):
    """aiosmtpd that offers XFORWARD and records what it was told."""

    async def smtp_EHLO(self, hostname: str) -> None:
        assert self.session is not None
        self.session.host_name = hostname
        self.session.extended_smtp = True
        self._set_rset_state()  # type: ignore[no-untyped-call]
        await self.push("250-sink.test")
        await self.push("250-XFORWARD NAME ADDR PROTO HELO")
        await self.push("250 8BITMIME")

    async def smtp_XFORWARD(self, arg: str) -> None:
        handler = self.event_handler
        assert isinstance(handler, Sink)
        handler.xforwards.append(arg)
        await self.push("250 Ok")


@contextlib.asynccontextmanager
async def sink_server(**kwargs: Any) -> AsyncIterator[Sink]:
    sink = Sink(**kwargs)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        sink.connections += 1
        cls = _XforwardSMTP if sink.xforward else SMTP
        return cls(sink, decode_data=False, hostname="sink.test")

    server = await loop.create_server(factory, "127.0.0.1", 0)
    sink.port = int(server.sockets[0].getsockname()[1])
    try:
        yield sink
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)


def simple_message(
    subject: str = "hello", body: str = "Just a test.\r\n", sender: str = "alice@sender.test"
) -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash(subject))}@sender.test>\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"\r\n{body}"
    ).encode()


async def send(
    port: int, rcpts: list[str], data: bytes, sender: str = "alice@sender.test"
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """Send one message with aiosmtplib; raises on refusal like a real client would."""
    return await aiosmtplib.send(
        data, sender=sender, recipients=rcpts, hostname="127.0.0.1", port=port, timeout=10
    )


class RawClient:
    """A line-level SMTP client for protocol tests (smuggling, long lines, timeouts)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        await client.reply()  # greeting
        return client

    async def reply(self, timeout: float = 10) -> str:
        """One whole (possibly multi-line) reply; returns its last line."""
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            if not line:
                return ""
            if len(line) < 4 or line[3] != "-":
                return line.rstrip("\r\n")

    async def cmd(self, line: str | bytes, timeout: float = 10) -> str:
        data = line if isinstance(line, bytes) else line.encode() + b"\r\n"
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply(timeout)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
