"""Event-loop lag measured from inside the loop (ops/looplag.py), and exported."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from relay.app import lifespan
from relay.ops.looplag import watching_loop_lag
from tests.support.relay import make_settings
from tests.test_metrics_app import get, sample


async def _until(predicate: object, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_blocking_call_on_the_loop_shows_as_lag() -> None:
    seen: list[float] = []
    async with watching_loop_lag(seen.append, every=0.05):
        await _until(lambda: len(seen) >= 2)
        # 0.3 s of blocking work on the loop: the sample due meanwhile fires that late.
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)
        await _until(lambda: any(lag >= 0.2 for lag in seen))
    count = len(seen)
    await asyncio.sleep(0.2)
    assert len(seen) == count  # stopped with the block
    assert all(lag >= 0.0 for lag in seen)


async def test_the_relay_exports_its_loop_lag(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"metrics": {"enabled": True, "listen": "127.0.0.1:0"}})
    async with lifespan(settings) as relay:
        assert relay.metrics is not None
        port = relay.metrics.port
        # Far longer than the sampling interval: the sample due meanwhile is >= 0.5 s late.
        asyncio.get_running_loop().call_soon(time.sleep, 0.6)

        async def lagged() -> bool:
            _, body = await get(port, "/metrics")
            text = body.decode()
            count = sample(text, "relay_event_loop_lag_seconds_count")
            return (
                count > 0 and sample(text, "relay_event_loop_lag_seconds_bucket", le="0.1") < count
            )

        for _ in range(100):
            if await lagged():
                break
            await asyncio.sleep(0.1)
        assert await lagged()  # one sample above 100 ms: the stall
