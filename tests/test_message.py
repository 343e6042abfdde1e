"""Message: raw bytes kept exactly; headers prepended or removed without re-serialising."""

from __future__ import annotations

import datetime as dt
import email.policy
import itertools
import re
import threading
from email.message import Message as MimeMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from relay.errors import MessageTimeError
from relay.message import (
    Envelope,
    Message,
    Peer,
    _single_part,
    cached_attribute,
    format_header,
    header_time,
    parse_header_fields,
    strip_mbox_from,
    to_crlf,
)

RAW = (
    b"Received: from a\r\n\tby b\r\nFrom: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\n"
    b"Authentication-Results: relay.test; spf=pass\r\n"
    b"Subject: hi\r\n\r\nbody line\r\nAuthentication-Results: in the body stays\r\n"
)
T0 = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC: tests pin time, never read the clock


def msg(raw: bytes = RAW) -> Message:
    return Message(
        raw, Envelope("j@example.com", ("bob@example.org",)), Peer("192.0.2.1"), received_at=T0
    )


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
    m = Message.from_file_bytes(
        b"From x@y  Mon Jan 1 00:00:00 2002\nSubject: a\n\nb\rc\n", received_at=T0
    )
    assert m.raw == b"Subject: a\r\n\r\nb\r\nc\r\n"
    assert strip_mbox_from(b"Subject: x\n") == b"Subject: x\n"
    assert to_crlf(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"


def test_to_crlf_equals_the_line_end_regex_on_every_short_mixture() -> None:
    """Mail already in CRLF is returned as it is (no regex pass): every other mixture of
    CR, LF and text must still be rewritten exactly as the regex does."""
    for size in range(7):
        for pieces in itertools.product((b"\r", b"\n", b"a"), repeat=size):
            data = b"".join(pieces)
            assert to_crlf(data) == re.sub(rb"\r\n|\r|\n", b"\r\n", data), data
    wire = b"Subject: a\r\n\r\nb\r\n"
    assert to_crlf(wire) is wire


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


def _utc(year: int, month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()


def test_header_time_is_the_newest_received_date_then_the_date() -> None:
    fields = [
        ("Subject", "Mon, 1 Jan 2001 00:00:00 +0000"),  # only Received and Date count
        ("Received", "from mx1 by mx2;\r\n\tWed, 7 Aug 2002 07:00:01 +0200 (CEST)"),
        ("Received", "from out by mx1; Tue, 6 Aug 2002 05:00:00 +0000"),
        ("Date", "Wed, 31 Jul 2002 05:00:00 +0000"),
    ]
    assert header_time(fields) == _utc(2002, 8, 7, 5, 0, 1)
    assert header_time(fields[3:]) == _utc(2002, 7, 31, 5)
    # "-0000" means UTC with the sender's zone unknown (RFC 5322 3.3)
    assert header_time([("DATE", "7 Aug 2002 05:00:01 -0000")]) == _utc(2002, 8, 7, 5, 0, 1)


@pytest.mark.parametrize(
    "value",
    ["", "not a date", "Mon, 99 Jan 2002", "1 Jan 99999 00:00:00 +0000",
     "1 Jan 2002 00:00:00 +9999", "31 Feb 2002 00:00 +0000", "\x00\udcff"],
)  # fmt: skip
def test_header_time_skips_garbled_dates_and_never_raises(value: str) -> None:
    later = ("Received", "from a by b; Tue, 6 Aug 2002 05:00:00 +0000")
    assert header_time([("Received", f"by mx; {value}"), later]) == _utc(2002, 8, 6, 5)
    assert header_time([("Received", "from a by b (no date at all)"), ("Date", value)]) is None


def test_file_bytes_take_the_time_from_the_caller_or_the_message() -> None:
    data = b"Received: by mx; Wed, 7 Aug 2002 05:00:01 +0000\nDate: 31 Jul 2002 05:00 +0000\n\nx\n"
    assert Message.from_file_bytes(data).received_at == _utc(2002, 8, 7, 5, 0, 1)
    assert Message.from_file_bytes(data, received_at=T0).received_at == T0


def test_file_bytes_without_a_date_are_an_error_not_now() -> None:
    with pytest.raises(MessageTimeError, match="no Received or Date"):
        Message.from_file_bytes(b"Subject: undated\nDate: garbage\n\nx\n")
    undated = Message.from_file_bytes(b"Subject: undated\n\nx\n", received_at=0.0)
    assert undated.received_at == 0.0


def test_a_message_has_no_default_time() -> None:
    with pytest.raises(TypeError, match="received_at"):
        Message(b"x", Envelope("", ()), Peer("192.0.2.1"))  # type: ignore[call-arg]


# Message.parsed builds plain single-part messages without the stdlib parser (issue 17):
# what it builds must be what the parser makes of them, and anything else is parsed.
_EML = sorted(Path(__file__).parent.rglob("*.eml"))


def _parser(raw: bytes) -> MimeMessage:
    return BytesParser(policy=email.policy.compat32).parsebytes(raw)


def _assert_parsed_alike(built: MimeMessage, raw: bytes) -> None:
    ref = _parser(raw)
    assert list(built.raw_items()) == list(ref.raw_items())
    assert not built.is_multipart() and not ref.is_multipart()
    assert built.get_payload() == ref.get_payload()
    assert built.get_payload(decode=True) == ref.get_payload(decode=True)
    assert built.get_unixfrom() == ref.get_unixfrom()


SINGLE_PART = [
    RAW,
    b"Subject: \r\n\tfolded after a blank start\r\nX-A:no space\r\n\r\nbody",
    b"Subject: caf\xc3\xa9 8-bit \xff\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29ybGQ=\r\n",
    b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"<p>caf=C3=A9</p>\r\n.\r\nlone\nLF and lone\rCR in the body\r\n",
    b"Subject: empty body\r\n\r\n",
]


@pytest.mark.parametrize("raw", SINGLE_PART)
def test_single_part_messages_are_built_as_the_parser_reads_them(raw: bytes) -> None:
    built = _single_part(raw)
    assert built is not None  # the fast path was taken ...
    _assert_parsed_alike(built, raw)  # ... and gave the parser's reading
    assert list(msg(raw).parsed.raw_items()) == list(built.raw_items())


@pytest.mark.parametrize(
    "raw",
    [
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx\r\n",
        b"From sender@example.com Mon Jan  1 00:00:00 2024\r\nSubject: mbox\r\n\r\nx",
        b"Subject: a\r\nFrom x\r\nTo: b\r\n\r\nx",  # a misplaced mbox line
        b"Subject: a\nTo: lone LF\r\n\r\nx",
        b"Subject: a\r\nnot a field\r\n\r\nx",
        b"Bad Name: a\r\n\r\nx",
        b" continuation first\r\nSubject: a\r\n\r\nx",
        b"\r\nno header at all\r\n\r\nx",
        b"Subject: no body separator\r\n",
    ],
)
def test_anything_else_goes_to_the_parser(raw: bytes) -> None:
    assert _single_part(raw) is None
    assert list(msg(raw).parsed.raw_items()) == list(_parser(raw).raw_items())


@pytest.mark.parametrize("path", _EML, ids=lambda p: p.name)
def test_test_messages_parse_alike_either_way(path: Path) -> None:
    data = path.read_bytes()
    for raw in (data, to_crlf(strip_mbox_from(data))):
        built = _single_part(raw)
        if built is not None:
            _assert_parsed_alike(built, raw)


def test_the_header_is_split_once_and_read_alike() -> None:
    m = msg()
    assert m.header_split is m.header_split  # cached: the scan and the stamps share it
    assert m.header_fields == parse_header_fields(m.header_block)
    stripped = m.without_headers(lambda name, _f: name == "authentication-results")
    assert stripped.raw == RAW.replace(b"Authentication-Results: relay.test; spf=pass\r\n", b"")


def test_a_cached_value_computing_in_a_thread_does_not_hold_up_another_message() -> None:
    """On Python 3.11 functools.cached_property holds one lock per property for every
    instance: the loop's first ``.parsed`` of a small message waited for a thread parsing a
    large one. ``cached_attribute`` computes each instance's value without that lock."""
    started, release = threading.Event(), threading.Event()
    waited_out: list[bool] = []

    class Slow:
        def __init__(self, block: bool) -> None:
            self.block = block
            self.calls = 0

        @cached_attribute
        def value(self) -> str:
            self.calls += 1
            if self.block:
                started.set()
                waited_out.append(not release.wait(10))  # True: nobody released it
            return "slow" if self.block else "quick"

    slow, quick = Slow(block=True), Slow(block=False)
    thread = threading.Thread(target=lambda: slow.value)
    thread.start()
    assert started.wait(10)
    # With a lock shared by every instance this waits until the thread gives up (10 s).
    assert quick.value == "quick"
    release.set()
    thread.join()
    assert waited_out == [False]
    assert (slow.value, slow.calls, quick.value, quick.calls) == ("slow", 1, "quick", 1)
    assert isinstance(Slow.value, cached_attribute)  # the class sees the descriptor
