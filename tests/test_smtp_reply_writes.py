"""A multi-line reply goes out in one write (relay/smtp/server.py ``RelaySMTP.push``):
EHLO's lines were one send() each, about a fifth of a worker's socket writes. The client
still reads every line, and the reply counter counts replies, not lines."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.contracts import NullObserver
from tests.support.relay import make_settings, running_relay


class Replies(NullObserver):
    def __init__(self) -> None:
        self.codes: list[int] = []

    def smtp_reply(self, code: int) -> None:
        self.codes.append(code)


async def test_ehlo_lines_leave_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real = asyncio.StreamWriter.write

    def recorded(self: asyncio.StreamWriter, data: Any) -> None:
        writes.append(bytes(data))
        real(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", recorded)
    observer = Replies()
    async with running_relay(make_settings(tmp_path), observer) as relay:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, timeout=5)
        await client.connect()
        writes.clear()
        observer.codes.clear()
        reply = await client.ehlo(hostname="client.example")
        extensions = set(client.esmtp_extensions)
        await client.quit()
    assert reply.code == 250
    assert {"size", "8bitmime", "smtputf8"} <= extensions
    ehlo = [w for w in writes if w.startswith(b"250")]
    assert len(ehlo) == 1, ehlo  # one write, every line in it
    lines = ehlo[0].split(b"\r\n")
    assert lines[-1] == b"" and lines[0] == b"250-relay.test"
    assert all(line.startswith(b"250-") for line in lines[:-2])
    assert lines[-2].startswith(b"250 ")
    assert observer.codes == [250, 221]  # EHLO is one reply; QUIT's 221 the other
