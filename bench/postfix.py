"""Postfix's smtp-sink (the downstream) and smtp-source (the load generator).

Both are C programs that cost little CPU, so they measure the server between them rather
than themselves. smtp-sink -c prints running counters ("sess=N quit=N mesg=N", separated
by CR) to stdout; we send them to a file and read the last one to count what arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.net import free_port, wait_for_greeting

_COUNTER = re.compile(rb"mesg=(\d+)")


def find_tool(name: str) -> str | None:
    """smtp-sink / smtp-source live in /usr/sbin on Debian, which is not always on PATH."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/lib/postfix", "/usr/libexec/postfix"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class SmtpSink:
    """smtp-sink on a free loopback port, counting every message it accepts."""

    def __init__(self, workdir: Path, max_connections: int = 4000) -> None:
        binary = find_tool("smtp-sink")
        if binary is None:
            raise FileNotFoundError("smtp-sink not found (Debian package postfix)")
        self.port = free_port()
        self.counter_file = workdir / "smtp-sink.counters"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        argv = [binary, "-c", "-m", str(max_connections), *user]
        argv += [f"127.0.0.1:{self.port}", "4096"]
        with self.counter_file.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ready(self) -> None:
        await wait_for_greeting(self.port, self.proc, within=10)

    def delivered(self) -> int:
        """Messages accepted so far (the last counter line smtp-sink printed)."""
        with self.counter_file.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 400))
            tail = fh.read()
        found = _COUNTER.findall(tail)
        return int(found[-1]) if found else 0

    async def wait_delivered(self, at_least: int, within: float = 2.0) -> int:
        """The counter, once it reached at_least (it is flushed a moment after the reply)."""
        deadline = time.monotonic() + within
        count = self.delivered()
        while count < at_least and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            count = self.delivered()
        return count

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True, slots=True)
class SourceRun:
    messages: int
    sessions: int
    elapsed: float
    returncode: int
    stderr: str


async def smtp_source(
    port: int, message_file: Path, *, messages: int, sessions: int, within: float = 600
) -> SourceRun:
    """One smtp-source run: a new connection per message, ``sessions`` in parallel."""
    binary = find_tool("smtp-source")
    if binary is None:
        raise FileNotFoundError("smtp-source not found (Debian package postfix)")
    argv = [binary, "-s", str(sessions), "-m", str(messages), "-F", str(message_file)]
    argv += ["-M", "mail.bench.test", "-f", "from@bench.test", "-t", "to@example.org"]
    argv += [f"127.0.0.1:{port}"]
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        return SourceRun(messages, sessions, time.perf_counter() - start, -9, "timed out")
    elapsed = time.perf_counter() - start
    text = err.decode(errors="replace").strip()
    return SourceRun(messages, sessions, elapsed, proc.returncode or 0, text[-500:])
