"""Memory under many concurrent large messages (security issue 15, finding 8).

    .venv/bin/python -m bench.bigdata              # 50 sessions x 25 MB: bench/results/bigdata.*
    .venv/bin/python -m bench.bigdata --sessions 4 --size 5000000 --stem bigdata-quick
    .venv/bin/python -m bench.bigdata --baseline HEAD --stem bigdata-before   # code of a rev

The relay runs as ``make run`` would (authentication, the classifier, the default policy
and metrics on, one worker) under ``python -m relay.cli serve``, delivering over SMTP into
Postfix's smtp-sink, with a loopback DNS server answering for the sender (SPF, DKIM,
DMARC). ``--sessions`` clients connect at once and each sends one generated message of
``--size`` bytes (a short text part and a base64 attachment: 76-character lines, as mail
carries files), DKIM-signed so that the verification child hashes the whole body. A client
that gets a 4xx tries again after ``--retry-after`` seconds, as an MTA would (later), until
``--deadline``; every first answer and every final one is counted.

Meanwhile a probe client connects every 100 ms and says EHLO, NOOP, QUIT: how long the
relay keeps other clients waiting (target: under 1 s). Every 100 ms the whole process tree
of the relay (its process, the verification child, the classifier pool and its resource
tracker) is sampled: RSS from /proc/PID/status and PSS from /proc/PID/smaps_rollup
(shared pages counted once). Target: the tree stays under 1 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.postfix import SmtpSink, find_tool
from bench.procstats import PROC, descendants, load_average
from bench.run import export_tree
from bench.scenarios import without_classifier_rules
from bench.servers import ServerProcess, start_relay

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MiB = 1 << 20
SAMPLE_EVERY = 0.1  # seconds between samples of the process tree
PROBE_EVERY = 0.1  # seconds between probe sessions
CHUNK = 256 * 1024  # DATA is written in chunks, so the client holds one copy of the message
REPLY_TIMEOUT = 300.0
TREE_TARGET = 1024 * MiB
PROBE_TARGET = 1.0  # seconds
DOMAIN, SELECTOR = "bench.test", "big"
SENDER, RECIPIENT, HELO = f"from@{DOMAIN}", "to@example.org", f"mail.{DOMAIN}"


# --- the message ---------------------------------------------------------------------------


def big_message(size: int, seed: int = 15) -> tuple[bytes, dict[str, list[tuple[str, str, int]]]]:
    """A DKIM-signed MIME message of about ``size`` bytes (CRLF, base64 attachment) and the
    DNS zone that authenticates it."""
    from tests.support.dkimkeys import rsa_key, sign  # the test helpers' signer

    rng = random.Random(seed)
    text = (
        "Hello,\r\n\r\nThe figures for the quarter are attached; the summary is below.\r\n\r\n"
        + "Revenue grew in every region but one, and the delivery backlog is down again.\r\n" * 40
    )
    head = (
        f"From: Bench Sender <sender@{DOMAIN}>\r\nTo: <{RECIPIENT}>\r\n"
        "Subject: Quarterly figures (large attachment)\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <bigdata-0001@{DOMAIN}>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        '--b1\r\nContent-Type: text/plain; charset="us-ascii"\r\n\r\n'
        f"{text}\r\n--b1\r\n"
        'Content-Type: application/octet-stream; name="figures.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="figures.bin"\r\n\r\n'
    ).encode()
    tail = b"\r\n--b1--\r\n"
    room = size - len(head) - len(tail) - 600  # the DKIM-Signature field added below
    lines = room // 78  # 76 base64 characters + CRLF
    blob = base64.b64encode(rng.randbytes(lines * 57))  # 57 bytes make one 76-character line
    body = b"\r\n".join(blob[i : i + 76] for i in range(0, len(blob), 76))
    key = rsa_key(DOMAIN, SELECTOR)
    message = sign(head + body + tail, key, include_headers=[b"from", b"to", b"subject"])
    ttl = 86400
    zone = {
        f"{DOMAIN}.": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", ttl)],
        f"{HELO}.": [("A", "127.0.0.1", ttl), ("TXT", "v=spf1 a -all", ttl)],
        f"_dmarc.{DOMAIN}.": [("TXT", "v=DMARC1; p=reject; adkim=r; aspf=r", ttl)],
        "1.0.0.127.in-addr.arpa.": [("PTR", f"{HELO}.", ttl)],
        f"{key.name}.": [("TXT", key.txt, ttl)],
    }
    return message, zone


def stuffed(message: bytes) -> bytes:
    """The DATA payload: dot-stuffed, with the final dot."""
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"


# --- the process tree ----------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int | None:
    """Proportional set size (shared pages split between their users), None if unreadable."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def role(pid: int, root: int) -> str:
    """What a process of the relay's tree is, from its command line."""
    if pid == root:
        return "relay"
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv).decode(errors="replace")
    if "relay.auth.cryptoproc" in text:
        return "verification child"
    if "relay.analysis" in text:
        return "analysis child"
    if "resource_tracker" in text:
        return "resource tracker"
    if "multiprocessing" in text:
        return "classifier worker"
    return "other"


@dataclass
class TreeSampler:
    """Peak RSS/PSS of the whole tree, per role, and a coarse timeline."""

    root: int
    peak_rss: int = 0
    peak_pss: int = 0
    pss_readable: bool = True
    peak_by_role: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s, tree RSS)
    samples: int = 0

    def sample(self, since: float) -> dict[str, int]:
        by_role: Counter[str] = Counter()
        rss = pss = 0
        for pid in descendants(self.root):
            kb = _status_kb(pid, "VmRSS:")
            by_role[role(pid, self.root)] += kb * 1024
            rss += kb * 1024
            p = _pss_kb(pid)
            if p is None:
                self.pss_readable = False
            else:
                pss += p * 1024
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        for name, value in by_role.items():
            self.peak_by_role[name] = max(self.peak_by_role.get(name, 0), value)
        if self.samples % 10 == 1:  # one point a second in the results
            self.timeline.append((round(time.monotonic() - since, 1), rss))
        return dict(by_role)

    async def run(self, since: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample(since)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


# --- clients -------------------------------------------------------------------------------


class Session:
    """One raw SMTP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Session:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), REPLY_TIMEOUT
        )
        return cls(reader, writer)

    async def reply(self) -> int:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if len(line) < 4:
                raise ConnectionError("connection closed")
            if line[3:4] != b"-":
                return int(line[:3])

    async def command(self, line: bytes) -> int:
        self.writer.write(line)
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Outcomes:
    first: Counter[str] = field(default_factory=Counter)  # first answer of each client
    final: Counter[str] = field(default_factory=Counter)  # how each client ended
    attempts: int = 0
    delivered_at: list[float] = field(default_factory=list)  # seconds from the start


async def attempt(port: int, payload: bytes, size: int, size_hint: bool) -> str:
    """One transaction: "250", or the stage and code that refused it ("MAIL 452")."""
    session = await Session.open(port)
    try:
        if (code := await session.reply()) != 220:
            return f"greeting {code}"
        if (code := await session.command(f"EHLO {HELO}\r\n".encode())) != 250:
            return f"EHLO {code}"
        param = f" SIZE={size}" if size_hint else ""
        if (code := await session.command(f"MAIL FROM:<{SENDER}>{param}\r\n".encode())) != 250:
            return f"MAIL {code}"
        if (code := await session.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode())) != 250:
            return f"RCPT {code}"
        if (code := await session.command(b"DATA\r\n")) != 354:
            return f"DATA {code}"
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK):
            session.writer.write(view[start : start + CHUNK])
            await session.writer.drain()
        code = await session.reply()
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            await session.command(b"QUIT\r\n")
        return "250" if code == 250 else f"end of data {code}"
    finally:
        await session.close()


async def client(
    port: int,
    payload: bytes,
    size: int,
    opts: argparse.Namespace,
    outcomes: Outcomes,
    since: float,
) -> None:
    first = True
    while True:
        outcomes.attempts += 1
        try:
            result = await attempt(port, payload, size, opts.size_hint)
        except (OSError, TimeoutError, ConnectionError) as exc:
            result = type(exc).__name__
        if first:
            outcomes.first[result] += 1
            first = False
        temporary = result[-3:].startswith("4") or not result[-3:].isdigit()
        if result == "250":
            outcomes.delivered_at.append(time.monotonic() - since)
        if result == "250" or not temporary or time.monotonic() - since > opts.deadline:
            outcomes.final[result] += 1
            return
        await asyncio.sleep(opts.retry_after)


@dataclass
class ProbeStats:
    sessions: list[float] = field(default_factory=list)  # connect .. 221, seconds
    slowest_reply: list[float] = field(default_factory=list)  # per session, seconds
    failures: Counter[str] = field(default_factory=Counter)


async def probe_once(port: int, stats: ProbeStats) -> None:
    start = time.perf_counter()
    slowest = 0.0
    try:
        session = await Session.open(port)
    except (OSError, TimeoutError) as exc:
        stats.failures[type(exc).__name__] += 1
        return
    try:
        for line, expect in ((b"", 220), (b"EHLO probe.test\r\n", 250), (b"NOOP\r\n", 250)):
            t = time.perf_counter()
            code = await (session.command(line) if line else session.reply())
            slowest = max(slowest, time.perf_counter() - t)
            if code != expect:
                stats.failures[f"{line[:4].decode() or 'greeting'} {code}"] += 1
                return
        t = time.perf_counter()
        await session.command(b"QUIT\r\n")
        slowest = max(slowest, time.perf_counter() - t)
    except (OSError, TimeoutError, ConnectionError) as exc:
        stats.failures[type(exc).__name__] += 1
        return
    finally:
        await session.close()
    stats.sessions.append(time.perf_counter() - start)
    stats.slowest_reply.append(slowest)


async def prober(port: int, stats: ProbeStats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await probe_once(port, stats)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_EVERY)


# --- the run -------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _short(rev: str) -> str:
    """The abbreviated commit a revision names (read-only ``git rev-parse``)."""
    found = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True
    )
    return found.stdout.strip() or rev


def relay_overrides(
    dns: str, smtp: dict[str, Any], work: Path, classifier: bool
) -> dict[str, dict[str, Any]]:
    """config/relay.toml's features (auth, classifier, default policy, metrics; one worker);
    without the classifier (a quick look, not the figure) its rules are left out."""
    policy = REPO / "config" / "policy.toml"
    if not classifier:
        policy = without_classifier_rules(policy, work / "policy-nomodel.toml")
    return {
        "smtp": {"max_connections": 500, **smtp},
        "auth": {"enabled": True},
        "dns": {"nameservers": [dns], "timeout": 2},
        "model": {"enabled": classifier, "path": str(REPO / "models" / "spam.skops")},
        "policy": {"path": str(policy)},
        "metrics": {"enabled": True},
    }


async def settle(sampler: TreeSampler, since: float, seconds: float) -> dict[str, int]:
    """RSS by role after ``seconds`` of quiet: what the tree keeps after the load."""
    end = time.monotonic() + seconds
    by_role = sampler.sample(since)
    while time.monotonic() < end:
        await asyncio.sleep(SAMPLE_EVERY)
        by_role = sampler.sample(since)
    return by_role


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    if find_tool("smtp-sink") is None:
        raise SystemExit("smtp-sink not found: install Postfix (make system-deps)")
    from tests.support.dnsserver import LocalDns  # the auth helpers' loopback DNS server

    work = Path(tempfile.mkdtemp(prefix="relay-bigdata-"))
    t0 = time.perf_counter()
    message, zone = big_message(opts.size)
    payload = stuffed(message)
    made = time.perf_counter() - t0
    src = export_tree(opts.baseline, work / "baseline") if opts.baseline else None
    smtp: dict[str, Any] = dict(json.loads(opts.smtp)) if opts.smtp else {}
    sink = SmtpSink(work)
    dns = LocalDns({name: list(records) for name, records in zone.items()}).start()
    relay: ServerProcess | None = None
    try:
        await sink.ready()
        relay = start_relay(
            "relay", work / "relay", sink.port, workers=1,
            overrides=relay_overrides(dns.address, smtp, work, opts.classifier), src=src,
        )  # fmt: skip
        try:
            await relay.ready()
        except (TimeoutError, RuntimeError) as exc:
            raise SystemExit(f"the relay did not start: {exc}\n{relay.log_tail(20)}") from None
        await asyncio.sleep(2)  # the classifier pool and the verification child settle
        since = time.monotonic()
        sampler = TreeSampler(relay.pid)
        idle = await settle(sampler, since, 1.0)
        stop = asyncio.Event()
        probes = ProbeStats()
        watchers = [
            asyncio.create_task(sampler.run(since, stop)),
            asyncio.create_task(prober(relay.port, probes, stop)),
        ]
        outcomes = Outcomes()
        start = time.monotonic()
        await asyncio.gather(
            *(
                client(relay.port, payload, len(message), opts, outcomes, start)
                for _ in range(opts.sessions)
            )
        )
        elapsed = time.monotonic() - start
        stop.set()
        await asyncio.gather(*watchers)
        after = await settle(sampler, since, opts.settle)
        delivered = await sink.wait_delivered(len(outcomes.delivered_at), within=10)
        stopped = relay.stop()
    finally:
        if relay is not None and relay.proc.poll() is None:
            relay.stop()
        sink.stop()
        dns.stop()
        shutil.rmtree(work, ignore_errors=True)

    sessions_ms = [v * 1000 for v in probes.sessions]
    slowest_ms = [v * 1000 for v in probes.slowest_reply]
    return {
        "bench": "bigdata",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_after": [round(v, 2) for v in load_average()],
        },
        "code": f"git {_short(opts.baseline)}" if opts.baseline else "working tree",
        "config": {
            "sessions": opts.sessions,
            "message_bytes": len(message),
            "size_hint": opts.size_hint,
            "retry_after_s": opts.retry_after,
            "deadline_s": opts.deadline,
            "smtp_overrides": smtp,
            "features": (
                "auth + classifier + default policy + metrics, 1 worker"
                if opts.classifier
                else "auth + default policy without its classifier rules + metrics, 1 worker"
            ),
            "message_made_s": round(made, 1),
        },
        "elapsed_s": round(elapsed, 1),
        "outcomes": {
            "first_answer": dict(outcomes.first),
            "final": dict(outcomes.final),
            "attempts": outcomes.attempts,
            "accepted": len(outcomes.delivered_at),
            "at_sink": delivered,
            "last_delivered_s": round(max(outcomes.delivered_at, default=0.0), 1),
        },
        "memory_mib": {
            "idle_tree_rss": round(sum(idle.values()) / MiB, 1),
            "peak_tree_rss": round(sampler.peak_rss / MiB, 1),
            "peak_tree_pss": round(sampler.peak_pss / MiB, 1) if sampler.pss_readable else None,
            "idle_by_role": {k: round(v / MiB, 1) for k, v in idle.items()},
            "peak_by_role": {k: round(v / MiB, 1) for k, v in sampler.peak_by_role.items()},
            f"after_{opts.settle:.0f}s_by_role": {k: round(v / MiB, 1) for k, v in after.items()},
            "samples": sampler.samples,
            "timeline_s_rss": [(s, round(v / MiB)) for s, v in sampler.timeline],
        },
        "probe_ms": {
            "sessions": len(sessions_ms),
            "failures": dict(probes.failures),
            "session_p50": round(_pct(sessions_ms, 0.5), 1),
            "session_p99": round(_pct(sessions_ms, 0.99), 1),
            "session_max": round(max(sessions_ms, default=0.0), 1),
            "slowest_reply_max": round(max(slowest_ms, default=0.0), 1),
        },
        "targets": {
            "tree_under_1_GiB": sampler.peak_rss < TREE_TARGET,
            "probe_under_1_s": max(sessions_ms, default=0.0) < PROBE_TARGET * 1000
            and not probes.failures,
            "nothing_lost": delivered == len(outcomes.delivered_at),
        },
        "shutdown": stopped,
    }


def markdown(data: dict[str, Any]) -> str:
    c, o, m, p = data["config"], data["outcomes"], data["memory_mib"], data["probe_ms"]
    mb = c["message_bytes"] / 1e6
    after_key = next(k for k in m if k.startswith("after_"))
    lines = [
        "# Large messages: memory and responsiveness",
        "",
        f"`python -m bench.bigdata` on {data['machine']['cpus']} CPUs, Python "
        f"{data['machine']['python']}, {data['when']}, code: {data['code']}. "
        f"{c['sessions']} clients at once, each sending one {mb:.1f} MB DKIM-signed message "
        f"(base64 attachment, 76-character lines) {'with' if c['size_hint'] else 'without'} "
        f"SIZE= on MAIL; a client answered 4xx retries after {c['retry_after_s']:.0f} s. "
        f"Relay: {c['features']}; `[smtp]` overrides: {json.dumps(c['smtp_overrides'])}. "
        "Downstream: Postfix smtp-sink; DNS: a loopback server. RSS and PSS of the relay's "
        "whole process tree sampled every 100 ms; a probe client does EHLO/NOOP/QUIT every "
        "100 ms throughout.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| tree RSS idle | {m['idle_tree_rss']:.0f} MiB |",
        f"| **peak tree RSS** | **{m['peak_tree_rss']:.0f} MiB** |",
        f"| peak tree PSS | {m['peak_tree_pss'] if m['peak_tree_pss'] is not None else '-'} MiB |",
        f"| probe session p50 / p99 / max | {p['session_p50']:.0f} / {p['session_p99']:.0f} / "
        f"{p['session_max']:.0f} ms ({p['sessions']} probes, failures: "
        f"{p['failures'] or 'none'}) |",
        f"| first answers | {o['first_answer']} |",
        f"| final answers ({o['attempts']} attempts) | {o['final']} |",
        f"| accepted / arrived at the sink | {o['accepted']} / {o['at_sink']} |",
        f"| all {c['sessions']} done after | {data['elapsed_s']:.0f} s |",
        "",
        "| process | idle RSS | peak RSS | RSS after the load |",
        "|---|---:|---:|---:|",
    ]
    for name in sorted(m["peak_by_role"]):
        lines.append(
            f"| {name} | {m['idle_by_role'].get(name, 0):.0f} MiB | "
            f"{m['peak_by_role'][name]:.0f} MiB | {m[after_key].get(name, 0):.0f} MiB |"
        )
    t = data["targets"]
    lines += [
        "",
        f"Targets: tree under 1 GiB: {'met' if t['tree_under_1_GiB'] else 'missed'}; "
        f"probe answered within 1 s: {'met' if t['probe_under_1_s'] else 'missed'}; "
        f"every accepted message at the sink: {'yes' if t['nothing_lost'] else 'NO'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=25_000_000, help="message bytes")
    parser.add_argument("--size-hint", action="store_true", help="declare SIZE= on MAIL")
    parser.add_argument("--retry-after", type=float, default=2.0)
    parser.add_argument("--deadline", type=float, default=900.0, help="stop retrying after")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds watched after")
    parser.add_argument("--smtp", default="", help='JSON of [smtp] overrides, e.g. {"x": 1}')
    parser.add_argument("--baseline", default="", help="run the relay of this git revision")
    parser.add_argument(
        "--no-classifier", dest="classifier", action="store_false", help="a quick look only"
    )
    parser.add_argument("--stem", default="bigdata", help="bench/results/STEM.{json,md}")
    opts = parser.parse_args(argv)
    data = asyncio.run(run(opts))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{opts.stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{opts.stem}.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
