"""Action -> what happens to the message: headers to add and the refusal replies.

accept:     delivered unchanged (plus Authentication-Results from the auth stamp).
tag:        delivered with X-Spam-* headers: score, action and the rules that fired.
quarantine: stored with its Verdict under var/quarantine; the client gets 250.
reject:     550 5.7.1 with the forcing rule's reason only (never the other rules).
tempfail:   451 4.7.1.
shadow:     everything computed and recorded, headers added, always delivered.
"""

from __future__ import annotations

from relay.message import Message
from relay.reply import Reply
from relay.verdict import Action, Mode, Verdict

SCORE_HEADER = "X-Spam-Score"
STATUS_HEADER = "X-Spam-Status"
RULES_HEADER = "X-Spam-Rules"
OUR_HEADERS = frozenset(h.lower() for h in (SCORE_HEADER, STATUS_HEADER, RULES_HEADER))


def _rules_value(verdict: Verdict) -> str:
    parts = [
        f"{h.rule}={h.score:+g}" if h.action is None else f"{h.rule}={h.action.value}"
        for h in verdict.hits
    ]
    return ",\r\n\t".join(parts) if parts else "none"


def stamp(message: Message, verdict: Verdict) -> Message:
    """Removes any X-Spam-* field the sender wrote (downstream filters trust ours), then
    adds ours for tag and for shadow mode."""
    cleaned = message.without_headers(lambda name, _field: name in OUR_HEADERS)
    if verdict.mode is Mode.ENFORCE and verdict.action is not Action.TAG:
        return cleaned
    return cleaned.with_prepended(
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


def refusal(verdict: Verdict) -> Reply:
    """The reply for reject and tempfail; only the deciding reason is disclosed."""
    reason = " ".join(verdict.reason.split())[:200]
    if verdict.action is Action.TEMPFAIL:
        return Reply(451, "4.7.1", reason or "Try again later")
    return Reply(550, "5.7.1", reason or "Message rejected as spam")
