"""The contracts the pipeline's parts share, in one place.

Every seam between two layers is a Protocol here (or a frozen value), so the SMTP layer,
the pipeline, ops, the lab and the transports agree on shapes without importing each
other. This module imports nothing of the project above the value objects (message,
reply, verdict); ``tests/test_layers.py`` keeps it so.

- FactSource   what a Decider or a Stamp may ask of the facts of one message
- Decider      a compiled policy: ``decide(message, facts) -> Verdict``
- Stamp        rewrites the header block after the decision
- Transport / Transaction   where accepted mail goes, one SMTP transaction at a time
- Quarantine   where quarantined mail is kept, with its Verdict
- Outcome, MessageReport    what happened to one message
- Observer     metrics and logs watching SMTP events and finished messages
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from relay.message import Message
from relay.reply import Reply
from relay.verdict import FactRead, Verdict


class FactSource(Protocol):
    """The facts of one message, computed lazily and once (``facts.base.Facts``)."""

    async def get(self, name: str) -> Any: ...

    def computed(self, name: str) -> bool: ...

    def read(self, name: str) -> FactRead | None: ...


class Decider(Protocol):
    """A compiled policy. ``name`` labels verdicts; decide must not raise for bad facts."""

    @property
    def name(self) -> str: ...

    @property
    def fact_names(self) -> frozenset[str]:
        """Every fact its rules can read (the recorder keeps the state they count)."""
        ...

    async def decide(self, message: Message, facts: FactSource) -> Verdict: ...


class Stamp(Protocol):
    """Adds or removes header fields after the decision (e.g. Authentication-Results)."""

    async def __call__(self, message: Message, facts: FactSource, verdict: Verdict) -> Message: ...


XForward = Mapping[str, str]  # original client attributes (Postfix XFORWARD), may be empty


class Transaction(Protocol):
    """One SMTP transaction towards where mail goes; recipients are mirrored one by one."""

    async def add_recipient(self, address: str) -> Reply: ...

    async def send(self, message: Message) -> Reply: ...

    async def abort(self) -> None: ...


class Transport(Protocol):
    name: str

    async def begin(
        self, mail_from: str, options: Sequence[str] = (), xforward: XForward | None = None
    ) -> Transaction: ...

    async def probe(self) -> bool: ...

    async def close(self) -> None: ...


class Quarantine(Protocol):
    """Keeps a message with its Verdict; returns the id it is kept under."""

    async def put(self, message: Message, verdict: Verdict) -> str: ...


class Outcome(StrEnum):
    """What happened to one message (a metric label: a small fixed set)."""

    DELIVERED = "delivered"
    QUARANTINED = "quarantined"
    REJECTED = "rejected"
    TEMPFAILED = "tempfailed"
    FAILED = "failed"  # delivery failed or a bug: the client was told to retry or refused


@dataclass(frozen=True, slots=True)
class MessageReport:
    """Everything logged and measured about one finished message (never the body)."""

    queue_id: str
    size: int
    recipients: int
    verdict: Verdict
    reply: Reply
    outcome: Outcome
    timings: tuple[tuple[str, float], ...] = ()
    delivery: str = ""  # ok | temporary | permanent | none
    shadow: tuple[Verdict, ...] = field(default=())

    @property
    def total_seconds(self) -> float:
        return dict(self.timings).get("total", 0.0)


class Observer(Protocol):
    """Watches the relay; must never block or raise."""

    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def connection_refused(self) -> None: ...

    def smtp_reply(self, code: int) -> None: ...

    def message_done(self, report: MessageReport) -> None: ...

    def shadow_verdict(self, verdict: Verdict) -> None: ...

    def policy_reload(self, ok: bool) -> None: ...


class NullObserver:
    """An Observer that watches nothing (tests, `relay scan`)."""

    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def connection_refused(self) -> None: ...

    def smtp_reply(self, code: int) -> None: ...

    def message_done(self, report: MessageReport) -> None: ...

    def shadow_verdict(self, verdict: Verdict) -> None: ...

    def policy_reload(self, ok: bool) -> None: ...
