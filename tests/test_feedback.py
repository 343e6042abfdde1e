"""Feedback in (relay learn, the HTTP endpoint, quarantine release) and the feedback store,
on a real SQLite file, a real redis-server and real HTTP over loopback."""

from __future__ import annotations

import asyncio
import io
import json
import mailbox
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay.cli.main import main
from relay.config import FeedbackSettings, StateSettings
from relay.errors import FeedbackRefused, StateError
from relay.feedback.learn import Learner
from relay.feedback.record import Domains, EntryMaker, decode_vector
from relay.feedback.store import (
    FeedbackStore,
    SqliteFeedback,
    open_feedback,
    training_set,
)
from relay.ops.learn import FeedbackMetrics, LearnServer
from relay.secretkey import SecretKey
from tests.support.feedback import NOW, entry
from tests.test_state import redis_url  # noqa: F401 - the real redis-server fixture

KEY = SecretKey(bytes(range(32)))
WORD = "zorbulating"  # a distinctive body word: must never reach the store by default
TOKEN = "s3cret-token-for-tests-0123456789"


def mail(n: int = 0, *, extra: bytes = b"") -> bytes:
    return (
        extra + b"From: Shop <offers@shop.example>\r\nTo: bob@example.org\r\n"
        b"Subject: deal " + str(n).encode() + b"\r\n"
        b"DKIM-Signature: v=1; a=rsa-sha256; d=mail.shop.example; s=k; b=abc\r\n\r\n"
        b"Buy " + WORD.encode() + b" pills number " + str(n).encode() + b" at "
        b"http://www.pills.example.co.uk/x today\r\n"
    )


MAKER = EntryMaker()  # holds the suffix list and the vectoriser: build once


def config(tmp_path: Path, feedback: str = "") -> Path:
    key_file = tmp_path / "relay.key"
    if not key_file.exists():
        key_file.write_bytes(KEY.material)
        key_file.chmod(0o600)
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n'
        f'[security]\nkey_file = "{key_file}"\n[feedback]\n{feedback}\n'
    )
    return path


def stats(cfg: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    capsys.readouterr()
    assert main(["learn", "--stats", "--json", "--config", str(cfg)]) == 0
    data: dict[str, int] = json.loads(capsys.readouterr().out)
    return data


async def sqlite_store(tmp_path: Path, **limits: object) -> SqliteFeedback:
    settings = replace(FeedbackSettings(), **limits)  # type: ignore[arg-type]
    return await SqliteFeedback(tmp_path / "state.sqlite3", key=KEY, settings=settings).open()


# -- the CLI -------------------------------------------------------------------------


def test_learn_file_maildir_mbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    one = tmp_path / "one.eml"
    one.write_bytes(mail(1))
    md = mailbox.Maildir(tmp_path / "md")
    md.add(mail(2))
    md.add(mail(3))
    mb = mailbox.mbox(tmp_path / "box.mbox")
    mb.add(mail(4))
    mb.add(mail(5))
    mb.close()
    args = ["learn", "--spam", "--config", str(cfg), str(one), str(tmp_path / "md")]
    assert main([*args, str(tmp_path / "box.mbox")]) == 0
    assert stats(cfg, capsys) == {"spam": 5, "ham": 0, "entries": 5}


def test_learn_stdin_in_a_real_process(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cmd = [sys.executable, "-m", "relay.cli", "learn", "--ham", "--source", "imapsieve"]
    done = subprocess.run(
        [*cmd, "--reporter", "alice", "--config", str(cfg), "-"], input=mail(), capture_output=True
    )
    assert done.returncode == 0, done.stderr
    out = subprocess.run(
        [sys.executable, "-m", "relay.cli", "learn", "--stats", "--json", "--config", str(cfg)],
        capture_output=True,
        check=True,
    ).stdout
    assert json.loads(out) == {"spam": 0, "ham": 1, "entries": 1}
    row = (
        sqlite3.connect(tmp_path / "state.sqlite3")
        .execute("SELECT source, reporter FROM feedback")
        .fetchone()
    )
    assert row[0] == "imapsieve" and "alice" not in row[1]  # a keyed hash, not the name


def test_relabel_overwrites_and_forget_deletes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(config(tmp_path))
    msg = tmp_path / "m.eml"
    msg.write_bytes(mail())
    # The copy that came back through the relay: more header fields, same body.
    copy = tmp_path / "copy.eml"
    copy.write_bytes(
        mail(
            extra=b"Received: from x by y; Mon, 7 Dec 2026 10:00:00 +0000\r\n"
            b"X-Spam-Score: 9.1\r\nAuthentication-Results: relay; dkim=pass\r\n"
        )
    )
    assert main(["learn", "--spam", "--config", cfg, str(msg)]) == 0
    assert main(["learn", "--ham", "--config", cfg, str(copy)]) == 0
    assert "ham (was spam)" in capsys.readouterr().out
    assert stats(Path(cfg), capsys) == {"spam": 0, "ham": 1, "entries": 1}
    assert main(["learn", "--forget", "--config", cfg, str(copy)]) == 0
    assert "forgotten" in capsys.readouterr().out
    assert stats(Path(cfg), capsys)["entries"] == 0


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01\x02\xff binary junk", b"no header here\r\n\r\nbody\r\n", b"A: b\r\n"],
)
def test_unparsable_is_refused_and_nothing_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes
) -> None:
    cfg = config(tmp_path)
    bad = tmp_path / "bad.eml"
    bad.write_bytes(data)
    good = tmp_path / "good.eml"
    good.write_bytes(mail())
    assert main(["learn", "--spam", "--config", str(cfg), str(bad), str(good)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: refused:" in err and str(good) not in err
    assert stats(cfg, capsys)["entries"] == 1  # the good one still counts


def test_oversize_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, "max_message_size = 100")
    big = tmp_path / "big.eml"
    big.write_bytes(mail())
    assert main(["learn", "--spam", "--config", str(cfg), str(big)]) == 1
    assert "max_message_size" in capsys.readouterr().err
    assert stats(cfg, capsys)["entries"] == 0


def test_usage_and_config_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["learn", "--spam"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["learn", "--spam", "--ham", "x"])
    assert exc.value.code == 2
    assert main(["learn", "--stats", "--config", str(tmp_path / "missing.toml")]) == 2


def test_no_body_stored_by_default_and_kept_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    msg = tmp_path / "m.eml"
    msg.write_bytes(mail())
    assert main(["learn", "--spam", "--config", str(cfg), str(msg)]) == 0
    for file in tmp_path.glob("state.sqlite3*"):  # the database and its WAL
        assert WORD.encode() not in file.read_bytes()
        assert b"offers@shop.example" not in file.read_bytes()
    kept = tmp_path / "kept"
    kept.mkdir()
    cfg = config(kept, "keep_bodies = true")
    assert main(["learn", "--spam", "--config", str(cfg), str(msg)]) == 0
    body = sqlite3.connect(kept / "state.sqlite3").execute("SELECT body FROM feedback").fetchone()
    assert WORD.encode() in body[0]


# -- the entry -------------------------------------------------------------------------


def test_entry_holds_domains_and_a_decodable_vector() -> None:
    entry = MAKER.make(mail(), label="spam", source="cli", reporter="r", at=NOW, keep_body=False)
    assert entry.domains == Domains("shop.example", ("mail.shop.example",), ("example.co.uk",))
    indices, counts = decode_vector(entry.vector)
    assert indices and len(indices) == len(counts) and list(indices) == sorted(indices)
    assert entry.body is None and entry.feature_version == 2


# -- the store ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FeedbackStore]:
    limits = FeedbackSettings(max_entries=5, per_reporter_daily=10, max_age_days=2)
    if request.param == "sqlite":
        state = StateSettings(path=tmp_path / "state.sqlite3")
    else:
        url: str = request.getfixturevalue("redis_url")
        state = StateSettings(backend="redis", url=url.rsplit("/", 1)[0] + "/15")
    one = await open_feedback(state, limits, KEY)
    if request.param == "redis":
        await one._redis.flushdb()  # type: ignore[attr-defined]
    yield one
    await one.close()


async def test_store_relabel_forget_evict_and_age(store: FeedbackStore) -> None:
    assert await store.record(entry(1), now=NOW) is None
    assert await store.record(entry(1, "ham"), now=NOW) == "spam"
    assert (await store.stats()).as_dict() == {"spam": 0, "ham": 1, "entries": 1}
    assert await store.forget(entry(1).digest, "r1", now=NOW) is True
    assert await store.forget(entry(1).digest, "r1", now=NOW) is False
    for n in range(7):  # max_entries = 5: the oldest two go
        await store.record(entry(10 + n, at=NOW + n, reporter=f"x{n}"), now=NOW + n)
    assert sorted(e.digest for e in await store.entries()) == [
        entry(n).digest for n in range(12, 17)
    ]
    later = NOW + 3 * 86400  # max_age_days = 2: everything older is dropped on a write
    await store.record(entry(99, at=later, reporter="y"), now=later)
    assert [e.digest for e in await store.entries()] == [entry(99).digest]


async def test_reporter_flood_is_capped(store: FeedbackStore) -> None:
    for n in range(10):
        await store.record(entry(n), now=NOW + n)
    with pytest.raises(FeedbackRefused, match="per_reporter_daily") as exc:
        await store.record(entry(50), now=NOW + 20)
    assert exc.value.reason == "reporter_cap"
    with pytest.raises(FeedbackRefused):
        await store.forget(entry(1).digest, "r1", now=NOW + 20)
    assert (await store.stats()).entries == 5  # max_entries; nothing from the refusals
    await store.record(entry(51, reporter="r2"), now=NOW + 21)  # others are not capped
    await store.record(entry(52), now=NOW + 86400 + 10)  # a day later r1 may report again


async def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    class DiskFull(SqliteFeedback):
        def _evict(self, db: sqlite3.Connection) -> None:  # after the insert, in the write
            raise sqlite3.OperationalError("database or disk is full")

    store = await DiskFull(tmp_path / "state.sqlite3", key=KEY, settings=FeedbackSettings()).open()
    try:
        with pytest.raises(StateError, match="disk is full"):
            await store.record(entry(1), now=NOW)
        assert await store.entries() == []
    finally:
        await store.close()
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM feedback").fetchone() == (0,)
    assert db.execute("SELECT COUNT(*) FROM feedback_reports").fetchone() == (0,)  # rolled back


def test_training_set_caps_one_reporter_and_balances() -> None:
    flood = [entry(n, reporter="mallory", at=NOW + n) for n in range(1000)]
    others = [entry(5000 + n, reporter=f"user{n}", at=NOW) for n in range(90)]
    ham = [entry(9000 + n, "ham", reporter=f"user{n % 30}", at=NOW) for n in range(200)]
    chosen = training_set([*flood, *others, *ham], share=0.1)
    spam = [e for e in chosen if e.label == "spam"]
    from_mallory = sum(e.reporter == "mallory" for e in spam)
    assert from_mallory <= 10  # 0.1/(1-0.1) * 90 others
    assert from_mallory <= 0.1 * len(spam) + 1e-9
    assert len(spam) == sum(e.label == "ham" for e in chosen)  # balanced
    assert training_set(flood, share=0.1) == []  # one class alone trains nothing
    assert len(training_set([*flood, *ham], share=1.0)) == 400  # share 1: no cap


# -- HTTP --------------------------------------------------------------------------------


async def _http(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def _post(path: str, body: bytes, token: str | None = TOKEN, extra: str = "") -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}Content-Length: {len(body)}\r\n\r\n"


@pytest.fixture
async def endpoint(
    tmp_path: Path,
) -> AsyncIterator[tuple[LearnServer, SqliteFeedback, CollectorRegistry]]:
    store = await sqlite_store(tmp_path, max_message_size=2000)
    registry = CollectorRegistry()
    server = LearnServer(
        Learner(store, MAKER), TOKEN.encode(), FeedbackMetrics(registry), clock=lambda: NOW
    )
    await server.start("127.0.0.1", 0)
    yield server, store, registry
    await server.close()
    await store.close()


async def test_http_learn_and_forget(
    endpoint: tuple[LearnServer, SqliteFeedback, CollectorRegistry],
) -> None:
    server, store, registry = endpoint
    status, body = await _http(server.port, _post("/learn/spam", mail()), mail())
    assert status == 200 and json.loads(body)["action"] == "spam"
    status, body = await _http(server.port, _post("/learn/ham", mail()), mail())
    assert json.loads(body)["previous"] == "spam"
    assert (await store.stats()).as_dict() == {"spam": 0, "ham": 1, "entries": 1}
    status, body = await _http(server.port, _post("/forget", mail()), mail())
    assert status == 200 and json.loads(body)["existed"] is True
    assert (await store.stats()).entries == 0
    value = registry.get_sample_value(
        "relay_feedback_recorded_total", {"action": "ham", "source": "http"}
    )
    assert value == 1


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token-wrong", TOKEN + "x", ""])
async def test_http_bad_token_is_401_counted_and_changes_nothing(
    endpoint: tuple[LearnServer, SqliteFeedback, CollectorRegistry], token: str | None
) -> None:
    server, store, registry = endpoint
    status, _ = await _http(server.port, _post("/learn/spam", mail(), token), mail())
    assert status == 401
    assert registry.get_sample_value("relay_feedback_auth_failures_total") == 1
    assert (await store.stats()).entries == 0


@pytest.mark.parametrize(
    ("head", "body", "status"),
    [
        (_post("/learn/spam", b"junk without header"), b"junk without header", 400),
        ("POST /learn/spam HTTP/1.1\r\nAuthorization: Bearer " + TOKEN + "\r\n\r\n", b"", 400),
        (
            "POST /learn/spam HTTP/1.1\r\nAuthorization: Bearer "
            + TOKEN
            + "\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"0\r\n\r\n",
            400,
        ),
        (
            _post("/learn/spam", b"", extra="").replace("Content-Length: 0", "Content-Length: x1"),
            b"",
            400,
        ),
        (_post("/learn/spam", b"x" * 3000), b"x" * 3000, 413),
        ("garbage\r\n\r\n", b"", 400),
        (_post("/learn/other", mail()), mail(), 404),
        ("GET /learn/spam HTTP/1.1\r\n\r\n", b"", 405),
    ],
)
async def test_http_malformed_requests_change_nothing(
    endpoint: tuple[LearnServer, SqliteFeedback, CollectorRegistry],
    head: str,
    body: bytes,
    status: int,
) -> None:
    server, store, _ = endpoint
    assert (await _http(server.port, head, body))[0] == status
    assert (await store.stats()).entries == 0


# -- quarantine release --------------------------------------------------------------------


def test_release_records_ham(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.delivery.quarantine import QuarantineStore
    from tests.test_quarantine import VERDICT, _config, message

    async def fill() -> str:
        return await QuarantineStore(tmp_path / "q", key=KEY).put(message(), VERDICT)

    qid = asyncio.run(fill())
    cfg = _config(tmp_path)
    assert main(["quarantine", "--config", str(cfg), "release", qid]) == 0
    assert "recorded as ham feedback" in capsys.readouterr().out
    assert stats(cfg, capsys) == {"spam": 0, "ham": 1, "entries": 1}
    row = sqlite3.connect(tmp_path / "state.sqlite3").execute("SELECT source FROM feedback")
    assert row.fetchone() == ("quarantine-release",)


def test_stdin_reads_one_bounded_message() -> None:
    from relay.feedback.intake import read_stdin

    assert read_stdin(io.BytesIO(b"x" * 11), 10)[1].__class__ is FeedbackRefused
    assert read_stdin(io.BytesIO(b"x" * 10), 10) == ("-", b"x" * 10)
