"""bench/loopmetric.py: the relay's own loop-lag histogram, scraped around the timed rounds."""

from __future__ import annotations

import math

from bench import loopmetric
from prometheus_client import CollectorRegistry, generate_latest

from relay.ops.metrics import Metrics


def _scrape(lags: list[float]) -> loopmetric.Buckets:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for lag in lags:
        metrics.loop_lag(lag)
    return loopmetric.parse(generate_latest(registry).decode())


def test_rounds_count_only_what_they_added_and_percentiles_are_bucket_bounds() -> None:
    idle = [0.0001] * 50  # before the round: an idle loop
    before = _scrape(idle)
    after = _scrape(idle + [0.0003] * 97 + [0.004, 0.004, 0.03])
    total: loopmetric.Buckets = {}
    loopmetric.add_delta(total, after, before)
    assert total[math.inf] == 100
    got = loopmetric.summary(total)
    assert got == {
        "samples": 100,
        "over_5ms": 1,
        "over_5ms_share": 0.01,
        "p50_le_ms": 0.5,
        "p99_le_ms": 5.0,
        "max_le_ms": 50.0,
    }


def test_nothing_scraped_is_no_figure() -> None:
    assert loopmetric.summary({}) == {
        "samples": 0,
        "over_5ms": 0,
        "over_5ms_share": None,
        "p50_le_ms": None,
        "p99_le_ms": None,
        "max_le_ms": None,
    }
