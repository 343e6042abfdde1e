"""Cross-message facts over a real SQLite state store: bulk fingerprint, volume, correspondents.

Facts only read; the pipeline's recorder writes after the action. The tests that watch
counts grow record each message after reading its fact, as ``Pipeline.process`` does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import sqlite3
import string
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from publicsuffixlist import PublicSuffixList

from relay.classifier import minhash
from relay.classifier.minhash import fingerprint, normalise
from relay.contracts import Outcome
from relay.facts import bulk, text
from relay.facts.base import FactRegistry, Facts
from relay.facts.services import Services
from relay.message import Message, Peer
from relay.pipeline.recorder import Recorder
from relay.secretkey import SecretKey
from relay.state import SqliteState, StateStore
from relay.verdict import Action, Tier, Verdict
from tests.support.golden_facts import Case, check_case, covered, family_cases

REGISTRY = FactRegistry((*bulk.FACTS, *text.FACTS))
DAY = 24 * 3600.0
T0 = 1_773_133_200.0


@pytest.fixture(scope="module")
def psl() -> PublicSuffixList:
    return PublicSuffixList()


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await SqliteState(tmp_path / "state.sqlite3", key=SecretKey.generate()).open()
    yield store
    await store.close()


@pytest.fixture
def services(state: StateStore, psl: PublicSuffixList) -> Services:
    return Services(state=state, psl=psl)


@pytest.fixture
def recorder(state: StateStore, psl: PublicSuffixList) -> Recorder:
    return Recorder(state, psl, [ipaddress.ip_network("10.0.0.0/8")])


@pytest.mark.parametrize("case", family_cases(bulk.FACTS), ids=lambda c: c.file)
async def test_golden(case: Case, services: Services) -> None:
    await check_case(case, bulk.FACTS, REGISTRY, services)


def test_every_bulk_fact_has_a_golden_case() -> None:
    assert covered(bulk.FACTS) == set()


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(2000)]
    return " ".join(rng.choice(vocab) for _ in range(n))


BODY = _words(1, 200)


def test_normalise_flattens_case_digits_and_query_strings() -> None:
    assert normalise("Win $1,000 NOW at https://x.example/a?id=77&u=bob") == [
        "win", "0", "0", "now", "at", "https", "x", "example", "a",
    ]  # fmt: skip


def test_normalise_equals_its_regexes_on_random_mixtures() -> None:
    """normalise skips the URL regex without "://" and splits ASCII text instead of
    running the token regex: the tokens must be the regexes' own."""
    rng = random.Random(41)
    pieces = [
        "http://A.b/c?d=1", "FTP://x#y", "://", "?", "#", " ", "\n", "\t", "123", "\u0661\u0662",
        "\u00e9t\u00e9", "ab", "_x", "-", "$", "\u0130", "\u00b2", "a1b2", "www.x.com", "\u00a0",
    ]  # fmt: skip
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        flat = minhash._DIGITS.sub("0", minhash._URL_QUERY.sub(r"\1", text.lower()))
        assert normalise(text) == minhash._TOKEN.findall(flat), repr(text)


def test_fingerprint_keys_never_change() -> None:
    """Band keys are state keys shared by every worker and instance: these are the keys
    the first implementation gave (a faster one must give them too)."""
    assert fingerprint(BODY) == (
        "0:ae9aa45d32ef3c864bcc85c5", "1:e4973735816548eef5988efb",
        "2:9531cf0c1b2957556d5877d5", "3:323b3ccc31205fe65b95c1dc",
    )  # fmt: skip
    mixed = "Caf\u00e9 \u00c9t\u00e9 \u0661\u0662 https://X.example/p?q=1 " + BODY[:300]
    assert fingerprint(mixed) == (
        "0:cf4c40b5b9484265b6e3df57", "1:ce65893907cac1f3b1a62b60",
        "2:752bf29aa184700b175fe468", "3:c48c61b4c9315759d815ffd0",
    )  # fmt: skip
    assert fingerprint("")[0] == "0:354a29fadd083b9c02f10fa4"


def test_fingerprint_matches_near_duplicates_only() -> None:
    keys = set(fingerprint(BODY))
    assert len(keys) == minhash.BANDS
    personalised = "Dear Mary,\n" + BODY.upper() + "\nOrder 12345: https://t.example/?u=mary"
    assert keys & set(fingerprint(personalised))
    one_word = BODY.replace(BODY.split()[100], "changed", 1)
    assert keys & set(fingerprint(one_word))
    assert not keys & set(fingerprint(_words(2, 200)))


def _message(
    body: str,
    rcpt: list[str],
    when: float,
    sender: str = "news@mail.shop.example.co.uk",
    msgid: str = "",
    ip: str = "192.0.2.10",
) -> Message:
    head = f"From: {sender}\nTo: {', '.join(rcpt)}\nSubject: s\n"
    if msgid:
        head += f"Message-ID: <{msgid}>\n"
    return Message.from_file_bytes(
        (head + "\n" + body).encode(),
        received_at=when,
        mail_from=sender,
        rcpt_to=rcpt,
        peer=Peer(ip=ip),
    )


async def _get(
    msg: Message,
    name: str,
    services: Services,
    recorder: Recorder | None = None,
    outcome: Outcome = Outcome.DELIVERED,
) -> object:
    """Read one fact; then, given a recorder, record the message as the pipeline does."""
    facts = Facts(REGISTRY, msg, services)
    value = await facts.get(name)
    if recorder is not None:
        await recorder.record(msg, facts, Verdict(Action.ACCEPT), outcome)
    return value


def _rows(path: Path) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [
            *db.execute("SELECT * FROM window_members ORDER BY key, member"),
            *db.execute("SELECT * FROM flags ORDER BY key"),
        ]


async def test_bulk_count_counts_distinct_recipients_of_similar_bodies(
    services: Services, recorder: Recorder
) -> None:
    counts = []
    for i, rcpt in enumerate(["a@x.example", "b@x.example", "c@y.example", "a@x.example"]):
        personalised = f"Hello {rcpt}, " + BODY + f" ref {i}"
        msg = _message(personalised, [rcpt], T0 + i)
        counts.append(await _get(msg, "bulk_count", services, recorder))
    assert counts == [1, 2, 3, 3]  # a@x.example got it twice: one recipient
    many = _message(BODY, [f"r{i}@z.example" for i in range(10)], T0 + 10)
    assert await _get(many, "bulk_count", services, recorder) == 13
    other = _message(_words(3, 200), ["a@x.example"], T0 + 11)
    assert await _get(other, "bulk_count", services, recorder) == 1
    later = _message(BODY, ["late@x.example"], T0 + DAY + 20)  # the window has passed
    assert await _get(later, "bulk_count", services, recorder) == 1


async def test_reading_counts_records_nothing(
    services: Services, recorder: Recorder, tmp_path: Path
) -> None:
    """A fact counts the message as if recorded, but only the recorder records it: reading
    the same message twice gives the same count, and the store is unchanged."""
    first = _message(BODY, ["a@x.example"], T0, msgid="first@shop")
    await _get(first, "bulk_count", services, recorder)
    before = _rows(tmp_path / "state.sqlite3")
    msg = _message(BODY, ["b@x.example", "c@x.example"], T0 + 1, msgid="m@shop")
    for _ in range(2):
        facts = Facts(REGISTRY, msg, services)
        assert await facts.get("bulk_count") == 3
        assert await facts.get("sender_volume_24h") == 3
        assert await facts.get("bulk_sender") is False
        assert await facts.get("known_correspondent") is False
    assert _rows(tmp_path / "state.sqlite3") == before
    await recorder.record(msg, facts, Verdict(Action.ACCEPT), Outcome.DELIVERED)
    assert _rows(tmp_path / "state.sqlite3") != before
    assert await _get(msg, "bulk_count", services) == 3  # recorded: still counts once


async def test_bulk_count_is_a_fingerprint_tier_fact(services: Services) -> None:
    facts = Facts(REGISTRY, _message(BODY, ["a@x.example"], T0), services)
    await facts.get("bulk_count")
    assert facts.highest_tier() is Tier.FINGERPRINT


async def test_state_holds_no_text_or_addresses(
    services: Services, recorder: Recorder, tmp_path: Path
) -> None:
    msg = _message(BODY, ["secret.person@x.example"], T0, ip="10.0.0.1")
    await _get(msg, "bulk_count", services, recorder)
    assert _rows(tmp_path / "state.sqlite3")  # bulk, volume, connection and pairs recorded
    dump = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite3*"))
    assert b"secret.person" not in dump
    assert BODY.split()[0].encode() not in dump


async def test_sender_volume_per_organisational_domain(
    services: Services, recorder: Recorder
) -> None:
    a = _message("x", ["r1@x.example", "r2@x.example"], T0, msgid="m1@shop")
    b = _message("y", ["r3@x.example"], T0 + 1, sender="info@shop.example.co.uk", msgid="m2@s")
    assert await _get(a, "sender_volume_24h", services, recorder) == 2
    assert await _get(b, "sender_volume_24h", services, recorder) == 3  # same organisation
    assert await _get(a, "sender_volume_24h", services, recorder) == 3  # a retry counts once
    other = _message("z", ["r1@x.example"], T0 + 2, sender="me@elsewhere.example", msgid="m3")
    assert await _get(other, "sender_volume_24h", services, recorder) == 1


async def test_bulk_sender_status_is_sticky(
    services: Services, state: StateStore, recorder: Recorder
) -> None:
    members = [f"earlier-{i}" for i in range(bulk.BULK_SENDER_VOLUME - 1)]
    await state.incr_window_many("volume:example.co.uk", members, DAY, T0 - 60)
    small = _message("x", ["r@x.example"], T0, sender="a@example.co.uk", msgid="b1")
    # The 5,000th counts itself; the recorder sets the sticky flag when it records it.
    assert await _get(small, "bulk_sender", services, recorder) is True
    next_week = _message("x", ["r@x.example"], T0 + 7 * DAY, sender="a@example.co.uk", msgid="b2")
    facts = Facts(REGISTRY, next_week, services)
    assert await facts.get("sender_volume_24h") == 1
    assert await facts.get("bulk_sender") is True
    newcomer = _message("x", ["r@x.example"], T0, sender="a@new.example", msgid="b3")
    assert await _get(newcomer, "bulk_sender", services) is False


async def test_known_correspondent_learned_from_outbound_mail(
    services: Services, recorder: Recorder
) -> None:
    outbound = _message("hi", ["bob@ext.example"], T0, sender="alice@ours.example", ip="10.1.2.3")
    facts = Facts(REGISTRY, outbound, services)
    await recorder.record(outbound, facts, Verdict(Action.ACCEPT), Outcome.DELIVERED)
    reply = _message("re", ["alice@ours.example"], T0 + 60, sender="Bob@Ext.example")
    assert await _get(reply, "known_correspondent", services) is True
    stranger = _message("hi", ["alice@ours.example"], T0 + 60, sender="eve@ext.example")
    assert await _get(stranger, "known_correspondent", services) is False
    # Both recipients must have written to the sender.
    both = _message("re", ["alice@ours.example", "carol@ours.example"], T0 + 60,
                    sender="bob@ext.example")  # fmt: skip
    assert await _get(both, "known_correspondent", services) is False


async def test_recorder_ignores_inbound_and_undelivered_mail(
    services: Services, recorder: Recorder, tmp_path: Path
) -> None:
    inbound = _message("hi", ["bob@ext.example"], T0, sender="alice@ours.example")
    await _get(inbound, "known_correspondent", services, recorder, Outcome.DELIVERED)
    for n, outcome in enumerate(
        (Outcome.REJECTED, Outcome.TEMPFAILED, Outcome.QUARANTINED, Outcome.FAILED)
    ):
        ours = _message("hi", ["bob@ext.example"], T0 + n, sender="alice@ours.example",
                        ip="10.0.0.9")  # fmt: skip
        await _get(ours, "known_correspondent", services, recorder, outcome)
    rows = _rows(tmp_path / "state.sqlite3")
    assert rows and not [row for row in rows if str(row[0]).startswith("corr:")]
    reply = _message("re", ["alice@ours.example"], T0 + 60, sender="bob@ext.example")
    assert await _get(reply, "known_correspondent", services) is False


async def test_missing_state_service_is_a_missing_fact(psl: PublicSuffixList) -> None:
    from relay.errors import FactError

    with pytest.raises(FactError, match="service state is not configured"):
        message = _message(BODY, ["a@x.example"], T0)
        await Facts(REGISTRY, message, Services(psl=psl)).get("bulk_count")
