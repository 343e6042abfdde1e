"""A regime's verdict recomputed from the rules a message matched, without the engine.

The curves and the rule statistics ask "what if": what if the thresholds moved, what if
one rule were gone. Both are answered from each message's complete set of matched rules
(evaluate.py records it, past the engine's early stop) and the rules' scores and forced
actions, never by deciding again: the same arithmetic the engine uses (the score is the
sum of the matched scored rules; a matched forced action overrides it, the most severe
winning; otherwise the highest threshold reached, the strictest recipient domain
winning).

Values only (frozen dataclasses, strings for actions) so that the report code stays free
of the policy package's types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SEVERITY: Mapping[str, int] = {"accept": 0, "tag": 1, "quarantine": 2, "tempfail": 3, "reject": 4}
BLOCKED = frozenset({"reject", "tempfail", "quarantine"})
"""Actions that keep a message out of the inbox (the lab's "blocked", stats.BLOCKED)."""

Bands = tuple[tuple[float, str], ...]
"""One recipient domain's thresholds: (threshold, action) ascending; below all, accept."""


@dataclass(frozen=True, slots=True)
class RuleDef:
    """What a rule contributes when it matches: a score, or a forced action."""

    name: str
    score: float = 0.0
    action: str | None = None


@dataclass(frozen=True, slots=True)
class RegimeRules:
    """A regime's rules in file order and its own thresholds (no per-domain overrides)."""

    rules: tuple[RuleDef, ...]
    bands: Bands

    def by_name(self) -> dict[str, RuleDef]:
        return {r.name: r for r in self.rules}

    @property
    def lowest_block(self) -> float | None:
        """The lowest threshold whose action keeps mail out of the inbox (None: no such
        threshold, so the score alone never blocks)."""
        return min((t for t, a in self.bands if a in BLOCKED), default=None)


@dataclass(frozen=True, slots=True)
class Matched:
    """One message under one regime: its label, every rule whose condition held, the
    thresholds of its recipients' domains, and the action the engine actually took."""

    label: str
    rules: tuple[str, ...]  # in the engine's evaluation order (complete.py)
    fired: frozenset[str]  # the verdict's own hits (the evaluated part of ``rules``)
    bands: tuple[Bands, ...]
    action: str


@dataclass(frozen=True, slots=True)
class Rescored:
    """The sum of the matched scores and the most severe matched forced action."""

    score: float
    forced: str | None


def rescore(
    matched: Iterable[str], rules: Mapping[str, RuleDef], without: str | None = None
) -> Rescored:
    score = 0.0
    forced: str | None = None
    for name in matched:
        rule = rules.get(name)
        if rule is None or name == without:
            continue
        if rule.action is None:
            score += rule.score
        elif forced is None or SEVERITY[rule.action] > SEVERITY[forced]:
            forced = rule.action
    # Summed in evaluation order, unrounded, as the engine sums: 0.7 + 0.1 is below a
    # threshold of 0.8 there, so it must be here too.
    return Rescored(score, forced)


def band_action(score: float, bands: Bands) -> str:
    action = "accept"
    for threshold, name in bands:
        if score >= threshold:
            action = name
    return action


def action_of(r: Rescored, bands: Sequence[Bands]) -> str:
    """The engine's choice: a forced action wins; else the strictest domain's band."""
    if r.forced is not None:
        return r.forced
    return max((band_action(r.score, b) for b in bands or ((),)), key=SEVERITY.__getitem__)
