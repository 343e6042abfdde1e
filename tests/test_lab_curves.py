"""Threshold curves and rule statistics of the lab (curves.py, rulestats.py, complete.py).

The hand-made set: 4 spam, 4 ham, 3 rules (A +2, B +3, C forced reject) under
thresholds tag 2, quarantine 4, reject 6, so the lowest blocking threshold is 4.

    msg  rules   score  verdict        msg  rules   score  verdict
    s1   A B     5      quarantine     h1   -       0      accept
    s2   B       3      tag            h2   A       2      tag
    s3   C       0      reject (C)     h3   A B     5      quarantine
    s4   A C     2      reject (C)     h4   B       3      tag
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from relay.cli.main import main
from relay.facts import Facts, Services, default_registry
from relay.lab.complete import Completer
from relay.lab.curves import MAX_POINTS, Point, build_curve, summary_points, thin
from relay.lab.rescore import (
    Bands,
    Matched,
    RegimeRules,
    Rescored,
    RuleDef,
    action_of,
    rescore,
)
from relay.lab.rulestats import by_effect, rule_stats
from relay.message import Message
from relay.policy import compile_policy

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
BANDS: Bands = ((2.0, "tag"), (4.0, "quarantine"), (6.0, "reject"))
RULES = RegimeRules(
    (RuleDef("A", 2.0), RuleDef("B", 3.0), RuleDef("C", action="reject")),
    BANDS,
)
HAND = {
    "s1": ("spam", {"A", "B"}),
    "s2": ("spam", {"B"}),
    "s3": ("spam", {"C"}),
    "s4": ("spam", {"A", "C"}),
    "h1": ("ham", set()),
    "h2": ("ham", {"A"}),
    "h3": ("ham", {"A", "B"}),
    "h4": ("ham", {"B"}),
}


def _matched(regime: RegimeRules = RULES, cases: dict[str, Any] = HAND) -> list[Matched]:
    defs = regime.by_name()
    out = []
    for label, rules in cases.values():
        action = action_of(rescore(rules, defs), (regime.bands,))
        ordered = tuple(sorted(rules))
        out.append(Matched(label, ordered, frozenset(rules), (regime.bands,), action))
    return out


def _curve_of(matched: list[Matched], regime: RegimeRules = RULES, **kw: Any) -> Any:
    defs = regime.by_name()
    return build_curve(
        [(m.label, rescore(m.rules, defs)) for m in matched], regime.lowest_block, **kw
    )


def _stats(regime: RegimeRules = RULES, cases: dict[str, Any] = HAND) -> dict[str, Any]:
    data = rule_stats(regime, _matched(regime, cases)).to_dict()
    return {r["name"]: r for r in data["rules"]} | {"_unreproduced": data["unreproduced"]}


def test_hand_made_verdicts_are_what_the_docstring_says() -> None:
    actions = [m.action for m in _matched()]
    assert actions == [
        "quarantine",
        "tag",
        "reject",
        "reject",
        "accept",
        "tag",
        "quarantine",
        "tag",
    ]
    assert RULES.lowest_block == 4.0


def test_curve_points_on_the_hand_made_set() -> None:
    curve = _curve_of(_matched())
    got = [(p.threshold, p.spam, p.ham) for p in curve.points]
    # Forced-only first (s3, s4), then every distinct unforced score, with the operating
    # threshold 4 inserted between 5 and 3.
    assert got == [
        (None, 2, 0),
        (5.0, 3, 1),
        (4.0, 3, 1),
        (3.0, 4, 2),
        (2.0, 4, 3),
        (0.0, 4, 4),
    ]
    assert curve.operating == 2
    assert (curve.forced_spam, curve.forced_ham, curve.distinct) == (2, 0, 4)
    data = curve.to_dict()
    op = data["operating"]
    assert (op["threshold"], op["spam"]["k"], op["ham"]["k"]) == (4.0, 3, 1)
    # The operating point is what the regime actually does: actions kept out of the inbox.
    blocked = {"quarantine", "tempfail", "reject"}
    actual = [(m.label, m.action in blocked) for m in _matched()]
    assert actual.count(("spam", True)) == 3 and actual.count(("ham", True)) == 1
    # 95% Wilson bands per point: 3/4 spam.
    assert op["spam"]["low"] == pytest.approx(0.3006, abs=1e-4)
    assert op["spam"]["high"] == pytest.approx(0.9544, abs=1e-4)


def test_regime_without_blocking_threshold_operates_at_forced_only_point() -> None:
    regime = RegimeRules(RULES.rules, ((2.0, "tag"),))
    curve = _curve_of(_matched(regime), regime)
    assert regime.lowest_block is None
    assert curve.operating == 0 and curve.points[0].threshold is None


def test_forced_actions_hold_at_every_threshold() -> None:
    # Two spam forced to reject with score 0, one spam forced to accept (allow-listed)
    # with a huge score, one ham forced to quarantine, plus unforced mail.
    messages = [
        ("spam", Rescored(0.0, "reject")),
        ("spam", Rescored(-5.0, "reject")),
        ("spam", Rescored(100.0, "accept")),
        ("spam", Rescored(1.0, None)),
        ("ham", Rescored(0.0, "quarantine")),
        ("ham", Rescored(1.0, None)),
        ("ham", Rescored(-3.0, "tag")),
    ]
    curve = build_curve(messages, 1.0)
    assert (curve.points[0].spam, curve.points[0].ham) == (2, 1)  # forced only
    for p in curve.points:
        assert p.spam >= 2 and p.ham >= 1  # forced blocks stay blocked
        assert p.spam <= 3 and p.ham <= 2  # forced accept and tag are never blocked
    assert (curve.points[-1].spam, curve.points[-1].ham) == (3, 2)
    # Thresholds come from unforced scores only: 100 and -5 belong to forced messages.
    assert [p.threshold for p in curve.points] == [None, 1.0]


def test_point_count_is_bounded_and_keeps_the_shape() -> None:
    rng = random.Random(18)
    messages = []
    for i in range(100_000):
        label = "spam" if i % 3 else "ham"
        centre = 8.0 if label == "spam" else 2.0
        forced = "reject" if i % 97 == 0 else None
        messages.append((label, Rescored(round(rng.gauss(centre, 3.0), 4), forced)))
    full = build_curve(messages, 5.0, limit=10**9)
    curve = build_curve(messages, 5.0)
    assert full.distinct > 20_000 and len(full.points) == full.distinct + 2
    assert len(curve.points) <= MAX_POINTS
    assert curve.points[0] == full.points[0] and curve.points[-1] == full.points[-1]
    assert curve.points[curve.operating] == full.points[full.operating]
    assert curve.points[curve.operating].threshold == 5.0

    def at(p: Point) -> tuple[float, float]:
        return p.ham / full.n_ham, p.spam / full.n_spam

    kept = [at(p) for p in curve.points]
    worst = max(min(abs(x - kx) + abs(y - ky) for kx, ky in kept) for x, y in map(at, full.points))
    assert worst <= 2 / (MAX_POINTS - 4) + 1e-9  # no dropped point is far from a kept one
    assert len(json.dumps(curve.to_dict())) < 200_000


def test_thin_keeps_ends_and_requested_points() -> None:
    points = [Point(float(-i), i, i) for i in range(1000)]
    kept = thin(points, 1000, 1000, (500,), 10)
    assert len(kept) <= 10 and {0, 500, 999} <= set(kept)
    assert thin(points[:5], 1000, 1000, (), 10) == [0, 1, 2, 3, 4]


def test_rule_hits_and_so_ratio() -> None:
    s = _stats()
    assert [(s[n]["spam"], s[n]["ham"], s[n]["so"]) for n in "ABC"] == [
        (2, 2, 0.5),
        (2, 2, 0.5),
        (2, 0, 1.0),
    ]
    assert s["_unreproduced"] == 0


def test_rule_overlap() -> None:
    s = _stats()
    assert s["A"]["co_hits"] == {"B": 2, "C": 1}
    assert s["A"]["overlap"] == {"rule": "B", "both": 2, "share": 0.5}
    assert s["B"]["overlap"] == {"rule": "A", "both": 2, "share": 0.5}
    assert s["C"]["overlap"] == {"rule": "A", "both": 1, "share": 0.5}


def test_marginal_effect_removing_each_rule() -> None:
    s = _stats()
    # A: s1 5->3 (quarantine->tag), h3 5->3 (quarantine->tag), h2 2->0 (tag->accept);
    # s4 stays forced to reject.
    assert s["A"]["without"] == {
        "changed": 3,
        "spam_released": 1,
        "ham_released": 1,
        "spam_caught": 0,
        "ham_caught": 0,
    }
    # B: s1 5->2, h3 5->2 leave quarantine; s2, h4 3->0 lose their tag.
    assert s["B"]["without"]["changed"] == 4
    assert (s["B"]["without"]["spam_released"], s["B"]["without"]["ham_released"]) == (1, 1)
    # C: s3 falls to accept (0), s4 to tag (2): both reach the inbox.
    assert s["C"]["without"] == {
        "changed": 2,
        "spam_released": 2,
        "ham_released": 0,
        "spam_caught": 0,
        "ham_caught": 0,
    }
    # Each moves 2 verdicts in or out of the inbox; then more changed actions first.
    order = [r["name"] for r in by_effect([v for k, v in s.items() if k != "_unreproduced"])]
    assert order == ["B", "A", "C"]


def test_marginal_effect_the_reverse_direction() -> None:
    # An exemption (-4) and an allow-list (forced accept): removing them stops mail.
    regime = RegimeRules(
        (RuleDef("bad", 6.0), RuleDef("exempt", -4.0), RuleDef("allow", action="accept")),
        BANDS,
    )
    cases = {
        "h1": ("ham", {"bad", "exempt"}),  # 2: tag; without exempt 6: reject
        "h2": ("ham", {"bad", "allow"}),  # forced accept; without allow 6: reject
        "s1": ("spam", {"bad"}),  # 6: reject
    }
    s = _stats(regime, cases)
    assert s["exempt"]["without"]["ham_caught"] == 1
    assert s["allow"]["without"]["ham_caught"] == 1
    assert s["bad"]["without"]["spam_released"] == 1
    assert s["bad"]["without"]["ham_released"] == 0  # h1, h2 were not blocked


def test_unreproduced_verdicts_are_counted() -> None:
    [m] = _matched(cases={"s": ("spam", {"A"})})
    wrong = Matched(m.label, m.rules, m.fired, m.bands, "reject")  # the engine said reject
    assert rule_stats(RULES, [wrong]).unreproduced == 1


def test_strictest_recipient_domain_wins_when_rescoring() -> None:
    lenient: Bands = ((20.0, "reject"),)
    assert action_of(Rescored(5.0, None), (BANDS, lenient)) == "quarantine"
    assert action_of(Rescored(5.0, None), (lenient,)) == "accept"


def test_summary_points_include_the_operating_point() -> None:
    data = _curve_of(_matched()).to_dict()
    rows = summary_points(data, limit=3)
    assert [r["operating"] for r in rows].count(True) == 1
    assert next(r for r in rows if r["operating"])["threshold"] == 4.0


# --- complete matches against the real engine ------------------------------------------

POLICY = """
[policy]
name = "p"
[policy.thresholds]
tag = 0.8
quarantine = 5.0
{peer}
[[rule]]
name = "a"
when = "message_size > 10"
score = 0.7
[[rule]]
name = "b"
when = "message_size > 20"
score = 0.1
"""
PEER = """
[[rule]]
name = "peer"
when = 'client_ip == "198.51.100.99"'
action = "reject"
"""


async def test_probes_find_rules_past_the_early_stop_and_rescoring_matches_the_engine() -> None:
    registry = default_registry()
    message = Message.from_file_bytes(
        b"From: a@example.org\nSubject: x\n\nhello\n", received_at=0.0
    )
    preset = {"client_ip": "198.51.100.99", "message_size": 100}
    with_peer = compile_policy(POLICY.format(peer=PEER), registry)
    without_peer = compile_policy(POLICY.format(peer=""), registry)
    verdict = await with_peer.decide(message, Facts(registry, message, Services(), preset=preset))
    # The forced reject at T0 settles everything: the T1 rules are never evaluated.
    assert verdict.action.value == "reject" and [h.rule for h in verdict.hits] == ["peer"]
    facts = Facts(registry, message, Services(), preset=preset)
    matched = await Completer(with_peer, registry).matched(verdict, message, facts)
    assert matched == ("peer", "a", "b")
    # Without `peer` the engine sums 0.7 + 0.1 = 0.7999999999999999, below tag = 0.8:
    # the recomputed verdict must say the same, not round its way to a tag.
    engine = await without_peer.decide(message, Facts(registry, message, Services(), preset=preset))
    defs = {
        "peer": RuleDef("peer", action="reject"),
        "a": RuleDef("a", 0.7),
        "b": RuleDef("b", 0.1),
    }
    bands: Bands = ((0.8, "tag"), (5.0, "quarantine"))
    assert action_of(rescore(matched, defs, without="peer"), (bands,)) == engine.action.value
    assert engine.action.value == "accept"


# --- end to end: `relay lab` on the fixture corpus -------------------------------------


def test_relay_lab_writes_curves_and_rule_statistics_into_every_report(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n')
    out = tmp_path / "out"
    policies = FIXTURES / "policies"
    args = [
        "lab", "--corpus", str(FIXTURES / "corpus"), "--labels", str(FIXTURES / "labels.tsv"),
        "--set", "test", "--config", str(config), "--cache", str(tmp_path / "cache"),
        "--jobs", "1", "--out", str(out),
        "--policy", str(policies / "auth_only.toml"), str(policies / "size_only.toml"),
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    regimes = {r["name"]: r for r in report["regimes"]}

    auth = regimes["auth_only"]
    curve = auth["curve"]
    assert [(p["threshold"], p["spam"]["k"], p["ham"]["k"]) for p in curve["points"]] == [
        (None, 1, 0),  # spoof.eml, forced reject by dmarc_fail
        (2.0, 1, 0),  # the operating point: quarantine = 2, no score reaches it
        (1.0, 3, 2),
        (0.0, 3, 3),
    ]
    assert curve["operating"]["threshold"] == 2.0
    assert curve["operating"]["spam"]["k"] == sum(
        auth["actions"]["spam"][a] for a in ("quarantine", "tempfail", "reject")
    )
    rules = {r["name"]: r for r in auth["rule_stats"]["rules"]}
    # spoof.eml also lacks SPF and DKIM, but the forced reject stopped the engine before
    # `unauthenticated`: only the probe finds that hit.
    assert (rules["unauthenticated"]["spam"], rules["unauthenticated"]["ham"]) == (3, 2)
    assert rules["unauthenticated"]["unevaluated"] == 1
    assert auth["rule_hits"]["unauthenticated"] == {"spam": 2, "ham": 2}
    assert rules["unauthenticated"]["so"] == 0.6
    assert rules["dmarc_fail"]["overlap"] == {"rule": "unauthenticated", "both": 1, "share": 1.0}
    # Without dmarc_fail, spoof.eml scores 1 (tag): it would reach the inbox.
    assert rules["dmarc_fail"]["without"]["spam_released"] == 1
    assert auth["rule_stats"]["unreproduced"] == 0

    size = regimes["size_only"]
    assert size["curve"]["operating"]["index"] == 0  # tag only: the score never blocks
    assert (size["curve"]["forced"]["spam"], size["curve"]["forced"]["ham"]) == (2, 1)
    big = {r["name"]: r for r in size["rule_stats"]["rules"]}["big"]
    assert (big["spam"], big["ham"], big["so"]) == (1, 1, 0.5)
    assert (big["without"]["spam_released"], big["without"]["ham_released"]) == (1, 1)

    md = (out / "report.md").read_text()
    assert "| >= 2 | 33.3% [6.1, 79.2] | 0.0% [0.0, 56.1] | operating point |" in md
    assert "| forced only | 33.3% [6.1, 79.2] | 0.0% [0.0, 56.1] |  |" in md
    assert re.search(
        r"\| dmarc_fail \| reject \| 1 \| 0 \| 0 \| 1\.00 \| unauthenticated \(100%\) \| 1 \|", md
    )
    assert "Rules by marginal effect" in md

    html = (out / "report.html").read_text()
    svgs = re.findall(r"<svg .*?</svg>", html, re.S)
    assert len(svgs) == 2
    for svg in svgs:
        assert "<polyline" in svg and "<polygon" in svg and "<circle" in svg
    assert "operating point (score &gt;= 2)" in svgs[0]
    # No external file: the only script is the inline one that pages the message lists.
    assert "<script src" not in html and "https://" not in html and "<link" not in html
    assert "<script" not in "".join(svgs)
    assert "<td>unauthenticated</td><td>+1</td><td>3</td><td>2</td><td>1</td><td>0.60</td>" in html
