"""Lab-only "oracle" facts: what no receiving relay can see, read from address-keyed lists.

Consent, customer relationships, whether a recipient is a natural person, opt-outs and
complaint rates are invisible in a message. Regimes that depend on them (EU opt-in,
CAN-SPAM's 10 business days, the 2024 bulk-sender rules) read them here, from files the
experimenter supplies, so a regime never pretends to know them. A list that was not
supplied makes its facts *missing* (FactError), never False.

Directory layout (tab-separated, ``#`` comments and blank lines ignored; docs/facts.md):

    consent.tsv     recipient  sender            recipient agreed to mail from sender
    customers.tsv   recipient  sender            recipient bought from sender
    persons.tsv     address    person|organisation
    optouts.tsv     recipient  sender  YYYY-MM-DD   recipient opted out on that date
    complaints.tsv  sender     rate              complaint rate, 0..1

A ``sender`` is an address or a domain; a domain also covers its subdomains. Recipients
are the envelope recipients (the To/Cc addresses for stored mail); the message's date is
its ``received_at``.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from relay.errors import ConfigError, FactError
from relay.facts.base import Compute, FactContext, FactSpec, FactType
from relay.facts.headers import from_address, header_recipients
from relay.message import Message
from relay.verdict import Tier

Pairs = frozenset[tuple[str, str]]
T = TypeVar("T")


def _rows(path: Path, width: int) -> Iterator[tuple[int, list[str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        for number, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            if len(cells) < width or any(not c for c in cells[:width]):
                raise ConfigError(str(path), f"line {number}", f"expected {width} columns")
            yield number, [c.lower() for c in cells[:width]]


def _pairs(path: Path) -> Pairs:
    return frozenset((r, s) for _, (r, s) in _rows(path, 2))


def _persons(path: Path) -> Mapping[str, bool]:
    out: dict[str, bool] = {}
    for number, (address, kind) in _rows(path, 2):
        if kind not in ("person", "organisation", "organization"):
            raise ConfigError(str(path), f"line {number}", "kind must be person or organisation")
        out[address] = kind == "person"
    return out


def _optouts(path: Path) -> Mapping[tuple[str, str], dt.date]:
    out: dict[tuple[str, str], dt.date] = {}
    for number, (rcpt, sender, day) in _rows(path, 3):
        try:
            date = dt.date.fromisoformat(day)
        except ValueError:
            raise ConfigError(str(path), f"line {number}", "date must be YYYY-MM-DD") from None
        key = (rcpt, sender)
        out[key] = min(date, out.get(key, date))  # the first opt-out is the one that counts
    return out


def _rates(path: Path) -> Mapping[str, float]:
    out: dict[str, float] = {}
    for number, (sender, rate) in _rows(path, 2):
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ConfigError(str(path), f"line {number}", "rate must be a number in 0..1")
        out[sender] = value
    return out


@dataclass(frozen=True)
class OracleLists:
    """The lists of one experiment; ``None`` for a list that was not supplied."""

    consent: Pairs | None = None
    customers: Pairs | None = None
    persons: Mapping[str, bool] | None = None
    optouts: Mapping[tuple[str, str], dt.date] | None = None
    complaints: Mapping[str, float] | None = None
    source: str = field(default="")

    @classmethod
    def load(cls, directory: Path) -> OracleLists:
        """Read whichever list files exist in ``directory``; ConfigError on a bad line."""
        if not directory.is_dir():
            raise ConfigError(str(directory), "", "oracle list directory not found")

        def opt(name: str) -> Path | None:
            path = directory / name
            return path if path.is_file() else None

        consent, customers = opt("consent.tsv"), opt("customers.tsv")
        persons, optouts, complaints = opt("persons.tsv"), opt("optouts.tsv"), opt("complaints.tsv")
        return cls(
            consent=_pairs(consent) if consent else None,
            customers=_pairs(customers) if customers else None,
            persons=_persons(persons) if persons else None,
            optouts=_optouts(optouts) if optouts else None,
            complaints=_rates(complaints) if complaints else None,
            source=str(directory),
        )


def sender_keys(message: Message) -> list[str]:
    """The sender as lists may name it: From and envelope addresses, their domains and
    parent domains (most specific first)."""
    keys: list[str] = []
    for address in (from_address(message), message.envelope.mail_from.lower()):
        if "@" not in address:
            continue
        keys.append(address)
        labels = address.rpartition("@")[2].split(".")
        keys.extend(".".join(labels[i:]) for i in range(len(labels) - 1))
    return list(dict.fromkeys(keys))


def _lists(ctx: FactContext) -> OracleLists:
    return ctx.services.get(OracleLists)


def _need(value: T | None, name: str) -> T:
    if value is None:
        raise FactError(f"no {name} list supplied (oracle facts are lab inputs)")
    return value


def _recipients(ctx: FactContext) -> tuple[str, ...]:
    recipients = header_recipients(ctx.message)
    if not recipients:
        raise FactError("message has no recipients to look up")
    return recipients


def _all_listed(pairs: Pairs, recipients: Iterable[str], senders: list[str]) -> bool:
    return all(any((r, s) in pairs for s in senders) for r in recipients)


async def _consent_listed(ctx: FactContext) -> bool:
    consent = _need(_lists(ctx).consent, "consent")
    return _all_listed(consent, _recipients(ctx), sender_keys(ctx.message))


async def _customer_listed(ctx: FactContext) -> bool:
    customers = _need(_lists(ctx).customers, "customers")
    return _all_listed(customers, _recipients(ctx), sender_keys(ctx.message))


async def _recipient_is_person(ctx: FactContext) -> bool:
    persons = _need(_lists(ctx).persons, "persons")
    known = [persons[r] for r in _recipients(ctx) if r in persons]
    if any(known):
        return True
    if len(known) < len(_recipients(ctx)):
        raise FactError("a recipient is not in the persons list")
    return False


def _optout_dates(ctx: FactContext) -> list[dt.date]:
    optouts = _need(_lists(ctx).optouts, "optouts")
    today = dt.datetime.fromtimestamp(ctx.message.received_at, dt.UTC).date()
    senders = sender_keys(ctx.message)
    dates: list[dt.date] = []
    for rcpt in _recipients(ctx):
        found = [optouts[(rcpt, s)] for s in senders if (rcpt, s) in optouts]
        dates.extend(d for d in found if d <= today)
    return dates


async def _opted_out(ctx: FactContext) -> bool:
    return bool(_optout_dates(ctx))


async def _opted_out_business_days(ctx: FactContext) -> int:
    dates = _optout_dates(ctx)
    if not dates:
        return -1
    today = dt.datetime.fromtimestamp(ctx.message.received_at, dt.UTC).date()
    # Monday-Friday; public holidays differ by country and are not modelled.
    return int(np.busday_count(min(dates), today))


async def _sender_complaint_rate(ctx: FactContext) -> float:
    complaints = _need(_lists(ctx).complaints, "complaints")
    for key in sender_keys(ctx.message):
        if key in complaints:
            return complaints[key]
    raise FactError("sender is not in the complaints list")


def _spec(name: str, kind: FactType, fn: Compute, doc: str, version: int = 1) -> FactSpec:
    return FactSpec(name, kind, Tier.ENVELOPE, fn, doc=doc, lab_only=True, version=version)


FACTS = (
    _spec("consent_listed", FactType.BOOL, _consent_listed,
          "every recipient is in consent.tsv for the sender (lab input)"),
    _spec("customer_listed", FactType.BOOL, _customer_listed,
          "every recipient is in customers.tsv for the sender (lab input)"),
    _spec("recipient_is_person", FactType.BOOL, _recipient_is_person,
          "a recipient is a natural person per persons.tsv (lab input)"),
    # version 2: a stored message's date is its newest Received date before its Date
    _spec("opted_out", FactType.BOOL, _opted_out,
          "a recipient opted out from the sender on or before the message date (lab input)",
          version=2),
    _spec("opted_out_business_days", FactType.INT, _opted_out_business_days,
          "business days (Mon-Fri) since the earliest applicable opt-out; -1 if none",
          version=2),
    _spec("sender_complaint_rate", FactType.FLOAT, _sender_complaint_rate,
          "complaint rate of the sender per complaints.tsv, 0..1 (lab input)"),
)  # fmt: skip
