"""Markdown and HTML renderings of the report JSON, and the per-message fact pages.

One module because the Markdown, HTML and per-message renderings read the same report
fields through shared helpers; over 300 lines because the HTML report is mostly template
text.

Both renderings take the report mapping only (as written to report.json), so every
number a person reads is one a machine can check. Everything interpolated into HTML is
escaped: message ids and rule reasons come from the corpus and the policy files.

Message lists stay readable at any size: they arrive ranked (stats.RANKING); Markdown
shows the first MD_LIST_LIMIT rows and says how many more there are and where, the HTML
shows one page of each list and pages and filters the rest from static files
(tables.py, built by ``report_tables``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from relay.lab import render_curves
from relay.lab import tables as paged
from relay.lab.tables import Cell, Filter, Table, outcome_css

MD_LIST_LIMIT = 50
ACTION_ORDER = ("reject", "tempfail", "quarantine", "tag", "accept")


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


def _ranked_as(d: Mapping[str, Any]) -> str:
    key = d.get("key")
    if not key:
        return ""
    return f"{key['class']}: {key['right']} of {key['right'] + key['wrong']} right"


def _more(total: int, field: str, anchor: str) -> list[str]:
    """The line under a cut Markdown list: how many more, and where the whole list is."""
    if total <= MD_LIST_LIMIT:
        return []
    return [
        "",
        f"Top {MD_LIST_LIMIT} of {total}; {total - MD_LIST_LIMIT} more: the full ranked list "
        f"is {field} in report.json, paged and filterable in "
        f"[report.html](report.html#{anchor}).",
    ]


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
        ranking = report.get("ranking", {}).get("disagreements")
        if ranking:
            lines += [f"Ranked {ranking}.", ""]
        lines += [
            "| # | message | label | ranked as | " + " | ".join(names) + " |",
            "|---|---|---|---|" + "---|" * len(names),
        ]
        for i, d in enumerate(dis[:MD_LIST_LIMIT], 1):
            acts = " | ".join(d["actions"][n] for n in names)
            lines.append(
                f"| {d.get('rank', i)} | {_message_md(d)} | {d['label']} "
                f"| {_ranked_as(d)} | {acts} |"
            )
        lines += _more(len(dis), "`disagreements`", "t-dis")
    if c["unreadable"]:
        lines += ["", f"## Unreadable messages: {len(c['unreadable'])}", ""]
        lines += [
            f"- {u['id']} ({u['label']}): {u['reason']}" for u in c["unreadable"][:MD_LIST_LIMIT]
        ]
        lines += _more(len(c["unreadable"]), "`corpus.unreadable`", "t-unr")
    lines += ["", "![trade-off](plots/tradeoff.png)", "", "![tiers](plots/tiers.png)", ""]
    return "\n".join(lines)


_CSS = (
    """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px}th{background:#f2f2f2}.num{text-align:right}
.hard{background:#f8d0cc}.soft{background:#fde9c8}.pass{background:#e3f2df}
img{max-width:100%}code{background:#f4f4f4}.err{color:#a00}svg.curve{display:block}
"""
    + paged.CSS
)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    out += [
        "<tr>" + "".join(rows_cell) + "</tr>"
        for rows_cell in (["<td>" + cell + "</td>" for cell in row] for row in rows)
    ]
    out.append("</table>")
    return "\n".join(out)


def _message_cell(row: Mapping[str, Any]) -> Cell:
    """The message id, linked to its fact page when the report wrote one (the first
    rows of each list: stats.PAGES)."""
    return row["id"] if row.get("facts") is None else (row["id"], row["facts"])


def _message_md(row: Mapping[str, Any]) -> str:
    return row["id"] if row.get("facts") is None else f"[{row['id']}]({row['facts']})"


def _ham_key(report: Mapping[str, Any], regime: Mapping[str, Any]) -> str:
    return f"hb{report['regimes'].index(regime)}"


def _disagreement_table(report: Mapping[str, Any]) -> Table:
    names = [r["name"] for r in report["regimes"]]
    dis = report["disagreements"]
    rows: list[list[Cell]] = [
        [str(d.get("rank", i)), _message_cell(d), d["label"], _ranked_as(d)]
        + [d["actions"][n] for n in names]
        for i, d in enumerate(dis, 1)
    ]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    per_pair = [
        [
            f"{a} / {b}"
            for a, b in pairs
            if outcome_css(d["actions"][a]) != outcome_css(d["actions"][b])
        ]
        for d in dis
    ]
    per_rule = [
        [f"{n}: {r}" for n, rules in d.get("rules", {}).items() for r in rules] for d in dis
    ]
    classes = [[d["key"]["class"]] if d.get("key") else [] for d in dis]
    ranking = report.get("ranking", {}).get("disagreements", "in corpus order")
    return Table(
        key="dis",
        title="Messages on which regimes disagree",
        note=f"Ranked {ranking}.",
        head=("#", "message", "label", "ranked as", *names),
        kinds=("text", "link", "text", "text", *(["action"] * len(names))),
        rows=rows,
        filters=(
            Filter.of("label", "label", [[d["label"]] for d in dis], ("spam", "ham")),
            Filter.of(
                "class", "class", classes, list(dict.fromkeys(v for x in classes for v in x))
            ),
            Filter.of("pair", "regimes differing", per_pair, [f"{a} / {b}" for a, b in pairs]),
            Filter.of("rule", "rule fired", per_rule),
        ),
    )


def _ham_table(report: Mapping[str, Any], regime: Mapping[str, Any]) -> Table:
    names = [r["name"] for r in report["regimes"] if r["name"] != regime["name"]]
    blocks = regime["ham_blocks"]
    rows: list[list[Cell]] = [
        [
            str(b.get("rank", i)),
            _message_cell(b),
            b["action"],
            b["forced_by"] or "",
            ", ".join(b["rules"]),
            b["tier"] or "none",
            ", ".join(b.get("delivered_by", ())) or "no other regime",
        ]
        for i, b in enumerate(blocks, 1)
    ]
    ranking = report.get("ranking", {}).get("ham_blocks", "in corpus order")
    return Table(
        key=_ham_key(report, regime),
        title=f"{regime['name']}: legitimate mail blocked",
        note=f"Ranked {ranking}.",
        head=("#", "message", "action", "forced by", "rules", "tier", "delivered by"),
        kinds=("text", "link", "action", "text", "text", "text", "text"),
        rows=rows,
        filters=(
            Filter.of("action", "action", [[b["action"]] for b in blocks], ACTION_ORDER),
            Filter.of("rule", "rule fired", [b["rules"] for b in blocks]),
            Filter.of(
                "delivered",
                "delivered by",
                [b.get("delivered_by") or ["no other regime"] for b in blocks],
                [*names, "no other regime"],
            ),
        ),
    )


def _unreadable_table(report: Mapping[str, Any]) -> Table:
    items = report["corpus"]["unreadable"]
    return Table(
        key="unr",
        title="Unreadable messages",
        note="In corpus order.",
        head=("message", "label", "reason"),
        kinds=("text", "text", "text"),
        rows=[[u["id"], u["label"], u["reason"]] for u in items],
        filters=(Filter.of("label", "label", [[u["label"]] for u in items], ("spam", "ham")),),
    )


def report_tables(report: Mapping[str, Any]) -> list[Table]:
    """The report's message lists as paged tables (their files: tables.write)."""
    out = [_ham_table(report, r) for r in report["regimes"] if r["ham_blocks"]]
    if report["disagreements"]:
        out.append(_disagreement_table(report))
    if report["corpus"]["unreadable"]:
        out.append(_unreadable_table(report))
    return out


def html(report: Mapping[str, Any], tables: Sequence[Table] | None = None) -> str:
    """The report page; ``tables`` are report_tables(report) when already built."""
    c = report["corpus"]
    names = [r["name"] for r in report["regimes"]]
    by_key = {t.key: t for t in (report_tables(report) if tables is None else tables)}
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
            parts.append(paged.html(by_key[_ham_key(report, r)]))
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
        parts.append(paged.html(by_key["dis"]))
    if c["unreadable"]:
        parts.append(f"<h2>Unreadable messages: {len(c['unreadable'])}</h2>")
        parts.append(paged.html(by_key["unr"]))
    if by_key:
        parts.append(f"<script>{paged.SCRIPT}</script>")
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
            f"<span class='{outcome_css(v['action'])}'>{v['action']}</span>",
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
