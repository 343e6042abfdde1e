"""The Observer that feeds the relay's metrics (``instruments.py`` defines them).

``Metrics(registry)`` registers into the registry it is given (never the global default)
and implements the ``Observer`` contract. Names from configuration files (rules, shadow
policies) are capped, so a generated policy cannot explode the series count.
Observation never raises: a bug here must not cost a message.

Counters are the hot path (about twenty increments per message), so they are gathered in
a plain dict under one lock and added to the prometheus_client counters by ``flush()``:
at every collection of the registry (a collector registered first does it, so a scrape
or ``get_sample_value`` always sees every event), and every second from the
``flushing()`` task app.py runs, which is what multiprocess mode (``multiprocess.py``)
relies on because the supervisor reads the files, not this registry. Histograms and
gauges are written at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay.contracts import MessageReport
from relay.ops.instruments import (
    AUTH_METHODS,
    AUTH_RESULTS,
    CODE_CLASSES,
    DELIVERY_RESULTS,
    FAILURE_KINDS,
    MAX_NAME_LENGTH,
    OTHER,
    OUTCOMES,
    STAGES,
    Instruments,
)
from relay.ops.looplag import background
from relay.ops.multiprocess import MULTIPROC_ENV, multiprocess_dir, values_are_mmapped
from relay.verdict import Action, FactRead, Mode, Tier, Verdict

log = logging.getLogger("relay.ops.metrics")

# Authentication results come from the ``auth_results`` fact (every method at once) when
# the policy computed it, else from the single-method views it read. Values outside
# AUTH_RESULTS count as "other"; a fact that failed to compute (DNS timeout, parse error)
# counts as "error".
AUTH_OBJECT = "auth_results"
AUTH_FACTS = {"spf": "spf", "dkim_result": "dkim", "dmarc": "dmarc", "arc": "arc"}
PROBABILITY_FACT = "spam_probability"
REGISTRY_EVERY = 60.0  # seconds between reads of the model registry (watching_models)


def _auth_result(value: Any, error: str | None) -> str:
    if error is not None:
        return "error"
    if isinstance(value, Mapping):  # structured results carry their summary under "result"
        value = value.get("result")
    if isinstance(value, str):
        result = value.strip().lower()
        if result in AUTH_RESULTS:
            return result
    return OTHER


class _Capped:
    """Children of a one-label metric for names from config files, at most ``limit`` of
    them; later names share the ``other`` child so a generated policy cannot explode the
    series count."""

    def __init__(self, metric: Counter, limit: int) -> None:
        self._metric = metric
        self._limit = limit
        self._children: dict[str, Any] = {OTHER: metric.labels(OTHER)}

    def get(self, name: str) -> Any:
        child = self._children.get(name)
        if child is None:
            if len(self._children) > self._limit or len(name) > MAX_NAME_LENGTH:
                return self._children[OTHER]
            child = self._children[name] = self._metric.labels(name)
        return child


class _FlushFirst(Collector):
    """Registered before every metric: collecting the registry first flushes the batch."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.flush()
        return ()


class Metrics:
    """The relay's metrics, registered into ``registry``; an ``Observer`` for the pipeline."""

    def __init__(self, registry: CollectorRegistry, *, max_names: int = 200) -> None:
        multiprocess = multiprocess_dir() is not None
        if multiprocess and not values_are_mmapped():
            raise RuntimeError(
                f"{MULTIPROC_ENV} is set but prometheus_client was imported before it was: "
                "this worker's metrics would be invisible. Set it before importing "
                "prometheus_client (relay.ops.multiprocess.prepare_multiprocess_dir in the "
                "supervisor) and start workers with the 'spawn' or 'forkserver' method."
            )
        self._lock = threading.Lock()  # scrapes flush from a thread
        self._pending: dict[Any, float] = {}  # counter child -> increments not yet added
        registry.register(_FlushFirst(self))
        i = self.instruments = Instruments(registry, multiprocess=multiprocess)
        self._model_labels: tuple[str, str] | None = None

        # Pre-bound children: observing a message is dict lookups and additions.
        self._messages = {(a, m): i.messages.labels(a.value, m.value) for a in Action for m in Mode}
        self._outcomes = {o: i.outcomes.labels(o) for o in (*OUTCOMES, OTHER)}
        self._deliveries = {d: i.deliveries.labels(d) for d in (*DELIVERY_RESULTS, OTHER)}
        self._stages = {s: i.stage_seconds.labels(s) for s in (*STAGES, OTHER)}
        self._replies = {c: i.replies.labels(c) for c in (*CODE_CLASSES, OTHER)}
        self._tiers: dict[Tier | None, Any] = {t: i.tiers.labels(t.label) for t in Tier}
        self._tiers[None] = i.tiers.labels("none")
        self._auth = {(m, res): i.auth.labels(m, res) for m in AUTH_METHODS for res in AUTH_RESULTS}
        self._reloads = {ok: i.reloads.labels("ok" if ok else "failed") for ok in (True, False)}
        self._connections = i.connections
        self._refused = i.connections_refused
        self._connections_open = i.connections_open
        self._probability = i.probability
        self._message_seconds = i.message_seconds
        self._rules = _Capped(i.rule_hits, max_names)
        self._shadow: dict[tuple[str, Action], Any] = {}
        self._fact_errors: dict[tuple[str, str], Any] = {}
        self._max_names = max_names
        i.reload_ok.set(1)  # start-up only continues with a valid policy

    # Observer protocol -------------------------------------------------------------

    def connection_opened(self) -> None:
        try:
            self._add(self._connections)
            self._connections_open.inc()
        except Exception:
            self._failed("connection_opened")

    def connection_closed(self) -> None:
        try:
            self._connections_open.dec()
        except Exception:
            self._failed("connection_closed")

    def connection_refused(self) -> None:
        try:
            self._add(self._refused)
        except Exception:
            self._failed("connection_refused")

    def smtp_reply(self, code: int) -> None:
        try:
            self._add(self._replies.get(f"{code // 100}xx") or self._replies[OTHER])
        except Exception:
            self._failed("smtp_reply")

    def message_done(self, report: MessageReport) -> None:
        try:
            self._message_done(report)
        except Exception:
            self._failed("message_done")

    def shadow_verdict(self, verdict: Verdict) -> None:
        try:
            key = (verdict.policy, verdict.action)
            child = self._shadow.get(key)
            if child is None:
                policy = verdict.policy
                if len(self._shadow) >= self._max_names or len(policy) > MAX_NAME_LENGTH:
                    policy = OTHER
                child = self._shadow[key] = self.instruments.shadow.labels(
                    policy, verdict.action.value
                )
            self._add(child)
        except Exception:
            self._failed("shadow_verdict")

    def policy_reload(self, ok: bool) -> None:
        try:
            self._add(self._reloads[ok])
            self.instruments.reload_ok.set(1 if ok else 0)
            self.instruments.reload_time.set_to_current_time()
        except Exception:
            self._failed("policy_reload")

    # Not part of the Observer protocol -----------------------------------------------

    def fact_failed(self, fact: str, kind: str) -> None:
        """One failed fact computation (ops/faults.py). Fact names come from the fact
        registry; past ``max_names`` of them, or an unknown kind, they count as other."""
        try:
            key = (fact, kind)
            child = self._fact_errors.get(key)
            if child is None:
                if kind not in FAILURE_KINDS:
                    kind = OTHER
                if len(self._fact_errors) >= self._max_names or len(fact) > MAX_NAME_LENGTH:
                    fact = OTHER
                child = self._fact_errors[key] = self.instruments.fact_errors.labels(fact, kind)
            self._add(child)
        except Exception:
            self._failed("fact_failed")

    def model_reloaded(self, ok: bool) -> None:
        try:
            self.instruments.model_reloads.labels("ok" if ok else "failed").inc()
        except Exception:
            self._failed("model_reloaded")

    def loop_lag(self, seconds: float) -> None:
        """How late the event loop ran a timer (ops/looplag.py)."""
        try:
            self.instruments.loop_lag.observe(seconds)
        except Exception:
            self._failed("loop_lag")

    def set_model_versions(self, stats: Mapping[str, Any]) -> None:
        """The registry's figures (``models.registry.registry_stats``)."""
        try:
            i = self.instruments
            for status, n in dict(stats.get("versions", {})).items():
                i.model_updates.labels(str(status)[:MAX_NAME_LENGTH]).set(float(n))
            i.model_refusals.set(float(stats.get("refused", 0)))
            for label in ("spam", "ham"):
                i.model_feedback.labels(label).set(float(stats.get("feedback", {}).get(label, 0)))
        except Exception:
            self._failed("set_model_versions")

    def set_model_info(self, info: Mapping[str, Any]) -> None:
        """Records the loaded model's card (``version``, ``trained_at``; others ignored)."""
        try:
            labels = (
                str(info.get("version", ""))[:MAX_NAME_LENGTH],
                str(info.get("trained_at", ""))[:MAX_NAME_LENGTH],
            )
            if self.instruments.model_info is not None:
                self.instruments.model_info.info({"version": labels[0], "trained_at": labels[1]})
            elif self.instruments.model_gauge is not None:
                if self._model_labels is not None and self._model_labels != labels:
                    self.instruments.model_gauge.labels(*self._model_labels).set(0)
                self.instruments.model_gauge.labels(*labels).set(1)
            self._model_labels = labels
        except Exception:
            self._failed("set_model_info")

    def _message_done(self, report: MessageReport) -> None:
        verdict = report.verdict
        counted = [
            self._messages[(verdict.action, verdict.mode)],
            self._outcomes.get(report.outcome) or self._outcomes[OTHER],
            self._deliveries.get(report.delivery or "none") or self._deliveries[OTHER],
            self._tiers[verdict.highest_tier],
        ]
        counted += [self._rules.get(hit.rule) for hit in verdict.hits]
        whole: FactRead | None = None
        views: list[tuple[str, FactRead]] = []
        for read in verdict.facts:
            if read.name == AUTH_OBJECT:
                whole = read
            elif read.name in AUTH_FACTS:
                views.append((AUTH_FACTS[read.name], read))
            elif read.name == PROBABILITY_FACT and read.error is None:
                value = read.value
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._probability.observe(float(value))
        if whole is not None:  # every method once, whichever views the policy read
            results = whole.value if isinstance(whole.value, Mapping) else {}
            for method in AUTH_METHODS:
                counted.append(self._auth[(method, _auth_result(results.get(method), whole.error))])
        else:
            for method, read in views:
                counted.append(self._auth[(method, _auth_result(read.value, read.error))])
        for stage, seconds in report.timings:
            if stage == "total":
                self._message_seconds.observe(seconds)
            else:
                self._stages.get(stage, self._stages[OTHER]).observe(seconds)
        with self._lock:
            pending = self._pending
            for child in counted:
                pending[child] = pending.get(child, 0.0) + 1.0

    def flush(self) -> None:
        """Adds the gathered counter increments to the counters (any thread)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for child, amount in pending.items():
            child.inc(amount)

    @contextlib.asynccontextmanager
    async def flushing(self, every: float = 1.0) -> AsyncIterator[None]:
        """Flushes every ``every`` seconds while open, and once more on exit (app.py)."""

        async def flush() -> None:
            self.flush()

        try:
            async with _every(every, flush):
                yield
        finally:
            self.flush()

    @contextlib.asynccontextmanager
    async def watching_models(
        self, read: Callable[[], Mapping[str, Any]], every: float = REGISTRY_EVERY
    ) -> AsyncIterator[None]:
        """Re-reads the model registry's figures (``read``, run off the loop) every
        ``every`` seconds while open: `relay model update` runs in another process (a
        timer), so without this the update and refusal gauges would wait for a reload."""

        async def refresh() -> None:
            try:
                stats = await asyncio.to_thread(read)
            except Exception:  # a registry being written; the next tick reads it
                self._failed("watching_models")
                return
            self.set_model_versions(stats)

        async with _every(every, refresh):
            yield

    def _add(self, child: Any) -> None:
        with self._lock:
            self._pending[child] = self._pending.get(child, 0.0) + 1.0

    def _failed(self, what: str) -> None:
        log.debug("metrics observation %s failed", what, exc_info=True)
        try:
            self.instruments.errors.inc()
        except Exception:  # the error counter itself failed; nothing more we can do
            log.debug("metrics error counter failed", exc_info=True)


def _every(
    seconds: float, step: Callable[[], Awaitable[None]]
) -> contextlib.AbstractAsyncContextManager[None]:
    """Runs ``step`` every ``seconds`` while the block is open; cancelled on exit."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(seconds)
            await step()

    return background(tick)
