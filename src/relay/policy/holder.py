"""The policy in force: swapped atomically on reload, captured by each transaction."""

from __future__ import annotations

from relay.contracts import Decider, FactSource
from relay.message import Message
from relay.verdict import ACCEPT_ALL, Verdict


class _Noop:
    name = "noop"
    fact_names: frozenset[str] = frozenset()

    async def decide(self, message: Message, facts: FactSource) -> Verdict:
        return ACCEPT_ALL


NOOP: Decider = _Noop()


class DeciderHolder:
    """The current policy; swapped atomically on reload. Sessions capture ``current`` when
    their transaction starts, so mail in flight finishes under the policy it started with."""

    def __init__(self, decider: Decider = NOOP) -> None:
        self.current: Decider = decider
        self.generation = 0

    def swap(self, decider: Decider) -> None:
        self.current = decider
        self.generation += 1
