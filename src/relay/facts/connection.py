"""T0 facts about the SMTP connection: who connected, what it said at HELO, TLS."""

from __future__ import annotations

from relay.facts.base import FactContext, FactSpec, FactType
from relay.verdict import Tier


async def _client_ip(ctx: FactContext) -> str:
    return ctx.message.peer.ip


async def _helo(ctx: FactContext) -> str:
    return ctx.message.peer.helo or ""


async def _tls_used(ctx: FactContext) -> bool:
    return ctx.message.peer.tls_version is not None


async def _tls_version(ctx: FactContext) -> str:
    return ctx.message.peer.tls_version or ""


async def _smtp_authenticated(ctx: FactContext) -> bool:
    return ctx.message.peer.authenticated


FACTS = (
    FactSpec(
        "client_ip",
        FactType.STR,
        Tier.CONNECTION,
        _client_ip,
        doc='SMTP client address, "" when unknown',
    ),
    FactSpec("helo", FactType.STR, Tier.CONNECTION, _helo, doc="HELO/EHLO name given"),
    FactSpec("tls_used", FactType.BOOL, Tier.CONNECTION, _tls_used, doc="STARTTLS in use"),
    FactSpec("tls_version", FactType.STR, Tier.CONNECTION, _tls_version, doc="TLS version or ''"),
    FactSpec(
        "smtp_authenticated",
        FactType.BOOL,
        Tier.CONNECTION,
        _smtp_authenticated,
        doc="the client logged in (SMTP AUTH) at the MTA in front (milter door)",
    ),
)
