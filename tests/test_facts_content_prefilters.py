"""The content detectors' shortcuts (facts/content.py) give the answers of the patterns
they skip: cue needles, the ad-label and postal gates, and where the detectors run (on the
event loop for short texts, in a thread for long ones)."""

from __future__ import annotations

import pytest
from publicsuffixlist import PublicSuffixList

from relay.facts import content, text
from relay.facts.base import FactRegistry, Facts, Services
from relay.facts.content import (
    _AD_LABEL,
    _POSTAL,
    _POSTAL_GATES,
    COMMERCIAL_CUES,
    INLINE_CHARS,
    Cue,
    has_ad_label,
    has_postal,
)
from relay.message import Message

# At least one phrase per alternative of every cue that has needles (lower-case, as
# commercial_score reads them), with the words around them that some alternatives need.
CUE_PHRASES = """
price: $5 and € 12 and £3 and ¥900, 20 usd, 15.50 eur, 9 gbp, 3 dollars, 1 dollar, 5 euros
discount: 20% off, 5 % off today, discounts, a sale here, coupons, promo, promotion,
promocode, a special offer, limited-time, limited time, clearance, free shipping, free
delivery, free trial, free gift, best price, lowest price
call_to_action: buy now, order today, shop now, subscribe now, sign up today, register now,
call now, apply today, act now, book now, download today, join now, click here, get yours,
get started, don't miss, dont miss, hurry
unsubscribe: unsubscribe, opt-out, opt out, optout, removed from our mailing list, remove
from the list, to be removed, no longer wish, manage your preferences, manage subscription
ad_statement: advertisement, advertising, promotional, sponsored
shop: shop now, shop all, shop the, shop our, shop sale, shop new, shop today, shop deals,
shop gifts, shop here, add to cart, add to bag, use promo code, with discount code, enter
the code, apply code, code: x, bogo, sitewide, save up to, save a bundle, save an hour,
save $5, save 20, ends tonight, ends today, ends soon, ends tomorrow, ends sunday, ends
monday, last chance, last call, last day, deal, deals, gift guide, bestseller, best
sellers, new arrivals, shop
transactional: receipt, invoice, tracking number, has shipped, order number, order #,
order confirmation, password reset, verification code, security alert, your account
statement
personal: i think, let me know, see you, talk soon, thanks for your, as we discussed,
attached is, i'll, i've
technical:
diff --git a/x b/x
index 0123abc..4567def
@@ -1,2 +1,2 @@
signed-off-by: a
reviewed-by: b
acked-by: c
+++ b/x
--- a/x
#include <stdio.h>
struct foo {
if (x) {
for (i = 0; i < n; i++) {
while (busy) {
do_it();
traceback (most recent call last)
segfault, kernel: oops, kernel panic, commit 0123456789abcdef
community: neighbor, neighbours, near you, posted, support group, community, meeting, new
message, replied, commented, mentioned you
"""


def _with_needles() -> list[Cue]:
    return [cue for cue in COMMERCIAL_CUES if cue.needles]


def test_cues_with_needles_are_the_expensive_selective_ones() -> None:
    assert {c.name for c in _with_needles()} == {
        "price",
        "discount",
        "call_to_action",
        "unsubscribe",
        "ad_statement",
        "shop",
        "transactional",
        "personal",
        "technical",
        "community",
    }


@pytest.mark.parametrize("cue", _with_needles(), ids=lambda c: c.name)
def test_every_match_holds_a_needle(cue: Cue) -> None:
    matches = list(cue.pattern.finditer(CUE_PHRASES))
    # The phrases exercise the cue (a needle list missing an alternative would show here).
    assert len(matches) >= len(cue.needles)
    for match in matches:
        assert any(n in match.group(0) for n in cue.needles), (cue.name, match.group(0))
    for line in CUE_PHRASES.splitlines():
        assert cue.count(line) == len(cue.pattern.findall(line))


def test_a_text_without_needles_is_not_scanned() -> None:
    class Refusing:
        def findall(self, text: str) -> list[str]:
            raise AssertionError("scanned")

    cue = Cue("x", Refusing(), 1.0, needles=("needle",))  # type: ignore[arg-type]
    assert cue.count("hay and more hay") == 0


AD_TEXTS = [
    "This email is an advertisement for our shop.",
    "ADV: cheap flights",
    "  Werbung  ",
    "Publicité: les soldes",
    "this is an advertisement",
    "Sponsored content from our partners",
    "a promotional e-mail",
    "This message is a commercial communication.",
    "This message is a promotional message.",
    # IGNORECASE equates these with ASCII letters; str.lower() does not
    "\u017fponsored content",  # long s
    "THIS MESSAGE IS A COMMERC\u0130AL MESSAGE",  # dotted capital I
    "this message is a commerc\u0131al message",  # dotless i
    "an ordinary note about advice and advances",
    "nothing to see here",
]


@pytest.mark.parametrize("sample", AD_TEXTS)
def test_ad_label_gate_agrees_with_the_pattern(sample: str) -> None:
    assert has_ad_label(sample) is (_AD_LABEL.search(sample) is not None)


def test_folded_letters_still_find_the_label() -> None:
    assert has_ad_label("\u017fponsored content")
    assert has_ad_label("THIS MESSAGE IS A COMMERC\u0130AL MESSAGE")


POSTAL_TEXTS = [
    "Write to PO Box 1234, Springfield",
    "p.o. BOX 77",
    "12 High Street, Springfield, IL 62704",
    "12 High Street, Springfield, IL 62704-1234",
    "10 Downing Street, London SW1A 2AA",
    "221 Baker Street, London NW1 6XE",
    "100 Queen St W, Toronto, ON M5H 2N2",
    "100 Queen St W, Toronto, ON M5H2N2",
    "Hauptstraße 5, 10115 Berlin",
    "12 rue de la Paix, 75002 Paris",
    "Keizersgracht 1, 1015 Amsterdam",
    "Call 555 12345 today",
    "In 2024 Everyone came",
    "nothing here at all",
]


@pytest.mark.parametrize("sample", POSTAL_TEXTS)
def test_postal_gates_hold_for_every_anchor_match(sample: str) -> None:
    for gate, (anchor, _) in zip(_POSTAL_GATES, _POSTAL, strict=True):
        if anchor.search(sample):
            assert gate.search(sample), (gate.pattern, sample)
    without_gates = any(a.search(sample) and f.search(sample) for a, f in _POSTAL)
    assert has_postal(sample) is without_gates


def test_postal_examples_exercise_every_anchor_and_are_found() -> None:
    for anchor, _ in _POSTAL:
        assert any(anchor.search(s) for s in POSTAL_TEXTS), anchor.pattern
    assert sum(has_postal(s) for s in POSTAL_TEXTS) == 10  # the gates let them through


# -- where the detectors run --------------------------------------------------------------

REGISTRY = FactRegistry((*content.FACTS, *text.FACTS))
DETECTORS = ("commercial_probability", "has_postal_address", "meaningless_text")


def _message(chars: int) -> Message:
    head = "From: Shop <deals@shop.example>\nTo: b@example.org\nSubject: 20% off today\n\n"
    line = "Save 20% on new arrivals at 12 High Street, Springfield, IL 62704. Shop now!\n"
    body = (line * (chars // len(line) + 1))[:chars]
    return Message.from_file_bytes((head + body).encode(), received_at=1_795_000_000.0)


@pytest.mark.parametrize(("chars", "in_thread"), [(500, False), (INLINE_CHARS * 3, True)])
async def test_short_texts_on_the_loop_long_ones_in_a_thread(
    thread_calls: list[str], chars: int, in_thread: bool
) -> None:
    services = Services(psl=PublicSuffixList())
    facts = Facts(REGISTRY, _message(chars), services)
    got = {name: await facts.get(name) for name in DETECTORS}
    body = await facts.get("body_text")
    assert (len(body.text) > INLINE_CHARS) is in_thread
    detectors = {"commercial_score", "has_postal", "is_meaningless"}
    assert detectors.issubset(thread_calls) is in_thread
    assert not detectors.intersection(thread_calls) or in_thread
    # the same values either way
    score, _ = content.commercial_score(
        "20% off today", body, False, content.sending_headers(facts.message)
    )
    assert got == {
        "commercial_probability": round(score, 4),
        "has_postal_address": has_postal(body.text),
        "meaningless_text": content.is_meaningless(body.text),
    }
    assert got["has_postal_address"] is True
