"""When to try again after a child could not start: a child that never says it is ready
(a broken model file, a missing library) would otherwise be started again for every
message, each start costing the model's load. A child that ran and then exited (the OOM
killer, a crash on one input, killed for an overrun) is replaced at once instead: the
pool does that itself (proc/pipes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds before the next try after the n-th failed start in a row.
DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass
class Restarts:
    """The failed starts in a row of one pool and when the next try may be."""

    delays: tuple[float, ...] = DELAYS
    failures: int = 0
    not_before: float = 0.0  # loop time of the next allowed start

    def failed(self, now: float) -> float:
        """A start failed at ``now``; the pause before the next try."""
        self.failures += 1
        delay = self.delays[min(self.failures, len(self.delays)) - 1]
        self.not_before = now + delay
        return delay

    def started(self) -> None:
        """A child said it is ready: the row of failures is over."""
        self.failures = 0
        self.not_before = 0.0

    def wait(self, now: float) -> float:
        """Seconds until a start is allowed (0: now)."""
        return max(0.0, self.not_before - now)
