"""Greylisting and rate limits over real SMTP: the in-process relay on loopback, Maildir
delivery, a policy that defers on the facts.

Time is injected, never waited for: the SMTP layer stamps each message's arrival with
``time.time()`` (``smtp/handler.build_message``); these tests give that module a clock
they move by hand, and every state operation takes the message's time from there. The
recorder writes before the client gets its reply, so each attempt sees the one before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

import relay.smtp.handler
from relay.config import Settings
from relay.errors import ConfigError
from tests.support.relay import make_settings, running_relay, send, simple_message
from tests.test_state import redis_url

__all__ = ["redis_url"]  # the redis-server fixture of tests/test_state.py

T0 = 1_796_000_000.0

GREYLIST_POLICY = """
[policy]
name = "greylisting"
mode = "enforce"
[[rule]]
name = "greylist"
when = 'greylist in ["new", "early"]'
action = "tempfail"
reason = "Greylisted, try again in {greylist_wait} seconds"
"""

RATE_POLICY = """
[policy]
name = "rates"
mode = "enforce"
[[rule]]
name = "rate_limit"
when = "rate_limit_wait > 0"
action = "tempfail"
reason = "Too many messages, try again in {rate_limit_wait} seconds"
"""


@dataclass
class Clock:
    """Stands in for the ``time`` module in the SMTP handler: only ``time()`` is used."""

    now: float

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(T0)
    monkeypatch.setattr(relay.smtp.handler, "time", fake)
    return fake


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The [state] section: the embedded SQLite file, or a real redis-server. Keys are
    hashed under each test's own fresh key file, so tests never see each other's state."""
    if request.param == "sqlite":
        return {}
    url: str = request.getfixturevalue("redis_url")
    return {"backend": "redis", "url": url}


def settings_for(
    tmp_path: Path, policy: str, state: dict[str, Any], **sections: dict[str, Any]
) -> Settings:
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    overrides = {"policy": {"path": str(path)}, **sections}
    if state:
        overrides["state"] = state
    return make_settings(tmp_path, overrides)


async def attempt(port: int, rcpt: str = "bob@example.org", n: int = 0) -> tuple[int, str]:
    """One message from 127.0.0.1; the final reply code and text (refusals included)."""
    sender = "alice@sender.test"
    data = simple_message(subject=f"attempt {n}", sender=sender)
    try:
        _, reply = await send(port, [rcpt], data, sender)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return 250, reply


def delivered(tmp_path: Path) -> int:
    return len(list((tmp_path / "maildir" / "new").glob("*")))


@pytest.fixture
async def greylisting(tmp_path: Path, clock: Clock, backend: dict[str, Any]) -> AsyncIterator[int]:
    settings = settings_for(tmp_path, GREYLIST_POLICY, backend, greylist={"delay": 300})
    async with running_relay(settings) as runtime:
        yield runtime.port


async def test_greylisting_defers_until_the_retry_after_the_delay(
    tmp_path: Path, clock: Clock, greylisting: int
) -> None:
    port = greylisting
    assert await attempt(port, n=1) == (451, "4.7.1 Greylisted, try again in 300 seconds")
    clock.now = T0 + 120  # too early: still deferred, with the time left
    assert await attempt(port, n=2) == (451, "4.7.1 Greylisted, try again in 180 seconds")
    assert delivered(tmp_path) == 0
    clock.now = T0 + 300  # the delay is over: delivered
    code, _ = await attempt(port, n=3)
    assert code == 250 and delivered(tmp_path) == 1
    clock.now = T0 + 86400  # later mail for the triplet passes at once
    code, _ = await attempt(port, n=4)
    assert code == 250 and delivered(tmp_path) == 2
    # Another recipient is another triplet; a spelling of the first one is not.
    assert (await attempt(port, "carol@example.org", n=5))[0] == 451
    code, _ = await attempt(port, "BOB@Example.ORG", n=6)
    assert code == 250 and delivered(tmp_path) == 3


async def test_rate_limit_defers_the_burst_plus_first(
    tmp_path: Path, clock: Clock, backend: dict[str, Any]
) -> None:
    limits = {
        "client_ip": {"rate": 1, "burst": 3},  # one token a minute
        "sender_domain": {"rate": 0},
        "recipient": {"rate": 0},
    }
    settings = settings_for(tmp_path, RATE_POLICY, backend, ratelimit=limits)
    async with running_relay(settings) as runtime:
        codes = [(await attempt(runtime.port, n=i))[0] for i in range(3)]
        assert codes == [250, 250, 250] and delivered(tmp_path) == 3
        assert await attempt(runtime.port, n=4) == (
            451,
            "4.7.1 Too many messages, try again in 60 seconds",
        )
        clock.now = T0 + 45
        assert await attempt(runtime.port, n=5) == (
            451,
            "4.7.1 Too many messages, try again in 15 seconds",
        )
        clock.now = T0 + 60  # a token again: delivered
        code, _ = await attempt(runtime.port, n=6)
        assert code == 250 and delivered(tmp_path) == 4


async def test_a_policy_reading_the_authenticated_exemption_needs_auth(tmp_path: Path) -> None:
    """greylist_authenticated reads DMARC: without [auth] the relay refuses to start,
    naming the fact, rather than greylisting authenticated senders message by message."""
    policy = GREYLIST_POLICY.replace(
        """when = 'greylist in ["new", "early"]'""",
        """when = 'greylist in ["new", "early"] && !greylist_authenticated'""",
    )
    settings = settings_for(tmp_path, policy, {})
    with pytest.raises(ConfigError, match="greylist_authenticated"):
        async with running_relay(settings):
            pass
