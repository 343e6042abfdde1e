"""Classifier serving cost: per-message latency and memory with the model loaded.

Targets (docs/classifier.md): p99 classification latency < 10 ms for median-sized mail,
relay memory with the model loaded < 300 MB RSS. Measures, on the SpamAssassin corpus
(extracted to a temporary directory; generated mail when the corpus is absent):

- in-process: feature extraction + prediction, one message at a time (the CPU cost);
- through ``Classifier`` (process pool, what the relay does): one message in flight at a
  time (latency including the pipe to the worker) and 16 in flight (throughput);
- RSS of this process (the relay side: it never imports scikit-learn) and of each worker;
- side by side in one run, the two ways a model is served (docs/classifier.md "Compiled
  scorer"): the scikit-learn pipeline and the numpy-only compiled scorer: CPU per message
  (one at a time and in batches of 16, feature extraction counted apart), the RSS of a
  process serving each, and the largest probability difference between them on every
  message, with the test split's AUC by each.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_lab import extract, shared_dir
from bench.procstats import descendants, rss_bytes
from relay.classifier.evaluation import roc_auc
from relay.classifier.model import LoadedModel, load_model
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


def _test_split(tmp: Path) -> list[tuple[bytes, bool]]:
    """(raw, is spam) of the SpamAssassin test split, when the corpus was extracted."""
    labels = shared_dir() / "corpora" / "spamassassin" / "split.tsv"
    if not (tmp / "sa").is_dir() or not labels.is_file():
        return []
    rows = [line.split("\t") for line in labels.read_text().splitlines()[1:]]
    return [((tmp / r[0]).read_bytes(), r[1] == "spam") for r in rows if r[2] == "test"]


def _cpu_per_message(model: LoadedModel, raws: list[bytes], batch: int) -> float:
    """CPU ms per message of ``classify_many`` in batches (the classifier child batches
    the requests that arrive together), after one warm-up pass."""
    for i in range(0, len(raws), batch):
        model.classify_many(raws[i : i + batch])
    start = time.process_time()
    for i in range(0, len(raws), batch):
        model.classify_many(raws[i : i + batch])
    return round((time.process_time() - start) / len(raws) * 1000, 3)


# What the classifier child does (relay/classifier/child.py ``load``): load, configure
# scikit-learn when it was imported, classify once, hand freed pages back; then the RSS.
_SERVING_PROCESS = """
import gc, json, sys
from pathlib import Path
from relay.classifier.model import load_model
from relay.proc.lifetime import release_free_memory
model = load_model(Path(sys.argv[1]), compiled=sys.argv[2] == "compiled")
if "sklearn" in sys.modules:
    import sklearn
    sklearn.set_config(assume_finite=True, skip_parameter_validation=True)
model.classify_many([b"Subject: warm-up\\r\\n\\r\\nwarm-up\\r\\n"] * 4)
gc.collect()
release_free_memory()
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "compiled": model.compiled is not None,
    "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
    "peak_rss_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1),
    "imports_sklearn_or_scipy": any(m in sys.modules for m in ("sklearn", "scipy")),
}))
"""


def _serving_memory(model_path: Path, how: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _SERVING_PROCESS, str(model_path), how],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def side_by_side(
    model_path: Path, band: list[bytes], everything: list[bytes], test: list[tuple[bytes, bool]]
) -> dict[str, Any]:
    """The scikit-learn pipeline and the compiled scorer of the same model, in one run."""
    import sklearn

    sklearn.set_config(assume_finite=True, skip_parameter_validation=True)  # as the child
    models = {
        "sklearn": load_model(model_path, compiled=False),
        "compiled": load_model(model_path),
    }
    if models["compiled"].compiled is None:
        raise SystemExit(f"{model_path}: no verified compiled scorer (relay model compile)")
    extractor = models["compiled"].extractor
    start = time.process_time()
    for raw in band:
        extractor.extract_bytes(raw)
    extract_ms = round((time.process_time() - start) / len(band) * 1000, 3)
    rows: dict[str, Any] = {"extract_only_median_sized_cpu_ms": extract_ms}
    for name, model in models.items():
        rows[name] = {
            "median_sized_cpu_ms_one_at_a_time": _cpu_per_message(model, band, 1),
            "median_sized_cpu_ms_batches_of_16": _cpu_per_message(model, band, 16),
            "every_message_cpu_ms_one_at_a_time": _cpu_per_message(model, everything, 1),
            "serving_process": _serving_memory(model_path, name),
        }
    probs = {
        name: [p for p, _ in model.classify_many(everything)] for name, model in models.items()
    }
    rows["max_abs_probability_difference_every_message"] = max(
        abs(a - b) for a, b in zip(probs["sklearn"], probs["compiled"], strict=True)
    )
    if test:
        spam = np.array([s for _, s in test], dtype=bool)
        for name, model in models.items():
            scores = [p for p, _ in model.classify_many([raw for raw, _ in test])]
            rows[name]["test_split_auc"] = roc_auc(spam, np.array(scores, dtype=np.float64))
        rows["test_split_messages"] = len(test)
    return rows


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
    lines += _side_by_side_markdown(result["sklearn_vs_compiled"])
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


def _side_by_side_markdown(paths: dict[str, Any]) -> list[str]:
    sk, co = paths["sklearn"], paths["compiled"]

    def ratio(key: str) -> str:
        return f"{sk[key] / co[key]:.1f}x" if co[key] else "-"

    lines = [
        "",
        "## scikit-learn pipeline vs compiled scorer (same model, same run)",
        "",
        "| CPU ms per message | scikit-learn | compiled | ratio |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("median_sized_cpu_ms_one_at_a_time", "median-sized, one at a time"),
        ("median_sized_cpu_ms_batches_of_16", "median-sized, batches of 16"),
        ("every_message_cpu_ms_one_at_a_time", "every message, one at a time"),
    ):
        lines.append(f"| {label} | {sk[key]} | {co[key]} | {ratio(key)} |")
    sm, cm = sk["serving_process"], co["serving_process"]
    lines += [
        "",
        f"Feature extraction alone (in both): {paths['extract_only_median_sized_cpu_ms']} ms "
        "CPU per median-sized message.",
        "",
        "| a process serving the model | scikit-learn | compiled |",
        "|---|---|---|",
        f"| RSS after load + warm-up, MiB | {sm['rss_mib']} | {cm['rss_mib']} |",
        f"| peak RSS (load), MiB | {sm['peak_rss_mib']} | {cm['peak_rss_mib']} |",
        f"| imports scikit-learn or scipy | {sm['imports_sklearn_or_scipy']} "
        f"| {cm['imports_sklearn_or_scipy']} |",
        "",
        "Largest |p(scikit-learn) - p(compiled)| over every message: "
        f"{paths['max_abs_probability_difference_every_message']:.3g}.",
    ]
    if "test_split_auc" in sk:
        lines.append(
            f"Test split ({paths['test_split_messages']} messages) ROC AUC: scikit-learn "
            f"{sk['test_split_auc']:.6f}, compiled {co['test_split_auc']:.6f}."
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "spam.skops")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        messages, source = _corpus_messages(Path(tmp))
        test = _test_split(Path(tmp))
    band, band_info = _median_sized(messages)
    load_before = os.getloadavg()
    # The pool first: this process has not imported scikit-learn yet, like the relay.
    pool = asyncio.run(through_pool(args.model, band, args.workers))
    inproc = in_process(args.model, band, messages)
    paths = side_by_side(args.model, band, messages, test)
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
        "sklearn_vs_compiled": paths,
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
