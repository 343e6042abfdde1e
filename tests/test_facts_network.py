"""Network facts (T0) against a real DNS server on loopback and a real SQLite state store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from publicsuffixlist import PublicSuffixList

from relay.config import settings_from_mapping
from relay.contracts import Outcome
from relay.dns import Resolver
from relay.errors import FactError
from relay.facts import network
from relay.facts.base import FactRegistry, Facts, Services
from relay.facts.network import dnsbl_query, is_generic
from relay.message import Message, Peer
from relay.pipeline.recorder import Record, Recorder
from relay.secretkey import SecretKey
from relay.state import SqliteState, StateStore
from relay.verdict import Action, Tier, Verdict
from tests.support.dnsserver import LocalDns
from tests.support.golden_facts import Case, check_case, covered, family_cases

REGISTRY = FactRegistry(network.FACTS)
T0 = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC
ZONES = ["bl.test", "bl2.test", "slow.test"]
ZONE = {
    # 192.0.2.4: a well-named mail server
    "4.2.0.192.in-addr.arpa.": [("PTR", "mail.good.example.")],
    "mail.good.example.": [("A", "192.0.2.4")],
    # 192.0.2.5: a DSL pool address, listed on two blocklists
    "5.2.0.192.in-addr.arpa.": [("PTR", "192-0-2-5.dsl.isp.example.")],
    "192-0-2-5.dsl.isp.example.": [("A", "192.0.2.5")],
    "5.2.0.192.bl.test.": [("A", "127.0.0.2"), ("TXT", "listed")],
    "5.2.0.192.bl2.test.": [("A", "127.0.0.10")],
    # 192.0.2.6: a PTR name that does not resolve back
    "6.2.0.192.in-addr.arpa.": [("PTR", "mail.liar.example.")],
    "mail.liar.example.": [("A", "192.0.2.99")],
    "6.2.0.192.bl.test.": [("A", "10.0.0.1")],  # not 127/8: an error signal, not a listing
    # 2001:db8::25 over IPv6
    "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.": [
        ("PTR", "mx6.good.example.")
    ],
    "mx6.good.example.": [("AAAA", "2001:db8::25")],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LocalDns]:
    with LocalDns(
        ZONE, timeout=["8.2.0.192.in-addr.arpa.", "5.2.0.192.slow.test.", "4.2.0.192.slow.test."]
    ) as server:
        yield server


@pytest.fixture
async def services(dns_server: LocalDns, tmp_path: Path) -> AsyncIterator[Services]:
    settings = settings_from_mapping(
        {"dns": {"nameservers": [dns_server.address], "timeout": 1.0, "dnsbl_zones": ZONES[:2]}}
    )
    resolver = Resolver(settings.dns)
    state = await SqliteState(tmp_path / "state.sqlite3", key=SecretKey.generate()).open()
    yield Services(resolver=resolver, state=state)
    await state.close()
    await resolver.close()


@pytest.mark.parametrize("case", family_cases(network.FACTS), ids=lambda c: c.file)
async def test_golden(case: Case, services: Services) -> None:
    await check_case(case, network.FACTS, REGISTRY, services)


def test_every_network_fact_has_a_golden_case() -> None:
    assert covered(network.FACTS) == set()


def _msg(
    ip: str, helo: str | None = None, port: int = 0, attempted: int = 0, refused: int = 0
) -> Message:
    peer = Peer(ip=ip, port=port, helo=helo, rcpt_attempted=attempted, rcpt_refused=refused)
    return Message.from_file_bytes(b"From: a@example.com\n\nx\n", received_at=T0, peer=peer)


async def _get(msg: Message, name: str, services: Services) -> object:
    return await Facts(REGISTRY, msg, services).get(name)


@pytest.mark.parametrize(
    ("ip", "fcrdns", "generic"),
    [("192.0.2.4", True, False), ("192.0.2.5", True, True), ("192.0.2.6", False, False),
     ("192.0.2.7", False, False), ("2001:db8::25", True, False)],
)  # fmt: skip
async def test_reverse_dns(ip: str, fcrdns: bool, generic: bool, services: Services) -> None:
    facts = Facts(REGISTRY, _msg(ip), services)
    assert await facts.get("fcrdns_ok") is fcrdns
    assert await facts.get("ptr_generic") is generic
    assert facts.highest_tier() is Tier.CONNECTION


async def test_ptr_is_asked_once_for_all_reverse_facts(
    services: Services, dns_server: LocalDns
) -> None:
    before = len(dns_server.queries)
    facts = Facts(REGISTRY, _msg("192.0.2.4", helo="MAIL.GOOD.EXAMPLE."), services)
    assert await facts.get("helo_matches_ptr") is True
    await facts.get("fcrdns_ok")
    await facts.get("ptr_generic")
    asked = dns_server.queries[before:]
    assert asked.count(("4.2.0.192.in-addr.arpa.", "PTR")) == 1


async def test_dns_timeout_makes_reverse_facts_missing(services: Services) -> None:
    facts = Facts(REGISTRY, _msg("192.0.2.8", helo="mail.example"), services)
    for name in ("fcrdns_ok", "ptr_generic", "helo_matches_ptr"):
        with pytest.raises(FactError, match="timeout"):
            await facts.get(name)


async def test_dnsbl_only_127_answers_are_listings(services: Services) -> None:
    assert await _get(_msg("192.0.2.5"), "dnsbl_listed", services) == ["bl.test", "bl2.test"]
    assert await _get(_msg("192.0.2.6"), "dnsbl_listed", services) == []


async def test_dnsbl_timeout_without_listing_is_missing(
    dns_server: LocalDns, tmp_path: Path
) -> None:
    settings = settings_from_mapping(
        {"dns": {"nameservers": [dns_server.address], "timeout": 1.0, "dnsbl_zones": ZONES}}
    )
    resolver = Resolver(settings.dns)
    try:
        services = Services(resolver=resolver)
        # listed elsewhere: the listing is certain even though slow.test timed out
        assert await _get(_msg("192.0.2.5"), "dnsbl_listed", services) == ["bl.test", "bl2.test"]
        with pytest.raises(FactError, match=r"slow\.test"):
            await _get(_msg("192.0.2.4"), "dnsbl_listed", services)
    finally:
        await resolver.close()


async def test_no_zones_configured_asks_nothing(dns_server: LocalDns) -> None:
    resolver = Resolver(settings_from_mapping({"dns": {"nameservers": [dns_server.address]}}).dns)
    before = len(dns_server.queries)
    try:
        assert await _get(_msg("192.0.2.5"), "dnsbl_listed", Services(resolver=resolver)) == []
    finally:
        await resolver.close()
    assert dns_server.queries[before:] == []


def test_dnsbl_query_names() -> None:
    assert dnsbl_query("192.0.2.5", "bl.test") == "5.2.0.192.bl.test"
    assert dnsbl_query("2001:db8::1", "bl.test").endswith(".8.b.d.0.1.0.0.2.bl.test")
    assert dnsbl_query("2001:db8::1", "bl.test").startswith("1.0.0.0.")


@pytest.mark.parametrize(
    ("name", "ip", "generic"),
    [("192-0-2-5.dsl.isp.example", "192.0.2.5", True),
     ("5.2.0.192.broadband.example.net", "192.0.2.5", True),
     ("c0000205.example.net", "192.0.2.5", True),
     ("dyn-pool17.isp.example", "198.51.100.1", True),
     ("mail.example.com", "192.0.2.5", False),
     ("mx2.mailhost.example.org", "192.0.2.5", False),
     ("smtp-out-192.example.org", "192.0.2.5", False)],
)  # fmt: skip
def test_generic_names(name: str, ip: str, generic: bool) -> None:
    assert is_generic(name, ip) is generic


async def test_connection_rate_counts_connections_per_minute(services: Services) -> None:
    assert services.state is not None
    recorder = Recorder(services.state, PublicSuffixList(), records={Record.CONNECTION})
    rates = []
    for port, when in ((1001, 0.0), (1002, 10.0), (1001, 20.0), (1003, 30.0), (1004, 85.0)):
        msg = _msg("198.51.100.7", port=port)
        msg = Message(msg.raw, msg.envelope, msg.peer, received_at=1_000_000.0 + when)
        facts = Facts(REGISTRY, msg, services)
        rates.append(await facts.get("connection_rate"))
        assert await facts.get("connection_rate") == rates[-1]  # reading records nothing
        # The pipeline records the connection after the action, whatever the policy read.
        await recorder.record(msg, facts, Verdict(Action.ACCEPT), Outcome.DELIVERED)
    # the third message reuses connection 1001; at +85 s only 1003 is still in the window
    assert rates == [1.0, 2.0, 2.0, 3.0, 2.0]
    # Stored mail has no source port: each message counts (as if recorded) once.
    stored = Message(msg.raw, msg.envelope, Peer(ip="198.51.100.7"), received_at=1_000_090.0)
    assert await _get(stored, "connection_rate", services) == 2.0  # 1004 and itself
    assert await _get(stored, "connection_rate", services) == 2.0


async def test_invalid_rcpt_ratio(services: Services) -> None:
    msg = _msg("192.0.2.4", attempted=8, refused=6)
    assert await _get(msg, "invalid_rcpt_ratio", services) == 0.75
    with pytest.raises(FactError, match="not recorded"):
        await _get(_msg("192.0.2.4"), "invalid_rcpt_ratio", services)


async def test_state_service_needed_for_rate(dns_server: LocalDns) -> None:
    with pytest.raises(FactError, match="service state is not configured"):
        await _get(_msg("192.0.2.4", port=1), "connection_rate", Services())


def test_state_is_the_shared_store() -> None:
    assert issubclass(SqliteState, StateStore)
