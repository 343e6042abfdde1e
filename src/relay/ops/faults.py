"""Fact failures made visible: counted, logged (at most once a minute per fact and kind),
and remembered so /readyz can say "degraded" while mail keeps flowing.

A fact fails when the state backend, DNS or the classifier does not answer, or on a bug
(``facts.base.failure_kind`` sorts it; a fact that is merely *missing* is not a failure).
The message flows on without it, which is right, but was silent: with Redis gone the
bulk rules stopped firing exactly as if counts were low. ``FactFaults`` is the sink
``Facts`` reports to; the runtime (app.py) owns one per relay process:

- ``relay_fact_errors_total{fact,kind}`` counts every failure (``Metrics.fact_failed``);
- one WARNING line per (fact, kind) per ``LOG_EVERY`` seconds, with how many were held
  back (``LogLimiter``): an outage at 500 msgs/s must not write 500 lines a second. The
  line names the fact, the kind and the exception types; the text only of state errors,
  which state.py builds from the backend's own words, never from a message (DNS errors
  carry looked-up names, which can hold a client's address: left out);
- ``degraded()``: kind -> facts that failed within the last ``quiet`` seconds. A success
  of the backend's probe (``clear``) ends a kind's entry early (readiness.py).

With several workers the supervisor serves /readyz but sees only the counters in the
metric files: ``ErrorWatch`` turns their growth into the same degraded answer.

The clock is injected (``time.monotonic`` by default) so tests check the limiter and the
quiet time without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from relay.errors import StateError
from relay.loglimit import LOG_EVERY, Clock, LogLimiter
from relay.verdict import FailureKind

log = logging.getLogger("relay.facts")

FACT_ERRORS = "relay_fact_errors_total"

__all__ = ["LOG_EVERY", "Clock", "ErrorWatch", "FactFaults", "LogLimiter", "describe"]


def describe(error: BaseException) -> str:
    """A log-safe account of a failure: the exception types of its chain, plus the text of
    state errors (state.py writes them from the backend's answer: host, port, reason)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        if isinstance(current, StateError):
            parts.append(f"{type(current).__name__}: {current}")
        else:
            parts.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


class FactFaults:
    """The ``facts.base.FactFailures`` sink of one relay process (see the module doc).

    ``count(fact, kind)`` is ``Metrics.fact_failed`` (None with metrics off); ``quiet``
    is ``[metrics] degraded_for``."""

    def __init__(
        self,
        *,
        quiet: float,
        count: Callable[[str, str], None] | None = None,
        clock: Clock = time.monotonic,
        log_every: float = LOG_EVERY,
        logger: logging.Logger = log,
    ) -> None:
        self._quiet = quiet
        self._count = count
        self._clock = clock
        self._limiter = LogLimiter(log_every, clock)
        self._log = logger
        self._last: dict[tuple[str, str], float] = {}  # (kind, fact) -> last failure

    def fact_failed(self, name: str, kind: FailureKind, error: BaseException) -> None:
        self._last[(kind.value, name)] = self._clock()
        if self._count is not None:
            self._count(name, kind.value)
        held = self._limiter.allow((name, kind.value))
        if held is not None:
            self._log.warning(
                "fact %s failed (%s): %s; the message went on without it%s",
                name,
                kind.value,
                describe(error),
                f" ({held} more failures since the last line)" if held else "",
            )

    def mark(self, kind: FailureKind, source: str, error: BaseException) -> None:
        """A failure outside a message (``state_backend``: the store did not answer at
        start-up): degraded, logged, and counted under ``source``, so a supervisor that
        sees only the counters knows it too."""
        self._last[(kind.value, source)] = self._clock()
        if self._count is not None:
            self._count(source, kind.value)
        self._log.warning("%s: %s failing: %s", source, kind.value, describe(error))

    def now(self) -> float:
        return self._clock()

    def degraded(self) -> dict[str, list[str]]:
        """kind -> the facts (or sources) that failed within the last ``quiet`` seconds."""
        now = self._clock()
        found: dict[str, list[str]] = {}
        for (kind, name), at in list(self._last.items()):
            if now - at < self._quiet:
                found.setdefault(kind, []).append(name)
            else:
                del self._last[(kind, name)]
        return {kind: sorted(names) for kind, names in sorted(found.items())}

    def clear(self, kind: FailureKind, before: float) -> None:
        """A probe that started at ``before`` found the backend answering: failures of
        ``kind`` up to then are over (later ones, during the probe, stay)."""
        for key, at in list(self._last.items()):
            if key[0] == kind.value and at <= before:
                del self._last[key]


class ErrorWatch:
    """Degraded facts from counter totals (the supervisor of several workers): a fact is
    degraded while its total grew within the last ``quiet`` seconds. Totals come from
    ``fact_error_totals`` over the workers' metric files."""

    def __init__(self, quiet: float, clock: Clock = time.monotonic) -> None:
        self._quiet = quiet
        self._clock = clock
        self._totals: dict[tuple[str, str], float] = {}
        self._changed: dict[tuple[str, str], float] = {}

    def update(self, totals: Mapping[tuple[str, str], float]) -> dict[str, list[str]]:
        """Feed the current totals ((kind, fact) -> count); kind -> facts degraded now.
        Totals above zero seen for the first time count as new: the metric files are
        emptied at every start, so they are this run's."""
        now = self._clock()
        for key, total in totals.items():
            if total > self._totals.get(key, 0.0):
                self._changed[key] = now
            self._totals[key] = total
        found: dict[str, list[str]] = {}
        for (kind, fact), at in sorted(self._changed.items()):
            if now - at < self._quiet:
                found.setdefault(kind, []).append(fact)
        return found


def fact_error_totals(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """(kind, fact) -> relay_fact_errors_total (summed over workers, for a registry that
    aggregates the multiprocess files)."""
    totals: dict[tuple[str, str], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == FACT_ERRORS:
                key = (sample.labels.get("kind", "other"), sample.labels.get("fact", "other"))
                totals[key] = totals.get(key, 0.0) + float(sample.value)
    return totals
