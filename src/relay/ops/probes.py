"""Readiness probes the supervisor of several workers needs too: the downstream probe
(cached and shared, ``SharedProbe``) and the supervisor's own readiness.

Apart from ``readiness.py`` so that the supervisor imports only this, the HTTP endpoint and
the metric files: never facts, policy, DKIM or the classifier client, which its workers
load (launch.py says why that matters: tens of MiB in a process that only supervises).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from relay.config import DeliverySettings, Settings
from relay.ops.faults import ErrorWatch
from relay.ops.http import Health

DOWNSTREAM_TIMEOUT = 2.0  # seconds for the downstream's 220 greeting
# /readyz is unauthenticated: each request must not open a downstream connection. The probe's
# answer is reused for this long (probers poll every few seconds; 2 s keeps it current), and
# concurrent requests share the one probe in flight.
PROBE_CACHE_SECONDS = 2.0

T = TypeVar("T")


async def downstream_reachable(settings: DeliverySettings) -> bool:
    """SMTP: the downstream greets with 220 within DOWNSTREAM_TIMEOUT (then QUIT). Maildir: the
    directory (or its parent, before first delivery) is writable."""
    if settings.mode == "maildir":
        path = settings.maildir if settings.maildir.exists() else settings.maildir.parent
        return os.access(path, os.W_OK)
    host, port = settings.downstream
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(DOWNSTREAM_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            greeting = await reader.readline()
            writer.write(b"QUIT\r\n")
            await writer.drain()
        return greeting.startswith(b"220")
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class SharedProbe(Generic[T]):
    """``probe()`` at most once per ``ttl`` seconds, never twice at once: concurrent
    callers share the one in flight, later ones get its answer until it is ``ttl`` old."""

    def __init__(self, probe: Callable[[], Awaitable[T]], ttl: float = PROBE_CACHE_SECONDS) -> None:
        self._probe_fn = probe
        self._ttl = ttl
        self._answer: tuple[float, T] | None = None  # (loop time probed, answer)
        self._inflight: asyncio.Task[T] | None = None

    async def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        if self._answer is not None and loop.time() - self._answer[0] < self._ttl:
            return self._answer[1]
        if self._inflight is None:
            self._inflight = loop.create_task(self._probe())
        # shield: a caller that times out (or disconnects) leaves the probe to the others.
        return await asyncio.shield(self._inflight)

    async def _probe(self) -> T:
        try:
            answer = await self._probe_fn()
            self._answer = (asyncio.get_running_loop().time(), answer)
            return answer
        finally:
            self._inflight = None


class DownstreamProbe(SharedProbe[bool]):
    """``downstream_reachable`` at most once per PROBE_CACHE_SECONDS, never twice at once."""

    def __init__(self, settings: DeliverySettings, ttl: float = PROBE_CACHE_SECONDS) -> None:
        super().__init__(lambda: downstream_reachable(settings), ttl)


@dataclass
class SupervisorReadiness:
    """Readiness of the supervisor of several workers."""

    settings: Settings
    workers_ready: Callable[[], bool]
    # (kind, fact) -> relay_fact_errors_total over the workers' files (blocking: a thread)
    fact_errors: Callable[[], Mapping[tuple[str, str], float]] | None = None
    downstream: DownstreamProbe = field(init=False)
    watch: ErrorWatch = field(init=False)
    totals: SharedProbe[Mapping[tuple[str, str], float]] = field(init=False)

    def __post_init__(self) -> None:
        self.downstream = DownstreamProbe(self.settings.delivery)
        self.watch = ErrorWatch(self.settings.metrics.degraded_for)
        # Reading every worker's file per request would let /readyz polling cost as much
        # as scraping: shared and cached like the downstream probe.
        self.totals = SharedProbe(self._read_totals)

    async def _read_totals(self) -> Mapping[tuple[str, str], float]:
        if self.fact_errors is None:
            return {}
        return await asyncio.to_thread(self.fact_errors)

    async def __call__(self) -> Health:
        checks = {
            "workers_ready": self.workers_ready(),
            "downstream_reachable": await self.downstream(),
        }
        return Health(checks, self.watch.update(await self.totals()))
