"""Spam stopped against legitimate mail blocked, over every threshold the score allows.

One score cutoff ``t`` stands for "the score from which the regime keeps mail out of the
inbox" (its lowest quarantine, tempfail or reject threshold). At ``t`` a message counts
as stopped (spam) or blocked (ham) when its regime would not deliver it to the inbox:

- a message with a matched forced action keeps it at every ``t``: a forced reject,
  tempfail or quarantine is stopped everywhere, a forced accept or tag nowhere;
- any other message is stopped when its score (the sum of every matched scored rule,
  rescore.py) is at least ``t``.

The curve runs from the forced-only point (``t`` above every score: only forced actions
stop mail) down through each distinct score to the lowest one (every unforced message
stopped). The regime's own lowest blocking threshold is the operating point. Each point
carries 95% Wilson intervals of both shares (pointwise, not a simultaneous band).

Distinct scores can number in the thousands on a large corpus, so a curve keeps at most
MAX_POINTS points, chosen by arc length (below): the first, the last and the operating
point always stay.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relay.lab.rescore import BLOCKED, Rescored
from relay.lab.shares import proportion

MAX_POINTS = 256


@dataclass(frozen=True, slots=True)
class Point:
    """Shares at one cutoff; ``threshold`` None is the forced-only point (above all)."""

    threshold: float | None
    spam: int
    ham: int


@dataclass(frozen=True, slots=True)
class Curve:
    points: tuple[Point, ...]
    operating: int  # index into points
    n_spam: int
    n_ham: int
    forced_spam: int  # stopped by a forced action at every cutoff
    forced_ham: int
    distinct: int  # distinct scores of unforced messages (before thinning)

    def to_dict(self) -> dict[str, Any]:
        op = self.points[self.operating]
        return {
            "n_spam": self.n_spam,
            "n_ham": self.n_ham,
            "forced": {"spam": self.forced_spam, "ham": self.forced_ham},
            "distinct_thresholds": self.distinct,
            "max_points": MAX_POINTS,
            "points": [self._point(p) for p in self.points],
            "operating": {"index": self.operating, **self._point(op)},
        }

    def _point(self, p: Point) -> dict[str, Any]:
        return {
            "threshold": p.threshold,
            "spam": proportion(p.spam, self.n_spam),
            "ham": proportion(p.ham, self.n_ham),
        }


def _rate(k: int, n: int) -> float:
    return k / n if n else 0.0


def thin(
    points: Sequence[Point], n_spam: int, n_ham: int, keep: Iterable[int], limit: int
) -> list[int]:
    """Indexes of at most ``limit`` points that keep the curve's shape.

    Walking the curve, a point is kept once the path since the last kept one (L1 length,
    in shares: |d ham| + |d spam|) reaches total / budget. The whole path is at most 2
    long, so no dropped point lies farther than about 2 / limit from a kept one (under
    1% at 256). The first, the last and ``keep`` always stay.
    """
    n = len(points)
    if n <= limit:
        return list(range(n))
    chosen = {0, n - 1, *keep}
    budget = max(1, limit - len(chosen) - 1)
    steps = [
        abs(_rate(b.ham, n_ham) - _rate(a.ham, n_ham))
        + abs(_rate(b.spam, n_spam) - _rate(a.spam, n_spam))
        for a, b in itertools.pairwise(points)
    ]
    step = sum(steps) / budget
    if step <= 0:
        return sorted(chosen)
    walked = 0.0
    for i, d in enumerate(steps, start=1):
        walked += d
        if walked >= step and len(chosen) < limit:
            chosen.add(i)
            walked = 0.0
    return sorted(chosen)


def build_curve(
    messages: Sequence[tuple[str, Rescored]],
    lowest_block: float | None,
    limit: int = MAX_POINTS,
) -> Curve:
    """The curve of (label, rescored verdict) pairs; ``lowest_block`` is the regime's own
    lowest blocking threshold (None: its score never blocks, so it operates at the
    forced-only point)."""
    return build_curve_counts(Counter(messages), lowest_block, limit)


def build_curve_counts(
    counts: Mapping[tuple[str, Rescored], int],
    lowest_block: float | None,
    limit: int = MAX_POINTS,
) -> Curve:
    """build_curve from how many messages share each (label, rescored verdict): a large
    corpus has few distinct scores, so the report keeps these counts, not one pair per
    message."""
    n: Counter[str] = Counter()
    forced: Counter[str] = Counter()
    by_score: dict[float, Counter[str]] = {}
    for (label, r), k in counts.items():
        n[label] += k
        if r.forced is not None and r.forced in BLOCKED:
            forced[label] += k
        if r.forced is None:
            by_score.setdefault(r.score, Counter())[label] += k
    cuts: list[float | None] = [None, *sorted(by_score, reverse=True)]
    if lowest_block is not None and lowest_block not in by_score:
        cuts.append(lowest_block)
        cuts.sort(key=lambda t: float("inf") if t is None else t, reverse=True)
    points: list[Point] = []
    spam, ham = forced["spam"], forced["ham"]
    for t in cuts:
        if t is not None and t in by_score:
            spam += by_score[t]["spam"]
            ham += by_score[t]["ham"]
        points.append(Point(t, spam, ham))
    operating = 0 if lowest_block is None else cuts.index(lowest_block)
    kept = thin(points, n["spam"], n["ham"], (operating,), limit)
    return Curve(
        points=tuple(points[i] for i in kept),
        operating=kept.index(operating),
        n_spam=n["spam"],
        n_ham=n["ham"],
        forced_spam=forced["spam"],
        forced_ham=forced["ham"],
        distinct=len(by_score),
    )


def summary_points(curve: dict[str, Any], limit: int = 7) -> list[dict[str, Any]]:
    """A handful of the curve's points for tables: the first, the last, the operating
    point, and then, while fewer than ``limit``, the middle of the stretch between chosen
    points that covers the longest path (so the rows follow where the curve moves)."""
    points = curve["points"]
    n_spam, n_ham = curve["n_spam"], curve["n_ham"]
    op = curve["operating"]["index"]
    walked = [0.0]
    for a, b in itertools.pairwise(points):
        walked.append(
            walked[-1]
            + abs(_rate(b["ham"]["k"], n_ham) - _rate(a["ham"]["k"], n_ham))
            + abs(_rate(b["spam"]["k"], n_spam) - _rate(a["spam"]["k"], n_spam))
        )
    chosen = {0, op, len(points) - 1}
    while len(chosen) < min(limit, len(points)):
        ordered = sorted(chosen)
        gaps = [
            (walked[b] - walked[a], b - a, a, b)
            for a, b in itertools.pairwise(ordered)
            if b - a > 1
        ]
        if not gaps:
            break
        length, _, a, b = max(gaps)
        half = walked[a] + length / 2
        middle = next((i for i in range(a + 1, b) if walked[i] >= half), (a + b) // 2)
        chosen.add(middle if middle < b else b - 1)
    return [{**points[i], "operating": i == op} for i in sorted(chosen)]
