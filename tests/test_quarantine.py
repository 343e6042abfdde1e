"""Quarantine store: exact bytes kept with verdict and envelope; list/show/release/delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from relay.secretkey import SecretKey, load_key
from relay.verdict import Action, RuleHit, Verdict
from tests.support.relay import sink_server

RAW = (
    b"From: Spammer <s@spam.test>\r\nTo: bob@example.org\r\nSubject: win\r\n"
    b"X-Odd:  spacing kept \t\r\n\r\nbody line\r\n\xff raw 8-bit byte\r\n"
)
RECEIVED_AT = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC
LOCAL_ONLY = release_check(Settings(relay=RelaySettings(domains=("example.org",))))
KEY = SecretKey(bytes(range(32)))  # the relay's secret key in these tests


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
    store = QuarantineStore(tmp_path / "q", key=KEY)
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
    store = QuarantineStore(tmp_path, key=KEY)
    ids = [await store.put(message(), VERDICT) for _ in range(3)]
    (tmp_path / "junk").mkdir()  # not an entry
    assert [e.id for e in (await store.list()).entries] == ids
    (tmp_path / ids[1] / "meta.json").write_text("{broken")
    listing = await store.list()
    assert [e.id for e in listing.entries] == [ids[0], ids[2]]
    assert [qid for qid, _ in listing.refused] == [ids[1]]  # named, never hidden
    with pytest.raises(QuarantineError, match="unreadable"):
        await store.show(ids[1])


async def test_concurrent_puts_get_distinct_ids(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path, key=KEY)
    ids = await asyncio.gather(*(store.put(message(), VERDICT) for _ in range(20)))
    assert len(set(ids)) == 20
    assert len((await store.list()).entries) == 20


async def test_modified_message_is_detected(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    (tmp_path / qid / "message.eml").write_bytes(RAW + b"appended")
    with pytest.raises(QuarantineError, match="sha256"):
        await store.show(qid)


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 65, ".tmp"])
async def test_ids_cannot_escape_the_store(tmp_path: Path, bad: str) -> None:
    store = QuarantineStore(tmp_path / "q", key=KEY)
    with pytest.raises(QuarantineError):
        await store.show(bad)
    with pytest.raises(QuarantineError):
        await store.delete(bad)


async def test_delete(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    await store.delete(qid)
    assert (await store.list()).entries == ()
    assert not (tmp_path / qid).exists()
    with pytest.raises(QuarantineError, match="no quarantined message"):
        await store.delete(qid)


async def test_release_delivers_exact_bytes_and_removes(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    transport = MemoryTransport()
    result = await store.release(qid, transport, check=LOCAL_ONLY)
    assert result.removed and result.reply is not None and result.reply.ok
    assert [(r, a.code) for r, a in result.recipients] == [
        ("bob@example.org", 250),
        ("carol@example.org", 250),
    ]
    assert transport.delivered == [("s@spam.test", ("bob@example.org", "carol@example.org"), RAW)]
    assert (await store.list()).entries == ()


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
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    assert (await store.show(qid))[0].received_at == RECEIVED_AT
    transport = _TimedTransport()
    assert (await store.release(qid, transport, check=LOCAL_ONLY)).removed
    assert transport.times == [RECEIVED_AT]  # the stored time, not the time of release


async def test_partial_release_keeps_refused_recipients(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path, key=KEY)
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
    store = QuarantineStore(tmp_path, key=KEY)
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
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    async with sink_server(mode="tempfail") as sink:
        transport = SmtpTransport("127.0.0.1", sink.port, hostname="relay.test", timeout=5)
        try:
            result = await store.release(qid, transport, check=LOCAL_ONLY)
        finally:
            await transport.close()
    assert result.reply is not None and result.reply.code == 451
    assert not result.removed
    assert [e.id for e in (await store.list()).entries] == [qid]


def _config(tmp_path: Path) -> Path:
    key_file = tmp_path / "relay.key"
    if not key_file.exists():
        key_file.write_bytes(KEY.material)
        key_file.chmod(0o600)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[quarantine]\npath = "{tmp_path / "q"}"\n'
        f'[delivery]\nmode = "maildir"\nmaildir = "{tmp_path / "maildir"}"\n'
        '[relay]\ndomains = ["example.org"]\nnetworks = ["0.0.0.0/0"]\n'
        f'[security]\nkey_file = "{key_file}"\n'
        f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n'  # release records ham feedback
    )
    return config


def test_cli_list_show_release_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def fill() -> list[str]:
        store = QuarantineStore(tmp_path / "q", key=KEY)
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

    store = QuarantineStore(tmp_path / "q", key=KEY)
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
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    for op in (store.show, store.delete):
        with pytest.raises(QuarantineError, match="invalid quarantine id"):
            await op(qid + suffix)
    assert [e.id for e in (await store.list()).entries] == [qid]


async def test_release_rechecks_relay_control_on_sealed_entries(tmp_path: Path) -> None:
    """Issue 15: even a sealed entry never delivers outside [relay] domains (one held
    from a client in `networks`, say): the client is unknown at release time."""
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(("bob@example.org", "mallory@outside.test")), VERDICT)
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
        return await QuarantineStore(tmp_path / "q", key=KEY).put(
            message(("x@outside.test",)), VERDICT
        )

    qid = asyncio.run(fill())
    config = ["quarantine", "--config", str(_config(tmp_path))]
    assert main([*config, "release", qid]) == 1
    out = capsys.readouterr().out
    assert "x@outside.test: 550 5.7.1" in out and "kept in quarantine" in out
    assert not any(p.is_file() for p in (tmp_path / "maildir").rglob("*"))


def _snapshot(entry: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir())}


def _edit_meta(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=1))


async def test_edited_recipients_are_refused_and_nothing_is_delivered(tmp_path: Path) -> None:
    """Issue 15, finding 4: an edited rcpt_to (here to another local mailbox, which relay
    control allows) fails the seal: release sends nothing and leaves the entry as it is."""
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(("bob@example.org",)), VERDICT)
    _edit_meta(
        tmp_path / qid / "meta.json", lambda m: m["envelope"].update(rcpt_to=["eve@example.org"])
    )
    before = _snapshot(tmp_path / qid)
    transport = MemoryTransport()
    with pytest.raises(QuarantineError, match="failed its seal check"):
        await store.release(qid, transport, check=LOCAL_ONLY)
    assert transport.delivered == []
    with pytest.raises(QuarantineError, match="failed its seal check"):
        await store.show(qid)
    listing = await store.list()
    assert listing.entries == () and [i for i, _ in listing.refused] == [qid]
    assert _snapshot(tmp_path / qid) == before  # kept untouched, for the operator


@pytest.mark.parametrize("digest_too", [False, True])
async def test_edited_message_bytes_are_refused(tmp_path: Path, digest_too: bool) -> None:
    """The seal covers the sha256 of message.eml: editing the bytes (and, to hide it,
    the digest in meta.json) is refused before anything is sent."""
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    forged = RAW.replace(b"body line", b"click here")
    (tmp_path / qid / "message.eml").write_bytes(forged)
    if digest_too:
        digest = hashlib.sha256(forged).hexdigest()
        _edit_meta(tmp_path / qid / "meta.json", lambda m: m.update(sha256=digest))
    transport = MemoryTransport()
    with pytest.raises(QuarantineError, match="seal check" if digest_too else "sha256"):
        await store.release(qid, transport, check=LOCAL_ONLY)
    assert transport.delivered == []
    assert (tmp_path / qid / "message.eml").read_bytes() == forged


async def test_an_entry_sealed_under_another_key_is_refused(tmp_path: Path) -> None:
    qid = await QuarantineStore(tmp_path, key=SecretKey.generate()).put(message(), VERDICT)
    with pytest.raises(QuarantineError, match="another key"):
        await QuarantineStore(tmp_path, key=KEY).show(qid)


async def test_a_sealed_entry_moved_to_another_id_is_refused(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path, key=KEY)
    qid = await store.put(message(), VERDICT)
    (tmp_path / qid).rename(tmp_path / "moved")
    with pytest.raises(QuarantineError, match="invalid metadata"):
        await store.show("moved")


async def test_unsealed_entries_from_an_older_version_are_refused_until_resealed(
    tmp_path: Path,
) -> None:
    """Format 1 had no seal: never trusted silently. The operator reads meta.json and
    vouches for it with reseal (its bytes must still match its sha256)."""
    store = QuarantineStore(tmp_path, key=KEY)
    old, damaged = [await store.put(message(), VERDICT) for _ in range(2)]
    for qid in (old, damaged):
        _edit_meta(
            tmp_path / qid / "meta.json", lambda m: (m.pop("hmac_sha256"), m.update(version=1))
        )
    transport = MemoryTransport()
    with pytest.raises(QuarantineError, match=f"not sealed.*relay quarantine reseal {old}"):
        await store.release(old, transport, check=LOCAL_ONLY)
    assert transport.delivered == []
    assert sorted(i for i, _ in (await store.list()).refused) == sorted([old, damaged])

    assert (await store.reseal(old)).rcpt_to == ("bob@example.org", "carol@example.org")
    assert json.loads((tmp_path / old / "meta.json").read_text())["version"] == 2
    assert (await store.release(old, transport, check=LOCAL_ONLY)).removed

    (tmp_path / damaged / "message.eml").write_bytes(b"other bytes")
    with pytest.raises(QuarantineError, match="sha256"):
        await store.reseal(damaged)
    with pytest.raises(QuarantineError, match="not sealed"):
        await store.show(damaged)


def test_cli_refuses_a_tampered_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """list names it on stderr and exits 1; show and release exit 2 with the reason;
    nothing is delivered and the entry stays as it is."""

    async def fill() -> tuple[str, str]:
        store = QuarantineStore(tmp_path / "q", key=KEY)
        return await store.put(message(), VERDICT), await store.put(message(), VERDICT)

    good, bad = asyncio.run(fill())
    _edit_meta(tmp_path / "q" / bad / "meta.json", lambda m: m.update(mail_from="ceo@example.org"))
    before = _snapshot(tmp_path / "q" / bad)
    config = ["quarantine", "--config", str(_config(tmp_path))]
    assert main([*config, "list"]) == 1
    captured = capsys.readouterr()
    assert good in captured.out and bad not in captured.out and "1 message(s)" in captured.out
    assert bad in captured.err and "failed its seal check" in captured.err
    for command in ("show", "release"):
        assert main([*config, command, bad]) == 2
        assert "failed its seal check" in capsys.readouterr().err
    assert not any(p.is_file() for p in (tmp_path / "maildir").rglob("*"))
    assert _snapshot(tmp_path / "q" / bad) == before


def test_cli_needs_the_key_file_and_never_creates_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    (tmp_path / "relay.key").unlink()
    assert main(["quarantine", "--config", str(config), "list"]) == 2
    assert "key file does not exist" in capsys.readouterr().err
    assert not (tmp_path / "relay.key").exists()


def test_cli_reseal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qid = asyncio.run(
        QuarantineStore(tmp_path / "q", key=SecretKey.generate()).put(message(), VERDICT)
    )
    config = ["quarantine", "--config", str(_config(tmp_path))]
    assert main([*config, "show", qid]) == 2  # sealed under a key since replaced
    capsys.readouterr()
    assert main([*config, "reseal", qid]) == 0
    out = capsys.readouterr().out
    assert "bob@example.org" in out and f"resealed {qid}" in out
    assert main([*config, "show", qid]) == 0


async def test_the_sealing_key_comes_from_the_key_file(tmp_path: Path) -> None:
    """Two stores over one folder with the key loaded from one file agree."""
    key_file = tmp_path / "relay.key"
    qid = await QuarantineStore(tmp_path / "q", key=load_key(key_file, create=True)).put(
        message(), VERDICT
    )
    entry, raw = await QuarantineStore(tmp_path / "q", key=load_key(key_file)).show(qid)
    assert entry.id == qid and raw == RAW
