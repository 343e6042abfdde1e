"""A transport that keeps delivered messages in a list (unit tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.contracts import Transaction, XForward
from relay.message import Message
from relay.reply import Reply


@dataclass
class MemoryTransport:
    """Keeps delivered messages in a list; refuses recipients listed in ``refuse``."""

    name: str = "memory"
    refuse: frozenset[str] = frozenset()
    delivered: list[tuple[str, tuple[str, ...], bytes]] = field(default_factory=list)

    async def begin(
        self, mail_from: str, options: Sequence[str] = (), xforward: XForward | None = None
    ) -> Transaction:
        return _MemoryTransaction(self, mail_from)

    async def probe(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class _MemoryTransaction:
    def __init__(self, transport: MemoryTransport, mail_from: str) -> None:
        self._t = transport
        self._mail_from = mail_from
        self._rcpts: list[str] = []

    async def add_recipient(self, address: str) -> Reply:
        if address in self._t.refuse:
            return Reply(550, "5.1.1", "No such user")
        self._rcpts.append(address)
        return Reply(250, "2.1.5", "Ok")

    async def send(self, message: Message) -> Reply:
        self._t.delivered.append((self._mail_from, tuple(self._rcpts), message.raw))
        return Reply(250, "2.0.0", f"Ok: queued as {message.queue_id}")

    async def abort(self) -> None:
        self._rcpts.clear()
