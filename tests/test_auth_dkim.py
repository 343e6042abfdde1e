"""DKIM verification of messages signed in the test, keys served by a real loopback DNS."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from relay.auth.checker import Authenticator
from relay.auth.results import DkimResults, DkimSignatureResult
from relay.config import settings_from_mapping
from relay.dns import Resolver
from relay.errors import ConfigError
from tests.support.authenv import authenticator, incoming
from tests.support.dkimkeys import (
    SigningKey,
    ed25519_key,
    make_message,
    rsa_key,
    short_rsa_key,
    sign,
)
from tests.support.dnsserver import LocalDns


class Keys:
    def __init__(self) -> None:
        self.rsa2048 = rsa_key("example.com", "r2048", 2048)
        self.rsa1024 = rsa_key("example.com", "r1024", 1024)
        self.ed = ed25519_key("example.com", "ed")
        self.other = rsa_key("lists.example.net", "list", 2048)
        self.short = short_rsa_key("example.com", "r512", 512)
        self.missing = rsa_key("example.com", "gone", 1024)  # never published
        self.revoked = rsa_key("example.com", "revoked", 1024)
        self.slow = rsa_key("slow.example", "s", 1024)
        self.typed = rsa_key("example.com", "typed", 1024)  # published as k=ed25519


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def dns(keys: Keys) -> Iterator[LocalDns]:
    published = [keys.rsa2048, keys.rsa1024, keys.ed, keys.other, keys.short]
    zone: dict[str, list[tuple[Any, ...]]] = {k.name: [("TXT", k.txt)] for k in published}
    zone[keys.revoked.name] = [("TXT", "v=DKIM1; k=rsa; p=")]
    zone[keys.typed.name] = [("TXT", keys.typed.txt.replace("k=rsa", "k=ed25519"))]
    with LocalDns(zone, timeout=[keys.slow.name]) as server:
        yield server


@pytest.fixture
async def auth(dns: LocalDns) -> AsyncIterator[Authenticator]:
    async with authenticator(dns, timeout=1.0) as a:
        yield a


async def verify(auth: Authenticator, raw: bytes) -> DkimResults:
    return (await auth.check(incoming(raw))).dkim


async def only(auth: Authenticator, raw: bytes) -> DkimSignatureResult:
    results = await verify(auth, raw)
    assert len(results.signatures) == 1
    return results.signatures[0]


@pytest.mark.parametrize("which", ["rsa2048", "rsa1024", "ed"])
async def test_valid_signature_passes(auth: Authenticator, keys: Keys, which: str) -> None:
    key: SigningKey = getattr(keys, which)
    sig = await only(auth, sign(make_message(), key))
    assert sig.result == "pass", sig.reason
    assert sig.domain == "example.com" and sig.selector == key.selector
    assert sig.algorithm == key.algorithm.decode()
    assert sig.key_bits == {"rsa2048": 2048, "rsa1024": 1024, "ed": 256}[which]
    assert "from" in sig.headers and "subject" in sig.headers
    assert not sig.weak


async def test_rsa_sha1_passes_but_is_weak(auth: Authenticator, keys: Keys) -> None:
    sig = await only(auth, sign(make_message(), keys.rsa2048, algorithm=b"rsa-sha1"))
    assert (sig.result, sig.weak, sig.algorithm) == ("pass", True, "rsa-sha1")
    assert "RFC 8301" in sig.reason


async def test_header_tampering_fails(auth: Authenticator, keys: Keys) -> None:
    signed = sign(make_message(subject="Invoice 1"), keys.rsa2048)
    sig = await only(auth, signed.replace(b"Subject: Invoice 1", b"Subject: Invoice 9"))
    assert (sig.result, sig.reason) == ("fail", "signature did not verify")


async def test_body_tampering_fails(auth: Authenticator, keys: Keys) -> None:
    signed = sign(make_message(body="Pay 10 EUR\r\n"), keys.ed)
    sig = await only(auth, signed.replace(b"Pay 10 EUR", b"Pay 99 EUR"))
    assert (sig.result, sig.reason) == ("fail", "body hash mismatch")


async def test_simple_canonicalization_is_strict_relaxed_is_not(
    auth: Authenticator, keys: Keys
) -> None:
    msg = make_message(subject="Hello")
    simple = sign(msg, keys.rsa1024, canonicalize=(b"simple", b"simple"))
    relaxed = sign(msg, keys.rsa1024, canonicalize=(b"relaxed", b"relaxed"))
    respaced = [m.replace(b"Subject: Hello", b"Subject:   Hello") for m in (simple, relaxed)]
    assert (await only(auth, respaced[0])).result == "fail"
    relaxed_sig = await only(auth, respaced[1])
    assert relaxed_sig.result == "pass"
    assert relaxed_sig.canonicalization == "relaxed/relaxed"


async def test_body_length_tag_is_noted(auth: Authenticator, keys: Keys) -> None:
    signed = sign(make_message(body="Signed part\r\n"), keys.rsa1024, length=True)
    sig = await only(auth, signed + b"Appended by anyone\r\n")
    assert sig.result == "pass"  # l= lets unsigned text ride along: noted for policies
    assert sig.body_length == len(b"Signed part\r\n")


# dkimpy judges t= and x= against the verifier's clock; these lie far enough on either
# side of any day the tests may run (or a faked clock may claim).
Y2000, Y2001, Y2100 = 946_684_800, 978_307_200, 4_102_444_800


async def test_expired_signature_fails(auth: Authenticator, keys: Keys) -> None:
    tags = {b"t": str(Y2000).encode(), b"x": str(Y2001).encode()}
    sig = await only(auth, sign(make_message(), keys.rsa2048, tags=tags))
    assert sig.result == "fail" and "expired" in sig.reason
    assert sig.expires == Y2001


async def test_timestamp_in_future_fails(auth: Authenticator, keys: Keys) -> None:
    tags = {b"t": str(Y2100).encode()}
    sig = await only(auth, sign(make_message(), keys.rsa2048, tags=tags))
    assert sig.result == "fail" and "future" in sig.reason


async def test_unexpired_signature_passes(auth: Authenticator, keys: Keys) -> None:
    tags = {b"x": str(Y2100).encode()}
    assert (await only(auth, sign(make_message(), keys.rsa2048, tags=tags))).result == "pass"


async def test_missing_key_is_permerror(auth: Authenticator, keys: Keys) -> None:
    sig = await only(auth, sign(make_message(), keys.missing))
    assert (sig.result, sig.reason) == ("permerror", "no key for signature")


async def test_revoked_key_is_permerror(auth: Authenticator, keys: Keys) -> None:
    sig = await only(auth, sign(make_message(), keys.revoked))
    assert sig.result == "permerror" and "revoked" in sig.reason


async def test_short_key_is_permerror(auth: Authenticator, keys: Keys) -> None:
    sig = await only(auth, sign(make_message(), keys.short))
    assert (sig.result, sig.key_bits) == ("permerror", 512)
    assert "too short" in sig.reason


async def test_key_type_must_match_algorithm(auth: Authenticator, keys: Keys) -> None:
    sig = await only(auth, sign(make_message(), keys.typed))
    assert sig.result == "permerror" and "does not match" in sig.reason


async def test_dns_timeout_is_temperror(auth: Authenticator, keys: Keys) -> None:
    start = time.monotonic()
    sig = await only(auth, sign(make_message(), keys.slow))
    assert sig.result == "temperror"
    assert time.monotonic() - start < 5


async def test_every_signature_gets_its_own_result(auth: Authenticator, keys: Keys) -> None:
    msg = make_message(body="Original body\r\n")
    signed = sign(msg, keys.rsa2048)  # author's signature, will break
    tampered = signed.replace(b"Original body", b"Footer added body")
    relayed = sign(tampered, keys.other)  # the list re-signs what it sends
    results = await verify(auth, sign(relayed, keys.missing))
    outcome = [(s.domain, s.result) for s in results.signatures]
    assert outcome == [
        ("example.com", "permerror"),
        ("lists.example.net", "pass"),
        ("example.com", "fail"),
    ]
    assert results.result == "pass"


async def test_unsigned_message_is_none(auth: Authenticator) -> None:
    results = await verify(auth, make_message())
    assert results.result == "none" and results.signatures == ()


def _with_signature(value: str, body: bytes | None = None) -> bytes:
    return b"DKIM-Signature: " + value.encode("utf-8") + b"\r\n" + (body or make_message())


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (
            "v=1; a=rsa-sha256; d=example.com; s=r2048; h=from; bh=AAAA; b=AAAA; just garbage",
            "malformed",
        ),
        (
            "v=1; a=rsa-sha256; d=example.com; d=evil.example; s=r2048; h=from; bh=AAAA; b=AAAA",
            "duplicate tag",
        ),
        ("v=1; a=rsa-sha256; d=example.com; s=r2048; h=from; bh=AAAA; b=!!not*base64!!", "base64"),
        ("v=1; a=rsa-sha512; d=example.com; s=r2048; h=from; bh=AAAA; b=AAAA", "algorithm"),
        ("v=1; a=rsa-sha256; d=example.com; s=r2048; h=from; b=AAAA", "missing"),
        ("v=1; a=rsa-sha256; d=exämple.com; s=r2048; h=from; bh=AAAA; b=AAAA", "ASCII"),
        (
            "v=1; a=rsa-sha256; d=example.com; s=r2048; h=from; bh=AAAA; b=" + "A" * 40000,
            "larger than",
        ),
    ],
    ids=["malformed", "duplicate", "base64", "algorithm", "missing-bh", "non-ascii", "huge"],
)
async def test_bad_signature_fields_are_permerror(
    auth: Authenticator, value: str, reason: str
) -> None:
    sig = await only(auth, _with_signature(value))
    assert sig.result == "permerror"
    assert reason.lower() in sig.reason.lower()


async def test_fifty_signatures_are_bounded(auth: Authenticator, keys: Keys) -> None:
    raw = sign(make_message(), keys.rsa1024)
    bogus = "v=1; a=rsa-sha256; d=example.com; s=gone; h=from; bh=AAAA; b=AAAA"
    raw = (b"DKIM-Signature: " + bogus.encode() + b"\r\n") * 49 + raw
    start = time.monotonic()
    results = await verify(auth, raw)
    assert results.total == 50 and len(results.signatures) == 50
    assert [s.result for s in results.signatures[10:]] == ["permerror"] * 40
    assert all("more than 10" in s.reason for s in results.signatures[10:])
    assert "first 10 of 50" in results.note
    assert results.signatures[49].domain == ""  # never even parsed: no work spent on it
    assert time.monotonic() - start < 5


async def test_unparsable_header_block_is_permerror(auth: Authenticator, keys: Keys) -> None:
    signed = sign(make_message(), keys.rsa1024)
    sig = await only(auth, signed.replace(b"To:", b"To\x01:"))
    assert (sig.result, sig.reason) == ("permerror", "message header block unparsable")
    assert b"bob@" not in sig.reason.encode()
    assert (await verify(auth, b"garbage without any header")).result == "none"


async def test_auth_processes_verify_and_survive_a_crash(dns: LocalDns, keys: Keys) -> None:
    settings = settings_from_mapping(
        {"auth": {"workers": 2}, "dns": {"nameservers": [dns.address], "timeout": 1}}
    )
    resolver = Resolver(settings.dns)
    auth = Authenticator.from_settings(resolver, settings.auth)
    signed = sign(sign(make_message(), keys.rsa2048), keys.ed)
    try:
        await auth.start()
        workers = auth._workers
        assert workers is not None
        first = workers.pids
        assert len(first) == 2 and os.getpid() not in first
        results = await verify(auth, signed)
        assert [s.result for s in results.signatures] == ["pass", "pass"]
        for pid in first:  # killed from outside, as the OOM killer would
            os.kill(pid, signal.SIGKILL)
        # a message in flight when its process dies is retried on a fresh one
        results = await verify(auth, signed)
        assert [s.result for s in results.signatures] == ["pass", "pass"]
        assert not set(workers.pids) & set(first)
    finally:
        await auth.close()
        await resolver.close()
    for pid in workers.pids + first:  # close waited for every process to leave
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("workers", [-1, 65, "2"])
def test_auth_workers_setting_is_validated(workers: object) -> None:
    with pytest.raises(ConfigError, match=r"auth\.workers"):
        settings_from_mapping({"auth": {"workers": workers}})
