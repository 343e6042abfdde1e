"""The lab report's HTML at scale, in headless Chromium; and the report screenshot.

    .venv/bin/python -m bench.lab_html measure [--messages 100000] [--keep DIR]
    .venv/bin/python -m bench.lab_html screenshot     # rewrites docs/lab/report.png

`measure` builds a synthetic study with the lab's own report builder (stats.build_report
and run.write_report, the code `relay lab` runs): N messages (40% spam) under every
regime in config/regimes/, each rule matching a message at random (seeded) with a
per-rule rate for spam and for ham, and the bulk-sender regime's `unauthenticated`
matching every message, as on the 2002 corpus, so the regimes disagree on almost every
message. Verdicts are recomputed from the matches exactly as the report's curves are
(rescore.py). Message fact pages are written small (no facts), since they are not the
report page. It then records the files' sizes and, in headless Chromium over a loopback
HTTP server, the report page's navigation timing (DOMContentLoaded and load, from the
Navigation Timing API of the page loaded in an iframe) and how long the disagreement
table takes to show a filtered page, a second filter, the last page and a 200-row page
(each from setting the page's address, until the pager shows the new rows). The harness
page posts its numbers back to the server. Results: bench/results/lab_html.{json,md}.

`screenshot` runs the real `relay lab` on tests/fixtures/lab (as tests/test_lab_browser.py
does), takes a full-page screenshot in headless Chromium and stores it with 64 colours
(text stays sharp; the file stays far under 300 KB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support import chromium

from relay.config import settings_from_mapping
from relay.corpus import Label
from relay.lab.corpus import CorpusMessage, holding
from relay.lab.env import LabEnv
from relay.lab.evaluate import Decision, Regime, load_regimes, regime_rules
from relay.lab.rescore import action_of, rescore
from relay.lab.run import write_report
from relay.lab.stats import build_report
from relay.message import Envelope, Peer

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCREENSHOT = REPO / "docs" / "lab" / "report.png"
FIXTURES = REPO / "tests" / "fixtures" / "lab"
MAIN_PAGE_TARGET = 2 * 1024 * 1024


def synthetic(n: int, seed: int) -> tuple[list[CorpusMessage], list[Regime], dict[str, Any]]:
    rng = random.Random(seed)
    env = LabEnv(settings=settings_from_mapping({"model": {"enabled": False}}))
    regimes, errors = load_regimes(
        sorted((REPO / "config" / "regimes").glob("*.toml")), env.registry()
    )
    if errors:
        raise SystemExit(f"regime files with errors: {errors}")
    messages = []
    for i in range(n):
        label: Label = "spam" if rng.random() < 0.4 else "ham"
        mid = f"synthetic/{label}/{i:06d}.eml"
        messages.append(
            CorpusMessage(
                id=mid,
                label=label,
                digest=hashlib.sha256(mid.encode()).hexdigest(),
                source=holding(mid, label, b""),
                time=float(i),
                index=i,
                envelope=Envelope("a@example.org", ("b@example.net",)),
                peer=Peer("192.0.2.1"),
            )
        )
    decisions: dict[str, dict[str, Decision]] = {m.id: {} for m in messages}
    for regime in regimes:
        rules = regime_rules(regime.policy)
        assert rules is not None
        defs = rules.by_name()
        rates = {r.name: (rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.12)) for r in rules.rules}
        if regime.name == "bulk_sender_2024" and "unauthenticated" in rates:
            rates["unauthenticated"] = (1.0, 1.0)
        tier = rng.choice(("T1", "T2", "T3"))
        for m in messages:
            side = 0 if m.label == "spam" else 1
            matched = tuple(r.name for r in rules.rules if rng.random() < rates[r.name][side])
            scored = rescore(matched, defs)
            action = action_of(scored, (rules.bands,))
            forced = next((r for r in matched if defs[r].action == scored.forced), None)
            decisions[m.id][regime.name] = Decision(
                action=action,
                score=round(scored.score, 4),
                tier=tier,
                rules=matched,
                forced_by=forced if scored.forced else None,
                reason="",
                facts=(),
                skipped=(),
                matched=matched,
                bands=(rules.bands,),
            )
    return messages, regimes, decisions


def build(n: int, out: Path, seed: int = 18) -> dict[str, Any]:
    t0 = time.perf_counter()
    messages, regimes, decisions = synthetic(n, seed)
    t1 = time.perf_counter()
    report = build_report(
        corpus_description=f"synthetic ({n} messages, seed {seed})",
        messages=messages,
        unreadable=[],
        regimes=regimes,
        regime_errors=[],
        decisions=decisions,
        dns={"mode": "offline", "trusted_authserv_ids": []},
        inputs={},
        model={},
        facts_info={},
        timings={},
    )
    t2 = time.perf_counter()
    listed = {d["id"] for d in report["disagreements"]}
    listed |= {b["id"] for r in report["regimes"] for b in r["ham_blocks"]}
    pages = {
        m.digest: {
            "id": m.id,
            "label": m.label,
            "digest": m.digest,
            "facts": {},
            "verdicts": {k: d.to_dict() for k, d in decisions[m.id].items()},
        }
        for m in messages
        if m.id in listed
    }
    write_report(report, out, pages)
    t3 = time.perf_counter()
    return {
        "messages": n,
        "regimes": len(regimes),
        "disagreements": len(report["disagreements"]),
        "ham_blocks": {r["name"]: len(r["ham_blocks"]) for r in report["regimes"]},
        "seconds": {
            "synthetic_decisions": round(t1 - t0, 2),
            "build_report": round(t2 - t1, 2),
            "write_report": round(t3 - t2, 2),
        },
    }


def _tree(path: Path) -> dict[str, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


HARNESS = """<!doctype html><html><head><meta charset='utf-8'><title>harness</title></head>
<body><script>
"use strict";
const RUNS = __RUNS__;
function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }
function loaded(frame) {
  return new Promise((r) => frame.addEventListener("load", r, {once: true}));
}
async function settle(win, where) {
  // The pager says "loading..." while files arrive; the new text is the rows shown.
  while (where.textContent === "" || where.textContent === "loading...") { await sleep(2); }
}
async function op(win, hash) {
  const where = win.document.querySelector("#t-dis .where");
  where.textContent = "";
  const t0 = performance.now();
  win.location.hash = hash;
  await settle(win, where);
  return {hash: hash, ms: performance.now() - t0, shown: where.textContent};
}
async function main() {
  const out = {runs: []};
  for (let i = 0; i < RUNS; i++) {
    const frame = document.createElement("iframe");
    frame.width = 1200; frame.height = 800;
    frame.src = "report.html?run=" + i;
    document.body.appendChild(frame);
    await loaded(frame);
    await sleep(50);
    const win = frame.contentWindow, nav = win.performance.getEntriesByType("navigation")[0];
    const m = JSON.parse(win.document.querySelector("#t-dis script.lab-manifest").textContent);
    const rule = encodeURIComponent(m.filters[3].values[0][0]);
    const last = Math.ceil(m.n / m.page);
    const run = {
      dom_content_loaded_ms: nav.domContentLoadedEventEnd,
      load_ms: nav.loadEventEnd,
      html_bytes: nav.decodedBodySize,
      ops: []
    };
    for (const hash of ["#t-dis?label=ham", "#t-dis?label=ham&rule=" + rule,
                        "#t-dis?p=" + last, "#t-dis?n=200&p=100"]) {
      run.ops.push(await op(win, hash));
    }
    out.runs.push(run);
    frame.remove();
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
}
main().catch((e) => fetch("/result", {method: "POST", body: JSON.stringify({error: String(e)})}));
</script></body></html>
"""


def browser_timings(binary: str, out: Path, runs: int = 3) -> dict[str, Any]:
    (out / "harness.html").write_text(HARNESS.replace("__RUNS__", str(runs)))
    posted: queue.Queue[tuple[str, bytes]] = queue.Queue()
    with chromium.serve(out, posted) as base, tempfile.TemporaryDirectory() as profile:
        # No --dump-dom: the harness keeps working after `load`, and posts when done.
        proc = subprocess.Popen(
            chromium.command(binary, Path(profile), base + "harness.html"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=chromium.environment(),
        )
        try:
            _, body = posted.get(timeout=300)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    data: dict[str, Any] = json.loads(body)
    if "error" in data:
        raise SystemExit(f"harness failed: {data['error']}")
    return data


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(r[key] for r in runs)), 1)


def measure(n: int, keep: Path | None) -> dict[str, Any]:
    binary = chromium.find_chromium()
    if binary is None:
        raise SystemExit("no chromium: `make system-deps` installs Debian's chromium")
    with tempfile.TemporaryDirectory(prefix="lab-html-") as scratch:
        out = keep or Path(scratch) / "report"
        built = build(n, out)
        sizes = {
            "report.html": (out / "report.html").stat().st_size,
            "report.json": (out / "report.json").stat().st_size,
            "report.md": (out / "report.md").stat().st_size,
            "tables/": _tree(out / "tables"),
            "messages/": _tree(out / "messages"),
            "largest table file": max(p.stat().st_size for p in (out / "tables").rglob("*.js")),
        }
        timings = browser_timings(binary, out)
    runs = timings["runs"]
    ops = [
        {
            "hash": runs[0]["ops"][i]["hash"],
            "first_ms": round(runs[0]["ops"][i]["ms"], 1),
            "median_ms": round(statistics.median(r["ops"][i]["ms"] for r in runs), 1),
            "shown": runs[0]["ops"][i]["shown"],
        }
        for i in range(len(runs[0]["ops"]))
    ]
    return {
        "built": built,
        "sizes": sizes,
        "main_page_target_bytes": MAIN_PAGE_TARGET,
        "browser": {
            "chromium": subprocess.run(
                [binary, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "runs": len(runs),
            "first_load_ms": round(runs[0]["load_ms"], 1),
            "median_dom_content_loaded_ms": _median(runs, "dom_content_loaded_ms"),
            "median_load_ms": _median(runs, "load_ms"),
            "ops": ops,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
    }


def markdown(r: dict[str, Any]) -> str:
    s, b = r["sizes"], r["browser"]
    lines = [
        "# Lab report HTML at scale",
        "",
        f"{r['built']['messages']} synthetic messages, {r['built']['regimes']} regimes, "
        f"{r['built']['disagreements']} disagreements (`python -m bench.lab_html measure`). "
        f"{b['chromium']}, headless, over loopback HTTP; {r['machine']['cpus']} cores, load "
        f"average {r['machine']['loadavg']}.",
        "",
        "| file | size |",
        "|---|---|",
        f"| report.html | {s['report.html'] / 1024:.0f} KiB (target < 2 MiB) |",
        f"| tables/ (pages and filters, on demand) | {s['tables/']['bytes'] / 2**20:.1f} MiB "
        f"in {s['tables/']['files']} files, the largest {s['largest table file'] / 1024:.0f} KiB |",
        f"| report.json (every list, ranked) | {s['report.json'] / 2**20:.1f} MiB |",
        f"| report.md | {s['report.md'] / 1024:.0f} KiB |",
        "",
        f"Page load (median of {b['runs']}): DOMContentLoaded {b['median_dom_content_loaded_ms']} "
        f"ms, load {b['median_load_ms']} ms (first: {b['first_load_ms']} ms).",
        "",
        "| disagreement table | first | median | shows |",
        "|---|---|---|---|",
        *(
            f"| `{o['hash']}` | {o['first_ms']} ms | {o['median_ms']} ms | {o['shown']} |"
            for o in b["ops"]
        ),
        "",
        f"Report written in {r['built']['seconds']['build_report']} s (build_report) + "
        f"{r['built']['seconds']['write_report']} s (write_report, all files).",
        "",
    ]
    return "\n".join(lines)


def screenshot(path: Path = SCREENSHOT, width: int = 1100) -> None:
    from PIL import Image

    from relay.cli.main import main

    binary = chromium.find_chromium()
    if binary is None:
        raise SystemExit("no chromium: `make system-deps` installs Debian's chromium")
    with tempfile.TemporaryDirectory(prefix="lab-shot-") as scratch:
        tmp = Path(scratch)
        (tmp / "relay.toml").write_text(
            '[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n'
        )
        args = [
            "lab", "--corpus", str(FIXTURES / "corpus"), "--labels", str(FIXTURES / "labels.tsv"),
            "--set", "test", "--config", str(tmp / "relay.toml"), "--no-cache", "--jobs", "1",
            "--out", str(tmp / "out"), "--policy", str(FIXTURES / "policies" / "auth_only.toml"),
            str(FIXTURES / "policies" / "size_only.toml"),
        ]  # fmt: skip
        if main(args) != 0:
            raise SystemExit("relay lab failed")
        shot = tmp / "shot.png"
        with chromium.serve(tmp / "out") as base:
            # Headless screenshots show the window from the top, so the window is as
            # tall as the page: the whole report in one picture.
            chromium.screenshot(binary, base + "report.html", shot, width, 4300)
        image = Image.open(shot).convert("RGB")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size} bytes")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--messages", type=int, default=100_000)
    m.add_argument("--keep", type=Path, help="write the report here and keep it")
    sub.add_parser("screenshot")
    args = parser.parse_args()
    if args.command == "screenshot":
        screenshot()
        return
    result = measure(args.messages, args.keep)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lab_html.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "lab_html.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    cli()
