"""MAIL/RCPT argument parsing (relay/smtppath.py) and A-label domains (relay/idn.py)."""

from __future__ import annotations

import pytest

from relay.idn import to_alabel
from relay.reply import Reply, with_enhanced_status
from relay.smtp.paths import (
    BAD_PARAMETER,
    BAD_SENDER,
    CONTROL_CHAR,
    SOURCE_ROUTE,
    SYNTAX_MAIL,
    SYNTAX_RCPT,
    UNKNOWN_PARAMETER,
    PathArgument,
    check_sender,
    parse_argument,
)


def mail(arg: str | None) -> PathArgument | Reply:
    return parse_argument(arg, "FROM", SYNTAX_MAIL)


def rcpt(arg: str | None) -> PathArgument | Reply:
    return parse_argument(arg, "TO", SYNTAX_RCPT)


@pytest.mark.parametrize(
    ("arg", "path"),
    [
        ("FROM:<a@b.test>", "a@b.test"),
        ("from:<a@b.test>", "a@b.test"),
        ("FROM: <a@b.test>", "a@b.test"),  # Postfix takes the space; so do we
        ("FROM:<>", ""),
        ('FROM:<"john doe"@b.test>', '"john doe"@b.test'),
        ('FROM:<"a>b"@b.test>', '"a>b"@b.test'),
        ('FROM:<"a\\"b"@b.test>', '"a\\"b"@b.test'),
        ("FROM:<séndér@b.test> SMTPUTF8", "séndér@b.test"),
    ],
)
def test_paths_are_kept_exactly_as_sent(arg: str, path: str) -> None:
    parsed = mail(arg)
    assert isinstance(parsed, PathArgument)
    assert parsed.path == path


@pytest.mark.parametrize(
    "arg",
    [
        None,
        "",
        "FROM:",
        "FROM:<unterminated@example.test",
        "FROM:a@b.test",  # no angle brackets
        "FROM:<a b@example.test>",  # a space outside quotes
        "FROM:<a@b.test>x",  # junk glued to the path
        'FROM:<"open@b.test>',  # an unterminated quote swallows the bracket
        "TO:<a@b.test>",
        "FROMX:<a@b.test>",
    ],
)
def test_framing_errors_are_501(arg: str | None) -> None:
    assert mail(arg) == SYNTAX_MAIL


def test_rcpt_framing() -> None:
    assert rcpt("TO:") == SYNTAX_RCPT
    assert rcpt("TO:<>") == SYNTAX_RCPT  # a forward-path is never empty
    assert rcpt("TO:<a@b.test") == SYNTAX_RCPT
    parsed = rcpt("To:<Bob@Example.ORG>")
    assert isinstance(parsed, PathArgument) and parsed.path == "Bob@Example.ORG"


@pytest.mark.parametrize("code", [*range(0x00, 0x20), 0x7F, 0x85])
def test_every_control_character_is_refused(code: int) -> None:
    ch = chr(code)
    assert mail(f'FROM:<"a{ch}b"@b.test>') == CONTROL_CHAR
    assert mail(f"FROM:<a@b{ch}.test>") == CONTROL_CHAR
    assert rcpt(f"TO:<a{ch}@b.test>") == CONTROL_CHAR
    assert mail(f"FROM:<a@b.test> SIZE=1{ch}") == CONTROL_CHAR


def test_undecodable_bytes_are_refused() -> None:
    # aiosmtpd decodes with surrogateescape: invalid UTF-8 shows up as lone surrogates.
    arg = b"FROM:<\xff@b.test> SMTPUTF8".decode("utf-8", "surrogateescape")
    assert mail(arg) == CONTROL_CHAR


def test_parameters() -> None:
    parsed = mail("FROM:<a@b.test> size=100  BODY=8BITMIME SMTPUTF8")
    assert isinstance(parsed, PathArgument)
    assert parsed.params == (("SIZE", "100"), ("BODY", "8BITMIME"), ("SMTPUTF8", None))
    assert parsed.options() == ("SIZE=100", "BODY=8BITMIME", "SMTPUTF8")
    assert parsed.has("SMTPUTF8") and not parsed.has("RET")
    assert mail("FROM:<a@b.test> BODY=7BIT BODY=8BITMIME") == UNKNOWN_PARAMETER
    assert mail("FROM:<a@b.test> body=7BIT BODY=7BIT") == UNKNOWN_PARAMETER
    assert mail("FROM:<a@b.test> =x") == BAD_PARAMETER
    assert mail("FROM:<a@b.test> SIZE=") == BAD_PARAMETER
    assert mail("FROM:<a@b.test> SIZE=a=b") == BAD_PARAMETER  # '=' is not esmtp-value


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", None),
        ("a@b.test", None),
        ("a.b+tag@b.test", None),
        ('"john doe"@b.test', None),
        ('"ceo@bank.test"@spf.test', None),  # legal; judged and sent as this one string
        ("a@[192.0.2.1]", None),
        ("a@[IPv6:2001:db8::1]", None),
        ("séndér@bücher.test", None),
        ("@hop.test:a@b.test", SOURCE_ROUTE),
        ("a@b@c.test", BAD_SENDER),
        ("a..b@b.test", BAD_SENDER),
        (".a@b.test", BAD_SENDER),
        ("a@b.test.", BAD_SENDER),
        ("a@-b.test", BAD_SENDER),
        ("a@[999.1.1.1]", BAD_SENDER),
        ("a@[b.test]", BAD_SENDER),
        ("nodomain", BAD_SENDER),
        ("a@example\uff0etest", BAD_SENDER),  # full-width dot: not a dot
    ],
)
def test_sender_mailbox(path: str, expected: Reply | None) -> None:
    assert check_sender(path) == expected


@pytest.mark.parametrize(
    ("domain", "alabel"),
    [
        ("example.test", "example.test"),
        ("Example.TEST", "example.test"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("XN--BCHER-KVA.test", "xn--bcher-kva.test"),
    ],
)
def test_alabel(domain: str, alabel: str) -> None:
    assert to_alabel(domain) == alabel


@pytest.mark.parametrize(
    "domain",
    [
        "",
        "example.test.",
        ".example.test",
        "a..test",
        "example\uff0etest",  # full-width dot is not split on: no UTS 46 mapping
        "\uff45xample.test",  # full-width letter
        "Bücher.test",  # upper-case U-label: IDNA 2008 does not map case
        "xn--zz.test",  # a bogus A-label
        "a_b.test",
        "-a.test",
        "a" * 64 + ".test",
    ],
)
def test_alabel_refuses(domain: str) -> None:
    with pytest.raises(ValueError):
        to_alabel(domain)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("220 relay ESMTP", "220 relay ESMTP"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("250 2.1.0 Ok", "250 2.1.0 Ok"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        ("250 OK", "250 2.0.0 OK"),
    ],
)
def test_enhanced_status_is_added_where_missing(line: str, expected: str) -> None:
    assert with_enhanced_status(line) == expected
