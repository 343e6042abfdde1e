"""The regulation lab on a small hand-written corpus: numbers checked against hand counts.

Fixture corpus (tests/fixtures/lab): set "test" holds 3 ham, 3 spam and 3 unreadable
entries (an empty file, a file without header fields, a missing file). Two test regimes:
- auth_only: reject on DMARC fail, +1 (tag) when neither SPF nor DKIM passes (all T1);
- size_only: reject peer 198.51.100.99 (T0, stops early), quarantine above 700 bytes.
Authentication comes offline from Authentication-Results of the trusted mx.lab.example.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import mailbox
import shutil
from pathlib import Path
from typing import Any

import pytest

from relay.cli.main import main
from relay.config import settings_from_mapping
from relay.lab.corpus import load_corpus, sources_from_box, sources_from_labels
from relay.lab.env import LabEnv
from relay.lab.offline_auth import HeaderAuth
from relay.lab.run import LabOptions, run_lab
from relay.lab.stats import wilson
from relay.message import Message

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
CORPUS = FIXTURES / "corpus"
LABELS = FIXTURES / "labels.tsv"
POLICIES = FIXTURES / "policies"
TRUSTED = "mx.lab.example"


def _env() -> LabEnv:
    settings = settings_from_mapping({"model": {"enabled": False}})
    return LabEnv(settings=settings, trusted_authserv_ids=(TRUSTED,))


def _options(tmp_path: Path, *, jobs: int = 1, cache: bool = True) -> LabOptions:
    return LabOptions(
        sources=tuple(sources_from_labels(CORPUS, LABELS, "test")),
        description="fixture",
        policies=(
            POLICIES / "auth_only.toml",
            POLICIES / "size_only.toml",
            POLICIES / "broken.toml",
        ),
        out=tmp_path / "out",
        env=_env(),
        cache_dir=tmp_path / "cache" if cache else None,
        jobs=jobs,
    )


def _regime(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [r for r in report["regimes"] if r["name"] == name]
    assert found, f"regime {name} missing"
    return found[0]


def _kn(p: dict[str, Any]) -> tuple[int, int]:
    return p["k"], p["n"]


def test_wilson_matches_textbook_values() -> None:
    # Hand-computed 95% Wilson intervals (z = 1.96): 1/3, 0/3, 3/3, 0/0.
    assert wilson(1, 3) == pytest.approx((0.0615, 0.7923), abs=1e-4)
    assert wilson(0, 3) == pytest.approx((0.0, 0.5615), abs=1e-4)
    assert wilson(3, 3) == pytest.approx((0.4385, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_fixture_study_matches_hand_counts(tmp_path: Path) -> None:
    report = run_lab(_options(tmp_path))
    corpus = report["corpus"]
    assert (corpus["messages"], corpus["readable"], corpus["ham"], corpus["spam"]) == (9, 6, 3, 3)
    reasons = {u["id"]: u["reason"] for u in corpus["unreadable"]}
    assert reasons["spam/empty.eml"] == "empty file"
    assert reasons["spam/garbage.eml"] == "no header fields"
    assert reasons["spam/missing.eml"].startswith("cannot read")

    auth = _regime(report, "auth_only")
    assert _kn(auth["spam_stopped_hard"]) == (1, 3)  # spoof.eml: DMARC fail -> reject
    assert _kn(auth["spam_stopped_soft"]) == (2, 3)  # no-date, mortgage: tagged
    assert _kn(auth["spam_stopped"]) == (3, 3)
    assert _kn(auth["ham_blocked"]) == (0, 3)
    assert _kn(auth["ham_tagged"]) == (2, 3)  # personal, list-post: unauthenticated
    assert auth["spam_stopped_hard"]["low"] == pytest.approx(0.0615, abs=1e-4)
    assert auth["spam_stopped_hard"]["high"] == pytest.approx(0.7923, abs=1e-4)
    assert auth["ham_blocked"]["high"] == pytest.approx(0.5615, abs=1e-4)
    assert _kn(auth["tiers"]["T1"]) == (6, 6)
    assert _kn(auth["content_read"]) == (0, 6)
    assert auth["highest_tier"] == "T1"
    assert auth["rule_hits"] == {
        "unauthenticated": {"spam": 2, "ham": 2},
        "dmarc_fail": {"spam": 1, "ham": 0},
    }

    size = _regime(report, "size_only")
    assert _kn(size["spam_stopped_hard"]) == (1, 3)  # spoof.eml: bad peer, at T0
    assert _kn(size["spam_stopped_soft"]) == (1, 3)  # no-date.eml: 1204 bytes
    assert _kn(size["ham_blocked"]) == (1, 3)  # list-post.eml: 761 bytes
    assert [(b["id"], b["action"], b["forced_by"]) for b in size["ham_blocks"]] == [
        ("ham/list-post.eml", "quarantine", "big")
    ]
    assert size["ham_block_causes"] == {"big": 1}
    # Early stop: the forced reject at T0 never reads message_size (T1).
    assert _kn(size["tiers"]["T0"]) == (1, 6)
    assert _kn(size["tiers"]["T1"]) == (5, 6)

    assert sorted(d["id"] for d in report["disagreements"]) == [
        "ham/personal.eml",
        "spam/mortgage.eml",
    ]
    assert report["disagreement_pairs"]["auth_only"]["size_only"] == 2

    [error] = report["regime_errors"]
    assert error["file"].endswith("broken.toml")
    assert "broken.toml:8: rule 'typo': unknown fact 'dmark'" in error["problems"][0]
    assert report["dns"]["mode"] == "offline"
    assert report["dns"]["trusted_authserv_ids"] == [TRUSTED]


def test_report_files_render_the_json(tmp_path: Path) -> None:
    run_lab(_options(tmp_path))
    out = tmp_path / "out"
    data = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "| auth_only | 100.0% [43.9, 100.0] | 33.3% [6.1, 79.2] |" in md
    assert "33.3% [6.1, 79.2] (1/3)" in html
    for plot in ("tradeoff.png", "tiers.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for item in data["disagreements"]:
        link, anchor = item["facts"].split("#")
        shard = json.loads((out / link).with_suffix(".json").read_text())
        page = shard[anchor]
        assert page["id"] == item["id"]
        assert f"id='{anchor}'" in (out / link).read_text()
        assert set(page["verdicts"]) == {"auth_only", "size_only"}
        assert {"spf", "dmarc", "dkim_result"} <= page["facts"].keys()
        assert "auth_results" not in page["facts"]  # intermediate objects are not kept
        assert item["facts"] in html
    assert "spam/garbage.eml" in html and "no header fields" in md


def test_warm_cache_computes_nothing_and_agrees(tmp_path: Path) -> None:
    cold = run_lab(_options(tmp_path))
    warm = run_lab(_options(tmp_path))
    assert cold["facts"]["messages_computed"] == 6
    assert warm["facts"]["messages_computed"] == 0
    assert warm["facts"]["messages_from_cache"] == 6
    assert cold["regimes"] == warm["regimes"]
    # A different trust setting is a different environment: nothing stale is reused.
    changed = LabOptions(**{**_fields(_options(tmp_path)), "env": LabEnv(_env().settings)})
    other = run_lab(changed)
    assert other["facts"]["messages_computed"] == 6
    assert _kn(_regime(other, "auth_only")["spam_stopped_hard"]) == (0, 3)


def _fields(options: LabOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in LabOptions.__dataclass_fields__}


def test_process_pool_gives_the_same_report(tmp_path: Path) -> None:
    serial = run_lab(_options(tmp_path / "a", jobs=1, cache=False))
    pooled = run_lab(_options(tmp_path / "b", jobs=2, cache=False))
    assert serial["regimes"] == pooled["regimes"]
    assert pooled["facts"]["jobs"] == 2


def test_corpus_time_order_received_then_date_then_file_order() -> None:
    corpus = load_corpus(sources_from_labels(CORPUS, LABELS, "test"), "fixture")
    order = [m.id for m in corpus.messages]
    # Each message's time is its newest Received date: mortgage.eml claims 31 July in its
    # Date field but arrived on 7 August; no-date.eml arrived on 6 August.
    assert order == [
        "ham/personal.eml",
        "ham/list-post.eml",
        "ham/authenticated.eml",
        "spam/spoof.eml",
        "spam/no-date.eml",
        "spam/mortgage.eml",
    ]
    by_id = {m.id: m for m in corpus.messages}
    mortgage = dt.datetime.fromtimestamp(by_id["spam/mortgage.eml"].time, dt.UTC)
    assert mortgage == dt.datetime(2002, 8, 7, 5, 0, 1, tzinfo=dt.UTC)
    assert by_id["spam/mortgage.eml"].to_message().received_at == by_id["spam/mortgage.eml"].time
    spoof = by_id["spam/spoof.eml"]
    assert spoof.envelope.mail_from == "billing@bank.example"
    assert spoof.envelope.rcpt_to == ("bob@example.net",)
    assert (spoof.peer.ip, spoof.peer.helo, spoof.peer.tls_version) == (
        "198.51.100.99",
        "unknown",
        None,
    )
    assert by_id["ham/authenticated.eml"].peer.tls_version == "TLS"  # "with ESMTPS"
    personal = by_id["ham/personal.eml"].to_message()
    assert not personal.raw.startswith(b"From ")  # the mbox line is not a header
    assert personal.envelope.mail_from == "alice@example.org"


def test_only_trusted_authentication_results_count() -> None:
    forged = Message.from_file_bytes((CORPUS / "ham" / "forged-upstream.eml").read_bytes())
    spoof = Message.from_file_bytes((CORPUS / "spam" / "spoof.eml").read_bytes())
    trusting = HeaderAuth(frozenset({TRUSTED}))
    assert trusting.results(forged).spf.result == "none"  # attacker.example is not trusted
    assert trusting.results(forged).dmarc.result == "none"
    assert HeaderAuth(frozenset({"attacker.example"})).results(forged).spf.result == "pass"
    found = trusting.results(spoof)
    assert (found.spf.result, found.dmarc.result, found.dmarc.policy) == ("fail", "fail", "reject")
    assert found.from_domain == "bank.example"


def test_maildir_and_mbox_sources(tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "ham", create=True)
    for name in ("personal.eml", "list-post.eml"):
        box.add((CORPUS / "ham" / name).read_bytes())
    mbox = mailbox.mbox(tmp_path / "spam.mbox", create=True)
    for name in ("spoof.eml", "mortgage.eml"):
        mbox.add((CORPUS / "spam" / name).read_bytes())
    mbox.close()
    sources = sources_from_box(tmp_path / "ham", "ham") + sources_from_box(
        tmp_path / "spam.mbox", "spam"
    )
    corpus = load_corpus(sources, "boxes")
    assert sorted(m.label for m in corpus.messages) == ["ham", "ham", "spam", "spam"]
    assert not corpus.unreadable
    subjects = {m.to_message().header("Subject") for m in corpus.messages}
    assert "Your account is suspended" in subjects and "lunch on friday?" in subjects


def test_cli_runs_a_study_and_reports_bad_regimes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n')
    args = [
        "lab", "--corpus", str(CORPUS), "--labels", str(LABELS), "--set", "test",
        "--config", str(config), "--cache", str(tmp_path / "cache"), "--jobs", "1",
        "--out", str(tmp_path / "out"), "--policy",
    ]  # fmt: skip
    assert main([*args, str(POLICIES / "auth_only.toml")]) == 0
    assert "6 messages (3 spam, 3 ham, 3 unreadable)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert _kn(_regime(report, "auth_only")["spam_stopped_hard"]) == (1, 3)
    assert main([*args, str(POLICIES / "broken.toml"), str(POLICIES / "size_only.toml")]) == 1
    assert "broken.toml:8: rule 'typo'" in capsys.readouterr().err


def test_ham_and_spam_directories(tmp_path: Path) -> None:
    ham, spam = tmp_path / "ham", tmp_path / "spam"
    shutil.copytree(CORPUS / "ham", ham)
    shutil.copytree(CORPUS / "spam", spam)
    sources = sources_from_box(ham, "ham") + sources_from_box(spam, "spam")
    corpus = load_corpus(sources, "dirs")
    assert len(corpus.messages) == 7
    assert sorted(u.reason for u in corpus.unreadable) == ["empty file", "no header fields"]


def test_corpus_message_without_a_date_keeps_the_time_before_it(tmp_path: Path) -> None:
    box = tmp_path / "spam"
    box.mkdir()
    (box / "1.eml").write_text("From: a@x.example\nSubject: undated first\n\nx\n")
    (box / "2.eml").write_text("From: a@x.example\nDate: Mon, 2 Sep 2002 10:00:00 +0000\n\nx\n")
    (box / "3.eml").write_text("From: a@x.example\nDate: garbage\n\nx\n")
    corpus = load_corpus(sources_from_box(box, "spam"), "undated")
    times = {m.id: m.time for m in corpus.messages}
    dated = dt.datetime(2002, 9, 2, 10, tzinfo=dt.UTC).timestamp()
    # Never the wall clock: the first falls back to the epoch, the third to the second's time.
    assert times == {"spam/1.eml": 0.0, "spam/2.eml": dated, "spam/3.eml": dated}


def test_corpus_order_digest_covers_the_times() -> None:
    """Stateful facts count in windows over the times: cached ones are only valid for the
    same messages at the same times, in the same order."""
    corpus = load_corpus(sources_from_labels(CORPUS, LABELS, "test"), "fixture")
    later = tuple(dataclasses.replace(m, time=m.time + 3600) for m in corpus.messages)
    assert dataclasses.replace(corpus, messages=later).order_digest() != corpus.order_digest()


def _bulk_corpus(root: Path) -> None:
    """Three copies of one newsletter an hour apart, whose file order (a, b, c) is the
    reverse of their time order (c 01:00, b 02:00, a 03:00), and one personal message.
    The copies are labelled ham, so the report names the one that gets blocked."""
    body = "Weekly deals on printers and ink, order today at the shop.\n" * 5
    (root / "spam").mkdir(parents=True)
    (root / "ham").mkdir()
    for name, hour in (("a.eml", 3), ("b.eml", 2), ("c.eml", 1)):
        (root / "ham" / name).write_text(
            f"From: Deals <deals@shop.example>\nTo: u{hour}@example.net\n"
            f"Subject: deals\nDate: Mon, 2 Sep 2002 {hour:02d}:00:00 +0000\n"
            f"Message-ID: <{name}@shop.example>\n\n{body}"
        )
    (root / "spam" / "p.eml").write_text(
        "From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: hi\n"
        "Date: Tue, 10 Sep 2002 10:00:00 +0000\nMessage-ID: <p@example.org>\n\n"
        "See you on Friday at noon.\n"
    )
    (root / "bulk.toml").write_text(
        '[policy]\nname = "bulk3"\nmode = "enforce"\n[policy.thresholds]\ntag = 1.0\n'
        '[[rule]]\nname = "third_copy"\nwhen = "bulk_count >= 3"\naction = "reject"\n'
    )


@pytest.mark.parametrize("jobs", [1, 2])
def test_stateful_facts_count_in_corpus_time(tmp_path: Path, jobs: int) -> None:
    _bulk_corpus(tmp_path)
    options = LabOptions(
        sources=tuple(
            sources_from_box(tmp_path / "spam", "spam") + sources_from_box(tmp_path / "ham", "ham")
        ),
        description="bulk",
        policies=(tmp_path / "bulk.toml",),
        out=tmp_path / "out",
        env=_env(),
        cache_dir=tmp_path / "cache",
        jobs=jobs,
    )
    report = run_lab(options)
    assert "bulk_count" in report["facts"]["stateful"]
    bulk = _regime(report, "bulk3")
    # Counted in corpus time, the third recipient of the body is a.eml (03:00), the
    # first file: counted in file order it would have been c.eml.
    assert [(b["id"], b["forced_by"]) for b in bulk["ham_blocks"]] == [("ham/a.eml", "third_copy")]
    assert _kn(bulk["tiers"]["T2"]) == (4, 4)
    shard, anchor = bulk["ham_blocks"][0]["facts"].split("#")
    page = json.loads((tmp_path / "out" / shard).with_suffix(".json").read_text())[anchor]
    assert page["facts"]["bulk_count"]["value"] == 3
    warm = run_lab(options)
    assert warm["facts"]["messages_computed"] == 0 and warm["regimes"] == report["regimes"]


def test_resolver_mode_runs_the_real_checks(tmp_path: Path) -> None:
    """With [dns] nameservers the lab runs SPF/DMARC for real (here against a loopback DNS
    server) instead of reading Authentication-Results, and the report says so."""
    from tests.support.dnsserver import LocalDns

    zone = {
        "bank.example.": [("TXT", "v=spf1 -all")],
        "_dmarc.bank.example.": [("TXT", "v=DMARC1; p=reject")],
    }
    with LocalDns(zone) as dns:
        settings = settings_from_mapping(
            {"model": {"enabled": False}, "dns": {"nameservers": [dns.address], "timeout": 1}}
        )
        options = LabOptions(
            sources=tuple(sources_from_labels(CORPUS, LABELS, "test")),
            description="fixture",
            policies=(POLICIES / "auth_only.toml",),
            out=tmp_path / "out",
            env=LabEnv(settings=settings),  # no trusted authserv-id: headers are ignored
            cache_dir=tmp_path / "cache",
            jobs=1,
        )
        report = run_lab(options)
    assert report["dns"] == {"mode": "resolver", "nameservers": [dns.address]}
    auth = _regime(report, "auth_only")
    # spoof.eml: SPF -all fails for 198.51.100.99, DMARC p=reject fails -> reject.
    assert _kn(auth["spam_stopped_hard"]) == (1, 3)
    # authenticated.eml's recorded pass is not believed: nothing trusted, SPF none here.
    assert _kn(auth["ham_tagged"]) == (3, 3)
    assert ("bank.example.", "TXT") in dns.queries


def test_message_pages_are_built_one_shard_at_a_time(tmp_path: Path) -> None:
    """write_report reads each fact page once, shard after shard, so a lazy mapping
    (run._Pages) keeps one shard's pages in memory, not one per listed message; the
    files are those a plain dict gives."""
    from collections.abc import Iterator, Mapping

    from relay.lab.run import write_report
    from relay.lab.stats import message_shard

    run_lab(_options(tmp_path))
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    digests = [f"{i:02x}" * 32 for i in (3, 1, 2)] + ["01" + "ab" * 31]
    plain = {
        d: {"id": d[:8], "label": "ham", "digest": d, "facts": {}, "verdicts": {}} for d in digests
    }
    reads: list[str] = []

    class Lazy(Mapping[str, Mapping[str, Any]]):
        def __getitem__(self, digest: str) -> Mapping[str, Any]:
            reads.append(digest)
            return plain[digest]

        def __iter__(self) -> Iterator[str]:
            return iter(plain)

        def __len__(self) -> int:
            return len(plain)

    write_report(data, tmp_path / "lazy", Lazy())
    write_report(data, tmp_path / "dict", plain)
    assert sorted(reads) == sorted(plain)  # each page read once
    shards = [message_shard(d) for d in reads]
    assert shards == sorted(shards)  # shard after shard: earlier ones are done with
    names = sorted(p.name for p in (tmp_path / "dict" / "messages").iterdir())
    assert names == ["01.html", "01.json", "02.html", "02.json", "03.html", "03.json"]
    for name in names:
        lazy = (tmp_path / "lazy" / "messages" / name).read_bytes()
        assert lazy == (tmp_path / "dict" / "messages" / name).read_bytes()
