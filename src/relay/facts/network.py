"""T0 facts about the connecting host: reverse DNS, blocklists, connection and RCPT behaviour.

DNS goes through the shared Resolver (one TTL cache for every check), so the PTR that
``fcrdns_ok``, ``ptr_generic`` and ``helo_matches_ptr`` all need is fetched once. A DNS
timeout or SERVFAIL makes the fact missing (FactError), never a pass or a fail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import Any

from relay.dns import DnsTemporaryError
from relay.errors import FactError
from relay.facts.base import Compute, FactContext, FactSpec, FactType
from relay.facts.services import RESOLVER, STATE, Service
from relay.message import Peer
from relay.state import StateStore
from relay.verdict import Tier

MAX_PTR_NAMES = 5  # a host with more PTR names than this is checked on the first five
RATE_WINDOW = 60.0  # connection_rate: connections per client IP per minute
# Words ISPs put in the names of dynamic or residential address pools.
_GENERIC_WORDS = re.compile(
    r"(?:^|[.\-_\d])(?:dyn(?:amic)?|dhcp|pool|dsl|adsl|vdsl|xdsl|cable|dial(?:up)?|ppp(?:oe)?"
    r"|client|clients|broadband|bb|cust(?:omer)?|res(?:idential)?|user|users|host|hosts|ip"
    r"|cpe|ftt[hxcb]|mobile|wireless|wifi|nat|unknown|unassigned|static|subscriber|home)"
    r"(?:$|[.\-_\d])"
)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise FactError(f"client address {text!r} is not an IP address") from None


async def ptr_names(ctx: FactContext) -> list[str]:
    """PTR names of the client, lower-cased (shared through the resolver's cache)."""
    ip = _ip(ctx.message.peer.ip)
    names = await ctx.service(RESOLVER).ptr(str(ip))
    return [n.lower().rstrip(".") for n in names]


async def _fcrdns_ok(ctx: FactContext) -> bool:
    ip = _ip(ctx.message.peer.ip)
    names = (await ptr_names(ctx))[:MAX_PTR_NAMES]
    resolver = ctx.service(RESOLVER)
    forward = await asyncio.gather(*(resolver.addresses(n) for n in names))
    return any(ip == ipaddress.ip_address(a) for addrs in forward for a in addrs)


def is_generic(name: str, ip: str) -> bool:
    """A PTR name that looks like an address pool: it spells the IP, or uses pool words."""
    host = name.lower()
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        octets = str(addr).split(".")
        numbers = re.findall(r"\d+", host)
        # two or more octets spelled in the name (either order), or the address in hex
        if sum(o in numbers for o in set(octets)) >= 2 and len(numbers) >= 2:
            return True
        if f"{int(addr):08x}" in host:
            return True
    elif addr.exploded.replace(":", "")[-8:] in host.replace("-", "").replace(".", ""):
        return True
    labels = host.split(".")
    return _GENERIC_WORDS.search(".".join(labels[:-2])) is not None


async def _ptr_generic(ctx: FactContext) -> bool:
    names = await ptr_names(ctx)
    return bool(names) and is_generic(names[0], ctx.message.peer.ip)


async def _helo_matches_ptr(ctx: FactContext) -> bool:
    helo = (ctx.message.peer.helo or "").strip().lower().rstrip(".")
    if not helo:
        return False
    return helo in await ptr_names(ctx)


def dnsbl_query(ip: str, zone: str) -> str:
    """The name a DNSBL is asked for: reversed octets (or nibbles) under the zone."""
    pointer = ipaddress.ip_address(ip).reverse_pointer
    return pointer.rsplit(".", 2)[0] + "." + zone  # drop in-addr.arpa / ip6.arpa


async def _dnsbl_listed(ctx: FactContext) -> list[str]:
    ip = str(_ip(ctx.message.peer.ip))
    resolver = ctx.service(RESOLVER)
    zones = resolver.settings.dnsbl_zones
    answers = await asyncio.gather(
        *(resolver.query(dnsbl_query(ip, z), "A") for z in zones), return_exceptions=True
    )
    listed: list[str] = []
    failed: list[str] = []
    for zone, answer in zip(zones, answers, strict=True):
        if isinstance(answer, DnsTemporaryError):
            failed.append(zone)
        elif isinstance(answer, BaseException):
            raise answer
        # RFC 5782: listings answer 127.0.0.0/8; anything else is an error signal.
        elif any(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8") for a in answer):
            listed.append(zone)
    if failed and not listed:
        # A DNS failure, not a missing input: counted as kind "dns" (facts/base.failure_kind).
        raise DnsTemporaryError("DNSBL lookup failed for " + ", ".join(failed))
    return listed


def connection_key(state: StateStore, peer: Peer) -> str:
    """The state key counting connections from the client's address (hashed, keyed)."""
    return "conn:" + state.hashed(peer.ip)


def connection_member(state: StateStore, peer: Peer) -> str | None:
    """A connection is (ip, source port); without a port (stored mail) each message counts
    (None: an anonymous event)."""
    return state.hashed(peer.ip, str(peer.port)) if peer.port else None


async def _connection_rate(ctx: FactContext) -> float:
    peer = ctx.message.peer
    if not peer.ip:  # unknown client (XFORWARD ADDR=[UNAVAILABLE]): not one shared counter
        raise FactError("client address unknown")
    state = ctx.service(STATE)
    # Read only: this connection counts as if recorded (the recorder records it).
    count = await state.count_window(
        connection_key(state, peer),
        connection_member(state, peer),
        RATE_WINDOW,
        ctx.message.received_at,
    )
    return float(count) * 60.0 / RATE_WINDOW


async def _invalid_rcpt_ratio(ctx: FactContext) -> float:
    peer = ctx.message.peer
    if peer.rcpt_attempted <= 0:
        raise FactError("RCPT counts were not recorded for this message")
    return round(peer.rcpt_refused / peer.rcpt_attempted, 4)


def _spec(
    name: str, kind: FactType, fn: Compute, doc: str, needs: tuple[Service[Any], ...] = ()
) -> FactSpec:
    return FactSpec(name, kind, Tier.CONNECTION, fn, doc=doc, needs=needs)


FACTS = (
    _spec("fcrdns_ok", FactType.BOOL, _fcrdns_ok,
          "forward-confirmed reverse DNS: a PTR name resolves back to the client address",
          (RESOLVER,)),
    _spec("ptr_generic", FactType.BOOL, _ptr_generic,
          "the PTR name looks like a dynamic/residential pool (IP digits, pool words)",
          (RESOLVER,)),
    _spec("helo_matches_ptr", FactType.BOOL, _helo_matches_ptr,
          "the HELO name is one of the client's PTR names", (RESOLVER,)),
    _spec("dnsbl_listed", FactType.STR_LIST, _dnsbl_listed,
          "configured DNSBL zones ([dns] dnsbl_zones) listing the client address",
          (RESOLVER,)),
    _spec("connection_rate", FactType.FLOAT, _connection_rate,
          "connections from the client address in the last minute (shared state)",
          (STATE,)),
    _spec("invalid_rcpt_ratio", FactType.FLOAT, _invalid_rcpt_ratio,
          "share of this session's RCPT commands that were refused"),
)  # fmt: skip
