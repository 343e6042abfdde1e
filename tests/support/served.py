"""A real `relay serve` with 2 workers under its supervisor, and the process tree read
from /proc: what the tests of the workers' children (tests/test_hang_overload.py,
tests/test_analysis_child.py) look at."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "spam.skops"
DEFAULT_POLICY = REPO / "config" / "policy.toml"


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(FileNotFoundError):
        return [int(p) for p in path.read_text().split()]
    return []


def cmdline(pid: int) -> str:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


@contextlib.asynccontextmanager
async def serve_two_workers(
    tmp_path: Path, port: int, nameserver: str, *, auth: str = ""
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`relay serve` with the default model, policy and checks, 2 workers, DNS from
    ``nameserver``; ``auth`` is extra ``[auth]`` lines. Output goes to relay.log."""
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "relay.test"\nworkers = 2\n'
        f'[relay]\ndomains = ["example.org"]\n'
        f'[delivery]\nmaildir = "{tmp_path / "maildir"}"\n'
        f'[model]\npath = "{MODEL}"\nregistry = "{tmp_path / "models"}"\n'
        f'[policy]\npath = "{DEFAULT_POLICY}"\n'
        f"[auth]\n{auth}"
        f"[metrics]\nenabled = false\n"
        f'[dns]\nnameservers = ["{nameserver}"]\ntimeout = 1\n'
        f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n'
        f'[security]\nkey_file = "{tmp_path / "relay.key"}"\n'
    )
    log = (tmp_path / "relay.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
