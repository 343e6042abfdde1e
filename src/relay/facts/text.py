"""Decoded text of a message body: the one extraction shared by T2 and T3 facts.

MIME transfer encodings and charsets are undone, HTML is reduced to its visible text with
selectolax (lexbor), attachments are skipped, and only the first ``limit`` characters are
kept, so a 25 MB message costs no more than a small one. Links are kept apart (target and
the words shown with it) because unsubscribe and sender-identification detectors need them.

The classifier's feature extraction must use this same function (or the other way round),
so that the text the policy reasons about and the text the model saw never drift apart.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from email.message import Message as EmailPart

from selectolax.lexbor import LexborHTMLParser

from relay.classifier.features import decode_payload
from relay.facts.base import FactContext, FactSpec, FactType
from relay.message import Message
from relay.verdict import Tier

DEFAULT_LIMIT = 64 * 1024  # characters of decoded text kept per message
MAX_PARTS = 64  # MIME leaves looked at; a message of thousands of parts costs no more
_RAW_FACTOR = 4  # bytes of one part read before decoding, per character kept
_URL = re.compile(r"(?:https?://|mailto:)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\f\v]+")
_LINES = re.compile(r"\n\s*\n+")
_INVISIBLE = "script,style,noscript,template,head"


@dataclass(frozen=True, slots=True)
class Link:
    """A link in the body: its target and the words shown with it (anchor text or line)."""

    href: str
    label: str


@dataclass(frozen=True, slots=True)
class BodyText:
    """Visible text of the body and its links. ``str()`` gives a summary, never the text,
    so the value can appear in a Verdict or a log without leaking the body."""

    text: str
    links: tuple[Link, ...] = ()
    html: bool = False  # the text came from an HTML part
    truncated: bool = False

    def __str__(self) -> str:
        return f"<body text: {len(self.text)} chars, {len(self.links)} links>"


def _decode(part: EmailPart, max_bytes: int) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    # The classifier's decoder, so policy facts and the model read the same characters
    # (bogus charsets, UTF-8 labelled us-ascii, codecs that refuse 'replace').
    return decode_payload(payload[:max_bytes], part.get_content_charset())[0]


def _tidy(text: str) -> str:
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _LINES.sub("\n\n", "\n".join(lines)).strip()


def _html_text(html: str) -> tuple[str, list[Link]]:
    tree = LexborHTMLParser(html)
    for node in tree.css(_INVISIBLE):
        node.decompose()
    links = [
        Link(str(a.attributes.get("href") or "").strip(), _tidy(a.text(separator=" ")))
        for a in tree.css("a[href]")
    ]
    root = tree.body or tree.root
    return ("" if root is None else root.text(separator="\n")), links


def _plain_links(text: str) -> list[Link]:
    links: list[Link] = []
    for match in _URL.finditer(text):
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        line = text[start : len(text) if end < 0 else end]
        links.append(Link(match.group(0).rstrip(".,;:!?"), _tidy(line)[:300]))
    return links


def extract(message: Message, limit: int = DEFAULT_LIMIT) -> BodyText:
    """Visible text and links of the message body (text/plain preferred over text/html)."""
    plain: list[str] = []
    html: list[str] = []
    leaves = 0
    for part in message.parsed.walk():
        if part.is_multipart():
            continue
        leaves += 1
        if leaves > MAX_PARTS:
            break
        if part.get_content_disposition() == "attachment":
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_decode(part, limit * _RAW_FACTOR))
        elif kind == "text/html":
            html.append(_decode(part, limit * _RAW_FACTOR))
    links: list[Link] = []
    html_text: list[str] = []
    for doc in html:
        text, found = _html_text(doc)
        html_text.append(text)
        links.extend(found)
    from_html = not plain and bool(html)
    text = _tidy("\n\n".join(plain if plain else html_text))
    if plain:
        links.extend(_plain_links(text[:limit]))
    return BodyText(
        text=text[:limit], links=tuple(links), html=from_html, truncated=len(text) > limit
    )


def decoded_text(message: Message, limit: int = DEFAULT_LIMIT) -> str:
    """Visible text of the body, at most ``limit`` characters."""
    return extract(message, limit).text


async def _body_text(ctx: FactContext) -> BodyText:
    # MIME decoding and HTML parsing are CPU work: keep them off the event loop.
    return await asyncio.to_thread(extract, ctx.message)


# Internal: the decoded body, computed once per message for the fingerprint (T2) and the
# content detectors (T3). Decoding is not interpreting, so it is T2; a Verdict records
# only its summary (see BodyText.__str__). Not meant for policy conditions.
FACTS = (
    FactSpec(
        "body_text",
        FactType.OBJECT,
        Tier.FINGERPRINT,
        _body_text,
        doc="decoded visible body text and links (internal; shown only as a summary)",
    ),
)
