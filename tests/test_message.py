"""Message: raw bytes kept exactly; headers prepended or removed without re-serialising."""

from __future__ import annotations

import pytest

from relay.message import Envelope, Message, Peer, format_header, strip_mbox_from, to_crlf

RAW = (
    b"Received: from a\r\n\tby b\r\nFrom: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\n"
    b"Authentication-Results: relay.test; spf=pass\r\n"
    b"Subject: hi\r\n\r\nbody line\r\nAuthentication-Results: in the body stays\r\n"
)


def msg(raw: bytes = RAW) -> Message:
    return Message(raw, Envelope("j@example.com", ("bob@example.org",)), Peer("192.0.2.1"))


def test_parsed_once_and_headers_decoded() -> None:
    m = msg()
    assert m.parsed is m.parsed
    assert m.header("from") == "Jörg <j@example.com>"
    assert m.headers("received") == ["from a\tby b"]  # unfolded, whitespace kept
    assert m.header("x-missing") is None
    assert m.body == b"body line\r\nAuthentication-Results: in the body stays\r\n"


def test_prepend_keeps_the_original_bytes() -> None:
    m = msg().with_prepended([("X-A", "1"), ("X-B", "two\r\n\tfolded")])
    assert m.raw == b"X-A: 1\r\nX-B: two\r\n\tfolded\r\n" + RAW


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
def test_header_injection_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        format_header("X-A", value)
    with pytest.raises(ValueError):
        format_header("Bad Name", "x")


def test_without_headers_touches_only_the_header_block() -> None:
    m = msg().without_headers(lambda name, _f: name in ("authentication-results", "received"))
    assert m.raw == (
        b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\nSubject: hi\r\n\r\n"
        b"body line\r\nAuthentication-Results: in the body stays\r\n"
    )
    same = msg()
    assert same.without_headers(lambda n, f: False) is same


def test_file_bytes_drop_mbox_line_and_normalise_line_ends() -> None:
    m = Message.from_file_bytes(b"From x@y  Mon Jan 1 00:00:00 2002\nSubject: a\n\nb\rc\n")
    assert m.raw == b"Subject: a\r\n\r\nb\r\nc\r\n"
    assert strip_mbox_from(b"Subject: x\n") == b"Subject: x\n"
    assert to_crlf(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"


def test_garbage_never_raises() -> None:
    m = msg(b"\xff\xfe\x00garbage without headers")
    assert m.header("subject") is None
    assert isinstance(m.parsed.get_payload(), str | list)


def test_malformed_structured_headers_never_raise() -> None:
    # The stdlib's modern header parser raises IndexError on this Message-ID.
    m = msg(b"Message-ID: <@>\r\nTo: <>, ,@\r\nSubject: x\r\n\r\nbody\r\n")
    assert m.header("message-id") == "<@>"
    assert m.headers("to") == ["<>, ,@"]


def test_eight_bit_and_encoded_header_values() -> None:
    m = msg("Subject: [광고] 할인\r\nX-A: =?iso-8859-1?q?caf=E9?=\r\n\r\n".encode())
    assert m.header("subject") == "[광고] 할인"
    assert m.header("x-a") == "café"
    assert msg(b"Subject: caf\xe9\r\n\r\n").header("subject") == "café"  # Latin-1 fallback
    assert msg(b"Subject: =?bogus-charset?q?x?=\r\n\r\n").header("subject") is not None


def test_reading_headers_does_not_parse_the_body() -> None:
    m = msg(b"Subject: big\r\nFrom: a@b.test\r\n\r\n" + b"x" * 1_000_000)
    assert m.header("subject") == "big"
    assert [n for n, _ in m.header_fields] == ["Subject", "From"]
    assert "parsed" not in m.__dict__  # the full MIME parse was never needed
