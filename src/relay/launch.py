"""`relay serve` and `relay milter`: the relay in this process, or a lean supervisor of
``[smtp] workers`` worker processes.

Why a module of its own, above the app: the supervisor only spawns workers, forwards
signals and serves the one metrics endpoint over their files. Importing the whole relay
(facts, policy and its CEL engine, DKIM, Redis, numpy ...) cost it about 55 MiB of RSS for
nothing, in a tree whose memory is a target (issue 17). So this module imports only
config, the supervisor, the metric files and the probes, and each worker, a fresh
``python -m relay.launch`` process, imports the app itself (``worker_entry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.config import Settings, load_settings
from relay.errors import ConfigError, RelayError
from relay.logconfig import configure_logging
from relay.ops.faults import fact_error_totals
from relay.ops.http import start_metrics_server
from relay.ops.multiprocess import prepare_multiprocess_dir, scrape_registry, worker_exited
from relay.ops.probes import SupervisorReadiness
from relay.proc.lifetime import die_with_parent
from relay.smtp.supervisor import Supervisor, WorkerCommand, report_ready

PID_FILE = Path("var/relay.pid")
METRICS_DIR = Path("var/metrics")  # per-worker metric files when [smtp] workers > 1


def worker_command(config_path: Path, smtp: bool = True) -> WorkerCommand:
    """The command line of worker ``index``: ``python -m relay.launch`` (``main`` below)
    with the config, the index, the ready pipe's descriptor and the supervisor's pid."""
    supervisor = os.getpid()

    def command(index: int, ready_fd: int) -> list[str]:
        door = "smtp" if smtp else "milter"
        return [
            sys.executable,
            "-m",
            "relay.launch",
            str(config_path),
            str(index),
            str(ready_fd),
            str(supervisor),
            door,
        ]

    return command


def worker_entry(config_path: str, index: int, ready_fd: int, smtp: bool = True) -> None:
    """What a worker runs: the app is imported here, in the worker, never by the
    supervisor."""
    from relay.app import worker_main

    worker_main(config_path, index, functools.partial(report_ready, ready_fd), smtp)


def main(argv: Sequence[str]) -> int:
    """``python -m relay.launch CONFIG INDEX READY_FD SUPERVISOR_PID smtp|milter``: one
    worker, as the supervisor starts it (``worker_command``); not a command for people."""
    if len(argv) != 5 or argv[4] not in ("smtp", "milter"):
        print("relay.launch: started by relay serve, not by hand", file=sys.stderr)
        return 2
    config_path, index, ready_fd, supervisor, door = argv
    os.set_inheritable(int(ready_fd), False)  # the worker's own children must not hold it
    # Dies with the supervisor, even a SIGKILLed one: SIGTERM, so it drains like on stop.
    die_with_parent(int(supervisor), signal.SIGTERM)
    worker_entry(config_path, int(index), int(ready_fd), smtp=door == "smtp")
    return 0


async def supervise(config_path: Path, settings: Settings, smtp: bool = True) -> int:
    """Several workers: each writes its metrics to files under var/metrics (the variable is
    set before any worker is spawned, see ops/multiprocess.py) and the supervisor serves
    the one endpoint that adds them up."""
    command = worker_command(config_path, smtp)
    supervisor = Supervisor(settings, command, on_worker_exit=worker_exited)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
