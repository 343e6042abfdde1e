"""Loading the compiled scorer a chunk at a time (linear.py): the dense arrays are exactly
those of the stored features, and stored arrays of the wrong kind are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relay.classifier import linear
from relay.errors import ModelError

MODEL = Path(__file__).resolve().parents[1] / "models" / "spam.skops"


def _stored() -> dict[str, Any]:
    with np.load(linear.compiled_path(MODEL), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write(tmp_path: Path, arrays: dict[str, Any]) -> Path:
    out = tmp_path / "crafted.linear.npz"
    out.write_bytes(linear._npz_bytes(arrays))
    return out


def test_the_dense_arrays_hold_exactly_the_stored_features() -> None:
    stored = _stored()
    header = json.loads(str(stored["header"]))
    scorer = linear.LinearScorer.load(linear.compiled_path(MODEL))
    for spec, block in zip(header["blocks"], scorer.blocks, strict=True):
        name = spec["name"]
        index, idf, coef = (stored[f"{name}.{k}"] for k in ("index", "idf", "coef"))
        default = np.full(block.n_features, spec["default_idf"])
        default[index] = idf
        expected_coef = np.zeros(block.n_features)
        expected_coef[index] = coef * idf
        # bit for bit: the same numbers as from the whole stored arrays
        assert block.idf_table[block.idf_code].tobytes() == default.tobytes(), name
        assert block.coef_idf.tobytes() == expected_coef.tobytes(), name
        assert block.coef_idf.dtype == np.float64 and block.idf_code.dtype == np.uint16


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a.update({"words.index": a["words.index"].astype(np.float64)}),
        lambda a: a.update({"chars.index": a["chars.index"][:-1]}),
        lambda a: a.update({"meta.index": a["meta.index"] + 16384}),
    ],
    ids=["float index", "short index", "index out of range"],
)
def test_stored_arrays_of_the_wrong_kind_are_refused(tmp_path: Path, change: Any) -> None:
    arrays = _stored()
    change(arrays)
    with pytest.raises(ModelError, match="inconsistent arrays"):
        linear.LinearScorer.load(_write(tmp_path, arrays))


def test_a_missing_block_member_is_refused(tmp_path: Path) -> None:
    arrays = _stored()
    del arrays["chars.coef"]
    with pytest.raises(ModelError, match="malformed compiled model"):
        linear.LinearScorer.load(_write(tmp_path, arrays))
