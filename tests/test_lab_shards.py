"""lab/shards.py: pass 2 split by state keys gives exactly the ordered loop's values."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import pytest

from relay.config import settings_from_mapping
from relay.errors import RelayError
from relay.facts import FactRegistry, FactSpec, FactType, default_registry
from relay.facts.services import STATE
from relay.lab import shards
from relay.lab.compute import DEFERRED, Outcomes, parallel_pass, sequential_pass
from relay.lab.corpus import CorpusMessage, holding
from relay.lab.env import LabEnv
from relay.message import Envelope, Peer
from relay.pipeline.recorder import Record
from relay.verdict import Tier

NAMES = (
    "bulk_fingerprint",
    "bulk_count",
    "sender_volume_24h",
    "bulk_sender",
    "connection_rate",
    "known_correspondent",
    "greylist",
    "greylist_wait",
    "rate_limit_wait",
    "rate_recipient_wait",
)
BODIES = (
    "Weekly deals on printers and ink, order today at the shop. " * 4,
    "Your invoice for September is attached, thank you for your business. " * 3,
    "Lunch on Friday? I found a new place near the station.",
    "",  # no text: no fingerprint
)
SENDERS = ("deals@shop.example", "news@mail.shop.example", "alice@example.org", "")
IPS = ("192.0.2.1", "192.0.2.7", "198.51.100.3", "", "2001:db8::5")
# Repeated times, gaps shorter and longer than the 60 s connection window and the 24 h
# bulk window: the time split of components must not change a count.
STEPS = (0.0, 0.0, 0.0, 0.0, 5.0, 10.0, 30.0, 59.0, 60.0, 61.0, 3600.0, 86399.0, 86400.0, 2e5)


def _env() -> LabEnv:
    # [greylist] and [ratelimit] at their defaults: those facts read their keys too.
    return LabEnv(settings_from_mapping({"model": {"enabled": False}}), ("mx.lab.example",))


def _message(i: int, rng: random.Random, t: float) -> CorpusMessage:
    sender = rng.choice(SENDERS)
    rcpts = rng.sample(["u1@example.net", "u2@example.net", "U1@Example.NET", "v@other.example"], 2)
    mid = f"Message-ID: <{rng.randrange(6)}@x.example>\n" if rng.random() < 0.7 else ""
    raw = (
        f"From: <{sender}>\nTo: {', '.join(rcpts)}\nSubject: s{i}\n{mid}\n{rng.choice(BODIES)}\n"
    ).encode()
    ip = rng.choice(IPS)
    return CorpusMessage(
        id=f"m{i}",
        label="spam" if i % 2 else "ham",
        digest=hashlib.sha256(raw + str(i).encode()).hexdigest(),
        source=holding(f"m{i}", "ham", raw),
        time=t,
        index=i,
        envelope=Envelope(mail_from=sender, rcpt_to=tuple(rcpts)),
        peer=Peer(ip=ip, port=rng.choice([0, 2525, 4000]) if ip else 0),
    )


def _corpus(n: int, seed: int) -> list[CorpusMessage]:
    rng = random.Random(seed)
    t = 1_000_000_000.0
    messages = []
    for i in range(n):
        t += rng.choice(STEPS)
        messages.append(_message(i, rng, t))
    return messages


def _pass1(env: LabEnv, messages: list[CorpusMessage]) -> tuple[dict[str, Outcomes], list[str]]:
    items = [(m, NAMES) for m in messages]
    known = {d: c.outcomes for d, c in parallel_pass(env, items, 1, lambda n: None).items()}
    deferred = sorted(
        {n for per in known.values() for n, c in per.items() if c.error and DEFERRED in c.error}
    )
    return known, deferred


def _sequential(env: LabEnv, messages: list[CorpusMessage], known: Any, names: list[str]) -> Any:
    return asyncio.run(sequential_pass(env, messages, known, {}, names, lambda n: None))


def test_sharded_replay_equals_the_ordered_loop() -> None:
    env = _env()
    messages = _corpus(60, seed=7)
    known, names = _pass1(env, messages)
    assert set(names) == set(NAMES) - {"bulk_fingerprint"}  # all deferred to pass 2
    want = _sequential(env, messages, known, names)
    # The corpus really exercises the state: counts above one for every counting family.
    for fact in ("bulk_count", "sender_volume_24h", "connection_rate"):
        assert max(want[m.digest][fact].value or 0 for m in messages) > 2, fact
    for count in (1, 3, 7):
        got, info = shards.sharded_pass(
            env, messages, known, names, count, shards.run_local, lambda n: None
        )
        assert got == want, count
        assert info["shards"] == min(count, info["groups"])
    assert info["groups"] > 7  # the split found independent groups


def test_a_shard_replays_in_position_order_whatever_its_input_order() -> None:
    env = _env()
    messages = _corpus(30, seed=3)
    known, names = _pass1(env, messages)
    [ops] = shards.make_plan(env, messages, known, names, 1).shards
    mixed = list(ops)
    random.Random(1).shuffle(mixed)
    assert mixed != list(ops)
    assert shards.replay_shard(env, mixed) == shards.replay_shard(env, ops)
    assert shards.join([shards.replay_shard(env, mixed)]) == _sequential(
        env, messages, known, names
    )


def test_a_fact_touching_an_undeclared_key_stops_the_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _env()
    messages = _corpus(8, seed=5)
    known, names = _pass1(env, messages)
    layout = shards.make_plan(env, messages, known, names, 1)
    # The volume family forgets to declare the sticky flag: its reads would undercount.
    volume = shards.KEYS[Record.VOLUME]
    monkeypatch.setitem(
        shards.KEYS,
        Record.VOLUME,
        lambda *a: {k: w for k, w in volume(*a).items() if not k.startswith("bulk_sender:")},
    )
    with pytest.raises(shards.ShardContractError, match="family volume touched undeclared"):
        shards.replay_shard(env, layout.shards[0])


def test_a_write_to_a_key_declared_read_only_stops_the_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys nobody writes tie no messages together, so a write the plan did not expect
    would be a silent miscount: the replay refuses it."""
    env = _env()
    messages = _corpus(8, seed=5)
    known, names = _pass1(env, messages)
    layout = shards.make_plan(env, messages, known, names, 1)
    connection = shards.KEYS[Record.CONNECTION]
    monkeypatch.setitem(
        shards.KEYS,
        Record.CONNECTION,
        lambda *a: {k: (w, False) for k, (w, _) in connection(*a).items()},
    )
    with pytest.raises(shards.ShardContractError, match="family connection touched undeclared"):
        shards.replay_shard(env, layout.shards[0])


def test_a_state_fact_without_a_family_is_refused() -> None:
    async def peek(ctx: Any) -> int:
        return len(await ctx.service(STATE).count_windows(["any:key"], [], 60.0, 0.0))

    spy = FactSpec("spy_count", FactType.INT, Tier.ENVELOPE, peek, needs=(STATE,))
    registry = FactRegistry([*default_registry(), spy])
    with pytest.raises(shards.ShardContractError, match="spy_count"):
        shards.families(registry, ["bulk_count", "spy_count"])
    assert shards.families(registry, ["bulk_count", "rate_limit_wait"]) == (
        (Record.BULK, ("bulk_count",)),
        (Record.RATE, ("rate_limit_wait",)),
    )


def test_planning_needs_corpus_time_order() -> None:
    env = _env()
    messages = _corpus(5, seed=1)
    messages.reverse()
    known, names = _pass1(env, messages)
    with pytest.raises(RelayError, match="corpus time order"):
        shards.make_plan(env, messages, known, names, 2)


def test_the_map_step_in_a_process_pool_plans_the_same_split() -> None:
    """Keys declared in two processes (hashed with the plan's one key) group as in one."""
    env = _env()
    messages = _corpus(40, seed=11)
    known, names = _pass1(env, messages)

    def layout(declarer: shards.Declarer) -> list[list[tuple[int, Any]]]:
        planned = shards.make_plan(env, messages, known, names, 3, declarer)
        return [[(op.position, op.families) for op in ops] for ops in planned.shards]

    assert layout(shards.pool_declarer(2)) == layout(shards.declare_chunk)
    assert shards.chunks(5, 2) == [range(0, 3), range(3, 5)] and shards.chunks(0, 2) == []
