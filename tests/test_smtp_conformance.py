"""Black-box SMTP conformance of the relay (issue 13), byte-exact on both sides.

A raw client (tests/support/smtpwire.py ``WireClient``) talks to the real relay over
loopback; the relay delivers in-line to a recording downstream (``WireDownstream``) that
keeps every command line and DATA byte exactly as received, with or without SMTPUTF8.

Sections:
A. Protocol: EHLO keywords, PIPELINING (RFC 2920), enhanced status codes (RFC 2034).
B. Strict command syntax: 501 for syntax errors, 555 for unknown/duplicate parameters.
C. Control characters in paths: refused, nothing reaches the downstream, nothing leaks.
D. One address, checked and delivered: the downstream gets the client's path bytes.
E. SMTPUTF8 (RFC 6531) and internationalised domains judged in A-label form.
F. End of data and outbound hygiene (RFC 5321 2.3.8, 4.1.1.4; SMTP smuggling).

Every test starts its own relay and downstream; replies are awaited by reading, and
downstream state by an event-driven wait, never by sleeping.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.relay import make_settings, running_relay, sink_server
from tests.support.smtpwire import (
    WireClient,
    WireDownstream,
    WireReply,
    path_of,
    wire_downstream,
)

# Recipient domains accepted from anyone. bücher.test is configured in its A-label form;
# strasse.test exists so that straße.test (equal only under IDNA2003/transitional
# mapping) can be shown not to reach it.
DOMAINS = ["example.test", "xn--bcher-kva.test", "strasse.test"]
POOL = 3  # downstream pool size: idle connections the relay may legitimately keep open
MAIL_OK = b"MAIL FROM:<alice@sender.test>"
RCPT_OK = b"RCPT TO:<bob@example.test>"
BODY = b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: conformance\r\n\r\nHi.\r\n"


@dataclass
class Env:
    port: int
    down: WireDownstream

    async def client(self, ehlo: bool = True) -> WireClient:
        c = await WireClient.connect(self.port)
        if ehlo:
            await c.ehlo()
        return c


@contextlib.asynccontextmanager
async def relay_env(
    tmp_path: Path,
    *,
    smtputf8: bool = True,
    refuse: Collection[bytes] = (),
    pool_size: int = POOL,
) -> AsyncIterator[Env]:
    """The relay (client outside its networks) delivering to a recording downstream."""
    async with wire_downstream(smtputf8=smtputf8, refuse=refuse) as down:
        settings = make_settings(
            tmp_path,
            {
                "relay": {"domains": DOMAINS, "networks": []},
                "delivery": {"mode": "smtp", "downstream": down.address, "pool_size": pool_size},
            },
        )
        async with running_relay(settings) as runtime:
            yield Env(runtime.port, down)


def internal_error(replies: list[WireReply]) -> list[str]:
    """aiosmtpd's catch-all for an exception in a handler: ``500 Error: (ValueError) ...``."""
    return [str(r) for r in replies if r.code == 500 and "Error: (" in r.text]


# --- A. protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "8BITMIME"])
async def test_ehlo_advertises_keyword(tmp_path: Path, keyword: str) -> None:
    """RFC 5321 4.1.1.1 / RFC 2920 / RFC 2034 / RFC 6531 3.1 / RFC 6152: the EHLO reply
    lists PIPELINING, ENHANCEDSTATUSCODES, SMTPUTF8 and 8BITMIME."""
    async with relay_env(tmp_path) as env:
        c = await env.client(ehlo=False)
        reply = await c.cmd("EHLO client.test")
        await c.close()
    assert reply.code == 250
    keywords = {line.split(" ", 1)[0].upper() for line in reply.lines[1:]}
    assert keyword in keywords, f"EHLO keywords: {sorted(keywords)}"


async def test_pipelined_group_gets_every_reply_in_order_wire_downstream(tmp_path: Path) -> None:
    """RFC 2920 3.1: MAIL, several RCPTs and DATA in one write get one reply each, in order;
    the RCPT the downstream refuses is answered with the downstream's 550 in its place
    (mirrored at RCPT time), then the body gets its 250 and only accepted recipients are
    delivered."""
    async with relay_env(tmp_path, refuse=[b"carol@example.test"]) as env:
        c = await env.client()
        await c.write(
            b"MAIL FROM:<alice@sender.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"RCPT TO:<carol@example.test>\r\n"
            b"RCPT TO:<dave@example.test>\r\n"
            b"DATA\r\n"
        )
        group = await c.replies(5)
        assert [r.code for r in group] == [250, 250, 550, 250, 354], [str(r) for r in group]
        assert group[2].enhanced == "5.1.1", f"downstream's status not mirrored: {group[2]}"
        done = await c.exchange(BODY + b".\r\n")
        assert done.code == 250, str(done)
        await c.close()
        await env.down.settled(POOL)
    [msg] = env.down.messages
    assert msg.rcpt_paths == [b"bob@example.test", b"dave@example.test"]


async def test_pipelined_group_gets_every_reply_in_order_aiosmtpd_downstream(
    tmp_path: Path,
) -> None:
    """RFC 2920 3.1, same as above against a real aiosmtpd downstream that refuses one
    recipient with 550 5.1.1."""
    async with sink_server(refuse=frozenset({"carol@example.test"})) as sink:
        settings = make_settings(
            tmp_path,
            {
                "relay": {"domains": DOMAINS, "networks": []},
                "delivery": {"mode": "smtp", "downstream": sink.address, "pool_size": POOL},
            },
        )
        async with running_relay(settings) as runtime:
            c = await WireClient.connect(runtime.port)
            await c.ehlo()
            await c.write(
                b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.test>\r\n"
                b"RCPT TO:<carol@example.test>\r\nRCPT TO:<dave@example.test>\r\nDATA\r\n"
            )
            group = await c.replies(5)
            assert [r.code for r in group] == [250, 250, 550, 250, 354], [str(r) for r in group]
            assert group[2].enhanced == "5.1.1", str(group[2])
            assert (await c.exchange(BODY + b".\r\n")).code == 250
            await c.close()
    [msg] = sink.messages
    assert msg.rcpt_tos == ("bob@example.test", "dave@example.test")


async def test_pipelining_continues_after_end_of_data(tmp_path: Path) -> None:
    """RFC 2920 3.1: after the end-of-data the client may pipeline the next transaction
    in the same write; the relay answers the message and then every command, in order."""
    async with relay_env(tmp_path) as env:
        c = await env.client()
        await c.write(MAIL_OK + b"\r\n" + RCPT_OK + b"\r\nDATA\r\n")
        assert [r.code for r in await c.replies(3)] == [250, 250, 354]
        await c.write(BODY + b".\r\n" + MAIL_OK + b"\r\nRCPT TO:<dave@example.test>\r\nDATA\r\n")
        codes = [r.code for r in await c.replies(4)]
        assert codes == [250, 250, 250, 354], codes
        assert (await c.exchange(BODY + b".\r\nQUIT\r\n")).code == 250
        assert [r.code for r in await c.replies_until_eof()] == [221]
        await c.close()
        await env.down.settled(POOL)
    assert len(env.down.messages) == 2


async def test_pipelined_data_without_valid_recipient_is_refused(tmp_path: Path) -> None:
    """RFC 2920 3.1: when every pipelined RCPT was refused, DATA is refused (503/554) and
    the relay does not enter the data phase; nothing goes downstream."""
    async with relay_env(tmp_path) as env:
        c = await env.client()
        await c.write(
            MAIL_OK + b"\r\nRCPT TO:<x@elsewhere.test>\r\nRCPT TO:<y@elsewhere.test>\r\n"
            b"DATA\r\nNOOP\r\n"
        )
        replies = await c.replies(5)
        await c.close()
        await env.down.settled(POOL)
    codes = [r.code for r in replies]
    assert codes[:3] == [250, 550, 550], [str(r) for r in replies]
    assert codes[3] in (503, 554), str(replies[3])
    assert codes[4] == 250, "NOOP after a refused DATA must be a command, not data"
    assert env.down.mail_lines == []


# Each step: (command, expected reply code). The 354 intermediate reply is exempt from
# enhanced codes (Postfix sends none either); every other reply after EHLO carries one.
ENHANCED_DIALOGUE: list[tuple[bytes, int]] = [
    (b"NOOP", 250),
    (b"RCPT TO:<bob@example.test>", 503),  # no MAIL yet
    (b"BOGUS", 500),  # unknown command (aiosmtpd 1.4.6 would say 500 Error: ... not recognized)
    (b"MAIL FROM:<alice@sender.test>", 250),
    (b"MAIL FROM:<alice@sender.test>", 503),  # nested MAIL
    (b"RCPT TO:<x@elsewhere.test>", 550),
    (b"RCPT TO:<bob@example.test>", 250),
    (b"RSET", 250),
    (b"VRFY bob", 252),
    (b"MAIL FROM:<alice@sender.test>", 250),
    (b"RCPT TO:<bob@example.test>", 250),
    (b"DATA", 354),
    (BODY + b".", 250),
    (b"QUIT", 221),
]


async def test_replies_carry_enhanced_status_codes(tmp_path: Path) -> None:
    """RFC 2034 3 (and RFC 3463): once ENHANCEDSTATUSCODES is advertised, every reply but
    the greeting, the EHLO reply and 354 starts its text with a status code of the same
    class as the reply code. All missing ones are listed at once."""
    missing: list[str] = []
    async with relay_env(tmp_path) as env:
        c = await env.client()
        for command, expected in ENHANCED_DIALOGUE:
            reply = await c.cmd(command)
            assert reply.code == expected, f"{command!r}: {reply}"
            if reply.code != 354 and reply.enhanced is None:
                missing.append(f"{command[:30]!r} -> {reply}")
        await c.close()
    assert not missing, "replies without an enhanced status code:\n" + "\n".join(missing)


# --- B. strict syntax ----------------------------------------------------------------------


@dataclass(frozen=True)
class SyntaxCase:
    id: str
    command: bytes
    code: int
    after_mail: bool = False  # send a valid MAIL first (RCPT cases)


SYNTAX_CASES = [
    SyntaxCase("mail-unterminated-path", b"MAIL FROM:<unterminated@example.test", 501),
    SyntaxCase("mail-no-address", b"MAIL FROM:", 501),
    SyntaxCase("mail-space-inside-path", b"MAIL FROM:<a b@example.test>", 501),
    # RFC 5321 4.1.2 has no space after the colon; Postfix tolerates one, so do we.
    SyntaxCase("mail-space-after-colon", b"MAIL FROM: <x@example.test>", 250),
    SyntaxCase("mail-unknown-param", b"MAIL FROM:<a@b.test> FOO=BAR", 555),
    SyntaxCase("mail-duplicate-body", b"MAIL FROM:<a@b.test> BODY=8BITMIME BODY=7BIT", 555),
    SyntaxCase("mail-duplicate-size", b"MAIL FROM:<a@b.test> SIZE=100 SIZE=200", 555),
    SyntaxCase("rcpt-no-address", b"RCPT TO:", 501, after_mail=True),
    SyntaxCase("rcpt-unterminated-path", b"RCPT TO:<bob@example.test", 501, after_mail=True),
    SyntaxCase("rcpt-space-inside-path", b"RCPT TO:<b ob@example.test>", 501, after_mail=True),
    SyntaxCase("rcpt-space-after-colon", b"RCPT TO: <bob@example.test>", 250, after_mail=True),
    SyntaxCase("rcpt-unknown-param", b"RCPT TO:<bob@example.test> FOO=BAR", 555, after_mail=True),
]


@pytest.mark.parametrize("case", SYNTAX_CASES, ids=lambda c: c.id)
async def test_command_syntax(tmp_path: Path, case: SyntaxCase) -> None:
    """RFC 5321 4.1.1.2/4.1.1.3/4.1.2 and 4.2.2: a syntax error in MAIL/RCPT is 501; an
    unknown or duplicate ESMTP parameter is 555 (RFC 5321 4.1.1.11 / issue 13); every reply
    carries an enhanced status code (RFC 2034). The session stays usable afterwards."""
    async with relay_env(tmp_path) as env:
        c = await env.client()
        if case.after_mail:
            assert (await c.cmd(MAIL_OK)).code == 250
        reply = await c.cmd(case.command)
        assert reply.code == case.code, f"{case.command!r}: {reply}"
        assert reply.enhanced is not None, f"no enhanced status code: {reply}"
        assert reply.enhanced[0] == str(case.code)[0]
        if case.code != 250:
            follow = RCPT_OK if case.after_mail else MAIL_OK
            assert (await c.cmd(follow)).code == 250, "session unusable after a syntax error"
        await c.cmd("QUIT")
        await c.close()
        await env.down.settled(POOL)


# --- C. control characters -----------------------------------------------------------------

CONTROLS = [*range(0x00, 0x20), 0x7F]


@dataclass(frozen=True)
class Position:
    id: str
    template: bytes  # {c} marks where the control character goes
    in_mail: bool


POSITIONS = [
    Position("mail-quoted-local", b'MAIL FROM:<"a{c}b"@sender.test>', True),
    Position("mail-domain", b"MAIL FROM:<alice@send{c}er.test>", True),
    Position("rcpt-quoted-local", b'RCPT TO:<"b{c}b"@example.test>', False),
    Position("rcpt-domain", b"RCPT TO:<bob@exam{c}ple.test>", False),
]


@pytest.mark.parametrize("ctl", CONTROLS, ids=lambda c: f"0x{c:02X}")
@pytest.mark.parametrize("pos", POSITIONS, ids=lambda p: p.id)
async def test_control_character_in_path_is_refused_and_nothing_goes_downstream(
    tmp_path: Path, pos: Position, ctl: int
) -> None:
    """RFC 5321 4.1.2 (qtextSMTP, quoted-pairSMTP and Domain admit no C0 control or DEL)
    and 2.3.8 (CR and LF only as CRLF): a path holding one is refused with 501 (or 553),
    never an internal 500 Error, and no MAIL FROM reaches the downstream. A bare LF ends
    aiosmtpd's command line early, so 500/521 are also accepted for 0x0A."""
    bad = pos.template.replace(b"{c}", bytes([ctl]))
    allowed = {501, 553} | ({500, 521} if ctl == 0x0A else set())
    async with relay_env(tmp_path) as env:
        c = await env.client()
        if pos.in_mail:
            await c.write(bad + b"\r\n" + RCPT_OK + b"\r\nQUIT\r\n")
        else:
            await c.write(MAIL_OK + b"\r\n" + bad + b"\r\nQUIT\r\n")
        replies = await c.replies_until_eof()
        await c.close()
        await env.down.settled(POOL)
    shown = [str(r) for r in replies]
    assert not internal_error(replies), shown
    verdict = replies[0] if pos.in_mail else replies[1]
    if not pos.in_mail:
        assert replies[0].code == 250, shown
    assert verdict.code in allowed, f"{bad!r}: {shown}\n{env.down.describe()}"
    assert env.down.mail_lines == [], f"reached the downstream: {env.down.describe()}"


async def test_bare_cr_inside_mail_command_line_is_501(tmp_path: Path) -> None:
    """RFC 5321 2.3.8: a CR not followed by LF inside a command line is not a line end and
    not a legal path character: ``MAIL FROM:<"ceo@bank.test\\r"@spf.test>`` is 501."""
    async with relay_env(tmp_path) as env:
        c = await env.client()
        await c.write(b'MAIL FROM:<"ceo@bank.test\r"@spf.test>\r\n' + RCPT_OK + b"\r\nQUIT\r\n")
        replies = await c.replies_until_eof()
        await c.close()
        await env.down.settled(POOL)
    assert replies[0].code == 501, [str(r) for r in replies]
    assert replies[0].enhanced is not None, str(replies[0])
    assert env.down.mail_lines == []


LEAKY_SENDERS = [
    pytest.param(b'"a\x00b"@b.test', id="NUL-quoted"),
    pytest.param(b'"a\x01b"@b.test', id="SOH-quoted"),
    pytest.param(b"a\x0bb@b.test", id="VT-local"),
]


@pytest.mark.parametrize("sender", LEAKY_SENDERS)
async def test_control_in_sender_gives_5xx_and_leaks_no_downstream_connection(
    tmp_path: Path, sender: bytes
) -> None:
    """RFC 5321 4.1.2: ``MAIL FROM:<"a\\x00b"@b.test>`` (and other controls) then RCPT gets
    a proper 5xx at MAIL or RCPT, never ``500 Error: (ValueError)``. After 20 such sessions
    the downstream holds no connection in an unfinished transaction and at most the pool
    size of idle ones; once the relay stopped, every downstream connection is closed.
    Problems are collected so that a wrong reply does not hide a leak."""
    problems: list[str] = []
    async with relay_env(tmp_path) as env:
        for i in range(20):
            c = await env.client()
            await c.write(b"MAIL FROM:<" + sender + b">\r\n" + RCPT_OK + b"\r\nQUIT\r\n")
            replies = await c.replies_until_eof()
            await c.close()
            shown = [str(r) for r in replies]
            codes = [r.code for r in replies]
            if internal_error(replies) or codes[-1:] != [221] or len(codes) < 3:
                problems.append(f"session {i}: {shown}")
            elif not (500 <= codes[0] < 600 or 500 <= codes[1] < 600) or codes[1] == 250:
                problems.append(f"session {i}: no 5xx at MAIL/RCPT: {shown}")
        try:
            await env.down.settled(POOL)
        except AssertionError as exc:
            problems.append(f"after 20 sessions: {exc}")
    try:
        await env.down.all_closed()
    except AssertionError as exc:
        problems.append(f"after the relay stopped: {exc}")
    if env.down.messages:
        problems.append(f"delivered: {[m.mail for m in env.down.messages]}")
    assert not problems, "\n".join(problems[:3] + problems[-2:])


# --- D. one address, checked and delivered --------------------------------------------------

ODD_SENDERS = [
    pytest.param(b'"john doe"@example.test', id="quoted-space"),
    pytest.param(b'"a\\"b"@example.test', id="quoted-pair-dquote"),
    pytest.param(b'"john"@example.test', id="needlessly-quoted"),
    pytest.param(b'"a@b"@sender.test', id="quoted-at"),
    pytest.param(b"user+tag@example.test", id="plus-tag"),
    pytest.param(b"Mixed.Case@Sender.TEST", id="mixed-case"),
    pytest.param(b"o'brien@sender.test", id="apostrophe"),
    pytest.param(b"", id="null-sender"),
]


async def deliver_one(env: Env, mail: bytes, rcpt: bytes = RCPT_OK) -> None:
    c = await env.client()
    assert (r := await c.cmd(mail)).code == 250, str(r)
    assert (r := await c.cmd(rcpt)).code == 250, str(r)
    assert (r := await c.cmd("DATA")).code == 354, str(r)
    assert (r := await c.exchange(BODY + b".\r\n")).code == 250, str(r)
    await c.cmd("QUIT")
    await c.close()
    await env.down.settled(POOL)


@pytest.mark.parametrize("path", ODD_SENDERS)
async def test_sender_path_reaches_downstream_byte_for_byte(tmp_path: Path, path: bytes) -> None:
    """RFC 5321 4.1.2 / 3.3: a legal reverse-path (quoted local parts, quoted-pairs,
    tags, case, the null path) is relayed as the same address: the downstream's MAIL FROM
    holds exactly the bytes the client put between < and >."""
    async with relay_env(tmp_path) as env:
        await deliver_one(env, b"MAIL FROM:<" + path + b">")
    [msg] = env.down.messages
    assert msg.mail_path == path, f"sent {path!r}, downstream got {msg.mail!r}"


ODD_RECIPIENTS = [
    pytest.param(b'"bob smith"@example.test', id="quoted-space"),
    pytest.param(b"Bob.Smith+tag@Example.TEST", id="case-and-tag"),
    pytest.param(b'"bob"@example.test', id="needlessly-quoted"),
]


@pytest.mark.parametrize("path", ODD_RECIPIENTS)
async def test_recipient_path_reaches_downstream_byte_for_byte(tmp_path: Path, path: bytes) -> None:
    """RFC 5321 4.1.2 / 4.1.1.3: the forward-path relay control accepted is the one the
    downstream receives, byte for byte."""
    async with relay_env(tmp_path) as env:
        await deliver_one(env, MAIL_OK, b"RCPT TO:<" + path + b">")
    [msg] = env.down.messages
    assert msg.rcpt_paths == [path], f"sent {path!r}, downstream got {msg.rcpts!r}"


# --- E. SMTPUTF8 and internationalised domains ----------------------------------------------

U_SENDER = "séndér@example.test".encode()
U_RCPT = "用户@example.test".encode()
U_BODY = (
    "From: séndér@example.test\r\nTo: 用户@example.test\r\nSubject: héllo\r\n\r\nÜ\r\n".encode()
)


async def test_smtputf8_relayed_byte_exact_to_smtputf8_downstream(tmp_path: Path) -> None:
    """RFC 6531 3.4/3.7: with ``MAIL FROM:<séndér@...> SMTPUTF8`` an internationalised
    recipient is accepted and relayed unchanged (UTF-8 paths and header bytes) to a
    downstream that advertises SMTPUTF8, with the SMTPUTF8 parameter on its MAIL."""
    async with relay_env(tmp_path, smtputf8=True) as env:
        c = await env.client()
        assert (r := await c.cmd(b"MAIL FROM:<" + U_SENDER + b"> SMTPUTF8")).code == 250, str(r)
        assert (r := await c.cmd(b"RCPT TO:<" + U_RCPT + b">")).code == 250, str(r)
        assert (r := await c.cmd("DATA")).code == 354, str(r)
        assert (r := await c.exchange(U_BODY + b".\r\n")).code == 250, str(r)
        await c.close()
        await env.down.settled(POOL)
    [msg] = env.down.messages
    assert msg.mail_path == U_SENDER, msg.mail
    assert b"SMTPUTF8" in msg.mail_params, msg.mail
    assert msg.rcpt_paths == [U_RCPT], msg.rcpts
    assert msg.data is not None and msg.data.endswith(U_BODY)


async def test_smtputf8_to_downstream_without_smtputf8_is_refused_with_5_6_7(
    tmp_path: Path,
) -> None:
    """RFC 6531 3.2/3.5: a relay must not pass an internationalised envelope to a server
    that does not offer SMTPUTF8, nor mangle it; the transaction is refused with 550/553
    and status 5.6.7, and nothing (not one non-ASCII byte) is sent downstream."""
    async with relay_env(tmp_path, smtputf8=False) as env:
        c = await env.client()
        steps = [
            b"MAIL FROM:<" + U_SENDER + b"> SMTPUTF8\r\n",
            b"RCPT TO:<" + U_RCPT + b">\r\n",
            b"DATA\r\n",
            U_BODY + b".\r\n",
        ]
        refusal: WireReply | None = None
        seen: list[str] = []
        for step in steps:
            reply = await c.exchange(step)
            seen.append(str(reply))
            if reply.code >= 400:
                refusal = reply
                break
        await c.close()
        await env.down.settled(POOL)
    assert refusal is not None, f"never refused: {seen}"
    assert refusal.code in (550, 553, 554), seen
    assert refusal.enhanced == "5.6.7", seen
    assert seen[0].startswith("250"), f"MAIL ... SMTPUTF8 must be accepted first: {seen}"
    assert env.down.messages == []
    assert all(line.isascii() for line in env.down.all_lines), env.down.describe()


@pytest.mark.parametrize(
    ("mail", "rcpt"),
    [
        pytest.param(b"MAIL FROM:<" + U_SENDER + b">", None, id="utf8-sender"),
        pytest.param(MAIL_OK, b"RCPT TO:<" + U_RCPT + b">", id="utf8-recipient"),
    ],
)
async def test_non_ascii_address_without_smtputf8_is_553_5_6_7(
    tmp_path: Path, mail: bytes, rcpt: bytes | None
) -> None:
    """RFC 6531 3.5: a non-ASCII address in a transaction whose MAIL lacks the SMTPUTF8
    parameter is refused with 553 5.6.7 (not aiosmtpd's ``500 Error: strict ASCII mode``)."""
    async with relay_env(tmp_path) as env:
        c = await env.client()
        reply = await c.cmd(mail)
        if rcpt is not None:
            assert reply.code == 250, str(reply)
            reply = await c.cmd(rcpt)
        await c.close()
        await env.down.settled(POOL)
    assert reply.code == 553, str(reply)
    assert reply.enhanced == "5.6.7", str(reply)
    assert env.down.mail_lines == []


async def rcpt_after_smtputf8_mail(env: Env, rcpt: str) -> WireReply:
    c = await env.client()
    mail = await c.cmd(MAIL_OK + b" SMTPUTF8")
    assert mail.code == 250, f"precondition: MAIL ... SMTPUTF8 must be accepted: {mail}"
    reply = await c.cmd(b"RCPT TO:<" + rcpt.encode() + b">")
    await c.cmd("QUIT")
    await c.close()
    await env.down.settled(POOL)
    return reply


async def test_u_label_of_configured_a_label_domain_is_local(tmp_path: Path) -> None:
    """RFC 6531 3.2 / RFC 5890 2.3.2.1: relay control compares domains in A-label form, so
    ``user@bücher.test`` is local when ``xn--bcher-kva.test`` is configured; the downstream
    gets the recipient as sent."""
    async with relay_env(tmp_path) as env:
        reply = await rcpt_after_smtputf8_mail(env, "user@bücher.test")
    assert reply.code == 250, str(reply)
    assert [path_of(line) for t in env.down.transactions for line in t.rcpts] == [
        "user@bücher.test".encode()
    ]


async def test_a_label_recipient_is_local_without_smtputf8(tmp_path: Path) -> None:
    """The A-label form itself is plain ASCII and needs no SMTPUTF8 (control case)."""
    async with relay_env(tmp_path) as env:
        c = await env.client()
        assert (await c.cmd(MAIL_OK)).code == 250
        assert (r := await c.cmd("RCPT TO:<user@xn--bcher-kva.test>")).code == 250, str(r)
        await c.close()


async def test_unconfigured_u_label_domain_is_relay_denied(tmp_path: Path) -> None:
    """RFC 5321 3.6 / issue 13: an internationalised domain that is not configured is
    refused for a client outside the relay networks with 550/554 and 5.7.1."""
    async with relay_env(tmp_path) as env:
        reply = await rcpt_after_smtputf8_mail(env, "user@münchen.test")
    assert reply.code in (550, 554), str(reply)
    assert reply.enhanced == "5.7.1", str(reply)
    assert not any(line.startswith(b"RCPT") for line in env.down.all_lines)


UNICODE_TRICKS = [
    pytest.param("bob\uff20elsewhere.test", id="fullwidth-at-only"),
    pytest.param("bob@example\uff0etest", id="fullwidth-dot-to-local"),
    pytest.param("bob@elsewhere\uff0etest", id="fullwidth-dot-to-remote"),
    pytest.param("bob@example\u3002test", id="ideographic-full-stop"),
    pytest.param("bob@example\uff61test", id="halfwidth-ideographic-full-stop"),
    pytest.param("bob@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test", id="fullwidth-letters"),
    pytest.param("bob@exam\u00adple.test", id="soft-hyphen"),
    pytest.param("bob@exam\u200bple.test", id="zero-width-space"),
    pytest.param("bob@exam\u200dple.test", id="zero-width-joiner"),
    pytest.param("bob@stra\u00dfe.test", id="sharp-s-transitional"),
    pytest.param("bob@bu\u0308cher.test", id="decomposed-u-umlaut"),
    pytest.param("bob@ex\u0430mple.test", id="cyrillic-a-homoglyph"),
]


@pytest.mark.parametrize("rcpt", UNICODE_TRICKS)
async def test_unicode_tricks_never_open_the_relay(tmp_path: Path, rcpt: str) -> None:
    """RFC 5890/5891 (IDNA2008, no lax mapping) and RFC 6531: lookalike separators
    (U+FF20, U+FF0E, U+3002, U+FF61), compatibility/width forms, default-ignorables and
    transitional mappings are not folded into a configured domain (nor an extra '@'); for
    a client outside the relay networks such a recipient is never accepted."""
    async with relay_env(tmp_path) as env:
        reply = await rcpt_after_smtputf8_mail(env, rcpt)
    assert not 200 <= reply.code < 300, f"{rcpt!r} accepted: {reply}"
    assert 500 <= reply.code < 600, str(reply)
    assert not any(line.startswith(b"RCPT") for line in env.down.all_lines)


async def test_fullwidth_at_in_local_part_is_not_folded(tmp_path: Path) -> None:
    """RFC 6531 3.3 / issue 13: ``bob\uff20elsewhere.test@example.test`` is a local part
    with a FULLWIDTH COMMERCIAL AT at a configured domain. Treated as what it is, it may be
    refused or accepted, but never folded into ``bob@elsewhere.test@...`` (a relay trick):
    if accepted, the downstream gets exactly the bytes the client sent."""
    rcpt = "bob\uff20elsewhere.test@example.test"
    async with relay_env(tmp_path) as env:
        reply = await rcpt_after_smtputf8_mail(env, rcpt)
    rcpt_lines = [line for line in env.down.all_lines if line.startswith(b"RCPT")]
    if 200 <= reply.code < 300:
        assert [path_of(line) for line in rcpt_lines] == [rcpt.encode()], rcpt_lines
    else:
        assert 500 <= reply.code < 600, str(reply)
        assert rcpt_lines == []


# --- F. end of data and outbound hygiene ----------------------------------------------------


@dataclass(frozen=True)
class Lookalike:
    id: str
    eod: bytes  # replaces the <CRLF>.<CRLF> after the first message's last line
    expected: str  # "refuse" (5xx, nothing delivered) or "deliver" (one clean message)
    source: str


# Expected outcomes (docs/smtp.md): a lone dot between bare line ends -> 550 5.5.2; a NUL
# anywhere -> 550 5.6.0; other bare line ends -> normalised to CRLF. Whatever the row says,
# the invariants in the test hold for every shape.
LOOKALIKES = [
    Lookalike("LF.LF", b"\n.\n", "refuse", "SEC Consult 2023; Postfix smtp-smuggling"),
    Lookalike("LF.CRLF", b"\n.\r\n", "refuse", "SEC Consult 2023; Postfix bare newline"),
    Lookalike("CRLF.LF", b"\r\n.\n", "refuse", "SEC Consult 2023 (Sendmail/Cisco)"),
    Lookalike("CR.CR", b"\r.\r", "refuse", "SEC Consult 2023"),
    Lookalike("CR.CRLF", b"\r.\r\n", "refuse", "SEC Consult 2023"),
    Lookalike("CRLF.CR", b"\r\n.\r", "refuse", "SEC Consult 2023"),
    Lookalike("LF.CR", b"\n.\r", "refuse", "SEC Consult 2023 analysis tool"),
    Lookalike("CR.LF", b"\r.\n", "refuse", "SEC Consult 2023 analysis tool"),
    Lookalike("CRLF-NUL.CRLF", b"\r\n\x00.\r\n", "refuse", "SEC Consult 2023"),
    Lookalike("CRLF.NUL-CRLF", b"\r\n.\x00\r\n", "refuse", "SEC Consult 2023"),
    Lookalike("CRLF-NUL.CR", b"\r\n\x00.\r", "refuse", "smtp_smuggling_checker payloads"),
    Lookalike("CRLF-NUL.LF", b"\r\n\x00.\n", "refuse", "smtp_smuggling_checker payloads"),
    Lookalike("LF-LF.CRLF", b"\n\n.\r\n", "refuse", "smtp_smuggling_checker payloads"),
    Lookalike("CRLF.CR-CRLF", b"\r\n.\r\r\n", "refuse", "receivers that strip trailing CR"),
    Lookalike("CRLF.SP-CRLF", b"\r\n. \r\n", "deliver", "receivers that trim whitespace"),
]
assert len({shape.eod for shape in LOOKALIKES}) == 15

SMUGGLED = (
    b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    b"From: admin@example.test\r\nSubject: smuggled\r\n\r\nevil"
)


NUL = b"\x00"


def hygiene_violations(data: bytes) -> list[str]:
    """RFC 5321 2.3.8 / 4.1.1.4: what an SMTP client must never put into DATA."""
    problems = []
    if NUL in data:
        problems.append(f"NUL at {data.index(NUL)}")
    if (m := re.search(rb"\r(?!\n)", data)) is not None:
        problems.append(f"bare CR at {m.start()}")
    if (m := re.search(rb"(?<!\r)\n", data)) is not None:
        problems.append(f"bare LF at {m.start()}")
    return problems


def on_the_wire(sent: bytes) -> bytes:
    """What a correct relay passes on for DATA lines ``sent`` (CRLF-terminated): RFC 5321
    4.5.2 transparency undone on the way in (a line that starts with "." loses it), bare
    CR and LF made CRLF (docs/smtp.md), transparency redone on the way out."""
    lines = [line[1:] if line.startswith(b".") else line for line in sent.split(b"\r\n")]
    content = re.sub(rb"\r\n|\r|\n", b"\r\n", b"\r\n".join(lines))
    return b"\r\n".join(b"." + x if x.startswith(b".") else x for x in content.split(b"\r\n"))


def test_wire_model() -> None:
    assert on_the_wire(b"a\r\n. \r\n") == b"a\r\n \r\n"
    assert on_the_wire(b"a\r\n..\r\n") == b"a\r\n..\r\n"
    assert on_the_wire(b"a\n..b\r\n") == b"a\r\n...b\r\n"


@pytest.mark.parametrize("shape", LOOKALIKES, ids=lambda s: s.id)
async def test_end_of_data_lookalike_is_never_smuggled(tmp_path: Path, shape: Lookalike) -> None:
    """RFC 5321 2.3.8 and 4.1.1.4 (SMTP smuggling, SEC Consult Dec 2023; Postfix
    smtpd_forbid_bare_newline): a message holding an end-of-data lookalike, a smuggled
    MAIL/RCPT/DATA block and then the real <CRLF>.<CRLF> gets exactly one reply: 5xx and
    nothing delivered, or 250 and exactly one message whose bytes on the downstream wire
    hold no bare CR, no bare LF and no NUL. The smuggled block never becomes a transaction
    (neither on the relay's session nor downstream)."""
    payload = b"Subject: first\r\n\r\nhello" + shape.eod + SMUGGLED + b"\r\n.\r\n"
    async with relay_env(tmp_path) as env:
        c = await env.client()
        await c.write(MAIL_OK + b"\r\n" + RCPT_OK + b"\r\nDATA\r\n")
        assert [r.code for r in await c.replies(3)] == [250, 250, 354]
        await c.write(payload)
        verdict = await c.reply()
        # One reply for the whole payload: had the relay split it, the smuggled commands
        # would be answered before these two.
        await c.write(b"RSET\r\nQUIT\r\n")
        rest = await c.replies_until_eof()
        await c.close()
        await env.down.settled(POOL)
    assert [r.code for r in rest] == [250, 221], f"{verdict} then {[str(r) for r in rest]}"
    assert verdict.code == 250 or 500 <= verdict.code < 600, str(verdict)
    down = env.down
    assert not any(b"admin@example.test" in line for line in down.all_lines), down.describe()
    assert not any(b"victim@example.test" in line for line in down.all_lines), down.describe()
    for msg in down.messages:
        assert msg.wire_data is not None
        assert not hygiene_violations(msg.wire_data), (
            f"{hygiene_violations(msg.wire_data)} in {msg.wire_data!r}"
        )
    if verdict.code == 250:
        [msg] = down.messages
        assert msg.wire_data is not None
        # the exact bytes after the relay's own header fields
        expected = on_the_wire(payload[: -len(b".\r\n")])
        assert msg.wire_data.endswith(expected), msg.wire_data[-200:]
    else:
        assert down.messages == []
    outcome = "deliver" if verdict.code == 250 else "refuse"
    assert outcome == shape.expected, f"expected {shape.expected}, got {verdict}"


async def test_clean_message_is_relayed_byte_exact(tmp_path: Path) -> None:
    """Baseline for section F (RFC 5321 4.5.2): a well-formed message with a dot-stuffed
    line reaches the downstream with the client's bytes after our trace header, stuffing
    intact on the wire, and passes the hygiene check."""
    body = b"Subject: clean\r\n\r\n..leading dot\r\nend\r\n"
    async with relay_env(tmp_path) as env:
        c = await env.client()
        await c.write(MAIL_OK + b"\r\n" + RCPT_OK + b"\r\nDATA\r\n")
        assert [r.code for r in await c.replies(3)] == [250, 250, 354]
        assert (await c.exchange(body + b".\r\n")).code == 250
        await c.close()
        await env.down.settled(POOL)
    [msg] = env.down.messages
    assert msg.wire_data is not None and msg.wire_data.endswith(body)
    assert msg.data is not None and msg.data.endswith(b"\r\n.leading dot\r\nend\r\n")
    assert not hygiene_violations(msg.wire_data)


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\rb\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n\nb\r\n", b"a\r\n\r\nb\r\n"),
        # not a line start in SMTP terms (lines end in CRLF), so nothing is unstuffed on the
        # way in; once it is a line of its own the dot is stuffed on the way out
        (b"a\n..b\r\n", b"a\r\n...b\r\n"),
    ],
    ids=["LF", "CR", "CR-CR", "LF-LF", "LF-dotdot"],
)
async def test_bare_line_ends_reach_the_downstream_as_crlf(
    tmp_path: Path, sent: bytes, received: bytes
) -> None:
    """RFC 5321 2.3.8: bare CR and bare LF that are not near a lone dot are normalised to
    CRLF (Postfix 3.9's default), so the downstream gets exactly these bytes."""
    async with relay_env(tmp_path) as env:
        c = await env.client()
        await c.write(MAIL_OK + b"\r\n" + RCPT_OK + b"\r\nDATA\r\n")
        assert [r.code for r in await c.replies(3)] == [250, 250, 354]
        await c.write(b"Subject: bare\r\n\r\n" + sent + b".\r\n")
        assert (await c.reply()).code == 250
        await c.write(b"QUIT\r\n")
        await c.replies_until_eof()
        await c.close()
        await env.down.settled(POOL)
    [msg] = env.down.messages
    assert msg.wire_data is not None
    assert msg.wire_data.endswith(b"Subject: bare\r\n\r\n" + received), msg.wire_data[-80:]
    assert not hygiene_violations(msg.wire_data)
