"""Domain names in A-label form (IDNA 2008, RFC 5891), strictly and without mapping.

Relay control judges a recipient domain in its A-label form, so a domain written with
Unicode characters can only match a configured domain if it *is* that domain. The
Unicode mappings of UTS 46 and of Python's IDNA 2003 codec are deliberately not applied:
they turn ``example\uff0etest`` (a full-width dot) or ``\uff25XAMPLE.test`` into ``example.test``,
and a next hop that does not map the same way would then deliver to a different domain
than the one we judged. Labels are split on the ASCII dot only; ASCII letters are
compared case-insensitively (RFC 5321 2.4), everything else must already be a valid
IDNA 2008 U-label (lower case, NFC) or A-label.
"""

from __future__ import annotations

import re

import idna

_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_DOMAIN = 253


def to_alabel(domain: str) -> str:
    """Lower-case A-label form of a dot-separated domain; ValueError if it is not one.

    No trailing dot, no empty label, at most 253 octets once encoded.
    """
    if not domain or domain.endswith(".") or domain.startswith("."):
        raise ValueError("empty label")
    out: list[str] = []
    for label in domain.split("."):
        if label.isascii():
            label = label.lower()
            if not _LDH_LABEL.match(label):
                raise ValueError(f"invalid label {label[:63]!r}")
            if label.startswith("xn--"):
                try:
                    idna.ulabel(label)  # a bogus A-label is not a name anybody agrees on
                except idna.IDNAError as exc:
                    raise ValueError(f"invalid A-label {label!r}") from exc
            out.append(label)
            continue
        try:
            out.append(idna.alabel(label).decode("ascii"))
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"invalid internationalised label {label[:63]!r}") from exc
    result = ".".join(out)
    if len(result) > MAX_DOMAIN:
        raise ValueError("domain longer than 253 octets")
    return result
