"""The audited spam model: load a .skops pipeline and its JSON card, check both, predict.

Loading refuses, with a ModelError naming the file and the reason, a model that is
missing, whose file digest differs from its card, whose untrusted types differ from the
card's pinned list, that holds a type outside the code's allowlist
(``ALLOWED_TYPE_PREFIXES`` minus ``DENIED_PREFIXES`` / ``DENIED_NAMES``; the card can
narrow it, never widen it), or that was saved with other major library versions
(scikit-learn: other major.minor, since its estimators are only promised to load in the
same release).

Serving the loaded model to the relay is ``serving.py``'s job.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relay.classifier.features import FEATURE_VERSION, Extractor, Features, FeatureSettings
from relay.errors import ModelError

# Library -> how many leading version components must match the card's.
_VERSION_PARTS = {"scikit-learn": 2, "skops": 1, "numpy": 1, "scipy": 1}


# The code-side allowlist of the types a model may hold beyond skops' own defaults: the
# names skops reports as untrusted (and the card pins) must start with one of these
# prefixes or be one of the exact builtins. The shipped model needs only two private
# scikit-learn classes and no builtins. A card can narrow this (it pins an exact list),
# never widen it.
ALLOWED_TYPE_PREFIXES: tuple[str, ...] = ("sklearn.", "numpy.", "scipy.")
ALLOWED_EXACT_TYPES: frozenset[str] = frozenset()

# Defense in depth: refused even when an allowlist rule matches (re-exports such as
# ``sklearn.utils.validation.wraps`` and numpy's file readers sit under allowed prefixes).
DENIED_PREFIXES: tuple[str, ...] = (
    "builtins.",
    "os.",
    "posix.",
    "nt.",
    "subprocess.",
    "importlib.",
    "runpy.",
    "sys.",
    "shutil.",
    "pickle.",
    "marshal.",
    "ctypes.",
    "socket.",
    "code.",
    "codeop.",
    "pty.",
    "operator.attrgetter",
    "operator.methodcaller",
    "operator.itemgetter",
    "functools.",
    "numpy.f2py",
    "numpy.distutils",
    "numpy.testing",
    "numpy.ctypeslib",
    "numpy.lib.npyio",
    "numpy.lib._npyio_impl",
    "numpy.lib.format",
    "scipy.io.",
    "scipy._lib.",
    "sklearn.datasets.",
    "sklearn.externals.",
    "sklearn.utils._testing",
)
# Final name components refused wherever they appear (``<anything>.exec``, ``numpy.load``).
DENIED_NAMES: frozenset[str] = frozenset(
    {
        "exec", "eval", "compile", "__import__", "open", "getattr", "setattr", "delattr",
        "globals", "locals", "vars", "breakpoint", "input", "system", "popen", "Popen",
        "run", "call", "check_call", "check_output", "spawn", "fork", "execv", "execve",
        "import_module", "partial", "partialmethod", "reduce", "wraps", "attrgetter",
        "methodcaller", "itemgetter", "load", "loads", "save", "savez", "savez_compressed",
        "savetxt", "loadtxt", "genfromtxt", "fromfile", "fromregex", "tofile", "memmap",
    }
)  # fmt: skip


def type_refusal(name: str, allowed: Sequence[str] = ALLOWED_TYPE_PREFIXES) -> str | None:
    """Why the dotted type name may not be loaded, or None when it may (by name only)."""
    if name.rpartition(".")[2] in DENIED_NAMES:
        return "denied"
    if name in ALLOWED_EXACT_TYPES:
        return None
    if any(name.startswith(p) for p in DENIED_PREFIXES):
        return "denied"
    if any(name.startswith(p) for p in allowed):
        return None
    return "outside the allowlist"


def _resolved_refusal(name: str, allowed: Sequence[str]) -> str | None:
    """Import the named object as skops would (module + one attribute; only modules the
    name check already allowed) and refuse modules and objects whose real home is outside
    the allowlist, e.g. ``functools.partial`` re-exported by a scikit-learn module."""
    module_name, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception:
        return "not importable"
    if isinstance(obj, type(importlib)):
        return "a module"
    home = getattr(obj, "__module__", None)
    if isinstance(home, str):
        real = f"{home}.{getattr(obj, '__qualname__', attr)}"
        reason = type_refusal(real, allowed)
        if reason is not None:
            return f"{reason} (it is {real})"
    return None


def check_allowed_types(
    where: Path,
    names: Sequence[str],
    allowed: Sequence[str] = ALLOWED_TYPE_PREFIXES,
    *,
    resolve: bool = False,
) -> None:
    """Raise ModelError naming the first type outside the allowlist (or denied)."""
    for name in sorted(names):
        reason = type_refusal(str(name), allowed)
        if reason is None and resolve:
            reason = _resolved_refusal(str(name), allowed)
        if reason is not None:
            raise ModelError(f"{where}: type {name} is not allowed in a model: {reason}")


def _narrowed(allowed: Sequence[str] | None) -> tuple[str, ...]:
    if allowed is None:
        return ALLOWED_TYPE_PREFIXES
    wider = [p for p in allowed if not any(p.startswith(a) for a in ALLOWED_TYPE_PREFIXES)]
    if wider:
        raise ModelError(f"type allowlist can only be narrowed, not widened: {', '.join(wider)}")
    return tuple(allowed)


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
    check_allowed_types(cpath, [str(t) for t in card["trusted_types"]])
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


def load_model(model_path: Path, *, allowed: Sequence[str] | None = None) -> LoadedModel:
    """Load and verify a model; raises ModelError with the reason.

    ``allowed`` narrows ``ALLOWED_TYPE_PREFIXES`` (each entry must lie within one of them)."""
    import skops.io as sio

    prefixes = _narrowed(allowed)
    card = read_card(model_path)
    check_allowed_types(card_path(model_path), [str(t) for t in card["trusted_types"]], prefixes)
    check_versions(card, _installed_versions())
    try:
        untrusted = sorted(sio.get_untrusted_types(file=model_path))
    except Exception as exc:
        raise ModelError(f"{model_path}: not a readable skops file: {exc}") from None
    check_allowed_types(model_path, untrusted, prefixes, resolve=True)
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
    if settings.version != FEATURE_VERSION:
        # Another extraction would feed the model tokens it never saw: refuse, never drift.
        raise ModelError(
            f"{model_path}: trained on features version {settings.version}, this relay "
            f"extracts version {FEATURE_VERSION}: retrain with `relay train`"
        )
    return LoadedModel(
        path=model_path,
        pipeline=pipeline,
        card=card,
        spam_column=classes.index("spam"),
        extractor=Extractor(settings),
    )


# -- serving -----------------------------------------------------------------------------
