"""On-disk fact cache: one row per (message digest, fact name, fact version, context).

``context`` ties a value to what else it depended on: the lab environment (offline or
resolver DNS, trusted authserv-ids, oracle lists, model file) for every fact, plus the
corpus order for stateful facts (a bulk count is only true for one sequence of mail).
Errors are cached too, so a warm run does not retry a fact that cannot be computed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
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
"""


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
