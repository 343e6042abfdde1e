"""Classifier serving cost: per-message latency and memory with the model loaded.

Targets (docs/classifier.md): p99 classification latency < 10 ms for median-sized mail,
relay memory with the model loaded < 300 MB RSS. Measures, on the SpamAssassin corpus
(extracted to a temporary directory; generated mail when the corpus is absent):

- in-process: feature extraction + prediction, one message at a time (the CPU cost);
- through ``Classifier`` (process pool, what the relay does): one message in flight at a
  time (latency including the pipe to the worker) and 16 in flight (throughput);
- RSS of this process (the relay side: it never imports scikit-learn) and of each worker.

Usage: .venv/bin/python -m bench.bench_classifier [--model models/spam.skops] [--workers 2]
Writes bench/results/classifier.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_lab import extract, shared_dir
from bench.procstats import descendants, rss_bytes
from relay.classifier.model import load_model
from relay.classifier.serving import Classifier
from relay.message import Message

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": round(at(0.50), 3),
        "p90_ms": round(at(0.90), 3),
        "p99_ms": round(at(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def _corpus_messages(tmp: Path) -> tuple[list[bytes], str]:
    corpus = shared_dir() / "corpora" / "spamassassin"
    if not (corpus / "split.tsv").is_file():
        generated = [
            (
                f"From: a{i}@example.org\r\nSubject: message {i}\r\n\r\n"
                + "some ordinary words in a message body " * (40 + i % 80)
            ).encode()
            for i in range(600)
        ]
        return generated, "generated (corpus absent)"
    extract(corpus, tmp)
    data = [
        p.read_bytes() for p in sorted((tmp / "sa").rglob("*")) if p.is_file() and p.name != "cmds"
    ]
    return data, "SpamAssassin public corpus (all 6046 messages)"


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _median_sized(messages: list[bytes]) -> tuple[list[bytes], dict[str, int]]:
    """Messages between the 40th and 60th size percentile: 'median-sized mail'."""
    ordered = sorted(messages, key=len)
    lo, hi = int(len(ordered) * 0.4), int(len(ordered) * 0.6)
    band = ordered[lo:hi]
    return band, {
        "median_bytes": len(ordered[len(ordered) // 2]),
        "band_min_bytes": len(band[0]),
        "band_max_bytes": len(band[-1]),
    }


def in_process(model_path: Path, band: list[bytes], everything: list[bytes]) -> dict[str, Any]:
    model = load_model(model_path)
    model.classify_bytes(band[0])
    rows: dict[str, Any] = {}
    for name, sample in (("median_sized", band), ("all_messages", everything)):
        times, cpu = [], []
        for raw in sample:
            start, start_cpu = time.perf_counter(), time.process_time()
            model.classify_bytes(raw)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        rows[name] = _percentiles(times)
        rows[name + "_cpu"] = _percentiles(cpu)
    return rows


async def through_pool(model_path: Path, band: list[bytes], workers: int) -> dict[str, Any]:
    before = rss_bytes([os.getpid()])
    start = time.perf_counter()
    classifier = await Classifier.open(model_path, workers=workers)
    startup = time.perf_counter() - start
    try:
        # The classifier reads no time: corpus mail without a date needs none.
        messages = [Message.from_file_bytes(raw, received_at=0.0) for raw in band]
        latencies = []
        for message in messages:
            t0 = time.perf_counter()
            await classifier.predict(message)
            latencies.append(time.perf_counter() - t0)
        sem = asyncio.Semaphore(16)

        async def one(message: Message) -> None:
            async with sem:
                await classifier.predict(message)

        rounds = 3
        t0 = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one(m) for m in messages))
        elapsed = time.perf_counter() - t0
        me = os.getpid()
        pool_pids = [p for p in descendants(me) if p != me and not _is_resource_tracker(p)]
        worker_rss = [rss_bytes([p]) for p in pool_pids]
        relay_rss = rss_bytes([me])
    finally:
        await classifier.close()
    mib = 1024 * 1024
    return {
        "workers": workers,
        "startup_seconds": round(startup, 2),
        "sequential_latency": _percentiles(latencies),
        "throughput_msgs_per_s_16_in_flight": round(rounds * len(messages) / elapsed, 1),
        "rss_mib": {
            "relay_process_before_open": round(before / mib, 1),
            "relay_process": round(relay_rss / mib, 1),
            "each_worker": [round(r / mib, 1) for r in worker_rss],
            "relay_plus_one_worker": round(
                (relay_rss + (worker_rss[0] if worker_rss else 0)) / mib, 1
            ),
            "relay_plus_all_workers": round((relay_rss + sum(worker_rss)) / mib, 1),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    pool = result["pool"]
    inproc = result["in_process"]
    rss = pool["rss_mib"]
    lines = [
        "# Classifier serving cost",
        "",
        f"Model `{result['model']}` ({result['model_mib']} MiB on disk), {result['corpus']}; "
        f"median-sized band: {result['band']['band_min_bytes']}-{result['band']['band_max_bytes']}"
        f" bytes (median {result['band']['median_bytes']}). {result['machine']}.",
        "",
        "| path | n | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in (
        ("in-process extract + predict, median-sized", inproc["median_sized"]),
        ("in-process extract + predict, every message", inproc["all_messages"]),
        ("in-process, median-sized: CPU time", inproc["median_sized_cpu"]),
        (f"Classifier pool ({pool['workers']} workers), one in flight", pool["sequential_latency"]),
    ):
        lines.append(
            f"| {name} | {row['n']} | {row['p50_ms']} | {row['p90_ms']} | {row['p99_ms']} "
            f"| {row['max_ms']} |"
        )
    lines += [
        "",
        f"Throughput through the pool, 16 in flight: {pool['throughput_msgs_per_s_16_in_flight']}"
        f" msgs/s. Pool start-up (spawn + load + verify): {pool['startup_seconds']} s.",
        "",
        "| memory (RSS) | MiB |",
        "|---|---|",
        f"| relay process (imports relay.model; never scikit-learn) | {rss['relay_process']} |",
        f"| each classifier worker (model loaded) | {', '.join(map(str, rss['each_worker']))} |",
        f"| relay + one worker | {rss['relay_plus_one_worker']} |",
        f"| relay + all {pool['workers']} workers | {rss['relay_plus_all_workers']} |",
        "",
        f"Targets: p99 < 10 ms for median-sized mail: "
        f"{'met' if result['targets']['p99_met'] else 'NOT met'}; "
        f"< 300 MiB with the model loaded (relay + one worker): "
        f"{'met' if result['targets']['rss_met'] else 'NOT met'}.",
        "",
        f"Machine noise: 1-minute load average {result['load_average_before_after'][0]} before,"
        f" {result['load_average_before_after'][1]} after, on 2 cores shared with other work;"
        " wall-clock latencies include waiting for a core, CPU time does not.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "spam.skops")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        messages, source = _corpus_messages(Path(tmp))
    band, band_info = _median_sized(messages)
    load_before = os.getloadavg()
    # The pool first: this process has not imported scikit-learn yet, like the relay.
    pool = asyncio.run(through_pool(args.model, band, args.workers))
    inproc = in_process(args.model, band, messages)
    load_after = os.getloadavg()
    result = {
        "model": args.model.name,
        "model_mib": round(args.model.stat().st_size / 2**20, 1),
        "corpus": source,
        "band": band_info,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "in_process": inproc,
        "pool": pool,
        "targets": {
            "p99_met": pool["sequential_latency"]["p99_ms"] < 10,
            "rss_met": pool["rss_mib"]["relay_plus_one_worker"] < 300,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "classifier.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "classifier.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
