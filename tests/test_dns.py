"""relay.dns.Resolver against a real DNS server on loopback (tests/support/dnsserver.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from relay.config import DnsSettings, settings_from_mapping
from relay.dns import DnsTemporaryError, Resolver
from relay.errors import FactError
from tests.support.dnsserver import LocalDns, Zone

LONG_TXT = "v=DKIM1; k=rsa; p=" + "A" * 600


@pytest.fixture
def local_dns() -> Iterator[LocalDns]:
    zone: Zone = {
        "example.test.": [
            ("TXT", "v=spf1 -all"),
            ("TXT", LONG_TXT),
            ("A", "127.0.0.2"),
            ("AAAA", "::1"),
            ("MX", "10 mx.example.test."),
        ],
        "short.example.test.": [("TXT", "hello", 1)],
        "alias.example.test.": [("CNAME", "example.test.")],
        "2.0.0.127.in-addr.arpa.": [("PTR", "host.example.test.")],
        "xn--bcher-kva.example.": [("TXT", "idna")],
    }
    with LocalDns(zone, timeout=["slow.example.test."], servfail=["broken.example.test."]) as dns:
        yield dns


@pytest.fixture
async def resolver(local_dns: LocalDns) -> AsyncIterator[Resolver]:
    r = Resolver(DnsSettings(nameservers=(("127.0.0.1", local_dns.port),), timeout=2.0))
    yield r
    await r.close()


async def test_txt_joins_character_strings(resolver: Resolver) -> None:
    records = await resolver.txt("example.test")
    assert b"v=spf1 -all" in records
    assert LONG_TXT.encode() in records  # > 255 bytes: served as several strings


async def test_record_types(resolver: Resolver) -> None:
    assert await resolver.query("example.test", "A") == ["127.0.0.2"]
    assert await resolver.addresses("example.test.") == ["127.0.0.2", "::1"]
    assert await resolver.query("example.test", "MX") == ["10 mx.example.test."]
    assert await resolver.mx("example.test") == [(10, "mx.example.test")]
    assert await resolver.ptr("127.0.0.2") == ["host.example.test"]
    assert await resolver.txt("alias.example.test") == await resolver.txt("example.test")


async def test_nxdomain_and_no_data_are_empty(resolver: Resolver) -> None:
    assert await resolver.txt("missing.example.test") == []
    assert await resolver.query("short.example.test", "A") == []
    assert await resolver.ptr("not an ip") == []
    assert await resolver.txt("bad..name") == []


async def test_non_ascii_name_is_idna_encoded(resolver: Resolver) -> None:
    assert await resolver.txt("bücher.example") == [b"idna"]


async def test_timeout_is_temporary_error(resolver: Resolver, local_dns: LocalDns) -> None:
    start = time.monotonic()
    with pytest.raises(DnsTemporaryError) as info:
        await resolver.txt("slow.example.test")
    assert isinstance(info.value, FactError)
    assert time.monotonic() - start < 5.0


async def test_servfail_is_temporary_error(resolver: Resolver) -> None:
    with pytest.raises(DnsTemporaryError):
        await resolver.txt("broken.example.test")


async def test_cache_answers_repeat_questions(resolver: Resolver, local_dns: LocalDns) -> None:
    await resolver.txt("example.test")
    await resolver.txt("missing.example.test")
    asked = len(local_dns.queries)
    assert await resolver.txt("EXAMPLE.test.")
    assert await resolver.txt("missing.example.test") == []
    assert len(local_dns.queries) == asked  # positive and negative answers cached


async def test_cache_respects_ttl(resolver: Resolver, local_dns: LocalDns) -> None:
    assert await resolver.txt("short.example.test") == [b"hello"]
    local_dns.set("short.example.test.", [("TXT", "changed", 1)])
    assert await resolver.txt("short.example.test") == [b"hello"]  # still cached
    await asyncio.sleep(1.2)
    assert await resolver.txt("short.example.test") == [b"changed"]


async def test_concurrent_questions_share_one_query(
    resolver: Resolver, local_dns: LocalDns
) -> None:
    results = await asyncio.gather(*(resolver.txt("example.test") for _ in range(20)))
    assert all(r == results[0] for r in results)
    assert local_dns.queries.count(("example.test.", "TXT")) == 1


async def test_settings_nameserver_hostport(local_dns: LocalDns) -> None:
    settings = settings_from_mapping({"dns": {"nameservers": [local_dns.address], "timeout": 1}})
    r = Resolver(settings.dns)
    try:
        assert await r.query("example.test", "A") == ["127.0.0.2"]
    finally:
        await r.close()


async def test_peek_reads_the_cache_without_waiting(resolver: Resolver) -> None:
    assert resolver.peek_txt("example.test") is None  # not asked yet
    assert resolver.peek_query("missing.example.test", "A") is None
    await resolver.txt("example.test")
    await resolver.mx("example.test")
    await resolver.query("missing.example.test", "A")
    await resolver.query("alias.example.test", "A")
    assert b"v=spf1 -all" in (resolver.peek_txt("EXAMPLE.test.") or [])
    assert resolver.peek_mx("example.test") == [(10, "mx.example.test")]
    assert resolver.peek_query("missing.example.test", "A") == []  # cached NXDOMAIN
    assert resolver.peek_query("alias.example.test", "A") == ["127.0.0.2"]  # via CNAME
    assert resolver.peek_query("example.test", "AAAA") is None


async def test_cache_is_bounded_by_cache_size(local_dns: LocalDns) -> None:
    r = Resolver(
        DnsSettings(nameservers=(("127.0.0.1", local_dns.port),), timeout=2.0, cache_size=2)
    )
    try:
        for name in ("example.test", "short.example.test", "xn--bcher-kva.example"):
            await r.txt(name)
        asked = local_dns.queries.count(("example.test.", "TXT"))
        assert r.peek_txt("example.test") is None  # the oldest answer was dropped
        assert await r.txt("example.test")
        assert local_dns.queries.count(("example.test.", "TXT")) == asked + 1
        assert await r.txt("xn--bcher-kva.example") == [b"idna"]  # the newest is kept
        assert local_dns.queries.count(("xn--bcher-kva.example.", "TXT")) == 1
    finally:
        await r.close()
