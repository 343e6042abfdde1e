"""Event-loop lag of a server seen from outside: NOOP round trips while it is under load.

The same for every server (Rspamd, the pass-through), beside the relay's own figure from
inside its loop (``relay_event_loop_lag_seconds``, bench/loopmetric.py). A NOOP costs the
server almost nothing, so the time from sending it to
reading its 250 is, beyond a loopback round trip of a few microseconds, the time the
server's event loop took to come round to that connection: its lag, plus the time the
operating system kept the process off a core (on a 2-core machine shared with the load
generator, that is part of what a client feels). A few connections stay open for the whole
phase, each sending a NOOP at a fixed interval; with several worker processes the kernel
spreads them over the workers, so the figure covers more than one loop. Each connection
reconnects before the server's junk-command limit (100 NOOPs a session) would close it.

For Rspamd the same probe is ``GET /ping`` over HTTP (its workers are event loops too).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

NOOPS_PER_SESSION = 80  # below the relay's default max_junk_commands (100)
PROBE_TIMEOUT = 30.0


@dataclass
class LagProbe:
    """Round trips (seconds) of probes sent every ``interval`` on ``connections`` lanes."""

    port: int
    connections: int = 4
    interval: float = 0.2
    kind: str = "smtp"  # "smtp": NOOP on an SMTP session; "http": GET /ping
    samples: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    async def run(self, stop: asyncio.Event) -> None:
        lane: Callable[[int, asyncio.Event], Awaitable[None]] = (
            self._smtp_lane if self.kind == "smtp" else self._http_lane
        )
        await asyncio.gather(*(lane(i, stop) for i in range(self.connections)))

    async def _wait(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped first; True when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    async def _smtp_lane(self, index: int, stop: asyncio.Event) -> None:
        # Lanes start staggered so their probes do not arrive together.
        if await self._wait(stop, self.interval * index / max(1, self.connections)):
            return
        while not stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), PROBE_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                self.failures[f"connect {type(exc).__name__}"] += 1
                if await self._wait(stop, self.interval):
                    return
                continue
            try:
                await _smtp_reply(reader)
                writer.write(b"EHLO probe.bench.test\r\n")
                await _smtp_reply(reader)
                for _ in range(NOOPS_PER_SESSION):
                    if await self._wait(stop, self.interval):
                        break
                    start = time.perf_counter()
                    writer.write(b"NOOP\r\n")
                    code = await _smtp_reply(reader)
                    if code != 250:
                        self.failures[f"NOOP {code}"] += 1
                        break
                    self.samples.append(time.perf_counter() - start)
                writer.write(b"QUIT\r\n")
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.failures[type(exc).__name__] += 1
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _http_lane(self, index: int, stop: asyncio.Event) -> None:
        from bench.rspamd import HttpConnection, HttpError

        if await self._wait(stop, self.interval * index / max(1, self.connections)):
            return
        conn = HttpConnection(self.port)
        try:
            while not await self._wait(stop, self.interval):
                start = time.perf_counter()
                try:
                    reply = await conn.request("GET", "/ping", limit=PROBE_TIMEOUT)
                except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError) as exc:
                    self.failures[type(exc).__name__] += 1
                    continue
                if reply.status != 200:
                    self.failures[f"HTTP {reply.status}"] += 1
                    continue
                self.samples.append(time.perf_counter() - start)
        finally:
            await conn.close()

    def summary(self) -> dict[str, object]:
        ms = sorted(s * 1000 for s in self.samples)
        return {
            "probe": "SMTP NOOP round trip" if self.kind == "smtp" else "HTTP GET /ping",
            "samples": len(ms),
            "p50_ms": round(percentile(ms, 0.50), 2),
            "p99_ms": round(percentile(ms, 0.99), 2),
            "max_ms": round(ms[-1], 2) if ms else None,
            "failures": dict(self.failures),
        }


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _smtp_reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT)
        if len(line) < 4:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])
