"""`relay scan` reads learned reputation as the relay does, and writes nothing: the
feedback store opened read-only (``SqliteFeedback(readonly=True)``)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.config import FeedbackSettings, StateSettings
from relay.errors import StateError
from relay.feedback.reputation import Identity
from relay.feedback.store import SqliteFeedback, open_feedback
from relay.secretkey import SecretKey
from tests.support.feedback import NOW, entry

KEY = SecretKey(bytes(range(32)))
BAD = Identity("link", "bad.example")
SETTINGS = FeedbackSettings(per_reporter_daily=10**6)


async def _reported(path: Path, n: int = 5) -> None:
    store = await open_feedback(StateSettings(path=path), SETTINGS, KEY)
    try:
        for i in range(n):
            await store.record(entry(i, "spam", f"r{i}"), now=NOW, identities=(BAD,))
    finally:
        await store.close()


def _files(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.parent.iterdir())
        if p.name.startswith(path.name)
    }


async def test_a_read_only_store_reads_what_was_learned_and_writes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite3"
    await _reported(path)
    before = _files(path)
    reader = await SqliteFeedback(path, key=KEY, settings=SETTINGS, readonly=True).open()
    try:
        standing = (await reader.reputation([BAD], now=NOW))[BAD]
        assert standing.spam == pytest.approx(5.0) and standing.ham == 0.0
        with pytest.raises(StateError, match="read-only"):
            await reader.record(entry(99, "ham"), now=NOW, identities=(BAD,))
        with pytest.raises(StateError, match="read-only"):
            await reader.forget(entry(0).digest, "r0", now=NOW)
    finally:
        await reader.close()
    assert _files(path) == before  # no -wal/-shm of the reader's, not a byte changed


async def test_a_state_file_without_feedback_tables_reads_as_empty_and_stays_so(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE unrelated (x INTEGER)")
    db.commit()
    db.close()
    before = _files(path)
    for target in (path, tmp_path / "missing" / "state.sqlite3"):
        reader = await SqliteFeedback(target, key=KEY, settings=SETTINGS, readonly=True).open()
        try:
            standing = (await reader.reputation([BAD], now=NOW))[BAD]
            assert (standing.spam, standing.ham) == (0.0, 0.0)
        finally:
            await reader.close()
    assert _files(path) == before
    assert not (tmp_path / "missing").exists()


async def test_scan_shows_the_link_reputation_the_relay_would_see(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "state.sqlite3"
    await _reported(path)
    before = _files(path)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        '[model]\nenabled = false\n[policy]\npath = ""\n[auth]\nenabled = false\n'
        f'[state]\npath = "{path}"\n'
    )
    eml = tmp_path / "m.eml"
    eml.write_bytes(
        b"From: a@sender.test\r\nTo: b@example.org\r\nSubject: offer\r\n\r\n"
        b"click https://www.bad.example/claim now\r\n"
    )
    when = datetime.fromtimestamp(NOW, UTC).isoformat()
    facts = "link_reputation,link_reputation_reports"
    args = ["scan", str(eml), "--config", str(cfg), "--facts", facts, "--time", when]
    assert await _main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["facts"] == {"link_reputation": 1.0, "link_reputation_reports": 5}
    assert _files(path) == before


async def _main(args: list[str]) -> int:
    # `relay scan` runs its own event loop: off this test's loop, in a thread.
    import asyncio

    return await asyncio.to_thread(main, args)
