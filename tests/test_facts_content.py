"""Content facts (T3) and the shared decoded-text extraction."""

from __future__ import annotations

import pytest
from publicsuffixlist import PublicSuffixList

from relay.facts import content, text
from relay.facts.base import FactRegistry, Facts, Services
from relay.facts.content import commercial_score, is_meaningless, mismatch
from relay.facts.text import BodyText, decoded_text, extract
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


def test_plain_preferred_and_attachments_skipped() -> None:
    msg = _mime(
        "--b\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: "
        "quoted-printable\n\nCaf=E9 at noon\n--b\nContent-Type: text/html\n\n<p>HTML copy</p>\n"
        "--b\nContent-Type: text/plain\nContent-Disposition: attachment; filename=a.txt\n\n"
        "attached words\n--b--\n",
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
