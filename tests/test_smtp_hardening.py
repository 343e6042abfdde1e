"""Issue 15, security hardening: each attack replayed over loopback against the real relay.

STARTTLS once and only after EHLO; per-session error and junk command limits; nothing a
client wrote reaches the log unescaped (and no body words at all); a configured
single-label domain (``localhost``) accepted at RCPT.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.logconfig import configure_logging
from relay.smtp.logsafe import printable
from relay.smtp.relaycontrol import Recipient, RelayControl
from tests.support.relay import RawClient, make_settings, running_relay, simple_message
from tests.test_tls_trace import self_signed


async def reply_lines(client: RawClient) -> list[str]:
    """Every line of one (multi-line) reply."""
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(client.reader.readline(), 10)).decode().rstrip("\r\n")
        lines.append(line)
        if not line or len(line) < 4 or line[3] != "-":
            return lines


async def closed(client: RawClient) -> bool:
    """The relay closed the connection (EOF, after any reply still in flight)."""
    rest = await asyncio.wait_for(client.reader.read(), 10)
    await client.close()
    return rest == b""


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- 1. STARTTLS: once, after EHLO (RFC 3207 4.2) -----------------------------------------


async def test_second_starttls_inside_tls_is_503(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = make_settings(tmp_path, {"smtp": {"tls_cert": str(cert), "tls_key": str(key)}})
    async with running_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.write(b"EHLO client.test\r\n")
        assert "250-STARTTLS" in await reply_lines(client)
        assert (await client.cmd("STARTTLS")).startswith("220")
        await client.writer.start_tls(client_tls())
        await client.write(b"EHLO client.test\r\n")
        ehlo = await reply_lines(client)
        assert ehlo[-1].startswith("250 ") and not any("STARTTLS" in line for line in ehlo)
        assert await client.cmd("STARTTLS") == "503 5.5.1 Error: TLS already active"
        # still the same working TLS session, not a nested handshake
        assert (await client.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await client.cmd("RCPT TO:<bob@example.org>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        assert (await client.cmd(simple_message() + b".\r\n")).startswith("250")
        await client.close()


async def test_starttls_before_ehlo_is_503(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = make_settings(tmp_path, {"smtp": {"tls_cert": str(cert), "tls_key": str(key)}})
    async with running_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        assert await client.cmd("STARTTLS") == "503 5.5.1 Error: send EHLO first"
        assert (await client.cmd("HELO client.test")).startswith("250")
        assert await client.cmd("STARTTLS") == "503 5.5.1 Error: send EHLO first"
        assert (await client.cmd("EHLO client.test")).startswith("250 ")
        assert (await client.cmd("STARTTLS")).startswith("220")
        await client.writer.start_tls(client_tls())
        assert (await client.cmd("NOOP")).startswith("250")
        await client.close()


# --- 2. error and junk command limits -------------------------------------------------------


async def test_relay_denied_rcpts_hit_the_error_limit(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        client = await RawClient.connect(relay.port)
        assert (await client.cmd("EHLO client.test")).startswith("250 ")
        assert (await client.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        # 1,000 pipelined relay attempts: 20 refusals, then 421, then nothing
        await client.write(b"".join(b"RCPT TO:<u%d@elsewhere.test>\r\n" % i for i in range(1000)))
        replies = [await client.reply() for _ in range(20)]
        assert all(r.startswith("550 5.7.1") for r in replies)
        assert await client.reply() == "421 4.7.0 Too many errors, closing connection"
        assert await closed(client)
        assert not relay.sessions.open


async def test_error_limit_is_configurable_and_reset_by_a_delivered_message(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, {"smtp": {"max_errors": 3}})
    async with running_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        assert (await client.cmd("EHLO client.test")).startswith("250 ")
        assert (await client.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await client.cmd("RCPT TO:<x@elsewhere.test>")).startswith("550")
        assert (await client.cmd("RCPT TO:<y@elsewhere.test>")).startswith("550")
        assert (await client.cmd("RCPT TO:<bob@example.org>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        assert (await client.cmd(simple_message() + b".\r\n")).startswith("250")
        # the delivered message started the count again: two more errors are allowed
        assert (await client.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await client.cmd("RCPT TO:<x@elsewhere.test>")).startswith("550")
        assert (await client.cmd("RCPT TO:<y@elsewhere.test>")).startswith("550")
        assert (await client.cmd("RCPT TO:<z@elsewhere.test>")).startswith("550")
        assert await client.reply() == "421 4.7.0 Too many errors, closing connection"
        assert await closed(client)


async def test_noop_flood_hits_the_junk_command_limit(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        client = await RawClient.connect(relay.port)
        assert (await client.cmd("EHLO client.test")).startswith("250 ")  # junk 1
        await client.write(b"NOOP\r\n" * 1000)
        replies = [await client.reply() for _ in range(99)]
        assert all(r.startswith("250") for r in replies)
        assert await client.reply() == "421 4.7.0 Too many junk commands, closing connection"
        assert await closed(client)


@pytest.mark.parametrize("command", ["RSET", "VRFY <bob@example.org>", "HELP", "EHLO x.test"])
async def test_every_junk_command_counts(tmp_path: Path, command: str) -> None:
    settings = make_settings(tmp_path, {"smtp": {"max_junk_commands": 3, "max_errors": 100}})
    async with running_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        for _ in range(3):
            assert (await client.cmd(command))[:1] in ("2", "5")
        assert await client.cmd(command) == "421 4.7.0 Too many junk commands, closing connection"
        assert await closed(client)


# --- 3. nothing client-controlled in the log unescaped ----------------------------------------


@pytest.fixture
def production_logging() -> Iterator[None]:
    """configure_logging as `relay serve` runs it; aiosmtpd's level restored after."""
    mail_log = logging.getLogger("mail.log")
    level = mail_log.level
    configure_logging("DEBUG")
    try:
        yield
    finally:
        mail_log.setLevel(level)


def _has_control(text: str) -> bool:
    return any(not ch.isprintable() for ch in text)


async def test_logs_hold_no_raw_control_characters_and_no_body_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, production_logging: None
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path, {"smtp": {"max_errors": 4}})
    async with running_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.write(b"EHLO evil\x1b[2J\rFORGED\xc3\xa9.test\r\n")
        await reply_lines(client)
        assert (await client.cmd(b"JUNK\x1b]0;owned\x07\rINFO forged line\r\n")).startswith("500")
        # a refused pipelined DATA: its body lines are read as (unknown) commands
        await client.write(
            b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n"
            b"Subject: CONFIDENTIAL\r\n\r\nMERGERPLANS attached\r\n.\r\n"
        )
        while await client.reply():
            pass  # ends with 421 (too many errors) and EOF
        await client.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("closing session" in m for m in messages)  # our line, HELO quoted escaped
    assert any("helo=evil\\x1b[2J\\rFORGED" in m for m in messages)
    for m in messages:
        assert not _has_control(m), m
        assert "CONFIDENTIAL" not in m and "MERGERPLANS" not in m, m
        assert "owned" not in m and "forged line" not in m, m


def test_printable_escapes_and_truncates() -> None:
    assert printable("a\x1b[2J\rb\nc") == "a\\x1b[2J\\rb\\nc"
    assert printable("right\u202eleft \u2028 é") == "right\\u202eleft \\u2028 é"
    assert printable(b"\xff\\") == "\\udcff\\\\"
    assert printable("x" * 50) == "x" * 40 + "..."
    assert printable("x" * 50, limit=None) == "x" * 50


# --- 4. finding 11: a single-label relay domain ---------------------------------------------


def test_single_label_domain_is_a_relay_domain() -> None:
    control = RelayControl(("localhost",), ())
    assert control.check("user@localhost", "203.0.113.9") == Recipient("user", "localhost")
    assert control.check("user@LOCALHOST", "203.0.113.9") == Recipient("user", "localhost")


async def test_rcpt_to_a_configured_single_label_domain_is_accepted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"relay": {"domains": ["localhost"]}})
    async with running_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        assert (await client.cmd("EHLO client.test")).startswith("250 ")
        assert (await client.cmd("MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await client.cmd("RCPT TO:<user@localhost>")).startswith("250")
        assert (await client.cmd("RCPT TO:<user@otherhost>")).startswith("550 5.7.1")
        await client.close()


async def test_data_starting_with_a_blank_is_refused(tmp_path: Path) -> None:
    """Found by fuzzing: a first DATA line starting with a blank is a continuation of no
    field; prepended, it would join our Received or Authentication-Results field, letting
    the sender write into our verdict. Refused with 550 5.6.0; nothing is delivered."""
    async with running_relay(make_settings(tmp_path)) as relay:
        c = await RawClient.connect(relay.port)
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<alice@sender.test>")
        await c.cmd("RCPT TO:<bob@example.org>")
        assert (await c.cmd("DATA")).startswith("354")
        reply = await c.cmd(b" dkim=pass header.d=bank.test\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        assert reply.startswith("550 5.6.0"), reply
        await c.close()
    assert not list((tmp_path / "maildir" / "new").glob("*"))
