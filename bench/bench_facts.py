"""Cost and values of the header, content, bulk and oracle-free facts on the SpamAssassin corpus.

    .venv/bin/python -m bench.bench_facts     # writes bench/results/facts.{json,md}

Extracts the five tarballs of ../shared/corpora/spamassassin (or $RELAY_SHARED) into a
temporary directory, replays the messages in corpus time order (as the lab does) through
every fact of the headers, text, content and bulk families, with a fresh SQLite state
store, and reports per fact: mean and p95 wall time per message, and the value per label
(share true for booleans, median for numbers). Network and authentication facts are left
out: they need live DNS. One process, one core.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from publicsuffixlist import PublicSuffixList

from bench.sacorpus import TARBALLS
from relay.contracts import Outcome
from relay.errors import FactError
from relay.facts import bulk, content, headers, text
from relay.facts.base import FactRegistry, Facts, Services
from relay.lab.corpus import load_corpus, sources_from_labels
from relay.pipeline.recorder import Recorder
from relay.secretkey import SecretKey
from relay.state import SqliteState
from relay.verdict import ACCEPT_ALL

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = (headers.FACTS, text.FACTS, content.FACTS, bulk.FACTS)
# has_one_click_unsubscribe needs DKIM verification (DNS); it is left out here.
SKIP = {"has_one_click_unsubscribe", "body_text"}


def shared_dir() -> Path:
    return Path(os.environ.get("RELAY_SHARED", REPO.parent / "shared"))


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def run(scratch: Path, corpus_dir: Path) -> dict[str, Any]:
    sources = sources_from_labels(scratch, corpus_dir / "split.tsv", None)
    corpus = load_corpus(sources, "SpamAssassin public corpus")
    registry = FactRegistry(
        spec for family in FAMILIES for spec in family if spec.name != "has_one_click_unsubscribe"
    )
    names = [s.name for family in FAMILIES for s in family if s.name not in SKIP]
    state = await SqliteState(scratch / "state.sqlite3", key=SecretKey.generate()).open()
    psl = PublicSuffixList()
    services = Services(state=state, psl=psl)
    recorder = Recorder(state, psl)  # facts only read: record each message, as the relay does
    record_seconds: list[float] = []
    seconds: dict[str, list[float]] = defaultdict(list)
    values: dict[tuple[str, str], list[Any]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    body_seconds: list[float] = []
    start = time.perf_counter()
    try:
        for item in corpus.messages:
            facts = Facts(registry, item.to_message(), services)
            for name in names:
                try:
                    values[(name, item.label)].append(await facts.get(name))
                except FactError:
                    errors[name] += 1
            t = time.perf_counter()
            await recorder.record(facts.message, facts, ACCEPT_ALL, Outcome.DELIVERED)
            record_seconds.append(time.perf_counter() - t)
            for read in facts.reads():
                if read.name == "body_text":
                    body_seconds.append(read.seconds)
                elif read.name in names:
                    seconds[read.name].append(read.seconds)
    finally:
        await state.close()
    total = time.perf_counter() - start
    per_fact: dict[str, Any] = {}
    tiers = {s.name: s.tier.label for family in FAMILIES for s in family}
    for name in names:
        row: dict[str, Any] = {
            "tier": tiers[name],
            "mean_us": round(statistics.fmean(seconds[name]) * 1e6, 1) if seconds[name] else None,
            "p95_us": round(_p95(seconds[name]) * 1e6, 1) if seconds[name] else None,
            "errors": errors[name],
        }
        for label in ("ham", "spam"):
            vals = values[(name, label)]
            if vals and isinstance(vals[0], bool):
                row[label] = round(sum(vals) / len(vals), 4)
            elif vals and isinstance(vals[0], int | float):
                row[label] = round(statistics.median(vals), 4)
                row[label + "_p99"] = round(sorted(vals)[int(0.99 * (len(vals) - 1))], 4)
                row[label + "_max"] = max(vals)
            elif vals:  # lists and strings: share non-empty
                row[label] = round(sum(bool(v) for v in vals) / len(vals), 4)  # share non-empty
        per_fact[name] = row
    counts = {
        label: sum(1 for m in corpus.messages if m.label == label) for label in ("ham", "spam")
    }
    return {
        "messages": len(corpus.messages),
        "by_label": counts,
        "unreadable": len(corpus.unreadable),
        "seconds_total": round(total, 2),
        "body_text_mean_us": round(statistics.fmean(body_seconds) * 1e6, 1),
        "record_mean_us": round(statistics.fmean(record_seconds) * 1e6, 1),
        "record_p95_us": round(_p95(record_seconds) * 1e6, 1),
        "facts": per_fact,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Fact costs and values on the SpamAssassin corpus",
        "",
        f"{result['messages']} messages ({result['by_label']['ham']} ham, "
        f"{result['by_label']['spam']} spam), replayed in time order on one core in "
        f"{result['seconds_total']} s (load average {result['load_average'][0]:.1f}). "
        f"Decoding the body (`body_text`, shared by T2 and T3 facts): "
        f"{result['body_text_mean_us']} us per message.",
        "",
        "Booleans and lists: share of messages where true / non-empty. Numbers: median (p99, max).",
        "",
        "Times are wall time per fact including what it waited for: the first header fact "
        "(`reply_to_domain`) pays for parsing the message once, the first content fact "
        "(`commercial_probability`) and `bulk_count` for decoding the body once, and the "
        "state facts for a SQLite round trip on the store's thread. Absolute figures depend "
        "on the machine's load (reported above); ratios carry better.",
        "",
        "| fact | tier | mean us | p95 us | ham | spam |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["facts"].items():
        cells = []
        for label in ("ham", "spam"):
            cell = str(row.get(label))
            if label + "_max" in row:
                cell += f" ({row[label + '_p99']}, {row[label + '_max']})"
            cells.append(cell)
        lines.append(
            f"| `{name}` | {row['tier']} | {row['mean_us']} | {row['p95_us']} | "
            f"{cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    corpus_dir = shared_dir() / "corpora" / "spamassassin"
    if not (corpus_dir / "split.tsv").exists():
        print(
            f"SpamAssassin corpus not found under {corpus_dir}; set RELAY_SHARED", file=sys.stderr
        )
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        (scratch / "sa").mkdir()
        for name in TARBALLS:
            with tarfile.open(corpus_dir / name) as tar:
                tar.extractall(scratch / "sa", filter="data")
        result = asyncio.run(run(scratch, corpus_dir))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "facts.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "facts.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
