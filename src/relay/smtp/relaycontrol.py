"""No open relay: decides whether a RCPT path may be accepted, from the raw SMTP argument.

Checks run on the raw path, before any library normalises it, so that relay tricks are
refused instead of being "repaired" into a delivery:
- source routes            <@hop1,@hop2:user@dest>
- percent hack             <user%dest@ours>
- bang paths               <dest!user@ours>
- several @                <user@dest@ours>, and a quoted local part hiding @, % or !
- IP literals              <user@[192.0.2.1]>
- trailing-dot or otherwise malformed domains
- internationalised domains are judged in A-label form, without Unicode mapping, so no
  look-alike spelling (full-width dot, upper-case U-label) matches a local domain
A well-formed recipient outside ``domains`` is refused unless the client is in ``networks``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from relay.config import IPNetwork
from relay.idn import to_alabel
from relay.reply import BAD_ADDRESS, RELAY_DENIED, Reply
from relay.smtp.paths import split_at, unquoted, valid_local_part

_TRICK_CHARS = ("@", "%", "!")


@dataclass(frozen=True, slots=True)
class Recipient:
    local: str
    domain: str  # lower-case A-label form, "" only for <postmaster>

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


def parse_recipient(path: str) -> Recipient | Reply:
    """A Recipient, or the refusal for a relay trick (550) or bad syntax (553).

    ``path`` is the text between the angle brackets, already framed by smtppath. The
    domain is judged in its A-label form (relay.idn: IDNA 2008, no Unicode mapping).
    """
    if path.startswith("@") or _looks_routed(path):
        return RELAY_DENIED
    parts = split_at(path)
    if len(parts) == 1:
        # RFC 5321 4.5.1: <postmaster> without a domain must be accepted.
        return Recipient("postmaster", "") if path.lower() == "postmaster" else BAD_ADDRESS
    if len(parts) != 2:
        return RELAY_DENIED
    local, domain = parts
    if local.startswith('"'):
        if not valid_local_part(local):
            return BAD_ADDRESS
        if any(c in local for c in _TRICK_CHARS):
            return RELAY_DENIED
    elif any(c in local for c in _TRICK_CHARS):
        return RELAY_DENIED
    elif not valid_local_part(local):
        return BAD_ADDRESS
    if domain.startswith("["):
        return RELAY_DENIED
    if len(local.encode("utf-8", "surrogatepass")) > 64:
        return BAD_ADDRESS
    try:
        ascii_domain = to_alabel(domain)
    except ValueError:
        return BAD_ADDRESS
    return Recipient(local, ascii_domain)


def _looks_routed(path: str) -> bool:
    """A ':' outside a quoted local part means an (obsolete) source route."""
    return any(ch == ":" and outside for ch, outside in unquoted(path))


def ip_in(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether an address (IPv4-mapped IPv6 and zone ids handled) is in any network."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


class RelayControl:
    """Recipient domains accepted from anyone; client networks allowed to send anywhere."""

    def __init__(self, domains: tuple[str, ...], networks: tuple[IPNetwork, ...]) -> None:
        self._exact = frozenset(d for d in domains if not d.startswith("."))
        self._suffixes = tuple(d for d in domains if d.startswith("."))
        self._networks = networks

    def is_local_domain(self, domain: str) -> bool:
        return domain in self._exact or any(domain.endswith(s) for s in self._suffixes)

    def client_may_relay(self, ip: str) -> bool:
        return ip_in(ip, self._networks)

    def check(self, path: str, client_ip: str) -> Recipient | Reply:
        """Judge one RCPT path (between the angle brackets) for a client."""
        rcpt = parse_recipient(path)
        if isinstance(rcpt, Reply):
            return rcpt
        if not rcpt.domain or self.is_local_domain(rcpt.domain):
            return rcpt
        return rcpt if self.client_may_relay(client_ip) else RELAY_DENIED
