"""The audited spam model: load a .skops pipeline and its JSON card, check both, predict.

Loading refuses, with a ModelError naming the file and the reason, a model that is
missing, whose file digest differs from its card, whose untrusted types differ from the
card's pinned list, or that was saved with other major library versions (scikit-learn:
other major.minor, since its estimators are only promised to load in the same release).

Serving the loaded model to the relay is ``serving.py``'s job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relay.classifier.features import Extractor, Features, FeatureSettings
from relay.errors import ModelError

# Library -> how many leading version components must match the card's.
_VERSION_PARTS = {"scikit-learn": 2, "skops": 1, "numpy": 1, "scipy": 1}


def card_path(model_path: Path) -> Path:
    """``models/spam.skops`` -> ``models/spam.card.json``."""
    return model_path.with_name(model_path.stem + ".card.json")


def _installed_versions() -> dict[str, str]:
    import scipy
    import sklearn
    import skops

    return {
        "scikit-learn": sklearn.__version__,
        "skops": skops.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What an operator needs to know about the model in use (metrics, logs)."""

    path: str
    version: str  # first 12 hex digits of the model file's sha256
    trained_at: str
    thresholds: dict[str, float]


def read_card(model_path: Path) -> dict[str, Any]:
    """The model's card, after checking the model file's digest against it."""
    cpath = card_path(model_path)
    try:
        data = model_path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{model_path}: model file not found") from None
    except OSError as exc:
        raise ModelError(f"{model_path}: cannot read model: {exc.strerror}") from None
    try:
        card = json.loads(cpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{cpath}: model card not found (refusing an unaudited model)") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cpath}: unreadable model card: {exc}") from None
    if not isinstance(card, dict) or not isinstance(card.get("trusted_types"), list):
        raise ModelError(f"{cpath}: model card lacks trusted_types")
    digest = hashlib.sha256(data).hexdigest()
    if card.get("model_sha256") != digest:
        raise ModelError(
            f"{model_path}: sha256 {digest[:12]}... differs from its card "
            f"({str(card.get('model_sha256'))[:12]}...): file changed or corrupt"
        )
    return card


def check_versions(card: dict[str, Any], installed: dict[str, str]) -> None:
    saved = card.get("libraries", {})
    for lib, parts in _VERSION_PARTS.items():
        want = str(saved.get(lib, "")).split(".")[:parts]
        have = installed[lib].split(".")[:parts]
        if want != have:
            raise ModelError(
                f"model was saved with {lib} {saved.get(lib)}, this is {installed[lib]}: "
                f"retrain with `relay train`"
            )


@dataclass(frozen=True)
class LoadedModel:
    """A verified pipeline, its card and the feature extractor matching the card."""

    path: Path
    pipeline: Any
    card: dict[str, Any]
    spam_column: int
    extractor: Extractor

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            path=str(self.path),
            version=str(self.card["model_sha256"])[:12],
            trained_at=str(self.card.get("trained_at", "")),
            thresholds={k: float(v) for k, v in self.card.get("thresholds", {}).items()},
        )

    def predict_rows(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
        probs = self.pipeline.predict_proba(rows)
        return np.asarray(probs[:, self.spam_column], dtype=np.float64)

    def predict_features(self, features: Features) -> float:
        rows = np.empty((1, 2), dtype=object)
        rows[0, 0], rows[0, 1] = features.row()
        return float(self.predict_rows(rows)[0])

    def classify_bytes(self, raw: bytes) -> tuple[float, bool]:
        """(spam probability, parse degraded) of raw message bytes."""
        return self.classify_many([raw])[0]

    def classify_many(self, raws: Sequence[bytes]) -> list[tuple[float, bool]]:
        """``classify_bytes`` of several messages with one prediction call: scikit-learn's
        per-call overhead is most of a single message's cost, so batches are ~2x cheaper."""
        feats = [self.extractor.extract_bytes(raw) for raw in raws]
        rows = np.empty((len(feats), 2), dtype=object)
        for i, f in enumerate(feats):
            rows[i, 0], rows[i, 1] = f.row()
        probs = self.predict_rows(rows)
        return [(float(p), f.degraded) for p, f in zip(probs, feats, strict=True)]


def load_model(model_path: Path) -> LoadedModel:
    """Load and verify a model; raises ModelError with the reason."""
    import skops.io as sio

    card = read_card(model_path)
    check_versions(card, _installed_versions())
    try:
        untrusted = sorted(sio.get_untrusted_types(file=model_path))
    except Exception as exc:
        raise ModelError(f"{model_path}: not a readable skops file: {exc}") from None
    if untrusted != sorted(card["trusted_types"]):
        extra = sorted(set(untrusted) - set(card["trusted_types"]))
        raise ModelError(
            f"{model_path}: types not pinned in its card: {', '.join(extra) or '(card differs)'}"
        )
    try:
        pipeline = sio.load(model_path, trusted=untrusted)
    except Exception as exc:
        raise ModelError(f"{model_path}: cannot load: {type(exc).__name__}: {exc}") from None
    classes = [str(c) for c in getattr(pipeline, "classes_", [])]
    if "spam" not in classes or not hasattr(pipeline, "predict_proba"):
        raise ModelError(f"{model_path}: not a spam classifier (classes {classes})")
    settings = FeatureSettings.from_dict(card.get("features", {}))
    return LoadedModel(
        path=model_path,
        pipeline=pipeline,
        card=card,
        spam_column=classes.index("spam"),
        extractor=Extractor(settings),
    )


# -- serving -----------------------------------------------------------------------------
