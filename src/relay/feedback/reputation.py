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

import re
from dataclasses import dataclass
from typing import Literal

from relay.message import (
    decode_header_value,
    split_fields,
    split_header_block,
    strip_mbox_from,
    to_crlf,
)

Kind = Literal["sender", "link"]
KINDS: tuple[Kind, ...] = ("sender", "link")
DAY = 86400.0
MAX_IDENTITIES = 16  # per report and kind: a message with 500 links credits 16

_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


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


def _strip_comments(text: str) -> str:
    # Nested comments collapse from the inside out; quoted strings are kept as they are.
    previous = None
    while previous != text:
        previous = text
        text = _COMMENT.sub(" ", text)
    return text


def _split_top(text: str) -> list[str]:
    """``text`` cut at ';' outside quoted strings."""
    parts: list[str] = []
    start = 0
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|;', text):
        if match.group(0) == ";":
            parts.append(text[start : match.start()])
            start = match.end()
    parts.append(text[start:])
    return parts


def _authserv_id(value: str) -> str:
    head = _split_top(_strip_comments(value))[0].split()
    return head[0].strip('"').lower().rstrip(".") if head else ""


def our_results(raw: bytes, authserv_id: str) -> str | None:
    """The value of the one Authentication-Results field under ``authserv_id``, or None
    when there is none or more than one (then nothing it says can be trusted)."""
    ours = authserv_id.strip().lower().rstrip(".")
    if not ours:
        return None
    head, _ = split_header_block(to_crlf(strip_mbox_from(raw)))
    found: list[str] = []
    for name, value in split_fields(head).fields[:256]:
        if name.strip().lower() != b"authentication-results":
            continue
        text = decode_header_value(value.decode("utf-8", "replace"))
        if _authserv_id(text) == ours:
            found.append(text)
    return found[0] if len(found) == 1 else None


def authenticated(results: str) -> tuple[str, ...]:
    """Sender domains an Authentication-Results value vouches for: ``header.d`` of each
    ``dkim=pass`` and ``header.from`` of ``dmarc=pass``."""
    found: set[str] = set()
    for resinfo in _split_top(_strip_comments(results))[1:]:
        words = _QUOTED.sub('""', resinfo).split()
        if not words or "=" not in words[0]:
            continue
        method, _, result = words[0].lower().partition("=")
        props = dict(w.lower().partition("=")[::2] for w in words[1:] if "=" in w)
        if result != "pass":
            continue
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
