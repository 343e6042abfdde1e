"""MAIL and RCPT arguments, parsed strictly (RFC 5321 4.1.2, 4.1.3; RFC 6531 for UTF-8).

The path is kept exactly as the client wrote it between the angle brackets. That one
string is what relay control, SPF and the policy judge, and what the downstream receives
byte for byte: nobody re-parses it on the way out (a second, laxer parser downstream is
how ``"ceo@bank.test\\r"@spf.test`` used to be judged as one sender and delivered as
another).

Errors, as Postfix gives them:
- 501 5.5.4  framing: no ``FROM:``/``TO:``, no ``<``, unterminated path, a space or a
             control character in the path, a malformed parameter;
- 555 5.5.4  an unknown or repeated parameter (RFC 5321 4.1.1.11);
- 501 5.1.7  a reverse-path that is not a mailbox (bad local part or domain, source route);
- 553 5.6.7  a non-ASCII address without the SMTPUTF8 parameter (RFC 6531 3.7.4.1).
Recipient mailboxes are judged by relaycontrol, which knows relay tricks.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from relay.idn import to_alabel
from relay.reply import Reply

# RFC 5321 4.1.2 atext and qtextSMTP / quoted-pairSMTP; RFC 6531 adds UTF8-non-ascii to both.
_ATOM = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+"
_DOT_STRING = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED_STRING = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"$')
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_VALUE = re.compile(r"^(?:[\x21-\x3c\x3e-\x7e]|[^\x00-\x7f])+$")  # RFC 6531 esmtp-value
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")

SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
CONTROL_CHAR = Reply(501, "5.5.4", "Syntax: control characters are not allowed in a command")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
SOURCE_ROUTE = Reply(501, "5.1.7", "Source routes are not accepted")
BAD_PARAMETER = Reply(501, "5.5.4", "Syntax: malformed parameter")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported or repeated parameter")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address without the SMTPUTF8 parameter")


@dataclass(frozen=True, slots=True)
class PathArgument:
    """One MAIL or RCPT argument: the path as sent and its parameters."""

    path: str  # between < and >, exactly as sent; "" for the null reverse-path <>
    params: tuple[tuple[str, str | None], ...]  # (KEYWORD upper-cased, value as sent)

    @property
    def ascii(self) -> bool:
        return self.path.isascii()

    def has(self, keyword: str) -> bool:
        return any(key == keyword for key, _ in self.params)

    def options(self) -> tuple[str, ...]:
        """Parameters as ``KEY=value`` / ``KEY`` strings, keywords upper-cased."""
        return tuple(k if v is None else f"{k}={v}" for k, v in self.params)


def has_control(text: str) -> bool:
    """C0, DEL, C1 or an undecodable byte (surrogate-escaped by aiosmtpd)."""
    return any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or unicodedata.category(c) == "Cs"
        for c in text
        if not (0x20 <= ord(c) < 0x7F)
    )


def unquoted(text: str) -> Iterator[tuple[str, bool]]:
    """Each character with whether it stands outside a quoted string (quotes and the
    backslash of a quoted pair count as inside)."""
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        yield ch, not quoted and ch != '"'


def _close_bracket(text: str) -> int:
    """Index of the '>' closing a path that starts at text[0] == '<', or -1."""
    for i, (ch, outside) in enumerate(unquoted(text)):
        if i and ch == ">" and outside:
            return i
    return -1


def _space_outside_quotes(path: str) -> bool:
    return any(ch == " " and outside for ch, outside in unquoted(path))


def _params(text: str) -> tuple[tuple[str, str | None], ...] | Reply:
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for item in text.split(" "):
        if not item:
            continue  # several spaces between parameters: tolerated, as Postfix does
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            return BAD_PARAMETER
        key = key.upper()
        if key in seen:
            return UNKNOWN_PARAMETER
        seen.add(key)
        out.append((key, value if eq else None))
    return tuple(out)


def parse_argument(arg: str | None, keyword: str, syntax: Reply) -> PathArgument | Reply:
    """``FROM:<path> params`` (keyword ``FROM``) or ``TO:<path> params`` (``TO``).

    Checks framing only; the mailbox inside the path is judged by the caller.
    """
    if not arg:
        return syntax
    if has_control(arg):
        return CONTROL_CHAR
    head, colon, rest = arg.partition(":")
    if not colon or head.upper() != keyword:
        return syntax
    rest = rest.lstrip(" ")  # "MAIL FROM: <a@b>" is common and harmless (Postfix takes it)
    if not rest.startswith("<"):
        return syntax
    end = _close_bracket(rest)
    if end < 0:
        return syntax
    path, tail = rest[1:end], rest[end + 1 :]
    if not path and keyword == "TO":
        return syntax
    if _space_outside_quotes(path):
        return syntax
    if tail and not tail.startswith(" "):
        return syntax
    params = _params(tail)
    if isinstance(params, Reply):
        return params
    return PathArgument(path=path, params=params)


def split_at(path: str) -> list[str]:
    """Split at every '@' outside a quoted string (a mailbox has exactly two parts)."""
    parts: list[str] = []
    cur: list[str] = []
    for ch, outside in unquoted(path):
        if ch == "@" and outside:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def valid_local_part(local: str) -> bool:
    return bool(_DOT_STRING.match(local) or _QUOTED_STRING.match(local))


def valid_address_literal(domain: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return False
    inner = domain[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        elif _IPV4.match(inner):
            ipaddress.IPv4Address(inner)
        else:
            return False
    except ValueError:
        return False
    return True


def check_sender(path: str) -> Reply | None:
    """None when a reverse-path is the null path or a well-formed mailbox."""
    if not path:
        return None
    if path.startswith("@"):
        return SOURCE_ROUTE
    parts = split_at(path)
    if len(parts) != 2:
        return BAD_SENDER
    local, domain = parts
    if not valid_local_part(local):
        return BAD_SENDER
    if domain.startswith("["):
        return None if valid_address_literal(domain) else BAD_SENDER
    try:
        to_alabel(domain)
    except ValueError:
        return BAD_SENDER
    return None


def check_mail(parsed: PathArgument, *, esmtp: bool, size_limit: int | None) -> Reply | None:
    """None when a MAIL argument is acceptable: its parameters (BODY, SIZE, SMTPUTF8 only,
    and only after EHLO), SMTPUTF8 for a non-ASCII path, and the reverse-path itself."""
    if parsed.params and not esmtp:
        return SYNTAX_MAIL  # parameters need EHLO (RFC 5321 4.1.1.11)
    for key, value in parsed.params:
        if key == "BODY":
            if (value or "").upper() not in ("7BIT", "8BITMIME"):
                return Reply(501, "5.5.4", "BODY is one of 7BIT, 8BITMIME")
        elif key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return Reply(501, "5.5.4", "SIZE takes a number")
            if size_limit and int(value) > size_limit:
                return Reply(552, "5.3.4", "Message size exceeds fixed limit")
        elif key == "SMTPUTF8":
            if value is not None:
                return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
        else:
            return UNKNOWN_PARAMETER
    if not parsed.ascii and not parsed.has("SMTPUTF8"):
        return NEEDS_SMTPUTF8
    return check_sender(parsed.path)
