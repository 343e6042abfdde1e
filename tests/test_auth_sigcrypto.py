"""auth/sigcrypto.py and the verifier against dkimpy itself: the same verdict on every
message (the canonicalisations alone are compared in test_auth_dkimparse.py)."""

from __future__ import annotations

import re
from collections.abc import Callable

import dkim
import pytest

from relay.auth.sigcrypto import load_key
from relay.auth.verify import MIN_KEY_BITS, verify_dkim
from tests.support.dkimkeys import SigningKey, ed25519_key, make_message, rsa_key, sign


def _dnsfunc(keys: list[SigningKey]) -> Callable[..., bytes]:
    records = {k.name.encode(): k.txt.encode() for k in keys}

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        return records.get(name, b"")

    return lookup


def _flip_signature(raw: bytes) -> bytes:
    """The first character of the b= value changed (still valid base64)."""
    match = re.search(rb"[;\s]b=([A-Za-z0-9+/])", raw)
    assert match is not None
    flipped = b"B" if match.group(1) != b"B" else b"C"
    return raw[: match.start(1)] + flipped + raw[match.end(1) :]


def _variants(key: SigningKey) -> dict[str, bytes]:
    body = "Hello  there,\t\tfriend. \r\nSee you on Friday.\r\n\r\n\r\n"
    msg = make_message(body=body, extra=[("X-Mailer", "test  mailer")])
    relaxed = sign(msg, key)
    simple = sign(msg, key, canonicalize=(b"simple", b"simple"))
    return {
        "relaxed": relaxed,
        "simple": simple,
        "length": sign(msg, key, length=True) + b"appended after l=\r\n",
        "body tampered": relaxed.replace(b"Friday", b"Monday"),
        "header tampered": relaxed.replace(b"Subject: Lunch", b"Subject: Dinner"),
        "whitespace only (relaxed)": relaxed.replace(b"Hello  there", b"Hello there"),
        "whitespace only (simple)": simple.replace(b"Hello  there", b"Hello there"),
        "second From added": b"From: mallory@example.net\r\n" + relaxed,
        "signature changed": _flip_signature(relaxed),
        # the message split: bare LF line ends go through dkimpy's own parser
        "LF line ends (relaxed)": relaxed.replace(b"\r\n", b"\n"),
        "LF line ends (simple)": simple.replace(b"\r\n", b"\n"),
        "mbox From line first": b"From alice@example.com Mon Nov 23 10:00:00 2026\r\n" + relaxed,
        "unparsable header line": relaxed.replace(b"Subject:", b"Subject :"),
        # header canonicalisation: relaxed survives refolding and case, simple does not
        "header refolded (relaxed)": relaxed.replace(b"Subject: Lunch", b"Subject:\t Lunch\r\n "),
        "header refolded (simple)": simple.replace(b"Subject: Lunch", b"Subject:\t Lunch\r\n "),
        "header name case (relaxed)": relaxed.replace(b"Subject:", b"SUBJECT:"),
        "header name case (simple)": simple.replace(b"Subject:", b"SUBJECT:"),
        "unsigned header added": b"X-Added: later\r\n" + relaxed,
    }


@pytest.fixture(scope="module")
def signing_keys() -> list[SigningKey]:
    return [
        rsa_key("example.com", "r2048", 2048),
        rsa_key("example.com", "r1024", 1024),
        ed25519_key("example.com", "ed"),
    ]


def test_same_verdict_as_dkimpy(signing_keys: list[SigningKey]) -> None:
    """Every variant: our pass/not-pass equals dkimpy's own ``verify`` (its pure-Python RSA
    and canonicalisation), so moving the maths to OpenSSL changed no result."""
    dnsfunc = _dnsfunc(signing_keys)
    seen: set[bool] = set()
    for key in signing_keys:
        keys = {k.name.encode(): k.txt.encode() for k in signing_keys}
        for label, raw in _variants(key).items():
            try:
                expected = bool(dkim.DKIM(raw, minkey=MIN_KEY_BITS).verify(dnsfunc=dnsfunc))
            except dkim.DKIMException:
                expected = False
            got = verify_dkim(raw, keys, 10).signatures[0].result == "pass"
            assert got == expected, (key.selector, label)
            seen.add(got)
    assert seen == {True, False}  # both outcomes were exercised


def test_two_signatures_share_one_body_and_verify_independently(
    signing_keys: list[SigningKey],
) -> None:
    rsa, _, ed = signing_keys
    raw = sign(sign(make_message(), rsa), ed)
    keys = {rsa.name.encode(): rsa.txt.encode()}  # the Ed25519 key is not published
    results = verify_dkim(raw, keys, 10).signatures
    assert [r.result for r in results] == ["permerror", "pass"]
    assert results[0].algorithm == "ed25519-sha256"


def test_load_key_parses_once_and_rejects_bad_records(signing_keys: list[SigningKey]) -> None:
    key = signing_keys[0]
    name, record = key.name.encode(), key.txt.encode()
    first = load_key(name, record)
    assert first is not None and first.bits == 2048 and first.ktype == b"rsa"
    assert load_key(name, record) is first  # cached: no second ASN.1 parse
    ed = load_key(b"ed", signing_keys[2].txt.encode())
    assert ed is not None and ed.ktype == b"ed25519"
    with pytest.raises((dkim.KeyFormatError, ValueError)):
        load_key(name, b"v=DKIM1; k=rsa; p=AAAA")
    assert load_key(name, record.replace(b"v=DKIM1;", b"v=DKIM1; s=tlsrpt;")).tlsrpt  # type: ignore[union-attr]
