"""auth/tagvalue.py against dkimpy's ``parse_tag_value``: the same tags, or a refusal
where dkimpy refuses, on hostile and random tag lists."""

from __future__ import annotations

import random

import dkim.util
import pytest

from relay.auth.tagvalue import TagListError, parse_tag_value

CASES = [
    b"",
    b";",
    b"v=1; a=rsa-sha256; d=example.com; s=sel; h=from:to; bh=abc=; b=xyz==",
    b"v=DMARC1; p=reject; rua=mailto:a@b.example;",
    b"  v = 1 ;  p = ",
    b"v=1;;a=2",
    b"noequals",
    b"=value",
    b"1a=b",
    b"a-b=c",
    b"a=1; a=2",
    b"a=b=c",
    b"a=\xff\x00; b=;",
    b"k=rsa; p=MIIB; t=y:s",
]


def _dkimpy(tags: bytes) -> dict[bytes, bytes] | str:
    try:
        return dict(dkim.util.parse_tag_value(tags))
    except dkim.util.DuplicateTag:
        return "duplicate"
    except dkim.util.InvalidTagValueList:
        return "invalid"


def _ours(tags: bytes) -> dict[bytes, bytes] | str:
    try:
        return parse_tag_value(tags)
    except TagListError as exc:
        return "duplicate" if exc.duplicate else "invalid"


@pytest.mark.parametrize("tags", CASES)
def test_the_same_tags_as_dkimpy(tags: bytes) -> None:
    assert _ours(tags) == _dkimpy(tags)


def test_the_same_tags_as_dkimpy_on_random_lists() -> None:
    rng = random.Random(6376)
    alphabet = b"ab1_-=; \t\r\n\x00\xe9"
    refused = 0
    for _ in range(20000):
        tags = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        expected = _dkimpy(tags)
        refused += isinstance(expected, str)
        assert _ours(tags) == expected, tags
    assert 0 < refused < 20000  # both outcomes were exercised


def test_a_refusal_is_a_relay_error_that_quotes_nothing() -> None:
    with pytest.raises(TagListError) as caught:
        parse_tag_value(b"a=1; a=secret")
    assert caught.value.duplicate and "secret" not in str(caught.value)
