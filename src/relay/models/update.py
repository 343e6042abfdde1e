"""Train a candidate model version from the base model plus the feedback, and gate it.

The feedback store keeps only the words+meta hashed vector of each message (no character
n-grams, no body), and a site has no base training corpora, so a version is:

- the **base** model, unchanged (the shipped one: its character n-grams stay in use);
- a **site** model: a logistic regression over the base's own words and meta feature
  columns (its tf-idf of the stored count vector; at serving the base's feature step
  gives the same columns, computed once for both models);
- a **combiner**: ``p = sigmoid(a * logit(p_base) + b * site + c)``, a logistic regression
  fitted on the base probability kept with each entry at learn time and the site model's
  *out-of-fold* scores (sender-grouped folds), so ``p`` is calibrated on data the site
  model did not see (Platt, as the base's own sigmoid).

The newest ``held_out_share`` of each class of the scored feedback (by report time) is
never trained on: the candidate and the model in force are scored on it, and the gates
compare them. A drop counts against the candidate only when it is larger than the
tolerance *and* significant on the paired scores (a held-out set of 10-50 messages moves
by one message per 2-10 points of recall), and recall is compared only with a model in
force that keeps the FPR budget itself. Pure: no store, no files, no clock (``now`` is
given).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from relay.classifier import evaluation
from relay.classifier.features import FEATURE_VERSION
from relay.classifier.model import (
    SITE_BLOCKS,
    LoadedModel,
    check_site_base,
    combine,
    load_model,
    logit,
)
from relay.classifier.selection import META_FEATURES, WORD_FEATURES
from relay.errors import ModelError
from relay.feedback.record import VECTOR_LAYOUT, FeedbackEntry, decode_vector
from relay.feedback.store import training_set

POLICY_CUTS = (0.1, 0.5, 0.7, 0.9, 0.99)  # the shipped policies' classifier cuts
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class GateSettings:
    """When a candidate may be promoted (``[model]`` keys of the same names)."""

    max_fpr: float = 0.01  # held-out feedback ham flagged at p >= threshold, at most
    tolerance: float = 0.01  # AUC / recall may drop at most this much vs the model in force
    alpha: float = 0.05  # a larger drop is a regression only when its one-sided p is below
    threshold: float = 0.9  # the probability at which mail counts as blocked
    reporter_share: float = 0.1  # training: at most this share of a class per reporter
    min_per_class: int = 5  # scored training entries per class for the combiner
    folds: int = 5
    c: float = 1.0  # the site model's inverse regularisation


@dataclass(frozen=True, slots=True)
class Gate:
    passed: bool
    reasons: tuple[str, ...]  # why not, one per failed check
    checks: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "checks": self.checks}


@dataclass(frozen=True)
class Candidate:
    """A trained version not yet written: the registry saves it (``registry.save``)."""

    base: LoadedModel  # the root base model, unchanged
    site: Any  # fitted LogisticRegression over the base's words+meta columns
    combiner: tuple[float, float, float]
    card: dict[str, Any]  # everything but the file digests the registry adds
    gate: Gate

    def classify_many(self, raws: Sequence[bytes]) -> list[float]:
        """Spam probabilities of raw messages, exactly as the saved version serves them."""
        served = replace(
            self.base,
            pipeline=self.site,
            spam_column=_spam_column(self.site),
            base=self.base,
            combiner=self.combiner,
        )
        return [p for p, _ in served.classify_many(raws)]


def scores_from_bodies(base: LoadedModel, entries: Sequence[FeedbackEntry]) -> dict[str, float]:
    """Base probabilities of the entries stored with their body (``keep_bodies``)."""
    return {e.digest: base.classify_bytes(e.body)[0] for e in entries if e.body is not None}


def score_raw(candidate: Candidate, raws: Sequence[bytes]) -> list[float]:
    """Offline scoring of raw messages with a candidate (as the saved version serves)."""
    return candidate.classify_many(raws)


def feedback_digest(entries: Sequence[FeedbackEntry]) -> str:
    """sha256 over the sorted ``digest:label`` lines: which lessons a version learned."""
    lines = sorted(f"{e.digest}:{e.label}" for e in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def matrix(entries: Sequence[FeedbackEntry]) -> Any:
    """The stored vectors as one sparse count matrix (words block, then meta block)."""
    from scipy.sparse import csr_matrix

    indptr = [0]
    indices: list[int] = []
    data: list[int] = []
    for entry in entries:
        idx, counts = decode_vector(entry.vector)
        indices.extend(idx)
        data.extend(counts)
        indptr.append(len(indices))
    return csr_matrix(
        (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), indptr),
        shape=(len(entries), WORD_FEATURES + META_FEATURES),
    )


def site_features(base: LoadedModel, counts: Any) -> Any:
    """Stored count vectors -> the site model's input: the base's own tf-idf of each block
    (its idf, sub-linear tf, l2 norm) times its block weight, i.e. the words and meta
    columns the base's feature step gives the same message at serving (``site_input``)."""
    from scipy.sparse import hstack

    features = base.pipeline.named_steps["features"]
    weights = features.transformer_weights or {}
    blocks = {"words": counts[:, :WORD_FEATURES], "meta": counts[:, WORD_FEATURES:]}
    parts = []
    for name in SITE_BLOCKS:
        tfidf = features.named_transformers_[name].named_steps["tfidf"]
        parts.append(tfidf.transform(blocks[name]) * float(weights.get(name, 1.0)))
    return hstack(parts, format="csr")


def _classifier(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="liblinear", max_iter=1000)


def _spam_column(classifier: Any) -> int:
    return [str(x) for x in classifier.classes_].index("spam")


def _signed(classifier: Any, scores: Any) -> FloatArray:
    """Decision values signed so that larger means spam, whatever the class order."""
    out = np.asarray(scores, dtype=np.float64)
    return -out if _spam_column(classifier) == 0 else out


def _groups(entries: Sequence[FeedbackEntry]) -> npt.NDArray[np.str_]:
    # One sender's mail on both sides of a fold would flatter the site model and make the
    # combiner trust it too much (as in training, docs/classifier.md).
    return np.array([e.domains.sender or e.digest for e in entries], dtype=str)


def _out_of_fold(
    x: Any, y: npt.NDArray[np.str_], groups: npt.NDArray[np.str_], g: GateSettings, n_jobs: int
) -> FloatArray:
    folds = min(g.folds, int((y == "spam").sum()), int((y == "ham").sum()))
    if folds < 2:
        raise ModelError("too little feedback to cross-validate: need 2 of each class")
    splits = _splits(y, groups, folds)

    def one(train: Any, test: Any) -> tuple[Any, FloatArray]:
        model = _classifier(g.c).fit(x[train], y[train])
        return test, _signed(model, model.decision_function(x[test]))

    from joblib import Parallel, delayed  # type: ignore[import-untyped]

    done = Parallel(n_jobs=n_jobs)(delayed(one)(tr, te) for tr, te in splits)
    scores = np.zeros(len(y), dtype=np.float64)
    for test, values in done:
        scores[test] = values
    return scores


def _splits(y: npt.NDArray[np.str_], groups: npt.NDArray[np.str_], folds: int) -> list[Any]:
    """Sender-grouped stratified folds; when senders are too few for every training
    fold to hold both classes, one group per entry (as training falls back to bodies)."""
    from sklearn.model_selection import StratifiedGroupKFold

    for grouping in (groups, np.arange(len(y)).astype(str)):
        if len(set(grouping.tolist())) < folds:
            continue
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=20260)
        splits = list(splitter.split(np.zeros(len(y)), y, grouping))
        if all(len(set(y[tr].tolist())) == 2 and len(te) for tr, te in splits):
            return splits
    raise ModelError("feedback cannot be split into folds holding both classes")


def _fit_combiner(base_p: FloatArray, site: FloatArray, spam: BoolArray) -> tuple[float, ...]:
    from sklearn.linear_model import LogisticRegression

    features = np.column_stack([logit(base_p), site])
    fit = LogisticRegression(C=100.0, max_iter=1000).fit(features, spam.astype(int))
    a, b = (float(v) for v in fit.coef_[0])
    if b > 0:
        return a, b, float(fit.intercept_[0])
    # A site score that counts against its own label beyond the base is noise (e.g. the
    # base has seen these messages): keep the base alone, recalibrated on the feedback.
    fit = LogisticRegression(C=100.0, max_iter=1000).fit(features[:, :1], spam.astype(int))
    return float(fit.coef_[0][0]), 0.0, float(fit.intercept_[0])


def figures(
    spam: BoolArray, probs: FloatArray, groups: npt.NDArray[np.str_], cut: float
) -> dict[str, Any]:
    """Held-out figures: AUC with a sender-cluster bootstrap interval, the gate cut, the
    policy cuts (Wilson intervals) and the calibration table."""
    out = evaluation.figures(spam, probs, {"gate": cut})
    has_both = bool(spam.any() and (~spam).any())
    out["roc_auc_ci95"] = (
        list(evaluation.auc_interval(spam, probs, groups, resamples=200)) if has_both else None
    )
    out["at_policy_cuts"] = {f"{c:g}": evaluation.at_threshold(spam, probs, c) for c in POLICY_CUTS}
    out["calibration"] = evaluation.reliability(spam, probs)
    return out


@dataclass(frozen=True, slots=True)
class Paired:
    """One labelled set scored by the candidate and by the model in force."""

    spam: BoolArray
    candidate: FloatArray
    current: FloatArray
    groups: npt.NDArray[np.str_]  # bootstrap clusters (one sender's mail moves together)


def recall_drop_p(paired: Paired, cut: float) -> tuple[int, int, float]:
    """(spam lost, spam gained, one-sided p) of the candidate's recall at ``cut``: the
    exact McNemar test, i.e. a sign test on the spam only one of the two models catches
    (under "no difference" each such message is equally likely to go either way)."""
    new = paired.candidate[paired.spam] >= cut
    old = paired.current[paired.spam] >= cut
    lost, won = int((old & ~new).sum()), int((new & ~old).sum())
    n = lost + won
    p = sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n if n else 1.0
    return lost, won, p


def auc_drop_p(paired: Paired, *, resamples: int = 1000, seed: int = 0) -> float:
    """One-sided p of the candidate's AUC being below the current's: the share of paired
    sender-cluster bootstrap resamples (the same messages for both models) in which it is
    not below. Deterministic (fixed seed)."""
    _, inverse = np.unique(paired.groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]
    rng = np.random.default_rng(seed)
    not_below = counted = 0
    for _ in range(resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        spam = paired.spam[idx]
        new = evaluation.roc_auc(spam, paired.candidate[idx])
        old = evaluation.roc_auc(spam, paired.current[idx])
        if not (math.isnan(new) or math.isnan(old)):
            counted += 1
            not_below += new >= old
    return not_below / counted if counted else 1.0


def _current_scores(
    current: LoadedModel | None, x: Any, base_p: FloatArray, root_sha: str
) -> FloatArray | None:
    """The model in force on the same held-out entries, from the stored vector and base
    score (so no body is needed); None when it stands on another base."""
    if current is None or current.base is None or current.combiner is None:
        if current is not None and str(current.card["model_sha256"]) != root_sha:
            return None
        return base_p
    if str(current.root.card["model_sha256"]) != root_sha:
        return None
    return combine(current.combiner, base_p, current.site_scores(x))


def _gate(
    g: GateSettings,
    cand: dict[str, Any],
    curr: dict[str, Any] | None,
    base_test: dict[str, Any] | None,
    held: Paired | None = None,
    test: Paired | None = None,
) -> Gate:
    reasons: list[str] = []
    checks: dict[str, Any] = {}
    if not cand["ham"] or not cand["spam"]:
        reasons.append(
            f"held-out feedback has {cand['ham']} ham and {cand['spam']} spam: need both"
        )
    else:
        fpr = cand["at_thresholds"]["gate"]["fpr"]
        checks["held_out_fpr"] = {"value": fpr, "max": g.max_fpr, "threshold": g.threshold}
        if fpr > g.max_fpr:
            reasons.append(
                f"held-out feedback: legitimate mail blocked (FPR at p >= {g.threshold:g}) "
                f"{fpr:.2%} is over the budget {g.max_fpr:.2%}"
            )
        if curr is None:
            checks["regression"] = "not compared: the model in force stands on another base"
        else:
            reasons += _regressions("held-out feedback", cand, curr, g, checks, held)
    if base_test is not None:
        reasons += _regressions(
            "base test split", base_test["candidate"], base_test["current"], g, checks, test
        )
        c_fpr = base_test["candidate"]["at_thresholds"]["gate"]["fpr"] or 0.0
        o_fpr = base_test["current"]["at_thresholds"]["gate"]["fpr"] or 0.0
        checks["base_test_fpr"] = {"candidate": c_fpr, "current": o_fpr}
        if c_fpr > o_fpr + g.tolerance:
            reasons.append(
                f"base test split: FPR at p >= {g.threshold:g} rose from {o_fpr:.2%} to "
                f"{c_fpr:.2%} (tolerance {g.tolerance:.2%})"
            )
    return Gate(not reasons, tuple(reasons), checks)


def _regressions(
    where: str,
    cand: dict[str, Any],
    curr: dict[str, Any],
    g: GateSettings,
    checks: dict[str, Any],
    paired: Paired | None = None,
) -> list[str]:
    """Drops of AUC and of recall at the gate cut against the model in force. With the
    paired scores, a drop beyond the tolerance must also be significant (one-sided p <
    ``alpha``); and recall is not compared with a model in force whose own FPR at the cut
    is over the budget on this set: its recall was bought with legitimate mail blocked,
    and the candidate already has to keep the budget. Without them (callers that pass
    figures only), any drop beyond the tolerance counts."""
    out = []
    old_fpr = curr["at_thresholds"]["gate"]["fpr"]
    pairs = {
        "roc_auc": (cand["roc_auc"], curr["roc_auc"]),
        "recall": (
            cand["at_thresholds"]["gate"]["recall"] or 0.0,
            curr["at_thresholds"]["gate"]["recall"] or 0.0,
        ),
    }
    for name, (new, old) in pairs.items():
        check: dict[str, Any] = {"candidate": new, "current": old}
        checks[f"{where}: {name}"] = check
        if math.isnan(new) or math.isnan(old) or new >= old - g.tolerance:
            continue
        why = ""
        if paired is not None and name == "recall":
            if old_fpr is not None and old_fpr > g.max_fpr:
                check["compared"] = False
                check["why"] = (
                    f"the model in force blocks {old_fpr:.2%} of this ham at p >= "
                    f"{g.threshold:g}, over the budget {g.max_fpr:.2%}"
                )
                continue
            lost, won, p = recall_drop_p(paired, g.threshold)
            check.update(lost=lost, gained=won, p_value=p)
            why = f"; {lost} spam lost, {won} gained, exact McNemar p = {p:.3g}"
        elif paired is not None:
            p = auc_drop_p(paired)
            check["p_value"] = p
            why = f"; paired cluster bootstrap p = {p:.3g}"
        if paired is not None and p >= g.alpha:
            check["significant"] = False
            continue
        out.append(
            f"{where}: {name} dropped from {old:.4f} to {new:.4f} (tolerance {g.tolerance:g}{why})"
        )
    return out


def _counts(entries: Sequence[FeedbackEntry]) -> dict[str, int]:
    spam = sum(1 for e in entries if e.label == "spam")
    return {"entries": len(entries), "spam": spam, "ham": len(entries) - spam}


def update_model(
    base: LoadedModel | Path,
    entries: Sequence[FeedbackEntry],
    held_out_share: float = 0.2,
    *,
    base_scores: Mapping[str, float] | None = None,
    now: float | None = None,
    current: LoadedModel | None = None,
    gate: GateSettings = GateSettings(),
    base_test: Sequence[tuple[bytes, bool]] | None = None,
    parent: Mapping[str, str] | None = None,
    n_jobs: int = 1,
) -> Candidate:
    """Train a candidate from ``base`` (its root, if a version is given) and ``entries``.

    ``base_scores``: digest -> the root base's spam probability of that entry's body (kept
    at learn time, or computed from kept bodies). The newest ``held_out_share`` of each
    class of the scored entries is held out; older entries (scored or not) train the site
    model under ``training_set``'s reporter cap and class balance; scored ones fit the
    combiner.
    ``current``: the model in force, compared on the held-out set (None: the base).
    ``base_test``: (raw, is_spam) of the base test split, scored by both when given.
    Raises ModelError when the feedback is too small to train and measure anything."""
    started = time.perf_counter()
    root = (load_model(base) if isinstance(base, Path) else base).root
    root_sha = str(root.card["model_sha256"])
    check_site_base(root.path, root.pipeline)
    if base_scores is None:
        base_scores = scores_from_bodies(root, entries)
    if now is None:
        now = max((e.at for e in entries), default=0.0)
    usable = [e for e in entries if e.feature_version == FEATURE_VERSION]
    scored = sorted((e for e in usable if e.digest in base_scores), key=lambda e: (e.at, e.digest))
    if not 0 < held_out_share < 1:
        raise ModelError("held_out_share must be between 0 and 1")
    # The newest share of each class: reports come in batches (a folder of spam, then
    # one of ham), and a held-out set of one class could measure nothing.
    held: list[FeedbackEntry] = []
    cutoffs: dict[str, float] = {}
    for label in ("spam", "ham"):
        of_class = [e for e in scored if e.label == label]
        n_held = math.ceil(len(of_class) * held_out_share)
        if n_held:
            held += of_class[-n_held:]
            cutoffs[label] = of_class[-n_held].at
    if not held:
        raise ModelError("no held-out feedback: no entry has a kept base score")
    held.sort(key=lambda e: (e.at, e.digest))
    # Never train on anything as new as its class's held-out entries: they stay unseen.
    pool = [e for e in usable if e.at < cutoffs.get(e.label, math.inf)]
    train = sorted(training_set(pool, gate.reporter_share), key=lambda e: (e.at, e.digest))
    y = np.array([e.label for e in train], dtype=str)
    comb_idx = np.array([i for i, e in enumerate(train) if e.digest in base_scores], dtype=int)
    comb_y = y[comb_idx] if len(comb_idx) else np.array([], dtype=str)
    if min((comb_y == "spam").sum(), (comb_y == "ham").sum()) < gate.min_per_class:
        raise ModelError(
            f"too little scored feedback to fit the combiner: {int((comb_y == 'spam').sum())} "
            f"spam and {int((comb_y == 'ham').sum())} ham older than the held-out set "
            f"(need {gate.min_per_class} of each)"
        )
    x = site_features(root, matrix(train))
    groups = _groups(train)
    oof = _out_of_fold(x, y, groups, gate, n_jobs)
    base_train = np.array([base_scores[train[i].digest] for i in comb_idx], dtype=np.float64)
    combiner = _fit_combiner(base_train, oof[comb_idx], comb_y == "spam")
    t_fit = time.perf_counter()
    site = _classifier(gate.c).fit(x, y)
    fit_seconds = time.perf_counter() - t_fit
    a, b, c = combiner

    x_held = site_features(root, matrix(held))
    spam_held = np.array([e.label == "spam" for e in held])
    base_held = np.array([base_scores[e.digest] for e in held], dtype=np.float64)
    p_held = combine((a, b, c), base_held, _signed(site, site.decision_function(x_held)))
    g_held = _groups(held)
    cand_fig = figures(spam_held, p_held, g_held, gate.threshold)
    curr_p = _current_scores(current, x_held, base_held, root_sha)
    curr_fig = None if curr_p is None else figures(spam_held, curr_p, g_held, gate.threshold)
    oof_p = combine((a, b, c), base_train, oof[comb_idx])
    cv_fig = figures(comb_y == "spam", oof_p, groups[comb_idx], gate.threshold)

    candidate = Candidate(root, site, (a, b, c), {}, Gate(False, ()))
    base_test_fig: dict[str, Any] | None = None
    held_pair = None if curr_p is None else Paired(spam_held, p_held, curr_p, g_held)
    test_pair: Paired | None = None
    if base_test:
        raws = [raw for raw, _ in base_test]
        spam_t = np.array([s for _, s in base_test])
        ones = np.array(["" for _ in base_test], dtype=str)
        in_force = current or root
        cand_t = np.array(candidate.classify_many(raws), dtype=np.float64)
        curr_t = np.array([p for p, _ in in_force.classify_many(raws)], dtype=np.float64)
        base_test_fig = {
            "messages": len(raws),
            "candidate": figures(spam_t, cand_t, ones, gate.threshold),
            "current": figures(spam_t, curr_t, ones, gate.threshold),
        }
        # The split's senders are unknown here: each message is its own cluster.
        test_pair = Paired(spam_t, cand_t, curr_t, np.arange(len(raws)).astype(str))
    verdict = _gate(gate, cand_fig, curr_fig, base_test_fig, held_pair, test_pair)
    thresholds = {"p_0.5": 0.5}
    if spam_held.any() and (~spam_held).any():
        for name, f in (("fpr_0.1%", 0.001), ("fpr_1%", 0.01)):  # the base card's names
            thresholds[name] = evaluation.threshold_at_fpr(spam_held, p_held, f)
    card = {
        "format": 2,
        "kind": "composite",
        "trained_at": datetime.fromtimestamp(now, UTC).replace(microsecond=0).isoformat(),
        "classes": ["ham", "spam"],
        "features": root.card.get("features", {}),
        "site_features": {"layout": VECTOR_LAYOUT, "words": WORD_FEATURES, "meta": META_FEATURES},
        "parent": dict(parent or {}),
        "base": {"sha256": root_sha, "trained_at": root.card.get("trained_at", "")},
        "combiner": {
            "form": "p = sigmoid(a * logit(p_base) + b * site_decision + c)",
            "a": a,
            "b": b,
            "c": c,
            "fitted_on": "out-of-fold site scores over sender-grouped folds of the "
            "scored training feedback, with the base probability kept at learn time; "
            "b = 0 when the site score carried no positive weight (base recalibrated alone)",
        },
        "estimator": {
            "site": f"LogisticRegression(C={gate.c}, liblinear) over the base's words and "
            "meta feature columns (its tf-idf and block weights; the stored count vectors "
            "transformed the same way at training)",
        },
        "feedback": {
            # When the store was read (Unix seconds, exact): `--min-new` counts reports after it.
            "read_at": now,
            "digest": feedback_digest(usable),
            "all": _counts(entries),
            "usable": _counts(usable),
            "scored": len(scored),
            "training": {**_counts(train), "scored": len(comb_idx)},
            "held_out": {
                **_counts(held),
                "share": held_out_share,
                "since": {
                    k: datetime.fromtimestamp(v, UTC).isoformat() for k, v in cutoffs.items()
                },
            },
        },
        "thresholds": thresholds,
        "evaluation": {
            "held_out_feedback": {"candidate": cand_fig, "current": curr_fig},
            "cross_validation": cv_fig,
            "base_test": base_test_fig
            or {
                "run": False,
                "why": "no --base-test-corpus/--base-test-labels given (a site does not "
                "have the base corpora; bench and CI run this gate)",
            },
        },
        "gate": {**verdict.as_dict(), "settings": _gate_settings(gate)},
        "timing": {"site_fit_seconds": fit_seconds, "total_seconds": time.perf_counter() - started},
    }
    return Candidate(root, site, (a, b, c), card, verdict)


def _gate_settings(g: GateSettings) -> dict[str, Any]:
    return {
        "max_fpr": g.max_fpr,
        "tolerance": g.tolerance,
        "alpha": g.alpha,
        "threshold": g.threshold,
        "reporter_share": g.reporter_share,
    }


__all__ = [
    "Candidate",
    "Gate",
    "GateSettings",
    "Paired",
    "auc_drop_p",
    "feedback_digest",
    "matrix",
    "recall_drop_p",
    "score_raw",
    "scores_from_bodies",
    "update_model",
]
