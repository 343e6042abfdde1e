"""Out-of-fold classifier probabilities for the train rows of a labels file.

``relay lab tune`` fits a policy on the train split, but the shipped model was trained on
those same rows: its ``spam_probability`` there is in-sample (near perfect), and the fit
learns nothing from it. This script scores every train row with a model that never saw
it: the shipped model's recipe (its card's estimator, seed, feature settings and
training sets), refitted K times, each time without one grouped fold (selection.fold_ids:
one sender's mail, identical bodies, never straddle folds), calibrated as the shipped model
is. These are exactly the probabilities behind the card's cross-validation figures
(``evaluation.cross_validation``); the script checks that it reproduces them.

The card's model *selection* is not repeated inside each fold (the chosen candidate is
taken as given), so the figures are slightly optimistic by the choice among its 5
candidates; the test split stays the unbiased check.

    python -m bench.oof_probabilities \\
        --corpus var/sa --labels ../shared/corpora/spamassassin/split.tsv \\
        --also-corpus ../shared/corpora/modern-dev/modern-dev.tar.gz \\
        --also-labels ../shared/corpora/modern-dev/labels.tsv \\
        --out var/tune-default/oof.tsv

writes ``relative_path<TAB>probability`` for every train row of ``--labels`` (the rows of
the ``--also`` sets are trained on, never written), for ``relay lab tune
--preset-probabilities``. Test rows are never read into the fit nor written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from relay import corpus
from relay.classifier import evaluation, selection
from relay.classifier.dataset import Dataset, concat, featurise
from relay.classifier.features import FEATURE_VERSION, Extractor, FeatureSettings
from relay.classifier.training import TrainingSet, sha256_file
from relay.cli.classifier import set_name
from relay.corpus import Item
from relay.errors import CorpusError

TRAIN = corpus.DEFAULT_SET


def train_rows(items: Sequence[Item]) -> list[Item]:
    """The train rows; a test row here is an error, never silently dropped later."""
    return [i for i in items if i.set == TRAIN]


def refuse_test_rows(items: Sequence[Item]) -> None:
    """CorpusError when any item is not a train row: nothing of a test split may enter
    the fit or the file (the tuned policy is judged on it)."""
    bad = [i.id for i in items if i.set != TRAIN]
    if bad:
        raise CorpusError(
            f"out-of-fold probabilities are for train rows only; {len(bad)} rows of another "
            f"set given (first: {bad[0]})"
        )


def candidate_of(card: dict[str, Any]) -> selection.Candidate:
    """The card's chosen estimator as a selection candidate."""
    e = card["estimator"]
    return selection.Candidate(
        e["name"],
        bool(e["chars"]),
        str(e["estimator"]),
        float(e["C"]),
        float(e["meta_weight"]),
        float(e["word_weight"]),
        float(e["balance"]),
        float(e.get("recent_words", 0.0)),
    )


def check_sets(card: dict[str, Any], sets: Sequence[TrainingSet], data: Dataset) -> None:
    """The given training sets must be the card's, row for row (same messages digest)."""
    want = {s["name"]: s["messages_sha256"] for s in card["training"]["sets"]}
    got = {}
    for ts in sets:
        rows = data.sources == ts.name
        digests = sorted(d for d, keep in zip(data.digests, rows, strict=True) if keep)
        got[ts.name] = hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()
    if want.keys() != got.keys():
        raise CorpusError(f"training sets {sorted(got)} differ from the card's {sorted(want)}")
    for name, digest in got.items():
        if digest != want[name]:
            raise CorpusError(f"{name}: train rows differ from the ones the model was trained on")


def out_of_fold(
    sets: Sequence[TrainingSet], card: dict[str, Any], log: Any = print
) -> tuple[Dataset, np.ndarray[Any, np.dtype[np.float64]]]:
    """Calibrated out-of-fold probabilities of every train row of ``sets`` (card recipe)."""
    for ts in sets:
        refuse_test_rows(ts.samples)
    settings = FeatureSettings.from_dict(card["features"])
    if settings.version != FEATURE_VERSION:
        raise CorpusError(f"the card's feature version {settings.version} is not this code's")
    extractor = Extractor(settings)
    data = concat([featurise(ts.samples, extractor, ts.name) for ts in sets])
    check_sets(card, sets, data)
    seed = int(card["training"]["seed"])
    chosen = candidate_of(card)
    ids, grouping = selection.fold_ids(data, seed)
    if grouping != card["selection"]["grouping"]:
        raise CorpusError(f"fold grouping {grouping} differs from the card's")
    log(f"{len(data.labels)} rows, {selection.CV_FOLDS} folds grouped by {grouping}: {chosen.name}")
    x = selection.vectoriser(chosen.chars).fit_transform(data.rows).tocsr()
    recent = card["estimator"].get("recent_set")
    oof = selection.out_of_fold(x, data, chosen, ids, seed, True, recent)
    return data, oof


def reproduces_card(
    card: dict[str, Any], data: Dataset, oof: np.ndarray[Any, np.dtype[np.float64]]
) -> dict[str, Any]:
    """This run's out-of-fold AUC per set beside the card's (same recipe: equal)."""
    out: dict[str, Any] = {}
    by_set = card["evaluation"]["cross_validation"]["by_set"]
    for name in data.source_names():
        rows = data.sources == name
        auc = evaluation.roc_auc(data.spam[rows], oof[rows])
        out[name] = {"roc_auc": auc, "card_roc_auc": by_set[name]["roc_auc"]}
    return out


def write_tsv(out: Path, items: Sequence[Item], probs: Sequence[float]) -> None:
    refuse_test_rows(items)
    if len(items) != len(probs):
        raise ValueError("one probability per item")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["relative_path\tspam_probability"]
    for item, p in zip(items, probs, strict=True):
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{item.id}: probability {p} out of [0, 1]")
        lines.append(f"{item.id}\t{p:.6f}")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help="root of --labels' paths")
    p.add_argument("--labels", type=Path, required=True, help="the set whose rows are written")
    p.add_argument("--also-corpus", type=Path, action="append", default=[])
    p.add_argument("--also-labels", type=Path, action="append", default=[])
    p.add_argument("--model", type=Path, default=Path("models/spam.skops"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if len(args.also_corpus) != len(args.also_labels):
        p.error("give one --also-corpus per --also-labels")
    card = json.loads(args.model.with_name(args.model.stem + ".card.json").read_text())
    started = time.perf_counter()
    sets = []
    given = [(args.corpus, args.labels), *zip(args.also_corpus, args.also_labels, strict=True)]
    for root, labels in given:
        rows = train_rows(corpus.load_all(corpus.read_labels(root, labels)))
        sets.append(TrainingSet(set_name(labels), rows, labels))
    try:
        data, oof = out_of_fold(sets, card)
    except CorpusError as exc:
        print(f"oof_probabilities: {exc}", file=sys.stderr)
        return 2
    target = data.sources == sets[0].name
    write_tsv(args.out, sets[0].samples, [float(v) for v in oof[target]])
    summary = {
        "labels": set_name(args.labels),
        "labels_sha256": sha256_file(args.labels),
        "model_sha256": card["model_sha256"],
        "rows_written": int(target.sum()),
        "auc": reproduces_card(card, data, oof),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
