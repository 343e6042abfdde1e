"""Smoke run of the throughput bench: the pass-through and the relay in quick mode, with
Postfix's smtp-source and smtp-sink for real, every message counted at the sink."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench.postfix import find_tool

REPO = Path(__file__).resolve().parents[1]
MESSAGES = 200
SCENARIOS = ("passthrough-pooled", "relay-noop-w1")

pytestmark = pytest.mark.skipif(
    find_tool("smtp-sink") is None or find_tool("smtp-source") is None,
    reason="Postfix's smtp-sink/smtp-source not installed (make system-deps)",
)


def test_quick_bench_delivers_every_message(tmp_path: Path) -> None:
    args = ["--quick", "--messages", str(MESSAGES), "--high-sessions", "50"]
    args += ["--scenarios", ",".join(SCENARIOS), "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "throughput-quick.json").read_text())
    rows = {row["key"]: row for row in results["scenarios"]}
    assert set(rows) == set(SCENARIOS)
    for key in SCENARIOS:
        row = rows[key]
        assert "skipped" not in row, row.get("skipped")
        (round_1,) = row["source"]["rounds"]
        assert round_1["delivered"] == MESSAGES, (key, round_1)
        assert round_1["errors"] == {}
        for phase in ("client", "client_high"):
            stats = row[phase]
            assert stats["errors"] == {}, (key, phase, stats["errors"])
            assert stats["ok"] == stats["delivered"] == MESSAGES, (key, phase, stats)
            assert stats["p50_ms"] > 0 and stats["p99_ms"] >= stats["p50_ms"]
        assert row["client_high"]["peak_open_sessions"] == 50
        assert row["source"]["server_cpu_ms_per_msg"] > 0
        assert row["source"]["server_peak_rss_mb"] > 0
    assert rows["relay-noop-w1"]["smtp_processes"] == 1
    (ratio,) = [c for c in results["comparisons"] if c["numerator"] == "relay-noop-w1"]
    assert ratio["ratio_source"] > 0
    assert (tmp_path / "throughput-quick.md").read_text().startswith("# Relay throughput")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_scaleout_two_instances_share_one_redis(tmp_path: Path) -> None:
    """bench.scaleout without the model (starts in a second): both configurations deliver
    every message, Redis saw commands, and both instances wrote one connection key."""
    out = tmp_path / "scaleout.json"
    args = ["--no-model", "--messages", "20", "--rounds", "1", "--warmup", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.scaleout", *args, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["configs"]) == {"one", "two"}
    for key in ("one", "two"):
        (round_1,) = results["configs"][key]["rounds"]
        assert round_1["delivered"] == 20 and round_1["errors"] == {}, (key, round_1)
        assert round_1["redis_commands_per_msg"] > 0  # state really went through Redis
        assert round_1["relay_cpu_ms_per_msg"] > 0
    assert results["configs"]["two"]["rounds"][0]["instances"] == ["a", "b"]
    assert results["ratios"]["msgs_per_s_two_over_one"] > 0
    shared = results["shared_state"]
    assert shared["dbsize"] > 0 and shared["state_shared"] is True, shared
    assert shared["two_instance_phases"] == [{"delivered": 20, "connections_in_one_key": 20}]
    # each instance decided its warm-up, its share of the 2-instance phase, and one of
    # them the whole 1-instance phase
    decided = sorted(i["messages_decided"] for i in results["instances"].values())
    assert decided == [20, 40]
    assert out.with_suffix(".md").read_text().startswith("# Scale-out")
