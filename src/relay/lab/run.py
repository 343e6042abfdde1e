"""`relay lab`: read the corpus, compute facts once (cached), evaluate every regime, report.

The driver streams: facts stay in the SQLite cache and are read a batch of messages at a
time (pass 2, evaluation, fact pages); each regime's decisions are cached too
(evaluate.regime_key), so a rerun evaluates only the regimes whose file (or facts)
changed; one message's decisions at a time go to the report's counters
(stats.ReportBuilder) and to verdicts.jsonl. Fact pages are written for the first
``pages`` rows of each message list. Without a cache directory the same happens in a
temporary one, removed at the end.

What a rerun skips: hashing an unchanged tar (cache.StatIndex), the survey of cached
facts once one found them all (cache.FactCache.ready_info), and deciding on the driver
alone: regimes with many undecided messages are decided on ``jobs`` forked processes
first (decide_pool.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from relay.facts import FactRegistry
from relay.lab import decide_pool, plots, render, tables
from relay.lab.cache import BATCH, BatchReader, Cached, FactCache
from relay.lab.compute import DEFERRED, Computed, Item, Outcomes
from relay.lab.corpus import Corpus, CorpusMessage, Source, load_corpus
from relay.lab.decide_pool import DecideJob, decide_missing, missing
from relay.lab.diff import VERDICTS_FILE, verdict_record
from relay.lab.engine import EngineSpec, first_pass, ordered_pass
from relay.lab.env import LabEnv, check_services
from relay.lab.evaluate import (
    Decision,
    PolicyLoader,
    Regime,
    RegimeDecider,
    decision_from_row,
    decision_row,
    default_loader,
    load_regimes,
    needed_facts,
    regime_key,
)
from relay.lab.stats import PAGES, ReportBuilder, message_shard


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
    pages: int | None = PAGES  # fact pages for the first rows of each list (None: all)
    rehash: bool = False  # hash every tar member again, whatever the stat index says


@contextmanager
def _bar(enabled: bool, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    bar = tqdm(total=total, desc=desc, unit="msg", disable=not enabled or total == 0)
    try:
        yield bar.update
    finally:
        bar.close()


@contextmanager
def open_cache(cache_dir: Path | None) -> Iterator[FactCache]:
    """The fact cache; without a directory, one in a temporary directory that goes with
    the run (the driver reads facts back from disk either way)."""
    if cache_dir is not None:
        with FactCache(cache_dir) as cache:
            yield cache
        return
    with tempfile.TemporaryDirectory(prefix="relay-lab-cache-") as tmp, FactCache(Path(tmp)) as c:
        yield c


@dataclass(frozen=True, slots=True)
class FactsReady:
    """Where a run's facts are: the cache, under these versions and contexts."""

    versions: Mapping[str, int]
    contexts: tuple[str, ...]  # the environment's, then the corpus order's (stateful)
    info: dict[str, Any]

    def reader(self, cache: FactCache, digests: Sequence[str]) -> BatchReader:
        return BatchReader(cache, digests, self.versions, self.contexts)


def compute_facts(
    corpus: Corpus,
    names: Sequence[str],
    registry: FactRegistry,
    options: LabOptions,
) -> tuple[dict[str, Outcomes], dict[str, Any]]:
    """Every needed fact for every readable message, in memory (for callers that hold a
    small corpus at once, e.g. tune.py; run_lab streams them from the cache instead)."""
    with open_cache(options.cache_dir) as cache:
        ready = prepare_facts(corpus, names, registry, options, cache)
        digests = [m.digest for m in corpus.messages]
        loaded = cache.load_batch(digests, ready.versions, ready.contexts)
    return {d: dict(loaded.get(d, {})) for d in digests}, ready.info


def prepare_facts(
    corpus: Corpus,
    names: Sequence[str],
    registry: FactRegistry,
    options: LabOptions,
    cache: FactCache,
) -> FactsReady:
    """Every needed fact for every readable message in the cache: what is missing is
    computed and stored; nothing is kept in memory per message but pass 2's carry-over."""
    env = options.env
    versions = {n: registry.cache_version(n) for n in names}
    env_key = env.key()
    order_key = f"{env_key}/order:{corpus.order_digest()}"
    messages = corpus.messages
    ready_key = _ready_key(versions, env_key, order_key)
    noted = cache.ready_info(ready_key)
    if noted is not None:
        # An earlier survey of this very corpus order, these versions and contexts found
        # every fact cached; facts are never removed, so surveying again finds the same.
        info = {**noted, "cache": None if options.cache_dir is None else str(options.cache_dir)}
        info.update(jobs=options.jobs, parallel_seconds=0.0, sequential_seconds=0.0)
        return FactsReady(versions, (env_key, order_key), info)
    wanted = set(names)
    items: list[Item] = []
    stateful: set[str] = set()
    ordered_rows: Counter[str] = Counter()  # messages with a cached value, per stateful fact
    errors: Counter[str] = Counter()
    ordered_errors: Counter[str] = Counter()
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per distinct set of names
    for start in range(0, len(messages), BATCH):
        part = messages[start : start + BATCH]
        digests = [m.digest for m in part]
        # A message's facts are its stateless ones and, over them, its stateful ones (a
        # stateful fact can have both: an error found in pass 1, the value of pass 2).
        counted = cache.survey(digests, versions, [env_key, order_key])
        ordered = cache.load_batch(digests, versions, [order_key], values=False)  # a few each
        short = [d for d in digests if counted.get(d, (0, ()))[0] < len(wanted)]
        # Which facts are missing, only for the messages that miss some.
        plain = cache.load_batch(short, versions, [env_key], values=False) if short else {}
        for m in part:
            later = ordered.get(m.digest, {})
            found, failed = counted.get(m.digest, (0, ()))
            stateful.update(later)
            ordered_rows.update(later.keys())
            errors.update(n for n in failed if n not in later)
            ordered_errors.update(n for n, c in later.items() if c.error is not None)
            if found >= len(wanted):
                continue
            have = plain.get(m.digest, {})
            missing = tuple(sorted(wanted - have.keys() - later.keys()))
            if missing:
                items.append((m, shared.setdefault(missing, missing)))
    start_time = time.perf_counter()
    if items:
        asyncio.run(check_services(env))

    def store(computed: Mapping[str, Computed]) -> None:
        # Called per finished batch by a cluster engine: a long run that stops keeps
        # what it computed, and the rerun computes only the rest.
        for digest, result in computed.items():
            fresh = {n: c for n, c in result.outcomes.items() if n in versions}
            deferred = {n for n, c in fresh.items() if c.error is not None and DEFERRED in c.error}
            stateful.update(deferred)
            keep = {n: c for n, c in fresh.items() if n not in deferred}
            errors.update(n for n, c in keep.items() if c.error is not None)
            cache.store(digest, keep, versions, env_key)
        cache.commit()

    with _bar(options.progress, len(items), "facts") as progress:
        computed = first_pass(options.engine, env, items, options.jobs, progress, store)
    # Only the live values pass 2 needs stay (the outcomes are in the cache).
    carried = {d: c.carry for d, c in computed.items() if c.carry}
    del computed
    parallel_seconds = time.perf_counter() - start_time
    rerun = sorted(n for n in stateful if ordered_rows[n] < len(messages))
    start_time = time.perf_counter()
    pass2: dict[str, Any] = {"mode": "cached" if stateful else "none"}
    if rerun:
        # Stateful facts are only true for the whole sequence: recompute them all, in order.
        names_seq = sorted(stateful)
        known = BatchReader(cache, [m.digest for m in messages], versions, (env_key,))
        with _bar(options.progress, len(messages), "stateful facts") as progress:
            values, pass2 = ordered_pass(
                options.engine, env, messages, known, carried, names_seq, options.jobs, progress
            )
        # Cached only now that every message has its values: a pass 2 that stopped
        # (a cluster gone) leaves nothing of itself behind. Its values are the stateful
        # facts' values now, over any error pass 1 found for them.
        ordered_errors = Counter()
        for name in names_seq:
            errors.pop(name, None)
        for digest, got in values.items():
            ordered_errors.update(n for n, c in got.items() if c.error is not None)
            cache.store(digest, got, versions, order_key)
        cache.commit()
        del values
    info = {
        "computed": list(names),
        "stateful": sorted(stateful),
        "messages_computed": len(items),
        "messages_from_cache": len(messages) - len(items),
        "cache": None if options.cache_dir is None else str(options.cache_dir),
        "jobs": options.jobs,
        "parallel_seconds": round(parallel_seconds, 3),
        "sequential_seconds": round(time.perf_counter() - start_time, 3),
        "pass2": pass2,
        "errors": dict(sorted((errors + ordered_errors).items())),
    }
    if not items and not rerun:
        cache.mark_ready(ready_key, info)
    return FactsReady(versions, (env_key, order_key), info)


def _ready_key(versions: Mapping[str, int], env_key: str, order_key: str) -> str:
    parts = {"versions": dict(sorted(versions.items())), "contexts": [env_key, order_key]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _message_page(
    m: CorpusMessage,
    outcomes: Mapping[str, Cached],
    decisions: Mapping[str, Decision],
    registry: FactRegistry,
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
    one shard's pages at a time. Facts and decisions are read back from the caches (a
    regime whose decisions are not cached is decided again: the same value)."""

    def __init__(
        self,
        messages: Sequence[CorpusMessage],
        facts: Mapping[str, Mapping[str, Cached]],
        decisions: Callable[[CorpusMessage, Mapping[str, Cached]], Mapping[str, Decision]],
        registry: FactRegistry,
    ) -> None:
        self._messages = {m.digest: m for m in messages}
        self._facts = facts
        self._decisions = decisions
        self._registry = registry

    def __getitem__(self, digest: str) -> Mapping[str, Any]:
        m = self._messages[digest]
        known = self._facts[digest]
        return _message_page(m, known, self._decisions(m, known), self._registry)

    def __iter__(self) -> Iterator[str]:
        return iter(self._messages)

    def __len__(self) -> int:
        return len(self._messages)


class _Evaluation:
    """Every regime on every message, a batch at a time: cached decisions read back,
    the others decided over the cached facts and stored. ``evaluated`` and
    ``from_cache`` count (message, regime) pairs per regime."""

    def __init__(
        self,
        regimes: Sequence[Regime],
        registry: FactRegistry,
        cache: FactCache,
        ready: FactsReady,
    ) -> None:
        self.regimes = list(regimes)
        self.decider = RegimeDecider(regimes, registry)
        self.store = cache.decisions()
        context = ready.contexts[-1]  # the corpus order's, which names the environment too
        self.keys = {r.name: regime_key(r, registry, context) for r in regimes}
        self.cache = cache
        self.ready = ready
        # Per regime, the facts it can read: a rerun of one regime parses only those.
        self.reads = {r.name: frozenset(needed_facts([r], registry)) for r in regimes}
        self.shared: dict[tuple[str, int], Decision] = {}
        self.evaluated: Counter[str] = Counter()
        self.from_cache: Counter[str] = Counter()
        self.pooled: Counter[str] = Counter()  # decided by decide_pooled, read back by run
        self.registry = registry

    def decide_pooled(self, messages: Sequence[CorpusMessage], jobs: int) -> None:
        """The regimes with many undecided messages decided on ``jobs`` processes first
        (decide_pool.py): ``run`` then reads their decisions back."""
        keys = {n: k for n, k in self.keys.items() if k is not None}
        todo = missing(self.cache, keys, len(messages))
        if jobs < 2 or not todo or sum(todo.values()) < decide_pool.MIN_POOLED:
            return
        job = DecideJob(
            cache_path=self.cache.path.parent,
            regimes=tuple(r for r in self.regimes if r.name in todo),
            keys=keys,
            reads=self.reads,
            versions=self.ready.versions,
            contexts=self.ready.contexts,
            registry=self.registry,
        )
        self.pooled.update(decide_missing(job, messages, self.cache, jobs))

    async def run(
        self,
        messages: Sequence[CorpusMessage],
        sink: Callable[[CorpusMessage, Mapping[str, Decision]], None],
        progress: Callable[[int], None],
    ) -> None:
        for start in range(0, len(messages), BATCH):
            part = messages[start : start + BATCH]
            digests = [m.digest for m in part]
            cached = {
                r.name: {} if (key := self.keys[r.name]) is None else self.store.load(key, digests)
                for r in self.regimes
            }
            fresh: dict[str, list[tuple[str, Any]]] = {r.name: [] for r in self.regimes}
            known = self._facts(part, cached)
            for m in part:
                todo = [r for r in self.regimes if m.digest not in cached[r.name]]
                facts = known.get(m.digest, {})
                decided = await self.decider.decide(m, todo, facts) if todo else {}
                decisions: dict[str, Decision] = {}
                for r in self.regimes:
                    if r.name in decided:
                        decisions[r.name] = d = decided[r.name]
                        fresh[r.name].append((m.digest, decision_row(d)))
                        self.evaluated[r.name] += 1
                    else:
                        decisions[r.name] = self._cached(r.name, cached[r.name][m.digest])
                        self.from_cache[r.name] += 1
                sink(m, decisions)
                progress(1)
            for r in self.regimes:
                key = self.keys[r.name]
                if key is not None and fresh[r.name]:
                    self.store.store(key, fresh[r.name])
            self.store.commit()

    def _cached(self, regime: str, id_: int) -> Decision:
        # One Decision per distinct cached value, shared by every message that has it.
        found = self.shared.get((regime, id_))
        if found is None:
            key = self.keys[regime]
            assert key is not None, "only a regime with a key has cached decisions"
            found = self.shared[(regime, id_)] = decision_from_row(self.store.value(key, id_))
        return found

    def _facts(
        self, part: Sequence[CorpusMessage], cached: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, Cached]]:
        """The facts of the messages some regime must decide, only those such regimes read."""
        names: set[str] = set()
        digests: list[str] = []
        for m in part:
            todo = [r.name for r in self.regimes if m.digest not in cached[r.name]]
            if todo:
                digests.append(m.digest)
                names.update(*(self.reads[n] for n in todo))
        if not digests:
            return {}
        versions = {n: v for n, v in self.ready.versions.items() if n in names}
        return self.cache.load_batch(digests, versions, self.ready.contexts)

    def decisions_of(self, m: CorpusMessage, known: Mapping[str, Cached]) -> dict[str, Decision]:
        """One message's decisions again (for its fact page), from the cache if there."""
        out: dict[str, Decision] = {}
        todo: list[Regime] = []
        for r in self.regimes:
            key = self.keys[r.name]
            id_ = None if key is None else self.store.load(key, [m.digest]).get(m.digest)
            if id_ is None:
                todo.append(r)
            else:
                out[r.name] = self._cached(r.name, id_)
        if todo:
            out.update(asyncio.run(self.decider.decide(m, todo, known)))
        return {r.name: out[r.name] for r in self.regimes}

    def info(self) -> dict[str, Any]:
        return {
            r.name: {
                "evaluated": self.evaluated[r.name] + self.pooled[r.name],
                "from_cache": self.from_cache[r.name] - self.pooled[r.name],
            }
            for r in self.regimes
        }


class VerdictLines:
    """verdicts.jsonl's lines, each exactly ``json.dumps(verdict_record(...))`` compact,
    with each regime's part encoded once per distinct decision: most messages share
    their decisions, and encoding six of them a message was a good part of a rerun."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, Decision], str] = {}

    def line(self, m: CorpusMessage, decisions: Mapping[str, Decision]) -> str:
        parts = []
        for name, d in decisions.items():
            part = self._parts.get((name, d))
            if part is None:
                record = verdict_record(m, {name: d})["verdicts"]
                part = self._parts[(name, d)] = json.dumps(record, separators=(",", ":"))[1:-1]
            parts.append(part)
        head = json.dumps({"id": m.id, "label": m.label, "digest": m.digest}, separators=(",", ":"))
        return f'{head[:-1]},"verdicts":{{{",".join(parts)}}}}}\n'


def write_report(
    report: Mapping[str, Any],
    out: Path,
    pages: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """report.json and every rendering of it; returns the JSON read back."""
    # Renderings read the JSON back: the numbers people see are the ones machines check.
    data = _round_trip(report)
    render_report(data, out, pages)
    _dump(data, out)
    return data


def _round_trip(report: Mapping[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(report))
    return data


def _dump(report: Mapping[str, Any], out: Path) -> None:
    # Compact and in one piece: with an indent, or streamed by json.dump, the json module
    # encodes in Python, about ten times slower (1 s of a 10,000-message rerun).
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, separators=(",", ":")) + "\n")


def render_report(
    data: Mapping[str, Any], out: Path, pages: Mapping[str, Mapping[str, Any]]
) -> None:
    """Markdown, HTML, tables, plots and fact pages from the report's JSON data."""
    out.mkdir(parents=True, exist_ok=True)
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
    """Run one study and write its report under ``options.out``; returns the report data.

    ``report["evaluation"]`` says, per regime, how many messages were decided in this run
    and how many decisions were read back from the cache.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    registry = options.env.registry()
    regimes, regime_errors = load_regimes(options.policies, registry, loader)
    with open_cache(options.cache_dir) as cache:
        corpus = load_corpus(
            options.sources,
            options.description,
            cache.corpus_index(),
            cache.stat_index(),
            trust_stat=not options.rehash,
        )
        messages = corpus.messages
        timings["read_corpus"] = time.perf_counter() - t0
        t = time.perf_counter()
        ready = prepare_facts(corpus, needed_facts(regimes, registry), registry, options, cache)
        timings["facts"] = time.perf_counter() - t
        t = time.perf_counter()
        builder = ReportBuilder(regimes)
        evaluation = _Evaluation(regimes, registry, cache, ready)
        options.out.mkdir(parents=True, exist_ok=True)
        # Every message's verdicts, for `relay lab diff` between two reports (the fact
        # pages cover only the first rows of each list), written as they are decided.
        partial = options.out / (VERDICTS_FILE + ".partial")
        with partial.open("w", encoding="utf-8") as verdicts:
            lines = VerdictLines()

            def sink(m: CorpusMessage, decisions: Mapping[str, Decision]) -> None:
                builder.add(m, decisions)
                verdicts.write(lines.line(m, decisions))

            evaluation.decide_pooled(messages, options.jobs)
            with _bar(options.progress, len(messages), "regimes") as progress:
                asyncio.run(evaluation.run(messages, sink, progress))
        partial.replace(options.out / VERDICTS_FILE)
        timings["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        report = builder.build(
            corpus_description=corpus.description,
            unreadable=corpus.unreadable,
            regime_errors=regime_errors,
            dns=options.env.dns_description(),
            inputs=options.env.inputs_description(),
            model=options.env.model_description(),
            facts_info=ready.info,
            timings=timings,
            pages=options.pages,
        )
        report["evaluation"] = evaluation.info()
        listed = {d["id"] for d in report["disagreements"] if d["facts"] is not None}
        listed |= {
            b["id"] for r in report["regimes"] for b in r["ham_blocks"] if b["facts"] is not None
        }
        # In digest order: pages are written shard after shard, and the facts are read
        # back a batch of neighbouring digests at a time.
        paged = sorted((m for m in messages if m.id in listed), key=lambda m: m.digest)
        facts = ready.reader(cache, [m.digest for m in paged])
        # The lists are held once: as built until encoded, then as read back.
        data = _round_trip(report)
        del report
        render_report(data, options.out, _Pages(paged, facts, evaluation.decisions_of, registry))
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    data["timings"] = {k: round(v, 3) for k, v in timings.items()}
    _dump(data, options.out)
    return data
