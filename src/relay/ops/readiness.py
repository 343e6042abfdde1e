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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from relay.config import Settings
from relay.errors import StateError
from relay.facts.base import FailureKind
from relay.facts.services import Services
from relay.ops.faults import FactFaults
from relay.ops.http import Health
from relay.ops.probes import (
    DownstreamProbe,
    SharedProbe,
)
from relay.policy.holder import NOOP, DeciderHolder
from relay.state import StateStore

if TYPE_CHECKING:
    from relay.classifier.serving import Classifier

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
