"""Offline training of the spam classifier on a labelled corpus: choose a model by
cross-validation (``selection.py``), fit it on every training message, score the test set
when there is one, and save the skops model with its JSON card.

Corpora are read by relay/corpus.py (labels file, Maildir, mbox, directory, tar archive);
``relay train`` and ``relay evaluate`` are in cli/classifier.py. The test set, when the
labels file has one, is only scored after the model is fixed and its figures go into the
card. Beside the model goes its compiled scorer (``linear.py``), checked against the
pipeline before its digest enters the card; ``compile_model`` does the same for an
existing model (``relay model compile``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from relay import corpus
from relay.classifier import evaluation, selection
from relay.classifier.dataset import Dataset, concat, featurise
from relay.classifier.features import Extractor, FeatureSettings
from relay.classifier.selection import CANDIDATES, CV_FOLDS, SEED, Candidate
from relay.corpus import LABELS, Item, Label
from relay.errors import CorpusError, ModelError

MODEL_NAME = "spam.skops"
CARD_NAME = "spam.card.json"

__all__ = ["CorpusError", "TrainingSet", "read_labels", "read_source", "sha256_file", "train"]


def read_labels(root: Path, labels: Path, only_set: str | None = None) -> list[Item]:
    """The loaded items of a labels file (``corpus.read_labels``); CorpusError naming the
    labels line of the first message that cannot be read."""
    return corpus.load_all(corpus.read_labels(root, labels, only_set))


def read_source(source: Path, label: Label) -> list[Item]:
    """The loaded items of a Maildir, mbox, directory or tar archive of one label."""
    return corpus.load_all(corpus.read_source(source, label))


def library_versions() -> dict[str, str]:
    """The versions a model file depends on, as its card records them."""
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


@dataclass(frozen=True, slots=True)
class TrainingSet:
    """One labelled corpus to train on: its train rows, named in the card."""

    name: str
    samples: Sequence[Item]
    labels_file: Path | None = None


# Probability cuts of config/policy.toml's classifier rules (and the lab's regimes): the
# card reports what each means on held-out data, per training set.
POLICY_CUTS = (0.1, 0.5, 0.7, 0.9, 0.99)


def _set_card(ts: TrainingSet, data: Dataset, ids: np.ndarray[Any, Any]) -> dict[str, Any]:
    rows = data.sources == ts.name
    return {
        "name": ts.name,
        "labels_file": ts.labels_file.name if ts.labels_file else None,
        "labels_sha256": sha256_file(ts.labels_file) if ts.labels_file else None,
        "messages": int(rows.sum()),
        "ham": int((rows & ~data.spam).sum()),
        "spam": int((rows & data.spam).sum()),
        "degraded": int(sum(1 for r in data.rows[rows] if "parse:degraded" in r[1].split())),
        "groups": len(set(data.groups[rows])),
        "messages_sha256": hashlib.sha256(
            "\n".join(sorted(d for d, keep in zip(data.digests, rows, strict=True) if keep)).encode(
                "ascii"
            )
        ).hexdigest(),
    }


def _held_out(
    data: Dataset,
    oof: np.ndarray[Any, np.dtype[np.float64]],
    ids: np.ndarray[Any, Any],
    thresholds: dict[str, float],
    seed: int,
) -> dict[str, Any]:
    """Figures of the calibrated out-of-fold probabilities: pooled, and per training set
    with a cluster-bootstrap AUC interval, per-fold AUCs, calibration and operating points."""
    pooled = evaluation.figures(data.spam, oof, thresholds)
    by_set: dict[str, Any] = {}
    for name in data.source_names():
        rows = data.sources == name
        spam, probs, groups = data.spam[rows], oof[rows], data.groups[rows]
        figures = evaluation.figures(spam, probs, thresholds)
        figures["roc_auc_ci95"] = list(evaluation.auc_interval(spam, probs, groups, seed=seed))
        figures["roc_auc_by_fold"] = [
            evaluation.roc_auc(spam[ids[rows] == k], probs[ids[rows] == k]) for k in range(CV_FOLDS)
        ]
        figures["groups"] = len(set(groups))
        figures["calibration"] = evaluation.reliability(spam, probs)
        figures["at_policy_cuts"] = {
            f"{cut:g}": evaluation.at_threshold(spam, probs, cut) for cut in POLICY_CUTS
        }
        by_set[name] = figures
    return {**pooled, "by_set": by_set}


def train(
    sets: Sequence[TrainingSet],
    out_dir: Path,
    *,
    trained_at: datetime,
    test_samples: Sequence[Item] = (),
    seed: int = SEED,
    candidates: Sequence[Candidate] = CANDIDATES,
    settings: FeatureSettings | None = None,
    log: Any = print,
    recent: str | None = None,
) -> dict[str, Any]:
    """Choose by grouped CV, fit on every training set, save model + card in ``out_dir``.

    ``trained_at`` is given by the caller (the command's start), never read here.
    ``recent`` names the training set of today's mail (``selection.Candidate.recent_words``)."""
    import skops.io as sio

    started = time.perf_counter()
    settings = settings or FeatureSettings()
    extractor = Extractor(settings)
    names = [ts.name for ts in sets]
    if len(set(names)) != len(names):
        raise CorpusError(f"training sets need distinct names, got {names}")
    if recent is not None and recent not in names:
        raise CorpusError(f"recent set {recent!r} is not a training set ({names})")
    samples = [s for ts in sets for s in ts.samples]
    counts = {label: sum(s.label == label for s in samples) for label in LABELS}
    if min(counts.values()) < CV_FOLDS:
        raise CorpusError(f"need at least {CV_FOLDS} ham and {CV_FOLDS} spam, got {counts}")
    data = concat([featurise(ts.samples, extractor, ts.name) for ts in sets])
    log(f"features of {len(samples)} messages ({data.degraded} degraded)")

    ids, grouping = selection.fold_ids(data, seed)
    chosen, grid = selection.select(data, seed, candidates, log, ids, recent)
    log(f"chosen: {chosen.name}")
    x = selection.vectoriser(chosen.chars).fit_transform(data.rows).tocsr()
    oof = selection.out_of_fold(x, data, chosen, ids, seed, True, recent)
    # Operating points on the pooled held-out probabilities of every training set.
    thresholds = {
        "fpr_0.1%": evaluation.threshold_at_fpr(data.spam, oof, 0.001),
        "fpr_1%": evaluation.threshold_at_fpr(data.spam, oof, 0.01),
        "p_0.5": 0.5,
    }
    cv_figures = _held_out(data, oof, ids, thresholds, seed)

    pipeline = selection.build_pipeline(chosen, ids, seed)
    fit_start = time.perf_counter()
    weights = selection.sample_weights(data, chosen.balance)
    if chosen.recent_words:
        # The sum of two SVMs has no scikit-learn fit of its own: fit the feature step,
        # then the calibrated classifier on its output (same types as the plain fit).
        features = pipeline.named_steps["features"]
        xw = features.fit_transform(data.rows).tocsr()
        classifier = selection.fit_calibrated(
            chosen, xw, data.labels, weights, selection.recent_rows(data, recent), ids, seed
        )
        pipeline.steps[-1] = ("classify", classifier)
    else:
        pipeline.fit(data.rows, data.labels, classify__sample_weight=weights)
    fit_seconds = time.perf_counter() - fit_start

    test_figures = None
    checked: list[tuple[str, str]] = []
    if test_samples:
        test = featurise(test_samples, extractor)
        spam_col = list(pipeline.classes_).index("spam")
        probs = pipeline.predict_proba(test.rows)[:, spam_col]
        checked = [(str(t), str(m)) for t, m in test.rows[:300]]
        test_figures = evaluation.figures(test.spam, probs, thresholds)
        log("test set:\n" + evaluation.render(test_figures))

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_NAME
    sio.dump(pipeline, model_path, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    compiled = write_compiled(pipeline, model_path, checked, log)
    trusted = sorted(sio.get_untrusted_types(file=model_path))
    group_note = (
        "the registrable domain of the From address, else the body sha256"
        if grouping == "sender"
        else "the body sha256 (sender domains were too few to give every fold ham and spam)"
    )
    card = {
        "format": 2,
        "model_file": MODEL_NAME,
        "model_sha256": sha256_file(model_path),
        "model_bytes": model_path.stat().st_size,
        "trained_at": trained_at.astimezone(UTC).replace(microsecond=0).isoformat(),
        "libraries": library_versions(),
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
        "estimator": {
            **chosen.as_dict(),
            "recent_set": recent if chosen.recent_words else None,
            "calibration": "sigmoid (Platt) fitted on the out-of-fold decision values of the "
            f"{CV_FOLDS} grouped folds below (PredefinedSplit), one SVM refit on all data"
            + (
                f" plus {chosen.recent_words:g} x an SVM fitted on the recent set's words"
                if chosen.recent_words
                else ""
            ),
        },
        "training": {
            "seed": seed,
            "sets": [_set_card(ts, data, ids) for ts in sets],
            "messages": len(samples),
            "ham": counts["ham"],
            "spam": counts["spam"],
            "degraded": data.degraded,
            "messages_sha256": hashlib.sha256(
                "\n".join(sorted(data.digests)).encode("ascii")
            ).hexdigest(),
            "sample_weights": {
                name: float(weights[data.sources == name][0]) for name in data.source_names()
            },
            "fit_seconds": round(fit_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "selection": {
            "method": f"{CV_FOLDS}-fold StratifiedGroupKFold over all training sets, stratified "
            f"by set and label, grouped by {group_note}; pooled out-of-fold AUC per set, "
            "the candidate with the best worst-set AUC, ties by recall at FPR <= 0.1% on "
            "the largest set",
            "grouping": grouping,
            "folds": CV_FOLDS,
            "groups": len(set(data.groups if grouping == "sender" else data.bodies)),
            "candidates": grid,
        },
        "compiled": compiled,
        "thresholds": thresholds,
        "thresholds_note": "lowest probabilities flagging at most 0.1% / 1% of the training "
        "ham in the calibrated out-of-fold probabilities of all training sets pooled; per-set "
        "figures at these and at the policy cuts are in evaluation.cross_validation.by_set",
        "evaluation": {"cross_validation": cv_figures, "test": test_figures},
    }
    (out_dir / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {model_path} ({card['model_bytes']} bytes) and {out_dir / CARD_NAME}")
    return card


# Largest |p_sklearn - p_compiled| accepted when a compiled file is written (measured: a few
# 1e-16 on the SpamAssassin test split; only the order of float additions differs).
COMPILED_TOLERANCE = 1e-9
# Rows every compiled file is checked on (besides any test rows): the edge cases of the
# analyzers (empty, one letter, non-ASCII, repeats that collide in a word's n-grams).
_PROBE_ROWS = (
    ("", ""),
    ("a", "x"),
    ("Cheap meds $$$ click here now!!! FREE offer", "subj:cheap mailer:none urls:1 url:ip"),
    ("Meeting notes for tomorrow, see the agenda attached", "from:own dkim:aligned parts:2"),
    (
        "Gr\u00fc\u00dfe aus M\u00fcnchen \u2014 \u65e5\u672c \U0001f600 \u0130stanbul",
        "charset:unicode",
    ),
    ("aaaa aaaa aaaa bb bb \u00a0 end", "ct:text/html html:only html:only"),
)


def write_compiled(
    pipeline: Any, model_path: Path, rows: Sequence[tuple[str, str]] = (), log: Any = print
) -> dict[str, Any] | None:
    """Export the compiled scorer beside ``model_path`` and check it against the pipeline
    on the probe rows and ``rows``: the card entry, or None (nothing left behind) when the
    pipeline cannot be compiled or the check fails; scikit-learn then serves it."""
    from relay.classifier import linear

    out = linear.compiled_path(model_path)
    checked = [*_PROBE_ROWS, *rows]
    try:
        digest = linear.export(pipeline, out)
        scorer = linear.LinearScorer.load(out, digest)
        table = np.empty((len(checked), 2), dtype=object)
        for i, (text, meta) in enumerate(checked):
            table[i, 0], table[i, 1] = text, meta
        spam = [str(c) for c in pipeline.classes_].index("spam")
        want = np.asarray(pipeline.predict_proba(table)[:, spam], dtype=np.float64)
        diff = float(np.max(np.abs(want - scorer.probabilities(checked))))
        if not diff <= COMPILED_TOLERANCE:
            raise ModelError(f"compiled scorer differs from the pipeline by {diff:.3g}")
    except ModelError as exc:
        out.unlink(missing_ok=True)
        log(f"{model_path}: no compiled scorer ({exc}); scikit-learn serves this model")
        return None
    log(f"wrote {out} ({out.stat().st_size} bytes), max |difference| {diff:.2g} on the checks")
    return {
        "file": out.name,
        "sha256": digest,
        "bytes": out.stat().st_size,
        "format": linear.FORMAT,
        "checked_rows": len(checked),
        "max_abs_difference": diff,
    }


def compile_model(model_path: Path, log: Any = print) -> dict[str, Any]:
    """Write (or rewrite) the compiled scorer of an existing plain model and name it in
    the card; ModelError when the model is a composite or cannot be compiled."""
    from relay.classifier.model import card_path, load_model, read_card

    model = load_model(model_path, compiled=False)
    if model.base is not None:
        raise ModelError(f"{model_path}: a composite model version is served by scikit-learn")
    entry = write_compiled(model.pipeline, model_path, log=log)
    if entry is None:
        raise ModelError(f"{model_path}: cannot be compiled")
    card = read_card(model_path)
    card["compiled"] = entry
    path = card_path(model_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return entry
