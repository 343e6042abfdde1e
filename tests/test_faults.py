"""Fact failures made visible (issue 19 item 5): the kind of a failure, the sink Facts
tells, the once-a-minute log limiter, the counter, the degraded answer of /readyz and
its end (quiet time, or the state store answering a probe). Clocks are injected: nothing
here sleeps."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from publicsuffixlist import PublicSuffixList

from relay.contracts import Outcome
from relay.dns import DnsTemporaryError
from relay.errors import (
    FactError,
    ModelError,
    StateError,
    WorkerBusy,
    WorkerDied,
    WorkerTimeout,
)
from relay.facts import Facts, FactSpec, FactType, Services
from relay.facts.base import FactContext, FactRegistry, FailureKind, failure_kind
from relay.facts.services import CLASSIFIER, STATE
from relay.message import Envelope, Message, Peer
from relay.ops.faults import ErrorWatch, FactFaults, LogLimiter, describe, fact_error_totals
from relay.ops.http import Health, start_metrics_server
from relay.ops.metrics import Metrics
from relay.ops.readiness import RelayReadiness
from relay.pipeline.recorder import Record, Recorder
from relay.policy.holder import DeciderHolder
from relay.secretkey import SecretKey
from relay.state import StateStore
from relay.verdict import ACCEPT_ALL, Tier
from tests.support.relay import make_settings
from tests.test_metrics_http import LOOPBACK, get, http


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def message() -> Message:
    return Message(
        b"Subject: x\r\n\r\nbody\r\n",
        Envelope("a@sender.test", ("b@example.org",)),
        Peer("192.0.2.7", helo="mx.sender.test"),
        received_at=1_795_000_000.0,
    )


def wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` raised ``from cause``, as a fact does."""
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


# --- the kind of a failure --------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (StateError("redis state: Connection refused"), FailureKind.STATE),
        (wrapped(FactError("bulk: store"), StateError("redis")), FailureKind.STATE),
        (wrapped(RuntimeError("x"), StateError("sqlite locked")), FailureKind.STATE),
        (DnsTemporaryError("DNS timeout for x/A"), FailureKind.DNS),
        (wrapped(DnsTemporaryError("DNS timeout"), TimeoutError()), FailureKind.DNS),
        (TimeoutError(), FailureKind.TIMEOUT),
        (WorkerTimeout("no answer"), FailureKind.TIMEOUT),
        (ModelError("model gone"), FailureKind.MODEL),
        (BrokenProcessPool("pool died"), FailureKind.MODEL),
        (ValueError("a bug"), FailureKind.OTHER),
        (WorkerDied("child exited"), FailureKind.WORKER),
        # A child that died under a fact was read as "missing" before, so a policy that
        # required the fact did not defer: it is a failure of the children.
        (wrapped(FactError("dkim: verification failed"), WorkerDied("x")), FailureKind.WORKER),
        (wrapped(FactError("dkim: verification failed"), WorkerBusy("full")), FailureKind.WORKER),
        (wrapped(ModelError("classifier"), WorkerDied("x")), FailureKind.MODEL),
        # raised on purpose, nothing failed: the fact is missing, not failing
        (FactError("no sender domain"), None),
        (wrapped(FactError("client address is not an IP"), ValueError("x")), None),
    ],
)
def test_failure_kind_from_the_exception_chain(
    error: BaseException, kind: FailureKind | None
) -> None:
    assert failure_kind(error) is kind


def test_an_unknown_failure_of_a_classifier_fact_is_the_models() -> None:
    assert failure_kind(ValueError("worker said no"), (CLASSIFIER,)) is FailureKind.MODEL
    assert failure_kind(FactError("no text"), (CLASSIFIER,)) is None  # still merely missing
    assert failure_kind(StateError("x"), (CLASSIFIER,)) is FailureKind.STATE


def test_a_cyclic_chain_ends() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert failure_kind(a) is FailureKind.OTHER
    assert describe(a) == "ValueError <- ValueError"


def test_describe_keeps_state_texts_and_drops_others() -> None:
    error = wrapped(DnsTemporaryError("DNS timeout for 7.2.0.192.zen.test/A"), TimeoutError())
    assert describe(error) == "DnsTemporaryError <- TimeoutError"
    state = wrapped(FactError("alice@example.org"), StateError("redis state: refused"))
    assert describe(state) == "FactError <- StateError: redis state: refused"


# --- Facts tells its sink, once per failing fact -----------------------------------------


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, FailureKind]] = []

    def fact_failed(self, name: str, kind: FailureKind, error: BaseException) -> None:
        self.calls.append((name, kind))


async def _store_down(ctx: FactContext) -> int:
    raise StateError("redis state: Error 111 connecting to 127.0.0.1:1. Connection refused.")


async def _reads_count(ctx: FactContext) -> int:
    return int(await ctx.get("count")) + 1


async def _missing(ctx: FactContext) -> str:
    raise FactError("no sender domain")


async def _bug(ctx: FactContext) -> str:
    raise KeyError("oops")


REGISTRY = FactRegistry(
    [
        FactSpec("count", FactType.INT, Tier.FINGERPRINT, _store_down, needs=(STATE,)),
        FactSpec("derived", FactType.INT, Tier.FINGERPRINT, _reads_count, depends=("count",)),
        FactSpec("sender", FactType.STR, Tier.ENVELOPE, _missing),
        FactSpec("buggy", FactType.STR, Tier.ENVELOPE, _bug),
    ]
)


async def test_facts_report_failures_once_under_the_fact_that_met_them() -> None:
    sink = Sink()
    facts = Facts(REGISTRY, message(), Services(), failures=sink)
    for name in ("derived", "count", "derived", "sender", "buggy", "buggy"):
        with pytest.raises(FactError):
            await facts.get(name)
    # derived failed only because count did: one outage, one count; sender is missing
    assert sink.calls == [("count", FailureKind.STATE), ("buggy", FailureKind.OTHER)]
    reads = {r.name: r.error for r in facts.reads()}
    assert reads["derived"] and reads["count"] and reads["sender"] == "no sender domain"


async def test_a_broken_sink_costs_nothing() -> None:
    class Broken:
        def fact_failed(self, name: str, kind: FailureKind, error: BaseException) -> None:
            raise RuntimeError("sink bug")

    facts = Facts(REGISTRY, message(), Services(), failures=Broken())
    with pytest.raises(FactError, match="Connection refused"):
        await facts.get("count")


# --- the log limiter and the sink --------------------------------------------------------


def test_log_limiter_allows_one_per_key_per_minute_and_counts_the_rest() -> None:
    clock = Clock()
    limiter = LogLimiter(60.0, clock)
    assert limiter.allow(("bulk_count", "state")) == 0
    assert limiter.allow(("bulk_count", "state")) is None
    assert limiter.allow(("bulk_count", "dns")) == 0  # another kind: its own minute
    assert limiter.allow(("known_correspondent", "state")) == 0
    clock.now += 59.9
    assert limiter.allow(("bulk_count", "state")) is None
    clock.now += 0.1
    assert limiter.allow(("bulk_count", "state")) == 2  # two held back since the last line
    assert limiter.allow(("bulk_count", "state")) is None
    clock.now += 120
    assert limiter.allow(("bulk_count", "state")) == 1


def test_fact_faults_count_every_failure_and_log_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    counted: list[tuple[str, str]] = []
    faults = FactFaults(quiet=120.0, count=lambda f, k: counted.append((f, k)), clock=clock)
    error = wrapped(FactError("for bob@example.org"), StateError("redis state: refused"))
    with caplog.at_level(logging.WARNING, logger="relay.facts"):
        for _ in range(500):  # an outage at full speed
            faults.fact_failed("bulk_count", FailureKind.STATE, error)
        clock.now += 61
        faults.fact_failed("bulk_count", FailureKind.STATE, error)
    assert len(counted) == 501 and set(counted) == {("bulk_count", "state")}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "fact bulk_count failed (state)" in lines[0] and "redis state: refused" in lines[0]
    assert "499 more failures" in lines[1]
    assert all("bob@example.org" not in line for line in lines)  # never an address


def test_degraded_lists_recent_failures_until_the_quiet_time_passes() -> None:
    clock = Clock()
    faults = FactFaults(quiet=120.0, clock=clock)
    assert faults.degraded() == {}
    faults.fact_failed("bulk_count", FailureKind.STATE, StateError("x"))
    clock.now += 30
    faults.fact_failed("dnsbl_listed", FailureKind.DNS, DnsTemporaryError("x"))
    faults.fact_failed("known_correspondent", FailureKind.STATE, StateError("x"))
    assert faults.degraded() == {
        "dns": ["dnsbl_listed"],
        "state": ["bulk_count", "known_correspondent"],
    }
    clock.now += 100  # bulk_count quiet for 130 s, the others for 100 s
    assert faults.degraded() == {"dns": ["dnsbl_listed"], "state": ["known_correspondent"]}
    clock.now += 20
    assert faults.degraded() == {}


def test_a_probe_clears_only_failures_before_it_started() -> None:
    clock = Clock()
    faults = FactFaults(quiet=120.0, clock=clock)
    faults.fact_failed("bulk_count", FailureKind.STATE, StateError("x"))
    faults.fact_failed("dnsbl_listed", FailureKind.DNS, DnsTemporaryError("x"))
    started = clock.now + 1
    clock.now += 2
    faults.fact_failed("known_correspondent", FailureKind.STATE, StateError("x"))
    faults.clear(FailureKind.STATE, before=started)
    assert faults.degraded() == {"dns": ["dnsbl_listed"], "state": ["known_correspondent"]}


def test_error_watch_degrades_while_counters_grow() -> None:
    clock = Clock()
    watch = ErrorWatch(quiet=60.0, clock=clock)
    assert watch.update({}) == {}
    assert watch.update({("state", "bulk_count"): 3.0}) == {"state": ["bulk_count"]}
    clock.now += 59
    assert watch.update({("state", "bulk_count"): 3.0}) == {"state": ["bulk_count"]}
    clock.now += 2  # no growth for 61 s
    assert watch.update({("state", "bulk_count"): 3.0}) == {}
    assert watch.update({("state", "bulk_count"): 4.0}) == {"state": ["bulk_count"]}


def test_the_counter_and_its_totals() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_names=2)
    for _ in range(3):
        metrics.fact_failed("bulk_count", "state")
    metrics.fact_failed("known_correspondent", "state")
    metrics.fact_failed("x" * 100, "state")  # over the name length: other
    metrics.fact_failed("dnsbl_listed", "made-up kind")  # over max_names, unknown kind
    value = registry.get_sample_value
    assert value("relay_fact_errors_total", {"fact": "bulk_count", "kind": "state"}) == 3
    assert value("relay_fact_errors_total", {"fact": "other", "kind": "state"}) == 1
    assert value("relay_fact_errors_total", {"fact": "other", "kind": "other"}) == 1
    assert fact_error_totals(registry) == {
        ("state", "bulk_count"): 3.0,
        ("state", "known_correspondent"): 1.0,
        ("state", "other"): 1.0,
        ("other", "other"): 1.0,
    }


# --- /readyz -----------------------------------------------------------------------------


class FakeStore(StateStore):
    def __init__(self) -> None:
        super().__init__(SecretKey(bytes(32)))
        self.up = False
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if not self.up:
            raise StateError("redis state: refused")


async def test_readyz_is_200_degraded_and_clears_when_the_store_answers(tmp_path: Path) -> None:
    clock = Clock()
    store = FakeStore()
    faults = FactFaults(quiet=120.0, clock=clock)
    readiness = RelayReadiness(
        make_settings(tmp_path), DeciderHolder(), services=Services(state=store), faults=faults
    )
    readiness.state_probe._ttl = 0.0  # every request probes (the cache has its own test)
    readiness.server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    server = await start_metrics_server(LOOPBACK, CollectorRegistry(), readiness)
    try:
        faults.fact_failed("bulk_count", FailureKind.STATE, StateError("down"))
        status, _, body = await http(server.port, get("/readyz"))
        assert status == 200  # mail flows: load balancers keep sending
        doc = json.loads(body)
        assert doc["ready"] is True and doc["status"] == "degraded"
        assert doc["degraded"] == {"state": ["bulk_count"]}
        assert store.pings == 1

        store.up = True
        clock.now += 1
        status, _, body = await http(server.port, get("/readyz"))
        assert (status, json.loads(body)["status"]) == (200, "ok")
        assert json.loads(body)["degraded"] == {}
    finally:
        await server.close()
        readiness.server.close()


async def test_readyz_unready_wins_over_degraded() -> None:
    def answer() -> Health:
        return Health({"listening": False}, {"dns": ["dnsbl_listed"]})

    server = await start_metrics_server(LOOPBACK, CollectorRegistry(), answer)
    try:
        status, _, body = await http(server.port, get("/readyz"))
    finally:
        await server.close()
    assert status == 503
    doc = json.loads(body)
    assert doc["status"] == "unready" and doc["degraded"] == {"dns": ["dnsbl_listed"]}


async def test_relay_started_with_state_down_is_degraded_from_the_start(
    tmp_path: Path,
) -> None:
    """The relay's start-up check (app._check_state) marks it degraded without a message."""
    from relay.app import _check_state

    clock = Clock()
    faults = FactFaults(quiet=120.0, clock=clock)
    await _check_state(Services(state=FakeStore()), faults)
    assert faults.degraded() == {"state": ["state_backend"]}


async def test_recorder_logs_a_failing_record_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage fails every message's writes alike: one line per record kind, not one
    per message (the limiter's clock is real here: the messages come within a second)."""

    class DeadState:
        def hashed(self, text: str) -> str:
            return text

        async def incr_window_many(self, *args: object, **kwargs: object) -> int:
            raise StateError("redis://127.0.0.1:1: connection refused")

    recorder = Recorder(DeadState(), PublicSuffixList(), ())  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="relay")
    for i in range(50):
        message = Message(
            raw=b"From: a@b.test\r\n\r\nbody\r\n",
            envelope=Envelope("a@b.test", ("c@example.org",)),
            peer=Peer("192.0.2.1"),
            received_at=1_000_000.0 + i,
        )
        await recorder.record(message, None, ACCEPT_ALL, Outcome.DELIVERED, {Record.VOLUME})  # type: ignore[arg-type]
    lines = [r for r in caplog.records if "record=volume failed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
