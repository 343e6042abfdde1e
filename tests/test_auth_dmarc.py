"""DMARC (RFC 7489) and ARC (RFC 8617) over a loopback DNS server, messages signed here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import dkim
import pytest

from relay.auth import dmarc
from relay.auth.checker import Authenticator
from relay.auth.results import AuthResults
from relay.auth.spf import check_spf_cached
from tests.support.authenv import authenticator, incoming
from tests.support.dkimkeys import SigningKey, make_message, rsa_key, sign
from tests.support.dnsserver import LocalDns

CLIENT = "192.0.2.10"
OUTSIDER = "203.0.113.9"


class Keys:
    def __init__(self) -> None:
        self.org = rsa_key("example.com", "k1", 1024)
        self.sub = rsa_key("mail.example.com", "k1", 1024)
        self.strict = rsa_key("strict.example", "k1", 1024)
        self.strict_sub = rsa_key("mail.strict.example", "k1", 1024)
        self.thirdparty = rsa_key("esp.example.net", "k1", 1024)
        self.forwarder = rsa_key("forwarder.example", "arc", 1024)
        self.list = rsa_key("list.example", "arc", 1024)
        self.slowarc = rsa_key("slowarc.example", "arc", 1024)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def dns(keys: Keys) -> Iterator[LocalDns]:
    zone: dict[str, list[tuple[Any, ...]]] = {
        k.name: [("TXT", k.txt)]
        for k in (
            keys.org,
            keys.sub,
            keys.strict,
            keys.strict_sub,
            keys.thirdparty,
            keys.forwarder,
            keys.list,
        )
    }
    zone.update(
        {
            "_dmarc.example.com.": [
                ("TXT", "v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.com")
            ],
            "_dmarc.strict.example.": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
            "_dmarc.pct.example.": [("TXT", "v=DMARC1; p=reject; pct=0")],
            "_dmarc.invalid.example.": [("TXT", "v=DMARC1; p=bogus")],
            "_dmarc.invalid-rua.example.": [("TXT", "v=DMARC1; p=bogus; rua=mailto:r@x.example")],
            "_dmarc.two.example.": [("TXT", "v=DMARC1; p=none"), ("TXT", "v=DMARC1; p=reject")],
            "_dmarc.own.example.com.": [("TXT", "v=DMARC1; p=none")],
            "bounce.example.com.": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
            "mail.strict.example.": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
            "strict.example.": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
            "example.com.": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        }
    )
    with LocalDns(
        zone, timeout=["_dmarc.slow.example.", "spf-slow.example.com.", keys.slowarc.name]
    ) as server:
        yield server


@pytest.fixture
async def auth(dns: LocalDns) -> AsyncIterator[Authenticator]:
    async with authenticator(dns, timeout=1.0) as a:
        yield a


async def check(
    auth: Authenticator,
    from_domain: str,
    signers: tuple[SigningKey, ...] = (),
    mail_from: str = "bounce@esp.example.net",
    ip: str = OUTSIDER,
    raw: bytes | None = None,
) -> AuthResults:
    msg = raw or make_message(from_addr=f"Alice <alice@{from_domain}>")
    for key in signers:
        msg = sign(msg, key)
    return await auth.check(incoming(msg, mail_from=mail_from, ip=ip))


async def test_aligned_dkim_passes(auth: Authenticator, keys: Keys) -> None:
    r = await check(auth, "example.com", (keys.org,))
    assert (r.dmarc.result, r.dmarc.dkim_aligned, r.dmarc.spf_aligned) == ("pass", True, False)
    assert (r.dmarc.policy, r.dmarc.record_domain) == ("reject", "example.com")
    assert r.from_domain == "example.com"


async def test_relaxed_alignment_accepts_subdomain_signer(auth: Authenticator, keys: Keys) -> None:
    r = await check(auth, "example.com", (keys.sub,))
    assert (r.dmarc.result, r.dmarc.dkim_domain, r.dmarc.adkim) == ("pass", "mail.example.com", "r")


async def test_strict_alignment_needs_exact_domain(auth: Authenticator, keys: Keys) -> None:
    sub = await check(auth, "strict.example", (keys.strict_sub,))
    assert (sub.dmarc.result, sub.dmarc.adkim, sub.dmarc.policy) == ("fail", "s", "reject")
    exact = await check(auth, "strict.example", (keys.strict,))
    assert exact.dmarc.result == "pass"


async def test_unaligned_signature_does_not_count(auth: Authenticator, keys: Keys) -> None:
    r = await check(auth, "example.com", (keys.thirdparty,))
    assert r.dkim.result == "pass"
    assert (r.dmarc.result, r.dmarc.aligned) == ("fail", False)


async def test_spf_alignment_relaxed_and_strict(auth: Authenticator) -> None:
    relaxed = await check(auth, "example.com", mail_from="b@bounce.example.com", ip=CLIENT)
    assert (relaxed.spf.result, relaxed.dmarc.result) == ("pass", "pass")
    assert relaxed.dmarc.spf_aligned and not relaxed.dmarc.dkim_aligned
    strict_sub = await check(auth, "strict.example", mail_from="b@mail.strict.example", ip=CLIENT)
    assert (strict_sub.spf.result, strict_sub.dmarc.result) == ("pass", "fail")
    strict_exact = await check(auth, "strict.example", mail_from="b@strict.example", ip=CLIENT)
    assert strict_exact.dmarc.result == "pass"


async def test_spf_fail_and_no_signature_fails(auth: Authenticator) -> None:
    r = await check(auth, "example.com", mail_from="alice@example.com", ip=OUTSIDER)
    assert (r.spf.result, r.dmarc.result, r.dmarc.policy) == ("fail", "fail", "reject")


async def test_subdomain_policy_applies_to_subdomains(auth: Authenticator) -> None:
    r = await check(auth, "news.example.com")
    assert (r.dmarc.result, r.dmarc.record_domain, r.dmarc.org_domain) == (
        "fail",
        "example.com",
        "example.com",
    )
    assert (r.dmarc.policy, r.dmarc.p, r.dmarc.sp) == ("quarantine", "reject", "quarantine")


async def test_own_record_of_a_subdomain_wins(auth: Authenticator) -> None:
    r = await check(auth, "own.example.com")
    assert (r.dmarc.record_domain, r.dmarc.policy) == ("own.example.com", "none")


async def test_pct_sampling_downgrades_policy(auth: Authenticator) -> None:
    r = await check(auth, "pct.example")
    assert (r.dmarc.result, r.dmarc.pct, r.dmarc.sampled_out) == ("fail", 0, True)
    assert (r.dmarc.published_policy, r.dmarc.policy) == ("reject", "quarantine")


async def test_no_record_is_none(auth: Authenticator) -> None:
    r = await check(auth, "norecord.example")
    assert (r.dmarc.result, r.dmarc.policy) == ("none", "")


async def test_record_lookup_timeout_is_temperror(auth: Authenticator) -> None:
    r = await check(auth, "slow.example")
    assert r.dmarc.result == "temperror"


async def test_aligned_spf_temperror_makes_dmarc_temperror(auth: Authenticator) -> None:
    r = await check(auth, "example.com", mail_from="b@spf-slow.example.com", ip=CLIENT)
    assert (r.spf.result, r.dmarc.result) == ("temperror", "temperror")


@pytest.mark.parametrize(
    ("domain", "result", "policy"),
    [
        ("invalid.example", "permerror", ""),
        ("invalid-rua.example", "fail", "none"),
        ("two.example", "permerror", ""),
    ],
)
async def test_bad_records(auth: Authenticator, domain: str, result: str, policy: str) -> None:
    r = await check(auth, domain)
    assert (r.dmarc.result, r.dmarc.policy) == (result, policy)


WARM_CASES = [
    # (From domain, signer, MAIL FROM, client): DKIM, SPF and each discovery path
    ("example.com", "org", "bounce@esp.example.net", OUTSIDER),
    ("example.com", "sub", "b@bounce.example.com", CLIENT),
    ("strict.example", "strict_sub", "b@mail.strict.example", CLIENT),
    ("news.example.com", "", "alice@example.com", OUTSIDER),
    ("own.example.com", "", "bounce@esp.example.net", OUTSIDER),
    ("pct.example", "", "", CLIENT),
    ("norecord.example", "thirdparty", "bounce@esp.example.net", OUTSIDER),
    ("invalid-rua.example", "", "bounce@esp.example.net", OUTSIDER),
    ("two.example", "", "bounce@esp.example.net", OUTSIDER),
]


@pytest.mark.parametrize(("domain", "signer", "mail_from", "ip"), WARM_CASES)
async def test_warm_cache_answers_as_the_cold_path_without_dns(
    auth: Authenticator,
    dns: LocalDns,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    domain: str,
    signer: str,
    mail_from: str,
    ip: str,
) -> None:
    """The second check of a message reads keys, SPF and DMARC from the caches only
    (Authenticator._cached): the same results, and no DNS question sent."""
    # Signed once: two signatures made a second apart differ (t=, b=), results too.
    raw = make_message(from_addr=f"Alice <alice@{domain}>")
    for key in (getattr(keys, signer),) if signer else ():
        raw = sign(raw, key)
    cold = await check(auth, domain, mail_from=mail_from, ip=ip, raw=raw)
    asked = len(dns.queries)

    def asynchronous_path(*args: object) -> None:
        raise AssertionError("the warm check left the cache pass")

    monkeypatch.setattr(auth, "_fetch_keys", asynchronous_path)
    warm = await check(auth, domain, mail_from=mail_from, ip=ip, raw=raw)
    assert len(dns.queries) == asked
    assert replace(warm, seconds=0.0) == replace(cold, seconds=0.0)


async def test_cold_cache_is_not_read_as_an_answer(auth: Authenticator) -> None:
    assert dmarc.discover_cached(auth.resolver, auth.orgs, "example.com", "") is None
    assert check_spf_cached(auth.resolver, CLIENT, "a@example.com", "mail.example.com") is None
    found = await dmarc.discover(auth.resolver, auth.orgs, "example.com", "")
    assert dmarc.discover_cached(auth.resolver, auth.orgs, "example.com", "") == found


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"From: a@example.com\r\nFrom: b@example.com\r\n", "more than one From"),
        (b"From: a@example.com, b@evil.example\r\n", "more than one domain"),
        (b"To: a@example.com\r\n", "no From"),
        (b"From: undisclosed\r\n", "no domain"),
    ],
)
async def test_unusable_from_is_permerror(auth: Authenticator, headers: bytes, reason: str) -> None:
    r = await check(auth, "", raw=headers + b"Subject: x\r\n\r\nbody\r\n")
    assert r.dmarc.result == "permerror" and reason in r.dmarc.reason
    assert r.from_domain == ""


async def test_non_ascii_from_domain_is_idna(auth: Authenticator) -> None:
    raw = "From: a@bücher.example\r\nSubject: x\r\n\r\nbody\r\n".encode()
    r = await check(auth, "", raw=raw)
    assert r.from_domain == "xn--bcher-kva.example"
    assert r.dmarc.result == "none"


# ARC -------------------------------------------------------------------------------------


def arc_seal(raw: bytes, key: SigningKey, srv_id: str, results: str) -> bytes:
    """Add an Authentication-Results from ``srv_id`` and the ARC set dkimpy builds from it."""
    with_ar = f"Authentication-Results: {srv_id}; {results}\r\n".encode() + raw
    headers = dkim.arc_sign(
        with_ar, key.selector.encode(), key.domain.encode(), key.private, srv_id.encode()
    )
    assert headers, "dkimpy refused to seal"
    return b"".join(headers) + with_ar


async def test_arc_chain_passes(auth: Authenticator, keys: Keys) -> None:
    raw = sign(make_message(from_addr="alice@example.com"), keys.org)
    once = arc_seal(raw, keys.forwarder, "forwarder.example", "dkim=pass header.d=example.com")
    twice = arc_seal(once, keys.list, "list.example", "arc=pass; dkim=pass header.d=example.com")
    r = await check(auth, "example.com", raw=twice)
    assert (r.arc.result, r.arc.instances, r.arc.oldest_pass) == ("pass", 2, 0)
    assert r.arc.domains == ("list.example", "forwarder.example")


async def test_arc_survives_modification_dkim_does_not(auth: Authenticator, keys: Keys) -> None:
    raw = sign(make_message(from_addr="alice@example.com", subject="Hi"), keys.org)
    sealed = arc_seal(raw, keys.forwarder, "forwarder.example", "dkim=pass header.d=example.com")
    # a change after sealing breaks both: the newest AMS no longer validates
    changed = sealed.replace(b"Subject: Hi", b"Subject: [list] Hi")
    r = await check(auth, "example.com", raw=changed)
    assert (r.dkim.result, r.arc.result) == ("fail", "fail")


async def test_arc_tampered_seal_fails(auth: Authenticator, keys: Keys) -> None:
    raw = sign(make_message(from_addr="alice@example.com"), keys.org)
    sealed = arc_seal(raw, keys.forwarder, "forwarder.example", "dkim=pass header.d=example.com")
    forged = sealed.replace(b"cv=none", b"cv=pass", 1)
    r = await check(auth, "example.com", raw=forged)
    assert r.arc.result == "fail" and r.arc.oldest_pass is None


async def test_arc_key_timeout_is_temperror(auth: Authenticator, keys: Keys) -> None:
    raw = make_message(from_addr="alice@example.com")
    sealed = arc_seal(raw, keys.slowarc, "slowarc.example", "dkim=none")
    r = await check(auth, "example.com", raw=sealed)
    assert r.arc.result == "temperror"


async def test_no_arc_is_none(auth: Authenticator) -> None:
    r = await check(auth, "example.com")
    assert (r.arc.result, r.arc.instances) == ("none", 0)


async def test_arc_oldest_pass_after_a_change_between_hops(auth: Authenticator, keys: Keys) -> None:
    raw = sign(make_message(from_addr="alice@example.com", subject="Hi"), keys.org)
    once = arc_seal(raw, keys.forwarder, "forwarder.example", "dkim=pass header.d=example.com")
    # the list edits the subject (breaking DKIM and the first AMS), then seals what it sends
    edited = once.replace(b"Subject: Hi", b"Subject: [list] Hi")
    twice = arc_seal(edited, keys.list, "list.example", "arc=pass; dkim=fail")
    r = await check(auth, "example.com", raw=twice)
    assert (r.dkim.result, r.arc.result, r.arc.instances) == ("fail", "pass", 2)
    assert r.arc.oldest_pass == 2  # only the newest AMS still covers the message


async def test_alignment_is_reported_without_a_record(auth: Authenticator, dns: LocalDns) -> None:
    key = rsa_key("mail.norecord.example", "k1", 1024)
    dns.set(key.name, [("TXT", key.txt)])
    signed = await check(auth, "norecord.example", (key,))
    assert (signed.dkim.result, signed.dmarc.result, signed.dmarc.policy) == ("pass", "none", "")
    assert signed.dmarc.aligned and signed.dmarc.dkim_domain == "mail.norecord.example"
    unsigned = await check(auth, "norecord.example")
    assert (unsigned.dmarc.result, unsigned.dmarc.aligned) == ("none", False)
