"""A log limiter: at most one line per key every so many seconds, counting the rest.

An outage (Redis gone, DNS down) fails every message the same way; at 500 msgs/s one
line per message would bury the log and cost CPU. Callers ask ``allow(key)`` before
logging and add the held-back count to the line they write. The clock is injected so
tests check the limiting without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

LOG_EVERY = 60.0  # seconds between two log lines of one key

Clock = Callable[[], float]


class LogLimiter:
    """At most one event per key every ``every`` seconds; counts the ones held back.

    Keys must come from a bounded set (fact and failure kind, record kind), so the table
    stays small."""

    def __init__(self, every: float = LOG_EVERY, clock: Clock = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        """None: hold this one back. Otherwise log now; the value is how many events of
        ``key`` were held back since its last line."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
