"""Value objects of a decision: Action, Tier, RuleHit, RuleSkip, FactRead, Verdict.

The Verdict is the one object handed to actions, headers, logs, metrics, quarantine and
the regulation lab. Everything here is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any


class Action(StrEnum):
    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class Mode(StrEnum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


class Tier(IntEnum):
    """How much of a message a fact reads: its privacy cost."""

    CONNECTION = 0  # T0: peer IP, PTR, HELO, TLS
    ENVELOPE = 1  # T1: envelope, header fields, DNS authentication, per-sender counters
    FINGERPRINT = 2  # T2: hashed body fingerprint, never interpreted
    CONTENT = 3  # T3: the text is read (classifier, detectors)

    @property
    def label(self) -> str:
        return f"T{int(self)}"


@dataclass(frozen=True, slots=True)
class RuleHit:
    """A rule whose condition held: its score contribution or its forced action."""

    rule: str
    score: float = 0.0
    reason: str = ""
    action: Action | None = None


@dataclass(frozen=True, slots=True)
class RuleSkip:
    """A rule that could not be evaluated (a fact it needs is missing) and why."""

    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class FactRead:
    """One fact computed for a message: its value (JSON-able), cost and tier."""

    name: str
    tier: Tier
    value: Any = None
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a policy decided about one message, and everything needed to explain it."""

    action: Action
    score: float = 0.0
    policy: str = "noop"
    mode: Mode = Mode.ENFORCE
    hits: tuple[RuleHit, ...] = ()
    skipped: tuple[RuleSkip, ...] = ()
    facts: tuple[FactRead, ...] = ()
    highest_tier: Tier | None = None
    reason: str = ""  # public reply text for reject / tempfail (one rule's reason only)
    forced_by: str | None = None  # the rule that forced the action, if any
    seconds: float = 0.0
    extra: tuple[tuple[str, str], ...] = field(default=())  # (key, value) notes, e.g. reload id

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "mode": self.mode.value,
            "action": self.action.value,
            "score": round(self.score, 4),
            "reason": self.reason,
            "forced_by": self.forced_by,
            "highest_tier": None if self.highest_tier is None else self.highest_tier.label,
            "rules": [
                {
                    "rule": h.rule,
                    "score": h.score,
                    "reason": h.reason,
                    "action": None if h.action is None else h.action.value,
                }
                for h in self.hits
            ],
            "skipped": [{"rule": s.rule, "reason": s.reason} for s in self.skipped],
            "facts": [
                {
                    "name": f.name,
                    "tier": f.tier.label,
                    "value": f.value,
                    "seconds": round(f.seconds, 6),
                    "error": f.error,
                }
                for f in self.facts
            ],
            "seconds": round(self.seconds, 6),
        }


ACCEPT_ALL = Verdict(action=Action.ACCEPT, policy="noop")


class FailureKind(StrEnum):
    """Why a fact failed: the ``kind`` label of ``relay_fact_errors_total``. Closed on
    purpose, so the label's values stay few whatever the exceptions say."""

    STATE = "state"  # the shared-state backend (SQLite, Redis) or the feedback store
    DNS = "dns"  # resolver timeout, SERVFAIL, unreachable
    MODEL = "model"  # the classifier (model error, broken worker pool)
    TIMEOUT = "timeout"  # a time limit ran out (not DNS's own)
    WORKER = "worker"  # a child process (DKIM verification ...) died, was full or failed
    OTHER = "other"  # anything else: usually a bug, see the log
