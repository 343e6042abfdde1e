"""The bench's new pieces without Rspamd or py-spy: the Rspamd config it writes, its HTTP
client against a tiny loopback server, the PSS reader, the loop-lag probe, the per-stage
attribution of sampled stacks, and a run whose Rspamd rows are skipped with the reason."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from bench import lagprobe, rspamd, scenarios, stages
from bench.postfix import find_tool
from bench.procstats import parse_pss_kib, pss_bytes, rss_bytes

REPO = Path(__file__).resolve().parents[1]

# --- the private Rspamd configuration ----------------------------------------------------


def test_config_binds_loopback_ports_and_turns_every_network_module_off(tmp_path: Path) -> None:
    ports = rspamd.Ports(normal=11111, controller=11112, redis=11113)
    main = rspamd.write_config(tmp_path, ports, workers=2, dns="127.0.0.1:5353")
    text = main.read_text()
    assert 'bind_socket = "127.0.0.1:11111"' in text and "count = 2;" in text
    assert 'bind_socket = "127.0.0.1:11112"' in text
    assert "rspamd_proxy" not in text and "fuzzy" not in text  # not declared: not started
    assert 'filename = "$LOGDIR/rspamd.log"' in text and "$RUNDIR/rspamd.pid" in text
    bayes = (tmp_path / "local.d" / "classifier-bayes.conf").read_text()
    assert 'servers = "127.0.0.1:11113"' in bayes and "autolearn = false" in bayes
    assert '"127.0.0.1:5353"' in (tmp_path / "local.d" / "options.inc").read_text()
    for module in ("rbl", "surbl", "spf", "dkim", "dmarc", "fuzzy_check", "phishing", "asn"):
        assert (tmp_path / "local.d" / f"{module}.conf").read_text() == "enabled = false;\n"


def test_argv_runs_in_the_foreground_with_every_directory_in_the_temp_dir(tmp_path: Path) -> None:
    argv = rspamd.rspamd_argv("/usr/bin/rspamd", tmp_path, user="_rspamd")
    assert argv[:2] == ["/usr/bin/rspamd", "-f"]
    assert f"--var=LOCAL_CONFDIR={tmp_path}" in argv and f"--var=DBDIR={tmp_path / 'db'}" in argv
    assert argv[-4:] == ["-u", "_rspamd", "-g", "_rspamd"]
    assert "-u" not in rspamd.rspamd_argv("/usr/bin/rspamd", tmp_path, user=None)


def test_start_without_rspamd_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rspamd, "find_rspamd", lambda: None)
    with pytest.raises(rspamd.RspamdUnavailable, match="not installed"):
        rspamd.start()


def test_shadow_policy_copy_keeps_the_rules(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[policy]\nname = "x"\nmode = "enforce"\n\n[[rule]]\nname = "r"\n')
    out = scenarios.in_shadow_mode(policy, tmp_path / "shadow.toml").read_text()
    assert 'mode = "shadow"' in out and 'mode = "enforce"' not in out and "[[rule]]" in out


def test_rspamd_rows_and_ratios_are_in_the_default_run(tmp_path: Path) -> None:
    built = {s.key: s for s in scenarios.build(REPO, "127.0.0.1:53", (1, 2), tmp_path)}
    assert built["rspamd-scan"].kind == built["rspamd-bayes"].kind == "rspamd"
    assert built["rspamd-bayes"].settings == rspamd.BAYES_ONLY
    full = built["relay-full-w2"].overrides["policy"]["path"]
    assert 'mode = "shadow"' in Path(str(full)).read_text()
    wanted = {(c.numerator, c.denominator): c.target for c in scenarios.comparisons((1, 2))}
    assert wanted[("relay-full-w2", "rspamd-bayes")] == 1.3
    assert wanted[("relay-full-w2", "passthrough-pooled")] == 0.8
    assert wanted[("relay-full-w2", "passthrough-connect")] == 0.8  # the anchors' own


# --- /proc readers -----------------------------------------------------------------------


def test_pss_of_this_process_is_read_and_below_rss() -> None:
    me = [os.getpid()]
    pss, rss = pss_bytes(me), rss_bytes(me)
    assert 0 < pss <= rss * 1.05
    assert parse_pss_kib("Rss:  100 kB\nPss:   42 kB\nShared_Clean: 1 kB\n") == 42
    assert parse_pss_kib("nothing here") == 0
    assert pss_bytes([2**30]) == 0  # a process that is gone counts nothing


# --- the HTTP client against a tiny server -------------------------------------------------

Handler = Callable[[str, str, bytes], tuple[int, bytes]]


@asynccontextmanager
async def http_server(handler: Handler, *, keep_alive: bool) -> AsyncIterator[int]:
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                seen.append(path)
                status, reply = handler(method, path, body)
                conn = "keep-alive" if keep_alive else "close"
                writer.write(
                    f"HTTP/1.1 {status} X\r\nConnection: {conn}\r\n"
                    f"Content-Length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()
                if not keep_alive:
                    return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def _rspamd_like(method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if path == "/ping":
        return 200, b"pong\n"
    if path == "/checkv2":
        if b"broken" in body:
            return 500, b"{}"
        answer = {"score": 1.5, "action": "no action", "symbols": {"BAYES_HAM": {}}}
        return 200, json.dumps(answer).encode()
    if path in ("/learnspam", "/learnham"):
        return (208 if b"again" in body else 200), b'{"success": true}'
    return 404, b""


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_scan_counts_replies_errors_and_bayes_symbols(keep_alive: bool) -> None:
    async with http_server(_rspamd_like, keep_alive=keep_alive) as port:
        good = await rspamd.scan(port, b"Subject: hi\r\n\r\nbody\r\n", requests=40, in_flight=8)
        assert good.ok == 40 and good.errors == {} and len(good.latencies) == 40
        assert good.symbols == {"BAYES_HAM": 40} and good.actions == {"no action": 40}
        bad = await rspamd.scan(port, b"broken", requests=5, in_flight=2)
        assert bad.ok == 0 and bad.errors == {"HTTP 500": 5}
    async with http_server(_rspamd_like, keep_alive=keep_alive) as port:
        corpus = [("spam", b"one"), ("ham", b"two"), ("ham", b"again"), ("spam", b"three")]
        trained = await rspamd.train(port, corpus, in_flight=3)
        assert trained.posted == 4
        assert trained.outcomes == {"ham 200": 1, "ham 208": 1, "spam 200": 2}
        assert trained.learned == {"spam": 2, "ham": 1}


async def test_scan_of_a_closed_port_counts_connection_errors() -> None:
    async with http_server(_rspamd_like, keep_alive=False) as port:
        pass  # closed again: nothing listens there now
    result = await rspamd.scan(port, b"x", requests=3, in_flight=1)
    assert result.ok == 0 and sum(result.errors.values()) == 3


def test_train_split_reads_only_train_rows_from_the_tarballs(tmp_path: Path) -> None:
    import tarfile

    folder = tmp_path / "spam"
    folder.mkdir()
    for name in ("00001.a", "00002.b", "00003.c"):
        (folder / name).write_bytes(
            f"From x@y Mon Jan 1 00:00:00 2002\nSubject: {name}\n\nb\n".encode()
        )
    with tarfile.open(tmp_path / "20030228_spam.tar.bz2", "w:bz2") as tar:
        tar.add(folder, arcname="spam")
    labels = tmp_path / "split.tsv"
    labels.write_text(
        "relative_path\tlabel\tset\nsa/spam/00001.a\tspam\ttrain\n"
        "sa/spam/00002.b\tspam\ttest\nsa/spam/00003.c\tspam\ttrain\n"
    )
    got = rspamd.train_split(tmp_path, labels)
    assert sorted(raw for _, raw in got) == [
        b"Subject: 00001.a\n\nb\n",
        b"Subject: 00003.c\n\nb\n",
    ]  # test rows left out, the mbox From line removed


# --- loop-lag probe ------------------------------------------------------------------------


async def test_noop_probe_times_round_trips_and_reconnects() -> None:
    sessions = 0

    async def smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sessions
        sessions += 1
        writer.write(b"220 stub\r\n")
        while line := await reader.readline():
            writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
            if line.startswith(b"QUIT"):
                break
        writer.close()

    server = await asyncio.start_server(smtp, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    probe = lagprobe.LagProbe(port, connections=2, interval=0.002)
    stop = asyncio.Event()
    task = asyncio.create_task(probe.run(stop))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20  # a loaded machine sleeps longer than asked
    while len(probe.samples) <= 2 * lagprobe.NOOPS_PER_SESSION + 10 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await task
    server.close()
    await server.wait_closed()
    summary = probe.summary()
    assert (
        summary["failures"] == {} and int(str(summary["samples"])) > 2 * lagprobe.NOOPS_PER_SESSION
    )
    assert sessions > 2  # each lane came back before the junk-command limit
    assert 0 < float(str(summary["p50_ms"])) <= float(str(summary["p99_ms"]))


async def test_http_probe_pings() -> None:
    async with http_server(_rspamd_like, keep_alive=False) as port:
        probe = lagprobe.LagProbe(port, connections=1, interval=0.01, kind="http")
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        await task
    assert probe.samples and not probe.failures


# --- CPU per stage -------------------------------------------------------------------------


def test_stack_goes_to_the_innermost_relay_module() -> None:
    loop = ["run (asyncio/runners.py:1)", "_run_once (asyncio/base_events.py:2)"]
    session = [*loop, "_handle_client (aiosmtpd/smtp.py:3)", "smtp_DATA (relay/smtp/server.py:4)"]
    process = [*session, "Pipeline._process (relay/pipeline/process.py:5)"]
    cases = {
        "parse": [
            *process,
            "decide (relay/policy/engine.py:6)",
            "Message.parsed (relay/message.py:7)",
            "feed (email/feedparser.py:8)",
        ],
        "auth": [
            *process,
            "check (/srv/relay/src/relay/auth/checker.py:9)",
            "x (dns/resolver.py:1)",
        ],
        "deliver": [*process, "send (relay/delivery/smtp.py:1)", "sendmail (aiosmtplib/smtp.py:2)"],
        "stamp": [*process, "received (relay/pipeline/process.py:3)"],
        "log": [
            *process,
            "_log_report (relay/pipeline/process.py:4)",
            "info (logging/__init__.py:5)",
        ],
        "receive": [
            *loop,
            "_handle_client (aiosmtpd/smtp.py:3)",
            "readline (asyncio/streams.py:1)",
        ],
        "event loop": [*loop, "EpollSelector.select (selectors.py:468)"],
        "classifier": ["run (threading.py:1)", "_feed (multiprocessing/queues.py:2)"],
        "waiting": ["_bootstrap (threading.py:1)", "_worker (concurrent/futures/thread.py:81)"],
    }
    for stage, frames in cases.items():
        assert stages.stage_of_stack(frames) == stage, (stage, frames)


def test_raw_stacks_and_exact_cpu_combine_into_ms_per_message() -> None:
    raw = (
        'process 10:"python -m relay.cli serve";process 11:"spawn_main";'
        "smtp_DATA (relay/smtp/server.py:1) 30\n"
        'process 10:"python -m relay.cli serve";process 11:"spawn_main";'
        "send (relay/delivery/smtp.py:1) 10\n"
        'process 10:"python -m relay.cli serve";process 11:"spawn_main";'
        "_worker (concurrent/futures/thread.py:81) 50\n"
        'process 10:"x";process 11:"y";process 12:"pool";'
        "predict (relay/classifier/serving.py:1) 99\n"
    )
    samples = stages.parse_raw(raw)
    assert samples[(11, "receive")] == 30 and samples[(11, "waiting")] == 50
    roles = {10: "supervisor", 11: "smtp worker", 12: "classifier child", 13: "verification child"}
    cpu = {10: 0.01, 11: 0.4, 12: 0.5, 13: 0.1}  # seconds over the phase
    got = stages.attribute(cpu, roles, samples, messages=100)
    assert got.stages == pytest.approx(
        {"receive": 3.0, "auth": 1.0, "classifier": 5.0, "deliver": 1.0, "supervisor": 0.1}
    )  # ms per message: the worker's 4 ms split 30:10, children whole
    assert got.roles["smtp worker"] == pytest.approx(4.0)
    assert got.worker_samples == 40 and got.waiting_samples == 50
    assert got.cpu_ms_per_msg == pytest.approx(10.1)
    unsampled = stages.attribute({11: 0.2}, {11: "smtp worker"}, {}, messages=10)
    assert unsampled.stages == {"worker, not sampled": pytest.approx(20.0)}
    assert not unsampled.sampled


def test_hotspots_split_each_process_cpu_by_place() -> None:
    raw = (
        'process 12:"pool";run (relay/classifier/serving.py:1);'
        "extract (relay/classifier/features.py:2);"
        "transform (sklearn/feature_extraction/text.py:3) 3\n"
        'process 12:"pool";run (relay/classifier/serving.py:1);'
        "predict (sklearn/pipeline.py:4) 1\n"
        'process 11:"worker";_worker (concurrent/futures/thread.py:81) 9\n'
    )
    roles = {11: "smtp worker", 12: "classifier child"}
    got = stages.hotspots(raw, {11: 0.1, 12: 0.4}, roles, messages=100)
    assert got["classifier child"] == [
        ("extract (relay/classifier/features.py) > sklearn/feature_extraction/text.py", 3.0),
        ("run (relay/classifier/serving.py) > sklearn/pipeline.py", 1.0),
    ]
    assert got["smtp worker"] == []  # only waits: nothing to split


def test_roles_of_a_tree() -> None:
    me = os.getpid()
    assert stages.role(me, me, set()) == "supervisor"
    assert stages.role(me, 1, {me}) == "smtp worker"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert stages.role(child.pid, me, set()) == "other process"
    finally:
        child.kill()
        child.wait()


# --- a run in which Rspamd cannot be had ---------------------------------------------------


@pytest.mark.skipif(
    find_tool("smtp-sink") is None or find_tool("smtp-source") is None,
    reason="Postfix's smtp-sink/smtp-source not installed (make system-deps)",
)
def test_run_reports_rspamd_skipped_with_the_reason(tmp_path: Path) -> None:
    args = ["--quick", "--scenarios", "rspamd-scan,rspamd-bayes", "--out", str(tmp_path)]
    args += ["--corpus", str(tmp_path / "no-corpus-here")]
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "throughput-quick.json").read_text())
    rows = {row["key"]: row for row in results["scenarios"]}
    for key in ("rspamd-scan", "rspamd-bayes"):
        assert "no corpus" in rows[key]["skipped"], rows[key]
    report = (tmp_path / "throughput-quick.md").read_text()
    assert "rspamd-bayes: no corpus" in report and "## Rspamd set-up" in report
