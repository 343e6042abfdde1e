"""SPF (RFC 7208) through pyspf with DNS answered by our resolver and a loopback server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import relay.auth.spf as spf_module
from relay.auth.checker import Authenticator
from relay.auth.results import SpfResult
from tests.support.authenv import authenticator, incoming
from tests.support.dkimkeys import make_message
from tests.support.dnsserver import LocalDns

CLIENT = "192.0.2.10"


def _zone() -> dict[str, list[tuple[Any, ...]]]:
    zone: dict[str, list[tuple[Any, ...]]] = {
        "example.com.": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all"), ("TXT", "unrelated")],
        "soft.example.": [("TXT", "v=spf1 ip4:198.51.100.1 ~all")],
        "neutral.example.": [("TXT", "v=spf1 ?all")],
        "norecord.example.": [("A", "198.51.100.7")],
        "broken.example.": [("TXT", "v=spf1 ip4:192.0.2.0/24 moo -all")],
        "twice.example.": [("TXT", "v=spf1 -all"), ("TXT", "v=spf1 +all")],
        "mx.example.": [("TXT", "v=spf1 mx -all"), ("MX", "10 in.mx.example.")],
        "in.mx.example.": [("A", CLIENT)],
        "mail.example.com.": [("TXT", "v=spf1 a -all"), ("A", CLIENT)],
        "badhelo.example.": [("TXT", "v=spf1 -all")],
        "inc-slow.example.": [("TXT", "v=spf1 include:slow.example -all")],
        "void.example.": [
            (
                "TXT",
                "v=spf1 a:v1.void.example a:v2.void.example a:v3.void.example "
                "ip4:192.0.2.0/24 -all",
            )
        ],
        "alias.example.": [("CNAME", "example.com.")],
        "macro.example.": [("TXT", "v=spf1 exists:%{i}.allow.macro.example -all")],
        f"{CLIENT}.allow.macro.example.": [("A", "127.0.0.2")],
    }
    # l0 includes l1 ... includes l11: 11 DNS-querying terms, one over the limit of 10
    for i in range(11):
        zone[f"l{i}.example."] = [("TXT", f"v=spf1 include:l{i + 1}.example -all")]
    zone["l11.example."] = [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]
    for i in range(9):  # nine nested includes stay within the limit
        zone[f"n{i}.example."] = [("TXT", f"v=spf1 include:n{i + 1}.example -all")]
    zone["n9.example."] = [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]
    return zone


@pytest.fixture(scope="module")
def dns() -> Iterator[LocalDns]:
    with LocalDns(_zone(), timeout=["slow.example."]) as server:
        yield server


@pytest.fixture
async def auth(dns: LocalDns) -> AsyncIterator[Authenticator]:
    async with authenticator(dns, timeout=1.0) as a:
        yield a


async def spf(
    auth: Authenticator, mail_from: str, ip: str = CLIENT, helo: str = "mail.example.com"
) -> tuple[SpfResult, SpfResult]:
    results = await auth.check(incoming(make_message(), mail_from=mail_from, ip=ip, helo=helo))
    return results.spf, results.spf_helo


@pytest.mark.parametrize(
    ("sender", "ip", "expected"),
    [
        ("alice@example.com", CLIENT, "pass"),
        ("alice@example.com", "203.0.113.5", "fail"),
        ("alice@soft.example", CLIENT, "softfail"),
        ("alice@neutral.example", CLIENT, "neutral"),
        ("alice@norecord.example", CLIENT, "none"),
        ("alice@nxdomain.example", CLIENT, "none"),
        ("alice@mx.example", CLIENT, "pass"),
        ("alice@alias.example", CLIENT, "pass"),
        ("alice@macro.example", CLIENT, "pass"),
        ("alice@macro.example", "192.0.2.99", "fail"),
        ("alice@n0.example", CLIENT, "pass"),
    ],
)
async def test_mail_from_results(auth: Authenticator, sender: str, ip: str, expected: str) -> None:
    result, _ = await spf(auth, sender, ip=ip)
    assert result.result == expected, result.reason
    assert result.identity == "mailfrom" and result.domain == sender.split("@")[1]


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("alice@broken.example", "Unknown mechanism"),
        ("alice@twice.example", "Two or more"),
        (
            "alice@l0.example",
            "Too many DNS lookups",
        ),  # RFC 7208 4.6.4: more than 10 DNS-querying terms
        ("alice@void.example", "Void lookup limit"),  # more than 2 void lookups
    ],
)
async def test_permanent_errors(auth: Authenticator, sender: str, reason: str) -> None:
    result, _ = await spf(auth, sender)
    assert result.result == "permerror"
    assert reason in result.reason


async def test_dns_timeout_is_temperror(auth: Authenticator) -> None:
    start = time.monotonic()
    direct, _ = await spf(auth, "alice@slow.example")
    included, _ = await spf(auth, "alice@inc-slow.example")
    assert (direct.result, included.result) == ("temperror", "temperror")
    assert time.monotonic() - start < 10  # two 1 s timeouts, with room for a busy machine


async def test_helo_identity_is_checked(auth: Authenticator) -> None:
    _, helo = await spf(auth, "alice@example.com", helo="mail.example.com")
    assert (helo.identity, helo.result, helo.domain) == ("helo", "pass", "mail.example.com")
    _, bad = await spf(auth, "alice@example.com", helo="badhelo.example")
    assert bad.result == "fail"
    _, literal = await spf(auth, "alice@example.com", helo="[192.0.2.10]")
    assert literal.result == "none"


async def test_null_sender_is_checked_as_postmaster_at_helo(auth: Authenticator) -> None:
    result, _ = await spf(auth, "", helo="mail.example.com")
    assert (result.result, result.sender) == ("pass", "postmaster@mail.example.com")


async def test_ipv6_client(auth: Authenticator) -> None:
    result, _ = await spf(auth, "alice@example.com", ip="2001:db8::1")
    assert result.result == "fail"


async def test_dns_goes_through_shared_cache(auth: Authenticator, dns: LocalDns) -> None:
    await spf(auth, "alice@n0.example")
    asked = len(dns.queries)
    await spf(auth, "alice@n0.example")
    assert len(dns.queries) == asked  # second evaluation answered from the resolver cache


async def test_spf_dns_goes_through_our_resolver(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    txt = auth.resolver.txt

    async def spy_txt(name: str) -> list[bytes]:
        asked.append(name)
        return await txt(name)

    monkeypatch.setattr(auth.resolver, "txt", spy_txt)
    result, _ = await spf(auth, "alice@n0.example")
    assert result.result == "pass"
    assert [f"n{i}.example" for i in range(10)] == [n for n in asked if n.startswith("n")]


async def test_spf_waiting_on_dns_never_blocks_the_loop(auth: Authenticator) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    start = time.monotonic()
    result, _ = await spf(auth, "alice@inc-slow.example")  # waits for a DNS timeout
    elapsed = time.monotonic() - start
    stop.set()
    await task
    assert result.result == "temperror"
    assert elapsed > 0.5  # SPF really waited for the DNS timeout ...
    assert ticks >= 5  # ... while the loop kept running (a blocked loop ticks once at most)


async def test_repeated_question_is_answered_from_the_result_cache(
    dns: LocalDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same client, sender and HELO with unchanged DNS answers: pyspf does not run again;
    once a record it read changes (after its TTL), the result follows the new record."""
    dns.set("cache.example.", [("TXT", "v=spf1 ip4:192.0.2.0/24 -all", 1)])
    evaluations: list[str] = []
    real = spf_module._evaluate_once

    def counting(*args: Any) -> Any:
        evaluations.append(args[2].sender)
        return real(*args)

    monkeypatch.setattr(spf_module, "_evaluate_once", counting)
    async with authenticator(dns, timeout=1.0) as auth:
        first, _ = await spf(auth, "alice@cache.example")
        runs = len(evaluations)
        again, _ = await spf(auth, "alice@cache.example")
        assert (first.result, again) == ("pass", first)
        assert len(evaluations) == runs  # served from the cache
        other, _ = await spf(auth, "bob@cache.example")  # another sender: evaluated
        assert other.result == "pass" and evaluations[-1] == "bob@cache.example"
        dns.set("cache.example.", [("TXT", "v=spf1 -all", 1)])
        await asyncio.sleep(1.2)  # the old answer's TTL runs out
        changed, _ = await spf(auth, "alice@cache.example")
        assert changed.result == "fail"
