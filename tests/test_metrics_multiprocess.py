"""Several worker processes: one scrape sees them all, and counters survive a restart.

Workers are real child processes started the way the supervisor must start them: with
PROMETHEUS_MULTIPROC_DIR already in their environment when they import prometheus_client.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay.config import MetricsSettings
from relay.ops.http import start_metrics_server
from relay.ops.metrics import Metrics
from relay.ops.multiprocess import (
    MULTIPROC_ENV,
    prepare_multiprocess_dir,
    scrape_registry,
    worker_exited,
)

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import os
import sys
from prometheus_client import CollectorRegistry
from relay.ops.metrics import Metrics
from relay.contracts import MessageReport, Outcome
from relay.reply import Reply
from relay.verdict import Action, RuleHit, Verdict

m = Metrics(CollectorRegistry())
m.set_model_info({"version": "v1", "trained_at": "2026-11-20"})
for _ in range(int(sys.argv[1])):
    m.connection_opened()
    m.message_done(MessageReport(
        queue_id="Q", size=10, recipients=1,
        verdict=Verdict(action=Action.TAG, hits=(RuleHit("bulk", 2.0),)),
        reply=Reply(250, "2.0.0", "ok"), outcome=Outcome.DELIVERED,
        timings=(("act", 0.01), ("total", 0.02)), delivery="ok",
    ))
m.flush()  # what the app's flushing() task does every second and on exit
print(os.getpid())
"""


def run_worker(directory: Path, messages: int) -> int:
    path = os.pathsep.join(filter(None, (str(REPO / "src"), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, MULTIPROC_ENV: str(directory), "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(messages)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(proc.stdout.strip())


def scrape_value(name: str, **labels: str) -> float:
    got = scrape_registry(CollectorRegistry()).get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_one_scrape_sees_every_worker_and_counters_survive_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, "unset-by-test")
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    assert os.environ[MULTIPROC_ENV] == str(directory)

    first = run_worker(directory, 3)
    second = run_worker(directory, 4)
    assert scrape_value("relay_message_outcomes_total", outcome="delivered") == 7
    assert scrape_value("relay_rule_hits_total", rule="bulk") == 7
    assert scrape_value("relay_message_duration_seconds_count") == 7
    assert scrape_value("relay_model_info", version="v1", trained_at="2026-11-20") == 1
    # both workers ended without closing their connections: the supervisor marks them dead
    assert scrape_value("relay_connections_open") == 7
    worker_exited(first)
    assert scrape_value("relay_connections_open") == 4
    worker_exited(second)
    assert scrape_value("relay_connections_open") == 0
    # a restarted worker adds to the dead ones' counts
    run_worker(directory, 2)
    assert scrape_value("relay_message_outcomes_total", outcome="delivered") == 9
    assert scrape_value("relay_connections_open") == 2


async def test_endpoint_aggregates_worker_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, "unset-by-test")
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    await asyncio.to_thread(run_worker, directory, 2)
    await asyncio.to_thread(run_worker, directory, 5)
    settings = MetricsSettings(listen=("127.0.0.1", 0))
    server = await start_metrics_server(settings, CollectorRegistry())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
    finally:
        await server.close()
    assert 'relay_message_outcomes_total{outcome="delivered"} 7.0' in body


def test_prepare_empties_old_files_and_refuses_foreign_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, "unset-by-test")
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"old")
    prepare_multiprocess_dir(directory)
    assert list(directory.iterdir()) == []
    (directory / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="refusing"):
        prepare_multiprocess_dir(directory)
    assert (directory / "notes.txt").exists()


def test_metrics_refuse_a_process_that_imported_prometheus_client_too_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # this test process imported prometheus_client without the variable: in-memory values
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="imported before"):
        Metrics(CollectorRegistry())
