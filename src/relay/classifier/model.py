"""The audited spam model: load a .skops pipeline and its JSON card, check both, predict.

Loading refuses, with a ModelError naming the file and the reason, a model that is
missing, whose file digest differs from its card, whose untrusted types differ from the
card's pinned list, that holds a type outside the code's allowlist
(``ALLOWED_TYPE_PREFIXES`` minus ``DENIED_PREFIXES`` / ``DENIED_NAMES``; the card can
narrow it, never widen it), or that was saved with other major library versions
(scikit-learn: other major.minor, since its estimators are only promised to load in the
same release).

A *composite* model (a version made by ``relay model update``, docs/classifier.md "Model
versions") is a site model file (a linear model over the base's words and meta feature
columns) whose card names a base model file beside it (with its sha256) and a combiner of
three numbers: both files go through the same checks, and the base must be the exact file
the card names.

A plain model whose card names a compiled file (``compiled``: ``linear.py``, written by
``relay train`` and ``relay model compile``) with a matching sha256 is served by that
numpy-only ``LinearScorer``: scikit-learn is not imported until something asks for the
pipeline itself (a composite on this base, ``relay model update``). Any problem with the
compiled file falls back to the skops pipeline with one log line.

Serving the loaded model to the relay is ``serving.py``'s job.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relay.classifier.cardfile import card_path as card_path  # re-exported: its old home
from relay.classifier.features import FEATURE_VERSION, Extractor, Features, FeatureSettings
from relay.classifier.linear import LinearScorer, compiled_path
from relay.errors import ModelError

log = logging.getLogger("relay.classifier")

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


class DeferredPipeline:
    """The skops pipeline of a model served by its compiled scorer, loaded (with every
    check of ``load_model``) on first attribute access: a serving process never needs it,
    a composite model or ``relay model update`` reads its feature steps."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._pipeline: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy/pickle probes: never trigger a model load
            raise AttributeError(name)
        if self._pipeline is None:
            self._pipeline = self._load()
        return getattr(self._pipeline, name)


@dataclass(frozen=True)
class LoadedModel:
    """A verified pipeline, its card and the feature extractor matching the card."""

    path: Path
    pipeline: Any
    card: dict[str, Any]
    spam_column: int
    extractor: Extractor

    # A composite (model version): the base it stands on and (base weight, site weight,
    # intercept) over [logit(base p), site decision value]; None for a plain model.
    base: LoadedModel | None = None
    combiner: tuple[float, float, float] | None = None
    # The numpy-only scorer of a plain model with a verified compiled file (else None).
    scorer: LinearScorer | None = field(default=None, compare=False)

    @property
    def compiled(self) -> LinearScorer | None:
        """The scorer when this model is served by it (a composite never is: ``replace``
        copies its base's scorer along, so the composite test comes first)."""
        return self.scorer if self.base is None else None

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            path=str(self.path),
            version=str(self.card.get("version") or str(self.card["model_sha256"])[:12]),
            trained_at=str(self.card.get("trained_at", "")),
            thresholds={k: float(v) for k, v in self.card.get("thresholds", {}).items()},
        )

    @property
    def root(self) -> LoadedModel:
        """The base model every version stands on (this model when it is plain)."""
        return self if self.base is None else self.base.root

    def predict_rows(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
        scorer = self.compiled
        if scorer is not None:
            return scorer.probabilities((str(t), str(m)) for t, m in rows)
        if self.base is None or self.combiner is None:
            probs = self.pipeline.predict_proba(rows)
            return np.asarray(probs[:, self.spam_column], dtype=np.float64)
        # The base's feature step runs once: its words and meta columns are the site
        # model's input, so a version costs one sparse dot product more than its base.
        base = self.base.pipeline
        x = base.named_steps["features"].transform(rows)
        probs = base.named_steps["classify"].predict_proba(x)[:, self.base.spam_column]
        return combine(self.combiner, probs, self.site_scores(site_input(base, x)))

    def site_scores(self, x: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
        """The site model's decision values on ``site_input``, larger meaning spam."""
        scores = np.asarray(self.pipeline.decision_function(x), dtype=np.float64)
        return scores if self.spam_column == 1 else -scores

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
        scorer = self.compiled
        if scorer is not None:
            probs = scorer.probabilities(f.row() for f in feats)
            return [(float(p), f.degraded) for p, f in zip(probs, feats, strict=True)]
        rows = np.empty((len(feats), 2), dtype=object)
        for i, f in enumerate(feats):
            rows[i, 0], rows[i, 1] = f.row()
        probs = self.predict_rows(rows)
        return [(float(p), f.degraded) for p, f in zip(probs, feats, strict=True)]


def load_model(
    model_path: Path, *, allowed: Sequence[str] | None = None, compiled: bool = True
) -> LoadedModel:
    """Load and verify a model; raises ModelError with the reason.

    ``allowed`` narrows ``ALLOWED_TYPE_PREFIXES`` (each entry must lie within one of them).
    ``compiled``: serve a plain model by its verified compiled file when the card names one
    (the pipeline then loads on first use); False always loads the skops pipeline."""
    prefixes = _narrowed(allowed)
    card = read_card(model_path)
    check_allowed_types(card_path(model_path), [str(t) for t in card["trusted_types"]], prefixes)
    plain = card.get("composite") is None  # a composite is served by scikit-learn
    scorer = compiled_scorer(model_path, card) if compiled and plain else None
    if scorer is None:
        pipeline, classes = _verified_pipeline(model_path, card, prefixes)
    else:
        pipeline = DeferredPipeline(lambda: _reloaded_pipeline(model_path, card, prefixes))
        classes = [str(c) for c in card.get("classes", [])]
        if "spam" not in classes:
            raise ModelError(f"{model_path}: not a spam classifier (classes {classes})")
    settings = FeatureSettings.from_dict(card.get("features", {}))
    if settings.version != FEATURE_VERSION:
        # Another extraction would feed the model tokens it never saw: refuse, never drift.
        raise ModelError(
            f"{model_path}: trained on features version {settings.version}, this relay "
            f"extracts version {FEATURE_VERSION}: retrain with `relay train`"
        )
    base, combiner = _composite_parts(model_path, card, allowed)
    return LoadedModel(
        path=model_path,
        pipeline=pipeline,
        card=card,
        spam_column=classes.index("spam"),
        extractor=Extractor(settings),
        base=base,
        combiner=combiner,
        scorer=scorer,
    )


def compiled_scorer(model_path: Path, card: dict[str, Any]) -> LinearScorer | None:
    """The compiled scorer the card names, if its file is there and verifies; else None,
    after one log line saying why (the caller then loads the skops pipeline)."""
    entry = card.get("compiled")
    if entry is None:
        log.info("model=%s: no compiled scorer in its card, serving with scikit-learn", model_path)
        return None
    path = compiled_path(model_path)
    try:
        if not isinstance(entry, dict) or entry.get("file") != path.name:
            raise ModelError(f"{card_path(model_path)}: compiled entry must name {path.name}")
        return LinearScorer.load(path, str(entry.get("sha256")))
    except ModelError as exc:
        log.warning("compiled scorer refused, serving with scikit-learn: %s", exc)
        return None


def _reloaded_pipeline(model_path: Path, card: dict[str, Any], prefixes: Sequence[str]) -> Any:
    """The deferred skops pipeline: the file must still be the one the card names."""
    if read_card(model_path)["model_sha256"] != card["model_sha256"]:
        raise ModelError(f"{model_path}: changed since it was loaded")
    return _verified_pipeline(model_path, card, prefixes)[0]


def _verified_pipeline(
    model_path: Path, card: dict[str, Any], prefixes: Sequence[str]
) -> tuple[Any, list[str]]:
    """The skops pipeline and its classes, after the version and type checks."""
    import skops.io as sio

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
    return pipeline, classes


SITE_BLOCKS = ("words", "meta")  # the base feature blocks a site model reads


def site_input(base_pipeline: Any, x: Any) -> Any:
    """The words and meta columns of the base's transformed features (tf-idf with the
    base's idf, block weights applied): exactly what feedback entries store as counts."""
    from scipy.sparse import hstack

    where = base_pipeline.named_steps["features"].output_indices_
    return hstack([x[:, where[name]] for name in SITE_BLOCKS], format="csr")


def check_site_base(model_path: Path, base_pipeline: Any) -> None:
    """ModelError unless the base has the feature blocks a site model reads."""
    steps = getattr(base_pipeline, "named_steps", {})
    features = steps.get("features")
    where = getattr(features, "output_indices_", {})
    if "classify" not in steps or not all(name in where for name in SITE_BLOCKS):
        raise ModelError(f"{model_path}: base model lacks the words/meta feature blocks")


def logit(p: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Log-odds, with p clipped away from 0 and 1 (a calibrated 1.0 is still finite)."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


def combine(
    combiner: tuple[float, float, float],
    base_probs: np.ndarray[Any, Any],
    site_scores: np.ndarray[Any, Any],
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """A version's probability: a logistic map of the base's log-odds and the site score."""
    a, b, c = combiner
    z = a * logit(base_probs) + b * np.asarray(site_scores, dtype=np.float64) + c
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


def _composite_parts(
    model_path: Path, card: dict[str, Any], allowed: Sequence[str] | None
) -> tuple[LoadedModel | None, tuple[float, float, float] | None]:
    spec = card.get("composite")
    if spec is None:
        return None, None
    try:
        base_name = str(spec["base_file"])
        base_sha = str(spec["base_sha256"])
        a, b, c = (float(x) for x in spec["combiner"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{card_path(model_path)}: malformed composite section") from None
    if "/" in base_name or "\\" in base_name or base_name.startswith("."):
        raise ModelError(f"{card_path(model_path)}: base file must sit beside the model")
    if not all(np.isfinite([a, b, c])):
        raise ModelError(f"{card_path(model_path)}: combiner is not finite")
    base = load_model(model_path.with_name(base_name), allowed=allowed)
    if base.base is not None:
        raise ModelError(f"{model_path}: its base is itself a composite")
    check_site_base(model_path, base.pipeline)
    if base.card["model_sha256"] != base_sha:
        raise ModelError(
            f"{model_path}: base {base_name} is not the one its card names "
            f"({base_sha[:12]}...): refusing a swapped base"
        )
    return base, (a, b, c)


# -- serving -----------------------------------------------------------------------------
