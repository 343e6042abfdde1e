"""deploy/: the files an administrator installs are checked by the tools that read them
(promtool, systemd-analyze, postconf) and against the metrics the relay really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from relay.ops.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "relay-dashboard.json"
UNIT = DEPLOY / "systemd" / "relay.service"
OPERATIONS = REPO / "docs" / "operations.md"

QUESTIONS = (
    "Is mail flowing?",
    "What is being rejected, and why?",
    "Is authentication healthy?",
    "Is the classifier drifting?",
    "Is the downstream slow?",
    "Did a policy reload fail?",
)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.skip(f"{name} is not installed (make system-deps installs it)")
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_exprs() -> list[str]:
    doc = dashboard()
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    return exprs


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", (PROMETHEUS / "alerts.yml").read_text(), re.M)


def exported_names() -> set[str]:
    """Every sample name the relay exports (histogram/counter suffixes included)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names = {s.name for fam in registry.collect() for s in fam.samples}
    for fam in registry.collect():  # labelled families with no child yet still exist
        names.update({f"{fam.name}_total", f"{fam.name}_info"})
        names.update(f"{fam.name}_{sfx}" for sfx in ("bucket", "sum", "count"))
    return names


# --- Prometheus ---------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run(tool("promtool"), "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_and_a_runbook_section() -> None:
    tests = (PROMETHEUS / "alerts_test.yml").read_text()
    docs = OPERATIONS.read_text().lower()
    required = {
        "RelayMailStopped",
        "RelayRejectRateSpike",
        "RelayTempfailRateSpike",
        "RelayDownstreamErrors",
        "RelayDkimTempErrorSpike",
        "RelayPolicyReloadFailed",
        "RelayClassifierDrift",
        "RelayLatencyP99High",
    }
    assert required <= set(alert_names())
    for name in alert_names():
        assert f"alertname: {name}\n        exp_alerts:\n" in tests, f"{name} never fires in tests"
        assert f"### {name.lower()}" in docs, f"{name} has no runbook in docs/operations.md"


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = exported_names() | {"up"}
    text = (PROMETHEUS / "alerts.yml").read_text() + "\n".join(dashboard_exprs())
    used = set(re.findall(r"\b(relay_[a-z0-9_]+|up)\b(?=\s*[{\[)])", text))
    assert used, "no metric names found"
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"


# --- Grafana ------------------------------------------------------------------------------


def test_dashboard_has_one_row_per_question_and_an_instance_variable() -> None:
    doc = dashboard()
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == list(QUESTIONS)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["instance"]["includeAll"] is True
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"], panel["title"]
        for t in panel["targets"]:
            assert 'instance=~"$instance"' in t["expr"], panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, panel["title"]
        cells |= mine


def test_grafana_provisioning_points_at_a_folder() -> None:
    text = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "relay.yaml").read_text()
    assert "type: file" in text and "path:" in text


# --- systemd ------------------------------------------------------------------------------


def test_systemd_unit_is_hardened() -> None:
    text = UNIT.read_text()
    for line in (
        "User=relay",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/relay",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in text, line


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    unit = tmp_path / "relay.service"
    # verify checks that ExecStart exists; the real one is installed by the administrator
    text = UNIT.read_text().replace("/opt/relay/bin/relay", sys.executable)
    unit.write_text(text)
    result = run(analyze, "verify", str(unit))
    if "Failed to" in result.stderr and "bus" in result.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# --- Postfix ------------------------------------------------------------------------------


def postfix_blocks(doc: Path) -> dict[str, str]:
    """The main.cf and master.cf snippets of a placement guide, by file name."""
    found: dict[str, str] = {"main.cf": "", "master.cf": ""}
    text = doc.read_text()
    for match in re.finditer(
        r"`/etc/postfix/(main\.cf|master\.cf)`[^\n]*\n\n```\n(.*?)```", text, re.S
    ):
        found[match.group(1)] += match.group(2)
    return found


@pytest.mark.parametrize("guide", ["after-queue.md", "before-queue.md"])
def test_postfix_snippets_parse_without_warnings(tmp_path: Path, guide: str) -> None:
    postconf = tool("postconf")
    blocks = postfix_blocks(DEPLOY / "postfix" / guide)
    assert blocks["master.cf"], "no master.cf snippet"
    (tmp_path / "main.cf").write_text(blocks["main.cf"])
    (tmp_path / "master.cf").write_text(blocks["master.cf"])
    for flag in ("-n", "-M", "-P"):
        result = run(postconf, "-c", str(tmp_path), flag)
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr, result.stderr
    services = run(postconf, "-c", str(tmp_path), "-M").stdout
    if guide == "before-queue.md":
        assert "smtpd_proxy_filter=127.0.0.1:2525" in services
    else:
        assert "content_filter = relayfilter:[127.0.0.1]:2525" in blocks["main.cf"]
    assert "127.0.0.1:10026" in services


def test_model_update_timer_verifies_and_runs_the_timer_form(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    folder = UNIT.parent
    service = (folder / "relay-model-update.service").read_text()
    # The timer form of `relay model update` (docs/classifier.md, "On a timer").
    assert "model update --config /etc/relay/relay.toml --min-new 50 --promote --reload" in service
    for line in ("User=relay", "NoNewPrivileges=yes", "ProtectSystem=strict", "Nice=15"):
        assert line in service, line
    (tmp_path / "relay-model-update.service").write_text(
        service.replace("/opt/relay/bin/relay", sys.executable)
    )
    timer = tmp_path / "relay-model-update.timer"
    timer.write_text((folder / "relay-model-update.timer").read_text())
    result = run(analyze, "verify", str(timer), str(tmp_path / "relay-model-update.service"))
    if "Failed to" in result.stderr and "bus" in result.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
