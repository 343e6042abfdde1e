"""A cheap pass over the header block: what must be looked up before any crypto runs.

It finds the DKIM, ARC-Seal and ARC-Message-Signature key names to prefetch and the
RFC5322.From domain (for DMARC). Nothing here raises on bad input: a header that cannot
be read simply yields no key name, and the verifier reports the permerror later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy as email_policy
from email.headerregistry import AddressHeader

from relay.auth.domains import normalise_domain
from relay.auth.tagvalue import TagListError, parse_tag_value
from relay.errors import RelayError
from relay.message import Fields, split_fields

MAX_SIGNATURE_FIELD = 16 * 1024  # a DKIM-Signature larger than this is refused unread
MAX_ARC_INSTANCES = 50  # RFC 8617 5.1.1.1: i= is at most 50
# Longest From field the stdlib parser may read on the event loop: at most ~2.5 ms on the
# most hostile input measured (a 100-byte ordinary field takes ~0.1 ms).
FROM_PARSE_ON_LOOP = 128

# The two shapes most From fields have, read without the stdlib's RFC 5322 parser (75 us
# a field): ``local@domain`` and ``Display Name <local@domain>``, dot-atoms only, with no
# comment, quoted string, escape, group, second address or non-ASCII byte anywhere. Any
# other field, however ordinary, goes to the full parser; both give the same domain
# (tests/test_auth_headerscan.py compares them).
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = _ATOM + rb"(?:\." + _ATOM + rb")*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_FOLD = rb"(?:[ \t]|\r\n[ \t])*"  # whitespace, folding only as CRLF + WSP
# words (atoms joined by single dots, "J." too), each followed by whitespace; possessive,
# so hostile input cannot make the expression backtrack
_WORD = rb"[A-Za-z0-9'-]++(?:\.[A-Za-z0-9'-]++)*+\.?+"
_PHRASE = rb"(?:" + _WORD + rb"(?:[ \t]|\r\n[ \t])++)*+"
_SIMPLE_FROM = re.compile(
    _FOLD + rb"(?:" + _PHRASE + rb"<" + _ADDR + rb">|" + _ADDR + rb")[ \t]*(?:\r\n)?"
)


@dataclass(frozen=True, slots=True)
class HeaderScan:
    dkim_keys: tuple[bytes, ...]  # key names (as dkimpy builds them) of the verified sigs
    arc_keys: tuple[bytes, ...]
    dkim_total: int
    arc_present: bool
    from_domain: str
    from_error: str  # why DMARC cannot use the From header ("" when it can)


def unfold_fields(header_block: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-cased name, value with folding) for each header field of the block, split
    by the relay's one splitter (``message.split_fields``)."""
    return [(name.lower(), value) for name, value in split_fields(header_block).fields]


def key_name(tags: dict[bytes, bytes]) -> bytes | None:
    """``s._domainkey.d.`` exactly as dkimpy asks for it, or None when unusable."""
    selector, domain = tags.get(b"s"), tags.get(b"d")
    if not selector or not domain:
        return None
    try:
        selector.decode("ascii")
        domain.decode("ascii")
    except UnicodeDecodeError:
        return None  # non-ASCII d=/s=: reported as permerror by the verifier
    return selector + b"._domainkey." + domain + b"."


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(b" ".join(value.split()))
    except TagListError:  # no key to fetch
        return None
    return tags


def parsed_from_domains(value: bytes) -> list[str]:
    """The domain of each address in a From field, by the stdlib's full parser."""
    text = value.decode("utf-8", "surrogateescape")
    header = email_policy.default.header_factory("from", text.strip())
    assert isinstance(header, AddressHeader)
    return [a.domain for a in header.addresses]


class _TooSlow(RelayError):
    """The From field needs the full parser and is too long to parse on the event loop."""


def from_domain(values: list[bytes], full_parse_limit: int | None = None) -> tuple[str, str]:
    """(domain, error) of the RFC5322.From field per RFC 7489 6.6.1. With
    ``full_parse_limit``, raises _TooSlow rather than give the stdlib parser a field longer
    than that (it takes about 20 us a byte on hostile input)."""
    if not values:
        return "", "no From header field"
    if len(values) > 1:
        return "", "more than one From header field"
    simple = _SIMPLE_FROM.fullmatch(values[0])
    if simple:
        raw_domains = [(simple.group(1) or simple.group(2)).decode("ascii")]
    else:
        if full_parse_limit is not None and len(values[0]) > full_parse_limit:
            raise _TooSlow
        try:
            raw_domains = parsed_from_domains(values[0])
        except Exception:  # the stdlib parser's errors vary by input
            return "", "From header field cannot be parsed"
    return single_domain(raw_domains)


def single_domain(raw_domains: list[str]) -> tuple[str, str]:
    """(domain, error): the one normalised domain the From addresses share, if any."""
    try:
        domains = {normalise_domain(d) for d in raw_domains}
    except ValueError:
        return "", "From domain is not a valid domain name"
    domains.discard("")
    if not domains:
        return "", "From header field has no domain"
    if len(domains) > 1:
        return "", "From header field names more than one domain"
    return domains.pop(), ""


def scan_headers(header_block: bytes, max_signatures: int) -> HeaderScan:
    """The whole scan, whatever it costs: run it off the event loop."""
    scan = _scan(header_block, max_signatures, None)
    assert scan is not None
    return scan


def quick_scan(
    header_block: bytes, max_signatures: int, limit: int, fields: Fields | None = None
) -> HeaderScan | None:
    """The scan when it is cheap enough for the event loop (well under a millisecond):
    None when the block is over ``limit`` bytes or its From field would need the full
    parser and is over FROM_PARSE_ON_LOOP bytes. ``fields``: the block's ``split_fields``
    when the caller has them (``Message.header_split``)."""
    if len(header_block) > limit:
        return None
    return _scan(header_block, max_signatures, FROM_PARSE_ON_LOOP, fields)


def _scan(
    header_block: bytes, max_signatures: int, from_limit: int | None, fields: Fields | None = None
) -> HeaderScan | None:
    if fields is None:
        fields = split_fields(header_block).fields
    dkim_keys: list[bytes] = []
    arc_keys: list[bytes] = []
    dkim_total = 0
    arc_sets = 0
    from_values: list[bytes] = []
    for raw_name, value in fields:
        name = raw_name.lower()
        if name == b"dkim-signature":
            dkim_total += 1
            if dkim_total > max_signatures or len(value) > MAX_SIGNATURE_FIELD:
                continue
            tags = _tags(value)
            key = key_name(tags) if tags else None
            if key and key not in dkim_keys:
                dkim_keys.append(key)
        elif name in (b"arc-seal", b"arc-message-signature"):
            arc_sets += 1
            if arc_sets > 2 * MAX_ARC_INSTANCES or len(value) > MAX_SIGNATURE_FIELD:
                continue
            tags = _tags(value)
            key = key_name(tags) if tags else None
            if key and key not in arc_keys:
                arc_keys.append(key)
        elif name == b"from":
            from_values.append(value)
    try:
        domain, error = from_domain(from_values, from_limit)
    except _TooSlow:
        return None
    return HeaderScan(
        dkim_keys=tuple(dkim_keys),
        arc_keys=tuple(arc_keys),
        dkim_total=dkim_total,
        arc_present=arc_sets > 0,
        from_domain=domain,
        from_error=error,
    )
