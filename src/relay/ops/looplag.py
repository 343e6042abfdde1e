"""Event-loop lag, measured from inside the loop: a timer due every ``every`` seconds
records how late it fired.

Everything a relay process does runs on one loop, so CPU work or a blocking call there
delays every session it holds: the lateness of a timer is that delay, seen from the loop
itself (an SMTP NOOP round trip measures it from outside, plus the network). Sampling
four times a second costs nothing measurable and catches any stall longer than the
interval; shorter ones show up statistically.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

EVERY = 0.25  # seconds between samples


@contextlib.asynccontextmanager
async def background(work: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Runs ``work()`` as a task while the block is open, cancelled on exit (the metrics'
    periodic flushes and registry reads use it too)."""
    task = asyncio.get_running_loop().create_task(work())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def watching_loop_lag(
    observe: Callable[[float], None], every: float = EVERY
) -> contextlib.AbstractAsyncContextManager[None]:
    """Calls ``observe(seconds late)`` after each sample while the block is open."""

    async def sample() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + every
            await asyncio.sleep(every)
            observe(max(0.0, loop.time() - due))

    return background(sample)
