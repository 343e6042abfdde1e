"""Facts: the registry and one module per fact family. Adding a family: one module
exporting FACTS, one line below.

Owns the named, typed, privacy-tiered values about one message and their lazy, once-per-
message evaluation. Facts only read: nothing here writes shared state (the pipeline's
recorder does). May import the value objects, config, contracts, infrastructure (dns,
state), auth and classifier; never policy, pipeline or anything above.
"""

from __future__ import annotations

from relay.facts import (
    auth,
    bulk,
    classifier,
    connection,
    content,
    envelope,
    greylist,
    headers,
    network,
    oracle,
    ratelimit,
    reputation,
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
    reputation.FACTS,
    greylist.FACTS,
    ratelimit.FACTS,
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
