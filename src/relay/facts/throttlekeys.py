"""Normalised identities for greylisting and rate limits, so spelling cannot dodge a key.

A key must be the same for every spelling of one identity that reaches the same place:
case (``Bob@Example.ORG``), a trailing dot in the domain (``example.org.``), the Unicode
and A-label forms of an internationalised domain (``bücher.example`` and
``xn--bcher-kva.example``, converted by ``idn.to_alabel``, IDNA 2008 without mapping) and
a quoted local part (``"bob"@``) give one key. Local parts are compared lower-cased: RFC
5321 lets a receiver tell ``Bob`` from ``bob``, but no mailbox host we relay to does, and
merging them only makes a limit stricter.

Client addresses become networks (``/24`` and ``/64`` by default): senders retry from
another address of one pool, and an IPv6 host holds its whole ``/64``. An IPv4-mapped
IPv6 address is its IPv4 address.

Nothing here touches the state: the families hash these strings with the store's keyed
``hashed`` before they become keys.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from relay.auth.domains import normalise_domain
from relay.errors import FactError

# BATV (prvs=KDDDHHHHHH=local, btv1==...==local) and digit runs change from one message of
# a sender to the next (bounce tracking, VERP); postgrey folds them the same way, or a
# sender whose every retry carries a new tag would never pass.
_BATV = re.compile(r"^(?:prvs=[0-9a-z]{10}=|btv1==[0-9a-z]{10}==)")
_DIGITS = re.compile(r"\d+")


def normal_domain(domain: str) -> str:
    """Lower-case A-label form without the trailing dot; a name that is not a valid
    domain keeps its lower-cased spelling (it equals no valid one, so it dodges nothing)."""
    try:
        return normalise_domain(domain)
    except ValueError:
        return domain.strip().rstrip(".").lower()


def normal_address(address: str) -> str:
    """``local@domain`` normalised (see the module doc); "" for the null sender."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at:
        return unicodedata.normalize("NFC", address).lower()
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])  # "a\"b" and a"b are one mailbox
    local = unicodedata.normalize("NFC", local).lower()
    return f"{local}@{normal_domain(domain)}"


def address_domain(address: str) -> str:
    """The normalised domain of an address; "" for the null sender or a bare local part."""
    _, at, domain = normal_address(address).rpartition("@")
    return domain if at else ""


def greylist_sender(address: str) -> str:
    """The sender as greylisting compares it: normalised, BATV tag removed, digit runs
    folded to ``#``, so ``bounce-123@`` and ``bounce-456@`` are one sender."""
    normal = normal_address(address)
    local, at, domain = normal.rpartition("@")
    if not at:
        return _DIGITS.sub("#", normal)
    local = _BATV.sub("", local)
    return f"{_DIGITS.sub('#', local)}@{domain}"


def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The client address (an IPv4-mapped IPv6 address as IPv4); FactError when unknown."""
    if not text:  # XFORWARD ADDR=[UNAVAILABLE]: no shared key for "someone"
        raise FactError("client address unknown")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise FactError(f"client address {text!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_network(text: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client's network as text, e.g. ``192.0.2.0/24``."""
    ip = client_ip(text)
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
