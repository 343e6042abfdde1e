"""Readiness checks behind /readyz: is this relay able to take mail right now?

A worker is ready when it listens, runs the configured policy, has its model loaded (if
enabled) and reaches its downstream within a bound. The supervisor of several workers is
ready when every worker reported ready and the downstream answers. Each check is a name
and a bool, so the 503 body tells the operator which one failed. The downstream probe is
cached for PROBE_CACHE_SECONDS and shared by concurrent requests (``DownstreamProbe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.config import DeliverySettings, Settings
from relay.facts.services import Services
from relay.policy.holder import NOOP, DeciderHolder

if TYPE_CHECKING:
    from relay.classifier.serving import Classifier

DOWNSTREAM_TIMEOUT = 2.0  # seconds for the downstream's 220 greeting
# /readyz is unauthenticated: each request must not open a downstream connection. The probe's
# answer is reused for this long (probers poll every few seconds; 2 s keeps it current), and
# concurrent requests share the one probe in flight.
PROBE_CACHE_SECONDS = 2.0


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


class DownstreamProbe:
    """``downstream_reachable`` at most once per PROBE_CACHE_SECONDS, never twice at once."""

    def __init__(self, settings: DeliverySettings, ttl: float = PROBE_CACHE_SECONDS) -> None:
        self._settings = settings
        self._ttl = ttl
        self._answer: tuple[float, bool] | None = None  # (loop time probed, reachable)
        self._inflight: asyncio.Task[bool] | None = None

    async def __call__(self) -> bool:
        loop = asyncio.get_running_loop()
        if self._answer is not None and loop.time() - self._answer[0] < self._ttl:
            return self._answer[1]
        if self._inflight is None:
            self._inflight = loop.create_task(self._probe())
        # shield: a caller that times out (or disconnects) leaves the probe to the others.
        return await asyncio.shield(self._inflight)

    async def _probe(self) -> bool:
        try:
            ok = await downstream_reachable(self._settings)
            self._answer = (asyncio.get_running_loop().time(), ok)
            return ok
        finally:
            self._inflight = None


@dataclass
class RelayReadiness:
    """Readiness of one relay process; ``server`` and ``services`` are set as they come up."""

    settings: Settings
    policy: DeciderHolder
    server: asyncio.Server | None = None
    services: Services = field(default_factory=Services)
    downstream: DownstreamProbe = field(init=False)

    def __post_init__(self) -> None:
        self.downstream = DownstreamProbe(self.settings.delivery)

    async def __call__(self) -> dict[str, bool]:
        s = self.settings
        return {
            "listening": self.server is not None and self.server.is_serving(),
            "policy_loaded": s.policy.path is None or self.policy.current is not NOOP,
            "model_loaded": not s.model.enabled or describe_model(self.services) is not None,
            "downstream_reachable": await self.downstream(),
        }


@dataclass
class SupervisorReadiness:
    """Readiness of the supervisor of several workers."""

    settings: Settings
    workers_ready: Callable[[], bool]
    downstream: DownstreamProbe = field(init=False)

    def __post_init__(self) -> None:
        self.downstream = DownstreamProbe(self.settings.delivery)

    async def __call__(self) -> dict[str, bool]:
        return {
            "workers_ready": self.workers_ready(),
            "downstream_reachable": await self.downstream(),
        }
