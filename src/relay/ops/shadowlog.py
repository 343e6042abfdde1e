"""Shadow-mode log: regimes evaluated next to the enforced policy, one JSON line per verdict.

The relay evaluates ``[policy] shadow`` regimes on live mail without acting on them;
``ShadowLog`` writes what each decided (and what the enforced policy decided, for
comparison) to ``[policy] shadow_log``, and ``relay lab --shadow-log FILE`` reports on it.

A line holds the queue id, policy, mode, action, score, highest tier, rules that fired,
the forcing rule, message size and recipient count: never a body, a subject or an address.
Writing happens on one background thread, so the event loop never waits for the disk.

Wiring (app.py): wrap the relay's observer, and close it on the lifespan stack::

    if settings.policy.shadow_log is not None:
        observer = ShadowLog(settings.policy.shadow_log, inner=observer)
        stack.callback(observer.close)
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from html import escape
from pathlib import Path
from typing import Any

from relay.contracts import MessageReport, NullObserver, Observer
from relay.verdict import Verdict

_STOP = None


def verdict_line(verdict: Verdict, report: MessageReport, *, shadow: bool) -> dict[str, Any]:
    """One line; ``mode`` is the verdict's role here (enforced or evaluated in shadow),
    whatever mode its policy file declares."""
    return {
        "ts": round(time.time(), 3),
        "queue_id": report.queue_id,
        "policy": verdict.policy,
        "mode": "shadow" if shadow else "enforce",
        "action": verdict.action.value,
        "score": round(verdict.score, 4),
        "tier": None if verdict.highest_tier is None else verdict.highest_tier.label,
        "rules": [h.rule for h in verdict.hits],
        "forced_by": verdict.forced_by,
        "size": report.size,
        "recipients": report.recipients,
    }


class ShadowLog:
    """An Observer that forwards everything to ``inner`` and logs shadow verdicts."""

    def __init__(self, path: Path, inner: Observer | None = None) -> None:
        self.path = path
        self.inner: Observer = inner or NullObserver()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="relay-shadowlog", daemon=True)
        self._thread.start()
        self._closed = False

    def _write(self) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            while True:
                line = self._queue.get()
                if line is _STOP:
                    return
                fh.write(line)
                if self._queue.empty():
                    fh.flush()

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()

    def message_done(self, report: MessageReport) -> None:
        self.inner.message_done(report)
        if report.shadow and not self._closed:
            lines = [verdict_line(report.verdict, report, shadow=False)]
            lines += [verdict_line(v, report, shadow=True) for v in report.shadow]
            self._queue.put("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))

    def connection_opened(self) -> None:
        self.inner.connection_opened()

    def connection_closed(self) -> None:
        self.inner.connection_closed()

    def connection_refused(self) -> None:
        self.inner.connection_refused()

    def smtp_reply(self, code: int) -> None:
        self.inner.smtp_reply(code)

    def shadow_verdict(self, verdict: Verdict) -> None:
        self.inner.shadow_verdict(verdict)

    def policy_reload(self, ok: bool) -> None:
        self.inner.policy_reload(ok)


# --- reporting -----------------------------------------------------------------------

_CLASS = {"reject": "hard", "tempfail": "hard", "tag": "soft", "quarantine": "soft"}
TIERS = ("none", "T0", "T1", "T2", "T3")


def read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record) per verdict line; (line number, problem) for a line that is
    not one (not JSON, or missing queue_id, policy or action). Blank lines are skipped;
    OSError when the file cannot be read."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, f"not JSON: {exc.msg}"
                continue
            if not isinstance(item, dict) or not {"queue_id", "policy", "action"} <= item.keys():
                yield lineno, "missing queue_id, policy or action"
                continue
            yield lineno, item


def summarise(path: Path) -> dict[str, Any]:
    """Per policy: actions, tiers, rule hits and agreement with the enforced policy."""
    by_message: dict[str, dict[str, dict[str, Any]]] = {}
    bad: list[dict[str, Any]] = []
    lines = 0
    for lineno, item in read_lines(path):
        lines += 1
        if isinstance(item, str):
            bad.append({"line": lineno, "reason": item})
            continue
        by_message.setdefault(str(item["queue_id"]), {})[str(item["policy"])] = item
    policies: dict[str, dict[str, Any]] = {}
    for verdicts in by_message.values():
        enforced = next((v for v in verdicts.values() if v.get("mode") == "enforce"), None)
        for name, v in verdicts.items():
            p = policies.setdefault(
                name,
                {
                    "mode": v.get("mode", "shadow"),
                    "messages": 0,
                    "actions": Counter(),
                    "tiers": Counter(),
                    "rules": Counter(),
                    "agree": 0,
                    "compared": 0,
                },
            )
            p["messages"] += 1
            p["actions"][v["action"]] += 1
            p["tiers"][v.get("tier") or "none"] += 1
            p["rules"].update(v.get("rules") or [])
            if enforced is not None and v is not enforced:
                p["compared"] += 1
                same = _CLASS.get(v["action"], "pass") == _CLASS.get(enforced["action"], "pass")
                p["agree"] += int(same)
    return {
        "source": str(path),
        "lines": lines,
        "messages": len(by_message),
        "malformed": bad,
        "policies": {
            name: {
                "mode": p["mode"],
                "messages": p["messages"],
                "actions": dict(p["actions"]),
                "tiers": {t: p["tiers"][t] for t in TIERS},
                "content_read": p["tiers"]["T3"] / p["messages"] if p["messages"] else None,
                "agrees_with_enforced": p["agree"] / p["compared"] if p["compared"] else None,
                "rules": dict(p["rules"].most_common()),
            }
            for name, p in sorted(policies.items())
        },
    }


def markdown(summary: Mapping[str, Any]) -> str:
    out = [
        "# Shadow-mode report",
        "",
        f"{summary['source']}: {summary['messages']} messages, {summary['lines']} lines, "
        f"{len(summary['malformed'])} malformed.",
        "",
        "| policy | mode | messages | accept | tag | quarantine | tempfail | reject "
        "| content read (T3) | same outcome as enforced |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in summary["policies"].items():
        a = p["actions"]
        read = "n/a" if p["content_read"] is None else f"{100 * p['content_read']:.1f}%"
        agree = (
            "n/a"
            if p["agrees_with_enforced"] is None
            else (f"{100 * p['agrees_with_enforced']:.1f}%")
        )
        counts = " | ".join(
            str(a.get(k, 0)) for k in ("accept", "tag", "quarantine", "tempfail", "reject")
        )
        out.append(f"| {name} | {p['mode']} | {p['messages']} | {counts} | {read} | {agree} |")
    for m in summary["malformed"]:
        out.append(f"\n- line {m['line']}: {m['reason']}")
    return "\n".join(out) + "\n"


def report_shadow_log(path: Path, out: Path) -> dict[str, Any]:
    """Write shadow.json, shadow.md and shadow.html under ``out``; returns the summary."""
    summary = summarise(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shadow.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(json.loads((out / "shadow.json").read_text()))
    (out / "shadow.md").write_text(text)
    (out / "shadow.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Shadow-mode report</title>"
        f"<pre>{escape(text)}</pre>\n"
    )
    return summary
