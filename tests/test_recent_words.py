"""The recent-set word SVM of ``selection.Candidate.recent_words``: its weights are added
to the all-sets SVM's on the word block only, the calibrated classifier keeps the plain
types (so the compiled scorer and the type allowlist still apply), and candidates that
need a recent set are not tried without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from relay.classifier import dataset, selection
from relay.classifier.features import WORD_FEATURES, Extractor
from relay.corpus import Item

RECENT = selection.Candidate("recent x0.5", True, "svm", 1.0, 0.5, 0.5, 1.0, recent_words=0.5)


def _item(label: str, site: str, i: int, word: str) -> Item:
    raw = f"From: a{i}@mail.{site}\nSubject: s{i}\n\nbody {word} {i} {label}\n".encode()
    return Item(id=f"{label}/{i}", label=label, path=Path("mem"), data=raw)  # type: ignore[arg-type]


def _data() -> dataset.Dataset:
    extractor = Extractor()
    # The old set's spam says "offer", the new set's spam says "invoice": only a model of
    # the new set's own words learns the second.
    old = [
        _item(lab, f"s{i % 23}.test", i, "offer" if lab == "spam" else "meeting")
        for i, lab in enumerate(["ham", "spam"] * 60)
    ]
    new = [
        _item(lab, f"n{i % 11}.org", i, "invoice" if lab == "spam" else "receipt")
        for i, lab in enumerate(["ham", "spam"] * 20)
    ]
    return dataset.concat(
        [dataset.featurise(old, extractor, "old"), dataset.featurise(new, extractor, "new")]
    )


def _weighted(data: dataset.Dataset) -> object:
    x = selection.vectoriser(True).fit_transform(data.rows).tocsr()
    return selection._weighting(RECENT).fit_transform(x).tocsr()


def test_recent_words_add_the_recent_sets_word_weights_only() -> None:
    data = _data()
    xw = _weighted(data)
    weights = selection.sample_weights(data, RECENT.balance)
    recent = selection.recent_rows(data, "new")
    assert recent.sum() == 40

    summed = selection.fit_svm(RECENT, xw, data.labels, weights, recent, seed=1)
    plain = selection.fit_svm(
        selection.Candidate("plain", True, "svm", 1.0, 0.5, 0.5, 1.0),
        xw,
        data.labels,
        weights,
        recent,
        seed=1,
    )
    added = summed.coef_ - plain.coef_
    assert np.abs(added[:, :WORD_FEATURES]).max() > 0.01  # the recent words moved
    assert not added[:, WORD_FEATURES:].any()  # chars and meta are the all-sets SVM's
    assert summed.intercept_ != plain.intercept_


def test_no_recent_rows_or_one_class_leaves_the_plain_svm() -> None:
    data = _data()
    xw = _weighted(data)
    weights = selection.sample_weights(data, RECENT.balance)
    plain = selection.fit_svm(
        RECENT, xw, data.labels, weights, selection.recent_rows(data, None), 1
    )
    one_class = selection.recent_rows(data, "new") & (data.labels == "spam")
    same = selection.fit_svm(RECENT, xw, data.labels, weights, one_class, 1)
    assert np.array_equal(plain.coef_, same.coef_)


def test_calibrated_sum_keeps_the_plain_types_and_ranks_as_its_svm() -> None:
    from sklearn.calibration import _SigmoidCalibration
    from sklearn.svm import LinearSVC

    data = _data()
    xw = _weighted(data)
    weights = selection.sample_weights(data, RECENT.balance)
    recent = selection.recent_rows(data, "new")
    ids, _ = selection.fold_ids(data, seed=1)
    clf = selection.fit_calibrated(RECENT, xw, data.labels, weights, recent, ids, seed=1)
    (part,) = clf.calibrated_classifiers_
    assert type(part.estimator) is LinearSVC and type(clf.estimator) is LinearSVC
    assert type(part.calibrators[0]) is _SigmoidCalibration
    svm = selection.fit_svm(RECENT, xw, data.labels, weights, recent, seed=1)
    assert np.array_equal(part.estimator.coef_, svm.coef_)
    spam = list(clf.classes_).index("spam")
    probs = clf.predict_proba(xw)[:, spam]
    decision = svm.decision_function(xw)
    order = np.argsort(decision)
    assert np.all(np.diff(probs[order]) >= -1e-12)  # the sigmoid is increasing: same ranking
    assert probs[data.labels == "spam"].mean() > probs[data.labels == "ham"].mean()


def test_recent_candidates_are_tried_only_with_a_recent_set() -> None:
    data = _data()
    ids, _ = selection.fold_ids(data, seed=1)
    plain = selection.CANDIDATES[3]
    _, grid = selection.select(data, 1, [plain, RECENT], lambda _: None, ids)
    assert [g["name"] for g in grid] == [plain.name]
    _, grid = selection.select(data, 1, [plain, RECENT], lambda _: None, ids, recent="new")
    assert [g["name"] for g in grid] == [plain.name, RECENT.name]
    assert grid[1]["recent_words"] == 0.5
