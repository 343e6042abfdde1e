"""Where a model's card lives, without the model's libraries: the relay worker's model
registry metrics (models/registry.py) read cards, and a worker must not load numpy
(classifier/model.py, ~12 MiB of RSS, issue 17)."""

from __future__ import annotations

from pathlib import Path


def card_path(model_path: Path) -> Path:
    """``models/spam.skops`` -> ``models/spam.card.json``."""
    return model_path.with_name(model_path.stem + ".card.json")
