"""Computing facts for the lab: stateless facts in a process pool, stateful ones in order.

Pass 1 spreads messages over worker processes (or a Dask cluster's workers: engine.py),
one share per worker (each builds its services, the model and suffix lists included,
once); each computes every fact the policies can read, without the state store. A fact
that needs the state store (or depends on one that does) fails there with "service
state is not configured" and is deferred; the worker hands back the structured values
pass 2 will read again for it (none when its inputs are scalars pass 2 is handed, as
``bulk_count``'s fingerprint is), so pass 2 does not decode a body again.
Pass 2 runs the deferred facts in the main process, one message after another in corpus
time, with a fresh SQLite state store of its own (never the relay's): facts only read it,
and the relay's recorder records each message after its facts were read, so counts grow
as they would have live. shards.py splits the same replay by state key over several
processes or a cluster's workers, with the same values.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import queue
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from publicsuffixlist import PublicSuffixList

from relay.contracts import Outcome
from relay.errors import FactError
from relay.facts import FactRegistry, Facts, FactType, Services
from relay.facts.services import STATE, not_configured
from relay.lab.cache import Cached
from relay.lab.corpus import CorpusMessage
from relay.lab.env import LabEnv, lab_services
from relay.pipeline.recorder import Recorder, records_for
from relay.verdict import ACCEPT_ALL

DEFERRED = not_configured(STATE)
CONCURRENCY = 16  # messages in flight per worker (DNS-bound facts wait concurrently)
TICK = 25  # messages between progress reports from a worker

Item = tuple[CorpusMessage, tuple[str, ...]]  # a message and the fact names wanted
Outcomes = dict[str, Cached]
Progress = Callable[[int], None]


class _Ticks(Protocol):
    def put(self, item: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Computed:
    """Pass 1's result for one message: cached outcomes, and live values pass 2 needs."""

    outcomes: Outcomes
    carry: dict[str, Any] = field(default_factory=dict)


async def collect(facts: Facts, names: Iterable[str]) -> Outcomes:
    """Ask for each fact; record its JSON value or its error (only the facts asked for)."""
    wanted = list(names)
    for name in wanted:
        with contextlib.suppress(FactError):  # a failure is recorded in facts.reads()
            await facts.get(name)
    reads = {r.name: r for r in facts.reads()}
    return {n: Cached(reads[n].value, reads[n].error) for n in wanted if n in reads}


def _closure(registry: FactRegistry, names: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = [d for n in names for d in registry[n].depends]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(registry[name].depends)
    return seen


def _carried(registry: FactRegistry, facts: Facts, deferred: Iterable[str]) -> list[str]:
    """The structured values pass 2 will read again for ``deferred``: walking down from
    each deferred fact, a scalar computed here stops the walk (pass 2 is handed it as
    known), and so does a structured value computed here (carried over); anything else
    (a deferred or failed fact) is computed again there, so its inputs are walked too.
    The decoded body behind ``bulk_count``, say, is not carried: the fingerprint made
    from it is a known list of strings (pickling every body cost more than the rest of a
    message's results)."""
    found: list[str] = []
    seen: set[str] = set()
    stack = [d for n in deferred for d in registry[n].depends]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        read = facts.read(name)
        if read is not None and read.error is None:
            if registry[name].type is FactType.OBJECT:
                found.append(name)
            continue
        stack.extend(registry[name].depends)
    return found


async def _one(registry: FactRegistry, services: Services, item: Item) -> Computed:
    message, names = item
    facts = Facts(registry, message.to_message(), services)
    outcomes = await collect(facts, names)
    deferred = [n for n, c in outcomes.items() if c.error is not None and DEFERRED in c.error]
    carry: dict[str, Any] = {}
    for dep in _carried(registry, facts, deferred):
        with contextlib.suppress(FactError):
            carry[dep] = await facts.get(dep)
    return Computed(outcomes, carry)


async def share_with(
    registry: FactRegistry,
    services: Services,
    items: Sequence[Item],
    ticks: _Ticks | None = None,
) -> list[tuple[str, Computed]]:
    """Pass 1 for ``items`` with services already open (a Dask worker keeps its own open
    between batches: engine.py)."""
    done = 0
    limit = asyncio.Semaphore(CONCURRENCY)

    async def run(item: Item) -> tuple[str, Computed]:
        nonlocal done
        async with limit:
            result = await _one(registry, services, item)
        done += 1
        if ticks is not None and done % TICK == 0:
            ticks.put(TICK)
        return item[0].digest, result

    results = list(await asyncio.gather(*(run(i) for i in items)))
    if ticks is not None and done % TICK:
        ticks.put(done % TICK)
    return results


async def _share(
    env: LabEnv, items: Sequence[Item], ticks: _Ticks | None
) -> list[tuple[str, Computed]]:
    with tempfile.TemporaryDirectory(prefix="relay-lab-") as tmp:
        async with lab_services(env, Path(tmp), stateful=False) as services:
            return await share_with(env.registry(), services, items, ticks)


# The cyclic collector's thresholds while a share is computed (CPython's are 700, 10, 10).
# Parsing a message allocates thousands of objects, so the defaults collect the youngest
# generation every few messages and, as the share's results pile up, rescan them all in
# full collections: 0.5 of 2.4 ms a message (1,500 messages a worker). With the objects
# from before the share frozen out of the scans and 10,000 allocations between young
# collections, 0.1 ms, for ~5 MiB more garbage held between collections.
GC_THRESHOLDS = (10_000, 10, 10)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """GC_THRESHOLDS, and what exists now frozen out of the scans, until the block ends."""
    old = gc.get_threshold()
    gc.freeze()  # what exists now (modules, suffix list, registry) is never garbage here
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def compute_share(
    env: LabEnv, items: Sequence[Item], ticks: _Ticks | None = None
) -> list[tuple[str, Computed]]:
    """Worker entry point: facts for one worker's share of the messages (no state store)."""
    with fewer_collections():
        return asyncio.run(_share(env, items, ticks))


# A share's results as the pool hands them back: built-in types only. Pickling a frozen
# slotted dataclass goes through dataclasses' __getstate__/__setstate__, which look up the
# fields on every object: per message ~0.1 ms in the worker and as much in the driver
# for ~36 Cached values, against a few microseconds for tuples.
PlainResult = tuple[str, dict[str, tuple[Any, str | None]], dict[str, Any]]


def _plain_share(env: LabEnv, items: Sequence[Item], ticks: _Ticks | None) -> list[PlainResult]:
    """compute_share for the process pool, its results as plain tuples (``_unplain``)."""
    return [
        (digest, {n: (c.value, c.error) for n, c in got.outcomes.items()}, got.carry)
        for digest, got in compute_share(env, items, ticks)
    ]


def _unplain(results: Iterable[PlainResult]) -> Iterator[tuple[str, Computed]]:
    for digest, outcomes, carry in results:
        yield digest, Computed({n: Cached(v, e) for n, (v, e) in outcomes.items()}, carry)


class _Direct:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def put(self, item: int) -> None:
        self.progress(item)


def parallel_pass(
    env: LabEnv, items: Sequence[Item], jobs: int, progress: Progress
) -> dict[str, Computed]:
    """Pass 1 over ``items``; in-process when jobs == 1 (tests, debugging)."""
    if not items:
        return {}
    if jobs <= 1:
        return dict(compute_share(env, items, _Direct(progress)))
    # Strided shares: the corpus is in time order, so each worker gets every era of mail.
    shares = [list(items[i::jobs]) for i in range(jobs) if items[i::jobs]]
    # forkserver: workers start clean (no inherited threads, locks or open databases)
    context = multiprocessing.get_context("forkserver")
    out: dict[str, Computed] = {}
    with context.Manager() as manager, ProcessPoolExecutor(len(shares), mp_context=context) as pool:
        ticks = manager.Queue()
        futures: list[Future[list[PlainResult]]] = [
            pool.submit(_plain_share, env, share, ticks) for share in shares
        ]
        while not all(f.done() for f in futures):
            with contextlib.suppress(queue.Empty):
                progress(ticks.get(timeout=0.2))
        with contextlib.suppress(queue.Empty):
            while True:
                progress(ticks.get_nowait())
        for fut in futures:
            out.update(_unplain(fut.result()))
    return out


async def sequential_pass(
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    known: Mapping[str, Outcomes],
    carried: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    progress: Progress,
) -> dict[str, Outcomes]:
    """Pass 2: ``names`` for every message in corpus time order, with a fresh state store.

    Facts already known for a message are handed in as computed, so a stateful fact's
    stateless dependencies are not computed again: cached scalars as they are, structured
    values as pass 1 carried them over (JSON is not their live form, so a structured value
    that was not carried is recomputed).

    After its facts, each message is recorded as the relay records it after the action:
    the records those facts read, and no correspondents (no client is one of ours).
    """
    registry = env.registry()
    out: dict[str, Outcomes] = {}
    with tempfile.TemporaryDirectory(prefix="relay-lab-state-") as tmp:
        # Stateful facts read headers and counters, never the classifier: skip the model.
        async with lab_services(env, Path(tmp), stateful=True, classifier=False) as services:
            assert services.state is not None, "lab_services(stateful=True) has a state store"
            recorder = Recorder(
                services.state,
                services.psl or PublicSuffixList(),
                records=records_for(_closure(registry, names) | set(names)),
            )
            for m in messages:
                preset: dict[str, Any] = {
                    n: c.value
                    for n, c in known.get(m.digest, {}).items()
                    if c.error is None
                    and n not in names
                    and registry[n].type is not FactType.OBJECT
                }
                preset.update(carried.get(m.digest, {}))
                facts = Facts(registry, m.to_message(), services, preset=preset)
                got = await collect(facts, names)
                # A mailbox corpus was delivered; without networks no pairs are recorded.
                await recorder.record(facts.message, facts, ACCEPT_ALL, Outcome.DELIVERED)
                out[m.digest] = {n: got[n] for n in names if n in got}
                progress(1)
    return out
