"""Content facts (T3) and the shared decoded-text extraction."""

from __future__ import annotations

import math

import pytest
from publicsuffixlist import PublicSuffixList

from relay.facts import content, text
from relay.facts.base import FactRegistry, Facts, Services
from relay.facts.content import SendingHeaders, commercial_score, is_meaningless, mismatch
from relay.facts.text import BodyText, Link, decoded_text, extract
from relay.message import Message
from relay.verdict import Tier
from tests.support.golden_facts import Case, check_case, covered, family_cases

REGISTRY = FactRegistry((*content.FACTS, *text.FACTS))


@pytest.fixture(scope="module")
def services() -> Services:
    return Services(psl=PublicSuffixList())


@pytest.mark.parametrize("case", family_cases(content.FACTS), ids=lambda c: c.file)
async def test_golden(case: Case, services: Services) -> None:
    facts = await check_case(case, content.FACTS, REGISTRY, services)
    # Content facts read the text: the message's highest tier is T3, and the decoded
    # body appears in the record only as a summary.
    assert facts.highest_tier() is Tier.CONTENT
    body = {r.name: r for r in facts.reads()}["body_text"]
    assert body.tier is Tier.FINGERPRINT
    assert isinstance(body.value, str) and body.value.startswith("<body text:")


def test_every_content_fact_has_a_golden_case() -> None:
    assert covered(content.FACTS) == set()


def _mime(body: str, headers: str = "") -> Message:
    head = "From: a@example.com\nTo: b@example.org\nSubject: s\nMIME-Version: 1.0\n" + headers
    return Message.from_file_bytes((head + "\n" + body).encode(), received_at=1_795_000_000.0)


def test_html_text_drops_scripts_and_keeps_links() -> None:
    msg = _mime(
        "<html><head><title>T</title><style>p{}</style></head><body><p>Hello <b>there</b></p>"
        "<script>var secret=1;</script><a href='https://x.example/u?id=1'>Unsubscribe</a>"
        "</body></html>",
        "Content-Type: text/html; charset=utf-8\n",
    )
    body = extract(msg)
    assert "Hello" in body.text and "there" in body.text
    assert "secret" not in body.text and "p{}" not in body.text
    assert body.html
    assert [(link.href, link.label) for link in body.links] == [
        ("https://x.example/u?id=1", "Unsubscribe")
    ]


def test_plain_alternative_preferred_and_attachments_skipped() -> None:
    msg = _mime(
        '--b\nContent-Type: multipart/alternative; boundary="a"\n\n'
        "--a\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: "
        "quoted-printable\n\nCaf=E9 at noon\n--a\nContent-Type: text/html\n\n<p>HTML copy</p>\n"
        "--a--\n--b\nContent-Type: text/plain\nContent-Disposition: attachment; filename=a.txt"
        "\n\nattached words\n--b--\n",
        'Content-Type: multipart/mixed; boundary="b"\n',
    )
    assert decoded_text(msg) == "Café at noon"


def test_unknown_charset_and_limit() -> None:
    msg = _mime("abc " * 1000, "Content-Type: text/plain; charset=x-nonsense\n")
    body = extract(msg, limit=100)
    assert len(body.text) == 100 and body.truncated
    assert str(body) == "<body text: 100 chars, 0 links>"


def test_many_parts_are_bounded() -> None:
    parts = "".join(f"--b\nContent-Type: text/plain\n\npart{i}\n" for i in range(200))
    msg = _mime(parts + "--b--\n", 'Content-Type: multipart/mixed; boundary="b"\n')
    words = decoded_text(msg).split()
    assert words[0] == "part0" and len(words) == text.MAX_PARTS


def test_plain_text_links_carry_their_line() -> None:
    body = extract(_mime("Read more.\nTo unsubscribe visit https://e.example/u?x=1.\n"))
    assert body.links[0].href == "https://e.example/u?x=1"
    assert "unsubscribe" in body.links[0].label


def test_commercial_cues_are_explained() -> None:
    body = BodyText("Buy now! Only $9.99, 50% off. Click here. Unsubscribe.")
    score, counts = commercial_score("Sale", body)
    assert score > 0.8
    assert counts["price"] == 1 and counts["call_to_action"] == 2 and counts["unsubscribe"] == 1
    receipt, _ = commercial_score("Receipt", BodyText("Your receipt for order number 5."))
    assert receipt < 0.1


@pytest.mark.parametrize(
    ("sample", "meaningless"),
    [("", True), ("hi there", True), ("qwrtz xcfvg bcdfg hrjst mnnb prtyk lkj", True),
     ("buy " * 40, True), ("The meeting moved to Thursday at noon in room four.", False),
     ("会議は木曜日の正午に四号室へ移りました 詳細は 添付 を ご覧ください", False)],
)  # fmt: skip
def test_meaningless(sample: str, meaningless: bool) -> None:
    assert is_meaningless(sample) is meaningless


def test_subject_body_mismatch() -> None:
    assert mismatch("Re: Invoice overdue", "Your invoice is overdue.") == 0.0
    assert mismatch("Your invoice", "Cheap watches here") == 1.0
    assert mismatch("Re:", "anything") == 0.0  # no content words: nothing to contradict


async def test_text_is_decoded_once_for_all_content_facts(services: Services) -> None:
    msg = _mime("Buy now at 12 rue de la Paix, 75002 Paris. Unsubscribe.\n")
    facts = Facts(REGISTRY, msg, services)
    for spec in content.FACTS:
        await facts.get(spec.name)
    assert [r.name for r in facts.reads()].count("body_text") == 1


# A reply on a technical discussion list: the author's own words are technical; the offer
# is quoted from someone else, and "unsubscribe" sits in the footer mailman appends.
LIST_REPLY = (
    "> Buy now! Only $9.99, 50% off the pro edition. Click here: https://shop.example/x\n"
    "> Free shipping, limited time offer for our customers.\n"
    "\n"
    "That is spam that slipped through the list filter. The allocator change below keeps\n"
    "the free list in order; see https://lore.example/a and https://lore.example/b.\n"
    "_______________________________________________\n"
    "dev mailing list\n"
    "dev@lists.example.org\n"
    "To unsubscribe: https://lists.example.org/listinfo/dev\n"
)
PATCH = (
    "The buddy allocator frees pages in the wrong order under memory pressure, which\n"
    "costs our business users a credit of latency. Save the state first.\n"
    "\n"
    "Signed-off-by: Ann Dev <ann@kernel.example>\n"
    "---\n"
    "diff --git a/mm/page_alloc.c b/mm/page_alloc.c\n"
    "index 1234567..89abcde 100644\n"
    "--- a/mm/page_alloc.c\n"
    "+++ b/mm/page_alloc.c\n"
    "@@ -10,6 +10,7 @@ static void free_one_page(struct zone *zone)\n"
    "+\tspin_lock(&zone->lock);\n"
    "Links: https://lore.example/1 https://lore.example/2 https://lore.example/3\n"
)


async def _commercial(message: Message, services: Services) -> float:
    facts = Facts(REGISTRY, message, services)
    value = await facts.get("commercial_probability")
    assert isinstance(value, float)
    return value


async def test_discussion_list_reply_is_judged_on_its_own_words(services: Services) -> None:
    """Quoted lines and a discussion list's footer are not the author's: a technical reply
    quoting an offer is not commercial. Without List-Post the footer counts, as a bulk
    sender's own unsubscribe line should."""
    listed = _mime(LIST_REPLY, "List-Post: <mailto:dev@lists.example.org>\n")
    assert await _commercial(listed, services) < 0.5
    _, counts = commercial_score("Re: allocator", BodyText(LIST_REPLY), discussion_list=True)
    assert counts["price"] == counts["discount"] == counts["unsubscribe"] == 0
    _, counts = commercial_score("Re: allocator", BodyText(LIST_REPLY), discussion_list=False)
    assert counts["unsubscribe"] == 1, "a bulk sender's own footer still counts"
    assert content.is_discussion_list("NO", None) is False
    assert content.is_discussion_list(None, "list forteana@yahoogroups.com") is True


def test_patch_posts_are_not_offers() -> None:
    score, counts = commercial_score("[PATCH] mm: free pages in order", BodyText(PATCH))
    assert counts["technical"] >= 4 and counts["marketing"] >= 4
    assert score < 0.5


def test_a_newsletter_with_a_list_id_keeps_its_unsubscribe() -> None:
    """Bulk senders set List-Id and List-Unsubscribe, not a List-Post address: their
    footer is theirs, and the offer is in their own words."""
    text = "Spring sale: 30% off all tools, free shipping. Shop now.\n-- \nUnsubscribe here.\n"
    score, counts = commercial_score("Sale", BodyText(text), discussion_list=False)
    assert counts["unsubscribe"] == 1 and score > 0.8


def test_code_patches_and_logs_are_not_meaningless() -> None:
    """Mostly non-words, yet meaningful: a patch and a kernel log (the dropped draft's
    "meaningless" clause would otherwise count list patches as junk). Random strings and
    a repeated word still are."""
    diff = "".join(f"+\tspin_lock(&zone->lock{i});\n-\tx{i} = y{i}->z[{i}];\n" for i in range(30))
    assert content.is_meaningless("Fix the lock order.\n" + diff) is False
    log = "".join(
        f"[ {i}.12] RIP: 0010:__alloc+0x{i:x}/0x2a0 RSP: 0018:ffb3c0\n" for i in range(30)
    )
    assert content.is_meaningless(log) is False
    junk = " ".join(f"xq{i}zv kjhgf{i} wrtpl" for i in range(20))
    assert content.is_meaningless(junk) is True
    assert content.is_meaningless("buy " * 40) is True


# Version 3 (issue 18): bulk mail that informs or reports a transaction shares the
# unsubscribe footer, the links and words like "offer", "free" or "members" with
# promotions (version 2 scored both samples below 0.82); the editorial and account cues
# tell them apart, the shop cue keeps promotions up.
NEWS_DIGEST = (
    "Good morning. Today's highlights: the council's budget vote and what it means for\n"
    "small business owners, a story about the free ferry route, and an opinion piece on\n"
    "school money. Read more on our site. Members asked a question about flood credit\n"
    "relief; our reporters answer it. Plus: the income gap, in one chart.\n"
    "You received this newsletter because you signed up. Unsubscribe or manage preferences.\n"
)
ORDER_NOTICE = (
    "Thanks for your order! Your order #10432 has shipped.\n"
    "Estimated delivery: Friday. Ship to: 12 Elm St. Order total $45.07, payment method\n"
    "ending in 2462. Members earn free shipping and exclusive offers on every order:\n"
    "see our products and deals. Unsubscribe from marketing email or manage preferences.\n"
)
PROMOTION = (
    "Last chance! Save up to 40% sitewide. Use code SPRING at checkout.\n"
    "Shop now: new arrivals and best sellers. Free shipping over $50.\n"
    "Unsubscribe | Manage preferences\n"
)
LINKS = tuple(Link(f"https://news.example/{i}", "story") for i in range(12))


def test_news_digest_with_a_footer_is_not_commercial() -> None:
    score, counts = commercial_score("Your morning briefing", BodyText(NEWS_DIGEST, LINKS))
    assert counts["editorial"] >= 5 and counts["unsubscribe"] == 2 and counts["marketing"] >= 5
    assert score < 0.5


def test_order_notice_with_marketing_footer_is_not_commercial() -> None:
    score, counts = commercial_score("Your order is on its way", BodyText(ORDER_NOTICE, LINKS))
    assert counts["account"] >= 5 and counts["marketing"] >= 5
    assert score < 0.5


def test_promotion_stays_commercial() -> None:
    score, counts = commercial_score("40% off ends tonight", BodyText(PROMOTION, LINKS))
    assert counts["shop"] >= 5
    assert score > 0.9


def test_commercial_probability_is_version_5() -> None:
    """The lab caches facts by version: changed cues or weights need a new one."""
    spec = next(s for s in content.FACTS if s.name == "commercial_probability")
    assert spec.version == 5


# Version 4 (issue 18): the Subject's own cues and community posts.
RECEIPT = (
    "Thanks for shopping with us. Receipt for order #58213, paid with Visa ending in 0042.\n"
    "2 x Trail socks $24.00, 1 x Rain shell $129.00. Subtotal $153.00, total $165.24.\n"
    "Questions about your order? Reply to this email. Unsubscribe from marketing email.\n"
)
NEIGHBOURHOOD = (
    "Maria posted in General: Has anyone seen a grey cat near 5th and Pine? Three neighbors\n"
    "replied and 2 commented on the meeting about the community garden. Posted near you.\n"
    "Unsubscribe or manage your email preferences.\n"
)


def test_a_receipt_with_prices_is_not_commercial() -> None:
    score, counts = commercial_score("Your receipt from Outfitters", BodyText(RECEIPT, LINKS))
    assert counts["price"] >= 4 and counts["account"] >= 3
    assert score < 0.2


def test_the_subject_announces_a_promotion() -> None:
    """The same short body is read as commercial under a promotional Subject, and not
    under a plain one: the subject cues read the Subject alone."""
    text = "See what is new this month at Outfitters. Unsubscribe.\n"
    plain, counts = commercial_score("March at Outfitters", BodyText(text))
    assert counts["subject_promo"] == counts["subject_emoji"] == 0
    promo, counts = commercial_score("\U0001f6cd\ufe0f 40% off ends tonight!", BodyText(text))
    assert counts["subject_promo"] == 3 and counts["subject_emoji"] == 1
    assert plain < 0.5 < promo
    _, counts = commercial_score("Hello", BodyText("Big sale! 40% off, free shipping."))
    assert counts["subject_promo"] == 0, "the body's words are not the Subject's"


def test_a_neighbourhood_post_is_not_commercial() -> None:
    score, counts = commercial_score("Lost cat near 5th and Pine", BodyText(NEIGHBOURHOOD, LINKS))
    assert counts["community"] >= 3 and counts["unsubscribe"] == 1
    assert score < 0.5


def test_the_technical_cue_counts_as_before_in_linear_time() -> None:
    """`\\w+\\(\\);$` retried from every position of a long word (2.4 s for 32 KiB of digits,
    on the event loop); anchored at a word start it finds the same matches."""
    import random
    import re

    from relay.facts import content

    before = re.compile(r"\w+\(\);$", re.M)
    after = re.compile(r"\b\w+\(\);$", re.M)
    technical = next(cue for cue in content.COMMERCIAL_CUES if cue.name == "technical")
    assert r"\b\w+\(\);$" in technical.pattern.pattern
    rng = random.Random(29)
    pieces = ["a", "1", "_", "();", "()", ";", " ", "\n", "\u00e9", "(", ")", "x();\n", "-"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 15)))
        assert [m.span() for m in after.finditer(text)] == [
            m.span() for m in before.finditer(text)
        ], text


# Version 5 (issue 18): header evidence of list mailing, account words in the Subject,
# price density.
UPDATE = "Here is what is new at the studio this month: two classes and an open evening.\n"


def test_list_unsubscribe_counts_outside_discussion_lists() -> None:
    """A List-Unsubscribe field says the message went to a subscriber list; on a list its
    members post to, the field is the list's, not the author's, and counts for nothing."""
    bare, counts = commercial_score("March", BodyText(UPDATE))
    assert counts["list_unsubscribe"] == 0
    listed = SendingHeaders(list_unsubscribe=True)
    bulk, counts = commercial_score("March", BodyText(UPDATE), headers=listed)
    assert counts["list_unsubscribe"] == 1 and bulk > bare
    post, counts = commercial_score("March", BodyText(UPDATE), True, listed)
    assert counts["list_unsubscribe"] == 0 and post == bare


def test_campaign_platform_fields_are_read_from_the_header() -> None:
    def sent(headers: str) -> SendingHeaders:
        return content.sending_headers(_mime(UPDATE, headers))

    assert sent("") == SendingHeaders()
    assert sent("X-SFMC-Stack: 11\n").campaign_platform
    assert sent("X-Mailer: Mailchimp Mailer - **CID0a1b2c**\n").campaign_platform
    assert not sent("X-Mailer: Apple Mail (2.3608)\n").campaign_platform
    both = sent("List-Unsubscribe: <https://e.example/u>\nX-CSA-Complaints: csa@eco.de\n")
    assert both == SendingHeaders(list_unsubscribe=True, campaign_platform=True)
    platform, _ = commercial_score("March", BodyText(UPDATE), headers=sent("X-MC-User: 1\n"))
    assert platform > commercial_score("March", BodyText(UPDATE))[0]


async def test_the_fact_reads_the_sending_headers(services: Services) -> None:
    """End to end: the same body scores higher with a List-Unsubscribe field."""
    plain = await _commercial(_mime(UPDATE), services)
    bulk = await _commercial(_mime(UPDATE, "List-Unsubscribe: <mailto:u@e.example>\n"), services)
    assert bulk > plain


def test_a_subject_naming_the_readers_account_counts_against() -> None:
    neutral, counts = commercial_score("March at the studio", BodyText(UPDATE))
    assert counts["subject_account"] == 0
    notice, counts = commercial_score("Your payment is due: renew now", BodyText(UPDATE))
    assert counts["subject_account"] == 2 and notice < neutral
    _, counts = commercial_score("March", BodyText("Your order has shipped."))
    assert counts["subject_account"] == 0, "the body's words are not the Subject's"


def test_prices_dense_in_little_text_read_as_a_catalogue() -> None:
    """The same four prices count more in a short list than spread through a long text."""
    prices = "Rain shell $129. Trail socks $24. Wool cap $19. Day pack $89.\n"
    catalogue, counts = commercial_score("New this week", BodyText(prices))
    assert counts["price"] == 4
    long_text = prices + "The studio opens at nine and closes at six on weekdays.\n" * 30
    spread, counts = commercial_score("New this week", BodyText(long_text))
    assert counts["price"] == 4 and counts["words"] > 300
    assert catalogue > spread
    terms = content.commercial_terms(counts)
    assert terms["price_density"] == pytest.approx(math.log1p(400 / counts["words"]))
    capped = content.commercial_terms({**counts, "words": 4})
    assert capped["price_density"] == pytest.approx(math.log1p(content.PRICE_DENSITY_CAP))
