"""`relay lab --engine dask` on a real Dask scheduler and two worker processes (loopback).

The cluster is started the way an operator would start one, as `dask scheduler` and
`dask worker` processes bound to 127.0.0.1, and `relay lab` reaches it by its address.
The report must be identical to the local pool's on the same corpus (the stateful facts
too: pass 2 runs there as a key-sharded replay, shards.py), and a batch or shard whose
worker dies must be computed anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "distributed",
    reason="the 'distributed' extra is not installed (pip install -e '.[distributed]')",
)

from relay.cli.main import main
from relay.config import settings_from_mapping
from relay.lab.compute import parallel_pass
from relay.lab.corpus import load_corpus, sources_from_labels
from relay.lab.engine import (
    EngineSpec,
    Payload,
    ShardTask,
    Task,
    compute_batch,
    dask_ordered,
    dask_pass,
    replay_task,
)
from relay.lab.env import LabEnv
from relay.lab.run import LabOptions, run_lab

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
TRUSTED = "mx.lab.example"
TIMINGS = ("parallel_seconds", "sequential_seconds", "pass2")  # how, not what


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # Workers must not be daemonic: the lab's classifier serves from a child process.
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two single-thread worker processes (each under a nanny, which
    restarts it if it dies), all on 127.0.0.1; yields the scheduler's address."""
    with _cluster(tmp_path_factory.mktemp("dask"), 2) as (address, _):
        yield address


@contextlib.contextmanager
def _cluster(tmp: Path, workers: int) -> Iterator[tuple[str, int]]:
    """The scheduler's address and process id, with ``workers`` workers attached."""
    tmp.mkdir(parents=True, exist_ok=True)
    info = tmp / "scheduler.json"
    procs = [
        _start(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info)],
            tmp / "scheduler.log",
        )
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not info.exists():
            assert time.monotonic() < deadline, (tmp / "scheduler.log").read_text()
            time.sleep(0.1)
        for n in range(workers):
            procs.append(
                _start(
                    ["worker", "--scheduler-file", str(info), "--host", "127.0.0.1",
                     "--nthreads", "1", "--no-dashboard", "--dashboard-address",
                     "127.0.0.1:0", "--name", f"w{n}"],
                    tmp / f"worker{n}.log",
                )
            )  # fmt: skip
        address = json.loads(info.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        from distributed import Client

        with Client(address, set_as_default=False, timeout="30s") as client:
            client.wait_for_workers(workers, timeout=60)
        assert _listening(procs) <= {"127.0.0.1"}, "the cluster must listen on loopback only"
        yield address, procs[0].pid
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _listening(procs: list[subprocess.Popen[bytes]]) -> set[str]:
    """Addresses the scheduler, nannies and workers listen on (HTTP endpoints included)."""
    import psutil  # a dependency of distributed

    found: set[str] = set()
    for p in procs:
        parent = psutil.Process(p.pid)
        for proc in [parent, *parent.children(recursive=True)]:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(conn.laddr.ip)
    assert found
    return found


def _lab(tmp_path: Path, out: Path, *engine: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[model]\nenabled = false\n")
    policies = FIXTURES / "policies"
    code = main(
        [
            "lab", "--corpus", str(FIXTURES / "corpus"), "--labels",
            str(FIXTURES / "labels.tsv"), "--set", "test", "--config", str(config),
            "--trust-authserv-id", TRUSTED, "--out", str(out), "--cache",
            str(tmp_path / "cache"), "--jobs", "2", "--no-progress", "--policy",
            str(policies / "auth_only.toml"), str(policies / "size_only.toml"), *engine,
        ]
    )  # fmt: skip
    assert code == 0


def _report(out: Path) -> str:
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    data.pop("timings")
    for key in TIMINGS:
        data["facts"].pop(key)
    return json.dumps(data, indent=1)


def _cache_rows(tmp_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "cache" / "facts.sqlite3") as db:
        return sorted(db.execute("SELECT * FROM facts"))


def test_dask_report_is_identical_to_the_local_pool(tmp_path: Path, scheduler: str) -> None:
    # Same cache path, emptied between the runs: both start cold and name the same cache.
    _lab(tmp_path, tmp_path / "local")
    local_rows = _cache_rows(tmp_path)
    shutil.rmtree(tmp_path / "cache")
    _lab(tmp_path, tmp_path / "dask", "--engine", "dask", "--scheduler", scheduler)

    report = _report(tmp_path / "dask")
    assert json.loads(report)["facts"]["messages_computed"] == 6  # really computed there
    assert report == _report(tmp_path / "local")
    for name in ("verdicts.jsonl", "report.md"):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "dask" / "messages").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "messages").iterdir()
    )
    # The driver wrote the same cache rows as the local pool did.
    assert _cache_rows(tmp_path) == local_rows


def _env() -> LabEnv:
    return LabEnv(settings_from_mapping({"model": {"enabled": False}}), (TRUSTED,))


def _items() -> list[tuple[Any, tuple[str, ...]]]:
    corpus = load_corpus(sources_from_labels(FIXTURES / "corpus", FIXTURES / "labels.tsv"), "x")
    names = ("message_size", "spf", "dmarc", "dkim_result", "bulk_count")
    return [(m, names) for m in corpus.messages]


def _dies_once(marker: Path) -> Task:
    """A task whose first run kills its worker process; later runs compute normally.
    (A closure: cloudpickle ships it by value, as workers cannot import this module.)"""

    def task(env: LabEnv, batch: list[Payload], run: str) -> dict[str, Any]:
        try:
            with marker.open("x") as fh:  # exactly one process wins the file
                fh.write(str(os.getpid()))
        except FileExistsError:
            return compute_batch(env, batch, run)
        os._exit(1)

    return task


def test_a_dead_workers_batch_is_computed_again(tmp_path: Path, scheduler: str) -> None:
    marker = tmp_path / "died"
    items = _items()
    ticks: list[int] = []
    stored: list[set[str]] = []
    got = dask_pass(
        EngineSpec("dask", scheduler, batch=2),
        _env(),
        items,
        jobs=2,
        progress=ticks.append,
        store=lambda batch: stored.append(set(batch)),
        task=_dies_once(marker),
    )
    assert marker.exists(), "no worker died: the test proved nothing"
    assert int(marker.read_text()) != os.getpid()
    want = parallel_pass(_env(), items, 1, lambda n: None)
    assert {d: c.outcomes for d, c in got.items()} == {d: c.outcomes for d, c in want.items()}
    assert sum(ticks) == len(items) == len(got) > 4  # three batches or more
    # Each batch went to the cache as it finished, once.
    assert len(stored) == 4 and set().union(*stored) == got.keys()
    assert sum(map(len, stored)) == len(got)
    # The run closed the lab services it opened on the workers.
    from distributed import Client

    def open_sessions() -> int:
        from relay.lab import engine

        return len(engine._sessions)

    with Client(scheduler, set_as_default=False) as client:
        assert set(client.run(open_sessions).values()) == {0}


def test_messages_travel_as_plain_values_and_come_back_exact() -> None:
    from relay.errors import RelayError
    from relay.lab.engine import message_from_payload, message_payload

    for message, names in _items():
        payload = message_payload(message, names)
        plain = (bytes, str, int, float, bool, list, dict, type(None))
        stack: list[Any] = [payload]
        while stack:
            value = stack.pop()
            assert isinstance(value, plain), value
            stack.extend(value.values() if isinstance(value, dict) else [])
            stack.extend(value if isinstance(value, list) else [])
        assert message_from_payload(payload) == (message, names)
        assert message_from_payload(payload)[0].raw() == message.raw()
    with pytest.raises(RelayError, match="not matching its digest"):
        message_from_payload({**payload, "raw": payload["raw"] + b"x"})


def test_results_from_another_environment_are_refused() -> None:
    from relay.errors import RelayError
    from relay.lab.engine import computed_from_result

    result = {"env_key": "other", "results": [["d", {"spf": ["pass", None]}]]}
    with pytest.raises(RelayError, match="another environment"):
        computed_from_result(result, "mine")
    [(digest, got)] = computed_from_result({**result, "env_key": "mine"}, "mine").items()
    assert digest == "d" and got.outcomes["spf"].value == "pass"


@pytest.mark.parametrize(
    ("kind", "scheduler", "workers"), [("local", "tcp://127.0.0.1:1", 0), ("ray", None, 0)]
)
def test_engine_options_are_checked(kind: Any, scheduler: str | None, workers: int) -> None:
    from relay.errors import RelayError

    with pytest.raises(RelayError):
        EngineSpec(kind, scheduler, workers)


# ---- pass 2: stateful facts, sharded on the workers ----------------------------------

STATEFUL_POLICY = """[policy]
name = "counts"
mode = "enforce"
[policy.thresholds]
tag = 1.0
reject = 5.0
[[rule]]
name = "third_copy"
when = "bulk_count >= 3"
score = 5.0
[[rule]]
name = "busy_sender"
when = "sender_volume_24h >= 4"
score = 1.0
[[rule]]
name = "fast_client"
when = "connection_rate >= 3"
score = 1.0
"""


def _stateful_corpus(root: Path) -> Path:
    """A newsletter sent in copies from one client address (some within a minute, one a
    day later), other mail of the same sender's domain, and personal mail from another
    address sharing a recipient; file order is not time order."""
    body = "Weekly deals on printers and ink, order today at the shop.\n" * 5
    mails = [
        ("ham", "n1", "deals@shop.example", "u1@example.net", "203.0.113.5", "03:00:00", body),
        ("ham", "n2", "deals@shop.example", "u2@example.net", "203.0.113.5", "03:00:20", body),
        ("ham", "n3", "deals@shop.example", "u3@example.net", "203.0.113.5", "03:00:40", body),
        ("ham", "n4", "deals@shop.example", "u4@example.net", "203.0.113.5", "03:00:40", body),
        ("spam", "n5", "deals@shop.example", "u5@example.net", "203.0.113.5", "03:05:00", body),
        ("ham", "o1", "info@news.shop.example", "u1@example.net", "203.0.113.9", "02:00:00",
         "Your order has shipped and will arrive on Tuesday.\n"),
        ("ham", "p1", "alice@example.org", "u1@example.net", "198.51.100.7", "03:00:10",
         "See you on Friday at noon.\n"),
        ("spam", "p2", "alice@example.org", "u1@example.net", "198.51.100.7", "03:00:30",
         "See you on Friday at noon, and bring the ink.\n"),
    ]  # fmt: skip
    for label, name, sender, rcpt, ip, hms, text in mails:
        box = root / label
        box.mkdir(parents=True, exist_ok=True)
        (box / f"{name}.eml").write_text(
            f"Received: from mx.sender.example ([{ip}]) by {TRUSTED} with ESMTP;"
            f" Mon, 2 Sep 2002 {hms} +0000\nFrom: <{sender}>\nTo: {rcpt}\nSubject: {name}\n"
            f"Date: Mon, 2 Sep 2002 {hms} +0000\nMessage-ID: <{name}@x.example>\n\n{text}"
        )
    (root / "counts.toml").write_text(STATEFUL_POLICY)
    return root / "counts.toml"


def _stateful_run(tmp_path: Path, out: str, engine: EngineSpec) -> dict[str, Any]:
    from relay.lab.corpus import sources_from_box

    policy = _stateful_corpus(tmp_path / "corpus")
    options = LabOptions(
        sources=(
            *sources_from_box(tmp_path / "corpus" / "spam", "spam"),
            *sources_from_box(tmp_path / "corpus" / "ham", "ham"),
        ),
        description="stateful",
        policies=(policy,),
        out=tmp_path / out,
        env=_env(),
        cache_dir=tmp_path / "cache",
        jobs=2,
        engine=engine,
    )
    return run_lab(options)


def test_stateful_facts_on_the_cluster_match_the_ordered_loop(
    tmp_path: Path, scheduler: str
) -> None:
    local = _stateful_run(tmp_path, "local", EngineSpec())
    local_rows = _cache_rows(tmp_path)
    shutil.rmtree(tmp_path / "cache")
    dask = _stateful_run(tmp_path, "dask", EngineSpec("dask", scheduler))

    assert local["facts"]["pass2"] == {"mode": "sequential"}
    pass2 = dask["facts"]["pass2"]
    # Pass 2 really ran sharded, as tasks in the worker processes (not the driver's).
    assert (pass2["mode"], pass2["engine"], pass2["shards"]) == ("sharded", "dask", 4)
    assert pass2["processes"] >= 1 and sum(pass2["shard_ops"]) >= 8
    assert set(dask["facts"]["stateful"]) >= {"bulk_count", "sender_volume_24h", "connection_rate"}
    # The counts mattered: the corpus-time third copy and later ones are refused.
    [counts] = [r for r in dask["regimes"] if r["name"] == "counts"]
    assert {b["id"] for b in counts["ham_blocks"]} == {"ham/n3.eml", "ham/n4.eml"}
    assert _report(tmp_path / "dask") == _report(tmp_path / "local")
    for name in ("verdicts.jsonl", "report.md"):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    for shard in (tmp_path / "local" / "messages").glob("*.json"):
        assert (tmp_path / "dask" / "messages" / shard.name).read_bytes() == shard.read_bytes()
    assert _cache_rows(tmp_path) == local_rows  # stateful rows included


def _shard_dies_once(marker: Path) -> ShardTask:
    """A pass 2 task whose first run kills its worker process (shipped by value)."""

    def task(env: LabEnv, ops: list[Payload], run: str) -> dict[str, Any]:
        try:
            with marker.open("x") as fh:
                fh.write(str(os.getpid()))
        except FileExistsError:
            return replay_task(env, ops, run)
        os._exit(1)

    return task


def test_a_dead_workers_shard_is_replayed_again(tmp_path: Path, scheduler: str) -> None:
    import asyncio

    from relay.lab.compute import DEFERRED, sequential_pass

    policy = _stateful_corpus(tmp_path / "corpus")
    assert policy.exists()
    from relay.lab.corpus import sources_from_box

    corpus = load_corpus(
        (
            *sources_from_box(tmp_path / "corpus" / "spam", "spam"),
            *sources_from_box(tmp_path / "corpus" / "ham", "ham"),
        ),
        "x",
    )
    names = ("bulk_fingerprint", "bulk_count", "sender_volume_24h", "connection_rate")
    items = [(m, names) for m in corpus.messages]
    known = {d: c.outcomes for d, c in parallel_pass(_env(), items, 1, lambda n: None).items()}
    deferred = sorted(
        {n for o in known.values() for n, c in o.items() if c.error and DEFERRED in c.error}
    )
    assert deferred == ["bulk_count", "connection_rate", "sender_volume_24h"]
    marker = tmp_path / "died"
    ticks: list[int] = []
    got, info = dask_ordered(
        EngineSpec("dask", scheduler, shards=3),
        _env(),
        corpus.messages,
        known,
        deferred,
        jobs=2,
        progress=ticks.append,
        task=_shard_dies_once(marker),
    )
    assert marker.exists(), "no worker died: the test proved nothing"
    assert int(marker.read_text()) != os.getpid()
    want = asyncio.run(
        sequential_pass(_env(), corpus.messages, known, {}, deferred, lambda n: None)
    )
    assert got == want
    assert info["shards"] == 3 and sum(ticks) == len(corpus.messages)


def _kills_the_scheduler(pid: int) -> ShardTask:
    """A pass 2 task that takes the whole cluster down (its scheduler) and waits."""

    def task(env: LabEnv, ops: list[Payload], run: str) -> dict[str, Any]:
        os.kill(pid, signal.SIGKILL)
        time.sleep(30)
        return replay_task(env, ops, run)

    return task


def test_a_cluster_gone_in_pass_2_fails_clearly_and_caches_none_of_it(
    tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.errors import RelayError
    from relay.lab import engine

    with _cluster(tmp_path / "doomed", 1) as (address, pid):
        monkeypatch.setattr(engine, "replay_task", _kills_the_scheduler(pid))
        with pytest.raises(RelayError, match="pass 2 on the Dask cluster failed"):
            _stateful_run(tmp_path, "gone", EngineSpec("dask", address))
    monkeypatch.undo()
    rows = _cache_rows(tmp_path)
    contexts = {row[3] for row in rows}
    assert rows and not any("/order:" in c for c in contexts)  # pass 1 kept, no pass 2
    assert not (tmp_path / "gone" / "report.json").exists()
    # Run again on a live cluster: only the stateful facts are asked again (pass 1's
    # values are cached), and pass 2 is computed whole: the report is the local one.
    again = _stateful_run(tmp_path, "again", EngineSpec("dask", scheduler))
    assert again["facts"]["pass2"]["mode"] == "sharded"
    shutil.rmtree(tmp_path / "cache")
    _stateful_run(tmp_path, "local", EngineSpec())
    assert _report(tmp_path / "again") == _report(tmp_path / "local")
