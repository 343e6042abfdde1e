"""The open SMTP connections of this process: the connection limit, the memory their
large messages may hold (``budget.py``) and the drain on shutdown. Knows a connection only
as something that may be busy and can be closed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from relay.reply import SHUTTING_DOWN, Reply
from relay.smtp.budget import DataBudget


class Connection(Protocol):
    """What the drain needs of a connection (``RelaySMTP``)."""

    @property
    def busy(self) -> bool:
        """Inside a transaction (MAIL .. end of DATA)."""
        ...

    def close_with(self, reply: Reply) -> None:
        """Send ``reply`` and close."""
        ...


@dataclass
class Sessions:
    """Open connections of this process: the connection limit, the memory for large
    messages, and the drain on shutdown."""

    limit: int
    data_budget: DataBudget
    open: set[Connection] = field(default_factory=set)
    draining: bool = False

    async def drain(self, grace: float) -> None:
        """Close idle sessions now; give sessions inside a transaction ``grace`` seconds."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.open and loop.time() < deadline:
            for sess in list(self.open):
                if not sess.busy:
                    sess.close_with(SHUTTING_DOWN)
            await asyncio.sleep(0.05)
        for sess in list(self.open):
            sess.close_with(SHUTTING_DOWN)
