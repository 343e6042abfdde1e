"""`relay lab diff`: which verdicts changed between two sources of verdicts, and why.

Three comparisons, one result (``Diff``):
- two lab reports (two runs, for example two versions of a policy on the same corpus):
  messages are matched by their corpus id (the path under the corpus root) and their
  content checked by digest; messages on one side only, or whose content or label differs,
  are counted and listed, never dropped silently;
- two regimes inside one report (``--regimes X Y``);
- a shadow log (ops/shadowlog.py): the enforced policy against a shadow regime on live
  mail, matched by queue id. A shadow log has no labels; label-dependent figures need a
  labels file mapping its queue ids, else the result says they are unavailable.

Pure functions over loaded inputs: ``load_source`` reads a report directory or a shadow
log into frozen records, ``compare`` builds the frozen ``Diff``, ``to_dict``,
``markdown`` and ``html`` render it. ``write_verdicts`` writes the per-message record a
report needs for a diff between two reports (``verdicts.jsonl``). Nothing here reads a
corpus, compiles a policy or computes a fact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from relay.errors import RelayError
from relay.intervals import Z95, wilson
from relay.lab.corpus import CorpusMessage
from relay.lab.evaluate import Decision
from relay.lab.stats import ACTIONS, BLOCKED
from relay.ops.shadowlog import read_lines

REPORT_FORMAT = "relay-lab-report/1"
VERDICTS_FILE = "verdicts.jsonl"
LABELS = ("spam", "ham")
# Harshness of an action, to say whether a change made a verdict harder or softer.
SEVERITY = {"accept": 0, "tag": 1, "quarantine": 2, "tempfail": 3, "reject": 4}


# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """One policy's verdict on one message, as far as a report or a shadow line records it."""

    action: str
    score: float
    tier: str | None
    rules: tuple[str, ...]
    forced_by: str | None
    # Each fired rule's score contribution, when known (a report's rule definitions give
    # it; a shadow log does not): it orders the scored rules that decided.
    rule_scores: tuple[tuple[str, float], ...] | None = None


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    label: str | None
    digest: str | None
    verdicts: tuple[tuple[str, Side], ...]  # (regime, verdict), in the source's order

    def verdict(self, regime: str) -> Side | None:
        return next((s for name, s in self.verdicts if name == regime), None)


@dataclass(frozen=True, slots=True)
class RegimeCounts:
    """A report's aggregate figures for one regime: what the per-message records of a
    partial report are checked against and completed with."""

    actions: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]  # label -> action -> count

    def count(self, label: str, action: str) -> int:
        for lab, per in self.actions:
            if lab == label:
                return dict(per).get(action, 0)
        return 0


@dataclass(frozen=True, slots=True)
class Source:
    """Everything a diff reads from one report directory or one shadow log."""

    path: Path
    kind: str  # "report" | "shadow log"
    regimes: tuple[str, ...]
    records: tuple[Record, ...]
    # Readable messages in a report (every one has a record when complete); for a shadow
    # log, the messages it holds.
    expected: int
    labels: tuple[tuple[str, int], ...]  # report: readable messages per label
    unreadable: tuple[tuple[str, str], ...]  # report: (id, reason)
    counts: tuple[tuple[str, RegimeCounts], ...]  # report: per regime
    # report: per regime, each rule's definition (score, forced action) when the report
    # records it (its rule statistics); empty otherwise
    definitions: tuple[tuple[str, tuple[tuple[str, float, str | None], ...]], ...]
    enforced: tuple[str, ...]  # shadow log: names seen in the enforce role
    malformed: tuple[tuple[int, str], ...]  # shadow log: (line, reason)

    @property
    def complete(self) -> bool:
        return len(self.records) >= self.expected

    def regime_counts(self, regime: str) -> RegimeCounts:
        return dict(self.counts)[regime]

    def rule_definitions(self, regime: str) -> dict[str, tuple[float, str | None]]:
        found = dict(self.definitions).get(regime, ())
        return {name: (score, action) for name, score, action in found}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RelayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RelayError(f"{path}: not JSON: {exc}") from None


def _side(data: Any, where: str) -> Side:
    if not isinstance(data, dict) or data.get("action") not in SEVERITY:
        raise RelayError(f"{where}: a verdict needs an action, one of {', '.join(ACTIONS)}")
    hits = data.get("hits")
    scores = None
    if isinstance(hits, list):
        scores = tuple(
            (str(h["rule"]), float(h.get("score") or 0.0))
            for h in hits
            if isinstance(h, dict) and "rule" in h
        )
    tier = data.get("tier")
    forced = data.get("forced_by")
    return Side(
        action=str(data["action"]),
        score=float(data.get("score") or 0.0),
        tier=None if tier is None else str(tier),
        rules=tuple(str(r) for r in data.get("rules") or ()),
        forced_by=None if forced is None else str(forced),
        rule_scores=scores,
    )


def _record(data: Any, where: str) -> Record:
    if not isinstance(data, dict) or "id" not in data or not isinstance(data.get("verdicts"), dict):
        raise RelayError(f"{where}: a message record needs an id and verdicts")
    label = data.get("label")
    digest = data.get("digest")
    return Record(
        id=str(data["id"]),
        label=None if label is None else str(label),
        digest=None if digest is None else str(digest),
        verdicts=tuple(
            (str(name), _side(v, f"{where}: {data['id']}: {name}"))
            for name, v in data["verdicts"].items()
        ),
    )


def _records_from_lines(path: Path) -> list[Record]:
    out: list[Record] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                try:
                    item = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise RelayError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
                out.append(_record(item, f"{path}:{lineno}"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RelayError(f"{path}: cannot read: {exc}") from None
    return out


def _records_from_pages(folder: Path) -> list[Record]:
    """The report's fact pages (messages/*.json). relay lab writes one only for messages
    where regimes disagree on the outcome class or that some regime blocked as ham."""
    out: list[Record] = []
    if not folder.is_dir():
        return out
    for shard in sorted(folder.glob("*.json")):
        group = _read_json(shard)
        if not isinstance(group, dict):
            raise RelayError(f"{shard}: not a page shard of a lab report")
        out += [_record(page, str(shard)) for page in group.values()]
    return out


def _counts(regime: Any) -> RegimeCounts:
    actions = regime["actions"]
    return RegimeCounts(
        tuple(
            (label, tuple((a, int(actions[label].get(a, 0))) for a in ACTIONS)) for label in LABELS
        )
    )


def _definitions(regime: Mapping[str, Any]) -> tuple[tuple[str, float, str | None], ...]:
    """Rule definitions from the report's rule statistics, if it has them (optional: a
    report without them still compares, by which rules fired)."""
    stats = regime.get("rule_stats")
    rules = stats.get("rules") if isinstance(stats, dict) else None
    if not isinstance(rules, list):
        return ()
    out: list[tuple[str, float, str | None]] = []
    for r in rules:
        if isinstance(r, dict) and "name" in r:
            action = r.get("action")
            out.append((str(r["name"]), float(r.get("score") or 0.0), action and str(action)))
    return tuple(out)


def load_report(path: Path) -> Source:
    """A report directory written by `relay lab`: report.json and per-message records
    (verdicts.jsonl when the report has it, else the fact pages)."""
    file = path / "report.json"
    if not path.is_dir():
        raise RelayError(f"{path}: no such report directory")
    if not file.is_file():
        raise RelayError(f"{path}: not a lab report (no report.json)")
    data = _read_json(file)
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise RelayError(f"{file}: not a relay lab report (format is not {REPORT_FORMAT})")
    try:
        corpus = data["corpus"]
        regimes = data["regimes"]
        names = tuple(str(r["name"]) for r in regimes)
        counts = tuple((str(r["name"]), _counts(r)) for r in regimes)
        labels = tuple((label, int(corpus[label])) for label in LABELS)
        unreadable = tuple((str(u["id"]), str(u["reason"])) for u in corpus["unreadable"])
        expected = int(corpus["readable"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RelayError(f"{file}: not a relay lab report: bad or missing {exc}") from None
    lines = path / VERDICTS_FILE
    records = (
        _records_from_lines(lines) if lines.is_file() else _records_from_pages(path / "messages")
    )
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise RelayError(f"{path}: message {r.id} is recorded twice")
        seen.add(r.id)
    return Source(
        path=path,
        kind="report",
        regimes=names,
        records=tuple(records),
        expected=expected,
        labels=labels,
        unreadable=unreadable,
        counts=counts,
        definitions=tuple((str(r["name"]), _definitions(r)) for r in regimes),
        enforced=(),
        malformed=(),
    )


def load_shadow_log(path: Path) -> Source:
    """A shadow log (JSON lines): per queue id the enforced verdict and each shadow one."""
    by_id: dict[str, dict[str, Side]] = {}
    enforced: dict[str, None] = {}
    malformed: list[tuple[int, str]] = []
    try:
        for lineno, item in read_lines(path):  # the shadow log's own reader (ops/)
            if isinstance(item, str):
                malformed.append((lineno, item))
                continue
            try:
                side = _side(item, f"line {lineno}")
            except (RelayError, TypeError, ValueError) as exc:
                malformed.append((lineno, str(exc)))
                continue
            policy, qid = str(item["policy"]), str(item["queue_id"])
            per = by_id.setdefault(qid, {})
            if policy in per:
                malformed.append((lineno, f"second verdict of {policy} for {qid}"))
                continue
            per[policy] = side
            if item.get("mode") == "enforce":
                enforced[policy] = None
    except OSError as exc:
        raise RelayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not by_id:
        raise RelayError(f"{path}: not a shadow log (no line with queue_id, policy and action)")
    names = dict.fromkeys(n for per in by_id.values() for n in per)
    return Source(
        path=path,
        kind="shadow log",
        regimes=tuple(names),
        records=tuple(Record(q, None, None, tuple(per.items())) for q, per in by_id.items()),
        expected=len(by_id),
        labels=(),
        unreadable=(),
        counts=(),
        definitions=(),
        enforced=tuple(enforced),
        malformed=tuple(malformed),
    )


def load_source(path: Path) -> Source:
    """A report directory (or its report.json), else a shadow log file."""
    if path.is_dir():
        return load_report(path)
    if path.is_file():
        return load_report(path.parent) if path.name == "report.json" else load_shadow_log(path)
    raise RelayError(f"{path}: no such report directory or shadow log")


def read_labels(path: Path) -> dict[str, str]:
    """A labels file for a shadow log: ``queue_id<TAB>spam|ham`` per line; '#' comments."""
    labels: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RelayError(f"{path}: cannot read: {exc}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2 or parts[1].strip() not in LABELS:
            raise RelayError(f"{path}:{lineno}: expected 'queue_id<TAB>spam|ham'")
        labels[parts[0].strip()] = parts[1].strip()
    return labels


def verdict_record(m: CorpusMessage, decisions: Mapping[str, Decision]) -> dict[str, Any]:
    """One line of verdicts.jsonl: every regime's verdict on one message, nothing more."""
    return {
        "id": m.id,
        "label": m.label,
        "digest": m.digest,
        "verdicts": {
            name: {
                "action": d.action,
                "score": d.score,
                "tier": d.tier,
                "rules": list(d.rules),
                "forced_by": d.forced_by,
            }
            for name, d in decisions.items()
        },
    }


def write_verdicts(
    out: Path,
    messages: Sequence[CorpusMessage],
    decisions: Mapping[str, Mapping[str, Decision]],
) -> Path:
    """``out/verdicts.jsonl``: one line per readable message (the record a diff between two
    reports needs; the fact pages cover only the messages the report lists)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / VERDICTS_FILE
    with path.open("w", encoding="utf-8") as fh:
        for m in messages:
            fh.write(json.dumps(verdict_record(m, decisions[m.id]), separators=(",", ":")))
            fh.write("\n")
    return path


# --- statistics ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rate:
    k: int
    n: int
    low: float
    high: float

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        low, high = wilson(k, n)
        return cls(k, n, round(low, 6), round(high, 6))

    @property
    def rate(self) -> float | None:
        return None if self.n == 0 else self.k / self.n


def newcombe_paired(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of p1 - p2 for paired proportions, p1 = (a+b)/n, p2 = (a+c)/n.

    Newcombe's hybrid score interval for paired data (Stat. Med. 1998;17:2635, method 10;
    "square-and-add" in Fagerland, Lydersen & Laake 2017, ch. 8): the Wilson intervals of
    both sides combined with the estimated correlation between them, phi, whose numerator
    ad - bc is shrunk by n/2 when positive (Newcombe's continuity-corrected phi).
    """
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins:
        cross = a * d - b * c
        corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(margins)
    diff = p1 - p2
    low = diff - math.sqrt(
        max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    )
    high = diff + math.sqrt(
        max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    )
    return max(-1.0, low), min(1.0, high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant messages split b/c under Bin(b+c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / (1 << m))  # big ints: exact however many messages


@dataclass(frozen=True, slots=True)
class Effect:
    """One figure before and after on the same messages, and the paired change."""

    figure: str  # "spam stopped" | "legitimate mail blocked" | "messages blocked"
    label: str | None  # the messages it counts (None: all compared messages)
    before: Rate
    after: Rate
    both: int
    gained: int  # not before, yes after
    lost: int  # yes before, not after
    neither: int
    change: float  # after - before, as a proportion
    low: float
    high: float
    mcnemar_p: float

    @classmethod
    def of(cls, figure: str, label: str | None, cells: tuple[int, int, int, int]) -> Effect:
        both, gained, lost, neither = cells
        n = both + gained + lost + neither
        low, high = newcombe_paired(both, gained, lost, neither)
        return cls(
            figure=figure,
            label=label,
            before=Rate.of(both + lost, n),
            after=Rate.of(both + gained, n),
            both=both,
            gained=gained,
            lost=lost,
            neither=neither,
            change=0.0 if n == 0 else round((gained - lost) / n, 6),
            low=round(low, 6),
            high=round(high, 6),
            mcnemar_p=round(mcnemar_exact(gained, lost), 6),
        )


# --- comparison ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleChange:
    rule: str
    how: str  # "fired only before", "fired only after", "score 1 -> 2", "forces ... before"


@dataclass(frozen=True, slots=True)
class Change:
    id: str
    label: str | None
    kind: str
    rank: int  # 0 most informative
    before: Side
    after: Side
    rules: tuple[RuleChange, ...]
    deciding_before: str
    deciding_after: str
    note: str | None  # why, when no rule explains it (same rules: score or thresholds)


@dataclass(frozen=True, slots=True)
class OneSide:
    id: str
    side: str  # "before" | "after"
    reason: str


@dataclass(frozen=True, slots=True)
class Filters:
    label: str | None = None
    rule: str | None = None
    limit: int | None = None  # None: every change


@dataclass(frozen=True, slots=True)
class Diff:
    mode: str  # "reports" | "regimes" | "shadow log"
    before_source: str
    before_regime: str
    after_source: str
    after_regime: str
    compared: int
    compared_by_label: tuple[tuple[str, int], ...]  # label ("unlabelled") -> messages
    one_side: tuple[OneSide, ...]
    content_differs: tuple[str, ...]
    label_differs: tuple[tuple[str, str, str], ...]
    effects: tuple[Effect, ...]
    changed: int
    changed_by_kind: tuple[tuple[str, int], ...]
    matching: int  # changes that pass the filters
    changes: tuple[Change, ...]  # ranked, filtered, limited
    filters: Filters
    notes: tuple[str, ...]

    @property
    def mismatched(self) -> bool:
        return bool(self.one_side or self.content_differs or self.label_differs)


def _stopped(action: str) -> bool:
    return action != "accept"


def _blocked(action: str) -> bool:
    return action in BLOCKED


def _kind(label: str | None, before: str, after: str) -> tuple[int, str]:
    """Label-contradicting changes first (legitimate mail newly blocked, spam newly let
    through), then the ones that agree with the label, then changes of degree; unlabelled
    changes after all labelled ones, newly blocked mail first."""
    harder = "harder" if SEVERITY[after] > SEVERITY[before] else "softer"
    if label == "ham":
        if _blocked(after) and not _blocked(before):
            return 0, "legitimate mail newly blocked"
        if _blocked(before) and not _blocked(after):
            return 3, "legitimate mail no longer blocked"
        return 4, f"ham: {harder}"
    if label == "spam":
        if _stopped(before) and not _stopped(after):
            return 1, "spam newly let through"
        if _stopped(after) and not _stopped(before):
            return 2, "spam newly stopped"
        return 4, f"spam: {harder}"
    if _blocked(after) and not _blocked(before):
        return 5, "newly blocked"
    if _blocked(before) and not _blocked(after):
        return 6, "no longer blocked"
    return 7, harder


def deciding_rule(side: Side) -> str:
    """The rule that decided: the forcing rule, else the scored rules (the largest
    contribution first when the source records each rule's score)."""
    if side.forced_by is not None:
        return side.forced_by
    if not side.rules:
        return "no rule fired"
    rules = list(side.rules)
    if side.rule_scores is not None:
        scores = dict(side.rule_scores)
        rules.sort(key=lambda r: -abs(scores.get(r, 0.0)))
    return "score: " + " + ".join(rules)


def _deciding_names(side: Side) -> set[str]:
    return {side.forced_by} if side.forced_by is not None else set(side.rules)


Definitions = Mapping[str, tuple[float, str | None]]  # rule -> (score, forced action)


def _defined(definition: tuple[float, str | None]) -> str:
    score, action = definition
    return f"forces {action}" if action else f"scores {score:g}"


def rule_changes(
    before: Side,
    after: Side,
    defs_before: Definitions | None = None,
    defs_after: Definitions | None = None,
) -> tuple[RuleChange, ...]:
    """Rules that fired on one side only, or whose score or forced action differs.

    A rule "fired only before" may also not have been evaluated after: the engine stops
    once no later rule can change the verdict (docs/lab.md)."""
    db, da = defs_before or {}, defs_after or {}

    def absent(rule: str, defs: Definitions, side: str) -> str:
        return f"; not in the {side} policy" if defs and rule not in defs else ""

    out = [
        RuleChange(r, "fired only before" + absent(r, da, "after"))
        for r in before.rules
        if r not in after.rules
    ]
    out += [
        RuleChange(r, "fired only after" + absent(r, db, "before"))
        for r in after.rules
        if r not in before.rules
    ]
    sb = dict(before.rule_scores or ())
    sa = dict(after.rule_scores or ())
    for r in (r for r in before.rules if r in after.rules):
        if r in db and r in da:
            if db[r] != da[r]:
                out.append(RuleChange(r, f"{_defined(db[r])} before, {_defined(da[r])} after"))
            continue
        if r in sb and r in sa and sb[r] != sa[r]:
            out.append(RuleChange(r, f"score {sb[r]:g} -> {sa[r]:g}"))
        # Without definitions: a rule firing on both sides that forces on one and not the
        # other changed its forced action (the other side's verdict is by score, so no
        # harsher forced rule overrode it).
        if before.forced_by == r and after.forced_by is None:
            out.append(RuleChange(r, f"forces {before.action} before, not after"))
        elif after.forced_by == r and before.forced_by is None:
            out.append(RuleChange(r, f"forces {after.action} after, not before"))
    return tuple(out)


def _note(before: Side, after: Side, rules: tuple[RuleChange, ...]) -> str | None:
    if rules or before.forced_by != after.forced_by:
        return None
    if before.forced_by is not None:
        return f"{before.forced_by} forces a different action"
    if before.score != after.score:
        return (
            f"same rules fired; total score {before.score:g} -> {after.score:g} "
            "(a rule's score changed)"
        )
    return f"same rules and score ({before.score:g}): the thresholds differ"


def _scored(side: Side, defs: Definitions) -> Side:
    if side.rule_scores is not None or not defs:
        return side
    scores = tuple((r, defs[r][0]) for r in side.rules if r in defs and defs[r][1] is None)
    return dataclasses.replace(side, rule_scores=scores)


def _change(
    rid: str,
    label: str | None,
    before: Side,
    after: Side,
    defs_before: Definitions,
    defs_after: Definitions,
) -> Change:
    rank, kind = _kind(label, before.action, after.action)
    before, after = _scored(before, defs_before), _scored(after, defs_after)
    rules = rule_changes(before, after, defs_before, defs_after)
    return Change(
        id=rid,
        label=label,
        kind=kind,
        rank=rank,
        before=before,
        after=after,
        rules=rules,
        deciding_before=deciding_rule(before),
        deciding_after=deciding_rule(after),
        note=_note(before, after, rules),
    )


def _order(change: Change) -> tuple[int, int, float, str]:
    step = abs(SEVERITY[change.after.action] - SEVERITY[change.before.action])
    return change.rank, -step, -abs(change.after.score - change.before.score), change.id


def _matches(change: Change, filters: Filters) -> bool:
    if filters.label is not None and change.label != filters.label:
        return False
    if filters.rule is not None:
        names = {r.rule for r in change.rules}
        names |= _deciding_names(change.before) | _deciding_names(change.after)
        if filters.rule not in names:
            return False
    return True


def _pick(source: Source, name: str | None, role: str) -> str:
    if name is not None:
        if name not in source.regimes:
            raise RelayError(
                f"{source.path}: no regime {name!r} (it has: {', '.join(source.regimes)})"
            )
        return name
    if len(source.regimes) == 1:
        return source.regimes[0]
    raise RelayError(
        f"{source.path}: {len(source.regimes)} regimes ({', '.join(source.regimes)}): "
        f"name the {role} one with --regimes X Y"
    )


@dataclass(frozen=True, slots=True)
class _Pair:
    id: str
    label: str | None
    before: Side
    after: Side


@dataclass(frozen=True, slots=True)
class _Paired:
    pairs: tuple[_Pair, ...]
    one_side: tuple[OneSide, ...]
    content_differs: tuple[str, ...] = ()
    label_differs: tuple[tuple[str, str, str], ...] = ()


def _within(source: Source, x: str, y: str, labels: Mapping[str, str] | None) -> _Paired:
    pairs: list[_Pair] = []
    one: list[OneSide] = []
    for r in source.records:
        bx, by = r.verdict(x), r.verdict(y)
        if bx is None and by is None:
            continue
        if bx is None or by is None:
            missing = x if bx is None else y
            one.append(
                OneSide(r.id, "after" if bx is None else "before", f"no verdict of {missing}")
            )
            continue
        label = r.label if labels is None else labels.get(r.id)
        pairs.append(_Pair(r.id, label, bx, by))
    return _Paired(tuple(pairs), tuple(one))


def _across(a: Source, x: str, b: Source, y: str) -> _Paired:
    in_a = {r.id: r for r in a.records}
    in_b = {r.id: r for r in b.records}
    why_a = dict(a.unreadable)
    why_b = dict(b.unreadable)
    pairs: list[_Pair] = []
    one: list[OneSide] = []
    content: list[str] = []
    labels: list[tuple[str, str, str]] = []
    for rid, ra in in_a.items():
        rb = in_b.get(rid)
        if rb is None:
            reason = (
                f"unreadable in the after report: {why_b[rid]}"
                if rid in why_b
                else ("not in the after report's corpus")
            )
            one.append(OneSide(rid, "before", reason))
            continue
        if ra.digest is not None and rb.digest is not None and ra.digest != rb.digest:
            content.append(rid)
            continue
        if ra.label != rb.label:
            labels.append((rid, str(ra.label), str(rb.label)))
            continue
        va, vb = ra.verdict(x), rb.verdict(y)
        if va is None or vb is None:
            raise RelayError(
                f"message {rid}: its record has no verdict of {x if va is None else y}"
            )
        pairs.append(_Pair(rid, ra.label, va, vb))
    for rid in in_b:
        if rid not in in_a:
            reason = (
                f"unreadable in the before report: {why_a[rid]}"
                if rid in why_a
                else ("not in the before report's corpus")
            )
            one.append(OneSide(rid, "after", reason))
    return _Paired(tuple(pairs), tuple(one), tuple(content), tuple(labels))


def _cells(
    pairs: Iterable[_Pair], label: str | None, hit: Callable[[str], bool]
) -> tuple[int, int, int, int]:
    both = gained = lost = neither = 0
    for p in pairs:
        if label is not None and p.label != label:
            continue
        x, y = hit(p.before.action), hit(p.after.action)
        both += x and y
        gained += y and not x
        lost += x and not y
        neither += not x and not y
    return both, gained, lost, neither


def _unlisted(source: Source, x: str, y: str) -> tuple[dict[str, tuple[int, int]], int]:
    """A report without a record for every message (relay lab writes fact pages only for
    messages whose outcome class differs between its regimes, and for blocked ham): per
    label, the unlisted messages and how many of them count in the label's figure (spam
    stopped, ham blocked: the same under every regime, or they would be listed), from the
    report's action counts; and a lower bound of the unlisted messages whose action
    changed within its outcome class."""
    listed: dict[str, Counter[tuple[str, str]]] = {}
    sizes = dict(source.labels)
    for r in source.records:
        for name in (x, y):
            side = r.verdict(name)
            if side is not None and r.label is not None:
                listed.setdefault(name, Counter())[(r.label, side.action)] += 1
    rest: dict[str, tuple[int, int]] = {}
    hidden = 0
    for label in LABELS:
        per: dict[str, dict[str, int]] = {}
        for name in (x, y):
            counts = source.regime_counts(name)
            per[name] = {
                a: counts.count(label, a) - listed.get(name, Counter())[(label, a)] for a in ACTIONS
            }
        n = sizes.get(label, 0) - sum(1 for r in source.records if r.label == label)
        # The figure of this label (spam stopped, ham blocked) cannot differ on an
        # unlisted message: a difference would be a disagreement or a blocked ham.
        hit = _stopped if label == "spam" else _blocked
        counted = {name: sum(v for a, v in per[name].items() if hit(a)) for name in (x, y)}
        negative = any(v < 0 for name in (x, y) for v in per[name].values())
        if counted[x] != counted[y] or negative or n < 0:
            raise RelayError(
                f"{source.path}: the report's counts and its message pages disagree "
                f"({label}: {x} vs {y}); rerun relay lab"
            )
        rest[label] = (n, counted[x])
        hidden += sum(abs(per[x][a] - per[y][a]) for a in ACTIONS) // 2
    return rest, hidden


def compare(
    before: Source,
    after: Source | None = None,
    regimes: tuple[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    filters: Filters = Filters(),
) -> Diff:
    """Compare two reports, two regimes of one report, or enforced vs shadow in a log."""
    mode, x, y, paired = _pairing(before, after, regimes, labels)
    notes: list[str] = []
    pairs = paired.pairs
    rest: dict[str, tuple[int, int]] = {}
    if mode == "regimes" and not before.complete:
        rest, hidden = _unlisted(before, x, y)
        notes.append(
            f"{before.path} records verdicts for {len(before.records)} of {before.expected} "
            "messages (those whose outcome class - pass, soft, hard - differs between its "
            "regimes, and blocked ham); the net effect counts the others from the report's "
            "totals, but a change within an outcome class (tag <-> quarantine, tempfail <-> "
            "reject) of an unlisted message cannot be listed"
            + (f": at least {hidden} such" if hidden else "")
            + "."
        )
    if before.malformed:
        notes.append(
            f"{before.path}: {len(before.malformed)} malformed lines skipped (first: line "
            f"{before.malformed[0][0]}, {before.malformed[0][1]})."
        )
    by_label = Counter(p.label or "unlabelled" for p in pairs)
    for label, (n, _) in rest.items():
        by_label[label] += n
    effects = _effects(pairs, rest, by_label, notes)
    if labels is not None:
        unknown = set(labels) - {r.id for r in before.records}
        if unknown:
            notes.append(f"{len(unknown)} labelled queue ids are not in the shadow log.")
    if filters.label is not None and not any(by_label[label] for label in LABELS):
        raise RelayError("--label: these messages have no labels (give --labels FILE)")

    defs_before = before.rule_definitions(x)
    defs_after = (after or before).rule_definitions(y)
    changes = sorted(
        (
            _change(p.id, p.label, p.before, p.after, defs_before, defs_after)
            for p in pairs
            if p.before.action != p.after.action
        ),
        key=_order,
    )
    selected = [c for c in changes if _matches(c, filters)]
    shown = selected if filters.limit is None else selected[: filters.limit]
    kinds = Counter(c.kind for c in changes)
    return Diff(
        mode=mode,
        before_source=str(before.path),
        before_regime=x,
        after_source=str((after or before).path),
        after_regime=y,
        compared=sum(by_label.values()),
        compared_by_label=tuple(sorted(by_label.items())),
        one_side=paired.one_side,
        content_differs=paired.content_differs,
        label_differs=paired.label_differs,
        effects=tuple(effects),
        changed=len(changes),
        changed_by_kind=tuple(sorted(kinds.items(), key=lambda kv: _rank_of(kv[0], changes))),
        matching=len(selected),
        changes=tuple(shown),
        filters=filters,
        notes=tuple(notes),
    )


def _pairing(
    before: Source,
    after: Source | None,
    regimes: tuple[str, str] | None,
    labels: Mapping[str, str] | None,
) -> tuple[str, str, str, _Paired]:
    """The mode, the regimes before and after, and the messages paired between them."""
    if labels is not None and before.kind != "shadow log":
        raise RelayError("--labels is for shadow logs: a lab report carries its corpus labels")
    if after is not None:
        for s in (before, after):
            if s.kind != "report":
                raise RelayError(f"{s.path}: compare a shadow log on its own, not with a report")
            if not s.complete:
                raise RelayError(
                    f"{s.path}: per-message verdicts cover {len(s.records)} of "
                    f"{s.expected} readable messages (no {VERDICTS_FILE}: the report lists only "
                    "disagreements and blocked ham); a diff between two reports needs every "
                    "message's verdict. Compare regimes inside one report with --regimes X Y"
                )
        x = _pick(before, regimes[0] if regimes else None, "before")
        y = _pick(after, regimes[1] if regimes else None, "after")
        paired = _across(before, x, after, y)
        mode = "reports"
        if not paired.pairs:
            raise RelayError(
                f"{before.path} and {after.path} have no message in common: different corpora?"
            )
    else:
        if regimes is not None:
            x = _pick(before, regimes[0], "before")
            y = _pick(before, regimes[1], "after")
        elif before.kind == "shadow log":
            x, y = _shadow_pair(before)
        elif len(before.regimes) == 2:
            x, y = before.regimes
        else:
            raise RelayError(
                f"{before.path}: give a second report, or --regimes X Y "
                f"(it has: {', '.join(before.regimes)})"
            )
        if x == y:
            raise RelayError(f"--regimes: {x} against itself")
        paired = _within(before, x, y, labels)
        mode = "shadow log" if before.kind == "shadow log" else "regimes"
    return mode, x, y, paired


def _effects(
    pairs: Sequence[_Pair],
    rest: Mapping[str, tuple[int, int]],
    by_label: Mapping[str, int],
    notes: list[str],
) -> list[Effect]:
    """Spam stopped and legitimate mail blocked when there are labels; messages blocked
    (all of them) when some have none, with a note saying what is unavailable."""
    effects: list[Effect] = []
    labelled = sum(by_label.get(label, 0) for label in LABELS)
    for label, figure, hit in (
        ("spam", "spam stopped", _stopped),
        ("ham", "legitimate mail blocked", _blocked),
    ):
        if labelled == 0:
            continue
        both, gained, lost, neither = _cells(pairs, label, hit)
        if label in rest:
            n, counted = rest[label]
            both += counted
            neither += n - counted
        effects.append(Effect.of(figure, label, (both, gained, lost, neither)))
    unlabelled = by_label.get("unlabelled", 0)
    if unlabelled:
        effects.append(Effect.of("messages blocked", None, _cells(pairs, None, _blocked)))
        if labelled == 0:
            notes.append(
                "No labels: spam stopped and legitimate mail blocked are unavailable "
                "(give --labels FILE mapping the log's queue ids to spam or ham)."
            )
        else:
            notes.append(
                f"{unlabelled} of {sum(by_label.values())} compared messages have no "
                "label; spam and legitimate-mail figures count only the labelled ones."
            )
    return effects


def _rank_of(kind: str, changes: Sequence[Change]) -> tuple[int, str]:
    return next(c.rank for c in changes if c.kind == kind), kind


def _shadow_pair(log: Source) -> tuple[str, str]:
    if len(log.enforced) != 1:
        raise RelayError(
            f"{log.path}: {len(log.enforced)} enforced policies "
            f"({', '.join(log.enforced) or 'none'}): name two with --regimes X Y"
        )
    enforced = log.enforced[0]
    shadows = [n for n in log.regimes if n != enforced]
    if len(shadows) != 1:
        raise RelayError(
            f"{log.path}: shadow regimes {', '.join(shadows) or 'none'}: "
            f"name one with --regimes {enforced} NAME"
        )
    return enforced, shadows[0]


# --- rendering -------------------------------------------------------------------------


def to_dict(diff: Diff) -> dict[str, Any]:
    data = dataclasses.asdict(diff)
    data["format"] = "relay-lab-diff/1"
    data["mismatched"] = diff.mismatched
    data["intervals"] = INTERVALS
    return data


INTERVALS = (
    "95% intervals: Wilson per side; the change: Newcombe's hybrid score interval for "
    "paired proportions (method 10); p: exact McNemar test on the messages that changed."
)


def _pct(rate: Rate) -> str:
    if rate.n == 0:
        return "n/a (0 messages)"
    share = f"{100 * rate.k / rate.n:.1f}%"
    return f"{share} [{100 * rate.low:.1f}, {100 * rate.high:.1f}] ({rate.k}/{rate.n})"


def _points(e: Effect) -> str:
    return f"{100 * e.change:+.1f} pts [{100 * e.low:+.1f}, {100 * e.high:+.1f}]"


def _verdict(side: Side) -> str:
    return f"{side.action} ({side.score:g})"


def _sections(diff: Diff) -> Iterator[tuple[str, list[str], list[str], list[list[str]]]]:
    """(title, paragraphs, table header, table rows): the one layout both renderings draw."""
    who = (
        f"before: {diff.before_regime} ({diff.before_source}); "
        f"after: {diff.after_regime} ({diff.after_source})"
    )
    per = ", ".join(f"{n} {label}" for label, n in diff.compared_by_label)
    head = [who + ".", f"Compared: {diff.compared} messages ({per or 'none'})."]
    if diff.mismatched:
        head.append(
            f"Not compared: {sum(1 for o in diff.one_side if o.side == 'before')} on the "
            f"before side only, {sum(1 for o in diff.one_side if o.side == 'after')} on the "
            f"after side only, {len(diff.content_differs)} whose content differs, "
            f"{len(diff.label_differs)} whose label differs (listed below)."
        )
    yield f"Lab diff ({diff.mode}): {diff.before_regime} -> {diff.after_regime}", head, [], []
    if diff.notes:  # caveats before the numbers they qualify
        yield "Notes", list(diff.notes), [], []
    rows = [
        [
            e.figure,
            _pct(e.before),
            _pct(e.after),
            _points(e),
            f"{e.gained} / {e.lost}",
            f"{e.mcnemar_p:.3g}",
        ]
        for e in diff.effects
    ]
    yield (
        "Net effect",
        [INTERVALS],
        ["figure", "before", "after", "change", "newly / no longer", "p"],
        rows,
    )
    kinds = ", ".join(f"{n} {k}" for k, n in diff.changed_by_kind)
    f = diff.filters
    shown = [f"Verdicts changed: {diff.changed}" + (f" ({kinds})." if kinds else ".")]
    if f.label or f.rule or f.limit is not None:
        wanted = [
            w
            for w in (f"label {f.label}" if f.label else "", f"rule {f.rule}" if f.rule else "")
            if w
        ]
        shown.append(
            f"Showing {len(diff.changes)} of {diff.matching}"
            + (f" matching {' and '.join(wanted)}" if wanted else "")
            + ", most informative first."
        )
    rows = [
        [
            str(i),
            c.id,
            c.label or "-",
            c.kind,
            _verdict(c.before),
            _verdict(c.after),
            "; ".join(f"{r.rule}: {r.how}" for r in c.rules) or (c.note or "-"),
            c.deciding_before,
            c.deciding_after,
        ]
        for i, c in enumerate(diff.changes, 1)
    ]
    yield (
        "Changed verdicts",
        shown,
        ["#", "message", "label", "change", "before", "after", "rules responsible",
         "decided before by", "decided after by"],
        rows,
    )  # fmt: skip
    if diff.mismatched:
        rows = [[o.id, o.side + " only", o.reason] for o in diff.one_side]
        rows += [[m, "both", "content differs (digest)"] for m in diff.content_differs]
        rows += [[m, "both", f"label {a} before, {b} after"] for m, a, b in diff.label_differs]
        yield "Messages not compared", [], ["message", "where", "why"], rows


def markdown(diff: Diff) -> str:
    out: list[str] = []
    for i, (title, paras, header, rows) in enumerate(_sections(diff)):
        out += [("# " if i == 0 else "## ") + title, ""]
        for p in paras:
            out += [p, ""]
        if header:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
            out.append("")
    return "\n".join(out)


def html(diff: Diff) -> str:
    out = ["<!doctype html><meta charset='utf-8'><title>Lab diff</title>"]
    for i, (title, paras, header, rows) in enumerate(_sections(diff)):
        tag = "h1" if i == 0 else "h2"
        out.append(f"<{tag}>{escape(title)}</{tag}>")
        out += [f"<p>{escape(p)}</p>" for p in paras]
        if header:
            out.append("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
    return "\n".join(out) + "\n"
