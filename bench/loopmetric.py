"""Event-loop lag from inside the relay: ``relay_event_loop_lag_seconds`` (ops/looplag.py),
scraped from the relay's /metrics before and after each timed round, so only loaded time
counts; the supervisor's endpoint sums the workers' histograms.

A percentile of a histogram is known to its bucket: the figure is the upper bound of the
bucket the quantile falls in ("p99 <= 5 ms"), which is what a target of 5 ms asks.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

METRIC = "relay_event_loop_lag_seconds_bucket"
Buckets = dict[float, float]  # upper bound (seconds; inf for +Inf) -> cumulative count


def parse(text: str) -> Buckets:
    out: Buckets = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == METRIC:
                le = float(sample.labels["le"])
                out[le] = out.get(le, 0.0) + float(sample.value)
    return out


async def scrape(port: int) -> Buckets:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    return parse(await asyncio.to_thread(get))


def add_delta(total: Buckets, after: Buckets, before: Buckets) -> None:
    for le, n in after.items():
        total[le] = total.get(le, 0.0) + n - before.get(le, 0.0)


def summary(buckets: Buckets) -> dict[str, float | int | None]:
    """Samples, how many were later than 5 ms, and the bucket bounds of p50, p99 and the
    largest sample, in ms."""
    count = buckets.get(math.inf, 0.0)

    def bound(q: float) -> float | None:
        for le in sorted(buckets):
            if buckets[le] >= q * count:
                return None if math.isinf(le) else round(le * 1000, 1)
        return None

    top = next((le for le in sorted(buckets) if buckets[le] >= count), math.inf)
    over_5ms = count - buckets.get(0.005, count)
    return {
        "samples": int(count),
        "over_5ms": int(over_5ms),  # the samples past the target's bound
        "over_5ms_share": round(over_5ms / count, 4) if count else None,
        "p50_le_ms": bound(0.5) if count else None,
        "p99_le_ms": bound(0.99) if count else None,
        "max_le_ms": None if math.isinf(top) or not count else round(top * 1000, 1),
    }
