"""The milter door over loopback against the real relay (pipeline, policy, quarantine),
with the MTA's side played by tests/support/miltermta.py; the codec and the header
edits on their own; malformed, truncated, oversized and stalled input. The same door
behind a real Postfix: tests/test_milter_postfix.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.app import Runtime
from relay.config import Settings, settings_from_mapping
from relay.delivery.quarantine import QuarantineStore
from relay.errors import ConfigError
from relay.milter import wire
from relay.milter.edits import header_edits, milter_value
from relay.secretkey import load_key
from tests.support.miltermta import MiltMta, Result, header_action, pkt
from tests.support.relay import make_settings, running_relay

POLICY = """
[policy]
name = "milter-e2e"
mode = "{mode}"

[policy.thresholds]
tag = 5
quarantine = 10
reject = 15

[[rule]]
name = "tag_me"
when = 'mail_from_domain == "tag.test"'
score = 6
reason = "tag sender"

[[rule]]
name = "quarantine_me"
when = 'mail_from_domain == "quarantine.test"'
action = "quarantine"
reason = "quarantine sender"

[[rule]]
name = "reject_me"
when = 'mail_from_domain == "reject.test"'
action = "reject"
reason = "Sender domain refused by the milter policy"

[[rule]]
name = "tempfail_me"
when = 'mail_from_domain == "tempfail.test"'
action = "tempfail"
reason = "Try this one later"

[[rule]]
name = "logged_in"
when = 'smtp_authenticated && mail_from_domain == "auth.test"'
action = "reject"
reason = "seen as logged in"

[[rule]]
name = "client_seen"
when = 'client_ip == "192.0.2.66" && helo == "bad.helo.test" && tls_version == "TLSv1.3"'
action = "reject"
reason = "client facts from the MTA's macros"
"""


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with _running(tmp_path, "enforce") as runtime:
        yield runtime


def _running(
    tmp_path: Path, mode: str, **milter: object
) -> contextlib.AbstractAsyncContextManager[Runtime]:
    policy = tmp_path / f"policy-{mode}.toml"
    policy.write_text(POLICY.format(mode=mode))
    settings = make_settings(
        tmp_path,
        {
            "policy": {"path": str(policy)},
            "milter": {"listen": "127.0.0.1:0", "idle_timeout": 30, **milter},
        },
    )
    return running_relay(settings)


def _small_messages(tmp_path: Path) -> Settings:
    """The milter door with a 100 KB message limit."""
    return make_settings(
        tmp_path,
        {
            "milter": {"listen": "127.0.0.1:0"},
            "smtp": {"max_message_size": 100_000, "large_message_memory": 200_000},
        },
    )


async def _session(runtime: Runtime) -> MiltMta:
    assert runtime.milter is not None
    mta = await MiltMta.connect(runtime.milter.address)
    await mta.negotiate()
    return mta


def _apply(fields: list[tuple[bytes, bytes]], result: Result) -> list[tuple[bytes, bytes]]:
    """What an MTA does with the edits: deletions by name and occurrence, insertions."""
    out = list(fields)
    for letter, data in result.edits:
        index, name, value = header_action(data)
        if letter == b"m":
            assert value == b"", "we only ever delete"
            seen = 0
            for i, (n, _) in enumerate(out):
                if n.decode().lower() == name.lower():
                    seen += 1
                    if seen == index:
                        del out[i]
                        break
            else:
                raise AssertionError(f"no {name} #{index}")
        else:
            assert letter == b"i" and index == 0
            out.insert(0, (name.encode(), value))
    return out


# --- end to end over loopback ----------------------------------------------------------


async def test_tag_adds_our_headers_and_removes_the_senders(relay: Runtime) -> None:
    mta = await _session(relay)
    headers = (
        (b"From", b" alice@tag.test"),
        (b"X-Spam-Flag", b" NO"),
        (b"Subject", b" hi"),
        (b"x-spam-status", b" forged"),
        (b"X-Spam-Flag", b" NO again"),
    )
    result = await mta.message(headers=headers)
    assert result.final == b"c"
    after = _apply(list(headers), result)
    names = [n for n, _ in after]
    assert names[:3] == [b"X-Spam-Score", b"X-Spam-Status", b"X-Spam-Rules"]
    assert after[3:] == [(b"From", b" alice@tag.test"), (b"Subject", b" hi")]
    assert after[0][1] == b" 6.00"
    assert b"action=tag policy=milter-e2e" in after[1][1]
    assert not any(n == b"Received" for n in names), "the MTA is the hop, not us"
    await mta.close()


async def test_accept_changes_nothing_but_sender_spam_fields(relay: Runtime) -> None:
    mta = await _session(relay)
    result = await mta.message(mail_from="<ann@plain.test>")
    assert (result.final, result.edits) == (b"c", [])
    result = await mta.message(
        mail_from="<ann@plain.test>",
        headers=((b"From", b" a@plain.test"), (b"X-Spam-Level", b" *")),
    )
    assert result.final == b"c"
    assert [(letter, header_action(d)) for letter, d in result.edits] == [
        (b"m", (1, "X-Spam-Level", b""))
    ]
    await mta.close()


@pytest.mark.parametrize(
    ("sender", "reply"),
    [
        ("<x@reject.test>", "550 5.7.1 Sender domain refused by the milter policy"),
        ("<x@tempfail.test>", "451 4.7.1 Try this one later"),
    ],
)
async def test_refusals_become_the_rules_reply(relay: Runtime, sender: str, reply: str) -> None:
    mta = await _session(relay)
    result = await mta.message(mail_from=sender)
    assert (result.final, result.reply) == (b"y", reply)
    # The session goes on: the next message on the same connection is judged afresh.
    assert (await mta.message()).final == b"c"
    await mta.close()


async def test_quarantine_keeps_the_exact_message_and_discards(
    relay: Runtime, tmp_path: Path
) -> None:
    mta = await _session(relay)
    headers = (
        (b"From", b" q@quarantine.test"),
        (b"Subject", b" caf\xe9 8-bit\n\tfolded line"),  # raw 8-bit and an LF fold
    )
    body = b"line one\r\nline two\r\n"
    result = await mta.message(mail_from="<q@quarantine.test>", headers=headers, body=body)
    assert result.final == b"d", "kept in our store: the MTA must not deliver it"
    store = QuarantineStore(tmp_path / "quarantine", key=load_key(tmp_path / "relay.key"))
    listing = await store.list()
    assert len(listing.entries) == 1
    entry, raw = await store.show(listing.entries[0].id)
    assert raw == (
        b"From: q@quarantine.test\r\nSubject: caf\xe9 8-bit\r\n\tfolded line\r\n\r\n" + body
    )
    assert entry.rcpt_to == ("bob@example.org",)
    assert entry.mail_from == "q@quarantine.test"
    await mta.close()


async def test_shadow_mode_only_adds_headers(tmp_path: Path) -> None:
    async with _running(tmp_path, "shadow") as runtime:
        mta = await _session(runtime)
        result = await mta.message(mail_from="<x@reject.test>")
        assert result.final == b"c"
        inserted = [header_action(d) for letter, d in result.edits if letter == b"i"]
        status = dict((n, v) for _, n, v in inserted)["X-Spam-Status"]
        assert b"action=reject" in status and b"mode=shadow" in status
        await mta.close()


async def test_macros_feed_the_connection_facts(relay: Runtime) -> None:
    mta = await _session(relay)
    result = await mta.message(
        mail_from="<x@auth.test>", extra_macros={"{auth_authen}": "jörg", "{auth_type}": "PLAIN"}
    )
    assert result.reply == "550 5.7.1 seen as logged in"
    result = await mta.message(mail_from="<x@auth.test>")
    assert result.final == b"c", "no login macro: not authenticated"
    mta.writer.write(pkt(b"D", b"H{tls_version}\0TLSv1.3\0"))
    result = await mta.message(client=("x.test", "192.0.2.66"), helo="bad.helo.test")
    assert result.reply == "550 5.7.1 client facts from the MTA's macros"
    await mta.close()


async def test_message_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    settings = _small_messages(tmp_path)
    async with running_relay(settings) as runtime:
        mta = await _session(runtime)
        result = await mta.message(body=(b"x" * 70 + b"\r\n") * 2000)  # 144 KB, 3 chunks
        assert (result.final, result.reply) == (b"y", "552 5.3.4 Message too big for the filter")
        assert (await mta.message()).final == b"c"
        await mta.close()


async def test_without_no_reply_flags_every_step_is_answered(relay: Runtime) -> None:
    assert relay.milter is not None
    mta = await MiltMta.connect(relay.milter.address)
    # An old MTA: version 2, no "no reply" steps, headers without the leading space.
    actions, protocol, macro_lists = await mta.negotiate(protocol=0, version=2)
    assert protocol == 0 and macro_lists == b""
    assert actions == wire.Actions.ADDHDRS | wire.Actions.CHGHDRS
    result = await mta.message(headers=((b"From", b"alice@tag.test"), (b"X-Spam-Flag", b"YES")))
    assert result.final == b"c"
    after = _apply([(b"From", b"alice@tag.test"), (b"X-Spam-Flag", b"YES")], result)
    assert after[3:] == [(b"From", b"alice@tag.test")]
    await mta.close()


async def test_negotiation_asks_for_macros_and_no_replies(relay: Runtime) -> None:
    assert relay.milter is not None
    mta = await MiltMta.connect(relay.milter.address)
    _, protocol, macro_lists = await mta.negotiate()
    assert protocol & wire.Proto.NR_HDR and protocol & wire.Proto.NR_BODY
    assert protocol & wire.Proto.HDR_LEADSPC
    assert b"{auth_authen}" in macro_lists and b"{client_addr}" in macro_lists
    await mta.close()


# --- bad input: the session closes, the process goes on --------------------------------


async def _closed(mta: MiltMta) -> bool:
    """The filter closed the connection (EOF) within a deadline; ours is closed too."""
    try:
        data = await asyncio.wait_for(mta.reader.read(100), 10)
    except ConnectionError:
        data = b""
    mta.writer.close()
    with contextlib.suppress(ConnectionError):
        await mta.writer.wait_closed()
    return data == b""


@pytest.mark.parametrize(
    "bad",
    [
        pkt(b"Z", b"unknown command"),
        pkt(b"B", b"x" * 65536),  # one byte over the largest body chunk
        pkt(b"L", b"Subject\0no terminating nul"),
        pkt(b"C", b"host\0X\0"),  # unknown address family
        pkt(b"M", b"\0"),  # empty sender
        struct.pack("!I", 64 * 1024 * 1024) + b"B",  # announces 64 MiB
        struct.pack("!I", 0),
        pkt(b"O", b"\0\0\0\x06"),  # truncated negotiation
    ],
    ids=[
        "unknown",
        "oversized-body",
        "header-nul",
        "family",
        "empty-mail",
        "huge",
        "empty",
        "optneg",
    ],
)
async def test_malformed_packet_closes_the_session_only(relay: Runtime, bad: bytes) -> None:
    mta = await _session(relay)
    mta.writer.write(bad)
    assert await _closed(mta)
    good = await _session(relay)  # the process still serves
    assert (await good.message()).final == b"c"
    await good.close()


async def test_truncated_packet_and_mid_message_hangup(relay: Runtime) -> None:
    mta = await _session(relay)
    mta.writer.write(struct.pack("!I", 100) + b"L" + b"Sub")  # then hangs up
    mta.writer.close()
    mta2 = await _session(relay)
    mta2.writer.write(pkt(b"M", b"<a@b.test>\0") + pkt(b"L", b"From\0 a@b.test\0"))
    mta2.writer.close()
    good = await _session(relay)
    assert (await good.message()).final == b"c"
    await good.close()


async def test_mta_without_header_actions_is_refused(relay: Runtime) -> None:
    assert relay.milter is not None
    mta = await MiltMta.connect(relay.milter.address)
    mta.writer.write(pkt(b"O", struct.pack("!III", 6, int(wire.Actions.ADDHDRS), 0x1FFFFF)))
    assert await _closed(mta)


async def test_stalled_mta_is_timed_out(tmp_path: Path) -> None:
    async with _running(tmp_path, "enforce", idle_timeout=0.3) as runtime:
        mta = await _session(runtime)
        mta.writer.write(pkt(b"M", b"<a@tag.test>\0"))  # and then nothing
        assert await _closed(mta)


async def test_connection_limit(tmp_path: Path) -> None:
    async with _running(tmp_path, "enforce", max_connections=1) as runtime:
        first = await _session(runtime)
        assert runtime.milter is not None
        second = await MiltMta.connect(runtime.milter.address)
        assert await _closed(second)
        assert runtime.milter.refused == 1
        assert (await first.message()).final == b"c"
        await first.close()


def test_config_errors() -> None:
    for bad, key in [
        ({"listen": "unix:relative/path"}, "milter.listen"),
        ({"listen": "nohostport"}, "milter.listen"),
        ({"socket_mode": 0o1777}, "milter.socket_mode"),
        ({"idle_timeout": 0}, "milter.idle_timeout"),
        ({"bogus": 1}, "milter.bogus"),
    ]:
        with pytest.raises(ConfigError) as info:
            settings_from_mapping({"milter": bad}, "relay.toml")
        assert key in str(info.value)


async def test_unix_socket_door(tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    path.touch()  # not a socket: refused rather than deleted
    settings = make_settings(tmp_path, {"milter": {"listen": f"unix:{path}"}})
    with pytest.raises(ConfigError, match="not a socket"):
        async with running_relay(settings):
            pass
    path.unlink()
    async with running_relay(settings) as runtime:
        assert path.stat().st_mode & 0o777 == 0o660
        assert runtime.milter is not None and runtime.milter.address == f"unix:{path}"
        reader, writer = await asyncio.open_unix_connection(str(path))
        mta = MiltMta(reader, writer)
        await mta.negotiate()
        assert (await mta.message()).final == b"c"
        await mta.close()


# --- the codec and the edits on their own ----------------------------------------------


def test_decode_commands() -> None:
    assert wire.decode(b"C" + b"mx.test\x004" + struct.pack("!H", 25) + b"192.0.2.1\0") == (
        wire.Connect("mx.test", "4", 25, "192.0.2.1")
    )
    assert wire.decode(b"CUnknown\0U") == wire.Connect("Unknown", "U", 0, "")
    assert wire.decode(b"M<a@b>\0SIZE=10\0BODY=8BITMIME\0") == wire.MailFrom(
        "<a@b>", ("SIZE=10", "BODY=8BITMIME")
    )
    # UTF-8 macros (SMTPUTF8 addresses, logins) decode; invalid bytes never raise.
    macros = wire.decode("DM{mail_addr}\0jörg@bücher.test\0{auth_authen}\0\xff\0".encode("latin-1"))
    assert isinstance(macros, wire.Macros)
    assert macros.values[1][1] == "\udcff"
    assert wire.decode(b"LSubject\0 \xff\xfe raw\0") == wire.Header(b"Subject", b" \xff\xfe raw")


def test_decode_refuses_only_with_its_own_error() -> None:
    """20,000 mutations of valid packets: anything that is not a command is a
    MilterProtocolError, never another exception (the codec comparison in docs/milter.md
    counted six kinds escaping kilter.protocol)."""
    samples = [
        b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF),
        b"Dj\0mx.test\0{client_addr}\0192.0.2.1\0",
        b"Cmail.test\x004" + struct.pack("!H", 25) + b"192.0.2.1\0",
        b"Hmail.test\0",
        b"M<a@b.test>\0SIZE=10\0",
        b"R<c@d.test>\0",
        b"LSubject\0 hi\0",
        b"B" + b"body\r\n" * 20,
        b"E",
        b"A",
    ]
    rng = random.Random(20261207)
    for _ in range(20_000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and len(data) > 1:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.6:
                data = data[: rng.randrange(len(data) + 1)]
            elif op < 0.8 and data:
                data[rng.randrange(len(data))] = 0
            else:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        with contextlib.suppress(wire.MilterProtocolError):
            wire.decode(bytes(data))


def test_header_edits() -> None:
    original = [
        (b"Received", b" by mx\r\n"),
        (b"Authentication-Results", b" relay.test; forged\r\n"),
        (b"X-Spam-Flag", b" YES\r\n"),
        (b"From", b" a@b\r\n"),
        (b"X-SPAM-flag", b" again\r\n"),
    ]
    stamped = (
        b"Authentication-Results: relay.test; spf=pass\r\n\tsmtp.mailfrom=b\r\n"
        b"X-Spam-Score: 1.00\r\n"
        b"Received: by mx\r\nFrom: a@b\r\n\r\nbody\r\n"
    )
    edits = header_edits(original, stamped)
    assert edits.deleted == (("X-SPAM-flag", 2), ("X-Spam-Flag", 1), ("Authentication-Results", 1))
    assert edits.inserted == (
        (b"Authentication-Results", b" relay.test; spf=pass\r\n\tsmtp.mailfrom=b\r\n"),
        (b"X-Spam-Score", b" 1.00\r\n"),
    )
    packets = edits.packets()
    # Highest occurrence first per name; insertions bottom-up at index 0.
    assert [p[4:5] for p in packets] == [b"m", b"m", b"m", b"i", b"i"]
    assert header_action(packets[1][5:])[:2] == (2, "X-SPAM-flag")
    assert header_action(packets[2][5:])[:2] == (1, "X-Spam-Flag")
    assert header_action(packets[3][5:])[1] == "X-Spam-Score"
    assert milter_value(edits.inserted[0][1]) == b" relay.test; spf=pass\n\tsmtp.mailfrom=b"


def test_reply_code_is_one_safe_line() -> None:
    packet = wire.reply_code(550, "5.7.1", "100% spam\r\nInjected: yes\x00")
    assert packet[4:] == b"y550 5.7.1 100%% spam??Injected: yes?\0"


def test_milter_md_shows_the_tested_snippets() -> None:
    """deploy/postfix/milter.md shows the three files tests/test_milter_postfix.py runs,
    verbatim, so the page never drifts from what a test has run."""
    deploy = Path(__file__).resolve().parents[1] / "deploy" / "postfix"
    page = (deploy / "milter.md").read_text()
    for name in ("milter.main.cf", "milter.master.cf", "milter.toml"):
        assert (deploy / name).read_text().rstrip() in page, name


async def test_macros_and_recipients_are_bounded(tmp_path: Path) -> None:
    """Any local process may connect: a flood of macro names or recipients is bounded."""
    settings = _small_messages(tmp_path)
    async with running_relay(settings) as runtime:
        mta = await _session(runtime)
        flood = b"".join(b"{m%d}\0v\0" % i for i in range(5000))
        mta.writer.write(pkt(b"D", b"C" + flood))
        rcpts = tuple(f"<user{i:05d}@example.org>" for i in range(5000))  # ~125 KB
        result = await mta.message(rcpts=rcpts)
        assert (result.final, result.reply) == (b"y", "552 5.3.4 Message too big for the filter")
        assert runtime.milter is not None
        (session,) = runtime.milter.sessions.values()
        assert len(session.conn_macros) <= 64
        assert (await mta.message()).final == b"c"
        await mta.close()
