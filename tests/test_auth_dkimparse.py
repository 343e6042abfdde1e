"""auth/dkimparse.py against dkimpy's own functions: the same bytes on random and hostile
input, or the same refusal."""

from __future__ import annotations

import random

import dkim
import pytest
from dkim.canonicalization import Relaxed

from relay.auth.dkimparse import relaxed_body, relaxed_header, split_message, without_b_value

BODY_CASES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"a  b\t\tc \t d\r\n",
    b"trailing \t \r\nline\t\r\n \r\n\r\n",
    b"no final newline  ",
    b" \t leading\r\n",
    b"one space stays one\r\n",
    b"\tlone tab\r\n",
    b"single spaces only, then one before the line end \r\nnext\r\n",
]


@pytest.mark.parametrize("body", BODY_CASES)
def test_relaxed_body_matches_dkimpy(body: bytes) -> None:
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def test_relaxed_body_matches_dkimpy_on_random_whitespace() -> None:
    rng = random.Random(6376)
    alphabet = b" \t\r\nab"
    for _ in range(20000):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body


def _dkimpy_split(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | str:
    try:
        headers, body = dkim.rfc822_parse(raw)
    except dkim.MessageFormatError:
        return "refused"
    except IndexError:  # dkimpy's answer to a continuation line before any field
        return "refused"
    return [(n, v) for n, v in headers], body


def _ours(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | str:
    try:
        return split_message(raw)
    except dkim.MessageFormatError:
        return "refused"


SPLIT_CASES = [
    b"From: a@b\r\nSubject: hi\r\n\r\nbody\r\n",
    b"From: a@b\r\nSubject: folded\r\n\tsecond\r\n  third\r\n\r\nbody\r\n\r\n\r\n",
    b"From: a@b\r\n\r\n",
    b"From: a@b\r\n",
    b"From: a@b",
    b"\r\nbody only\r\n",
    b"",
    b"From alice@example.com Mon Jan  1 00:00:00 2024\r\nFrom: a@b\r\n\r\nx",
    b"Subject : space before the colon\r\n\r\n",
    b" continuation first\r\nFrom: a@b\r\n\r\n",
    b"From: a@b\nSubject: bare LF\n\nbody\n",
    b"From: a@b\r\nSubject: mixed\n\r\nbody\r\nline\nend",
    b"From: a@b\r\nX: bare CR\rinside\r\n\r\nbody\rcr\r\n",
    b"Empty:\r\nX-Tab:\tvalue\r\n\r\n\r\n\r\n",
    b"F\x80: high byte in the name\r\n\r\n",
    b"From: a@b\r\n\r\nbody\r\n\r\nsecond paragraph\r\n",
]


@pytest.mark.parametrize("raw", SPLIT_CASES)
def test_split_matches_dkimpy(raw: bytes) -> None:
    assert _ours(raw) == _dkimpy_split(raw)


def test_split_matches_dkimpy_on_random_messages() -> None:
    rng = random.Random(5322)
    pieces = [
        b"From: a@b",
        b"Subject:x",
        b" cont",
        b"\tcont",
        b"\r\n",
        b"\n",
        b"\r",
        b"",
        b"From x",
        b"bad line",
        b": empty name",
        b"X-A:  b  ",
        b"body",
    ]
    for _ in range(20000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert _ours(raw) == _dkimpy_split(raw), raw


def test_relaxed_header_matches_dkimpy_on_random_values() -> None:
    rng = random.Random(3442)
    pieces = [b" ", b"\t", b"\r\n ", b"\r\n\t", b"a", b"b c", b"\r", b"\x0b", b"\x0c", b";"]
    for _ in range(20000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) + b"\r\n"
        name = rng.choice([b"Subject", b"FROM", b"x-Test ", b"To\t"])
        assert relaxed_header(name, value) == Relaxed.canonicalize_headers([(name, value)])[0]


def test_without_b_value_matches_dkimpy_on_random_fields() -> None:
    rng = random.Random(67)
    pieces = [
        b" ",
        b"\t",
        b"\r\n",
        b"\r\n\t",
        b"\r",
        b"\n",
        b";",
        b"b",
        b"=",
        b"h",
        b"A+/",
        b"bh=",
        b"b=",
        b" b =",
        b"x",
        b"\x0b",
        b"!",
    ]
    for _ in range(50000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        assert without_b_value(value) == dkim.RE_BTAG.sub(b"\\1", value), value


def test_without_b_value_removes_only_the_signature_value() -> None:
    field = b" v=1; a=rsa-sha256; bh=Qk1JWA==; h=from:to;\r\n b=AbC+/d\r\n\tEf==\r\n"
    assert without_b_value(field) == b" v=1; a=rsa-sha256; bh=Qk1JWA==; h=from:to;\r\n b="
    # a long hostile field stays linear
    hostile = b"; b" + b" " * 20000 + b"=" + b"A \r\n\t" * 20000 + b"!"
    assert without_b_value(hostile) == dkim.RE_BTAG.sub(b"\\1", hostile)
