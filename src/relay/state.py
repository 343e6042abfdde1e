"""Shared state: sliding-window counters and expiring flags, in SQLite or Redis.

One module, over 300 lines, on purpose: the interface and its two backends sit side by
side so that their window semantics (what a count includes, when a member expires) can be
read and kept equal in one place; tests/test_state.py runs every case on both.

Facts that remember across messages (bulk fingerprints, sender volumes, connection rates,
known correspondents, greylist triplets, rate buckets) use this one small interface, never
process memory, so several relay workers (or hosts, with Redis) see the same counts. Facts
only read it (``count_window*``, ``seen``, ``grey_entries``, ``bucket_levels``); the
pipeline's recorder (``pipeline/recorder.py``) is the one writer (``incr_window*``,
``add``, ``grey_record``, ``bucket_take``).

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
- ``grey_record(keys, now, delay, retry_window, lifetime)`` moves greylist triplets on
  (first sight -> passed after ``delay`` within ``retry_window`` -> kept ``lifetime`` from
  each use) and returns the entries; ``grey_entries(keys, now)`` reads them (None: no live
  entry). ``greylist_step`` is the transition, the same in both backends.
- ``bucket_take(buckets, now, cost)`` takes ``cost`` tokens from each token bucket that
  holds them (refilled at ``rate`` per second up to ``burst``) and says which did;
  ``bucket_levels(buckets, now)`` reads the tokens each holds. A bucket never goes below
  empty, so a refused message costs nothing. ``bucket_refill`` is the arithmetic.
- ``ping()`` raises StateError unless the backend answers (readiness, while degraded).
  The relay opens the store with ``require_answer=False``: a Redis that is down at start
  is not fatal, and every Redis client (``redis_client``: ``redis://``, ``rediss://`` or
  ``redis+sentinel://``) has socket timeouts and connects again after a failure, so an
  outage fails facts (counted, ops/faults.py) and never holds or ends a session.
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
import re
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the redis package itself loads with a Redis backend only: redis_error
    import redis.asyncio as aioredis

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

    async def grey_entries(self, keys: Sequence[str], now: float) -> list[GreyEntry | None]:
        """The live greylist entry of each key in order (None: never seen, or expired)."""
        raise NotImplementedError

    async def grey_record(
        self,
        keys: Sequence[str],
        now: float,
        *,
        delay: float,
        retry_window: float,
        lifetime: float,
    ) -> list[GreyEntry]:
        """Move each key's entry on by ``greylist_step``, atomically per call, and return
        the new entries in order."""
        raise NotImplementedError

    async def bucket_levels(self, buckets: Sequence[Bucket], now: float) -> list[float]:
        """Tokens each bucket holds at ``now`` (a bucket never used is full)."""
        raise NotImplementedError

    async def bucket_take(
        self, buckets: Sequence[Bucket], now: float, cost: float = 1.0
    ) -> list[bool]:
        """Atomically (one transaction for all), refill each bucket to ``now`` and take
        ``cost`` tokens from those that hold them; per bucket, whether it had them."""
        raise NotImplementedError

    async def ping(self) -> None:
        """Raises StateError unless the backend answers (readiness probes it while state
        facts fail, ops/readiness.py)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class GreyEntry:
    """A greylist triplet as stored: first sight, whether a retry passed, until when the
    entry counts (first + delay + retry window before it passed, last use + lifetime
    after)."""

    first: float
    passed: bool
    expires: float


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: its state key, refill ``rate`` in tokens per second, capacity."""

    key: str
    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst > 0):  # an "off" bucket is never stored
            raise ValueError(f"bucket {self.key!r}: rate and burst must be positive")


def greylist_step(
    entry: GreyEntry | None, now: float, delay: float, retry_window: float, lifetime: float
) -> GreyEntry:
    """The one greylist transition (SQLite runs it, the Redis script mirrors it):
    no live entry -> first sight now; seen and ``delay`` over -> passed, kept ``lifetime``;
    passed -> kept ``lifetime`` from now (refreshed on use); too early -> unchanged."""
    if entry is None or entry.expires <= now:
        return GreyEntry(now, False, now + delay + retry_window)
    if entry.passed:
        return GreyEntry(entry.first, True, max(entry.expires, now + lifetime))
    if now >= entry.first + delay:
        return GreyEntry(entry.first, True, now + lifetime)
    return entry


def bucket_refill(
    tokens: float | None, ts: float, rate: float, burst: float, now: float
) -> tuple[float, float]:
    """(tokens, time) of a bucket brought forward to ``now``; a missing one is full. Time
    never runs back (a replay or another host's skewed clock): an earlier ``now`` reads
    the bucket as it stands. The Redis script does the same operations in the same order,
    so both backends compute identical floats."""
    if tokens is None:
        return burst, now
    if now > ts:
        return min(burst, tokens + (now - ts) * rate), now
    return min(burst, tokens), ts


def _bucket_full_at(tokens: float, ts: float, bucket: Bucket) -> float:
    """When a bucket is full again: its row says nothing a missing one would not."""
    return ts + (bucket.burst - tokens) / bucket.rate


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
CREATE TABLE IF NOT EXISTS greylist (
    key TEXT PRIMARY KEY, first REAL NOT NULL, passed INTEGER NOT NULL,
    expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS buckets (
    key TEXT PRIMARY KEY, tokens REAL NOT NULL, ts REAL NOT NULL,
    expires REAL NOT NULL) WITHOUT ROWID;
"""


def _read_only() -> StateError:
    return StateError("state store is open read-only (relay scan): nothing is recorded")


PRIVATE_MODE = 0o600  # the SQLite state file and its -wal/-shm
_SIDECARS = ("-wal", "-shm")


def connect_readonly(path: Path, timeout: float, schema: str) -> sqlite3.Connection:
    """A connection that writes nothing anywhere (``relay scan``): SQLite's read-only mode
    sharing the ``-shm`` of a store in use (a ``-wal`` beside it), else immutable, so no
    ``-wal``/``-shm`` owned by whoever ran the scan appears. A missing file, or one without
    the tables of ``schema`` yet, reads as an empty store (``schema`` in memory)."""
    if path.exists():
        in_use = path.with_name(path.name + "-wal").exists()
        mode = "mode=ro" if in_use else "mode=ro&immutable=1"
        uri = path.resolve().as_uri() + "?" + mode
        db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        wanted = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", schema))
        have = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if wanted <= have:
            return db
        db.close()
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(schema)
    return db


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
        return connect_readonly(self.path, self._busy_timeout, _TABLES)

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

    def _grey_read(self, keys: Sequence[str], now: float) -> list[GreyEntry | None]:
        db = self._conn()
        out: list[GreyEntry | None] = []
        db.execute("BEGIN")  # one snapshot for every key
        try:
            for key in keys:
                row = _missing_table_is_empty(
                    db,
                    "SELECT first, passed, expires FROM greylist WHERE key = ? AND expires > ?",
                    (key, now),
                )
                out.append(None if row is None else GreyEntry(row[0], bool(row[1]), row[2]))
        finally:
            db.execute("COMMIT")
        return out

    def _grey_write(
        self, keys: Sequence[str], now: float, delay: float, window: float, lifetime: float
    ) -> list[GreyEntry]:
        db = self._conn()
        out: list[GreyEntry] = []
        db.execute("BEGIN IMMEDIATE")  # read and write under the lock: no lost transition
        try:
            for key in keys:
                row = db.execute(
                    "SELECT first, passed, expires FROM greylist WHERE key = ?", (key,)
                ).fetchone()
                old = None if row is None else GreyEntry(row[0], bool(row[1]), row[2])
                entry = greylist_step(old, now, delay, window, lifetime)
                if entry != old:
                    db.execute(
                        "INSERT OR REPLACE INTO greylist (key, first, passed, expires) "
                        "VALUES (?, ?, ?, ?)",
                        (key, entry.first, int(entry.passed), entry.expires),
                    )
                out.append(entry)
            self._writes += 1
            if self._writes % _PRUNE_EVERY == 0:
                db.execute("DELETE FROM greylist WHERE expires <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _bucket_read(self, buckets: Sequence[Bucket], now: float) -> list[float]:
        db = self._conn()
        out: list[float] = []
        db.execute("BEGIN")
        try:
            for bucket in buckets:
                row = _missing_table_is_empty(
                    db, "SELECT tokens, ts FROM buckets WHERE key = ?", (bucket.key,)
                )
                tokens, ts = (None, now) if row is None else (row[0], row[1])
                out.append(bucket_refill(tokens, ts, bucket.rate, bucket.burst, now)[0])
        finally:
            db.execute("COMMIT")
        return out

    def _bucket_write(self, buckets: Sequence[Bucket], now: float, cost: float) -> list[bool]:
        db = self._conn()
        out: list[bool] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for bucket in buckets:
                row = db.execute(
                    "SELECT tokens, ts FROM buckets WHERE key = ?", (bucket.key,)
                ).fetchone()
                stored, ts = (None, now) if row is None else (row[0], row[1])
                tokens, ts = bucket_refill(stored, ts, bucket.rate, bucket.burst, now)
                taken = tokens >= cost
                if taken:
                    tokens -= cost
                db.execute(
                    "INSERT OR REPLACE INTO buckets (key, tokens, ts, expires) VALUES (?, ?, ?, ?)",
                    (bucket.key, tokens, ts, _bucket_full_at(tokens, ts, bucket)),
                )
                out.append(taken)
            self._writes += 1
            if self._writes % _PRUNE_EVERY == 0:
                db.execute("DELETE FROM buckets WHERE expires <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

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

    async def grey_entries(self, keys: Sequence[str], now: float) -> list[GreyEntry | None]:
        return await self._run(self._grey_read, tuple(keys), now)

    async def grey_record(
        self,
        keys: Sequence[str],
        now: float,
        *,
        delay: float,
        retry_window: float,
        lifetime: float,
    ) -> list[GreyEntry]:
        if self.readonly:
            raise _read_only()
        return await self._run(self._grey_write, tuple(keys), now, delay, retry_window, lifetime)

    async def bucket_levels(self, buckets: Sequence[Bucket], now: float) -> list[float]:
        return await self._run(self._bucket_read, tuple(buckets), now)

    async def bucket_take(
        self, buckets: Sequence[Bucket], now: float, cost: float = 1.0
    ) -> list[bool]:
        if self.readonly:
            raise _read_only()
        return await self._run(self._bucket_write, tuple(buckets), now, cost)

    async def ping(self) -> None:
        await self._run(lambda: self._conn().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)


def _missing_table_is_empty(
    db: sqlite3.Connection, sql: str, args: tuple[Any, ...]
) -> tuple[Any, ...] | None:
    """One row, or None; a read-only store written by an older relay may lack the
    greylist and bucket tables (nothing creates them there): that is an empty table."""
    try:
        row: tuple[Any, ...] | None = db.execute(sql, args).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return row


class RedisState(StateStore):
    """Redis backend (several hosts): a sorted set per window key, a string per flag.

    Times are stored in the values and compared with ``now``, exactly as in SQLite; Redis
    TTLs only collect garbage (window or ttl plus a grace period, in wall-clock seconds).
    """

    def __init__(
        self, url: str, *, key: SecretKey, readonly: bool = False, timeout: float | None = None
    ) -> None:
        super().__init__(key)
        self.url = url
        self.readonly = readonly  # writes raise StateError; reads are plain commands
        self._redis: aioredis.Redis[bytes] = redis_client(url, timeout)
        self._error = redis_error()

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
        except self._error as exc:
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
        except self._error as exc:
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
        except self._error as exc:
            raise StateError(f"redis state: {exc}") from exc

    async def seen(self, key: str, now: float) -> bool:
        try:
            value = await self._redis.get(_PREFIX + "f:" + key)
        except self._error as exc:
            raise StateError(f"redis state: {exc}") from exc
        return value is not None and float(value) > now

    async def grey_entries(self, keys: Sequence[str], now: float) -> list[GreyEntry | None]:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:  # one instant
                for key in keys:
                    pipe.hmget(_PREFIX + "g:" + key, ["f", "p", "e"])
                results = await pipe.execute()
        except self._error as exc:
            raise StateError(f"redis state: {exc}") from exc
        out: list[GreyEntry | None] = []
        for first, passed, expires in results:
            if first is None or expires is None or float(expires) <= now:
                out.append(None)
            else:
                out.append(GreyEntry(float(first), passed == b"1", float(expires)))
        return out

    async def grey_record(
        self,
        keys: Sequence[str],
        now: float,
        *,
        delay: float,
        retry_window: float,
        lifetime: float,
    ) -> list[GreyEntry]:
        if self.readonly:
            raise _read_only()
        names = [_PREFIX + "g:" + key for key in keys]
        args = [repr(float(v)) for v in (now, delay, retry_window, lifetime, _REDIS_GRACE)]
        try:
            # One script: read and transition every key atomically (greylist_step).
            results = await self._script(_GREY_SCRIPT, names, args)
        except self._error as exc:
            raise StateError(f"redis state: {exc}") from exc
        return [GreyEntry(float(f), p == b"1", float(e)) for f, p, e in results]

    async def bucket_levels(self, buckets: Sequence[Bucket], now: float) -> list[float]:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for bucket in buckets:
                    pipe.hmget(_PREFIX + "b:" + bucket.key, ["t", "s"])
                results = await pipe.execute()
        except self._error as exc:
            raise StateError(f"redis state: {exc}") from exc
        out: list[float] = []
        for bucket, (tokens, ts) in zip(buckets, results, strict=True):
            if tokens is None or ts is None:
                out.append(bucket_refill(None, now, bucket.rate, bucket.burst, now)[0])
            else:
                level = bucket_refill(float(tokens), float(ts), bucket.rate, bucket.burst, now)
                out.append(level[0])
        return out

    async def bucket_take(
        self, buckets: Sequence[Bucket], now: float, cost: float = 1.0
    ) -> list[bool]:
        if self.readonly:
            raise _read_only()
        names = [_PREFIX + "b:" + b.key for b in buckets]
        args = [repr(float(now)), repr(float(cost)), repr(float(_REDIS_GRACE))]
        for bucket in buckets:
            args += [repr(float(bucket.rate)), repr(float(bucket.burst))]
        try:
            results = await self._script(_BUCKET_SCRIPT, names, args)
        except self._error as exc:
            raise StateError(f"redis state: {exc}") from exc
        return [int(r) == 1 for r in results]

    async def _script(self, script: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Run a Lua script (EVALSHA, loaded again after a server restart lost it)."""
        return await self._redis.register_script(script)(keys=list(keys), args=list(args))

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except self._error as exc:
            raise StateError(f"redis state {redacted(self.url)}: {exc}") from exc

    async def close(self) -> None:
        await close_redis(self._redis)


# The Redis scripts run greylist_step and bucket_refill (same operations, same order, on
# doubles) so both backends keep identical state. Numbers travel as "%.17g" strings, which
# round-trip a double exactly. Redis key TTLs only collect garbage (plus _REDIS_GRACE).
_GREY_SCRIPT = """
local now, delay, window, lifetime, grace =
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for i, name in ipairs(KEYS) do
  local v = redis.call('HMGET', name, 'f', 'p', 'e')
  local first, passed, expires = tonumber(v[1]), v[2], tonumber(v[3])
  local changed = true
  if first == nil or expires == nil or expires <= now then
    first, passed, expires = now, '0', now + delay + window
  elseif passed == '1' then
    expires = math.max(expires, now + lifetime)
  elseif now >= first + delay then
    passed, expires = '1', now + lifetime
  else
    changed = false
  end
  local f, e = string.format('%.17g', first), string.format('%.17g', expires)
  if changed then
    redis.call('HSET', name, 'f', f, 'p', passed, 'e', e)
    redis.call('EXPIRE', name, math.ceil(expires - now + grace))
  end
  out[i] = {f, passed, e}
end
return out
"""

_BUCKET_SCRIPT = """
local now, cost, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i, name in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local v = redis.call('HMGET', name, 't', 's')
  local tokens, ts = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or ts == nil then
    tokens, ts = burst, now
  elseif now > ts then
    tokens, ts = math.min(burst, tokens + (now - ts) * rate), now
  else
    tokens = math.min(burst, tokens)
  end
  local taken = 0
  if tokens >= cost then
    tokens, taken = tokens - cost, 1
  end
  local full_at = ts + (burst - tokens) / rate
  redis.call('HSET', name, 't', string.format('%.17g', tokens), 's', string.format('%.17g', ts))
  redis.call('EXPIRE', name, math.max(1, math.ceil(full_at - now + grace)))
  out[i] = taken
end
return out
"""


def redacted(url: str) -> str:
    """``url`` without its password: errors naming the Redis reach logs and stderr."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


SENTINEL_SCHEME = "redis+sentinel://"


def redis_error() -> type[Exception]:
    """redis-py's base exception, for the Redis backends' ``except`` clauses.

    The redis package (7 MiB of RSS in every worker, issue 17) is imported here and by the
    client functions below, never at the top of a module: with the SQLite backend, the
    default, no relay process loads it."""
    from redis.exceptions import RedisError

    return RedisError


def redis_client(url: str, timeout: float | None) -> aioredis.Redis[bytes]:
    """A client of ``url`` whose connects and commands give up after ``timeout`` seconds
    (a hung or unreachable Redis fails the fact instead of holding the session). Its pool
    connects again on the next command after a failure, so a Redis that comes back is used
    again without a restart.

    ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` asks those
    Sentinels for the master of ``service`` (the password is the master's) and asks again
    whenever a connection to it fails or it answers as a replica, so a failover needs no
    restart either."""
    if url.startswith(SENTINEL_SCHEME):
        return _sentinel_client(url, timeout)
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _sentinel_client(url: str, timeout: float | None) -> aioredis.Redis[bytes]:
    from redis.asyncio.sentinel import Sentinel

    parts = urllib.parse.urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    password = (urllib.parse.unquote(userinfo.partition(":")[2]) or None) if userinfo else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise StateError(f"{redacted(url)}: each Sentinel must be host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise StateError(f"{redacted(url)}: the path must be /service or /service/db")
    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs=timeouts,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    db = int(path[1]) if len(path) == 2 else 0
    client: aioredis.Redis[bytes] = sentinel.master_for(path[0], db=db, password=password)
    return client


async def close_redis(client: aioredis.Redis[bytes]) -> None:
    """Closes ``client`` and, for a Sentinel URL, its connections to the Sentinels."""
    from redis.asyncio.sentinel import SentinelConnectionPool

    pool = client.connection_pool
    # types-redis predates aclose(); close() is deprecated in redis >= 5.0.1.
    await client.aclose()  # type: ignore[attr-defined]
    if isinstance(pool, SentinelConnectionPool):
        for watcher in pool.sentinel_manager.sentinels:
            await watcher.aclose()  # type: ignore[attr-defined]


async def open_state(
    settings: StateSettings,
    key: SecretKey,
    *,
    readonly: bool = False,
    require_answer: bool = True,
) -> StateStore:
    """The configured backend, connected (SQLite file created, Redis pinged), hashing
    addresses under ``key``.

    ``readonly=True`` (``relay scan``): a store that reads the configured one and never
    writes to it; a SQLite file is neither created nor changed.
    ``require_answer=False`` (the relay): a Redis that does not answer yet is no error;
    the store comes back unconnected and each use fails with StateError until Redis
    answers, so the relay starts degraded (docs/operations.md "Several instances, one
    Redis")."""
    if settings.backend == "redis":
        store = RedisState(settings.url, key=key, readonly=readonly, timeout=settings.timeout)
        if not require_answer:
            return store
        try:
            await store.ping()
        except StateError:
            await store.close()
            raise
        return store
    return await SqliteState(settings.path, key=key, readonly=readonly).open()
