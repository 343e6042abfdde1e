"""Smoke run of the throughput bench: the pass-through and the relay in quick mode, with
Postfix's smtp-source and smtp-sink for real, every message counted at the sink."""

from __future__ import annotations

import json
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
