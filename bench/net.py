"""Loopback helpers: free ports and waiting for a server's SMTP greeting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
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
