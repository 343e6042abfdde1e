"""relay/pipeproc.py with real child processes (tests/support/echochild.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from relay.errors import WorkerDied, WorkerError, WorkerTimeout
from relay.proc.pipes import (
    ERROR,
    OK,
    PipeWorkers,
    frame,
    split_frames,
)

CHILD = "tests.support.echochild"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_frames_split_only_when_complete() -> None:
    data = frame(OK, b"one") + frame(ERROR, b"") + frame(OK, b"three")
    buffer = bytearray(data[:-2])
    assert split_frames(buffer) == [(OK, b"one"), (ERROR, b"")]
    buffer += data[-2:]
    assert split_frames(buffer) == [(OK, b"three")]
    assert buffer == b""
    with pytest.raises(ValueError, match="bad frame length"):
        split_frames(bytearray(b"\x00\x00\x00\x00x"))


async def test_answers_reach_their_callers_across_processes() -> None:
    workers = PipeWorkers(CHILD, 2, name="echo")
    try:
        await workers.start()
        pids = set(workers.pids)
        assert len(pids) == 2 and os.getpid() not in pids
        payloads = [f"message {i}".encode() * (i % 7 + 1) for i in range(400)]
        answers = await asyncio.gather(*(workers.call(p) for p in payloads))
        served_by = set()
        for payload, answer in zip(payloads, answers, strict=True):
            pid, _, body = answer.partition(b":")
            assert body == payload[::-1]
            served_by.add(int(pid))
        assert served_by == pids  # both processes took work
        big = os.urandom(5 << 20)  # larger than any pipe buffer, sent in pieces
        answer = await workers.call(b"head:", big, b"tail")
        assert answer.partition(b":")[2] == (b"head:" + big + b"tail")[::-1]
    finally:
        await workers.close()


async def test_a_failing_request_fails_alone() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        results = await asyncio.gather(
            workers.call(b"ab"), workers.call(b"fail"), workers.call(b"cd"), return_exceptions=True
        )
        assert isinstance(results[1], WorkerError) and str(results[1]) == "ValueError"
        assert [r.partition(b":")[2] for r in (results[0], results[2])] == [b"ba", b"dc"]  # type: ignore[union-attr]
        assert len(workers.pids) == 1  # the process lives on
    finally:
        await workers.close()


async def test_a_dead_process_fails_its_callers_and_is_replaced() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        await workers.start()
        (first,) = workers.pids
        results = await asyncio.gather(
            workers.call(b"exit"), workers.call(b"queued behind"), return_exceptions=True
        )
        assert all(isinstance(r, WorkerDied) for r in results)
        answer = await workers.call(b"again")
        pid, _, body = answer.partition(b":")
        assert body == b"niaga" and int(pid) != first
    finally:
        await workers.close()


async def test_a_stuck_process_is_killed_after_the_timeout() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        await workers.start()
        (first,) = workers.pids
        results = await asyncio.gather(
            workers.call(b"hang", kill_after=0.5),
            workers.call(b"queued behind it"),
            return_exceptions=True,
        )
        assert isinstance(results[0], WorkerTimeout)
        assert isinstance(results[1], WorkerDied)  # it was in the killed process
        answer = await workers.call(b"next", kill_after=5)
        assert answer.partition(b":")[2] == b"txen" and first not in workers.pids
    finally:
        await workers.close()


async def test_close_ends_every_process_and_refuses_new_calls() -> None:
    workers = PipeWorkers(CHILD, 2, name="echo")
    await workers.start()
    pids = workers.pids
    for pid in pids:  # a signal to the relay's process group does not stop a child...
        os.kill(pid, signal.SIGTERM)
    assert (await workers.call(b"still here")).endswith(b"ereh llits")
    await workers.close()  # ...closing its input does
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(WorkerDied, match="closed"):
        await workers.call(b"late")


def test_children_die_with_their_parent() -> None:
    """A relay process killed outright (SIGKILL, OOM) leaves no child behind."""
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from relay.proc.pipes import PipeWorkers
        async def main():
            workers = PipeWorkers({CHILD!r}, 2)
            await workers.start()
            print(*workers.pids, flush=True)
            os.kill(os.getpid(), 9)
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


async def test_children_run_at_a_lower_priority_when_asked() -> None:
    """``nice`` lowers the children's CPU priority below the caller's, replacements too,
    so the relay's event loop wins a contended core (docs/operations.md)."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    if own + 3 > 19:
        pytest.skip(f"this test process already runs at nice {own}: no room to lower")
    plain, lowered = PipeWorkers(CHILD, 1, name="plain"), PipeWorkers(CHILD, 1, name="low", nice=3)
    try:
        await plain.start()
        await lowered.start()
        assert os.getpriority(os.PRIO_PROCESS, plain.pids[0]) == own
        first = lowered.pids[0]
        assert os.getpriority(os.PRIO_PROCESS, first) == own + 3
        os.kill(first, signal.SIGKILL)
        async with asyncio.timeout(30):
            while first in lowered.pids:  # until the pool has seen it go
                await asyncio.sleep(0.01)
        await lowered.call(b"after")  # served by the replacement
        (second,) = lowered.pids
        assert second != first
        assert os.getpriority(os.PRIO_PROCESS, second) == own + 3
    finally:
        await plain.close()
        await lowered.close()
