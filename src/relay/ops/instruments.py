"""Every Prometheus metric of the relay, defined once: names, help texts, labels and
buckets, and the small fixed label sets the observer may use.

Label values come only from those sets (actions, modes, tiers, code classes, stages) or
from names in configuration files (rules, shadow policies), which the observer caps; never
from addresses, domains or message ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from relay.contracts import Outcome
from relay.verdict import FailureKind, Tier

OUTCOMES = tuple(o.value for o in Outcome)
DELIVERY_RESULTS = ("ok", "temporary", "permanent", "none")
STAGES = ("decide", "stamp", "act", "record")
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx")
TIERS = (*(t.label for t in Tier), "none")
AUTH_METHODS = ("spf", "dkim", "dmarc", "arc")
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
FAILURE_KINDS = tuple(k.value for k in FailureKind)
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
# Seconds a loop callback started late (ops/looplag.py): issue 17's bar is a p99 of 5 ms,
# and anything past 100 ms is a stall every client feels.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Instruments:
    """The relay's metrics, registered into ``registry`` (never the global default).

    In multiprocess mode the model info is a gauge (``model_gauge``), since Info metrics
    do not work there; otherwise an Info (``model_info``).
    """

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool) -> None:
        r = registry
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
            "act: downstream delivery or quarantine; record: shared-state writes)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "relay_event_loop_lag_seconds",
            "How late a timer on the event loop fired (sampled 4 times a second): CPU work "
            "or a blocking call on the loop delays every session of the process by this much",
            buckets=LOOP_LAG_BUCKETS,
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
        # fact: a name from the fact registry (fixed at start-up, a few dozen); kind: the
        # closed FailureKind set. Children appear as facts first fail.
        self.fact_errors = Counter(
            "relay_fact_errors",
            "Fact computations that failed (not merely missing), by fact and kind "
            "(state, dns, model, timeout, worker, other)",
            ["fact", "kind"],
            registry=r,
        )
        self.model_reloads = Counter(
            "relay_model_reloads",
            "Model reloads that switched the model (ok) or kept the old one (failed)",
            ["result"],
            registry=r,
        )
        # Read from the model registry on disk at start and on reload (the updates are made
        # by `relay model update` in another process), so gauges: they survive restarts.
        self.model_updates = Gauge(
            "relay_model_updates",
            "Model versions made by `relay model update`, by status",
            ["status"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_refusals = Gauge(
            "relay_model_promotions_refused",
            "Promotions refused: candidates failing their gate and refused promote attempts",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_feedback = Gauge(
            "relay_model_feedback_entries",
            "Feedback entries the model in force was updated from, by label",
            ["label"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_info: Info | None = None
        self.model_gauge: Gauge | None = None
        if multiprocess:
            self.model_gauge = Gauge(
                "relay_model_info",
                "Classifier model in use",
                ["version", "trained_at"],
                registry=r,
                multiprocess_mode="livemax",
            )
        else:
            self.model_info = Info("relay_model", "Classifier model in use", registry=r)
