"""Throughput bench: the relay side by side with a bare pass-through and the SMTP ceiling.

    python -m bench.run              # full run, writes bench/results/throughput.{json,md}
    python -m bench.run --quick      # smoke run (a few hundred messages)

All servers run at once, each on its own loopback port, delivering into one smtp-sink.
Throughput comes from Postfix's smtp-source (C, a new connection per message), repeated
over rounds that visit the servers in turn, so background load hits every server alike;
the median round counts. Latency comes from our asyncio client (bench/client.py) at the
normal concurrency and at the high one (every session open at once). Server CPU, RSS and
PSS are read from /proc, summed over the server's process tree; during the timed rounds a
NOOP probe measures each server's responsiveness (its event-loop lag, seen from outside).

Rspamd runs beside them (bench/rspamd.py: private config, Bayes trained on the SpamAssassin
train split, ``/checkv2`` over HTTP with 8 in flight), timed in the same interleaved
rounds; if it cannot be installed or started its rows say why and the rest runs on.
After the rounds, one profiled phase splits the full relay's CPU by pipeline stage
(bench/stages.py). Ratios, not absolute figures, are what carry between runs and machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import loopmetric, mail, report, rspamd, stages
from bench.client import LoadResult, drive
from bench.lagprobe import LagProbe
from bench.postfix import SmtpSink, SourceRun, find_tool, smtp_source
from bench.probe import Probe, probe_relay
from bench.procstats import (
    MachineCpu,
    cpu_by_pid,
    cpu_seconds,
    descendants,
    listening_pids,
    load_average,
    pss_bytes,
    rss_bytes,
)
from bench.scenarios import (
    RSPAMD_WORKERS,
    Scenario,
    baseline_comparisons,
    baseline_keys,
    build,
    comparisons,
    with_baseline,
)
from bench.servers import ServerProcess, repo_relative, start_passthrough, start_relay

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The corpus Rspamd's Bayes learns from: beside the repository, never inside it.
DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "spamassassin"
SHARED_MACHINE_NOTE = (
    "run on a shared machine: other jobs (tests, builds of other workers) used the same "
    "cores during the run, so rounds differ (see the load averages and each round's "
    "figure); trust same-run ratios and CPU per message over absolute msgs/s"
)
PSS_EVERY = 4  # RSS samples per PSS sample (smaps_rollup walks page tables: costlier)


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    sessions: int
    high_sessions: int
    rounds: int
    warmup: int
    workers: tuple[int, ...]
    max_phase_seconds: float
    only: tuple[str, ...]
    out: Path
    stem: str
    quick: bool
    baseline: str = ""  # git revision whose relay runs beside this tree's
    corpus: Path = DEFAULT_CORPUS  # SpamAssassin tarballs (Rspamd's Bayes training)
    labels: Path | None = None  # the split file (default: corpus/split.tsv)
    rspamd_messages: int = 6000  # scans per round
    in_flight: int = 8  # concurrent scans
    profile: tuple[str, ...] = ()  # relay scenarios whose CPU is split by stage
    probe_interval: float = 0.2  # seconds between NOOPs on each probe connection
    stacks: Path | None = None  # keep the profiled phase's raw py-spy stacks here


@dataclass
class Target:
    """Where load is sent and whose processes are measured."""

    scenario: Scenario
    port: int
    root_pid: int
    server: ServerProcess | None = None
    messages: int = 0  # per phase; lowered for slow variants so a phase stays bounded
    result: dict[str, Any] = field(default_factory=dict)
    rspamd: rspamd.RspamdInstance | None = None  # the daemon an rspamd scenario scans
    lag: LagProbe | None = None  # responsiveness probe, accumulated over the rounds
    # relay_event_loop_lag_seconds buckets gained during the timed rounds (metrics on)
    in_loop: dict[float, float] = field(default_factory=dict)

    def pids(self) -> list[int]:
        if self.rspamd is not None:
            return self.rspamd.pids()
        return descendants(self.root_pid)


@dataclass(frozen=True, slots=True)
class Phase:
    ok: int
    delivered: int
    elapsed: float
    cpu_seconds: float
    peak_rss: int
    machine_busy: float
    errors: dict[str, int]
    peak_pss: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "delivered": self.delivered,
            "elapsed_s": round(self.elapsed, 3),
            "msgs_per_s": round(self.ok / self.elapsed, 1) if self.elapsed else 0.0,
            "server_cpu_ms_per_msg": round(1000 * self.cpu_seconds / self.ok, 3)
            if self.ok
            else None,
            "server_cpu_cores": round(self.cpu_seconds / self.elapsed, 2) if self.elapsed else 0,
            "server_peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "server_peak_pss_mb": round(self.peak_pss / 2**20, 1),
            "machine_busy": round(self.machine_busy, 2),
            "errors": self.errors,
        }


async def _sample_memory(target: Target, peak: list[int], stop: asyncio.Event) -> None:
    """peak[0]: RSS, peak[1]: PSS of the whole tree (PSS every PSS_EVERY samples)."""
    n = 0
    while not stop.is_set():
        pids = target.pids()
        peak[0] = max(peak[0], rss_bytes(pids))
        if n % PSS_EVERY == 0:
            peak[1] = max(peak[1], pss_bytes(pids))
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def measure(
    target: Target,
    sink: SmtpSink | None,
    load: Callable[[], Awaitable[tuple[int, float, dict[str, int]]]],
    *,
    sink_counts_ok: bool,
    probe: LagProbe | None = None,
) -> Phase:
    """Run one load against target, measuring its process tree and the machine; with
    ``sink`` None (Rspamd: nothing is delivered) the load's own count stands."""
    pids = target.pids()
    sunk0 = sink.delivered() if sink is not None else 0
    cpu0, machine0 = cpu_seconds(pids), MachineCpu.read()
    peak, stop = [rss_bytes(pids), pss_bytes(pids)], asyncio.Event()
    sampler = asyncio.create_task(_sample_memory(target, peak, stop))
    prober = asyncio.create_task(probe.run(stop)) if probe is not None else None
    try:
        ok, elapsed, errors = await load()
    finally:
        stop.set()
        await sampler
        if prober is not None:
            await prober
    cpu = cpu_seconds(target.pids()) - cpu0
    busy = MachineCpu.read().utilisation_since(machine0)
    if sink is None:
        return Phase(ok, ok, elapsed, cpu, peak[0], busy, errors, peak[1])
    expected = sunk0 + (0 if sink_counts_ok else ok)
    delivered = await sink.wait_delivered(expected) - sunk0
    if sink_counts_ok:
        ok = delivered  # smtp-source does not count; what arrived at the sink did
    elif delivered != ok:
        errors = dict(errors, **{"accepted but not at sink": ok - delivered})
    return Phase(ok, delivered, elapsed, cpu, peak[0], busy, errors, peak[1])


def _lag_metric_port(target: Target) -> int | None:
    """The /metrics port of a relay scenario with metrics on (its own loop-lag figure)."""
    server = target.server
    if server is None or "metrics" not in target.scenario.features:
        return None
    return server.metrics_port


def source_load(
    target: Target, message_file: Path, messages: int, sessions: int
) -> Callable[[], Awaitable[tuple[int, float, dict[str, int]]]]:
    async def run() -> tuple[int, float, dict[str, int]]:
        result: SourceRun = await smtp_source(
            target.port, message_file, messages=messages, sessions=sessions
        )
        errors = {f"smtp-source exit {result.returncode}": 1} if result.returncode else {}
        if result.stderr:
            errors[result.stderr.splitlines()[-1][:160]] = 1
        return messages, result.elapsed, errors

    return run


def scan_load(
    target: Target, message: bytes, requests: int, in_flight: int
) -> Callable[[], Awaitable[tuple[int, float, dict[str, int]]]]:
    """Rspamd's side: ``requests`` scans of the message over HTTP, ``in_flight`` at once."""
    assert target.rspamd is not None

    async def run() -> tuple[int, float, dict[str, int]]:
        assert target.rspamd is not None
        headers = rspamd.scan_headers(settings=target.scenario.settings)
        result = await rspamd.scan(
            target.rspamd.ports.normal,
            message,
            requests=requests,
            in_flight=in_flight,
            headers=headers,
        )
        seen = target.result.setdefault("bayes_symbols", {})
        for name, n in result.symbols.items():
            seen[name] = seen.get(name, 0) + n
        actions = target.result.setdefault("rspamd_actions", {})
        for name, n in result.actions.items():
            actions[name] = actions.get(name, 0) + n
        return result.ok, result.elapsed, result.errors

    return run


def client_load(
    target: Target,
    message: bytes,
    messages: int,
    sessions: int,
    reuse: bool,
    into: list[LoadResult],
) -> Callable[[], Awaitable[tuple[int, float, dict[str, int]]]]:
    async def run() -> tuple[int, float, dict[str, int]]:
        result = await drive(
            target.port, message, messages=messages, sessions=sessions, reuse=reuse
        )
        into.append(result)
        return result.ok, result.elapsed, result.errors

    return run


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def client_summary(phase: Phase, result: LoadResult) -> dict[str, Any]:
    lat = [v * 1000 for v in result.latencies]
    out = phase.summary()
    out.update(
        sessions=result.sessions,
        reuse_connections=result.reuse,
        messages=result.messages,
        peak_open_sessions=result.peak_open,
        p50_ms=round(_percentile(lat, 0.50), 2),
        p99_ms=round(_percentile(lat, 0.99), 2),
        max_ms=round(max(lat), 2) if lat else 0.0,
    )
    return out


def feature_gaps(scenario: Scenario, probe: Probe, repo: Path) -> list[str]:
    """Why this variant would not measure what it claims (empty: it does)."""
    if not probe.delivered:
        return [f"the relay did not deliver with this config: {probe.error}"]
    gaps = []
    if "metrics" in scenario.features and not probe.metrics_served:
        gaps.append("metrics enabled but no /metrics endpoint answered")
    if "auth" in scenario.features and "authentication-results" not in probe.added_headers:
        gaps.append("auth enabled but no Authentication-Results field was added")
    if "policy" in scenario.features and probe.log_fields.get("policy", "noop") == "noop":
        gaps.append("policy file set but the relay still decided with the no-op policy")
    if "model" in scenario.features and not (repo / "models" / "spam.skops").exists():
        gaps.append("models/spam.skops is not there yet")
    return gaps


def rspamd_version() -> str:
    binary = rspamd.find_rspamd()
    if binary is None:
        return ""
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.stdout else ""


async def start_rspamd(
    opts: Options, dns: str, info: dict[str, Any]
) -> rspamd.RspamdInstance | None:
    """Rspamd up, its Bayes trained on the train split; None (and info["skipped"]) when it
    cannot be had, so the other scenarios run on without it."""
    labels = opts.labels or opts.corpus / "split.tsv"
    if not labels.is_file():
        info["skipped"] = f"no corpus to train Rspamd's Bayes: {labels} not found (--corpus)"
        return None
    try:
        instance = rspamd.start(workers=RSPAMD_WORKERS, dns=dns)
    except Exception as exc:  # as below: a missing or broken Rspamd is a finding, not a crash
        info["skipped"] = f"rspamd could not be started: {type(exc).__name__}: {exc}"
        return None
    info["version"] = rspamd_version()
    try:
        started = time.monotonic()
        await instance.ready()
        info["start_s"] = round(time.monotonic() - started, 1)
        corpus = rspamd.train_split(opts.corpus, labels)
        trained = await rspamd.train(instance.ports.controller, corpus, in_flight=opts.in_flight)
        info["train"] = {
            "posted": trained.posted,
            "learned": trained.learned,
            "replies": trained.outcomes,
            "elapsed_s": round(trained.elapsed, 1),
            "corpus": f"{labels.name} train rows, {len(corpus)} messages",
        }
        if min(trained.learned.get("spam", 0), trained.learned.get("ham", 0)) < 200:
            raise rspamd.RspamdUnavailable(
                f"Bayes learnt too little to fire (needs 200 of each): {trained.learned}"
            )
    except Exception as exc:  # whatever goes wrong on Rspamd's side, the relay rows run on
        info["skipped"] = f"rspamd did not come up: {type(exc).__name__}: {exc}"
        info["stop"] = instance.stop()
        instance.remove()
        return None
    return instance


async def start_targets(
    chosen: list[Scenario],
    sink: SmtpSink,
    work: Path,
    notes: list[str],
    daemon: rspamd.RspamdInstance | None = None,
) -> list[Target]:
    targets: list[Target] = []
    for sc in chosen:
        if sc.kind == "direct":
            targets.append(Target(sc, sink.port, sink.pid))
            continue
        if sc.kind == "rspamd":
            if daemon is not None:
                port = daemon.ports.normal
                targets.append(Target(sc, port, daemon.rspamd.pid, rspamd=daemon))
            continue
        folder = work / sc.key
        if sc.kind == "passthrough":
            server = start_passthrough(sc.key, folder, sink.port, sc.pool)
        else:
            server = start_relay(
                sc.key, folder, sink.port, workers=sc.workers, overrides=sc.overrides, src=sc.src
            )
        targets.append(Target(sc, server.port, server.pid, server))
    ready: list[Target] = []
    for t in targets:
        if t.server is None:
            ready.append(t)
            continue
        try:
            await t.server.ready()
        except (TimeoutError, RuntimeError) as exc:
            t.result["skipped"] = f"did not start: {exc}: {t.server.log_tail(6)}"
            t.server.stop()
            continue
        if t.scenario.kind == "relay":
            seen = await t.server.wait_workers(t.scenario.workers)
            t.result["smtp_processes"] = seen
            if seen != t.scenario.workers:
                notes.append(
                    f"{t.scenario.key}: asked for {t.scenario.workers} workers, "
                    f"{seen} process(es) listen on the port"
                )
        ready.append(t)
    return ready


def export_tree(rev: str, dest: Path) -> Path:
    """``git archive`` of ``rev`` into ``dest``; returns its ``src`` folder."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "src"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


async def run_bench(opts: Options) -> dict[str, Any]:
    for tool in ("smtp-sink", "smtp-source"):
        if find_tool(tool) is None:
            raise SystemExit(f"{tool} not found: install Postfix (make system-deps)")
    from tests.support.dnsserver import LocalDns  # the auth helper's loopback DNS server

    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    notes: list[str] = [SHARED_MACHINE_NOTE]
    started = time.time()
    load_before = load_average()
    bench_mail = mail.build(work)
    message_file = bench_mail.write_for_smtp_source(work / "message.eml")
    if not bench_mail.signed:
        notes.append("openssl missing: the test message is not DKIM-signed")
    sink = SmtpSink(work)
    rspamd_info: dict[str, Any] = {}
    targets: list[Target] = []
    dns = LocalDns({name: list(records) for name, records in bench_mail.zone.items()}).start()
    try:
        await sink.ready()
        scenarios = build(REPO, dns.address, opts.workers, work)
        if opts.baseline:
            base_src = export_tree(opts.baseline, work / "baseline")
            scenarios = with_baseline(
                scenarios, base_src, opts.baseline, baseline_keys(opts.workers)
            )
        chosen = [s for s in scenarios if not opts.only or s.key in opts.only]
        skipped: dict[str, str] = {}
        probes: dict[str, Probe] = {}
        for sc in chosen:
            if sc.kind != "relay":
                continue
            probe = await probe_relay(
                work / f"probe-{sc.key}",
                bench_mail.message,
                workers=sc.workers,
                overrides=sc.overrides,
                src=sc.src,
            )
            probes[sc.key] = probe
            gaps = feature_gaps(sc, probe, REPO)
            if gaps:
                skipped[sc.key] = "; ".join(gaps)
        daemon: rspamd.RspamdInstance | None = None
        if any(s.kind == "rspamd" for s in chosen):
            daemon = await start_rspamd(opts, dns.address, rspamd_info)
            if daemon is None:
                for s in chosen:
                    if s.kind == "rspamd":
                        skipped[s.key] = rspamd_info["skipped"]
        runnable = [s for s in chosen if s.key not in skipped]
        targets = await start_targets(runnable, sink, work, notes, daemon)
        try:
            await run_phases(targets, sink, bench_mail.message, message_file, opts)
        finally:
            for t in targets:
                if t.server is not None:
                    stats = t.server.stop()
                    if stats:
                        t.result["server_stats"] = stats
            if daemon is not None:
                rspamd_info["stop"] = daemon.stop()
                daemon.remove()
    finally:
        notes.append(f"loopback DNS answered {len(dns.queries)} queries in the whole run")
        sink.stop()
        dns.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    by_key = {t.scenario.key: t for t in targets}
    for sc in chosen:
        row: dict[str, Any] = {"key": sc.key, "title": sc.title, "kind": sc.kind}
        row["workers"] = sc.workers if sc.kind in ("relay", "rspamd") else 1
        if sc.key in probes:
            row["probe"] = asdict(probes[sc.key])
        if sc.key in skipped:
            row["skipped"] = skipped[sc.key]
        elif sc.key in by_key:
            row.update(by_key[sc.key].result)
        rows.append(row)
    return {
        "meta": {
            **run_meta(started, load_before, bench_mail, asdict(opts), skip=("out", "stem")),
            "notes": notes,
            "rspamd": rspamd_info,
        },
        "scenarios": rows,
        "comparisons": report.ratios(
            rows,
            comparisons(opts.workers)
            + (baseline_comparisons(baseline_keys(opts.workers)) if opts.baseline else []),
        ),
        "checks": report.session_checks(rows),
    }


def _load(
    t: Target, message: bytes, message_file: Path, messages: int, opts: Options
) -> Callable[[], Awaitable[tuple[int, float, dict[str, int]]]]:
    """The timed load of a target: smtp-source for SMTP servers, HTTP scans for Rspamd."""
    if t.rspamd is not None:
        return scan_load(t, message, messages, opts.in_flight)
    return source_load(t, message_file, messages, opts.sessions)


def _sink_of(t: Target, sink: SmtpSink) -> SmtpSink | None:
    return None if t.rspamd is not None else sink


async def run_phases(
    targets: list[Target], sink: SmtpSink, message: bytes, message_file: Path, opts: Options
) -> None:
    live = [t for t in targets if "skipped" not in t.result]
    # Warm-up: imports, pools, DNS cache; its rate caps the phase size of slow variants.
    for t in live:
        phase = await measure(
            t,
            _sink_of(t, sink),
            _load(t, message, message_file, opts.warmup, opts),
            sink_counts_ok=True,
        )
        rate = phase.ok / phase.elapsed if phase.elapsed else 0.0
        most = opts.rspamd_messages if t.rspamd is not None else opts.messages
        t.messages = max(min(most, int(rate * opts.max_phase_seconds)), min(most, 200))
        t.result["warmup"] = phase.summary()
        t.lag = LagProbe(
            t.port,
            interval=opts.probe_interval,
            kind="http" if t.rspamd is not None else "smtp",
        )
    rounds: dict[str, list[dict[str, Any]]] = {t.scenario.key: [] for t in live}
    for r in range(opts.rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for t in order:
            lag_port = _lag_metric_port(t)
            before = await loopmetric.scrape(lag_port) if lag_port else {}
            phase = await measure(
                t,
                _sink_of(t, sink),
                _load(t, message, message_file, t.messages, opts),
                sink_counts_ok=True,
                probe=t.lag,
            )
            if lag_port:
                loopmetric.add_delta(t.in_loop, await loopmetric.scrape(lag_port), before)
            summary = phase.summary()
            summary["messages"] = t.messages
            rounds[t.scenario.key].append(summary)
            print(f"  round {r + 1} {t.scenario.key}: {summary['msgs_per_s']} msgs/s", flush=True)
    for t in live:
        runs = rounds[t.scenario.key]
        median = statistics.median(run["msgs_per_s"] for run in runs)
        pick = min(runs, key=lambda run: abs(run["msgs_per_s"] - median))
        t.result["source"] = {
            "load": (
                f"HTTP POST /checkv2, {opts.in_flight} in flight"
                if t.rspamd is not None
                else f"smtp-source, {opts.sessions} sessions"
            ),
            "sessions": opts.in_flight if t.rspamd is not None else opts.sessions,
            "messages": t.messages,
            "rounds": runs,
            "msgs_per_s": median,
            "server_cpu_ms_per_msg": pick["server_cpu_ms_per_msg"],
            "server_peak_rss_mb": max(run["server_peak_rss_mb"] for run in runs),
            "server_peak_pss_mb": max(run["server_peak_pss_mb"] for run in runs),
            "errors": sum(t.messages - run["ok"] for run in runs),
        }
        if t.lag is not None:
            t.result["loop_lag"] = t.lag.summary()
        if t.in_loop:
            t.result["loop_lag_in_relay"] = loopmetric.summary(t.in_loop)
    for t in live:
        if t.rspamd is not None:
            continue  # no SMTP: the latency phases are the SMTP servers'
        for label, sessions, reuse in (
            ("client", opts.sessions, False),
            ("client_high", opts.high_sessions, True),
        ):
            got: list[LoadResult] = []
            phase = await measure(
                t,
                sink,
                client_load(t, message, t.messages, sessions, reuse, got),
                sink_counts_ok=False,
            )
            t.result[label] = client_summary(phase, got[0])
            print(
                f"  {label} {t.scenario.key}: {t.result[label]['msgs_per_s']} msgs/s "
                f"p99 {t.result[label]['p99_ms']} ms errors {t.result[label]['errors']}",
                flush=True,
            )
    for t in live:
        if t.scenario.key in opts.profile and t.server is not None:
            t.result["stage_cpu"] = await profile_stages(t, sink, message_file, opts)


async def profile_stages(
    t: Target, sink: SmtpSink, message_file: Path, opts: Options
) -> dict[str, Any]:
    """One more smtp-source phase with py-spy sampling the tree: CPU per message by stage
    (bench/stages.py has the method). Never part of the timed rounds."""
    assert t.server is not None
    workers = set(listening_pids(t.pids(), t.port))
    out = Path(tempfile.mkdtemp(prefix="bench-stages-")) / "stacks.txt"
    sampler = stages.Sampler(t.root_pid, out)
    try:
        await sampler.started()
        pids = t.pids()
        before = cpu_by_pid(pids)
        phase = await measure(
            t, sink, source_load(t, message_file, t.messages, opts.sessions), sink_counts_ok=True
        )
        after = cpu_by_pid(t.pids())
        roles = {pid: stages.role(pid, t.root_pid, workers) for pid in after}
        raw = sampler.stop()
        if opts.stacks is not None:
            opts.stacks.write_text(raw)
    finally:
        sampler.stop()
        shutil.rmtree(out.parent, ignore_errors=True)
    # A process that started during the phase counts from zero; one that ended is lost
    # (none should: the pools and children live as long as the relay).
    cpu = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    samples = stages.parse_raw(raw)
    result = stages.attribute(cpu, roles, samples, phase.ok).as_dict()
    result["other_samples_top"] = stages.unattributed(raw)
    result["hotspots_ms_per_msg"] = stages.hotspots(raw, cpu, roles, phase.ok)
    result["msgs_per_s_while_profiled"] = round(phase.ok / phase.elapsed, 1) if phase.elapsed else 0
    result["errors"] = phase.errors
    if sampler.error:
        result["note"] = f"in-worker split not sampled: {sampler.error}"
    print(f"  stages {t.scenario.key}: {result['stages_ms_per_msg']}", flush=True)
    return result


def run_meta(
    started: float,
    load_before: tuple[float, float, float],
    bench_mail: mail.BenchMail,
    options: dict[str, Any],
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What every bench result records about its run (bench.run, bench.scaleout): when,
    on what, from which commit, with which message and options. Paths are recorded
    relative to the repository, never as this machine's own."""
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "cores": _cores(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "python": platform.python_version(),
        "commit": _commit(),
        "message_bytes": len(bench_mail.message),
        "message_dkim_signed": bench_mail.signed,
        "options": {
            k: repo_relative(v) if isinstance(v, Path) else v
            for k, v in options.items()
            if k not in skip
        },
    }


def _cores() -> int:

    return len(os.sched_getaffinity(0))


def _commit() -> str:
    git = shutil.which("git")
    if git is None:
        return ""
    done = subprocess.run(
        [git, "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip()


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, help="messages per phase (default 5000; quick 300)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    p.add_argument("--high-sessions", type=int, help="the high-concurrency run (default 200)")
    p.add_argument("--rounds", type=int, help="smtp-source rounds per server (default 3)")
    p.add_argument("--workers", default="1,2", help="relay worker counts, e.g. 1,2")
    p.add_argument(
        "--max-phase-seconds",
        type=float,
        default=20.0,
        help="slow variants send fewer messages so one phase takes about this long",
    )
    p.add_argument("--scenarios", "--only", default="", help="comma-separated keys (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: few messages, one round")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument(
        "--stem", default="", help="results file name (default throughput / throughput-quick)"
    )
    p.add_argument(
        "--baseline",
        default="",
        help="a git revision: its relay runs beside this tree's in the same rounds",
    )
    p.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="SpamAssassin corpus folder (tarballs + split.tsv) Rspamd's Bayes learns from "
        "(default ../shared/corpora/spamassassin beside the repository)",
    )
    p.add_argument("--labels", type=Path, help="split file (default: CORPUS/split.tsv)")
    p.add_argument(
        "--rspamd-messages", type=int, help="Rspamd scans per round (default 6000; quick 300)"
    )
    p.add_argument("--in-flight", type=int, default=8, help="concurrent Rspamd scans")
    p.add_argument(
        "--profile",
        default="",
        help="relay scenarios whose CPU is split by stage (default: the everything-on one; "
        "'none' for no profiled phase)",
    )
    p.add_argument(
        "--probe-interval",
        type=float,
        default=0.2,
        help="seconds between NOOPs on each of the 4 loop-lag probe connections",
    )
    p.add_argument(
        "--stacks",
        type=Path,
        help="also write the profiled phase's raw py-spy stacks (collapsed) to this file",
    )
    a = p.parse_args(argv)
    quick = bool(a.quick)
    messages = a.messages or (300 if quick else 5000)
    workers = tuple(sorted({int(w) for w in a.workers.split(",") if w.strip()}))
    profile = (
        ()
        if a.profile == "none"
        else tuple(k.strip() for k in a.profile.split(",") if k.strip())
        or (f"relay-full-w{max(workers)}",)
    )
    return Options(
        messages=messages,
        sessions=a.sessions,
        high_sessions=a.high_sessions or (100 if quick else 200),
        rounds=a.rounds or (1 if quick else 3),
        warmup=min(messages, 50 if quick else 300),
        workers=workers,
        max_phase_seconds=a.max_phase_seconds,
        only=tuple(k.strip() for k in a.scenarios.split(",") if k.strip()),
        out=a.out,
        stem=a.stem or ("throughput-quick" if quick else "throughput"),
        quick=quick,
        baseline=a.baseline,
        corpus=a.corpus,
        labels=a.labels,
        rspamd_messages=a.rspamd_messages or (300 if quick else 6000),
        in_flight=a.in_flight,
        profile=profile,
        probe_interval=a.probe_interval,
        stacks=a.stacks,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    results = asyncio.run(run_bench(opts))
    opts.out.mkdir(parents=True, exist_ok=True)
    json_path = opts.out / f"{opts.stem}.json"
    md_path = opts.out / f"{opts.stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(report.markdown(results))
    print(report.summary(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
