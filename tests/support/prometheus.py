"""A real Prometheus server (Debian package ``prometheus``) for tests and the dashboard
renderer: scrapes given loopback targets every second, stores in a scratch directory, and
answers PromQL through its HTTP API. Its methods block: call them from a thread when the
scraped endpoint runs on the caller's event loop."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BINARY = "prometheus"


def prometheus_binary() -> str | None:
    return shutil.which(BINARY) or shutil.which(BINARY, path="/usr/bin:/usr/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PromQLError(Exception):
    """Prometheus refused a query (``error_type`` is e.g. ``bad_data`` for a parse error)."""

    def __init__(self, error_type: str, error: str) -> None:
        self.error_type = error_type
        self.error = error
        super().__init__(f"{error_type}: {error}")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        request = urllib.request.Request(f"{self.url}{path}?{query}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
                doc = json.load(response)
        except urllib.error.HTTPError as exc:
            doc = json.load(exc)
        if doc.get("status") != "success":
            raise PromQLError(doc.get("errorType", "?"), doc.get("error", "?"))
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("/api/v1/query", **params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api(
            "/api/v1/query_range",
            query=expr,
            start=f"{start:.3f}",
            end=f"{end:.3f}",
            step=f"{step:g}",
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        groups = self.api("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("/api/v1/alerts")["alerts"]
        return alerts

    def targets_up(self) -> bool:
        active = self.api("/api/v1/targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(PromQLError, OSError):
                if predicate():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus: {what} not reached in {timeout:.0f}s")
            time.sleep(0.2)


@contextlib.contextmanager
def running_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    rule_files: Sequence[Path] = (),
    interval: str = "1s",
    job: str = "relay",
) -> Iterator[Prometheus]:
    """Starts Prometheus on a free loopback port scraping ``targets`` (host:port)."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (make system-deps)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    lines = [
        "global:",
        f"  scrape_interval: {interval}",
        f"  evaluation_interval: {interval}",
        "rule_files:",
        *(f"  - {json.dumps(str(p))}" for p in rule_files),
        "scrape_configs:",
        f"  - job_name: {job}",
        "    static_configs:",
        f"      - targets: {json.dumps(list(targets))}",
    ]
    if not rule_files:
        lines[3] = "rule_files: []"
    config.write_text("\n".join(lines) + "\n")
    port = _free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        prom.wait(lambda: _ready(prom.url), timeout=90, what="ready")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:  # loopback only
        return bool(response.status == 200)
