"""Shadow-mode log: the observer-side writer and the lab's report on it."""

from __future__ import annotations

import json
from pathlib import Path

from relay.cli.main import main
from relay.contracts import MessageReport, NullObserver, Outcome
from relay.ops.shadowlog import ShadowLog, summarise
from relay.reply import Reply
from relay.verdict import Action, Mode, RuleHit, Tier, Verdict
from tests.support.shadowlog import live_shadow_log


class _Recorder(NullObserver):
    def __init__(self) -> None:
        self.done: list[str] = []
        self.replies: list[int] = []

    def message_done(self, report: MessageReport) -> None:
        self.done.append(report.queue_id)

    def smtp_reply(self, code: int) -> None:
        self.replies.append(code)


def _report(queue_id: str, enforced: Action, shadow: tuple[Verdict, ...]) -> MessageReport:
    return MessageReport(
        queue_id=queue_id,
        size=1234,
        recipients=2,
        verdict=Verdict(action=enforced, policy="default", highest_tier=Tier.ENVELOPE),
        reply=Reply(250, "2.0.0", "Ok"),
        outcome=Outcome.DELIVERED,
        shadow=shadow,
    )


def _shadow(policy: str, action: Action, tier: Tier, *rules: str) -> Verdict:
    return Verdict(
        action=action,
        policy=policy,
        mode=Mode.SHADOW,
        hits=tuple(RuleHit(r, 1.0, "reason with alice@example.org") for r in rules),
        highest_tier=tier,
        score=float(len(rules)),
    )


def test_shadow_log_writes_lines_and_forwards(tmp_path: Path) -> None:
    inner = _Recorder()
    log = ShadowLog(tmp_path / "var" / "shadow.jsonl", inner=inner)
    log.smtp_reply(250)
    log.message_done(_report("q1", Action.ACCEPT, (
        _shadow("itr_article7", Action.ACCEPT, Tier.FINGERPRINT),
        _shadow("can_spam", Action.REJECT, Tier.CONTENT, "no_postal_address", "no_opt_out"),
    )))  # fmt: skip
    log.message_done(_report("q2", Action.REJECT, ()))  # no shadow regimes: nothing written
    log.message_done(_report("q3", Action.REJECT, (
        _shadow("itr_article7", Action.REJECT, Tier.FINGERPRINT, "bulk_unsolicited"),
        _shadow("can_spam", Action.ACCEPT, Tier.CONTENT),
    )))  # fmt: skip
    log.close()
    assert inner.done == ["q1", "q2", "q3"] and inner.replies == [250]
    text = (tmp_path / "var" / "shadow.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert [(x["queue_id"], x["policy"], x["mode"]) for x in lines] == [
        ("q1", "default", "enforce"),
        ("q1", "itr_article7", "shadow"),
        ("q1", "can_spam", "shadow"),
        ("q3", "default", "enforce"),
        ("q3", "itr_article7", "shadow"),
        ("q3", "can_spam", "shadow"),
    ]
    assert lines[2]["rules"] == ["no_postal_address", "no_opt_out"]
    assert lines[2]["tier"] == "T3" and lines[2]["action"] == "reject"
    assert set(lines[0]) == {
        "ts", "queue_id", "policy", "mode", "action", "score", "tier", "rules", "forced_by",
        "size", "recipients",
    }  # fmt: skip
    assert "@" not in text  # rule reasons (which may quote anything) are never logged


def test_shadow_report_counts_agreement_and_malformed_lines(tmp_path: Path) -> None:
    log = ShadowLog(tmp_path / "shadow.jsonl")
    log.message_done(_report("q1", Action.ACCEPT, (
        _shadow("itr_article7", Action.ACCEPT, Tier.FINGERPRINT),
        _shadow("can_spam", Action.REJECT, Tier.CONTENT, "no_opt_out"),
    )))  # fmt: skip
    log.message_done(_report("q2", Action.REJECT, (
        _shadow("itr_article7", Action.REJECT, Tier.FINGERPRINT, "bulk_unsolicited"),
        _shadow("can_spam", Action.TEMPFAIL, Tier.CONTENT),
    )))  # fmt: skip
    log.close()
    with (tmp_path / "shadow.jsonl").open("a") as fh:
        fh.write("{not json\n")
        fh.write('{"queue_id": "q9"}\n')
    summary = summarise(tmp_path / "shadow.jsonl")
    assert summary["messages"] == 2
    assert [m["line"] for m in summary["malformed"]] == [7, 8]
    a7 = summary["policies"]["itr_article7"]
    assert a7["agrees_with_enforced"] == 1.0  # accept/accept, reject/reject
    assert a7["tiers"]["T2"] == 2 and a7["rules"] == {"bulk_unsolicited": 1}
    us = summary["policies"]["can_spam"]
    assert us["agrees_with_enforced"] == 0.5  # reject vs accept differs; tempfail ~ reject
    assert us["content_read"] == 1.0
    assert summary["policies"]["default"]["mode"] == "enforce"

    out = tmp_path / "report"
    assert main(["lab", "--shadow-log", str(tmp_path / "shadow.jsonl"), "--out", str(out)]) == 0
    assert json.loads((out / "shadow.json").read_text()) == summary
    md = (out / "shadow.md").read_text()
    assert "| can_spam | shadow | 2 | 0 | 0 | 0 | 1 | 1 | 100.0% | 50.0% |" in md
    assert "line 7: not JSON" in md


async def test_live_relay_shadow_regimes_reach_the_lab_report(tmp_path: Path) -> None:
    """Real relay over SMTP on loopback: the enforced policy accepts everything, article 7
    runs in shadow; its verdicts land in the shadow log and `relay lab` reports on them."""
    shadow_log, delivered = await live_shadow_log(tmp_path)
    assert delivered == 2  # shadow regimes never act on mail
    lines = [json.loads(x) for x in shadow_log.read_text().splitlines()]
    shadow = [x for x in lines if x["mode"] == "shadow"]
    assert [(x["policy"], x["action"], x["tier"]) for x in shadow] == [
        ("itr_article7", "reject", "T2"),
        ("itr_article7", "accept", "T2"),
    ]
    assert "bulk_unsolicited" in shadow[0]["rules"]
    assert "@" not in shadow_log.read_text()

    out = tmp_path / "report"
    assert main(["lab", "--shadow-log", str(shadow_log), "--out", str(out)]) == 0
    summary = json.loads((out / "shadow.json").read_text())
    a7 = summary["policies"]["itr_article7"]
    assert a7["actions"] == {"reject": 1, "accept": 1}
    assert a7["agrees_with_enforced"] == 0.5 and a7["tiers"]["T2"] == 2
