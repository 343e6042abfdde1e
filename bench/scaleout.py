"""Scale-out bench: relay instances sharing one Redis, 1 instance against 2, in one run.

    python -m bench.scaleout                      # 2,000 messages per phase, 3 rounds
    python -m bench.scaleout --messages 500 --rounds 1 --out var/scaleout.json
    python -m bench.scaleout --no-model           # classifier off (fast; the smoke test)

Everything runs on loopback: one private redis-server (own temp --dir, no persistence),
smtp-sink as the downstream, the bench's loopback DNS serving the test message's SPF,
DKIM and DMARC records, and two ``relay serve`` instances with ``[state] backend =
"redis"`` on that Redis, the same key file, their own ports and work directories, each
``[smtp] workers = 1`` and otherwise configured as the throughput bench's "everything on"
relay (authentication, the shipped classifier, the default policy in shadow mode,
metrics). Two configurations are timed in interleaved rounds, so background load hits
both alike:

- ``one``: a single instance takes the whole load (smtp-source, 20 sessions), the
  instances taking turns round by round;
- ``two``: both instances at once, half the messages and half the sessions each (two
  smtp-source processes, as DNS round robin over two equal MX hosts would split it).

Reported per configuration (median round): msgs/s in total, relay CPU ms per message
(every process tree that took load), Redis CPU ms per message and commands per message and
per second (``INFO stats`` total_commands_processed), peak RSS/PSS of the relay trees and
Redis's RSS. After the rounds the bench checks that the instances really shared state:
keys in Redis by family, and, for each ``two`` phase, how many connections both instances
recorded under the one connection-rate key (a relay with another key or another Redis
would have written half of them elsewhere).

The default policy reads no windowed state (only the feedback store's reputation), so a
relay running it records nothing in Redis. The bench's copy therefore starts with four
rules reading ``bulk_count``, ``sender_volume_24h``, ``connection_rate`` and
``known_correspondent`` at thresholds the test message never reaches: nothing fires, but
every message reads and records the windows a site using bulk rules (config/regimes/)
shares through Redis. The machine has 2 cores shared with other jobs: absolute figures are
noisy; the 1 vs 2 instance ratio of one run is what carries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import mail
from bench.net import free_port
from bench.postfix import SmtpSink, find_tool, smtp_source
from bench.procstats import (
    MachineCpu,
    cpu_seconds,
    load_average,
    pss_bytes,
    rss_bytes,
)
from bench.run import run_meta
from bench.scenarios import in_shadow_mode, without_classifier_rules
from bench.servers import ServerProcess, TomlValue, start_relay

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
INSTANCES = ("a", "b")
SESSIONS = 20  # in total, as bench.run: split 10 + 10 when both instances take load
# A connection is recorded as (client ip, source port), and the kernel reuses source
# ports within a phase of 2,000 connections (about 2-4 % of them, measured), so a shared
# key holds a little under one member per message; split keys would hold about half.
SHARED_SHARE = 0.8
PSS_EVERY = 4  # RSS samples per PSS sample (smaps_rollup walks page tables: costlier)
# Rules that read every windowed state fact at thresholds the bench message never
# reaches: no score changes, but the recorder writes each window for every message.
STATE_RULES = """
[[rule]]
name = "scaleout_bulk"
when = "bulk_count >= 1000000"
score = 1.0
reason = "bench: reads the shared bulk counts"

[[rule]]
name = "scaleout_volume"
when = "sender_volume_24h >= 100000000"
score = 1.0
reason = "bench: reads the shared sender volumes"

[[rule]]
name = "scaleout_rate"
when = "connection_rate >= 100000000.0"
score = 1.0
reason = "bench: reads the shared connection rates"

[[rule]]
name = "scaleout_correspondent"
when = "known_correspondent && recipient_count >= 1000000"
score = 1.0
reason = "bench: reads the shared correspondents"
"""
NOTE = (
    "run on a shared 2-core machine: other jobs used the same cores (see the load "
    "averages and each round), so absolute msgs/s are noisy; trust the same-run ratio of "
    "2 instances to 1 and CPU per message"
)


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    rounds: int
    warmup: int
    out: Path
    model: bool


class RedisServer:
    """A private redis-server on a free loopback port, in its own directory (a
    redis-server loads any dump.rdb in its --dir), with no persistence at all."""

    def __init__(self, home: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: install it (make system-deps)")
        self.port = free_port()
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(home)]
        with (home / "redis.log").open("wb") as out:
            # Without libfaketime (make unit-future runs the smoke test under it):
            # redis-server's allocator recurses into its clock_gettime and never starts.
            env = dict(os.environ)
            env["LD_PRELOAD"] = " ".join(
                p for p in re.split(r"[:\s]+", env.get("LD_PRELOAD", "")) if "faketime" not in p
            )
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ready(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(redis.RedisError):
                if self.client.ping():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start (log in {self.home})")
            time.sleep(0.05)

    def commands(self) -> int:
        return int(self.client.info("stats")["total_commands_processed"])

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench_policy(work: Path, *, model: bool) -> Path:
    """The default policy in shadow mode (classifier rules removed without the model),
    with STATE_RULES first, so every message reads each shared window."""
    policy = in_shadow_mode(REPO / "config" / "policy.toml", work / "policy-shadow.toml")
    if not model:
        policy = without_classifier_rules(policy, work / "policy-nomodel.toml")
    head, sep, rules = policy.read_text().partition("\n[[rule]]\n")
    dest = work / "policy-scaleout.toml"
    dest.write_text(head + "\n" + STATE_RULES.strip("\n") + "\n" + sep + rules)
    return dest


def instance_overrides(
    *, redis_url: str, key_file: Path, policy: Path, dns: str, model: bool
) -> dict[str, dict[str, TomlValue]]:
    """bench.scenarios' relay-full-wN, with state in the shared Redis and a shared key."""
    overrides: dict[str, dict[str, TomlValue]] = {
        "auth": {"enabled": True},
        "dns": {"nameservers": [dns], "timeout": 2},
        "policy": {"path": str(policy)},
        "model": {"enabled": False},
        "metrics": {"enabled": True},
        "state": {"backend": "redis", "url": redis_url, "timeout": 1.0},
        "security": {"key_file": str(key_file)},
    }
    if model:
        overrides["model"] = {"enabled": True, "path": str(REPO / "models" / "spam.skops")}
    return overrides


@dataclass
class Phase:
    config: str  # "one" or "two"
    instances: tuple[str, ...]
    sent: int
    delivered: int
    elapsed: float
    relay_cpu: float
    redis_cpu: float
    redis_commands: int
    peak_rss: int
    peak_pss: int
    redis_rss: int
    machine_busy: float
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ok, el = self.delivered, self.elapsed
        return {
            "instances": list(self.instances),
            "sent": self.sent,
            "delivered": ok,
            "elapsed_s": round(el, 3),
            "msgs_per_s": round(ok / el, 1) if el else 0.0,
            "relay_cpu_ms_per_msg": round(1000 * self.relay_cpu / ok, 3) if ok else None,
            "redis_cpu_ms_per_msg": round(1000 * self.redis_cpu / ok, 4) if ok else None,
            "redis_commands_per_msg": round(self.redis_commands / ok, 2) if ok else None,
            "redis_ops_per_s": round(self.redis_commands / el, 1) if el else 0.0,
            "relay_cpu_cores": round(self.relay_cpu / el, 2) if el else 0.0,
            "relay_peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "relay_peak_pss_mb": round(self.peak_pss / 2**20, 1),
            "redis_peak_rss_mb": round(self.redis_rss / 2**20, 1),
            "machine_busy": round(self.machine_busy, 2),
            "errors": self.errors,
        }


class Bench:
    def __init__(self, sink: SmtpSink, redis_server: RedisServer, message_file: Path) -> None:
        self.sink = sink
        self.redis = redis_server
        self.message_file = message_file
        self.servers: dict[str, ServerProcess] = {}

    def pids(self, names: Sequence[str]) -> list[int]:
        return [pid for name in names for pid in self.servers[name].tree()]

    async def _sample(self, names: Sequence[str], peak: list[int], stop: asyncio.Event) -> None:
        """peak: [relay RSS, relay PSS, Redis RSS], sampled every 250 ms."""
        n = 0
        while not stop.is_set():
            pids = self.pids(names)
            peak[0] = max(peak[0], rss_bytes(pids))
            if n % PSS_EVERY == 0:
                peak[1] = max(peak[1], pss_bytes(pids))
            peak[2] = max(peak[2], rss_bytes([self.redis.proc.pid]))
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    async def phase(self, config: str, names: Sequence[str], messages: int) -> Phase:
        """``messages`` split evenly over ``names``, SESSIONS split the same way, all at
        once; what arrived is counted at the sink."""
        share = [
            messages // len(names) + (1 if i < messages % len(names) else 0)
            for i in range(len(names))
        ]
        sessions = max(1, SESSIONS // len(names))
        redis_pid = [self.redis.proc.pid]
        sunk0, cmds0 = self.sink.delivered(), self.redis.commands()
        cpu0, rcpu0, machine0 = (
            cpu_seconds(self.pids(names)),
            cpu_seconds(redis_pid),
            MachineCpu.read(),
        )
        peak, stop = [0, 0, 0], asyncio.Event()
        sampler = asyncio.create_task(self._sample(names, peak, stop))
        start = time.perf_counter()
        try:
            runs = await asyncio.gather(
                *(
                    smtp_source(
                        self.servers[name].port, self.message_file, messages=m, sessions=sessions
                    )
                    for name, m in zip(names, share, strict=True)
                )
            )
        finally:
            elapsed = time.perf_counter() - start
            stop.set()
            await sampler
        relay_cpu = cpu_seconds(self.pids(names)) - cpu0
        redis_cpu = cpu_seconds(redis_pid) - rcpu0
        busy = MachineCpu.read().utilisation_since(machine0)
        delivered = await self.sink.wait_delivered(sunk0 + messages) - sunk0
        commands = self.redis.commands() - cmds0 - 1  # minus our own INFO
        errors: dict[str, int] = {}
        for run in runs:
            if run.returncode:
                key = f"smtp-source exit {run.returncode}"
                errors[key] = errors.get(key, 0) + 1
            if run.stderr:
                errors[run.stderr.splitlines()[-1][:160]] = 1
        if delivered != messages:
            errors["not at sink"] = messages - delivered
        return Phase(
            config, tuple(names), messages, delivered, elapsed, relay_cpu, redis_cpu,
            commands, peak[0], peak[1], peak[2], busy, errors,
        )  # fmt: skip


def connections_recorded(client: redis.Redis[bytes], since: float, until: float) -> int:
    """Members with a score in [since, until] in the largest ``relay:w:*`` sorted set:
    the connection-rate window of 127.0.0.1 (one member per connection, scored with its
    arrival time) holds both instances' connections if, and only if, they share the Redis
    and the key."""
    best = 0
    for name in client.scan_iter(match="relay:w:*", count=1000):
        with contextlib.suppress(redis.ResponseError):  # WRONGTYPE: not a window
            best = max(best, int(client.zcount(name, since, until)))
    return best


def keys_by_family(client: redis.Redis[bytes]) -> dict[str, int]:
    """Key counts by their first two name segments (relay:w:..., relay:fb:...)."""
    out: dict[str, int] = {}
    for name in client.scan_iter(match="*", count=1000):
        text = name.decode(errors="replace")
        family = (
            ":".join(text.split(":")[:3])
            if text.startswith("relay:w:")
            else ":".join(text.split(":")[:2])
        )
        family = re.sub(r"[0-9a-f]{16,}", "<hash>", family)
        out[family] = out.get(family, 0) + 1
    return dict(sorted(out.items()))


async def scrape_messages(port: int) -> float:
    """Sum of relay_messages_total on an instance's /metrics (what it decided)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    total = 0.0
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("relay_messages_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = statistics.median(run["msgs_per_s"] for run in runs)
    return min(runs, key=lambda run: abs(run["msgs_per_s"] - median))


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pick = _median_round(runs)
    return {
        "msgs_per_s": statistics.median(run["msgs_per_s"] for run in runs),
        "relay_cpu_ms_per_msg": pick["relay_cpu_ms_per_msg"],
        "redis_cpu_ms_per_msg": pick["redis_cpu_ms_per_msg"],
        "redis_commands_per_msg": pick["redis_commands_per_msg"],
        "redis_ops_per_s": pick["redis_ops_per_s"],
        "relay_cpu_cores": pick["relay_cpu_cores"],
        "machine_busy": pick["machine_busy"],
        "relay_peak_rss_mb": max(run["relay_peak_rss_mb"] for run in runs),
        "relay_peak_pss_mb": max(run["relay_peak_pss_mb"] for run in runs),
        "redis_peak_rss_mb": max(run["redis_peak_rss_mb"] for run in runs),
        "errors": sum(run["sent"] - run["delivered"] for run in runs),
        "rounds": runs,
    }


async def run_bench(opts: Options) -> dict[str, Any]:
    for tool in ("smtp-sink", "smtp-source"):
        if find_tool(tool) is None:
            raise SystemExit(f"{tool} not found: install Postfix (make system-deps)")
    if opts.model and not (REPO / "models" / "spam.skops").exists():
        raise SystemExit("models/spam.skops not found: train it, or run with --no-model")
    from tests.support.dnsserver import LocalDns  # the auth helper's loopback DNS server

    from relay.secretkey import load_key

    work = Path(tempfile.mkdtemp(prefix="relay-scaleout-"))
    started, load_before = time.time(), load_average()
    notes = [NOTE]
    bench_mail = mail.build(work)
    message_file = bench_mail.write_for_smtp_source(work / "message.eml")
    if not bench_mail.signed:
        notes.append("openssl missing: the test message is not DKIM-signed")
    key_file = work / "relay.key"
    load_key(key_file, create=True)  # relays sharing a Redis share the key
    policy = bench_policy(work, model=opts.model)
    redis_server = RedisServer(work / "redis")
    sink = SmtpSink(work)
    dns = LocalDns({name: list(records) for name, records in bench_mail.zone.items()}).start()
    bench = Bench(sink, redis_server, message_file)
    rounds: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
    shared: dict[str, Any] = {}
    instances: dict[str, dict[str, Any]] = {}
    try:
        redis_server.ready()
        await sink.ready()
        overrides = instance_overrides(
            redis_url=redis_server.url, key_file=key_file, policy=policy,
            dns=dns.address, model=opts.model,
        )  # fmt: skip
        for name in INSTANCES:
            bench.servers[name] = start_relay(
                f"relay-{name}", work / name, sink.port, workers=1, overrides=overrides
            )
        t0 = time.monotonic()
        await asyncio.gather(*(s.ready() for s in bench.servers.values()))
        for name, server in bench.servers.items():
            instances[name] = {"smtp_processes": await server.wait_workers(1)}
        print(f"  instances up in {time.monotonic() - t0:.1f} s", flush=True)
        for name in INSTANCES:  # imports, pools, DNS cache, the first Redis connections
            warm = await bench.phase("warmup", [name], opts.warmup)
            instances[name]["warmup"] = warm.summary()
        two_phases: list[dict[str, int]] = []
        for r in range(opts.rounds):
            single = INSTANCES[r % len(INSTANCES)]  # the lone instance takes turns
            plan: list[tuple[str, list[str]]] = [("one", [single]), ("two", list(INSTANCES))]
            for config, names in plan if r % 2 == 0 else plan[::-1]:
                wall0 = time.time()
                phase = await bench.phase(config, names, opts.messages)
                if config == "two":  # read at once: phases in turn, so the window is ours
                    seen = connections_recorded(redis_server.client, wall0, time.time())
                    two_phases.append(
                        {"delivered": phase.delivered, "connections_in_one_key": seen}
                    )
                summary = phase.summary()
                rounds[config].append(summary)
                print(
                    f"  round {r + 1} {config}: {summary['msgs_per_s']} msgs/s, relay "
                    f"{summary['relay_cpu_ms_per_msg']} ms/msg, redis "
                    f"{summary['redis_ops_per_s']} ops/s, errors {summary['errors']}",
                    flush=True,
                )
        client = redis_server.client
        shared = {
            "dbsize": int(client.dbsize()),
            "keys_by_family": keys_by_family(client),
            # which commands the relays send (all phases, warm-ups included)
            "commands": {
                name.removeprefix("cmdstat_"): int(stats["calls"])
                for name, stats in sorted(
                    client.info("commandstats").items(), key=lambda kv: -int(kv[1]["calls"])
                )
            },
            "two_instance_phases": two_phases,
        }
        for name, server in bench.servers.items():
            assert server.metrics_port is not None
            instances[name]["messages_decided"] = await scrape_messages(server.metrics_port)
    finally:
        for name, server in bench.servers.items():
            instances.setdefault(name, {})["stop"] = server.stop()
        with contextlib.suppress(redis.RedisError):
            shared["redis_version"] = redis_server.version()
        redis_server.stop()
        sink.stop()
        dns.stop()
        shutil.rmtree(work, ignore_errors=True)

    one, two = _summarise(rounds["one"]), _summarise(rounds["two"])
    ratios = {
        "msgs_per_s_two_over_one": round(two["msgs_per_s"] / one["msgs_per_s"], 2)
        if one["msgs_per_s"]
        else None,
        "relay_cpu_per_msg_two_over_one": round(
            two["relay_cpu_ms_per_msg"] / one["relay_cpu_ms_per_msg"], 2
        )
        if one["relay_cpu_ms_per_msg"] and two["relay_cpu_ms_per_msg"]
        else None,
    }
    phases = shared.get("two_instance_phases", [])
    shared["state_shared"] = bool(shared.get("dbsize")) and all(
        p["connections_in_one_key"] >= SHARED_SHARE * p["delivered"] for p in phases
    )
    return {
        "meta": {
            **run_meta(started, load_before, bench_mail, asdict(opts)),
            "sessions": SESSIONS,
            "relay": (
                "relay serve, [smtp] workers = 1 per instance; auth on, "
                + ("classifier on (models/spam.skops), " if opts.model else "classifier off, ")
                + "default policy in shadow mode + 4 state-reading rules, metrics on, "
                "[state] backend = redis (one shared redis-server), one shared key file"
            ),
            "notes": notes,
        },
        "configs": {"one": one, "two": two},
        "ratios": ratios,
        "instances": instances,
        "shared_state": shared,
    }


def markdown(results: dict[str, Any]) -> str:
    meta, one, two = results["meta"], results["configs"]["one"], results["configs"]["two"]
    ratios, shared = results["ratios"], results["shared_state"]
    load_b = ", ".join(f"{v:.2f}" for v in meta["load_average_before"])
    load_a = ", ".join(f"{v:.2f}" for v in meta["load_average_after"])
    opts = meta["options"]
    lines = [
        "# Scale-out: relay instances sharing one Redis",
        "",
        f"`python -m bench.scaleout`, {meta['started_utc']}, commit {meta['commit']}, "
        f"{meta['duration_s']} s, {meta['cores']} cores; load average before {load_b}, "
        f"after {load_a}.",
        "",
        f"{meta['relay']}. {opts['messages']} messages per phase (4 KB, DKIM-signed), "
        f"{opts['rounds']} interleaved rounds after {opts['warmup']} warm-up messages per "
        f"instance; smtp-source, {meta['sessions']} sessions in total (10 + 10 with two "
        "instances), a new connection per message, into smtp-sink. Median round.",
        "",
        "| configuration | msgs/s | relay CPU ms/msg | Redis CPU ms/msg | Redis cmds/msg "
        "| Redis ops/s | relay cores used | relay peak RSS / PSS MiB | Redis RSS MiB "
        "| not delivered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in (("1 instance", one), ("2 instances", two)):
        lines.append(
            f"| {label} | {row['msgs_per_s']:,} | {row['relay_cpu_ms_per_msg']} "
            f"| {row['redis_cpu_ms_per_msg']} | {row['redis_commands_per_msg']} "
            f"| {row['redis_ops_per_s']:,} | {row['relay_cpu_cores']} "
            f"| {row['relay_peak_rss_mb']:.0f} / "
            f"{row['relay_peak_pss_mb']:.0f} | {row['redis_peak_rss_mb']:.0f} | {row['errors']} |"
        )
    lines += [
        "",
        f"2 instances / 1: **{ratios['msgs_per_s_two_over_one']}x** msgs/s, "
        f"{ratios['relay_cpu_per_msg_two_over_one']}x relay CPU per message.",
        "",
        "Each round (msgs/s, relay CPU ms/msg, machine busy):",
        "",
    ]
    for label, row in (("1 instance", one), ("2 instances", two)):
        cells = "; ".join(
            f"{r['msgs_per_s']} / {r['relay_cpu_ms_per_msg']} / {r['machine_busy']:.0%}"
            for r in row["rounds"]
        )
        lines.append(f"- {label}: {cells}")
    phases = ", ".join(
        f"{p['connections_in_one_key']} of {p['delivered']}"
        for p in shared.get("two_instance_phases", [])
    )
    decided = ", ".join(
        f"{name} {int(inst.get('messages_decided', 0)):,}"
        for name, inst in results["instances"].items()
    )
    lines += [
        "",
        "## Shared state",
        "",
        f"- state shared: **{'yes' if shared.get('state_shared') else 'NO'}**; Redis "
        f"{shared.get('redis_version', '?')} held {shared.get('dbsize', 0)} keys after the "
        f"run: {shared.get('keys_by_family', {})}.",
        f"- connections recorded under the one connection-rate key during each 2-instance "
        f"phase: {phases} (both instances write the same key).",
        f"- messages each instance decided (its /metrics): {decided}.",
        f"- Redis commands over the whole run, warm-ups included: {shared.get('commands', {})}.",
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in meta["notes"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.scaleout", description=__doc__.splitlines()[0]
    )
    p.add_argument("--messages", type=int, default=2000, help="messages per phase (2000)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--warmup", type=int, help="warm-up messages per instance (default 200)")
    p.add_argument(
        "--out", type=Path, default=RESULTS / "scaleout.json", help="JSON file (.md beside)"
    )
    p.add_argument("--no-model", action="store_true", help="classifier off (and its rules)")
    a = p.parse_args(argv)
    warmup = a.warmup if a.warmup is not None else min(200, a.messages)
    return Options(a.messages, a.rounds, warmup, a.out, not a.no_model)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    results = asyncio.run(run_bench(opts))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    md = opts.out.with_suffix(".md")
    md.write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {opts.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
