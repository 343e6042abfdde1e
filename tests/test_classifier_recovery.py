"""A classifier worker that dies costs the messages in flight, not the relay's model: the
broken pool is replaced and the next message is classified (issue 17, bad input). With
the default policy, which requires ``spam_probability``, the failed ones are deferred
(tests/test_policy.py, required facts)."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import BrokenExecutor
from pathlib import Path

import pytest

from relay.classifier.serving import Classifier
from relay.message import Message

MODEL = Path(__file__).resolve().parents[1] / "models" / "spam.skops"


def message(n: int) -> Message:
    return Message.from_file_bytes(
        f"From: a@sender.test\r\nSubject: note {n}\r\n\r\nSee you at the meeting.\r\n".encode(),
        received_at=1_795_000_000.0,
        mail_from="a@sender.test",
        rcpt_to=("bob@example.org",),
    )


async def test_a_killed_worker_costs_its_batch_then_a_new_pool_serves() -> None:
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not built")
    classifier = await Classifier.open(MODEL, workers=1)
    try:
        first = await classifier.classify(message(1))
        assert 0.0 <= first.probability <= 1.0
        (pid,) = classifier.pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenExecutor):
            await classifier.classify(message(2))
        assert classifier.replaced == 1
        again = await classifier.classify(message(3))
        assert 0.0 <= again.probability <= 1.0
        assert classifier.pids and pid not in classifier.pids
    finally:
        await classifier.close()


async def test_a_pool_known_broken_is_replaced_at_the_next_submit() -> None:
    """When the pool already knows its worker died, it refuses the next task at once (no
    future to wait on): that message fails, the pool is replaced, and nothing is left
    counted as in flight, so later messages are still pumped."""
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not built")
    classifier = await Classifier.open(MODEL, workers=1)
    try:
        await classifier.classify(message(1))
        (pid,) = classifier.pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenExecutor):
            await classifier.classify(message(2))  # the pool learns it is broken here
        # The first failure replaced it; break the new one the same way, then wait
        # until its executor marks itself broken before submitting again.
        await classifier.classify(message(3))
        (pid,) = classifier.pids
        os.kill(pid, signal.SIGKILL)
        pool = classifier._pool
        for _ in range(200):
            if getattr(pool, "_broken", False):
                break
            await asyncio.sleep(0.05)
        assert getattr(pool, "_broken", False), "the executor never noticed its dead worker"
        with pytest.raises(BrokenExecutor):
            await classifier.classify(message(4))
        assert classifier.replaced == 2
        result = await asyncio.wait_for(classifier.classify(message(5)), 60)
        assert 0.0 <= result.probability <= 1.0
    finally:
        await classifier.close()
