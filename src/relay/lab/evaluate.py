"""Evaluating policies over cached facts with the relay's own engine.

Each (message, policy) pair gets a fresh LabFacts over the cached outcomes: a policy
pulls facts in its own tier order and stops early exactly as it would live, and its
verdict lists only the facts it asked for, so the tier a regime needed in the lab is the
tier it would need on the wire. A fact that failed when it was computed fails again here
with the same reason, and the policy treats it as missing.

After each verdict, the rules the early stop left unevaluated are checked once each
(complete.py), so a Decision also records every rule the message matches and its
recipients' thresholds: the report's curves and rule statistics are recomputed from
those (rescore.py), never decided again.

Decisions are cached per regime (cache.DecisionCache) under ``regime_key``: a digest of
the regime file, the cache versions of every fact it can read, the facts' context (lab
environment and corpus order) and the source of the code that decides (the policy
package, this module, complete.py, verdict.py). A rerun re-evaluates only the regimes
whose key changed; ``decision_row`` and ``decision_from_row`` are the stored form.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import relay.policy
from relay.errors import FactError, PolicyError, RelayError
from relay.facts import FactContext, FactRegistry, Facts, FactSpec, FactType, Services
from relay.lab.cache import Cached
from relay.lab.complete import Completer, completer_for
from relay.lab.corpus import CorpusMessage
from relay.lab.rescore import Bands, RegimeRules, RuleDef
from relay.message import Message
from relay.policy import Policy
from relay.policy.model import ScoreMap
from relay.verdict import FactRead, Tier, Verdict


class LabPolicy(Protocol):
    """What the lab needs of a compiled policy (relay.policy.Policy provides it)."""

    @property
    def name(self) -> str: ...

    @property
    def fact_names(self) -> Iterable[str]: ...

    async def decide(self, message: Message, facts: Facts) -> Verdict: ...


PolicyLoader = Callable[[Path, FactRegistry], LabPolicy]


@dataclass(frozen=True, slots=True)
class Regime:
    name: str
    path: Path
    policy: LabPolicy


@dataclass(frozen=True, slots=True)
class RegimeProblem:
    """A regime file that could not be loaded, with every problem found (a value in the
    report, not an exception: the lab runs the other regimes and lists these)."""

    path: Path
    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """One policy's verdict on one message, as much as the report needs."""

    action: str
    score: float
    tier: str | None
    rules: tuple[str, ...]
    forced_by: str | None
    reason: str
    facts: tuple[str, ...]
    skipped: tuple[str, ...]
    # Every rule whose condition holds, past the early stop (complete.py); None when the
    # policy is not the relay's own and cannot be probed.
    matched: tuple[str, ...] | None = None
    bands: tuple[Bands, ...] = ()  # thresholds of the recipients' domains (rescore.py)

    @classmethod
    def of(
        cls,
        verdict: Verdict,
        matched: tuple[str, ...] | None = None,
        bands: tuple[Bands, ...] = (),
    ) -> Decision:
        return cls(
            action=verdict.action.value,
            score=round(verdict.score, 4),
            tier=None if verdict.highest_tier is None else verdict.highest_tier.label,
            rules=tuple(h.rule for h in verdict.hits),
            forced_by=verdict.forced_by,
            reason=verdict.reason,
            facts=tuple(f.name for f in verdict.facts),
            skipped=tuple(f"{s.rule}: {s.reason}" for s in verdict.skipped),
            matched=matched,
            bands=bands,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "score": self.score,
            "tier": self.tier,
            "rules": list(self.rules),
            "forced_by": self.forced_by,
            "reason": self.reason,
            "facts": list(self.facts),
            "skipped": list(self.skipped),
        }


def decision_row(d: Decision) -> list[Any]:
    """A Decision as a compact JSON list (the decision cache's stored form)."""
    return [
        d.action,
        d.score,
        d.tier,
        list(d.rules),
        d.forced_by,
        d.reason,
        list(d.facts),
        list(d.skipped),
        None if d.matched is None else list(d.matched),
        [[list(step) for step in band] for band in d.bands],
    ]


def decision_from_row(row: Sequence[Any]) -> Decision:
    action, score, tier, rules, forced_by, reason, facts, skipped, matched, bands = row
    return Decision(
        action=action,
        score=score,
        tier=tier,
        rules=tuple(rules),
        forced_by=forced_by,
        reason=reason,
        facts=tuple(facts),
        skipped=tuple(skipped),
        matched=None if matched is None else tuple(matched),
        bands=tuple(tuple((float(t), str(a)) for t, a in band) for band in bands),
    )


DECISION_FORMAT = "relay-lab-decision/1"
_DECIDING_CODE = ("evaluate.py", "complete.py")


def _code_digest() -> str:
    """The source of the code that turns cached facts into a Decision: a change to the
    engine invalidates every cached decision, as a new fact version does its values."""
    here = Path(__file__).parent
    files = [here / name for name in _DECIDING_CODE]
    files += sorted(Path(relay.policy.__file__).parent.glob("*.py"))
    files.append(Path(relay.policy.__file__).parents[1] / "verdict.py")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def regime_key(regime: Regime, registry: FactRegistry, context: str) -> str | None:
    """The decision cache's key for one regime (None: its file cannot be read again, so
    its decisions are not cached). ``context`` names what the facts' values depend on
    besides the message (the lab environment's key and the corpus order)."""
    try:
        policy_bytes = regime.path.read_bytes()
    except OSError:
        return None
    facts = sorted(registry.closure(n for n in regime.policy.fact_names if n in registry))
    parts = {
        "format": DECISION_FORMAT,
        "code": _code_digest(),
        "policy": hashlib.sha256(policy_bytes).hexdigest(),
        "facts": {n: registry.cache_version(n) for n in facts if n in registry},
        "context": context,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def regime_rules(policy: LabPolicy) -> RegimeRules | None:
    """The rules and thresholds the report recomputes verdicts from (rescore.py)."""
    if not isinstance(policy, Policy):
        return None
    rules = tuple(
        RuleDef(r.name, r.score, None if r.action is None else r.action.value) for r in policy.rules
    )
    return RegimeRules(rules, tuple((t, a.value) for t, a in policy.thresholds.steps()))


def _bands(scores: ScoreMap) -> Bands:
    return tuple(zip(scores.limits, (a.value for a in scores.actions[1:]), strict=True))


def default_loader(path: Path, registry: FactRegistry) -> LabPolicy:
    from relay.policy import load_policy

    policy: LabPolicy = load_policy(path, registry)
    return policy


def load_regimes(
    paths: Sequence[Path], registry: FactRegistry, loader: PolicyLoader = default_loader
) -> tuple[list[Regime], list[RegimeProblem]]:
    """Every policy file that validates; the others with their problems (file, line, rule)."""
    regimes: list[Regime] = []
    errors: list[RegimeProblem] = []
    for path in paths:
        try:
            policy = loader(path, registry)
        except PolicyError as exc:
            errors.append(RegimeProblem(path, tuple(exc.problems)))
            continue
        except (RelayError, OSError) as exc:
            errors.append(RegimeProblem(path, (f"{path}: {exc}",)))
            continue
        name = policy.name
        if any(r.name == name for r in regimes):
            name = f"{name} ({path.name})"
        regimes.append(Regime(name, path, policy))
    return regimes, errors


def needed_facts(regimes: Iterable[Regime], registry: FactRegistry) -> list[str]:
    """Every fact any regime can read, with the facts those depend on.

    Structured intermediate values that no regime reads itself (the decoded body text,
    the classifier's internals) are computed on the way but left out: they are large,
    and the body text has no business in a cache or a report.
    """
    read = {n for r in regimes for n in r.policy.fact_names if n in registry}
    seen = registry.closure(read)
    return sorted(n for n in seen if n in read or registry[n].type is not FactType.OBJECT)


def _from_cache(spec: FactSpec) -> FactSpec:
    async def compute(ctx: FactContext) -> Any:
        # LabFacts answers every cached fact itself; only an uncached one gets here.
        raise FactError(f"{spec.name}: not computed by the lab")

    # No dependencies: asking for a fact records it alone, and its tier already covers them.
    return dataclasses.replace(spec, compute=compute, depends=())


def cached_registry(registry: FactRegistry) -> FactRegistry:
    return FactRegistry(_from_cache(s) for s in registry)


def _light_message(m: CorpusMessage) -> Message:
    # Every fact comes from the cache, so nothing parses the message again; the envelope
    # is there for per-recipient-domain overrides.
    return Message(
        raw=m.raw(),  # once per message per evaluation pass
        envelope=m.envelope,
        peer=m.peer,
        queue_id=m.digest[:16],
        received_at=m.time,
    )


class LabFacts(Facts):
    """Facts whose outcomes are known in advance (the lab's cache).

    Lazy like Facts: a fact is recorded as read only when the policy asks for it, so the
    verdict's facts and tier are what the policy pulled, exactly as live; a fact that
    failed when it was computed raises the same FactError again. Nothing is scheduled on
    the event loop, which keeps tens of thousands of (message, regime) pairs cheap.
    """

    def __init__(
        self,
        registry: FactRegistry,
        message: Message,
        services: Services,
        known: Mapping[str, Cached],
    ) -> None:
        super().__init__(registry, message, services)
        self._known = known
        self._asked: dict[str, FactRead] = {}

    def _record(self, name: str, cached: Cached) -> FactRead:
        found = self._asked.get(name)
        if found is None:
            tier = self.registry[name].tier
            found = self._asked[name] = FactRead(name, tier, cached.value, 0.0, cached.error)
        return found

    async def get(self, name: str) -> Any:
        cached = self._known.get(name)
        if cached is None:
            return await super().get(name)
        self._record(name, cached)
        if cached.error is not None:
            raise FactError(cached.error)
        return cached.value

    def computed(self, name: str) -> bool:
        # Known in advance, like a preset fact: nothing to compute, only to record.
        return name in self._known or super().computed(name)

    def read(self, name: str) -> FactRead | None:
        cached = self._known.get(name)
        return super().read(name) if cached is None else self._record(name, cached)

    def reads(self) -> tuple[FactRead, ...]:
        return (*self._asked.values(), *super().reads())

    def highest_tier(self) -> Tier | None:
        return max((r.tier for r in self.reads()), default=None)


async def evaluate(
    regimes: Sequence[Regime],
    messages: Sequence[CorpusMessage],
    outcomes: Mapping[str, Mapping[str, Cached]],
    registry: FactRegistry,
    progress: Callable[[int], None],
) -> dict[str, dict[str, Decision]]:
    """{message id: {regime name: Decision}} for every message and regime."""
    decider = RegimeDecider(regimes, registry)
    out: dict[str, dict[str, Decision]] = {}
    for m in messages:
        out[m.id] = await decider.decide(m, regimes, outcomes.get(m.digest, {}))
        progress(1)
    return out


class RegimeDecider:
    """Decides regimes on one message at a time over its cached facts (``evaluate`` for
    a whole corpus; run.py for the regimes whose decisions are not cached)."""

    def __init__(self, regimes: Sequence[Regime], registry: FactRegistry) -> None:
        self._evaluation = cached_registry(registry)
        self._completers: dict[str, Completer | None] = {
            r.name: completer_for(r.policy, registry) for r in regimes
        }
        self._band_cache: dict[ScoreMap, Bands] = {}

    async def decide(
        self, m: CorpusMessage, regimes: Sequence[Regime], known: Mapping[str, Cached]
    ) -> dict[str, Decision]:
        evaluation = self._evaluation
        services = Services()  # nothing is computed here: every fact is cached
        message = _light_message(m)
        decisions: dict[str, Decision] = {}
        for regime in regimes:
            facts = LabFacts(evaluation, message, services, known)
            verdict = await regime.policy.decide(message, facts)
            completer = self._completers[regime.name]
            if completer is None or not isinstance(regime.policy, Policy):
                decisions[regime.name] = Decision.of(verdict)
                continue
            # Probes read through their own LabFacts: the verdict's facts and tier stay
            # what the regime itself pulled.
            probe_facts = LabFacts(evaluation, message, services, known)
            matched = await completer.matched(verdict, message, probe_facts)
            bands = tuple(
                self._band_cache.setdefault(r.scores, _bands(r.scores))
                for r in regime.policy.regimes_for(message.envelope.rcpt_to)
            )
            decisions[regime.name] = Decision.of(verdict, matched, bands)
        return decisions
