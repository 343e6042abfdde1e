"""The servers under test, each a separate process on its own loopback port.

- the relay: ``python -m relay.cli serve --config FILE`` in a scratch directory, with a
  config written from the scenario (workers, metrics, auth, policy, classifier);
- the pass-through: ``python -m bench.passthrough``;
- the direct case has no server: smtp-source talks to smtp-sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.net import free_port, wait_for_greeting
from bench.procstats import descendants, listening_pids

TomlValue = str | int | float | bool | list[str]
STOP_GRACE = 30.0  # seconds a server gets to drain and exit after SIGTERM


def _alive(pid: int) -> bool:
    """Running (not a zombie) process; only ever asked about pids of our own servers."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2 :][:1] not in ("Z", "X")


def toml_text(config: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """A flat two-level TOML document (sections of scalars and string lists)."""
    out: list[str] = []
    for section, values in config.items():
        out.append(f"[{section}]")
        for key, value in values.items():
            out.append(f"{key} = {json.dumps(value)}")  # JSON scalars/lists are valid TOML
        out.append("")
    return "\n".join(out)


@dataclass
class ServerProcess:
    """One server under test: its process, port and scratch directory."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    metrics_port: int | None = None
    stats_file: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        return descendants(self.proc.pid)

    def smtp_processes(self) -> int:
        """Processes holding a socket that listens on the SMTP port (the workers)."""
        return len(listening_pids(self.tree(), self.port))

    async def ready(self, within: float = 600) -> None:  # a model can take minutes
        await wait_for_greeting(self.port, self.proc, within)

    async def wait_workers(self, expected: int, within: float = 30) -> int:
        """Workers come up one after another: wait until ``expected`` of them listen."""
        deadline = time.monotonic() + within
        seen = self.smtp_processes()
        while seen < expected and time.monotonic() < deadline and self.proc.poll() is None:
            await asyncio.sleep(0.1)
            seen = self.smtp_processes()
        return seen

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait for the drain, then kill whatever of the tree is left.

        Returns the pass-through's stats (if any) and how the shutdown went: a server that
        needs SIGKILL, or leaves child processes behind, is a finding worth reporting.
        """
        tree = [pid for pid in self.tree() if pid != self.proc.pid]
        outcome: dict[str, Any] = {"exit": "already exited"}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
                outcome = {"exit": f"status {self.proc.returncode} after SIGTERM"}
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                outcome = {"exit": f"killed: still running {STOP_GRACE:.0f} s after SIGTERM"}
        time.sleep(0.5)  # children the parent just told to exit get a moment
        left = [pid for pid in tree if _alive(pid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            outcome["left_behind"] = len(left)
        if self.stats_file is not None and self.stats_file.exists():
            with contextlib.suppress(ValueError):
                outcome.update(json.loads(self.stats_file.read_text()))
        return outcome


REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: Path) -> str:
    """``path`` as results record it: relative to the repository (``../shared/...`` for the
    corpora beside it), never a machine's own path. Anything further out (a scratch file
    under /tmp) is recorded by its name alone, which says nothing of this machine."""
    rel = os.path.relpath(path, REPO)
    if rel.startswith(f"..{os.sep}..") or rel == f"..{os.sep}..":
        return f"(outside the repository)/{path.name}"
    return rel


def _spawn(
    name: str, argv: list[str], workdir: Path, port: int, src: Path | None = None
) -> ServerProcess:
    """``src``: another tree's ``src`` folder whose ``relay`` package runs instead of this
    one (the bench's baseline); PYTHONPATH is searched before the editable install."""
    log = workdir / "server.log"
    paths = (str(src) if src else "", str(REPO), os.environ.get("PYTHONPATH", ""))
    path = os.pathsep.join(p for p in paths if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(name=name, port=port, proc=proc, workdir=workdir, log=log)


def start_passthrough(name: str, workdir: Path, downstream: int, pool: int) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    stats = workdir / "stats.json"
    argv = [sys.executable, "-m", "bench.passthrough", "--listen", f"127.0.0.1:{port}"]
    argv += ["--downstream", f"127.0.0.1:{downstream}", "--pool", str(pool), "--stats", str(stats)]
    server = _spawn(name, argv, workdir, port)
    server.stats_file = stats
    return server


def relay_config(
    workdir: Path,
    port: int,
    downstream: int,
    *,
    workers: int,
    metrics_port: int,
    overrides: Mapping[str, Mapping[str, TomlValue]],
) -> dict[str, dict[str, TomlValue]]:
    """The base case: no-op decision, no auth, no classifier, no metrics; then overrides."""
    config: dict[str, dict[str, TomlValue]] = {
        "smtp": {
            "listen": f"127.0.0.1:{port}",
            "hostname": "relay.bench.test",
            "workers": workers,
            "max_connections": 2000,
            "drain_timeout": 5,
        },
        "relay": {"domains": ["example.org"], "networks": []},
        "delivery": {"mode": "smtp", "downstream": f"127.0.0.1:{downstream}", "timeout": 30},
        "auth": {"enabled": False},
        "model": {"enabled": False},
        "policy": {"path": ""},
        "metrics": {"enabled": False, "listen": f"127.0.0.1:{metrics_port}"},
        "state": {"path": str(workdir / "state.sqlite3")},
        "quarantine": {"path": str(workdir / "quarantine")},
        "security": {"key_file": str(workdir / "relay.key")},
        "log": {"level": "info"},
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    return config


def start_relay(
    name: str,
    workdir: Path,
    downstream: int,
    *,
    workers: int,
    overrides: Mapping[str, Mapping[str, TomlValue]],
    src: Path | None = None,
) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    config = relay_config(
        workdir, port, downstream, workers=workers, metrics_port=metrics_port, overrides=overrides
    )
    config_file = workdir / "relay.toml"
    config_file.write_text(toml_text(config))
    argv = [sys.executable, "-m", "relay.cli", "serve", "--config", str(config_file)]
    server = _spawn(name, argv, workdir, port, src)
    server.metrics_port = metrics_port
    return server
