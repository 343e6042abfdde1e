"""prometheus_client's multiprocess mode, for several worker processes (``[smtp] workers
> 1``): the directory, the aggregated scrape, and a dead worker's gauges.

prometheus_client picks its value class once, when ``prometheus_client.values`` is first
imported: with ``PROMETHEUS_MULTIPROC_DIR`` set, every metric writes to a memory-mapped
file ``<kind>_<pid>.db`` in that directory, otherwise to process memory. So:

- the supervisor calls ``prepare_multiprocess_dir`` (fresh, empty directory; sets the
  variable) BEFORE any worker imports prometheus_client. Workers are fresh
  interpreters (``python -m relay.launch``, inheriting the environment) that import it
  afresh and see the variable; workers *forked* from a supervisor that had already
  imported prometheus_client inherit the in-memory value class, which ``Metrics``
  detects (``values_are_mmapped``) and refuses;
- the supervisor serves the endpoint, which aggregates every file (``scrape_registry``);
  counters of a dead worker stay in its file, so totals survive a worker restart;
- the supervisor calls ``worker_exited(pid)`` when a worker ends, so live gauges (open
  connections, reload state) stop counting it;
- Info metrics do not work in that mode, so the model info becomes a gauge with the same
  exposed name (``relay_model_info{version,trained_at} 1``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, values
from prometheus_client import multiprocess as prom_multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The multiprocess directory when this process runs in multiprocess mode."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def values_are_mmapped() -> bool:
    """Whether prometheus_client chose its memory-mapped (multiprocess) value class."""
    return values.ValueClass is not values.MutexValue


def prepare_multiprocess_dir(path: Path) -> Path:
    """Supervisor, before starting workers: make ``path`` a fresh, empty directory and set
    PROMETHEUS_MULTIPROC_DIR for the workers (children inherit the environment).

    Files left by a previous run would add old counts to this run's, so the directory is
    emptied. Only a directory whose files all look like prometheus_client's ``*.db``
    files is removed, so a mistyped path cannot wipe anything else.
    """
    path = path.resolve()
    if path.exists():
        stray = [p.name for p in path.iterdir() if not (p.is_file() and p.suffix == ".db")]
        if stray:
            raise RuntimeError(
                f"{path} holds files other than metrics *.db files "
                f"({', '.join(sorted(stray)[:3])}); refusing to empty it"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o750)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def worker_exited(pid: int) -> None:
    """Supervisor, when a worker process ends: drop its live gauges (counters stay)."""
    directory = multiprocess_dir()
    if directory is not None:
        prom_multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What the endpoint exposes: every worker's files in multiprocess mode, else ``registry``."""
    directory = multiprocess_dir()
    if directory is None:
        return registry
    aggregate = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(aggregate, path=str(directory))  # type: ignore[no-untyped-call]
    return aggregate
