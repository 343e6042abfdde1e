"""Pass 1 hands pass 2 only the structured values pass 2 will read again (lab/compute.py):
a stateful fact whose input is a known scalar needs none of what that scalar was made from."""

from __future__ import annotations

from typing import Any

from relay.errors import FactError
from relay.facts.base import FactContext, FactRegistry, Facts, FactSpec, FactType, Services
from relay.facts.services import STATE
from relay.lab.compute import DEFERRED, _carried, collect
from relay.message import Message
from relay.verdict import Tier


def _registry(fingerprint_fails: bool) -> FactRegistry:
    async def body(ctx: FactContext) -> dict[str, Any]:
        return {"text": "hello"}

    async def fingerprint(ctx: FactContext) -> list[str]:
        text = (await ctx.get("body"))["text"]
        if fingerprint_fails:
            raise FactError("no fingerprint")
        return ["k:" + text]

    async def count(ctx: FactContext) -> int:
        ctx.service(STATE)  # fails in pass 1: no state store
        return len(await ctx.get("fingerprint"))

    return FactRegistry(
        [
            FactSpec("body", FactType.OBJECT, Tier.FINGERPRINT, body),
            FactSpec("fingerprint", FactType.STR_LIST, Tier.FINGERPRINT, fingerprint, ("body",)),
            FactSpec(
                "count", FactType.INT, Tier.FINGERPRINT, count, ("fingerprint",), needs=(STATE,)
            ),
        ]
    )


async def _pass1(fingerprint_fails: bool) -> list[str]:
    registry = _registry(fingerprint_fails)
    message = Message.from_file_bytes(b"Subject: x\n\nhello\n", received_at=0.0)
    facts = Facts(registry, message, Services())
    outcomes = await collect(facts, ["fingerprint", "count"])
    count = outcomes["count"]
    assert count.error is not None and DEFERRED in count.error
    return _carried(registry, facts, ["count"])


async def test_a_known_scalar_input_carries_nothing() -> None:
    # pass 2 is handed the fingerprint as known: the body it was made from is not needed
    assert await _pass1(fingerprint_fails=False) == []


async def test_a_failed_input_carries_what_it_is_computed_from_again() -> None:
    # the fingerprint is computed again in pass 2, from the body carried over
    assert await _pass1(fingerprint_fails=True) == ["body"]
