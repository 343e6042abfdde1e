"""Offline training and evaluation of the spam classifier on a labelled corpus.

Labelled corpora come in two shapes:

- a labels file (TSV with a header row ``relative_path  label  [set]``, label ``ham`` or
  ``spam``, set ``train`` or ``test``); each ``relative_path`` is taken relative to the
  ``--corpus`` directory;
- one source per label (``--ham``/``--spam``): a Maildir (has ``cur/``), an mbox file, or a
  directory of one-message files (searched recursively; ``cmds`` and dotfiles skipped).

Model choice is by cross-validation on the training messages only, folds grouped by body
hash so identical bodies never straddle a fold; the test set, when the labels file has
one, is only scored after the model is fixed and its figures go into the card.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import mailbox
import platform
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from relay.classifier import evaluation
from relay.classifier.features import Extractor, Features, FeatureSettings
from relay.errors import RelayError
from relay.message import split_header_block, strip_mbox_from, to_crlf

SEED = 20260
LABELS = ("ham", "spam")
CV_FOLDS = 5
MODEL_NAME = "spam.skops"
CARD_NAME = "spam.card.json"


class CorpusError(RelayError):
    """A labels file or message source is unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled message: where it came from, its label and set, its bytes."""

    name: str
    label: str
    set: str
    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows and labels of a list of samples (rows are ``(text, meta)``)."""

    rows: np.ndarray[Any, np.dtype[np.object_]]
    labels: np.ndarray[Any, np.dtype[np.str_]]
    groups: np.ndarray[Any, np.dtype[np.str_]]
    digests: tuple[str, ...]
    degraded: int

    @property
    def spam(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return np.asarray(self.labels == "spam")


# -- reading corpora ---------------------------------------------------------------------


def read_labels(corpus: Path, labels: Path, only_set: str | None = None) -> Iterator[Sample]:
    """Samples of a labels file; paths are relative to ``corpus``."""
    try:
        handle = labels.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise CorpusError(f"{labels}: cannot read labels: {exc.strerror}") from None
    with handle:
        reader = csv.reader(handle, delimiter="\t")
        for lineno, row in enumerate(reader, 1):
            if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "relative_path"):
                continue
            if len(row) < 2 or row[1] not in LABELS:
                raise CorpusError(f"{labels}:{lineno}: expected 'path<TAB>ham|spam[<TAB>set]'")
            set_name = row[2] if len(row) > 2 and row[2] else "train"
            if only_set is not None and set_name != only_set:
                continue
            path = corpus / row[0]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CorpusError(f"{labels}:{lineno}: {row[0]}: {exc.strerror}") from None
            yield Sample(row[0], row[1], set_name, data)


def read_source(source: Path, label: str) -> Iterator[Sample]:
    """Samples of a Maildir, an mbox file or a directory of message files."""
    if source.is_dir() and (source / "cur").is_dir():
        box: mailbox.Mailbox[Any] = mailbox.Maildir(source, factory=None, create=False)
    elif source.is_file():
        box = mailbox.mbox(source, factory=None, create=False)
    elif source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.name != "cmds" and not path.name.startswith("."):
                yield Sample(str(path.relative_to(source)), label, "train", path.read_bytes())
        return
    else:
        raise CorpusError(f"{source}: not a Maildir, mbox file or directory")
    try:
        for key in sorted(box.keys()):
            yield Sample(f"{source.name}/{key}", label, "train", box.get_bytes(key))
    finally:
        box.close()


def featurise(samples: Sequence[Sample], extractor: Extractor) -> Dataset:
    rows = np.empty((len(samples), 2), dtype=object)
    groups: list[str] = []
    degraded = 0
    for i, sample in enumerate(samples):
        feats: Features = extractor.extract_bytes(sample.data)
        rows[i, 0], rows[i, 1] = feats.row()
        degraded += feats.degraded
        body = split_header_block(to_crlf(strip_mbox_from(sample.data)))[1]
        groups.append(hashlib.sha256(body).hexdigest())
    return Dataset(
        rows=rows,
        labels=np.array([s.label for s in samples]),
        groups=np.array(groups),
        digests=tuple(s.digest for s in samples),
        degraded=degraded,
    )


# -- model candidates --------------------------------------------------------------------


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


def _vectoriser(chars: bool) -> Any:
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

    hashing = _vectoriser(candidate.chars)
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


def _folds(data: Dataset, seed: int) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    return list(splitter.split(data.rows, data.labels, data.groups))


def _out_of_fold(
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
    folds = _folds(data, seed)
    matrices: dict[bool, Any] = {}
    results: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], Candidate] | None = None
    for cand in candidates:
        if cand.chars not in matrices:
            matrices[cand.chars] = _vectoriser(cand.chars).fit_transform(data.rows).tocsr()
        start = time.perf_counter()
        scores = _out_of_fold(matrices[cand.chars], data, cand, folds, seed, calibrated=False)
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


# -- training ----------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import scipy
    import sklearn
    import skops

    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "skops": skops.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train(
    samples: Sequence[Sample],
    out_dir: Path,
    *,
    labels_file: Path | None = None,
    test_samples: Sequence[Sample] = (),
    seed: int = SEED,
    candidates: Sequence[Candidate] = CANDIDATES,
    settings: FeatureSettings | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Choose by CV, fit on all of ``samples``, save model + card in ``out_dir``; the card."""
    import skops.io as sio

    started = time.perf_counter()
    settings = settings or FeatureSettings()
    extractor = Extractor(settings)
    counts = {label: sum(s.label == label for s in samples) for label in LABELS}
    if min(counts.values()) < CV_FOLDS:
        raise CorpusError(f"need at least {CV_FOLDS} ham and {CV_FOLDS} spam, got {counts}")
    data = featurise(samples, extractor)
    log(f"features of {len(samples)} messages ({data.degraded} degraded)")

    chosen, grid = select(data, seed, candidates, log)
    log(f"chosen: {chosen.name}")
    x = _vectoriser(chosen.chars).fit_transform(data.rows).tocsr()
    oof = _out_of_fold(x, data, chosen, _folds(data, seed), seed, calibrated=True)
    thresholds = {
        "fpr_0.1%": evaluation.threshold_at_fpr(data.spam, oof, 0.001),
        "fpr_1%": evaluation.threshold_at_fpr(data.spam, oof, 0.01),
        "p_0.5": 0.5,
    }
    cv_figures = evaluation.figures(data.spam, oof, thresholds)

    pipeline = build_pipeline(chosen, seed)
    fit_start = time.perf_counter()
    pipeline.fit(data.rows, data.labels)
    fit_seconds = time.perf_counter() - fit_start

    test_figures = None
    if test_samples:
        test = featurise(test_samples, extractor)
        spam_col = list(pipeline.classes_).index("spam")
        probs = pipeline.predict_proba(test.rows)[:, spam_col]
        test_figures = evaluation.figures(test.spam, probs, thresholds)
        log("test set:\n" + evaluation.render(test_figures))

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_NAME
    sio.dump(pipeline, model_path, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    trusted = sorted(sio.get_untrusted_types(file=model_path))
    card = {
        "format": 1,
        "model_file": MODEL_NAME,
        "model_sha256": _sha256_file(model_path),
        "model_bytes": model_path.stat().st_size,
        "trained_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "libraries": _versions(),
        "trusted_types": trusted,
        "classes": [str(c) for c in pipeline.classes_],
        "features": {
            **settings.as_dict(),
            "word_ngrams": [1, 2],
            "char_ngrams": [3, 5] if chosen.chars else None,
            "hash_features": {
                "words": WORD_FEATURES,
                "chars": CHAR_FEATURES if chosen.chars else 0,
                "meta": META_FEATURES,
            },
        },
        "estimator": {**chosen.as_dict(), "calibration": "sigmoid, 5-fold, ensemble=False"},
        "training": {
            "seed": seed,
            "labels_file": labels_file.name if labels_file else None,
            "labels_sha256": _sha256_file(labels_file) if labels_file else None,
            "messages": len(samples),
            "ham": counts["ham"],
            "spam": counts["spam"],
            "degraded": data.degraded,
            "messages_sha256": hashlib.sha256(
                "\n".join(sorted(data.digests)).encode("ascii")
            ).hexdigest(),
            "fit_seconds": round(fit_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "selection": {
            "method": f"{CV_FOLDS}-fold StratifiedGroupKFold by body sha256 on training "
            "messages; pooled out-of-fold AUC, ties by recall at FPR <= 0.1%",
            "candidates": grid,
        },
        "thresholds": thresholds,
        "thresholds_note": "from calibrated out-of-fold probabilities on the training messages",
        "evaluation": {"cross_validation": cv_figures, "test": test_figures},
    }
    (out_dir / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {model_path} ({card['model_bytes']} bytes) and {out_dir / CARD_NAME}")
    return card


# -- commands ----------------------------------------------------------------------------


def train_command(
    *,
    out_dir: Path,
    corpus: Path | None = None,
    labels: Path | None = None,
    ham: Sequence[Path] = (),
    spam: Sequence[Path] = (),
    seed: int = SEED,
    quick: bool = False,
) -> int:
    """`relay train`: from a labels file (train rows; test rows only scored) or sources."""
    if labels is not None:
        base = corpus if corpus is not None else labels.parent
        rows = list(read_labels(base, labels))
        samples = [s for s in rows if s.set == "train"]
        tests = [s for s in rows if s.set == "test"]
    else:
        samples = [s for src in ham for s in read_source(src, "ham")]
        samples += [s for src in spam for s in read_source(src, "spam")]
        tests = []
    if not samples:
        raise CorpusError("no training messages (give --labels, or --ham and --spam)")
    # --quick: one candidate, for smoke tests and small corpora.
    train(
        samples,
        out_dir,
        labels_file=labels,
        test_samples=tests,
        seed=seed,
        candidates=CANDIDATES[-1:] if quick else CANDIDATES,
    )
    return 0


def evaluate_command(
    *, model_path: Path, corpus: Path | None, labels: Path, set_name: str | None, out: Path | None
) -> int:
    """`relay evaluate`: score a labelled corpus with a verified model; print and write JSON."""
    from relay.classifier.model import load_model

    model = load_model(model_path)
    base = corpus if corpus is not None else labels.parent
    samples = list(read_labels(base, labels, set_name))
    if not samples:
        raise CorpusError(f"{labels}: no messages" + (f" in set {set_name!r}" if set_name else ""))
    data = featurise(samples, model.extractor)
    start = time.perf_counter()
    scores = model.predict_rows(data.rows)
    seconds = time.perf_counter() - start
    report = {
        "model": {**dataclasses.asdict(model.info), "path": model_path.name},
        "labels_file": labels.name,
        "labels_sha256": _sha256_file(labels),
        "set": set_name,
        "degraded": data.degraded,
        "predict_seconds": round(seconds, 3),
        **evaluation.figures(data.spam, scores, model.info.thresholds),
    }
    print(evaluation.render(report))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0
