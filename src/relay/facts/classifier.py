"""T3 facts from the spam classifier: its probability and whether parsing degraded.

One pool round-trip per message: ``classifier`` holds both results and the two public
facts read it, so a policy that asks for both never classifies twice.
"""

from __future__ import annotations

from typing import Any

from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.services import CLASSIFIER
from relay.verdict import Tier


async def _classifier(ctx: FactContext) -> dict[str, Any]:
    result = await ctx.service(CLASSIFIER).classify(ctx.message)
    return {"spam_probability": result.probability, "parse_degraded": result.degraded}


async def _spam_probability(ctx: FactContext) -> float:
    return float((await ctx.get("classifier"))["spam_probability"])


async def _parse_degraded(ctx: FactContext) -> bool:
    return bool((await ctx.get("classifier"))["parse_degraded"])


FACTS = (
    FactSpec(
        "classifier",
        FactType.OBJECT,
        Tier.CONTENT,
        _classifier,
        needs=(CLASSIFIER,),
        doc="classifier output: {spam_probability, parse_degraded}",
    ),
    FactSpec(
        "spam_probability",
        FactType.FLOAT,
        Tier.CONTENT,
        _spam_probability,
        depends=("classifier",),
        doc="calibrated probability that the message is spam (models/spam.card.json)",
    ),
    FactSpec(
        "parse_degraded",
        FactType.BOOL,
        Tier.CONTENT,
        _parse_degraded,
        depends=("classifier",),
        doc="the message could not be fully parsed (broken MIME, bogus charset); "
        "the probability comes from whatever text could be read",
    ),
)
