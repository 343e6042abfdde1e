"""An Authenticator wired to a LocalDns server, for authentication tests and benches."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from relay.auth.checker import Authenticator
from relay.config import DnsSettings
from relay.dns import Resolver
from relay.message import Envelope, Message, Peer
from tests.support.dnsserver import LocalDns


@contextlib.asynccontextmanager
async def authenticator(
    dns: LocalDns,
    *,
    timeout: float = 0.5,
    executor: Executor | None = None,
    executor_workers: int = 1,
    processes: int = 0,
) -> AsyncIterator[Authenticator]:
    """Verification in ``processes`` child processes when > 0, else in ``executor`` (or a
    thread of the Authenticator's own)."""
    resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", dns.port),), timeout=timeout))
    auth = Authenticator(
        resolver, executor=executor, executor_workers=executor_workers, processes=processes
    )
    try:
        await auth.start()
        yield auth
    finally:
        await auth.close()
        await resolver.close()


def incoming(
    raw: bytes,
    *,
    mail_from: str = "alice@example.com",
    ip: str = "192.0.2.10",
    helo: str = "mail.example.com",
) -> Message:
    """A message as the SMTP layer would build it."""
    return Message(
        raw=raw,
        envelope=Envelope(mail_from=mail_from, rcpt_to=("bob@example.org",)),
        peer=Peer(ip=ip, helo=helo),
        received_at=1_795_000_000.0,  # 2026-11-18: a fixed arrival time, never the clock
    )
