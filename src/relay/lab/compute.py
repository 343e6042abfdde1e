"""Computing facts for the lab: stateless facts in a process pool, stateful ones in order.

Pass 1 spreads messages over worker processes; each computes every fact the policies can
read, without the state store. A fact that needs the state store (or depends on one that
does) fails there with "service StateStore is not configured" and is deferred.
Pass 2 runs the deferred facts in the main process, one message after another in corpus
time, with a fresh SQLite state store, so counts grow as they would have live.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from relay.errors import FactError
from relay.facts import FactRegistry, Facts, FactType, Services
from relay.lab.cache import Cached
from relay.lab.corpus import CorpusMessage
from relay.lab.env import LabEnv, lab_services

DEFERRED = "service StateStore is not configured"
CONCURRENCY = 16  # messages in flight per worker (DNS-bound facts wait concurrently)

Item = tuple[CorpusMessage, tuple[str, ...]]  # a message and the fact names wanted
Outcomes = dict[str, Cached]
Progress = Callable[[int], None]


async def collect(facts: Facts, names: Iterable[str]) -> Outcomes:
    """Ask for each fact; record its JSON value or its error (only the facts asked for)."""
    wanted = list(names)
    for name in wanted:
        with contextlib.suppress(FactError):  # a failure is recorded in facts.reads()
            await facts.get(name)
    reads = {r.name: r for r in facts.reads()}
    return {n: Cached(reads[n].value, reads[n].error) for n in wanted if n in reads}


async def _one(registry: FactRegistry, services: Services, item: Item) -> Outcomes:
    message, names = item
    return await collect(Facts(registry, message.to_message(), services), names)


async def _chunk(env: LabEnv, items: Sequence[Item]) -> list[tuple[str, Outcomes]]:
    registry = env.registry()
    with tempfile.TemporaryDirectory(prefix="relay-lab-") as tmp:
        async with lab_services(env, Path(tmp), stateful=False) as services:
            limit = asyncio.Semaphore(CONCURRENCY)

            async def run(item: Item) -> tuple[str, Outcomes]:
                async with limit:
                    return item[0].digest, await _one(registry, services, item)

            return list(await asyncio.gather(*(run(i) for i in items)))


def compute_chunk(env: LabEnv, items: Sequence[Item]) -> list[tuple[str, Outcomes]]:
    """Worker entry point: facts for a chunk of messages (no state store)."""
    return asyncio.run(_chunk(env, items))


def _chunks(items: Sequence[Item], jobs: int) -> list[list[Item]]:
    # A few chunks per worker keeps the progress bar moving and the load even, while
    # each chunk still amortises building the services (model load) once.
    count = max(1, min(len(items), jobs * 6, max(jobs, len(items) // 40)))
    return [list(items[i::count]) for i in range(count)]


def parallel_pass(
    env: LabEnv, items: Sequence[Item], jobs: int, progress: Progress
) -> dict[str, Outcomes]:
    """Pass 1 over ``items``; in-process when jobs == 1 (tests, debugging)."""
    out: dict[str, Outcomes] = {}
    if not items:
        return out
    if jobs <= 1:
        for chunk in _chunks(items, 1):
            for digest, outcomes in compute_chunk(env, chunk):
                out[digest] = outcomes
            progress(len(chunk))
        return out
    # forkserver: workers start clean (no inherited threads, locks or open databases)
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending: dict[Future[list[tuple[str, Outcomes]]], int] = {
            pool.submit(compute_chunk, env, chunk): len(chunk) for chunk in _chunks(items, jobs)
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                size = pending.pop(fut)
                for digest, outcomes in fut.result():
                    out[digest] = outcomes
                progress(size)
    return out


async def sequential_pass(
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    known: Mapping[str, Outcomes],
    names: Sequence[str],
    progress: Progress,
) -> dict[str, Outcomes]:
    """Pass 2: ``names`` for every message in corpus time order, with a fresh state store.

    Facts already known for a message are handed in as computed, so a stateful fact's
    stateless dependencies are not computed again.
    """
    registry = env.registry()
    out: dict[str, Outcomes] = {}
    with tempfile.TemporaryDirectory(prefix="relay-lab-state-") as tmp:
        async with lab_services(env, Path(tmp), stateful=True) as services:
            for m in messages:
                have = known.get(m.digest, {})
                # Cached scalars stand in for their computation; structured values are
                # recomputed if a stateful fact needs them (JSON is not their live form).
                preset = {
                    n: c.value
                    for n, c in have.items()
                    if c.error is None
                    and n not in names
                    and registry[n].type is not FactType.OBJECT
                }
                facts = Facts(registry, m.to_message(), services, preset=preset)
                got = await collect(facts, names)
                out[m.digest] = {n: got[n] for n in names if n in got}
                progress(1)
    return out
