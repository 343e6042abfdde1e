"""Several relay processes sharing one SMTP port (SO_REUSEPORT) under a supervisor.

One event loop saturates one core, so with ``[smtp] workers = N`` the supervisor spawns N
worker processes, each running the whole relay (its own loop, lifespan, downstream pool
and classifier client) on its own SO_REUSEPORT socket; the kernel spreads connections.
Shared state goes through the state store, never through memory.

The supervisor: forwards SIGTERM/SIGINT (drain, then exit 0) and SIGHUP (policy reload) to
every worker; restarts a worker that dies after it was ready; and stops everything with
exit status 2 when a worker fails before it became ready (bad model, port in use ...),
because restarting a broken configuration in a loop helps nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

from relay.config import Settings

log = logging.getLogger("relay.smtp.supervisor")

RESTART_BACKOFF = 1.0  # seconds before a crashed worker is restarted


# A worker's entry point: (config path, worker index, the pipe it reports ready on). It
# must be a module-level function (or a functools.partial of one), as spawned processes
# import it by name.
WorkerMain = Callable[[str, int, multiprocessing.connection.Connection], None]


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    ready: multiprocessing.connection.Connection
    was_ready: bool = False


@dataclass
class Supervisor:
    config_path: Path
    settings: Settings
    worker_main: WorkerMain
    on_worker_exit: Callable[[int], None] = lambda pid: None
    workers: dict[int, _Worker] = field(default_factory=dict)
    stopping: bool = False

    def _spawn(self, index: int) -> _Worker:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=self.worker_main,
            args=(str(self.config_path), index, child),
            name=f"relay-worker-{index}",
            daemon=False,
        )
        proc.start()
        child.close()
        return _Worker(index, proc, parent)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers.values():
            if w.process.pid is not None and w.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, sig)

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("supervisor: stopping %d workers", len(self.workers))
            self._signal_all(signal.SIGTERM)

    def reload(self) -> None:
        self._signal_all(signal.SIGHUP)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for i in range(self.settings.smtp.workers):
            self.workers[i] = self._spawn(i)
        status = 0
        deadline: float | None = None
        while self.workers:
            await asyncio.sleep(0.1)
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.settings.smtp.drain_timeout + 5
            for index, w in list(self.workers.items()):
                if not w.was_ready and w.ready.poll():
                    with contextlib.suppress(EOFError):
                        w.ready.recv()
                        w.was_ready = True
                        log.info("worker %d ready (pid %s)", index, w.process.pid)
                code = w.process.exitcode
                if code is None:
                    continue
                del self.workers[index]
                w.ready.close()
                if w.process.pid is not None:
                    self.on_worker_exit(w.process.pid)
                if self.stopping:
                    # A worker still starting when told to stop dies of the signal: clean.
                    clean = code == 0 or (code == -signal.SIGTERM and not w.was_ready)
                    status = status or (0 if clean else 1)
                elif not w.was_ready:
                    log.error("worker %d failed to start (exit %s); stopping", index, code)
                    self.stop()
                    status = 2
                else:
                    log.error("worker %d died (exit %s); restarting", index, code)
                    await asyncio.sleep(RESTART_BACKOFF)
                    self.workers[index] = self._spawn(index)
            if deadline is not None and time.monotonic() > deadline:
                log.error("workers did not drain in time; killing them")
                self._signal_all(signal.SIGKILL)
                status = status or 1
                deadline = time.monotonic() + 5
        return status
