"""Header facts (T1) on golden messages and on small variations of them."""

from __future__ import annotations

import dataclasses

import pytest
from publicsuffixlist import PublicSuffixList

from relay.errors import FactError
from relay.facts import headers
from relay.facts.base import FactContext, FactRegistry, Facts, FactSpec, FactType, Services
from relay.message import Message
from relay.verdict import Tier
from tests.support.golden_facts import Case, check_case, covered, family_cases


async def _no_dkim(ctx: FactContext) -> object:
    raise FactError("dkim is given by the golden case, not computed here")


def registry() -> FactRegistry:
    """Header facts; ``dkim`` (another family's) comes from each case's preset."""
    stub = FactSpec("dkim", FactType.OBJECT, Tier.ENVELOPE, _no_dkim)
    return FactRegistry((*headers.FACTS, stub))


@pytest.fixture(scope="module")
def services() -> Services:
    return Services(psl=PublicSuffixList())


@pytest.mark.parametrize("case", family_cases(headers.FACTS), ids=lambda c: c.file)
async def test_golden(case: Case, services: Services) -> None:
    await check_case(case, headers.FACTS, registry(), services)


def test_every_header_fact_has_a_golden_case() -> None:
    assert covered(headers.FACTS) == set()


def _msg(head: str, body: str = "Hello.\r\n") -> Message:
    return Message.from_file_bytes(
        (head.strip() + "\n\n" + body).encode(), received_at=1_795_000_000.0
    )


async def _fact(msg: Message, name: str, services: Services, **preset: object) -> object:
    return await Facts(registry(), msg, services, preset=preset).get(name)


BASE = """From: a@example.com
To: b@example.org
Date: Tue, 10 Mar 2026 09:00:00 +0000
Message-ID: <x@example.com>
Subject: hi"""
PASS_BOTH = {"signatures": [{"result": "pass", "headers": [
    "from", "list-unsubscribe", "list-unsubscribe-post"]}]}  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "one_click"),
    [
        ("List-Unsubscribe: <https://e.example/u>\nList-Unsubscribe-Post: "
         "List-Unsubscribe=One-Click", True),
        # http is not enough (RFC 8058 3.1 requires https)
        ("List-Unsubscribe: <http://e.example/u>\nList-Unsubscribe-Post: "
         "List-Unsubscribe=One-Click", False),
        ("List-Unsubscribe: <mailto:u@e.example>\nList-Unsubscribe-Post: "
         "List-Unsubscribe=One-Click", False),
        # the Post value must be exact
        ("List-Unsubscribe: <https://e.example/u>\nList-Unsubscribe-Post: "
         "List-Unsubscribe=one-click", False),
        ("List-Unsubscribe: <https://e.example/u>", False),
        ("List-Unsubscribe-Post: List-Unsubscribe=One-Click", False),
    ],
)  # fmt: skip
async def test_one_click_needs_https_and_exact_post(
    extra: str, one_click: bool, services: Services
) -> None:
    msg = _msg(BASE + "\n" + extra)
    assert await _fact(msg, "has_one_click_unsubscribe", services, dkim=PASS_BOTH) is one_click


async def test_one_click_is_missing_while_its_dkim_is_temperror(services: Services) -> None:
    msg = _msg(BASE + "\nList-Unsubscribe: <https://e.example/u>\n"
               "List-Unsubscribe-Post: List-Unsubscribe=One-Click")  # fmt: skip
    temp = {"signatures": [{"result": "temperror", "headers": [
        "list-unsubscribe", "list-unsubscribe-post"]}]}  # fmt: skip
    with pytest.raises(FactError, match="could not be verified"):
        await _fact(msg, "has_one_click_unsubscribe", services, dkim=temp)


async def test_one_click_fails_when_dkim_is_missing(services: Services) -> None:
    msg = _msg(BASE + "\nList-Unsubscribe: <https://e.example/u>\n"
               "List-Unsubscribe-Post: List-Unsubscribe=One-Click")  # fmt: skip
    with pytest.raises(FactError):
        await _fact(msg, "has_one_click_unsubscribe", services)


@pytest.mark.parametrize(
    ("subject", "label"),
    [("ADV: cheap flights", True), ("[Ad] new range", True), ("(Werbung) Angebot", True),
     ("Advertisement: x", True), ("Adding the numbers", False), ("Re: ad copy", False),
     ("[광고] 할인", True)],
)  # fmt: skip
async def test_subject_ad_label(subject: str, label: bool, services: Services) -> None:
    msg = _msg(BASE.replace("Subject: hi", f"Subject: {subject}"))
    assert await _fact(msg, "subject_ad_label", services) is label


@pytest.mark.parametrize(
    ("from_field", "spoof"),
    [('"PayPal <service@paypal.com>" <x@evil.example.net>', True),
     ('"amazon.com" <deals@promo.example.net>', True),
     ('"service@paypal.com" <service@mail.paypal.com>', False),  # same organisation
     ('"Mr.Smith v1.2" <smith@example.net>', False),  # not registrable domains
     ("Alice <alice@example.net>", False)],
)  # fmt: skip
async def test_from_display_spoof(from_field: str, spoof: bool, services: Services) -> None:
    msg = _msg(BASE.replace("From: a@example.com", f"From: {from_field}"))
    assert await _fact(msg, "from_display_spoof", services) is spoof


async def test_duplicate_single_instance_fields_are_listed(services: Services) -> None:
    msg = _msg(BASE + "\nMessage-ID: <y@example.com>\nTo: c@example.org\nReceived: a\nReceived: b")
    errors = await _fact(msg, "rfc5322_errors", services)
    assert errors == ["duplicate_to", "duplicate_message-id"]


async def test_fake_reply_needs_missing_thread_headers(services: Services) -> None:
    reply = BASE.replace("Subject: hi", "Subject: Fwd: invoice")
    assert await _fact(_msg(reply), "fake_reply_subject", services) is True
    threaded = reply + "\nReferences: <x@example.org>"
    assert await _fact(_msg(threaded), "fake_reply_subject", services) is False


ONE_CLICK_FIELDS = (
    ("List-Unsubscribe", "<https://news.example.com/u?id=7>"),
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
)


@pytest.mark.parametrize(
    ("signed", "one_click"),
    [((b"from", b"to", b"subject", b"list-unsubscribe", b"list-unsubscribe-post"), True),
     ((b"from", b"to", b"subject", b"list-unsubscribe"), False)],
)  # fmt: skip
async def test_one_click_with_real_dkim_verification(
    signed: tuple[bytes, ...], one_click: bool, services: Services
) -> None:
    """The whole chain: dkimpy signs, LocalDns serves the key, the auth family verifies."""
    from relay.facts import default_registry
    from tests.support.authenv import authenticator, incoming
    from tests.support.dkimkeys import make_message, rsa_key, sign
    from tests.support.dnsserver import LocalDns

    key = rsa_key("news.example.com", "s1")
    raw = sign(
        make_message(from_addr="News <news@news.example.com>", extra=ONE_CLICK_FIELDS),
        key,
        include_headers=signed,
    )
    with LocalDns({key.name: [("TXT", key.txt)]}) as dns:
        async with authenticator(dns, timeout=2.0) as auth:
            msg = incoming(raw, mail_from="news@news.example.com")
            facts = Facts(
                default_registry(), msg, dataclasses.replace(services, authenticator=auth)
            )
            assert (await facts.get("dkim"))["result"] == "pass"
            assert await facts.get("has_one_click_unsubscribe") is one_click
