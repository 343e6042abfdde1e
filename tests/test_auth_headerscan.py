"""The header scan's From domain: the quick path for plain fields gives exactly what the
stdlib's full RFC 5322 parser gives, and everything else still goes to that parser."""

from __future__ import annotations

import random

import pytest

from relay.auth.headerscan import (
    _SIMPLE_FROM,
    FROM_PARSE_ON_LOOP,
    from_domain,
    parsed_from_domains,
    quick_scan,
    scan_headers,
    single_domain,
)
from relay.message import split_fields

SIMPLE = [
    b" alice@example.com",
    b" Alice <alice@example.com>",
    b" Alice Smith <alice.smith@Mail.Example.COM>\r\n",
    b" J. R. O'Neil-Smith <j.r+tag@sub.example.co.uk>",
    b" <bounce-12345=x@esp.example.net>",
    b" news_letter!#$%&'*/=?^`{|}~@example.com",
]

NOT_SIMPLE = [
    b" =?utf-8?q?Caf=C3=A9?= <cafe@example.org>",
    b' "Alice, the admin" <alice@example.com>',
    b' "admin@paypal.com" <mallory@evil.example>',
    b" alice@example.com (Alice)",
    b" alice@example.com, bob@example.org",
    b" Group: alice@example.com;",
    b" Alice <alice@example.com> <bob@example.org>",
    b" alice@[192.0.2.1]",
    b" alice@example.com.",
    b" Al\\ice <alice@example.com>",
    b" Alice <alice@b\xc3\xbccher.example>",
    b" Ren\xc3\xa9 <rene@example.fr>",
    b" <alice@example.com",
    b" alice@",
    b" @example.com",
    b" alice..x@example.com",
    b" alice@exa_mple.com",
    b"",
]


def _full(value: bytes) -> tuple[str, str]:
    """What from_domain answered before the quick path: the stdlib parser for all."""
    try:
        domains = parsed_from_domains(value)
    except Exception:
        return "", "From header field cannot be parsed"
    return single_domain(domains)


@pytest.mark.parametrize("value", SIMPLE)
def test_simple_fields_take_the_quick_path_with_the_same_domain(value: bytes) -> None:
    assert _SIMPLE_FROM.fullmatch(value)
    domain, error = from_domain([value])
    assert (domain, error) == _full(value)
    assert domain and not error


@pytest.mark.parametrize("value", NOT_SIMPLE)
def test_other_fields_go_to_the_full_parser(value: bytes) -> None:
    assert not _SIMPLE_FROM.fullmatch(value)
    assert from_domain([value]) == _full(value)


def test_quick_path_agrees_with_full_parser_on_random_fields() -> None:
    """Plain fields with a few random edits (insert, delete, replace a character)."""
    rng = random.Random(7489)
    alphabet = b"aB0.-_ <>@\",()'+\t;:\\[]\r\n\xc3"
    quick = 0
    for _ in range(20000):
        value = bytearray(rng.choice(SIMPLE))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(value) + 1)
            edit = rng.choice(("insert", "delete", "replace"))
            if edit != "insert" and at < len(value):
                del value[at]
            if edit != "delete":
                value.insert(at, rng.choice(alphabet))
        if not _SIMPLE_FROM.fullmatch(value):
            continue
        quick += 1
        assert from_domain([bytes(value)]) == _full(bytes(value)), value
    assert quick > 1000  # the generator did reach the quick path


def test_scan_finds_from_domain_and_key_names() -> None:
    block = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; h=from; bh=AA; b=AA\r\n"
        b"From: Alice <alice@Example.COM>\r\n"
        b"Subject: hi\r\n"
    )
    scan = scan_headers(block, 10)
    assert scan.from_domain == "example.com"
    assert scan.dkim_keys == (b"sel._domainkey.example.com.",)
    two = scan_headers(block + b"From: bob@example.org\r\n", 10)
    assert (two.from_domain, two.from_error) == ("", "more than one From header field")


def test_quick_scan_leaves_large_or_hostile_blocks_to_the_thread() -> None:
    plain = b"From: Alice <alice@example.com>\r\nSubject: hi\r\n"
    assert quick_scan(plain, 10, 32 * 1024) == scan_headers(plain, 10)
    quoted = b'From: "Alice, admin" <alice@example.com>\r\n'  # full parser, short: on loop
    assert quick_scan(quoted, 10, 32 * 1024) == scan_headers(quoted, 10)
    hostile = b"From: " + b"(" * (FROM_PARSE_ON_LOOP + 1) + b"\r\n"
    assert quick_scan(hostile, 10, 32 * 1024) is None
    assert scan_headers(hostile, 10).from_error  # the thread still answers
    assert quick_scan(plain + b"X-Pad: " + b"a" * 40000 + b"\r\n", 10, 32 * 1024) is None


def test_quick_scan_reads_the_fields_it_is_given() -> None:
    """The checker hands over the message's own split (``Message.header_split``), so the
    header is split once; the scan must use those fields, not split again."""
    block = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel; h=from; bh=x; b=y\r\n"
        b"From: Alice <alice@example.com>\r\n"
    )
    fields = split_fields(block).fields
    assert quick_scan(block, 10, 32 * 1024, fields) == scan_headers(block, 10)
    other = split_fields(b"From: bob@example.org\r\n").fields
    scan = quick_scan(block, 10, 32 * 1024, other)
    assert scan is not None and (scan.from_domain, scan.dkim_keys) == ("example.org", ())
