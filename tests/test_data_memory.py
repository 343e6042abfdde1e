"""A bound on the memory message data takes (security issue 15, finding 8).

Over loopback, the real relay with a small budget ([smtp] large_message_memory = 2 MB,
large messages of 1.5 MB) delivering into a real aiosmtpd sink: a large message held
mid-DATA leaves no room for a second one (4xx, nothing of it delivered) while small mail
goes through; SIZE= over the free budget is refused at MAIL; the budget comes back after
every way a transaction can end. Then the pieces that keep copies down: the pipe to the
verification child sends a large request a chunk at a time and the child gives the memory
back, and DATA goes downstream dot-stuffed a chunk at a time with aiosmtplib's bytes.

No test waits on the clock: where the relay must have read something first, the test
waits for the relay's own state to say so.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from relay.app import Runtime
from relay.auth.checker import CRYPTO_MODULE
from relay.auth.cryptoproc import decode_answer, encode_request
from relay.config import settings_from_mapping
from relay.delivery.smtp import data_chunks
from relay.errors import ConfigError
from relay.proc.pipes import PipeWorkers
from relay.smtp.budget import DataBudget
from tests.support.dkimkeys import rsa_key, sign
from tests.support.relay import Sink, make_settings, running_relay, sink_server
from tests.support.smtpwire import WireClient, WireReply

BUDGET = 2_000_000
LARGE = 64 * 1024
SIZE = 1_500_000  # a large message; two do not fit in the budget
CHILD = "tests.support.echochild"


def message(subject: str, size: int) -> bytes:
    """A CRLF message of about ``size`` bytes, with lines that start with a dot."""
    head = f"From: a@sender.test\r\nTo: bob@example.org\r\nSubject: {subject}\r\n\r\n".encode()
    line = b".a line that starts with a dot, as dot-stuffing must keep it: " + b"x" * 14
    lines, total = [], len(head)
    for n in range(size):
        if total >= size:
            break
        row = line if n % 3 == 0 else line[1:]
        lines.append(row + b"\r\n")
        total += len(row) + 2
    return head + b"".join(lines)


def stuffed(raw: bytes) -> bytes:
    return raw.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@asynccontextmanager
async def relay_and_sink(tmp: Path) -> AsyncIterator[tuple[Runtime, Sink]]:
    async with sink_server() as sink:
        settings = make_settings(
            tmp,
            {
                "smtp": {
                    "max_message_size": BUDGET,
                    "large_message_memory": BUDGET,
                    "large_message_size": LARGE,
                },
                "delivery": {"mode": "smtp", "downstream": sink.address},
            },
        )
        async with running_relay(settings) as relay:
            yield relay, sink


def budget(relay: Runtime) -> DataBudget:
    return relay.sessions.data_budget


async def until(condition: Callable[[], bool]) -> None:
    """Let the relay run until ``condition`` holds (it reads from its sockets meanwhile)."""
    async with asyncio.timeout(30):  # a hang fails the test instead of stalling the run
        while not condition():
            await asyncio.sleep(0.01)


async def start(relay: Runtime, mail: str = "MAIL FROM:<a@sender.test>") -> WireClient:
    """A session up to the 354 of DATA."""
    client = await WireClient.connect(relay.port)
    await client.ehlo()
    assert (await client.cmd(mail)).code == 250
    assert (await client.cmd("RCPT TO:<bob@example.org>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    return client


async def send(relay: Runtime, raw: bytes, mail: str = "MAIL FROM:<a@sender.test>") -> WireReply:
    client = await start(relay, mail)
    try:
        return await client.exchange(stuffed(raw))
    finally:
        await client.close()


def delivered(sink: Sink, raw: bytes) -> int:
    """How many messages the sink holds that end with ``raw`` exactly (the relay only
    prepends its header fields)."""
    return sum(1 for m in sink.messages if m.data.endswith(raw))


async def test_a_large_message_over_the_budget_is_deferred_while_small_mail_flows(
    tmp_path: Path,
) -> None:
    first, second, small = message("first", SIZE), message("second", SIZE), message("small", 2000)
    async with relay_and_sink(tmp_path) as (relay, sink):
        holder = await start(relay)
        wire = stuffed(first)
        await holder.write(wire[: SIZE // 2])  # well past LARGE: it must have reserved
        await until(lambda: budget(relay).held > 0)

        late = await start(relay)
        reply = await late.exchange(stuffed(second))  # all of it, read and dropped
        assert (reply.code, reply.enhanced) == (451, "4.3.1"), reply
        assert (await late.cmd("NOOP")).code == 250  # the stream is still in step

        assert (await send(relay, small)).code == 250  # small mail needs no reservation
        assert delivered(sink, small) == 1

        reply = await holder.exchange(wire[SIZE // 2 :])
        assert reply.code == 250, reply
        assert delivered(sink, first) == 1  # byte for byte, its dot lines unstuffed once
        assert delivered(sink, second) == 0  # nothing of the deferred message

        assert (await late.cmd("RSET")).code == 250
        assert (await late.cmd("MAIL FROM:<a@sender.test>")).code == 250
        assert (await late.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await late.cmd("DATA")).code == 354
        assert (await late.exchange(stuffed(second))).code == 250  # the retry gets in
        assert delivered(sink, second) == 1
        await holder.close()
        await late.close()
        assert budget(relay).held == 0
    assert len(sink.messages) == 3


async def test_size_over_the_free_budget_is_refused_at_mail(tmp_path: Path) -> None:
    async with relay_and_sink(tmp_path) as (relay, sink):
        a = await WireClient.connect(relay.port)
        b = await WireClient.connect(relay.port)
        await a.ehlo()
        await b.ehlo()
        assert (await a.cmd(f"MAIL FROM:<a@sender.test> SIZE={SIZE}")).code == 250
        assert budget(relay).held == SIZE  # reserved at MAIL: no race with the next one

        reply = await b.cmd(f"MAIL FROM:<b@sender.test> SIZE={SIZE}")
        assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply
        assert (await b.cmd(f"MAIL FROM:<b@sender.test> SIZE={BUDGET - SIZE}")).code == 250
        assert (await b.cmd("RSET")).code == 250
        assert (await b.cmd("MAIL FROM:<b@sender.test> SIZE=1000")).code == 250  # small
        assert budget(relay).held == SIZE

        # A message that outgrows its SIZE= needs room for the largest: none is left.
        assert (await b.cmd("RSET")).code == 250
        assert (await b.cmd("MAIL FROM:<b@sender.test> SIZE=100000")).code == 250
        assert (await b.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await b.cmd("DATA")).code == 354
        reply = await b.exchange(stuffed(message("liar", SIZE)))
        assert (reply.code, reply.enhanced) == (451, "4.3.1"), reply

        assert (await a.cmd("RSET")).code == 250  # gives its reservation back
        assert budget(relay).held == 0
        assert (await b.cmd(f"MAIL FROM:<b@sender.test> SIZE={SIZE}")).code == 250
        await a.close()
        await b.close()
    assert sink.messages == []


async def test_the_budget_comes_back_however_a_transaction_ends(tmp_path: Path) -> None:
    raw = message("large", SIZE)
    async with relay_and_sink(tmp_path) as (relay, sink):
        for _ in range(20):  # a client that drops mid-DATA, again and again
            client = await start(relay)
            await client.write(stuffed(raw)[: SIZE // 2])
            await until(lambda: budget(relay).held == BUDGET)
            await client.close()
            await until(lambda: not relay.sessions.open)
            assert budget(relay).held == 0

        client = await start(relay)  # too long a line (500) and too much data (552)
        reply = await client.exchange(b"Subject: x\r\n\r\n" + b"y" * (SIZE // 2) + b"\r\n.\r\n")
        assert reply.code == 500, reply
        assert budget(relay).held == 0
        assert (await client.cmd("MAIL FROM:<a@sender.test>")).code == 250
        assert (await client.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        reply = await client.exchange(stuffed(raw + raw))
        assert reply.code == 552, reply
        assert budget(relay).held == 0
        await client.close()

        assert (await send(relay, raw)).code == 250  # the whole budget is free again
        assert delivered(sink, raw) == 1
        assert budget(relay).held == 0


async def test_a_large_request_goes_to_the_child_a_chunk_at_a_time() -> None:
    workers = PipeWorkers(CHILD, 1, name="echo")
    try:
        await workers.start()
        big = random.Random(8).randbytes(8 << 20)
        stdin = workers._children[0]._stdin
        assert stdin is not None
        call = asyncio.ensure_future(workers.call(b"head:", big))
        buffered = []
        while not call.done():  # every loop turn while the request is on its way
            buffered.append(stdin.get_write_buffer_size())
            await asyncio.sleep(0)
        # Handed over whole, the transport would hold the 8 MB the pipe could not take.
        assert max(buffered) > 0
        assert max(buffered) < 1 << 20  # a chunk over the high-water mark (320 KiB)
        answer = await call
        assert answer.partition(b":")[2] == (b"head:" + big)[::-1]
    finally:
        await workers.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_the_verification_child_gives_back_the_memory_of_a_large_message() -> None:
    key = rsa_key("example.com", "s1")
    keys = {key.name.encode(): key.txt.encode()}
    small, large = sign(message("small", 2000), key), sign(message("large", 20_000_000), key)
    workers = PipeWorkers(CRYPTO_MODULE, 1, name="auth")
    try:
        await workers.call(*encode_request(small, keys, 10, False))
        (pid,) = workers.pids
        idle = _rss_kib(pid)
        answer = await workers.call(*encode_request(large, keys, 10, False))
        assert decode_answer(answer)[0].result == "pass"  # the whole body was hashed
        await workers.call(*encode_request(small, keys, 10, False))  # after the trim
        # It held several copies of the 20 MB message; glibc kept ~40 MB of them.
        assert _rss_kib(pid) < idle + 10 * 1024, (idle, _rss_kib(pid))
    finally:
        await workers.close()


def test_data_goes_downstream_as_aiosmtplib_would_send_it() -> None:
    rng = random.Random(15)
    pieces = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b" ", b".."]
    for _ in range(5000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        size = rng.randint(1, 16)
        expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw)) + b".\r\n"
        assert b"".join(data_chunks(raw, size)) == expected, (raw, size)
    raw = message("big", 3_000_000)
    chunks = list(data_chunks(raw))
    assert b"".join(chunks) == stuffed(raw)
    assert max(map(len, chunks)) < 2 * 256 * 1024 + 1000  # a chunk, never the message


def test_the_budget_must_hold_a_message_of_the_largest_size() -> None:
    with pytest.raises(ConfigError, match=r"smtp\.large_message_memory"):
        settings_from_mapping({"smtp": {"max_message_size": 2000, "large_message_memory": 1999}})
    smtp = settings_from_mapping({}).smtp
    assert (smtp.large_message_size, smtp.large_message_memory) == (256 * 1024, 100 << 20)
    assert smtp.large_message_memory // smtp.max_message_size == 4  # the documented figure
