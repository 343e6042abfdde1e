"""`relay serve` as a real process: start, log, SIGTERM drain, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.relay import RawClient, free_port, simple_message

SECRET_BODY = "the-body-must-never-be-logged-7f3a"


def write_config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        f"""
[smtp]
listen = "127.0.0.1:{port}"
hostname = "relay.test"
drain_timeout = 10
[relay]
domains = ["example.org"]
[delivery]
maildir = "{tmp_path / "maildir"}"
[model]
enabled = false
[policy]
path = ""
[metrics]
enabled = false
[auth]
enabled = false
[state]
path = "{tmp_path / "state.sqlite3"}"
"""
    )
    return cfg


async def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(100):
        assert proc.poll() is None, "relay exited early"
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        w.close()
        return
    raise AssertionError("relay did not start listening")


async def test_sigterm_drains_in_flight_message_then_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port)
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)],
            cwd=tmp_path,
            stderr=log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        await wait_listening(port, proc)
        assert (tmp_path / "var" / "relay.pid").read_text().strip() == str(proc.pid)
        busy = await RawClient.connect(port)
        idle = await RawClient.connect(port)
        await busy.cmd("EHLO client.test")
        await busy.cmd("MAIL FROM:<alice@sender.test>")
        await busy.cmd("RCPT TO:<bob@example.org>")
        await busy.cmd("DATA")
        await busy.write(simple_message(body=SECRET_BODY + "\r\n")[:60])  # half a message
        proc.send_signal(signal.SIGTERM)
        # The idle session is told to go away; the busy one may finish its message.
        assert (await idle.reply(timeout=5)).startswith("421 4.3.2")
        await asyncio.sleep(0.3)
        await busy.write(simple_message(body=SECRET_BODY + "\r\n")[60:] + b".\r\n")
        assert (await busy.reply(timeout=5)).startswith("250")
        assert (await busy.reply(timeout=5)).startswith("421 4.3.2")
        for c in (busy, idle):
            await c.close()
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1
    lines = [line for line in log.splitlines() if "queue_id=" in line]
    assert len(lines) == 1, log
    assert "outcome=delivered" in lines[0] and "reply=250" in lines[0]
    assert "total_ms=" in lines[0]
    assert SECRET_BODY not in log
    assert not (tmp_path / "var" / "relay.pid").exists()


def test_bad_config_fails_at_start_naming_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[smtp]\nmax_recipients = "many"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert str(cfg) in err and "smtp.max_recipients" in err and "must be int" in err
