"""Where ``body_text`` is decoded: on the event loop for small messages (a thread hop
costs more than the work), in a thread for big ones (the loop must not stall)."""

from __future__ import annotations

import pytest

from relay.facts import text
from relay.facts.base import FactRegistry, Facts, Services
from relay.facts.text import INLINE_BYTES, extract
from relay.message import Message

REGISTRY = FactRegistry(text.FACTS)


def message(body_bytes: int) -> Message:
    head = "From: a@example.org\nTo: b@example.org\nSubject: notes\n\n"
    line = "Meeting notes for the quarterly review of the network budget.\n"
    body = (line * (body_bytes // len(line) + 1))[:body_bytes]
    return Message.from_file_bytes((head + body).encode(), received_at=1_795_000_000.0)


@pytest.mark.parametrize(
    ("body_bytes", "in_thread"), [(1000, False), (INLINE_BYTES - 200, False), (40_000, True)]
)
async def test_small_on_the_loop_big_in_a_thread(
    thread_calls: list[str], body_bytes: int, in_thread: bool
) -> None:
    mail = message(body_bytes)
    assert (mail.size > INLINE_BYTES) is in_thread
    got = await Facts(REGISTRY, mail, Services()).get("body_text")
    assert thread_calls == (["extract"] if in_thread else [])
    assert got == extract(message(body_bytes))  # the same text either way
