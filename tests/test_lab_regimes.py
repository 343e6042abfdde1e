"""The shipped regimes (config/regimes/): valid, documented, and golden messages per regime.

Golden cases run the real facts (offline authentication from the trusted mx.lab.example,
a fresh state store, lab input lists written per case) and the real policy engine, and
assert which rules fire, the action, and the tier at which the regime decided.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.config import settings_from_mapping
from relay.facts import Facts, default_registry
from relay.lab.corpus import Source, load_corpus
from relay.lab.env import LabEnv, lab_services
from relay.message import Envelope
from relay.policy import check_files, load_policy
from relay.verdict import Verdict

REPO = Path(__file__).resolve().parents[1]
REGIMES = REPO / "config" / "regimes"
GOLDEN = Path(__file__).parent / "fixtures" / "lab" / "golden"
SHIPPED = (
    "itr_article7",
    "itr_draft_2_13",
    "can_spam",
    "eu_opt_in",
    "bulk_sender_2024",
    "classifier_baseline",
)
BULK = tuple(f"user{i}@example.net" for i in range(60))


def _shipped() -> list[Path]:
    return [REGIMES / f"{name}.toml" for name in SHIPPED if (REGIMES / f"{name}.toml").exists()]


async def decide(
    regime: str,
    eml: str,
    tmp: Path,
    *,
    rcpts: Sequence[str] | None = None,
    lists: Mapping[str, str] | None = None,
) -> Verdict:
    """One golden message through one shipped regime, with real facts and the real engine."""
    inputs = tmp / "inputs"
    inputs.mkdir(exist_ok=True)
    for name in ("consent.tsv", "customers.tsv", "optouts.tsv"):
        (inputs / name).write_text((lists or {}).get(name, ""))
    env = LabEnv(
        settings_from_mapping({"model": {"enabled": False}}),
        trusted_authserv_ids=("mx.lab.example",),
        inputs=inputs,
    )
    registry = env.registry()
    policy = load_policy(REGIMES / f"{regime}.toml", registry)
    [stored] = load_corpus([Source(eml, "spam", GOLDEN / eml)], "golden").messages
    message = stored.to_message()
    if rcpts is not None:
        message = dataclasses.replace(
            message, envelope=Envelope(message.envelope.mail_from, tuple(rcpts))
        )
    with tempfile.TemporaryDirectory(dir=tmp) as state:
        async with lab_services(env, Path(state), stateful=True) as services:
            return await policy.decide(message, Facts(registry, message, services))


def fired(verdict: Verdict) -> set[str]:
    return {h.rule for h in verdict.hits}


def tier(verdict: Verdict) -> str:
    return "none" if verdict.highest_tier is None else verdict.highest_tier.label


def _consent(rcpts: Sequence[str], sender: str) -> str:
    return "".join(f"{r}\t{sender}\n" for r in rcpts)


def test_every_regime_is_shipped_and_passes_policy_check(
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = _shipped()
    assert [p.stem for p in paths] == list(SHIPPED)
    assert check_files(paths, default_registry()) == []
    assert main(["policy", "check", *map(str, paths)]) == 0
    out = capsys.readouterr()
    assert out.err == "" and all(p.stem in out.out for p in paths)


@pytest.mark.parametrize("name", SHIPPED)
def test_regime_header_names_source_encoding_and_limits(name: str) -> None:
    header = []
    for line in (REGIMES / f"{name}.toml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for part in ("Source:", "What it encodes", "What it cannot check"):
        assert part in text, f"{name}.toml header lacks {part!r}"


def test_lab_inputs_shipped_empty_and_readable() -> None:
    from relay.facts.oraclelists import OracleLists

    lists = OracleLists.load(REGIMES / "inputs")
    assert lists.consent == frozenset() and lists.customers == frozenset()
    assert lists.optouts == {}


# --- ITRs article 7: unsolicited + bulk, never content ---------------------------------


async def test_article7_rejects_unsolicited_bulk_at_t2(tmp_path: Path) -> None:
    v = await decide("itr_article7", "ad.eml", tmp_path, rcpts=BULK)
    assert v.action.value == "reject" and v.score == 13.0
    assert fired(v) == {"bulk_unsolicited", "many_recipients"}
    assert tier(v) == "T2"  # the body was fingerprinted, never read
    assert not any(f.tier.label == "T3" for f in v.facts)


async def test_article7_lets_consented_bulk_through_unfingerprinted(tmp_path: Path) -> None:
    lists = {"consent.tsv": _consent(BULK, "shop.example")}
    v = await decide("itr_article7", "ad.eml", tmp_path, rcpts=BULK, lists=lists)
    assert v.action.value == "accept" and fired(v) == {"consented", "many_recipients"}
    # Consent settles the outcome at T1: no bulk rule could reach a threshold any more.
    assert tier(v) == "T1" and "bulk_count" not in {f.name for f in v.facts}


async def test_article7_personal_mail_passes(tmp_path: Path) -> None:
    v = await decide("itr_article7", "personal.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == ("accept", set(), "T2")


# --- the dropped draft 2.13: the same, narrowed by content, at T3 -----------------------


async def test_draft_rejects_bulk_advertising_after_reading_it(tmp_path: Path) -> None:
    v = await decide("itr_draft_2_13", "ad.eml", tmp_path, rcpts=BULK)
    assert v.action.value == "reject" and v.score == 13.0
    assert fired(v) == {"bulk_unsolicited_advertising", "many_recipients"}
    assert tier(v) == "T3"


async def test_draft_spares_bulk_that_is_not_advertising(tmp_path: Path) -> None:
    v = await decide("itr_draft_2_13", "announcement.eml", tmp_path, rcpts=BULK)
    assert (v.action.value, fired(v), tier(v)) == ("tag", {"many_recipients"}, "T3")


async def test_draft_reads_even_personal_mail(tmp_path: Path) -> None:
    v = await decide("itr_draft_2_13", "personal.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == ("accept", set(), "T3")
    assert "commercial_probability" in {f.name for f in v.facts}


# --- CAN-SPAM: false headers for all mail; obligations of commercial mail ---------------


async def test_can_spam_refuses_false_headers_at_t1(tmp_path: Path) -> None:
    v = await decide("can_spam", "spoof.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == ("reject", {"false_header_dmarc"}, "T1")


async def test_can_spam_scores_an_ad_without_its_obligations(tmp_path: Path) -> None:
    v = await decide("can_spam", "ad.eml", tmp_path)
    assert v.action.value == "reject" and v.forced_by is None and v.score == 9.0
    assert fired(v) == {
        "commercial_no_postal_address",
        "commercial_no_opt_out",
        "commercial_no_ad_label",
    }
    assert tier(v) == "T3"


async def test_can_spam_passes_compliant_unsolicited_advertising(tmp_path: Path) -> None:
    v = await decide("can_spam", "ad_compliant.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == ("accept", set(), "T3")


async def test_can_spam_refuses_mail_long_after_an_opt_out(tmp_path: Path) -> None:
    lists = {"optouts.tsv": "bob@example.net\tshop.example\t2002-08-01\n"}  # ad: 2 Sep 2002
    v = await decide("can_spam", "ad.eml", tmp_path, lists=lists)
    assert (v.action.value, fired(v), tier(v)) == ("reject", {"opt_out_ignored"}, "T1")


# --- EU opt-in: marketing needs consent or the soft opt-in --------------------------------


async def test_eu_refuses_marketing_without_known_consent(tmp_path: Path) -> None:
    v = await decide("eu_opt_in", "ad.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == ("reject", {"marketing"}, "T3")


async def test_eu_consent_turns_refusal_into_a_label_request(tmp_path: Path) -> None:
    lists = {"consent.tsv": "bob@example.net\tshop.example\n"}
    v = await decide("eu_opt_in", "ad.eml", tmp_path, lists=lists)
    assert (v.action.value, fired(v), tier(v)) == (
        "tag",
        {"consented", "marketing", "marketing_not_identifiable"},
        "T3",
    )


async def test_eu_soft_opt_in_needs_an_objection_offer(tmp_path: Path) -> None:
    lists = {"customers.tsv": "bob@example.net\tshop.example\n"}
    compliant = await decide("eu_opt_in", "ad_compliant.eml", tmp_path, lists=lists)
    assert (compliant.action.value, fired(compliant)) == ("accept", {"soft_opt_in", "marketing"})
    bare = await decide("eu_opt_in", "ad.eml", tmp_path, lists=lists)  # no way to object
    assert (bare.action.value, fired(bare)) == ("reject", {"marketing"})


async def test_eu_refuses_a_disguised_sender_before_reading(tmp_path: Path) -> None:
    v = await decide("eu_opt_in", "display_spoof.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == (
        "reject",
        {"disguised_sender_display_name"},
        "T1",
    )


# --- 2024 bulk-sender rules: authentication, content-blind ------------------------------


async def test_bulk_sender_rules_refuse_unauthenticated_mail(tmp_path: Path) -> None:
    v = await decide("bulk_sender_2024", "personal.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == ("reject", {"unauthenticated", "no_tls"}, "T1")


async def test_bulk_sender_rules_accept_authenticated_mail(tmp_path: Path) -> None:
    v = await decide("bulk_sender_2024", "list_authenticated.eml", tmp_path)
    assert (v.action.value, fired(v), tier(v)) == ("accept", set(), "T1")


async def test_bulk_senders_need_one_click_unsubscribe(tmp_path: Path) -> None:
    rcpts = tuple(f"u{i}@example.net" for i in range(5000))
    v = await decide("bulk_sender_2024", "list_authenticated.eml", tmp_path, rcpts=rcpts)
    assert (v.action.value, fired(v), tier(v)) == ("reject", {"bulk_needs_one_click"}, "T1")


# --- classifier baseline -----------------------------------------------------------------


def test_classifier_baseline_reads_only_the_classifier() -> None:
    policy = load_policy(REGIMES / "classifier_baseline.toml", default_registry())
    assert policy.fact_names == frozenset({"spam_probability"})
    assert policy.max_tier is not None and policy.max_tier.label == "T3"


def test_golden_dates_are_what_the_opt_out_case_assumes() -> None:
    [ad] = load_corpus([Source("ad.eml", "spam", GOLDEN / "ad.eml")], "golden").messages
    assert dt.datetime.fromtimestamp(ad.time, dt.UTC).date() == dt.date(2002, 9, 2)
