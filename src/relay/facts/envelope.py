"""T1 facts about the SMTP envelope."""

from __future__ import annotations

from relay.facts.base import FactContext, FactSpec, FactType
from relay.verdict import Tier


def address_domain(address: str) -> str:
    """Lower-cased domain of an address, '' for the null sender or a bare local part."""
    _, at, domain = address.rpartition("@")
    return domain.strip().strip(".").lower() if at else ""


async def _recipient_count(ctx: FactContext) -> int:
    return len(ctx.message.envelope.rcpt_to)


async def _mail_from(ctx: FactContext) -> str:
    return ctx.message.envelope.mail_from


async def _mail_from_domain(ctx: FactContext) -> str:
    return address_domain(ctx.message.envelope.mail_from)


async def _null_sender(ctx: FactContext) -> bool:
    return ctx.message.envelope.mail_from == ""


async def _message_size(ctx: FactContext) -> int:
    return ctx.message.size


FACTS = (
    FactSpec(
        "recipient_count",
        FactType.INT,
        Tier.ENVELOPE,
        _recipient_count,
        doc="number of envelope recipients",
    ),
    FactSpec(
        "mail_from",
        FactType.STR,
        Tier.ENVELOPE,
        _mail_from,
        doc="envelope sender ('' for the null sender)",
    ),
    FactSpec(
        "mail_from_domain",
        FactType.STR,
        Tier.ENVELOPE,
        _mail_from_domain,
        doc="domain of the envelope sender",
    ),
    FactSpec(
        "null_sender",
        FactType.BOOL,
        Tier.ENVELOPE,
        _null_sender,
        doc="bounce or auto-reply (MAIL FROM:<>)",
    ),
    FactSpec(
        "message_size",
        FactType.INT,
        Tier.ENVELOPE,
        _message_size,
        doc="size of the message in bytes",
    ),
)
