"""Readiness checks behind /readyz: is this relay able to take mail right now?

A worker is ready when it listens, runs the configured policy, has its model loaded (if
enabled) and reaches its downstream within a bound. The supervisor of several workers is
ready when every worker reported ready and the downstream answers. Each check is a name
and a bool, so the 503 body tells the operator which one failed. The downstream probe is
cached for PROBE_CACHE_SECONDS and shared by concurrent requests (``DownstreamProbe``).

Beside the checks, the answer says what is *degraded* (``http.Health``): facts that failed
within ``[metrics] degraded_for`` seconds (ops/faults.py), by kind. Mail flows meanwhile, so
it stays a 200 (http.py says why). A state failure ends early when the state store answers
a probe (PING / SELECT 1) that started after it, so Redis coming back clears it at the next
/readyz. The supervisor of several workers sees the workers' counters only: its degraded
answer is their growth within the same quiet time (``faults.ErrorWatch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from relay.config import DeliverySettings, Settings
from relay.errors import StateError
from relay.facts.base import FailureKind
from relay.facts.services import Services
from relay.ops.faults import ErrorWatch, FactFaults
from relay.ops.http import Health
from relay.policy.holder import NOOP, DeciderHolder
from relay.state import StateStore

if TYPE_CHECKING:
    from relay.classifier.serving import Classifier

DOWNSTREAM_TIMEOUT = 2.0  # seconds for the downstream's 220 greeting
# /readyz is unauthenticated: each request must not open a downstream connection. The probe's
# answer is reused for this long (probers poll every few seconds; 2 s keeps it current), and
# concurrent requests share the one probe in flight.
PROBE_CACHE_SECONDS = 2.0
STATE_PROBE_TIMEOUT = 1.0  # seconds for the state store's PING while degraded

T = TypeVar("T")


def describe_model(services: Services) -> dict[str, str] | None:
    """The loaded classifier's version and training date (``Classifier.info``); None
    without a classifier."""
    if services.classifier is None:
        return None
    return describe_classifier(services.classifier)


def describe_classifier(classifier: Classifier) -> dict[str, str]:
    info = classifier.info
    return {"version": info.version, "trained_at": info.trained_at}


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


async def state_answers(state: StateStore) -> bool:
    """The state store answers a PING (Redis) or a query (SQLite) within the bound."""
    try:
        async with asyncio.timeout(STATE_PROBE_TIMEOUT):
            await state.ping()
    except (StateError, TimeoutError):
        return False
    return True


@dataclass
class RelayReadiness:
    """Readiness of one relay process; ``server`` and ``services`` are set as they come up."""

    settings: Settings
    policy: DeciderHolder
    server: asyncio.Server | None = None
    services: Services = field(default_factory=Services)
    faults: FactFaults | None = None  # fact failures of this process (degraded)
    downstream: DownstreamProbe = field(init=False)
    state_probe: SharedProbe[tuple[float, bool]] = field(init=False)

    def __post_init__(self) -> None:
        self.downstream = DownstreamProbe(self.settings.delivery)
        self.state_probe = SharedProbe(self._probe_state)

    async def __call__(self) -> Health:
        s = self.settings
        checks = {
            "listening": self.server is not None and self.server.is_serving(),
            "policy_loaded": s.policy.path is None or self.policy.current is not NOOP,
            "model_loaded": not s.model.enabled or describe_model(self.services) is not None,
            "downstream_reachable": await self.downstream(),
        }
        return Health(checks, await self.degraded())

    async def degraded(self) -> dict[str, list[str]]:
        """kind -> failing facts; a state failure is over once the store answers a probe
        that started after it."""
        if self.faults is None:
            return {}
        found = self.faults.degraded()
        if FailureKind.STATE.value in found and self.services.state is not None:
            started, ok = await self.state_probe()
            if ok:
                self.faults.clear(FailureKind.STATE, before=started)
                found = self.faults.degraded()
        return found

    async def _probe_state(self) -> tuple[float, bool]:
        assert self.faults is not None and self.services.state is not None
        started = self.faults.now()
        return started, await state_answers(self.services.state)


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
