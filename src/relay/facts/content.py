"""T3 facts that read the text: commercial purpose, postal address, labels, opt-out links.

These are transparent heuristics, not classifiers: every cue is a documented pattern
(docs/facts.md lists them and their limits), results are deterministic, and each fact reads
only the decoded body (``body_text``) and the Subject; the commercial score also notes
whether two kinds of header field are present (list mailing, campaign platforms). They
exist so that content-based regimes (CAN-SPAM, EU opt-in, the 2.13 draft) can be run and
their privacy cost measured; they are English-first with a few German/French/Spanish cues,
and easy to fool on purpose.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from relay.auth.domains import org_domain
from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.envelope import address_domain
from relay.facts.headers import addresses
from relay.facts.services import PSL, Service
from relay.facts.text import BodyText
from relay.message import Message
from relay.verdict import Tier


@dataclass(frozen=True, slots=True)
class Cue:
    """A weighted pattern: contributes ``weight * log1p(min(matches, cap))`` to the score."""

    name: str
    pattern: re.Pattern[str]
    weight: float
    cap: int = 5
    subject: bool = False  # matched against the Subject alone, not the Subject and body
    # Strings every match contains (the pattern is case-sensitive): a text holding none of
    # them has no match, found without running the pattern over it. Empty: always run.
    needles: tuple[str, ...] = ()

    def count(self, text: str) -> int:
        """Matches of the pattern in ``text`` (as ``len(findall)``)."""
        if self.needles and not any(n in text for n in self.needles):
            return 0
        return len(self.pattern.findall(text))


def _re(text: str) -> re.Pattern[str]:
    return re.compile(text, re.IGNORECASE)


def _lower(text: str) -> re.Pattern[str]:
    """For patterns matched against lower-cased text."""
    return re.compile(text)


# Version 5 weights were fitted (L2 logistic regression, C=1) on the legitimate mail of
# modern-dev labelled by primary purpose (data/modern-dev-purpose.tsv), commercial against
# transactional and other, read with body_text version 2 (the HTML alternative when the
# plain one is a stub), and checked by 5-fold cross-validation grouped by sender
# organisation (bench/bench_detectors.py); rounded to one decimal. "technical" keeps its
# hand-set version-2 weight: modern-dev has no patches or logs, so the fit cannot see it.
# A weight says how much one cue moves the score, not that the cue means "commercial" by
# itself (price is negative because receipts and statements quote prices as often as offers
# do; many prices in few words, a catalogue, is the price_density term below).
COMMERCIAL_BIAS = -1.7
COMMERCIAL_CUES = (
    Cue("price", _lower(r"[$€£¥]\s?\d|\b\d+(?:[.,]\d\d)?\s?(?:usd|eur|gbp|dollars?|euros?)"
                        r"\b"), -0.7,
        needles=("$", "€", "£", "¥", "usd", "eur", "gbp", "dollar")),
    Cue("discount", _lower(r"\b\d{1,2}\s?%\s?off\b|\bdiscount|\bsale\b|\bcoupon|\bpromo(?:tion"
                        r"|code)?\b|\bspecial offer|\blimited[- ]time|\bclearance|\bfree "
                        r"(?:shipping|delivery|trial|gift)|\bbest price|\blowest price"), 1.4,
        needles=("%", "discount", "sale", "coupon", "promo", "special offer", "limited",
                 "clearance", "free ", "best price", "lowest price")),
    Cue("call_to_action", _lower(r"\b(?:buy|order|shop|subscribe|sign up|register|call|apply|act"
                              r"|book|download|join)\s+(?:now|today)\b|\bclick here\b|\bget "
                              r"(?:yours|started)\b|\bdon'?t miss\b|\bhurry\b"), 0.7,
        needles=("now", "today", "click here", "get yours", "get started", "t miss", "hurry")),
    Cue("unsubscribe", _lower(r"\bunsubscribe|\bopt[- ]?out\b|\bremoved? from (?:our|this|the)"
                           r"[\w ]{0,20}list|\bto be removed\b|\bno longer wish\b|"
                           r"\bmanage (?:your )?(?:preferences|subscription)"), 1.5, cap=2,
        needles=("unsubscribe", "opt", "remove", "no longer wish", "manage ")),
    Cue("marketing", _lower(r"\b(?:offers?|exclusive|bonus|guaranteed?|winner|prize|risk[- ]free"
                         r"|earn|income|investment|mortgage|loans?|credit|pharmacy|casino|"
                         r"newsletter|products?|brand|new arrivals|catalog(?:ue)?|customers?"
                         r"|members?hip|savings?|save|cheap|order|free|cash|money|wholesale|"
                         r"prices?|opportunity|deals?|business|profits?|sales|gifts?)\b"), 0.3,
        cap=10),
    Cue("ad_statement", _lower(r"\b(?:advertisement|advertising|promotional|sponsored)\b"), 0.5,
        cap=2, needles=("advertis", "promotional", "sponsored")),
    # Shopping calls (version 3): what a promotion asks the reader to do.
    Cue("shop", _lower(r"\bshop (?:now|all|the|our|sale|new|today|deals?|gifts?|here)\b|\badd to "
                    r"(?:cart|bag)\b|\b(?:use|with|enter|apply) (?:promo |discount |the )?code\b"
                    r"|\bcode:|\bbogo\b|\bsitewide\b|\bsave (?:up to|an? |\$|\d)|\bends "
                    r"(?:tonight|today|soon|tomorrow|sunday|monday)\b|\blast (?:chance|call|day)\b"
                    r"|\bdeals?\b|\bgift guide\b|\bbest ?sellers?\b|\bnew arrivals\b|\bshop\b"),
        1.0,
        needles=("shop", "add to ", "code", "bogo", "sitewide", "save ", "ends ", "last ", "deal",
                 "gift guide", "best", "new arrivals")),
    # Transactional and personal mail: receipts, security codes, thread replies.
    Cue("transactional", _lower(r"\b(?:receipt|invoice|tracking number|has shipped|order "
                             r"(?:number|#|confirmation)|password reset|verification code|"
                             r"security alert|your account statement)\b"), -1.0, cap=3,
        needles=("receipt", "invoice", "tracking number", "has shipped", "order ",
                 "password reset", "verification code", "security alert",
                 "your account statement")),
    # The reader's own account, order, payment or appointment (version 3): the wider
    # vocabulary of transactional mail, which bulk senders share with their promotions.
    Cue("account", _lower(r"\byour (?:order|payment|account|statement|invoice|receipt|package|"
                       r"shipment|appointment|reservation|booking|card|bill|balance|visit|delivery"
                       r"|refill|prescription)\b|\border (?:#|no\.?|number|confirm\w*|details|date"
                       r"|total|summary)|\btracking (?:number|#)|\bout for delivery\b|\b(?:has"
                       r"|have) (?:shipped|been delivered|arrived)\b|\bpayment (?:of|received|"
                       r"processed|confirmation|scheduled|due|method)\b|\bautopay\b|\bbalance due\b"
                       r"|\bending "
                       r"in\b|\b(?:verification|security|one-time) code\b|\bnew device\b|\bsigned "
                       r"in\b|\blogged in\b|\bappointment\b|\bstatement\b|\binvoice\b|\breceipt\b"
                       r"|\bamount (?:due|paid)\b|\bsubtotal\b|\bship(?:ping)? (?:to|address)\b|"
                       r"\bestimated delivery\b|\btransaction\b"), -1.2),
    # News, digests and community posts (version 3): newsletters that inform, not sell.
    Cue("editorial", _lower(r"\b(?:min read|read more|read the (?:full )?(?:story|article)|opinion"
                         r"|editor'?s?|reporters?|news|digest|bulletin|stories|story|articles?|"
                         r"highlights|posted by|replied|comments?|neighbou?rs?|question|answers?|"
                         r"this week in|good morning|podcast|episode|update)\b"), -1.0),
    Cue("personal", _lower(r"\b(?:i think|let me know|see you|talk soon|thanks for your|as we "
                        r"discussed|attached is|i'll|i've)\b"), -0.7, cap=5,
        needles=("i think", "let me know", "see you", "talk soon", "thanks for your",
                 "as we discussed", "attached is", "i'll", "i've")),
    # Technical discussion: patches, code, logs (kernel, SDR, hypervisor lists). Their
    # "free", "order", "save", "credit", "business" are not offers.
    Cue("technical", re.compile(r"^(?:diff --git|index [0-9a-f]{7,}\.\.|@@ -\d|signed-off-by:|"
                         r"reviewed-by:|acked-by:|\+\+\+ |--- a/)|#include\b|\bstruct \w+ \{|"
                         r"\b(?:if|for|while) \(.*\) \{$|\b\w+\(\);$|\btraceback \(most recent"
                         r"|\bsegfault|\bkernel:? |\bcommit [0-9a-f]{12,}\b", re.M), -1.2, cap=5,
        # One per alternative, in order (the most expensive cue to run: ~30% of the score).
        needles=("diff --git", "index ", "@@ -", "signed-off-by:", "reviewed-by:", "acked-by:",
                 "+++ ", "--- a/", "#include", "struct ", "if (", "for (", "while (", "();",
                 "traceback (most recent", "segfault", "kernel", "commit ")),
    # The Subject alone (version 4): promotions announce the offer there ("40% off ends
    # tonight", "Presale starts tomorrow") and decorate it with emoji; news, account notices
    # and personal mail mostly do not. Community: neighbourhood, group and thread posts.
    Cue("subject_promo", _lower(r"\b(?:sale|off|save|savings|offers?|deals?|gifts?|shop|launch\w*"
                             r"|presale|ends|last chance|don'?t miss|free|exclusive|introducing|"
                             r"now available|limited|new arrivals?|rewards?|bonus|discount|coupon|"
                             r"\d+%)\b|\$\d|!"), 0.7, cap=3, subject=True),
    Cue("subject_emoji", re.compile(r"[\U0001F300-\U0001FAFF\u2600-\u27BF]"), 1.3, cap=1,
        subject=True),
    Cue("community", _lower(r"\bneighbou?rs?\b|\bnear you\b|\bposted\b|\bsupport group\b|"
                         r"\bcommunity\b|\bmeeting\b|\bnew message\b|\breplied\b|\bcommented\b|"
                         r"\bmentioned you\b"), -1.0, cap=3,
        needles=("neighbo", "near you", "posted", "support group", "community", "meeting",
                 "new message", "replied", "commented", "mentioned you")),
    # The Subject names the reader's own business with the sender (version 5): an order,
    # receipt, payment, sign-in, appointment, renewal or notice. Account mail says so where
    # the reader decides whether to open it; a promotion's Subject names the offer instead.
    Cue("subject_account", _lower(r"\b(?:order|receipt|invoice|statement|account|password|"
                               r"security|sign[- ]?in|log[- ]?in|verif\w*|confirm\w*|shipped|"
                               r"delivered|deliver(?:y|ing)|payment|paid|bill|billing|appointment"
                               r"|reminder|reservation|booking|renew\w*|expir\w*|refund|return|"
                               r"tracking|alert|notice|update to|changes? to|action required|"
                               r"important information)\b"), -1.0, cap=2, subject=True),
)  # fmt: skip
# Terms beside the cues, read from the counts by commercial_terms.
# price_density (version 5): prices per 100 words of the text read, capped at 10, as
# log1p. One price in a long text is a receipt line or a quoted figure; prices dense in
# little text are a catalogue or an offer grid (the "price" cue alone counts against).
PRICE_DENSITY_CAP = 10.0
# Header evidence of how the message was sent (version 5; see sending_headers):
# list_unsubscribe: a List-Unsubscribe field (RFC 2369) outside discussion lists. Bulk
# mailing to a subscriber list carries it (the 2024 bulk-sender rules require it for
# marketing mail); one-to-one account notices mostly do not.
# campaign_platform: a marketing-automation platform's campaign fields (below).
# (Version 4's "many links" term, 0.1 * log1p(links) from 3 links on, fits to 0.01 beside
# the header evidence, which says more directly that a message went to a list: dropped.)
COMMERCIAL_TERMS = {
    "price_density": 0.8,
    "list_unsubscribe": 1.0,
    "campaign_platform": 0.8,
}

# (anchor, full pattern): the cheap anchor is searched first, the full pattern only if found.
_POSTAL = (
    (_re(r"\bbox\s+\d"), _re(r"\bp\.?\s?o\.?\s?box\s+\d+")),
    # US: "12 High Street, Springfield, IL 62704"
    (
        re.compile(r"\b[A-Z]{2}\s+\d{5}\b"),
        re.compile(
            r"\b\d{1,6}\s+(?:[A-Za-z0-9.'-]+\s+){0,5}(?:street|st|avenue|ave|road|rd|boulevard"
            r"|blvd|lane|ln|drive|dr|suite|ste|way|court|ct|place|pl|square|sq|highway|hwy|"
            r"parkway|pkwy)\b.{0,80}?\b[A-Z]{2}\s+\d{5}(?:-\d{4})?\b",
            re.IGNORECASE | re.DOTALL,
        ),
    ),
    # UK postcode after a numbered street line
    (
        re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]?\s+\d[A-Z]{2}\b"),
        re.compile(r"\b\d{1,5}\s+\w+.{0,80}?\b[A-Z]{1,2}\d[A-Z\d]?\s+\d[A-Z]{2}\b", re.DOTALL),
    ),
    # Canada
    (
        re.compile(r"\b[A-Z]\d[A-Z]\s?\d[A-Z]\d\b"),
        re.compile(r"\b\d{1,6}\s+\w+.{0,80}?\b[A-Z]\d[A-Z]\s?\d[A-Z]\d\b", re.DOTALL),
    ),
    # Continental Europe: "Hauptstraße 5, 10115 Berlin", "12 rue de la Paix, 75002 Paris"
    (
        re.compile(r"\b\d{4,5}\s+[A-ZÄÖÜÉ]"),
        re.compile(
            r"(?:\b\w*(?:stra(?:ss|ß)e|str\.|weg|gasse|platz|laan|plein|straat)\s+\d{1,4}"
            r"|\b\d{1,4},?\s+(?:rue|avenue|boulevard|place|via|calle|avenida|plaza)\b).{0,60}?"
            r"\b\d{4,5}\s+[A-ZÄÖÜÉ][\w-]+",
            re.IGNORECASE | re.DOTALL,
        ),
    ),
)
# For each _POSTAL entry, a pattern every match of its anchor contains that starts with a
# character class, so re skips ahead to candidates instead of trying every position (a
# leading \b defeats that): one of ~4 us where the anchor takes ~30 us, and most text has
# no five-digit run, postcode or house number before a capital.
_POSTAL_GATES = (
    re.compile(r"[bB][oO][xX]"),  # IGNORECASE equates b, o, x with nothing else
    re.compile(r"\d{5}"),
    re.compile(r"\d[A-Z]{2}"),
    re.compile(r"\d[A-Z]\s?\d[A-Z]\d"),
    re.compile(r"\d{4}\s+[A-ZÄÖÜÉ]"),  # \d{4,5}\s+: the last four digits, then the space
)
_AD_LABEL = _re(
    r"\bthis (?:e-?mail|message) is an? (?:advertisement|commercial (?:message|communication)"
    r"|promotion(?:al (?:message|e-?mail))?)\b|^\s*(?:adv|advertisement|anzeige|werbung|"
    r"publicit[ée])\b|\b(?:this is an|is an) advertisement\b|\bsponsored (?:content|message)\b"
    r"|\bpromotional (?:e-?mail|message)\b|\bwerbung\b|\bpublicit[ée]\b"
)
_UNSUBSCRIBE = _re(
    r"unsubscribe|opt[- _]?out|remove me|removal|manage (?:your )?(?:preferences|subscription"
    r"|e-?mail settings)|abmelden|abbestellen|d[ée]sabonner|d[ée]sinscri|darse de baja|"
    r"cancelar suscripci|afmelden|list-manage"
)
_COMPANY = re.compile(
    r"\b(?:Ltd|Limited|Inc|LLC|L\.L\.C|GmbH|AG|plc|S\.A|SARL|SAS|B\.V|N\.V|S\.L|Pty|Corp"
    r"|Corporation|Co\.)\b\.?|©|\(c\)\s*\d{4}|copyright",
)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_VOWELS = frozenset("aeiouyàáâäèéêëìíîïòóôöùúûü")
_STOPWORDS = frozenset(
    ("the", "and", "for", "you", "your", "with", "this", "that", "from", "are", "was", "our",
     "have", "has", "not", "but", "all", "can", "will", "about", "what", "when", "how", "who",
     "new", "get", "now", "out", "its", "it's", "fwd", "re", "aw")
)  # fmt: skip
MEANINGFUL_MIN_WORDS = 5
MEANINGFUL_MIN_WORDLIKE = 0.4
MEANINGFUL_MIN_VARIETY = 0.1  # distinct / total words, checked from 20 words on


def _subject(ctx: FactContext) -> str:
    return ctx.message.header("subject") or ""


# The detectors scan up to 64 K characters with many patterns (up to ~14 ms on the
# corpus's largest bodies), so on a long text each runs in a thread, off the event loop.
# On a short one the trip to the thread costs more than the work (about 40 us of CPU each
# way and a loop wake-up, docs/benchmarks.md "Thread hops"), so up to INLINE_CHARS of text
# they run on the loop: all five detectors of one such text together took 0.3 ms on
# average and 1.1 ms at most over 10,000 synthetic messages (docs/lab.md "Pass 1: where
# the CPU goes"), within the loop-lag budget body_text keeps.
INLINE_CHARS = 2048

R = TypeVar("R")


async def _scan(text: str, fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)``, a detector over ``text``: on the loop when the text is short."""
    if len(text) <= INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _body(ctx: FactContext) -> BodyText:
    body = await ctx.get("body_text")
    if not isinstance(body, BodyText):  # a cached summary cannot be re-read
        raise TypeError("body_text is not available for re-reading")
    return body


# A line that may start a discussion list's footer: mailman's rule, the signature
# delimiter, Yahoo/Google Groups' dashed banners.
_FOOTER_START = re.compile(r"^(?:_{10,}|-- ?|-{10,}.*|~{10,}.*)\s*$", re.M)
# What makes the block after such a line the list's footer rather than the author's text.
_FOOTER_MARK = re.compile(
    r"unsubscribe|mailing list|listinfo|groups?\b|sponsor|you received this", re.I
)
FOOTER_MAX_LINES = 15


def own_words(text: str, discussion_list: bool) -> str:
    """The text the author wrote: quoted lines (``>``) dropped, as someone else's words;
    on a discussion list also the footer its software appends ("unsubscribe", sponsor
    lines): from the first separator line that leaves at most FOOTER_MAX_LINES lines
    naming the list, an unsubscribe or a sponsor."""
    kept = "\n".join(line for line in text.split("\n") if not line.lstrip().startswith(">"))
    if discussion_list:
        for match in _FOOTER_START.finditer(kept):
            rest = kept[match.start() :]
            if rest.count("\n") <= FOOTER_MAX_LINES and _FOOTER_MARK.search(rest):
                return kept[: match.start()]
    return kept


@dataclass(frozen=True, slots=True)
class SendingHeaders:
    """What the header says about how the message was sent (commercial_probability v5)."""

    list_unsubscribe: bool = False  # a List-Unsubscribe field (RFC 2369)
    campaign_platform: bool = False  # a marketing-automation platform's campaign fields


# Fields that marketing-automation platforms add to campaign sends, and X-Mailer names of
# such platforms: the send was built as a campaign to a list. X-Campaign / X-CampaignID
# (Mailchimp and others), X-MC-User (Mailchimp's account), X-SFMC-Stack (Salesforce
# Marketing Cloud), X-CSA-Complaints (the Certified Senders Alliance, which certifies
# commercial bulk senders); Mailchimp, Brevo (formerly Sendinblue), Adobe Campaign
# ("nlserver"), Campaign Monitor ("createsend"), MailUp, Klaviyo, Constant Contact. The
# same platforms send some account notices too: evidence, weighed like the cues.
_CAMPAIGN_FIELDS = ("x-campaign", "x-campaignid", "x-mc-user", "x-sfmc-stack", "x-csa-complaints")
_CAMPAIGN_MAILER = _re(
    r"mailchimp|sendinblue|brevo|nlserver|create ?send|mailup|klaviyo|constant ?contact"
)


def sending_headers(message: Message) -> SendingHeaders:
    """The header evidence commercial_score weighs (see COMMERCIAL_TERMS)."""
    return SendingHeaders(
        list_unsubscribe=message.header("list-unsubscribe") is not None,
        campaign_platform=any(message.header(f) is not None for f in _CAMPAIGN_FIELDS)
        or _CAMPAIGN_MAILER.search(message.header("x-mailer") or "") is not None,
    )


def commercial_terms(counts: dict[str, int]) -> dict[str, float]:
    """Each weighted term's value from commercial_score's counts: the one reading shared
    by the score and the fit of its weights (bench/bench_detectors.py)."""
    terms = {cue.name: math.log1p(min(counts[cue.name], cue.cap)) for cue in COMMERCIAL_CUES}
    density = 100.0 * counts["price"] / max(counts["words"], 1)
    terms["price_density"] = math.log1p(min(density, PRICE_DENSITY_CAP))
    terms["list_unsubscribe"] = float(counts["list_unsubscribe"])
    terms["campaign_platform"] = float(counts["campaign_platform"])
    return terms


def commercial_score(
    subject: str,
    body: BodyText,
    discussion_list: bool = False,
    headers: SendingHeaders = SendingHeaders(),
) -> tuple[float, dict[str, int]]:
    """Probability-like score and the matches per cue (for explanations and tests).

    ``discussion_list``: the message came through a list its members post to (List-Post
    names an address, RFC 2369); its footer is the list's, not the author's, and so is its
    List-Unsubscribe field, which says nothing about the author's purpose."""
    # Cue patterns are lower-case: lowering once is cheaper than IGNORECASE in every scan.
    text = (subject + "\n" + own_words(body.text, discussion_list)).lower()
    lowered = subject.lower()
    counts = {cue.name: cue.count(lowered if cue.subject else text) for cue in COMMERCIAL_CUES}
    counts["links"] = len(body.links)
    counts["words"] = len(text.split())
    counts["list_unsubscribe"] = int(headers.list_unsubscribe and not discussion_list)
    counts["campaign_platform"] = int(headers.campaign_platform)
    terms = commercial_terms(counts)
    z = COMMERCIAL_BIAS
    z += sum(cue.weight * terms[cue.name] for cue in COMMERCIAL_CUES)
    z += sum(weight * terms[name] for name, weight in COMMERCIAL_TERMS.items())
    return 1.0 / (1.0 + math.exp(-z)), counts


def is_discussion_list(list_post: str | None, mailing_list: str | None) -> bool:
    """A list its members post to: List-Post names an address (``mailto:``; announcement
    lists and bulk senders say ``NO`` or send none, RFC 2369 3.4), or ezmlm's and Yahoo
    Groups' ``Mailing-List:`` field."""
    return (list_post is not None and "mailto:" in list_post.lower()) or bool(mailing_list)


async def _commercial_probability(ctx: FactContext) -> float:
    message = ctx.message
    listed = is_discussion_list(message.header("list-post"), message.header("mailing-list"))
    body = await _body(ctx)
    score, _ = await _scan(
        body.text, commercial_score, _subject(ctx), body, listed, sending_headers(message)
    )
    return round(score, 4)


def has_postal(text: str) -> bool:
    """Whether ``text`` holds a postal address pattern (see _POSTAL)."""
    return any(
        gate.search(text) and anchor.search(text) and full.search(text)
        for gate, (anchor, full) in zip(_POSTAL_GATES, _POSTAL, strict=True)
    )


async def _has_postal_address(ctx: FactContext) -> bool:
    text = (await _body(ctx)).text
    return await _scan(text, has_postal, text)


# Every match of _AD_LABEL holds one of these, ignoring case: a text holding none is
# answered without running the pattern (most mail; the pattern costs ~0.2 ms a message).
_AD_NEEDLES = ("adv", "commercial", "promotion", "anzeige", "werbung", "publicit", "sponsored")
# The characters IGNORECASE equates with an ASCII letter that str.lower() does not turn
# into it (U+0130 and U+0131 with i, U+017F with s; the Kelvin sign lowers to k): a
# text holding one is searched.
_FOLDS_TO_ASCII = ("\u0130", "\u0131", "\u017f")


def has_ad_label(text: str) -> bool:
    """Whether ``text`` says it is an advertisement (see _AD_LABEL)."""
    if not any(c in text for c in _FOLDS_TO_ASCII):
        lowered = text.lower()
        if not any(n in lowered for n in _AD_NEEDLES):
            return False
    return _AD_LABEL.search(text) is not None


async def _has_ad_label(ctx: FactContext) -> bool:
    return has_ad_label((await _body(ctx)).text)


async def _has_body_unsubscribe_link(ctx: FactContext) -> bool:
    for link in (await _body(ctx)).links:
        href = link.href.lower()
        if not href.startswith(("http://", "https://", "mailto:")):
            continue
        if _UNSUBSCRIBE.search(link.label) or _UNSUBSCRIBE.search(href):
            return True
    return False


async def _body_sender_identified(ctx: FactContext) -> bool:
    text = (await _body(ctx)).text
    lowered = text.lower()
    found = addresses(ctx.message, "from")
    if found:
        display, address = found[0]
        display = display.strip().strip('"').lower()
        if len(display) >= 3 and "@" not in display and display in lowered:
            return True
        domain = address_domain(address)
        if domain:
            org = org_domain(ctx.service(PSL), domain)
            name = org.split(".")[0]
            if org in lowered or (len(name) >= 3 and re.search(rf"\b{re.escape(name)}\b", lowered)):
                return True
    return _COMPANY.search(text) is not None


def _wordlike(word: str) -> bool:
    if not word.isascii():
        return True  # other scripts: no vowel test
    w = word.lower()
    return 2 <= len(w) <= 20 and any(ch in _VOWELS for ch in w)


# Code, patches and logs are mostly "non-words" and still mean something: a line with
# code punctuation, or the technical cue's markers (diff headers, sign-offs, tracebacks).
_CODE_LINE = re.compile(r"[;{}()\[\]=<>]|->|::")
_TECHNICAL = next(cue for cue in COMMERCIAL_CUES if cue.name == "technical")
CODE_MIN_LINES = 5
CODE_MIN_SHARE = 0.3


def is_code(text: str) -> bool:
    """Whether ``text`` reads as code, a patch or a log: at least CODE_MIN_LINES lines and
    CODE_MIN_SHARE of its non-empty lines with code punctuation, or two technical markers."""
    lines = [line for line in text.split("\n") if line.strip()]
    code = sum(1 for line in lines if _CODE_LINE.search(line))
    if code >= CODE_MIN_LINES and code >= CODE_MIN_SHARE * len(lines):
        return True
    return _TECHNICAL.count(text.lower()) >= 2


def is_meaningless(text: str) -> bool:
    """Too few words, mostly non-words, or one word repeated (see docs/facts.md); code,
    patches and logs are not meaningless, whatever their share of words."""
    tokens = text.split()
    found = _WORD.findall(text)
    # Each distinct word tested once (a word recurs about twice in ordinary text).
    wordlike = {w for w in set(found) if _wordlike(w)}
    words = [w for w in found if w in wordlike]
    if len(words) < MEANINGFUL_MIN_WORDS:
        return True
    if len(words) / max(len(tokens), 1) < MEANINGFUL_MIN_WORDLIKE:
        return not is_code(text)
    variety = len({w.lower() for w in words}) / len(words)
    return len(words) >= 20 and variety < MEANINGFUL_MIN_VARIETY and not is_code(text)


async def _meaningless_text(ctx: FactContext) -> bool:
    text = (await _body(ctx)).text
    return await _scan(text, is_meaningless, text)


def _stems(text: str) -> set[str]:
    return {
        w[:5]
        for w in (t.lower() for t in _WORD.findall(text))
        if len(w) >= 3 and w not in _STOPWORDS
    }


def mismatch(subject: str, text: str) -> float:
    """Share of the subject's content words (5-letter stems) absent from the body."""
    wanted = _stems(subject)
    if not wanted:
        return 0.0
    return round(1.0 - len(wanted & _stems(text)) / len(wanted), 4)


async def _subject_body_mismatch(ctx: FactContext) -> float:
    text = (await _body(ctx)).text
    return await _scan(text, mismatch, _subject(ctx), text)


def _spec(
    name: str,
    kind: FactType,
    fn: Callable[[FactContext], Any],
    doc: str,
    needs: tuple[Service[Any], ...] = (),
    version: int = 1,
) -> FactSpec:
    return FactSpec(
        name, kind, Tier.CONTENT, fn, depends=("body_text",), doc=doc, needs=needs, version=version
    )


FACTS = (
    _spec(
        "commercial_probability",
        FactType.FLOAT,
        _commercial_probability,
        "heuristic 0..1: weighted commercial cues (offers, calls to action, bulk headers ...)",
        # 2: quoted lines, discussion-list footers and technical cues; 3: shop, account
        # and editorial cues, weights fitted on purpose-labelled modern-dev mail; 4: the
        # Subject's own cues and community posts, refitted on body_text version 2; 5: header
        # evidence of list mailing and campaign platforms, account words in the Subject,
        # price density
        version=5,
    ),
    # Every fact below reads body_text, whose version 2 reads the HTML alternative when the
    # plain one is a stub: each is one version up so the lab's cache drops older values.
    _spec("has_postal_address", FactType.BOOL, _has_postal_address,
          "a postal address pattern (PO box; US, UK, CA, continental street + postcode)",
          version=2),
    _spec("has_ad_label", FactType.BOOL, _has_ad_label,
          "the body says it is an advertisement / promotional message", version=2),
    _spec("has_body_unsubscribe_link", FactType.BOOL, _has_body_unsubscribe_link,
          "a link whose text or target is an unsubscribe / opt-out", version=2),
    _spec("body_sender_identified", FactType.BOOL, _body_sender_identified,
          "the body names the sender (From name or domain) or a company", (PSL,), version=2),
    _spec("meaningless_text", FactType.BOOL, _meaningless_text,
          "little meaningful text: < 5 words, mostly non-words (not code), or one word repeated",
          version=3),  # 2: code, patches and logs are not meaningless
    _spec("subject_body_mismatch", FactType.FLOAT, _subject_body_mismatch,
          "share of subject content words absent from the body (0 = all present)", version=2),
)  # fmt: skip
