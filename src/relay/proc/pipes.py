"""Child processes fed over pipes by the event loop itself: CPU work off the loop without
a helper thread in the relay process.

One module because both ends of one wire protocol (the frames, the parent's
``PipeWorkers``, the child's ``serve``) must change together; over 300 lines because of
the parent's failure handling (a dead child fails its callers, who retry once on its
replacement).

Why not ``ProcessPoolExecutor`` (or a thread): both put helper threads in the relay
process (a feeder and a result thread, or the worker itself) that take the GIL from the
event loop. Every socket call the loop makes releases the GIL, a waiting helper takes it,
and the loop must win it back: under load that ping-pong cost the relay 0.56 ms of CPU a
message, more than the DKIM verification it carried (bench/results/throughput.md). Here the
loop writes each request to a child's stdin and reads the answers from its stdout through
asyncio's own pipe transports: no thread, no lock, a write and a read callback.

Protocol, both directions: frames of a 4-byte big-endian length, one status byte and the
payload. A child first sends one frame saying it is ready (imports done: a child that
cannot start fails ``start``), then answers its requests in the order they came (it
serves one at a time), so the parent matches answers to callers by order alone.
Payloads are bytes; what they mean is the caller's business (never pickle: they are
parsed, not loaded).

The parent side is ``PipeWorkers``; a child module calls ``serve(handler)``.

Bounds (docs/operations.md "Overload"): a pool holds at most ``max_pending`` requests
(sent and unanswered, or waiting for a child to start); one more fails at once with
``WorkerBusy`` instead of queueing. A request unanswered after its ``kill_after`` seconds
fails with ``WorkerTimeout`` and its child is killed (a stopped or looping child would hold
every later request); the other requests that child held fail with ``WorkerDied``, and a
caller that asked for ``retry`` tries those once more on the replacement.

A child that exits is replaced at once, before the next request needs it. A child that
cannot start is tried again after a growing pause (proc/restarts.py); while the pause
lasts, a request with no living child fails at once with ``WorkerDied``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from relay.errors import WorkerBusy, WorkerDied, WorkerError, WorkerTimeout
from relay.proc.lifetime import die_with_parent, release_free_memory
from relay.proc.restarts import Restarts

log = logging.getLogger("relay.proc.pipes")

OK, ERROR = 0, 1
MAX_FRAME = 1 << 31  # a sanity bound: the relay's own size limits are far below it
_READ_SIZE = 1 << 20
_JOIN_BELOW = 64 * 1024  # request pieces smaller than this leave joined in one write
_WRITE_CHUNK = 256 * 1024  # a large piece goes to the pipe this much at a time
TRIM_ABOVE = 4 * 1024 * 1024  # after requests this large a child gives its heap back
START_TIMEOUT = 60.0  # seconds for a child to import and say hello (a cold disk is slow)


def frame(status: int, payload: bytes) -> bytes:
    return frame_head(status, len(payload)) + payload


def frame_head(status: int, size: int) -> bytes:
    """The length and status bytes of a frame whose payload is ``size`` bytes."""
    return (size + 1).to_bytes(4, "big") + bytes((status,))


def split_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Every complete frame at the start of ``buffer`` (removed from it)."""
    frames = []
    start = 0
    while len(buffer) - start >= 4:
        size = int.from_bytes(buffer[start : start + 4], "big")
        if not 1 <= size <= MAX_FRAME:
            raise ValueError(f"bad frame length {size}")
        end = start + 4 + size
        if end > len(buffer):
            break
        with memoryview(buffer) as view:  # one copy of a payload, not two
            frames.append((buffer[start + 4], bytes(view[start + 5 : end])))
        start = end
    del buffer[:start]
    return frames


class _Child(asyncio.SubprocessProtocol):
    """One child: its stdin transport, and the callers waiting for answers in order."""

    def __init__(self, name: str, on_exit: Callable[[_Child], None]) -> None:
        self.name = name
        self.pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._buffer = bytearray()
        self._outbox: collections.deque[bytes | memoryview] = collections.deque()
        self._paused = False  # the pipe transport holds more than its high-water mark
        self._on_exit = on_exit
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()  # its first frame arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        self._stdin = stdin

    def send(self, parts: tuple[bytes, ...], future: asyncio.Future[bytes]) -> None:
        """Queue a request (its payload is ``parts`` joined); every request of one loop
        turn leaves together, so a loaded child wakes once for several of them (and
        answers them in one write)."""
        self.pending.append(future)
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(frame_head(OK, sum(map(len, parts))))
        self._outbox.extend(parts)

    def _flush(self) -> None:
        """Write what the pipe takes. Small pieces are joined into one write; a large one
        (a message) goes a chunk at a time, only while the transport is not paused: were it
        handed over whole, the transport would copy what the pipe cannot take at once, a
        second copy of every 25 MB message waiting for the child."""
        stdin = self._stdin
        if stdin is None or stdin.is_closing():
            self._outbox.clear()
            return
        outbox = self._outbox
        small: list[bytes | memoryview] = []
        while outbox and not self._paused:
            piece = outbox.popleft()
            if len(piece) < _JOIN_BELOW:
                small.append(piece)
                continue
            if small:
                stdin.write(b"".join(small))
                small = []
            view = memoryview(piece)
            stdin.write(view[:_WRITE_CHUNK])  # may pause us (pause_writing)
            if len(view) > _WRITE_CHUNK:
                outbox.appendleft(view[_WRITE_CHUNK:])
        if small:
            stdin.write(b"".join(small))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._flush()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        self._buffer += data
        try:
            frames = split_frames(self._buffer)
        except ValueError as exc:  # the child broke the protocol: treat it as dead
            log.error("%s: %s; stopping it", self.name, exc)
            self.kill()
            return
        for status, payload in frames:
            if not self.ready.done():  # the child's hello: imports done, signals set
                self.ready.set_result(None)
                continue
            if not self.pending:
                log.error("%s: an answer nobody asked for; stopping it", self.name)
                self.kill()
                return
            future = self.pending.popleft()
            if future.done():  # the caller was cancelled meanwhile
                continue
            if status == OK:
                future.set_result(payload)
            else:
                future.set_exception(WorkerError(payload.decode("utf-8", "replace")))

    def kill(self) -> None:
        if self.transport is not None and self.transport.get_returncode() is None:
            self.transport.kill()

    def process_exited(self) -> None:
        self._outbox.clear()
        if not self.exited.done():
            self.exited.set_result(None)
        code = self.transport.get_returncode() if self.transport is not None else None
        if not self.ready.done():
            self.ready.set_exception(WorkerDied(f"{self.name} exited with status {code}"))
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(WorkerDied(f"{self.name} exited with status {code}"))
        if self.transport is not None:
            self.transport.close()  # its pipes too
        self._on_exit(self)


class PipeWorkers:
    """``processes`` children running ``python -m module PARENT_PID *args``; a child that
    exits is replaced. Loop-affine: start, call and close from one event loop."""

    def __init__(
        self,
        module: str,
        processes: int,
        *,
        name: str = "worker",
        args: Sequence[str] = (),
        max_pending: int | None = None,
        restarts: Restarts | None = None,
        nice: int = 0,
    ) -> None:
        if processes < 1:
            raise ValueError("at least one process")
        if max_pending is not None and max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.module = module
        self.processes = processes
        self.name = name
        self.args = tuple(args)
        self.max_pending = max_pending
        self.nice = nice
        self.replaced = 0  # children that exited (died, killed) while the pool was open
        self._children: list[_Child] = []
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        self._spawned = 0
        self._waiting = 0  # callers waiting for a child to start
        self._restarts = restarts or Restarts()
        self._restart: asyncio.TimerHandle | None = None  # the next start, scheduled

    def _time(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> None:
        """Start the missing children (at most one start at a time); nothing while a
        pause after early exits lasts (the scheduled start comes after it)."""
        if self._restarts.wait(self._time()) > 0:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start_missing())
        await asyncio.shield(self._starting)

    async def _start_missing(self) -> None:
        while not self._closed and len(self._children) < self.processes:
            try:
                child = await self._spawn()
            except Exception:
                if not self._closed:
                    self._schedule(self._restarts.failed(self._time()))
                raise
            self._restarts.started()
            self._children.append(child)
            if self.replaced:
                log.info("%s ready (a replacement)", child.name)

    def _schedule(self, delay: float) -> None:
        """Try to start the missing children ``delay`` seconds from now, whether or not a
        request asks for one."""
        if self._restart is not None:
            self._restart.cancel()
        self._restart = asyncio.get_running_loop().call_later(delay, self._start_soon)

    async def _spawn(self) -> _Child:
        self._spawned += 1
        child = _Child(f"{self.name}-{self._spawned}", self._exited)
        transport, _ = await asyncio.get_running_loop().subprocess_exec(
            lambda: child,
            sys.executable,
            "-m",
            self.module,
            str(os.getpid()),
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # a child's traceback reaches the relay's log stream
        )
        if self.nice:
            _lower_priority(transport.get_pid(), self.nice)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await child.ready
        except BaseException:
            child.kill()
            raise
        return child

    def _exited(self, child: _Child) -> None:
        if child in self._children:
            self._children.remove(child)
            if not self._closed:
                self.replaced += 1
                log.warning("%s exited; starting another", child.name)
                self._start_soon()  # before the next request needs it

    @property
    def pids(self) -> list[int]:
        return [c.transport.get_pid() for c in self._children if c.transport is not None]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed_starts(self) -> int:
        """Starts in a row whose child exited before it was ready (0 once one is)."""
        return self._restarts.failures

    @property
    def pending(self) -> int:
        """Requests held now: sent and unanswered, or waiting for a child to start."""
        return self._waiting + sum(len(c.pending) for c in self._children)

    async def call(
        self, *parts: bytes, kill_after: float | None = None, retry: bool = False
    ) -> bytes:
        """The answer to the request ``parts`` joined (passed apart so a large part is
        never copied to join it) from the least busy child. Raises WorkerDied when the
        child exits first, WorkerError when its handler failed, WorkerTimeout when no
        answer came within ``kill_after`` seconds: then the child is killed, as one stuck
        on an input must not hold every later message (a caller's own timeout would only
        stop waiting). WorkerBusy when the pool already holds ``max_pending`` requests.

        ``retry``: a request whose child died (the OOM killer, a crash in a C extension,
        killed for another request's overrun) is sent once more, to the replacement; a
        request that kills its child twice gets WorkerDied. A request that overran its
        own ``kill_after`` is never retried: it is the likely cause."""
        try:
            return await self._call(parts, kill_after)
        except WorkerDied:
            if not retry or self._closed:
                raise
            log.warning("%s: a process died under a request; retrying it once", self.name)
            # On a full pool again: the other children may have died with it (their exit
            # not seen yet), and a retry must not go to one of them.
            await self.start()
            return await self._call(parts, kill_after)

    async def _call(self, parts: tuple[bytes, ...], kill_after: float | None) -> bytes:
        if self._closed:
            raise WorkerDied(f"{self.name} pool is closed")
        if self.max_pending is not None and self.pending >= self.max_pending:
            raise WorkerBusy(f"{self.name}: {self.pending} requests pending already")
        if not self._children and (pause := self._restarts.wait(self._time())) > 0:
            raise WorkerDied(
                f"{self.name}: {self._restarts.failures} failed starts in a row; "
                f"next try in {pause:.1f} s"
            )
        if not self._children:  # none alive: wait for one (counted against the bound)
            self._waiting += 1
            try:
                await self.start()
            finally:
                self._waiting -= 1
        elif len(self._children) < self.processes:  # serve on the living meanwhile
            self._start_soon()
        if not self._children:
            raise WorkerDied(f"{self.name}: no process could be started")
        child = min(self._children, key=lambda c: len(c.pending))
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        child.send(parts, future)
        if kill_after is None:
            return await future
        # a timer, not wait_for: no extra task or future per request on the hot path
        timer = asyncio.get_running_loop().call_later(
            kill_after, self._expire, child, future, kill_after
        )
        try:
            return await future
        finally:
            timer.cancel()

    def _start_soon(self) -> None:
        if self._closed or self._restarts.wait(self._time()) > 0:
            return  # the scheduled start comes after the pause
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start_missing())
            self._starting.add_done_callback(_log_start_failure)

    def _expire(self, child: _Child, future: asyncio.Future[bytes], after: float) -> None:
        if future.done():
            return
        future.set_exception(WorkerTimeout(f"{self.name}: no answer within {after:.3g} s"))
        log.error("%s gave no answer within %.3g s; killing it", child.name, after)
        child.kill()

    async def close(self) -> None:
        """Close every child's stdin (it exits at end of input) and wait for it."""
        self._closed = True
        if self._restart is not None:
            self._restart.cancel()
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        children, self._children = self._children, []
        for child in children:
            if child.transport is not None:
                child.transport.close()  # closes the pipes; the child sees EOF
        for child in children:
            if child.transport is None:
                continue
            try:
                await asyncio.wait_for(asyncio.shield(child.exited), 5)
            except TimeoutError:
                child.kill()


def _lower_priority(pid: int, by: int) -> None:
    """Raise a child's nice value ``by`` steps above the relay's own (lowering a priority
    needs no privilege). A child that has already exited is replaced anyway."""
    with contextlib.suppress(ProcessLookupError):
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) + by)


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("could not start a replacement process: %s", exc)


def _read_frames(fd: int, buffer: bytearray) -> list[tuple[int, bytes]] | None:
    """Block until at least one whole frame is buffered; None at end of input."""
    while True:
        frames = split_frames(buffer)
        if frames:
            return frames
        chunk = os.read(fd, _READ_SIZE)
        if not chunk:
            return None
        buffer += chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(
    handler: Callable[[bytes], bytes],
    many: Callable[[list[bytes]], list[bytes]] | None = None,
) -> int:
    """The child's main loop: answer each request frame on stdin with ``handler``'s
    result on stdout, in order, until stdin closes. A handler exception becomes an error
    frame (its type name) for that request alone.

    ``many``, when given, answers all the requests that arrived together in one call (the
    classifier predicts a batch for little more than one message); should it raise, each
    request is answered by ``handler`` alone, so one bad input fails only itself.

    The child leaves when its parent closes the pipe, never on a signal meant for the
    relay: SIGTERM or Ctrl-C sent to the process group must not kill it while the relay
    drains its last messages. If the parent dies (argv[1] is its pid), the kernel kills it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(sys.argv) > 1 and sys.argv[1].isdigit():
        die_with_parent(int(sys.argv[1]), signal.SIGKILL)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr  # nothing but frames may reach the real stdout
    _write_all(stdout, frame(OK, b"ready"))
    buffer = bytearray()
    while True:
        frames = _read_frames(stdin, buffer)
        if frames is None:
            return 0
        large = sum(len(payload) for _, payload in frames) > TRIM_ABOVE
        # every request that arrived together is answered with one write
        _write_all(stdout, _answer(frames, handler, many))
        if large:  # the payloads are gone now: give their memory back, not keep it
            del frames
            release_free_memory()


def _answer(
    frames: list[tuple[int, bytes]],
    handler: Callable[[bytes], bytes],
    many: Callable[[list[bytes]], list[bytes]] | None = None,
) -> bytes:
    if many is not None and len(frames) > 1:
        try:
            results = many([payload for _status, payload in frames])
        except Exception:  # noqa: S110 - answered one by one below, each with its own error
            pass
        else:
            if len(results) == len(frames):
                return b"".join(frame(OK, result) for result in results)
    answers = []
    for _status, payload in frames:
        try:
            answers.append(frame(OK, handler(payload)))
        except Exception as exc:  # the type alone: a message could quote the payload
            answers.append(frame(ERROR, type(exc).__name__.encode()))
    return b"".join(answers)
