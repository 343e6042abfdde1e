"""The shared-state interface: one suite run against SQLite and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path

import pytest

from relay.config import StateSettings
from relay.errors import StateError
from relay.secretkey import SecretKey
from relay.state import RedisState, SqliteState, StateStore, open_state

Opener = Callable[[], Awaitable[StateStore]]
KEY = SecretKey(bytes(range(32)))  # one relay's key; clients of one store share it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _real_clock(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without libfaketime (make unit-future). redis-server's jemalloc recurses into
    libfaketime's clock_gettime at start-up and the server never starts; on the real clock
    it is a relay host with a skewed clock, which the store must (and does) tolerate: it
    passes its own times, and Redis EXPIRE only counts seconds from now."""
    preload = [p for p in re.split(r"[:\s]+", env.get("LD_PRELOAD", "")) if "faketime" not in p]
    return {**env, "LD_PRELOAD": " ".join(preload)}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found (install it with `make system-deps`)")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_real_clock(os.environ),
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens a new client of one shared store (same file, or same redis database)."""
    if request.param == "sqlite":
        settings = StateSettings(backend="sqlite", path=tmp_path / "var" / "state.sqlite3")
    else:
        url: str = request.getfixturevalue("redis_url")
        # A database per test keeps tests independent on one server.
        db = abs(hash(request.node.nodeid)) % 16
        settings = StateSettings(backend="redis", url=url.rsplit("/", 1)[0] + f"/{db}")

    async def open_one() -> StateStore:
        return await open_state(settings, KEY)

    return open_one


@pytest.fixture
async def store(opener: Opener) -> AsyncIterator[StateStore]:
    one = await opener()
    if isinstance(one, RedisState):
        await one._redis.flushdb()
    yield one
    await one.close()


async def test_window_counts_distinct_members(store: StateStore) -> None:
    assert await store.incr_window("k", "alice", 60, now=1000.0) == 1
    assert await store.incr_window("k", "bob", 60, now=1001.0) == 2
    assert await store.incr_window("k", "alice", 60, now=1002.0) == 2  # seen again: same
    assert await store.incr_window("other", "alice", 60, now=1002.0) == 1


async def test_window_forgets_old_members(store: StateStore) -> None:
    await store.incr_window("k", "alice", 60, now=1000.0)
    await store.incr_window("k", "bob", 60, now=1030.0)
    # alice at 1000 is outside (1060 - 60, 1060]; bob is inside.
    assert await store.incr_window("k", "carol", 60, now=1060.0) == 2
    # alice seen again refreshes her time (she counts until 1125).
    assert await store.incr_window("k", "alice", 60, now=1065.0) == 3
    assert (
        await store.incr_window("k", "dave", 60, now=1095.0) == 3
    )  # bob (1030) gone; carol, alice in


async def test_many_members_in_one_call(store: StateStore) -> None:
    assert await store.incr_window_many("k", ["a", "b", "c"], 60, now=10.0) == 3
    assert await store.incr_window_many("k", ["c", "d"], 60, now=20.0) == 4
    assert await store.incr_window_many("k", [], 60, now=75.0) == 2  # a, b (10) aged out
    assert await store.incr_window("k", "e", 60, now=76.0) == 3


async def test_several_keys_in_one_call(store: StateStore) -> None:
    assert await store.incr_window("b", "x", 60, now=10.0) == 1
    assert await store.incr_windows(["a", "b", "c"], ["x", "y"], 60, now=20.0) == [2, 2, 2]
    assert await store.incr_windows(["b"], ["z"], 60, now=30.0) == [3]
    assert await store.incr_windows([], ["z"], 60, now=30.0) == []


async def test_anonymous_events_each_count(store: StateStore) -> None:
    counts = [await store.incr_window("conn", None, 60, now=500.0 + i) for i in range(5)]
    assert counts == [1, 2, 3, 4, 5]
    assert await store.incr_window("conn", None, 60, now=561.0) == 4  # 500, 501 aged out


async def test_flags_with_and_without_ttl(store: StateStore) -> None:
    assert not await store.seen("pair", now=10.0)
    await store.add("pair", now=10.0)
    assert await store.seen("pair", now=10.0)
    assert await store.seen("pair", now=1e12)
    await store.add("short", ttl=30, now=100.0)
    assert await store.seen("short", now=129.0)
    assert not await store.seen("short", now=130.0)
    await store.add("short", ttl=30, now=200.0)  # set again: lives again
    assert await store.seen("short", now=220.0)


async def test_two_relays_share_counts(opener: Opener, store: StateStore) -> None:
    other = await opener()
    try:
        assert await store.incr_window("bulk", "r1", 3600, now=1.0) == 1
        assert await other.incr_window("bulk", "r2", 3600, now=2.0) == 2
        assert await store.incr_window("bulk", "r3", 3600, now=3.0) == 3
        await other.add("seen-by-other", now=3.0)
        assert await store.seen("seen-by-other", now=4.0)
    finally:
        await other.close()


async def test_concurrent_writers_lose_nothing(opener: Opener, store: StateStore) -> None:
    other = await opener()
    try:
        now = 1_795_000_000.0
        writes = [
            client.incr_window("race", f"m{i}-{n}", 3600, now=now)
            for n, client in enumerate((store, other))
            for i in range(100)
        ]
        counts = await asyncio.gather(*writes)
        assert max(counts) == 200
        assert await store.incr_window("race", "m0-0", 3600, now=now) == 200
    finally:
        await other.close()


_WRITER = """
import asyncio, sys
from pathlib import Path
from relay.secretkey import SecretKey
from relay.state import SqliteState

async def main() -> None:
    store = await SqliteState(Path(sys.argv[1]), key=SecretKey(bytes(32))).open()
    for i in range(150):
        await store.incr_window("procs", f"{sys.argv[2]}-{i}", 3600, now=100.0)
    await store.close()

asyncio.run(main())
"""


async def test_sqlite_is_safe_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", _WRITER, str(path), name)
        for name in ("a", "b", "c")
    ]
    assert [await p.wait() for p in procs] == [0, 0, 0]
    store = await SqliteState(path, key=KEY).open()
    try:
        assert await store.incr_window("procs", "a-0", 3600, now=100.0) == 450
    finally:
        await store.close()


async def test_hashed_hides_addresses(store: StateStore) -> None:
    key = store.hashed("alice@example.org", "bob@example.net")
    assert "alice" not in key and "example" not in key
    assert key == store.hashed("alice@example.org", "bob@example.net")
    assert key != store.hashed("alice@example.orgbob@example.net", "")


async def test_address_hashes_are_keyed(tmp_path: Path) -> None:
    """Issue 15, finding 10: one key, one hash per address (several relays sharing a
    store count together); another key, other hashes (without the key, a guessed address
    cannot be confirmed)."""
    other = SecretKey(bytes(range(1, 33)))
    one = SqliteState(tmp_path / "a.db", key=KEY)
    same = RedisState("redis://127.0.0.1:1/0", key=KEY)  # never connected: hashing only
    different = SqliteState(tmp_path / "b.db", key=other)
    address = "alice@example.org"
    try:
        assert one.hashed(address) == same.hashed(address)
        assert one.hashed(address) != different.hashed(address)
        pair = (address, "bob@example.net")
        assert one.hashed(*pair) == same.hashed(*pair) != different.hashed(*pair)
    finally:
        await same.close()
        await one.close()
        await different.close()


async def test_the_state_file_holds_no_unkeyed_address_hash(tmp_path: Path) -> None:
    """What the relay records for a recipient, a connection and a correspondent pair is
    not the unkeyed BLAKE2b anyone could compute from a guessed address."""
    from relay.facts import bulk, network
    from relay.message import Envelope, Message, Peer

    def unkeyed(*parts: str) -> str:  # what state.hashed computed before the key
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            digest.update(part.encode() + b"\x00")
        return digest.hexdigest()

    path = tmp_path / "state.sqlite3"
    store = await SqliteState(path, key=KEY).open()
    message = Message(
        raw=b"To: bob@example.org\r\n\r\nhi\r\n",
        envelope=Envelope("alice@example.net", ("bob@example.org",)),
        peer=Peer(ip="192.0.2.7", port=40000),
        received_at=1000.0,
    )
    try:
        await store.incr_window_many("bulk:x", bulk.bulk_members(store, message), 60, 1000.0)
        peer = message.peer
        member = network.connection_member(store, peer)
        await store.incr_window(network.connection_key(store, peer), member, 60, 1000.0)
        await store.add(
            bulk.correspondent_key(store, "alice@example.net", "bob@example.org"), now=1000.0
        )
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        stored = " ".join(
            [k + " " + m for k, m in db.execute("SELECT key, member FROM window_members")]
            + [k for (k,) in db.execute("SELECT key FROM flags")]
        )
    assert stored.count("rcpt") == 0 and "example" not in stored and "192.0.2.7" not in stored
    for guess in (
        unkeyed("rcpt", "bob@example.org"),
        unkeyed("192.0.2.7"),
        unkeyed("192.0.2.7", "40000"),
        unkeyed("alice@example.net", "bob@example.org"),
    ):
        assert guess not in stored
    assert f"conn:{store.hashed('192.0.2.7')}" in stored  # the keyed one is what is kept


async def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    store = await SqliteState(tmp_path / "s.db", key=KEY).open()
    await store.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_unreachable_redis_is_a_state_error() -> None:
    settings = StateSettings(backend="redis", url=f"redis://127.0.0.1:{_free_port()}/0")
    with pytest.raises(StateError):
        await open_state(settings, KEY)


async def test_closed_sqlite_store_raises_state_error(tmp_path: Path) -> None:
    store = SqliteState(tmp_path / "s.db", key=KEY)  # never opened
    with pytest.raises(StateError):
        await store.seen("x", now=1.0)
    await store.close()


def _open_together(args: tuple[str, threading.Barrier]) -> str:
    """In a spawned process: wait until all four are ready, then open the store."""
    path, start = args

    async def go() -> None:
        store = await SqliteState(Path(path), key=KEY).open()
        await store.close()

    start.wait(timeout=60)  # no clock race: a slow spawn delays the start, never misses it
    try:
        asyncio.run(go())
    except StateError as exc:
        return str(exc)
    return "ok"


def test_workers_opening_a_new_state_file_together_all_succeed(tmp_path: Path) -> None:
    """Relay workers start at the same moment on a fresh install: every one must open the
    file (SQLite refused the WAL switch to some of them at once; one start in four of a
    2-worker relay failed before the open was retried)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    # Four tasks on four processes: each one waits at the barrier, so no process takes two.
    with context.Manager() as manager, context.Pool(4) as pool:
        start = manager.Barrier(4)
        for round_ in range(15):
            path = str(tmp_path / f"state-{round_}.db")
            assert pool.map(_open_together, [(path, start)] * 4, chunksize=1) == ["ok"] * 4


async def test_counts_are_what_recording_would_return_and_record_nothing(
    store: StateStore,
) -> None:
    """count_window* answers what incr_window* would, without recording: facts read with
    it and count the message as if it were recorded already (random walk over members,
    anonymous events, windows expiring and several keys)."""
    import random

    rng = random.Random(14)
    now = 10_000.0
    for _ in range(120):
        now += rng.choice((0.0, 1.0, 7.0, 25.0))
        keys = rng.sample(["a", "b", "c"], rng.randint(1, 3))
        members = [f"m{rng.randint(0, 12)}" for _ in range(rng.randint(0, 3))]
        predicted = await store.count_windows(keys, members, 60, now)
        assert await store.count_windows(keys, members, 60, now) == predicted  # nothing moved
        assert await store.incr_windows(keys, members, 60, now) == predicted
        member = None if rng.random() < 0.2 else f"m{rng.randint(0, 12)}"
        one = await store.count_window("a", member, 60, now)
        assert await store.incr_window("a", member, 60, now) == one
    assert await store.count_window_many("a", [], 60, now) == await store.incr_window_many(
        "a", [], 60, now
    )


async def test_counting_a_member_in_the_future_keeps_its_later_time(store: StateStore) -> None:
    await store.incr_window("k", "late", 60, now=1100.0)  # recorded out of order
    assert await store.count_window("k", "late", 60, now=1000.0) == 1
    assert await store.count_window("k", "new", 60, now=1000.0) == 2


async def test_read_only_store_reads_and_refuses_writes(
    opener: Opener, store: StateStore, tmp_path: Path
) -> None:
    await store.incr_window_many("k", ["a", "b"], 60, now=100.0)
    await store.add("flag", now=100.0)
    if isinstance(store, RedisState):
        reader: StateStore = RedisState(store.url, key=KEY, readonly=True)
    else:
        assert isinstance(store, SqliteState)
        reader = await SqliteState(store.path, key=KEY, readonly=True).open()
    try:
        assert await reader.count_window("k", "c", 60, now=110.0) == 3
        assert await reader.count_window_many("k", [], 60, now=110.0) == 2
        assert await reader.seen("flag", now=110.0)
        with pytest.raises(StateError, match="read-only"):
            await reader.incr_window("k", "c", 60, now=110.0)
        with pytest.raises(StateError, match="read-only"):
            await reader.add("other", now=110.0)
    finally:
        await reader.close()
    assert await store.count_window_many("k", [], 60, now=110.0) == 2


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_read_only_sqlite_changes_no_file(tmp_path: Path) -> None:
    """relay scan's store: nothing written, and no -wal or -shm created beside a closed
    store (they would belong to whoever ran the scan)."""
    path = tmp_path / "var" / "state.sqlite3"
    writer = await SqliteState(path, key=KEY).open()
    await writer.incr_window_many("k", ["a", "b"], 60, now=100.0)
    await writer.close()
    before = _files(path.parent)
    assert list(before) == ["state.sqlite3"]
    reader = await SqliteState(path, key=KEY, readonly=True).open()
    assert await reader.count_window("k", "c", 60, now=110.0) == 3
    await reader.close()
    assert _files(path.parent) == before
    # A store in use (a live relay has its -wal): read through it, still writing nothing.
    writer = await SqliteState(path, key=KEY).open()
    await writer.incr_window("k", "c", 60, now=105.0)  # in the WAL, not yet in the file
    busy = _files(path.parent)
    reader = await SqliteState(path, key=KEY, readonly=True).open()
    assert await reader.count_window_many("k", [], 60, now=110.0) == 3
    await reader.close()
    assert _files(path.parent)["state.sqlite3"] == busy["state.sqlite3"]
    assert _files(path.parent)["state.sqlite3-wal"] == busy["state.sqlite3-wal"]
    await writer.close()
    # No store yet: an empty one, and none created.
    empty = await SqliteState(tmp_path / "none" / "state.sqlite3", key=KEY, readonly=True).open()
    assert await empty.count_window("k", "a", 60, now=1.0) == 1
    await empty.close()
    assert not (tmp_path / "none").exists()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_sqlite_state_files_are_private(tmp_path: Path, umask_022: None) -> None:
    """Issue 15: the state (address hashes, counters) was world-readable (0644)."""
    path = tmp_path / "var" / "state.sqlite3"
    store = await SqliteState(path, key=KEY).open()
    try:
        await store.incr_window("k", "m", 60.0, time.time())
        sidecars = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() for p in sidecars)
        assert {p.name: _mode(p) for p in (path, *sidecars)} == {
            p.name: 0o600 for p in (path, *sidecars)
        }
    finally:
        await store.close()


async def test_sqlite_state_tightens_a_world_readable_file(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "state.sqlite3"
    store = await SqliteState(path, key=KEY).open()
    await store.incr_window("k", "m", 60.0, time.time())
    await store.close()
    path.chmod(0o644)  # as an older version left it
    store = await SqliteState(path, key=KEY).open()
    try:
        assert await store.count_window("k", "m", 60.0, time.time()) == 1  # data kept
        assert _mode(path) == 0o600
    finally:
        await store.close()
