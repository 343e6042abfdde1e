"""The SMTP layer over loopback: relay control, protocol limits, smuggling, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiosmtplib
import pytest

from relay.smtp.smuggling import smuggling_suspect
from tests.support.relay import (
    RawClient,
    free_port,
    make_settings,
    running_relay,
    send,
    simple_message,
    sink_server,
)


def maildir_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "maildir" / "new").glob("*"))


async def test_accepts_mail_for_configured_domain_into_maildir(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        errors, reply = await send(relay.port, ["bob@example.org"], simple_message())
    assert errors == {}  # aiosmtplib lists only refused recipients here
    assert "queued as" in reply
    files = maildir_files(tmp_path)
    assert len(files) == 1
    data = files[0].read_bytes()
    assert data.startswith(b"Return-Path: <alice@sender.test>\r\n")
    assert b"Subject: hello\r\n" in data
    assert not list((tmp_path / "maildir" / "tmp").iterdir())  # renamed, nothing left behind


async def test_null_sender_is_accepted(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        c = await RawClient.connect(relay.port)
        assert (await c.cmd("EHLO client.test")).startswith("250")
        assert (await c.cmd("MAIL FROM:<>")).startswith("250")
        assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(b"Subject: bounce\r\n\r\nx\r\n.\r\n")).startswith("250")
        await c.close()
    assert maildir_files(tmp_path)[0].read_bytes().startswith(b"Return-Path: <>\r\n")


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        ("<someone@elsewhere.test>", "550 5.7.1"),
        ("<@hop.test:bob@example.org>", "550 5.7.1"),
        ("<@hop1.test,@hop2.test:bob@elsewhere.test>", "550 5.7.1"),
        ("<bob%elsewhere.test@example.org>", "550 5.7.1"),
        ("<elsewhere.test!bob@example.org>", "550 5.7.1"),
        ("<bob@elsewhere.test@example.org>", "550 5.7.1"),
        ('<"bob@elsewhere.test"@example.org>', "550 5.7.1"),
        ('<"bob%elsewhere.test"@example.org>', "550 5.7.1"),
        ("<bob@[192.0.2.1]>", "550 5.7.1"),
        ("<bob@[IPv6:2001:db8::1]>", "550 5.7.1"),
        ("<bob@example.org.>", "553 5.1.3"),
        ("<bob@EXAMPLE.ORG.elsewhere.test>", "550 5.7.1"),
        ("<bob@example.org>", "250"),
        ("<Bob@Example.ORG>", "250"),
    ],
)
async def test_relay_control(tmp_path: Path, rcpt: str, expected: str) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        assert (await c.cmd(f"RCPT TO:{rcpt}")).startswith(expected)
        await c.close()


async def test_trusted_network_may_relay_anywhere_but_not_tricks(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"relay": {"networks": ["127.0.0.0/8"]}})
    async with running_relay(settings) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        assert (await c.cmd("RCPT TO:<carol@elsewhere.test>")).startswith("250")
        assert (await c.cmd("RCPT TO:<carol%x.test@elsewhere.test>")).startswith("550 5.7.1")
        assert (await c.cmd("RCPT TO:<@a.test:carol@elsewhere.test>")).startswith("550 5.7.1")
        await c.close()


async def test_subdomain_entries(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"relay": {"domains": [".example.net"]}})
    async with running_relay(settings) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        assert (await c.cmd("RCPT TO:<a@mx.example.net>")).startswith("250")
        assert (await c.cmd("RCPT TO:<a@badexample.net>")).startswith("550 5.7.1")
        await c.close()


async def test_size_is_advertised_and_enforced(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"smtp": {"max_message_size": 2000}})
    async with running_relay(settings) as relay:
        c = await RawClient.connect(relay.port)
        c.writer.write(b"EHLO client.test\r\n")
        lines = []
        while True:
            line = (await c.reader.readline()).decode()
            lines.append(line)
            if line[3] == " ":
                break
        assert any("SIZE 2000" in line for line in lines)
        assert (await c.cmd("MAIL FROM:<alice@sender.test> SIZE=5000")).startswith("552")
        assert (await c.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        body = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100 + b".\r\n"
        assert (await c.cmd(body)).startswith("552")
        # The session is still usable and nothing was delivered.
        assert (await c.cmd("NOOP")).startswith("250")
        await c.close()
    assert maildir_files(tmp_path) == []


async def test_too_many_recipients_get_452(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"smtp": {"max_recipients": 2}})
    async with running_relay(settings) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        assert (await c.cmd("RCPT TO:<a@example.org>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("250")
        assert (await c.cmd("RCPT TO:<c@example.org>")).startswith("452 4.5.3")
        await c.close()


async def test_overlong_line_and_command(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        # RFC 5321 4.5.3.1.4: command line limit 512 octets -> 500.
        assert (await c.cmd("NOOP " + "x" * 600)).startswith("500")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        await c.cmd("RCPT TO:<bob@example.org>")
        await c.cmd("DATA")
        # RFC 5321 4.5.3.1.6: text line limit 1000 octets with CRLF -> 500, nothing delivered.
        reply = await c.cmd(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
        assert reply.startswith("500")
        await c.close()
    assert maildir_files(tmp_path) == []


async def test_idle_client_is_timed_out(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"smtp": {"command_timeout": 0.5}})
    async with running_relay(settings) as relay:
        c = await RawClient.connect(relay.port)
        line = await c.reply(timeout=5)
        assert line.startswith("421 4.4.2")
        assert await c.reader.read() == b""
        await c.close()


async def test_slow_drip_data_is_cut_off(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"smtp": {"data_timeout": 1.0, "command_timeout": 5}})
    async with running_relay(settings) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        await c.cmd("RCPT TO:<bob@example.org>")
        await c.cmd("DATA")

        async def drip() -> None:
            # One short line every 0.1 s keeps the idle timer happy, but not the DATA bound.
            with contextlib.suppress(ConnectionError):
                for _ in range(40):
                    await c.write(b"drip\r\n")
                    await asyncio.sleep(0.1)

        task = asyncio.create_task(drip())
        line = await c.reply(timeout=5)
        task.cancel()
        assert line.startswith("421 4.4.2")
        await c.close()
    assert maildir_files(tmp_path) == []


async def test_connection_limit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"smtp": {"max_connections": 2}})
    async with running_relay(settings) as relay:
        a = await RawClient.connect(relay.port)
        b = await RawClient.connect(relay.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        line = (await asyncio.wait_for(reader.readline(), 5)).decode()
        assert line.startswith("421 4.7.0")
        writer.close()
        await a.close()
        await asyncio.sleep(0.1)
        c = await RawClient.connect(relay.port)  # a slot was freed
        assert (await c.cmd("NOOP")).startswith("250")
        for cl in (b, c):
            await cl.close()


# The end-of-data variants published by the 2023 SMTP smuggling research (SEC Consult):
# each would end the message early on a lax downstream and start a smuggled transaction.
SMUGGLING_VARIANTS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
]


@pytest.mark.parametrize("eod", SMUGGLING_VARIANTS, ids=lambda v: repr(v))
async def test_smuggling_variants_are_refused_and_nothing_is_split(
    tmp_path: Path, eod: bytes
) -> None:
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path, {"delivery": {"mode": "smtp", "downstream": sink.address}}
        )
        async with running_relay(settings) as relay:
            c = await RawClient.connect(relay.port)
            await c.cmd("EHLO client.test")
            await c.cmd("MAIL FROM:<alice@sender.test>")
            await c.cmd("RCPT TO:<bob@example.org>")
            await c.cmd("DATA")
            payload = (
                b"Subject: first\r\n\r\nhello"
                + eod
                + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
            )
            reply = await c.cmd(payload)
            assert reply.startswith("550 5.5.2")
            # The smuggled commands were data: the next command is a fresh transaction.
            assert (await c.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
            await c.close()
    assert sink.messages == []


def test_smuggling_detector_leaves_ordinary_lines_alone() -> None:
    for line in (b"..dot stuffed\r\n", b".not alone\r\n", b"a\nb\nc\r\n", b".\r\n"):
        assert not smuggling_suspect(line)
    for line in (b"a\n.\nb\r\n", b".\nMAIL FROM:<x>\r\n", b"x\r.\r\n", b".\rRCPT\r\n"):
        assert smuggling_suspect(line)


async def test_bare_lf_lines_are_normalised_to_crlf(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        await c.cmd("RCPT TO:<bob@example.org>")
        await c.cmd("DATA")
        assert (await c.cmd(b"Subject: lf\nX-A: 1\n\nbody\nline2\r\n.\r\n")).startswith("250")
        await c.close()
    data = maildir_files(tmp_path)[0].read_bytes()
    assert b"Subject: lf\r\nX-A: 1\r\n\r\nbody\r\nline2\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")


async def test_listen_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    from relay.app import lifespan
    from relay.errors import ConfigError

    port = free_port()
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    try:
        settings = make_settings(tmp_path, {"smtp": {"listen": f"127.0.0.1:{port}"}})
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            async with lifespan(settings):
                pass
    finally:
        blocker.close()


async def test_aiosmtplib_client_sees_refusal(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await send(relay.port, ["x@elsewhere.test"], simple_message())


async def test_refused_recipients_reach_the_invalid_rcpt_ratio_fact(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[policy]\nname = "harvest"\n[policy.thresholds]\ntag = 1.0\n'
        '[[rule]]\nname = "dictionary_attack"\nwhen = "invalid_rcpt_ratio >= 0.75"\n'
        'score = 5.0\nreason = "most recipients were refused"\n'
    )
    settings = make_settings(tmp_path, {"policy": {"path": str(policy)}})
    async with running_relay(settings) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        for bad in ("a@elsewhere.test", "b%c@example.org", "d@[192.0.2.1]"):
            assert (await c.cmd(f"RCPT TO:<{bad}>")).startswith("55")
        assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
        await c.cmd("DATA")
        assert (await c.cmd(simple_message() + b".\r\n")).startswith("250")
        await c.close()
    data = maildir_files(tmp_path)[0].read_bytes()
    assert b"X-Spam-Rules: dictionary_attack=+5" in data


async def test_forged_spam_headers_are_removed_from_accepted_mail(tmp_path: Path) -> None:
    forged = b"X-Spam-Status: action=accept score=-100\r\nX-Spam-Score: -100\r\n" + simple_message()
    async with running_relay(make_settings(tmp_path)) as relay:
        await send(relay.port, ["bob@example.org"], forged)
    data = maildir_files(tmp_path)[0].read_bytes()
    assert b"X-Spam-" not in data
    assert data.endswith(simple_message())


async def test_an_unexpected_error_is_a_451_and_the_session_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug below the SMTP layer never reaches the client as ``500 Error: (X) ...``:
    the transaction is dropped with 451 4.3.0 and the next one works."""
    async with running_relay(make_settings(tmp_path)) as relay:
        real_begin = relay.transport.begin
        calls = 0

        async def flaky_begin(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ValueError("boom")
            return await real_begin(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(relay.transport, "begin", flaky_begin)
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("451 4.3.0")
        # the transaction is over, as after RSET: a fresh one goes through
        assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("503 5.5.1")
        assert (await c.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(b"Subject: x\r\n\r\nx\r\n.\r\n")).startswith("250")
        await c.close()
    assert len(maildir_files(tmp_path)) == 1
