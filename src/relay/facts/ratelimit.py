"""Facts of rate limits: token buckets per client address, sender domain and recipient.

Each bucket (``[ratelimit] client_ip``, ``sender_domain``, ``recipient``) holds up to
``burst`` tokens and refills at ``rate`` tokens a minute; a message needs one token from
each bucket it falls in. The facts say how long this message would have to wait:

- ``rate_client_ip_wait`` (T0): the client's bucket; an IPv4 address, or its IPv6
  ``/ipv6_prefix`` network. 0 without a client address.
- ``rate_sender_domain_wait`` (T1): the organisational domain of the envelope sender
  (subdomains share it; the null sender has none).
- ``rate_recipient_wait`` (T1): the worst bucket of the message's recipients.
- ``rate_limit_wait`` (T1): the largest of the three.

0 means a token is there (or the bucket is off, ``rate = 0``, or the client is in
``exempt_networks``). Keys are normalised (``facts/throttlekeys.py``) and hashed.

They are evaluated at the end of DATA, like every fact: both front doors (SMTP and the
milter) run the same pipeline, so the limits hold for both. Facts only read
(``StateStore.bucket_levels``); the recorder takes the tokens after the action
(``bucket_take``: from each bucket that has one), so a message refused by the limit costs
nothing and ``relay scan`` spends nothing. A state failure propagates: the facts are
missing and the mail passes (fail open).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from publicsuffixlist import PublicSuffixList

from relay.auth.domains import org_domain
from relay.config import RateBucket, RateLimitSettings
from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.services import PSL, RATELIMIT, STATE
from relay.facts.throttlekeys import address_domain, client_ip, client_network, normal_address
from relay.message import Message
from relay.state import Bucket, StateStore
from relay.verdict import Tier

CLIENT_IP, SENDER_DOMAIN, RECIPIENT = "client_ip", "sender_domain", "recipient"
KINDS = (CLIENT_IP, SENDER_DOMAIN, RECIPIENT)


def _bucket(state: StateStore, kind: str, identity: str, limit: RateBucket) -> Bucket:
    return Bucket(
        f"rate:{kind}:" + state.hashed("rate " + kind, identity), limit.rate / 60, limit.burst
    )


def identities(
    kind: str, message: Message, settings: RateLimitSettings, psl: PublicSuffixList
) -> list[str]:
    """The normalised identities whose ``kind`` buckets the message falls in."""
    if kind == CLIENT_IP:
        if not message.peer.ip:  # unknown client (XFORWARD [UNAVAILABLE]): no shared key
            return []
        ip = client_ip(message.peer.ip)
        return [str(ip) if ip.version == 4 else client_network(str(ip), 32, settings.ipv6_prefix)]
    if kind == SENDER_DOMAIN:
        domain = address_domain(message.envelope.mail_from)
        return [org_domain(psl, domain)] if domain else []
    return sorted({normal_address(r) for r in message.envelope.rcpt_to})


def buckets(
    kind: str,
    state: StateStore,
    message: Message,
    settings: RateLimitSettings,
    psl: PublicSuffixList,
) -> list[Bucket]:
    """The message's buckets of one kind: none when that bucket is off or the client is
    exempt. The recorder takes from exactly these."""
    limit: RateBucket = getattr(settings, kind)
    if not limit.enabled:
        return []
    if message.peer.ip and settings.exempt_networks:
        ip = client_ip(message.peer.ip)
        if any(ip in net for net in settings.exempt_networks):
            return []
    return [_bucket(state, kind, i, limit) for i in identities(kind, message, settings, psl)]


def wait_seconds(bucket: Bucket, level: float, cost: float = 1.0) -> int:
    """Seconds until ``bucket`` holds ``cost`` tokens again; 0 when it does now."""
    if level >= cost:
        return 0
    return max(1, math.ceil((cost - level) / bucket.rate))


async def _wait(ctx: FactContext, kind: str) -> int:
    state = ctx.service(STATE)
    found: Sequence[Bucket] = buckets(
        kind, state, ctx.message, ctx.service(RATELIMIT), ctx.service(PSL)
    )
    if not found:
        return 0
    levels = await state.bucket_levels(found, ctx.message.received_at)
    return max(wait_seconds(b, level) for b, level in zip(found, levels, strict=True))


async def _client_ip_wait(ctx: FactContext) -> int:
    return await _wait(ctx, CLIENT_IP)


async def _sender_domain_wait(ctx: FactContext) -> int:
    return await _wait(ctx, SENDER_DOMAIN)


async def _recipient_wait(ctx: FactContext) -> int:
    return await _wait(ctx, RECIPIENT)


async def _rate_limit_wait(ctx: FactContext) -> int:
    return max([int(await ctx.get(f"rate_{kind}_wait")) for kind in KINDS])


_NEEDS = (STATE, RATELIMIT, PSL)

FACTS = (
    FactSpec(
        "rate_client_ip_wait",
        FactType.INT,
        Tier.CONNECTION,
        _client_ip_wait,
        needs=_NEEDS,
        doc="seconds until the client address's token bucket has a token (0: it has one)",
    ),
    FactSpec(
        "rate_sender_domain_wait",
        FactType.INT,
        Tier.ENVELOPE,
        _sender_domain_wait,
        needs=_NEEDS,
        doc="seconds until the sender's organisational domain's bucket has a token",
    ),
    FactSpec(
        "rate_recipient_wait",
        FactType.INT,
        Tier.ENVELOPE,
        _recipient_wait,
        needs=_NEEDS,
        doc="seconds until every recipient's bucket has a token",
    ),
    FactSpec(
        "rate_limit_wait",
        FactType.INT,
        Tier.ENVELOPE,
        _rate_limit_wait,
        depends=tuple(f"rate_{kind}_wait" for kind in KINDS),
        doc="the largest of the three rate waits: 0 when every bucket has a token",
    ),
)
