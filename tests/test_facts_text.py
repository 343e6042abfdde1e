"""The decoded body text (relay.facts.text): which MIME parts the content facts read.

The messages are shaped like the mail that exposed the bug of issue 18: bulk senders'
multipart/alternative with an empty or one-line text/plain part and the whole message in
the HTML, often padded with invisible "preheader" characters.
"""

from __future__ import annotations

import random
import re

import pytest
from publicsuffixlist import PublicSuffixList

from relay.facts import content, text
from relay.facts.base import FactRegistry, Facts, Services
from relay.facts.content import is_meaningless
from relay.facts.text import extract
from relay.message import Message

REGISTRY = FactRegistry((*content.FACTS, *text.FACTS))

PROMOTION_HTML = (
    "<html><head><style>.x{color:red}</style></head><body>"
    "<div style='display:none'>Our winter sale is here" + "&#847;&zwnj;&nbsp;" * 80 + "</div>"
    "<table><tr><td><h1>Winter sale: 40% off sitewide</h1>"
    "<p>Save up to 40% on jackets, boots and gloves. Use code WINTER at checkout. "
    "Free shipping on orders over $50. Offer ends Sunday.</p>"
    "<p><a href='https://shop.example/sale'>Shop now</a> | "
    "<a href='https://shop.example/new'>New arrivals</a> | "
    "<a href='https://shop.example/best'>Best sellers</a></p>"
    "<p>You are receiving this because you subscribed. "
    "<a href='https://shop.example/u?id=7'>Unsubscribe</a> or manage preferences.</p>"
    "</td></tr></table></body></html>"
)


def _message(body: str, content_type: str, subject: str = "Hello") -> Message:
    head = (
        "From: Outfitters <news@shop.example>\nTo: ann@example.org\n"
        f"Subject: {subject}\nMIME-Version: 1.0\nContent-Type: {content_type}\n"
    )
    return Message.from_file_bytes((head + "\n" + body).encode(), received_at=1_795_000_000.0)


def _alternative(plain: str, html: str, boundary: str = "alt") -> str:
    return (
        f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{plain}\n"
        f"--{boundary}\nContent-Type: text/html; charset=utf-8\n\n{html}\n--{boundary}--\n"
    )


ALT = 'multipart/alternative; boundary="alt"'


@pytest.mark.parametrize(
    "plain",
    ["", "\n \n", "View this email in your browser: https://shop.example/v/1"],
    ids=["empty", "blank", "browser-link"],
)
def test_stub_plain_part_reads_the_html(plain: str) -> None:
    """The bug: an empty or one-line plain alternative hid the whole HTML message."""
    body = extract(_message(_alternative(plain, PROMOTION_HTML), ALT))
    assert "Winter sale: 40% off sitewide" in body.text
    assert "Use code WINTER" in body.text
    assert body.html
    assert "https://shop.example/u?id=7" in [link.href for link in body.links]


def test_a_full_plain_part_is_still_preferred() -> None:
    """Plain text stays the default when it carries the message: it holds no layout or
    hidden text. The HTML's links are kept either way."""
    plain = (
        "Winter sale: 40% off sitewide. Save up to 40% on jackets, boots and gloves.\n"
        "Use code WINTER at checkout. Free shipping on orders over $50. Ends Sunday.\n"
        "Shop now: https://shop.example/sale\nUnsubscribe: https://shop.example/u?id=7\n"
    )
    body = extract(_message(_alternative(plain, PROMOTION_HTML), ALT))
    assert body.text.startswith("Winter sale: 40% off sitewide. Save up to 40%")
    assert "Best sellers" not in body.text  # HTML-only words: the HTML was not read
    assert not body.html
    hrefs = [link.href for link in body.links]
    assert "https://shop.example/best" in hrefs  # from the HTML
    assert "https://shop.example/sale" in hrefs  # from the plain text


def test_html_inside_related_and_a_mixed_footer() -> None:
    """The usual nesting: mixed(alternative(plain stub, related(html, image)), footer).
    The chosen alternative and the list footer are both read, the image is not."""
    related = (
        'Content-Type: multipart/related; boundary="rel"\n\n'
        f"--rel\nContent-Type: text/html; charset=utf-8\n\n{PROMOTION_HTML}\n"
        "--rel\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo=\n"
        "--rel--\n"
    )
    body = (
        '--mix\nContent-Type: multipart/alternative; boundary="alt"\n\n'
        "--alt\nContent-Type: text/plain\n\n\n"
        f"--alt\n{related}--alt--\n"
        "--mix\nContent-Type: text/plain\n\nSent through the outdoors mailing list.\n--mix--\n"
    )
    found = extract(_message(body, 'multipart/mixed; boundary="mix"'))
    assert "Winter sale: 40% off sitewide" in found.text
    assert found.text.endswith("Sent through the outdoors mailing list.")
    assert "iVBOR" not in found.text


def test_preheader_padding_is_not_text() -> None:
    """Invisible padding (U+034F, U+200C, soft hyphens) must neither count as words nor
    make a promotion "meaningless"."""
    found = extract(_message(PROMOTION_HTML, "text/html; charset=utf-8"))
    assert "\u034f" not in found.text and "\u200c" not in found.text
    assert found.text.startswith("Our winter sale is here")
    assert is_meaningless(found.text) is False


def test_a_forwarded_message_is_read() -> None:
    body = (
        "--mix\nContent-Type: text/plain\n\nSee below.\n"
        "--mix\nContent-Type: message/rfc822\n\n"
        "From: b@example.net\nSubject: minutes\nContent-Type: text/plain\n\n"
        "The board approved the budget.\n--mix--\n"
    )
    found = extract(_message(body, 'multipart/mixed; boundary="mix"'))
    assert found.text == "See below.\n\nThe board approved the budget."


async def test_commercial_probability_reads_the_html_of_a_stub_alternative() -> None:
    """End to end through the fact registry: with the plain stub read, the promotion
    scored as an empty message (below 0.5); read from its HTML it is commercial."""
    message = _message(_alternative("", PROMOTION_HTML), ALT)
    facts = Facts(REGISTRY, message, Services(psl=PublicSuffixList()))
    assert await facts.get("commercial_probability") > 0.9
    assert await facts.get("has_body_unsubscribe_link") is True
    assert await facts.get("meaningless_text") is False


def test_body_text_version_keys_the_cache() -> None:
    """The lab caches facts by version: the extraction changed, so body_text and the
    facts reading it moved on (commercial_probability 4 and later, meaningless_text 3,
    others 2)."""
    assert text.FACTS[0].version == 2
    versions = {spec.name: spec.version for spec in content.FACTS}
    assert versions["commercial_probability"] >= 4
    assert versions["meaningless_text"] == 3
    assert all(v >= 2 for v in versions.values())


def test_deep_nesting_is_bounded() -> None:
    """Multiparts nested deeper than MAX_DEPTH are not followed: the text above the limit
    is read, what lies deeper is skipped (200 levels: the stdlib parser's own recursion
    gives out near 1000)."""
    depth = 200
    opening = "".join(
        f'--b{i}\nContent-Type: multipart/mixed; boundary="b{i + 1}"\n\n' for i in range(depth)
    )
    closing = "".join(f"--b{i}--\n" for i in reversed(range(depth + 1)))
    body = (
        "--b0\nContent-Type: text/plain\n\nTop note.\n"
        + opening
        + f"--b{depth}\nContent-Type: text/plain\n\nburied\n"
        + closing
    )
    found = extract(_message(body, 'multipart/mixed; boundary="b0"'))
    assert found.text == "Top note."


# The per-line regexes _tidy and the link pattern replaced (issue 17: a tenth of the CPU);
# the fast forms must give exactly their results.
_OLD_SPACES = re.compile(r"[ \t\r\f\v]+")
_OLD_URL = re.compile(r"(?:https?://|mailto:)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)


def _old_tidy(value: str) -> str:
    value = text._INVISIBLE_CHARS.sub("", value)
    lines = (_OLD_SPACES.sub(" ", line).strip() for line in value.split("\n"))
    return text._LINES.sub("\n\n", "\n".join(lines)).strip()


_TIDY_ALPHABET = (
    *" \t\r\n\f\v\x1c\x1f\x85\xa0\u2028\u3000",  # blanks in and outside the collapsed set
    *"ab.",
    *"\u200b\u00ad\ufeff\u034f",  # invisible characters
    "  ",
    "\r\n",
)


def test_tidy_gives_what_collapsing_each_line_gave() -> None:
    rng = random.Random(17)
    samples = [
        "".join(rng.choice(_TIDY_ALPHABET) for _ in range(rng.randint(0, 16)))
        for _ in range(50_000)
    ]
    samples += ["Line one. \r\nLine  two\t\twith\ttabs\r\n \r\n\r\n\r\nLast.\r\n", "plain"]
    for sample in samples:
        assert text._tidy(sample) == _old_tidy(sample), repr(sample)


def test_tidy_collapses_and_strips() -> None:
    assert text._tidy(" a \t b\r\n\r\n\r\n\u200bc  \r\n") == "a b\n\nc"


# Every character IGNORECASE matches to a letter of the schemes (the long s, dotted and
# dotless i among them), beside the separators and blanks that end a link.
_URL_ALPHABET = (
    *"htpsmailoHTPSMAILO:/",
    *"\u017f\u0130\u0131",
    *" <x\n(K",
)


def test_link_pattern_finds_what_the_case_blind_one_found() -> None:
    rng = random.Random(17)
    samples = [
        "".join(rng.choice(_URL_ALPHABET) for _ in range(rng.randint(0, 20))) for _ in range(50_000)
    ]
    for scheme in ("http://", "https://", "mailto:"):
        samples += [
            "".join(rng.choice((c, c.upper(), rng.choice(_URL_ALPHABET))) for c in scheme) + "a"
            for _ in range(20_000)
        ]
    for sample in samples:
        found = [(m.start(), m.group(0)) for m in text._URL.finditer(sample)]
        assert found == [(m.start(), m.group(0)) for m in _OLD_URL.finditer(sample)], sample


def test_plain_links_are_found_in_any_case() -> None:
    links = text._plain_links("See HTTPS://Example.org/a. Or\nMailTo:ann@example.org\n")
    assert [link.href for link in links] == ["HTTPS://Example.org/a", "MailTo:ann@example.org"]
    assert text._plain_links("no links here, only words") == []
