"""Model candidates and their choice by cross-validation.

The candidates hash text words, text characters and meta tokens (stateless: nothing to
fit, so cross-validation hashes once), weight each block with tf-idf, and fit a linear
model. ``select`` picks one by pooled out-of-fold AUC on the training messages, folds
grouped by body hash so identical bodies never straddle a fold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from relay.classifier import evaluation
from relay.classifier.dataset import Dataset

SEED = 20260
CV_FOLDS = 5


@dataclass(frozen=True, slots=True)
class Candidate:
    """One point of the small model-selection grid."""

    name: str
    chars: bool  # character n-grams of the text next to word n-grams
    estimator: str  # "logreg" or "svm"
    c: float
    meta_weight: float = 1.0  # weights of the separately normalised blocks
    word_weight: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "chars": self.chars,
            "estimator": self.estimator,
            "C": self.c,
            "meta_weight": self.meta_weight,
            "word_weight": self.word_weight,
        }


CANDIDATES = (
    Candidate("words+logreg C=100", False, "logreg", 100.0),
    Candidate("words+chars+svm C=1", True, "svm", 1.0),
    Candidate("words+chars+svm C=1 meta x0.5", True, "svm", 1.0, 0.5),
    Candidate("words+chars+svm C=3 meta x0.5", True, "svm", 3.0, 0.5),
    Candidate("words+chars+svm C=1 meta x0.5 words x0.5", True, "svm", 1.0, 0.5, 0.5),
)
WORD_FEATURES = 2**20
CHAR_FEATURES = 2**20
META_FEATURES = 2**14


def _blocks(chars: bool) -> list[tuple[str, int, int]]:
    """(name, input column, hashed width) of each feature block, in output order."""
    blocks = [("words", 0, WORD_FEATURES)]
    if chars:
        blocks.append(("chars", 0, CHAR_FEATURES))
    blocks.append(("meta", 1, META_FEATURES))
    return blocks


def vectoriser(chars: bool) -> Any:
    """Stateless hashing of text words, text characters and meta tokens (no vocabulary to
    store, fixed memory, nothing to fit: cross-validation can hash once)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import HashingVectorizer

    options: dict[str, dict[str, Any]] = {
        "words": {"ngram_range": (1, 2), "token_pattern": r"(?u)\b\w\w+\b|[$€£!]"},
        "chars": {"analyzer": "char_wb", "ngram_range": (3, 5)},
        "meta": {"lowercase": False, "token_pattern": r"\S+"},
    }
    return ColumnTransformer(
        [
            (
                name,
                HashingVectorizer(
                    n_features=width, alternate_sign=False, norm=None, **options[name]
                ),
                column,
            )
            for name, column, width in _blocks(chars)
        ],
        sparse_threshold=1.0,
    )


def _weighting(candidate: Candidate) -> Any:
    """tf-idf with l2 normalisation per block, so a long text cannot drown the meta tokens."""
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import TfidfTransformer

    parts = []
    offset = 0
    for name, _, width in _blocks(candidate.chars):
        parts.append((name, TfidfTransformer(sublinear_tf=True), slice(offset, offset + width)))
        offset += width
    return ColumnTransformer(
        parts,
        sparse_threshold=1.0,
        transformer_weights={"meta": candidate.meta_weight, "words": candidate.word_weight},
    )


def _estimator(candidate: Candidate, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if candidate.estimator == "svm":
        return LinearSVC(C=candidate.c, random_state=seed, max_iter=5000)
    return LogisticRegression(C=candidate.c, solver="liblinear", max_iter=1000, random_state=seed)


def _head(candidate: Candidate, seed: int, calibrated: bool) -> Any:
    """Everything after the stateless hashing: tf-idf per block, the (calibrated) estimator."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import Pipeline

    estimator = _estimator(candidate, seed)
    if calibrated:
        # One estimator refit on all data, plus a sigmoid fitted on its out-of-fold scores:
        # monotone, so ranking (AUC) is the estimator's own.
        estimator = CalibratedClassifierCV(estimator, method="sigmoid", cv=5, ensemble=False)
    return Pipeline([("weight", _weighting(candidate)), ("classify", estimator)])


def build_pipeline(candidate: Candidate, seed: int = SEED) -> Any:
    """The saved pipeline: the same computation as hashing then ``_head``, arranged as one
    (hash -> tf-idf) pipeline per block so the ColumnTransformer selects input columns, not
    2^21 hashed columns (whose index lists would bloat the skops file to hundreds of MB)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.pipeline import Pipeline

    hashing = vectoriser(candidate.chars)
    blocks = ColumnTransformer(
        [
            (name, Pipeline([("hash", vec), ("tfidf", TfidfTransformer(sublinear_tf=True))]), col)
            for name, vec, col in hashing.transformers
        ],
        sparse_threshold=1.0,
        transformer_weights={"meta": candidate.meta_weight, "words": candidate.word_weight},
    )
    classify = _head(candidate, seed, calibrated=True).named_steps["classify"]
    return Pipeline([("features", blocks), ("classify", classify)])


def cv_folds(data: Dataset, seed: int) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    return list(splitter.split(data.rows, data.labels, data.groups))


def out_of_fold(
    x: Any, data: Dataset, candidate: Candidate, folds: Sequence[Any], seed: int, calibrated: bool
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Out-of-fold spam scores (probabilities when calibrated, else decision values)."""
    scores = np.zeros(len(data.labels))
    for train_idx, test_idx in folds:
        head = _head(candidate, seed, calibrated)
        head.fit(x[train_idx], data.labels[train_idx])
        if calibrated:
            spam_col = list(head.classes_).index("spam")
            scores[test_idx] = head.predict_proba(x[test_idx])[:, spam_col]
        else:
            decision = head.decision_function(x[test_idx])
            # decision_function is positive for classes_[1]
            scores[test_idx] = decision if head.classes_[1] == "spam" else -decision
    return scores


def _cv_summary(data: Dataset, scores: np.ndarray[Any, np.dtype[np.float64]]) -> dict[str, Any]:
    auc = evaluation.roc_auc(data.spam, scores)
    return {
        "roc_auc": auc,
        "one_minus_roca_pct": (1 - auc) * 100,
        "recall_at_fpr": {
            f"{f:.1%}": evaluation.recall_at_fpr(data.spam, scores, f)
            for f in evaluation.FPR_POINTS
        },
    }


def select(
    data: Dataset, seed: int, candidates: Sequence[Candidate], log: Any
) -> tuple[Candidate, list[dict[str, Any]]]:
    """Pick the candidate with the best pooled out-of-fold AUC, then recall at 0.1 % FPR."""
    folds = cv_folds(data, seed)
    matrices: dict[bool, Any] = {}
    results: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], Candidate] | None = None
    for cand in candidates:
        if cand.chars not in matrices:
            matrices[cand.chars] = vectoriser(cand.chars).fit_transform(data.rows).tocsr()
        start = time.perf_counter()
        scores = out_of_fold(matrices[cand.chars], data, cand, folds, seed, calibrated=False)
        summary = {**cand.as_dict(), **_cv_summary(data, scores)}
        summary["seconds"] = round(time.perf_counter() - start, 1)
        results.append(summary)
        log(
            f"cv {cand.name}: 1-ROCA% {summary['one_minus_roca_pct']:.4f}, recall at 0.1% "
            f"{summary['recall_at_fpr']['0.1%']:.2%}, at 1% {summary['recall_at_fpr']['1.0%']:.2%}"
        )
        key = (summary["roc_auc"], summary["recall_at_fpr"]["0.1%"])
        if best is None or key > best[0]:
            best = (key, cand)
    assert best is not None
    return best[1], results
