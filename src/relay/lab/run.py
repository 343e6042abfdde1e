"""`relay lab`: read the corpus, compute facts once (cached), evaluate every regime, report."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from relay.facts import FactRegistry
from relay.lab import plots, render, tables
from relay.lab.cache import Cached, FactCache
from relay.lab.compute import DEFERRED, Computed, Item, Outcomes
from relay.lab.corpus import Corpus, CorpusMessage, Source, load_corpus
from relay.lab.diff import write_verdicts
from relay.lab.engine import EngineSpec, first_pass, ordered_pass
from relay.lab.env import LabEnv, check_services
from relay.lab.evaluate import (
    Decision,
    PolicyLoader,
    default_loader,
    evaluate,
    load_regimes,
    needed_facts,
)
from relay.lab.stats import build_report, message_shard


@dataclass(frozen=True, slots=True)
class LabOptions:
    sources: tuple[Source, ...]
    description: str
    policies: tuple[Path, ...]
    out: Path
    env: LabEnv
    cache_dir: Path | None = Path("var/lab-cache")  # None: compute everything, keep nothing
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = False
    engine: EngineSpec = field(default_factory=EngineSpec)  # where passes 1 and 2 run (engine.py)


@contextmanager
def _bar(enabled: bool, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    bar = tqdm(total=total, desc=desc, unit="msg", disable=not enabled or total == 0)
    try:
        yield bar.update
    finally:
        bar.close()


class _NoCache:
    def load(self, *args: object) -> dict[str, dict[str, Cached]]:
        return {}

    def store(self, *args: object) -> None: ...

    def commit(self) -> None: ...

    def close(self) -> None: ...


def compute_facts(
    corpus: Corpus,
    names: Sequence[str],
    registry: FactRegistry,
    options: LabOptions,
) -> tuple[dict[str, Outcomes], dict[str, Any]]:
    """Every needed fact for every readable message: from the cache, else computed."""
    env = options.env
    versions = {n: registry.cache_version(n) for n in names}
    env_key = env.key()
    order_key = f"{env_key}/order:{corpus.order_digest()}"
    cache = FactCache(options.cache_dir) if options.cache_dir else _NoCache()
    try:
        digests = [m.digest for m in corpus.messages]
        stateless = cache.load(digests, versions, [env_key])
        ordered_cache = cache.load(digests, versions, [order_key])
        stateful = {n for per in ordered_cache.values() for n in per}
        outcomes: dict[str, Outcomes] = {
            d: {**stateless.get(d, {}), **ordered_cache.get(d, {})} for d in digests
        }
        wanted = set(names)
        items: list[Item] = []
        for m in corpus.messages:
            missing = tuple(sorted(wanted - outcomes[m.digest].keys()))
            if missing:
                items.append((m, missing))
        start = time.perf_counter()
        if items:
            asyncio.run(check_services(env))

        def store(computed: Mapping[str, Computed]) -> None:
            # Called per finished batch by a cluster engine: a long run that stops keeps
            # what it computed, and the rerun computes only the rest.
            for digest, result in computed.items():
                fresh = {n: c for n, c in result.outcomes.items() if n in versions}
                deferred = {
                    n for n, c in fresh.items() if c.error is not None and DEFERRED in c.error
                }
                stateful.update(deferred)
                keep = {n: c for n, c in fresh.items() if n not in deferred}
                outcomes[digest].update(keep)
                cache.store(digest, keep, versions, env_key)
            cache.commit()

        with _bar(options.progress, len(items), "facts") as progress:
            computed = first_pass(options.engine, env, items, options.jobs, progress, store)
        parallel_seconds = time.perf_counter() - start
        rerun = sorted(n for n in stateful if any(n not in o for o in outcomes.values()))
        start = time.perf_counter()
        pass2: dict[str, Any] = {"mode": "cached" if stateful else "none"}
        if rerun:
            # Stateful facts are only true for the whole sequence: recompute them all, in order.
            names_seq = sorted(stateful)
            with _bar(options.progress, len(corpus.messages), "stateful facts") as progress:
                ordered, pass2 = ordered_pass(
                    options.engine,
                    env,
                    corpus.messages,
                    outcomes,
                    {d: c.carry for d, c in computed.items()},
                    names_seq,
                    options.jobs,
                    progress,
                )
            # Cached only now that every message has its values: a pass 2 that stopped
            # (a cluster gone) leaves nothing of itself behind.
            for digest, got in ordered.items():
                outcomes[digest].update(got)
                cache.store(digest, got, versions, order_key)
            cache.commit()
        info = {
            "computed": list(names),
            "stateful": sorted(stateful),
            "messages_computed": len(items),
            "messages_from_cache": len(corpus.messages) - len(items),
            "cache": None if options.cache_dir is None else str(options.cache_dir),
            "jobs": options.jobs,
            "parallel_seconds": round(parallel_seconds, 3),
            "sequential_seconds": round(time.perf_counter() - start, 3),
            "pass2": pass2,
            "errors": _error_counts(outcomes),
        }
        return outcomes, info
    finally:
        cache.close()


def _error_counts(outcomes: Mapping[str, Outcomes]) -> dict[str, int]:
    """How many messages each fact failed on (the report shows why regimes skipped rules)."""
    counts: dict[str, int] = {}
    for per in outcomes.values():
        for name, c in per.items():
            if c.error is not None:
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _message_page(
    m: CorpusMessage, outcomes: Outcomes, decisions: Mapping[str, Decision], registry: FactRegistry
) -> dict[str, Any]:
    return {
        "id": m.id,
        "label": m.label,
        "digest": m.digest,
        "facts": {
            name: {
                "tier": registry[name].tier.label if name in registry else "?",
                "value": c.value,
                "error": c.error,
            }
            for name, c in sorted(outcomes.items())
        },
        "verdicts": {name: d.to_dict() for name, d in decisions.items()},
    }


class _Pages(Mapping[str, Mapping[str, Any]]):
    """The listed messages' fact pages, each built when it is read: write_report holds
    one shard's pages at a time, not one page per listed message (at 100,000 messages
    nearly all are listed, and the pages were most of the driver's memory)."""

    def __init__(
        self,
        messages: Sequence[CorpusMessage],
        outcomes: Mapping[str, Outcomes],
        decisions: Mapping[str, Mapping[str, Decision]],
        registry: FactRegistry,
    ) -> None:
        self._messages = {m.digest: m for m in messages}
        self._outcomes = outcomes
        self._decisions = decisions
        self._registry = registry

    def __getitem__(self, digest: str) -> Mapping[str, Any]:
        m = self._messages[digest]
        return _message_page(m, self._outcomes[digest], self._decisions[m.id], self._registry)

    def __iter__(self) -> Iterator[str]:
        return iter(self._messages)

    def __len__(self) -> int:
        return len(self._messages)


def write_report(
    report: Mapping[str, Any],
    out: Path,
    pages: Mapping[str, Mapping[str, Any]],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    # Renderings read the JSON back: the numbers people see are the ones machines check.
    data = json.loads((out / "report.json").read_text())
    plots.draw(data, out / "plots")
    (out / "report.md").write_text(render.markdown(data))
    # The message lists go to report.html one page at a time; their other pages and
    # filters are static files under tables/, loaded by the page on demand.
    paged = render.report_tables(data)
    (out / "report.html").write_text(render.html(data, paged))
    tables.write(paged, out)
    messages = out / "messages"
    messages.mkdir(exist_ok=True)
    shards: dict[str, list[str]] = {}
    for digest in pages:
        shards.setdefault(message_shard(digest), []).append(digest)
    for shard, digests in sorted(shards.items()):
        group = {f"m{d[:16]}": pages[d] for d in digests}  # one shard's pages at a time
        (messages / f"{shard}.json").write_text(json.dumps(group) + "\n")
        (messages / f"{shard}.html").write_text(render.messages_html(list(group.values())))


def run_lab(options: LabOptions, loader: PolicyLoader = default_loader) -> dict[str, Any]:
    """Run one study and write its report under ``options.out``; returns the report data."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    registry = options.env.registry()
    regimes, regime_errors = load_regimes(options.policies, registry, loader)
    corpus = load_corpus(options.sources, options.description)
    timings["read_corpus"] = time.perf_counter() - t0
    t = time.perf_counter()
    names = needed_facts(regimes, registry)
    outcomes, facts_info = compute_facts(corpus, names, registry, options)
    timings["facts"] = time.perf_counter() - t
    t = time.perf_counter()
    with _bar(options.progress, len(corpus.messages), "regimes") as progress:
        decisions = asyncio.run(evaluate(regimes, corpus.messages, outcomes, registry, progress))
    timings["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    report = build_report(
        corpus_description=corpus.description,
        messages=corpus.messages,
        unreadable=corpus.unreadable,
        regimes=regimes,
        regime_errors=regime_errors,
        decisions=decisions,
        dns=options.env.dns_description(),
        inputs=options.env.inputs_description(),
        model=options.env.model_description(),
        facts_info=facts_info,
        timings=timings,
    )
    listed = {d["id"] for d in report["disagreements"]}
    listed |= {b["id"] for r in report["regimes"] for b in r["ham_blocks"]}
    pages = _Pages([m for m in corpus.messages if m.id in listed], outcomes, decisions, registry)
    write_report(report, options.out, pages)
    # Every message's verdicts, for `relay lab diff` between two reports (the pages above
    # cover only the messages the report lists).
    write_verdicts(options.out, corpus.messages, decisions)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    (options.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
