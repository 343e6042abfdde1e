"""`relay train` and `relay evaluate` from parsed arguments (defined in cli/main.py)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from relay.classifier import dataset, evaluation, selection, training
from relay.classifier.model import load_model
from relay.errors import CorpusError


def set_name(labels: Path) -> str:
    """A training set's name in the card: the labels file's folder and name
    (``spamassassin/split.tsv``, ``modern-dev/labels.tsv``), machine-independent."""
    return f"{labels.parent.name}/{labels.name}" if labels.parent.name else labels.name


def train_command(
    *,
    out_dir: Path,
    corpus: Sequence[Path] = (),
    labels: Sequence[Path] = (),
    ham: Sequence[Path] = (),
    spam: Sequence[Path] = (),
    seed: int = selection.SEED,
    quick: bool = False,
    recent: Path | None = None,
) -> int:
    """`relay train`: from labels files (train rows; test rows only scored) or sources.

    Each ``--labels`` is one training set; ``--corpus`` gives, in the same order, the root
    its paths are relative to (default: the labels file's directory). ``recent`` is the
    labels file (one of ``labels``) of today's mail, for ``Candidate.recent_words``."""
    if corpus and len(corpus) != len(labels):
        raise CorpusError("give one --corpus per --labels (in the same order), or none")
    if recent is not None and recent not in labels:
        raise CorpusError(f"--recent {recent} is not one of the --labels files")
    sets: list[training.TrainingSet] = []
    tests = []
    for i, labels_file in enumerate(labels):
        base = corpus[i] if corpus else labels_file.parent
        rows = list(training.read_labels(base, labels_file))
        train_rows = [s for s in rows if s.set == "train"]
        sets.append(training.TrainingSet(set_name(labels_file), train_rows, labels_file))
        tests += [s for s in rows if s.set == "test"]
    if ham or spam:
        samples = [s for src in ham for s in training.read_source(src, "ham")]
        samples += [s for src in spam for s in training.read_source(src, "spam")]
        sets.append(training.TrainingSet("sources", samples))
    if not any(ts.samples for ts in sets):
        raise CorpusError("no training messages (give --labels, or --ham and --spam)")
    # --quick: one candidate, for smoke tests and small corpora.
    training.train(
        [ts for ts in sets if ts.samples],
        out_dir,
        trained_at=datetime.now(UTC),  # the command's clock: the card says when it ran
        test_samples=tests,
        seed=seed,
        candidates=selection.CANDIDATES[-1:] if quick else selection.CANDIDATES,
        recent=set_name(recent) if recent is not None else None,
    )
    return 0


def evaluate_command(
    *, model_path: Path, corpus: Path | None, labels: Path, set_name: str | None, out: Path | None
) -> int:
    """`relay evaluate`: score a labelled corpus with a verified model; print and write JSON."""
    model = load_model(model_path)
    base = corpus if corpus is not None else labels.parent
    samples = list(training.read_labels(base, labels, set_name))
    if not samples:
        raise CorpusError(f"{labels}: no messages" + (f" in set {set_name!r}" if set_name else ""))
    data = dataset.featurise(samples, model.extractor)
    start = time.perf_counter()
    scores = model.predict_rows(data.rows)
    seconds = time.perf_counter() - start
    report = {
        "model": {**dataclasses.asdict(model.info), "path": model_path.name},
        "labels_file": labels.name,
        "labels_sha256": training.sha256_file(labels),
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
