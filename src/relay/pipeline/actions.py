"""The action table: for each Action, its headers, where the mail goes, the reply and the
typed Outcome. Adding an action is one entry in ``TABLE`` and its function.

    action      headers            goes to      reply                          outcome
    accept      sender's X-Spam-*  deliver      the downstream's               delivered
                removed
    tag         + X-Spam-Score,    deliver      the downstream's               delivered
                -Status, -Rules
    quarantine  removed            quarantine   250 2.0.0 Ok: queued as <id>   quarantined
    reject      removed            nowhere      550 5.7.1 + the forcing reason rejected
    tempfail    removed            nowhere      451 4.7.1 + the forcing reason tempfailed
    (shadow)    as tag             deliver      the downstream's               delivered

Every action first removes every field whose name starts with ``X-Spam-`` (any case),
not only the three we write: downstream filters, Sieve scripts and SpamAssassin-aware mail
readers trust X-Spam-Flag and X-Spam-Level as well, so none a sender wrote may pass.

Shadow mode (``Verdict.mode``) overrides the action: everything is computed and
recorded, the headers added, and the message always delivered. A refusal discloses only
the deciding rule's reason, never the other rules. ``pipeline/process.py`` looks the
entry up and calls its destination; a delivery that fails answers the downstream's
failure (Outcome.FAILED) whatever the entry says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from relay.contracts import Outcome
from relay.message import Message
from relay.reply import Reply
from relay.verdict import Action, Mode, Verdict

SCORE_HEADER = "X-Spam-Score"
STATUS_HEADER = "X-Spam-Status"
RULES_HEADER = "X-Spam-Rules"
SPAM_PREFIX = "x-spam-"  # every field named so is removed from the input (``clean``)


class Destination(StrEnum):
    """Where the message goes; each has one call in ``Pipeline._act``."""

    DELIVER = "deliver"  # the transaction's downstream (or Maildir)
    QUARANTINE = "quarantine"  # the quarantine store, with its Verdict
    NOWHERE = "nowhere"  # refused: the transaction is aborted, the entry's reply sent


Headers = Callable[[Message, Verdict], Message]
Refusal = Callable[[Verdict], Reply]


@dataclass(frozen=True, slots=True)
class Effect:
    """One row of the action table."""

    headers: Headers  # rewrites the header block (after the other stamps)
    destination: Destination
    outcome: Outcome  # when the destination succeeds
    reply: Refusal | None = None  # the refusal reply; only (and always) for NOWHERE

    def __post_init__(self) -> None:
        if (self.reply is None) != (self.destination is not Destination.NOWHERE):
            raise TypeError("an action table entry has a reply exactly when it refuses")


def _rules_value(verdict: Verdict) -> str:
    parts = [
        f"{h.rule}={h.score:+g}" if h.action is None else f"{h.rule}={h.action.value}"
        for h in verdict.hits
    ]
    return ",\r\n\t".join(parts) if parts else "none"


def clean(message: Message, verdict: Verdict) -> Message:
    """Removes every X-Spam-* field the sender wrote, whatever follows the prefix
    (X-Spam-Flag, X-Spam-Level, ...): downstream filters trust them as ours."""
    return message.without_headers(lambda name, _field: name.startswith(SPAM_PREFIX))


def spam_headers(message: Message, verdict: Verdict) -> Message:
    """``clean``, then adds our X-Spam-Score, X-Spam-Status and X-Spam-Rules."""
    return clean(message, verdict).with_prepended(
        [
            (SCORE_HEADER, f"{verdict.score:.2f}"),
            (
                STATUS_HEADER,
                f"action={verdict.action.value} policy={verdict.policy} "
                f"mode={verdict.mode.value} score={verdict.score:.2f}",
            ),
            (RULES_HEADER, _rules_value(verdict)),
        ]
    )


def _reason(verdict: Verdict) -> str:
    return " ".join(verdict.reason.split())[:200]


def reject_reply(verdict: Verdict) -> Reply:
    return Reply(550, "5.7.1", _reason(verdict) or "Message rejected as spam")


def tempfail_reply(verdict: Verdict) -> Reply:
    return Reply(451, "4.7.1", _reason(verdict) or "Try again later")


TABLE: Mapping[Action, Effect] = {
    Action.ACCEPT: Effect(clean, Destination.DELIVER, Outcome.DELIVERED),
    Action.TAG: Effect(spam_headers, Destination.DELIVER, Outcome.DELIVERED),
    Action.QUARANTINE: Effect(clean, Destination.QUARANTINE, Outcome.QUARANTINED),
    Action.REJECT: Effect(clean, Destination.NOWHERE, Outcome.REJECTED, reject_reply),
    Action.TEMPFAIL: Effect(clean, Destination.NOWHERE, Outcome.TEMPFAILED, tempfail_reply),
}
SHADOW = Effect(spam_headers, Destination.DELIVER, Outcome.DELIVERED)


def effect(verdict: Verdict) -> Effect:
    """The table entry for a verdict (shadow mode: always ``SHADOW``)."""
    return SHADOW if verdict.mode is Mode.SHADOW else TABLE[verdict.action]


def stamp(message: Message, verdict: Verdict) -> Message:
    """The entry's headers: X-Spam-* removed, ours added for tag and for shadow mode."""
    return effect(verdict).headers(message, verdict)


def delivers(verdict: Verdict) -> bool:
    """Whether the message goes to the downstream transport (shadow mode always does)."""
    return effect(verdict).destination is Destination.DELIVER
