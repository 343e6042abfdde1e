"""T1 facts of greylisting: has this (client network, sender, recipient) been seen before?

A triplet is the client's network (``[greylist] ipv4_prefix``/``ipv6_prefix``), the
envelope sender (normalised, BATV tags and digit runs folded: ``facts/throttlekeys.py``)
and one envelope recipient (normalised), hashed with the store's key. A message has one
triplet per recipient.

- ``greylist`` (str): ``"off"`` (``[greylist] enabled = false``), ``"exempt"`` (the client
  is in ``exempt_networks`` or logged in at the MTA in front), ``"new"`` (a triplet never
  seen, or its retry window lapsed), ``"early"`` (seen, the delay not over), ``"passed"``
  (every triplet passed before, or this retry comes after the delay and within the
  window, or the client network has passed ``auto_allow_after`` triplets). Several
  recipients: the worst of them, new before early before passed.
- ``greylist_wait`` (int): seconds until a retry would pass (0 unless new or early).
- ``greylist_authenticated`` (bool): the sender is authenticated in a way that exempts it
  (DMARC pass with ``exempt_dmarc_pass``; SPF or DKIM pass for a domain in
  ``exempt_sender_domains``). A separate fact so that the triplet facts need no DNS and a
  relay without ``[auth]`` can still greylist; the rule combines them.

Facts only read: the first sight, the pass and the refresh are written by the recorder
(``pipeline/recorder.py``) after the action, with the keys and the transition defined
here and in ``state.greylist_step``. A state failure propagates (StateError): the facts
are missing, a rule reading them does not fire, and the mail passes (fail open).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from relay.config import GreylistSettings
from relay.errors import FactError
from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.services import GREYLIST, STATE
from relay.facts.throttlekeys import (
    client_ip,
    client_network,
    greylist_sender,
    normal_address,
    normal_domain,
)
from relay.message import Message
from relay.state import GreyEntry, StateStore
from relay.verdict import Tier

OFF, EXEMPT, NEW, EARLY, PASSED = "off", "exempt", "new", "early", "passed"
_WORST = (NEW, EARLY, PASSED)  # a message is as far as its least advanced triplet


def network(message: Message, settings: GreylistSettings) -> str:
    return client_network(message.peer.ip, settings.ipv4_prefix, settings.ipv6_prefix)


def triplet_keys(state: StateStore, message: Message, settings: GreylistSettings) -> list[str]:
    """One state key per distinct normalised recipient (the recorder writes the same)."""
    recipients = sorted({normal_address(r) for r in message.envelope.rcpt_to})
    if not recipients:  # stored mail without an envelope: nothing to greylist
        raise FactError("no envelope recipients")
    net = network(message, settings)
    sender = greylist_sender(message.envelope.mail_from)
    return ["grey:" + state.hashed("greylist", net, sender, rcpt) for rcpt in recipients]


def network_key(state: StateStore, message: Message, settings: GreylistSettings) -> str:
    """The window counting the distinct triplets that passed from the client network."""
    return "greynet:" + state.hashed("greylist network", network(message, settings))


def exempt(message: Message, settings: GreylistSettings) -> bool:
    """A client in ``exempt_networks``, or one that logged in at the MTA in front (the
    milter's SASL login): our own users' submissions are never greylisted."""
    if message.peer.authenticated:
        return True
    ip = client_ip(message.peer.ip)
    return any(ip in net for net in settings.exempt_networks)


def triplet_status(
    entry: GreyEntry | None, now: float, settings: GreylistSettings
) -> tuple[str, int]:
    """(status, seconds to wait) of one triplet, as ``state.greylist_step`` will move it."""
    if entry is None:
        return NEW, math.ceil(settings.delay)
    if entry.passed or now >= entry.first + settings.delay:
        return PASSED, 0
    return EARLY, math.ceil(entry.first + settings.delay - now)


def combine(statuses: Sequence[tuple[str, int]]) -> tuple[str, int]:
    status = min((s for s, _ in statuses), key=_WORST.index)
    return status, max(w for _, w in statuses)


async def _greylist_check(ctx: FactContext) -> dict[str, object]:
    settings = ctx.service(GREYLIST)
    message = ctx.message
    if not settings.enabled:
        return {"status": OFF, "wait": 0}
    if exempt(message, settings):
        return {"status": EXEMPT, "wait": 0}
    state = ctx.service(STATE)
    keys = triplet_keys(state, message, settings)
    now = message.received_at
    if settings.auto_allow_after:
        passes = await state.count_window_many(
            network_key(state, message, settings), [], settings.lifetime, now
        )
        if passes >= settings.auto_allow_after:
            return {"status": PASSED, "wait": 0, "network_passes": passes}
    entries = await state.grey_entries(keys, now)
    status, wait = combine([triplet_status(e, now, settings) for e in entries])
    return {"status": status, "wait": wait}


async def _greylist(ctx: FactContext) -> str:
    return str((await ctx.get("greylist_check"))["status"])


async def _greylist_wait(ctx: FactContext) -> int:
    return int((await ctx.get("greylist_check"))["wait"])


def _listed(domain: str, entries: Sequence[str]) -> bool:
    """``domain`` is an entry, or below a ``.suffix`` entry (as ``[relay] domains``)."""
    domain = normal_domain(domain)
    return bool(domain) and any(
        domain == e or (e.startswith(".") and domain.endswith(e)) for e in entries
    )


async def _greylist_authenticated(ctx: FactContext) -> bool:
    settings = ctx.service(GREYLIST)
    if settings.exempt_dmarc_pass and await ctx.get("dmarc") == "pass":
        return True
    listed = settings.exempt_sender_domains
    if not listed:
        return False
    if await ctx.get("spf") == "pass" and _listed(await ctx.get("spf_domain"), listed):
        return True
    return any(_listed(d, listed) for d in await ctx.get("dkim_domains_pass"))


FACTS = (
    FactSpec(
        "greylist_check",
        FactType.OBJECT,
        Tier.ENVELOPE,
        _greylist_check,
        needs=(GREYLIST, STATE),
        doc="internal: {status, wait} of the message's greylist triplets (hashed keys)",
    ),
    FactSpec(
        "greylist",
        FactType.STR,
        Tier.ENVELOPE,
        _greylist,
        depends=("greylist_check",),
        doc="greylisting state of the message's triplets: off, exempt, new, early or passed",
    ),
    FactSpec(
        "greylist_wait",
        FactType.INT,
        Tier.ENVELOPE,
        _greylist_wait,
        depends=("greylist_check",),
        doc="seconds until a retry would pass greylisting (0 unless new or early)",
    ),
    FactSpec(
        "greylist_authenticated",
        FactType.BOOL,
        Tier.ENVELOPE,
        _greylist_authenticated,
        depends=("dmarc", "spf", "spf_domain", "dkim_domains_pass"),
        needs=(GREYLIST,),
        doc="the sender authenticated as [greylist] exempts: DMARC pass, or SPF/DKIM pass "
        "for an exempt_sender_domains entry",
    ),
)
