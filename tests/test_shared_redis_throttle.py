"""Greylisting and rate limits shared by two relays on one Redis (issue 19 item 6), with
real parts: a real redis-server and two `relay serve` processes (tests/test_shared_redis.py
starts them). A triplet greylisted on A passes at B's first attempt once the delay is
over; a client's token bucket drains across both; with Redis gone greylisting fails open,
mail flows and the failure is counted."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiosmtplib

from tests.support.relay import send
from tests.test_shared_redis import RedisServer, Relay, redis_port, relays, scrape

__all__ = ["redis_port"]  # the fixture, imported for pytest

GREYLIST_POLICY = """
[policy]
name = "greylist-shared"
mode = "enforce"

[[rule]]
name = "greylist"
when = 'greylist in ["new", "early"]'
action = "tempfail"
reason = "Greylisted, try again in {greylist_wait} seconds"
"""

RATE_POLICY = """
[policy]
name = "rate-shared"
mode = "enforce"

[[rule]]
name = "rate_limit"
when = "rate_limit_wait > 0"
action = "tempfail"
reason = "Too many messages, try again in {rate_limit_wait} seconds"
"""

DELAY = 2  # seconds: the relays' clock is the wall clock, so the test waits it out


def message(tag: str) -> bytes:
    return (
        f"From: Ann <ann@{tag}.test>\r\nTo: bob@example.org\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@{tag}.test>\r\nDate: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\n"
        "Hello Bob.\r\n"
    ).encode()


async def attempt(relay: Relay, tag: str) -> tuple[int, str]:
    """One message from ann@<tag>.test to bob@example.org: (code, text) of DATA."""
    try:
        await send(relay.port, ["bob@example.org"], message(tag), f"ann@{tag}.test")
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return 250, ""


async def greylist_errors(relay: Relay) -> float:
    _, body = await scrape(relay.metrics_port, "/metrics")
    pattern = r'^relay_fact_errors_total\{fact="greylist\w*",kind="state"\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, body.decode(), re.M))


async def test_greylist_triplets_are_shared_and_fail_open(
    tmp_path: Path, redis_port: RedisServer
) -> None:
    redis = redis_port
    redis.start()
    extra = f"[greylist]\ndelay = {DELAY}\nretry_window = 600\nexempt_dmarc_pass = false\n"
    async with relays(tmp_path, redis.url, "a", "b", policy=GREYLIST_POLICY, extra=extra) as (
        a,
        b,
    ):
        first_sight = time.monotonic()
        code, text = await attempt(a, "grey")
        assert (code, text.startswith("4.7.1 Greylisted")) == (451, True), text
        # B has never seen this triplet itself. Once the delay is over, its FIRST attempt
        # passes only because it reads the first sight A recorded in the shared Redis;
        # on its own store it would be "new" and deferred.
        await asyncio.sleep(max(0.0, first_sight + DELAY + 0.5 - time.monotonic()))
        assert await attempt(b, "grey") == (250, "")
        # And A lets it through too, as after any passed retry.
        assert await attempt(a, "grey") == (250, "")

        # Redis gone: a new triplet is not greylisted (fail open), and that is counted.
        redis.stop()
        assert await attempt(a, "fresh") == (250, "")
        assert await greylist_errors(a) >= 1
    ids = delivered_ids(tmp_path / "maildir")
    assert ids.count("<grey@grey.test>") == 2 and ids.count("<fresh@fresh.test>") == 1


def delivered_ids(maildir: Path) -> list[str]:
    found = []
    for path in (maildir / "new").iterdir():
        match = re.search(rb"^Message-ID: (\S+)", path.read_bytes(), re.M | re.I)
        assert match, path
        found.append(match.group(1).decode())
    return found


async def test_rate_limit_buckets_are_shared(tmp_path: Path, redis_port: RedisServer) -> None:
    redis = redis_port
    redis.start()
    # 3 messages from one client address, then one a minute, counted across both relays.
    extra = (
        "[ratelimit]\nclient_ip = { rate = 1, burst = 3 }\n"
        "sender_domain = { rate = 0 }\nrecipient = { rate = 0 }\n"
    )
    async with relays(tmp_path, redis.url, "a", "b", policy=RATE_POLICY, extra=extra) as (a, b):
        replies = [await attempt(relay, f"r{i}") for i, relay in enumerate((a, b, a))]
        assert replies == [(250, "")] * 3
        code, text = await attempt(b, "r3")
        assert code == 451 and re.match(r"4\.7\.1 Too many messages, try again in \d+", text), text
    assert len(delivered_ids(tmp_path / "maildir")) == 3
