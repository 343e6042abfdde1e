"""`relay serve` and `relay milter`: the relay in this process, or a lean supervisor of
``[smtp] workers`` worker processes.

Why a module of its own, above the app: the supervisor only spawns workers, forwards
signals and serves the one metrics endpoint over their files. Importing the whole relay
(facts, policy and its CEL engine, DKIM, Redis, numpy ...) cost it about 55 MiB of RSS for
nothing, in a tree whose memory is a target (issue 17). So this module imports only
config, the supervisor, the metric files and the probes, and each spawned worker imports
the app itself (``worker_entry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing.connection
import os
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.config import Settings, load_settings
from relay.errors import ConfigError, RelayError
from relay.logconfig import configure_logging
from relay.ops.faults import fact_error_totals
from relay.ops.http import start_metrics_server
from relay.ops.multiprocess import prepare_multiprocess_dir, scrape_registry, worker_exited
from relay.ops.probes import SupervisorReadiness
from relay.smtp.supervisor import Supervisor

PID_FILE = Path("var/relay.pid")
METRICS_DIR = Path("var/metrics")  # per-worker metric files when [smtp] workers > 1


def worker_entry(
    config_path: str,
    index: int,
    ready: multiprocessing.connection.Connection,
    smtp: bool = True,
) -> None:
    """What a spawned worker runs: the app is imported here, in the worker, never by the
    supervisor (spawn pickles this function by name, so it must stay in a light module)."""
    from relay.app import worker_main

    worker_main(config_path, index, ready, smtp)


async def supervise(config_path: Path, settings: Settings, smtp: bool = True) -> int:
    """Several workers: each writes its metrics to files under var/metrics (the variable is
    set before any worker is spawned, see ops/multiprocess.py) and the supervisor serves
    the one endpoint that adds them up."""
    entry = worker_entry if smtp else functools.partial(worker_entry, smtp=False)
    supervisor = Supervisor(config_path, settings, entry, on_worker_exit=worker_exited)
    if not settings.metrics.enabled:
        return await supervisor.run()
    prepare_multiprocess_dir(METRICS_DIR)

    def workers_ready() -> bool:
        workers = supervisor.workers.values()
        return len(workers) == settings.smtp.workers and all(w.was_ready for w in workers)

    registry = CollectorRegistry()
    endpoint = await start_metrics_server(
        settings.metrics,
        registry,
        # Degraded from the workers' relay_fact_errors_total (their files, aggregated).
        SupervisorReadiness(
            settings, workers_ready, lambda: fact_error_totals(scrape_registry(registry))
        ),
        source=settings.source,
    )
    try:
        return await supervisor.run()
    finally:
        await endpoint.close()


def serve(config_path: Path, *, smtp: bool = True) -> int:
    """``relay serve`` (SMTP, plus the milter door when [milter] listen is set), or
    ``relay milter`` (``smtp=False``: the milter door only)."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log.level)
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    PID_FILE.write_text(f"{os.getpid()}\n")
    try:
        if settings.smtp.workers > 1:
            return asyncio.run(supervise(config_path, settings, smtp))
        from relay.app import run

        asyncio.run(run(settings, smtp=smtp))
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(FileNotFoundError):
            PID_FILE.unlink()
    return 0
