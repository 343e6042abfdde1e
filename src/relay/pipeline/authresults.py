"""The Authentication-Results header (RFC 8601): one per message, under our authserv-id.

``AuthResultsStamp`` is a pipeline Stamp. It drops every incoming Authentication-Results
field that claims our authserv-id (RFC 8601 5: senders must not be able to forge our
verdicts), then prepends one field built from the ``auth_results`` fact. The raw bytes
are never re-serialised, so downstream DKIM still verifies.

Whether a field claims our id is ``is_ours(value, authserv_id)``, one pure function, and
it errs towards "ours": downstream filters and mail readers trust a field under our id,
and each reads the id a little differently. The value is read as it is written, with its
RFC 2047 encoded words decoded in place, and as the stdlib decoder gives it; in each
reading, folding, whitespace and comments before the id are skipped, a quoted id is
unquoted, then the id is cut at whitespace, ``;`` or ``(`` (so a version, ``ours 1;``,
does not hide it), trailing dots are dropped and it is compared case-insensitively with
ours; when either is non-ASCII, their A-label forms (``idn.to_alabel``) are compared.
``ours.``, ``OURS``, ``=?utf-8?q?ours?=``, ``(x) ours`` and the U-label of an IDN id are
ours; ``mail.ours`` or ``ours.evil`` are someone else's and are kept.

    Authentication-Results: mx.example.org;
        dkim=pass header.d=example.com header.s=sel header.a=rsa-sha256 header.b="AbCdEfGh";
        spf=pass smtp.mailfrom=alice@example.com;
        dmarc=pass (p=reject sp=reject pct=100) header.from=example.com;
        arc=none
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from relay.auth.arfields import is_ours
from relay.contracts import FactSource
from relay.errors import FactError
from relay.message import Message, decode_8bit
from relay.verdict import Verdict

log = logging.getLogger("relay.auth")

HEADER = "Authentication-Results"
MAX_VALUE = 255  # characters of one property value (a domain name is at most 253)
FOLD_AT = 200  # a resinfo longer than this is folded between its properties
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+$")  # RFC 2045 token
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*$")
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _quoted(text: str) -> str:
    text = _UNSAFE.sub("?", text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def value(text: str) -> str:
    """A pvalue: a token as is, anything else as a quoted-string; printable ASCII only,
    at most MAX_VALUE characters (a hostile i= or s= can be kilobytes long)."""
    if len(text) > MAX_VALUE:
        return _quoted(text[: MAX_VALUE - 3] + "...")
    return text if _TOKEN.match(text) else _quoted(text)


def address(text: str) -> str:
    """``local@domain`` unquoted when it is a plain dot-atom address (RFC 8601 2.2 pvalue)."""
    local, at, domain = text.rpartition("@")
    short = len(text) <= MAX_VALUE
    if short and at and (not local or _DOT_ATOM.match(local)) and _TOKEN.match(domain):
        return text
    return value(text)


def _comment(text: str) -> str:
    text = _UNSAFE.sub("?", text)
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def _resinfo(method: str, result: str, reason: str = "", *props: tuple[str, str]) -> str:
    parts = [f"{method}={result}"]
    if reason:
        parts.append(f"reason={_quoted(reason[:MAX_VALUE])}")
    parts += [f"{name}={val}" for name, val in props if val]
    line = " ".join(parts)
    # Long ones are folded between properties (CFWS is allowed there) to stay well under
    # the 998-character line limit of RFC 5322.
    return line if len(line) <= FOLD_AT else "\r\n\t ".join(parts)


def _dkim(dkim: Mapping[str, Any]) -> list[str]:
    sigs: Sequence[Mapping[str, Any]] = dkim.get("signatures", [])
    if not sigs:
        return ["dkim=none"]
    out: list[str] = []
    for sig in sigs[: int(dkim.get("limit", 10))]:
        bits = sig.get("key_bits")
        note = f" {_comment(f'{bits}-bit key')}" if sig.get("result") == "pass" and bits else ""
        out.append(
            _resinfo(
                "dkim",
                str(sig.get("result", "permerror")) + note,
                str(sig.get("reason", "")),
                ("header.d", value(sig["domain"]) if sig.get("domain") else ""),
                ("header.i", address(sig["identity"]) if sig.get("identity") else ""),
                ("header.s", value(sig["selector"]) if sig.get("selector") else ""),
                ("header.a", value(sig["algorithm"]) if sig.get("algorithm") else ""),
                ("header.b", value(sig["b_prefix"][:8]) if sig.get("b_prefix") else ""),
            )
        )
    if dkim.get("note"):
        out.append(_resinfo("dkim", "permerror", str(dkim["note"])))
    return out


def _spf(spf: Mapping[str, Any], helo: Mapping[str, Any]) -> list[str]:
    out = [
        _resinfo(
            "spf",
            str(spf.get("result", "none")),
            str(spf.get("reason", "")),
            ("smtp.mailfrom", address(spf["sender"]) if spf.get("sender") else ""),
        )
    ]
    if helo.get("domain"):
        out.append(
            _resinfo(
                "spf",
                str(helo.get("result", "none")),
                str(helo.get("reason", "")),
                ("smtp.helo", value(helo["domain"])),
            )
        )
    return out


def _dmarc(dmarc: Mapping[str, Any]) -> str:
    result = str(dmarc.get("result", "none"))
    if dmarc.get("record_domain"):
        # The published policy only: what is done about it is the relay policy's business.
        result += " " + _comment(
            f"p={dmarc.get('p', '')} sp={dmarc.get('sp', '')} pct={dmarc.get('pct', 100)}"
        )
    reason = "" if dmarc.get("result") in ("pass", "fail") else str(dmarc.get("reason", ""))
    domain = str(dmarc.get("from_domain", ""))
    return _resinfo("dmarc", result, reason, ("header.from", value(domain) if domain else ""))


def _arc(arc: Mapping[str, Any], client_ip: str) -> str:
    oldest = arc.get("oldest_pass")
    return _resinfo(
        "arc",
        str(arc.get("result", "none")),
        "" if arc.get("result") in ("pass", "none") else str(arc.get("reason", "")),
        ("header.oldest-pass", str(oldest) if oldest is not None else ""),
        ("smtp.remote-ip", value(client_ip) if arc.get("instances") and client_ip else ""),
    )


def format_value(authserv_id: str, results: Mapping[str, Any]) -> str:
    """The header value (folded with CRLF + TAB) from the ``auth_results`` mapping."""
    parts = [
        *_dkim(results.get("dkim", {})),
        *_spf(results.get("spf", {}), results.get("spf_helo", {})),
        _dmarc(results.get("dmarc", {})),
        _arc(results.get("arc", {}), str(results.get("client_ip", ""))),
    ]
    return value(authserv_id) + ";\r\n\t" + ";\r\n\t".join(parts)


def failure_value(authserv_id: str, reason: str) -> str:
    """When the checks themselves failed: say so rather than claim ``none``."""
    info = _quoted(reason[:120])
    return (
        value(authserv_id)
        + ";\r\n\t"
        + ";\r\n\t".join(f"{m}=temperror reason={info}" for m in ("dkim", "spf", "dmarc"))
    )


class AuthResultsStamp:
    """Pipeline stamp: strip forged Authentication-Results, prepend ours."""

    def __init__(self, authserv_id: str) -> None:
        if not authserv_id:
            raise ValueError("authserv_id must not be empty")
        self.authserv_id = authserv_id

    def forged(self, name: str, field: bytes) -> bool:
        """An Authentication-Results field that claims our authserv-id (``is_ours``)."""
        if name != "authentication-results":
            return False
        return is_ours(decode_8bit(field.partition(b":")[2]), self.authserv_id)

    async def __call__(self, message: Message, facts: FactSource, verdict: Verdict) -> Message:
        cleaned = message.without_headers(self.forged)
        try:
            results = await facts.get("auth_results")
            header = format_value(self.authserv_id, results)
        except FactError as exc:
            log.warning("queue_id=%s authentication failed: %s", message.queue_id, exc)
            header = failure_value(self.authserv_id, "authentication checks failed")
        return cleaned.with_prepended([(HEADER, header)])
