"""Deciding the regimes whose decisions are not cached, on every core, before the report.

A rerun with one regime changed decides that regime on every message; on the driver
alone that was most of the rerun (1M messages: 269 s of evaluation against 115 s warm).
Here the messages are split into ``jobs`` contiguous parts, each decided in a forked
process (fork: the regimes, the registry and the message list are inherited, not
pickled; each process opens its own connection to the cache, read-only in effect). The
decisions come back encoded as the decision cache stores them (ids and distinct values)
and the driver, the cache's one writer, inserts them; the evaluation that follows
(run.py) then reads every decision back, as in a warm run. Decided by the same
RegimeDecider over the same cached facts, so the decisions are those the driver would
have made.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue as queue_module
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from relay.errors import RelayError
from relay.facts import FactRegistry
from relay.lab.cache import BATCH, FactCache, encode_decisions
from relay.lab.corpus import CorpusMessage
from relay.lab.evaluate import Regime, RegimeDecider, decision_row

MIN_POOLED = 5_000  # below this many missing (message, regime) pairs the driver decides


@dataclass(frozen=True, slots=True)
class DecideJob:
    """What a forked process needs to decide its part (inherited through fork)."""

    cache_path: Path  # the cache directory
    regimes: tuple[Regime, ...]
    keys: Mapping[str, str]  # regime name -> regime key (only regimes with one)
    reads: Mapping[str, frozenset[str]]  # regime name -> facts it can read
    versions: Mapping[str, int]
    contexts: tuple[str, ...]
    registry: FactRegistry


def missing(cache: FactCache, keys: Mapping[str, str], count: int) -> dict[str, int]:
    """Per regime, how many of ``count`` messages have no cached decision (a key names one
    corpus order, so its rows are this corpus's messages)."""
    out: dict[str, int] = {}
    for name, key in keys.items():
        have = cache.decisions().count(key)
        if have < count:
            out[name] = count - have
    return out


def decide_missing(
    job: DecideJob, messages: Sequence[CorpusMessage], cache: FactCache, jobs: int
) -> Counter[str]:
    """Decide, on ``jobs`` forked processes, every (message, regime) pair of ``job``'s
    regimes not in the decision cache, and store the decisions; returns how many pairs
    were decided per regime."""
    context = multiprocessing.get_context("fork")
    queue: Queue[Any] = context.Queue(maxsize=4 * jobs)
    size = -(-len(messages) // jobs)
    parts = [(start, min(start + size, len(messages))) for start in range(0, len(messages), size)]
    procs = [
        context.Process(target=_worker, args=(job, messages, lo, hi, queue), daemon=True)
        for lo, hi in parts
    ]
    for p in procs:
        p.start()
    store = cache.decisions()
    decided: Counter[str] = Counter()
    running = len(procs)
    stored = 0
    try:
        while running:
            try:
                got = queue.get(timeout=5.0)
            except queue_module.Empty:
                if any(p.is_alive() for p in procs):
                    continue
                # Every process gone, some without a word: killed (out of memory, a signal).
                codes = [p.exitcode for p in procs]
                raise RelayError(
                    f"lab: a process deciding regimes died (exit codes {codes})"
                ) from None
            if got is None:
                running -= 1
            elif isinstance(got, str):
                raise RelayError(f"lab: deciding regimes in a worker failed:\n{got}")
            else:
                name, values, ids = got
                store.store_encoded(job.keys[name], values, ids)
                decided[name] += len(ids)
                stored += 1
                if stored % 20 == 0:
                    store.commit()
        store.commit()
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return decided


def _worker(
    job: DecideJob, messages: Sequence[CorpusMessage], lo: int, hi: int, queue: Queue[Any]
) -> None:
    try:
        with FactCache(job.cache_path) as cache:
            asyncio.run(_decide(job, messages[lo:hi], cache, queue))
        queue.put(None)
    except BaseException:  # reported to the driver, which stops the run
        queue.put(traceback.format_exc())


async def _decide(
    job: DecideJob, messages: Sequence[CorpusMessage], cache: FactCache, queue: Queue[Any]
) -> None:
    decider = RegimeDecider(job.regimes, job.registry)
    store = cache.decisions()
    for start in range(0, len(messages), BATCH):
        part = messages[start : start + BATCH]
        digests = [m.digest for m in part]
        cached = {r.name: store.load(job.keys[r.name], digests) for r in job.regimes}
        todo = {m.digest: [r for r in job.regimes if m.digest not in cached[r.name]] for m in part}
        names = {n for rs in todo.values() for r in rs for n in job.reads[r.name]}
        needed = [d for d, rs in todo.items() if rs]
        if not needed:
            continue
        versions = {n: v for n, v in job.versions.items() if n in names}
        known = cache.load_batch(needed, versions, job.contexts)
        rows: dict[str, list[tuple[str, Any]]] = {r.name: [] for r in job.regimes}
        for m in part:
            if not todo[m.digest]:
                continue
            decided = await decider.decide(m, todo[m.digest], known.get(m.digest, {}))
            for name, d in decided.items():
                rows[name].append((m.digest, decision_row(d)))
        for name, found in rows.items():
            if found:  # encoded here: the driver, the cache's one writer, only inserts
                queue.put((name, *encode_decisions(found)))
