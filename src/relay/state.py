"""Shared state: sliding-window counters and expiring flags, in SQLite or Redis.

Facts that remember across messages (bulk fingerprints, sender volumes, connection rates,
known correspondents) use this one small interface, never process memory, so several
relay workers (or hosts, with Redis) see the same counts.

- ``incr_window(key, member, window, now)`` records ``member`` under ``key`` at time
  ``now`` and returns how many distinct members the key holds in the window
  ``(now - window, ...]``. A member seen again has its time moved forward, not counted
  twice; ``member=None`` records an anonymous event (each call counts once).
- ``add(key, ttl, now)`` sets a flag (forever, or until ``now + ttl``); ``seen(key, now)``
  tells whether it is set.
- ``now`` is always given, never read from the wall clock here: callers pass the message's
  ``received_at``, so the lab replaying a corpus in time order gets the counts a live relay
  would have seen, and tests pin time.

Both backends have the same semantics (the test suite runs against both). Keys may hold
addresses only in hashed form; callers hash them (see ``hashed``). Errors are StateError.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relay.config import StateSettings
from relay.errors import StateError

T = TypeVar("T")

_PRUNE_EVERY = 1000  # SQLite: drop expired rows of every key after this many writes
_REDIS_GRACE = 60  # Redis: seconds of wall-clock TTL beyond the window, for clock skew
_PREFIX = "relay:"


def hashed(*parts: str) -> str:
    """A short stable digest of ``parts``, so state never holds addresses in clear."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\x00")
    return digest.hexdigest()


class StateStore:
    """Interface of the shared-state backends (a plain base class, so ``Services.get``
    can look it up by type)."""

    async def incr_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        """Record ``members`` under every key (one round trip) and count, per key in order,
        the distinct members seen within ``window`` seconds before ``now``. Backends
        implement this one; the two helpers below are shorthands for it."""
        raise NotImplementedError

    async def incr_window(self, key: str, member: str | None, window: float, now: float) -> int:
        """Record ``member`` (or one anonymous event) and count distinct members in window."""
        return (await self.incr_windows((key,), (_event_member(member),), window, now))[0]

    async def incr_window_many(
        self, key: str, members: Sequence[str], window: float, now: float
    ) -> int:
        """Record several members at once and count as incr_window does."""
        return (await self.incr_windows((key,), members, window, now))[0]

    async def add(self, key: str, ttl: float | None = None, *, now: float) -> None:
        """Set flag ``key``, forever or for ``ttl`` seconds from ``now``."""
        raise NotImplementedError

    async def seen(self, key: str, now: float) -> bool:
        """Whether flag ``key`` is set at ``now``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        raise NotImplementedError


def _event_member(member: str | None) -> str:
    return member if member is not None else "~" + secrets.token_hex(8)


class SqliteState(StateStore):
    """Embedded backend: one SQLite file in WAL mode, shared by every worker on a host.

    All sqlite calls run on one worker thread owned by this object, so the event loop never
    blocks on disk; writes take the database lock (BEGIN IMMEDIATE) so concurrent processes
    serialise instead of losing updates.
    """

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-state")
        self._db: sqlite3.Connection | None = None
        self._writes = 0

    async def open(self) -> SqliteState:
        await self._run(self._open)
        return self

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Workers starting together on a new file race to switch it to WAL, and SQLite
        # answers "database is locked" at once, without waiting out the busy timeout (it
        # failed one start in four of a 2-worker relay): try again until the timeout.
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                self._db = self._setup()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)  # the state's own thread, never the event loop

    def _setup(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            self._schema(db)
        except sqlite3.Error:
            db.close()
            raise
        return db

    @staticmethod
    def _schema(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable enough for counters
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS window_members (
                key TEXT NOT NULL, member TEXT NOT NULL,
                ts REAL NOT NULL, expires REAL NOT NULL,
                PRIMARY KEY (key, member)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS window_members_ts ON window_members (key, ts);
            CREATE INDEX IF NOT EXISTS window_members_expires ON window_members (expires);
            CREATE TABLE IF NOT EXISTS flags (
                key TEXT PRIMARY KEY, expires REAL) WITHOUT ROWID;
            """
        )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StateError(f"sqlite state {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError("sqlite state is not open")
        return self._db

    def _incr(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        db = self._conn()
        since = now - window
        counts: list[int] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for key in keys:
                db.execute("DELETE FROM window_members WHERE key = ? AND ts <= ?", (key, since))
                db.executemany(
                    "INSERT INTO window_members (key, member, ts, expires) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (key, member) DO UPDATE SET "
                    "ts = max(ts, excluded.ts), expires = max(expires, excluded.expires)",
                    [(key, member, now, now + window) for member in members],
                )
                (count,) = db.execute(
                    "SELECT COUNT(*) FROM window_members WHERE key = ? AND ts > ?", (key, since)
                ).fetchone()
                counts.append(int(count))
            self._writes += 1
            if self._writes % _PRUNE_EVERY == 0:
                db.execute("DELETE FROM window_members WHERE expires <= ?", (now,))
                db.execute("DELETE FROM flags WHERE expires <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return counts

    def _add(self, key: str, expires: float | None) -> None:
        self._conn().execute(
            "INSERT INTO flags (key, expires) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires",
            (key, expires),
        )

    def _seen(self, key: str, now: float) -> bool:
        row = self._conn().execute("SELECT expires FROM flags WHERE key = ?", (key,)).fetchone()
        return row is not None and (row[0] is None or row[0] > now)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def incr_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        return await self._run(self._incr, tuple(keys), tuple(members), window, now)

    async def add(self, key: str, ttl: float | None = None, *, now: float) -> None:
        await self._run(self._add, key, None if ttl is None else now + ttl)

    async def seen(self, key: str, now: float) -> bool:
        return await self._run(self._seen, key, now)

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)


class RedisState(StateStore):
    """Redis backend (several hosts): a sorted set per window key, a string per flag.

    Times are stored in the values and compared with ``now``, exactly as in SQLite; Redis
    TTLs only collect garbage (window or ttl plus a grace period, in wall-clock seconds).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._redis: aioredis.Redis[bytes] = aioredis.Redis.from_url(url)

    async def incr_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        since = now - window
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in keys:
                    name = _PREFIX + "w:" + key
                    pipe.zremrangebyscore(name, "-inf", since)
                    if members:
                        pipe.zadd(name, dict.fromkeys(members, now), gt=True)
                    else:
                        pipe.zcard(name)  # keeps result positions fixed
                    pipe.zcount(name, f"({since!r}", "+inf")
                    pipe.expire(name, math.ceil(window) + _REDIS_GRACE)
                results = await pipe.execute()
        except RedisError as exc:
            raise StateError(f"redis state: {exc}") from exc
        return [int(results[4 * i + 2]) for i in range(len(keys))]

    async def add(self, key: str, ttl: float | None = None, *, now: float) -> None:
        value = "inf" if ttl is None else repr(now + ttl)
        expiry = None if ttl is None else math.ceil(ttl) + _REDIS_GRACE
        try:
            await self._redis.set(_PREFIX + "f:" + key, value, ex=expiry)
        except RedisError as exc:
            raise StateError(f"redis state: {exc}") from exc

    async def seen(self, key: str, now: float) -> bool:
        try:
            value = await self._redis.get(_PREFIX + "f:" + key)
        except RedisError as exc:
            raise StateError(f"redis state: {exc}") from exc
        return value is not None and float(value) > now

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise StateError(f"redis state {self.url}: {exc}") from exc

    async def close(self) -> None:
        # types-redis predates aclose(); close() is deprecated in redis >= 5.0.1.
        await self._redis.aclose()  # type: ignore[attr-defined]


async def open_state(settings: StateSettings) -> StateStore:
    """The configured backend, connected (SQLite file created, Redis pinged)."""
    if settings.backend == "redis":
        store = RedisState(settings.url)
        try:
            await store.ping()
        except StateError:
            await store.close()
            raise
        return store
    return await SqliteState(settings.path).open()
