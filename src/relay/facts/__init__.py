"""Fact families. Adding a family: one module exporting FACTS, one line below."""

from __future__ import annotations

from relay.facts import (
    auth,
    bulk,
    classifier,
    connection,
    content,
    envelope,
    headers,
    network,
    oracle,
    text,
)
from relay.facts.base import FactContext, FactRegistry, Facts, FactSpec, FactType, Services

FAMILIES = (
    connection.FACTS,
    envelope.FACTS,
    auth.FACTS,
    classifier.FACTS,
    headers.FACTS,
    text.FACTS,
    content.FACTS,
    bulk.FACTS,
    oracle.FACTS,
    network.FACTS,
)


def default_registry() -> FactRegistry:
    return FactRegistry(spec for family in FAMILIES for spec in family)


__all__ = [
    "FactContext",
    "FactRegistry",
    "FactSpec",
    "FactType",
    "Facts",
    "Services",
    "default_registry",
]
