"""auth/batch.py: calls wait for the running batch and leave together; each keeps its
own result or error; a cancelled call is not run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest

from relay.auth.batch import MAX_BATCH, Batcher


class CountingPool(ThreadPoolExecutor):
    """A one-thread pool that notes how many calls each hand-over carried."""

    def __init__(self) -> None:
        super().__init__(1)
        self.handovers: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.handovers.append(len(args[0]))
        return super().submit(fn, *args, **kwargs)


class Recorder:
    """Calls that record which worker-side batch ran them; the first one blocks until
    released, so every later call queues behind it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[list[int]] = []
        self.ran: list[int] = []

    def call(self, n: int) -> int:
        if n == 0:
            self.gate.wait(5)
        if n == 13:
            raise ValueError("thirteen")
        self.ran.append(n)
        return n * 10


async def test_waiting_calls_leave_together_with_their_own_results() -> None:
    rec = Recorder()
    with CountingPool() as pool:
        batcher: Batcher[int] = Batcher(pool)
        first = asyncio.ensure_future(batcher.run(lambda: rec.call(0)))
        # One loop pass, not a wait on the clock: each task's first step queues its call.
        await asyncio.sleep(0)  # the first batch (one call) left, blocked until the gate
        later = [asyncio.ensure_future(batcher.run(partial(rec.call, n))) for n in range(1, 21)]
        cancelled = asyncio.ensure_future(batcher.run(lambda: rec.call(99)))
        await asyncio.sleep(0)  # every later call is waiting for the first batch
        cancelled.cancel()
        rec.gate.set()
        assert await first == 0
        results = await asyncio.gather(*later, return_exceptions=True)
    for n, result in zip(range(1, 21), results, strict=True):
        if n == 13:
            assert isinstance(result, ValueError)  # only its own caller sees the error
        else:
            assert result == n * 10
    assert 99 not in rec.ran  # cancelled before its batch left: never run
    # 20 waiting calls left in ceil(20 / MAX_BATCH) hand-overs, not 20
    assert pool.handovers == [1, MAX_BATCH, 20 - MAX_BATCH]


async def test_a_call_with_nothing_running_leaves_at_once() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher: Batcher[int] = Batcher(pool)
        assert await asyncio.wait_for(batcher.run(lambda: 7), 1) == 7


async def test_a_shut_down_executor_fails_the_call() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    batcher: Batcher[int] = Batcher(pool)
    with pytest.raises(RuntimeError):
        await batcher.run(lambda: 1)
