"""On-disk caches of the lab: facts, and each regime's decisions.

Facts: one row per (message digest, fact name, fact version, context). ``context`` ties
a value to what else it depended on: the lab environment (offline or resolver DNS,
trusted authserv-ids, oracle lists, model file) for every fact, plus the corpus order for
stateful facts (a bulk count is only true for one sequence of mail). Errors are cached
too, so a warm run does not retry a fact that cannot be computed. Facts are read a batch
of messages at a time (``load_batch``, ``BatchReader``): the driver never holds every
message's facts at once.

Corpus index: per message digest, what its header gave the lab (time, envelope, client),
so a rerun does not parse every header again (CorpusIndex).

Stat index: per tar member (archive path, the archive's size, mtime and inode, the
member's offset and size), its digest, so a rerun over an unchanged archive does not
read and hash every message again (StatIndex; the trust model is in docs/lab.md).

Facts ready: per (fact versions, contexts, corpus order), a note that a survey found
every fact cached, with what the survey counted, so the next run skips the survey.
Facts are only ever added or replaced, never removed, so the note stays true.

Decisions: one row per (regime key, message digest), the regime key a digest of the
regime file, the versions of the facts it can read, the fact context and the deciding
code (evaluate.regime_key). A rerun with one regime file changed evaluates that regime
only; the others' decisions are read back (DecisionCache).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS facts (
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    context TEXT NOT NULL,
    value TEXT,
    error TEXT,
    PRIMARY KEY (digest, name, version, context)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS corpus_index (
    digest TEXT NOT NULL,
    version TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (digest, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stat_index (
    file TEXT NOT NULL,
    stat TEXT NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (file, stat, offset, size)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS facts_ready (
    key TEXT PRIMARY KEY,
    info TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decision_values (
    regime TEXT NOT NULL,
    id INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (regime, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decision_ids (
    regime TEXT NOT NULL,
    digest TEXT NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (regime, digest)
) WITHOUT ROWID;
"""
BATCH = 500  # messages per cache query: well under SQLite's 32766 bound variables


def _batches(digests: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """``digests`` BATCH at a time, each part with its ``?,?,...`` placeholders."""
    for start in range(0, len(digests), BATCH):
        part = digests[start : start + BATCH]
        yield part, ",".join("?" * len(part))


@dataclass(frozen=True, slots=True)
class Cached:
    """A fact's cached outcome: a JSON value, or the error that stopped it."""

    value: Any = None
    error: str | None = None


class FactCache:
    """SQLite file under the cache directory; one writer (the lab's main process)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "facts.sqlite3"
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FactCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(
        self, digests: Iterable[str], versions: Mapping[str, int], contexts: Sequence[str]
    ) -> dict[str, dict[str, Cached]]:
        """Every cached fact of the given messages, for the current versions and contexts."""
        wanted = set(digests)
        out: dict[str, dict[str, Cached]] = {}
        marks = ",".join("?" * len(contexts))
        rows = self._db.execute(
            f"SELECT digest, name, version, value, error FROM facts WHERE context IN ({marks})",  # noqa: S608
            tuple(contexts),
        )
        for digest, name, version, value, error in rows:
            if digest not in wanted or versions.get(name) != version:
                continue
            out.setdefault(digest, {})[name] = Cached(
                None if value is None else json.loads(value), error
            )
        return out

    def load_batch(
        self,
        digests: Sequence[str],
        versions: Mapping[str, int],
        contexts: Sequence[str],
        *,
        values: bool = True,
    ) -> dict[str, dict[str, Cached]]:
        """Like ``load`` for these messages only, by the digest index (``values=False``:
        which facts are cached, each with an empty Cached, without parsing a value)."""
        out: dict[str, dict[str, Cached]] = {}
        if not versions:
            return out
        column = "value" if values else "NULL"
        names = sorted(versions)  # only these are parsed: a regime reads a few of them
        for start in range(0, len(digests), BATCH):
            part = digests[start : start + BATCH]
            rows = self._db.execute(
                f"SELECT digest, name, version, {column}, error FROM facts "  # noqa: S608
                f"WHERE digest IN ({','.join('?' * len(part))}) "
                f"AND context IN ({','.join('?' * len(contexts))}) "
                f"AND name IN ({','.join('?' * len(names))})",
                (*part, *contexts, *names),
            )
            for digest, name, version, value, error in rows:
                if versions.get(name) != version:
                    continue
                out.setdefault(digest, {})[name] = Cached(
                    None if value is None else json.loads(value), error
                )
        return out

    def survey(
        self, digests: Sequence[str], versions: Mapping[str, int], contexts: Sequence[str]
    ) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Per message, how many of these facts are cached in any of ``contexts`` (each
        fact once) and which ones failed in the first context, counted by SQLite: a
        warm run's check that nothing is missing, without a Python object per fact."""
        out: dict[str, tuple[int, tuple[str, ...]]] = {}
        if not versions:
            return out
        pairs = ",".join("(?, ?)" for _ in versions)
        flat = [x for name, version in sorted(versions.items()) for x in (name, version)]
        for start in range(0, len(digests), BATCH):
            part = digests[start : start + BATCH]
            rows = self._db.execute(
                "SELECT digest, count(DISTINCT name), group_concat(CASE WHEN error "  # noqa: S608
                "IS NOT NULL AND context = ? THEN name END, ',') FROM facts "
                f"WHERE digest IN ({','.join('?' * len(part))}) "
                f"AND context IN ({','.join('?' * len(contexts))}) "
                f"AND (name, version) IN (VALUES {pairs}) GROUP BY digest",
                (contexts[0], *part, *contexts, *flat),
            )
            for digest, count, failed in rows:
                out[digest] = (count, tuple(failed.split(",")) if failed else ())
        return out

    def store(
        self,
        digest: str,
        values: Mapping[str, Cached],
        versions: Mapping[str, int],
        context: str,
    ) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    digest,
                    name,
                    versions[name],
                    context,
                    None if c.error is not None else json.dumps(c.value, sort_keys=True),
                    c.error,
                )
                for name, c in values.items()
            ],
        )

    def commit(self) -> None:
        self._db.commit()

    def decisions(self) -> DecisionCache:
        return DecisionCache(self._db)

    def corpus_index(self) -> CorpusIndex:
        return CorpusIndex(self._db)

    def stat_index(self) -> StatIndex:
        return StatIndex(self._db)

    def ready_info(self, key: str) -> dict[str, Any] | None:
        """What the survey under ``key`` found, if one found every fact cached."""
        row = self._db.execute("SELECT info FROM facts_ready WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        info: dict[str, Any] = json.loads(row[0])
        return info

    def mark_ready(self, key: str, info: Mapping[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO facts_ready VALUES (?, ?)", (key, json.dumps(info))
        )
        self._db.commit()


class BatchReader(Mapping[str, dict[str, Cached]]):
    """Every message's cached facts as a read-only mapping, read a batch at a time in
    corpus order: a pass that walks the messages in order (pass 2, evaluation) holds one
    batch of facts, not the corpus's."""

    def __init__(
        self,
        cache: FactCache,
        digests: Sequence[str],
        versions: Mapping[str, int],
        contexts: Sequence[str],
    ) -> None:
        self._cache = cache
        self._digests = list(dict.fromkeys(digests))
        self._position = {d: i for i, d in enumerate(self._digests)}
        self._versions = versions
        self._contexts = contexts
        self._batch: dict[str, dict[str, Cached]] = {}

    def __getitem__(self, digest: str) -> dict[str, Cached]:
        if digest not in self._position:
            raise KeyError(digest)
        if digest not in self._batch:
            start = self._position[digest]
            part = self._digests[start : start + BATCH]
            loaded = self._cache.load_batch(part, self._versions, self._contexts)
            self._batch = {d: loaded.get(d, {}) for d in part}
        return self._batch[digest]

    def __iter__(self) -> Iterator[str]:
        return iter(self._digests)

    def __len__(self) -> int:
        return len(self._digests)


class CorpusIndex:
    """What each message's header gave the lab (lab/corpus.py header_values), by digest
    and the version of the code that derived it: a rerun reads it instead of parsing."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, digests: Sequence[str], version: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part, marks in _batches(digests):
            rows = self._db.execute(
                f"SELECT digest, value FROM corpus_index WHERE version = ? AND digest IN ({marks})",  # noqa: S608
                (version, *part),
            )
            out.update((digest, json.loads(value)) for digest, value in rows)
        return out

    def put(self, rows: Sequence[tuple[str, Any]], version: str) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO corpus_index VALUES (?, ?, ?)",
            [(d, version, json.dumps(v, separators=(",", ":"))) for d, v in rows],
        )
        self._db.commit()


class StatIndex:
    """Digests of tar members by where they are and the archive's stat, like git's index:
    an archive whose size, mtime_ns, inode and device are those recorded is taken as
    unchanged, and its members' digests are read back instead of hashing their bytes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(
        self, file: str, stat: str, spans: Sequence[tuple[int, int]]
    ) -> dict[tuple[int, int], str]:
        out: dict[tuple[int, int], str] = {}
        if not spans:
            return out
        offsets = sorted({o for o, _ in spans})
        rows = self._db.execute(
            "SELECT offset, size, digest FROM stat_index "  # noqa: S608
            f"WHERE file = ? AND stat = ? AND offset IN ({','.join('?' * len(offsets))})",
            (file, stat, *offsets),
        )
        wanted = set(spans)
        for offset, size, digest in rows:
            if (offset, size) in wanted:
                out[(offset, size)] = digest
        return out

    def put(self, file: str, stat: str, rows: Sequence[tuple[int, int, str]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO stat_index VALUES (?, ?, ?, ?, ?)",
            [(file, stat, offset, size, digest) for offset, size, digest in rows],
        )
        self._db.commit()


def encode_decisions(
    rows: Iterable[tuple[str, Any]],
) -> tuple[dict[int, str], list[tuple[str, int]]]:
    """(each distinct value's JSON by its id, (digest, id) per row): DecisionCache's
    stored form, whoever computes it."""
    values: dict[int, str] = {}
    ids: list[tuple[str, int]] = []
    for digest, value in rows:
        text = json.dumps(value, separators=(",", ":"))
        id_ = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)
        values[id_] = text
        ids.append((digest, id_))
    return values, ids


class DecisionCache:
    """Each regime's decisions by regime key and message digest, as JSON values (the
    caller encodes them: evaluate.decision_row). Stored once per distinct value under an
    id made from the value itself (64 bits of its SHA-256): most messages share their
    decision with many others, so a message costs an integer and each distinct value is
    parsed once per run, and two runs writing at once agree on every id."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._values: dict[tuple[str, int], Any] = {}

    def count(self, regime: str) -> int:
        """How many messages have a decision under ``regime`` (a regime key)."""
        query = "SELECT count(*) FROM decision_ids WHERE regime = ?"
        (n,) = self._db.execute(query, (regime,)).fetchone()
        return int(n)

    def load(self, regime: str, digests: Sequence[str]) -> dict[str, int]:
        """The id of each cached decision of these messages (``value`` gives it)."""
        out: dict[str, int] = {}
        for part, marks in _batches(digests):
            rows = self._db.execute(
                f"SELECT digest, id FROM decision_ids WHERE regime = ? AND digest IN ({marks})",  # noqa: S608
                (regime, *part),
            )
            out.update(rows)
        return out

    def value(self, regime: str, id_: int) -> Any:
        key = (regime, id_)
        if key not in self._values:
            (text,) = self._db.execute(
                "SELECT value FROM decision_values WHERE regime = ? AND id = ?", key
            ).fetchone()
            self._values[key] = json.loads(text)
        return self._values[key]

    def store(self, regime: str, rows: Iterable[tuple[str, Any]]) -> None:
        self.store_encoded(regime, *encode_decisions(rows))

    def store_encoded(
        self, regime: str, values: Mapping[int, str], ids: Sequence[tuple[str, int]]
    ) -> None:
        """Rows as ``encode_decisions`` made them (in another process: decide_pool.py)."""
        self._db.executemany(
            "INSERT OR IGNORE INTO decision_values VALUES (?, ?, ?)",
            [(regime, i, t) for i, t in values.items()],
        )
        self._db.executemany(
            "INSERT OR REPLACE INTO decision_ids VALUES (?, ?, ?)",
            [(regime, digest, i) for digest, i in ids],
        )

    def commit(self) -> None:
        self._db.commit()
