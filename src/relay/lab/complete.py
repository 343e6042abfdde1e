"""Every rule a message matches, including those the engine's early stop never evaluated.

The engine stops as soon as no remaining rule can change the action at the policy's own
thresholds, so a verdict's hits are only the rules it needed. Curves (other thresholds)
and marginal effects (a rule removed) need the rest: with the recorded hits alone,
removing a forced reject at T0 would leave every later rule unknown.

So after the real decision, each rule past the evaluated prefix is checked once by a
*probe*: a one-rule policy built with the relay's own Policy class from the rule's own
condition, its outcome replaced by a forced ``tag`` (a forced action differing from
``accept`` is never settled in advance, so the engine always evaluates it). The probe
runs on the same cached facts with the engine's semantics (missing facts skip the rule,
float coercion, reason facts). Conditions read facts only, never other rules, so a rule
matches in a probe exactly when it would have matched in the full evaluation. This is
one probe per unevaluated rule and message, never one decision per removed rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from relay.contracts import FactSource
from relay.errors import PolicyError
from relay.facts import FactRegistry, FactType
from relay.message import Message
from relay.policy import Policy, RuleSpec, Thresholds
from relay.policy.expr import compile_condition
from relay.verdict import Action, Verdict


def evaluation_order(rules: Sequence[RuleSpec]) -> tuple[RuleSpec, ...]:
    """The engine's order: by tier, file order within a tier (docs/policy.md)."""
    order = sorted(range(len(rules)), key=lambda i: (rules[i].tier, i))
    return tuple(rules[i] for i in order)


def evaluated_prefix(verdict: Verdict) -> int | None:
    """How many rules, in evaluation order, the engine looked at (None: not recorded)."""
    note = dict(verdict.extra).get("rules_evaluated")
    if note is None:
        return None
    head = note.partition("/")[0]
    return int(head) if head.isdigit() else None


class Completer:
    """Probes for one policy's rules, built once; ``matched`` completes one verdict."""

    def __init__(self, policy: Policy, registry: FactRegistry) -> None:
        self.order = evaluation_order(policy.rules)
        floats = frozenset(s.name for s in registry if s.type is FactType.FLOAT)
        probes: dict[str, Policy] = {}
        for rule in self.order:
            condition, problems = compile_condition(rule.when, registry)
            if condition is None or problems:  # it compiled when the policy loaded
                raise PolicyError([f"{policy.source}: rule {rule.name!r}: {p}" for p in problems])
            probe = dataclasses.replace(rule, action=Action.TAG, score=0.0)
            probes[rule.name] = Policy(
                name=policy.name,
                mode=policy.mode,
                rules=(probe,),
                programs={rule.name: condition.program},
                thresholds=Thresholds(),
                float_facts=floats,
                source=policy.source,
            )
        self._probes: Mapping[str, Policy] = probes

    async def matched(
        self, verdict: Verdict, message: Message, facts: FactSource
    ) -> tuple[str, ...]:
        """Every rule the message matches, in evaluation order (the engine's sum order)."""
        fired = {h.rule for h in verdict.hits}
        start = evaluated_prefix(verdict)
        if start is None:  # unknown prefix: probe all that did not fire (same answer)
            start = 0
        out: list[str] = []
        for index, rule in enumerate(self.order):
            if rule.name in fired:
                out.append(rule.name)
            elif index >= start:
                probe = await self._probes[rule.name].decide(message, facts)
                if probe.hits:
                    out.append(rule.name)
        return tuple(out)


def completer_for(policy: Any, registry: FactRegistry) -> Completer | None:
    """A Completer for the relay's own Policy; None for anything else (the report then
    says the rule statistics cannot be computed)."""
    return Completer(policy, registry) if isinstance(policy, Policy) else None
