"""Ranked and paged message lists of the lab report (stats.py ranking, tables.py files,
render.py Markdown cut). The browser side is tests/test_lab_browser.py.

Hand-made disagreements over three regimes A, B, C (right per the label: spam stopped,
anything but accept; ham delivered, accept or tag):

    msg  label  A         B           C           class                  right  split
    m1   ham    reject    accept      accept      legitimate blocked     2      1
    m2   ham    reject    quarantine  accept      legitimate blocked     1      1
    m3   spam   accept    reject      tag         spam let through       2      1
    m4   ham    tag       accept      accept      degree only            3      1
    m5   ham    reject    quarantine  quarantine  legitimate blocked     0      0
    m6   spam   reject    reject      reject      (agree: not listed)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any, cast

from relay.lab import render, tables
from relay.lab.corpus import CorpusMessage, holding
from relay.lab.evaluate import Decision, Regime
from relay.lab.stats import disagreement_key, disagreements, rank_ham_blocks
from relay.message import Envelope, Peer

CASES = {
    "m1": ("ham", ("reject", "accept", "accept")),
    "m2": ("ham", ("reject", "quarantine", "accept")),
    "m3": ("spam", ("accept", "reject", "tag")),
    "m4": ("ham", ("tag", "accept", "accept")),
    "m5": ("ham", ("reject", "quarantine", "quarantine")),
    "m6": ("spam", ("reject", "reject", "reject")),
}
NAMES = ("A", "B", "C")


def _message(mid: str, label: str) -> CorpusMessage:
    return CorpusMessage(
        id=mid,
        label="spam" if label == "spam" else "ham",
        digest=hashlib.sha256(mid.encode()).hexdigest(),
        source=holding(mid, "ham", b""),
        time=0.0,
        index=0,
        envelope=Envelope("a@example.org", ("b@example.net",)),
        peer=Peer("192.0.2.1"),
    )


def _decision(action: str) -> Decision:
    rules = ("r_" + action,) if action != "accept" else ()
    return Decision(action, 0.0, "T1", rules, None, "", (), ())


def _ranked() -> list[dict[str, Any]]:
    regimes = [Regime(n, Path(n), cast(Any, None)) for n in NAMES]
    messages = [_message(mid, label) for mid, (label, _) in CASES.items()]
    decisions = {
        mid: {n: _decision(a) for n, a in zip(NAMES, acts, strict=True)}
        for mid, (_, acts) in CASES.items()
    }
    rows, _ = disagreements(regimes, messages, decisions)
    return rows


def test_disagreements_most_informative_first() -> None:
    rows = _ranked()
    # Legitimate mail blocked first; among those the split with the right regimes in the
    # minority (m2) first, all-wrong (m5) last; then spam let through, then degree only.
    assert [r["id"] for r in rows] == ["m2", "m1", "m5", "m3", "m4"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["key"] == {
        "class": "legitimate mail blocked",
        "split": 1,
        "right": 1,
        "wrong": 2,
        "hard_wrong": 1,
    }
    assert rows[0]["rules"] == {"A": ["r_reject"], "B": ["r_quarantine"]}


def test_even_splits_come_before_lone_dissenters() -> None:
    lone = disagreement_key("ham", {"A": "reject", "B": "accept", "C": "accept", "D": "accept"})
    even = disagreement_key("ham", {"A": "reject", "B": "reject", "C": "accept", "D": "accept"})
    assert (lone["split"], even["split"]) == (1, 2)


def test_ham_blocks_hard_first_then_own_mistakes() -> None:
    blocks = [
        {"id": "q", "action": "quarantine", "delivered_by": ["B", "C"]},
        {"id": "r1", "action": "reject", "delivered_by": []},
        {"id": "r2", "action": "reject", "delivered_by": ["B"]},
    ]
    assert [(b["id"], b["rank"]) for b in rank_ham_blocks(blocks)] == [
        ("r2", 1),
        ("r1", 2),
        ("q", 3),
    ]


def _report(n: int) -> dict[str, Any]:
    """A report mapping with n disagreements (every other one ham) and nothing else."""
    rows = [
        {
            "id": f"msg/{i:05d}</script>",  # ids come from the corpus: never markup
            "label": "ham" if i % 2 else "spam",
            "actions": {"A": "reject", "B": "accept"},
            "rules": {"A": ["</script>block"]} if i % 3 == 0 else {},
            "facts": f"messages/00.html#m{i:016x}",
            "key": {"class": "degree only", "split": 1, "right": 2, "wrong": 0, "hard_wrong": 0},
            "rank": i + 1,
        }
        for i in range(n)
    ]
    return {
        "corpus": {"source": "x", "messages": n, "readable": n, "spam": 0, "ham": 0},
        "dns": {"mode": "offline"},
        "inputs": {},
        "model": {},
        "regimes": [],
        "regime_errors": [],
        "disagreements": rows,
        "disagreement_pairs": {},
        "ranking": {"disagreements": "somehow"},
    }


def test_html_holds_one_page_and_the_files_hold_every_row(tmp_path: Path) -> None:
    n = tables.CHUNK_ROWS + 7
    report = _report(n)
    report["corpus"]["unreadable"] = []
    page = render.html(report)
    assert page.count("<tr><td>") == tables.PAGE_ROWS
    # Rule names reach the inline manifest: "</script>" in one must not end its element.
    manifest = re.search(
        r"<script type='application/json' class='lab-manifest'>(.*?)</script>", page
    )
    assert manifest
    rule_filter = json.loads(manifest.group(1))["filters"][3]
    assert rule_filter["values"] == [["A: </script>block", (n + 2) // 3]]
    assert "msg/00000&lt;/script&gt;" in page  # escaped in the inline rows
    assert f"rows 1 to {tables.PAGE_ROWS} of {n}" in page
    assert "eval(" not in page and "innerHTML" not in page

    written = tables.write(render.report_tables(report), tmp_path)
    folder = tmp_path / "tables" / "dis"
    chunks = sorted(folder.glob("c*.js"))
    assert [c.name for c in chunks] == ["c0.js", "c1.js"] and written == len(list(folder.iterdir()))
    got: list[Any] = []
    for chunk in chunks:
        found = re.fullmatch(r'LAB\.rows\("dis",(\d+),(.*)\);\n', chunk.read_text(), re.S)
        assert found
        got += json.loads(found.group(2))
    assert [r[0] for r in got] == [str(i + 1) for i in range(n)]  # rank order, all rows
    # Filter "label" (index 0), value "ham" (index 1): a bitset of the odd rows.
    text = (folder / "f0-1.js").read_text()
    found = re.fullmatch(r'LAB\.bits\("dis","f0-1","([A-Za-z0-9+/=]*)"\);\n', text)
    assert found
    bits = base64.b64decode(found.group(1))
    assert [i for i in range(n) if bits[i >> 3] & (1 << (i & 7))] == list(range(1, n, 2))
    # A second run over fewer rows leaves no stale file behind.
    tables.write(render.report_tables(_report(3) | {"corpus": report["corpus"]}), tmp_path)
    assert sorted(p.name for p in folder.glob("c*.js")) == ["c0.js"]


def test_markdown_shows_the_top_and_says_where_the_rest_is() -> None:
    n = render.MD_LIST_LIMIT + 12
    report = _report(n)
    report["corpus"]["unreadable"] = []
    md = render.markdown(report)
    assert md.count("| degree only: 2 of 2 right |") == render.MD_LIST_LIMIT
    assert (
        f"Top {render.MD_LIST_LIMIT} of {n}; 12 more: the full ranked list is "
        "`disagreements` in report.json, paged and filterable in "
        "[report.html](report.html#t-dis)." in md
    )
    assert "Ranked somehow." in md
