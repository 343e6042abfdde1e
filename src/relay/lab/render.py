"""Markdown and HTML renderings of the report JSON, and the per-message fact pages.

One module because the Markdown, HTML and per-message renderings read the same report
fields through shared helpers; over 300 lines because the HTML report is mostly template
text.

Both renderings take the report mapping only (as written to report.json), so every
number a person reads is one a machine can check. Everything interpolated into HTML is
escaped: message ids and rule reasons come from the corpus and the policy files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from relay.lab import render_curves

MD_LIST_LIMIT = 50


def pct(p: Mapping[str, Any]) -> str:
    if p["rate"] is None:
        return "n/a"
    return f"{100 * p['rate']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}]"


def _count(p: Mapping[str, Any]) -> str:
    return f"{p['k']}/{p['n']}"


def _dns_line(dns: Mapping[str, Any]) -> str:
    if dns.get("mode") == "offline":
        ids = ", ".join(dns.get("trusted_authserv_ids") or []) or "none configured"
        return f"offline (Authentication-Results from trusted authserv-ids: {ids})"
    return "resolver " + ", ".join(dns.get("nameservers", []))


def _inputs_line(inputs: Mapping[str, Any]) -> str:
    if not inputs.get("dir"):
        return "none (consent, opt-out and customer facts are missing; rules needing them skip)"
    return f"{inputs['dir']} ({', '.join(inputs['lists']) or 'no lists'})"


def _model_line(model: Mapping[str, Any]) -> str:
    if not model.get("path"):
        return "disabled (spam_probability is missing)"
    return f"{model['path']} (sha256 {model['sha256']})"


def markdown(report: Mapping[str, Any]) -> str:
    c = report["corpus"]
    lines = [
        "# Regulation lab report",
        "",
        f"Corpus: {c['source']}: {c['messages']} messages, {c['readable']} readable "
        f"({c['spam']} spam, {c['ham']} ham), {len(c['unreadable'])} unreadable.",
        f"DNS: {_dns_line(report['dns'])}.",
        f"Lab inputs (oracle lists): {_inputs_line(report['inputs'])}.",
        f"Classifier model: {_model_line(report['model'])}.",
        "",
        "Rates are shares with 95% Wilson intervals. Hard = reject or tempfail at SMTP time; "
        "soft = tag or quarantine; legitimate mail blocked = ham rejected, tempfailed or "
        "quarantined.",
        "",
        render_curves.CURVE_NOTE,
        "",
        render_curves.RULES_NOTE,
        "",
        "| regime | spam stopped | hard | soft | legitimate mail blocked | ham tagged "
        "| content read (T3) | highest tier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["regimes"]:
        lines.append(
            f"| {r['name']} | {pct(r['spam_stopped'])} | {pct(r['spam_stopped_hard'])} "
            f"| {pct(r['spam_stopped_soft'])} | {pct(r['ham_blocked'])} "
            f"({_count(r['ham_blocked'])}) | {pct(r['ham_tagged'])} | {pct(r['content_read'])} "
            f"| {r['highest_tier']} |"
        )
    lines += [
        "",
        "## Tier at which each regime decided",
        "",
        "| regime | " + " | ".join(("none", "T0", "T1", "T2", "T3")) + " |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["regimes"]:
        cells = " | ".join(
            f"{100 * (r['tiers'][t]['rate'] or 0):.1f}%" for t in ("none", "T0", "T1", "T2", "T3")
        )
        lines.append(f"| {r['name']} | {cells} |")
    for r in report["regimes"]:
        lines += ["", f"## {r['name']}", "", f"File: `{r['file']}`", ""]
        if r["ham_block_causes"]:
            lines += ["Legitimate mail blocked, by cause:", ""]
            lines += [f"- {cause}: {n}" for cause, n in r["ham_block_causes"].items()]
            lines.append("")
        lines += render_curves.markdown(r)
        hits = list(r["rule_hits"].items())
        if hits:
            lines += ["Rules that fired in the verdicts:", ""]
            lines += ["| rule | spam hits | ham hits |", "|---|---|---|"]
            lines += [f"| {rule} | {h['spam']} | {h['ham']} |" for rule, h in hits]
    if report["regime_errors"]:
        lines += ["", "## Regime files with errors (not run)", ""]
        for e in report["regime_errors"]:
            lines += [f"- `{e['file']}`"] + [f"  - {p}" for p in e["problems"]]
    dis = report["disagreements"]
    lines += ["", f"## Messages on which regimes disagree: {len(dis)}", ""]
    names = [r["name"] for r in report["regimes"]]
    if dis:
        lines += [
            "| message | label | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for d in dis[:MD_LIST_LIMIT]:
            acts = " | ".join(d["actions"][n] for n in names)
            lines.append(f"| [{d['id']}]({d['facts']}) | {d['label']} | {acts} |")
        if len(dis) > MD_LIST_LIMIT:
            lines.append(f"\n... and {len(dis) - MD_LIST_LIMIT} more in report.json / report.html.")
    if c["unreadable"]:
        lines += ["", f"## Unreadable messages: {len(c['unreadable'])}", ""]
        lines += [f"- {u['id']} ({u['label']}): {u['reason']}" for u in c["unreadable"]]
    lines += ["", "![trade-off](plots/tradeoff.png)", "", "![tiers](plots/tiers.png)", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px}th{background:#f2f2f2}.num{text-align:right}
.hard{background:#f8d0cc}.soft{background:#fde9c8}.pass{background:#e3f2df}
img{max-width:100%}code{background:#f4f4f4}.err{color:#a00}svg.curve{display:block}
"""


def _cls(action: str) -> str:
    if action in ("reject", "tempfail"):
        return "hard"
    return "soft" if action in ("tag", "quarantine") else "pass"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    out += [
        "<tr>" + "".join(rows_cell) + "</tr>"
        for rows_cell in (["<td>" + cell + "</td>" for cell in row] for row in rows)
    ]
    out.append("</table>")
    return "\n".join(out)


def html(report: Mapping[str, Any]) -> str:
    c = report["corpus"]
    names = [r["name"] for r in report["regimes"]]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Regulation lab report</title>",
        f"<style>{_CSS}</style></head><body><h1>Regulation lab report</h1>",
        f"<p>Corpus: {escape(c['source'])}: {c['messages']} messages, {c['readable']} readable "
        f"({c['spam']} spam, {c['ham']} ham), {len(c['unreadable'])} unreadable.<br>"
        f"DNS: {escape(_dns_line(report['dns']))}.<br>"
        f"Lab inputs (oracle lists): {escape(_inputs_line(report['inputs']))}.<br>"
        f"Classifier model: {escape(_model_line(report['model']))}.</p>",
        "<p>Hard = reject or tempfail at SMTP time; soft = tag or quarantine; legitimate "
        "mail blocked = ham rejected, tempfailed or quarantined. Brackets: 95% Wilson "
        "intervals. Numbers come from <a href='report.json'>report.json</a>.</p>",
        "<img src='plots/tradeoff.png' alt='spam stopped against legitimate mail blocked'>",
        "<img src='plots/tiers.png' alt='tier distribution per regime'>",
    ]
    parts.append(
        _table(
            [
                "regime",
                "spam stopped",
                "hard",
                "soft",
                "legitimate mail blocked",
                "ham tagged",
                "content read (T3)",
                "highest tier",
            ],
            [
                [
                    escape(r["name"]),
                    pct(r["spam_stopped"]),
                    pct(r["spam_stopped_hard"]),
                    pct(r["spam_stopped_soft"]),
                    f"{pct(r['ham_blocked'])} ({_count(r['ham_blocked'])})",
                    pct(r["ham_tagged"]),
                    pct(r["content_read"]),
                    r["highest_tier"],
                ]
                for r in report["regimes"]
            ],
        )
    )
    parts.append("<h2>Tier at which each regime decided</h2>")
    parts.append(
        _table(
            ["regime", "none", "T0", "T1", "T2", "T3"],
            [
                [escape(r["name"])] + [pct(r["tiers"][t]) for t in ("none", "T0", "T1", "T2", "T3")]
                for r in report["regimes"]
            ],
        )
    )
    if report["regime_errors"]:
        parts.append("<h2>Regime files with errors (not run)</h2><ul>")
        for e in report["regime_errors"]:
            probs = "".join(f"<li class='err'>{escape(p)}</li>" for p in e["problems"])
            parts.append(f"<li><code>{escape(e['file'])}</code><ul>{probs}</ul></li>")
        parts.append("</ul>")
    for r in report["regimes"]:
        parts.append(f"<h2>{escape(r['name'])}</h2><p>File: <code>{escape(r['file'])}</code></p>")
        parts.append(render_curves.html(r))
        if r["rule_hits"]:
            parts.append("<h3>Rules that fired in the verdicts</h3>")
            parts.append(
                _table(
                    ["rule", "spam hits", "ham hits"],
                    [[escape(k), str(v["spam"]), str(v["ham"])] for k, v in r["rule_hits"].items()],
                )
            )
        if r["ham_blocks"]:
            parts.append(f"<h3>Legitimate mail blocked: {len(r['ham_blocks'])}</h3>")
            parts.append(
                _table(
                    ["message", "action", "forced by", "rules", "tier"],
                    [
                        [
                            f"<a href='{escape(b['facts'])}'>{escape(b['id'])}</a>",
                            b["action"],
                            escape(b["forced_by"] or ""),
                            escape(", ".join(b["rules"])),
                            escape(b["tier"] or "none"),
                        ]
                        for b in r["ham_blocks"]
                    ],
                )
            )
    dis = report["disagreements"]
    parts.append(f"<h2>Messages on which regimes disagree: {len(dis)}</h2>")
    pairs = report["disagreement_pairs"]
    if names:
        parts.append(
            _table(
                ["differ from", *names],
                [[escape(a)] + [str(pairs[a][b]) for b in names] for a in names],
            )
        )
    if dis:
        parts.append(
            _table(
                ["message", "label", *names],
                [
                    [f"<a href='{escape(d['facts'])}'>{escape(d['id'])}</a>", d["label"]]
                    + [
                        f"<span class='{_cls(d['actions'][n])}'>{d['actions'][n]}</span>"
                        for n in names
                    ]
                    for d in dis
                ],
            )
        )
    if c["unreadable"]:
        parts.append(f"<h2>Unreadable messages: {len(c['unreadable'])}</h2>")
        parts.append(
            _table(
                ["message", "label", "reason"],
                [[escape(u["id"]), u["label"], escape(u["reason"])] for u in c["unreadable"]],
            )
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _message_section(page: Mapping[str, Any]) -> str:
    """One message's facts and every regime's verdict on it."""
    facts_rows = [
        [
            escape(name),
            f["tier"],
            escape(json.dumps(f["value"]))
            if f["error"] is None
            else f"<span class='err'>{escape(f['error'])}</span>",
        ]
        for name, f in page["facts"].items()
    ]
    verdict_rows = [
        [
            escape(name),
            f"<span class='{_cls(v['action'])}'>{v['action']}</span>",
            str(v["score"]),
            escape(v["tier"] or "none"),
            escape(", ".join(v["rules"])),
            escape(", ".join(v["facts"])),
        ]
        for name, v in page["verdicts"].items()
    ]
    return "\n".join(
        [
            f"<section id='m{page['digest'][:16]}'><h2>{escape(page['id'])}</h2>",
            f"<p>label: {page['label']}; sha256: <code>{page['digest']}</code></p>",
            "<h3>Verdicts</h3>",
            _table(
                ["regime", "action", "score", "tier", "rules fired", "facts read"], verdict_rows
            ),
            "<h3>Facts (computed once, shared by every regime)</h3>",
            _table(["fact", "tier", "value"], facts_rows),
            "</section>",
        ]
    )


def messages_html(pages: Sequence[Mapping[str, Any]]) -> str:
    """A page of message sections (one shard of the per-message facts)."""
    return "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>Message facts</title><style>{_CSS}</style></head><body>",
            "<p><a href='../report.html'>report</a></p>",
            *(_message_section(p) for p in pages),
            "</body></html>",
        ]
    )
