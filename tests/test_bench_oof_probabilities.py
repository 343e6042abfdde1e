"""bench/oof_probabilities.py: out-of-fold probabilities for train rows only, in the file
format `relay lab tune --preset-probabilities` reads."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bench.oof_probabilities import check_sets, out_of_fold, refuse_test_rows, train_rows, write_tsv

from relay.classifier.dataset import Dataset
from relay.classifier.training import TrainingSet
from relay.corpus import Item
from relay.errors import CorpusError
from relay.lab.tune import read_presets


def _item(id_: str, set_: str, label: str = "spam") -> Item:
    return Item(id=id_, label=label, path=Path("/nonexistent") / id_, set=set_)  # type: ignore[arg-type]


def test_test_rows_are_refused_before_anything_is_read() -> None:
    items = [_item("a", "train"), _item("b", "test")]
    assert [i.id for i in train_rows(items)] == ["a"]
    with pytest.raises(CorpusError, match=r"train rows only.*first: b"):
        refuse_test_rows(items)
    card: dict[str, Any] = {}  # never looked at: the refusal comes first
    with pytest.raises(CorpusError, match="train rows only"):
        out_of_fold([TrainingSet("s", items)], card)


def test_write_refuses_test_rows_and_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "oof.tsv"
    with pytest.raises(CorpusError, match="train rows only"):
        write_tsv(out, [_item("a", "train"), _item("b", "test")], [0.1, 0.9])
    assert not out.exists()
    with pytest.raises(ValueError, match="out of"):
        write_tsv(out, [_item("a", "train")], [1.5])
    write_tsv(out, [_item("sa/x", "train"), _item("sa/y", "train", "ham")], [0.9876543, 0.0])
    assert read_presets(out) == {"sa/x": 0.987654, "sa/y": 0.0}


def test_training_sets_must_be_the_cards() -> None:
    digests = ("d1", "d2")
    data = Dataset(
        rows=np.empty((2, 2), dtype=object),
        labels=np.array(["ham", "spam"]),
        groups=np.array(["g1", "g2"]),
        bodies=np.array(["b1", "b2"]),
        digests=digests,
        degraded=0,
        sources=np.array(["s", "s"]),
    )
    sets = [TrainingSet("s", [_item("a", "train"), _item("b", "train")])]
    digest = hashlib.sha256(b"d1\nd2").hexdigest()
    check_sets({"training": {"sets": [{"name": "s", "messages_sha256": digest}]}}, sets, data)
    with pytest.raises(CorpusError, match="differ from the ones"):
        check_sets({"training": {"sets": [{"name": "s", "messages_sha256": "0"}]}}, sets, data)
    with pytest.raises(CorpusError, match="differ from the card's"):
        check_sets({"training": {"sets": [{"name": "t", "messages_sha256": digest}]}}, sets, data)
