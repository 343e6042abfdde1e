"""The Authentication-Results stamp: format (checked with the authres parser), forged-header
removal, byte-exact prepending, and the auth facts it reads."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import authres
import dkim
import pytest

from relay.auth.arfields import authserv_id_of, is_ours
from relay.auth.checker import Authenticator
from relay.facts import Facts, Services, default_registry
from relay.facts.auth import FACTS
from relay.pipeline.authresults import AuthResultsStamp, format_value
from relay.verdict import ACCEPT_ALL, Tier
from tests.support.authenv import authenticator, incoming
from tests.support.dkimkeys import SigningKey, make_message, rsa_key, sign
from tests.support.dnsserver import LocalDns
from tests.support.relay import make_settings, running_relay, send, sink_server

ID = "relay.test"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return rsa_key("example.com", "k1", 2048)


@pytest.fixture(scope="module")
def dns(key: SigningKey) -> Iterator[LocalDns]:
    zone: dict[str, list[tuple[Any, ...]]] = {
        key.name: [("TXT", key.txt)],
        "example.com.": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        "_dmarc.example.com.": [("TXT", "v=DMARC1; p=reject")],
    }
    with LocalDns(zone) as server:
        yield server


@pytest.fixture
async def auth(dns: LocalDns) -> AsyncIterator[Authenticator]:
    async with authenticator(dns) as a:
        yield a


def props(result: Any) -> dict[str, str]:
    """Every ptype.property=value of one parsed resinfo."""
    return {f"{p.type}.{p.name}": p.value for p in result.properties}


def _header_value(raw: bytes) -> str:
    """Our Authentication-Results field (with its continuation lines), wherever it is."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    match = re.search(
        r"^Authentication-Results: relay\.test;.*?(?=\r\n[^ \t]|\Z)", head, re.M | re.S
    )
    assert match is not None, "no Authentication-Results from relay.test"
    return match.group(0)


async def stamped(auth: Authenticator, raw: bytes, **kw: Any) -> tuple[bytes, Facts]:
    message = incoming(raw, **kw)
    facts = Facts(default_registry(), message, Services(authenticator=auth))
    out = await AuthResultsStamp(ID)(message, facts, ACCEPT_ALL)
    return out.raw, facts


async def test_header_parses_as_rfc8601(auth: Authenticator, key: SigningKey) -> None:
    signed = sign(make_message(), key)
    raw, _ = await stamped(auth, signed)
    header = authres.AuthenticationResultsHeader.parse(_header_value(raw))
    assert header.authserv_id == ID
    found = [(r.method, r.result, props(r)) for r in header.results]
    assert found[0][:2] == ("dkim", "pass")
    assert found[0][2]["header.d"] == "example.com"
    assert found[0][2]["header.a"] == "rsa-sha256" and found[0][2]["header.s"] == "k1"
    assert found[1] == ("spf", "pass", {"smtp.mailfrom": "alice@example.com"})
    assert found[2] == ("spf", "none", {"smtp.helo": "mail.example.com"})  # no HELO record
    assert found[3] == ("dmarc", "pass", {"header.from": "example.com"})
    assert found[4][:2] == ("arc", "none")


async def test_exactly_one_header_prepended_byte_exact(
    auth: Authenticator, key: SigningKey, dns: LocalDns
) -> None:
    signed = sign(make_message(), key)
    raw, _ = await stamped(auth, signed)
    assert raw.endswith(signed)  # the rest of the message is untouched
    assert raw.count(b"Authentication-Results:") == 1
    # downstream DKIM still verifies the delivered bytes
    record = key.txt.encode()
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: record)


async def test_forged_headers_with_our_id_are_removed(auth: Authenticator) -> None:
    forged = (
        b"Authentication-Results: relay.test; dkim=pass header.d=bank.example\r\n"
        b"Authentication-Results: (comment) RELAY.TEST;\r\n\tspf=pass\r\n"
        b'Authentication-Results: "relay.test" 1; dmarc=pass\r\n'
        b"Authentication-Results: mx.other.example; spf=fail\r\n"
    )
    raw, _ = await stamped(auth, forged + make_message())
    assert raw.count(b"Authentication-Results:") == 2
    assert b"mx.other.example; spf=fail" in raw  # someone else's results are kept
    assert b"bank.example" not in raw and b'"relay.test" 1' not in raw


async def test_forged_headers_in_disguise_are_removed(auth: Authenticator) -> None:
    """Issue 15, finding 2: a trailing dot or an RFC 2047 encoded word once hid our id."""
    forged = (
        b"Authentication-Results: relay.test.; dkim=pass header.d=dot.example\r\n"
        b"Authentication-Results: =?utf-8?q?relay.test?=; dkim=pass header.d=word.example\r\n"
        b"Authentication-Results: =?UTF-8?B?UkVMQVkudGVzdA==?=; spf=pass header.d=b.example\r\n"
        b"Authentication-Results:\r\n (x) RELAY.test ; dmarc=pass header.d=fold.example\r\n"
        b"Authentication-Results: mail.relay.test; spf=fail\r\n"
    )
    raw, _ = await stamped(auth, forged + make_message())
    assert raw.count(b"Authentication-Results:") == 2
    assert b"Authentication-Results: mail.relay.test; spf=fail\r\n" in raw
    for domain in (b"dot", b"word", b"b", b"fold"):
        assert domain + b".example" not in raw


IDN = "b\u00fccher.example"  # an internationalised authserv-id, U-label
IDN_A = "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("value", "authserv_id"),
    [
        (" relay.test; dkim=pass", ID),  # plain
        (" RELAY.Test; dkim=pass", ID),  # upper case
        (" relay.test.; dkim=pass", ID),  # trailing dot
        (" =?utf-8?q?relay.test?=; dkim=pass", ID),  # encoded word, Q
        (" =?UTF-8?B?cmVsYXkudGVzdA==?=; dkim=pass", ID),  # encoded word, B
        (" =?utf-8?q?relay?= =?utf-8?q?.test?=; x", ID),  # two words, one id
        (" =?utf-8?q?relay?=.test; x", ID),  # a word glued to text
        (" (x) relay.test; dkim=pass", ID),  # comment before
        (" (a (nested) \\) comment)relay.test;", ID),  # nested and quoted-pair comment
        ("\r\n\trelay.test;\r\n\tdkim=pass", ID),  # leading fold
        ("relay.test   ; dkim=pass", ID),  # extra blanks before ;
        (" relay.test 1; dkim=pass", ID),  # version suffix
        (' "relay.test"; dkim=pass', ID),  # quoted
        (" relay.test", ID),  # no results at all
        (f" {IDN_A}; dkim=pass", IDN),  # A-label claim, U-label id
        (f" {IDN}; dkim=pass", IDN_A),  # U-label claim, A-label id
        (" =?utf-8?q?b=C3=BCcher.example?=; x", IDN_A),  # U-label in an encoded word
        (f" {IDN.upper()}.; x", IDN_A),  # U-label in upper case, trailing dot
        (" relay.test; x", "RELAY.TEST."),  # our configured id written otherwise
    ],
)
def test_is_ours(value: str, authserv_id: str) -> None:
    assert is_ours(value, authserv_id)


@pytest.mark.parametrize(
    ("value", "authserv_id"),
    [
        (" mx.other.example; spf=fail", ID),  # another domain
        (" mail.relay.test; spf=pass", ID),  # a subdomain of ours is someone else
        (" relay.test.evil; spf=pass", ID),  # ours as a prefix
        (" xrelay.test; spf=pass", ID),  # ours as a suffix
        (" (relay.test) other.example; x", ID),  # ours only in a comment
        (" other.example; dkim=pass header.d=relay.test", ID),  # ours as a property
        (" =?utf-8?q?mail.relay.test?=; x", ID),  # someone else, encoded
        (" =?bogus?q?relay.test?=; x", "other.example"),  # broken charset: not ours either
        (" ; dkim=pass", ID),  # no id
        ("", ID),
        (f" {IDN_A}.evil; x", IDN),
        (" xn--bcher-kva; x", IDN),  # a label of ours only
        (" relay.test; x", ""),  # no id of ours: nothing is ours
    ],
)
def test_is_not_ours(value: str, authserv_id: str) -> None:
    assert not is_ours(value, authserv_id)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"Authentication-Results: relay.test; none", "relay.test"),
        (b"Authentication-Results:relay.test;none", "relay.test"),
        (b"Authentication-Results: (c (nested)) Relay.Test 1;", "relay.test"),
        (b'Authentication-Results: "relay.test"; x', "relay.test"),
        (b"Authentication-Results: \r\n\trelay.test;", "relay.test"),
        (b"Authentication-Results: relay.test.evil; x", "relay.test.evil"),
        (b"Authentication-Results: ;", ""),
    ],
)
def test_authserv_id_of(field: bytes, expected: str) -> None:
    assert authserv_id_of(field) == expected


def test_values_are_quoted_and_ascii() -> None:
    value = format_value(
        "relay.test",
        {
            "dkim": {
                "limit": 10,
                "note": "",
                "signatures": [
                    {
                        "result": "permerror",
                        "reason": 'bad "tag" \\ here',
                        "domain": "exämple.com",
                        "selector": "s;1",
                        "algorithm": "rsa-sha256",
                        "b_prefix": "ab/+",
                    },
                ],
            },
            "spf": {"result": "none", "sender": "we;ird@example.com"},
            "spf_helo": {},
            "dmarc": {"result": "none"},
            "arc": {"result": "none"},
        },
    )
    value.encode("ascii")
    assert 'reason="bad \\"tag\\" \\\\ here"' in value
    assert 'header.d="ex?mple.com"' in value and 'header.s="s;1"' in value
    assert 'header.b="ab/+"' in value
    assert 'smtp.mailfrom="we;ird@example.com"' in value
    # (authres 1.2 drops quoted values that are not last, so only the structure is parsed)
    header = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
    assert [(r.method, r.result) for r in header.results] == [
        ("dkim", "permerror"),
        ("spf", "none"),
        ("dmarc", "none"),
        ("arc", "none"),
    ]
    assert all(line.startswith("\t") for line in value.split("\r\n")[1:])


async def test_facts_are_json_and_tier_one(auth: Authenticator, key: SigningKey) -> None:
    signed = sign(make_message(), key)
    _, facts = await stamped(auth, signed)
    names = [spec.name for spec in FACTS]
    for name in names:
        await facts.get(name)
    reads = {r.name: r for r in facts.reads()}
    assert {r.tier for r in reads.values() if r.name in names} == {Tier.ENVELOPE}
    json.dumps({name: reads[name].value for name in names})
    values = {name: reads[name].value for name in names}
    assert values["dkim_result"] == "pass"
    assert values["dkim_domains_pass"] == ["example.com"]
    assert values["dkim_key_bits"] == 2048
    assert values["dkim_weak"] is False
    assert values["spf"] == "pass" and values["spf_domain"] == "example.com"
    assert values["dmarc"] == "pass" and values["dmarc_policy"] == "reject"
    assert values["dmarc_aligned"] is True
    assert values["arc"] == "none"
    assert values["from_domain"] == "example.com"
    assert values["dkim"]["signatures"][0]["headers"][0] == "from"
    assert reads["auth_results"].error is None


async def test_missing_service_still_stamps_temperror() -> None:
    message = incoming(make_message())
    facts = Facts(default_registry(), message, Services())
    out = await AuthResultsStamp(ID)(message, facts, ACCEPT_ALL)
    header = authres.AuthenticationResultsHeader.parse(_header_value(out.raw))
    assert {r.method: r.result for r in header.results} == {
        "dkim": "temperror",
        "spf": "temperror",
        "dmarc": "temperror",
    }


@pytest.mark.parametrize("enabled", [True, False])
async def test_relay_strips_forgeries_and_stamps_over_smtp(
    tmp_path: Path, dns: LocalDns, enabled: bool
) -> None:
    forged = b"Authentication-Results: relay.test; dkim=pass header.d=bank.example\r\n"
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path,
            {
                "auth": {"enabled": enabled, "authserv_id": "relay.test"},
                "dns": {"nameservers": [dns.address], "timeout": 1},
                "delivery": {"mode": "smtp", "downstream": sink.address},
            },
        )
        async with running_relay(settings) as relay:
            await send(
                relay.port, ["bob@example.org"], forged + make_message(), sender="alice@example.com"
            )
    (received,) = sink.messages
    if not enabled:  # auth off: the relay adds and removes nothing
        assert forged in received.data
        assert received.data.count(b"Authentication-Results:") == 1
        return
    assert received.data.count(b"Authentication-Results: relay.test") == 1
    assert b"bank.example" not in received.data
    header = authres.AuthenticationResultsHeader.parse(_header_value(received.data))
    assert [(r.method, r.result) for r in header.results][:2] == [("dkim", "none"), ("spf", "fail")]


async def test_hostile_authentication_headers_still_flow(
    tmp_path: Path, dns: LocalDns, key: SigningKey
) -> None:
    bogus = [
        "v=1; a=rsa-sha256; d=example.com; s=k1; h=from; bh=AAAA; b=AAAA; garbage",
        "v=1; a=rsa-sha256; d=example.com; d=x.example; s=k1; h=from; bh=AAAA; b=AAAA",
        "v=1; a=rsa-sha256; d=exämple.com; s=k1; h=from; bh=AAAA; b=!!",
    ] * 17  # 51 signatures, every one broken
    head = b"".join(f"DKIM-Signature: {v}\r\n".encode() for v in bogus)
    head += b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=x.example; s=s; b=AAAA\r\n"
    head += b"X-Padding: " + b"\r\n\t".join([b"y" * 900] * 220) + b"\r\n"  # ~200 KB field
    raw = head + make_message(from_addr="a@bücher.example")
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path,
            {
                "auth": {"enabled": True, "authserv_id": "relay.test"},
                "dns": {"nameservers": [dns.address], "timeout": 1},
                "delivery": {"mode": "smtp", "downstream": sink.address},
            },
        )
        async with running_relay(settings) as relay:
            await send(relay.port, ["bob@example.org"], sign(raw, key), sender="a@example.com")
    (received,) = sink.messages
    value = _header_value(received.data)
    assert value.count("dkim=") == 10 + 1  # 10 verified and the limit note, nothing more
    assert "only the first 10 of 52 signatures were verified" in value
    assert "arc=fail" in value
    assert "dkim=pass" in value  # the one good signature still counts
    assert "header.from=xn--bcher-kva.example" in value
    assert received.data.endswith(make_message(from_addr="a@bücher.example"))


def test_long_values_are_cut_and_folded() -> None:
    long_i = "x" * 5000 + "@example.com"
    value = format_value(
        "relay.test",
        {
            "dkim": {
                "limit": 10,
                "signatures": [
                    {
                        "result": "fail",
                        "reason": "r" * 500,
                        "domain": "example.com",
                        "identity": long_i,
                        "selector": "s" * 3000,
                        "algorithm": "rsa-sha256",
                    },
                ],
            },
            "spf": {"result": "none"},
            "dmarc": {"result": "none"},
            "arc": {"result": "none"},
        },
    )
    lines = value.split("\r\n")
    assert max(len(line) for line in lines) < 300  # far under RFC 5322's 998
    assert all(line[:1] in (" ", "\t") for line in lines[1:])
    assert "header.d=example.com" in value and "..." in value
    header = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
    assert (header.results[0].method, header.results[0].result) == ("dkim", "fail")
