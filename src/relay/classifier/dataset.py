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
    """Feature rows and labels of a list of items (rows are ``(text, meta)``).

    ``groups`` keep related messages in one cross-validation fold: the registrable domain
    of the From address (``site:example.co.uk``), or the body's sha256 when there is none
    (``body:…``), so neither one sender's mail nor identical bodies straddle folds.
    ``bodies`` are the body-hash groups alone, the fallback when sender groups are too
    coarse to give every fold both classes. ``sources`` name the training set each row came
    from (one per labels file, or one for ``--ham``/``--spam`` sources).
    """

    rows: np.ndarray[Any, np.dtype[np.object_]]
    labels: np.ndarray[Any, np.dtype[np.str_]]
    groups: np.ndarray[Any, np.dtype[np.str_]]
    bodies: np.ndarray[Any, np.dtype[np.str_]]
    digests: tuple[str, ...]
    degraded: int
    sources: np.ndarray[Any, np.dtype[np.str_]]

    @property
    def spam(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return np.asarray(self.labels == "spam")

    def source_names(self) -> list[str]:
        """The training sets in order of first appearance."""
        return list(dict.fromkeys(str(s) for s in self.sources))


def body_group(raw: bytes) -> str:
    body = split_header_block(to_crlf(strip_mbox_from(raw)))[1]
    return "body:" + hashlib.sha256(body).hexdigest()


def featurise(items: Sequence[Item], extractor: Extractor, source: str = "") -> Dataset:
    """Feature rows of loaded items (``corpus.load_all``; others are read here)."""
    rows = np.empty((len(items), 2), dtype=object)
    groups: list[str] = []
    bodies: list[str] = []
    digests: list[str] = []
    degraded = 0
    for i, item in enumerate(items):
        data = item.load()
        feats: Features = extractor.extract_bytes(data)
        rows[i, 0], rows[i, 1] = feats.row()
        degraded += feats.degraded
        bodies.append(body_group(data))
        groups.append("site:" + feats.sender_site if feats.sender_site else bodies[-1])
        digests.append(hashlib.sha256(data).hexdigest())
    return Dataset(
        rows=rows,
        labels=np.array([s.label for s in items], dtype=str),
        groups=np.array(groups, dtype=str),
        bodies=np.array(bodies, dtype=str),
        digests=tuple(digests),
        degraded=degraded,
        sources=np.array([source] * len(items), dtype=str),
    )


def concat(parts: Sequence[Dataset]) -> Dataset:
    """Several training sets as one (rows in the given order)."""
    return Dataset(
        rows=np.concatenate([p.rows for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        groups=np.concatenate([p.groups for p in parts]),
        bodies=np.concatenate([p.bodies for p in parts]),
        digests=tuple(d for p in parts for d in p.digests),
        degraded=sum(p.degraded for p in parts),
        sources=np.concatenate([p.sources for p in parts]),
    )
