"""`relay lab diff` on reports written by the real `relay lab` over the fixture corpus
(tests/fixtures/lab, see test_lab.py) and on a shadow log written by a real relay.

Policies: auth_only (reject on DMARC fail, +1 -> tag when neither SPF nor DKIM passes) and
"auth_only v2", the same file with one rule added: ``big`` quarantines messages over 700
bytes. On the fixture's test set that rule changes two verdicts: list-post.eml (ham,
761 bytes, tagged -> quarantined) and no-date.eml (spam, 1204 bytes, tagged ->
quarantined); spoof.eml stays rejected (DMARC fail is the harsher forced action).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from relay.cli.main import main
from relay.lab import diff
from tests.support.shadowlog import live_shadow_log

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
CORPUS = FIXTURES / "corpus"
LABELS = FIXTURES / "labels.tsv"
POLICIES = FIXTURES / "policies"
BIG_RULE = """
[[rule]]
name = "big"
when = "message_size > 700"
action = "quarantine"
reason = "too big"
"""


def _lab(tmp_path: Path, out: str, *policies: Path, corpus: Sequence[str] = ()) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text('[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n')
    source = list(corpus) or ["--corpus", str(CORPUS), "--labels", str(LABELS), "--set", "test"]
    args = [
        "lab", *source, "--config", str(config), "--cache", str(tmp_path / "cache"),
        "--jobs", "1", "--no-progress", "--out", str(tmp_path / out),
        "--policy", *map(str, policies),
    ]  # fmt: skip
    assert main(args) == 0
    return tmp_path / out


def _v2(tmp_path: Path) -> Path:
    """auth_only with one rule added (same policy name: a new version of one policy)."""
    path = tmp_path / "auth_only_v2.toml"
    path.write_text((POLICIES / "auth_only.toml").read_text() + BIG_RULE)
    return path


def _run_diff(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # what relay lab printed before
    code = main(["lab", "diff", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def _json_diff(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = _run_diff([*argv, "--format", "json"], capsys)
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def _effect(data: Mapping[str, Any], figure: str) -> dict[str, Any]:
    [found] = [e for e in data["effects"] if e["figure"] == figure]
    return dict(found)


def test_newcombe_interval_and_exact_mcnemar_match_published_values() -> None:
    # Cavo et al. (2012) paired table [[59, 6], [16, 80]]: Fagerland, Lydersen & Laake,
    # "Statistical Analysis of Contingency Tables" (2017), ch. 8: Newcombe square-and-add
    # -0.0621 (95% CI -0.1186 to -0.0046); exact conditional McNemar P = 0.0525.
    low, high = diff.newcombe_paired(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    assert diff.mcnemar_exact(6, 16) == pytest.approx(0.052479, abs=1e-6)
    assert diff.mcnemar_exact(0, 0) == 1.0
    # No discordant pair: the change is 0 and the interval straddles it.
    low, high = diff.newcombe_paired(3, 0, 0, 3)
    assert low < 0 < high


def test_two_reports_differing_in_one_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _lab(tmp_path, "a", POLICIES / "auth_only.toml")
    b = _lab(tmp_path, "b", _v2(tmp_path))
    data = _json_diff([str(a), str(b), "--limit", "0"], capsys)
    assert data["mode"] == "reports"
    assert (data["before_regime"], data["after_regime"]) == ("auth_only", "auth_only")
    assert data["compared"] == 6 and not data["mismatched"]
    assert data["changed"] == 2
    # Label-contradicting first: legitimate mail newly blocked, then spam made harder.
    got = [
        (c["id"], c["label"], c["kind"], c["before"]["action"], c["after"]["action"])
        for c in data["changes"]
    ]
    assert got == [
        ("ham/list-post.eml", "ham", "legitimate mail newly blocked", "tag", "quarantine"),
        ("spam/no-date.eml", "spam", "spam: harder", "tag", "quarantine"),
    ]
    first = data["changes"][0]
    # The report's rule definitions say why: the rule is new.
    assert first["rules"] == [{"rule": "big", "how": "fired only after; not in the before policy"}]
    assert (first["deciding_before"], first["deciding_after"]) == ("score: unauthenticated", "big")
    assert (first["before"]["score"], first["after"]["score"]) == (1.0, 1.0)

    spam = _effect(data, "spam stopped")
    assert (spam["before"]["k"], spam["after"]["k"], spam["before"]["n"]) == (3, 3, 3)
    assert (spam["gained"], spam["lost"], spam["change"]) == (0, 0, 0.0)
    ham = _effect(data, "legitimate mail blocked")
    assert (ham["before"]["k"], ham["after"]["k"], ham["after"]["n"]) == (0, 1, 3)
    assert (ham["gained"], ham["lost"], ham["mcnemar_p"]) == (1, 0, 1.0)
    # By hand from the Wilson intervals of 1/3 [0.0615, 0.7923] and 0/3 [0, 0.5615]
    # (no concordant blocked pair, so phi = 0): 1/3 - sqrt(0.2718^2 + 0.5615^2), 0.7923.
    assert ham["change"] == pytest.approx(1 / 3, abs=1e-6)
    assert ham["low"] == pytest.approx(-0.2906, abs=1e-4)
    assert ham["high"] == pytest.approx(0.7923, abs=1e-4)

    # Filters: by label, by rule, and a limit; the net effect never changes with them.
    spam_only = _json_diff([str(a), str(b), "--label", "spam"], capsys)
    assert [c["id"] for c in spam_only["changes"]] == ["spam/no-date.eml"]
    assert spam_only["matching"] == 1 and spam_only["effects"] == data["effects"]
    by_rule = _json_diff([str(a), str(b), "--rule", "big", "--limit", "1"], capsys)
    assert [c["id"] for c in by_rule["changes"]] == ["ham/list-post.eml"]
    assert by_rule["matching"] == 2
    assert _json_diff([str(a), str(b), "--rule", "dmarc_fail"], capsys)["changes"] == []


def test_a_rule_whose_score_changed_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same rules fire on both sides; the report's rule definitions (its rule
    statistics) say which one's score changed."""
    a = _lab(tmp_path, "a", POLICIES / "auth_only.toml")
    heavier = tmp_path / "auth_only_v3.toml"
    text = (POLICIES / "auth_only.toml").read_text()
    heavier.write_text(text.replace("score = 1.0", "score = 2.0"))  # tag -> quarantine
    b = _lab(tmp_path, "b", heavier)
    data = _json_diff([str(a), str(b)], capsys)
    assert [(c["id"], c["kind"]) for c in data["changes"]] == [
        ("ham/list-post.eml", "legitimate mail newly blocked"),
        ("ham/personal.eml", "legitimate mail newly blocked"),
        ("spam/mortgage.eml", "spam: harder"),
        ("spam/no-date.eml", "spam: harder"),
    ]
    for c in data["changes"]:
        assert c["rules"] == [{"rule": "unauthenticated", "how": "scores 1 before, scores 2 after"}]
        assert c["deciding_before"] == c["deciding_after"] == "score: unauthenticated"
        assert (c["before"]["score"], c["after"]["score"]) == (1.0, 2.0)
    assert _effect(data, "legitimate mail blocked")["gained"] == 2


def test_outputs_written_with_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _lab(tmp_path, "a", POLICIES / "auth_only.toml")
    b = _lab(tmp_path, "b", _v2(tmp_path))
    code, out, _ = _run_diff([str(a), str(b), "--out", str(tmp_path / "d")], capsys)
    assert code == 0 and "2 verdicts changed of 6 messages compared" in out
    md = (tmp_path / "d" / "diff.md").read_text()
    assert (
        "| 1 | ham/list-post.eml | ham | legitimate mail newly blocked | tag (1) | "
        "quarantine (1) | big: fired only after; not in the before policy | "
        "score: unauthenticated | big |"
    ) in md
    assert (
        "| legitimate mail blocked | 0.0% [0.0, 56.1] (0/3) | 33.3% [6.1, 79.2] (1/3) | "
        "+33.3 pts [-29.1, +79.2] | 1 / 0 | 1 |"
    ) in md
    assert "Newcombe" in md
    page = (tmp_path / "d" / "diff.html").read_text()
    assert "<td>ham/list-post.eml</td>" in page and "<td>legitimate mail newly blocked</td>" in page
    data = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert data["format"] == "relay-lab-diff/1" and data["changed"] == 2


def test_two_regimes_in_one_report_as_written_today(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report without verdicts.jsonl records only the messages whose outcome class
    differs between its regimes, and blocked ham: enough for the exact net effect, and the
    diff says which changes it cannot list."""
    report = _lab(tmp_path, "r", POLICIES / "auth_only.toml", POLICIES / "size_only.toml")
    (report / diff.VERDICTS_FILE).unlink(missing_ok=True)  # as relay lab writes it today
    data = _json_diff([str(report), "--regimes", "auth_only", "size_only"], capsys)
    assert data["mode"] == "regimes" and data["compared"] == 6
    got = [
        (c["id"], c["kind"], c["before"]["action"], c["after"]["action"]) for c in data["changes"]
    ]
    assert got == [
        ("ham/list-post.eml", "legitimate mail newly blocked", "tag", "quarantine"),
        ("spam/mortgage.eml", "spam newly let through", "tag", "accept"),
        ("ham/personal.eml", "ham: softer", "tag", "accept"),
    ]
    assert data["changes"][0]["rules"] == [
        {"rule": "unauthenticated", "how": "fired only before; not in the after policy"},
        {"rule": "big", "how": "fired only after; not in the before policy"},
    ]
    assert data["changes"][1]["deciding_after"] == "no rule fired"
    spam = _effect(data, "spam stopped")
    assert (spam["before"]["k"], spam["after"]["k"], spam["gained"], spam["lost"]) == (3, 2, 0, 1)
    ham = _effect(data, "legitimate mail blocked")
    assert (ham["before"]["k"], ham["after"]["k"], ham["gained"], ham["lost"]) == (0, 1, 1, 0)
    # no-date.eml went tag -> quarantine, inside the "soft" class: not in today's report.
    [note] = data["notes"]
    assert "records verdicts for 3 of 6 messages" in note and "at least 1 such" in note


def test_two_regimes_in_one_report_with_every_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _lab(tmp_path, "r", POLICIES / "auth_only.toml", POLICIES / "size_only.toml")
    data = _json_diff([str(report), "--regimes", "auth_only", "size_only"], capsys)
    # Every change now, no-date.eml's tag -> quarantine included (same rank and step as
    # personal.eml's tag -> accept, so by id), and nothing left to warn about.
    assert [(c["id"], c["kind"]) for c in data["changes"]] == [
        ("ham/list-post.eml", "legitimate mail newly blocked"),
        ("spam/mortgage.eml", "spam newly let through"),
        ("ham/personal.eml", "ham: softer"),
        ("spam/no-date.eml", "spam: harder"),
    ]
    assert data["changes"][3]["rules"] == [
        {"rule": "unauthenticated", "how": "fired only before; not in the after policy"},
        {"rule": "big", "how": "fired only after; not in the before policy"},
    ]
    assert data["notes"] == []
    reverse = _json_diff([str(report), "--regimes", "size_only", "auth_only"], capsys)
    assert reverse["changes"][0]["kind"] == "spam newly stopped"  # mortgage: accept -> tag
    assert _effect(reverse, "legitimate mail blocked")["lost"] == 1


async def test_shadow_log_written_by_a_live_relay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real relay enforces the default policy (accepts everything) with article 7 in
    shadow: the diff lists the bulk ad article 7 would have refused, with its rules."""
    shadow_log = await _live_shadow_log(tmp_path)
    lines = [json.loads(x) for x in shadow_log.read_text().splitlines()]
    enforced = {x["policy"] for x in lines if x["mode"] == "enforce"}
    ad, personal = dict.fromkeys(x["queue_id"] for x in lines)
    ad_shadow = next(x for x in lines if x["queue_id"] == ad and x["mode"] == "shadow")

    data = _json_diff([str(shadow_log)], capsys)
    assert data["mode"] == "shadow log"
    assert (data["before_regime"], data["after_regime"]) == (*enforced, "itr_article7")
    assert data["compared"] == 2 and data["changed"] == 1
    [change] = data["changes"]
    assert (change["id"], change["label"], change["kind"]) == (ad, None, "newly blocked")
    assert (change["before"]["action"], change["after"]["action"]) == ("accept", "reject")
    assert {"rule": "bulk_unsolicited", "how": "fired only after"} in change["rules"]
    # Article 7 scores (no rule forces): the rules that made up the score decided.
    assert ad_shadow["forced_by"] is None
    assert change["deciding_after"] == "score: " + " + ".join(ad_shadow["rules"])
    assert change["deciding_before"] == "no rule fired"
    # No labels: only the label-free figure, and the diff says why.
    assert [e["figure"] for e in data["effects"]] == ["messages blocked"]
    blocked = _effect(data, "messages blocked")
    assert (blocked["before"]["k"], blocked["after"]["k"], blocked["after"]["n"]) == (0, 1, 2)
    assert any("No labels" in n for n in data["notes"])
    code, _, err = _run_diff([str(shadow_log), "--label", "spam"], capsys)
    assert code == 2 and "no labels" in err

    labels = tmp_path / "labels.tsv"
    labels.write_text(f"# queue id\tlabel\n{ad}\tspam\n{personal}\tham\n")
    data = _json_diff([str(shadow_log), "--labels", str(labels)], capsys)
    assert data["changes"][0]["kind"] == "spam newly stopped"
    spam = _effect(data, "spam stopped")
    assert (spam["before"]["k"], spam["after"]["k"], spam["after"]["n"]) == (0, 1, 1)
    ham = _effect(data, "legitimate mail blocked")
    assert (ham["before"]["k"], ham["after"]["k"], ham["after"]["n"]) == (0, 0, 1)
    assert not any("No labels" in n for n in data["notes"])


async def _live_shadow_log(tmp_path: Path) -> Path:
    shadow_log, _ = await live_shadow_log(tmp_path)
    return shadow_log


def test_mismatched_corpora_are_counted_and_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _lab(tmp_path, "a", POLICIES / "auth_only.toml")
    # The ham directory alone: same ids for the three test-set ham, plus forged-upstream
    # (in the train set, so not in A); A's three spam are not in B.
    b = _lab(tmp_path, "b", _v2(tmp_path), corpus=["--ham", str(CORPUS / "ham")])
    code, out, err = _run_diff([str(a), str(b), "--format", "json"], capsys)
    assert code == 1 and "4 messages on one side only" in err
    data = json.loads(out)
    assert data["compared"] == 3 and data["mismatched"]
    sides = sorted((o["id"], o["side"], o["reason"]) for o in data["one_side"])
    assert sides == [
        ("ham/forged-upstream.eml", "after", "not in the before report's corpus"),
        ("spam/mortgage.eml", "before", "not in the after report's corpus"),
        ("spam/no-date.eml", "before", "not in the after report's corpus"),
        ("spam/spoof.eml", "before", "not in the after report's corpus"),
    ]
    assert [c["id"] for c in data["changes"]] == ["ham/list-post.eml"]
    assert _effect(data, "spam stopped")["before"]["n"] == 0

    # Same ids, different content: never paired.
    copy = tmp_path / "corpus"
    shutil.copytree(CORPUS, copy)
    with (copy / "ham" / "personal.eml").open("a") as fh:
        fh.write("one more line\n")
    test_set = ["--labels", str(LABELS), "--set", "test"]
    c = _lab(tmp_path, "c", _v2(tmp_path), corpus=["--corpus", str(copy), *test_set])
    code, out, _ = _run_diff([str(a), str(c), "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 1 and data["content_differs"] == ["ham/personal.eml"] and data["compared"] == 5

    # Nothing in common: an error, not an empty diff.
    train_set = ["--corpus", str(CORPUS), "--labels", str(LABELS), "--set", "train"]
    d = _lab(tmp_path, "d", _v2(tmp_path), corpus=train_set)
    code, _, err = _run_diff([str(a), str(d)], capsys)
    assert code == 2 and "no message in common" in err


def test_unusable_inputs_are_errors_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run_diff([str(empty), str(empty)], capsys)
    assert code == 2 and f"{empty}: not a lab report (no report.json)" in err
    code, _, err = _run_diff([str(tmp_path / "nowhere")], capsys)
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such report directory or shadow log" in err
    (empty / "report.json").write_text('{"format": "something else"}')
    code, _, err = _run_diff([str(empty)], capsys)
    assert code == 2 and "not a relay lab report" in err
    junk = tmp_path / "junk.jsonl"
    junk.write_text("hello\n")
    code, _, err = _run_diff([str(junk)], capsys)
    assert code == 2 and f"{junk}: not a shadow log" in err

    # Two reports as relay lab writes them today (no verdicts.jsonl): a clear refusal.
    a = _lab(tmp_path, "a", POLICIES / "auth_only.toml")
    (a / diff.VERDICTS_FILE).unlink(missing_ok=True)
    code, _, err = _run_diff([str(a), str(a)], capsys)
    assert code == 2 and diff.VERDICTS_FILE in err and "needs every message's verdict" in err
    code, _, err = _run_diff([str(a), "--regimes", "auth_only", "nope"], capsys)
    assert code == 2 and "no regime 'nope' (it has: auth_only)" in err


def test_relay_lab_still_requires_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--policy", str(POLICIES / "auth_only.toml")]) == 2
    assert "--out is required" in capsys.readouterr().err
