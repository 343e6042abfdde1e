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

import datetime as dt
from collections.abc import Iterable
from typing import TypeVar

from relay.errors import FactError
from relay.facts.base import Compute, FactContext, FactSpec, FactType
from relay.facts.headers import from_address, header_recipients
from relay.facts.oraclelists import OracleLists, Pairs
from relay.facts.services import ORACLE
from relay.message import Message
from relay.verdict import Tier

T = TypeVar("T")


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
    return ctx.service(ORACLE)


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
    # Monday-Friday; public holidays differ by country and are not modelled. numpy here:
    # a lab-only fact, and a relay worker must not load numpy (~12 MiB, issue 17).
    import numpy as np

    return int(np.busday_count(min(dates), today))


async def _sender_complaint_rate(ctx: FactContext) -> float:
    complaints = _need(_lists(ctx).complaints, "complaints")
    for key in sender_keys(ctx.message):
        if key in complaints:
            return complaints[key]
    raise FactError("sender is not in the complaints list")


def _spec(name: str, kind: FactType, fn: Compute, doc: str, version: int = 1) -> FactSpec:
    return FactSpec(
        name, kind, Tier.ENVELOPE, fn, doc=doc, lab_only=True, version=version, needs=(ORACLE,)
    )


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
