"""Several relay processes sharing one SMTP port (SO_REUSEPORT) under a supervisor.

One event loop saturates one core, so with ``[smtp] workers = N`` the supervisor starts N
worker processes, each running the whole relay (its own loop, lifespan, downstream pool
and classifier client) on its own SO_REUSEPORT socket; the kernel spreads connections.
Shared state goes through the state store, never through memory.

The supervisor: forwards SIGTERM/SIGINT (drain, then exit 0) and SIGHUP (policy reload) to
every worker; restarts a worker that dies after it was ready; and stops everything with
exit status 2 when a worker fails before it became ready (bad model, port in use ...),
because restarting a broken configuration in a loop helps nobody.

Workers are plain subprocesses (a fresh interpreter running the command the caller gives),
not ``multiprocessing`` processes: multiprocessing's spawn method starts a resource-tracker
process beside them (12 MiB RSS for nothing; issue 17). A worker says it is ready by
writing to a pipe it inherits (its write end's number is in its command line) and closing
it; a worker that exits before that failed to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relay.config import Settings

log = logging.getLogger("relay.smtp.supervisor")

RESTART_BACKOFF = 1.0  # seconds before a crashed worker is restarted


# A worker's command line, from its index and the number of the pipe's write end it
# inherits (it writes there once ready, see ``report_ready``).
WorkerCommand = Callable[[int, int], Sequence[str]]


def report_ready(fd: int) -> None:
    """In a worker, once it serves: tell the supervisor (the pipe's ``fd`` is closed)."""
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready: int  # the read end of the worker's ready pipe (non-blocking); -1 once closed
    was_ready: bool = False

    def poll_ready(self) -> bool:
        """Read the ready pipe without waiting (whether the worker said ready now): data
        means ready; end of file before it means the worker exited (or closed the pipe)
        without ever saying so."""
        if self.ready < 0:
            return False
        try:
            data = os.read(self.ready, 64)
        except BlockingIOError:
            return False
        self.close()
        self.was_ready = bool(data)
        return self.was_ready

    def close(self) -> None:
        if self.ready >= 0:
            os.close(self.ready)
            self.ready = -1


@dataclass
class Supervisor:
    settings: Settings
    worker_command: WorkerCommand
    on_worker_exit: Callable[[int], None] = lambda pid: None
    workers: dict[int, _Worker] = field(default_factory=dict)
    stopping: bool = False

    def _spawn(self, index: int) -> _Worker:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            proc = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
                list(self.worker_command(index, write_end)),
                stdin=subprocess.DEVNULL,
                pass_fds=(write_end,),  # and no other descriptor of the supervisor's
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the worker holds it now: EOF once the worker is gone
        return _Worker(index, proc, read_end)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers.values():
            if w.process.returncode is None:
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
                code = w.process.poll()  # first: a worker that exited has written all
                if not w.was_ready and w.poll_ready():
                    log.info("worker %d ready (pid %s)", index, w.process.pid)
                if code is None:
                    continue
                del self.workers[index]
                w.close()
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
