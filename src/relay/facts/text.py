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
MAX_DEPTH = 16  # nested multiparts followed; deeper ones are skipped, not recursed into
_RAW_FACTOR = 4  # bytes of one part read before decoding, per character kept
# Messages up to this size are decoded on the event loop: 0.1-0.3 ms for ordinary ones
# (parse included), 3 ms for the worst 8 KiB measured (150 tiny HTML parts), within the
# loop-lag budget; bigger ones go to a thread (docs/benchmarks.md, "Thread hops").
INLINE_BYTES = 8 * 1024
# Links: "http://", "https://" or "mailto:" in any case, then the target. The first letter
# is spelled out (h, H, m and M are the only characters IGNORECASE matches to h or m) and
# only the rest is case-blind, so the regex engine skips to those four letters instead of
# trying the pattern at every character: 10 us instead of 37 on a 3 KB text (issue 17).
_URL = re.compile(r"(?:h(?i:ttps?://)|H(?i:ttps?://)|m(?i:ailto:)|M(?i:ailto:))[^\s<>\"'()\[\]{}]+")
# Runs of blanks inside a line become one space: tabs, CR, FF and VT made spaces, then runs
# of spaces shortened (a regex replacing every single space cost 45 us a 3 KB text).
_TO_SPACE = str.maketrans("\t\r\f\v", "    ")
_SPACE_RUN = re.compile("  +")
_LINES = re.compile(r"\n\s*\n+")
# Characters that display as nothing: marketing HTML pads its preview line with hundreds of
# them (U+034F, U+200C, soft hyphens), which would count as "words" that are not words.
_INVISIBLE_CHARS = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]+"
)
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
    """Invisible characters dropped, each line stripped, blank runs inside a line one
    space, at most one empty line in a row. The same result as collapsing each line's runs
    of [ \\t\\r\\f\\v] before stripping it (stripping first changes nothing, a run being
    blank either way), at a tenth of the CPU: lines off the wire end in CR, so stripping
    first leaves most texts with nothing to collapse (tests/test_facts_text.py compares)."""
    if not text.isascii():  # every invisible character is outside ASCII
        text = _INVISIBLE_CHARS.sub("", text)
    text = "\n".join([line.strip() for line in text.split("\n")])
    if "  " in text or "\t" in text or "\r" in text or "\f" in text or "\v" in text:
        text = _SPACE_RUN.sub(" ", text.translate(_TO_SPACE))
    return _LINES.sub("\n\n", text).strip()


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
    if ":" not in text:  # every link has one (a scheme): no regex over the text
        return links
    for match in _URL.finditer(text):
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        line = text[start : len(text) if end < 0 else end]
        links.append(Link(match.group(0).rstrip(".,;:!?"), _tidy(line)[:300]))
    return links


@dataclass(frozen=True, slots=True)
class _Piece:
    """The visible text of one body part (HTML already reduced to text)."""

    text: str
    html: bool

    @property
    def words(self) -> int:
        return len(self.text.split())


# In multipart/alternative, the plain part is kept unless it holds fewer than this share
# of the richest alternative's words: senders' plain parts are often empty, one line ("view
# this email in your browser") or a stub, and reading only those left the detectors blind
# on messages whose text is all in the HTML (issue 18). Plain text stays the default
# because it carries no hidden or layout text; a ratio, not an absolute length, so a short
# note with a long HTML signature is still read from its plain part.
PLAIN_MIN_SHARE = 0.5


class _Walker:
    """Collects the visible text of a message's parts in order, one alternative per
    multipart/alternative, at most MAX_PARTS leaves; each HTML part's links are kept
    whichever alternative is read (a link is a link in either)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.leaves = 0
        self.links: list[Link] = []

    def pieces(self, part: EmailPart, depth: int = 0) -> list[_Piece]:
        if not part.is_multipart():
            return self._leaf(part)
        payload = part.get_payload()
        if depth >= MAX_DEPTH or not isinstance(payload, list):
            return []
        children = [c for c in payload if isinstance(c, EmailPart)]
        if part.get_content_subtype() == "alternative":
            return self._choose([self.pieces(child, depth + 1) for child in children])
        return [piece for child in children for piece in self.pieces(child, depth + 1)]

    def _leaf(self, part: EmailPart) -> list[_Piece]:
        self.leaves += 1
        if self.leaves > MAX_PARTS or part.get_content_disposition() == "attachment":
            return []
        kind = part.get_content_type()
        if kind == "text/plain":
            return [_Piece(_tidy(_decode(part, self.max_bytes)), html=False)]
        if kind == "text/html":
            text, links = _html_text(_decode(part, self.max_bytes))
            self.links.extend(links)
            return [_Piece(_tidy(text), html=True)]
        return []

    @staticmethod
    def _choose(options: list[list[_Piece]]) -> list[_Piece]:
        """The first all-plain alternative with text, unless another holds more than
        1 / PLAIN_MIN_SHARE times its words; then the alternative with the most words."""
        filled = [o for o in options if any(p.text for p in o)]
        if not filled:
            return []
        words = [sum(p.words for p in o) for o in filled]
        richest = max(range(len(filled)), key=words.__getitem__)
        plain = next((i for i, o in enumerate(filled) if not any(p.html for p in o)), None)
        if plain is not None and words[plain] >= PLAIN_MIN_SHARE * words[richest]:
            return filled[plain]
        return filled[richest]


def extract(message: Message, limit: int = DEFAULT_LIMIT) -> BodyText:
    """Visible text and links of the message body: every text part in order, attachments
    skipped; of alternatives, the plain text unless it is much shorter than the HTML."""
    walker = _Walker(limit * _RAW_FACTOR)
    pieces = [p for p in walker.pieces(message.parsed) if p.text]
    text = "\n\n".join(p.text for p in pieces)
    links = walker.links
    used = 0
    for piece in pieces:  # URLs in plain parts, as far as the kept text reaches
        if used >= limit:
            break
        if not piece.html:
            links.extend(_plain_links(piece.text[: limit - used]))
        used += len(piece.text) + 2
    return BodyText(
        text=text[:limit],
        links=tuple(links),
        html=any(p.html for p in pieces),
        truncated=len(text) > limit,
    )


def decoded_text(message: Message, limit: int = DEFAULT_LIMIT) -> str:
    """Visible text of the body, at most ``limit`` characters."""
    return extract(message, limit).text


async def _body_text(ctx: FactContext) -> BodyText:
    # MIME decoding and HTML parsing are CPU work, kept off the event loop once they cost
    # more than the trip to a thread (about 40 us of CPU each way, and a loop wake-up).
    if ctx.message.size <= INLINE_BYTES:
        return extract(ctx.message)
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
        # 2: of multipart/alternative, the HTML when the plain part is a stub; every text
        # part of multipart/mixed, not only the plain ones
        version=2,
    ),
)
