"""Rspamd beside the relay: a private Rspamd 3.4 (Debian), Bayes trained, scanned over HTTP.

The anchor the relay must beat (shared/anchors.md) is Rspamd's content scan alone: no SMTP,
messages posted to its normal worker's ``/checkv2`` with 8 in flight. This module runs that
side of the comparison inside the throughput bench, in the same run as the relay:

- ``config_files``: a private configuration (its own ``rspamd.conf`` and ``local.d``), read
  by ``rspamd -c`` with ``--var`` pointing every directory into a temp dir: the normal worker
  (2 processes, as the anchor) and the controller on free loopback ports, no proxy, no fuzzy
  storage, Bayes in a private ``redis-server`` on loopback, every module that needs the
  network disabled (these machines have no DNS; a lookup that times out would measure the
  timeout, not Rspamd), the resolver pointed at the bench's loopback DNS server so whatever
  still asks gets an answer at once, a log file and a pid file in the temp dir;
- ``RspamdInstance``: starts Redis and Rspamd (as root, Rspamd insists on dropping to an
  unprivileged user: ``-u/-g _rspamd``, the Debian package's user, which is given the temp
  dir), waits until both workers answer ``/ping`` and the hyperscan compiler is idle, and
  stops both, killing leftovers by pid;
- ``train``: posts the SpamAssassin train split to the controller (``/learnspam`` and
  ``/learnham``; Bayes needs 200 of each before it says anything), read from the tarballs
  in place, nothing cached;
- ``scan``: our stdlib asyncio HTTP/1.1 client, a fixed number of ``/checkv2`` requests with
  a fixed number in flight, every reply checked (status 200 and a JSON score).

Two ways to scan, one daemon: ``rspamd-scan`` runs the stock rules (network modules off) and
Bayes; ``rspamd-bayes`` sends a ``Settings`` header enabling only the Bayes symbols, which
is the anchor's "Bayes only" row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.net import free_port
from bench.procstats import cmdline, cpu_seconds, descendants

RSPAMD_USER = "_rspamd"  # created by Debian's rspamd package
REQUEST_TIMEOUT = 30.0
# Modules that reach the network (DNS lists, URL lists, hash services, key and record
# lookups, remote maps) or need a Redis of their own: all off, so a scan never waits for
# an answer that cannot come. What is left runs locally: regexp rules, MIME and header
# checks, Bayes.
NETWORK_MODULES = (
    "antivirus",
    "arc",
    "asn",
    "aws_s3",
    "bimi",
    "clickhouse",
    "dcc",
    "dkim",
    "dkim_signing",
    "dmarc",
    "elastic",
    "emails",
    "external_services",
    "fuzzy_check",
    "greylist",
    "hfilter",
    "history_redis",
    "metadata_exporter",
    "mx_check",
    "neural",
    "p0f",
    "phishing",
    "ratelimit",
    "rbl",
    "replies",
    "reputation",
    "rspamd_update",
    "spamassassin",
    "spf",
    "surbl",
    "url_redirector",
    "whitelist",
)
BAYES_ONLY = '{symbols_enabled = ["BAYES_SPAM", "BAYES_HAM"]}'  # the Settings header


def find_rspamd() -> str | None:
    return shutil.which("rspamd") or next(
        (p for p in ("/usr/bin/rspamd", "/usr/sbin/rspamd") if Path(p).is_file()), None
    )


@dataclass(frozen=True, slots=True)
class Ports:
    normal: int
    controller: int
    redis: int


def config_files(ports: Ports, *, workers: int = 2, dns: str = "") -> dict[str, str]:
    """Relative file name -> text of the private configuration.

    The stock files under $CONFDIR (/etc/rspamd) are included as the packaged
    rspamd.conf does; only our own top-level file and local.d overrides differ.
    """
    main = f"""# Written by bench/rspamd.py for one bench run; nothing here is kept.
.include "$CONFDIR/common.conf"

options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}

logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "notice";
}}

worker "normal" {{
    .include "$CONFDIR/worker-normal.inc"
    bind_socket = "127.0.0.1:{ports.normal}";
    count = {workers};
}}

worker "controller" {{
    .include "$CONFDIR/worker-controller.inc"
    bind_socket = "127.0.0.1:{ports.controller}";
    count = 1;
}}
"""
    # No proxy and no fuzzy storage worker: not declared, so not started.
    options = ["# every lookup that is still made goes to the bench's loopback DNS server"]
    if dns:
        options.append(f'dns {{ nameserver = ["{dns}"]; timeout = 0.5s; retransmits = 1; }}')
    else:
        options.append("dns { timeout = 0.5s; retransmits = 1; }")
    files = {
        "rspamd.conf": main,
        "local.d/options.inc": "\n".join(options) + "\n",
        "local.d/classifier-bayes.conf": (
            f'servers = "127.0.0.1:{ports.redis}";\n'
            "autolearn = false;  # learnt only from the train split, never from the bench\n"
        ),
    }
    for module in NETWORK_MODULES:
        files[f"local.d/{module}.conf"] = "enabled = false;\n"
    return files


def write_config(root: Path, ports: Ports, *, workers: int = 2, dns: str = "") -> Path:
    for name, text in config_files(ports, workers=workers, dns=dns).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "rspamd.conf"


def rspamd_argv(binary: str, root: Path, *, user: str | None) -> list[str]:
    """``rspamd`` in the foreground (``-f``: we hold the process) with every directory in
    ``root``. As root it must be told whom to become (it refuses to run workers as root)."""
    argv = [binary, "-f", "-c", str(root / "rspamd.conf"), "-p", str(root / "rspamd.pid")]
    for var, folder in (("LOCAL_CONFDIR", root), ("DBDIR", root / "db"), ("RUNDIR", root)):
        argv.append(f"--var={var}={folder}")
    argv.append(f"--var=LOGDIR={root}")
    if user is not None:
        argv += ["-u", user, "-g", user]
    return argv


# ---------------------------------------------------------------------------------------
# HTTP/1.1 over asyncio streams: enough for Rspamd's API (Content-Length bodies; Rspamd
# answers "Connection: close", so a connection is reused only when the server allows it).


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


class HttpError(Exception):
    pass


class HttpConnection:
    """One keep-alive connection to 127.0.0.1:port, reopened when the server closes it."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        limit: float = REQUEST_TIMEOUT,  # seconds for the whole exchange
    ) -> HttpReply:
        async with asyncio.timeout(limit):
            if self._streams is None:
                self._streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self._streams
            head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            head += [f"{k}: {v}" for k, v in (headers or {}).items()]
            head.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            try:
                reply = await read_reply(reader)
            except BaseException:
                await self.close()
                raise
        if not reply.keep_alive:
            await self.close()
        return reply

    async def close(self) -> None:
        if self._streams is None:
            return
        writer = self._streams[1]
        self._streams = None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_reply(reader: asyncio.StreamReader) -> HttpReply:
    status_line = await reader.readline()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise HttpError(f"bad status line {status_line[:60]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise HttpError("connection closed in the headers")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        raise HttpError("chunked replies are not supported (Rspamd sends Content-Length)")
    else:
        body = await reader.read()  # until the server closes
        headers["connection"] = "close"
    return HttpReply(int(parts[1]), headers, body)


# ---------------------------------------------------------------------------------------
# Scanning and learning


@dataclass(frozen=True, slots=True)
class ScanResult:
    requests: int
    in_flight: int
    ok: int
    errors: dict[str, int]
    elapsed: float
    latencies: tuple[float, ...]
    actions: dict[str, int]
    symbols: dict[str, int]  # how many replies named each Bayes symbol

    @property
    def msgs_per_s(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


def scan_headers(*, settings: str = "") -> dict[str, str]:
    """The envelope Rspamd is told (as a milter or proxy would), plus optional settings."""
    headers = {
        "IP": "127.0.0.1",
        "Helo": "mail.bench.test",
        "From": "from@bench.test",
        "Rcpt": "to@example.org",
    }
    if settings:
        headers["Settings"] = settings
    return headers


async def scan(
    port: int,
    message: bytes,
    *,
    requests: int,
    in_flight: int = 8,
    headers: Mapping[str, str] | None = None,
    path: str = "/checkv2",
) -> ScanResult:
    """``requests`` POSTs of ``message`` to ``path`` with ``in_flight`` at a time; a reply
    counts only if it is 200 with a JSON object holding a numeric score."""
    remaining = requests
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    symbols: Counter[str] = Counter()

    async def lane() -> None:
        nonlocal remaining
        conn = HttpConnection(port)
        try:
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                try:
                    reply = await conn.request("POST", path, message, headers)
                except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                if reply.status != 200:
                    errors[f"HTTP {reply.status}"] += 1
                    continue
                try:
                    answer = json.loads(reply.body)
                    float(answer["score"])
                except (ValueError, KeyError, TypeError):
                    errors["reply without a score"] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                actions[str(answer.get("action", "?"))] += 1
                for name in answer.get("symbols", {}):
                    if name.startswith("BAYES_"):
                        symbols[name] += 1
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return ScanResult(
        requests=requests,
        in_flight=in_flight,
        ok=len(latencies),
        errors=dict(errors),
        elapsed=time.perf_counter() - start,
        latencies=tuple(latencies),
        actions=dict(actions),
        symbols=dict(symbols),
    )


def train_split(corpus: Path, labels: Path, which: str = "train") -> list[tuple[str, bytes]]:
    """(label, raw bytes) of every ``which`` row of the split file, read from the corpus
    tarballs in place (members ``easy_ham/...`` are the split's ``sa/easy_ham/...``), the
    mbox ``From `` line removed as in the anchors. Nothing is extracted or cached.

    Returned in a fixed shuffled order: the tarballs hold all ham, then all spam, and
    Rspamd declines to learn a message its Bayes already puts in that class, so the
    order decides what is learnt; shuffled, ham and spam are learnt side by side."""
    from relay.message import strip_mbox_from

    wanted: dict[str, str] = {}
    for n, line in enumerate(labels.read_text().splitlines()):
        cols = line.split("\t")
        if n == 0 and cols[0] == "relative_path":
            continue
        if len(cols) >= 3 and cols[2] == which:
            wanted[cols[0]] = cols[1]
    found: list[tuple[str, str, bytes]] = []
    for archive in sorted(corpus.glob("*.tar.bz2")):
        with tarfile.open(archive, "r:bz2") as tar:
            for member in tar:
                key = f"sa/{member.name}"
                if not member.isfile() or key not in wanted:
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    found.append((key, wanted[key], strip_mbox_from(handle.read())))
    found.sort()
    random.Random(17).shuffle(found)
    return [(label, raw) for _, label, raw in found]


@dataclass
class TrainResult:
    posted: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    learned: dict[str, int] = field(default_factory=dict)  # label -> messages learnt


async def train(
    controller: int, corpus: Sequence[tuple[str, bytes]], *, in_flight: int = 8
) -> TrainResult:
    """Post every message to ``/learnspam`` or ``/learnham``; then read the learn counts.
    Rspamd answers 208 for a message it already learnt and 4xx for one too short to
    learn from; both are counted, not fatal."""
    result = TrainResult()
    outcomes: Counter[str] = Counter()
    messages = iter(corpus)

    async def lane() -> None:
        conn = HttpConnection(controller)
        try:
            while True:
                item = next(messages, None)
                if item is None:
                    return
                label, raw = item
                path = "/learnspam" if label == "spam" else "/learnham"
                try:
                    reply = await conn.request("POST", path, raw)
                except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError) as exc:
                    outcomes[f"{label} {type(exc).__name__}"] += 1
                    continue
                outcomes[f"{label} {reply.status}"] += 1
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    result.elapsed = time.perf_counter() - start
    result.outcomes = dict(sorted(outcomes.items()))
    result.posted = sum(outcomes.values())
    result.learned = {
        label: outcomes.get(f"{label} 200", 0) for label in ("spam", "ham")
    }  # 200 = learnt; 204/208 = Rspamd's learn condition declined (already that class)
    return result


# ---------------------------------------------------------------------------------------
# The processes


class RspamdUnavailable(RuntimeError):
    """Rspamd is missing or did not come up; the bench reports the scenario skipped."""


@dataclass
class RspamdInstance:
    root: Path
    ports: Ports
    rspamd: subprocess.Popen[bytes]
    redis: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.root / "rspamd.log"

    def pids(self) -> list[int]:
        """Rspamd's main process, its workers, and the Redis behind its Bayes."""
        return [*descendants(self.rspamd.pid), *descendants(self.redis.pid)]

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def ready(self, within: float = 120.0) -> None:
        deadline = time.monotonic() + within
        for port in (self.ports.normal, self.ports.controller):
            while True:
                if self.rspamd.poll() is not None:
                    raise RspamdUnavailable(
                        f"rspamd exited with status {self.rspamd.returncode}: {self.log_tail()}"
                    )
                with contextlib.suppress(OSError, TimeoutError, HttpError, EOFError):
                    conn = HttpConnection(port)
                    try:
                        reply = await conn.request("GET", "/ping", limit=2)
                    finally:
                        await conn.close()
                    if reply.status == 200 and reply.body.strip() == b"pong":
                        break
                if time.monotonic() > deadline:
                    raise RspamdUnavailable(f"no answer on 127.0.0.1:{port}: {self.log_tail()}")
                await asyncio.sleep(0.2)
        await self._hyperscan_idle(deadline)

    async def _hyperscan_idle(self, deadline: float) -> None:
        """Rspamd compiles its regexps (hyperscan) in a helper after start; until it is done
        the workers fall back to slower matching, so timing waits for the helper to idle."""
        helpers = [p for p in descendants(self.rspamd.pid) if "hs_helper" in cmdline(p)]
        last = cpu_seconds(helpers)
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            now = cpu_seconds(helpers)
            if now - last < 0.02:
                return
            last = now

    def stop(self) -> str:
        """SIGTERM both, then SIGKILL whatever of either tree is left; how it went."""
        tree = self.pids()
        outcome = []
        for name, proc in (("rspamd", self.rspamd), ("redis", self.redis)):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    outcome.append(f"{name} killed")
        time.sleep(0.3)
        # Only processes of the trees we started that still run Rspamd or Redis (a pid
        # reused by an unrelated process in the meantime is left alone).
        left = [
            p
            for p in tree
            if p != os.getpid() and any(n in cmdline(p) for n in ("rspamd", "redis-server"))
        ]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            outcome.append(f"{len(left)} process(es) killed after the stop")
        return ", ".join(outcome) or "clean"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def start(*, workers: int = 2, dns: str = "") -> RspamdInstance:
    """Redis then Rspamd on free loopback ports, all files in a fresh temp dir."""
    binary = find_rspamd()
    if binary is None:
        raise RspamdUnavailable("rspamd is not installed (`make bench` apt-installs it as root)")
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise RspamdUnavailable("redis-server is not installed (make system-deps)")
    # Its own temp dir, not under the bench's (0700, root's): Rspamd's workers run as
    # _rspamd and must reach the config, the log and the hyperscan cache.
    root = Path(tempfile.mkdtemp(prefix="bench-rspamd-"))
    ports = Ports(free_port(), free_port(), free_port())
    write_config(root, ports, workers=workers, dns=dns)
    (root / "db").mkdir()
    user: str | None = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(RSPAMD_USER)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise RspamdUnavailable(
                f"user {RSPAMD_USER} missing (Debian's rspamd makes it)"
            ) from None
        user = RSPAMD_USER
        for folder, _, names in os.walk(root):
            os.chown(folder, entry.pw_uid, entry.pw_gid)
            for name in names:
                os.chown(Path(folder) / name, entry.pw_uid, entry.pw_gid)
    redis_argv = [redis_bin, "--port", str(ports.redis), "--bind", "127.0.0.1"]
    redis_argv += ["--save", "", "--appendonly", "no", "--dir", str(root)]
    with (root / "redis.log").open("wb") as out:
        redis = subprocess.Popen(redis_argv, stdout=out, stderr=subprocess.STDOUT)
    with (root / "rspamd.stdout").open("wb") as out:
        proc = subprocess.Popen(
            rspamd_argv(binary, root, user=user), stdout=out, stderr=subprocess.STDOUT
        )
    return RspamdInstance(root=root, ports=ports, rspamd=proc, redis=redis)
