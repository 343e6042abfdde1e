"""A real Prometheus scrapes the real relay: every dashboard and alert expression parses
and evaluates, the main ones return data from real mail, and an alert fires end to end."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from relay.config import MetricsSettings
from relay.contracts import MessageReport, Outcome
from relay.ops.http import MetricsServer, start_metrics_server
from relay.ops.metrics import Metrics
from relay.reply import Reply
from relay.verdict import Action, FactRead, RuleHit, Tier, Verdict
from tests.support.prometheus import Prometheus, prometheus_binary, running_prometheus
from tests.support.relay import make_settings, running_relay, send, simple_message, sink_server

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "relay-dashboard.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        prometheus_binary() is None,
        reason="prometheus is not installed (make system-deps installs the Debian package)",
    ),
]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    return [concrete(e) for e in exprs]


def concrete(expr: str) -> str:
    """What Grafana sends: variables replaced (All instances, a 1 s scrape's rate window)."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


@dataclass
class Stack:
    prom: Prometheus
    metrics: Metrics
    server: MetricsServer

    async def query(self, expr: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.prom.query, expr)

    async def scalar(self, expr: str) -> float:
        result = await self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    async def wait(self, what: str, predicate: object, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self.prom.wait, predicate, timeout, what)


def classified_report(probability: float) -> MessageReport:
    """What a policy with authentication and the classifier produces (the test relay runs
    without DNS and model, so these families are fed directly)."""
    verdict = Verdict(
        action=Action.TAG,
        policy="default",
        hits=(RuleHit("spf_softfail", 1.0), RuleHit("classifier_spam", 5.0)),
        facts=(
            FactRead("spf", Tier.ENVELOPE, "softfail"),
            FactRead("dkim_result", Tier.ENVELOPE, "pass"),
            FactRead("dmarc", Tier.ENVELOPE, "fail"),
            FactRead("spam_probability", Tier.CONTENT, probability),
        ),
        highest_tier=Tier.CONTENT,
    )
    return MessageReport(
        queue_id="synthetic",
        size=1,
        recipients=1,
        verdict=verdict,
        reply=Reply(250, "2.0.0", "ok"),
        outcome=Outcome.DELIVERED,
        timings=(("decide", 0.01), ("act", 0.01), ("total", 0.03)),
        delivery="ok",
    )


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_model_info({"version": "test-1", "trained_at": "2026-11-20T00:00:00Z"})
    server = await start_metrics_server(MetricsSettings(listen=("127.0.0.1", 0)), registry)
    try:
        async with sink_server() as sink:
            settings = make_settings(
                tmp_path / "relay", {"delivery": {"mode": "smtp", "downstream": sink.address}}
            )
            async with running_relay(settings, observer=metrics) as relay:
                with running_prometheus(
                    tmp_path / "prometheus",
                    [f"127.0.0.1:{server.port}"],
                    rule_files=[ALERTS],
                ) as prom:
                    s = Stack(prom, metrics, server)
                    await s.wait("target up", prom.targets_up)
                    # mail after the first scrape, so rates and quantiles have two points
                    for i in range(6):
                        await send(relay.port, ["bob@example.org"], simple_message(f"p{i}"))
                        metrics.message_done(classified_report(0.1 + i * 0.15))
                    await s.wait(
                        "mail counted",
                        lambda: prom.query(
                            'sum(rate(relay_message_outcomes_total{outcome="delivered"}[1m])) > 0'
                        ),
                    )
                    yield s
    finally:
        await server.close()


async def test_dashboard_and_alert_expressions_parse_and_evaluate(stack: Stack) -> None:
    for expr in dashboard_exprs():
        await stack.query(expr)  # raises PromQLError (bad_data) if it does not parse

    def evaluated() -> bool:
        rules = stack.prom.rules()
        return bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)

    await stack.wait("rules evaluated", evaluated)
    rules = await asyncio.to_thread(stack.prom.rules)
    assert {r["name"] for r in rules} >= {"RelayMailStopped", "RelayLatencyP99High"}
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        await stack.query(rule["query"])


async def test_main_panels_return_data_from_real_mail(stack: Stack) -> None:
    by_outcome = await stack.query(
        concrete(
            'sum by (outcome) (rate(relay_message_outcomes_total{instance=~"$instance"}'
            "[$__rate_interval]))"
        )
    )
    rates = {r["metric"]["outcome"]: float(r["value"][1]) for r in by_outcome}
    assert rates["delivered"] > 0

    p99 = await stack.scalar(
        concrete(
            "histogram_quantile(0.99, sum by (le) (rate(relay_message_duration_seconds_bucket"
            '{instance=~"$instance"}[$__rate_interval])))'
        )
    )
    assert math.isfinite(p99) and 0 < p99 < 10

    stages = await stack.query(
        "histogram_quantile(0.5, sum by (stage, le) "
        "(rate(relay_stage_duration_seconds_bucket[1m])))"
    )
    assert {r["metric"]["stage"] for r in stages} >= {"decide", "act"}

    ok = await stack.scalar('sum(rate(relay_downstream_deliveries_total{result="ok"}[1m]))')
    assert ok > 0
    assert await stack.scalar('sum(rate(relay_smtp_replies_total{class="2xx"}[1m]))') > 0
    assert await stack.scalar("sum(relay_connections_open)") == 0
    assert await stack.scalar("min(relay_policy_last_reload_success)") == 1
    model = await stack.query("relay_model_info")
    assert model[0]["metric"]["version"] == "test-1"
    drift = await stack.scalar(
        "sum(rate(relay_classifier_spam_probability_sum[1h]))"
        " / sum(rate(relay_classifier_spam_probability_count[1h]))"
    )
    assert 0.1 < drift < 1
    temperr = await stack.query(
        'sum by (method) (rate(relay_auth_results_total{result=~"temperror|error"}[1m]))'
        " / sum by (method) (rate(relay_auth_results_total[1m]))"
    )
    assert {r["metric"]["method"] for r in temperr} >= {"spf", "dkim", "dmarc"}


async def test_policy_reload_failure_fires_its_alert(stack: Stack) -> None:
    stack.metrics.policy_reload(False)

    def firing() -> bool:
        return any(
            a["labels"]["alertname"] == "RelayPolicyReloadFailed" and a["state"] == "firing"
            for a in stack.prom.alerts()
        )

    await stack.wait("RelayPolicyReloadFailed firing", firing)
    stack.metrics.policy_reload(True)
    await stack.wait("alert resolved", lambda: not firing())
