"""`relay lab tune`: fit a policy's rule scores and thresholds to a labelled corpus under a
false-positive budget, by cross-validation, and propose the result as a policy file.

What is fitted. The scores of score rules and the lowest blocking threshold (quarantine,
tempfail or reject, whichever is lowest); the other thresholds move with it, keeping their
distance to it (the ladder moves as one). Kept as they are, and said so in the report:

- forced rules (``action = ...``): their outcome never depends on a score;
- rules whose condition could not be evaluated in the lab (a fact they read failed, e.g.
  DNS reputation offline) on at least UNAVAILABLE_SHARE of the training messages: the fit
  would see "never matches" where live it would match, and push a meaningful score to 0;
- rules that match no training message whose outcome a score can change (no forced
  action): there is no evidence to move them.

Signs are kept: a negative (exemption) score stays <= 0, any other stays >= 0.

What the fit sees. The rule-hit matrix the lab already computes: every rule each message
matches, past the engine's early stop (complete.py), over cached facts (run.py), so no fact
is computed per fold. Blocked is the lab's: reject, tempfail or quarantine (rescore.BLOCKED);
"spam stopped" counts the same actions (a tag reaches the inbox), as in the threshold
curves (curves.py). A message with a matched forced action keeps its forced outcome.

Method. Three candidates on the same stratified folds, each followed by the same cutoff
choice (the cutoff blocking the most training messages while their blocked legitimate mail
stays within the budget, placed just below the lowest blocked score rather than halfway
down an unseen gap: choose_cutoff), judged on the held-out fold, so every figure reported
is out of fold:

- ``logistic``: L2-regularised logistic regression on the hit matrix with sign bounds
  (scipy L-BFGS-B), class-balanced;
- ``perceptron``: SpamAssassin's perceptron (masses/perceptron.c, Henry Stern 2003): one
  logistic-sigmoid unit, least-squares error, stochastic gradient descent for 15 epochs at
  learning rate 2.0, each ham replicated 1 + 2 x (its rule hits) times (ham preference),
  the step divided by hits + 1, weights clamped to their sign after each step;
- ``thresholds_only``: the original scores, only the cutoff re-chosen (the reference any
  fitted score set has to beat).

The method with the most out-of-fold spam stopped among those within the budget out of
fold wins (ties: less legitimate mail blocked, then the simpler method; none within it:
the one blocking least legitimate mail). The chosen method is then fitted once on all the
training messages: those scores and that cutoff are the proposed policy.

Units. Fitted weights are in log-odds; they are scaled to policy points by the factor
that brings them closest to the original scores (least squares over the rules being
tuned), so old and new scores compare rule by rule, then rounded to 2 decimals. Cutoffs
lie CUTOFF_MARGIN below an attainable score, or halfway between two closer ones (3
decimals), so rounding or summation order never moves a message across one.

In-sample facts. When the policy reads ``spam_probability`` and the model's card says it
was trained on this very labels file, the classifier's values on the train rows are
in-sample (near perfect); the report says so, and only the held-out figures
(``--heldout``) show what the classifier does on unseen mail. ``--preset-probabilities``
replaces them with out-of-fold values (bench/oof_probabilities.py) for the train messages
it lists: the override is applied in memory after the facts are read from the cache, so
the cache only ever holds the live classifier's values, and the held-out split always
uses the live model.

Split. Only rows of set ``train`` are used (a labels row without a set column is in set
train, relay/corpus.py); tuning on ``test`` is refused. The held-out test split may be
*reported* before and after (``--heldout``), never used to fit or choose.

One module, in four sections read top to bottom: the pure fit over the hit matrix
(values are frozen dataclasses), the policy file rewrite, the report (JSON and Markdown),
and the run (corpus, cached facts, files). Only the run touches files or the engine; the
tests drive the first three directly with synthetic hit matrices.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tomlkit
from scipy.optimize import minimize

from relay.errors import PolicyError, RelayError
from relay.lab.cache import Cached
from relay.lab.compute import Outcomes
from relay.lab.corpus import CorpusMessage, Source, load_corpus, sources_from_labels
from relay.lab.diff import mcnemar_exact, newcombe_paired
from relay.lab.env import LabEnv
from relay.lab.evaluate import Regime, evaluate, load_regimes, needed_facts
from relay.lab.rescore import BLOCKED, SEVERITY, RuleDef
from relay.lab.run import LabOptions, compute_facts
from relay.lab.shares import proportion
from relay.policy import Policy, check_files

Bools = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]

TRAIN_SET = "train"
UNAVAILABLE_SHARE = 0.05
"""A rule unevaluable on at least this share of the training messages is kept as it is."""
SCORE_DECIMALS = 2
CUTOFF_DECIMALS = 3
CUTOFF_MARGIN = 0.5
"""Points between the lowest blocked training score and the cutoff (choose_cutoff)."""
METHODS = ("logistic", "perceptron", "thresholds_only")
SIMPLER = {"thresholds_only": 0, "logistic": 1, "perceptron": 2}
L2 = 1.0  # logistic: penalty on the squared weights (log-odds units), against separation
SA_EPOCHS, SA_LEARNING_RATE, SA_HAM_PREFERENCE = 15, 2.0, 2.0  # perceptron.c's defaults
THRESHOLD_NAMES = ("tag", "quarantine", "tempfail", "reject")
NO_BLOCKING = (
    "the policy has no quarantine, tempfail or reject threshold: its scores never block "
    "mail, so there is nothing to fit against a false-positive budget"
)


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """What the fit sees: the rules (file order), which messages match which rule, the
    labels, and per rule on how many messages its condition could not be evaluated."""

    rules: tuple[RuleDef, ...]
    hits: Bools  # (messages, rules)
    spam: Bools  # (messages,)
    thresholds: Mapping[str, float]  # [policy.thresholds] as written
    unevaluable: tuple[int, ...] = ()  # per rule; empty: all evaluable

    @property
    def n(self) -> int:
        return int(self.spam.shape[0])

    def lowest_block(self) -> float | None:
        return min(
            (v for k, v in self.thresholds.items() if k in BLOCKED),
            default=None,
        )


@dataclass(frozen=True, slots=True)
class RuleFit:
    name: str
    action: str | None
    old: float
    new: float
    kept: str | None  # why the score was kept as it is (None: tuned)
    spam: int  # training messages of each label matching the rule
    ham: int
    unevaluable: int


@dataclass(frozen=True, slots=True)
class Fit:
    """Scores (per rule, policy points) and the cutoff: unforced mail scoring >= cutoff
    is blocked."""

    scores: tuple[float, ...]
    cutoff: float


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Out-of-fold outcome of one method: which messages it blocked."""

    method: str
    blocked: Bools  # (messages,)
    folds_within_budget: int  # held-out folds whose own ham blocked share met the budget
    fold_cutoffs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class TuneResult:
    problem: Problem
    budget: float
    folds: int
    seed: int
    rules: tuple[RuleFit, ...]
    original: Bools  # blocked by the original policy (its own thresholds)
    evaluations: tuple[Evaluation, ...]
    chosen: str
    final: Fit
    thresholds: Mapping[str, float]  # the proposed [policy.thresholds]
    budget_reachable: bool  # forced rules alone stay within the budget


# -- pure functions over the hit matrix -----------------------------------------------------


def parse_budget(text: str) -> float:
    """``0.1%`` or ``0.001``: a share of legitimate mail, in [0, 1)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise RelayError(f"--fp-budget: not a share or a percentage: {text!r}") from None
    if not (0.0 <= value < 1.0) or not math.isfinite(value):
        raise RelayError(f"--fp-budget: must be at least 0 and below 100%: {text!r}")
    return value


def forced_outcomes(problem: Problem) -> tuple[Bools, Bools]:
    """(forced: a forced action matched, forced_block: the most severe one blocks)."""
    n = problem.n
    worst = np.full(n, -1, dtype=np.int64)
    for j, rule in enumerate(problem.rules):
        if rule.action is not None:
            column = problem.hits[:, j]
            worst = np.where(column, np.maximum(worst, SEVERITY[rule.action]), worst)
    blocking = min(SEVERITY[a] for a in BLOCKED)
    return worst >= 0, worst >= blocking


def kept_reasons(problem: Problem, forced: Bools) -> tuple[str | None, ...]:
    """Per rule, why its score is not fitted (None: fitted)."""
    out: list[str | None] = []
    unforced = ~forced
    for j, rule in enumerate(problem.rules):
        unevaluable = problem.unevaluable[j] if problem.unevaluable else 0
        if rule.action is not None:
            out.append(f"forced action {rule.action}: no score")
        elif problem.n and unevaluable / problem.n >= UNAVAILABLE_SHARE:
            out.append(
                f"condition not evaluable in the lab on {unevaluable} of {problem.n} "
                "messages (a fact it reads failed)"
            )
        elif not bool((problem.hits[:, j] & unforced).any()):
            out.append("matches no message a score can decide: no evidence")
        else:
            out.append(None)
    return tuple(out)


def _sign_bounds(old: Sequence[float]) -> list[tuple[float | None, float | None]]:
    # Exemptions (negative scores) stay <= 0; everything else stays >= 0.
    return [(None, 0.0) if s < 0 else (0.0, None) for s in old]


def _patterns(x: Bools, y: Bools) -> tuple[Floats, Floats, Floats]:
    """Distinct (hit pattern, label) rows with their counts: a policy has few rules, so
    thousands of messages collapse to a few dozen rows and each fit takes milliseconds."""
    counts: Counter[tuple[bytes, bool]] = Counter(
        (row.tobytes(), bool(label)) for row, label in zip(x, y, strict=True)
    )
    width = x.shape[1]
    rows = np.array(
        [np.frombuffer(k, dtype=np.bool_, count=width) for k, _ in counts]
        if counts
        else np.zeros((0, width), dtype=np.bool_),
        dtype=np.float64,
    ).reshape(len(counts), width)
    labels = np.array([lab for _, lab in counts], dtype=np.float64)
    weights = np.array(list(counts.values()), dtype=np.float64)
    return rows, labels, weights


def fit_logistic(x: Bools, y: Bools, old: Sequence[float]) -> Floats:
    """Log-odds weights of a class-balanced, L2-regularised logistic regression with sign
    bounds (L-BFGS-B); the intercept is fitted and dropped (the cutoff replaces it)."""
    width = x.shape[1]
    if width == 0 or y.all() or not y.any():
        return np.zeros(width)
    rows, labels, counts = _patterns(x, y)
    n_spam, n_ham = float(y.sum()), float((~y).sum())
    # Balanced: each class weighs half, so the rare class is not ignored.
    weight = counts * np.where(labels > 0, 0.5 / n_spam, 0.5 / n_ham) * len(y)

    def loss(theta: Floats) -> tuple[float, Floats]:
        w, b = theta[:-1], theta[-1]
        z = rows @ w + b
        p = 1.0 / (1.0 + np.exp(-z))
        value = float(np.sum(weight * (np.logaddexp(0.0, z) - labels * z)))
        value += 0.5 * L2 * float(w @ w)
        g = weight * (p - labels)
        grad = np.concatenate([rows.T @ g + L2 * w, [g.sum()]])
        return value, grad

    start = np.zeros(width + 1)
    bounds = [*_sign_bounds(old), (None, None)]
    found = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    weights: Floats = np.asarray(found.x[:-1], dtype=np.float64)
    return weights


def fit_perceptron(x: Bools, y: Bools, old: Sequence[float], seed: int) -> Floats:
    """SpamAssassin's perceptron (masses/perceptron.c), its defaults and its sign clamp."""
    width = x.shape[1]
    rng = random.Random(seed)
    weights = [rng.random() - 0.5 for _ in range(width)]
    bias = rng.random() - 0.5
    hit_lists = [np.flatnonzero(row).tolist() for row in x]
    wheel: list[int] = []
    for i, hits in enumerate(hit_lists):
        # Hams with more hits are rarer and matter most: replicated by the ham preference.
        copies = 1 if y[i] else 1 + int(len(hits) * SA_HAM_PREFERENCE)
        wheel.extend([i] * copies)
    positive = [s >= 0 for s in old]
    target = [1.0 if v else 0.0 for v in y]
    for _ in range(SA_EPOCHS):
        rng.shuffle(wheel)
        for i in wheel:
            hits = hit_lists[i]
            z = bias + sum(weights[k] for k in hits)
            out = 1.0 / (1.0 + math.exp(-z)) if z > -500 else 0.0
            delta = out * (1 - out) * (target[i] - out) / (len(hits) + 1) * SA_LEARNING_RATE
            bias += delta
            for k in hits:
                w = weights[k] + delta
                weights[k] = max(w, 0.0) if positive[k] else min(w, 0.0)
    return np.array(weights, dtype=np.float64)


def to_points(weights: Floats, old: Sequence[float]) -> Floats:
    """Weights scaled to policy points: the factor closest to the old scores (least
    squares), rounded. Signs are kept, so the factor is never negative; all-zero weights
    stay zero."""
    reference = np.asarray(old, dtype=np.float64)
    norm = float(weights @ weights)
    scale = float(weights @ reference) / norm if norm > 0 else 0.0
    if scale <= 0:
        scale = 1.0
    return np.round(weights * scale, SCORE_DECIMALS)


def choose_cutoff(scores: Floats, spam: Bools, ham_allowed: int) -> float:
    """The cutoff blocking the most of these messages while blocking at most
    ``ham_allowed`` of the (unforced) hams; above every score when none qualifies.

    Every cutoff between the lowest blocked score and the next score down blocks the same
    training messages; the one chosen lies CUTOFF_MARGIN below the lowest blocked score
    (halfway to the next when they are closer), not lower: the scores in the gap were
    never seen in training, so blocking them spends the budget on no evidence. This
    matters when the training scores separate (a classifier scored on its own training
    rows): the midpoint of a wide gap then blocked unseen legitimate mail (docs/lab.md)."""
    values = np.unique(np.round(scores, SCORE_DECIMALS + 4))[::-1]  # descending
    if values.size == 0:
        return 0.0
    ham_scores = scores[~spam]
    chosen: int | None = None
    for i, v in enumerate(values):
        if int((ham_scores >= v - 1e-9).sum()) <= ham_allowed:
            chosen = i
        else:
            break
    if chosen is None:
        return round(float(values[0]) + 1.0, CUTOFF_DECIMALS)
    low = float(values[chosen])
    gap = low - float(values[chosen + 1]) if chosen + 1 < values.size else 2 * CUTOFF_MARGIN
    return round(low - min(CUTOFF_MARGIN, gap / 2), CUTOFF_DECIMALS)


def _fit(
    method: str,
    problem: Problem,
    rows: npt.NDArray[np.intp],
    tuned: Sequence[int],
    forced: Bools,
    forced_block: Bools,
    budget: float,
    seed: int,
) -> Fit:
    """One method fitted on ``rows``; the cutoff chosen on the same rows."""
    old = [problem.rules[j].score for j in range(len(problem.rules))]
    scores = np.array(
        [0.0 if problem.rules[j].action is not None else old[j] for j in range(len(old))]
    )
    free = [i for i in rows if not forced[i]]
    x = problem.hits[np.ix_(free, list(tuned))] if tuned else np.zeros((len(free), 0), bool)
    y = problem.spam[free]
    old_tuned = [old[j] for j in tuned]
    if method == "logistic":
        points = to_points(fit_logistic(x, y, old_tuned), old_tuned)
    elif method == "perceptron":
        points = to_points(fit_perceptron(x, y, old_tuned, seed), old_tuned)
    else:
        points = np.asarray(old_tuned, dtype=np.float64)
    for k, j in enumerate(tuned):
        scores[j] = float(points[k])
    ham_rows = int((~problem.spam[rows]).sum())
    forced_ham = int((forced_block[rows] & ~problem.spam[rows]).sum())
    allowed = math.floor(budget * ham_rows + 1e-9) - forced_ham
    total = problem.hits[free].astype(np.float64) @ scores
    if allowed < 0:  # forced rules alone exceed the budget: let the score block nothing
        cutoff = round(float(total.max(initial=0.0)) + 1.0, CUTOFF_DECIMALS)
    else:
        cutoff = choose_cutoff(total, y, allowed)
    return Fit(tuple(float(s) for s in scores), cutoff)


def blocked_by(problem: Problem, fit: Fit, forced: Bools, forced_block: Bools) -> Bools:
    total = problem.hits.astype(np.float64) @ np.asarray(fit.scores)
    return np.where(forced, forced_block, total >= fit.cutoff)


def stratified_folds(spam: Bools, k: int, seed: int) -> npt.NDArray[np.intp]:
    """Fold number per message: each label shuffled (seeded) and dealt round-robin, so
    every fold holds about 1/k of the spam and of the ham."""
    fold = np.zeros(spam.shape[0], dtype=np.intp)
    rng = random.Random(seed)
    for label in (True, False):
        idx = np.flatnonzero(spam == label).tolist()
        rng.shuffle(idx)
        for pos, i in enumerate(idx):
            fold[i] = pos % k
    return fold


def cross_validate(
    problem: Problem,
    method: str,
    tuned: Sequence[int],
    forced: Bools,
    forced_block: Bools,
    budget: float,
    folds: int,
    seed: int,
) -> Evaluation:
    assignment = stratified_folds(problem.spam, folds, seed)
    blocked = np.zeros(problem.n, dtype=np.bool_)
    within = 0
    cutoffs: list[float] = []
    for k in range(folds):
        train = np.flatnonzero(assignment != k)
        held = np.flatnonzero(assignment == k)
        fit = _fit(method, problem, train, tuned, forced, forced_block, budget, seed + k)
        cutoffs.append(fit.cutoff)
        decided = blocked_by(problem, fit, forced, forced_block)
        blocked[held] = decided[held]
        ham = held[~problem.spam[held]]
        if int(blocked[ham].sum()) <= math.floor(budget * ham.size + 1e-9):
            within += 1
    return Evaluation(method, blocked, within, tuple(cutoffs))


def original_blocked(problem: Problem, forced: Bools, forced_block: Bools) -> Bools:
    low = problem.lowest_block()
    scores = [0.0 if r.action is not None else r.score for r in problem.rules]
    total = problem.hits.astype(np.float64) @ np.asarray(scores)
    unforced = np.zeros(problem.n, dtype=np.bool_) if low is None else total >= low
    return np.where(forced, forced_block, unforced)


def _rate(blocked: Bools, mask: Bools) -> float:
    n = int(mask.sum())
    return int((blocked & mask).sum()) / n if n else 0.0


def pick(evaluations: Sequence[Evaluation], spam: Bools, budget: float) -> str:
    """The method that stops the most spam out of fold among those whose out-of-fold
    legitimate mail blocked is within the budget (ties: less legitimate mail blocked, then
    the simpler method); when none is within it, the one blocking the least legitimate
    mail (a budget is a constraint, not something to trade for spam)."""
    ham = ~spam
    allowed = math.floor(budget * int(ham.sum()) + 1e-9)

    def key(e: Evaluation) -> tuple[int, float, float, int]:
        over = max(0, int((e.blocked & ham).sum()) - allowed)
        return (over, -_rate(e.blocked, spam), _rate(e.blocked, ham), SIMPLER[e.method])

    return min(evaluations, key=key).method


def new_thresholds(thresholds: Mapping[str, float], cutoff: float) -> dict[str, float]:
    """The ladder moved as one: the lowest blocking threshold lands on the cutoff, the
    others keep their distance to it (so their order and spacing stay valid)."""
    low = min(v for k, v in thresholds.items() if k in BLOCKED)
    shift = cutoff - low
    return {k: round(v + shift, CUTOFF_DECIMALS) for k, v in thresholds.items()}


def tune(
    problem: Problem,
    budget: float,
    folds: int = 5,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
) -> TuneResult:
    if problem.lowest_block() is None:
        raise RelayError(NO_BLOCKING)
    n_spam, n_ham = int(problem.spam.sum()), int((~problem.spam).sum())
    k = min(folds, n_spam, n_ham)
    if k < 2:
        raise RelayError(
            f"too few training messages to cross-validate: {n_spam} spam, {n_ham} ham "
            f"(at least 2 of each; only set {TRAIN_SET!r} is used)"
        )
    forced, forced_block = forced_outcomes(problem)
    kept = kept_reasons(problem, forced)
    tuned = [j for j, reason in enumerate(kept) if reason is None]
    evaluations = tuple(
        cross_validate(problem, m, tuned, forced, forced_block, budget, k, seed) for m in methods
    )
    chosen = pick(evaluations, problem.spam, budget)
    everything = np.arange(problem.n, dtype=np.intp)
    final = _fit(chosen, problem, everything, tuned, forced, forced_block, budget, seed)
    forced_ham = int((forced_block & ~problem.spam).sum())
    rules = tuple(
        RuleFit(
            name=r.name,
            action=r.action,
            old=r.score,
            new=final.scores[j] if r.action is None else r.score,
            kept=kept[j],
            spam=int((problem.hits[:, j] & problem.spam).sum()),
            ham=int((problem.hits[:, j] & ~problem.spam).sum()),
            unevaluable=problem.unevaluable[j] if problem.unevaluable else 0,
        )
        for j, r in enumerate(problem.rules)
    )
    return TuneResult(
        problem=problem,
        budget=budget,
        folds=k,
        seed=seed,
        rules=rules,
        original=original_blocked(problem, forced, forced_block),
        evaluations=evaluations,
        chosen=chosen,
        final=final,
        thresholds=new_thresholds(problem.thresholds, final.cutoff),
        budget_reachable=forced_ham <= math.floor(budget * n_ham + 1e-9),
    )


# -- the proposed policy file ------------------------------------------------------------


def rewrite_policy(text: str, scores: Mapping[str, float], thresholds: Mapping[str, float]) -> str:
    """The policy text with only these numbers changed: ``score`` of the named rules and
    keys of ``[policy.thresholds]``. tomlkit keeps comments, order and layout; a value
    equal to the old one is not touched, so its spelling (``3`` or ``3.0``) stays."""
    doc = tomlkit.parse(text)
    policy = doc.get("policy")
    table = policy.get("thresholds") if isinstance(policy, Mapping) else None
    if isinstance(table, dict) and thresholds:
        for key, value in thresholds.items():
            if key in table and float(table[key]) != value:
                table[key] = value
    rules = doc.get("rule")
    if isinstance(rules, list):
        for rule in rules:
            name = rule.get("name")
            changed = isinstance(name, str) and name in scores and "score" in rule
            if changed and float(rule["score"]) != scores[name]:
                rule["score"] = scores[name]
    return tomlkit.dumps(doc)


# -- report ------------------------------------------------------------------------------


def _figures(blocked: Bools, spam: Bools) -> dict[str, Any]:
    return {
        "spam_stopped": proportion(int((blocked & spam).sum()), int(spam.sum())),
        "ham_blocked": proportion(int((blocked & ~spam).sum()), int((~spam).sum())),
    }


def _paired(a: Bools, b: Bools, mask: Bools) -> dict[str, Any]:
    """a minus b on the same messages: Newcombe's paired interval and exact McNemar."""
    x, y = a[mask], b[mask]
    both = int((x & y).sum())
    only_a = int((x & ~y).sum())
    only_b = int((~x & y).sum())
    neither = int((~x & ~y).sum())
    low, high = newcombe_paired(both, only_a, only_b, neither)
    n = int(mask.sum())
    return {
        "difference": None if n == 0 else round((only_a - only_b) / n, 6),
        "low": round(low, 6),
        "high": round(high, 6),
        "only_first": only_a,
        "only_second": only_b,
        # Three significant digits, not decimals: a tiny p-value must not print as 0.
        "mcnemar_p": float(f"{mcnemar_exact(only_a, only_b):.3g}"),
    }


DESCRIPTIONS = {
    "logistic": "logistic regression on the rule-hit matrix, sign-bounded (L-BFGS-B), "
    "class-balanced, L2 1.0; cutoff for the budget on the training folds",
    "perceptron": "SpamAssassin's perceptron (masses/perceptron.c): sigmoid unit, squared "
    "error, SGD 15 epochs at rate 2.0, ham preference 2.0, sign clamp; cutoff for the "
    "budget on the training folds",
    "thresholds_only": "original scores; only the cutoff chosen for the budget on the "
    "training folds",
}


def report_data(result: TuneResult, context: Mapping[str, Any]) -> dict[str, Any]:
    spam = result.problem.spam
    chosen = next(e for e in result.evaluations if e.method == result.chosen)
    methods = [
        {
            "method": e.method,
            "description": DESCRIPTIONS.get(e.method, e.method),
            "out_of_fold": _figures(e.blocked, spam),
            "within_budget": int((e.blocked & ~spam).sum())
            <= math.floor(result.budget * int((~spam).sum()) + 1e-9),
            "folds_within_budget": e.folds_within_budget,
            "fold_cutoffs": list(e.fold_cutoffs),
        }
        for e in result.evaluations
    ]
    against = {
        e.method: {
            "spam_stopped": _paired(chosen.blocked, e.blocked, spam),
            "ham_blocked": _paired(chosen.blocked, e.blocked, ~spam),
        }
        for e in result.evaluations
        if e.method != result.chosen
    }
    return {
        "format": "relay-lab-tune/1",
        **context,
        "budget": result.budget,
        "folds": result.folds,
        "seed": result.seed,
        "budget_reachable": result.budget_reachable,
        "definitions": {
            "blocked": "reject, tempfail or quarantine (not delivered to the inbox)",
            "spam_stopped": "spam blocked, as in the threshold curves: a tag reaches the "
            "inbox and does not count",
            "intervals": "95% Wilson; differences: Newcombe's paired interval, exact McNemar",
        },
        "original": {
            "thresholds": dict(result.problem.thresholds),
            "figures": _figures(result.original, spam),
            "note": "the original policy decides on the same training messages; nothing "
            "is fitted, so its figures need no folds",
        },
        "methods": methods,
        "chosen": result.chosen,
        "chosen_against": against,
        "tuned": {
            "thresholds": dict(result.thresholds),
            "cutoff": result.final.cutoff,
            "out_of_fold": _figures(chosen.blocked, spam),
            "against_original": {
                "spam_stopped": _paired(chosen.blocked, result.original, spam),
                "ham_blocked": _paired(chosen.blocked, result.original, ~spam),
            },
        },
        "rules": [
            {
                "name": r.name,
                "action": r.action,
                "old": r.old,
                "new": r.new,
                "kept": r.kept,
                "spam": r.spam,
                "ham": r.ham,
                "unevaluable": r.unevaluable,
            }
            for r in result.rules
        ],
    }


def _pct(share: Mapping[str, Any]) -> str:
    if share["rate"] is None:
        return "n/a"
    return (
        f"{100 * share['rate']:.1f}% [{100 * share['low']:.1f}, {100 * share['high']:.1f}] "
        f"({share['k']}/{share['n']})"
    )


def _points(p: Mapping[str, Any]) -> str:
    if p["difference"] is None:
        return "n/a"
    return (
        f"{100 * p['difference']:+.1f} points [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}], "
        f"McNemar p = {p['mcnemar_p']:.3g}"
    )


def markdown(data: Mapping[str, Any]) -> str:
    c = data["corpus"]
    lines = [
        f"# relay lab tune: {data['policy']['name']}",
        "",
        f"Policy `{data['policy']['file']}`; proposed `{data['policy']['proposed']}` "
        f"({'passes' if data['policy']['check_ok'] else 'FAILS'} `relay policy check`).",
        "",
        f"Corpus {c['source']}: {c['used']} messages of set `{c['set']}` "
        f"({c['spam']} spam, {c['ham']} ham, {c['unreadable']} unreadable). {c['note']}",
        "",
        f"False-positive budget {100 * data['budget']:g}% of legitimate mail; "
        f"{data['folds']} stratified folds (seed {data['seed']}); every figure below is "
        "out of fold. "
        + data["definitions"]["spam_stopped"][0].upper()
        + data["definitions"]["spam_stopped"][1:]
        + "; 95% Wilson intervals.",
        "",
    ]
    if data.get("presets"):
        pr = data["presets"]
        lines += [
            f"`{pr['fact']}` preset from `{pr['file']}` (out-of-fold values) on "
            f"{pr['applied']} train messages; the live classifier on {pr['live']}.",
            "",
        ]
    if not data["budget_reachable"]:
        lines += ["**Forced rules alone block more legitimate mail than the budget.**", ""]
    lines += [
        "## Before and after",
        "",
        "| policy | spam stopped | legitimate mail blocked |",
        "|---|---|---|",
        f"| original | {_pct(data['original']['figures']['spam_stopped'])} | "
        f"{_pct(data['original']['figures']['ham_blocked'])} |",
        f"| tuned ({data['chosen']}, out of fold) | "
        f"{_pct(data['tuned']['out_of_fold']['spam_stopped'])} | "
        f"{_pct(data['tuned']['out_of_fold']['ham_blocked'])} |",
        "",
        "Tuned minus original: spam stopped "
        f"{_points(data['tuned']['against_original']['spam_stopped'])}; legitimate mail "
        f"blocked {_points(data['tuned']['against_original']['ham_blocked'])}.",
        "",
        "Thresholds: "
        + ", ".join(
            f"{k} {data['original']['thresholds'][k]:g} -> {v:g}"
            for k, v in data["tuned"]["thresholds"].items()
        ),
        "",
        "## Methods (same folds)",
        "",
        "| method | spam stopped | legitimate mail blocked | within budget | folds within |",
        "|---|---|---|---|---|",
    ]
    for m in data["methods"]:
        mark = " (chosen)" if m["method"] == data["chosen"] else ""
        lines.append(
            f"| {m['method']}{mark} | {_pct(m['out_of_fold']['spam_stopped'])} | "
            f"{_pct(m['out_of_fold']['ham_blocked'])} | "
            f"{'yes' if m['within_budget'] else 'no'} | "
            f"{m['folds_within_budget']}/{data['folds']} |"
        )
    lines += [
        "",
        "Chosen: the most spam stopped out of fold among the methods within the budget out "
        "of fold (ties: less legitimate mail blocked, then the simpler method; none within "
        "it: the least legitimate mail blocked).",
        "",
    ]
    for name, diff in data["chosen_against"].items():
        lines.append(
            f"- {data['chosen']} minus {name}: spam stopped {_points(diff['spam_stopped'])}; "
            f"legitimate mail blocked {_points(diff['ham_blocked'])}"
        )
    lines += ["", *(f"- `{m['method']}`: {m['description']}" for m in data["methods"])]
    lines += [
        "",
        "## Rules",
        "",
        "| rule | old | new | spam hits | ham hits | kept because |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rules"]:
        old = r["action"] if r["action"] is not None else f"{r['old']:g}"
        new = r["action"] if r["action"] is not None else f"{r['new']:g}"
        lines.append(
            f"| {r['name']} | {old} | {new} | {r['spam']} | {r['ham']} | {r['kept'] or ''} |"
        )
    if data.get("heldout"):
        h = data["heldout"]
        lines += [
            "",
            f"## Held-out split `{h['set']}` (reported, never used to fit or choose)",
            "",
            f"{h['messages']} messages ({h['spam']} spam, {h['ham']} ham).",
            "",
            "| policy | spam stopped | legitimate mail blocked |",
            "|---|---|---|",
            f"| original | {_pct(h['original']['spam_stopped'])} | "
            f"{_pct(h['original']['ham_blocked'])} |",
            f"| tuned | {_pct(h['tuned']['spam_stopped'])} | {_pct(h['tuned']['ham_blocked'])} |",
            "",
            "Tuned minus original: spam stopped "
            f"{_points(h['tuned_against_original']['spam_stopped'])}; legitimate mail "
            f"blocked {_points(h['tuned_against_original']['ham_blocked'])}.",
        ]
    if data.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in data["notes"])]
    return "\n".join(lines) + "\n"


# -- the run: corpus, cached facts, hit matrix, files ----------------------------------------


@dataclass(frozen=True, slots=True)
class TuneOptions:
    policy: Path
    corpus: Path
    labels: Path
    out: Path
    env: LabEnv
    budget: float
    folds: int = 5
    seed: int = 0
    cache_dir: Path | None = Path("var/lab-cache")
    jobs: int = 1
    progress: bool = False
    heldout: bool = False  # also report the test split before/after (never used)
    presets: Path | None = None  # TSV path -> spam_probability for train rows (read_presets)


def set_counts(labels: Path) -> Counter[str]:
    """Rows per set of a labels file (a row without a set is in set train, as the corpus
    reader counts it), to say in the report what was left out."""
    counts: Counter[str] = Counter()
    try:
        with labels.open(newline="", encoding="utf-8") as fh:
            for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
                if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "relative_path"):
                    continue
                counts[row[2] if len(row) > 2 and row[2] else TRAIN_SET] += 1
    except (OSError, UnicodeDecodeError) as exc:
        raise RelayError(f"{labels}: cannot read labels: {exc}") from None
    return counts


def refuse_set(name: str | None) -> None:
    """Tuning reads set train only; asking for any other set is an error, never a
    silent switch (fitting on the test split would make every later figure optimistic)."""
    if name is not None and name != TRAIN_SET:
        raise RelayError(
            f"lab tune: --set {name!r} refused: tuning fits and cross-validates on set "
            f"{TRAIN_SET!r} only, never on a test split (use --heldout to report the test "
            "split before and after without using it)"
        )


def refuse_preset_rows(presets: Mapping[str, float], train_ids: set[str]) -> None:
    """Presets may only name train rows: a listed test row (or a path the labels file does
    not have as train) means the file was made for another split, never silently used."""
    stray = sorted(set(presets) - train_ids)
    if stray:
        raise RelayError(
            f"--preset-probabilities: {len(stray)} listed paths are not train rows of the "
            f"labels file (first: {stray[0]}); presets are for set {TRAIN_SET!r} only"
        )


def policy_thresholds(policy: Policy) -> dict[str, float]:
    """[policy.thresholds] as numbers, by name (absent ones left out)."""
    t = policy.thresholds
    values = (t.tag, t.quarantine, t.tempfail, t.reject)
    return {k: v for k, v in zip(THRESHOLD_NAMES, values, strict=True) if v is not None}


PRESET_FACT = "spam_probability"


def read_presets(path: Path) -> dict[str, float]:
    """``relative_path<TAB>probability`` rows (a header row and ``#`` comments skipped):
    the spam_probability to use for those train messages instead of the live model's."""
    out: dict[str, float] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            for lineno, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
                if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "relative_path"):
                    continue
                try:
                    value = float(row[1])
                except (IndexError, ValueError):
                    raise RelayError(f"{path}:{lineno}: want path<TAB>probability") from None
                if not 0.0 <= value <= 1.0:
                    raise RelayError(f"{path}:{lineno}: probability {row[1]} not in [0, 1]")
                if out.setdefault(row[0], value) != value:
                    raise RelayError(f"{path}:{lineno}: {row[0]} listed twice")
    except (OSError, UnicodeDecodeError) as exc:
        raise RelayError(f"{path}: cannot read preset probabilities: {exc}") from None
    return out


def apply_presets(
    messages: Sequence[CorpusMessage],
    outcomes: Mapping[str, Outcomes],
    presets: Mapping[str, float],
) -> tuple[dict[str, Outcomes], int]:
    """Outcomes with spam_probability replaced for the messages ``presets`` lists (by id),
    and how many were replaced. A new mapping: ``outcomes`` (what the cache returned and
    stored) is left as it is, so preset values never reach the cache."""
    out: dict[str, Outcomes] = dict(outcomes)
    by_digest: dict[str, float] = {}
    for m in messages:
        value = presets.get(m.id)
        if value is None:
            continue
        # Identical bytes share one outcome row; their out-of-fold values agree (one fold).
        if by_digest.setdefault(m.digest, value) != value:
            raise RelayError(
                f"preset probabilities: {m.id} has the bytes of another message "
                "listed with a different probability"
            )
        out[m.digest] = {**outcomes.get(m.digest, {}), PRESET_FACT: Cached(value)}
    return out, sum(1 for m in messages if m.id in presets)


@dataclass(frozen=True, slots=True)
class _Replay:
    problem: Problem
    messages: int
    unreadable: int
    seconds: Mapping[str, float]
    preset: int = 0  # messages whose spam_probability was preset


def _replay(
    sources: Sequence[Source],
    description: str,
    options: TuneOptions,
    regime: Regime,
    presets: Mapping[str, float] | None = None,
) -> _Replay:
    policy = regime.policy
    if not isinstance(policy, Policy):
        raise RelayError(f"{options.policy}: not a relay policy")
    t0 = time.perf_counter()
    registry = options.env.registry()
    corpus = load_corpus(sources, description)
    lab = LabOptions(
        sources=tuple(sources),
        description=description,
        policies=(options.policy,),
        out=options.out,
        env=options.env,
        cache_dir=options.cache_dir,
        jobs=options.jobs,
        progress=options.progress,
    )
    names = needed_facts([regime], registry)
    outcomes, _ = compute_facts(corpus, names, registry, lab)
    preset = 0
    if presets is not None:
        outcomes, preset = apply_presets(corpus.messages, outcomes, presets)
    t1 = time.perf_counter()
    decisions = asyncio.run(evaluate([regime], corpus.messages, outcomes, registry, lambda _: None))
    t2 = time.perf_counter()
    rules = tuple(
        RuleDef(r.name, r.score, None if r.action is None else r.action.value) for r in policy.rules
    )
    index = {r.name: j for j, r in enumerate(rules)}
    hits = np.zeros((len(corpus.messages), len(rules)), dtype=np.bool_)
    unevaluable = [0] * len(rules)
    for i, m in enumerate(corpus.messages):
        matched = decisions[m.id][regime.name].matched
        if matched is None:
            raise RelayError(f"{options.policy}: rule matches were not recorded")
        for name in matched:
            hits[i, index[name]] = True
        failed = {n for n, c in outcomes[m.digest].items() if c.error is not None}
        for j, r in enumerate(policy.rules):
            if failed.intersection(r.reads):
                unevaluable[j] += 1
    thresholds = policy_thresholds(policy)
    problem = Problem(
        rules=rules,
        hits=hits,
        spam=np.array([m.label == "spam" for m in corpus.messages], dtype=np.bool_),
        thresholds=thresholds,
        unevaluable=tuple(unevaluable),
    )
    seconds = {"facts": t1 - t0, "evaluate": t2 - t1}
    return _Replay(problem, len(corpus.messages), len(corpus.unreadable), seconds, preset)


IN_SAMPLE = (
    "the classifier model was trained on the train rows of this labels file (its card "
    "names the same file): spam_probability is in-sample here, near perfect, so the "
    "out-of-fold figures above are optimistic wherever the classifier decides; judge the "
    "proposal on the held-out split (--heldout)"
)


def in_sample_model(env: LabEnv, labels: Path) -> bool:
    """Whether the model's card lists ``labels`` (by digest) among its training sets."""
    model = env.settings.model
    card = model.path.with_name(model.path.stem + ".card.json")  # classifier/model.py
    if not model.enabled:
        return False
    try:
        sets = json.loads(card.read_text(encoding="utf-8"))["training"]["sets"]
        digest = hashlib.sha256(labels.read_bytes()).hexdigest()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any(isinstance(s, dict) and s.get("labels_sha256") == digest for s in sets)


def _check(path: Path, env: LabEnv) -> list[str]:
    return check_files([path], env.registry())


def run_tune(options: TuneOptions) -> dict[str, Any]:
    """Tune ``options.policy`` on the train rows of the labels file; write the proposed
    policy, tune.json and tune.md under ``options.out``; return the report data."""
    t0 = time.perf_counter()
    registry = options.env.registry()
    regimes, problems = load_regimes([options.policy], registry)
    if problems:
        raise PolicyError(list(problems[0].problems))
    regime = regimes[0]
    if isinstance(regime.policy, Policy) and not any(
        k in BLOCKED for k in policy_thresholds(regime.policy)
    ):
        # Checked before any fact is computed; tune() checks it again for direct callers.
        raise RelayError(NO_BLOCKING)
    counts = set_counts(options.labels)
    sources = sources_from_labels(options.corpus, options.labels, TRAIN_SET)
    presets = None
    if options.presets is not None:
        if PRESET_FACT not in needed_facts([regime], registry):
            raise RelayError(f"--preset-probabilities: {options.policy} never reads {PRESET_FACT}")
        presets = read_presets(options.presets)
        refuse_preset_rows(presets, {s.id for s in sources})
    description = f"{options.labels.name} (set {TRAIN_SET})"
    replay = _replay(sources, description, options, regime, presets)
    t1 = time.perf_counter()
    result = tune(replay.problem, options.budget, options.folds, options.seed)
    t2 = time.perf_counter()
    text = options.policy.read_text(encoding="utf-8")
    scores = {r.name: r.new for r in result.rules if r.action is None}
    proposed = rewrite_policy(text, scores, result.thresholds)
    options.out.mkdir(parents=True, exist_ok=True)
    target = options.out / f"{options.policy.stem}.tuned.toml"
    target.write_text(proposed, encoding="utf-8")
    check = _check(target, options.env)
    left_out = {k: v for k, v in sorted(counts.items()) if k != TRAIN_SET}
    note = (
        f"Only rows of set `{TRAIN_SET}` were used to fit and cross-validate; "
        + (
            "left out: " + ", ".join(f"{v} rows of set `{k}`" for k, v in left_out.items())
            if left_out
            else "the labels file has no other set"
        )
        + "."
    )
    notes: list[str] = []
    policy = regime.policy
    live = replay.messages - replay.preset
    if (
        PRESET_FACT in needed_facts([regime], registry)
        and live
        and in_sample_model(options.env, options.labels)
    ):
        notes.append(IN_SAMPLE)
    if presets is not None and options.presets is not None:
        notes.append(
            f"spam_probability preset from `{options.presets}` on {replay.preset} of "
            f"{replay.messages} train messages (out-of-fold values); the live classifier "
            f"on the other {live}"
            + ("; the held-out split uses the live classifier" if options.heldout else "")
        )
    if getattr(policy, "overrides", ()):
        notes.append(
            "[[override]] thresholds are kept as written: they were set for the old scores, "
            "review them (the fit uses the policy's own thresholds)"
        )
    context: dict[str, Any] = {
        "policy": {
            "name": regime.name,
            "file": str(options.policy),
            "proposed": str(target),
            "check_ok": not check,
            "check_problems": check,
        },
        "corpus": {
            "source": str(options.labels),
            "set": TRAIN_SET,
            "used": replay.messages,
            "spam": int(replay.problem.spam.sum()),
            "ham": int((~replay.problem.spam).sum()),
            "unreadable": replay.unreadable,
            "sets_in_labels": dict(sorted(counts.items())),
            "note": note,
        },
        "dns": options.env.dns_description(),
        "inputs": options.env.inputs_description(),
        "presets": None
        if options.presets is None or presets is None
        else {
            "file": str(options.presets),
            "sha256": hashlib.sha256(options.presets.read_bytes()).hexdigest(),
            "fact": PRESET_FACT,
            "listed": len(presets),
            "applied": replay.preset,
            "live": live,
        },
        "notes": notes,
    }
    data = report_data(result, context)
    if options.heldout:
        data["heldout"] = _heldout(options, regime, result, counts)
    t3 = time.perf_counter()
    data["timings"] = {
        "facts": round(replay.seconds["facts"], 3),
        "evaluate": round(replay.seconds["evaluate"], 3),
        "fit": round(t2 - t1, 3),
        "total": round(t3 - t0, 3),
    }
    (options.out / "tune.json").write_text(json.dumps(data, indent=1) + "\n")
    (options.out / "tune.md").write_text(markdown(data))
    return data


HELDOUT_SET = "test"


def _heldout(
    options: TuneOptions, regime: Regime, result: TuneResult, counts: Mapping[str, int]
) -> dict[str, Any] | None:
    """The original and the proposed scores on the test split, computed after the fit
    and only reported: nothing here feeds back into the scores or the cutoff."""
    if not counts.get(HELDOUT_SET):
        return None
    sources = sources_from_labels(options.corpus, options.labels, HELDOUT_SET)
    replay = _replay(sources, f"{options.labels.name} (set {HELDOUT_SET})", options, regime)
    problem = replay.problem
    forced, forced_block = forced_outcomes(problem)
    before = original_blocked(problem, forced, forced_block)
    after = blocked_by(problem, result.final, forced, forced_block)
    return {
        "set": HELDOUT_SET,
        "messages": replay.messages,
        "spam": int(problem.spam.sum()),
        "ham": int((~problem.spam).sum()),
        "original": _figures(before, problem.spam),
        "tuned": _figures(after, problem.spam),
        "tuned_against_original": {
            "spam_stopped": _paired(after, before, problem.spam),
            "ham_blocked": _paired(after, before, ~problem.spam),
        },
    }


__all__ = [
    "Evaluation",
    "Fit",
    "Problem",
    "RuleFit",
    "TuneOptions",
    "TuneResult",
    "apply_presets",
    "choose_cutoff",
    "fit_logistic",
    "fit_perceptron",
    "parse_budget",
    "read_presets",
    "refuse_preset_rows",
    "refuse_set",
    "rewrite_policy",
    "run_tune",
    "tune",
]
