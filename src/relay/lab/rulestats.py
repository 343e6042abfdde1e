"""Per-rule statistics of one regime: hits, S/O ratio, overlap, marginal effect.

All from each message's complete set of matched rules (rescore.Matched), so a rule the
engine never needed to evaluate still counts where its condition holds:

- hits: messages of each label whose condition holds for the rule;
- S/O: spam hits / all hits (SpamAssassin's ratio; 1.0 = only spam, None = no hits);
- overlap: for each other rule, the messages both match; the report names the rule a
  rule co-fires with most and the share of the rule's hits that rule also has;
- marginal effect: every message the rule matches is decided again without it (its
  score or forced action removed, the same thresholds, rescore.action_of); counted are
  verdicts that change action, spam and legitimate mail that would reach the inbox
  without it ("released"), and the reverse ("caught", e.g. a negative score removed).

A message whose recomputed verdict differs from the engine's actual one is counted as
``unreproduced``; with the relay's own engine there should be none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.lab.rescore import BLOCKED, Matched, RegimeRules, action_of, rescore


@dataclass(frozen=True, slots=True)
class Marginal:
    changed: int = 0
    spam_released: int = 0
    ham_released: int = 0
    spam_caught: int = 0
    ham_caught: int = 0

    @property
    def moved(self) -> int:
        return self.spam_released + self.ham_released + self.spam_caught + self.ham_caught

    def to_dict(self) -> dict[str, int]:
        return {
            "changed": self.changed,
            "spam_released": self.spam_released,
            "ham_released": self.ham_released,
            "spam_caught": self.spam_caught,
            "ham_caught": self.ham_caught,
        }


@dataclass(frozen=True, slots=True)
class RuleStat:
    name: str
    score: float
    action: str | None
    spam: int
    ham: int
    unevaluated: int  # hits the engine stopped before evaluating (found by a probe)
    co_hits: tuple[tuple[str, int], ...]  # other rules, most shared hits first
    marginal: Marginal = field(default_factory=Marginal)

    @property
    def hits(self) -> int:
        return self.spam + self.ham

    @property
    def so(self) -> float | None:
        return None if self.hits == 0 else round(self.spam / self.hits, 4)

    def to_dict(self) -> dict[str, Any]:
        top = self.co_hits[0] if self.co_hits else None
        return {
            "name": self.name,
            "score": self.score,
            "action": self.action,
            "spam": self.spam,
            "ham": self.ham,
            "so": self.so,
            "unevaluated": self.unevaluated,
            "overlap": None
            if top is None
            else {"rule": top[0], "both": top[1], "share": round(top[1] / self.hits, 4)},
            "co_hits": dict(self.co_hits),
            "without": self.marginal.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class RuleStats:
    rules: tuple[RuleStat, ...]
    unreproduced: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": True,
            "unreproduced": self.unreproduced,
            "rules": [r.to_dict() for r in self.rules],
        }


def rule_stats(regime: RegimeRules, messages: Iterable[Matched]) -> RuleStats:
    tally = RuleTally(regime)
    for m in messages:
        tally.add(m)
    return tally.result()


class RuleTally:
    """rule_stats one message at a time: counters only, nothing kept per message."""

    def __init__(self, regime: RegimeRules) -> None:
        self._regime = regime
        self._defs = regime.by_name()
        self._hits: dict[str, Counter[str]] = {r.name: Counter() for r in regime.rules}
        self._unevaluated: Counter[str] = Counter()
        self._co: dict[str, Counter[str]] = {r.name: Counter() for r in regime.rules}
        self._moves: dict[str, Counter[str]] = {r.name: Counter() for r in regime.rules}
        self._unreproduced = 0

    def add(self, m: Matched, count: int = 1) -> None:
        """``count`` messages like ``m`` (the same label, matches and decision)."""
        defs = self._defs
        matched = [n for n in m.rules if n in defs]
        action = action_of(rescore(matched, defs), m.bands)
        if action != m.action:
            self._unreproduced += count
        for name in matched:
            self._hits[name][m.label] += count
            if name not in m.fired:
                self._unevaluated[name] += count
            co = self._co[name]
            for other in matched:
                if other != name:
                    co[other] += count
            without = action_of(rescore(matched, defs, without=name), m.bands)
            if without == action:
                continue
            moves = self._moves[name]
            moves["changed"] += count
            blocked, still = action in BLOCKED, without in BLOCKED
            if blocked and not still:
                moves[f"{m.label}_released"] += count
            elif still and not blocked:
                moves[f"{m.label}_caught"] += count

    def result(self) -> RuleStats:
        stats = tuple(
            RuleStat(
                name=r.name,
                score=r.score,
                action=r.action,
                spam=self._hits[r.name]["spam"],
                ham=self._hits[r.name]["ham"],
                unevaluated=self._unevaluated[r.name],
                co_hits=tuple(sorted(self._co[r.name].items(), key=lambda kv: (-kv[1], kv[0]))),
                marginal=Marginal(**self._moves[r.name]),
            )
            for r in self._regime.rules
        )
        return RuleStats(stats, self._unreproduced)


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason, "unreproduced": 0, "rules": []}


def by_effect(rules: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rules ordered by marginal effect: verdicts moved in or out of the inbox, then any
    change of action, then hits."""

    def key(r: dict[str, Any]) -> tuple[int, int, int, str]:
        w = r["without"]
        moved = w["spam_released"] + w["ham_released"] + w["spam_caught"] + w["ham_caught"]
        return (-moved, -w["changed"], -(r["spam"] + r["ham"]), r["name"])

    return sorted(rules, key=key)
