"""Where pass 1 runs: the local process pool, or a Dask cluster (the `distributed` extra).

``--engine local`` is compute.parallel_pass, unchanged (in chunks of LOCAL_CHUNK
messages). ``--engine dask`` sends the same work to a Dask scheduler as tasks, one per
batch of messages, and gets back the same outcomes, so a report is identical whichever
engine computed it:

- a task's argument is plain data: per message its exact bytes, digest, time, position,
  envelope and peer as str/int/list/dict (``message_payload``), with the LabEnv value
  (settings, trusted authserv-ids, inputs path) the driver built;
- a task's result is plain data too: per message ``[digest, {fact: [value, error]}]``,
  the JSON-able outcomes the cache stores, plus the worker's ``LabEnv.key()``;
- the driver (the `relay lab` process) writes the fact cache; workers never open it;
- batches are bounded (``BATCH`` messages) and only a few are in flight per worker, so
  neither the scheduler nor the driver holds a national corpus twice over;
- a batch whose worker dies is run again by the scheduler (Dask reschedules the tasks a
  lost worker held, up to ``distributed.scheduler.allowed-failures``); a batch that
  raises is retried ``RETRIES`` times, then the run stops with the error.

Pass 2 (stateful facts: bulk counts, sender volumes, in corpus time) runs here too, as a
key-sharded replay (shards.py): workers derive each message's state keys (a map step,
``declare_task``), the driver groups them and plans which messages each shard replays, each
shard is one task (``replay_task``: plain ops in, plain values out, a pure function of
its ops, so a retried or rescheduled shard gives the same values), and the driver joins
and caches the values only once every shard has finished: a run that stops in pass 2
caches nothing of it. ``--pass2 sequential`` keeps the single ordered loop on the driver
(compute.py), the local engine's default. Pass 1's live structured values (the decoded
body) are not plain data and are not shipped back; pass 2 recomputes the few it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from relay.errors import RelayError
from relay.facts import Services
from relay.lab import shards
from relay.lab.cache import Cached
from relay.lab.compute import (
    Computed,
    Item,
    Outcomes,
    Progress,
    parallel_pass,
    sequential_pass,
    share_with,
)
from relay.lab.corpus import CorpusMessage, holding
from relay.lab.env import LabEnv, lab_services
from relay.message import Envelope, Peer
from relay.pipeline.recorder import Record
from relay.secretkey import SecretKey

if TYPE_CHECKING:
    from distributed import Client

EngineKind = Literal["local", "dask"]
ENGINES: tuple[EngineKind, ...] = ("local", "dask")
Pass2 = Literal["auto", "sequential", "sharded"]
PASS2: tuple[Pass2, ...] = ("auto", "sequential", "sharded")
SHARDS_PER_WORKER = 2  # pass 2 shards per worker thread: balance without much set-up
BATCH = 100  # messages per task: a few seconds of work, a few MB of bytes
IN_FLIGHT = 3  # batches submitted per worker: one running, the next ones already shipped
RETRIES = 2  # extra attempts for a batch that raised (a dead worker's batch is separate)
# Messages per local pool run in pass 1: each run starts the pool again (about 2 s with
# the classifier, against 1 to 2 min of work for a chunk on 2 cores) and its results are
# stored and let go before the next, so a cold run's driver and workers hold one chunk.
LOCAL_CHUNK = 50_000

Payload = dict[str, Any]
Task = Callable[[LabEnv, list[Payload], str], dict[str, Any]]
Store = Callable[[Mapping[str, Computed]], None]


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Which engine runs pass 1 and how to reach it."""

    kind: EngineKind = "local"
    scheduler: str | None = None  # tcp://HOST:PORT of a running Dask scheduler
    workers: int = 0  # no scheduler: start a loopback LocalCluster of this many (0: --jobs)
    batch: int = BATCH
    pass2: Pass2 = "auto"  # auto: sharded on a cluster, the ordered loop locally
    shards: int = 0  # pass 2 shards (0: --jobs locally, 2 per worker thread on a cluster)

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise RelayError(f"--engine: one of {', '.join(ENGINES)}, not {self.kind!r}")
        if self.pass2 not in PASS2:
            raise RelayError(f"--pass2: one of {', '.join(PASS2)}, not {self.pass2!r}")
        if self.shards < 0:
            raise RelayError("--shards: 0 or more")
        if self.kind == "local" and (self.scheduler is not None or self.workers):
            raise RelayError("--scheduler and --workers need --engine dask")
        if self.workers < 0 or self.batch < 1:
            raise RelayError("--workers: 0 or more; batch: at least 1")

    @property
    def sharded(self) -> bool:
        """Whether pass 2 runs as a sharded replay (else the ordered loop, compute.py)."""
        return self.pass2 == "sharded" or (self.pass2 == "auto" and self.kind == "dask")


def first_pass(
    spec: EngineSpec,
    env: LabEnv,
    items: Sequence[Item],
    jobs: int,
    progress: Progress,
    store: Store,
) -> dict[str, Computed]:
    """Pass 1 over ``items`` on the chosen engine; ``store`` gets every result once (the
    local pool's a chunk of LOCAL_CHUNK messages at a time, a cluster's batch by batch as
    they finish). Returned: what pass 2 needs beyond the cache, each message's carried
    live values (outcomes empty: ``store`` has them), so the driver's memory is bounded
    by a chunk's results, not the corpus's."""
    out: dict[str, Computed] = {}

    def keep(computed: Mapping[str, Computed]) -> None:
        store(computed)
        out.update((d, Computed({}, c.carry)) for d, c in computed.items() if c.carry)

    if spec.kind == "local" or not items:
        for start in range(0, len(items), LOCAL_CHUNK):
            keep(parallel_pass(env, items[start : start + LOCAL_CHUNK], jobs, progress))
        return out
    dask_pass(spec, env, items, jobs, progress, keep, keep_outcomes=False)
    return out


# ---- plain payloads -------------------------------------------------------------------


def message_payload(message: CorpusMessage, names: Sequence[str]) -> Payload:
    """One message as plain values: what a worker needs to rebuild it exactly."""
    return {
        "id": message.id,
        "label": message.label,
        "digest": message.digest,
        "raw": message.raw(),  # read here, per message: the driver holds no bytes
        "time": message.time,
        "index": message.index,
        "envelope": {
            "mail_from": message.envelope.mail_from,
            "rcpt_to": list(message.envelope.rcpt_to),
            "mail_options": list(message.envelope.mail_options),
            "smtputf8": message.envelope.smtputf8,
        },
        "peer": dataclasses.asdict(message.peer),
        "names": list(names),
    }


def message_from_payload(p: Payload) -> Item:
    raw = p["raw"]
    if not isinstance(raw, bytes) or hashlib.sha256(raw).hexdigest() != p["digest"]:
        # The digest is the cache key: bytes that do not match it must not be cached.
        raise RelayError(f"lab: message {p['id']!r} arrived with bytes not matching its digest")
    e = p["envelope"]
    envelope = Envelope(
        mail_from=e["mail_from"],
        rcpt_to=tuple(e["rcpt_to"]),
        mail_options=tuple(e["mail_options"]),
        smtputf8=e["smtputf8"],
    )
    message = CorpusMessage(
        id=p["id"],
        label=p["label"],
        digest=p["digest"],
        source=holding(p["id"], p["label"], raw),
        time=p["time"],
        index=p["index"],
        envelope=envelope,
        peer=Peer(**p["peer"]),
    )
    return message, tuple(p["names"])


class _Session:
    """The lab's services, open in one worker thread for the batches of one run.

    Opening them costs seconds (the classifier's serving process and model, the suffix
    list), more than a batch's own work, so a worker thread opens them once per run, as
    each local pool process does for its share. The driver closes them when its run ends
    (``close_sessions`` on every worker); a killed worker's children die with it
    (proc/lifetime.py).
    """

    def __init__(self, env: LabEnv, run: str) -> None:
        if env.settings.model.enabled and multiprocessing.current_process().daemon:
            # Dask's default: the classifier's serving process could not start, and the
            # operator would see multiprocessing's bare assertion.
            raise RelayError(
                "lab: this Dask worker is a daemonic process and cannot start the "
                "classifier's process; start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False"
            )
        self.env = env
        self.run = run
        self.registry = env.registry()
        self.runner = asyncio.Runner()  # one loop for the session: services live on it
        self.tmp = tempfile.TemporaryDirectory(prefix="relay-lab-")
        self.stack = contextlib.AsyncExitStack()
        opening = lab_services(env, Path(self.tmp.name), stateful=False)
        self.services: Services = self.runner.run(self.stack.enter_async_context(opening))

    def compute(self, items: Sequence[Item]) -> list[tuple[str, Computed]]:
        return self.runner.run(share_with(self.registry, self.services, items))

    def close(self) -> None:
        try:
            self.runner.run(self.stack.aclose())
        finally:
            self.runner.close()
            self.tmp.cleanup()


# One per worker thread (a Dask worker may run several; one loop serves one at a time).
_sessions: dict[int, _Session] = {}
_sessions_lock = threading.Lock()


def _session(env: LabEnv, run: str) -> _Session:
    me = threading.get_ident()
    with _sessions_lock:
        current = _sessions.pop(me, None)
    if current is not None and (current.run, current.env) == (run, env):
        session = current
    else:
        if current is not None:
            current.close()
        session = _Session(env, run)
    with _sessions_lock:
        _sessions[me] = session
    return session


def close_sessions() -> int:
    """Close this worker's lab services (run on every worker when a run ends).

    Called in the worker's event-loop thread, where no other loop may run: each session
    is closed from a thread of its own.
    """
    with _sessions_lock:
        sessions = list(_sessions.values())
        _sessions.clear()
    for session in sessions:
        closing = threading.Thread(target=session.close, name="relay-lab-close")
        closing.start()
        closing.join()
    return len(sessions)


def compute_batch(env: LabEnv, batch: list[Payload], run: str = "") -> dict[str, Any]:
    """The engine task: pass 1 for one batch, in the worker's process, as plain values.

    The worker's own ``env.key()`` goes back with the results: it digests the model file
    and lab inputs as this worker sees them, so a worker with another model or other
    lists at the same path is caught instead of filling the cache with wrong values.
    """
    results = _session(env, run).compute([message_from_payload(p) for p in batch])
    return {
        "env_key": env.key(),
        "results": [
            [digest, {n: [c.value, c.error] for n, c in got.outcomes.items()}]
            for digest, got in results
        ],
    }


def check_env(worker_key: str, env_key: str) -> None:
    if worker_key != env_key:
        raise RelayError(
            "lab: a worker computed facts in another environment (its model file or lab "
            f"inputs differ from the driver's: key {worker_key} != {env_key}); "
            "give every worker the same files at the same paths"
        )


def computed_from_result(result: Mapping[str, Any], env_key: str) -> dict[str, Computed]:
    check_env(result["env_key"], env_key)
    return {
        digest: Computed({n: Cached(v, e) for n, (v, e) in outcomes.items()})
        for digest, outcomes in result["results"]
    }


def batches(items: Sequence[Item], size: int) -> Iterator[list[Payload]]:
    # Built lazily, as batches are submitted: only the batches in flight hold a copy of
    # their messages' bytes.
    for start in range(0, len(items), size):
        yield [message_payload(m, names) for m, names in items[start : start + size]]


# ---- the cluster ----------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(spec: EngineSpec, jobs: int) -> Iterator[Client]:
    """A client of the given scheduler, or of a LocalCluster on loopback started here."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise RelayError(
            "--engine dask needs the 'distributed' extra: pip install 'relay[distributed]'"
        ) from exc
    if spec.scheduler is not None:
        with Client(spec.scheduler, set_as_default=False, timeout="30s") as client:
            yield client
        return
    # Workers must not be daemonic processes: the classifier serves from a child process
    # (classifier/serving.py), which a daemonic process may not start.
    with dask.config.set({"distributed.worker.daemon": False}), warnings.catch_warnings():
        # The scheduler's HTTP endpoints (health, metrics) take another loopback port when
        # 8787 is taken, and say so: nothing to act on.
        warnings.filterwarnings("ignore", "Port 8787 is already in use", UserWarning)
        with (
            LocalCluster(
                n_workers=spec.workers or jobs,
                threads_per_worker=1,  # one message share per process, as the local pool
                processes=True,
                host="127.0.0.1",  # loopback only: a Dask scheduler runs what it is sent
                dashboard_address=None,
                worker_dashboard_address=None,
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            yield client


def dask_pass(
    spec: EngineSpec,
    env: LabEnv,
    items: Sequence[Item],
    jobs: int,
    progress: Progress,
    store: Store = lambda computed: None,
    task: Task = compute_batch,
    *,
    keep_outcomes: bool = True,
) -> dict[str, Computed]:
    """Pass 1 as Dask tasks; the driver merges the plain results and hands each batch's
    to ``store`` (the fact cache) as it arrives. ``keep_outcomes`` False: returns nothing
    (the caller's ``store`` kept what it needs), so the driver holds one batch at a time."""
    from distributed import as_completed

    env_key = env.key()
    out: dict[str, Computed] = {}
    with dask_client(spec, jobs) as client:
        workers = max(1, len(client.scheduler_info()["workers"]))
        # A unique key prefix per run: the same batch in two runs is two tasks.
        run = os.urandom(6).hex()
        pending = enumerate(batches(items, spec.batch))

        def submit(number: int, batch: list[Payload]) -> Any:
            return client.submit(
                task,
                env,  # a few kB beside MBs of messages; scattered data dies with a worker
                batch,
                run,
                key=f"relay-lab-{run}-{number}",
                retries=RETRIES,
                pure=False,
            )

        try:
            first = [submit(n, b) for n, b in _take(pending, workers * IN_FLIGHT)]
            running = as_completed(first, loop=client.loop)
            for future in running:
                got = computed_from_result(future.result(), env_key)
                future.release()
                if keep_outcomes:
                    out.update(got)
                store(got)
                progress(len(got))
                for n, b in _take(pending, 1):
                    running.add(submit(n, b))
        finally:
            # The workers' services (classifier processes among them) end with the run.
            # Best effort: a worker that died has nothing left to close, and a failed
            # close must not hide the run's own result or error.
            with contextlib.suppress(Exception):
                client.run(close_sessions)
    return out


def _take(it: Iterator[tuple[int, list[Payload]]], n: int) -> list[tuple[int, list[Payload]]]:
    taken: list[tuple[int, list[Payload]]] = []
    for pair in it:
        taken.append(pair)
        if len(taken) == n:
            break
    return taken


# ---- pass 2 ---------------------------------------------------------------------------


def ordered_pass(
    spec: EngineSpec,
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    known: Mapping[str, Outcomes],
    carried: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    jobs: int,
    progress: Progress,
    task: ShardTask | None = None,
) -> tuple[dict[str, Outcomes], dict[str, Any]]:
    """Pass 2 (``names`` for every message, in corpus time) where ``spec`` says; returns
    the values and how they were computed (the report's ``facts.pass2``)."""
    if not spec.sharded:
        got = asyncio.run(sequential_pass(env, messages, known, carried, names, progress))
        return got, {"mode": "sequential"}
    if spec.kind == "local":
        got, info = shards.sharded_pass(
            env,
            messages,
            known,
            names,
            spec.shards or jobs,
            shards.pool_runner(jobs),
            progress,
            shards.pool_declarer(jobs),
        )
        return got, {"mode": "sharded", "engine": "local", **info}
    return dask_ordered(spec, env, messages, known, names, jobs, progress, task or replay_task)


def op_payload(op: shards.Op) -> Payload:
    return {
        "position": op.position,
        "message": message_payload(op.message, ()),
        "families": [[record.value, list(asked)] for record, asked in op.families],
        "preset": dict(op.preset),
    }


def op_from_payload(p: Payload) -> shards.Op:
    message, _ = message_from_payload(p["message"])
    families = tuple((Record(r), tuple(asked)) for r, asked in p["families"])
    return shards.Op(p["position"], message, families, p["preset"])


ShardTask = Callable[[LabEnv, list[Payload], str], dict[str, Any]]


def replay_task(env: LabEnv, ops: list[Payload], run: str = "") -> dict[str, Any]:
    """The pass 2 task: one shard's replay, in the worker's process, as plain values
    (with the worker's ``env.key()``, checked as pass 1's, and who ran it)."""
    result = shards.replay_shard(env, [op_from_payload(p) for p in ops])
    return {"env_key": env.key(), "pid": os.getpid(), "rows": shards.outcomes_plain(result)}


def dask_ordered(
    spec: EngineSpec,
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    known: Mapping[str, Outcomes],
    names: Sequence[str],
    jobs: int,
    progress: Progress,
    task: ShardTask = replay_task,
) -> tuple[dict[str, Outcomes], dict[str, Any]]:
    """Pass 2 as one Dask task per shard; values come back only when every shard did."""
    from distributed import as_completed

    env_key = env.key()
    pids: set[int] = set()
    with dask_client(spec, jobs) as client:
        threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        count = spec.shards or SHARDS_PER_WORKER * max(1, threads)
        run = os.urandom(6).hex()

        def runner(
            env: LabEnv, planned: Sequence[Sequence[shards.Op]], tick: Progress
        ) -> list[shards.ShardResult]:
            futures = {
                client.submit(
                    task,
                    env,
                    [op_payload(op) for op in ops],
                    run,
                    key=f"relay-lab-{run}-pass2-{number}",
                    retries=RETRIES,
                    pure=False,
                ): (number, len(ops))
                for number, ops in enumerate(planned)
            }
            results: dict[int, shards.ShardResult] = {}
            try:
                for future in as_completed(futures, loop=client.loop):
                    got = future.result()
                    number, size = futures[future]
                    check_env(got["env_key"], env_key)
                    pids.add(int(got["pid"]))
                    results[number] = shards.outcomes_from_plain(got["rows"])
                    future.release()
                    tick(size)
            except RelayError:
                raise
            except Exception as exc:  # the cluster went away, or a shard kept failing
                raise _gone(exc) from exc
            return [results[n] for n in range(len(planned))]

        def declarer(
            env: LabEnv,
            messages: Sequence[CorpusMessage],
            presets: Sequence[Mapping[str, Any]],
            records: Sequence[Record],
            key: SecretKey,
        ) -> list[shards.KeyRow]:
            # The map step as tasks, in bounded batches as pass 1: each message's keys.
            futures = [
                client.submit(
                    declare_task,
                    env,
                    [message_payload(messages[i], ()) for i in part],
                    [presets[i] for i in part],
                    [r.value for r in records],
                    key,
                    key=f"relay-lab-{run}-keys-{number}",
                    retries=RETRIES,
                    pure=False,
                )
                for number, part in enumerate(shards.chunks(len(messages), count))
            ]
            try:
                done = client.gather(futures)
            except RelayError:
                raise
            except Exception as exc:
                raise _gone(exc) from exc
            for got in done:
                check_env(got["env_key"], env_key)
            return [
                [(Record(r), k, w, bool(x)) for r, k, w, x in row]
                for got in done
                for row in got["rows"]
            ]

        got, info = shards.sharded_pass(
            env, messages, known, names, count, runner, progress, declarer
        )
    return got, {"mode": "sharded", "engine": "dask", **info, "processes": len(pids)}


def declare_task(
    env: LabEnv,
    messages: list[Payload],
    presets: list[dict[str, Any]],
    records: list[str],
    key: SecretKey,
) -> dict[str, Any]:
    """The map step's task: the declared keys of a batch of messages, as plain rows."""
    rows = shards.declare_chunk(
        env,
        [message_from_payload(p)[0] for p in messages],
        presets,
        [Record(r) for r in records],
        key,
    )
    plain = [[[r.value, k, w, x] for r, k, w, x in row] for row in rows]
    return {"env_key": env.key(), "rows": plain}


def _gone(exc: Exception) -> RelayError:
    return RelayError(
        f"lab: pass 2 on the Dask cluster failed ({type(exc).__name__}: {exc}); "
        "nothing of pass 2 was cached (pass 1's values were): run again"
    )
