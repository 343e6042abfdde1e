"""Message -> classifier input, shared by training and serving so the two never drift.

One module because training and serving must run the very same extraction code; over 300
lines because the text and the meta tokens come from one pass over the parsed message
(``Extractor``) and each token family is documented where it is made.

The model sees two strings per message (one row of an ``(n, 2)`` object array):

- ``text``: the decoded subject and the decoded text parts (HTML rendered to text by a
  real HTML parser), bounded to the first ``max_text_kb`` KiB of characters;
- ``meta``: space-separated tokens describing the message's shape: sender domain shape,
  mailer family, received-path length, MIME structure, charsets, HTML structure, URLs and
  their registrable domains.

What is deliberately *not* a feature: the SpamAssassin corpus's 2002 artefacts (the
``spamassassin.taint.org`` / ``zzzz@`` masking that appears in both classes, exact mailer
versions, line-ending quirks, Date: years). They score well on the 2002 split and say
nothing about modern mail, so they are removed from the text and never become tokens.

Extraction never raises: whatever goes wrong degrades to the text that could be read and
sets ``degraded``, which serving reports as the ``parse_degraded`` fact.
"""

from __future__ import annotations

import codecs
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from email import errors as email_errors
from email.header import decode_header
from email.message import Message as EmailPart
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from typing import Any
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList
from selectolax.lexbor import LexborHTMLParser as HTMLParser

from relay.message import Message, decode_8bit, undo_surrogates

FEATURE_VERSION = 2
# The hashed vector's blocks (classifier/selection.py's vectoriser). Here, not there: the
# feedback store's layout (feedback/record.py) needs them in a relay worker, which must
# not load selection's numpy (~12 MiB, issue 17).
WORD_FEATURES = 2**20
CHAR_FEATURES = 2**20
META_FEATURES = 2**14

# Corpus masking and the era's collector hosts: present in both classes, meaningless later.
# (baddomain.com is modern-dev's masking of the recipient's own domain.)
_ARTEFACT_HOSTS = (r"\S*taint\.org\S*", r"\S*baddomain\.com\S*")
_ARTEFACT_ADDRESSES = (
    r"\b(?:zzzz|yyyy|xxxx)[\w.+-]*@\S*",
    r"\b[\w.+-]*@(?:[\w-]+\.)*(?:jmason\.org|example\.com)\b",
)
_ARTEFACT = re.compile("|".join(_ARTEFACT_HOSTS + _ARTEFACT_ADDRESSES), re.IGNORECASE)
# The regex's leading \S* retries at every position of a run of non-space characters, so
# its cost grows with the square of a run's length (minutes for one 256 KiB "word"). Every
# match lies inside one such run and contains one of these hints (ignoring case): text
# without a hint skips the regex, and text with a long run is cleaned run by run, where a
# run without a host hint needs only the address alternatives, and those only with an @.
_HOST_HINTS = ("taint.org", "baddomain.com")
_ADDRESS_HINTS = ("jmason.org", "example.com", "zzzz", "yyyy", "xxxx")
_ARTEFACT_HINTS = _HOST_HINTS + _ADDRESS_HINTS
_ARTEFACT_ADDRESS = re.compile("|".join(_ARTEFACT_ADDRESSES), re.IGNORECASE)
# _clean_addresses: the pieces of _ARTEFACT_ADDRESSES, one step at a time.
_LOCAL_CHAR = re.compile(r"[\w.+-]")
_MASKED_LOCAL = re.compile(r"(?:zzzz|yyyy|xxxx)", re.IGNORECASE)
_ARTEFACT_HOST_AFTER_AT = re.compile(r"(?:[\w-]+\.)*(?:jmason\.org|example\.com)\b", re.IGNORECASE)
_BOUNDARY = re.compile(r"\b")
_LONG_RUN = re.compile(r"\S{256}")
_SPACE_RUNS = re.compile(r"(\s+)")
# Characters re.IGNORECASE matches to a hint letter but str.lower() does not map to it
# (U+0130, U+0131 ~ i; U+017F ~ s): such text takes the regex (tests/test_linear_scorer.py).
_FOLDS_TO_HINT = ("\u0130", "\u0131", "\u017f")
_MASKED_LOCALS = frozenset({"zzzz", "yyyy", "xxxx"})
_MASKED_DOMAINS = ("taint.org", "jmason.org", "example.com", "baddomain.com")
_URL = re.compile(r"""\b(?:https?://|www\.)[^\s<>"'()\[\]{}]+""", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
# Invisible characters put inside words to break word-based filters: removed from the text
# (the words come back) and counted as a token.
_ZERO_WIDTH = re.compile("[\u00ad\u034f\u180e\u200b-\u200f\u2060-\u2064\ufeff]")
# A header field line; a first line that is not one, followed by one, is a tool's log line.
_FIELD_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
# Inline-style tricks that hide text from the reader but not from a filter. Newsletters hide
# their preheader the same way, so which class uses them is for training to weigh.
_HIDDEN = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden|mso-hide\s*:\s*all", re.I)
_TINY_FONT = re.compile(r"font-size\s*:\s*[01](?:\.\d+)?(?:px|pt|em)?\s*[;\"'!]", re.I)
_WHITE_TEXT = re.compile(
    r"(?<![-\w])color\s*:\s*(?:#fff(?:fff)?\b|white\b|rgb\(\s*255\s*,\s*255\s*,\s*255\s*\))", re.I
)
_NO_HEIGHT = re.compile(r"(?:max-)?height\s*:\s*0(?:px)?\s*[;\"']|opacity\s*:\s*0\s*[;\"']", re.I)
_DOMAIN_LIKE = re.compile(r"\b((?:[a-z0-9-]+\.)+[a-z]{2,})\b", re.I)
# _DOMAIN_LIKE backtracks through every dot of a chain from every word start: 1.5 s for a
# 16 KiB display name of "a.a.a...". Names are looked at up to a header line's length
# (RFC 5322 2.1.1: ~5 ms at worst); the longest in the training corpora is 236.
MAX_NAME_SCAN = 998
# Link shorteners and free hosting hide where a link goes (phishing pages, lures).
_SHORTENERS = frozenset(
    {
        "bit.ly", "t.co", "tinyurl.com", "goo.gl", "ow.ly", "is.gd", "buff.ly", "rebrand.ly",
        "cutt.ly", "shorturl.at", "rb.gy", "t.ly", "tiny.cc", "s.id", "lnkd.in", "bl.ink",
    }
)  # fmt: skip
_FREE_HOSTS = frozenset(
    {
        "firebaseapp.com", "web.app", "blogspot.com", "googleapis.com", "appspot.com",
        "wixsite.com", "weebly.com", "netlify.app", "pages.dev", "r2.dev", "workers.dev",
        "github.io", "azurewebsites.net", "windows.net", "amazonaws.com", "ngrok.io",
        "ngrok-free.app", "000webhostapp.com", "glitch.me", "vercel.app", "herokuapp.com",
        "sharepoint.com", "ipfs.io", "dweb.link", "godaddysites.com", "square.site",
    }
)  # fmt: skip
# Hosts under a listed private suffix (evil.web.app) are their own registrable domain.
_FREE_HOST_SUFFIXES = tuple("." + host for host in _FREE_HOSTS)
# Attachment types of HTML smuggling, containers, scripts and macro documents.
_RISKY_EXTENSIONS = frozenset(
    {
        "htm", "html", "shtml", "xhtml", "svg", "zip", "rar", "7z", "gz", "iso", "img", "vhd",
        "exe", "scr", "js", "vbs", "wsf", "hta", "lnk", "bat", "cmd", "jar", "msi", "docm",
        "xlsm", "pptm", "one", "cab", "ace",
    }
)  # fmt: skip
_EXTENSION = re.compile(r"\.([a-z0-9]{1,5})$")
_FREEMAIL = frozenset(
    {
        "aol.com", "gmail.com", "googlemail.com", "hotmail.com", "outlook.com", "live.com",
        "msn.com", "yahoo.com", "yahoo.co.uk", "ymail.com", "icloud.com", "me.com",
        "mail.com", "gmx.com", "gmx.de", "gmx.net", "web.de", "yandex.ru", "mail.ru",
        "protonmail.com", "proton.me", "zoho.com", "qq.com", "163.com", "126.com",
    }
)  # fmt: skip
# Mailer families, never versions: (needle in lower-cased X-Mailer/User-Agent, family).
_MAILERS = (
    ("outlook", "outlook"), ("microsoft", "outlook"), ("exchange", "outlook"),
    ("thunderbird", "mozilla"), ("mozilla", "mozilla"), ("seamonkey", "mozilla"),
    ("apple", "apple"), ("iphone", "apple"), ("ipad", "apple"),
    ("mutt", "unix"), ("pine", "unix"), ("gnus", "unix"), ("emacs", "unix"),
    ("exmh", "unix"), ("nmh", "unix"), ("sylpheed", "unix"), ("evolution", "unix"),
    ("kmail", "unix"), ("claws", "unix"), ("mew", "unix"), ("vm ", "unix"),
    ("eudora", "desktop"), ("the bat", "desktop"), ("lotus", "desktop"), ("opera", "desktop"),
    ("pegasus", "desktop"), ("becky", "desktop"),
    ("aol", "webmail"), ("yahoo", "webmail"), ("hotmail", "webmail"), ("gmail", "webmail"),
    ("webmail", "webmail"), ("squirrelmail", "webmail"), ("roundcube", "webmail"),
    ("horde", "webmail"), ("imp", "webmail"),
    ("php", "script"), ("perl", "script"), ("mime-tools", "script"), ("python", "script"),
    ("java", "script"), ("cdo", "script"), ("swiftmailer", "script"), ("phpmailer", "script"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FeatureSettings:
    """Bounds on the work per message; recorded in the model card and read back from it."""

    max_text_kb: int = 64  # KiB of decoded characters (subject + text parts) used
    max_raw_kb: int = 1024  # KiB of raw message bytes parsed; the rest is never read
    max_parts: int = 32  # MIME leaves looked at
    max_urls: int = 64  # distinct URLs turned into tokens
    version: int = FEATURE_VERSION

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FeatureSettings:
        known = {k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__}  # type: ignore[call-overload]
        return cls(**known)


@dataclass(frozen=True, slots=True)
class Features:
    """Classifier input for one message."""

    text: str
    meta: str
    degraded: bool
    # Registrable domain of the From address ("" when none): the cross-validation group,
    # so one sender's mail never sits on both sides of a fold. Not a model input.
    sender_site: str = ""

    def row(self) -> tuple[str, str]:
        return (self.text, self.meta)


@dataclass
class _Collector:
    """Scratch state of one extraction (local to the call, never shared)."""

    budget: int
    text: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)  # url -> anchor text
    degraded: bool = False
    site: str = ""  # registrable domain of the From address
    zero_width: int = 0

    def add_text(self, chunk: str) -> None:
        if self.budget <= 0 or not chunk:
            return
        chunk = chunk[: self.budget]
        self.budget -= len(chunk)
        if chunk.isascii():  # every zero-width character is outside ASCII
            self.text.append(chunk)
            return
        cleaned, hits = _ZERO_WIDTH.subn("", chunk)
        self.zero_width += hits
        self.text.append(cleaned)


def _bucket(n: int, edges: Iterable[int]) -> str:
    """A small label for a count, so counts become a handful of tokens."""
    last = 0
    for edge in edges:
        if n <= edge:
            return str(edge) if edge == last + 1 or edge == 0 else f"{last + 1}-{edge}"
        last = edge
    return f"{last + 1}+"


def _clean(text: str) -> str:
    """Undo surrogate escapes (raw 8-bit headers) and drop corpus artefacts."""
    if not text.isascii() and not _utf8_clean(text):
        text = undo_surrogates(text)
    if not _may_hold_artefact(text):
        return text
    if _LONG_RUN.search(text) is None:
        return _ARTEFACT.sub(" ", text)
    pieces = _SPACE_RUNS.split(text)  # runs at even indexes, the whitespace between at odd
    return "".join(p if i % 2 else _clean_run(p) for i, p in enumerate(pieces))


def _clean_run(run: str) -> str:
    """``_ARTEFACT.sub`` of one run of non-space characters, in time linear in its length
    unless it holds an @ and an address hint (a run with a host hint is replaced whole by
    the first position's match)."""
    if _folds_to_hint(run):
        return _ARTEFACT.sub(" ", run)
    low = run.lower()
    if any(hint in low for hint in _HOST_HINTS):
        return _ARTEFACT.sub(" ", run)
    if "@" in run and any(hint in low for hint in _ADDRESS_HINTS):
        return _clean_addresses(run)
    return run


def _clean_addresses(run: str) -> str:
    r"""``_ARTEFACT_ADDRESS.sub(" ", run)`` in time linear in the run's length.

    The regex retries ``[\w.+-]*@`` from every word boundary before an @ and rescans the
    host after it each time: quadratic (5 s for one 32 KiB word with an @ and a hint,
    past the classifier's timeout at 64 KiB). Both alternatives need, from their start,
    characters of ``[\w.+-]`` up to an @, and that class holds no @, so the @ a start
    reaches is fixed: per @, the host alternative is tried once, and the first word
    boundary of the characters before it (not before the scan position) where either
    alternative holds starts the match, as the regex's left-to-right scan would find it.
    tests/test_linear_scorer.py checks it against the regex."""
    out: list[str] = []
    pos = 0  # where the regex's scan stands
    at = run.find("@")
    while at != -1:
        start = at
        while start > pos and _LOCAL_CHAR.match(run, start - 1):
            start -= 1
        host = _ARTEFACT_HOST_AFTER_AT.match(run, at + 1)
        for p in range(start, at + 1):
            if not _BOUNDARY.match(run, p):
                continue
            masked = _MASKED_LOCAL.match(run, p)
            if masked and masked.end() <= at:  # zzzz...@ and the rest of the run
                out += (run[pos:p], " ")
                return "".join(out)
            if host:
                out += (run[pos:p], " ")
                pos = host.end()
                break
        at = run.find("@", max(at + 1, pos))
    out.append(run[pos:])
    return "".join(out)


def _urls(text: str) -> list[str]:
    """``_URL.findall(text)``, skipping the regex (~20 ns a character) when ``text`` holds
    no "http" and no "www." in any case: every character IGNORECASE matches to h, t, p or
    w lower()s to it (tests/test_linear_scorer.py checks all of Unicode)."""
    low = text.lower()
    if "http" not in low and "www." not in low:
        return []
    return _URL.findall(text)


def _folds_to_hint(text: str) -> bool:
    return not text.isascii() and any(ch in text for ch in _FOLDS_TO_HINT)


def _utf8_clean(text: str) -> bool:
    """No lone surrogates at all (so none to undo): one C-speed pass, not a Python loop."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _may_hold_artefact(text: str) -> bool:
    """False only when ``_ARTEFACT`` cannot match ``text`` (it then leaves it unchanged)."""
    if _folds_to_hint(text):
        return True
    low = text.lower()
    return any(hint in low for hint in _ARTEFACT_HINTS)


def decode_payload(payload: bytes, charset: str | None) -> tuple[str, bool]:
    """Bytes in a declared charset -> text; a bogus charset falls back (and says so)."""
    name = (charset or "us-ascii").strip().strip('"').lower()
    try:
        codecs.lookup(name)
    except LookupError:
        name = ""
    if name in ("", "us-ascii", "ascii", "default"):  # the one fallback (message.py)
        return decode_8bit(payload), not name and charset is not None
    try:
        return payload.decode(name, "replace"), False
    except (LookupError, ValueError):  # codecs that reject 'replace' or the payload
        return payload.decode("cp1252", "replace"), True


# Lower-cased field name -> its values as ``get_all`` gives them, in order.
HeaderFields = dict[str, list[Any]]


def _fields(msg: EmailPart) -> HeaderFields:
    """The message's header fields by name, read in one pass: each ``get_all`` lower()s
    every field name again, and a message is asked for a dozen names."""
    fields: HeaderFields = {}
    for name, value in msg.items():
        fields.setdefault(name.lower(), []).append(value)
    return fields


def _headers(fields: HeaderFields, name: str) -> list[str]:
    """Every value of a header, encoded-words decoded, bogus charsets tolerated."""
    values: list[str] = []
    for value in fields.get(name, ()):
        try:
            # Raw 8-bit bytes come back as a Header of charset unknown-8bit: decode_header
            # returns those bytes, which _decode then tries as UTF-8, then cp1252.
            chunks = decode_header(value)
        except Exception:
            values.append(_clean(str(value)))
            continue
        pieces: list[str] = []
        for chunk, charset in chunks:
            if isinstance(chunk, bytes):
                pieces.append(decode_payload(chunk, charset)[0])
            else:
                pieces.append(chunk)
        values.append(_clean("".join(pieces)))
    return values


def skip_log_line(raw: bytes) -> bytes:
    """Drop a first line that is not a header field when the next one is: a tool's log line
    written into the file (modern-dev has 126 such files). Without this the whole header
    would be read as body text, in training and in a relay fed such files alike."""
    first, sep, rest = raw.partition(b"\n")
    if sep and not _FIELD_LINE.match(first) and _FIELD_LINE.match(rest):
        return rest
    return raw


def _defective(part: EmailPart, truncated: bool) -> bool:
    """MIME defects, except the missing end boundary our own truncation causes."""
    return any(
        not (truncated and isinstance(d, email_errors.CloseBoundaryNotFoundDefect))
        for d in part.defects
    )


def _header(fields: HeaderFields, name: str) -> str:
    values = _headers(fields, name)
    return values[0] if values else ""


def _symbol_kinds(text: str) -> list[str]:
    """Styled letters (mathematical bold, fullwidth) that dodge word filters, and emoji."""
    kinds = []
    if any("\U0001d400" <= ch <= "\U0001d7ff" or "\uff01" <= ch <= "\uff5e" for ch in text):
        kinds.append("styled_letters")
    if any(ch >= "\U0001f000" or "\u2600" <= ch <= "\u27bf" for ch in text):
        kinds.append("emoji")
    return kinds


def _charset_family(charset: str) -> str:
    cs = charset.lower()
    if cs in ("us-ascii", "ascii", "utf-8", "utf8"):
        return "unicode" if cs.startswith("utf") else "ascii"
    if cs.startswith(("iso-8859", "windows-125", "cp125", "latin")):
        return "latin"
    if cs.startswith(("big5", "gb", "euc", "iso-2022", "shift_jis", "ks_c", "hz")):
        return "cjk"
    if cs.startswith(("koi8", "windows-1251")):
        return "cyrillic"
    try:
        codecs.lookup(cs)
    except LookupError:
        return "bogus"
    return "other"


class Extractor:
    """Turns a Message into Features; build one per process (it holds the suffix list)."""

    def __init__(self, settings: FeatureSettings | None = None) -> None:
        self.settings = settings or FeatureSettings()
        self._psl = PublicSuffixList()

    def extract_bytes(self, data: bytes) -> Features:
        """Features of a stored message (an mbox ``From `` line is dropped)."""
        # Features never read the message's time, so a message without a date needs none.
        return self.extract(Message.from_file_bytes(data, received_at=0.0))

    def extract(self, message: Message) -> Features:
        s = self.settings
        out = _Collector(budget=s.max_text_kb * 1024)
        limit = s.max_raw_kb * 1024
        truncated = message.size > limit
        if truncated:
            # Parse only the head of very large mail; the tail is attachments in practice.
            message = Message.from_file_bytes(message.raw[:limit], received_at=message.received_at)
            out.tokens.append("size:truncated")
        try:
            # compat32, not the Message's modern-policy parse: it is several times faster
            # and has no quadratic header parser a hostile Content-Type can trigger.
            msg = BytesParser(policy=compat32).parsebytes(skip_log_line(message.raw))
            self._headers(msg, out)
            self._body(msg, out, truncated)
        except Exception:
            out.degraded = True
        if out.degraded and not out.text:
            out.add_text(_clean(message.body.decode("cp1252", "replace")))
        self._url_tokens(out)
        if out.zero_width:
            out.tokens.append("text:zero_width_" + _bucket(out.zero_width, (3, 30)))
        if out.degraded:
            out.tokens.append("parse:degraded")
        text = " ".join(" ".join(out.text).split())
        return Features(
            text=text, meta=" ".join(out.tokens), degraded=out.degraded, sender_site=out.site
        )

    # -- headers ---------------------------------------------------------------------

    def _headers(self, msg: EmailPart, out: _Collector) -> None:
        fields = _fields(msg)
        subject = _header(fields, "subject")
        out.add_text(subject)
        out.add_text("\n")
        words = [w.lower() for w in _WORD.findall(subject)][:20]
        out.tokens.extend(f"subj:{w}" for w in words)
        if not subject.strip():
            out.tokens.append("subj:empty")
        letters = [ch for ch in subject if ch.isalpha()]
        if len(letters) >= 8 and sum(ch.isupper() for ch in letters) / len(letters) > 0.7:
            out.tokens.append("subj:shouting")
        out.tokens.extend("subj:" + kind for kind in _symbol_kinds(subject))

        self._sender(fields, out)
        mailer = (_header(fields, "x-mailer") or _header(fields, "user-agent")).lower()
        family = next((fam for needle, fam in _MAILERS if needle in mailer), None)
        out.tokens.append(f"mailer:{family or ('other' if mailer else 'none')}")
        self._bulk(fields, out)
        self._dkim(fields, out)
        rcpts = getaddresses(_headers(fields, "to") + _headers(fields, "cc"))
        out.tokens.append("rcpts:" + _bucket(len([a for _, a in rcpts if a]), (0, 1, 3, 10)))

    def _sender(self, fields: HeaderFields, out: _Collector) -> None:
        name, addr = parseaddr(_header(fields, "from"))
        local, _, domain = addr.rpartition("@")
        domain = domain.lower().strip(".>")
        if not addr:
            out.tokens.append("from:none")
            return
        if local.lower() in _MASKED_LOCALS or domain.endswith(_MASKED_DOMAINS) or not domain:
            return  # masked by the corpus: no honest signal left in the address
        site = self._site(domain)
        out.site = site
        if name.strip():
            out.tokens.append("from:named")
            if "@" in name:
                out.tokens.append("from:name_has_address")
            out.tokens.extend(self._display_name(name, local, site))
        if sum(ch.isdigit() for ch in local) >= 3:
            out.tokens.append("from:local_digits")
        out.tokens.append("from:local_len_" + _bucket(len(local), (4, 8, 16, 32)))
        out.tokens.append("from:tld_" + domain.rsplit(".", 1)[-1])
        out.tokens.append("from:free" if site in _FREEMAIL else "from:own")
        if any(ch.isdigit() for ch in site.split(".")[0]):
            out.tokens.append("from:domain_digits")
        if "-" in site:
            out.tokens.append("from:domain_hyphen")
        out.tokens.append("from:depth_" + _bucket(domain.count(".") + 1, (2, 3, 4)))
        _, reply = parseaddr(_header(fields, "reply-to"))
        if reply and self._site(reply.rpartition("@")[2].lower()) != site:
            out.tokens.append("from:reply_elsewhere")
            if self._site(reply.rpartition("@")[2].lower()) in _FREEMAIL:
                out.tokens.append("from:reply_freemail")

    def _display_name(self, name: str, local: str, site: str) -> list[str]:
        """Brand impersonation: a display name naming a domain other than the sender's, or
        none of whose words appear in the address ("PayPal Support" <x@random.biz>)."""
        tokens = [f"from:name_{kind}" for kind in _symbol_kinds(name)]
        for shown in _DOMAIN_LIKE.findall(name[:MAX_NAME_SCAN]):
            if "@" not in name and self._site(shown.lower()) != site:
                tokens.append("from:name_other_domain")
                break
        address = (local + "." + site).lower().replace("-", "")
        words = [w.lower() for w in _WORD.findall(name) if len(w) >= 3]
        if words:
            matched = any(w in address for w in words)
            tokens.append("from:name_in_address" if matched else "from:name_not_in_address")
        return tokens

    def _bulk(self, fields: HeaderFields, out: _Collector) -> None:
        """Bulk-sender headers: RFC 2369/8058 unsubscribe, Feedback-ID, Precedence. Wanted
        newsletters carry them (the 2024 bulk-sender rules require one-click unsubscribe)."""
        unsubscribe = _header(fields, "list-unsubscribe").lower()
        if unsubscribe:
            out.tokens.append("list:unsubscribe")
            if "https://" in unsubscribe or "http://" in unsubscribe:
                out.tokens.append("list:unsubscribe_web")
            if "mailto:" in unsubscribe:
                out.tokens.append("list:unsubscribe_mailto")
            if "one-click" in _header(fields, "list-unsubscribe-post").lower():
                out.tokens.append("list:one_click")
        if "list-id" in fields:
            out.tokens.append("list:id")
        if "feedback-id" in fields:
            out.tokens.append("bulk:feedback_id")
        precedence = _header(fields, "precedence").strip().lower()
        if precedence in ("bulk", "list", "junk"):
            out.tokens.append("bulk:precedence_" + precedence)

    def _dkim(self, fields: HeaderFields, out: _Collector) -> None:
        """Who signed, relative to the From domain (aligned, a third party such as an ESP, or
        nobody). Read from DKIM-Signature fields, which the relay sees as the classifier
        does; whether a signature verifies is the dkim/dmarc facts' job in the policy."""
        signers: set[str] = set()
        sha1 = False
        for value in _headers(fields, "dkim-signature")[:8]:
            tags = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (t.partition("=") for t in value.split(";"))
            )
            if tags.get("d"):
                signers.add(self._site(tags["d"].lower().strip(".")))
            sha1 = sha1 or tags.get("a", "").lower() == "rsa-sha1"
        if not signers:
            out.tokens.append("dkim:none")
            return
        out.tokens.append("dkim:aligned" if out.site in signers else "dkim:other")
        if sha1:
            out.tokens.append("dkim:sha1")

    def _site(self, host: str) -> str:
        """Registrable domain (example.co.uk) of a host name."""
        return self._psl.privatesuffix(host) or host

    # -- body ------------------------------------------------------------------------

    def _body(self, msg: EmailPart, out: _Collector, truncated: bool) -> None:
        if not msg.keys():
            out.tokens.append("headers:none")
            out.degraded = True
        if _defective(msg, truncated):
            out.tokens.append("mime:defect")
            out.degraded = True
        out.tokens.append("ct:" + msg.get_content_type())
        leaves = 0
        kinds: set[str] = set()
        for part in msg.walk():
            if part.is_multipart():
                continue
            leaves += 1
            if leaves > self.settings.max_parts:
                out.tokens.append("mime:too_many_parts")
                break
            ctype = part.get_content_type()
            if ctype.startswith("multipart/"):
                ctype = "text/plain"  # a multipart without usable boundary: read it as text
            disposition = part.get_content_disposition()
            if _defective(part, truncated):
                out.tokens.append("mime:part_defect")
                out.degraded = True
            if ctype not in ("text/plain", "text/html") or disposition == "attachment":
                self._attachment(part, ctype, out)
                continue  # attachments are never read
            kinds.add(ctype)
            self._text_part(part, ctype, out)
        out.tokens.append("parts:" + _bucket(leaves, (1, 2, 4, 8)))
        if "text/html" in kinds and "text/plain" not in kinds:
            out.tokens.append("html:only")

    def _attachment(self, part: EmailPart, ctype: str, out: _Collector) -> None:
        """An attachment's type from its headers (never its content): MIME type, file
        extension, and whether the extension is one phishing and malware use."""
        out.tokens.append("att:" + ctype.split("/")[0])
        out.tokens.append("att_type:" + ctype)
        try:
            filename = (part.get_filename() or "").strip().lower()
        except Exception:  # a malformed RFC 2231 parameter
            filename = ""
        found = _EXTENSION.search(filename)
        if found:
            out.tokens.append("att_ext:" + found.group(1))
            if found.group(1) in _RISKY_EXTENSIONS:
                out.tokens.append("att:risky")
        elif ctype in ("text/html", "image/svg+xml", "application/zip"):
            out.tokens.append("att:risky")

    def _text_part(self, part: EmailPart, ctype: str, out: _Collector) -> None:
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return
        # A text part larger than 4x the text budget is cut before decoding.
        payload = payload[: self.settings.max_text_kb * 4096]
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()
        if cte in ("base64", "quoted-printable"):
            out.tokens.append("cte:" + cte)
        charset = part.get_content_charset()
        if charset:
            out.tokens.append("charset:" + _charset_family(charset))
        text, fell_back = decode_payload(payload, charset)
        if fell_back:
            out.degraded = True
        if ctype == "text/html":
            self._html(text, out)
        else:
            for url in _urls(text[: out.budget]):
                out.urls.setdefault(url, "")
            out.add_text(_clean(text))
            out.add_text("\n")

    def _html(self, html: str, out: _Collector) -> None:
        # Hidden-text tricks, searched in the markup (inline styles and <style> blocks).
        for name, pattern in (
            ("hidden", _HIDDEN),
            ("tiny_font", _TINY_FONT),
            ("white_text", _WHITE_TEXT),
            ("no_height", _NO_HEIGHT),
        ):
            if pattern.search(html):
                out.tokens.append("html:" + name)
        tree = HTMLParser(html)
        tree.strip_tags(["script", "style", "head", "noscript"])
        links = tree.css("a[href]")
        for node in links[: self.settings.max_urls]:
            href = (node.attributes.get("href") or "").strip()
            if href.lower().startswith(("http://", "https://", "www.")):
                out.urls.setdefault(href, node.text(strip=True))
            elif href.lower().startswith("mailto:"):
                out.tokens.append("html:mailto")
        images = len(tree.css("img"))
        out.tokens.append("html:img_" + _bucket(images, (0, 1, 3, 10)))
        out.tokens.append("html:links_" + _bucket(len(links), (0, 1, 3, 10, 30)))
        if tree.css_first("form") is not None:
            out.tokens.append("html:form")
        out.tokens.append("html:tables_" + _bucket(len(tree.css("table")), (0, 2, 10)))
        root = tree.body or tree.root
        text = root.text(separator=" ") if root is not None else ""
        if images and len(text.split()) < 20:
            out.tokens.append("html:image_mostly")
        out.add_text(_clean(text))
        out.add_text("\n")

    # -- URLs ------------------------------------------------------------------------

    def _url_tokens(self, out: _Collector) -> None:
        urls = list(out.urls.items())[: self.settings.max_urls]
        out.tokens.append("urls:" + _bucket(len(urls), (0, 1, 3, 10, 30)))
        seen: set[str] = set()
        sites: set[str] = set()
        insecure = 0
        for url, anchor in urls:
            try:
                parts = urlsplit(url if "://" in url else "http://" + url)
                host = (parts.hostname or "").lower().rstrip(".")
                port = parts.port
            except ValueError:
                out.tokens.append("url:malformed")
                continue
            if not host or host.endswith(_MASKED_DOMAINS):
                continue
            if port is not None and port not in (80, 443):
                out.tokens.append("url:port")
            if parts.username is not None:
                out.tokens.append("url:userinfo")
            insecure += parts.scheme == "http"
            try:
                ipaddress.ip_address(host)
                out.tokens.append("url:ip")
                sites.add(host)
                continue
            except ValueError:
                pass
            site = self._site(host)
            sites.add(site)
            tokens = {f"url:site_{site}", "url:tld_" + host.rsplit(".", 1)[-1]}
            if site in _SHORTENERS:
                tokens.add("url:shortener")
            if site in _FREE_HOSTS or host.endswith(_FREE_HOST_SUFFIXES):
                tokens.add("url:free_host")
            if host.startswith(("xn--",)) or ".xn--" in host:
                tokens.add("url:punycode")
            if anchor and _URL.match(anchor.strip()):
                shown = urlsplit(anchor if "://" in anchor else "http://" + anchor).hostname
                if shown and self._site(shown.lower()) != site:
                    tokens.add("url:anchor_mismatch")
            seen.update(tokens)
        out.tokens.extend(sorted(seen))
        if sites:
            # Newsletters link to their own site; lures link anywhere but the sender's.
            own = out.site in sites
            out.tokens.append("url:to_sender" if own else "url:not_to_sender")
            out.tokens.append("url:sites_" + _bucket(len(sites), (1, 2, 4, 8)))
            if insecure == len(urls):
                out.tokens.append("url:all_http")
