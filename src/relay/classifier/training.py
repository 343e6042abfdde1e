"""Offline training of the spam classifier on a labelled corpus: choose a model by
cross-validation (``selection.py``), fit it on every training message, score the test set
when there is one, and save the skops model with its JSON card.

Corpora are read by relay/corpus.py (labels file, Maildir, mbox, directory, tar archive);
``relay train`` and ``relay evaluate`` are in cli/classifier.py. The test set, when the
labels file has one, is only scored after the model is fixed and its figures go into the
card.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import zipfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from relay import corpus
from relay.classifier import evaluation, selection
from relay.classifier.dataset import featurise
from relay.classifier.features import Extractor, FeatureSettings
from relay.classifier.selection import CANDIDATES, CV_FOLDS, SEED, Candidate
from relay.corpus import LABELS, Item, Label
from relay.errors import CorpusError

MODEL_NAME = "spam.skops"
CARD_NAME = "spam.card.json"

__all__ = ["CorpusError", "read_labels", "read_source", "sha256_file", "train"]


def read_labels(root: Path, labels: Path, only_set: str | None = None) -> list[Item]:
    """The loaded items of a labels file (``corpus.read_labels``); CorpusError naming the
    labels line of the first message that cannot be read."""
    return corpus.load_all(corpus.read_labels(root, labels, only_set))


def read_source(source: Path, label: Label) -> list[Item]:
    """The loaded items of a Maildir, mbox, directory or tar archive of one label."""
    return corpus.load_all(corpus.read_source(source, label))


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train(
    samples: Sequence[Item],
    out_dir: Path,
    *,
    trained_at: datetime,
    labels_file: Path | None = None,
    test_samples: Sequence[Item] = (),
    seed: int = SEED,
    candidates: Sequence[Candidate] = CANDIDATES,
    settings: FeatureSettings | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Choose by CV, fit on all of ``samples``, save model + card in ``out_dir``; the card.

    ``trained_at`` is given by the caller (the command's start), never read here."""
    import skops.io as sio

    started = time.perf_counter()
    settings = settings or FeatureSettings()
    extractor = Extractor(settings)
    counts = {label: sum(s.label == label for s in samples) for label in LABELS}
    if min(counts.values()) < CV_FOLDS:
        raise CorpusError(f"need at least {CV_FOLDS} ham and {CV_FOLDS} spam, got {counts}")
    data = featurise(samples, extractor)
    log(f"features of {len(samples)} messages ({data.degraded} degraded)")

    chosen, grid = selection.select(data, seed, candidates, log)
    log(f"chosen: {chosen.name}")
    x = selection.vectoriser(chosen.chars).fit_transform(data.rows).tocsr()
    oof = selection.out_of_fold(
        x, data, chosen, selection.cv_folds(data, seed), seed, calibrated=True
    )
    thresholds = {
        "fpr_0.1%": evaluation.threshold_at_fpr(data.spam, oof, 0.001),
        "fpr_1%": evaluation.threshold_at_fpr(data.spam, oof, 0.01),
        "p_0.5": 0.5,
    }
    cv_figures = evaluation.figures(data.spam, oof, thresholds)

    pipeline = selection.build_pipeline(chosen, seed)
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
        "model_sha256": sha256_file(model_path),
        "model_bytes": model_path.stat().st_size,
        "trained_at": trained_at.astimezone(UTC).replace(microsecond=0).isoformat(),
        "libraries": _versions(),
        "trusted_types": trusted,
        "classes": [str(c) for c in pipeline.classes_],
        "features": {
            **settings.as_dict(),
            "word_ngrams": [1, 2],
            "char_ngrams": [3, 5] if chosen.chars else None,
            "hash_features": {
                "words": selection.WORD_FEATURES,
                "chars": selection.CHAR_FEATURES if chosen.chars else 0,
                "meta": selection.META_FEATURES,
            },
        },
        "estimator": {**chosen.as_dict(), "calibration": "sigmoid, 5-fold, ensemble=False"},
        "training": {
            "seed": seed,
            "labels_file": labels_file.name if labels_file else None,
            "labels_sha256": sha256_file(labels_file) if labels_file else None,
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
