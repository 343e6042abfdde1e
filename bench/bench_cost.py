"""Classifier CPU cost per message, split into feature extraction and prediction.

One message at a time in this process (no pool, no batching: the worst case a lone message
pays), CPU time by ``time.process_time``, on the messages of the given labels files (the
relay's serving settings: scikit-learn's per-call checks off, as the pool workers do).
Reports mean, p50 and p99 for all messages and for median-sized mail (40th-60th size
percentile). To compare two models, run it for each in one session: machines are noisy.

Usage (corpus paths as arguments; paths in a labels file are relative to its --corpus):
  .venv/bin/python -m bench.bench_cost --model models/spam.skops \\
      --corpus var/sa --labels ../shared/corpora/spamassassin/split.tsv \\
      --corpus ../shared/corpora/modern-dev/modern-dev.tar.gz \\
      --labels ../shared/corpora/modern-dev/labels.tsv --out bench/results/cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from relay import corpus
from relay.classifier.model import load_model


def _stats(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "n": len(ordered),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
    }


def measure(model_path: Path, messages: list[bytes], repeat: int = 2) -> dict[str, Any]:
    """Extraction and prediction CPU per message, best of ``repeat`` passes per message."""
    import numpy as np
    import sklearn

    sklearn.set_config(assume_finite=True, skip_parameter_validation=True)
    model = load_model(model_path)
    model.classify_bytes(messages[0])  # warm caches and lazy imports
    extract, predict = [], []
    for raw in messages:
        best_e = best_p = float("inf")
        for _ in range(repeat):
            t0 = time.process_time()
            feats = model.extractor.extract_bytes(raw)
            t1 = time.process_time()
            rows = np.empty((1, 2), dtype=object)
            rows[0, 0], rows[0, 1] = feats.row()
            model.predict_rows(rows)
            t2 = time.process_time()
            best_e, best_p = min(best_e, t1 - t0), min(best_p, t2 - t1)
        extract.append(best_e)
        predict.append(best_p)
    total = [e + p for e, p in zip(extract, predict, strict=True)]
    order = sorted(range(len(messages)), key=lambda i: len(messages[i]))
    band = order[int(len(order) * 0.4) : int(len(order) * 0.6)]
    return {
        "model": str(model_path),
        "model_sha256": str(model.card["model_sha256"]),
        "all": {
            "extract": _stats(extract),
            "predict": _stats(predict),
            "total": _stats(total),
        },
        "median_sized": {
            "bytes": [len(messages[band[0]]), len(messages[band[-1]])],
            "extract": _stats([extract[i] for i in band]),
            "predict": _stats([predict[i] for i in band]),
            "total": _stats([total[i] for i in band]),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/spam.skops"))
    parser.add_argument("--corpus", type=Path, action="append", default=[])
    parser.add_argument("--labels", type=Path, action="append", default=[], required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    roots = args.corpus or [p.parent for p in args.labels]
    messages = [
        item.load()
        for root, labels in zip(roots, args.labels, strict=True)
        for item in corpus.load_all(corpus.read_labels(root, labels))
    ]
    result = {
        "python": platform.python_version(),
        "messages": len(messages),
        **measure(args.model, messages),
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
