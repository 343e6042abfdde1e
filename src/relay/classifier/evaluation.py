"""Figures of a spam classifier's scores on a labelled set (the anchors' definitions).

Positive class = spam. ``recall at FPR <= f`` is the highest spam recall over all
thresholds that flag at most ``floor(f * n_ham)`` ham; a message is flagged when its score
is >= the threshold. Intervals are Wilson score intervals at 95 % (relay/intervals.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from relay.intervals import wilson as wilson

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
FPR_POINTS = (0.001, 0.01)


def roc_auc(spam: BoolArray, scores: FloatArray) -> float:
    """Area under the ROC curve (ties count one half), without sklearn's import cost."""
    pos, neg = scores[spam], scores[~spam]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    allscores = np.concatenate([pos, neg])[order]
    # Average ranks over ties.
    _, first, counts = np.unique(allscores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def threshold_at_fpr(spam: BoolArray, scores: FloatArray, fpr: float) -> float:
    """Lowest threshold flagging at most floor(fpr * n_ham) ham (scores >= it flagged)."""
    ham = np.sort(scores[~spam])[::-1]
    allowed = math.floor(fpr * len(ham) + 1e-9)
    if allowed >= len(ham):
        return float(ham.min()) if len(ham) else 0.0
    return float(np.nextafter(ham[allowed], np.inf))


def recall_at_fpr(spam: BoolArray, scores: FloatArray, fpr: float) -> float:
    if not spam.any():
        return float("nan")
    threshold = threshold_at_fpr(spam, scores, fpr)
    return float((scores[spam] >= threshold).mean())


def at_threshold(spam: BoolArray, scores: FloatArray, threshold: float) -> dict[str, Any]:
    """Confusion matrix, precision, recall and FPR (with intervals) at one threshold."""
    flagged = scores >= threshold
    tp = int((flagged & spam).sum())
    fp = int((flagged & ~spam).sum())
    fn = int((~flagged & spam).sum())
    tn = int((~flagged & ~spam).sum())
    return {
        "threshold": threshold,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "precision": tp / (tp + fp) if tp + fp else None,
        "precision_ci95": list(wilson(tp, tp + fp)),
        "recall": tp / (tp + fn) if tp + fn else None,
        "recall_ci95": list(wilson(tp, tp + fn)),
        "fpr": fp / (fp + tn) if fp + tn else None,
        "fpr_ci95": list(wilson(fp, fp + tn)),
    }


def figures(spam: BoolArray, scores: FloatArray, thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Every figure `relay evaluate` reports, as a JSON-able mapping."""
    auc = roc_auc(spam, scores)
    return {
        "messages": len(spam),
        "ham": int((~spam).sum()),
        "spam": int(spam.sum()),
        "roc_auc": auc,
        "one_minus_roca_pct": (1 - auc) * 100,
        "recall_at_fpr": {f"{f:.1%}": recall_at_fpr(spam, scores, f) for f in FPR_POINTS},
        "at_thresholds": {
            name: at_threshold(spam, scores, value) for name, value in thresholds.items()
        },
    }


def render(report: Mapping[str, Any]) -> str:
    """A short human-readable summary of ``figures``."""
    lines = [
        f"messages {report['messages']} (ham {report['ham']}, spam {report['spam']})",
        f"ROC AUC {report['roc_auc']:.5f}   1-ROCA% {report['one_minus_roca_pct']:.4f}",
    ]
    for point, recall in report["recall_at_fpr"].items():
        lines.append(f"recall at FPR <= {point}: {recall:.2%}")
    for name, row in report["at_thresholds"].items():
        c = row["confusion"]
        lines.append(
            f"threshold {name} = {row['threshold']:.4f}: "
            f"precision {_pct(row['precision'])} {_ci(row['precision_ci95'])}, "
            f"recall {_pct(row['recall'])} {_ci(row['recall_ci95'])}, "
            f"FPR {_pct(row['fpr'])} {_ci(row['fpr_ci95'])}; "
            f"tp {c['tp']} fp {c['fp']} fn {c['fn']} tn {c['tn']}"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _ci(bounds: list[float]) -> str:
    return f"[{bounds[0]:.2%}, {bounds[1]:.2%}]"


def auc_interval(
    spam: BoolArray,
    scores: FloatArray,
    groups: npt.NDArray[np.str_],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile interval of the ROC AUC by a cluster bootstrap: whole groups (one
    sender's messages) are resampled, since messages of one sender are not independent."""
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples):
        picked = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in picked])
        auc = roc_auc(spam[idx], scores[idx])
        if not math.isnan(auc):
            aucs.append(auc)
    if not aucs:
        return float("nan"), float("nan")
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def reliability(spam: BoolArray, probs: FloatArray, bins: int = 10) -> dict[str, Any]:
    """Calibration of probabilities: Brier score and, per probability bin, the number of
    messages, their mean probability and the observed fraction of spam."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append(
                {
                    "bin": [float(edges[b]), float(edges[b + 1])],
                    "messages": int(inside.sum()),
                    "mean_probability": float(probs[inside].mean()),
                    "spam_fraction": float(spam[inside].mean()),
                }
            )
    return {"brier": float(np.mean((probs - spam) ** 2)), "bins": rows}
