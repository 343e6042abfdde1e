"""The feedback store: one entry per message body, in the state layer's SQLite file or
Redis database, written atomically.

Each write is one transaction (SQLite BEGIN IMMEDIATE ... COMMIT; one Lua script on
Redis) that drops expired entries, checks the reporter's daily cap, logs the report,
writes or deletes the entry and evicts the oldest beyond ``max_entries``. A failure at any
step rolls the whole write back, so a crash or a full disk leaves no partial entry.

Reporters are stored as keyed hashes (``StateStore.hashed``, the relay's key): the store
can count and cap per reporter without holding anyone's name. ``training_set`` is the only
way training reads entries: it caps each reporter's share of a class and balances the
classes, so one account cannot poison the model by volume.
"""

from __future__ import annotations

import math
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relay.config import FeedbackSettings, StateSettings
from relay.errors import FeedbackRefused, StateError
from relay.feedback.record import LABELS, Domains, FeedbackEntry, Label
from relay.secretkey import SecretKey
from relay.state import PRIVATE_MODE, SqliteOnThread, StateStore

T = TypeVar("T")
DAY = 86400.0
_REPORTER_PURPOSE = "feedback reporter"

_TABLES = """
CREATE TABLE IF NOT EXISTS feedback (
    digest TEXT PRIMARY KEY, label TEXT NOT NULL, source TEXT NOT NULL,
    reporter TEXT NOT NULL, at REAL NOT NULL, feature_version INTEGER NOT NULL,
    vector BLOB NOT NULL, domains TEXT NOT NULL, body BLOB);
CREATE INDEX IF NOT EXISTS feedback_at ON feedback (at);
CREATE TABLE IF NOT EXISTS feedback_reports (reporter TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_reports_by ON feedback_reports (reporter, at);
"""


@dataclass(frozen=True, slots=True)
class FeedbackStats:
    spam: int
    ham: int

    @property
    def entries(self) -> int:
        return self.spam + self.ham

    def as_dict(self) -> dict[str, int]:
        return {"spam": self.spam, "ham": self.ham, "entries": self.entries}


def _capped(settings: FeedbackSettings) -> FeedbackRefused:
    return FeedbackRefused(
        "reporter_cap",
        f"this reporter sent {settings.per_reporter_daily} reports in the last 24 hours "
        "([feedback] per_reporter_daily); try again later",
    )


class FeedbackStore:
    """Interface of the two backends. ``reporter_id`` hashes a reporter name; every
    other method takes the hash."""

    def __init__(self, key: SecretKey, settings: FeedbackSettings) -> None:
        self.settings = settings
        self._hasher = StateStore(key)  # the state layer's keyed hashing, nothing else

    def reporter_id(self, name: str) -> str:
        return self._hasher.hashed(_REPORTER_PURPOSE, name)

    async def record(self, entry: FeedbackEntry, *, now: float) -> Label | None:
        """Write ``entry`` (a relabel overwrites); the previous label, or None if new.
        Raises FeedbackRefused (reporter_cap) with nothing changed."""
        raise NotImplementedError

    async def forget(self, digest: str, reporter: str, *, now: float) -> bool:
        """Delete the entry for ``digest``; whether there was one. Counts against the
        reporter's cap like any report."""
        raise NotImplementedError

    async def stats(self) -> FeedbackStats:
        raise NotImplementedError

    async def entries(self) -> list[FeedbackEntry]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def _row(entry: FeedbackEntry) -> tuple[Any, ...]:
    return (
        entry.digest,
        entry.label,
        entry.source,
        entry.reporter,
        entry.at,
        entry.feature_version,
        entry.vector,
        entry.domains.encode(),
        entry.body,
    )


def _entry(row: Sequence[Any]) -> FeedbackEntry:
    label: Label
    if row[1] == "spam":
        label = "spam"
    elif row[1] == "ham":
        label = "ham"
    else:
        raise StateError(f"feedback entry with unknown label {row[1]!r}")
    return FeedbackEntry(
        digest=str(row[0]),
        label=label,
        source=str(row[2]),
        reporter=str(row[3]),
        at=float(row[4]),
        feature_version=int(row[5]),
        vector=bytes(row[6]),
        domains=Domains.decode(str(row[7])),
        body=None if row[8] is None else bytes(row[8]),
    )


class SqliteFeedback(FeedbackStore, SqliteOnThread):
    """Tables beside the state layer's in its SQLite file; one worker thread, so the
    event loop never waits on disk (as SqliteState does)."""

    _WHAT = "sqlite feedback"

    def __init__(
        self, path: Path, *, key: SecretKey, settings: FeedbackSettings, busy_timeout: float = 5.0
    ) -> None:
        super().__init__(key, settings)
        self.path = path
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-feedback")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> SqliteFeedback:
        await self._run(self._open)
        return self

    def _open(self) -> None:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))  # 0600 before use
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a report acknowledged is a report kept
            db.executescript(_TABLES)
        except sqlite3.Error:
            db.close()
            raise
        self._db = db

    # One write = these steps inside one transaction; tests break one to check rollback.
    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM feedback WHERE at <= ?", (now - self.settings.max_age_days * DAY,))
        db.execute("DELETE FROM feedback_reports WHERE at <= ?", (now - DAY,))

    def _count_report(self, db: sqlite3.Connection, reporter: str, now: float) -> None:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM feedback_reports WHERE reporter = ? AND at > ?",
            (reporter, now - DAY),
        ).fetchone()
        if int(count) >= self.settings.per_reporter_daily:
            raise _capped(self.settings)
        db.execute("INSERT INTO feedback_reports (reporter, at) VALUES (?, ?)", (reporter, now))

    def _evict(self, db: sqlite3.Connection) -> None:
        db.execute(
            "DELETE FROM feedback WHERE digest IN (SELECT digest FROM feedback "
            "ORDER BY at ASC LIMIT max(0, (SELECT COUNT(*) FROM feedback) - ?))",
            (self.settings.max_entries,),
        )

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def _record(self, entry: FeedbackEntry, now: float) -> Label | None:
        def steps(db: sqlite3.Connection) -> Label | None:
            self._prune(db, now)
            self._count_report(db, entry.reporter, now)
            old = db.execute(
                "SELECT label FROM feedback WHERE digest = ?", (entry.digest,)
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO feedback (digest, label, source, reporter, at, "
                "feature_version, vector, domains, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row(entry),
            )
            self._evict(db)
            return None if old is None else cast(Label, str(old[0]))

        return self._write(steps)

    def _forget(self, digest: str, reporter: str, now: float) -> bool:
        def steps(db: sqlite3.Connection) -> bool:
            self._prune(db, now)
            self._count_report(db, reporter, now)
            return db.execute("DELETE FROM feedback WHERE digest = ?", (digest,)).rowcount > 0

        return self._write(steps)

    def _stats(self) -> FeedbackStats:
        counts = dict(
            self._conn().execute("SELECT label, COUNT(*) FROM feedback GROUP BY label").fetchall()
        )
        return FeedbackStats(spam=int(counts.get("spam", 0)), ham=int(counts.get("ham", 0)))

    def _entries(self) -> list[FeedbackEntry]:
        rows = self._conn().execute(
            "SELECT digest, label, source, reporter, at, feature_version, vector, domains, body "
            "FROM feedback ORDER BY at DESC, digest"
        )
        return [_entry(row) for row in rows]

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def record(self, entry: FeedbackEntry, *, now: float) -> Label | None:
        return await self._run(self._record, entry, now)

    async def forget(self, digest: str, reporter: str, *, now: float) -> bool:
        return await self._run(self._forget, digest, reporter, now)

    async def stats(self) -> FeedbackStats:
        return await self._run(self._stats)

    async def entries(self) -> list[FeedbackEntry]:
        return await self._run(self._entries)

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)


_P = "relay:fb:"
# One script per write: Redis runs it alone, and every check comes before the first
# write, so a refused or failed report changes nothing. ARGV: op, now, max_age, cap,
# max_entries, reporter, report id, digest, then for "record" the entry's fields.
_SCRIPT = """
local p, op, now = 'relay:fb:', ARGV[1], tonumber(ARGV[2])
local cutoff = now - tonumber(ARGV[3])
local rk = p .. 'r:' .. ARGV[6]
local reports = redis.call('ZCOUNT', rk, '(' .. tostring(now - 86400), '+inf')
if reports >= tonumber(ARGV[4]) then return {-1, false} end
for _, d in ipairs(redis.call('ZRANGEBYSCORE', p .. 'idx', '-inf', cutoff)) do
  redis.call('DEL', p .. 'e:' .. d)
  redis.call('SREM', p .. 'spam', d)
  redis.call('SREM', p .. 'ham', d)
end
redis.call('ZREMRANGEBYSCORE', p .. 'idx', '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - 86400)
redis.call('ZADD', rk, now, ARGV[7])
redis.call('EXPIRE', rk, 90000)
local digest = ARGV[8]
local ek = p .. 'e:' .. digest
local old = redis.call('HGET', ek, 'label')
redis.call('DEL', ek)
redis.call('SREM', p .. 'spam', digest)
redis.call('SREM', p .. 'ham', digest)
redis.call('ZREM', p .. 'idx', digest)
if op == 'record' then
  local label = ARGV[9]
  redis.call('HSET', ek, 'label', label, 'source', ARGV[10], 'reporter', ARGV[6],
    'at', ARGV[11], 'fv', ARGV[12], 'vector', ARGV[13], 'domains', ARGV[14])
  if ARGV[15] == '1' then redis.call('HSET', ek, 'body', ARGV[16]) end
  redis.call('SADD', p .. label, digest)
  redis.call('ZADD', p .. 'idx', tonumber(ARGV[11]), digest)
  local over = redis.call('ZCARD', p .. 'idx') - tonumber(ARGV[5])
  if over > 0 then
    for _, d in ipairs(redis.call('ZRANGE', p .. 'idx', 0, over - 1)) do
      redis.call('DEL', p .. 'e:' .. d)
      redis.call('SREM', p .. 'spam', d)
      redis.call('SREM', p .. 'ham', d)
    end
    redis.call('ZREMRANGEBYRANK', p .. 'idx', 0, over - 1)
  end
end
return {1, old}
"""
_FIELDS = (b"label", b"source", b"reporter", b"at", b"fv", b"vector", b"domains", b"body")


class RedisFeedback(FeedbackStore):
    """Keys under ``relay:fb:`` in the state layer's Redis database: a hash per entry, a
    sorted set by time (age and eviction), a set per label (counts), a sorted set of
    report times per reporter hash (the daily cap). Several relays share one."""

    def __init__(self, url: str, *, key: SecretKey, settings: FeedbackSettings) -> None:
        super().__init__(key, settings)
        self.url = url
        self._redis: aioredis.Redis[bytes] = aioredis.Redis.from_url(url)
        self._script = self._redis.register_script(_SCRIPT)

    async def _eval(self, args: list[str | bytes | float | int]) -> list[Any]:
        try:
            return cast(list[Any], await self._script(keys=[], args=args))
        except RedisError as exc:
            raise StateError(f"redis feedback: {exc}") from exc

    def _head(
        self, op: str, reporter: str, digest: str, now: float
    ) -> list[str | bytes | float | int]:
        s = self.settings
        return [
            op,
            repr(now),
            repr(s.max_age_days * DAY),
            s.per_reporter_daily,
            s.max_entries,
            reporter,
            secrets.token_hex(8),
            digest,
        ]

    async def record(self, entry: FeedbackEntry, *, now: float) -> Label | None:
        args = self._head("record", entry.reporter, entry.digest, now)
        args += [
            entry.label,
            entry.source,
            repr(entry.at),
            entry.feature_version,
            entry.vector,
            entry.domains.encode(),
            "1" if entry.body is not None else "0",
            entry.body or b"",
        ]
        status, old = await self._eval(args)
        if int(status) < 0:
            raise _capped(self.settings)
        return None if old is None else cast(Label, old.decode())

    async def forget(self, digest: str, reporter: str, *, now: float) -> bool:
        status, old = await self._eval(self._head("forget", reporter, digest, now))
        if int(status) < 0:
            raise _capped(self.settings)
        return old is not None

    async def stats(self) -> FeedbackStats:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.scard(_P + "spam")
                pipe.scard(_P + "ham")
                spam, ham = await pipe.execute()
        except RedisError as exc:
            raise StateError(f"redis feedback: {exc}") from exc
        return FeedbackStats(spam=int(spam), ham=int(ham))

    async def entries(self) -> list[FeedbackEntry]:
        try:
            digests = await self._redis.zrevrange(_P + "idx", 0, -1)
            found: list[FeedbackEntry] = []
            for digest in digests:
                values = await self._redis.hmget(_P + "e:" + digest.decode(), list(_FIELDS))
                if values[0] is None:
                    continue  # evicted between the two reads
                row = [
                    digest.decode(),
                    *(
                        v.decode() if i not in (5, 7) and v is not None else v
                        for i, v in enumerate(values)
                    ),
                ]
                found.append(_entry(row))
        except RedisError as exc:
            raise StateError(f"redis feedback: {exc}") from exc
        return found

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise StateError(f"redis feedback {self.url}: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()  # type: ignore[attr-defined]


async def open_feedback(
    state: StateSettings, settings: FeedbackSettings, key: SecretKey
) -> FeedbackStore:
    """The feedback store in the configured state backend, connected."""
    if state.backend == "redis":
        store = RedisFeedback(state.url, key=key, settings=settings)
        try:
            await store.ping()
        except StateError:
            await store.close()
            raise
        return store
    return await SqliteFeedback(state.path, key=key, settings=settings).open()


def training_set(entries: Iterable[FeedbackEntry], share: float) -> list[FeedbackEntry]:
    """The entries a model update may train on: per class, each reporter keeps at most
    ``share`` of the class (its newest entries; ``share >= 1`` caps nothing), then the
    larger class is cut to the smaller's size (newest first), so neither one account's
    volume nor one class's volume decides the model."""
    by_class: dict[str, list[FeedbackEntry]] = {label: [] for label in LABELS}
    for entry in sorted(entries, key=lambda e: (-e.at, e.digest)):
        by_class[entry.label].append(entry)
    kept: dict[str, list[FeedbackEntry]] = {}
    for label, items in by_class.items():
        kept[label] = items if share >= 1 else _cap_reporters(items, share)
    size = min(len(items) for items in kept.values())
    return [entry for label in LABELS for entry in kept[label][:size]]


def _cap_reporters(items: list[FeedbackEntry], share: float) -> list[FeedbackEntry]:
    """Each reporter keeps k entries with k <= share * (k + everyone else's kept), i.e.
    k <= share/(1-share) * others, but at least one so a lone reporter still counts."""
    counts: dict[str, int] = {}
    for entry in items:
        counts[entry.reporter] = counts.get(entry.reporter, 0) + 1
    # Caps are computed against the others' uncapped counts, then applied once; with one
    # dominant reporter (the case that matters) this is exact.
    total = len(items)
    caps = {
        r: max(1, min(n, math.floor(share / (1 - share) * (total - n)))) for r, n in counts.items()
    }
    taken: dict[str, int] = {}
    out: list[FeedbackEntry] = []
    for entry in items:
        if taken.get(entry.reporter, 0) < caps[entry.reporter]:
            taken[entry.reporter] = taken.get(entry.reporter, 0) + 1
            out.append(entry)
    return out
