"""Reputation learned from feedback (docs/feedback.md "Reputation"), like Rspamd's
reputation module: how much of an identity's reported mail was spam or ham, lately.

- ``sender_reputation`` (T1): over the identities this message *authenticated* (the
  d= domains of passing DKIM signatures, and the From domain when DMARC passed):
  ``(ham - spam) / (ham + spam)`` of their decayed report counts, in [-1, 1]; 0 without
  reports. A message that authenticates nothing reads nothing, so a spoofed From never
  inherits its domain's standing. ``sender_reputation_reports`` is the evidence.
- ``link_reputation`` (T2, reads the body's links): the spam share, in [0, 1], of the
  worst link site (registrable domain) with reports; ``link_reputation_reports`` its
  evidence. The worst is ranked by ``spam / (spam + ham + 2)`` so one report does not
  outrank a hundred.

The counts come from the feedback store (service ``reputation``) and are only read; the
learn path writes them. The clock is the message's ``received_at``.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.services import PSL, REPUTATION
from relay.facts.text import BodyText
from relay.verdict import Tier

MAX_LINK_SITES = 64  # distinct link sites looked up per message
SHRINK = 2.0  # pseudo-reports added when ranking link sites, so thin evidence ranks low


def _domain(text: str) -> str:
    return text.strip().lower().rstrip(".")


async def _sender_standing(ctx: FactContext) -> dict[str, Any]:
    domains = {_domain(d) for d in await ctx.get("dkim_domains_pass")}
    if await ctx.get("dmarc") == "pass":
        domains.add(_domain(await ctx.get("from_domain")))
    domains.discard("")
    if not domains:  # nothing authenticated: nothing to inherit
        return {"spam": 0.0, "ham": 0.0}
    found = await ctx.service(REPUTATION).standings(
        "sender", sorted(domains), now=ctx.message.received_at
    )
    return {"spam": sum(s for s, _ in found), "ham": sum(h for _, h in found)}


async def _sender_reputation(ctx: FactContext) -> float:
    standing = await ctx.get("sender_standing")
    total = standing["spam"] + standing["ham"]
    return 0.0 if total <= 0 else float((standing["ham"] - standing["spam"]) / total)


async def _sender_reputation_reports(ctx: FactContext) -> int:
    standing = await ctx.get("sender_standing")
    return round(float(standing["spam"] + standing["ham"]))


def link_sites(body: BodyText, psl: Any) -> list[str]:
    """Registrable domains of the body's http(s) links, as the learn path stores them
    (the classifier's ``url:site_``: the PSL's private suffix, IP hosts left out)."""
    sites: set[str] = set()
    for link in body.links:
        try:
            host = _domain(urlsplit(link.href).hostname or "")
        except ValueError:
            continue
        if not host or not link.href.lower().startswith(("http://", "https://")):
            continue
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        sites.add(str(psl.privatesuffix(host) or host))
        if len(sites) >= MAX_LINK_SITES:
            break
    return sorted(sites)


async def _link_standing(ctx: FactContext) -> dict[str, Any]:
    body: BodyText = await ctx.get("body_text")
    sites = link_sites(body, ctx.service(PSL))
    if not sites:
        return {"spam": 0.0, "ham": 0.0}
    found = await ctx.service(REPUTATION).standings("link", sites, now=ctx.message.received_at)
    spam, ham = max(found, key=lambda s: s[0] / (s[0] + s[1] + SHRINK))
    return {"spam": spam, "ham": ham}


async def _link_reputation(ctx: FactContext) -> float:
    standing = await ctx.get("link_standing")
    total = standing["spam"] + standing["ham"]
    return 0.0 if total <= 0 else float(standing["spam"] / total)


async def _link_reputation_reports(ctx: FactContext) -> int:
    standing = await ctx.get("link_standing")
    return round(float(standing["spam"] + standing["ham"]))


FACTS = (
    FactSpec(
        "sender_standing",
        FactType.OBJECT,
        Tier.ENVELOPE,
        _sender_standing,
        depends=("dkim_domains_pass", "dmarc", "from_domain"),
        needs=(REPUTATION,),
        doc="decayed spam and ham reports of the authenticated sender domains "
        "(internal; read sender_reputation)",
    ),
    FactSpec(
        "sender_reputation",
        FactType.FLOAT,
        Tier.ENVELOPE,
        _sender_reputation,
        depends=("sender_standing",),
        doc="(ham - spam) / (ham + spam) of the reports on the domains this message "
        "authenticated (passing DKIM d=, From when DMARC passed), -1..1; 0 without any",
    ),
    FactSpec(
        "sender_reputation_reports",
        FactType.INT,
        Tier.ENVELOPE,
        _sender_reputation_reports,
        depends=("sender_standing",),
        doc="decayed number of reports behind sender_reputation (its evidence)",
    ),
    FactSpec(
        "link_standing",
        FactType.OBJECT,
        Tier.FINGERPRINT,
        _link_standing,
        depends=("body_text",),
        needs=(PSL, REPUTATION),
        doc="decayed spam and ham reports of the worst link site (internal; read link_reputation)",
    ),
    FactSpec(
        "link_reputation",
        FactType.FLOAT,
        Tier.FINGERPRINT,
        _link_reputation,
        depends=("link_standing",),
        doc="spam share (0..1) of the reports on the worst-reputed link site of the body; "
        "0 without any",
    ),
    FactSpec(
        "link_reputation_reports",
        FactType.INT,
        Tier.FINGERPRINT,
        _link_reputation_reports,
        depends=("link_standing",),
        doc="decayed number of reports behind link_reputation (its evidence)",
    ),
)
