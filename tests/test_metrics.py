"""relay.metrics: real mail through the real relay moves the counters and histograms;
hand-made reports cover what the default test relay cannot produce (rules, auth facts,
classifier probability, shadow regimes, reloads)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import pytest
from prometheus_client import CollectorRegistry

from relay.contracts import MessageReport, Outcome
from relay.ops.metrics import Metrics
from relay.reply import Reply
from relay.verdict import Action, FactRead, Mode, RuleHit, Tier, Verdict
from tests.support.relay import make_settings, running_relay, send, simple_message, sink_server


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def report(
    verdict: Verdict,
    *,
    outcome: Outcome = Outcome.DELIVERED,
    delivery: str = "ok",
    timings: tuple[tuple[str, float], ...] = (("decide", 0.002), ("act", 0.01), ("total", 0.02)),
    code: int = 250,
) -> MessageReport:
    return MessageReport(
        queue_id="Q1",
        size=100,
        recipients=1,
        verdict=verdict,
        reply=Reply(code, "2.0.0", "ok"),
        outcome=outcome,
        timings=timings,
        delivery=delivery,
    )


# --- end to end: the real relay, a real downstream ------------------------------------


async def test_real_mail_moves_message_delivery_latency_and_smtp_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path, {"delivery": {"mode": "smtp", "downstream": sink.address}}
        )
        async with running_relay(settings, observer=metrics) as relay:
            for i in range(3):
                await send(relay.port, ["bob@example.org"], simple_message(f"m{i}"))
            await until(lambda: value(registry, "relay_connections_open") == 0)
    assert len(sink.messages) == 3
    assert value(registry, "relay_messages_total", action="accept", mode="enforce") == 3
    assert value(registry, "relay_message_outcomes_total", outcome="delivered") == 3
    assert value(registry, "relay_downstream_deliveries_total", result="ok") == 3
    assert value(registry, "relay_message_duration_seconds_count") == 3
    assert value(registry, "relay_message_duration_seconds_sum") > 0
    assert value(registry, "relay_stage_duration_seconds_count", stage="act") == 3
    assert value(registry, "relay_stage_duration_seconds_count", stage="decide") == 3
    # no policy configured: nothing read, so no privacy tier
    assert value(registry, "relay_message_tier_total", tier="none") == 3
    assert value(registry, "relay_connections_total") == 3
    # greeting, EHLO, MAIL, RCPT, DATA, end of data, QUIT per connection
    assert value(registry, "relay_smtp_replies_total", **{"class": "2xx"}) >= 3 * 5
    assert value(registry, "relay_smtp_replies_total", **{"class": "4xx"}) == 0
    assert value(registry, "relay_observer_errors_total") == 0


async def test_downstream_tempfail_counts_as_failed_temporary_and_4xx(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    async with sink_server(mode="tempfail") as sink:
        settings = make_settings(
            tmp_path, {"delivery": {"mode": "smtp", "downstream": sink.address}}
        )
        async with running_relay(settings, observer=metrics) as relay:
            with pytest.raises(aiosmtplib.SMTPDataError) as err:
                await send(relay.port, ["bob@example.org"], simple_message())
            assert err.value.code == 451
    assert value(registry, "relay_message_outcomes_total", outcome="failed") == 1
    assert value(registry, "relay_downstream_deliveries_total", result="temporary") == 1
    assert value(registry, "relay_downstream_deliveries_total", result="ok") == 0
    assert value(registry, "relay_smtp_replies_total", **{"class": "4xx"}) >= 1


async def test_open_connections_gauge_follows_sessions(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    settings = make_settings(tmp_path)
    async with running_relay(settings, observer=metrics) as relay:
        clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) for _ in range(2)]
        for c in clients:
            await c.connect()
        await until(lambda: value(registry, "relay_connections_open") == 2)
        for c in clients:
            await c.quit()
        await until(lambda: value(registry, "relay_connections_open") == 0)


# --- the observer, unit by unit ---------------------------------------------------------


def test_rules_auth_probability_and_tier_from_the_verdict() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    verdict = Verdict(
        action=Action.REJECT,
        policy="strict",
        hits=(RuleHit("dmarc_reject", action=Action.REJECT), RuleHit("bulk", score=3.0)),
        facts=(
            FactRead("spf", Tier.ENVELOPE, "softfail"),
            FactRead("dkim_result", Tier.ENVELOPE, "TempError"),
            FactRead("dmarc", Tier.ENVELOPE, {"result": "fail", "policy": "reject"}),
            FactRead("arc", Tier.ENVELOPE, "bogus-value"),
            FactRead("spam_probability", Tier.CONTENT, 0.97),
            FactRead("client_ip", Tier.CONNECTION, "192.0.2.1"),
        ),
        highest_tier=Tier.CONTENT,
    )
    m.message_done(report(verdict, outcome=Outcome.REJECTED, delivery="none", code=550))
    assert value(registry, "relay_messages_total", action="reject", mode="enforce") == 1
    assert value(registry, "relay_message_outcomes_total", outcome="rejected") == 1
    assert value(registry, "relay_rule_hits_total", rule="dmarc_reject") == 1
    assert value(registry, "relay_rule_hits_total", rule="bulk") == 1
    assert value(registry, "relay_auth_results_total", method="spf", result="softfail") == 1
    assert value(registry, "relay_auth_results_total", method="dkim", result="temperror") == 1
    assert value(registry, "relay_auth_results_total", method="dmarc", result="fail") == 1
    assert value(registry, "relay_auth_results_total", method="arc", result="other") == 1
    assert value(registry, "relay_classifier_spam_probability_count") == 1
    assert value(registry, "relay_classifier_spam_probability_bucket", le="0.95") == 0
    assert value(registry, "relay_classifier_spam_probability_bucket", le="0.99") == 1
    assert value(registry, "relay_message_tier_total", tier="T3") == 1
    assert value(registry, "relay_downstream_deliveries_total", result="none") == 1
    # addresses and IPs never become label values
    exposition = "\n".join(f"{s.name}{s.labels}" for fam in registry.collect() for s in fam.samples)
    assert "192.0.2.1" not in exposition


def test_failed_fact_counts_as_error_and_missing_probability_is_not_observed() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    verdict = Verdict(
        action=Action.ACCEPT,
        facts=(
            FactRead("dkim_result", Tier.ENVELOPE, None, error="DnsTemporaryError: timeout"),
            FactRead("spam_probability", Tier.CONTENT, None, error="model not loaded"),
        ),
        highest_tier=Tier.CONTENT,
    )
    m.message_done(report(verdict))
    assert value(registry, "relay_auth_results_total", method="dkim", result="error") == 1
    assert value(registry, "relay_classifier_spam_probability_count") == 0


def test_auth_results_object_counts_every_method_once() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    whole = {
        "spf": {"result": "pass", "domain": "a.test"},
        "dkim": {"result": "temperror", "signatures": []},
        "dmarc": {"result": "none", "policy": ""},
        "arc": {"result": "none"},
    }
    verdict = Verdict(
        action=Action.ACCEPT,
        facts=(
            FactRead("auth_results", Tier.ENVELOPE, whole),
            FactRead("spf", Tier.ENVELOPE, "pass"),  # a view of the same result
        ),
    )
    m.message_done(report(verdict))
    assert value(registry, "relay_auth_results_total", method="spf", result="pass") == 1
    assert value(registry, "relay_auth_results_total", method="dkim", result="temperror") == 1
    assert value(registry, "relay_auth_results_total", method="dmarc", result="none") == 1
    assert value(registry, "relay_auth_results_total", method="arc", result="none") == 1
    failed = Verdict(
        action=Action.ACCEPT,
        facts=(FactRead("auth_results", Tier.ENVELOPE, None, error="DnsTemporaryError"),),
    )
    m.message_done(report(failed))
    assert value(registry, "relay_auth_results_total", method="dmarc", result="error") == 1


def test_shadow_mode_and_shadow_regimes() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.message_done(report(Verdict(action=Action.REJECT, mode=Mode.SHADOW)))
    m.shadow_verdict(Verdict(action=Action.REJECT, policy="itr_article7"))
    m.shadow_verdict(Verdict(action=Action.REJECT, policy="itr_article7"))
    m.shadow_verdict(Verdict(action=Action.ACCEPT, policy="can_spam"))
    assert value(registry, "relay_messages_total", action="reject", mode="shadow") == 1
    labels = {"policy": "itr_article7", "action": "reject"}
    assert value(registry, "relay_shadow_verdicts_total", **labels) == 2
    assert value(registry, "relay_shadow_verdicts_total", policy="can_spam", action="accept") == 1


def test_rule_and_policy_names_are_capped() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry, max_names=5)
    hits = (*(RuleHit(f"rule{i}") for i in range(20)), RuleHit("x" * 500))
    m.message_done(report(Verdict(action=Action.TAG, hits=hits)))
    for i in range(20):
        m.shadow_verdict(Verdict(action=Action.ACCEPT, policy=f"regime{i}"))
    rules = {
        s.labels["rule"]
        for fam in registry.collect()
        if fam.name == "relay_rule_hits"
        for s in fam.samples
        if s.name == "relay_rule_hits_total"
    }
    assert len(rules) <= 6
    assert value(registry, "relay_rule_hits_total", rule="other") == 21 - len(rules) + 1
    policies = {
        s.labels["policy"]
        for fam in registry.collect()
        if fam.name == "relay_shadow_verdicts"
        for s in fam.samples
        if s.name == "relay_shadow_verdicts_total"
    }
    assert len(policies) <= 6
    assert "other" in policies


def test_policy_reload_success_and_failure() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    assert value(registry, "relay_policy_last_reload_success") == 1
    m.policy_reload(False)
    assert value(registry, "relay_policy_reloads_total", result="failed") == 1
    assert value(registry, "relay_policy_last_reload_success") == 0
    assert value(registry, "relay_policy_last_reload_timestamp_seconds") > 1.7e9
    m.policy_reload(True)
    assert value(registry, "relay_policy_reloads_total", result="ok") == 1
    assert value(registry, "relay_policy_last_reload_success") == 1


def test_model_info_is_an_info_metric() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.set_model_info({"version": "2026.11.1", "trained_at": "2026-11-20T10:00:00Z", "x": "y"})
    labels = {"version": "2026.11.1", "trained_at": "2026-11-20T10:00:00Z"}
    assert value(registry, "relay_model_info", **labels) == 1
    types = {fam.name: fam.type for fam in registry.collect()}
    assert types["relay_model"] == "info"


def test_smtp_reply_classes_and_connection_refusals() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    for code in (220, 250, 354, 421, 451, 550, 999):
        m.smtp_reply(code)
    m.connection_refused()
    assert value(registry, "relay_smtp_replies_total", **{"class": "2xx"}) == 2
    assert value(registry, "relay_smtp_replies_total", **{"class": "3xx"}) == 1
    assert value(registry, "relay_smtp_replies_total", **{"class": "4xx"}) == 2
    assert value(registry, "relay_smtp_replies_total", **{"class": "5xx"}) == 1
    assert value(registry, "relay_smtp_replies_total", **{"class": "other"}) == 1
    assert value(registry, "relay_connections_refused_total") == 1


def test_observation_never_raises() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    bad = report(Verdict(action=Action.ACCEPT), timings=(("total", "slow"),))  # type: ignore[arg-type]
    m.message_done(bad)  # must not raise
    assert value(registry, "relay_observer_errors_total") == 1


def test_metrics_never_register_in_the_default_registry() -> None:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    Metrics(CollectorRegistry())
    assert set(REGISTRY._names_to_collectors) == before
