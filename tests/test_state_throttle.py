"""Greylist entries and token buckets in the shared state, on SQLite and a real redis-server.

Every case runs on both backends (the fixtures of tests/test_state.py); time is passed in,
never read from the clock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from relay.config import StateSettings
from relay.errors import StateError
from relay.state import Bucket, GreyEntry, RedisState, SqliteState, StateStore, open_state
from tests.test_state import KEY, Opener, opener, redis_url, store

__all__ = ["opener", "redis_url", "store"]  # fixtures shared with tests/test_state.py

DELAY, WINDOW, LIFE = 300.0, 4 * 3600.0, 36 * 86400.0


async def record(store: StateStore, key: str, now: float) -> GreyEntry:
    (entry,) = await store.grey_record([key], now, delay=DELAY, retry_window=WINDOW, lifetime=LIFE)
    return entry


async def test_greylist_first_sight_then_early_then_passed(store: StateStore) -> None:
    assert await store.grey_entries(["t"], 1000.0) == [None]
    assert await record(store, "t", 1000.0) == GreyEntry(1000.0, False, 1000.0 + DELAY + WINDOW)
    # A retry before the delay changes nothing: the first sight stays where it was.
    assert await record(store, "t", 1100.0) == GreyEntry(1000.0, False, 1000.0 + DELAY + WINDOW)
    assert await store.grey_entries(["t"], 1100.0) == [
        GreyEntry(1000.0, False, 1000.0 + DELAY + WINDOW)
    ]
    # After the delay: passed, kept for the lifetime from this use.
    assert await record(store, "t", 1300.0) == GreyEntry(1000.0, True, 1300.0 + LIFE)
    # Used again: the lifetime is refreshed.
    assert await record(store, "t", 5000.0) == GreyEntry(1000.0, True, 5000.0 + LIFE)
    assert await store.grey_entries(["t"], 5000.0 + LIFE - 1) == [
        GreyEntry(1000.0, True, 5000.0 + LIFE)
    ]
    assert await store.grey_entries(["t"], 5000.0 + LIFE) == [None]  # expired


async def test_greylist_missed_retry_window_starts_again(store: StateStore) -> None:
    await record(store, "t", 1000.0)
    late = 1000.0 + DELAY + WINDOW  # the window is (first + delay, first + delay + window)
    assert await store.grey_entries(["t"], late) == [None]
    assert await record(store, "t", late) == GreyEntry(late, False, late + DELAY + WINDOW)


async def test_greylist_keys_are_independent_and_ordered(store: StateStore) -> None:
    await record(store, "a", 1000.0)
    entries = await store.grey_record(
        ["b", "a"], 1400.0, delay=DELAY, retry_window=WINDOW, lifetime=LIFE
    )
    assert entries == [
        GreyEntry(1400.0, False, 1400.0 + DELAY + WINDOW),
        GreyEntry(1000.0, True, 1400.0 + LIFE),
    ]
    assert await store.grey_entries(["a", "zz", "b"], 1401.0) == [entries[1], None, entries[0]]
    assert await store.grey_record([], 1.0, delay=DELAY, retry_window=WINDOW, lifetime=LIFE) == []


async def test_greylist_times_survive_exactly(store: StateStore) -> None:
    now = 1_764_000_000.123456789  # a real epoch with a fraction: no rounding on the way
    entry = await record(store, "t", now)
    assert entry.first == now and entry.expires == now + DELAY + WINDOW
    assert await store.grey_entries(["t"], now) == [entry]


async def test_concurrent_first_sights_keep_the_first(opener: Opener, store: StateStore) -> None:
    """Many clients recording one triplet at once: exactly one first sight survives, and
    every caller sees the same entry (the transition is atomic)."""
    others = [await opener() for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                s.grey_record(
                    ["t"], 1000.0 + i % 2, delay=DELAY, retry_window=WINDOW, lifetime=LIFE
                )
                for i, s in enumerate(others * 5)
            )
        )
    finally:
        for s in others:
            await s.close()
    firsts = {entries[0].first for entries in results}
    assert len(firsts) == 1
    (stored,) = await store.grey_entries(["t"], 1001.0)
    assert stored is not None and stored.first in firsts and not stored.passed


def bucket(key: str = "b", per_second: float = 1.0, burst: float = 3.0) -> Bucket:
    return Bucket(key, per_second, burst)


async def test_bucket_starts_full_and_empties(store: StateStore) -> None:
    b = bucket()
    assert await store.bucket_levels([b], 100.0) == [3.0]
    assert [await store.bucket_take([b], 100.0) for _ in range(4)] == [
        [True],
        [True],
        [True],
        [False],  # the burst+1th finds it empty
    ]
    assert await store.bucket_levels([b], 100.0) == [0.0]  # a refusal costs nothing


async def test_bucket_refills_at_its_rate_up_to_burst(store: StateStore) -> None:
    b = bucket(per_second=0.5)
    for _ in range(3):
        await store.bucket_take([b], 100.0)
    assert await store.bucket_levels([b], 101.0) == [0.5]
    assert await store.bucket_take([b], 101.0) == [False]
    assert await store.bucket_take([b], 102.0) == [True]  # 1 token after 2 s
    assert await store.bucket_levels([b], 102.0) == [0.0]
    assert await store.bucket_levels([b], 1000.0) == [3.0]  # never more than the burst


async def test_bucket_time_never_runs_back(store: StateStore) -> None:
    b = bucket()
    await store.bucket_take([b], 100.0)
    await store.bucket_take([b], 100.0)
    # An earlier time (another host's skewed clock) reads the bucket as it stands.
    assert await store.bucket_levels([b], 50.0) == [1.0]
    assert await store.bucket_take([b], 50.0) == [True]
    assert await store.bucket_levels([b], 100.0) == [0.0]
    assert await store.bucket_levels([b], 101.0) == [1.0]


async def test_several_buckets_in_one_take(store: StateStore) -> None:
    small, big = bucket("s", burst=1.0), bucket("b", burst=5.0)
    assert await store.bucket_take([small, big], 10.0) == [True, True]
    # Each bucket is charged only when it has the tokens; the others still are.
    assert await store.bucket_take([small, big], 10.0) == [False, True]
    assert await store.bucket_levels([small, big, bucket("new")], 10.0) == [0.0, 3.0, 3.0]
    assert await store.bucket_take([], 10.0) == []


async def test_bucket_cost_and_fractions_agree_exactly(store: StateStore) -> None:
    b = Bucket("f", 1 / 7, 2.5)
    assert await store.bucket_take([b], 0.1, cost=2.0) == [True]
    assert await store.bucket_take([b], 0.1, cost=1.0) == [False]
    level = (await store.bucket_levels([b], 3.3))[0]
    assert level == min(2.5, 0.5 + (3.3 - 0.1) * (1 / 7))  # the same double on both backends


async def test_concurrent_takes_never_overdraw(opener: Opener, store: StateStore) -> None:
    """20 takes at once from a bucket of 5: exactly 5 succeed, across clients."""
    b = bucket(per_second=0.001, burst=5.0)
    others = [await opener() for _ in range(4)]
    try:
        results = await asyncio.gather(*(s.bucket_take([b], 100.0) for s in others * 5))
    finally:
        for s in others:
            await s.close()
    assert sum(r[0] for r in results) == 5
    assert await store.bucket_levels([b], 100.0) == [0.0]


def test_a_bucket_must_have_a_rate_and_a_burst() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Bucket("k", 0.0, 3.0)
    with pytest.raises(ValueError, match="must be positive"):
        Bucket("k", 1.0, 0.0)


async def test_read_only_store_reads_and_refuses_throttle_writes(
    store: StateStore, tmp_path: Path
) -> None:
    await record(store, "t", 1000.0)
    await store.bucket_take([bucket()], 1000.0)
    if isinstance(store, SqliteState):
        settings = StateSettings(backend="sqlite", path=store.path)
    else:
        assert isinstance(store, RedisState)
        settings = StateSettings(backend="redis", url=store.url)
    reader = await open_state(settings, KEY, readonly=True)
    try:
        assert (await reader.grey_entries(["t"], 1000.0))[0] is not None
        assert await reader.bucket_levels([bucket()], 1000.0) == [2.0]
        with pytest.raises(StateError, match="read-only"):
            await reader.grey_record(["t"], 1.0, delay=1, retry_window=1, lifetime=2)
        with pytest.raises(StateError, match="read-only"):
            await reader.bucket_take([bucket()], 1.0)
    finally:
        await reader.close()


async def test_read_only_store_of_an_older_relay_reads_empty(tmp_path: Path) -> None:
    """A state file made before these tables existed: a scan reads nothing, fails nothing."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE flags (key TEXT PRIMARY KEY, expires REAL)")
    db.close()
    reader = await SqliteState(path, key=KEY, readonly=True).open()
    try:
        assert await reader.grey_entries(["t"], 1.0) == [None]
        assert await reader.bucket_levels([bucket()], 1.0) == [3.0]
    finally:
        await reader.close()


async def test_redis_down_is_a_state_error() -> None:
    dead = RedisState("redis://127.0.0.1:1/0", key=KEY)
    try:
        with pytest.raises(StateError):
            await dead.grey_entries(["t"], 1.0)
        with pytest.raises(StateError):
            await dead.grey_record(["t"], 1.0, delay=1, retry_window=1, lifetime=2)
        with pytest.raises(StateError):
            await dead.bucket_levels([bucket()], 1.0)
        with pytest.raises(StateError):
            await dead.bucket_take([bucket()], 1.0)
    finally:
        await dead.close()
