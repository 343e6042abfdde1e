"""A worker's reuse of the reputation counters it read (feedback/recent.py): fresh for
``reputation_cache_seconds``, dropped by its own writes, off at 0, bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import FeedbackSettings, StateSettings, load_settings
from relay.errors import ConfigError
from relay.feedback.recent import RecentRows
from relay.feedback.reputation import Identity
from relay.feedback.store import FeedbackStore, open_feedback
from relay.secretkey import SecretKey
from tests.support.feedback import NOW, entry

KEY = SecretKey(b"k" * 32)
NEWS = Identity("sender", "news.example")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rows_are_fresh_for_the_set_time_then_read_again() -> None:
    clock = Clock()
    recent = RecentRows(10.0, clock=clock)
    recent.keep({NEWS: [("ham", 1, 2)]})
    clock.now += 9.9
    assert recent.known([NEWS]) == {NEWS: (("ham", 1, 2),)}
    clock.now += 0.1
    assert recent.known([NEWS]) == {}
    assert len(recent) == 0  # the stale entry is gone, not only hidden


def test_zero_keeps_nothing() -> None:
    recent = RecentRows(0.0, clock=Clock())
    recent.keep({NEWS: [("ham", 1, 2)]})
    assert recent.known([NEWS]) == {} and len(recent) == 0


def test_bounded_the_oldest_stored_go_first() -> None:
    recent = RecentRows(60.0, limit=3, clock=Clock())
    ids = [Identity("sender", f"d{n}.example") for n in range(5)]
    for identity in ids:
        recent.keep({identity: []})
    assert len(recent) == 3
    assert set(recent.known(ids)) == set(ids[2:])


def test_the_setting_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[feedback]\nreputation_cache_seconds = 0\n")
    assert load_settings(config).feedback.reputation_cache_seconds == 0
    config.write_text("[feedback]\nreputation_cache_seconds = -1\n")
    with pytest.raises(ConfigError, match="reputation_cache_seconds"):
        load_settings(config)
    assert FeedbackSettings().reputation_cache_seconds == 10.0


async def two_stores(tmp_path: Path, seconds: float) -> tuple[FeedbackStore, FeedbackStore]:
    """A relay worker's store and a learner's (`relay learn`) on one SQLite file."""
    state = StateSettings(path=tmp_path / "state.sqlite3")
    settings = replace(FeedbackSettings(per_reporter_daily=10**6), reputation_cache_seconds=seconds)
    return (
        await open_feedback(state, settings, KEY),
        await open_feedback(state, settings, KEY),
    )


@pytest.fixture
async def cached(tmp_path: Path) -> AsyncIterator[tuple[FeedbackStore, FeedbackStore]]:
    worker, learner = await two_stores(tmp_path, 3600.0)
    yield worker, learner
    await worker.close()
    await learner.close()


async def test_another_process_report_is_seen_after_the_cache_time(
    cached: tuple[FeedbackStore, FeedbackStore],
) -> None:
    worker, learner = cached
    assert (await worker.reputation([NEWS], now=NOW))[NEWS].ham == 0
    await learner.record(entry(1, "ham"), now=NOW, identities=[NEWS])
    # Within the cache time the worker reuses what it read (here: an hour, so this
    # cannot race the clock); the learner's own read is fresh.
    assert (await worker.reputation([NEWS], now=NOW))[NEWS].ham == 0
    assert (await learner.reputation([NEWS], now=NOW))[NEWS].ham == 1


async def test_own_writes_drop_what_was_read(
    cached: tuple[FeedbackStore, FeedbackStore],
) -> None:
    worker, _ = cached
    assert (await worker.reputation([NEWS], now=NOW))[NEWS].spam == 0
    await worker.record(entry(2, "spam"), now=NOW, identities=[NEWS])
    assert (await worker.reputation([NEWS], now=NOW))[NEWS].spam == 1
    assert await worker.forget(entry(2).digest, "r1", now=NOW)
    assert (await worker.reputation([NEWS], now=NOW))[NEWS].spam == 0


async def test_decay_uses_the_message_clock_even_when_reused(
    cached: tuple[FeedbackStore, FeedbackStore],
) -> None:
    worker, _ = cached
    await worker.record(entry(3, "ham"), now=NOW, identities=[NEWS])
    today = (await worker.reputation([NEWS], now=NOW))[NEWS].ham
    half_life = worker.settings.reputation_half_life_days * 86400.0
    later = (await worker.reputation([NEWS], now=NOW + half_life))[NEWS].ham
    assert today == 1 and later == pytest.approx(0.5, rel=0.05)


async def test_zero_reads_the_store_every_time(tmp_path: Path) -> None:
    worker, learner = await two_stores(tmp_path, 0.0)
    try:
        assert (await worker.reputation([NEWS], now=NOW))[NEWS].ham == 0
        await learner.record(entry(4, "ham"), now=NOW, identities=[NEWS])
        assert (await worker.reputation([NEWS], now=NOW))[NEWS].ham == 1
    finally:
        await worker.close()
        await learner.close()
