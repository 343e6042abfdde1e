"""Quarantine store: exact bytes kept with verdict and envelope; list/show/release/delete."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.cli.quarantine import release_check
from relay.config import RelaySettings, Settings
from relay.contracts import Transaction, XForward
from relay.delivery.memory import MemoryTransport
from relay.delivery.quarantine import QuarantineStore
from relay.delivery.smtp import SmtpTransport
from relay.errors import QuarantineError
from relay.message import Envelope, Message, Peer
from relay.reply import Reply
from relay.verdict import Action, RuleHit, Verdict
from tests.support.relay import sink_server

RAW = (
    b"From: Spammer <s@spam.test>\r\nTo: bob@example.org\r\nSubject: win\r\n"
    b"X-Odd:  spacing kept \t\r\n\r\nbody line\r\n\xff raw 8-bit byte\r\n"
)
RECEIVED_AT = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC
LOCAL_ONLY = release_check(Settings(relay=RelaySettings(domains=("example.org",))))


def message(rcpts: tuple[str, ...] = ("bob@example.org", "carol@example.org")) -> Message:
    return Message(
        raw=RAW,
        envelope=Envelope("s@spam.test", rcpts, ("SIZE=120", "BODY=8BITMIME")),
        peer=Peer(ip="192.0.2.7", helo="spam.test"),
        received_at=RECEIVED_AT,
    )


VERDICT = Verdict(
    action=Action.QUARANTINE,
    score=11.5,
    policy="default",
    hits=(RuleHit("classifier_spam_likely", 9.0, "Classifier: likely spam"),),
)


async def test_put_keeps_exact_bytes_verdict_and_envelope(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    qid = await store.put(message(), VERDICT)
    entry, raw = await store.show(qid)
    assert raw == RAW
    assert (tmp_path / "q" / qid / "message.eml").read_bytes() == RAW
    assert entry.mail_from == "s@spam.test"
    assert entry.rcpt_to == ("bob@example.org", "carol@example.org")
    assert entry.peer_ip == "192.0.2.7"
    assert entry.action == "quarantine" and entry.score == 11.5
    assert entry.rules == ("classifier_spam_likely",)
    meta = json.loads((tmp_path / "q" / qid / "meta.json").read_text())
    assert meta["verdict"] == VERDICT.to_dict()
    # private files; no half-written entry left behind
    mode = (tmp_path / "q" / qid / "message.eml").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert list((tmp_path / "q" / ".tmp").iterdir()) == []


async def test_list_orders_entries_and_skips_damaged(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    ids = [await store.put(message(), VERDICT) for _ in range(3)]
    (tmp_path / "junk").mkdir()  # not an entry
    assert [e.id for e in await store.list()] == ids
    (tmp_path / ids[1] / "meta.json").write_text("{broken")
    assert [e.id for e in await store.list()] == [ids[0], ids[2]]
    with pytest.raises(QuarantineError, match="unreadable"):
        await store.show(ids[1])


async def test_concurrent_puts_get_distinct_ids(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    ids = await asyncio.gather(*(store.put(message(), VERDICT) for _ in range(20)))
    assert len(set(ids)) == 20
    assert len(await store.list()) == 20


async def test_modified_message_is_detected(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    (tmp_path / qid / "message.eml").write_bytes(RAW + b"appended")
    with pytest.raises(QuarantineError, match="sha256"):
        await store.show(qid)


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 65, ".tmp"])
async def test_ids_cannot_escape_the_store(tmp_path: Path, bad: str) -> None:
    store = QuarantineStore(tmp_path / "q")
    with pytest.raises(QuarantineError):
        await store.show(bad)
    with pytest.raises(QuarantineError):
        await store.delete(bad)


async def test_delete(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    await store.delete(qid)
    assert await store.list() == []
    assert not (tmp_path / qid).exists()
    with pytest.raises(QuarantineError, match="no quarantined message"):
        await store.delete(qid)


async def test_release_delivers_exact_bytes_and_removes(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    transport = MemoryTransport()
    result = await store.release(qid, transport, check=LOCAL_ONLY)
    assert result.removed and result.reply is not None and result.reply.ok
    assert [(r, a.code) for r, a in result.recipients] == [
        ("bob@example.org", 250),
        ("carol@example.org", 250),
    ]
    assert transport.delivered == [("s@spam.test", ("bob@example.org", "carol@example.org"), RAW)]
    assert await store.list() == []


class _Timed:
    """A transaction that notes each message's received_at, then passes it on."""

    def __init__(self, inner: Transaction, times: list[float]) -> None:
        self.inner, self.times = inner, times

    async def add_recipient(self, address: str) -> Reply:
        return await self.inner.add_recipient(address)

    async def send(self, message: Message) -> Reply:
        self.times.append(message.received_at)
        return await self.inner.send(message)

    async def abort(self) -> None:
        await self.inner.abort()


@dataclass
class _TimedTransport(MemoryTransport):
    times: list[float] = field(default_factory=list)

    async def begin(
        self, mail_from: str, options: Sequence[str] = (), xforward: XForward | None = None
    ) -> Transaction:
        return _Timed(await super().begin(mail_from, options, xforward), self.times)


async def test_release_keeps_the_arrival_time(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    assert (await store.show(qid))[0].received_at == RECEIVED_AT
    transport = _TimedTransport()
    assert (await store.release(qid, transport, check=LOCAL_ONLY)).removed
    assert transport.times == [RECEIVED_AT]  # the stored time, not the time of release


async def test_partial_release_keeps_refused_recipients(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    transport = MemoryTransport(refuse=frozenset({"carol@example.org"}))
    result = await store.release(qid, transport, check=LOCAL_ONLY)
    assert not result.removed
    assert dict((r, a.code) for r, a in result.recipients) == {
        "bob@example.org": 250,
        "carol@example.org": 550,
    }
    assert transport.delivered[0][1] == ("bob@example.org",)
    entry, raw = await store.show(qid)
    assert entry.rcpt_to == ("carol@example.org",) and raw == RAW

    # nobody takes it: nothing sent, entry kept as it was
    result = await store.release(qid, transport, check=LOCAL_ONLY)
    assert result.reply is None and not result.removed
    assert len(transport.delivered) == 1


async def test_release_over_smtp_to_a_real_downstream(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    async with sink_server(refuse=frozenset({"carol@example.org"})) as sink:
        transport = SmtpTransport("127.0.0.1", sink.port, hostname="relay.test", timeout=5)
        try:
            result = await store.release(qid, transport, check=LOCAL_ONLY)
        finally:
            await transport.close()
    assert result.reply is not None and result.reply.ok
    assert [m.data for m in sink.messages] == [RAW]
    assert sink.messages[0].rcpt_tos == ("bob@example.org",)
    assert dict((r, a.code) for r, a in result.recipients)["carol@example.org"] == 550
    assert (await store.show(qid))[0].rcpt_to == ("carol@example.org",)


async def test_downstream_failure_keeps_entry(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    async with sink_server(mode="tempfail") as sink:
        transport = SmtpTransport("127.0.0.1", sink.port, hostname="relay.test", timeout=5)
        try:
            result = await store.release(qid, transport, check=LOCAL_ONLY)
        finally:
            await transport.close()
    assert result.reply is not None and result.reply.code == 451
    assert not result.removed
    assert [e.id for e in await store.list()] == [qid]


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[quarantine]\npath = "{tmp_path / "q"}"\n'
        f'[delivery]\nmode = "maildir"\nmaildir = "{tmp_path / "maildir"}"\n'
        '[relay]\ndomains = ["example.org"]\nnetworks = ["0.0.0.0/0"]\n'
    )
    return config


def test_cli_list_show_release_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def fill() -> list[str]:
        store = QuarantineStore(tmp_path / "q")
        return [await store.put(message(), VERDICT) for _ in range(2)]

    first, second = asyncio.run(fill())
    config = ["quarantine", "--config", str(_config(tmp_path))]

    assert main([*config, "list"]) == 0
    out = capsys.readouterr().out
    assert first in out and second in out and "classifier_spam_likely" in out
    assert "2 message(s)" in out

    assert main([*config, "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [first, second]

    assert main([*config, "show", first]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verdict"]["action"] == "quarantine"
    assert shown["envelope"]["mail_from"] == "s@spam.test"

    assert main([*config, "release", first]) == 0
    out = capsys.readouterr().out
    assert "bob@example.org: 250" in out and "released and removed" in out
    delivered = list((tmp_path / "maildir" / "new").iterdir())
    assert len(delivered) == 1 and delivered[0].read_bytes().endswith(RAW)

    assert main([*config, "delete", second]) == 0
    assert main([*config, "show", second]) == 2
    assert "no quarantined message" in capsys.readouterr().err
    assert main([*config, "list"]) == 0
    assert "0 message(s)" in capsys.readouterr().out


def test_sweep_removes_only_stale_half_written_entries(tmp_path: Path) -> None:
    import os

    from relay.delivery.quarantine import QuarantineStore

    store = QuarantineStore(tmp_path / "q")
    old = tmp_path / "q" / ".tmp" / "old-entry"
    fresh = tmp_path / "q" / ".tmp" / "fresh-entry"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "message.eml").write_bytes(b"x")
    # Two hours older than the fresh one, on the file system's clock (the sweep's too).
    two_hours_ago = fresh.stat().st_mtime - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert store.sweep_stale() == 1
    assert not old.exists()
    assert fresh.exists()  # another process may still be writing it
    assert [p.name for p in (tmp_path / "q" / ".tmp").iterdir()] == ["fresh-entry"]


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "/", "/../x"])
async def test_id_must_match_in_full(tmp_path: Path, suffix: str) -> None:
    """Issue 15: "^...$" let an id with a trailing newline through; ids match in full."""
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(), VERDICT)
    for op in (store.show, store.delete):
        with pytest.raises(QuarantineError, match="invalid quarantine id"):
            await op(qid + suffix)
    assert [e.id for e in await store.list()] == [qid]


async def test_release_rechecks_relay_control_on_edited_meta(tmp_path: Path) -> None:
    """Issue 15: an edited meta.json adding an outside recipient must not deliver to it."""
    store = QuarantineStore(tmp_path)
    qid = await store.put(message(("bob@example.org",)), VERDICT)
    meta_path = tmp_path / qid / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["envelope"]["rcpt_to"].append("mallory@outside.test")
    meta_path.write_text(json.dumps(meta))
    transport = MemoryTransport()
    result = await store.release(qid, transport, check=LOCAL_ONLY)
    assert transport.delivered == [("s@spam.test", ("bob@example.org",), RAW)]
    answers = dict((r, a) for r, a in result.recipients)
    assert answers["bob@example.org"].code == 250
    assert (answers["mallory@outside.test"].code, answers["mallory@outside.test"].status) == (
        550,
        "5.7.1",
    )
    assert not result.removed  # the refused recipient stays, for the operator to see
    assert (await store.show(qid))[0].rcpt_to == ("mallory@outside.test",)
    # Only outside recipients left: nothing is sent at all.
    result = await store.release(qid, transport, check=LOCAL_ONLY)
    assert result.reply is None and not result.removed and len(transport.delivered) == 1


def test_cli_release_ignores_networks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """At release the client is unknown: [relay] networks (here everyone) grant nothing."""

    async def fill() -> str:
        return await QuarantineStore(tmp_path / "q").put(message(("x@outside.test",)), VERDICT)

    qid = asyncio.run(fill())
    config = ["quarantine", "--config", str(_config(tmp_path))]
    assert main([*config, "release", qid]) == 1
    out = capsys.readouterr().out
    assert "x@outside.test: 550 5.7.1" in out and "kept in quarantine" in out
    assert not any(p.is_file() for p in (tmp_path / "maildir").rglob("*"))
