"""Labelled corpus items (relay/corpus.py) -> feature rows, labels and fold groups."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from relay.classifier.features import Extractor, Features
from relay.corpus import Item
from relay.message import split_header_block, strip_mbox_from, to_crlf


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows and labels of a list of items (rows are ``(text, meta)``)."""

    rows: np.ndarray[Any, np.dtype[np.object_]]
    labels: np.ndarray[Any, np.dtype[np.str_]]
    groups: np.ndarray[Any, np.dtype[np.str_]]
    digests: tuple[str, ...]
    degraded: int

    @property
    def spam(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return np.asarray(self.labels == "spam")


def featurise(items: Sequence[Item], extractor: Extractor) -> Dataset:
    """Feature rows of loaded items (``corpus.load_all``; others are read here)."""
    rows = np.empty((len(items), 2), dtype=object)
    groups: list[str] = []
    digests: list[str] = []
    degraded = 0
    for i, item in enumerate(items):
        data = item.load()
        feats: Features = extractor.extract_bytes(data)
        rows[i, 0], rows[i, 1] = feats.row()
        degraded += feats.degraded
        body = split_header_block(to_crlf(strip_mbox_from(data)))[1]
        groups.append(hashlib.sha256(body).hexdigest())
        digests.append(hashlib.sha256(data).hexdigest())
    return Dataset(
        rows=rows,
        labels=np.array([s.label for s in items]),
        groups=np.array(groups),
        digests=tuple(digests),
        degraded=degraded,
    )
