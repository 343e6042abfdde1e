"""The compiled policy and its decision: facts pulled tier by tier, early stop.

One module because the compiled form and the early-stop bounds it precomputes only make
sense next to the evaluation that reads them; over 300 lines because that bookkeeping
(remaining scores per tier group, forced actions still possible) is the engine.

Rules run grouped by the highest tier of the facts they read (T0, then T1, T2, T3; file
order within a tier). Before each rule the engine asks whether any remaining rule could
still change the action; if none can, it stops, so facts of later tiers are never
computed. A remaining rule can change the action when

- no forced action has fired and it forces an action different from the current one, or
  the scores still to come (the sum of the remaining positive scores, and of the negative
  ones) could move the total across a threshold of any recipient domain's regime;
- a forced action has fired and it forces a more severe one (forced actions rank
  reject > tempfail > quarantine > tag > accept, and override the score).

A fact whose computation fails is missing: the rules reading it do not fire and the
Verdict lists them as skipped with the reason.

Conditions with a comprehension run in the sandbox child (``relay.proc.celsandbox``)
when the relay gives one; together they may take ``[policy] condition_time_limit``
seconds per message. A message that overruns it is deferred (tempfail, forced by the
rule that overran): skipping the rule instead would let a sender craft mail that slips
past a slow reject rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relay.celext import cel
from relay.contracts import FactSource
from relay.errors import ConditionTimeout, FactError
from relay.facts.base import failure_kind
from relay.message import Message
from relay.policy.model import (
    SEVERITY,
    Override,
    RuleSpec,
    ScoreMap,
    Thresholds,
    most_severe,
)
from relay.proc.celsandbox import ConditionSandbox
from relay.verdict import Action, Mode, RuleHit, RuleSkip, Tier, Verdict

THRESHOLD_REASONS = {
    Action.REJECT: "Message rejected: spam score too high",
    Action.TEMPFAIL: "Message deferred by policy, try again later",
}
OVERRUN_REASON = "Message deferred: policy checks took too long, try again later"
UNAVAILABLE_REASON = (
    "Message deferred: a check this policy requires is unavailable, try again later"
)


@dataclass(frozen=True, slots=True)
class _Regime:
    scores: ScoreMap
    mode: Mode


@dataclass(frozen=True, slots=True)
class _Group:
    tier: Tier
    start: int  # index of its first rule in evaluation order
    facts: tuple[str, ...]


class Policy:
    """A validated, compiled policy file; implements the pipeline's Decider protocol.

    Immutable after construction, so one instance can serve every session and a reload
    replaces it whole.
    """

    __slots__ = (
        "_domain_regime",
        "_float_facts",
        "_forced_rest",
        "_groups",
        "_max_forced_rest",
        "_neg_rest",
        "_only_forced",
        "_order",
        "_pos_rest",
        "_regimes",
        "_sandbox",
        "_wildcards",
        "fact_names",
        "max_tier",
        "mode",
        "name",
        "overrides",
        "required",
        "rules",
        "source",
        "thresholds",
    )

    def __init__(
        self,
        *,
        name: str,
        mode: Mode,
        rules: Sequence[RuleSpec],
        programs: Mapping[str, Any],
        thresholds: Thresholds,
        overrides: Sequence[Override] = (),
        float_facts: frozenset[str] = frozenset(),
        source: str = "<policy>",
        sandbox: ConditionSandbox | None = None,
        required: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        # Facts whose failure (not mere absence) defers the message: fail closed.
        self.required = required
        self._sandbox = sandbox
        self.mode = mode
        self.source = source
        self.rules: tuple[RuleSpec, ...] = tuple(rules)
        self.thresholds = thresholds
        self.overrides: tuple[Override, ...] = tuple(overrides)
        self.fact_names: frozenset[str] = frozenset(n for r in self.rules for n in r.reads)
        self.max_tier: Tier | None = max((r.tier for r in self.rules), default=None)
        self._float_facts = float_facts & self.fact_names

        order = sorted(range(len(self.rules)), key=lambda i: (self.rules[i].tier, i))
        self._order: tuple[tuple[RuleSpec, Any], ...] = tuple(
            (self.rules[i], programs[self.rules[i].name]) for i in order
        )
        groups: list[_Group] = []
        for index, (rule, _) in enumerate(self._order):
            if not groups or groups[-1].tier != rule.tier:
                groups.append(_Group(rule.tier, index, ()))
            last = groups[-1]
            merged = tuple(dict.fromkeys((*last.facts, *rule.reads)))
            groups[-1] = _Group(last.tier, last.start, merged)
        self._groups = tuple(groups)

        # What the rules from position i on can still do (suffix sums and sets).
        n = len(self._order)
        pos, neg = [0.0] * (n + 1), [0.0] * (n + 1)
        forced: list[frozenset[Action]] = [frozenset()] * (n + 1)
        for i in range(n - 1, -1, -1):
            rule = self._order[i][0]
            pos[i] = pos[i + 1] + (rule.score if rule.action is None and rule.score > 0 else 0.0)
            neg[i] = neg[i + 1] + (rule.score if rule.action is None and rule.score < 0 else 0.0)
            forced[i] = forced[i + 1] | ({rule.action} if rule.action is not None else set())
        self._pos_rest = tuple(pos)
        self._neg_rest = tuple(neg)
        self._forced_rest = tuple(forced)
        self._max_forced_rest = tuple(max((SEVERITY[a] for a in f), default=-1) for f in forced)
        self._only_forced = tuple(next(iter(f)) if len(f) == 1 else None for f in forced)

        self._regimes: tuple[_Regime, ...] = (
            _Regime(ScoreMap.of(thresholds), mode),
            *(_Regime(ScoreMap.of(o.thresholds), o.mode) for o in self.overrides),
        )
        exact: dict[str, int] = {}
        wild: list[tuple[str, int]] = []
        for number, override in enumerate(self.overrides, start=1):
            for domain in override.domains:
                if domain.startswith("*."):
                    wild.append((domain[1:], number))
                else:
                    exact.setdefault(domain, number)
        self._domain_regime = exact
        self._wildcards = tuple(wild)

    def summary(self) -> str:
        """One line for operators: name, mode, rules per tier, the highest tier it can read."""
        per_tier = Counter(r.tier.label for r in self.rules)
        tiers = ", ".join(f"{t} {n}" for t, n in sorted(per_tier.items())) or "none"
        top = self.max_tier.label if self.max_tier is not None else "nothing"
        return (
            f"{self.source}: policy {self.name!r} ({self.mode.value}), {len(self.rules)} "
            f"rules ({tiers}), {len(self.overrides)} override(s), reads up to {top}"
        )

    def __repr__(self) -> str:
        return f"Policy(name={self.name!r}, mode={self.mode.value}, rules={len(self.rules)})"

    # --- regimes -------------------------------------------------------------------------

    def _regime_index(self, recipient: str) -> int:
        domain = recipient.rpartition("@")[2].strip().rstrip(".").lower()
        found = self._domain_regime.get(domain)
        if found is not None:
            return found
        for suffix, number in self._wildcards:
            if domain.endswith(suffix):
                return number
        return 0

    def regimes_for(self, recipients: Sequence[str]) -> tuple[_Regime, ...]:
        """The distinct (thresholds, mode) regimes of a message's recipient domains."""
        if not self.overrides or not recipients:
            return self._regimes[:1]
        indexes = sorted({self._regime_index(r) for r in recipients})
        return tuple(self._regimes[i] for i in indexes)

    # --- early stop ----------------------------------------------------------------------

    def _settled(
        self, i: int, score: float, forced: Action | None, regimes: tuple[_Regime, ...]
    ) -> bool:
        """True when no rule from position i on can change the outcome."""
        if forced is not None:
            return self._max_forced_rest[i] <= SEVERITY[forced]
        low = score + self._neg_rest[i]
        high = score + self._pos_rest[i]
        rest_forced = self._forced_rest[i]
        for regime in regimes:
            limits = regime.scores.limits
            band = bisect_right(limits, score)
            # Thresholds split the score line into one band per action: the action cannot
            # change while every reachable total stays in the current band.
            if bisect_right(limits, low) != band or bisect_right(limits, high) != band:
                return False
            if rest_forced and self._only_forced[i] is not regime.scores.actions[band]:
                return False
        return True

    # --- decision ------------------------------------------------------------------------

    async def _pull(
        self,
        facts: FactSource,
        names: tuple[str, ...],
        values: dict[str, Any],
        missing: dict[str, str],
        requested: list[str],
        context: Any,
    ) -> None:
        """Compute the facts a tier group reads; values come from the Facts' records, so a
        rule sees exactly the (JSON-able) value the Verdict reports."""
        todo = [n for n in names if n not in values and n not in missing]
        if not todo:
            return
        requested.extend(todo)
        pending = [n for n in todo if not facts.computed(n)]
        if len(pending) == 1:  # no task to make for one (a fact's failure is read below)
            with contextlib.suppress(Exception):
                await facts.get(pending[0])
        elif pending:  # independent facts of one tier (DNS lookups) run concurrently
            await asyncio.gather(*(facts.get(n) for n in pending), return_exceptions=True)
        for name in todo:
            read = facts.read(name)
            if read is None:  # not in the Facts' registry
                missing[name] = f"fact {name!r} is not registered"
            elif read.error is not None:
                missing[name] = read.error
            else:
                value = read.value
                if name in self._float_facts and type(value) is int:
                    value = float(value)
                values[name] = value
                if value is None:  # the resolver's None means "unknown": bind null itself
                    context.add_variable(name, None)

    async def decide(self, message: Message, facts: FactSource) -> Verdict:
        start = time.perf_counter()
        regimes = self.regimes_for(message.envelope.rcpt_to)
        values: dict[str, Any] = {}
        missing: dict[str, str] = {}
        requested: list[str] = []
        hits: list[RuleHit] = []
        skipped: list[RuleSkip] = []
        score = 0.0
        forced: Action | None = None
        forced_rule: RuleSpec | None = None
        forced_reason = ""
        evaluated = 0
        overrun: RuleSpec | None = None
        sandbox_until: float | None = None  # the message's time limit, from its first use
        order = self._order
        groups = self._groups
        # One context per message; CEL asks the resolver for each fact a rule touches, so
        # only the values actually used are converted, and later tiers just add to ``values``.
        context = cel.Context()
        context.set_variable_resolver(values.get)
        for g, group in enumerate(groups):
            end = groups[g + 1].start if g + 1 < len(groups) else len(order)
            if self._settled(group.start, score, forced, regimes):
                break
            await self._pull(facts, group.facts, values, missing, requested, context)
            stop = False
            for i in range(group.start, end):
                if i > group.start and self._settled(i, score, forced, regimes):
                    stop = True
                    break
                rule, program = order[i]
                evaluated += 1
                if rule.isolated and self._sandbox is not None:
                    if sandbox_until is None:
                        sandbox_until = time.monotonic() + self._sandbox.time_limit
                    result = await _evaluate_isolated(
                        rule, self._sandbox, values, missing, sandbox_until
                    )
                    if isinstance(result, ConditionTimeout):
                        overrun = rule
                        skipped.append(RuleSkip(rule.name, f"condition: {result}"))
                        stop = True
                        break
                else:
                    result = _evaluate(rule, program, context, missing)
                if isinstance(result, RuleSkip):
                    skipped.append(result)
                    continue
                if not result:
                    continue
                text = rule.reason_for(values)
                if rule.action is None:
                    score += rule.score
                    hits.append(RuleHit(rule.name, rule.score, text))
                else:
                    hits.append(RuleHit(rule.name, 0.0, text, rule.action))
                    if forced is None or SEVERITY[rule.action] > SEVERITY[forced]:
                        forced, forced_rule, forced_reason = rule.action, rule, text
            if stop:
                break

        unavailable = await _failed(facts, self.required.intersection(missing))
        if overrun is not None:
            action, forced_rule, reason = Action.TEMPFAIL, overrun, OVERRUN_REASON
        elif forced is not None and forced_rule is not None:
            action = forced
            reason = forced_reason or THRESHOLD_REASONS.get(forced, "")
        else:
            action = most_severe([r.scores.action(score) for r in regimes])
            reason = THRESHOLD_REASONS.get(action, "")
        if unavailable and overrun is None and SEVERITY[action] < SEVERITY[Action.TEMPFAIL]:
            # A required check failed: what the other rules say cannot be trusted to let
            # the message through, so it waits for a retry (a reject still stands).
            action, forced_rule, reason = Action.TEMPFAIL, None, UNAVAILABLE_REASON
        mode = Mode.ENFORCE if any(r.mode is Mode.ENFORCE for r in regimes) else Mode.SHADOW
        facts_read = tuple(r for r in map(facts.read, requested) if r is not None)
        return Verdict(
            action=action,
            score=score,
            policy=self.name,
            mode=mode,
            hits=tuple(hits),
            skipped=tuple(skipped),
            facts=facts_read,
            highest_tier=max((f.tier for f in facts_read), default=None),
            reason=reason,
            forced_by=forced_rule.name if forced_rule is not None else None,
            seconds=time.perf_counter() - start,
            extra=(
                ("rules_evaluated", f"{evaluated}/{len(order)}"),
                *((("unavailable", ",".join(unavailable)),) if unavailable else ()),
            ),
        )


async def _failed(facts: FactSource, names: set[str] | frozenset[str]) -> list[str]:
    """The facts among ``names`` (read and missing) whose computation failed (a backend,
    the model, a timeout, a bug), as against facts merely absent for this message."""
    out: list[str] = []
    for name in sorted(names):
        try:
            await facts.get(name)
        except FactError as exc:
            if failure_kind(exc) is not None:
                out.append(name)
    return out


async def _evaluate_isolated(
    rule: RuleSpec,
    sandbox: ConditionSandbox,
    values: dict[str, Any],
    missing: dict[str, str],
    until: float,
) -> bool | RuleSkip | ConditionTimeout:
    """As ``_evaluate``, in the sandbox; ConditionTimeout when it gave no result in time."""
    for name in rule.reads:
        if name in missing:
            return RuleSkip(rule.name, f"fact {name} unavailable: {missing[name]}")
    try:
        return await sandbox.run(
            rule.when, {n: values.get(n) for n in rule.reads}, until - time.monotonic()
        )
    except ConditionTimeout as exc:
        return exc
    except ValueError as exc:
        return RuleSkip(rule.name, f"condition failed: {exc}")


def _evaluate(
    rule: RuleSpec, program: Any, context: Any, missing: dict[str, str]
) -> bool | RuleSkip:
    if missing:
        for name in rule.reads:
            if name in missing:
                return RuleSkip(rule.name, f"fact {name} unavailable: {missing[name]}")
    try:
        result = program.execute(context)
    except Exception as exc:  # a surprising fact value must not crash the session
        text = (str(exc).strip().splitlines() or [""])[0][:160]
        return RuleSkip(rule.name, f"condition failed: {type(exc).__name__}: {text}")
    if result is True or result is False:
        return result
    return RuleSkip(rule.name, f"condition gave {type(result).__name__}, not a bool")
