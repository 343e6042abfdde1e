"""Greylisting and rate-limit facts over a real SQLite state store, with the recorder.

Facts only read; each test records a message after reading its facts, as
``Pipeline.process`` does. Time is the message's ``received_at``, pinned here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from publicsuffixlist import PublicSuffixList

from relay.config import GreylistSettings, RateBucket, RateLimitSettings
from relay.contracts import Outcome
from relay.errors import FactError, PolicyError, StateError
from relay.facts import default_registry
from relay.facts.base import Facts
from relay.facts.services import Services
from relay.facts.throttlekeys import client_network, greylist_sender, normal_address
from relay.message import Message, Peer
from relay.pipeline.recorder import Record, Recorder, records_for
from relay.policy import compile_policy
from relay.secretkey import SecretKey
from relay.state import RedisState, StateStore
from relay.verdict import ACCEPT_ALL, Action
from tests.test_state import opener, redis_url, store

__all__ = ["opener", "redis_url", "store"]  # fixtures shared with tests/test_state.py

REGISTRY = default_registry()
T0 = 1_773_133_200.0
GREY = GreylistSettings(auto_allow_after=0)
RATES = RateLimitSettings(
    client_ip=RateBucket(rate=6.0, burst=3),  # a token every 10 s
    sender_domain=RateBucket(rate=60.0, burst=5),
    recipient=RateBucket(rate=1.0, burst=2),
)
BODY = b"From: a@sender.test\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def psl() -> PublicSuffixList:
    return PublicSuffixList()


@pytest.fixture
def state(store: StateStore) -> StateStore:
    """Every case on SQLite and on a real redis-server (tests/test_state.py's fixtures)."""
    return store


def message(
    now: float,
    *,
    ip: str = "192.0.2.10",
    sender: str = "alice@sender.test",
    rcpts: Sequence[str] = ("bob@example.org",),
    authenticated: bool = False,
) -> Message:
    return Message.from_file_bytes(
        BODY,
        received_at=now,
        mail_from=sender,
        rcpt_to=rcpts,
        peer=Peer(ip=ip, port=40000, helo="mx.sender.test", authenticated=authenticated),
    )


class World:
    """One relay's facts and recorder over one store."""

    def __init__(
        self,
        state: StateStore,
        psl: PublicSuffixList,
        grey: GreylistSettings = GREY,
        rates: RateLimitSettings = RATES,
    ) -> None:
        self.services = Services(state=state, psl=psl, greylist=grey, ratelimit=rates)
        self.recorder = Recorder(state, psl, greylist=grey, ratelimit=rates)

    def facts(self, msg: Message, preset: Mapping[str, Any] | None = None) -> Facts:
        return Facts(REGISTRY, msg, self.services, preset)

    async def read(self, msg: Message, *names: str) -> list[Any]:
        facts = self.facts(msg)
        return [await facts.get(n) for n in names]

    async def arrive(self, msg: Message, *names: str) -> list[Any]:
        """Read ``names`` (greylist by default), then record the message."""
        facts = self.facts(msg)
        values = [await facts.get(n) for n in names or ("greylist",)]
        await self.recorder.record(msg, facts, ACCEPT_ALL, Outcome.DELIVERED)
        return values


@pytest.fixture
def world(state: StateStore, psl: PublicSuffixList) -> World:
    return World(state, psl)


# --- keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "normal"),
    [
        ("Bob@Example.ORG", "bob@example.org"),
        ("bob@example.org.", "bob@example.org"),
        ("bob@bücher.example", "bob@xn--bcher-kva.example"),
        ("bob@XN--BCHER-KVA.example", "bob@xn--bcher-kva.example"),
        ("<bob@example.org>", "bob@example.org"),
        ('"bob"@example.org', "bob@example.org"),
        ("", ""),
    ],
)
def test_addresses_are_normalised(spelling: str, normal: str) -> None:
    assert normal_address(spelling) == normal


def test_greylist_sender_folds_batv_and_digits() -> None:
    assert greylist_sender("prvs=1234abcdef=Bounce-42@Lists.Example.") == "bounce-#@lists.example"
    assert greylist_sender("bounce-43@lists.example") == "bounce-#@lists.example"
    assert greylist_sender("") == ""


@pytest.mark.parametrize(
    ("ip", "net"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("::ffff:192.0.2.77", "192.0.2.0/24"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ],
)
def test_client_networks(ip: str, net: str) -> None:
    assert client_network(ip, 24, 64) == net


# --- greylisting -----------------------------------------------------------------------


async def test_greylist_new_early_passed_then_at_once(world: World) -> None:
    assert await world.arrive(message(T0), "greylist", "greylist_wait") == ["new", 300]
    assert await world.arrive(message(T0 + 100), "greylist", "greylist_wait") == ["early", 200]
    assert await world.arrive(message(T0 + 299.5), "greylist", "greylist_wait") == ["early", 1]
    # After the delay the retry passes; the recorder marks the triplet passed.
    assert await world.arrive(message(T0 + 300), "greylist", "greylist_wait") == ["passed", 0]
    # Later mail for the triplet passes at once, weeks later (refreshed on each use).
    assert await world.arrive(message(T0 + 20 * 86400)) == ["passed"]
    assert await world.arrive(message(T0 + 50 * 86400)) == ["passed"]
    # Unused for longer than the lifetime (36 days): greylisted again.
    assert await world.read(message(T0 + 50 * 86400 + GREY.lifetime), "greylist") == ["new"]


async def test_a_retry_after_the_window_starts_again(world: World) -> None:
    await world.arrive(message(T0))
    late = T0 + GREY.delay + GREY.retry_window + 1
    assert await world.arrive(message(late), "greylist", "greylist_wait") == ["new", 300]
    assert await world.arrive(message(late + 299)) == ["early"]
    assert await world.arrive(message(late + 300)) == ["passed"]


async def test_reading_alone_records_nothing(world: World) -> None:
    for _ in range(3):
        assert await world.read(message(T0), "greylist") == ["new"]
    assert await world.read(message(T0 + 400), "greylist") == ["new"]


@pytest.mark.parametrize(
    ("sender", "rcpt"),
    [
        ("ALICE@Sender.Test", "bob@example.org"),
        ("alice@sender.test.", "Bob@EXAMPLE.org."),
        ("alice@sender.test", '"bob"@example.org'),
    ],
)
async def test_spelling_cannot_dodge_a_triplet(world: World, sender: str, rcpt: str) -> None:
    await world.arrive(message(T0))
    spelled = message(T0 + 10, sender=sender, rcpts=[rcpt])
    assert await world.read(spelled, "greylist") == ["early"]  # not "new": same triplet


async def test_unicode_and_a_label_domains_are_one_triplet(world: World) -> None:
    await world.arrive(message(T0, sender="anna@bücher.example", rcpts=["bob@bücher.example"]))
    spelled = message(
        T0 + 10, sender="Anna@XN--BCHER-KVA.example", rcpts=["bob@xn--bcher-kva.example."]
    )
    assert await world.read(spelled, "greylist") == ["early"]


async def test_pool_retries_within_the_network_pass(world: World) -> None:
    await world.arrive(message(T0, ip="192.0.2.10"))
    assert await world.read(message(T0 + 400, ip="192.0.2.200"), "greylist") == ["passed"]
    assert await world.read(message(T0 + 400, ip="192.0.3.10"), "greylist") == ["new"]
    await world.arrive(message(T0, ip="2001:db8::1"))
    assert await world.read(message(T0 + 400, ip="2001:db8::ffff:2"), "greylist") == ["passed"]
    assert await world.read(message(T0 + 400, ip="2001:db8:0:1::1"), "greylist") == ["new"]


async def test_several_recipients_wait_for_the_least_advanced(world: World) -> None:
    await world.arrive(message(T0, rcpts=["a@example.org"]))
    await world.arrive(message(T0 + 400, rcpts=["a@example.org"]))  # a passed
    await world.arrive(message(T0 + 500, rcpts=["b@example.org"]))  # b first seen
    both = ["a@example.org", "b@example.org"]
    assert await world.read(message(T0 + 600, rcpts=both), "greylist", "greylist_wait") == [
        "early",
        200,
    ]
    three = [*both, "c@example.org"]
    assert await world.arrive(message(T0 + 600, rcpts=three), "greylist", "greylist_wait") == [
        "new",
        300,
    ]
    assert await world.read(message(T0 + 900, rcpts=three), "greylist") == ["passed"]


async def test_exempt_off_and_authenticated_clients_record_nothing(
    state: StateStore, psl: PublicSuffixList
) -> None:
    exempt = World(
        state, psl, GreylistSettings(exempt_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    )
    assert await exempt.arrive(message(T0)) == ["exempt"]
    assert await exempt.arrive(message(T0, ip="::ffff:192.0.2.9")) == ["exempt"]
    assert await exempt.arrive(message(T0, ip="198.51.100.1", authenticated=True)) == ["exempt"]
    off = World(state, psl, GreylistSettings(enabled=False))
    assert await off.arrive(message(T0), "greylist", "greylist_wait") == ["off", 0]
    assert await World(state, psl).read(message(T0 + 400), "greylist") == ["new"]


async def test_a_network_that_passed_often_is_allowed(
    state: StateStore, psl: PublicSuffixList
) -> None:
    world = World(state, psl, GreylistSettings(auto_allow_after=2))
    for rcpt in ("a@example.org", "b@example.org"):
        await world.arrive(message(T0, rcpts=[rcpt]))
        assert await world.arrive(message(T0 + 300, rcpts=[rcpt])) == ["passed"]
    # Two distinct triplets passed from 192.0.2.0/24: new triplets from there pass at once.
    fresh = message(T0 + 301, ip="192.0.2.99", sender="x@else.test", rcpts=["z@example.org"])
    assert await world.read(fresh, "greylist") == ["passed"]
    assert await world.read(message(T0 + 301, ip="192.0.3.1"), "greylist") == ["new"]


@pytest.mark.parametrize(
    ("settings", "preset", "expected"),
    [
        (GREY, {"dmarc": "pass"}, True),
        (GreylistSettings(exempt_dmarc_pass=False), {"dmarc": "pass"}, False),
        (GREY, {"dmarc": "fail"}, False),
        (
            GreylistSettings(exempt_sender_domains=("bank.example",)),
            {"dmarc": "none", "spf": "pass", "spf_domain": "Bank.Example."},
            True,
        ),
        (
            GreylistSettings(exempt_sender_domains=(".bank.example",)),
            {
                "dmarc": "none",
                "spf": "fail",
                "spf_domain": "x",
                "dkim_domains_pass": ["m.bank.example"],
            },
            True,
        ),
        (  # a forged sender domain that authenticates nothing is not exempt
            GreylistSettings(exempt_sender_domains=("bank.example",)),
            {"dmarc": "none", "spf": "fail", "spf_domain": "bank.example", "dkim_domains_pass": []},
            False,
        ),
    ],
)
async def test_greylist_authenticated(
    state: StateStore,
    psl: PublicSuffixList,
    settings: GreylistSettings,
    preset: dict[str, Any],
    expected: bool,
) -> None:
    facts = World(state, psl, settings).facts(message(T0), preset)
    assert await facts.get("greylist_authenticated") is expected


# --- rate limits -----------------------------------------------------------------------


async def test_client_bucket_refuses_the_burst_plus_first(world: World) -> None:
    waits = [
        (await world.arrive(message(T0, rcpts=[f"r{i}@example.org"]), "rate_client_ip_wait"))[0]
        for i in range(4)
    ]
    assert waits == [0, 0, 0, 10]  # burst 3; a token every 10 s
    assert await world.read(message(T0 + 4), "rate_client_ip_wait") == [6]
    assert await world.read(message(T0 + 10), "rate_client_ip_wait") == [0]
    # Another address of the /24 is another IPv4 client: its own bucket.
    assert await world.read(message(T0, ip="192.0.2.11"), "rate_client_ip_wait") == [0]


async def test_a_refused_message_costs_no_token(world: World) -> None:
    for i in range(3):
        await world.arrive(message(T0, rcpts=[f"r{i}@example.org"]), "rate_client_ip_wait")
    for _ in range(5):  # refused while empty: taking nothing
        await world.arrive(message(T0 + 5, rcpts=["x@example.org"]), "rate_client_ip_wait")
    assert await world.read(message(T0 + 10), "rate_client_ip_wait") == [0]


async def test_ipv6_clients_share_their_64(world: World) -> None:
    for i in range(3):
        await world.arrive(message(T0, ip=f"2001:db8::{i + 1}", rcpts=[f"r{i}@example.org"]))
    assert await world.read(message(T0, ip="2001:db8::ffff"), "rate_client_ip_wait") == [10]


async def test_recipient_buckets_and_their_spellings(world: World) -> None:
    await world.arrive(message(T0, ip="198.51.100.1", rcpts=["Bob@Example.org"]))
    await world.arrive(message(T0, ip="198.51.100.2", rcpts=["bob@example.org."]))
    for spelling in ("bob@EXAMPLE.ORG", '"bob"@example.org'):
        msg = message(T0, ip="198.51.100.3", rcpts=["carol@example.org", spelling])
        assert await world.read(msg, "rate_recipient_wait", "rate_limit_wait") == [60, 60]
    idn = world
    await idn.arrive(message(T0, ip="198.51.100.4", rcpts=["eva@bücher.example"]))
    await idn.arrive(message(T0, ip="198.51.100.5", rcpts=["eva@xn--bcher-kva.example"]))
    assert await idn.read(
        message(T0, ip="198.51.100.6", rcpts=["EVA@XN--BCHER-KVA.EXAMPLE."]), "rate_recipient_wait"
    ) == [60]


async def test_sender_domain_bucket_is_the_organisational_domain(world: World) -> None:
    senders = ["a@News.Shop.example", "b@shop.example.", "c@mail.shop.example"]
    senders += ["d@shop.example", "e@x.shop.example"]
    for i, sender in enumerate(senders):
        await world.arrive(message(T0, ip=f"198.51.100.{i}", sender=sender, rcpts=[f"{i}@e.org"]))
    msg = message(T0, ip="203.0.113.1", sender="f@SHOP.example", rcpts=["z@e.org"])
    assert await world.read(msg, "rate_sender_domain_wait", "rate_limit_wait") == [1, 1]
    bounce = message(T0, ip="203.0.113.2", sender="", rcpts=["y@e.org"])
    assert await world.read(bounce, "rate_sender_domain_wait") == [0]  # no domain, no bucket


async def test_buckets_off_exempt_or_without_client(
    state: StateStore, psl: PublicSuffixList
) -> None:
    off = World(state, psl, rates=RateLimitSettings(client_ip=RateBucket(0.0, 1)))
    exempt = World(
        state,
        psl,
        rates=dataclasses.replace(RATES, exempt_networks=(ipaddress.ip_network("192.0.2.0/24"),)),
    )
    for w in (off, exempt):
        for _ in range(5):
            assert await w.arrive(message(T0), "rate_client_ip_wait") == [0]
    assert await World(state, psl).read(message(T0), "rate_client_ip_wait") == [0]  # untouched
    assert await World(state, psl).read(message(T0, ip=""), "rate_limit_wait") == [0]


def test_records_follow_the_facts_read() -> None:
    assert records_for(REGISTRY.closure(["greylist"])) == {Record.GREYLIST}
    assert records_for(REGISTRY.closure(["rate_limit_wait"])) == {Record.RATE}


# --- failures: fail open -------------------------------------------------------------


async def test_a_failing_store_makes_the_facts_missing_and_the_recorder_quiet(
    psl: PublicSuffixList, caplog: pytest.LogCaptureFixture
) -> None:
    dead = RedisState("redis://127.0.0.1:1/0", key=SecretKey.generate())
    try:
        world = World(dead, psl)
        facts = world.facts(message(T0))
        for name in ("greylist", "greylist_wait", "rate_client_ip_wait", "rate_limit_wait"):
            with pytest.raises(FactError) as err:
                await facts.get(name)
            # A state failure, not a fact saying "missing": the StateError is the cause.
            assert isinstance(err.value.__cause__, StateError), name
        read = facts.read("greylist_check")
        assert read is not None and read.error is not None and "StateError" in read.error
        await world.recorder.record(message(T0), facts, ACCEPT_ALL, Outcome.DELIVERED)
        assert "record=rate failed: StateError" in caplog.text
    finally:
        await dead.close()


POLICY = """
[policy]
name = "throttle"
mode = "enforce"
[policy.thresholds]
tag = 5
reject = 15
[[rule]]
name = "rate_limit"
when = "rate_limit_wait > 0"
action = "tempfail"
reason = "Too many messages, try again in {rate_limit_wait} seconds"
[[rule]]
name = "greylist"
when = 'greylist in ["new", "early"] && !greylist_authenticated'
action = "tempfail"
reason = "Greylisted, try again in {greylist_wait} seconds"
"""


async def test_policy_defers_with_the_wait_in_the_reason(world: World) -> None:
    policy = compile_policy(POLICY, REGISTRY)
    assert {"greylist_wait", "rate_limit_wait"} <= policy.fact_names
    msg = message(T0)
    facts = world.facts(
        msg, {"dmarc": "none", "spf": "none", "spf_domain": "", "dkim_domains_pass": []}
    )
    verdict = await policy.decide(msg, facts)
    assert (verdict.action, verdict.forced_by) == (Action.TEMPFAIL, "greylist")
    assert verdict.reason == "Greylisted, try again in 300 seconds"
    await world.recorder.record(msg, facts, verdict, Outcome.TEMPFAILED)
    facts = world.facts(message(T0 + 120), {"dmarc": "pass"})
    verdict = await policy.decide(facts.message, facts)  # DMARC pass: not greylisted
    assert verdict.action is Action.ACCEPT


async def test_a_failed_greylist_fact_does_not_tempfail(psl: PublicSuffixList) -> None:
    dead = RedisState("redis://127.0.0.1:1/0", key=SecretKey.generate())
    try:
        policy = compile_policy(POLICY, REGISTRY)
        facts = World(dead, psl).facts(message(T0), {"dmarc": "none"})
        verdict = await policy.decide(facts.message, facts)
    finally:
        await dead.close()
    assert verdict.action is Action.ACCEPT
    assert {s.rule for s in verdict.skipped} == {"rate_limit", "greylist"}


def test_the_shipped_examples_are_valid_when_uncommented() -> None:
    text = Path("config/policy.toml").read_text()
    example = re.findall(r"^# (\[\[rule\]\]\n(?:# [a-z].*\n)+)", text, re.MULTILINE)
    assert len(example) == 2
    body = "".join(block.replace("\n# ", "\n") for block in example)
    policy = compile_policy(f'[policy]\nname = "x"\n{body}', REGISTRY)
    assert [r.name for r in policy.rules] == ["rate_limit", "greylist"]
    shipped = compile_policy(text, REGISTRY)
    assert not {"greylist", "greylist_check", "rate_limit_wait"} & shipped.fact_names


@pytest.mark.parametrize(
    ("reason", "problem"),
    [
        (
            "wait {rate_limt_wait} s",
            "unknown fact 'rate_limt_wait' in 'reason' (did you mean 'rate_limit_wait'?)",
        ),
        ("hello {helo}", "'reason' may show numeric facts only; 'helo' is str"),
    ],
)
def test_reason_placeholders_are_checked(reason: str, problem: str) -> None:
    text = '[policy]\nname = "x"\n[[rule]]\nname = "r"\nwhen = "true"\naction = "tempfail"\n'
    text += f'reason = "{reason}"\n'
    with pytest.raises(PolicyError) as err:
        compile_policy(text, REGISTRY, "p.toml")
    assert err.value.problems == [f"p.toml:7: rule 'r': {problem}"]


def test_other_braces_stay_text() -> None:
    text = '[policy]\nname = "x"\n[[rule]]\nname = "r"\nwhen = "true"\naction = "tempfail"\n'
    text += 'reason = "see {the docs} and {}"\n'
    (rule,) = compile_policy(text, REGISTRY).rules
    assert rule.reason_for({}) == "see {the docs} and {}" and rule.reads == ()
