"""A worker's short memory of reputation counters it read: the same senders write again
and again, and reading their counters for every message cost a trip to the store's
thread (SQLite) or a network round trip (Redis) each time.

Rows are kept, not standings: a standing decays with the message's own clock
(``received_at``), so it is computed from the rows at every read. An entry lives
``seconds`` (``[feedback] reputation_cache_seconds``), so a report made through another
process (``relay learn``, another worker, another relay) counts everywhere within that
time; this process's own writes drop every entry at once (a write can also age out and
evict other entries, whose identities it does not name). Bounded: the least recently
stored entries go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

from relay.feedback.reputation import Identity

Row = tuple[str, int, int]  # label, day, count
MAX_IDENTITIES = 4096  # entries kept; a few hundred KiB at most


class RecentRows:
    """Reputation rows per identity, each kept ``seconds``; 0 keeps nothing."""

    def __init__(
        self,
        seconds: float,
        *,
        limit: int = MAX_IDENTITIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.limit = limit
        self._clock = clock
        self._rows: OrderedDict[Identity, tuple[float, tuple[Row, ...]]] = OrderedDict()

    def known(self, identities: Iterable[Identity]) -> dict[Identity, tuple[Row, ...]]:
        """The rows of those identities still fresh; the others are left out."""
        if self.seconds <= 0:
            return {}
        now = self._clock()
        out: dict[Identity, tuple[Row, ...]] = {}
        for identity in identities:
            kept = self._rows.get(identity)
            if kept is None:
                continue
            if now - kept[0] >= self.seconds:
                del self._rows[identity]
                continue
            out[identity] = kept[1]
        return out

    def keep(self, found: Mapping[Identity, Sequence[Row]]) -> None:
        if self.seconds <= 0:
            return
        now = self._clock()
        for identity, rows in found.items():
            self._rows[identity] = (now, tuple(rows))
            self._rows.move_to_end(identity)
        while len(self._rows) > self.limit:
            self._rows.popitem(last=False)

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)
