"""Cost of a model update (``relay model update``) on N feedback entries.

Builds feedback entries the way ``relay learn`` does (``EntryMaker``: hashed words+meta
vector, no body) from the messages of the given labels files, cycling through them with a
distinct line appended until N entries exist (each a distinct body digest), keeps each
one's base-model score as the learn path does, then times ``update_model`` (held-out
split, sender-grouped out-of-fold site scores, combiner, final fit, held-out figures) and
writing + loading the version through the audited loader. Wall and CPU seconds.

The messages are corpus mail, so the vectors have real density; their labels are the
corpus labels. This measures time, not accuracy (the base model has seen the SpamAssassin
train split): bench/learning.py measures what feedback buys.

Usage:
  .venv/bin/python -m bench.bench_update --n 10000 --jobs 2 \\
      --corpus var/sa --labels ../shared/corpora/spamassassin/split.tsv \\
      --corpus ../shared/corpora/modern-dev/modern-dev.tar.gz \\
      --labels ../shared/corpora/modern-dev/labels.tsv --out bench/results/update.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from relay import corpus
from relay.classifier.model import load_model
from relay.feedback.record import EntryMaker, FeedbackEntry
from relay.models.registry import Registry
from relay.models.update import GateSettings, update_model

T0 = 1_790_000_000.0


def _times() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/spam.skops"))
    ap.add_argument("--corpus", type=Path, action="append", default=[])
    ap.add_argument("--labels", type=Path, action="append", default=[])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--registry", type=Path, help="keep the version here (default: a temp dir)")
    args = ap.parse_args(argv)
    items: list[corpus.Item] = []
    for root, labels in zip(args.corpus, args.labels, strict=True):
        items += corpus.load_all(corpus.read_labels(root, labels))
    # Reports arrive mixed in time, not corpus by corpus: a fixed shuffle.
    random.Random(20260).shuffle(items)
    base = load_model(args.model)
    maker = EntryMaker()
    entries: list[FeedbackEntry] = []
    scores: dict[str, float] = {}
    wall, cpu = _times()
    make_s = score_s = 0.0
    for i in range(args.n):
        item = items[i % len(items)]
        raw = (item.data or b"").rstrip(b"\r\n") + f"\r\nfeedback copy {i}\r\n".encode()
        t = time.process_time()
        try:
            entry = maker.make(
                raw,
                label=item.label,
                source="bench",
                reporter=f"r{i % 50}",
                at=T0 + i * 30,
                keep_body=False,
            )
        except Exception:  # unparsable reports are refused by learn as well
            continue
        t2 = time.process_time()
        scores[entry.digest] = base.classify_bytes(raw)[0]
        make_s += t2 - t
        score_s += time.process_time() - t2
        entries.append(entry)
    build = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    wall, cpu = _times()
    candidate = update_model(
        base,
        entries,
        0.2,
        base_scores=scores,
        now=T0 + args.n * 30,
        gate=GateSettings(),
        n_jobs=args.jobs,
    )
    update = {"wall_s": time.perf_counter() - wall, "cpu_s_this_process": time.process_time() - cpu}
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = _times()
        version = Registry(args.registry or Path(tmp)).save(candidate, now=T0 + args.n * 30)
        saved = {"wall_s": time.perf_counter() - wall, "bytes": version.path.stat().st_size}
        wall, cpu = _times()
        load_model(version.path)
        loaded = {"wall_s": time.perf_counter() - wall}
    held = candidate.card["evaluation"]["held_out_feedback"]
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "entries": len(entries),
        "jobs": args.jobs,
        "per_entry_ms": {
            "make_entry_cpu": round(make_s / len(entries) * 1000, 3),
            "base_score_cpu": round(score_s / len(entries) * 1000, 3),
        },
        "build_entries": build,
        "update": update,
        "update_timing_in_card": candidate.card["timing"],
        "save_version": {**saved, "version": version.name},
        "load_version": loaded,
        "feedback": candidate.card["feedback"],
        "gate": candidate.gate.as_dict(),
        "held_out_auc": {
            "candidate": held["candidate"]["roc_auc"],
            "current": (held["current"] or {}).get("roc_auc"),
        },
    }
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
