"""Fact registry rules and the lazy, once-per-message evaluator."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from publicsuffixlist import PublicSuffixList

from relay.errors import FactError
from relay.facts import Facts, FactSpec, FactType, Services, default_registry
from relay.facts.base import FactContext, FactRegistry, missing_services
from relay.facts.services import AUTHENTICATOR, CLASSIFIER, PSL, STATE
from relay.message import Envelope, Message, Peer
from relay.verdict import Tier


def message() -> Message:
    return Message(
        b"Subject: x\r\n\r\nbody\r\n",
        Envelope("a@sender.test", ("b@example.org", "c@example.org")),
        Peer("192.0.2.7", helo="mx.sender.test"),
        received_at=1_795_000_000.0,
    )


def test_default_registry_has_foundation_facts() -> None:
    reg = default_registry()
    for name in ("client_ip", "helo", "tls_used", "recipient_count", "mail_from_domain"):
        assert name in reg
    assert reg["client_ip"].tier is Tier.CONNECTION
    assert reg["recipient_count"].tier is Tier.ENVELOPE


async def test_foundation_fact_values() -> None:
    facts = Facts(default_registry(), message(), Services())
    assert await facts.get("client_ip") == "192.0.2.7"
    assert await facts.get("recipient_count") == 2
    assert await facts.get("mail_from_domain") == "sender.test"
    assert await facts.get("tls_used") is False


async def test_computed_once_even_when_asked_concurrently() -> None:
    calls = 0

    async def slow(ctx: FactContext) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 7

    reg = FactRegistry([FactSpec("n", FactType.INT, Tier.ENVELOPE, slow)])
    facts = Facts(reg, message(), Services())
    assert list(await asyncio.gather(facts.get("n"), facts.get("n"), facts.get("n"))) == [7] * 3
    assert calls == 1
    (read,) = facts.reads()
    assert read.name == "n" and read.value == 7 and read.error is None and read.seconds > 0


async def test_a_reader_waiting_on_a_cancelled_computation_computes_it_itself() -> None:
    """The first reader computes in its own task; cancelling it stops the computation,
    and a reader that was waiting for it (not cancelled itself) computes the fact again
    instead of failing with the other's cancellation."""
    started: list[int] = []
    release = asyncio.Event()

    async def gated(ctx: FactContext) -> int:
        started.append(len(started))
        await release.wait()
        return 5

    reg = FactRegistry([FactSpec("g", FactType.INT, Tier.ENVELOPE, gated)])
    facts = Facts(reg, message(), Services())
    first = asyncio.ensure_future(facts.get("g"))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(facts.get("g"))
    await asyncio.sleep(0)
    assert started == [0]  # one computation, the second reader waits for it
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await second == 5
    assert first.cancelled() and started == [0, 1]
    assert await facts.get("g") == 5 and started == [0, 1]  # known now: not again


async def test_a_cancelled_reader_leaves_the_fact_to_be_computed_later() -> None:
    calls = 0

    async def slow(ctx: FactContext) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600 if calls == 1 else 0)
        return calls

    reg = FactRegistry([FactSpec("s", FactType.INT, Tier.ENVELOPE, slow)])
    facts = Facts(reg, message(), Services())
    reader = asyncio.ensure_future(facts.get("s"))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert not facts.computed("s")
    assert await facts.get("s") == 2


async def test_failure_is_recorded_and_repeated_never_crashes() -> None:
    async def broken(ctx: FactContext) -> int:
        raise RuntimeError("model exploded")

    reg = FactRegistry([FactSpec("p", FactType.FLOAT, Tier.CONTENT, broken)])
    facts = Facts(reg, message(), Services())
    for _ in range(2):
        with pytest.raises(FactError, match="model exploded"):
            await facts.get("p")
    assert facts.reads()[0].error == "RuntimeError: model exploded"
    assert facts.highest_tier() is Tier.CONTENT


async def test_undeclared_dependency_is_refused() -> None:
    async def a(ctx: FactContext) -> int:
        return 1

    async def sneaky(ctx: FactContext) -> int:
        return int(await ctx.get("a")) + 1

    reg = FactRegistry(
        [
            FactSpec("a", FactType.INT, Tier.ENVELOPE, a),
            FactSpec("b", FactType.INT, Tier.ENVELOPE, sneaky),
        ]
    )
    with pytest.raises(FactError, match="undeclared dependency"):
        await Facts(reg, message(), Services()).get("b")


async def test_preset_values_are_used_without_computing() -> None:
    async def never(ctx: FactContext) -> int:
        raise AssertionError("computed")

    reg = FactRegistry([FactSpec("n", FactType.INT, Tier.FINGERPRINT, never)])
    facts = Facts(reg, message(), Services(), preset={"n": 3})
    assert await facts.get("n") == 3


@pytest.mark.parametrize(
    ("specs", "error"),
    [
        ([("a", Tier.ENVELOPE, ()), ("a", Tier.ENVELOPE, ())], "registered twice"),
        ([("a", Tier.ENVELOPE, ("zz",))], "unknown fact"),
        ([("a", Tier.ENVELOPE, ("b",)), ("b", Tier.ENVELOPE, ("a",))], "cycle"),
        ([("cheap", Tier.ENVELOPE, ("body",)), ("body", Tier.CONTENT, ())], "tier must cover"),
    ],
)
def test_registry_rules(specs: list[tuple[str, Tier, tuple[str, ...]]], error: str) -> None:
    async def compute(ctx: FactContext) -> int:
        return 0

    with pytest.raises(ValueError, match=error):
        FactRegistry(FactSpec(n, FactType.INT, t, compute, depends=d) for n, t, d in specs)


async def test_a_fact_gets_its_declared_service_typed_or_a_fact_error() -> None:
    psl = PublicSuffixList()

    async def org(ctx: FactContext) -> str:
        return str(ctx.service(PSL).privatesuffix("a.b.example.co.uk"))

    async def sneaky(ctx: FactContext) -> object:
        return ctx.service(STATE)  # not declared

    reg = FactRegistry(
        [
            FactSpec("org", FactType.STR, Tier.ENVELOPE, org, needs=(PSL,)),
            FactSpec("sneaky", FactType.OBJECT, Tier.ENVELOPE, sneaky),
        ]
    )
    assert await Facts(reg, message(), Services(psl=psl)).get("org") == "example.co.uk"
    with pytest.raises(FactError, match="service psl is not configured"):
        await Facts(reg, message(), Services()).get("org")
    with pytest.raises(FactError, match="undeclared service 'state'"):
        await Facts(reg, message(), Services(psl=psl)).get("sneaky")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Services().psl = psl  # type: ignore[misc]


def test_missing_services_follow_dependencies_and_skip_lab_only_facts() -> None:
    reg = default_registry()
    none = Services()
    assert ("spam_probability", "classifier", CLASSIFIER) in missing_services(
        reg, ["spam_probability"], none
    )
    assert ("dmarc", "auth_results", AUTHENTICATOR) in missing_services(reg, ["dmarc"], none)
    assert missing_services(reg, ["consent_listed", "recipient_count"], none) == []


def test_fact_values_are_recorded_as_json_safe_copies() -> None:
    from enum import StrEnum
    from pathlib import Path

    from relay.facts.base import _jsonable

    class Word(StrEnum):
        PASS = "pass"

    value = {
        "s": "x",
        1: (True, None, 2.5, [Word.PASS, {"deep": frozenset({3})}]),
        "path": Path("a/b"),
        "set": {4},
    }
    copy = _jsonable(value)
    assert copy == {
        "s": "x",
        "1": [True, None, 2.5, ["pass", {"deep": [3]}]],
        "path": "a/b",
        "set": [4],
    }
    assert json.loads(json.dumps(copy)) == copy
    assert copy["1"] is not value[1] and type(copy["1"][3][0]) is Word


def test_cache_version_changes_with_any_input_fact() -> None:
    async def value(ctx: FactContext) -> int:
        return 1

    def registry(text_version: int, count_version: int = 1) -> FactRegistry:
        return FactRegistry(
            [
                FactSpec("text", FactType.STR, Tier.CONTENT, value, version=text_version),
                FactSpec("prints", FactType.INT, Tier.CONTENT, value, depends=("text",)),
                FactSpec(
                    "count",
                    FactType.INT,
                    Tier.CONTENT,
                    value,
                    depends=("prints",),
                    version=count_version,
                ),
                FactSpec("other", FactType.INT, Tier.CONTENT, value, version=3),
            ]
        )

    old, new = registry(1), registry(2)
    # A leaf keeps its own version (existing cache entries stay valid)...
    assert old.cache_version("text") == 1 and new.cache_version("text") == 2
    assert old.cache_version("other") == new.cache_version("other") == 3
    # ... and everything computed from a changed input, however far down, gets a new key.
    assert old.cache_version("prints") != new.cache_version("prints")
    assert old.cache_version("count") != new.cache_version("count")
    assert registry(1, 2).cache_version("count") != old.cache_version("count")
    assert registry(1).cache_version("count") == old.cache_version("count")  # stable
