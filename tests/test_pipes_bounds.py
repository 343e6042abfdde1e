"""proc/pipes.py's failure handling with real child processes (tests/support/echochild.py):
one retry on a death shared by every caller, no retry after an overrun, the bound on
pending requests, and a child's batch handler."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.errors import WorkerBusy, WorkerDied, WorkerTimeout
from relay.proc.pipes import ERROR, OK, PipeWorkers, _answer, split_frames
from relay.proc.restarts import Restarts
from tests.support.postfix import until

CHILD = "tests.support.echochild"


async def test_retry_sends_a_request_once_more_to_the_replacement() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        await workers.start()
        (first,) = workers.pids
        exits, queued = await asyncio.gather(
            workers.call(b"exit"), workers.call(b"queued", retry=True), return_exceptions=True
        )
        assert isinstance(exits, WorkerDied)  # no retry asked
        assert isinstance(queued, bytes)
        pid, _, body = queued.partition(b":")
        assert body == b"deueuq" and int(pid) != first
        assert workers.replaced == 1
    finally:
        await workers.close()


async def test_a_request_that_kills_its_child_twice_fails() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        with pytest.raises(WorkerDied):
            await workers.call(b"exit", retry=True)
        assert workers.replaced == 2
        assert (await workers.call(b"after")).endswith(b"retfa")
    finally:
        await workers.close()


async def test_an_exited_child_is_replaced_before_the_next_request() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        await workers.start()
        (first,) = workers.pids
        with pytest.raises(WorkerDied):
            await workers.call(b"exit")
        await until(lambda: bool(workers.pids), "a replacement")  # no request asked for it
        (second,) = workers.pids
        assert second != first and workers.replaced == 1
        assert (await workers.call(b"next")).startswith(str(second).encode())
    finally:
        await workers.close()


async def test_a_child_that_cannot_start_is_tried_again_after_growing_pauses(
    tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    workers = PipeWorkers(
        "tests.support.dyingchild",
        1,
        name="dying",
        args=[str(starts)],
        restarts=Restarts(delays=(0.0, 0.3, 3600.0)),
    )

    def started() -> int:
        return len(starts.read_text().splitlines()) if starts.exists() else 0

    try:
        with pytest.raises(WorkerDied):
            await workers.start()
        # Again at once, then after 0.3 s; the third pause is an hour.
        await until(lambda: workers.failed_starts == 3, "three failed starts")
        assert started() == 3
        for _ in range(20):  # requests meanwhile start nothing and fail at once
            with pytest.raises(WorkerDied, match="3 failed starts in a row"):
                await workers.call(b"x")
        await asyncio.sleep(0.5)
        assert started() == 3
    finally:
        await workers.close()


def test_pauses_grow_with_failed_starts_and_end_with_a_start() -> None:
    r = Restarts(delays=(0.5, 1.0, 5.0))
    assert [r.failed(now=100.0) for _ in range(4)] == [0.5, 1.0, 5.0, 5.0]
    assert r.wait(now=103.0) == 2.0 and r.wait(now=105.0) == 0.0
    r.started()
    assert r.wait(now=100.0) == 0.0 and r.failed(now=200.0) == 0.5


async def test_an_overrun_is_not_retried_but_the_requests_behind_it_are() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        await workers.start()
        (first,) = workers.pids
        hung, behind = await asyncio.gather(
            workers.call(b"hang", kill_after=1, retry=True),
            workers.call(b"behind", retry=True),
            return_exceptions=True,
        )
        assert isinstance(hung, WorkerTimeout)
        assert isinstance(behind, bytes) and behind.endswith(b"dniheb")
        assert first not in workers.pids
    finally:
        await workers.close()


async def test_past_max_pending_a_request_fails_at_once() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo", max_pending=2)
    try:
        await workers.start()
        held = [asyncio.ensure_future(workers.call(b"hang")) for _ in range(2)]
        await asyncio.sleep(0)  # both sent (each call queues its request synchronously)
        assert workers.pending == 2
        with pytest.raises(WorkerBusy, match="2 requests pending"):
            await workers.call(b"one more")
        assert workers.pending == 2 and not any(h.done() for h in held)
    finally:
        await workers.close()  # kills the stuck child: the two held requests fail
    assert all(isinstance(h.exception(), WorkerDied) for h in held)


async def test_callers_waiting_for_a_start_count_against_the_bound() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo", max_pending=1)
    try:
        first = asyncio.ensure_future(workers.call(b"first"))  # starts the child
        await asyncio.sleep(0)
        assert workers.pending == 1
        with pytest.raises(WorkerBusy):
            await workers.call(b"second")
        assert (await first).endswith(b"tsrif")
    finally:
        await workers.close()


def test_a_batch_handler_answers_together_or_falls_back_one_by_one() -> None:
    def one(payload: bytes) -> bytes:
        if payload == b"bad":
            raise ValueError(payload)
        return payload.upper()

    def many(payloads: list[bytes]) -> list[bytes]:
        calls.append(len(payloads))
        return [one(p) for p in payloads]

    calls: list[int] = []
    frames = [(OK, b"a"), (OK, b"b")]
    assert _answer(frames, one, many) == _answer(frames, one)
    assert calls == [2]
    mixed = [(OK, b"a"), (OK, b"bad"), (OK, b"c")]
    # the batch raised: each request on its own, the bad one alone fails
    assert _answer(mixed, one, many) == _answer(mixed, one)
    assert [status for status, _ in split_frames(bytearray(_answer(mixed, one, many)))] == [
        OK,
        ERROR,
        OK,
    ]
