"""Learning curve: how a site's feedback improves the classifier and the default policy.

Orders a labelled corpus by Date, feeds the first N messages through the same code path
as ``relay learn`` (``feedback.learn.Learner`` into a fresh feedback store), updates the
model from them (``classifier.update.update_model``, as ``relay model update`` does) and
scores every later message, offline, with the updated classifier and with the default
policy (as the lab does: no DNS; Authentication-Results fields are believed only from
the authserv-ids given with ``--trust-ar``). Per step it writes ROC AUC, recall at
FPR <= 0.1 % and <= 1 %, the legitimate mail flagged at the cut that stops 90 % of the
spam (the target's cost under any cut), the default policy's spam stopped and
legitimate mail blocked, each with a 95 % interval, and the seconds the update took.

``--as-stamped AUTHSERV_ID`` simulates the live path of reputation: live, the relay stamps
its own Authentication-Results field on every copy it delivers, so a reported copy credits
the sender domains it authenticated. Corpus copies carry no field of ours, so with this
option each message gets one, written by the relay's own stamp (``AuthResultsStamp``,
``format_value``) from the ``auth_results`` fact the offline registry reads from the
``--trust-ar`` fields (what the trusted upstream recorded stands in for our DKIM/SPF/DMARC
checks). The stamped copy is what is reported (``Learner(authserv_id=AUTHSERV_ID)``, base
score kept of it, as ``relay learn`` does) and what the default policy's authentication
and reputation facts read (the offline registry then trusts AUTHSERV_ID only, as the live
facts are the results the stamp records); the classifier scores later mail unstamped, as
live it runs before the stamp. ``--reputation-per-reporter`` sets ``[feedback]
reputation_per_reporter`` (default: the relay's, 3): the bench reports everything as one
reporter, and the default policy's reputation rules need 5 reports of an identity.

The base model must not have seen the corpus: for modern-dev, one trained on the
SpamAssassin train split only (docs/benchmarks.md, "Learning curve", has the commands).

Usage (corpus paths as arguments):
  .venv/bin/python -m bench.learning --base-model var/bench/sa-only/spam.skops \\
      --corpus ../shared/corpora/modern-dev/modern-dev.tar.gz \\
      --labels ../shared/corpora/modern-dev/labels.tsv \\
      --trust-ar hotel.example.com --trust-ar juliett.example.com \\
      --trust-ar hotel.baddomain.com --trust-ar juliett.baddomain.com \\
      --trust-ar hotel.testdomain.com --trust-ar juliett.testdomain.com \\
      --steps 50,100,250 --out bench/results/learning-modern-dev.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from relay import corpus
from relay.classifier.dataset import body_group
from relay.classifier.evaluation import auc_interval, recall_at_fpr, roc_auc
from relay.classifier.features import skip_log_line
from relay.classifier.model import LoadedModel, load_model
from relay.config import FeedbackSettings, StateSettings
from relay.errors import FeedbackRefused, ModelError
from relay.facts import FactRegistry, Facts, Services, default_registry
from relay.feedback.learn import Learner
from relay.feedback.record import FeedbackEntry, Label
from relay.feedback.store import FeedbackStore, open_feedback
from relay.intervals import wilson
from relay.lab.offline_auth import HeaderAuth, offline_registry
from relay.lab.stats import BLOCKED
from relay.message import (
    Message,
    header_time,
    parse_header_fields,
    split_header_block,
    strip_mbox_from,
)
from relay.models.update import Candidate, GateSettings, score_raw, update_model
from relay.pipeline.authresults import AuthResultsStamp
from relay.policy import load_policy
from relay.secretkey import SecretKey
from relay.verdict import Action, Verdict

REPO = Path(__file__).resolve().parents[1]
STOPPED = frozenset({"reject", "tempfail", "quarantine", "tag"})  # not in the inbox untouched


@dataclass(frozen=True, slots=True)
class Mail:
    id: str
    label: Label
    raw: bytes
    time: float
    group: str  # the sender's registrable domain, or the body hash: bootstrap clusters
    stamped: bytes | None = None  # the copy the relay would deliver (``--as-stamped``)

    @property
    def delivered(self) -> bytes:
        """The copy a user reports and the policy's facts read: stamped when simulated."""
        return self.raw if self.stamped is None else self.stamped


def sent_time(raw: bytes) -> float | None:
    """The Date the sender wrote (else the newest Received date), as the issue orders by."""
    fields = parse_header_fields(split_header_block(raw)[0])
    dated = header_time([(n, v) for n, v in fields if n.strip().lower() == "date"])
    return dated if dated is not None else header_time(fields)


def load_ordered(root: Path, labels: Path) -> tuple[list[Mail], int]:
    """Messages in Date order, and how many had no usable date (left out). A tool's log
    line written above the header (126 modern-dev files) is dropped first: it is not part
    of the mail a site would receive."""
    from relay.classifier.features import Extractor

    extractor = Extractor()
    found: list[Mail] = []
    undated = 0
    for item in corpus.load_all(corpus.read_labels(root, labels)):
        raw = skip_log_line(strip_mbox_from(item.load()))
        when = sent_time(raw)
        if when is None:
            undated += 1
            continue
        site = extractor.extract_bytes(raw).sender_site
        group = "site:" + site if site else body_group(raw)
        found.append(Mail(item.id, item.label, raw, when, group))
    found.sort(key=lambda m: (m.time, m.id))
    return found, undated


def _proportion(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {"k": k, "n": n, "p": k / n if n else float("nan"), "ci95": [low, high]}


def fpr_at_recall(
    spam: np.ndarray[Any, Any], scores: np.ndarray[Any, Any], recall: float
) -> dict[str, Any]:
    """Legitimate mail flagged by the highest cut that stops at least ``recall`` of the
    spam, with a Wilson interval: what the target's 90 % costs whatever the policy's cuts,
    so it tells a ranking limit (no cut reaches the target) from a calibration one."""
    ranked = np.sort(scores[spam])[::-1]
    n_ham = int((~spam).sum())
    wanted = math.ceil(recall * len(ranked) - 1e-9)
    if not wanted:
        return _proportion(0, n_ham)
    return _proportion(int((scores[~spam] >= ranked[wanted - 1]).sum()), n_ham)


def _recall(spam: np.ndarray[Any, Any], scores: np.ndarray[Any, Any], fpr: float) -> dict[str, Any]:
    """Recall at the threshold that keeps FPR <= fpr, with a Wilson interval on the spam."""
    recall = recall_at_fpr(spam, scores, fpr)
    n = int(spam.sum())
    return _proportion(round(recall * n), n)


async def _policy_actions(
    mails: Sequence[Mail],
    probabilities: Sequence[float],
    registry: FactRegistry,
    services: Services,
    hits: dict[str, int],
) -> list[str]:
    """The default policy's action per message, offline: the updated classifier's
    probability preset, reputation read from the step's feedback store, no DNS."""
    policy = load_policy(REPO / "config" / "policy.toml", registry)
    actions = []
    for mail, p in zip(mails, probabilities, strict=True):
        message = Message.from_file_bytes(mail.delivered, received_at=mail.time)
        preset = {
            "classifier": {"spam_probability": p, "parse_degraded": False},
            "spam_probability": p,
        }
        facts = Facts(registry, message, services, preset)
        verdict = await policy.decide(message, facts)
        actions.append(verdict.action.value)
        for hit in verdict.hits:
            key = f"{mail.label}: {hit.rule}"
            hits[key] = hits.get(key, 0) + 1
    return actions


async def run_step(
    n: int,
    mails: Sequence[Mail],
    base: LoadedModel,
    registry: FactRegistry,
    workdir: Path,
    *,
    authserv_id: str = "",
    reputation_per_reporter: int = FeedbackSettings().reputation_per_reporter,
) -> dict[str, Any]:
    fed, rest = mails[:n], mails[n:]
    base_sha = str(base.card["model_sha256"])

    async def scorer(raw: bytes) -> tuple[str, float]:  # as the relay's pool does live
        return base_sha, (await asyncio.to_thread(base.classify_bytes, raw))[0]

    settings = FeedbackSettings(
        per_reporter_daily=len(fed) + 1,
        max_entries=len(fed) + 1,
        max_age_days=100 * 365,
        reporter_share=1.0,  # one site, one admin reporting: nothing to cap
        reputation_per_reporter=reputation_per_reporter,
    )
    store = await open_feedback(
        StateSettings(path=workdir / f"step-{n}.sqlite3"), settings, SecretKey.generate()
    )
    try:
        learner = Learner(store, scorer=scorer, authserv_id=authserv_id)
        refused = 0
        for mail in fed:
            try:
                await learner.learn(
                    mail.delivered,
                    action=mail.label,
                    reporter="bench",
                    source="bench",
                    now=mail.time,
                )
            except FeedbackRefused:  # an unparsable report is refused by learn, as live
                refused += 1
        entries = await store.entries()
        base_scores = await store.scores(base_sha)
        return await _update_and_score(
            n, fed, rest, base, entries, base_scores, store, registry, refused
        )
    finally:
        await store.close()


async def _update_and_score(
    n: int,
    fed: Sequence[Mail],
    rest: Sequence[Mail],
    base: LoadedModel,
    entries: list[FeedbackEntry],
    base_scores: dict[str, float],
    store: FeedbackStore,
    registry: FactRegistry,
    refused: int,
) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        candidate = await _update(base, entries, base_scores)
    except ModelError as exc:  # too little feedback of one class, as `relay model update` says
        return {"fed": n, "refused": refused, "update_refused": str(exc)}
    update_seconds = time.perf_counter() - start
    probabilities = await asyncio.to_thread(score_raw, candidate, [m.raw for m in rest])
    base_probabilities = [p for p, _ in base.classify_many([m.raw for m in rest])]
    spam = np.array([m.label == "spam" for m in rest])
    groups = np.array([m.group for m in rest], dtype=str)
    hits: dict[str, int] = {}  # "label: rule" -> messages it hit
    actions = await _policy_actions(rest, probabilities, registry, Services(reputation=store), hits)
    stopped = sum(
        1 for m, a in zip(rest, actions, strict=True) if m.label == "spam" and a in STOPPED
    )
    blocked = sum(
        1 for m, a in zip(rest, actions, strict=True) if m.label == "ham" and a in BLOCKED
    )
    return {
        "fed": n,
        "fed_spam": sum(1 for m in fed if m.label == "spam"),
        "fed_ham": sum(1 for m in fed if m.label == "ham"),
        "refused": refused,
        "trained_on": candidate.card["feedback"]["training"],
        "held_out": candidate.card["feedback"]["held_out"],
        "gate": {k: v for k, v in candidate.card["gate"].items() if k != "settings"},
        "scored": len(rest),
        "update_seconds": round(update_seconds, 2),
        "updated": _figures(spam, np.array(probabilities), groups),
        "base_only": _figures(spam, np.array(base_probabilities), groups),
        "policy_spam_stopped": _proportion(stopped, int(spam.sum())),
        "policy_ham_blocked": _proportion(blocked, int((~spam).sum())),
        "policy_actions": {a: actions.count(a) for a in sorted(set(actions))},
        "policy_rule_hits": dict(sorted(hits.items())),
    }


async def _update(
    base: LoadedModel, entries: list[FeedbackEntry], base_scores: dict[str, float]
) -> Candidate:
    """What `relay model update` does, with one admin reporting (no reporter cap)."""
    return await asyncio.to_thread(
        update_model,
        base,
        entries,
        base_scores=base_scores,
        gate=GateSettings(reporter_share=1.0),
        n_jobs=2,
    )


def _figures(
    spam: np.ndarray[Any, Any], scores: np.ndarray[Any, Any], groups: np.ndarray[Any, Any]
) -> dict[str, Any]:
    low, high = auc_interval(spam, scores, groups)
    return {
        "roc_auc": roc_auc(spam, scores),
        "roc_auc_ci95": [low, high],
        "recall_at_fpr_0.1%": _recall(spam, scores, 0.001),
        "recall_at_fpr_1%": _recall(spam, scores, 0.01),
        "fpr_at_recall_90%": fpr_at_recall(spam, scores, 0.9),
    }


async def stamp_all(mails: Sequence[Mail], registry: FactRegistry, authserv_id: str) -> list[Mail]:
    """Each message as the relay would deliver it: its own Authentication-Results field
    (the real stamp) from the ``auth_results`` fact of ``registry`` (offline: the trusted
    upstream fields)."""
    stamp = AuthResultsStamp(authserv_id)
    out = []
    for mail in mails:
        message = Message.from_file_bytes(mail.raw, received_at=mail.time)
        facts = Facts(registry, message, Services())
        stamped = await stamp(message, facts, Verdict(Action.ACCEPT))  # delivered
        out.append(replace(mail, stamped=stamped.raw))
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    mails, undated = load_ordered(args.corpus, args.labels)
    registry = default_registry()
    if args.trust_ar:
        registry = offline_registry(registry, HeaderAuth(frozenset(args.trust_ar)))
    if args.as_stamped:
        mails = await stamp_all(mails, registry, args.as_stamped)
        # The policy reads what our stamp recorded, as live it reads the same results.
        registry = offline_registry(default_registry(), HeaderAuth(frozenset([args.as_stamped])))
    steps = [n for n in args.steps if n < len(mails)]
    base = load_model(args.base_model)
    results = []
    with tempfile.TemporaryDirectory(prefix="relay-learning-") as tmp:
        for n in steps:
            step = await run_step(
                n,
                mails,
                base,
                registry,
                Path(tmp),
                authserv_id=args.as_stamped,
                reputation_per_reporter=args.reputation_per_reporter,
            )
            results.append(step)
            print(n, step.get("updated", step.get("update_refused")), flush=True)
    return {
        "corpus": str(args.labels.name),
        "messages": len(mails),
        "undated_left_out": undated,
        "base_model": args.base_model.name,
        "trusted_authserv_ids": sorted(args.trust_ar),
        "as_stamped": args.as_stamped or None,
        "reputation_per_reporter": args.reputation_per_reporter,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "steps": results,
    }


def _steps(text: str) -> list[int]:
    return sorted({int(part) for part in text.split(",") if part.strip()})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__)
    parser.add_argument("--corpus", type=Path, required=True, help="folder or archive")
    parser.add_argument("--labels", type=Path, required=True, help="labels TSV")
    parser.add_argument("--base-model", type=Path, default=REPO / "models" / "spam.skops")
    parser.add_argument("--steps", type=_steps, default=[50, 100, 250, 500])
    parser.add_argument("--trust-ar", action="append", default=[], metavar="AUTHSERV_ID")
    parser.add_argument(
        "--as-stamped",
        default="",
        metavar="AUTHSERV_ID",
        help="stamp each message with the relay's own Authentication-Results under this id "
        "(from the --trust-ar fields) before it is reported and before the policy reads it",
    )
    parser.add_argument(
        "--reputation-per-reporter",
        type=int,
        default=FeedbackSettings().reputation_per_reporter,
        help="[feedback] reputation_per_reporter for the step's store (default: the relay's)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=_finite) + "\n", encoding="utf-8")
    return 0


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    sys.exit(main())
