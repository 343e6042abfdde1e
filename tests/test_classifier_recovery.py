"""A classifier child that dies costs the messages in flight at most a retry, not the
relay's model: the child is replaced and the next message is classified (issue 17, bad
input). A message whose child dies twice fails (tests/test_pipes_bounds.py); with the
default policy, which requires ``spam_probability``, it is deferred (tests/test_policy.py,
required facts). Hangs and the pending bound over real SMTP: tests/test_hang_overload.py."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from relay.classifier.serving import Classifier
from relay.errors import WorkerTimeout
from relay.message import Message

MODEL = Path(__file__).resolve().parents[1] / "models" / "spam.skops"


def message(n: int) -> Message:
    return Message.from_file_bytes(
        f"From: a@sender.test\r\nSubject: note\r\n\r\nSee you at meeting {n}.\r\n".encode(),
        received_at=1_795_000_000.0,
        mail_from="a@sender.test",
        rcpt_to=("bob@example.org",),
    )


async def _exited(pid: int) -> None:
    """Wait (no deadline of its own: the caller's) until ``pid`` is reaped."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.02)


@pytest.fixture
def model() -> Path:
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not built")
    return MODEL


async def test_a_killed_child_is_replaced_and_the_next_message_classified(model: Path) -> None:
    classifier = await Classifier.open(model, workers=1)
    try:
        first = await classifier.classify(message(1))
        assert 0.0 <= first.probability <= 1.0
        (pid,) = classifier.pids
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(_exited(pid), 30)
        again = await asyncio.wait_for(classifier.classify(message(2)), 60)
        assert 0.0 <= again.probability <= 1.0
        assert classifier.replaced == 1
        assert classifier.pids and pid not in classifier.pids
    finally:
        await classifier.close()


async def test_messages_in_a_child_that_dies_are_retried_once_on_its_replacement(
    model: Path,
) -> None:
    """SIGSTOP holds the messages in the child; SIGKILL then loses them: each is sent once
    more to the new child and classified, as if nothing had happened."""
    classifier = await Classifier.open(model, workers=1)
    try:
        expected = await classifier.classify(message(1))
        (pid,) = classifier.pids
        os.kill(pid, signal.SIGSTOP)
        calls = [asyncio.ensure_future(classifier.classify(message(1))) for _ in range(3)]
        while classifier.pending < 3:  # all three sent to the stopped child
            await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        assert results == [expected] * 3
        assert classifier.replaced == 1 and pid not in classifier.pids
    finally:
        await classifier.close()


async def test_a_hung_child_is_killed_at_the_deadline_and_replaced(model: Path) -> None:
    classifier = await Classifier.open(model, workers=1, kill_after=2.0)
    try:
        await classifier.classify(message(1))
        (pid,) = classifier.pids
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(WorkerTimeout):
            await asyncio.wait_for(classifier.classify(message(2)), 60)
        await asyncio.wait_for(_exited(pid), 30)  # killed, not left stopped
        after = await asyncio.wait_for(classifier.classify(message(3)), 60)
        assert 0.0 <= after.probability <= 1.0
        assert pid not in classifier.pids
    finally:
        await classifier.close()
