"""Markdown and HTML sections for a regime's threshold curve and rule statistics.

Read from the report JSON (``curve`` and ``rule_stats`` of a regime) only, like
render.py, which places these sections. Markdown stays compact: a handful of curve
points and the rules with the largest marginal effect; the HTML shows the whole curve
as inline SVG and every rule; report.json holds everything (co-hits with every rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from relay.lab.curves import summary_points
from relay.lab.rulestats import by_effect
from relay.lab.svgcurve import curve_svg

MD_TOP_RULES = 10

CURVE_NOTE = (
    "Threshold curve: each row is one score cutoff; a message counts as stopped "
    "(spam) or blocked (legitimate) when it would not reach the inbox (reject, tempfail "
    "or quarantine), so tagged spam is not counted as stopped here, unlike in the summary "
    "table. Forced "
    "actions hold at every cutoff. Brackets: 95% Wilson intervals."
)
RULES_NOTE = (
    "Hits count every message whose condition holds, also where the engine stopped "
    "before the rule (unevaluated). S/O = spam hits / all hits. Without it: the verdicts "
    "recomputed with the rule removed; released = would reach the inbox, caught = would "
    "no longer reach it."
)


def _pct(p: Mapping[str, Any]) -> str:
    if p["rate"] is None:
        return "n/a"
    return f"{100 * p['rate']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}]"


def _cutoff(t: float | None) -> str:
    return "forced only" if t is None else f">= {t:g}"


def _outcome(rule: Mapping[str, Any]) -> str:
    return str(rule["action"]) if rule["action"] else f"{rule['score']:+g}"


def _so(rule: Mapping[str, Any]) -> str:
    return "-" if rule["so"] is None else f"{rule['so']:.2f}"


def _overlap(rule: Mapping[str, Any]) -> str:
    o = rule["overlap"]
    return "-" if o is None else f"{o['rule']} ({100 * o['share']:.0f}%)"


def _without(rule: Mapping[str, Any]) -> list[str]:
    w = rule["without"]
    return [str(w[k]) for k in ("spam_released", "ham_released", "spam_caught", "ham_caught")] + [
        str(w["changed"])
    ]


RULE_HEAD = (
    "rule",
    "score / action",
    "spam hits",
    "ham hits",
    "unevaluated",
    "S/O",
    "co-fires most with",
    "without: spam released",
    "ham released",
    "spam caught",
    "ham caught",
    "verdicts changed",
)


def _rule_row(rule: Mapping[str, Any]) -> list[str]:
    return [
        str(rule["name"]),
        _outcome(rule),
        str(rule["spam"]),
        str(rule["ham"]),
        str(rule["unevaluated"]),
        _so(rule),
        _overlap(rule),
        *_without(rule),
    ]


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(regime: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    curve = regime.get("curve")
    if curve:
        lines += [
            f"Threshold curve ({len(curve['points'])} points from "
            f"{curve['distinct_thresholds']} distinct scores; forced actions stop "
            f"{curve['forced']['spam']} spam and block {curve['forced']['ham']} legitimate "
            "messages at every cutoff):",
            "",
            "| score cutoff | spam stopped | legitimate mail blocked | |",
            "|---|---|---|---|",
        ]
        for p in summary_points(curve):
            mark = "operating point" if p["operating"] else ""
            lines.append(_md_row([_cutoff(p["threshold"]), _pct(p["spam"]), _pct(p["ham"]), mark]))
        lines.append("")
    stats = regime.get("rule_stats")
    if stats and stats["available"] and stats["rules"]:
        top = by_effect(stats["rules"])[:MD_TOP_RULES]
        lines += [
            f"Rules by marginal effect (top {len(top)} of {len(stats['rules'])}):",
            "",
            _md_row(RULE_HEAD),
            "|" + "---|" * len(RULE_HEAD),
            *(_md_row(_rule_row(r)) for r in top),
            "",
        ]
        if stats["unreproduced"]:
            lines += [
                f"{stats['unreproduced']} verdicts could not be recomputed from the rule "
                "matches; their marginal effects may be wrong.",
                "",
            ]
    elif stats and not stats["available"]:
        lines += [f"Rule statistics unavailable: {stats['reason']}.", ""]
    return lines


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</table>")
    return "\n".join(out)


def html(regime: Mapping[str, Any]) -> str:
    parts: list[str] = []
    curve = regime.get("curve")
    if curve:
        parts.append(f"<h3>Threshold curve</h3><p>{escape(CURVE_NOTE)}</p>")
        parts.append(curve_svg(regime["name"], curve))
        parts.append(
            _table(
                ["score cutoff", "spam stopped", "legitimate mail blocked", ""],
                [
                    [
                        escape(_cutoff(p["threshold"])),
                        _pct(p["spam"]),
                        _pct(p["ham"]),
                        "operating point" if p["operating"] else "",
                    ]
                    for p in summary_points(curve)
                ],
            )
        )
    stats = regime.get("rule_stats")
    if stats and stats["available"] and stats["rules"]:
        parts.append(f"<h3>Rule statistics</h3><p>{escape(RULES_NOTE)}</p>")
        parts.append(
            _table(
                RULE_HEAD, [[escape(c) for c in _rule_row(r)] for r in by_effect(stats["rules"])]
            )
        )
        if stats["unreproduced"]:
            parts.append(
                f"<p class='err'>{stats['unreproduced']} verdicts could not be recomputed "
                "from the rule matches; their marginal effects may be wrong.</p>"
            )
    elif stats and not stats["available"]:
        parts.append(f"<p>Rule statistics unavailable: {escape(stats['reason'])}.</p>")
    return "\n".join(parts)
