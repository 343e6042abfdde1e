"""`relay serve` as a real process: start, log, SIGTERM drain, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.relay import RawClient, free_port, free_ports, simple_message, wait_listening

SECRET_BODY = "the-body-must-never-be-logged-7f3a"


def write_config(tmp_path: Path, port: int, *, workers: int = 1) -> Path:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        f"""
[smtp]
listen = "127.0.0.1:{port}"
hostname = "relay.test"
drain_timeout = 10
workers = {workers}
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


def worker_pids(supervisor_pid: int) -> set[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text()
    pids = set()
    for pid in children.split():
        # Workers run ``python -m relay.launch`` (smtp/supervisor.py).
        with contextlib.suppress(FileNotFoundError):
            if b"\0relay.launch\0" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(int(pid))
    return pids


async def wait_for(predicate: object, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def start_serve(cfg: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``relay serve --config cfg`` in cfg's folder, its log in ``log_path``."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)],
            cwd=cfg.parent,
            stderr=log_file,
        )


async def test_workers_share_the_port_restart_and_drain(tmp_path: Path) -> None:
    from tests.support.relay import send

    port = free_port()
    cfg = write_config(tmp_path, port, workers=2)
    log_path = tmp_path / "relay.log"
    proc = start_serve(cfg, log_path)
    try:
        await wait_for(lambda: log_path.read_text().count("ready (pid") == 2)
        pids = worker_pids(proc.pid)
        assert len(pids) == 2
        for i in range(20):
            await send(port, ["bob@example.org"], simple_message(f"w{i}"))
        # A worker that dies is replaced and mail keeps flowing.
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: log_path.read_text().count("ready (pid") == 3)
        for i in range(5):
            await send(port, ["bob@example.org"], simple_message(f"after{i}"))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 25
    log = log_path.read_text()
    # Both first workers took connections (the kernel spreads them over SO_REUSEPORT sockets).
    served_by = {int(line.split()[2]) for line in log.splitlines() if "queue_id=" in line}
    assert pids <= served_by
    assert "restarting" in log


def test_worker_start_failure_stops_the_supervisor(tmp_path: Path) -> None:
    import socket

    port = free_port()
    cfg = write_config(tmp_path, port, workers=2)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))  # no SO_REUSEPORT: workers cannot bind
    blocker.listen(1)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)],
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
        )
    finally:
        blocker.close()
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr.decode()


async def test_every_worker_serves_the_learn_endpoint(tmp_path: Path) -> None:
    """With two workers the learn endpoint is up (each binds it with SO_REUSEPORT) and
    every report lands in the one shared store."""
    port, learn_port = free_ports(2)
    token = "t" * 32
    token_file = tmp_path / "learn.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    cfg = write_config(tmp_path, port, workers=2)
    cfg.write_text(
        cfg.read_text()
        + f'[feedback]\nhttp_listen = "127.0.0.1:{learn_port}"\n'
        + f'http_token_file = "{token_file}"\n'
        + f'[security]\nkey_file = "{tmp_path / "relay.key"}"\n'
    )
    log_path = tmp_path / "relay.log"
    proc = start_serve(cfg, log_path)
    try:
        await wait_for(lambda: log_path.read_text().count("ready (pid") == 2)
        for i in range(12):
            body = simple_message(f"learn {i}", body=f"report number {i}\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", learn_port)
            writer.write(
                f"POST /learn/spam HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stats = subprocess.run(
        [sys.executable, "-m", "relay.cli", "learn", "--stats", "--json", "--config", str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    assert json.loads(stats.stdout)["spam"] == 12


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_workers_are_the_only_children_and_die_with_a_killed_supervisor(
    tmp_path: Path,
) -> None:
    """No helper process beside the workers (multiprocessing's resource tracker was one,
    12 MiB), and a SIGKILLed supervisor, which can forward nothing, leaves no worker
    serving behind it."""
    port = free_port()
    cfg = write_config(tmp_path, port, workers=2)
    log_path = tmp_path / "relay.log"
    proc = start_serve(cfg, log_path)
    workers: set[int] = set()
    try:
        await wait_for(lambda: log_path.read_text().count("ready (pid") == 2)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        assert {int(pid) for pid in children} == workers
        proc.kill()
        proc.wait()
        await wait_for(lambda: not any(_alive(pid) for pid in workers))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:  # after a failure: leave no orphan behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_relay_milter_with_workers_serves_the_milter_door_only(tmp_path: Path) -> None:
    """``relay milter`` under the supervisor: every worker opens the milter port and none
    the SMTP one (the door travels on the worker's command line)."""
    import socket

    port, milter_port = free_ports(2)
    cfg = write_config(tmp_path, port, workers=2)
    cfg.write_text(cfg.read_text() + f'[milter]\nlisten = "inet:127.0.0.1:{milter_port}"\n')
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "milter", "--config", str(cfg)],
            cwd=tmp_path,
            stderr=log_file,
        )
    try:
        await wait_for(lambda: log_path.read_text().count("ready (pid") == 2)
        assert len(worker_pids(proc.pid)) == 2
        assert log_path.read_text().count("milter listening on") == 2
        with socket.create_connection(("127.0.0.1", milter_port), timeout=5):
            pass
        with contextlib.suppress(ConnectionRefusedError), socket.socket() as smtp:
            smtp.connect(("127.0.0.1", port))
            raise AssertionError("relay milter listens on the SMTP port")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
