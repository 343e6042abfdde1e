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

Reputation (feedback/reputation.py) rides on the same writes: each entry's identities are
kept beside it with whether they were counted (a reporter counts at most
``reputation_per_reporter`` reports per identity), and per-day counters per identity and
label move in the same transaction as the entry (record, relabel, forget, age and
eviction alike), so the counters always equal what the live entries say.
"""

from __future__ import annotations

import math
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from relay.config import FeedbackSettings, StateSettings
from relay.errors import FeedbackRefused, StateError
from relay.feedback.recent import RecentRows, Row
from relay.feedback.record import LABELS, Domains, FeedbackEntry, Label
from relay.feedback.reputation import Identity, Kind, Standing, day_of, weight
from relay.secretkey import SecretKey
from relay.state import (
    PRIVATE_MODE,
    SqliteOnThread,
    StateStore,
    close_redis,
    connect_readonly,
    redacted,
    redis_client,
    redis_error,
)

if TYPE_CHECKING:  # redis loads with a Redis backend only (state.redis_error)
    import redis.asyncio as aioredis

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
# Reputation: the identities each live entry credits (counted: within the reporter's cap
# when written), and the per-day counters they add up to.
_REP_TABLES = """
CREATE TABLE IF NOT EXISTS feedback_identity (
    digest TEXT NOT NULL, kind TEXT NOT NULL, domain TEXT NOT NULL, reporter TEXT NOT NULL,
    label TEXT NOT NULL, day INTEGER NOT NULL, counted INTEGER NOT NULL,
    PRIMARY KEY (digest, kind, domain));
CREATE INDEX IF NOT EXISTS feedback_identity_by ON feedback_identity (kind, domain, reporter);
CREATE TABLE IF NOT EXISTS feedback_reputation (
    kind TEXT NOT NULL, domain TEXT NOT NULL, label TEXT NOT NULL, day INTEGER NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (kind, domain, label, day));
"""
Counters = dict[tuple[Kind, str, Label, int], int]  # (kind, domain, label, day) -> reports
_SCORES_TABLE = (
    "CREATE TABLE IF NOT EXISTS feedback_scores (digest TEXT NOT NULL, model TEXT NOT NULL, "
    "p REAL NOT NULL, PRIMARY KEY (digest, model))"
)


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
        self._recent = RecentRows(settings.reputation_cache_seconds)

    def reporter_id(self, name: str) -> str:
        return self._hasher.hashed(_REPORTER_PURPOSE, name)

    async def record(
        self, entry: FeedbackEntry, *, now: float, identities: Sequence[Identity] = ()
    ) -> Label | None:
        """Write ``entry`` (a relabel overwrites) and credit ``identities`` with its label;
        the previous label, or None if new. Raises FeedbackRefused (reporter_cap) with
        nothing changed."""
        raise NotImplementedError

    async def reputation(
        self, identities: Sequence[Identity], *, now: float
    ) -> dict[Identity, Standing]:
        """Decayed spam and ham counts of each identity at ``now`` (only reads). Counters
        read in the last ``reputation_cache_seconds`` are reused (feedback/recent.py)."""
        rows = self._recent.known(identities)
        missing = [i for i in dict.fromkeys(identities) if i not in rows]
        if missing:
            found = await self._rows(missing)
            self._recent.keep(found)
            rows.update(found)
        return {i: self._standing(rows[i], now) for i in identities}

    async def _rows(self, identities: Sequence[Identity]) -> dict[Identity, tuple[Row, ...]]:
        """Every (label, day, count) counter of each identity, read from the store."""
        raise NotImplementedError

    async def counters(self) -> Counters:
        """Every non-zero reputation counter (tests, and a future stats command)."""
        raise NotImplementedError

    async def standings(
        self, kind: str, domains: Sequence[str], *, now: float
    ) -> list[tuple[float, float]]:
        """(spam, ham) decayed counts per domain of one kind: the read the reputation
        facts use (facts/services.py ReputationReader), in plain types."""
        wanted = [Identity(cast(Kind, kind), d) for d in domains]
        found = await self.reputation(wanted, now=now)
        return [(found[i].spam, found[i].ham) for i in wanted]

    def _standing(self, rows: Iterable[tuple[str, int, int]], now: float) -> Standing:
        half_life = self.settings.reputation_half_life_days
        spam = ham = 0.0
        for label, day, n in rows:
            w = n * weight(day, now, half_life)
            if label == "spam":
                spam += w
            else:
                ham += w
        return Standing(spam=spam, ham=ham)

    async def forget(self, digest: str, reporter: str, *, now: float) -> bool:
        """Delete the entry for ``digest``; whether there was one. Counts against the
        reporter's cap like any report."""
        raise NotImplementedError

    async def stats(self) -> FeedbackStats:
        raise NotImplementedError

    async def entries(self) -> list[FeedbackEntry]:
        raise NotImplementedError

    async def record_score(self, digest: str, model_sha256: str, probability: float) -> None:
        """Keep the base model's spam probability for an entry's body (model versions fit
        their combiner on it, docs/classifier.md). Keyed by body digest and model, so a
        relabel keeps it; scores of entries gone are dropped by ``scores``."""
        raise NotImplementedError

    async def scores(self, model_sha256: str) -> dict[str, float]:
        """digest -> base probability under that model, for the entries still stored."""
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
        self,
        path: Path,
        *,
        key: SecretKey,
        settings: FeedbackSettings,
        busy_timeout: float = 5.0,
        readonly: bool = False,
    ) -> None:
        super().__init__(key, settings)
        self.path = path
        self.readonly = readonly  # `relay scan`: reputation read, nothing written or created
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-feedback")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> SqliteFeedback:
        await self._run(self._open)
        return self

    def _open(self) -> None:
        import os

        if self.readonly:
            self._db = connect_readonly(self.path, self._busy_timeout, _TABLES + _REP_TABLES)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE))  # 0600 before use
        self._db = self._until_unlocked(self._setup, self._busy_timeout)

    def _setup(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a report acknowledged is a report kept
            db.executescript(_TABLES)
            db.executescript(_REP_TABLES)
        except sqlite3.Error:
            db.close()
            raise
        return db

    # One write = these steps inside one transaction; tests break one to check rollback.
    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        cutoff = now - self.settings.max_age_days * DAY
        old = db.execute("SELECT digest FROM feedback WHERE at <= ?", (cutoff,)).fetchall()
        self._unrep(db, [str(row[0]) for row in old])
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
        oldest = db.execute(
            "SELECT digest FROM feedback "
            "ORDER BY at ASC LIMIT max(0, (SELECT COUNT(*) FROM feedback) - ?)",
            (self.settings.max_entries,),
        ).fetchall()
        self._unrep(db, [str(row[0]) for row in oldest])
        db.executemany("DELETE FROM feedback WHERE digest = ?", oldest)

    def _unrep(self, db: sqlite3.Connection, digests: Sequence[str]) -> None:
        """Take these entries out of the reputation counters; called before they are
        deleted or overwritten, in the same transaction."""
        rows = [
            row
            for digest in digests
            for row in db.execute(
                "SELECT kind, domain, label, day FROM feedback_identity "
                "WHERE counted = 1 AND digest = ?",
                (digest,),
            )
        ]
        db.executemany(
            "UPDATE feedback_reputation SET n = n - 1 "
            "WHERE kind = ? AND domain = ? AND label = ? AND day = ?",
            rows,
        )
        db.executemany(
            "DELETE FROM feedback_reputation "
            "WHERE kind = ? AND domain = ? AND label = ? AND day = ? AND n <= 0",
            rows,
        )
        db.executemany("DELETE FROM feedback_identity WHERE digest = ?", [(d,) for d in digests])

    def _rep(
        self, db: sqlite3.Connection, entry: FeedbackEntry, identities: Sequence[Identity]
    ) -> None:
        day = day_of(entry.at)
        for identity in dict.fromkeys(identities):
            (mine,) = db.execute(
                "SELECT COUNT(*) FROM feedback_identity "
                "WHERE kind = ? AND domain = ? AND reporter = ? AND counted = 1",
                (identity.kind, identity.domain, entry.reporter),
            ).fetchone()
            counted = int(mine) < self.settings.reputation_per_reporter
            db.execute(
                "INSERT INTO feedback_identity (digest, kind, domain, reporter, label, day, "
                "counted) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.digest,
                    identity.kind,
                    identity.domain,
                    entry.reporter,
                    entry.label,
                    day,
                    int(counted),
                ),
            )
            if counted:
                db.execute(
                    "INSERT INTO feedback_reputation (kind, domain, label, day, n) "
                    "VALUES (?, ?, ?, ?, 1) ON CONFLICT (kind, domain, label, day) "
                    "DO UPDATE SET n = n + 1",
                    (identity.kind, identity.domain, entry.label, day),
                )

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self.readonly:
            raise StateError(f"{self._WHAT} {self.path} is open read-only")
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def _record(
        self, entry: FeedbackEntry, now: float, identities: Sequence[Identity] = ()
    ) -> Label | None:
        def steps(db: sqlite3.Connection) -> Label | None:
            self._prune(db, now)
            self._count_report(db, entry.reporter, now)
            old = db.execute(
                "SELECT label FROM feedback WHERE digest = ?", (entry.digest,)
            ).fetchone()
            self._unrep(db, [entry.digest])  # a relabel moves its counts
            db.execute(
                "INSERT OR REPLACE INTO feedback (digest, label, source, reporter, at, "
                "feature_version, vector, domains, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row(entry),
            )
            self._rep(db, entry, identities)
            self._evict(db)
            return None if old is None else cast(Label, str(old[0]))

        return self._write(steps)

    def _forget(self, digest: str, reporter: str, now: float) -> bool:
        def steps(db: sqlite3.Connection) -> bool:
            self._prune(db, now)
            self._count_report(db, reporter, now)
            self._unrep(db, [digest])
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

    def _read_rows(self, identities: Sequence[Identity]) -> dict[Identity, tuple[Row, ...]]:
        db = self._conn()
        return {
            identity: tuple(
                (str(label), int(day), int(n))
                for label, day, n in db.execute(
                    "SELECT label, day, n FROM feedback_reputation WHERE kind = ? AND domain = ?",
                    (identity.kind, identity.domain),
                )
            )
            for identity in identities
        }

    def _counters(self) -> Counters:
        rows = self._conn().execute("SELECT kind, domain, label, day, n FROM feedback_reputation")
        return {(r[0], r[1], r[2], int(r[3])): int(r[4]) for r in rows}

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def record(
        self, entry: FeedbackEntry, *, now: float, identities: Sequence[Identity] = ()
    ) -> Label | None:
        try:
            return await self._run(self._record, entry, now, identities)
        finally:
            self._recent.clear()  # a write also ages out and evicts others' counts

    async def _rows(self, identities: Sequence[Identity]) -> dict[Identity, tuple[Row, ...]]:
        return await self._run(self._read_rows, identities)

    async def counters(self) -> Counters:
        return await self._run(self._counters)

    async def forget(self, digest: str, reporter: str, *, now: float) -> bool:
        try:
            return await self._run(self._forget, digest, reporter, now)
        finally:
            self._recent.clear()

    async def stats(self) -> FeedbackStats:
        return await self._run(self._stats)

    async def entries(self) -> list[FeedbackEntry]:
        return await self._run(self._entries)

    # Base-model scores: their own table, created on first use, so older files need no
    # migration and entries written before it simply have no score.
    def _record_score(self, digest: str, model: str, probability: float) -> None:
        def steps(db: sqlite3.Connection) -> None:
            db.execute(_SCORES_TABLE)
            db.execute(
                "INSERT OR REPLACE INTO feedback_scores (digest, model, p) VALUES (?, ?, ?)",
                (digest, model, probability),
            )

        self._write(steps)

    def _scores(self, model: str) -> dict[str, float]:
        def steps(db: sqlite3.Connection) -> dict[str, float]:
            db.execute(_SCORES_TABLE)
            db.execute(
                "DELETE FROM feedback_scores WHERE digest NOT IN (SELECT digest FROM feedback)"
            )
            rows = db.execute("SELECT digest, p FROM feedback_scores WHERE model = ?", (model,))
            return {str(d): float(p) for d, p in rows}

        return self._write(steps)

    async def record_score(self, digest: str, model_sha256: str, probability: float) -> None:
        await self._run(self._record_score, digest, model_sha256, probability)

    async def scores(self, model_sha256: str) -> dict[str, float]:
        return await self._run(self._scores, model_sha256)

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)


_P = "relay:fb:"
# One script per write: Redis runs it alone, and every check comes before the first
# write, so a refused or failed report changes nothing. ARGV: op, now, max_age, cap,
# max_entries, reporter, report id, digest, then for "record" the entry's fields, the
# per-reporter reputation cap, the entry's day and its identities ("kind\tdomain\n"...).
# unrep() takes an entry out of the reputation counters before it is deleted or replaced;
# the entry's 'rep' field lists its identities with whether each was counted.
_SCRIPT = """
local p, op, now = 'relay:fb:', ARGV[1], tonumber(ARGV[2])
local function unrep(d)
  local e = redis.call('HMGET', p .. 'e:' .. d, 'rep', 'label', 'repday', 'reporter')
  if not e[1] then return end
  for kind, domain, c in string.gmatch(e[1], '([^\\t\\n]+)\\t([^\\t\\n]+)\\t([01])\\n') do
    if c == '1' then
      local ck = p .. 'rep:' .. kind .. ':' .. domain
      local field = e[2] .. ':' .. e[3]
      if redis.call('HINCRBY', ck, field, -1) <= 0 then redis.call('HDEL', ck, field) end
      local rc = p .. 'rc:' .. kind .. ':' .. domain .. ':' .. e[4]
      if redis.call('DECR', rc) <= 0 then redis.call('DEL', rc) end
    end
  end
end
local cutoff = now - tonumber(ARGV[3])
local rk = p .. 'r:' .. ARGV[6]
local reports = redis.call('ZCOUNT', rk, '(' .. tostring(now - 86400), '+inf')
if reports >= tonumber(ARGV[4]) then return {-1, false} end
for _, d in ipairs(redis.call('ZRANGEBYSCORE', p .. 'idx', '-inf', cutoff)) do
  unrep(d)
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
unrep(digest)
redis.call('DEL', ek)
redis.call('SREM', p .. 'spam', digest)
redis.call('SREM', p .. 'ham', digest)
redis.call('ZREM', p .. 'idx', digest)
if op == 'record' then
  local label = ARGV[9]
  redis.call('HSET', ek, 'label', label, 'source', ARGV[10], 'reporter', ARGV[6],
    'at', ARGV[11], 'fv', ARGV[12], 'vector', ARGV[13], 'domains', ARGV[14])
  if ARGV[15] == '1' then redis.call('HSET', ek, 'body', ARGV[16]) end
  local cap, day, rep = tonumber(ARGV[17]), ARGV[18], {}
  for kind, domain in string.gmatch(ARGV[19], '([^\\t\\n]+)\\t([^\\t\\n]+)\\n') do
    local rc = p .. 'rc:' .. kind .. ':' .. domain .. ':' .. ARGV[6]
    local c = '0'
    if tonumber(redis.call('GET', rc) or '0') < cap then
      c = '1'
      redis.call('INCR', rc)
      redis.call('HINCRBY', p .. 'rep:' .. kind .. ':' .. domain, label .. ':' .. day, 1)
    end
    table.insert(rep, kind .. '\\t' .. domain .. '\\t' .. c .. '\\n')
  end
  redis.call('HSET', ek, 'rep', table.concat(rep), 'repday', day)
  redis.call('SADD', p .. label, digest)
  redis.call('ZADD', p .. 'idx', tonumber(ARGV[11]), digest)
  local over = redis.call('ZCARD', p .. 'idx') - tonumber(ARGV[5])
  if over > 0 then
    for _, d in ipairs(redis.call('ZRANGE', p .. 'idx', 0, over - 1)) do
      unrep(d)
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

    def __init__(
        self,
        url: str,
        *,
        key: SecretKey,
        settings: FeedbackSettings,
        timeout: float | None = None,
    ) -> None:
        super().__init__(key, settings)
        self.url = url
        self._redis: aioredis.Redis[bytes] = redis_client(url, timeout)
        self._error = redis_error()
        self._script = self._redis.register_script(_SCRIPT)

    async def _eval(self, args: list[str | bytes | float | int]) -> list[Any]:
        try:
            return cast(list[Any], await self._script(keys=[], args=args))
        except self._error as exc:
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

    async def record(
        self, entry: FeedbackEntry, *, now: float, identities: Sequence[Identity] = ()
    ) -> Label | None:
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
            self.settings.reputation_per_reporter,
            day_of(entry.at),
            "".join(f"{i.kind}\t{i.domain}\n" for i in dict.fromkeys(identities)),
        ]
        try:
            status, old = await self._eval(args)
        finally:
            self._recent.clear()  # a write also ages out and evicts others' counts
        if int(status) < 0:
            raise _capped(self.settings)
        return None if old is None else cast(Label, old.decode())

    async def forget(self, digest: str, reporter: str, *, now: float) -> bool:
        try:
            status, old = await self._eval(self._head("forget", reporter, digest, now))
        finally:
            self._recent.clear()
        if int(status) < 0:
            raise _capped(self.settings)
        return old is not None

    async def stats(self) -> FeedbackStats:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.scard(_P + "spam")
                pipe.scard(_P + "ham")
                spam, ham = await pipe.execute()
        except self._error as exc:
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
        except self._error as exc:
            raise StateError(f"redis feedback: {exc}") from exc
        return found

    async def record_score(self, digest: str, model_sha256: str, probability: float) -> None:
        try:
            await self._redis.hset(_P + "score:" + model_sha256, digest, repr(probability))
        except self._error as exc:
            raise StateError(f"redis feedback: {exc}") from exc

    async def scores(self, model_sha256: str) -> dict[str, float]:
        key = _P + "score:" + model_sha256
        try:
            found = {d.decode(): float(p) for d, p in (await self._redis.hgetall(key)).items()}
            if not found:
                return {}
            digests = list(found)
            present = await self._redis.zmscore(_P + "idx", digests)  # type: ignore[no-untyped-call]
            gone = [d for d, at in zip(digests, present, strict=True) if at is None]
            if gone:
                await self._redis.hdel(key, *gone)
        except self._error as exc:
            raise StateError(f"redis feedback: {exc}") from exc
        return {d: p for d, p in found.items() if d not in set(gone)}

    async def _rows(self, identities: Sequence[Identity]) -> dict[Identity, tuple[Row, ...]]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for identity in identities:
                    pipe.hgetall(f"{_P}rep:{identity.kind}:{identity.domain}")
                found: list[dict[bytes, bytes]] = await pipe.execute()
        except self._error as exc:
            raise StateError(f"redis feedback: {exc}") from exc
        out: dict[Identity, tuple[Row, ...]] = {}
        for identity, fields in zip(identities, found, strict=True):
            rows = []
            for field, n in fields.items():
                label, _, day = field.decode().partition(":")
                rows.append((label, int(day), int(n)))
            out[identity] = tuple(rows)
        return out

    async def counters(self) -> Counters:
        out: Counters = {}
        try:
            async for key in self._redis.scan_iter(match=_P + "rep:*"):
                kind, _, domain = key.decode()[len(_P) + 4 :].partition(":")
                for field, n in (await self._redis.hgetall(key)).items():
                    label, _, day = field.decode().partition(":")
                    out[(cast(Kind, kind), domain, cast(Label, label), int(day))] = int(n)
        except self._error as exc:
            raise StateError(f"redis feedback: {exc}") from exc
        return out

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except self._error as exc:
            raise StateError(f"redis feedback {redacted(self.url)}: {exc}") from exc

    async def close(self) -> None:
        await close_redis(self._redis)


async def open_feedback(
    state: StateSettings,
    settings: FeedbackSettings,
    key: SecretKey,
    *,
    require_answer: bool = True,
    readonly: bool = False,
) -> FeedbackStore:
    """The feedback store in the configured state backend, connected.

    ``require_answer=False`` (the relay's reputation facts and learn endpoint): a Redis
    that does not answer yet is no error; each use fails with StateError until it does
    (the reputation facts fail, counted; the learn endpoint answers 503).
    ``readonly=True`` (``relay scan``): a SQLite file is read as the state store reads it
    (``state.connect_readonly``: nothing created or written); Redis is only read anyway,
    since reading reputation sends no write."""
    if state.backend == "redis":
        store = RedisFeedback(state.url, key=key, settings=settings, timeout=state.timeout)
        if not require_answer:
            return store
        try:
            await store.ping()
        except StateError:
            await store.close()
            raise
        return store
    return await SqliteFeedback(state.path, key=key, settings=settings, readonly=readonly).open()


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
