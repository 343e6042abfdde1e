"""Shared state: sliding-window counters and expiring flags, in SQLite or Redis.

One module, over 300 lines, on purpose: the interface and its two backends sit side by
side so that their window semantics (what a count includes, when a member expires) can be
read and kept equal in one place; tests/test_state.py runs every case on both.

Facts that remember across messages (bulk fingerprints, sender volumes, connection rates,
known correspondents) use this one small interface, never process memory, so several
relay workers (or hosts, with Redis) see the same counts. Facts only read it
(``count_window*``, ``seen``); the pipeline's recorder (``pipeline/recorder.py``) is the
one writer (``incr_window*``, ``add``).

- ``incr_window(key, member, window, now)`` records ``member`` under ``key`` at time
  ``now`` and returns how many distinct members the key holds in the window
  ``(now - window, ...]``. A member seen again has its time moved forward, not counted
  twice; ``member=None`` records an anonymous event (each call counts once).
- ``count_window(key, member, window, now)`` returns what ``incr_window`` would return,
  recording nothing: the distinct members in the window, plus ``member`` when it is not
  among them (``None``, an anonymous event, always adds one). ``member``-less counts
  (``count_window_many(key, [], ...)``) are the window as it stands.
- ``add(key, ttl, now)`` sets a flag (forever, or until ``now + ttl``); ``seen(key, now)``
  tells whether it is set.
- ``open_state(settings, readonly=True)`` opens a store that only reads (``relay scan``):
  SQLite without writing, creating or locking anything beside the file; writes raise
  StateError.
- ``now`` is always given, never read from the wall clock here: callers pass the message's
  ``received_at``, so the lab replaying a corpus in time order gets the counts a live relay
  would have seen, and tests pin time.

Both backends have the same semantics (the test suite runs against both). Keys and
members may hold addresses only in hashed form, hashed with the store's own ``hashed``:
BLAKE2b keyed with a subkey of the relay's secret key (``secretkey.py``), which every store
is built with. Unkeyed, anyone who can read the file (or the Redis) could confirm a guessed
address by hashing it; keyed, only holders of the key can. Relays sharing one Redis need
the same key file. Errors are StateError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
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
from relay.secretkey import SecretKey

T = TypeVar("T")

_PRUNE_EVERY = 1000  # SQLite: drop expired rows of every key after this many writes
_REDIS_GRACE = 60  # Redis: seconds of wall-clock TTL beyond the window, for clock skew
_PREFIX = "relay:"


_HASH_PURPOSE = "state address hash"


class StateStore:
    """Interface of the shared-state backends (a plain base class, so ``Services.get``
    can look it up by type). Built with the relay's key: it owns the keyed hashing, so
    no caller can hash an address without it."""

    def __init__(self, key: SecretKey) -> None:
        self._hash_key = key.derive(_HASH_PURPOSE)

    def hashed(self, *parts: str) -> str:
        """A short digest of ``parts`` under the relay's key, so state never holds
        addresses in clear, nor hashes anyone without the key can recompute."""
        digest = hashlib.blake2b(digest_size=16, key=self._hash_key)
        for part in parts:
            digest.update(part.encode("utf-8", "surrogateescape"))
            digest.update(b"\x00")
        return digest.hexdigest()

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

    async def count_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        """What ``incr_windows`` would return, recording nothing: per key in order, the
        distinct members within ``window`` seconds before ``now``, ``members`` counted as
        if they had been recorded at ``now``. Backends implement this one."""
        raise NotImplementedError

    async def count_window(self, key: str, member: str | None, window: float, now: float) -> int:
        """What ``incr_window`` would return; ``None`` (an anonymous event) adds one."""
        return (await self.count_windows((key,), (_event_member(member),), window, now))[0]

    async def count_window_many(
        self, key: str, members: Sequence[str], window: float, now: float
    ) -> int:
        """What ``incr_window_many`` would return, recording nothing."""
        return (await self.count_windows((key,), members, window, now))[0]

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


_TABLES = """
CREATE TABLE IF NOT EXISTS window_members (
    key TEXT NOT NULL, member TEXT NOT NULL,
    ts REAL NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key, member)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS window_members_ts ON window_members (key, ts);
CREATE INDEX IF NOT EXISTS window_members_expires ON window_members (expires);
CREATE TABLE IF NOT EXISTS flags (
    key TEXT PRIMARY KEY, expires REAL) WITHOUT ROWID;
"""


def _read_only() -> StateError:
    return StateError("state store is open read-only (relay scan): nothing is recorded")


PRIVATE_MODE = 0o600  # the SQLite state file and its -wal/-shm
_SIDECARS = ("-wal", "-shm")


class SqliteOnThread:
    """One SQLite connection used from one worker thread of its own, so the event loop
    never waits on disk (the state store's and the feedback store's)."""

    _WHAT = "sqlite"  # names the store in errors
    path: Path
    _executor: ThreadPoolExecutor
    _db: sqlite3.Connection | None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StateError(f"{self._WHAT} {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"{self._WHAT} is not open")
        return self._db

    @staticmethod
    def _until_unlocked(
        setup: Callable[[], sqlite3.Connection], seconds: float
    ) -> sqlite3.Connection:
        """``setup()``, tried again while SQLite says "locked". Workers starting together
        on a new file race to switch it to WAL, and SQLite answers "database is locked" at
        once, without waiting out the busy timeout (it failed one start in four of a
        2-worker relay). Runs on the store's own thread, never the event loop."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return setup()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


class SqliteState(StateStore, SqliteOnThread):
    """Embedded backend: one SQLite file in WAL mode, shared by every worker on a host.

    All sqlite calls run on one worker thread owned by this object, so the event loop never
    blocks on disk; writes take the database lock (BEGIN IMMEDIATE) so concurrent processes
    serialise instead of losing updates.

    ``readonly=True`` writes nothing anywhere. A store with a ``-wal`` file beside it is in
    use (or was not closed cleanly): it is read through SQLite's read-only mode, sharing the
    existing ``-shm``. Without one the file is complete and no relay has it open, so it is
    opened immutable: SQLite then creates no ``-wal``/``-shm`` (a read-only connection
    otherwise does, owned by whoever ran the scan). A missing file reads as an empty store.
    """

    _WHAT = "sqlite state"

    def __init__(
        self, path: Path, *, key: SecretKey, busy_timeout: float = 5.0, readonly: bool = False
    ) -> None:
        super().__init__(key)
        self.path = path
        self.readonly = readonly
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-state")
        self._db: sqlite3.Connection | None = None
        self._writes = 0

    async def open(self) -> SqliteState:
        await self._run(self._open)
        return self

    def _open(self) -> None:
        if self.readonly:
            self._db = self._open_readonly()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._private_files()
        self._db = self._until_unlocked(self._setup, self._busy_timeout)

    def _private_files(self) -> None:
        """The store holds address hashes and counters: owner-only (0600), never 0644.

        The file is created 0600 before SQLite opens it (an empty file is a new database);
        SQLite gives ``-wal`` and ``-shm`` the database file's mode. No umask change: it is
        process-wide, and other threads create files meanwhile. Files an older version
        created are tightened; another owner's files are left as they are."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
        os.close(fd)
        for path in (self.path, *(self.path.with_name(self.path.name + x) for x in _SIDECARS)):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                if path.stat().st_mode & 0o777 != PRIVATE_MODE:
                    path.chmod(PRIVATE_MODE)

    def _setup(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            self._schema(db)
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.exists():
            db = sqlite3.connect(":memory:", isolation_level=None)
            db.executescript(_TABLES)
            return db
        in_use = self.path.with_name(self.path.name + "-wal").exists()
        mode = "mode=ro" if in_use else "mode=ro&immutable=1"
        uri = self.path.resolve().as_uri() + "?" + mode
        return sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, isolation_level=None)

    @staticmethod
    def _schema(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable enough for counters
        db.executescript(_TABLES)

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

    def _count(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        db = self._conn()
        since = now - window
        unique = list(dict.fromkeys(members))
        counts: list[int] = []
        db.execute("BEGIN")  # one snapshot for every key; reads take no write lock
        try:
            for key in keys:
                (count,) = db.execute(
                    "SELECT COUNT(*) FROM window_members WHERE key = ? AND ts > ?", (key, since)
                ).fetchone()
                new = sum(
                    1
                    for member in unique
                    if db.execute(  # a primary-key lookup per member
                        "SELECT 1 FROM window_members WHERE key = ? AND member = ? AND ts > ?",
                        (key, member, since),
                    ).fetchone()
                    is None
                )
                counts.append(int(count) + new)
        finally:
            db.execute("COMMIT")
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
        if self.readonly:
            raise _read_only()
        return await self._run(self._incr, tuple(keys), tuple(members), window, now)

    async def count_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        return await self._run(self._count, tuple(keys), tuple(members), window, now)

    async def add(self, key: str, ttl: float | None = None, *, now: float) -> None:
        if self.readonly:
            raise _read_only()
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

    def __init__(self, url: str, *, key: SecretKey, readonly: bool = False) -> None:
        super().__init__(key)
        self.url = url
        self.readonly = readonly  # writes raise StateError; reads are plain commands
        self._redis: aioredis.Redis[bytes] = aioredis.Redis.from_url(url)

    async def incr_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        if self.readonly:
            raise _read_only()
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

    async def count_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        since = now - window
        unique = list(dict.fromkeys(members))
        try:
            # MULTI: every key read at one instant, as incr_windows writes them.
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in keys:
                    name = _PREFIX + "w:" + key
                    pipe.zcount(name, f"({since!r}", "+inf")
                    for member in unique:
                        pipe.zscore(name, member)
                results = await pipe.execute()
        except RedisError as exc:
            raise StateError(f"redis state: {exc}") from exc
        counts: list[int] = []
        step = 1 + len(unique)
        for i in range(len(keys)):
            scores = results[i * step + 1 : (i + 1) * step]
            new = sum(1 for score in scores if score is None or float(score) <= since)
            counts.append(int(results[i * step]) + new)
        return counts

    async def add(self, key: str, ttl: float | None = None, *, now: float) -> None:
        if self.readonly:
            raise _read_only()
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


async def open_state(
    settings: StateSettings, key: SecretKey, *, readonly: bool = False
) -> StateStore:
    """The configured backend, connected (SQLite file created, Redis pinged), hashing
    addresses under ``key``.

    ``readonly=True`` (``relay scan``): a store that reads the configured one and never
    writes to it; a SQLite file is neither created nor changed."""
    if settings.backend == "redis":
        store = RedisState(settings.url, key=key, readonly=readonly)
        try:
            await store.ping()
        except StateError:
            await store.close()
            raise
        return store
    return await SqliteState(settings.path, key=key, readonly=readonly).open()
