"""Accuracy of the shipped model on the SpamAssassin test split, next to the anchors.

Runs `relay evaluate --set test` on the five tarballs of ../shared/corpora/spamassassin
(or $RELAY_SHARED), extracted to a temporary directory, and writes
bench/results/accuracy.{json,md} with Rspamd's and SpamAssassin's figures from
../shared/anchors.md (same split, same bytes) and the model's training cost from its card.

Usage: .venv/bin/python -m bench.bench_accuracy [--model models/spam.skops]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_lab import extract, shared_dir
from relay.classifier.model import card_path
from relay.cli.main import main as relay_main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# ../shared/anchors.md, "Accuracy on the test set" (recall figures as fractions).
ANCHORS = [
    {"system": "Rspamd 3.4, Bayes only", "roc_auc": 0.99303, "one_minus_roca_pct": 0.70,
     "recall_fpr_0.1%": 0.376, "recall_fpr_1%": 0.973},
    {"system": "Rspamd 3.4, stock rules + Bayes", "roc_auc": 0.99561, "one_minus_roca_pct": 0.44,
     "recall_fpr_0.1%": 0.388, "recall_fpr_1%": 0.963},
    {"system": "SpamAssassin 4.0.1, stock rules + Bayes", "roc_auc": 0.99926,
     "one_minus_roca_pct": 0.074, "recall_fpr_0.1%": 0.850, "recall_fpr_1%": 0.980},
]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    ours = result["relay"]
    train = result["training"]
    lines = [
        "# Classifier accuracy on the SpamAssassin test split",
        "",
        f"Test set: {ours['messages']} messages ({ours['ham']} ham, {ours['spam']} spam) of "
        "`corpora/spamassassin/split.tsv`; every system trained on the train rows only.",
        "",
        "| system | ROC AUC | 1-ROCA% | recall at FPR <= 0.1% | recall at FPR <= 1% |",
        "|---|---|---|---|---|",
    ]
    for row in result["anchors"]:
        lines.append(
            f"| {row['system']} | {row['roc_auc']:.5f} | {row['one_minus_roca_pct']:.3f} | "
            f"{row['recall_fpr_0.1%']:.1%} | {row['recall_fpr_1%']:.1%} |"
        )
    lines.append(
        f"| **relay classifier** ({result['model']['estimator']}) | **{ours['roc_auc']:.5f}** | "
        f"**{ours['one_minus_roca_pct']:.4f}** | **{ours['recall_at_fpr']['0.1%']:.1%}** | "
        f"**{ours['recall_at_fpr']['1.0%']:.1%}** |"
    )
    lines += [
        "",
        "At the card's thresholds (chosen on cross-validated training scores, never on test):",
        "",
        "| threshold | value | precision (95% CI) | recall (95% CI) | FPR (95% CI) | tp/fp/fn/tn |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in ours["at_thresholds"].items():
        c = row["confusion"]

        def ci(key: str, row: dict[str, Any] = row) -> str:
            lo, hi = row[f"{key}_ci95"]
            return f"{row[key]:.2%} ({lo:.2%}-{hi:.2%})"

        lines.append(
            f"| {name} | {row['threshold']:.4f} | {ci('precision')} | {ci('recall')} | "
            f"{ci('fpr')} | {c['tp']}/{c['fp']}/{c['fn']}/{c['tn']} |"
        )
    lines += [
        "",
        f"Training: {train['messages']} messages, model selection + calibration + fit "
        f"{train['total_seconds']} s (final fit {train['fit_seconds']} s) on a shared 2-core "
        f"machine; model file {result['model']['bytes'] / 2**20:.1f} MiB (skops, deflated).",
        f"Beats every anchor on ROC AUC and on recall at FPR <= 0.1%: "
        f"{'yes' if result['beats_anchors'] else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "spam.skops")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    corpus = shared_dir() / "corpora" / "spamassassin"
    if not (corpus / "split.tsv").is_file():
        print(f"SpamAssassin corpus not found under {corpus}; set RELAY_SHARED", file=sys.stderr)
        return 1
    card = json.loads(card_path(args.model).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        extract(corpus, Path(tmp))
        report_path = Path(tmp) / "evaluate.json"
        code = relay_main(
            ["evaluate", "--model", str(args.model), "--corpus", tmp, "--labels",
             str(corpus / "split.tsv"), "--set", "test", "--out", str(report_path)]
        )  # fmt: skip
        if code:
            return code
        ours = json.loads(report_path.read_text())
    beats = all(
        ours["roc_auc"] > a["roc_auc"] and ours["recall_at_fpr"]["0.1%"] > a["recall_fpr_0.1%"]
        for a in ANCHORS
    )
    result = {
        "relay": ours,
        "anchors": ANCHORS,
        "model": {
            "file": args.model.name,
            "bytes": args.model.stat().st_size,
            "sha256": card["model_sha256"],
            "estimator": card["estimator"]["name"],
        },
        "training": card["training"],
        "cross_validation": card["evaluation"]["cross_validation"],
        "beats_anchors": beats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "accuracy.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
