"""The report's numbers, as one JSON-able mapping; every rendering reads only this.

Definitions (per regime, over the messages that could be read):
- spam stopped, hard: spam refused at SMTP time (reject, or tempfail).
- spam stopped, soft: spam delivered tagged or held in quarantine.
- legitimate mail blocked: ham not delivered to the inbox (reject, tempfail, quarantine);
  ham that was only tagged is reported separately.
- content read: messages whose verdict needed a T3 fact (the text was read).
Rates carry 95% Wilson score intervals.

Message lists (the disagreements, each regime's blocked legitimate mail) are complete and
ranked, most informative first (RANKING says how; it goes into the report too): each row
carries its ``rank``, a disagreement also its ranking ``key``. The renderings page them.
A row's ``facts`` links to the message's fact page, written for the first ``pages`` rows
of each list only (PAGES by default, `relay lab --pages`); further rows have ``facts``
None and are still counted in every figure.

ReportBuilder takes one message's decisions at a time and keeps counters, the rows of
the message lists and, per regime, counts of (label, rescored verdict): no decision is
held per message, so the driver can stream a corpus through it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from relay.intervals import wilson as wilson  # re-exported: the lab reports use it
from relay.lab.corpus import CorpusMessage, Unreadable
from relay.lab.curves import build_curve_counts
from relay.lab.evaluate import Decision, Regime, RegimeProblem, regime_rules
from relay.lab.rescore import Matched, RegimeRules, Rescored, RuleDef, rescore
from relay.lab.rulestats import RuleTally, unavailable
from relay.lab.shares import proportion as proportion  # re-exported, as before

TIERS = ("none", "T0", "T1", "T2", "T3")
HARD = frozenset({"reject", "tempfail"})
SOFT = frozenset({"tag", "quarantine"})
BLOCKED = frozenset({"reject", "tempfail", "quarantine"})
ACTIONS = ("accept", "tag", "quarantine", "tempfail", "reject")
PAGES = 1000  # fact pages per message list: its first (most informative) rows


def outcome_class(action: str) -> str:
    if action in HARD:
        return "hard"
    if action in SOFT:
        return "soft"
    return "pass"


def message_shard(digest: str) -> str:
    """Fact pages are grouped by the first two hex digits of the digest: at most 256
    files however large the corpus, each with one section per message."""
    return digest[:2]


def message_link(m: CorpusMessage) -> str:
    return f"messages/{message_shard(m.digest)}.html#m{m.digest[:16]}"


def curve_and_rules(
    regime: Regime,
    messages: Sequence[CorpusMessage],
    decisions: Mapping[str, Mapping[str, Decision]],
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The regime's threshold curve and rule statistics, from complete rule matches."""
    tally = _RegimeTally(regime)
    for m in messages:
        tally.curve_and_rules(m.label, decisions[m.id][regime.name])
    return tally.curve_result()


class _RegimeTally:
    """One regime's figures, one message at a time."""

    def __init__(self, regime: Regime) -> None:
        self.regime = regime
        self.counts: dict[str, Counter[str]] = {"ham": Counter(), "spam": Counter()}
        self.tiers: Counter[str] = Counter()
        self.tiers_by_label: dict[str, Counter[str]] = {"ham": Counter(), "spam": Counter()}
        self.rule_hits: dict[str, Counter[str]] = {}
        self.skipped: Counter[str] = Counter()
        self.ham_blocks: list[dict[str, Any]] = []
        self.rules: RegimeRules | None = regime_rules(regime.policy)
        self.defs: dict[str, RuleDef] = {} if self.rules is None else self.rules.by_name()
        self.rule_tally = None if self.rules is None else RuleTally(self.rules)
        self.scores: Counter[tuple[str, Rescored]] = Counter()
        self.unmatched = False  # some decision did not record its rule matches
        # How many messages of each label had each distinct decision: most messages share
        # theirs with many others, so the counters are fed once per distinct one (in order
        # of first appearance, which keeps ties in the report's orderings as they were).
        self.seen: Counter[tuple[str, Decision]] = Counter()

    def curve_and_rules(self, label: str, d: Decision, n: int = 1) -> None:
        if self.rule_tally is None or self.unmatched:
            return
        if d.matched is None:
            self.unmatched = True
            return
        self.rule_tally.add(Matched(label, d.matched, frozenset(d.rules), d.bands, d.action), n)
        self.scores[(label, rescore(d.matched, self.defs))] += n

    def _flush(self) -> None:
        for (label, d), n in self.seen.items():
            self.counts[label][d.action] += n
            tier = d.tier or "none"
            self.tiers[tier] += n
            self.tiers_by_label[label][tier] += n
            for rule in d.rules:
                self.rule_hits.setdefault(rule, Counter())[label] += n
            for skipped in d.skipped:
                self.skipped[skipped] += n
            self.curve_and_rules(label, d, n)
        self.seen.clear()

    def curve_result(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        self._flush()
        if self.rules is None or self.rule_tally is None:
            return None, unavailable("not a relay policy: its rules cannot be read")
        if self.unmatched:
            return None, unavailable("rule matches were not recorded for every message")
        curve = build_curve_counts(self.scores, self.rules.lowest_block)
        return curve.to_dict(), self.rule_tally.result().to_dict()

    def add(self, m: CorpusMessage, decisions: Mapping[str, Decision]) -> None:
        name = self.regime.name
        d = decisions[name]
        self.seen[(m.label, d)] += 1
        if m.label == "ham" and d.action in BLOCKED:
            self.ham_blocks.append(
                {
                    "id": m.id,
                    "action": d.action,
                    "rules": list(d.rules),
                    "forced_by": d.forced_by,
                    "reason": d.reason,
                    "tier": d.tier,
                    "facts": message_link(m),
                    # The other regimes that delivered it: what ranks this regime's own
                    # mistakes above mail every regime blocks.
                    "delivered_by": [
                        n for n, o in decisions.items() if n != name and o.action not in BLOCKED
                    ],
                }
            )

    def result(self, pages: int | None) -> dict[str, Any]:
        self._flush()
        regime, counts, tiers = self.regime, self.counts, self.tiers
        n_spam = sum(counts["spam"].values())
        n_ham = sum(counts["ham"].values())
        n = n_spam + n_ham
        spam_hard = sum(counts["spam"][a] for a in HARD)
        spam_soft = sum(counts["spam"][a] for a in SOFT)
        read = [t for t in TIERS if tiers[t]]
        block_rules: Counter[str] = Counter()
        for b in self.ham_blocks:
            block_rules[b["forced_by"] or "score: " + " + ".join(b["rules"])] += 1
        curve, rules = self.curve_result()
        return {
            "name": regime.name,
            "file": str(regime.path),
            "messages": n,
            "actions": {label: {a: counts[label][a] for a in ACTIONS} for label in ("spam", "ham")},
            "spam_stopped_hard": proportion(spam_hard, n_spam),
            "spam_stopped_soft": proportion(spam_soft, n_spam),
            "spam_stopped": proportion(spam_hard + spam_soft, n_spam),
            "ham_blocked": proportion(sum(counts["ham"][a] for a in BLOCKED), n_ham),
            "ham_tagged": proportion(counts["ham"]["tag"], n_ham),
            "content_read": proportion(tiers["T3"], n),
            "highest_tier": read[-1] if read else "none",
            "tiers": {t: proportion(tiers[t], n) for t in TIERS},
            "tiers_by_label": {
                label: {t: self.tiers_by_label[label][t] for t in TIERS}
                for label in ("spam", "ham")
            },
            "rule_hits": {
                rule: {"spam": c["spam"], "ham": c["ham"]}
                for rule, c in sorted(self.rule_hits.items(), key=lambda kv: -sum(kv[1].values()))
            },
            "ham_block_causes": dict(block_rules.most_common()),
            "ham_blocks": _paged(rank_ham_blocks(self.ham_blocks), pages),
            "skipped": dict(self.skipped.most_common(20)),
            "curve": curve,
            "rule_stats": rules,
        }


def _paged(rows: list[dict[str, Any]], pages: int | None) -> list[dict[str, Any]]:
    """Ranked rows past the first ``pages`` lose their fact-page link (None: all keep it)."""
    if pages is not None:
        for row in rows[pages:]:
            row["facts"] = None
    return rows


RANKING = {
    "disagreements": (
        "most informative first: by class (legitimate mail some regime blocked, then spam "
        "some regime let through, then messages every regime got right but to a different "
        "degree), then by split (the size of the smaller side, right against wrong per the "
        "label, or the regimes outside the commonest outcome for the last class: even "
        "splits first), then the side with fewer regimes right first, then more hard "
        "refusals of legitimate mail first, then id"
    ),
    "ham_blocks": (
        "hard refusals (reject, tempfail) before quarantine, then the messages the most "
        "other regimes delivered first (this regime's own mistakes before mail every "
        "regime blocks), then id"
    ),
}
DISAGREEMENT_CLASSES = ("legitimate mail blocked", "spam let through", "degree only")


def regime_right(label: str, action: str) -> bool:
    """Per the label: spam is right when stopped (anything but accept, as in "spam
    stopped"), legitimate mail when it reaches the inbox (accept or tag)."""
    return action != "accept" if label == "spam" else action not in BLOCKED


def disagreement_key(label: str, actions: Mapping[str, str]) -> dict[str, Any]:
    """The ranking key of one disagreement (RANKING["disagreements"] says the order)."""
    wrong = [a for a in actions.values() if not regime_right(label, a)]
    right = len(actions) - len(wrong)
    if wrong:
        kind = 0 if label == "ham" else 1
        split = min(right, len(wrong))
    else:
        kind = 2
        split = len(actions) - max(Counter(outcome_class(a) for a in actions.values()).values())
    return {
        "class": DISAGREEMENT_CLASSES[kind],
        "split": split,
        "right": right,
        "wrong": len(wrong),
        "hard_wrong": sum(a in HARD for a in wrong) if label == "ham" else 0,
    }


def _disagreement_order(row: Mapping[str, Any]) -> tuple[int, int, int, int, str]:
    k = row["key"]
    return (
        DISAGREEMENT_CLASSES.index(k["class"]),
        -k["split"],
        k["right"],
        -k["hard_wrong"],
        row["id"],
    )


def rank_ham_blocks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A regime's blocked legitimate mail in RANKING["ham_blocks"] order, numbered."""
    blocks.sort(key=lambda b: (b["action"] not in HARD, -len(b["delivered_by"]), b["id"]))
    for i, b in enumerate(blocks, 1):
        b["rank"] = i
    return blocks


def disagreements(
    regimes: Sequence[Regime],
    messages: Sequence[CorpusMessage],
    decisions: Mapping[str, Mapping[str, Decision]],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Messages whose outcome (pass / soft / hard) differs between regimes, ranked
    (RANKING["disagreements"]), and pair counts."""
    tally = _Disagreements([r.name for r in regimes])
    for m in messages:
        tally.add(m, decisions[m.id])
    return tally.result(None)


class _Disagreements:
    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.pairs = {a: dict.fromkeys(names, 0) for a in names}
        self.rows: list[dict[str, Any]] = []

    def add(self, m: CorpusMessage, ds: Mapping[str, Decision]) -> None:
        names = self.names
        classes = {n: outcome_class(ds[n].action) for n in names}
        if len(set(classes.values())) <= 1:
            return
        for a in names:
            for b in names:
                if classes[a] != classes[b]:
                    self.pairs[a][b] += 1
        actions = {n: ds[n].action for n in names}
        self.rows.append(
            {
                "id": m.id,
                "label": m.label,
                "actions": actions,
                # Rules fired per regime (only regimes where some fired): the report's
                # rule filter reads them.
                "rules": {n: list(ds[n].rules) for n in names if ds[n].rules},
                "facts": message_link(m),
                "key": disagreement_key(m.label, actions),
            }
        )

    def result(self, pages: int | None) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
        out = self.rows
        out.sort(key=_disagreement_order)
        for i, row in enumerate(out, 1):
            row["rank"] = i
        return _paged(out, pages), self.pairs


class ReportBuilder:
    """The report's figures and lists, fed one message's decisions at a time (``add``, in
    corpus order), then ``build`` as build_report."""

    def __init__(self, regimes: Sequence[Regime]) -> None:
        self.regimes = list(regimes)
        self._tallies = [_RegimeTally(r) for r in regimes]
        self._disagreements = _Disagreements([r.name for r in regimes])
        self._labels: Counter[str] = Counter()

    def add(self, m: CorpusMessage, decisions: Mapping[str, Decision]) -> None:
        self._labels[m.label] += 1
        for tally in self._tallies:
            tally.add(m, decisions)
        self._disagreements.add(m, decisions)

    def build(
        self,
        *,
        corpus_description: str,
        unreadable: Sequence[Unreadable],
        regime_errors: Sequence[RegimeProblem],
        dns: Mapping[str, Any],
        inputs: Mapping[str, Any],
        model: Mapping[str, Any],
        facts_info: Mapping[str, Any],
        timings: Mapping[str, float],
        pages: int | None = None,
    ) -> dict[str, Any]:
        """The report; ``pages``: rows of each message list that link to a fact page
        (None: every row)."""
        labels = self._labels
        disagree, pairs = self._disagreements.result(pages)
        tallies = self._tallies
        # The rows now belong to the report alone: a caller that drops it frees them.
        self._tallies, self._disagreements = [], _Disagreements([])
        return {
            "format": "relay-lab-report/1",
            "corpus": {
                "source": corpus_description,
                "messages": labels.total() + len(unreadable),
                "readable": labels.total(),
                "ham": labels["ham"],
                "spam": labels["spam"],
                "unreadable": [
                    {"id": u.id, "label": u.label, "reason": u.reason} for u in unreadable
                ],
            },
            "dns": dict(dns),
            "inputs": dict(inputs),
            "model": dict(model),
            "facts": dict(facts_info),
            "regimes": [t.result(pages) for t in tallies],
            "regime_errors": [
                {"file": str(e.path), "problems": list(e.problems)} for e in regime_errors
            ],
            "disagreements": disagree,
            "disagreement_pairs": pairs,
            "ranking": dict(RANKING),
            "pages": pages,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }


def build_report(
    *,
    corpus_description: str,
    messages: Sequence[CorpusMessage],
    unreadable: Sequence[Unreadable],
    regimes: Sequence[Regime],
    regime_errors: Sequence[RegimeProblem],
    decisions: Mapping[str, Mapping[str, Decision]],
    dns: Mapping[str, Any],
    inputs: Mapping[str, Any],
    model: Mapping[str, Any],
    facts_info: Mapping[str, Any],
    timings: Mapping[str, float],
    pages: int | None = None,
) -> dict[str, Any]:
    """The report of decisions held in memory (ReportBuilder for a stream of them)."""
    builder = ReportBuilder(regimes)
    for m in messages:
        builder.add(m, decisions[m.id])
    return builder.build(
        corpus_description=corpus_description,
        unreadable=unreadable,
        regime_errors=regime_errors,
        dns=dns,
        inputs=inputs,
        model=model,
        facts_info=facts_info,
        timings=timings,
        pages=pages,
    )
