"""Pass 2 as a key-sharded replay: the ordered facts, exactly as one loop gives them.

The ordered facts (bulk counts, sender volume, connection rate, correspondents,
greylisting, rate buckets) read the state store, and the recorder writes to it after each
message. Every such read and write names its keys; a value depends only on the earlier
operations on the keys it reads. So the sequence splits exactly:

1. Families. Each state-backed fact is read from one record kind of the recorder
   (``pipeline/recorder.py`` ``READ_BY``): bulk, volume, connection, correspondents,
   greylist, rate. A family's facts read only its keys and its record writes only them
   (bulk_sender reads the volume and the sticky flag: both keyed by one organisation).
   A fact derived from state-backed facts (``rate_limit_wait``) joins their family; one
   that would span two families is refused (``ShardContractError``).
2. Keys. ``KEYS`` derives, from the message alone (pass 1 gave the body's fingerprint),
   every key a family's facts and record may touch, with the same helpers the facts and
   the recorder use. ``declare`` is a map step: in pool processes or cluster workers,
   hashing with one throwaway key per plan so that their keys compare.
3. Components. Messages sharing a key of one family are joined (union-find). A key with a
   window (bulk 24 h, volume 24 h, connection 60 s) forgets everything after a quiet gap
   of at least its window: corpus time never goes back (corpus.py sorts it), so a member
   older than ``now - window`` is never counted again, and the key's later ops form a new
   node. Flags and greylist/rate entries never split.
4. Shards. Components are packed into P shards (largest first onto the least loaded:
   deterministic). A shard replays its messages in corpus position order (the loop's own
   order: time, then file order), each family with the real facts and the real recorder,
   on a fresh SQLite store of its own; a replay is a pure function of its ops, so a
   retried shard gives the same values.
5. Join. Each message's values come back from its families' shards, by position.

Why it is exact: a family's value for message m is a function of m and of the operations
on m's declared keys before m; all of those were made by messages of m's component, which
its shard replays in the same order with the same code. A store that pruned expired rows
(state.py) only drops rows no later count reads, as time never goes back.

A key no message writes (the lab's recorder records no correspondents, greylist triplets
or tokens) reads as empty everywhere, so it ties no messages together.

What would break it: a fact or record touching a key it did not declare (a future fact
reading arbitrary keys), or writing one declared read-only. The shard's store is wrapped
(``CheckedState``): either stops the run with ``ShardContractError``
instead of silently reading an empty key. A new state-backed fact must appear in
``READ_BY`` and its family in ``KEYS`` here, or planning refuses it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publicsuffixlist import PublicSuffixList

from relay.contracts import Outcome
from relay.errors import FactError, RelayError
from relay.facts import FactRegistry, Facts, FactType, Services, bulk, greylist, network, ratelimit
from relay.facts.headers import header_recipients
from relay.facts.services import STATE
from relay.lab.cache import Cached
from relay.lab.compute import Outcomes, collect
from relay.lab.corpus import CorpusMessage
from relay.lab.env import LabEnv, lab_services
from relay.message import Message
from relay.pipeline.recorder import READ_BY, Record, Recorder
from relay.secretkey import SecretKey
from relay.state import Bucket, GreyEntry, StateStore
from relay.verdict import ACCEPT_ALL

Key = tuple[float | None, bool]  # (window after which it forgets, None: never; written)
Declared = dict[str, Key]  # every key a family's facts read or its record writes
READ_ONLY: Key = (None, False)
Families = tuple[tuple[Record, tuple[str, ...]], ...]  # each family and its facts asked


class ShardContractError(RelayError):
    """A state-backed fact or record outside the sharding contract (module doc)."""


# ---- which keys each family touches --------------------------------------------------


def _bulk_keys(message: Message, state: StateStore, services: Services, preset: Any) -> Declared:
    fingerprint = preset.get("bulk_fingerprint")  # pass 1's value; absent: no state touched
    if not isinstance(fingerprint, list):
        return {}
    return dict.fromkeys(map(str, fingerprint), (bulk.BULK_WINDOW, True))


def _volume_keys(message: Message, state: StateStore, services: Services, preset: Any) -> Declared:
    try:
        org = bulk.sender_org(message, services.psl or PublicSuffixList())
    except FactError:
        return {}
    # The flag is written only once the volume reaches 5,000: declared written anyway.
    return {
        bulk.volume_key(org): (bulk.VOLUME_WINDOW, True),
        bulk.bulk_sender_flag(org): (None, True),
    }


def _connection_keys(
    message: Message, state: StateStore, services: Services, preset: Any
) -> Declared:
    if not message.peer.ip:
        return {}
    return {network.connection_key(state, message.peer): (network.RATE_WINDOW, True)}


def _correspondent_keys(
    message: Message, state: StateStore, services: Services, preset: Any
) -> Declared:
    # Only read: the lab's recorder has no [relay] networks, so it records no pairs
    # (sequential_pass, replay_with). A recorder that did would fail the write check.
    writers = bulk.senders(message)
    read = {
        bulk.correspondent_key(state, r, w) for r in header_recipients(message) for w in writers
    }
    return dict.fromkeys(sorted(read), READ_ONLY)


def _greylist_keys(
    message: Message, state: StateStore, services: Services, preset: Any
) -> Declared:
    settings = services.greylist
    if settings is None or not settings.enabled:
        return {}
    try:
        keys = [
            *greylist.triplet_keys(state, message, settings),
            greylist.network_key(state, message, settings),
        ]
    except FactError:
        return {}
    return dict.fromkeys(keys, READ_ONLY)  # the lab's recorder has no [greylist]


def _rate_keys(message: Message, state: StateStore, services: Services, preset: Any) -> Declared:
    settings = services.ratelimit
    if settings is None:
        return {}
    keys: Declared = {}
    psl = services.psl or PublicSuffixList()
    for kind in ratelimit.KINDS:
        try:
            keys.update(
                dict.fromkeys(  # only read: the lab's recorder takes no tokens
                    (b.key for b in ratelimit.buckets(kind, state, message, settings, psl)),
                    READ_ONLY,
                )
            )
        except FactError:
            continue
    return keys


KeysOf = Callable[[Message, StateStore, Services, Mapping[str, Any]], Declared]
KEYS: dict[Record, KeysOf] = {
    Record.BULK: _bulk_keys,
    Record.VOLUME: _volume_keys,
    Record.CONNECTION: _connection_keys,
    Record.CORRESPONDENTS: _correspondent_keys,
    Record.GREYLIST: _greylist_keys,
    Record.RATE: _rate_keys,
}


def families(registry: FactRegistry, names: Iterable[str]) -> Families:
    """The ordered facts ``names`` grouped by the record family whose keys they read."""
    grouped: dict[Record, list[str]] = {}
    for name in sorted(set(names)):
        state_backed = {n for n in registry.closure([name]) if STATE in registry[n].needs}
        found = {r for r, readers in READ_BY.items() if readers & state_backed}
        undeclared = state_backed - set().union(*READ_BY.values())
        if undeclared or len(found) != 1 or not found <= KEYS.keys():
            raise ShardContractError(
                f"lab: fact {name!r} reads the state store outside one declared family "
                f"(undeclared: {sorted(undeclared)}, families: {sorted(found)}); declare its "
                "keys (pipeline/recorder.py READ_BY, lab/shards.py KEYS) before sharding it"
            )
        grouped.setdefault(found.pop(), []).append(name)
    return tuple((r, tuple(grouped[r])) for r in sorted(grouped))


# ---- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One message's work on one shard: its families' facts, with pass 1's values."""

    position: int  # in corpus order: the replay's only order
    message: CorpusMessage
    families: Families
    preset: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Plan:
    shards: tuple[tuple[Op, ...], ...]
    units: int  # independent (family, component) groups
    largest: int  # messages in the largest group: the replay's critical path

    def describe(self) -> dict[str, Any]:
        return {
            "shards": len(self.shards),
            "groups": self.units,
            "largest_group": self.largest,
            "shard_ops": [len(s) for s in self.shards],
        }


class _Union:
    """Union-find over hashable nodes (numbered as they come)."""

    def __init__(self) -> None:
        self.ids: dict[Hashable, int] = {}
        self.parent: list[int] = []

    def find(self, node: Hashable) -> int:
        x = self.ids.setdefault(node, len(self.ids))
        if x == len(self.parent):
            self.parent.append(x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def join(self, a: Hashable, b: Hashable) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def preset_for(registry: FactRegistry, known: Outcomes, wanted: frozenset[str]) -> dict[str, Any]:
    """Pass 1's scalar values of the facts ``wanted`` (as sequential_pass presets them)."""
    return {
        n: c.value
        for n, c in known.items()
        if n in wanted and c.error is None and registry[n].type is not FactType.OBJECT
    }


KeyRow = list[tuple[Record, str, float | None, bool]]  # (family, key, window, written)


def declare(
    messages: Sequence[CorpusMessage],
    presets: Sequence[Mapping[str, Any]],
    records: Sequence[Record],
    state: StateStore,
    services: Services,
) -> list[KeyRow]:
    """The map step: each message's declared keys in each family (``state`` only hashes;
    every declarer of one plan must hash with the same key)."""
    out: list[KeyRow] = []
    for m, preset in zip(messages, presets, strict=True):
        message = m.to_message()
        out.append(
            [
                (record, key, window, written)
                for record in records
                for key, (window, written) in KEYS[record](message, state, services, preset).items()
            ]
        )
    return out


def plan(
    messages: Sequence[CorpusMessage],
    presets: Sequence[Mapping[str, Any]],
    declared: Sequence[KeyRow],
    fams: Families,
    shards: int,
) -> Plan:
    """Split pass 2 over ``messages`` (corpus order) into at most ``shards`` shards, from
    each message's declared keys."""
    times = [m.time for m in messages]
    if any(b < a for a, b in itertools.pairwise(times)):
        raise RelayError("lab: pass 2 needs messages in corpus time order")
    # A key nobody writes reads the same (nothing) on every shard: it ties no messages.
    written = {(r, k) for keys in declared for r, k, _, w in keys if w}
    union = _Union()
    last: dict[tuple[Record, str], tuple[float, int]] = {}  # key -> (last time, segment)
    for pos, (m, keys) in enumerate(zip(messages, declared, strict=True)):
        for record, _ in fams:
            union.find((record, pos))
        for record, key, window, _ in keys:
            if (record, key) not in written:
                continue
            seen, segment = last.get((record, key), (None, 0))
            if seen is not None and window is not None and m.time - seen >= window:
                segment += 1  # quiet for a whole window: nothing before counts again
            last[(record, key)] = (m.time, segment)
            union.join((record, pos), (record, key, segment))
    groups: dict[int, list[tuple[Record, int]]] = {}
    for record, _ in fams:
        for pos in range(len(messages)):
            groups.setdefault(union.find((record, pos)), []).append((record, pos))
    # Largest group first onto the least loaded shard; ties by first position: stable.
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0][1], g[0][0]))
    count = max(1, min(shards, len(ordered)))
    loads = [0] * count
    work: list[dict[int, list[Record]]] = [{} for _ in range(count)]
    for group in ordered:
        target = min(range(count), key=lambda i: (loads[i], i))
        loads[target] += len(group)
        for record, pos in group:
            work[target].setdefault(pos, []).append(record)
    asked = dict(fams)
    built = tuple(
        tuple(
            Op(
                pos,
                messages[pos],
                tuple((r, asked[r]) for r in sorted(records)),
                presets[pos],
            )
            for pos, records in sorted(shard.items())
        )
        for shard in work
    )
    return Plan(built, len(ordered), max((len(g) for g in ordered), default=0))


# ---- a shard's replay -------------------------------------------------------------------


class CheckedState(StateStore):
    """The shard's store, refusing keys the running family did not declare.

    Facts turn any exception into a missing value and the recorder logs its failures,
    so a refused key is also kept in ``violations``: the replay checks it after every
    family and stops (a silent undercount is the one failure this design must not have).
    """

    def __init__(self, inner: StateStore) -> None:  # no key: hashing stays the inner's
        self.inner = inner
        self.allowed: frozenset[str] = frozenset()  # read or written
        self.writable: frozenset[str] = frozenset()
        self.violations: list[str] = []

    def declare(self, keys: Declared) -> None:
        self.allowed = frozenset(keys)
        self.writable = frozenset(k for k, (_, written) in keys.items() if written)

    def _check(self, keys: Iterable[str], write: bool = False) -> None:
        outside = [k for k in keys if k not in (self.writable if write else self.allowed)]
        if outside:
            self.violations.extend(outside)
            raise ShardContractError(f"lab: undeclared state key {outside[0]!r}")

    def hashed(self, *parts: str) -> str:
        return self.inner.hashed(*parts)

    async def incr_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        self._check(keys, write=True)
        return await self.inner.incr_windows(keys, members, window, now)

    async def count_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        self._check(keys)
        return await self.inner.count_windows(keys, members, window, now)

    async def add(self, key: str, ttl: float | None = None, *, now: float) -> None:
        self._check([key], write=True)
        await self.inner.add(key, ttl, now=now)

    async def seen(self, key: str, now: float) -> bool:
        self._check([key])
        return await self.inner.seen(key, now)

    async def grey_entries(self, keys: Sequence[str], now: float) -> list[GreyEntry | None]:
        self._check(keys)
        return await self.inner.grey_entries(keys, now)

    async def grey_record(
        self,
        keys: Sequence[str],
        now: float,
        *,
        delay: float,
        retry_window: float,
        lifetime: float,
    ) -> list[GreyEntry]:
        self._check(keys, write=True)
        return await self.inner.grey_record(
            keys, now, delay=delay, retry_window=retry_window, lifetime=lifetime
        )

    async def bucket_levels(self, buckets: Sequence[Bucket], now: float) -> list[float]:
        self._check(b.key for b in buckets)
        return await self.inner.bucket_levels(buckets, now)

    async def bucket_take(
        self, buckets: Sequence[Bucket], now: float, cost: float = 1.0
    ) -> list[bool]:
        self._check((b.key for b in buckets), write=True)
        return await self.inner.bucket_take(buckets, now, cost)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


ShardResult = list[tuple[int, str, Outcomes]]  # (position, digest, values) per op


async def replay_with(registry: FactRegistry, services: Services, ops: Iterable[Op]) -> ShardResult:
    """Replay ``ops`` in position order on ``services`` (whose store is fresh)."""
    if services.state is None:
        raise RelayError("lab: a shard's replay needs a state store")
    checked = CheckedState(services.state)
    services = dataclasses.replace(services, state=checked)
    recorder = Recorder(checked, services.psl or PublicSuffixList())
    out: ShardResult = []
    for op in sorted(ops, key=lambda o: o.position):  # input order is not trusted
        message = op.message.to_message()  # parsed once, shared by the families' Facts
        got: Outcomes = {}
        for record, asked in op.families:
            checked.declare(KEYS[record](message, checked, services, op.preset))
            facts = Facts(registry, message, services, preset=dict(op.preset))
            got.update(await collect(facts, asked))
            # As sequential_pass records: delivered, no networks (no correspondents).
            await recorder.record(message, facts, ACCEPT_ALL, Outcome.DELIVERED, only={record})
            if checked.violations:
                raise ShardContractError(
                    f"lab: family {record.value} touched undeclared state keys "
                    f"({len(checked.violations)}, e.g. {checked.violations[0]!r}) at message "
                    f"{op.message.id!r}; declare them in lab/shards.py KEYS"
                )
        out.append((op.position, op.message.digest, got))
    return out


async def replay(env: LabEnv, ops: Sequence[Op]) -> ShardResult:
    """One shard: a pure function of ``ops`` (a fresh private store every call)."""
    with tempfile.TemporaryDirectory(prefix="relay-lab-shard-") as tmp:
        async with lab_services(env, Path(tmp), stateful=True, classifier=False) as services:
            return await replay_with(env.registry(), services, ops)


def join(results: Iterable[ShardResult]) -> dict[str, Outcomes]:
    """Each message's values from its families' shards; a digest seen twice keeps its
    later position's values, as the loop's overwrite does."""
    rows = sorted((row for result in results for row in result), key=lambda row: row[0])
    out: dict[str, Outcomes] = {}
    for _, digest, got in rows:
        out.setdefault(digest, {}).update(got)
    return out


def outcomes_plain(result: ShardResult) -> list[list[Any]]:
    return [
        [pos, digest, {n: [c.value, c.error] for n, c in got.items()}]
        for pos, digest, got in result
    ]


def outcomes_from_plain(rows: Iterable[Sequence[Any]]) -> ShardResult:
    return [
        (int(pos), str(digest), {n: Cached(v, e) for n, (v, e) in got.items()})
        for pos, digest, got in rows
    ]


# ---- running the shards ---------------------------------------------------------------

Progress = Callable[[int], None]
Runner = Callable[[LabEnv, Sequence[Sequence[Op]], Progress], list[ShardResult]]


async def declare_with_key(
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    presets: Sequence[Mapping[str, Any]],
    records: Sequence[Record],
    key: SecretKey,
) -> list[KeyRow]:
    """``declare`` with the lab's services opened here (no state store: hashing only)."""
    with tempfile.TemporaryDirectory(prefix="relay-lab-plan-") as tmp:
        async with lab_services(env, Path(tmp), stateful=False, classifier=False) as services:
            return declare(messages, presets, records, StateStore(key), services)


def declare_chunk(
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    presets: Sequence[Mapping[str, Any]],
    records: Sequence[Record],
    key: SecretKey,
) -> list[KeyRow]:
    """Process entry point of the map step."""
    return asyncio.run(declare_with_key(env, messages, presets, records, key))


Declarer = Callable[
    [LabEnv, Sequence[CorpusMessage], Sequence[Mapping[str, Any]], Sequence[Record], SecretKey],
    list[KeyRow],
]


def replay_shard(env: LabEnv, ops: Sequence[Op]) -> ShardResult:
    """Process entry point: one shard's replay (its own event loop and store)."""
    return asyncio.run(replay(env, ops))


def run_local(env: LabEnv, shards: Sequence[Sequence[Op]], progress: Progress) -> list[ShardResult]:
    """Every shard in this process, one after another (tests, and jobs == 1)."""
    results = []
    for ops in shards:
        results.append(replay_shard(env, ops))
        progress(len(ops))
    return results


def pool_runner(jobs: int) -> Runner:
    """Shards in a local process pool of ``jobs`` processes (forkserver, as pass 1)."""

    def run(env: LabEnv, shards: Sequence[Sequence[Op]], progress: Progress) -> list[ShardResult]:
        if jobs <= 1 or len(shards) <= 1:
            return run_local(env, shards, progress)
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(min(jobs, len(shards)), mp_context=context) as pool:
            futures = {pool.submit(replay_shard, env, list(ops)): len(ops) for ops in shards}
            for fut in as_completed(futures):
                progress(futures[fut])
            return [fut.result() for fut in futures]

    return run


def chunks(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into ``parts`` contiguous pieces (order kept), none empty."""
    size = -(-count // max(1, parts)) if count else 1
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def pool_declarer(jobs: int) -> Declarer:
    """The map step in a local process pool (contiguous chunks, order kept)."""

    def declare_in_pool(
        env: LabEnv,
        messages: Sequence[CorpusMessage],
        presets: Sequence[Mapping[str, Any]],
        records: Sequence[Record],
        key: SecretKey,
    ) -> list[KeyRow]:
        parts = chunks(len(messages), jobs)
        if jobs <= 1 or len(parts) <= 1:
            return declare_chunk(env, messages, presets, records, key)
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(len(parts), mp_context=context) as pool:
            futures = [
                pool.submit(
                    declare_chunk,
                    env,
                    [messages[i] for i in part],
                    [presets[i] for i in part],
                    list(records),
                    key,
                )
                for part in parts
            ]
            return [row for fut in futures for row in fut.result()]

    return declare_in_pool


def make_plan(
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    known: Mapping[str, Outcomes],
    names: Sequence[str],
    shards: int,
    declarer: Declarer = declare_chunk,
) -> Plan:
    """The plan of a sharded pass 2: presets here, keys by ``declarer``, groups here."""
    registry = env.registry()
    fams = families(registry, names)
    wanted = registry.closure(names) - set(names)  # what the ordered facts depend on
    presets = [preset_for(registry, known.get(m.digest, {}), wanted) for m in messages]
    declared = declarer(env, messages, presets, [r for r, _ in fams], SecretKey.generate())
    return plan(messages, presets, declared, fams, shards)


def sharded_pass(
    env: LabEnv,
    messages: Sequence[CorpusMessage],
    known: Mapping[str, Outcomes],
    names: Sequence[str],
    shards: int,
    runner: Runner,
    progress: Progress,
    declarer: Declarer = declare_chunk,
) -> tuple[dict[str, Outcomes], dict[str, Any]]:
    """Pass 2 over ``messages`` as ``shards`` independent replays (module doc); returns
    every message's values, as sequential_pass gives them, and a description of the
    split. Nothing is returned unless every shard finished.

    ``declarer`` is the map step (each message's keys): in this process by default, on
    the workers with a cluster. Its keys are hashed with a throwaway key of this plan
    (made here, used for nothing else), so declarers in several processes agree."""
    start = time.perf_counter()
    layout = make_plan(env, messages, known, names, shards, declarer)
    planned = time.perf_counter()
    total = sum(map(len, layout.shards))
    done = told = 0

    def tick(ops: int) -> None:
        # Shards count ops (a message per family); the bar counts messages.
        nonlocal done, told
        done += ops
        now = len(messages) * done // max(1, total)
        progress(now - told)
        told = now

    results = runner(env, layout.shards, tick)
    seconds = {
        "plan_seconds": round(planned - start, 3),
        "replay_seconds": round(time.perf_counter() - planned, 3),
    }
    return join(results), {**layout.describe(), **seconds}
