"""Model candidates and their choice by cross-validation.

The candidates hash text words, text characters and meta tokens (stateless: nothing to
fit, so cross-validation hashes once), weight each block with tf-idf, and fit a linear
model. Folds are grouped by sender (the From address's registrable domain, else the body
hash; ``dataset.Dataset``), so one sender's mail never sits on both sides of a fold, and
stratified by training set and label. ``select`` picks the candidate whose *worst*
training set does best (pooled out-of-fold AUC per set): a model that serves the 2002
corpus and fails today's mail is not chosen.

A candidate with ``recent_words`` adds to the SVM fitted on every set the weights of a
second SVM fitted on the *recent* set alone (today's mail, ``relay train --recent``),
reading the word block only (``fit_svm``). The sum is one linear model, so the saved
pipeline, the compiled scorer and serving are unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from relay.classifier import evaluation
from relay.classifier.dataset import Dataset
from relay.classifier.features import CHAR_FEATURES as CHAR_FEATURES
from relay.classifier.features import META_FEATURES as META_FEATURES
from relay.classifier.features import WORD_FEATURES as WORD_FEATURES

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
    # Sample weight of a training set: (largest set's size / its size) ** balance, so 574
    # messages of today's mail are not drowned by 4829 of 2002 (0: plain counts).
    balance: float = 0.0
    # Weight of a second SVM, fitted on the recent training set's rows and word block alone,
    # added to the SVM of all sets (0: none). Words, not meta: meta tokens' weights learnt
    # from a few hundred messages carry the collectors' habits (at x0.5 with every block
    # the 2002 set lost 0.0005 AUC, with words alone 0.0002, and modern-dev gained less;
    # bench/results/modern_auc_exp.md).
    recent_words: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "chars": self.chars,
            "estimator": self.estimator,
            "C": self.c,
            "meta_weight": self.meta_weight,
            "word_weight": self.word_weight,
            "balance": self.balance,
            "recent_words": self.recent_words,
        }


# The grid keeps the informative points of the exploration in docs/classifier.md.
CANDIDATES = (
    Candidate("words+svm C=1 meta x0.5 words x0.5 balance 1", False, "svm", 1.0, 0.5, 0.5, 1.0),
    Candidate("words+chars+svm C=1 meta x0.5 words x0.5", True, "svm", 1.0, 0.5, 0.5, 0.0),
    Candidate(
        "words+chars+svm C=1 meta x0.5 words x0.5 balance 0.5", True, "svm", 1.0, 0.5, 0.5, 0.5
    ),
    Candidate(
        "words+chars+svm C=1 meta x0.5 words x0.5 balance 1", True, "svm", 1.0, 0.5, 0.5, 1.0
    ),
    # Tried only when a recent set is named (``select``'s ``recent``). Not last: --quick
    # trains the last candidate alone.
    Candidate(
        "words+chars+svm C=1 meta x0.5 words x0.5 balance 1 + recent words x0.5",
        True,
        "svm",
        1.0,
        0.5,
        0.5,
        1.0,
        recent_words=0.5,
    ),
    Candidate(
        "words+chars+svm C=1 meta x0.75 words x0.5 balance 1", True, "svm", 1.0, 0.75, 0.5, 1.0
    ),
)


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


def fit_svm(
    candidate: Candidate,
    xw: Any,
    labels: np.ndarray[Any, Any],
    weights: np.ndarray[Any, Any],
    recent: np.ndarray[Any, np.dtype[np.bool_]],
    seed: int,
) -> Any:
    """The candidate's estimator fitted on weighted features ``xw`` (words first); with
    ``recent_words``, plus that many times the weights of one fitted on the ``recent`` rows'
    word block alone (skipped when those rows lack ham or spam)."""
    estimator = _estimator(candidate, seed).fit(xw, labels, sample_weight=weights)
    if candidate.recent_words and len(set(labels[recent])) == 2:
        local = _estimator(candidate, seed).fit(
            xw[np.flatnonzero(recent)][:, :WORD_FEATURES],
            labels[recent],
            sample_weight=weights[recent],
        )
        # Both are ham/spam classifiers with the same classes_ order, so weights add.
        estimator.coef_[:, :WORD_FEATURES] += candidate.recent_words * local.coef_
        estimator.intercept_ = estimator.intercept_ + candidate.recent_words * local.intercept_
    return estimator


def fit_calibrated(
    candidate: Candidate,
    xw: Any,
    labels: np.ndarray[Any, Any],
    weights: np.ndarray[Any, Any],
    recent: np.ndarray[Any, np.dtype[np.bool_]],
    folds: np.ndarray[Any, Any],
    seed: int,
) -> Any:
    """``CalibratedClassifierCV`` over the grouped ``folds`` whose SVM and sigmoid are the
    ``recent_words`` sum's: its SVM is ``fit_svm`` on all rows, its sigmoid is refitted on
    that sum's out-of-fold decision values. Same types and layout as without the sum."""
    classifier = _head(candidate, seed, folds).named_steps["classify"]
    classifier.fit(xw, labels, sample_weight=weights)
    if not candidate.recent_words:
        return classifier
    (part,) = classifier.calibrated_classifiers_
    svm = fit_svm(candidate, xw, labels, weights, recent, seed)
    part.estimator.coef_, part.estimator.intercept_ = svm.coef_, svm.intercept_
    decision = np.zeros(len(labels))
    for k in np.unique(folds):
        train, test = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        fold_svm = fit_svm(candidate, xw[train], labels[train], weights[train], recent[train], seed)
        decision[test] = fold_svm.decision_function(xw[test])
    # As CalibratedClassifierCV fits it: positive class classes_[1], the same weights.
    part.calibrators[0].fit(decision, labels == classifier.classes_[1], weights)
    return classifier


def _head(candidate: Candidate, seed: int, folds: np.ndarray[Any, Any] | None) -> Any:
    """Everything after the stateless hashing: tf-idf per block, the estimator; calibrated
    when ``folds`` (the grouped fold of each training row, ``fold_ids``) are given."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import PredefinedSplit
    from sklearn.pipeline import Pipeline

    estimator = _estimator(candidate, seed)
    if folds is not None:
        # One estimator refit on all data, plus a sigmoid fitted on its out-of-fold scores
        # over the *grouped* folds (a plain k-fold would put one sender's near-identical
        # mail on both sides and make the sigmoid overconfident). Monotone, so ranking
        # (AUC) is the estimator's own.
        estimator = CalibratedClassifierCV(
            estimator,
            method="sigmoid",
            cv=PredefinedSplit(np.asarray(folds, dtype=np.int8)),
            ensemble=False,
        )
    return Pipeline([("weight", _weighting(candidate)), ("classify", estimator)])


def sample_weights(data: Dataset, balance: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Per-row weights: (largest set's size / the row's set's size) ** balance."""
    names, counts = np.unique(data.sources, return_counts=True)
    factor = {str(n): (counts.max() / c) ** balance for n, c in zip(names, counts, strict=True)}
    return np.array([factor[str(s)] for s in data.sources], dtype=np.float64)


def build_pipeline(candidate: Candidate, folds: np.ndarray[Any, Any], seed: int = SEED) -> Any:
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
    classify = _head(candidate, seed, folds).named_steps["classify"]
    return Pipeline([("features", blocks), ("classify", classify)])


def fold_ids(data: Dataset, seed: int) -> tuple[np.ndarray[Any, np.dtype[np.int8]], str]:
    """The cross-validation fold of each row and the grouping used. Grouped by sender
    (``data.groups``: a sender never straddles folds), stratified by training set and label;
    when senders are so few that a fold would lack ham or spam (a small local corpus), by
    body hash instead, so identical bodies still never straddle folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    strata = np.char.add(np.char.add(data.sources, "/"), data.labels)
    for grouping, groups in (("sender", data.groups), ("body", data.bodies)):
        splitter = StratifiedGroupKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
        ids = np.full(len(data.labels), -1, dtype=np.int8)
        for k, (_, test_idx) in enumerate(splitter.split(data.rows, strata, groups)):
            ids[test_idx] = k
        if all(len(set(data.labels[ids == k])) == 2 for k in range(CV_FOLDS)):
            return ids, grouping
    return ids, grouping


def cv_folds(data: Dataset, seed: int) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    ids = fold_ids(data, seed)[0]
    return [(np.flatnonzero(ids != k), np.flatnonzero(ids == k)) for k in range(CV_FOLDS)]


def recent_rows(data: Dataset, recent: str | None) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """The rows of the recent training set (none when ``recent`` is None)."""
    return np.asarray(data.sources == recent) if recent else np.zeros(len(data.labels), bool)


def out_of_fold(
    x: Any,
    data: Dataset,
    candidate: Candidate,
    ids: np.ndarray[Any, Any],
    seed: int,
    calibrated: bool,
    recent: str | None = None,
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Out-of-fold spam scores (probabilities when calibrated, else decision values). A
    calibrated fold's sigmoid is fitted on the other training folds' own grouped folds."""
    scores = np.zeros(len(data.labels))
    weights = sample_weights(data, candidate.balance)
    is_recent = recent_rows(data, recent)
    for k in range(CV_FOLDS):
        train_idx, test_idx = np.flatnonzero(ids != k), np.flatnonzero(ids == k)
        if candidate.recent_words:
            weighting = _weighting(candidate)
            xw = weighting.fit_transform(x[train_idx]).tocsr()
            args = (xw, data.labels[train_idx], weights[train_idx], is_recent[train_idx])
            if calibrated:
                clf = fit_calibrated(candidate, *args, ids[train_idx], seed)
                spam_col = list(clf.classes_).index("spam")
                scores[test_idx] = clf.predict_proba(weighting.transform(x[test_idx]))[:, spam_col]
            else:
                svm = fit_svm(candidate, *args, seed)
                decision = svm.decision_function(weighting.transform(x[test_idx]))
                scores[test_idx] = decision if svm.classes_[1] == "spam" else -decision
            continue
        head = _head(candidate, seed, ids[train_idx] if calibrated else None)
        head.fit(x[train_idx], data.labels[train_idx], classify__sample_weight=weights[train_idx])
        if calibrated:
            spam_col = list(head.classes_).index("spam")
            scores[test_idx] = head.predict_proba(x[test_idx])[:, spam_col]
        else:
            decision = head.decision_function(x[test_idx])
            # decision_function is positive for classes_[1]
            scores[test_idx] = decision if head.classes_[1] == "spam" else -decision
    return scores


def _summary(spam: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> dict[str, Any]:
    auc = evaluation.roc_auc(spam, scores)
    return {
        "roc_auc": auc,
        "one_minus_roca_pct": (1 - auc) * 100,
        "recall_at_fpr": {
            f"{f:.1%}": evaluation.recall_at_fpr(spam, scores, f) for f in evaluation.FPR_POINTS
        },
    }


def cv_summary(data: Dataset, scores: np.ndarray[Any, np.dtype[np.float64]]) -> dict[str, Any]:
    """Pooled out-of-fold figures over all rows and per training set."""
    by_set = {}
    for name in data.source_names():
        rows = data.sources == name
        by_set[name] = _summary(data.spam[rows], scores[rows])
    return {**_summary(data.spam, scores), "by_set": by_set}


def _key(summary: dict[str, Any], largest: str) -> tuple[float, float]:
    """Worst per-set AUC, then recall at FPR <= 0.1 % on the largest set."""
    sets = summary["by_set"]
    return (
        min(s["roc_auc"] for s in sets.values()),
        sets[largest]["recall_at_fpr"]["0.1%"],
    )


def select(
    data: Dataset,
    seed: int,
    candidates: Sequence[Candidate],
    log: Any,
    ids: np.ndarray[Any, Any],
    recent: str | None = None,
) -> tuple[Candidate, list[dict[str, Any]]]:
    """Pick the candidate whose worst training set has the best pooled out-of-fold AUC,
    then the best recall at 0.1 % FPR on the largest set (folds: ``fold_ids``).
    ``recent_words`` candidates are tried only when a ``recent`` set is named."""
    names, counts = np.unique(data.sources, return_counts=True)
    largest = str(names[int(np.argmax(counts))])
    matrices: dict[bool, Any] = {}
    results: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], Candidate] | None = None
    for cand in candidates:
        if cand.recent_words and not recent:
            continue
        if cand.chars not in matrices:
            matrices[cand.chars] = vectoriser(cand.chars).fit_transform(data.rows).tocsr()
        start = time.perf_counter()
        scores = out_of_fold(matrices[cand.chars], data, cand, ids, seed, False, recent)
        summary = {**cand.as_dict(), **cv_summary(data, scores)}
        summary["seconds"] = round(time.perf_counter() - start, 1)
        results.append(summary)
        per_set = ", ".join(
            f"{name} AUC {s['roc_auc']:.5f}" for name, s in summary["by_set"].items()
        )
        log(
            f"cv {cand.name}: {per_set}; recall at 0.1% "
            f"{summary['recall_at_fpr']['0.1%']:.2%}, at 1% {summary['recall_at_fpr']['1.0%']:.2%}"
        )
        key = _key(summary, largest)
        if best is None or key > best[0]:
            best = (key, cand)
    assert best is not None
    return best[1], results
