"""Which identities a report credits, and how old reports fade (docs/feedback.md,
"Reputation").

A report credits two kinds of identity, as plain domains:

- ``sender``: the DKIM ``d=`` domains that passed and the From domain when DMARC passed,
  read from the relay's own Authentication-Results field in the reported copy (the copy
  we delivered carries it). The learn path has no DNS, so it cannot verify a signature
  itself; a field is trusted only when exactly one field claims our authserv-id (our stamp
  drops every incoming field that claims it and adds one), so a message without it, or
  with a forged second one, credits no sender: an unauthenticated sender never gains a
  standing, good or bad.
- ``link``: the registrable domains of the body's links (``Domains.links``), for every
  report. Anyone can put any link in a message, so policies score link reputation only
  as a penalty.

Counts are kept per day of the report and weighed at read time by
``0.5 ** (age / half_life)``, so integer counters stay exact (they always equal what the
live entries say) while old reports fade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import authres

from relay.auth.arfields import is_ours
from relay.message import (
    split_fields,
    split_header_block,
    strip_mbox_from,
    to_crlf,
)

Kind = Literal["sender", "link"]
KINDS: tuple[Kind, ...] = ("sender", "link")
DAY = 86400.0
MAX_IDENTITIES = 16  # per report and kind: a message with 500 links credits 16


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Kind
    domain: str


@dataclass(frozen=True, slots=True)
class Standing:
    """Decayed report counts of one identity at one moment."""

    spam: float
    ham: float

    @property
    def reports(self) -> float:
        return self.spam + self.ham


def day_of(at: float) -> int:
    return int(at // DAY)


def weight(day: int, now: float, half_life_days: float) -> float:
    """How much a report of ``day`` still counts at ``now`` (1 for today and the future)."""
    age = max(0.0, now - (day + 0.5) * DAY) / DAY
    return float(0.5 ** (age / half_life_days))


def clean_domain(text: str) -> str:
    domain = text.strip().strip('"').lower().rstrip(".")
    if not domain or len(domain) > 253 or any(c in domain for c in '@ \t\r\n:;()"\\'):
        return ""
    return domain


def our_results(raw: bytes, authserv_id: str) -> str | None:
    """The value of the one Authentication-Results field under ``authserv_id``, or None
    when there is none or more than one (then nothing it says can be trusted). "Under"
    as the stamp that strips forged fields reads it (``auth.arfields.is_ours``)."""
    if not authserv_id.strip():
        return None
    head, _ = split_header_block(to_crlf(strip_mbox_from(raw)))
    found: list[str] = []
    for name, value in split_fields(head).fields[:256]:
        if name.strip().lower() != b"authentication-results":
            continue
        text = value.decode("utf-8", "replace")
        if is_ours(text, authserv_id):
            found.append(text)
    return found[0] if len(found) == 1 else None


def authenticated(results: str) -> tuple[str, ...]:
    """Sender domains an Authentication-Results value vouches for: ``header.d`` of each
    ``dkim=pass`` and ``header.from`` of ``dmarc=pass`` (parsed by ``authres``, as the
    lab reads recorded fields; a value it cannot parse vouches for nothing)."""
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(results)
    except Exception:  # a malformed field is simply not believed
        return ()
    found: set[str] = set()
    for res in parsed.results:
        if str(res.result).lower() != "pass":
            continue
        props = {f"{p.type}.{p.name}".lower(): str(p.value) for p in res.properties}
        method = str(res.method).lower()
        if method == "dkim":
            found.add(clean_domain(props.get("header.d", "")))
        elif method == "dmarc":
            found.add(clean_domain(props.get("header.from", "")))
    found.discard("")
    return tuple(sorted(found))[:MAX_IDENTITIES]


def identities(raw: bytes, links: tuple[str, ...], authserv_id: str) -> tuple[Identity, ...]:
    """What one report credits: authenticated senders (from our own Authentication-
    Results) and link sites."""
    results = our_results(raw, authserv_id)
    senders = authenticated(results) if results is not None else ()
    cleaned = sorted({d for d in (clean_domain(link) for link in links) if d})
    return tuple(Identity("sender", d) for d in senders) + tuple(
        Identity("link", d) for d in cleaned[:MAX_IDENTITIES]
    )


__all__ = [
    "DAY",
    "KINDS",
    "Identity",
    "Kind",
    "Standing",
    "authenticated",
    "clean_domain",
    "day_of",
    "identities",
    "our_results",
    "weight",
]
