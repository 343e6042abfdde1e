"""One report in: size check, parse, entry, store. Shared by the CLI, the HTTP endpoint
and quarantine release so every door refuses the same things the same way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from relay.errors import FeedbackRefused
from relay.feedback.intake import too_large
from relay.feedback.record import EntryMaker, Label, body_digest
from relay.feedback.reputation import identities
from relay.feedback.store import FeedbackStore

Action = Literal["spam", "ham", "forget"]
# Metric label values must come from a small fixed set; other sources count as "other".
KNOWN_SOURCES = frozenset({"cli", "imapsieve", "http", "quarantine-release"})
# raw bytes -> (base model sha256, its spam probability): the relay's classifier pool or a
# model loaded by the CLI. A model update fits its combiner on these (docs/classifier.md).
BaseScorer = Callable[[bytes], Awaitable[tuple[str, float]]]
log = logging.getLogger("relay.feedback")


@dataclass(frozen=True, slots=True)
class Outcome:
    digest: str
    action: Action
    previous: Label | None  # the entry's label before this report (None: none, or forget)
    existed: bool  # there was an entry for this body before the report


class Learner:
    """Holds the store and the entry maker; ``learn`` never blocks the event loop (the
    extraction runs in a thread, the store on its own)."""

    def __init__(
        self,
        store: FeedbackStore,
        maker: EntryMaker | None = None,
        scorer: BaseScorer | None = None,
        *,
        authserv_id: str = "",
    ) -> None:
        self.store = store
        # Only the relay's own Authentication-Results field credits a sender's reputation
        # (Settings.authserv_id); empty: reports credit link domains only.
        self._authserv_id = authserv_id
        self._maker = maker or EntryMaker()
        self._scorer = scorer

    async def learn(
        self, raw: bytes, *, action: Action, reporter: str, source: str, now: float
    ) -> Outcome:
        """Record one report; raises FeedbackRefused with nothing learned."""
        settings = self.store.settings
        if len(raw) > settings.max_message_size:
            raise too_large(len(raw), settings.max_message_size)
        who = self.store.reporter_id(reporter)
        if action == "forget":
            digest = body_digest(raw)
            had = await self.store.forget(digest, who, now=now)
            return Outcome(digest, action, None, had)
        entry = await asyncio.to_thread(
            self._maker.make,
            raw,
            label=action,
            source=source,
            reporter=who,
            at=now,
            keep_body=settings.keep_bodies,
        )
        credited = identities(raw, entry.domains.links, self._authserv_id)
        previous = await self.store.record(entry, now=now, identities=credited)
        if self._scorer is not None:
            await self._keep_score(self._scorer, entry.digest, raw)
        return Outcome(entry.digest, action, previous, previous is not None)

    async def _keep_score(self, scorer: BaseScorer, digest: str, raw: bytes) -> None:
        # The report is already kept: a scoring failure costs this entry its place in
        # the combiner's fit, never the report.
        try:
            model, probability = await scorer(raw)
            await self.store.record_score(digest, model, probability)
        except Exception as exc:  # logged; the report stands
            log.warning("feedback %s: base score not kept: %s", digest[:12], exc)


def source_label(source: str) -> str:
    return source if source in KNOWN_SOURCES else "other"


__all__ = ["Action", "BaseScorer", "FeedbackRefused", "Learner", "Outcome", "source_label"]
