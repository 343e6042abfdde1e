"""`relay lab --engine dask` on a real Dask scheduler and two worker processes (loopback).

The cluster is started the way an operator would start one, as `dask scheduler` and
`dask worker` processes bound to 127.0.0.1, and `relay lab` reaches it by its address.
The report must be identical to the local pool's on the same corpus, and a batch whose
worker dies must be computed anyway.
"""

from __future__ import annotations

import json
import os
import shutil
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
from relay.lab.engine import EngineSpec, Payload, Task, compute_batch, dask_pass
from relay.lab.env import LabEnv

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
TRUSTED = "mx.lab.example"
TIMINGS = ("parallel_seconds", "sequential_seconds")


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
    tmp = tmp_path_factory.mktemp("dask")
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
        for n in range(2):
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
            client.wait_for_workers(2, timeout=60)
        assert _listening(procs) <= {"127.0.0.1"}, "the cluster must listen on loopback only"
        yield address
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
