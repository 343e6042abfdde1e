"""training.py / evaluation.py: corpus readers, figures, and `relay train` end to end."""

from __future__ import annotations

import hashlib
import json
import mailbox
import random
from pathlib import Path

import numpy as np
import pytest

from relay.classifier import evaluation
from relay.classifier.model import card_path, load_model
from relay.classifier.training import CorpusError, read_labels, read_source
from relay.cli.main import main
from relay.corpus import Item

HAM_WORDS = [
    "meeting",
    "patch",
    "kernel",
    "review",
    "release",
    "notes",
    "lunch",
    "budget",
    "draft",
    "schedule",
    "thanks",
]
SPAM_WORDS = [
    "free",
    "money",
    "winner",
    "viagra",
    "casino",
    "offer",
    "click",
    "prize",
    "cheap",
    "loan",
    "urgent",
]


def _message(rng: random.Random, label: str, i: int) -> bytes:
    words = HAM_WORDS if label == "ham" else SPAM_WORDS
    body = " ".join(rng.choice(words) for _ in range(60))
    sender = f"colleague{i % 3}@work.test" if label == "ham" else f"promo{i:05d}@deals{i}.test"
    subject = " ".join(rng.choice(words) for _ in range(4))
    link = "" if label == "ham" else f"\nhttp://win{i}.offers.test/claim\n"
    return (
        f"From {sender}  Mon Jan  1 00:00:00 2024\n"
        f"From: {sender}\nTo: me@home.test\nSubject: {subject}\n\n{body}{link}\n"
    ).encode()


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(7)
    corpus = tmp_path / "corpus"
    lines = ["relative_path\tlabel\tset"]
    for label in ("ham", "spam"):
        (corpus / "msgs" / label).mkdir(parents=True)
        for i in range(24):
            rel = f"msgs/{label}/{i:03d}"
            (corpus / rel).write_bytes(_message(rng, label, i))
            lines.append(f"{rel}\t{label}\t{'test' if i % 4 == 0 else 'train'}")
    labels = tmp_path / "labels.tsv"
    labels.write_text("\n".join(lines) + "\n")
    return corpus, labels


def test_labels_paths_are_relative_to_corpus(tiny_corpus: tuple[Path, Path]) -> None:
    corpus, labels = tiny_corpus
    test = list(read_labels(corpus, labels, "test"))
    assert len(test) == 12 and {s.label for s in test} == {"ham", "spam"}
    assert all(s.set == "test" and s.load().startswith(b"From ") for s in test)
    with pytest.raises(CorpusError, match=r"labels\.tsv"):
        list(read_labels(corpus / "msgs", labels))


def test_bad_label_line_is_reported(tmp_path: Path) -> None:
    labels = tmp_path / "l.tsv"
    labels.write_text("a/1\tmaybe\n")
    with pytest.raises(CorpusError, match=r"l\.tsv:1"):
        list(read_labels(tmp_path, labels))


def test_sources_maildir_mbox_and_directory(tmp_path: Path) -> None:
    rng = random.Random(1)
    md = mailbox.Maildir(tmp_path / "md", create=True)
    mb = mailbox.mbox(tmp_path / "box.mbox", create=True)
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for i in range(3):
        md.add(_message(rng, "ham", i))
        mb.add(_message(rng, "spam", i))
        (tmp_path / "dir" / "sub" / f"{i}.eml").write_bytes(_message(rng, "ham", i))
    (tmp_path / "dir" / "cmds").write_text("mv a b\n")
    md.close()
    mb.close()
    assert len(list(read_source(tmp_path / "md", "ham"))) == 3
    boxed = list(read_source(tmp_path / "box.mbox", "spam"))
    assert len(boxed) == 3 and all(b"Subject:" in s.load() for s in boxed)
    assert len(list(read_source(tmp_path / "dir", "ham"))) == 3  # cmds skipped
    with pytest.raises(CorpusError):
        list(read_source(tmp_path / "absent", "ham"))


def test_figures_follow_the_anchor_definitions() -> None:
    spam = np.array([True, True, True, True, False, False, False, False])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.85, 0.1, 0.05, 0.0])
    # One ham (0.85) outranks spam: with zero ham allowed only 0.9 is caught.
    assert evaluation.recall_at_fpr(spam, scores, 0.001) == pytest.approx(0.25)
    assert evaluation.roc_auc(spam, scores) == pytest.approx(13 / 16)
    row = evaluation.at_threshold(spam, scores, 0.5)
    assert row["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 3}
    lo, hi = evaluation.wilson(3, 4)
    assert lo == pytest.approx(0.3006, abs=1e-3) and hi == pytest.approx(0.9544, abs=1e-3)


def test_roc_auc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    spam = rng.random(300) < 0.4
    scores = np.round(rng.random(300) + spam * 0.3, 2).astype(np.float64)  # with ties
    assert evaluation.roc_auc(spam, scores) == pytest.approx(roc_auc_score(spam, scores))


def test_relay_train_and_evaluate_end_to_end(
    tiny_corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus, labels = tiny_corpus
    out = tmp_path / "models"
    argv = ["train", "--corpus", str(corpus), "--labels", str(labels), "--out", str(out)]
    assert main([*argv, "--quick"]) == 0
    model_path = out / "spam.skops"
    card = json.loads(card_path(model_path).read_text())
    assert card["training"]["messages"] == 36 and card["training"]["spam"] == 18
    assert card["evaluation"]["test"]["messages"] == 12
    assert set(card["thresholds"]) == {"fpr_0.1%", "fpr_1%", "p_0.5"}
    # Every training set is named with its digest, and held-out figures per set.
    (one,) = card["training"]["sets"]
    assert one["name"] == "tmp/labels.tsv" or one["name"].endswith("/labels.tsv")
    assert one["labels_sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert (one["messages"], one["ham"], one["spam"]) == (36, 18, 18)
    held_out = card["evaluation"]["cross_validation"]["by_set"][one["name"]]
    assert set(held_out["at_policy_cuts"]) == {"0.1", "0.5", "0.7", "0.9", "0.99"}
    assert len(held_out["roc_auc_by_fold"]) == 5 and len(held_out["roc_auc_ci95"]) == 2
    assert held_out["calibration"]["bins"] and 0 <= held_out["calibration"]["brier"] <= 1
    assert "sigmoid" in card["estimator"]["calibration"]
    # The tiny corpus's ham all comes from one sender domain: too coarse for 5 folds.
    assert card["selection"]["grouping"] == "body"
    model = load_model(model_path)
    assert model.info.version == card["model_sha256"][:12]

    report_path = tmp_path / "eval.json"
    code = main(
        ["evaluate", "--model", str(model_path), "--corpus", str(corpus), "--labels",
         str(labels), "--set", "test", "--out", str(report_path)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["messages"] == 12 and report["roc_auc"] > 0.9
    assert report["at_thresholds"]["p_0.5"]["confusion"]["tp"] >= 5
    assert "ROC AUC" in capsys.readouterr().out


def test_relay_train_from_sources_is_deterministic(tmp_path: Path) -> None:
    rng = random.Random(5)
    for label in ("ham", "spam"):
        box = mailbox.mbox(tmp_path / f"{label}.mbox", create=True)
        for i in range(12):
            box.add(_message(rng, label, i))
        box.close()
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["train", "--ham", str(tmp_path / "ham.mbox"), "--spam", str(tmp_path / "spam.mbox")]
        assert main([*argv, "--out", str(out), "--quick"]) == 0
        card = json.loads((out / "spam.card.json").read_text())
        assert card["training"]["sets"][0]["labels_sha256"] is None
        assert card["training"]["ham"] == 12
        probs = load_model(out / "spam.skops").predict_rows(
            np.array([["free money winner casino", "subj:free"]], dtype=object)
        )
        digests.append((card["training"]["messages_sha256"], round(float(probs[0]), 9)))
    assert digests[0] == digests[1]
    assert digests[0][1] > 0.5


def _labelled(label: str, site: str, i: int) -> Item:
    raw = f"From: a{i}@mail.{site}\nSubject: s{i}\n\nbody {i} {label}\n".encode()
    return Item(id=f"{label}/{i}", label=label, path=Path("mem"), data=raw)  # type: ignore[arg-type]


def test_folds_never_split_a_sender_domain_and_keep_every_set_in_every_fold() -> None:
    from relay.classifier import dataset, selection
    from relay.classifier.features import Extractor

    extractor = Extractor()
    old = [_labelled(lab, f"s{i % 23}.test", i) for i, lab in enumerate(["ham", "spam"] * 60)]
    new = [_labelled(lab, f"n{i % 11}.org", i) for i, lab in enumerate(["ham", "spam"] * 20)]
    data = dataset.concat(
        [dataset.featurise(old, extractor, "old"), dataset.featurise(new, extractor, "new")]
    )
    assert data.groups[0] == "site:s0.test" and data.groups[-1].startswith("site:n")
    ids, grouping = selection.fold_ids(data, seed=1)
    assert grouping == "sender"
    for group in set(data.groups):
        assert len(set(ids[data.groups == group])) == 1, group  # never straddles folds
    for k in range(selection.CV_FOLDS):
        fold = ids == k
        assert {"old", "new"} <= set(data.sources[fold])
        assert {"ham", "spam"} <= set(data.labels[fold])
    weights = selection.sample_weights(data, balance=1.0)
    assert weights[data.sources == "old"].max() == 1.0
    assert weights[data.sources == "new"].min() == pytest.approx(120 / 40)


def test_cluster_bootstrap_interval_brackets_the_auc() -> None:
    rng = np.random.default_rng(4)
    spam = rng.random(200) < 0.5
    scores = rng.random(200) + spam * 0.8
    groups = np.array([f"g{i // 4}" for i in range(200)])
    auc = evaluation.roc_auc(spam, scores)
    low, high = evaluation.auc_interval(spam, scores, groups, resamples=300, seed=1)
    assert low < auc < high and high - low < 0.2
