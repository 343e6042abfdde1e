"""Postfix XFORWARD (XFORWARD_README): the original client's attributes, told by a proxy.

Only hosts in ``[smtp] xforward_hosts`` may send it (the server checks); this module parses
the command's argument and names what the EHLO offers.
"""

from __future__ import annotations

import ipaddress
import re

XFORWARD_ATTRIBUTES = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"})
EHLO_KEYWORD = "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"
_UNAVAILABLE = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})
# ADDR=[UNAVAILABLE] (or [TEMPUNAVAIL], or empty) means the original client is unknown. It is
# kept as this marker, never dropped: dropping it would make the proxy's own address the
# client, and relay control would grant the proxy's network (issue 15). The marker is not an
# IP address, so no network matches it; the Message gets Peer(ip="") (``client_address``).
UNKNOWN_ADDR = "[UNAVAILABLE]"


def _xtext_decode(text: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def parse_xforward(arg: str) -> dict[str, str]:
    """``NAME=x ADDR=y ...`` -> attributes; unavailable values are dropped, except ADDR,
    which becomes ``UNKNOWN_ADDR`` (the client is unknown, not the proxy)."""
    attrs: dict[str, str] = {}
    items = arg.split()
    if not items or len(items) > len(XFORWARD_ATTRIBUTES):
        raise ValueError("XFORWARD attribute=value ...")
    for item in items:
        name, sep, value = item.partition("=")
        name = name.upper()
        if not sep or name not in XFORWARD_ATTRIBUTES:
            raise ValueError(f"unknown XFORWARD attribute {name[:20]!r}")
        value = _xtext_decode(value)
        if value.upper() in _UNAVAILABLE or not value:
            if name == "ADDR":
                attrs[name] = UNKNOWN_ADDR
            continue
        if any(c.isspace() or not c.isprintable() for c in value) or len(value) > 255:
            raise ValueError(f"bad XFORWARD value for {name}")
        if name == "ADDR":
            value = value.removeprefix("IPv6:").removeprefix("ipv6:")
            try:
                value = str(ipaddress.ip_address(value))
            except ValueError:
                raise ValueError("XFORWARD ADDR is not an IP address") from None
        attrs[name] = value
    return attrs


def client_address(ip: str) -> str:
    """The client address a Message carries: "" (unknown) for ``UNKNOWN_ADDR``."""
    return "" if ip == UNKNOWN_ADDR else ip
