"""Value objects of a compiled policy: thresholds, overrides and rules."""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.verdict import Action, Mode, Tier

SEVERITY: dict[Action, int] = {
    Action.ACCEPT: 0,
    Action.TAG: 1,
    Action.QUARANTINE: 2,
    Action.TEMPFAIL: 3,
    Action.REJECT: 4,
}
"""Order of forced actions and of per-domain outcomes: the more severe one wins."""

THRESHOLD_KEYS: tuple[Action, ...] = (Action.TAG, Action.QUARANTINE, Action.TEMPFAIL, Action.REJECT)


def most_severe(actions: list[Action] | tuple[Action, ...]) -> Action:
    return max(actions, key=SEVERITY.__getitem__, default=Action.ACCEPT)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score thresholds: the action is that of the highest threshold the score reaches."""

    tag: float | None = None
    quarantine: float | None = None
    tempfail: float | None = None
    reject: float | None = None

    def steps(self) -> tuple[tuple[float, Action], ...]:
        """(threshold, action) pairs, ascending by threshold."""
        pairs = [
            (value, action)
            for action, value in (
                (Action.TAG, self.tag),
                (Action.QUARANTINE, self.quarantine),
                (Action.TEMPFAIL, self.tempfail),
                (Action.REJECT, self.reject),
            )
            if value is not None
        ]
        return tuple(sorted(pairs))

    def problems(self) -> list[str]:
        """Ordering errors: tag < quarantine < reject, tempfail < reject, all distinct."""
        out: list[str] = []
        chain = [
            (a, v)
            for a, v in (
                ("tag", self.tag),
                ("quarantine", self.quarantine),
                ("reject", self.reject),
            )
            if v is not None
        ]
        for (a, va), (b, vb) in itertools.pairwise(chain):
            if not va < vb:
                out.append(f"thresholds out of order: {a} ({va:g}) must be below {b} ({vb:g})")
        if (
            self.tempfail is not None
            and self.reject is not None
            and not self.tempfail < self.reject
        ):
            out.append(
                f"thresholds out of order: tempfail ({self.tempfail:g}) must be below "
                f"reject ({self.reject:g})"
            )
        values = [
            v for v in (self.tag, self.quarantine, self.tempfail, self.reject) if v is not None
        ]
        if len(set(values)) != len(values) and not out:
            out.append("thresholds must be distinct")
        return out


@dataclass(frozen=True, slots=True)
class ScoreMap:
    """Thresholds compiled for the hot path: ``actions[band(score)]`` is the action, where
    the band counts the thresholds the score reaches."""

    limits: tuple[float, ...]
    actions: tuple[Action, ...]  # one more than limits; actions[0] is accept

    @classmethod
    def of(cls, thresholds: Thresholds) -> ScoreMap:
        steps = thresholds.steps()
        return cls(tuple(v for v, _ in steps), (Action.ACCEPT, *(a for _, a in steps)))

    def band(self, score: float) -> int:
        return bisect.bisect_right(self.limits, score)

    def action(self, score: float) -> Action:
        return self.actions[bisect.bisect_right(self.limits, score)]


@dataclass(frozen=True, slots=True)
class Override:
    """Thresholds and mode for mail to some recipient domains."""

    domains: tuple[str, ...]
    thresholds: Thresholds
    mode: Mode
    line: int = 0


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One validated rule: its condition source, the facts it reads, its outcome."""

    name: str
    when: str
    reads: tuple[str, ...]
    tier: Tier
    score: float = 0.0
    action: Action | None = None
    reason: str = ""
    line: int = 0
    isolated: bool = False  # has a comprehension: evaluated in the sandbox child
    reason_facts: tuple[str, ...] = ()  # numeric facts shown in the reason ({name}), in reads

    def reason_for(self, values: Mapping[str, Any]) -> str:
        """The reason with its ``{fact}`` placeholders filled from ``values``."""
        if not self.reason_facts:
            return self.reason
        return PLACEHOLDER.sub(lambda m: _shown(values.get(m.group(1))), self.reason)


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""``{fact_name}`` in a rule's reason; any other brace is literal text."""


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
