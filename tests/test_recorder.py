"""Facts only read; one recorder writes (pipeline/recorder.py), through the real relay.

- the state a run leaves behind does not depend on how early the policy stopped;
- the recorder runs exactly once per message, after the action, with its outcome;
- a recorder failure is logged and never changes the client's reply;
- `relay scan` leaves the configured state store byte-for-byte as it found it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.contracts import FactSource, Outcome
from relay.errors import StateError
from relay.facts import bulk
from relay.message import Message
from relay.pipeline.recorder import ALL, Record, Recorder
from relay.secretkey import SecretKey, load_key
from relay.state import SqliteState, StateStore
from relay.verdict import Verdict
from tests.support.relay import make_settings, running_relay, send

BODY = "\r\n".join(
    " ".join(f"word{(i + j) % 37} token{i % 11}" for j in range(6)) for i in range(20)
)
THRESHOLDS = "[policy.thresholds]\ntag = 5\nquarantine = 10\nreject = 15\n"
STATE_RULES = """
[[rule]]
name = "bulk"
when = "bulk_count > 1000"
score = 1
[[rule]]
name = "volume"
when = "sender_volume_24h > 100000"
score = 1
[[rule]]
name = "rate"
when = "connection_rate > 1000.0"
score = 1
"""
STOPS_EARLY = f"""
[policy]
name = "stops_early"
{THRESHOLDS}
[[rule]]
name = "refuse_everyone"
when = 'client_ip == "127.0.0.1"'
action = "reject"
reason = "Refused on a connection fact"
{STATE_RULES}
"""
READS_STATE = f"""
[policy]
name = "reads_state"
{THRESHOLDS}
{STATE_RULES}
"""
NO_STATE = f"""
[policy]
name = "no_state"
{THRESHOLDS}
[[rule]]
name = "many"
when = "recipient_count > 5"
score = 1
"""


def _message(n: int, sender: str, body: str, rcpts: Sequence[str]) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: note {n}\r\n"
        f"Message-ID: <m{n}@{sender.split('@')[1]}>\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n"
        f"{body}\r\n"
    ).encode()


MAIL: list[tuple[str, list[str], bytes]] = [
    ("alice@sender.test", ["bob@example.org"], _message(1, "alice@sender.test", BODY, ["bob"])),
    ("alice@sender.test", ["carol@example.org"], _message(2, "alice@sender.test", BODY, ["c"])),
    ("news@other.test", ["bob@example.org"], _message(3, "news@other.test", "other text", ["b"])),
    (
        "info@sender.test",
        ["dave@example.org", "erin@example.org"],
        _message(4, "info@sender.test", "Hi there, " + BODY, ["dave", "erin"]),
    ),
]


def _contents(path: Path) -> dict[str, Any]:
    """The store's records without their times (arrival times differ between runs); a
    connection is (ip, source port), so only the number of connections is compared."""
    out: dict[str, Any] = {}
    with contextlib.closing(sqlite3.connect(path)) as db:
        for key, member in db.execute("SELECT key, member FROM window_members"):
            out.setdefault(key, [])
            out[key].append("conn" if key.startswith("conn:") else member)
        out = {k: sorted(v) for k, v in out.items()}
        out["flags"] = sorted(k for (k,) in db.execute("SELECT key FROM flags"))
    return out


async def _run(
    tmp_path: Path, policy: str, key_file: Path | None = None
) -> tuple[list[int], dict[str, Any]]:
    (tmp_path / "policy.toml").write_text(policy)
    overrides: dict[str, dict[str, Any]] = {"policy": {"path": str(tmp_path / "policy.toml")}}
    if key_file is not None:  # runs compared record by record hash under one key
        overrides["security"] = {"key_file": str(key_file)}
    settings = make_settings(tmp_path, overrides)
    codes: list[int] = []
    async with running_relay(settings) as runtime:
        for sender, rcpts, data in MAIL:
            try:
                await send(runtime.port, rcpts, data, sender=sender)
                codes.append(250)
            except aiosmtplib.SMTPResponseException as exc:
                codes.append(exc.code)
    return codes, _contents(tmp_path / "state.sqlite3")


async def test_counts_do_not_depend_on_what_the_policy_read(tmp_path: Path) -> None:
    (tmp_path / "early").mkdir()
    (tmp_path / "reads").mkdir()
    key_file = tmp_path / "relay.key"
    early_codes, early = await _run(tmp_path / "early", STOPS_EARLY, key_file)
    read_codes, read = await _run(tmp_path / "reads", READS_STATE, key_file)
    assert early_codes == [550] * len(MAIL)  # decided on a T0 fact: never asked for counts
    assert read_codes == [250] * len(MAIL)  # read bulk_count, sender_volume_24h, rate
    assert early == read
    # Everything that arrived was recorded: 4 bands per body, 2 sender domains, 4 connections.
    bands = [k for k in read if k.startswith("bulk:")]
    assert 4 <= len(bands) <= 12
    assert len(read[bulk.volume_key("sender.test")]) == 4  # 1 + 1 + 2 recipients
    assert [len(v) for k, v in read.items() if k.startswith("conn:")] == [len(MAIL)]


class _Counting(Recorder):
    def __init__(self, inner: Recorder) -> None:
        super().__init__(inner.state, inner.psl, inner.networks, records=inner.records)
        self.calls: list[tuple[str, Outcome]] = []

    async def record(
        self,
        message: Message,
        facts: FactSource,
        verdict: Verdict,
        outcome: Outcome,
        only: Collection[Record] = ALL,
    ) -> None:
        self.calls.append((message.queue_id, outcome))
        await super().record(message, facts, verdict, outcome, only)


async def test_recorder_runs_once_per_message_after_the_action(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(
        f'[policy]\nname = "few"\n{THRESHOLDS}[[rule]]\nname = "many"\n'
        'when = "recipient_count > 1"\naction = "reject"\nreason = "Too many"\n'
        '[[rule]]\nname = "known"\nwhen = "known_correspondent"\nscore = -1\n' + STATE_RULES
    )
    settings = make_settings(
        tmp_path,
        {"policy": {"path": str(tmp_path / "policy.toml")}, "relay": {"networks": ["127.0.0.0/8"]}},
    )
    async with running_relay(settings) as runtime:
        assert runtime.pipeline.recorder is not None
        recorder = _Counting(runtime.pipeline.recorder)
        runtime.pipeline.recorder = recorder
        for sender, rcpts, data in MAIL:
            with contextlib.suppress(aiosmtplib.SMTPResponseException):
                await send(runtime.port, rcpts, data, sender=sender)
    assert [o for _, o in recorder.calls] == [Outcome.DELIVERED] * 3 + [Outcome.REJECTED]
    assert len({q for q, _ in recorder.calls}) == len(MAIL)
    # Correspondents: only from mail of ours that was delivered.
    key = load_key(settings.security.key_file)  # the relay's: its hashes are keyed
    store = await SqliteState(tmp_path / "state.sqlite3", key=key, readonly=True).open()
    try:
        now = time.time()  # the relay stamped arrivals with the clock; pairs last a year
        pair = bulk.correspondent_key
        assert await store.seen(pair(store, "alice@sender.test", "bob@example.org"), now)
        assert await store.seen(pair(store, "news@other.test", "bob@example.org"), now)
        refused = pair(store, "info@sender.test", "dave@example.org")
        assert not await store.seen(refused, now)
        assert await store.count_window_many(bulk.volume_key("sender.test"), [], 1e10, now) == 4
    finally:
        await store.close()


async def test_a_relay_whose_policies_read_no_counts_records_none(tmp_path: Path) -> None:
    """Which records are kept follows from the loaded policies (their rules and the
    facts those depend on), never from how far evaluation went: a policy that reads no
    state-backed fact costs no body decoding and leaves the store empty."""
    codes, contents = await _run(tmp_path, NO_STATE)
    assert codes == [250] * len(MAIL)
    assert contents == {"flags": []}


class _Broken(StateStore):
    async def incr_windows(
        self, keys: Sequence[str], members: Sequence[str], window: float, now: float
    ) -> list[int]:
        raise StateError("disk full")

    async def add(self, key: str, ttl: float | None = None, *, now: float) -> None:
        raise StateError("disk full")


async def test_a_recorder_failure_never_changes_the_reply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "policy.toml").write_text(
        f'[policy]\nname = "counts"\n{THRESHOLDS}[[rule]]\nname = "known"\n'
        'when = "known_correspondent"\nscore = -1\n' + STATE_RULES
    )
    settings = make_settings(
        tmp_path,
        {"policy": {"path": str(tmp_path / "policy.toml")}, "relay": {"networks": ["127.0.0.0/8"]}},
    )
    async with running_relay(settings) as runtime:
        assert runtime.pipeline.recorder is not None
        runtime.pipeline.recorder.state = _Broken(SecretKey.generate())
        sender, rcpts, data = MAIL[0]
        with caplog.at_level(logging.WARNING, logger="relay.recorder"):
            replies, _ = await send(runtime.port, rcpts, data, sender=sender)
    assert all(r.code == 250 for r in replies.values())
    failed = [r.getMessage() for r in caplog.records if r.name == "relay.recorder"]
    assert {m.split()[1] for m in failed} == {
        "record=bulk",
        "record=volume",
        "record=connection",
        "record=correspondents",
    }
    assert all("StateError: disk full" in m for m in failed)
    assert not any("word1" in m for m in failed)  # never the body


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_scan_leaves_the_live_state_store_untouched(tmp_path: Path) -> None:
    state = tmp_path / "var" / "state.sqlite3"
    now = 1_795_435_200.0  # 2026-11-23T10:00:00Z, the scan's --time
    key_file = tmp_path / "relay.key"  # the relay's key, outside the state's folder
    store = await SqliteState(state, key=load_key(key_file, create=True)).open()
    seeded = ["earlier-1", "earlier-2"]
    await store.incr_window_many(bulk.volume_key("sender.test"), seeded, 3600, now - 60)
    await store.close()
    before = _files(state.parent)
    assert list(before) == ["state.sqlite3"]
    eml = tmp_path / "m.eml"
    eml.write_bytes(MAIL[0][2])
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        '[model]\nenabled = false\n[policy]\npath = ""\n[auth]\nenabled = false\n'
        f"[state]\npath = {json.dumps(str(state))}\n"
        f"[security]\nkey_file = {json.dumps(str(key_file))}\n"
    )
    names = "sender_volume_24h,bulk_count,connection_rate,bulk_sender,known_correspondent"
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "relay.cli", "scan", str(eml), "--config", str(cfg),
             "--rcpt", "bob@example.org", "--time", "2026-11-23T10:00:00Z", "--facts", names],
            capture_output=True, timeout=60, check=True, cwd=tmp_path,
        )  # fmt: skip
        facts = json.loads(out.stdout)["facts"]
        # The live counts, with this message counted as if it had arrived (once per scan).
        assert facts["sender_volume_24h"] == 3
        assert facts["bulk_count"] == 1
        assert facts["connection_rate"] == 1.0
        assert _files(state.parent) == before
