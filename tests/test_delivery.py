"""In-line delivery to a real downstream (aiosmtpd) that accepts, defers, refuses, drops
or hangs; the client hears 250 only after the downstream accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.delivery.maildir import MaildirTransport
from relay.message import Envelope, Message, Peer
from tests.support.relay import (
    RawClient,
    make_settings,
    running_relay,
    send,
    simple_message,
    sink_server,
)


def smtp_settings(tmp_path: Path, downstream: str, **delivery: Any) -> Any:
    return make_settings(
        tmp_path, {"delivery": {"mode": "smtp", "downstream": downstream, **delivery}}
    )


async def test_relays_exact_bytes_downstream(tmp_path: Path) -> None:
    async with sink_server() as sink, running_relay(smtp_settings(tmp_path, sink.address)) as r:
        errors, reply = await send(r.port, ["bob@example.org"], simple_message("exact"))
    assert errors == {}
    assert "Ok: stored" in reply  # the downstream's own answer is passed on
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.mail_from == "alice@sender.test"
    assert got.rcpt_tos == ("bob@example.org",)
    # Our Received trace field on top, then the client's bytes exactly as sent.
    assert got.data.startswith(b"Received: from ")
    assert got.data.endswith(simple_message("exact"))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("tempfail", "451 4.4.0"),  # downstream 4xx -> we ask the sender to retry
        ("reject", "554 5.6.0"),  # downstream 5xx -> our 5xx with its status
        ("drop", "451 4.4.2"),  # connection dropped at DATA -> retry
    ],
)
async def test_downstream_failures_map_to_our_replies(
    tmp_path: Path, mode: str, expected: str
) -> None:
    async with sink_server(mode=mode) as sink:
        async with running_relay(smtp_settings(tmp_path, sink.address)) as r:
            c = await RawClient.connect(r.port)
            await c.cmd("EHLO client.test")
            await c.cmd("MAIL FROM:<alice@sender.test>")
            assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
            await c.cmd("DATA")
            reply = await c.cmd(simple_message() + b".\r\n")
            assert reply.startswith(expected), reply
            await c.close()
    assert sink.messages == []


async def test_hanging_downstream_times_out_as_451(tmp_path: Path) -> None:
    async with sink_server(mode="hang") as sink:
        async with running_relay(smtp_settings(tmp_path, sink.address, timeout=1)) as r:
            c = await RawClient.connect(r.port)
            await c.cmd("EHLO client.test")
            await c.cmd("MAIL FROM:<alice@sender.test>")
            await c.cmd("RCPT TO:<bob@example.org>")
            await c.cmd("DATA")
            reply = await c.cmd(simple_message() + b".\r\n", timeout=10)
            assert reply.startswith("451 4.4.2"), reply
            await c.close()


async def test_refused_downstream_connection_is_451_at_rcpt(tmp_path: Path) -> None:
    from tests.support.relay import free_port

    port = free_port()  # nothing listens here
    async with running_relay(smtp_settings(tmp_path, f"127.0.0.1:{port}")) as r:
        c = await RawClient.connect(r.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("451 4.4.1")
        # No recipient accepted: DATA is refused, nothing can be acknowledged.
        assert (await c.cmd("DATA")).startswith("503")
        await c.close()


async def test_partial_recipients_mirror_downstream_answers(tmp_path: Path) -> None:
    refuse = frozenset({"nobody@example.org"})
    defer = frozenset({"busy@example.org"})
    async with sink_server(refuse=refuse, defer=defer) as sink:
        async with running_relay(smtp_settings(tmp_path, sink.address)) as r:
            c = await RawClient.connect(r.port)
            await c.cmd("EHLO client.test")
            await c.cmd("MAIL FROM:<alice@sender.test>")
            assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
            assert (await c.cmd("RCPT TO:<nobody@example.org>")).startswith("550 5.1.1")
            assert (await c.cmd("RCPT TO:<busy@example.org>")).startswith("450")
            assert (await c.cmd("RCPT TO:<carol@example.org>")).startswith("250")
            await c.cmd("DATA")
            assert (await c.cmd(simple_message() + b".\r\n")).startswith("250")
            await c.close()
    # The 250 covers exactly the recipients the downstream accepted.
    assert [m.rcpt_tos for m in sink.messages] == [("bob@example.org", "carol@example.org")]


async def test_downstream_connections_are_reused(tmp_path: Path) -> None:
    async with sink_server() as sink, running_relay(smtp_settings(tmp_path, sink.address)) as r:
        for i in range(5):
            await send(r.port, ["bob@example.org"], simple_message(f"m{i}"))
    assert len(sink.messages) == 5
    assert sink.connections == 1


async def test_rset_and_disconnect_release_the_downstream_transaction(tmp_path: Path) -> None:
    async with sink_server() as sink, running_relay(smtp_settings(tmp_path, sink.address)) as r:
        c = await RawClient.connect(r.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        await c.cmd("RCPT TO:<bob@example.org>")
        assert (await c.cmd("RSET")).startswith("250")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        await c.cmd("RCPT TO:<carol@example.org>")
        await c.cmd("DATA")
        assert (await c.cmd(simple_message() + b".\r\n")).startswith("250")
        await c.close()
    assert [m.rcpt_tos for m in sink.messages] == [("carol@example.org",)]


async def test_multiple_messages_per_session(tmp_path: Path) -> None:
    async with sink_server() as sink, running_relay(smtp_settings(tmp_path, sink.address)) as r:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=r.port, timeout=10)
        await client.connect()
        for i in range(3):
            await client.sendmail("alice@sender.test", ["bob@example.org"], simple_message(f"s{i}"))
        await client.quit()
    assert len(sink.messages) == 3


async def test_maildir_failure_is_temporary(tmp_path: Path) -> None:
    transport = MaildirTransport(tmp_path / "md")
    (tmp_path / "md" / "tmp").rmdir()  # the next write cannot create its file
    txn = await transport.begin("a@b.test")
    await txn.add_recipient("bob@example.org")
    msg = Message(
        b"Subject: x\r\n\r\ny\r\n",
        Envelope("a@b.test", ("bob@example.org",)),
        Peer("127.0.0.1"),
        received_at=1_795_000_000.0,
    )
    from relay.errors import TemporaryDeliveryError

    with pytest.raises(TemporaryDeliveryError):
        await txn.send(msg)
    assert list((tmp_path / "md" / "new").iterdir()) == []
