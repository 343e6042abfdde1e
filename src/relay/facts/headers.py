"""T1 facts read from header fields: list headers, labels, spoofing cues, RFC 5322 hygiene.

Every field is read through ``Message.headers()``/``header()`` (the message is parsed once,
lazily); only single field values are parsed here, with the stdlib's address and date
parsers. Absent string facts are "" so conditions can say ``list_id != ""``.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from relay.auth.domains import org_domain
from relay.errors import FactError
from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.envelope import address_domain
from relay.facts.services import PSL, Service
from relay.message import Message
from relay.verdict import Tier

ONE_CLICK_POST = "List-Unsubscribe=One-Click"  # RFC 8058 section 3.1, exact value
SEXUALLY_EXPLICIT = "SEXUALLY-EXPLICIT:"  # 16 CFR 316.4(a)(1): first characters of Subject
LIST_PRECEDENCE = frozenset({"bulk", "list", "junk"})
# RFC 5322 3.6: fields that may appear at most once.
SINGLE_INSTANCE = (
    "date", "from", "sender", "reply-to", "to", "cc", "bcc",
    "message-id", "in-reply-to", "references", "subject",
)  # fmt: skip
_URI = re.compile(r"<\s*([^<>\s]+)\s*>")
_MSG_ID = re.compile(r"^\s*<[^<>@\s]+@[^<>@\s]+>\s*$")
_AD_WORDS = (
    r"adv|ad|advert|advertisement|advertising|werbung|anzeige|publicit[eé]|publicidad|"
    r"pub|anuncio|reklama|reclame|広告|广告|광고"
)
_AD_LABEL = re.compile(
    rf"^\s*(?:\[\s*(?:{_AD_WORDS})\s*\]|\(\s*(?:{_AD_WORDS})\s*\)|(?:{_AD_WORDS})\s*:)",
    re.IGNORECASE,
)
_REPLY_PREFIX = re.compile(
    r"^\s*(?:re|fwd?|aw|wg|sv|vs|antw|rif|tr|rv|enc|r)\s*(?:\[\d+\]|\(\d+\))?\s*:",
    re.IGNORECASE,
)
_EMBEDDED_ADDRESS = re.compile(r"[\w.+-]+@((?:[\w-]+\.)+[\w-]{2,})", re.UNICODE)
_EMBEDDED_DOMAIN = re.compile(r"\b((?:[a-z0-9-]+\.)+[a-z]{2,})\b", re.IGNORECASE)


def addresses(message: Message, name: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of every ``name`` field; [] when absent or broken."""
    try:
        return list(_parsed_addresses(tuple(message.headers(name))))
    except (ValueError, IndexError):  # getaddresses on hostile input
        return []


# Several facts and the recorder read a message's From (up to five parses a message, ~40
# us each); the values are parsed once. A pure function of the field values: the cache
# only saves work, and it is bounded.
@functools.lru_cache(maxsize=256)
def _parsed_addresses(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((n, a) for n, a in getaddresses(values) if n or a)


def header_recipients(message: Message) -> tuple[str, ...]:
    """Envelope recipients, or the To/Cc addresses when there is no envelope (the lab)."""
    if message.envelope.rcpt_to:
        return tuple(r.lower() for r in message.envelope.rcpt_to)
    found = [a.lower() for name in ("to", "cc") for _, a in addresses(message, name) if "@" in a]
    return tuple(dict.fromkeys(found))


def from_address(message: Message) -> str:
    """The (first) From address, lower-cased, or ""."""
    found = addresses(message, "from")
    return found[0][1].lower() if found else ""


def _uris(message: Message) -> list[str]:
    return [u for value in message.headers("list-unsubscribe") for u in _URI.findall(value)]


def _first_domain(message: Message, name: str) -> str:
    found = addresses(message, name)
    return address_domain(found[0][1]) if found else ""


async def _reply_to_domain(ctx: FactContext) -> str:
    return _first_domain(ctx.message, "reply-to")


async def _return_path_domain(ctx: FactContext) -> str:
    # Live, the envelope sender is the return path (Return-Path is added at final delivery);
    # stored mail (the lab) has no envelope, only the Return-Path field.
    if ctx.message.envelope.mail_from:
        return address_domain(ctx.message.envelope.mail_from)
    return _first_domain(ctx.message, "return-path")


async def _list_id(ctx: FactContext) -> str:
    value = ctx.message.header("list-id")
    if value is None:
        return ""
    found = _URI.search(value)  # RFC 2919: optional phrase, then <list-label.domain>
    return (found.group(1) if found else value).strip().lower()


def _token(ctx: FactContext, name: str) -> str:
    value = ctx.message.header(name)
    return "" if value is None else value.strip().split(";")[0].strip().lower()


async def _precedence(ctx: FactContext) -> str:
    return _token(ctx, "precedence")


async def _auto_submitted(ctx: FactContext) -> str:
    return _token(ctx, "auto-submitted")


async def _has_list_unsubscribe(ctx: FactContext) -> bool:
    return any(u.lower().startswith(("mailto:", "https:", "http:")) for u in _uris(ctx.message))


def one_click_headers(message: Message) -> bool:
    """The header half of RFC 8058: an https URI and the exact List-Unsubscribe-Post value."""
    posts = message.headers("list-unsubscribe-post")
    return (
        any(u.lower().startswith("https://") for u in _uris(message))
        and len(posts) == 1
        and posts[0].strip() == ONE_CLICK_POST
    )


_ONE_CLICK_SIGNED = frozenset({"list-unsubscribe", "list-unsubscribe-post"})


def _covering_results(dkim: Any) -> set[str]:
    """DKIM results of the signatures whose h= lists both List-Unsubscribe fields."""
    signatures = dkim.get("signatures", ()) if isinstance(dkim, dict) else ()
    out: set[str] = set()
    for sig in signatures:
        if isinstance(sig, dict):
            signed = {str(h).strip().lower() for h in sig.get("headers") or ()}
            if signed.issuperset(_ONE_CLICK_SIGNED):
                out.add(str(sig.get("result", "")))
    return out


async def _has_one_click_unsubscribe(ctx: FactContext) -> bool:
    if not one_click_headers(ctx.message):
        return False
    results = _covering_results(await ctx.get("dkim"))
    if "pass" in results:
        return True
    if "temperror" in results:  # the DNS may yet say pass: unknown, not false
        raise FactError("the DKIM signature covering List-Unsubscribe could not be verified now")
    return False


async def _looks_list_mail(ctx: FactContext) -> bool:
    return bool(
        await ctx.get("list_id")
        or await ctx.get("precedence") in LIST_PRECEDENCE
        or await ctx.get("has_list_unsubscribe")
        or ctx.message.header("feedback-id") is not None
    )


def _subject(ctx: FactContext) -> str:
    return ctx.message.header("subject") or ""


async def _subject_ad_label(ctx: FactContext) -> bool:
    return _AD_LABEL.match(_subject(ctx)) is not None


async def _subject_sexually_explicit_label(ctx: FactContext) -> bool:
    return _subject(ctx).lstrip().startswith(SEXUALLY_EXPLICIT)


async def _from_display_spoof(ctx: FactContext) -> bool:
    found = addresses(ctx.message, "from")
    if not found or not found[0][0]:
        return False
    display, address = found[0]
    psl = ctx.service(PSL)
    own = org_domain(psl, address_domain(address))
    named = [m.group(1) for m in _EMBEDDED_ADDRESS.finditer(display)]
    named += [m.group(1) for m in _EMBEDDED_DOMAIN.finditer(display)]
    for domain in named:
        # Only real registrable domains count: "v1.2" or "Mr.Smith" are not domains.
        if psl.privatesuffix(domain.lower(), accept_unknown=False) is None:
            continue
        if org_domain(psl, domain) != own:
            return True
    return False


async def _fake_reply_subject(ctx: FactContext) -> bool:
    if _REPLY_PREFIX.match(_subject(ctx)) is None:
        return False
    m = ctx.message
    return m.header("in-reply-to") is None and m.header("references") is None


def rfc5322_problems(message: Message) -> list[str]:
    """Problem codes, in a fixed order (see docs/facts.md)."""
    problems: list[str] = []
    froms = message.headers("from")
    if not froms:
        problems.append("from_missing")
    elif len([a for _, a in addresses(message, "from") if "@" in a]) != 1:
        problems.append("from_not_one_address")
    ids = message.headers("message-id")
    if not ids:
        problems.append("message_id_missing")
    elif _MSG_ID.match(ids[0]) is None:
        problems.append("message_id_invalid")
    dates = message.headers("date")
    if not dates:
        problems.append("date_missing")
    else:
        try:
            parsedate_to_datetime(dates[0])
        except (ValueError, TypeError, IndexError):
            problems.append("date_invalid")
    # Field names only: counting them needs no value parsed.
    counts = Counter(name.lower() for name, _ in message.header_fields)
    problems.extend("duplicate_" + name for name in SINGLE_INSTANCE if counts[name] > 1)
    return problems


async def _rfc5322_errors(ctx: FactContext) -> list[str]:
    return rfc5322_problems(ctx.message)


def _spec(
    name: str,
    kind: FactType,
    fn: Any,
    doc: str,
    depends: tuple[str, ...] = (),
    needs: tuple[Service[Any], ...] = (),
) -> FactSpec:
    return FactSpec(name, kind, Tier.ENVELOPE, fn, depends=depends, doc=doc, needs=needs)


FACTS = (
    _spec("reply_to_domain", FactType.STR, _reply_to_domain, "domain of the first Reply-To"),
    _spec(
        "return_path_domain",
        FactType.STR,
        _return_path_domain,
        "envelope sender domain, else the Return-Path field's",
    ),
    _spec("list_id", FactType.STR, _list_id, "List-Id identifier (RFC 2919), '' if none"),
    _spec("precedence", FactType.STR, _precedence, "Precedence value lower-cased, '' if none"),
    _spec("auto_submitted", FactType.STR, _auto_submitted, "Auto-Submitted (RFC 3834) or ''"),
    _spec(
        "has_list_unsubscribe",
        FactType.BOOL,
        _has_list_unsubscribe,
        "List-Unsubscribe with a mailto: or http(s): URI (RFC 2369)",
    ),
    _spec(
        "has_one_click_unsubscribe",
        FactType.BOOL,
        _has_one_click_unsubscribe,
        "RFC 8058: https URI, exact List-Unsubscribe-Post, passing DKIM signing both",
        depends=("dkim",),
    ),
    _spec(
        "looks_list_mail",
        FactType.BOOL,
        _looks_list_mail,
        "List-Id, List-Unsubscribe, Precedence bulk/list/junk or Feedback-ID present",
        depends=("list_id", "precedence", "has_list_unsubscribe"),
    ),
    _spec(
        "subject_ad_label",
        FactType.BOOL,
        _subject_ad_label,
        "Subject starts with an advertisement label (ADV:, [Ad], Werbung: ...)",
    ),
    _spec(
        "subject_sexually_explicit_label",
        FactType.BOOL,
        _subject_sexually_explicit_label,
        "Subject starts with SEXUALLY-EXPLICIT: (16 CFR 316.4)",
    ),
    _spec(
        "from_display_spoof",
        FactType.BOOL,
        _from_display_spoof,
        "From display name names another organisational domain than the From address",
        needs=(PSL,),
    ),
    _spec(
        "fake_reply_subject",
        FactType.BOOL,
        _fake_reply_subject,
        "Subject starts Re:/Fwd: but there is no In-Reply-To or References",
    ),
    _spec(
        "rfc5322_errors",
        FactType.STR_LIST,
        _rfc5322_errors,
        "From/Message-ID/Date problems and duplicated single-instance fields",
    ),
)
