"""Property-based tests (Hypothesis) for the parsers that read hostile input (issue 15).

Targets: the SMTP MAIL/RCPT argument parser and relay control, IDNA A-labels, the header
splitter and decoder, the Authentication-Results id check, DKIM tag lists and the message
split, and the policy loader. Each property is "never raises anything but the documented
error" plus what the function promises about its answer.

Budget: the "ci" profile (default) is small enough for every CI run; ``make fuzz`` runs
the same tests under the "fuzz" profile (HYPOTHESIS_PROFILE=fuzz), with far more examples.
Nothing is stored between runs (database=None): a case a long run finds goes into
tests/fuzz/corpus.json (or an ``@example``), which every run replays.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import string
from pathlib import Path
from typing import Any

import dkim
import dkim.util
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.auth.arfields import is_ours
from relay.auth.dkimparse import relaxed_body, relaxed_header, split_message, without_b_value
from relay.auth.verify import verify_dkim
from relay.errors import PolicyError
from relay.facts import default_registry
from relay.idn import MAX_DOMAIN, to_alabel
from relay.message import (
    Envelope,
    Message,
    Peer,
    decode_header_value,
    header_time,
    parse_header_fields,
    split_fields,
    split_header_block,
)
from relay.policy.engine import Policy
from relay.policy.loader import compile_policy
from relay.reply import Reply
from relay.smtp.paths import (
    SYNTAX_MAIL,
    SYNTAX_RCPT,
    PathArgument,
    check_sender,
    has_control,
    parse_argument,
)
from relay.smtp.relaycontrol import Recipient, RelayControl, parse_recipient

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=100, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("fuzz", max_examples=10_000, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CORPUS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fuzz" / "corpus.json").read_text(encoding="utf-8")
)


def corpus_text(key: str) -> list[str]:
    return list(CORPUS[key])


def corpus_bytes(key: str) -> list[bytes]:
    return [s.encode("latin-1") for s in CORPUS[key]]


# --- strategies -------------------------------------------------------------------------

# Every code point, lone surrogates (aiosmtpd's surrogateescape) and controls included.
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.text(any_char, max_size=300)
huge_text = st.text(any_char, min_size=1000, max_size=4000)
hostile_text = any_text | huge_text

# Characters that matter to the path grammar, weighted towards its punctuation.
_PATH_CHARS = st.sampled_from(
    list('abcXYZ09.@<>":\\ %!=[],-_+\r\n\t\x00\x7f\x85')
) | st.sampled_from(
    ["\u00e9", "\uff0e", "\u3002", "\udc80", "\u200d", "\u0435", "\ud800", "\U0001f600"]
)
path_text = st.text(_PATH_CHARS, max_size=60)

CONFIGURED = ("localhost", "example.org")
SUFFIXES = (".sub.example.net",)
ALL_DOMAINS = CONFIGURED + tuple(s[1:] for s in SUFFIXES)
OUTSIDE_IP = "198.51.100.7"
INSIDE_NETWORKS = (ipaddress.ip_network("10.0.0.0/8"),)

# Look-alikes of ASCII characters and of the dot: full-width forms, Cyrillic, dotless i,
# Kelvin sign, zero-width characters, the ideographic and half-width full stops.
_LOOKALIKE: dict[str, list[str]] = {
    ".": ["\uff0e", "\u3002", "\uff61", "\u2024", "\u00b7"],
    "a": ["\u0430", "\uff41", "\u00e0"],
    "e": ["\u0435", "\uff45", "\u00e9"],
    "o": ["\u043e", "\uff4f", "\u00f6", "0"],
    "l": ["\u04cf", "1", "\uff4c"],
    "x": ["\u0445", "\uff58"],
    "m": ["\uff4d"],
    "p": ["\u0440"],
    "c": ["\u0441"],
    "s": ["\u0455"],
    "i": ["\u0131", "\u0456"],
    "k": ["\u212a"],
    "t": ["\uff54"],
    "n": ["\u0578"],
}


@st.composite
def lookalike_domain(draw: st.DrawFn) -> str:
    """A configured domain (or a subdomain of a suffix) with a few characters swapped for
    look-alikes, the case changed, zero-width characters or a trailing dot added."""
    base = draw(st.sampled_from(ALL_DOMAINS))
    if draw(st.booleans()):
        base = draw(st.sampled_from(["www", "a", "xn--bcher-kva", "b\u00fccher"])) + "." + base
    out: list[str] = []
    for ch in base:
        roll = draw(st.integers(0, 9))
        if roll == 0 and ch in _LOOKALIKE:
            out.append(draw(st.sampled_from(_LOOKALIKE[ch])))
        elif roll == 1:
            out.append(ch.upper())
        elif roll == 2 and draw(st.booleans()):
            out.append(ch + draw(st.sampled_from(["\u200b", "\u200d", "\u00ad", "\ufeff"])))
        else:
            out.append(ch)
    tail = draw(st.sampled_from(["", "", "", ".", "\uff0e", "x", ".evil.test"]))
    return "".join(out) + tail


local_part = st.sampled_from(
    ["user", "a.b", '"quoted"', '"a b"', "x+tag", "\u00e9l\u00e8ve", '"a@b"', "u%v", "u!v"]
) | st.text(_PATH_CHARS, min_size=1, max_size=12)


# --- SMTP paths ---------------------------------------------------------------------------


def _render(keyword: str, parsed: PathArgument) -> str:
    params = "".join(f" {k}" if v is None else f" {k}={v}" for k, v in parsed.params)
    return f"{keyword}:<{parsed.path}>{params}"


def _check_argument(arg: str, keyword: str, syntax: Reply) -> None:
    parsed = parse_argument(arg, keyword, syntax)
    if isinstance(parsed, Reply):
        assert parsed.code in (501, 553, 555)
        return
    assert not has_control(parsed.path)
    assert all(not has_control(k) and (v is None or not has_control(v)) for k, v in parsed.params)
    assert parse_argument(_render(keyword, parsed), keyword, syntax) == parsed
    if keyword == "FROM":
        reply = check_sender(parsed.path)
        assert reply is None or reply.code == 501


@pytest.mark.parametrize("arg", corpus_text("smtp_arguments"))
def test_parse_argument_corpus(arg: str) -> None:
    _check_argument(arg, "FROM", SYNTAX_MAIL)
    _check_argument(arg, "TO", SYNTAX_RCPT)


@given(st.one_of(st.none(), hostile_text), st.sampled_from(["FROM", "TO"]))
def test_parse_argument_never_raises(arg: str | None, keyword: str) -> None:
    if arg is None:
        assert parse_argument(arg, keyword, SYNTAX_MAIL) == SYNTAX_MAIL
        return
    _check_argument(arg, keyword, SYNTAX_MAIL if keyword == "FROM" else SYNTAX_RCPT)


@given(
    st.sampled_from(["FROM", "TO", "from", "To"]),
    st.sampled_from(["", " ", "  "]),
    path_text,
    st.lists(
        st.tuples(
            st.text(string.ascii_letters + string.digits + "-=", min_size=1, max_size=8),
            st.one_of(st.none(), st.text(_PATH_CHARS, max_size=8)),
        ),
        max_size=3,
    ),
)
def test_parse_argument_structured(keyword: str, space: str, path: str, params: Any) -> None:
    tail = "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params)
    upper = keyword.upper()
    _check_argument(f"{keyword}:{space}<{path}>{tail}", upper, SYNTAX_MAIL)


@given(hostile_text | path_text)
def test_check_sender_never_raises(path: str) -> None:
    reply = check_sender(path)
    assert reply is None or reply.code == 501


# --- relay control ------------------------------------------------------------------------

CONTROL = RelayControl(CONFIGURED + SUFFIXES, INSIDE_NETWORKS)


def _check_recipient(path: str) -> None:
    for ip in (OUTSIDE_IP, "10.1.2.3", "not-an-ip", "::ffff:10.0.0.1", "fe80::1%eth0"):
        CONTROL.check(path, ip)  # never raises
    rcpt = CONTROL.check(path, OUTSIDE_IP)
    if isinstance(rcpt, Reply):
        assert rcpt.code in (550, 553, 554)
        return
    if not rcpt.domain:
        assert path.lower() == "postmaster"
        return
    # Accepted from outside: the A-label form is a configured domain or under a suffix ...
    assert rcpt.domain.isascii() and rcpt.domain == rcpt.domain.lower()
    assert rcpt.domain in CONFIGURED or rcpt.domain.endswith(SUFFIXES)
    # ... and every label is the one written: ASCII lower-cased, anything else as xn--,
    # so no look-alike spelling was mapped onto a configured name.
    assert path.startswith(rcpt.local + "@")
    written = path[len(rcpt.local) + 1 :].split(".")
    labels = rcpt.domain.split(".")
    assert len(written) == len(labels)
    for raw, label in zip(written, labels, strict=True):
        assert label == raw.lower() if raw.isascii() else label.startswith("xn--")


@pytest.mark.parametrize("path", corpus_text("recipient_paths"))
def test_relay_control_corpus(path: str) -> None:
    _check_recipient(path)


@given(local_part, lookalike_domain())
@example("user", "example\uff0eorg")
@example("user", "EXAMPLE.ORG")
@example("user", "\u212aevil.sub.example.net")
def test_relay_control_lookalikes(local: str, domain: str) -> None:
    _check_recipient(f"{local}@{domain}")


@given(hostile_text | path_text)
def test_relay_control_never_raises(path: str) -> None:
    _check_recipient(path)
    result = parse_recipient(path)
    assert isinstance(result, Recipient | Reply)


# --- IDNA ---------------------------------------------------------------------------------


def _check_alabel(domain: str) -> None:
    try:
        out = to_alabel(domain)
    except ValueError:
        return
    assert out.isascii() and out == out.lower()
    assert all(out.split(".")) and len(out) <= MAX_DOMAIN
    assert to_alabel(out) == out  # an A-label form is its own A-label form


@given(hostile_text | lookalike_domain() | st.text(_PATH_CHARS, max_size=40))
@example("xn--bcher-kva.example")
@example("b\u00fccher.example")
@example("B\u00dcCHER.example")
@example("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62)
@example("xn--.test")
@example("\udc80.test")
def test_to_alabel_only_value_error(domain: str) -> None:
    _check_alabel(domain)


# --- header splitting and decoding --------------------------------------------------------

# Header-ish bytes: names, colons, folding, every line end, 8-bit bytes, mbox lines.
_HEADER_PIECES = st.sampled_from(
    [
        b"A",
        b"Subject",
        b"From ",
        b"From",
        b":",
        b" ",
        b"\t",
        b"\r\n",
        b"\n",
        b"\r",
        b"x",
        b"\xff",
        b"=?utf-8?q?caf=C3=A9?=",
        b"=?x?b?",
        b"?=",
        b"Received: a; ",
        b"Date: ",
        b"\x00",
        b"\x7f",
        b"Mon, 1 Jan 2024 00:00:00 +0000",
    ]
)
header_bytes = st.lists(_HEADER_PIECES, max_size=40).map(b"".join) | st.binary(max_size=2000)


_BARE_LINE = re.compile(rb"\n(?![ \t]|\Z)")


def _check_header_block(raw: bytes) -> None:
    head, rest = split_header_block(raw)
    assert head + rest == raw
    split = split_fields(head)
    assert 0 <= split.end <= len(head)
    joined = b"".join(name + b":" + value for name, value in split.fields)
    for name, value in split.fields:
        assert name and b":" not in name and b"\n" not in name
        assert not _BARE_LINE.search(value)  # every line after the first is a continuation
    # Each field is its bytes in the block, in order; fields and the rest are the block
    # byte for byte, unless an mbox line or a leading continuation line was skipped.
    at = 0
    for name, value in split.fields:
        found = head.find(name + b":" + value, at)
        assert found >= 0
        at = found + len(name) + 1 + len(value)
    assert at <= split.end
    skipped = head.startswith(b"From ") or b"\nFrom " in head
    if not skipped and not split.problem.startswith("continuation"):
        assert joined + head[split.end :] == head
    fields = parse_header_fields(head)
    for _name, text in fields:
        decode_header_value(text)
    header_time(fields)


@pytest.mark.parametrize("raw", corpus_bytes("header_blocks"))
def test_header_block_corpus(raw: bytes) -> None:
    _check_header_block(raw)
    _check_message_edits(raw)


@given(header_bytes)
@example(b"Received: a; \r\n ")
def test_split_fields_byte_exact(raw: bytes) -> None:
    _check_header_block(raw)


_WORD = st.builds(
    lambda cs, enc, body: f"=?{cs}?{enc}?{body}?=",
    st.sampled_from(["utf-8", "UTF-8", "iso-8859-1", "us-ascii", "bogus", "utf-16", "", "*"]),
    st.sampled_from(["q", "Q", "b", "B"]),
    st.text(st.sampled_from(list("=ABCF09az_/+?. \t")), max_size=20),
)


@given(st.one_of(any_text, st.lists(_WORD | any_text, max_size=5).map(" ".join), st.integers()))
def test_decode_header_value_never_raises(value: object) -> None:
    assert isinstance(decode_header_value(value), str)


@given(st.lists(st.tuples(any_text | st.sampled_from(["Received", "date", " DATE "]), any_text)))
@example([("Received", "x; Thu, 31 Dec 99999 23:59:59 +0000")])
@example([("Date", "Mon, 1 Jan 0001 00:00:00 -2359")])
def test_header_time_never_raises(fields: list[tuple[str, str]]) -> None:
    when = header_time(fields)
    assert when is None or isinstance(when, float)


def _message(raw: bytes) -> Message:
    return Message(raw, Envelope("", ()), Peer("192.0.2.1"), received_at=0.0)


def _check_message_edits(raw: bytes) -> None:
    msg = _message(raw)
    msg.header("subject")
    assert msg.without_headers(lambda _n, _f: False) is msg
    rest = split_header_block(raw)[1]
    for drop in (lambda n, _f: n.startswith("a"), lambda _n, _f: True):
        out = msg.without_headers(drop)
        assert out.raw.endswith(rest)  # the body is never touched
        assert len(out.raw) <= len(raw)


@given(header_bytes)
def test_without_headers_never_raises(raw: bytes) -> None:
    _check_message_edits(raw)


# A field name as a caller might pass one (a final "\n" included: it must be refused).
_NAME = st.text(st.sampled_from(list("AXZ-:; \t\r\n\x00\u00e9")), max_size=8)
_VALUE = st.lists(
    st.sampled_from([*"ab ;\t\r\n\x00\u00e9", "\r\n ", "\r\n\t", "\udc80"]), max_size=12
).map("".join)


@given(st.lists(st.tuples(_NAME, _VALUE), min_size=1, max_size=3), header_bytes)
@example([("X-A", "a\r\nBcc: x")], b"A: b\r\n\r\n")
@example([("X-A", "a\nBcc: x")], b"A: b\r\n\r\n")
@example([("X-A", "a\r\n")], b"A: b\r\n\r\n")
@example([("X A", "a")], b"A: b\r\n\r\n")
@example([(";", "")], b" ")
def test_with_prepended_refuses_injection(headers: list[tuple[str, str]], raw: bytes) -> None:
    msg = _message(raw)
    try:
        out = msg.with_prepended(headers)
    except ValueError:
        return
    # Accepted: no line was injected, so the block starts with exactly these fields.
    fields = split_fields(split_header_block(out.raw)[0]).fields
    assert [n.decode() for n, _ in fields[: len(headers)]] == [n for n, _ in headers]
    for (_, value), (_, got) in zip(headers, fields, strict=False):
        want = b" " + value.encode("utf-8", "surrogateescape") + b"\r\n"
        assert got == want  # nothing of the message joined a field we added
    name, value = headers[0]
    assert out.raw.startswith(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    assert out.raw.endswith(raw)


def test_with_prepended_name_trailing_newline() -> None:
    """Found by fuzzing: the name check used "$", which also matches before a final
    newline, so "X-A\\n" ended the header block."""
    with pytest.raises(ValueError):
        _message(b"A: b\r\n\r\nbody").with_prepended([("X-A\n", "v")])


def test_with_prepended_leading_continuation() -> None:
    """Found by fuzzing: a message whose first line starts with a blank continued the
    field prepended last (a sender could append to our Authentication-Results). It is
    refused: ValueError here, 550 5.6.0 at the SMTP layer."""
    msg = _message(b" dkim=pass header.d=bank.test\r\nSubject: x\r\n\r\nbody")
    with pytest.raises(ValueError):
        msg.with_prepended([("Authentication-Results", "mx.test; spf=fail")])


# --- Authentication-Results ---------------------------------------------------------------

OURS = ("mx.example.org", "relay.test", "b\u00fccher.example", "xn--bcher-kva.example")


def _swapcase_ascii(text: str, mask: list[bool]) -> str:
    return (
        "".join(c.swapcase() if c.isascii() and m else c for c, m in zip(text, mask, strict=False))
        + text[len(mask) :]
    )


def _encoded(text: str, charset: str, kind: str) -> str:
    data = text.encode(charset)
    if kind in "qQ":
        body = "".join(f"={b:02X}" for b in data)
    else:
        body = base64.b64encode(data).decode("ascii")
    return f"=?{charset}?{kind}?{body}?="


@st.composite
def ours_variant(draw: st.DrawFn) -> tuple[str, str]:
    """(authserv-id, an Authentication-Results value that claims it)."""
    ours = draw(st.sampled_from(OURS))
    written = ours
    if ours == "b\u00fccher.example" and draw(st.booleans()):
        written = "xn--bcher-kva.example"
    elif ours == "xn--bcher-kva.example" and draw(st.booleans()):
        written = "b\u00fccher.example"
    written = _swapcase_ascii(written, draw(st.lists(st.booleans(), max_size=len(written))))
    written += "." * draw(st.integers(0, 3))
    how = draw(st.sampled_from(["plain", "quoted", "encoded", "split"]))
    if how == "quoted":
        written = f'"{written}"'
    elif how in ("encoded", "split"):
        charset = draw(
            st.sampled_from(
                ["utf-8", "UTF-8"] if not written.isascii() else ["utf-8", "us-ascii", "iso-8859-1"]
            )
        )
        kind = draw(st.sampled_from("qQbB"))
        if how == "split" and len(written) > 1:
            cut = draw(st.integers(1, len(written) - 1))
            gap = draw(st.sampled_from([" ", "  ", "\r\n ", "\t"]))
            written = (
                _encoded(written[:cut], charset, kind)
                + gap
                + _encoded(written[cut:], charset, kind)
            )
        else:
            written = _encoded(written, charset, kind)
    lead = draw(st.sampled_from(["", " ", "\r\n\t", " (comment) ", "(a (nested) one)"]))
    tail = draw(st.sampled_from(["; spf=pass", " 1; spf=pass", ";spf=pass", "(x); dkim=fail"]))
    return ours, lead + written + tail


@given(ours_variant())
@example(("mx.example.org", "MX.Example.Org.; spf=pass"))
@example(("mx.example.org", "=?utf-8?q?mx.example.org?=; spf=pass"))
@example(("mx.example.org", "=?utf-8?b?bXguZXhhbXBsZS5vcmc=?=; spf=pass"))
def test_is_ours_variants(case: tuple[str, str]) -> None:
    ours, value = case
    assert is_ours(value, ours)


@given(
    st.sampled_from(OURS),
    st.sampled_from(["x{}", "mail.{}", "{}.evil", "{}x", "{}-x", "x.{}", "{}..evil"]),
    st.sampled_from(["; spf=pass", " ; dkim=pass", "(c); arc=none"]),
)
def test_is_ours_not_other_domains(ours: str, shape: str, tail: str) -> None:
    other = shape.format(ours)
    assert not is_ours(other + tail, ours)
    assert not is_ours(_encoded(other, "utf-8", "q") + tail, ours)


@given(any_text | st.lists(_WORD | any_text, max_size=4).map(" ".join), st.sampled_from(OURS))
def test_is_ours_never_raises(value: str, ours: str) -> None:
    assert isinstance(is_ours(value, ours), bool)


# --- DKIM ---------------------------------------------------------------------------------

_TAG_PIECES = st.sampled_from(
    [
        b"v",
        b"a",
        b"b",
        b"bh",
        b"d",
        b"s",
        b"h",
        b"=",
        b";",
        b" ",
        b"\r\n",
        b"\t",
        b"1",
        b"rsa-sha256",
        b"_",
        b"\xff",
        b"\x00",
        b"From:To",
    ]
)
tag_bytes = st.lists(_TAG_PIECES, max_size=30).map(b"".join) | st.binary(max_size=500)


@pytest.mark.parametrize("tags", corpus_bytes("dkim_tag_lists"))
def test_dkim_tag_list_corpus(tags: bytes) -> None:
    test_dkim_tag_list_only_documented_error.hypothesis.inner_test(tags)  # type: ignore[attr-defined]


@given(tag_bytes)
def test_dkim_tag_list_only_documented_error(tags: bytes) -> None:
    try:
        parsed = dkim.util.parse_tag_value(tags)
    except dkim.util.InvalidTagValueList:
        return
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in parsed.items())
    relaxed_header(b"DKIM-Signature", tags)
    without_b_value(tags)


@given(header_bytes, st.binary(max_size=300))
def test_dkim_message_split_only_documented_error(head: bytes, body: bytes) -> None:
    relaxed_body(body)
    for raw in (head, head + b"\r\n\r\n" + body, b"DKIM-Signature: " + head + b"\r\n\r\n"):
        try:
            fields, _ = split_message(raw)
        except dkim.MessageFormatError:
            continue
        for name, value in fields:
            relaxed_header(name, value)


@given(tag_bytes, header_bytes)
def test_verify_dkim_never_raises(tags: bytes, head: bytes) -> None:
    raw = b"DKIM-Signature: " + tags + b"\r\n" + head + b"\r\n\r\nbody\r\n"
    results = verify_dkim(raw, {b"s._domainkey.d.": b"v=DKIM1; p=", b"x._domainkey.y.": None}, 3)
    assert all(
        sig.result in ("pass", "fail", "permerror", "temperror") for sig in results.signatures
    )


# --- policy loader ------------------------------------------------------------------------

REGISTRY = default_registry()
MAX_POLICY = 3000  # characters: the loader reads operator files, not megabytes

_TOML_LINES = st.sampled_from(
    [
        "[policy]",
        "[policy.thresholds]",
        "[[rule]]",
        "[[override]]",
        "[rule]",
        "[policy.x]",
        'name = "p"',
        'name = "a b"',
        "name = 1",
        'mode = "shadow"',
        'mode = "x"',
        "tag = 5.0",
        "reject = 1",
        "quarantine = -1e308",
        "tempfail = nan",
        "tag = inf",
        "when = 'spf == \"fail\"'",
        "when = 'dkim_result'",
        "when = '('",
        "when = 'size > 1'",
        "when = 'spam_probability > 0.9 && size < \"x\"'",
        "when = 1",
        "score = 2.5",
        "score = true",
        'action = "reject"',
        'action = "explode"',
        'reason = "r"',
        'reason = "a\\nb"',
        'domains = ["example.org", "*.example.net"]',
        'domains = ["*.", ""]',
        "domains = []",
        'domains = ["\u00c9.test"]',
        'description = "d"',
        "unknown = 1",
        "x",
        "= =",
        '"',
        "rule = []",
        "override = {}",
    ]
)
policy_text = st.lists(_TOML_LINES, max_size=25).map("\n".join) | st.text(
    any_char, max_size=MAX_POLICY
)


@pytest.mark.parametrize("text", corpus_text("policy_texts"))
def test_policy_corpus(text: str) -> None:
    test_compile_policy_only_policy_error.hypothesis.inner_test(text)  # type: ignore[attr-defined]


@given(policy_text)
def test_compile_policy_only_policy_error(text: str) -> None:
    text = text[:MAX_POLICY]
    try:
        policy = compile_policy(text, REGISTRY, "fuzz.toml")
    except PolicyError as exc:
        assert exc.problems and all(isinstance(p, str) for p in exc.problems)
        return
    assert isinstance(policy, Policy)


# -- feedback intake and the learn endpoint's request parsing (issue 16) ------------------

_FIELD = st.from_regex(rb"[A-Za-z][A-Za-z0-9-]{0,20}: [ -~]{0,40}\r\n", fullmatch=True)


@given(st.binary(max_size=400))
def test_body_digest_refuses_only_with_its_error(data: bytes) -> None:
    from relay.errors import FeedbackRefused
    from relay.feedback.record import body_digest

    try:
        digest = body_digest(data)
    except FeedbackRefused as exc:
        assert exc.reason == "unparsable"
    else:
        assert re.fullmatch("[0-9a-f]{64}", digest)


@given(
    st.lists(_FIELD, min_size=1, max_size=6),
    st.lists(_FIELD, max_size=3),
    st.binary(min_size=1, max_size=200).filter(bytes.strip),
)
def test_body_digest_ignores_added_header_fields(
    fields: list[bytes], added: list[bytes], body: bytes
) -> None:
    from relay.feedback.record import body_digest

    body = body.replace(b"\r", b"")  # line ends are normalised; bare CRs are data
    message = b"".join(fields) + b"\r\n" + body
    assert body_digest(b"".join(added) + message) == body_digest(message)
    assert body_digest(message.replace(b"\r\n", b"\n")) == body_digest(message)


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=64))
async def test_learn_request_parsing_answers_or_raises_bad_request(data: bytes, limit: int) -> None:
    import asyncio

    from relay.ops.http import BadRequest, read_body, read_request

    reader = asyncio.StreamReader(limit=8192)
    reader.feed_data(data)
    reader.feed_eof()
    try:
        request = await read_request(reader, body=True)
        body = await read_body(reader, request, limit)
    except BadRequest as exc:
        assert exc.status in (400, 413)
    else:
        assert len(body) <= limit
        assert int(request.headers["content-length"]) == len(body)
