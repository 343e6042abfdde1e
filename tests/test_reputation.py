"""Reputation learned from feedback: identities from our own Authentication-Results, the
counters in the feedback store (real SQLite, a real redis-server), the reputation facts and
the default policy, with real DKIM signatures checked against a local DNS server."""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from publicsuffixlist import PublicSuffixList

from relay.auth.checker import Authenticator
from relay.config import FeedbackSettings, StateSettings
from relay.contracts import MessageReport, NullObserver
from relay.errors import FeedbackRefused, StateError
from relay.facts import default_registry
from relay.facts.base import Facts, Services
from relay.feedback.learn import Learner
from relay.feedback.record import EntryMaker
from relay.feedback.reputation import (
    Identity,
    authenticated,
    day_of,
    identities,
    our_results,
)
from relay.feedback.store import FeedbackStore, SqliteFeedback, open_feedback
from relay.message import Message
from relay.pipeline.authresults import format_value
from relay.policy import load_policy
from relay.secretkey import SecretKey
from relay.verdict import Verdict
from tests.support.authenv import authenticator, incoming
from tests.support.dkimkeys import make_message, rsa_key, sign
from tests.support.dnsserver import LocalDns
from tests.support.feedback import NOW, entry
from tests.support.relay import make_settings, running_relay, send
from tests.test_state import redis_url  # noqa: F401 - the real redis-server fixture

KEY = SecretKey(bytes(range(32)))
DAY = 86400.0
OURS = "mx.relay.test"
REPO = Path(__file__).resolve().parents[1]
PSL = PublicSuffixList()


def sender(domain: str) -> Identity:
    return Identity("sender", domain)


async def open_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, **limits: Any
) -> FeedbackStore:
    settings = replace(FeedbackSettings(per_reporter_daily=10**6), **limits)
    if kind == "sqlite":
        state = StateSettings(path=tmp_path / "state.sqlite3")
    else:
        url: str = request.getfixturevalue("redis_url")
        state = StateSettings(backend="redis", url=url.rsplit("/", 1)[0] + "/14")
    store = await open_feedback(state, settings, KEY)
    if kind == "redis":
        await store._redis.flushdb()  # type: ignore[attr-defined]
    return store


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FeedbackStore]:
    one = await open_store(request.param, tmp_path, request)
    yield one
    await one.close()


# -- which identities a report credits ---------------------------------------------------

RESULTS: dict[str, Any] = {
    "dkim": {
        "signatures": [
            {"result": "pass", "domain": "news.example", "selector": "k1", "key_bits": 2048},
            {"result": "fail", "domain": "other.example", "selector": "k1"},
        ]
    },
    "spf": {"result": "none", "domain": "news.example"},
    "spf_helo": {"result": "none"},
    "dmarc": {"result": "pass", "from_domain": "News.Example", "record_domain": "news.example"},
    "arc": {"result": "none"},
}


def stamped(raw: bytes, authserv_id: str = OURS, results: dict[str, Any] = RESULTS) -> bytes:
    return f"Authentication-Results: {format_value(authserv_id, results)}\r\n".encode() + raw


def test_our_field_credits_passing_dkim_and_dmarc_from() -> None:
    raw = stamped(make_message(from_addr="news@news.example"))
    value = our_results(raw, OURS)
    assert value is not None
    assert authenticated(value) == ("news.example",)  # d= passed; From is the same domain
    other = dict(RESULTS, dmarc={"result": "pass", "from_domain": "brand.example"})
    assert authenticated(format_value(OURS, other)) == ("brand.example", "news.example")
    failing = dict(RESULTS, dkim={"signatures": []}, dmarc={"result": "fail"})
    assert authenticated(format_value(OURS, failing)) == ()


def test_only_one_field_of_ours_is_trusted() -> None:
    raw = make_message(from_addr="news@news.example")
    assert our_results(stamped(raw, "mx.elsewhere.test"), OURS) is None  # someone else's
    assert our_results(stamped(raw), "") is None  # no authserv-id: trust nothing
    forged = stamped(stamped(raw))  # a second field under our id: neither is trusted
    assert our_results(forged, OURS) is None
    below = stamped(stamped(raw), "mx.downstream.test")  # a downstream field above ours
    assert our_results(below, OURS) is not None
    assert our_results(stamped(raw, OURS.upper() + "."), OURS) is not None


def test_identities_of_a_report() -> None:
    raw = make_message(from_addr="news@news.example")
    links = ("shop.example", "Shop.Example.", "bad domain")
    assert identities(raw, links, OURS) == (Identity("link", "shop.example"),)
    assert identities(stamped(raw), links, OURS) == (
        sender("news.example"),
        Identity("link", "shop.example"),
    )


# -- the counters ---------------------------------------------------------------------------


async def test_counters_equal_the_entries_after_random_writes(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Learn, relabel, forget, age and eviction in random order: the counters are always
    the count of the live entries' identities by label and day."""
    for kind in ("sqlite", "redis"):
        store = await open_store(
            kind,
            tmp_path / kind,
            request,
            max_entries=8,
            max_age_days=2,
            reputation_per_reporter=10**6,
        )
        rng = random.Random(16)
        given: dict[str, tuple[Identity, ...]] = {}
        now = NOW
        try:
            for _ in range(300):
                now += rng.choice((1.0, 600.0, 0.2 * DAY))
                n = rng.randrange(14)
                if rng.random() < 0.2:
                    await store.forget(entry(n).digest, "r1", now=now)
                    continue
                pool = [sender(f"s{i}.example") for i in range(4)]
                pool += [Identity("link", f"l{i}.example") for i in range(4)]
                credited = tuple(rng.sample(pool, rng.randrange(4)))
                one = entry(n, rng.choice(("spam", "ham")), f"r{rng.randrange(3)}", now)
                await store.record(one, now=now, identities=credited)
                given[one.digest] = credited
            expected: Counter[tuple[str, str, str, int]] = Counter()
            live = await store.entries()
            assert live, "the sequence must leave some entries"
            for e in live:
                for i in given[e.digest]:
                    expected[(i.kind, i.domain, e.label, day_of(e.at))] += 1
            assert await store.counters() == dict(expected)
        finally:
            await store.close()


async def test_relabel_moves_and_forget_removes(store: FeedbackStore) -> None:
    who = (sender("news.example"),)
    await store.record(entry(1, "spam"), now=NOW, identities=who)
    await store.record(entry(2, "spam", "r2"), now=NOW, identities=who)
    got = (await store.reputation(who, now=NOW))[who[0]]
    assert (got.spam, got.ham) == (2.0, 0.0)
    await store.record(entry(1, "ham"), now=NOW, identities=who)  # relabel
    got = (await store.reputation(who, now=NOW))[who[0]]
    assert (got.spam, got.ham) == (1.0, 1.0)
    await store.forget(entry(2).digest, "r2", now=NOW)
    got = (await store.reputation(who, now=NOW))[who[0]]
    assert (got.spam, got.ham) == (0.0, 1.0)
    assert await store.standings("sender", ["news.example", "unknown.example"], now=NOW) == [
        (0.0, 1.0),
        (0.0, 0.0),
    ]


async def test_old_reports_fade(store: FeedbackStore) -> None:
    who = sender("news.example")
    await store.record(entry(1, "ham"), now=NOW, identities=(who,))
    half_life = store.settings.reputation_half_life_days
    noon = (day_of(NOW) + 0.5) * DAY  # weights are taken from the middle of the report's day
    later = (await store.reputation([who], now=noon + half_life * DAY))[who]
    assert later.ham == pytest.approx(0.5)
    assert (await store.reputation([who], now=noon + 3 * half_life * DAY))[who].ham == (
        pytest.approx(0.125)
    )


async def test_a_refused_report_changes_no_counter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    for kind in ("sqlite", "redis"):
        store = await open_store(kind, tmp_path / kind, request, per_reporter_daily=1)
        try:
            who = (sender("news.example"),)
            await store.record(entry(1, "ham"), now=NOW, identities=who)
            before = await store.counters()
            with pytest.raises(FeedbackRefused):
                await store.record(entry(2, "spam"), now=NOW + 1, identities=who)
            with pytest.raises(FeedbackRefused):
                await store.forget(entry(1).digest, "r1", now=NOW + 1)
            assert await store.counters() == before
        finally:
            await store.close()


async def test_a_failed_write_leaves_counters_and_entries_as_they_were(tmp_path: Path) -> None:
    who = (sender("news.example"), Identity("link", "shop.example"))

    class DiskFull(SqliteFeedback):
        fail: bool = False

        def _evict(self, db: sqlite3.Connection) -> None:  # after the counters moved
            if self.fail:
                raise sqlite3.OperationalError("database or disk is full")
            super()._evict(db)

    store = DiskFull(tmp_path / "state.sqlite3", key=KEY, settings=FeedbackSettings())
    await store.open()
    try:
        await store.record(entry(1, "ham"), now=NOW, identities=who)
        before = (await store.counters(), await store.entries())
        store.fail = True
        with pytest.raises(StateError, match="disk is full"):
            await store.record(entry(1, "spam"), now=NOW + 1, identities=who)  # a relabel
        with pytest.raises(StateError, match="disk is full"):
            await store.record(entry(2, "spam"), now=NOW + 1, identities=who)
        assert (await store.counters(), await store.entries()) == before
    finally:
        await store.close()


# -- the facts and the default policy ---------------------------------------------------


async def facts_of(store: FeedbackStore, preset: dict[str, Any], raw: bytes | None = None) -> Facts:
    message = Message.from_file_bytes(
        raw or make_message(from_addr="news@news.example"), received_at=NOW
    )
    services = Services(psl=PSL, reputation=store)
    return Facts(default_registry(), message, services, preset)


AUTHENTICATED = {
    "dkim_domains_pass": ["news.example"],
    "dmarc": "pass",
    "from_domain": "news.example",
}
SPOOFED = {"dkim_domains_pass": [], "dmarc": "fail", "from_domain": "news.example"}


async def test_a_spoofed_from_never_inherits(store: FeedbackStore) -> None:
    for n in range(6):
        await store.record(entry(n, "ham", f"r{n}"), now=NOW, identities=(sender("news.example"),))
    good = await facts_of(store, AUTHENTICATED)
    assert await good.get("sender_reputation") == 1.0
    assert await good.get("sender_reputation_reports") == 6
    spoof = await facts_of(store, SPOOFED)
    assert await spoof.get("sender_reputation") == 0.0
    assert await spoof.get("sender_reputation_reports") == 0
    # Without DMARC pass, a From domain that matches no passing signature reads nothing.
    other = {"dkim_domains_pass": ["esp.example"], "dmarc": "none", "from_domain": "news.example"}
    assert await (await facts_of(store, other)).get("sender_reputation_reports") == 0


async def test_link_reputation_is_the_worst_site_with_evidence(store: FeedbackStore) -> None:
    raw = make_message(
        body="see https://www.bad.example/x and https://good.example/ and http://192.0.2.1/\r\n"
    )
    for n in range(5):
        await store.record(
            entry(n, "spam", f"r{n}"), now=NOW, identities=(Identity("link", "bad.example"),)
        )
    await store.record(entry(9, "spam"), now=NOW, identities=(Identity("link", "good.example"),))
    for n in range(10, 30):
        await store.record(
            entry(n, "ham", f"r{n}"), now=NOW, identities=(Identity("link", "good.example"),)
        )
    facts = await facts_of(store, {}, raw)
    assert await facts.get("link_reputation") == 1.0  # bad.example: 5 of 5
    assert await facts.get("link_reputation_reports") == 5
    clean = await facts_of(store, {}, make_message(body="no links here\r\n"))
    assert (await clean.get("link_reputation"), await clean.get("link_reputation_reports")) == (
        0.0,
        0,
    )


async def test_one_reporter_flood_moves_a_sender_by_at_most_the_cap(
    store: FeedbackStore,
) -> None:
    """1,000 false "spam" reports from one account against a sender 20 people found
    wanted: only reputation_per_reporter of them count."""
    who = (sender("news.example"),)
    for n in range(20):
        await store.record(entry(n, "ham", f"fan{n}"), now=NOW, identities=who)
    policy = load_policy(REPO / "config" / "policy.toml", default_registry())
    preset = {
        **AUTHENTICATED,
        "spf": "pass",
        "dkim_result": "pass",
        "dmarc_policy": "reject",
        "spam_probability": 0.5,
    }
    before = await policy.decide(
        Message.from_file_bytes(make_message(), received_at=NOW), await facts_of(store, preset)
    )
    for n in range(1000, 2000):
        await store.record(entry(n, "spam", "troll"), now=NOW + 1, identities=who)
    facts = await facts_of(store, preset)
    cap = store.settings.reputation_per_reporter
    assert await facts.get("sender_reputation_reports") == 20 + cap
    assert await facts.get("sender_reputation") == pytest.approx((20 - cap) / (20 + cap))
    after = await policy.decide(Message.from_file_bytes(make_message(), received_at=NOW), facts)
    fired = {h.rule for h in after.hits}
    assert "sender_reputation_bad" not in fired
    assert after.action == before.action
    assert after.score - before.score <= 3.0  # at most the good-reputation bonus is lost


# -- end to end: real DKIM and DMARC, our stamp, the learn path, the facts --------------

SIGNER = rsa_key("news.example", "k1", 1024)


@pytest.fixture(scope="module")
def dns() -> Iterator[LocalDns]:
    zone: dict[str, list[tuple[Any, ...]]] = {
        SIGNER.name: [("TXT", SIGNER.txt)],
        "_dmarc.news.example.": [("TXT", "v=DMARC1; p=reject")],
    }
    with LocalDns(zone) as server:
        yield server


@pytest.fixture
async def auth(dns: LocalDns) -> AsyncIterator[Authenticator]:
    async with authenticator(dns, timeout=1.0) as a:
        yield a


def newsletter(n: int, *, signed: bool = True) -> bytes:
    raw = make_message(
        from_addr="News <news@news.example>",
        subject=f"Issue {n}",
        body=f"This week's issue {n}: https://news.example/issue/{n}\r\n",
    )
    return sign(raw, SIGNER) if signed else raw


async def delivered_copy(auth: Authenticator, raw: bytes, authserv_id: str = OURS) -> bytes:
    """The copy a user reports: what the relay delivered, with its stamp on top."""
    results = await auth.check(incoming(raw, mail_from="news@news.example", ip="203.0.113.9"))
    return stamped(raw, authserv_id, results.to_dict())


async def test_learned_ham_scores_the_next_authenticated_message_not_a_spoof(
    auth: Authenticator, tmp_path: Path
) -> None:
    store = await SqliteFeedback(
        tmp_path / "state.sqlite3", key=KEY, settings=FeedbackSettings()
    ).open()
    learner = Learner(store, EntryMaker(), authserv_id=OURS)
    policy = load_policy(REPO / "config" / "policy.toml", default_registry())
    services = Services(psl=PSL, authenticator=auth, reputation=store)

    async def decide(raw: bytes) -> tuple[Facts, Any]:
        message = incoming(raw, mail_from="news@news.example", ip="203.0.113.9")
        facts = Facts(default_registry(), message, services, {"spam_probability": 0.5})
        return facts, await policy.decide(message, facts)

    try:
        # Reports without our field (another relay's, or none) credit no sender.
        for n in range(3):
            copy = await delivered_copy(auth, newsletter(n), "mx.elsewhere.test")
            await learner.learn(copy, action="ham", reporter=f"u{n}", source="cli", now=NOW)
        facts, _ = await decide(newsletter(100))
        assert await facts.get("sender_reputation_reports") == 0
        # Our own field: two people found six issues wanted.
        for n in range(10, 16):
            copy = await delivered_copy(auth, newsletter(n))
            await learner.learn(copy, action="ham", reporter=f"u{n % 2}", source="cli", now=NOW)
        facts, verdict = await decide(newsletter(101))
        assert await facts.get("dmarc") == "pass"
        assert await facts.get("sender_reputation") == 1.0
        assert await facts.get("sender_reputation_reports") == 6
        assert "sender_reputation_good" in {h.rule for h in verdict.hits}
        # The same From, unsigned from a stranger: DMARC fails, nothing is inherited.
        facts, verdict = await decide(newsletter(102, signed=False))
        assert await facts.get("dmarc") == "fail"
        assert await facts.get("sender_reputation_reports") == 0
        assert "sender_reputation_good" not in {h.rule for h in verdict.hits}
    finally:
        await store.close()


class Reports(NullObserver):
    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []

    def message_done(self, report: MessageReport) -> None:
        self.verdicts.append(report.verdict)


async def test_over_loopback_learned_ham_scores_the_sender_and_not_a_spoof(
    dns: LocalDns, tmp_path: Path
) -> None:
    """The relay stamps what it delivers; users report the delivered copies as wanted;
    the relay's next message from that sender, signed, carries the reputation rule, and
    a spoof of its From does not."""
    # The shipped policy without its classifier rules (no model in this test).
    shipped = (REPO / "config" / "policy.toml").read_text()
    policy = tmp_path / "policy.toml"
    without_model = shipped.split("# --- T3: the classifier")[0]
    policy.write_text(without_model.replace('required = ["spam_probability"]\n', ""))
    settings = make_settings(
        tmp_path,
        {
            "auth": {"enabled": True},
            "dns": {"nameservers": [dns.address], "timeout": 1},
            "policy": {"path": str(policy)},
            # The reports below are written by another store than the relay's: without
            # this the relay would reuse the counters it read for messages 0-5 for up to
            # reputation_cache_seconds (test_reputation_cache.py covers that reuse).
            "feedback": {"reputation_cache_seconds": 0},
        },
    )
    observer = Reports()
    maildir = tmp_path / "maildir" / "new"
    async with running_relay(settings, observer) as relay:
        for n in range(6):
            await send(relay.port, ["bob@example.org"], newsletter(n), "news@news.example")
        copies = [p.read_bytes() for p in sorted(maildir.iterdir())]
        assert len(copies) == 6 and all(b"relay.test;" in c for c in copies)
        store = await open_feedback(settings.state, settings.feedback, KEY)
        try:
            learner = Learner(store, EntryMaker(), authserv_id=settings.authserv_id)
            for n, copy in enumerate(copies):
                await learner.learn(
                    copy, action="ham", reporter=f"u{n % 2}", source="cli", now=time.time()
                )
        finally:
            await store.close()
        await send(relay.port, ["bob@example.org"], newsletter(50), "news@news.example")
        with pytest.raises(aiosmtplib.SMTPDataError, match="DMARC"):  # p=reject, spoofed
            await send(
                relay.port, ["bob@example.org"], newsletter(51, signed=False), "news@news.example"
            )
    first, signed, spoof = observer.verdicts[0], observer.verdicts[6], observer.verdicts[7]
    assert "sender_reputation_good" not in {h.rule for h in first.hits}
    assert "sender_reputation_good" in {h.rule for h in signed.hits}
    assert signed.score == first.score - 3.0
    read = {f.name: f.value for f in spoof.facts}
    assert read["dmarc"] == "fail" and read["sender_reputation_reports"] == 0
    assert "sender_reputation_good" not in {h.rule for h in spoof.hits}
