"""The memory the DATA of large messages may hold in this process.

A message of up to ``[smtp] large_message_size`` bytes needs nothing: small messages are
bounded by ``max_connections`` times that size. A larger one must first reserve, from
``[smtp] large_message_memory``, the whole size it may reach: what it declared with SIZE=
on MAIL (RFC 1870), else ``max_message_size``. A session that finds no room is told to
come back later: 452 4.3.1 at MAIL when its SIZE= does not fit, 451 4.3.1 after the end
of data when its bytes outgrow what it could reserve (the rest is read and dropped, so
the stream stays in step).

Whole sizes up front, not bytes as they come: were every large message given a share as
it arrived, fifty concurrent 25 MB messages would each get 2 MB of a 100 MB budget and
none would finish; reserved whole, the first four finish and the rest retry later.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import SmtpSettings


@dataclass
class DataBudget:
    """Bytes reserved by large messages in this process (one per worker, shared by its
    connections)."""

    limit: int  # bytes all reservations together may reach
    threshold: int  # a DATA up to this many bytes reserves nothing
    largest: int  # what a message of unknown size reserves (max_message_size)
    held: int = 0

    @classmethod
    def from_settings(cls, smtp: SmtpSettings) -> DataBudget:
        return cls(
            limit=smtp.large_message_memory,
            threshold=smtp.large_message_size,
            largest=smtp.max_message_size,
        )

    @property
    def free(self) -> int:
        return self.limit - self.held

    def take(self, size: int) -> bool:
        if size > self.free:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class DataHold:
    """One connection's reservation: 0 bytes, or what its current transaction may hold."""

    def __init__(self, budget: DataBudget) -> None:
        self.budget = budget
        self.size = 0

    @property
    def ceiling(self) -> int:
        """Bytes the current DATA may reach before it must reserve more."""
        return max(self.size, self.budget.threshold)

    def declare(self, size: int) -> bool:
        """MAIL with SIZE=``size``: reserve it when it is large; False when there is no
        room (the caller answers 452 4.3.1)."""
        return size <= self.budget.threshold or self.ensure(size)

    def ensure(self, size: int) -> bool:
        """Hold at least ``size`` bytes; False (holding what it held) when they do not fit."""
        if size <= self.size:
            return True
        if not self.budget.take(size - self.size):
            return False
        self.size = size
        return True

    def grow(self) -> int | None:
        """A DATA outgrew its ceiling: reserve the largest size a message may have; the new
        ceiling, or None when there is no room (the caller answers 451 4.3.1)."""
        return self.budget.largest if self.ensure(self.budget.largest) else None

    def release(self) -> None:
        """The transaction is over (answered, reset, or the connection lost)."""
        self.budget.give(self.size)
        self.size = 0
