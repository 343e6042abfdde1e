"""The relay as app.py builds it: metrics on, /metrics and /readyz served by the relay
itself, port conflicts, and several worker processes behind one supervisor endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from relay.app import lifespan
from relay.errors import ConfigError
from tests.support.relay import (
    free_port,
    free_ports,
    make_settings,
    send,
    simple_message,
    sink_server,
)

REPO = Path(__file__).resolve().parents[1]


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_relay_serves_its_own_metrics_and_readiness(tmp_path: Path) -> None:
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path,
            {
                "metrics": {"enabled": True, "listen": "127.0.0.1:0"},
                "delivery": {"mode": "smtp", "downstream": sink.address},
            },
        )
        async with lifespan(settings) as relay:
            assert relay.metrics is not None
            await send(relay.port, ["bob@example.org"], simple_message())
            status, body = await get(relay.metrics.port, "/metrics")
            assert status == 200
            text = body.decode()
            assert sample(text, "relay_message_outcomes_total", outcome="delivered") == 1
            assert sample(text, "relay_downstream_deliveries_total", result="ok") == 1
            status, body = await get(relay.metrics.port, "/readyz")
            assert status == 200, body
            assert json.loads(body)["checks"] == {
                "listening": True,
                "policy_loaded": True,
                "model_loaded": True,
                "downstream_reachable": True,
            }
        # the downstream is gone: the relay would answer 451 to everything
    settings_down = make_settings(
        tmp_path,
        {
            "metrics": {"enabled": True, "listen": "127.0.0.1:0"},
            "delivery": {"mode": "smtp", "downstream": f"127.0.0.1:{free_port()}"},
        },
    )
    async with lifespan(settings_down) as relay:
        assert relay.metrics is not None
        status, body = await get(relay.metrics.port, "/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["downstream_reachable"] is False


async def test_metrics_port_in_use_stops_start_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(
            tmp_path, {"metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"}}
        )
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            async with lifespan(settings):
                pass


# --- several workers: real processes, `relay serve` as an administrator runs it ----------


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[int, int, subprocess.Popen[bytes], Path]]:
    smtp_port, metrics_port = free_ports(2)
    (tmp_path / "relay.toml").write_text(
        f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
workers = 2
drain_timeout = 2
[relay]
domains = ["example.org"]
[delivery]
mode = "maildir"
maildir = "var/maildir"
[model]
enabled = false
[auth]
enabled = false
[policy]
path = ""
[metrics]
listen = "127.0.0.1:{metrics_port}"
[state]
path = "var/state.sqlite3"
"""
    )
    # This checkout's src first; what was on the path stays (under `make unit-future` that
    # is tests/future_clock, without which time.sleep fails in the relay under faketime).
    path = os.pathsep.join(filter(None, (str(REPO / "src"), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with (tmp_path / "relay.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "--config", "relay.toml"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        yield smtp_port, metrics_port, proc, tmp_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if scrape(port, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("relay did not become ready")


def delivered_by_pid(directory: Path) -> dict[int, float]:
    """Messages each worker process counted, from its own multiprocess file."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        families = MultiProcessCollector.merge([str(path)], accumulate=True)  # type: ignore[no-untyped-call]
        counts[pid] = sum(
            s.value
            for fam in families
            for s in fam.samples
            if s.name == "relay_message_outcomes_total" and s.labels.get("outcome") == "delivered"
        )
    return counts


async def delivered_reaches(port: int, expected: float, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        _, text = await asyncio.to_thread(scrape, port)
        got = sample(text, "relay_message_outcomes_total", outcome="delivered")
        if got == expected:
            return text
        assert got < expected, f"counted {got}, sent {expected}"
        assert time.monotonic() < deadline, f"counted {got}, sent {expected}"
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_one_scrape_sees_all_workers_and_survives_a_worker_restart(
    two_workers: tuple[int, int, subprocess.Popen[bytes], Path],
) -> None:
    smtp_port, metrics_port, _proc, workdir = two_workers
    await asyncio.to_thread(wait_ready, metrics_port)
    for i in range(8):  # new connection each: the kernel spreads them over both workers
        await send(smtp_port, ["bob@example.org"], simple_message(f"w{i}"))
    await delivered_reaches(metrics_port, 8)  # workers flush their counts every second

    counts = delivered_by_pid(workdir / "var" / "metrics")
    victim = max(counts, key=lambda pid: counts[pid])
    assert counts[victim] > 0
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(delivered_by_pid(workdir / "var" / "metrics")) < 3:  # a new worker wrote its file
        assert time.monotonic() < deadline, "the supervisor did not restart the worker"
        await asyncio.sleep(0.1)
    await asyncio.to_thread(wait_ready, metrics_port)
    for i in range(3):
        await send(smtp_port, ["bob@example.org"], simple_message(f"after{i}"))
    text = await delivered_reaches(metrics_port, 11)
    assert sample(text, "relay_connections_open") == 0
