"""Every Prometheus metric of the relay, defined once, and the Observer that feeds them.

``Metrics(registry)`` registers into the registry it is given (never the global default)
and implements ``relay.pipeline.Observer``. Label values come only from small fixed sets
(actions, modes, tiers, code classes, stages) or from names in configuration files (rules,
shadow policies), which are capped; never from addresses, domains or message ids.
Observation never raises: a bug here must not cost a message.

Counters are the hot path (about twenty increments per message), so they are gathered in
a plain dict under one lock and added to the prometheus_client counters by ``flush()``:
at every collection of the registry (a collector registered first does it, so a scrape
or ``get_sample_value`` always sees every event), and every second from the
``flushing()`` task app.py runs, which is what multiprocess mode relies on because the
supervisor reads the files, not this registry. Histograms and gauges are written at once.

Several worker processes (``[smtp] workers > 1``) use prometheus_client's multiprocess
mode. prometheus_client picks its value class once, when ``prometheus_client.values`` is
first imported: with ``PROMETHEUS_MULTIPROC_DIR`` set, every metric writes to a memory-
mapped file ``<kind>_<pid>.db`` in that directory, otherwise to process memory. So:

- the supervisor calls ``prepare_multiprocess_dir`` (fresh, empty directory; sets the
  variable) BEFORE any worker imports prometheus_client. Workers started with the
  ``spawn`` or ``forkserver`` method import it afresh and see the variable; workers
  *forked* from a supervisor that had already imported prometheus_client inherit the
  in-memory value class, which ``Metrics`` detects and refuses (``RuntimeError``);
- the supervisor serves the endpoint, which aggregates every file (``scrape_registry``);
  counters of a dead worker stay in its file, so totals survive a worker restart;
- the supervisor calls ``worker_exited(pid)`` when a worker ends, so live gauges (open
  connections, reload state) stop counting it;
- Info metrics do not work in that mode, so the model info becomes a gauge with the same
  exposed name (``relay_model_info{version,trained_at} 1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, values
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay.contracts import MessageReport, Outcome
from relay.verdict import Action, FactRead, Mode, Tier, Verdict

log = logging.getLogger("relay.ops.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

OUTCOMES = tuple(o.value for o in Outcome)
DELIVERY_RESULTS = ("ok", "temporary", "permanent", "none")
STAGES = ("decide", "stamp", "act")
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx")
TIERS = (*(t.label for t in Tier), "none")
# Authentication results come from the ``auth_results`` fact (every method at once) when
# the policy computed it, else from the single-method views it read. Values outside
# AUTH_RESULTS count as "other"; a fact that failed to compute (DNS timeout, parse error)
# counts as "error".
AUTH_OBJECT = "auth_results"
AUTH_METHODS = ("spf", "dkim", "dmarc", "arc")
AUTH_FACTS = {"spf": "spf", "dkim_result": "dkim", "dmarc": "dmarc", "arc": "arc"}
AUTH_RESULTS = (
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "policy",
    "temperror",
    "permerror",
    "error",
    "other",
)
PROBABILITY_FACT = "spam_probability"
OTHER = "other"
MAX_NAME_LENGTH = 64

# Seconds. Mail takes from a millisecond (no facts) to tens of seconds (DNS timeouts,
# slow downstream); the buckets follow that span so p50 and p99 are both readable.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def multiprocess_dir() -> Path | None:
    """The multiprocess directory when this process runs in multiprocess mode."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def _values_are_mmapped() -> bool:
    return values.ValueClass is not values.MutexValue


def prepare_multiprocess_dir(path: Path) -> Path:
    """Supervisor, before starting workers: make ``path`` a fresh, empty directory and set
    PROMETHEUS_MULTIPROC_DIR for the workers (children inherit the environment).

    Files left by a previous run would add old counts to this run's, so the directory is
    emptied. Only a directory whose files all look like prometheus_client's ``*.db``
    files is removed, so a mistyped path cannot wipe anything else.
    """
    path = path.resolve()
    if path.exists():
        stray = [p.name for p in path.iterdir() if not (p.is_file() and p.suffix == ".db")]
        if stray:
            raise RuntimeError(
                f"{path} holds files other than metrics *.db files "
                f"({', '.join(sorted(stray)[:3])}); refusing to empty it"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o750)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def worker_exited(pid: int) -> None:
    """Supervisor, when a worker process ends: drop its live gauges (counters stay)."""
    directory = multiprocess_dir()
    if directory is not None:
        prom_multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What the endpoint exposes: every worker's files in multiprocess mode, else ``registry``."""
    directory = multiprocess_dir()
    if directory is None:
        return registry
    aggregate = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(aggregate, path=str(directory))  # type: ignore[no-untyped-call]
    return aggregate


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
        self._multiprocess = multiprocess_dir() is not None
        if self._multiprocess and not _values_are_mmapped():
            raise RuntimeError(
                f"{MULTIPROC_ENV} is set but prometheus_client was imported before it was: "
                "this worker's metrics would be invisible. Set it before importing "
                "prometheus_client (relay.metrics.prepare_multiprocess_dir in the supervisor) "
                "and start workers with the 'spawn' or 'forkserver' method."
            )
        r = registry
        self._lock = threading.Lock()  # scrapes flush from a thread
        self._pending: dict[Any, float] = {}  # counter child -> increments not yet added
        registry.register(_FlushFirst(self))
        self.messages = Counter(
            "relay_messages",
            "Messages decided, by action and policy mode",
            ["action", "mode"],
            registry=r,
        )
        self.outcomes = Counter(
            "relay_message_outcomes",
            "Finished messages by what happened to them",
            ["outcome"],
            registry=r,
        )
        self.rule_hits = Counter(
            "relay_rule_hits", "Policy rules that fired, by rule", ["rule"], registry=r
        )
        self.auth = Counter(
            "relay_auth_results",
            "Authentication results read by the policy, by method and result",
            ["method", "result"],
            registry=r,
        )
        self.probability = Histogram(
            "relay_classifier_spam_probability",
            "Classifier spam probability of messages whose policy read it",
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "relay_stage_duration_seconds",
            "Time per pipeline stage (decide: facts and policy; stamp: headers; "
            "act: downstream delivery or quarantine)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.message_seconds = Histogram(
            "relay_message_duration_seconds",
            "End-of-DATA to reply, per message",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "relay_downstream_deliveries",
            "Downstream delivery attempts by result (none: not delivered by policy)",
            ["result"],
            registry=r,
        )
        self.connections_open = Gauge(
            "relay_connections_open",
            "SMTP connections currently open",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Counter("relay_connections", "SMTP connections accepted", registry=r)
        self.connections_refused = Counter(
            "relay_connections_refused",
            "SMTP connections refused (connection limit or shutting down)",
            registry=r,
        )
        self.replies = Counter(
            "relay_smtp_replies", "SMTP replies sent, by code class", ["class"], registry=r
        )
        self.reloads = Counter(
            "relay_policy_reloads",
            "Policy reloads by result (failed: the previous policy kept running)",
            ["result"],
            registry=r,
        )
        self.reload_ok = Gauge(
            "relay_policy_last_reload_success",
            "1 if the last policy (re)load succeeded in every worker, else 0",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.reload_time = Gauge(
            "relay_policy_last_reload_timestamp_seconds",
            "Unix time of the last policy reload attempt",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tiers = Counter(
            "relay_message_tier",
            "Messages by the highest privacy tier the policy read (T0..T3, none)",
            ["tier"],
            registry=r,
        )
        self.shadow = Counter(
            "relay_shadow_verdicts",
            "Verdicts of regimes evaluated in shadow, by policy and action",
            ["policy", "action"],
            registry=r,
        )
        self.errors = Counter(
            "relay_observer_errors",
            "Observations dropped because of a bug in the metrics code",
            registry=r,
        )
        self._model_info: Info | None = None
        self._model_gauge: Gauge | None = None
        if self._multiprocess:
            self._model_gauge = Gauge(
                "relay_model_info",
                "Classifier model in use",
                ["version", "trained_at"],
                registry=r,
                multiprocess_mode="livemax",
            )
        else:
            self._model_info = Info("relay_model", "Classifier model in use", registry=r)
        self._model_labels: tuple[str, str] | None = None

        # Pre-bound children: observing a message is dict lookups and additions.
        self._messages = {
            (a, m): self.messages.labels(a.value, m.value) for a in Action for m in Mode
        }
        self._outcomes = {o: self.outcomes.labels(o) for o in (*OUTCOMES, OTHER)}
        self._deliveries = {d: self.deliveries.labels(d) for d in (*DELIVERY_RESULTS, OTHER)}
        self._stages = {s: self.stage_seconds.labels(s) for s in (*STAGES, OTHER)}
        self._replies = {c: self.replies.labels(c) for c in (*CODE_CLASSES, OTHER)}
        self._tiers: dict[Tier | None, Any] = {t: self.tiers.labels(t.label) for t in Tier}
        self._tiers[None] = self.tiers.labels("none")
        self._auth = {
            (m, res): self.auth.labels(m, res) for m in AUTH_METHODS for res in AUTH_RESULTS
        }
        self._reloads = {ok: self.reloads.labels("ok" if ok else "failed") for ok in (True, False)}
        self._connections = self.connections
        self._refused = self.connections_refused
        self._rules = _Capped(self.rule_hits, max_names)
        self._shadow: dict[tuple[str, Action], Any] = {}
        self._max_names = max_names
        self.reload_ok.set(1)  # start-up only continues with a valid policy

    # Observer protocol -------------------------------------------------------------

    def connection_opened(self) -> None:
        try:
            self._add(self._connections)
            self.connections_open.inc()
        except Exception:
            self._failed("connection_opened")

    def connection_closed(self) -> None:
        try:
            self.connections_open.dec()
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
                child = self._shadow[key] = self.shadow.labels(policy, verdict.action.value)
            self._add(child)
        except Exception:
            self._failed("shadow_verdict")

    def policy_reload(self, ok: bool) -> None:
        try:
            self._add(self._reloads[ok])
            self.reload_ok.set(1 if ok else 0)
            self.reload_time.set_to_current_time()
        except Exception:
            self._failed("policy_reload")

    # Not part of the Observer protocol -----------------------------------------------

    def set_model_info(self, info: Mapping[str, Any]) -> None:
        """Records the loaded model's card (``version``, ``trained_at``; others ignored)."""
        try:
            labels = (
                str(info.get("version", ""))[:MAX_NAME_LENGTH],
                str(info.get("trained_at", ""))[:MAX_NAME_LENGTH],
            )
            if self._model_info is not None:
                self._model_info.info({"version": labels[0], "trained_at": labels[1]})
            elif self._model_gauge is not None:
                if self._model_labels is not None and self._model_labels != labels:
                    self._model_gauge.labels(*self._model_labels).set(0)
                self._model_gauge.labels(*labels).set(1)
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
                    self.probability.observe(float(value))
        if whole is not None:  # every method once, whichever views the policy read
            results = whole.value if isinstance(whole.value, Mapping) else {}
            for method in AUTH_METHODS:
                counted.append(self._auth[(method, _auth_result(results.get(method), whole.error))])
        else:
            for method, read in views:
                counted.append(self._auth[(method, _auth_result(read.value, read.error))])
        for stage, seconds in report.timings:
            if stage == "total":
                self.message_seconds.observe(seconds)
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

        async def tick() -> None:
            while True:
                await asyncio.sleep(every)
                self.flush()

        task = asyncio.get_running_loop().create_task(tick())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.flush()

    def _add(self, child: Any) -> None:
        with self._lock:
            self._pending[child] = self._pending.get(child, 0.0) + 1.0

    def _failed(self, what: str) -> None:
        log.debug("metrics observation %s failed", what, exc_info=True)
        try:
            self.errors.inc()
        except Exception:  # the error counter itself failed; nothing more we can do
            log.debug("metrics error counter failed", exc_info=True)
