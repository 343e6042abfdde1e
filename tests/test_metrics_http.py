"""relay.metrics_http: the endpoint over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from relay.config import MetricsSettings
from relay.errors import ConfigError
from relay.ops.http import MetricsServer, Readiness, start_metrics_server
from relay.ops.metrics import Metrics
from relay.ops.probes import DownstreamProbe
from relay.ops.readiness import RelayReadiness
from relay.policy.holder import DeciderHolder
from tests.support.relay import make_settings, sink_server

LOOPBACK = MetricsSettings(listen=("127.0.0.1", 0))


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: relay\r\n{extra}\r\n".encode()


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[MetricsServer, Metrics]]:
    readiness: Readiness | None = getattr(request, "param", None)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    server = await start_metrics_server(LOOPBACK, registry, readiness)
    try:
        yield server, metrics
    finally:
        await server.close()


async def test_metrics_prometheus_text(served: tuple[MetricsServer, Metrics]) -> None:
    server, metrics = served
    metrics.smtp_reply(250)
    status, headers, body = await http(server.port, get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    assert b'relay_smtp_replies_total{class="2xx"} 1.0' in body
    assert b"# TYPE relay_message_duration_seconds histogram" in body


async def test_metrics_openmetrics_when_asked(served: tuple[MetricsServer, Metrics]) -> None:
    server, metrics = served
    metrics.set_model_info({"version": "v9", "trained_at": "2026-11-01"})
    accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    status, headers, body = await http(server.port, get("/metrics", accept))
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b"# TYPE relay_model info" in body
    assert b'relay_model_info{trained_at="2026-11-01",version="v9"} 1.0' in body


async def test_head_and_healthz(served: tuple[MetricsServer, Metrics]) -> None:
    server, _ = served
    status, _, body = await http(server.port, get("/healthz"))
    assert (status, body) == (200, b"ok\n")
    status, headers, body = await http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 100


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (get("/nope"), 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400),
        (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET http://x/metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /metrics HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
    ],
)
async def test_strict_parser(
    served: tuple[MetricsServer, Metrics], raw: bytes, expected: int
) -> None:
    server, _ = served
    status, headers, _ = await http(server.port, raw)
    assert status == expected
    if expected == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_half_request_then_close_does_not_break_the_server(
    served: tuple[MetricsServer, Metrics],
) -> None:
    server, _ = served
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metrics HT")
    writer.close()
    status, _, _ = await http(server.port, get("/healthz"))
    assert status == 200


def ready_all() -> Mapping[str, bool]:
    return {"listening": True, "model_loaded": True, "policy_loaded": True}


async def downstream_down() -> Mapping[str, bool]:
    await asyncio.sleep(0)
    return {"listening": True, "downstream_reachable": False}


@pytest.mark.parametrize("served", [ready_all], indirect=True)
async def test_readyz_ok(served: tuple[MetricsServer, Metrics]) -> None:
    status, headers, body = await http(served[0].port, get("/readyz"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "ready": True,
        "status": "ok",
        "checks": ready_all(),
        "degraded": {},
    }


@pytest.mark.parametrize("served", [downstream_down], indirect=True)
async def test_readyz_names_the_failing_check(served: tuple[MetricsServer, Metrics]) -> None:
    status, _, body = await http(served[0].port, get("/readyz"))
    assert status == 503
    doc = json.loads(body)
    assert doc["ready"] is False
    assert doc["status"] == "unready"
    assert doc["checks"]["downstream_reachable"] is False


async def test_readyz_slow_or_broken_callback_is_not_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("relay.ops.http.READINESS_TIMEOUT", 0.1)

    async def slow() -> Mapping[str, bool]:
        await asyncio.sleep(5)
        return {"x": True}

    def broken() -> Mapping[str, bool]:
        raise RuntimeError("bug")

    for readiness, key in ((slow, "readiness_check_timed_out"), (broken, "readiness_check_failed")):
        server = await start_metrics_server(LOOPBACK, CollectorRegistry(), readiness)
        try:
            status, _, body = await http(server.port, get("/readyz"))
        finally:
            await server.close()
        assert status == 503
        assert json.loads(body)["checks"] == {key: False}


async def test_port_in_use_is_a_config_error_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = MetricsSettings(listen=("127.0.0.1", port))
        with pytest.raises(ConfigError) as err:
            await start_metrics_server(settings, CollectorRegistry(), source="relay.toml")
    assert err.value.key == "metrics.listen"
    assert f"port {port}" in str(err.value)
    assert "already in use" in str(err.value)
    assert str(err.value).startswith("relay.toml")


class SlowCollector(Collector):
    """A registry that takes 0.5 s to collect, like a huge one under load."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        time.sleep(0.5)
        yield GaugeMetricFamily("slow_thing", "slow", value=1)


async def test_a_slow_scrape_does_not_block_the_event_loop() -> None:
    registry = CollectorRegistry()
    registry.register(SlowCollector())
    server = await start_metrics_server(LOOPBACK, registry)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        status, _, body = await http(server.port, get("/metrics"))
    finally:
        task.cancel()
        await server.close()
    assert status == 200 and b"slow_thing 1.0" in body
    # the loop kept running while the exposition was rendered (0.5 s => ~50 ticks)
    assert ticks >= 20


async def test_readyz_shares_and_caches_the_downstream_probe(tmp_path: Path) -> None:
    """Issue 15: /readyz is unauthenticated; N concurrent requests open one downstream
    connection, and a request within the cache window opens none."""
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path, {"delivery": {"mode": "smtp", "downstream": sink.address}}
        )
        readiness = RelayReadiness(settings, DeciderHolder())
        server = await start_metrics_server(LOOPBACK, CollectorRegistry(), readiness)
        try:
            answers = await asyncio.gather(*(http(server.port, get("/readyz")) for _ in range(20)))
            assert all(b'"downstream_reachable": true' in body for _, _, body in answers)
            assert sink.connections == 1
            _, _, body = await http(server.port, get("/readyz"))
            assert b'"downstream_reachable": true' in body
            assert sink.connections == 1
        finally:
            await server.close()


async def test_downstream_probe_runs_again_after_the_cache_window(tmp_path: Path) -> None:
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path, {"delivery": {"mode": "smtp", "downstream": sink.address}}
        )
        probe = DownstreamProbe(settings.delivery, ttl=0.05)
        assert list(await asyncio.gather(probe(), probe(), probe())) == [True, True, True]
        assert sink.connections == 1
        await asyncio.sleep(0.1)
        assert await probe()
        assert sink.connections == 2
