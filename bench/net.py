"""Loopback helpers: free ports and waiting for a server's SMTP greeting."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import time
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A free loopback port outside the ephemeral range. A port the kernel hands out
    (bind to 0) can be taken again as the local end of an outgoing connection before the
    server binds it: the benches open tens of thousands of connections. (Suspected cause
    of two runs in which a relay refused every connection; not reproduced since.)"""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65000) if not low <= p <= high]
    for port in random.sample(candidates, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried was taken: fall back to the kernel
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerDied(RuntimeError):
    pass


async def wait_for_greeting(port: int, proc: subprocess.Popen[bytes] | None, within: float) -> None:
    """Until a connection to 127.0.0.1:port gets a 220 greeting (or the process exits)."""
    deadline = time.monotonic() + within
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerDied(f"exited with status {proc.returncode} before listening")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.1)
            continue
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(reader.readline(), 2.0)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if line.startswith(b"220"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"127.0.0.1:{port} greeted with {line[:60]!r}")
        await asyncio.sleep(0.1)
